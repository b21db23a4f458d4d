// Prefixes: every version with its size, virtual tokens, base-model fingerprint and origin (uploaded as
// native / PEFT, or trained by a job); upload by drag and drop; download in both formats; delete.
import { call, download, enc } from './api.js';
import { h, fill, field, errorBox, announce, formatBytes, formatTime, table } from './dom.js';
import { filesOfDrop } from './drop.js';

export async function render(main) {
  const list = h('div', { id: 'prefix-list', 'aria-live': 'polite' });
  fill(main, h('h1', {}, 'Prefixes'), uploadCard(() => refresh(list)), list);
  await refresh(list);
}

// Versions are one request per prefix (the list has the newest version only): loaded at once for the first
// ones, on demand for the rest, so a large catalogue does not spend the tenant's requests_per_minute.
const LOADED_AT_ONCE = 20;

async function refresh(list) {
  const [prefixes, jobs] = await Promise.all([call('/v1/prefixes'), call('/v1/fine_tuning/jobs?limit=100')]);
  const trainedBy = new Map(jobs.data.filter((j) => j.fine_tuned_model).map((j) => [j.fine_tuned_model, j]));
  const changed = () => refresh(list);
  const details = await Promise.all(prefixes.data.slice(0, LOADED_AT_ONCE)
    .map((p) => call(`/v1/prefixes/${enc(p.name)}`)));
  if (!prefixes.data.length) {
    fill(list, h('p', { class: 'empty' }, 'No prefixes yet: upload one above, or train one.'));
    return;
  }
  fill(list, details.map((p) => prefixSection(p, trainedBy, changed)),
    prefixes.data.slice(LOADED_AT_ONCE).map((p) => unloadedSection(p, trainedBy, changed)));
}

/** A prefix whose versions are fetched when asked for. */
function unloadedSection(prefix, trainedBy, changed) {
  const message = h('div');
  const show = h('button', { type: 'button', 'aria-label': `Show the versions of ${prefix.name}` }, 'Show versions');
  const section = h('section', { class: 'card prefix', 'aria-labelledby': `p-${prefix.id}` },
    h('div', { class: 'row' }, h('h2', { id: `p-${prefix.id}` }, prefix.name),
      h('span', { class: 'muted' }, `newest @${prefix.latest_version} · ${prefix.num_virtual_tokens} virtual tokens`),
      show), message);
  show.addEventListener('click', async () => {
    try {
      section.replaceWith(prefixSection(await call(`/v1/prefixes/${enc(prefix.name)}`), trainedBy, changed));
    } catch (err) { fill(message, errorBox(err)); }
  });
  return section;
}

function origin(prefix, v, trainedBy) {
  const job = trainedBy.get(`${prefix.name}@${v.version}`);
  if (job) return h('span', {}, 'trained by ', h('a', { href: `#/jobs/${enc(job.id)}` }, job.id));
  const what = { native: 'uploaded (native)', peft: 'uploaded (PEFT)', trained: 'trained' }[v.source_format];
  const recorded = v.recorded_base_model ? ` for ${v.recorded_base_model}` : '';
  return `${what || v.source_format}${recorded}`;
}

