// Training: a fine-tuning job from an uploaded training file (or one uploaded here) with its options, the
// tenant's jobs, and end users' personal prefixes (example counts, last job).
import { call, enc } from './api.js';
import { h, fill, field, errorBox, formatBytes, formatTime, table } from './dom.js';

// Hyperparameters offered in the form: [field, label, hint, step]; empty = the server's default.
const HYPER = [
  ['max_steps', 'Max steps', 'optimizer steps; wins over epochs', '1'],
  ['n_epochs', 'Epochs', '', '1'],
  ['batch_size', 'Batch size', '', '1'],
  ['learning_rate', 'Learning rate', 'default 3e-2 for a directly trained prefix', 'any'],
  ['eval_every', 'Validate every', 'steps between validation passes', '1'],
  ['checkpoint_every', 'Checkpoint every', 'steps between checkpoints (default: none)', '1'],
];
const OPTIONS = [
  ['num_virtual_tokens', 'Virtual tokens', 'prefix length (default 16)', '1'],
  ['validation_split', 'Validation split', 'fraction held out when no validation file, ≤ 0.5', 'any'],
  ['seed', 'Seed', '', '1'],
  ['early_stopping_patience', 'Early-stopping patience', '0: never stop early', '1'],
];

export async function render(main) {
  const [files, jobs, models] = await Promise.all([
    call('/v1/files?purpose=fine-tune&limit=100'), call('/v1/fine_tuning/jobs?limit=100'), call('/v1/models')]);
  fill(main, h('h1', {}, 'Training'), jobForm(files.data, models.data[0].id),
    h('section', { class: 'card', 'aria-labelledby': 'jobs-title' }, h('h2', { id: 'jobs-title' }, 'Jobs'),
      jobsTable(jobs.data)),
    await usersSection());
}

function numberInput(name, step) {
  return h('input', { type: 'number', name, step, min: 0, inputmode: step === '1' ? 'numeric' : 'decimal' });
}

function jobForm(files, baseModel) {
  const fileSelect = h('select', { name: 'training_file' },
    h('option', { value: '' }, files.length ? 'Choose a file…' : 'No training files yet: upload one'),
    files.map((f) => h('option', { value: f.id }, `${f.filename} (${formatBytes(f.bytes)}, ${f.id})`)));
  const newFile = h('input', { type: 'file', name: 'new-training-file', accept: '.jsonl,application/jsonl' });
  const suffix = h('input', { name: 'suffix', maxlength: 64, placeholder: 'support-bot' });
  const warmStart = h('input', { name: 'warm_start', placeholder: 'name or name@version' });
  const onTopOf = h('input', { name: 'on_top_of', placeholder: 'name@version or a+b' });
  const init = h('select', { name: 'prefix_init' }, h('option', { value: '' }, 'default (real tokens)'),
    h('option', { value: 'real_tokens' }, 'real tokens'), h('option', { value: 'random' }, 'random'));
  const hyper = HYPER.map(([n, label, hint, step]) => [n, field(label, numberInput(n, step), hint)]);
  const options = OPTIONS.map(([n, label, hint, step]) => [n, field(label, numberInput(n, step), hint)]);
  const message = h('div');
  const form = h('form', { class: 'card', 'aria-labelledby': 'new-job-title' },
    h('h2', { id: 'new-job-title' }, 'New training job'),
    h('p', { class: 'muted' }, 'Base model ', h('code', {}, baseModel),
      '. Training data is JSONL: {"prompt", "completion"} or {"messages"} per line.'),
    h('div', { class: 'grid' }, field('Training file', fileSelect),
      field('…or upload a training file', newFile, 'checked line by line by the API')),
    h('div', { class: 'grid' }, field('Prefix name (suffix)', suffix, 'a new prefix, or the next version of yours'),
      field('Warm start', warmStart), field('Train on top of', onTopOf), field('Initialisation', init)),
    h('fieldset', {}, h('legend', {}, 'Hyperparameters (empty: default)'),
      h('div', { class: 'grid' }, hyper.map(([, f]) => f))),
    h('fieldset', {}, h('legend', {}, 'Prefix options'), h('div', { class: 'grid' }, options.map(([, f]) => f))),
    h('button', { type: 'submit' }, 'Start training'), message);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    fill(message);
    try {
      let fileId = fileSelect.value;
      if (newFile.files.length) {
        const body = new FormData();
        body.append('purpose', 'fine-tune');
        body.append('file', newFile.files[0], newFile.files[0].name);
        fileId = (await call('/v1/files', { method: 'POST', body })).id;
      }
      if (!fileId) throw new Error('Choose a training file or upload one.');
      const body = { model: baseModel, training_file: fileId };
      const hp = numbers(hyper, form);
      if (Object.keys(hp).length) body.hyperparameters = hp;
      Object.assign(body, numbers(options, form));
      for (const [input, key] of [[suffix, 'suffix'], [warmStart, 'warm_start'], [onTopOf, 'on_top_of'],
        [init, 'prefix_init']]) if (input.value.trim()) body[key] = input.value.trim();
      const job = await call('/v1/fine_tuning/jobs', { method: 'POST', body });
      location.hash = `#/jobs/${enc(job.id)}`;
    } catch (err) { fill(message, errorBox(err)); }
  });
  return form;
}

/** The filled number fields as {name: number}; the API names any out-of-range one in its 400. */
function numbers(fields, form) {
  const out = {};
  for (const [n] of fields) {
    const input = form.elements.namedItem(n);
    if (input.value !== '') out[n] = Number(input.value);
  }
  return out;
}

function jobsTable(jobs) {
  return table('Training jobs, newest first', [
    { label: 'Job', cell: (j) => h('a', { href: `#/jobs/${enc(j.id)}` }, j.id) },
    { label: 'Status', cell: (j) => h('span', { class: `status ${j.status}` }, j.status) },
    { label: 'Prefix', cell: (j) => j.fine_tuned_model || j.suffix },
    { label: 'End user', cell: (j) => j.user || '—' },
    { label: 'Created', cell: (j) => formatTime(j.created_at) },
  ], jobs, 'No jobs yet.');
}

/** The tenant's end users (the newest 100; older ones can be looked up by id). */
async function usersSection() {
  const listed = await call('/v1/users?limit=100');
  const rows = listed.data;
  const holder = h('div', {}, usersTable(rows));
  const lookup = h('input', { name: 'user-id', autocomplete: 'off' });
  const message = h('div');
  const form = h('form', { class: 'inline' }, field('Look up an end user', lookup),
    h('button', { type: 'submit' }, 'Look up'), message);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    fill(message);
    try {
      const user = await call(`/v1/users/${enc(lookup.value.trim())}`);
      if (!rows.some((r) => r.id === user.id)) rows.unshift(user);
      fill(holder, usersTable(rows));
    } catch (err) { fill(message, errorBox(err)); }
  });
  return h('section', { class: 'card', 'aria-labelledby': 'users-title' },
    h('h2', { id: 'users-title' }, 'Personal prefixes of end users'), form, holder);
}

function usersTable(users) {
  return table('End users', [
    { label: 'User', cell: (u) => u.id },
    { label: 'Examples', cell: (u) => u.example_count },
    { label: 'Personal prefix', cell: (u) => (u.personal_prefix
      ? h('code', {}, `${u.personal_prefix.model}@${u.personal_prefix.version}`) : '—') },
    { label: 'Last job', cell: (u) => (u.last_job
      ? h('a', { href: `#/jobs/${enc(u.last_job.id)}` }, `${u.last_job.status} · ${u.last_job.id}`) : '—') },
  ], users, 'No end users yet: they appear with their first examples.');
}
