// Usage: the tenant's limits beside its current use, from GET /v1/usage (the counters the limits use).
import { call } from './api.js';
import { h, fill, formatBytes, table } from './dom.js';

const ROWS = [
  ['requests_per_minute', 'Requests this minute'],
  ['tokens_per_minute', 'Generated tokens this minute'],
  ['max_concurrent_requests', 'Requests in flight'],
  ['max_prefixes', 'Prefixes'],
  ['max_stored_bytes', 'Stored bytes (prefix versions and files)', formatBytes],
  ['max_concurrent_jobs', 'Training jobs queued or running'],
  ['max_concurrent_batches', 'Batches not finished'],
  ['max_examples_per_user', 'Examples of the busiest end user'],
];

export async function render(main) {
  const u = await call('/v1/usage');
  const show = (fmt) => (v) => (v === null || v === undefined ? '—' : (fmt || String)(v));
  const rows = ROWS.map(([key, label, fmt]) => ({ key, label, used: u.usage[key], limit: u.limits[key], fmt }));
  fill(main, h('h1', {}, 'Usage'),
    h('section', { class: 'card', 'aria-labelledby': 'usage-title' },
      h('h2', { id: 'usage-title' }, 'Limits and current use'),
      h('p', { class: 'muted' }, u.window_resets_in_s === null ? 'Per-minute counters: not kept (no rate limit).'
        : `Per-minute counters start afresh in ${u.window_resets_in_s} s.`),
      table('Usage by limit', [
        { label: 'Limit', cell: (r) => r.label },
        { label: 'Used', cell: (r) => show(r.fmt)(r.used) },
        { label: 'Allowed', cell: (r) => (r.limit === null ? 'unlimited' : show(r.fmt)(r.limit)) },
        { label: 'Share', cell: (r) => (r.limit && r.used !== null
          ? h('meter', { min: 0, max: r.limit, value: Math.min(r.used, r.limit), high: r.limit * 0.8,
            'aria-label': `${r.label}: ${r.used} of ${r.limit}` }) : '') },
      ], rows),
      h('p', { class: 'muted' }, 'Null counts: the limit is unlimited (nothing is counted) or the shared counters ',
        'are unreachable. Reading this page counts as a request.')));
}