function prefixSection(prefix, trainedBy, changed) {
  const message = h('div');
  const remove = async (ref, what) => {
    if (!window.confirm(`Delete ${what}? It is never served again.`)) return;
    try {
      await call(`/v1/prefixes/${enc(ref)}`, { method: 'DELETE' });
      announce(`Deleted ${ref}`);
      await changed();
    } catch (err) { fill(message, errorBox(err)); }
  };
  const save = (ref, fmt) => download(`/v1/prefixes/${enc(ref)}/download?format=${fmt}`, `${ref}.${fmt}`)
    .catch((err) => fill(message, errorBox(err)));
  const columns = [
    { label: 'Version', cell: (v) => `@${v.version}` },
    { label: 'Virtual tokens', cell: (v) => v.num_virtual_tokens },
    // prefix_tuning: per-layer keys/values; prompt_tuning / p_tuning: a soft prompt (input embeddings).
    { label: 'Kind', cell: (v) => (v.kind || 'prefix_tuning').replace('_', ' ') },
    { label: 'Size', cell: (v) => formatBytes(v.size_bytes) },
    { label: 'Base model', cell: (v) => h('code', { title: v.base_model_fingerprint },
      v.base_model_fingerprint.slice(0, 12)) },
    { label: 'Origin', cell: (v) => origin(prefix, v, trainedBy) },
    { label: 'Created', cell: (v) => formatTime(v.created_at) },
    { label: 'Actions', cell: (v) => {
      const ref = `${prefix.name}@${v.version}`;
      return h('div', { class: 'actions' },
        h('button', { type: 'button', onclick: () => save(ref, 'native'), 'aria-label': `Download ${ref} native` },
          'Native'),
        h('button', { type: 'button', onclick: () => save(ref, 'peft'), 'aria-label': `Download ${ref} PEFT` },
          'PEFT zip'),
        h('button', { type: 'button', class: 'danger', onclick: () => remove(ref, `version ${ref}`),
          'aria-label': `Delete ${ref}` }, 'Delete'));
    } },
  ];
  return h('section', { class: 'card prefix', 'aria-labelledby': `p-${prefix.id}` },
    h('div', { class: 'row' },
      h('h2', { id: `p-${prefix.id}` }, prefix.name),
      h('span', { class: 'muted' }, `newest @${prefix.latest_version} · model `, h('code', {}, prefix.name)),
      h('button', { type: 'button', class: 'danger', onclick: () => remove(prefix.name, `every version of ${
        prefix.name}`), 'aria-label': `Delete prefix ${prefix.name}` }, 'Delete all versions')),
    table(`Versions of ${prefix.name}`, columns, [...prefix.versions].reverse()), message);
}

function uploadCard(uploaded) {
  let files = [];
  const name = h('input', { name: 'prefix-name', required: true, pattern: '[A-Za-z0-9._\\-]+', maxlength: 100 });
  const picker = h('input', { type: 'file', multiple: true, accept: '.safetensors,.zip,.json', class: 'visually-hidden' });
  const chosen = h('p', { class: 'muted', 'aria-live': 'polite' }, 'No files chosen.');
  const message = h('div');
  const setFiles = (list) => {
    files = list;
    fill(chosen, files.length ? `Chosen: ${files.map((f) => f.name).join(', ')}` : 'No files chosen.');
  };
  picker.addEventListener('change', () => setFiles([...picker.files]));
  const zone = h('label', { class: 'dropzone', for: picker.id || (picker.id = 'upload-files'), tabindex: 0,
    'aria-describedby': 'upload-formats' },
  h('strong', {}, 'Drop prefix files here'), ' or choose them');
  zone.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); picker.click(); } });
  zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', async (e) => {
    e.preventDefault();
    zone.classList.remove('over');
    setFiles(await filesOfDrop(e.dataTransfer));
  });
  const form = h('form', { class: 'card', 'aria-labelledby': 'upload-title' },
    h('h2', { id: 'upload-title' }, 'Upload a prefix'),
    field('Name', name, 'An existing name gets a new version.'),
    zone, picker,
    h('small', { id: 'upload-formats' }, 'One native .safetensors prefix, a zip of a PEFT adapter directory, or the ',
      'directory itself / its two files (adapter_config.json and adapter_model.safetensors).'),
    chosen, h('button', { type: 'submit' }, 'Upload'), message);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    fill(message);
    if (!files.length) { fill(message, errorBox('Choose or drop the prefix files first.')); return; }
    const body = new FormData();
    body.append('name', name.value.trim());
    for (const f of files) body.append(files.length === 1 ? 'file' : 'files', f, f.name);
    try {
      const v = await call('/v1/prefixes', { method: 'POST', body });
      fill(message, h('p', { class: 'ok', role: 'status' },
        `Uploaded ${v.name}@${v.version} (${v.num_virtual_tokens} virtual tokens, ${formatBytes(v.size_bytes)}).`),
      v.warnings.map((w) => h('p', { class: 'warning' }, w)));
      setFiles([]);
      picker.value = '';
      await uploaded();
    } catch (err) { fill(message, errorBox(err)); }
  });
  return form;
}
