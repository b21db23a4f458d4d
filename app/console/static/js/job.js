// One training job: status, options, a live loss curve (train and validation) from the job's event stream
// (SSE, read with fetch + ReadableStream), its checkpoints, cancel.
import { call, sse, enc, ApiError } from './api.js';
import { h, fill, errorBox, announce, formatTime, table } from './dom.js';
import { drawLoss, lossChart } from './chart.js';

const FINISHED = new Set(['succeeded', 'failed', 'cancelled']);

export async function render(main, [jobId]) {
  const job = await call(`/v1/fine_tuning/jobs/${enc(jobId)}`);
  const summary = h('dl', { class: 'facts' });
  const chart = lossChart();
  const log = h('ol', { class: 'events', 'aria-label': 'Events, oldest first' });
  const checkpoints = h('div');
  const message = h('div');
  const cancel = h('button', { type: 'button', class: 'danger' }, 'Cancel job');
  const train = { name: 'train loss', cls: 'train', points: [] };
  const valid = { name: 'validation loss', cls: 'valid', points: [] };
  fill(main, h('h1', {}, `Job ${job.id}`),
    h('section', { class: 'card', 'aria-labelledby': 'job-status' }, h('h2', { id: 'job-status' }, 'Status'),
      summary, cancel, message),
    h('section', { class: 'card', 'aria-labelledby': 'curve-title' }, h('h2', { id: 'curve-title' }, 'Loss'),
      h('p', { id: 'loss-legend', class: 'legend' }, h('span', { class: 'key train' }, 'train'),
        h('span', { class: 'key valid' }, 'validation')), chart),
    h('section', { class: 'card', 'aria-labelledby': 'ckpt-title' }, h('h2', { id: 'ckpt-title' }, 'Checkpoints'),
      checkpoints),
    h('section', { class: 'card', 'aria-labelledby': 'events-title' }, h('h2', { id: 'events-title' }, 'Events'),
      log));
  drawLoss(chart, [train, valid]);
  showJob(summary, cancel, job);

  const refresh = async () => {
    const [now, ckpts] = await Promise.all([call(`/v1/fine_tuning/jobs/${enc(jobId)}`),
      call(`/v1/fine_tuning/jobs/${enc(jobId)}/checkpoints?limit=100`)]);
    showJob(summary, cancel, now);
    fill(checkpoints, checkpointTable(ckpts.data));
    return now;
  };
  cancel.addEventListener('click', async () => {
    try {
      showJob(summary, cancel, await call(`/v1/fine_tuning/jobs/${enc(jobId)}/cancel`, { method: 'POST' }));
      announce('Cancel requested');
    } catch (err) { fill(message, errorBox(err)); }
  });
  await refresh();

  const stop = new AbortController();
  follow(jobId, stop.signal, (event) => {
    const d = event.data || {};
    if (typeof d.step === 'number' && typeof d.train_loss === 'number') train.points.push([d.step, d.train_loss]);
    if (typeof d.step === 'number' && typeof d.val_loss === 'number') valid.points.push([d.step, d.val_loss]);
    if (event.type === 'metrics') drawLoss(chart, [train, valid]);
    else log.append(h('li', { class: event.level }, `${formatTime(event.created_at)} — ${event.message}`));
    if (event.type !== 'metrics') refresh().catch(() => {});
  }).then(async () => {
    const done = await refresh();
    main.querySelector('.chart')?.setAttribute('data-finished', done.status);
    announce(`Job ${done.status}`);
  }).catch((err) => {
    if (err.name !== 'AbortError') fill(message, errorBox(err));
  });
  return () => stop.abort();
}

const RECONNECTS = 5;

/**
 * Read the job's event stream to its end ([DONE] once the job has finished), calling onEvent for each. A stream
 * cut before that (a proxy timeout, a replica restarting) is reopened after the last event seen (`after`), so
 * no event is drawn twice or missed.
 */
async function follow(jobId, signal, onEvent) {
  let after = null;
  for (let attempt = 0; attempt <= RECONNECTS; attempt += 1) {
    try {
      const query = `stream=true${after ? `&after=${enc(after)}` : ''}`;
      const response = await call(`/v1/fine_tuning/jobs/${enc(jobId)}/events?${query}`, { raw: true, signal });
      for await (const data of sse(response)) {
        if (data === '[DONE]') return;
        const event = JSON.parse(data);
        after = event.id;
        onEvent(event);
      }
    } catch (err) {
      if (err.name === 'AbortError' || err instanceof ApiError) throw err;  // left the page, or refused
    }
    await new Promise((resolve) => { setTimeout(resolve, 1000 * (attempt + 1)); });  // back off, then reopen
  }
  throw new ApiError(0, { error: { message: 'the event stream keeps ending early; reload to follow the job' } });
}

function showJob(summary, cancel, job) {
  const hp = Object.entries(job.hyperparameters || {}).filter(([, v]) => v !== null && v !== 'auto')
    .map(([k, v]) => `${k}=${v}`).join(', ');
  const facts = [
    ['Status', h('span', { class: `status ${job.status}`, id: 'job-status-value' }, job.status)],
    ['Prefix', job.fine_tuned_model ? h('code', {}, job.fine_tuned_model) : `${job.suffix} (when it succeeds)`],
    ['End user', job.user], ['Base model', job.model], ['Training file', job.training_file],
    ['Validation file', job.validation_file], ['Trained on top of', job.on_top_of], ['Hyperparameters', hp],
    ['Seed', job.seed], ['Trained tokens', job.trained_tokens], ['Created', formatTime(job.created_at)],
    ['Finished', job.finished_at ? formatTime(job.finished_at) : null],
    ['Error', job.error ? `${job.error.code}: ${job.error.message}` : null],
  ].filter(([, v]) => v !== null && v !== undefined && v !== '');
  fill(summary, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
  cancel.hidden = FINISHED.has(job.status);
}

function checkpointTable(rows) {
  return table('Checkpoints, latest step first', [
    { label: 'Step', cell: (c) => c.step_number },
    { label: 'Metrics', cell: (c) => Object.entries(c.metrics).filter(([k]) => k !== 'step')
      .map(([k, v]) => `${k} ${Number(v).toFixed(4)}`).join(', ') },
    { label: 'Checkpoint', cell: (c) => h('code', {}, c.fine_tuned_model_checkpoint) },
    { label: 'Saved', cell: (c) => formatTime(c.created_at) },
  ], rows, 'No checkpoints (set “Checkpoint every” to save some).');
}
