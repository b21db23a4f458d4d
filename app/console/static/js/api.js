// The API, called from the browser with the signed-in key. The key lives in this tab's sessionStorage only:
// never in a URL, a cookie or anything sent to the server but the Authorization header.

const STORE = 'prefixserve.console';

export function session() {
  const raw = sessionStorage.getItem(STORE);
  return raw ? JSON.parse(raw) : null;
}

export function signIn(key, role) {
  sessionStorage.setItem(STORE, JSON.stringify({ key, role }));
}

export function signOut() {
  sessionStorage.removeItem(STORE);
}

/** An API error: the message of OpenAI's error body, with the HTTP status and code. */
export class ApiError extends Error {
  constructor(status, body) {
    const e = body && body.error ? body.error : {};
    super(e.message || (body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || null;
    this.param = e.param || null;
  }
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  return new ApiError(response.status, body);
}

/** fetch with the key; JSON bodies for plain objects, FormData as is. Throws ApiError on a non-2xx. */
export async function call(path, { method = 'GET', body, key, signal, raw = false } = {}) {
  const headers = { Authorization: `Bearer ${key || session()?.key}` };
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload, signal, cache: 'no-store' });
  if (!response.ok) throw await failure(response);
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

/** Server-Sent Events of a response (fetch + ReadableStream): yields each event's data string. */
export async function* sse(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + value).replace(/\r\n/g, '\n');
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split('\n').filter((l) => l.startsWith('data:'))
          .map((l) => l.slice(l.startsWith('data: ') ? 6 : 5));
        if (data.length) yield data.join('\n');
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/** POST a streaming request and yield the parsed JSON chunks until [DONE]. */
export async function* streamJson(path, body, signal) {
  const response = await call(path, { method: 'POST', body, signal, raw: true });
  for await (const data of sse(response)) {
    if (data === '[DONE]') return;
    yield JSON.parse(data);
  }
}

/** Download an authenticated resource: fetched with the key, saved through a temporary object URL. */
export async function download(path, filename) {
  const response = await call(path, { raw: true });
  const disposition = response.headers.get('Content-Disposition') || '';
  const match = /filename="([^"]+)"/.exec(disposition);
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement('a');
  a.href = url;
  a.download = match ? match[1] : filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);  // after the browser has taken the file
}

export const enc = encodeURIComponent;
