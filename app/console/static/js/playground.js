// Playground: one prompt (or a chat) sent to several models at once — the base model, a prefix, a version
// (`name@3`), `user:<id>`, a stack (`a+b`) — answers streamed side by side (SSE from /v1/chat/completions or
// /v1/completions via fetch + ReadableStream), with the sampling controls and the request as curl / Python.
import { call, streamJson } from './api.js';
import { h, fill, field, errorBox, announce } from './dom.js';
import { curlOf, pythonOf } from './snippets.js';

// Sampling controls: [field, label, attributes]; empty = the server's default.
const SAMPLING = [
  ['temperature', 'Temperature', { min: 0, max: 2, step: 0.1, value: 0.7 }],
  ['top_p', 'Top p', { min: 0.01, max: 1, step: 0.01 }],
  ['top_k', 'Top k', { min: -1, step: 1 }],
  ['max_tokens', 'Max tokens', { min: 1, step: 1, value: 64 }],
  ['seed', 'Seed', { min: 0, step: 1 }],
  ['presence_penalty', 'Presence penalty', { min: -2, max: 2, step: 0.1 }],
  ['frequency_penalty', 'Frequency penalty', { min: -2, max: 2, step: 0.1 }],
];

export async function render(main) {
  const models = (await call('/v1/models')).data.map((m) => m.id);
  const known = h('datalist', { id: 'known-models' }, models.map((m) => h('option', { value: m })));
  const picked = h('div', { class: 'model-list' });
  const addModel = (value = '') => {
    const n = picked.children.length + 1;
    const input = h('input', { name: 'model', list: 'known-models', value, required: true, autocomplete: 'off',
      'aria-label': `Model ${n}` });
    const remove = h('button', { type: 'button', 'aria-label': `Remove model ${n}`,
      onclick: () => { row.remove(); } }, '×');
    const row = h('div', { class: 'model-row' }, input, remove);
    picked.append(row);
    return input;
  };
  addModel(models[0]);
  if (models[1]) addModel(models[1]);
  const mode = h('select', { name: 'mode' }, h('option', { value: 'chat' }, 'Chat'),
    h('option', { value: 'completion' }, 'Completion (raw prompt)'));
  const system = h('textarea', { name: 'system', rows: 2, placeholder: 'optional' });
  const prompt = h('textarea', { name: 'prompt', rows: 3, required: true });
  const sampling = SAMPLING.map(([n, label, attrs]) => field(label, h('input', { type: 'number', name: n, ...attrs })));
  const code = h('div', { class: 'code' });
  const answers = h('div', { class: 'answers', 'aria-live': 'polite' });
  const send = h('button', { type: 'submit' }, 'Send');
  const stopButton = h('button', { type: 'button', disabled: true }, 'Stop');
  const clear = h('button', { type: 'button' }, 'New conversation');
  const form = h('form', { class: 'card', 'aria-labelledby': 'pg-title' },
    h('h2', { id: 'pg-title' }, 'Request'),
    h('fieldset', {}, h('legend', {}, 'Models (base, prefix, name@version, user:<id>, a+b)'), picked,
      h('button', { type: 'button', onclick: () => addModel().focus() }, 'Add a model'), known),
    h('div', { class: 'grid' }, field('Mode', mode), field('System message', system)),
    field('Prompt', prompt, 'Ctrl+Enter sends'),
    h('details', {}, h('summary', {}, 'Sampling'), h('div', { class: 'grid' }, sampling)),
    h('div', { class: 'actions' }, send, stopButton, clear));
  fill(main, h('h1', {}, 'Playground'), form,
    h('section', { 'aria-labelledby': 'answers-title' }, h('h2', { id: 'answers-title' }, 'Answers'), answers),
    h('section', { class: 'card', 'aria-labelledby': 'code-title' }, h('h2', { id: 'code-title' }, 'As code'),
      h('p', { class: 'muted' }, 'The request to the first model; the others differ only in `model`.'), code));

  let histories = new Map();  // model -> chat messages so far (each column its own conversation)
  let running = null;
  const request = () => buildRequest(form, mode.value, system.value, prompt.value);
  const showCode = () => {
    const { path, body } = request()(modelsOf(picked)[0] || 'MODEL', []);
    fill(code, snippet('curl', curlOf(path, body)), snippet('Python', pythonOf(path, body)));
  };
  form.addEventListener('input', showCode);
  showCode();
  prompt.addEventListener('keydown', (e) => { if (e.key === 'Enter' && e.ctrlKey) form.requestSubmit(); });
  clear.addEventListener('click', () => { histories = new Map(); fill(answers); prompt.focus(); });
  stopButton.addEventListener('click', () => running?.abort());
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    running = new AbortController();
    send.disabled = true;
    stopButton.disabled = false;
    const make = request();
    const names = modelsOf(picked);
    const columns = names.map((m) => column(answers, m));
    await Promise.all(names.map((m, i) => runOne(make, m, histories, columns[i], running.signal)));
    send.disabled = false;
    stopButton.disabled = true;
    announce('Answers complete');
  });
  return () => running?.abort();
}

