// The platform admin's page: tenants, their API keys and their limits (the /admin API).
import { call, enc } from './api.js';
import { h, fill, field, errorBox, announce, formatTime, table } from './dom.js';

const LIMITS = ['requests_per_minute', 'tokens_per_minute', 'max_concurrent_requests', 'max_prefixes',
  'max_stored_bytes', 'max_concurrent_jobs', 'max_examples_per_user', 'max_concurrent_batches'];

export async function render(main) {
  const detail = h('div', { id: 'tenant-detail' });
  const list = h('div');
  const message = h('div', { 'aria-live': 'polite' });
  const refresh = async () => {
    const tenants = (await call('/admin/tenants')).data;
    fill(list, table('Tenants', [
      { label: 'Name', cell: (t) => h('button', { type: 'button', class: 'link',
        onclick: () => showTenant(detail, t, refresh) }, t.name) },
      { label: 'Id', cell: (t) => h('code', {}, t.id) },
      { label: 'Created', cell: (t) => formatTime(t.created_at) },
    ], tenants, 'No tenants yet.'));
  };
  const name = h('input', { name: 'tenant-name', required: true, maxlength: 200 });
  const form = h('form', { class: 'inline' }, field('New tenant', name), h('button', { type: 'submit' }, 'Create'));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      const t = await call('/admin/tenants', { method: 'POST', body: { name: name.value.trim() } });
      fill(message, keyShown(`Tenant ${t.name} created. Its API key (shown only now):`, t.api_key));
      name.value = '';
      await refresh();
    } catch (err) { fill(message, errorBox(err)); }
  });
  fill(main, h('h1', {}, 'Tenants'), h('section', { class: 'card' }, form, message, list), detail);
  await refresh();
}

function keyShown(text, key) {
  return h('div', { class: 'ok', role: 'status' }, h('p', {}, text), h('code', { class: 'secret' }, key));
}

async function showTenant(detail, tenant, changed) {
  const [keys, limits] = await Promise.all([call(`/admin/tenants/${enc(tenant.id)}/keys`),
    call(`/admin/tenants/${enc(tenant.id)}/limits`)]);
  const message = h('div', { 'aria-live': 'polite' });
  const reload = () => showTenant(detail, tenant, changed).catch((err) => fill(message, errorBox(err)));
  const act = (fn) => async (...args) => { try { await fn(...args); } catch (err) { fill(message, errorBox(err)); } };
  const keyTable = table(`Keys of ${tenant.name}`, [
    { label: 'Key', cell: (k) => h('code', {}, `${k.key_prefix}…`) },
    { label: 'Scopes', cell: (k) => k.scopes.join(', ') },
    { label: 'Last used', cell: (k) => formatTime(k.last_used_at) },
    { label: 'State', cell: (k) => (k.revoked_at ? `revoked ${formatTime(k.revoked_at)}` : h('button', {
      type: 'button', class: 'danger', 'aria-label': `Revoke key ${k.key_prefix}`,
      onclick: act(async () => { await call(`/admin/keys/${enc(k.id)}`, { method: 'DELETE' }); await reload(); }),
    }, 'Revoke')) },
  ], keys.data);
  const scopes = ['inference', 'manage'].map((s) => h('label', { class: 'check' },
    h('input', { type: 'checkbox', name: 'scope', value: s, checked: true }), s));
  const newKey = h('button', { type: 'button', onclick: act(async () => {
    const chosen = scopes.map((l) => l.querySelector('input')).filter((i) => i.checked).map((i) => i.value);
    const k = await call(`/admin/tenants/${enc(tenant.id)}/keys`, { method: 'POST', body: { scopes: chosen } });
    await reload();
    detail.prepend(keyShown('New API key (shown only now):', k.key));
  }) }, 'Create key');
  const inputs = LIMITS.map((f) => field(f, h('input', { type: 'number', min: 0, name: f,
    value: limits.configured[f] ?? '', placeholder: `default: ${limits.effective[f] ?? 'unlimited'}` })));
  const limitForm = h('form', {}, h('div', { class: 'grid' }, inputs), h('button', { type: 'submit' }, 'Save limits'));
  limitForm.addEventListener('submit', act(async (e) => {
    e.preventDefault();
    const body = Object.fromEntries(LIMITS.map((f) => [f, limitForm.elements.namedItem(f).value === '' ? null
      : Number(limitForm.elements.namedItem(f).value)]));
    await call(`/admin/tenants/${enc(tenant.id)}/limits`, { method: 'PUT', body });
    announce('Limits saved');
    await reload();
  }));
  const remove = h('button', { type: 'button', class: 'danger', onclick: act(async () => {
    if (!window.confirm(`Delete tenant ${tenant.name} and everything it owns?`)) return;
    await call(`/admin/tenants/${enc(tenant.id)}`, { method: 'DELETE' });
    fill(detail);
    await changed();
  }) }, 'Delete tenant');
  fill(detail, h('section', { class: 'card', 'aria-labelledby': 'tenant-title' },
    h('h2', { id: 'tenant-title' }, tenant.name), message,
    h('h3', {}, 'API keys'), keyTable, h('fieldset', {}, h('legend', {}, 'Scopes of a new key'), scopes), newKey,
    h('h3', {}, 'Limits (empty: the server default)'), limitForm, remove));
}
