// The console's shell: sign-in, navigation and hash routes (#/prefixes, #/jobs/<id>, ...). Each page module
// exports render(main, params) and may return a cleanup function (e.g. to close a live stream).
import { call, session, signIn, signOut, ApiError } from './api.js';
import { h, fill, field, errorBox, announce } from './dom.js';

const TENANT_PAGES = [
  ['prefixes', 'Prefixes'], ['training', 'Training'], ['playground', 'Playground'], ['usage', 'Usage'],
];
const ADMIN_PAGES = [['admin', 'Tenants']];
const LOADERS = {
  prefixes: () => import('./prefixes.js'),
  training: () => import('./training.js'),
  jobs: () => import('./job.js'),
  playground: () => import('./playground.js'),
  usage: () => import('./usage.js'),
  admin: () => import('./admin.js'),
};

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const signOutButton = document.getElementById('sign-out');
let cleanup = null;

/** Which key is it? A tenant key lists models; the admin key is refused there (403) but lists tenants. */
async function roleOf(key) {
  try {
    await call('/v1/models', { key });
    return 'tenant';
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 403) throw err;
    try {
      await call('/admin/tenants', { key });
      return 'admin';
    } catch {
      throw err;  // a tenant key without the scope: say what the API said
    }
  }
}

function renderSignIn() {
  nav.hidden = true;
  signOutButton.hidden = true;
  const input = h('input', { type: 'password', name: 'api-key', autocomplete: 'off', required: true,
    spellcheck: 'false' });
  const message = h('div');
  const form = h('form', { class: 'card narrow', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'Sign in'),
    field('API key', input, 'A tenant key, or the platform admin key. Kept in this tab only (sessionStorage).'),
    h('button', { type: 'submit' }, 'Sign in'), message);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    fill(message);
    const key = input.value.trim();
    try {
      const role = await roleOf(key);
      signIn(key, role);
      input.value = '';
      go(role === 'admin' ? '#/admin' : '#/prefixes');
    } catch (err) {
      fill(message, errorBox(err));
      input.focus();
    }
  });
  fill(main, form);
  input.focus();
}

function renderNav(role, current) {
  const pages = role === 'admin' ? ADMIN_PAGES : TENANT_PAGES;
  fill(nav, h('ul', {}, pages.map(([id, label]) => h('li', {},
    h('a', { href: `#/${id}`, 'aria-current': id === current || (current === 'jobs' && id === 'training')
      ? 'page' : null }, label)))));
  nav.hidden = false;
  signOutButton.hidden = false;
}

async function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  const who = session();
  if (!who) { renderSignIn(); return; }
  const [page = '', ...params] = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  const allowed = who.role === 'admin' ? ['admin'] : ['prefixes', 'training', 'jobs', 'playground', 'usage'];
  const name = allowed.includes(page) ? page : allowed[0];
  renderNav(who.role, name);
  fill(main, h('p', { class: 'loading' }, 'Loading…'));
  try {
    const module = await LOADERS[name]();
    cleanup = (await module.render(main, params)) || null;
    document.title = `${main.querySelector('h1')?.textContent || name} · prefixserve console`;
    announce(`${main.querySelector('h1')?.textContent || name} page`);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) { signOut(); renderSignIn(); return; }
    fill(main, errorBox(err));
  }
}

/** Go to a route: through hashchange, or at once when the hash is already that one. */
function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

signOutButton.addEventListener('click', () => {
  signOut();
  go('#/');
});
window.addEventListener('hashchange', () => { route(); main.focus(); });
route();