function modelsOf(picked) {
  return [...picked.querySelectorAll('input')].map((i) => i.value.trim()).filter(Boolean);
}

/** (model, history) -> {path, body} for the form as it is now. */
function buildRequest(form, mode, system, prompt) {
  const options = {};
  for (const [n] of SAMPLING) {
    const v = form.elements.namedItem(n).value;
    if (v !== '') options[n] = Number(v);
  }
  return (model, history) => {
    if (mode === 'completion') {
      return { path: '/v1/completions', body: { model, prompt, stream: true, ...options } };
    }
    const messages = [...(system && !history.length ? [{ role: 'system', content: system }] : []), ...history,
      { role: 'user', content: prompt }];
    return { path: '/v1/chat/completions',
      body: { model, messages, stream: true, stream_options: { include_usage: true }, ...options } };
  };
}

function column(answers, model) {
  let col = [...answers.children].find((c) => c.dataset.model === model);
  if (!col) {
    col = h('article', { class: 'answer card', dataset: { model }, 'aria-label': `Answer of ${model}` },
      h('h3', {}, h('code', {}, model)), h('div', { class: 'turns' }), h('p', { class: 'meta muted' }));
    answers.append(col);
  }
  return col;
}

async function runOne(make, model, histories, col, signal) {
  const history = histories.get(model) || [];
  const { path, body } = make(model, history);
  const turns = col.querySelector('.turns');
  if (body.messages) turns.append(h('p', { class: 'turn user' }, body.messages.at(-1).content));
  const out = h('p', { class: 'turn assistant', 'aria-busy': 'true' });
  turns.append(out);
  const meta = col.querySelector('.meta');
  fill(meta, 'streaming…');
  col.dataset.state = 'streaming';
  let text = '';
  let finish = null;
  let usage = null;
  try {
    for await (const chunk of streamJson(path, body, signal)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        text += choice.delta ? (choice.delta.content || '') : (choice.text || '');
        finish = choice.finish_reason || finish;
      }
      out.textContent = text;
    }
    if (body.messages) histories.set(model, [...body.messages, { role: 'assistant', content: text }]);
    const tokens = usage ? ` · ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : '';
    fill(meta, `finish: ${finish || '—'}${tokens}`);
    col.dataset.state = 'done';
  } catch (err) {
    out.remove();
    fill(meta, err.name === 'AbortError' ? 'stopped' : errorBox(err));
    col.dataset.state = err.name === 'AbortError' ? 'stopped' : 'error';
  } finally {
    out.removeAttribute('aria-busy');
  }
}

function snippet(label, text) {
  const pre = h('pre', { tabindex: 0 }, h('code', {}, text));
  const copy = h('button', { type: 'button', 'aria-label': `Copy the ${label} snippet` }, 'Copy');
  copy.addEventListener('click', async () => {
    await navigator.clipboard.writeText(text);
    announce(`${label} copied`);
  });
  return h('div', { class: 'snippet' }, h('div', { class: 'row' }, h('h3', {}, label), copy), pre);
}
