// The playground's request as code to copy. The key is written as $PREFIXSERVE_API_KEY, never its value.

function shellQuote(text) {
  return `'${text.replace(/'/g, "'\\''")}'`;
}

export function curlOf(path, body) {
  return [`curl -sN ${shellQuote(location.origin + path)}`,
    '  -H "Authorization: Bearer $PREFIXSERVE_API_KEY"',
    "  -H 'Content-Type: application/json'",
    `  -d ${shellQuote(JSON.stringify(body))}`].join(' \\\n');
}

function py(value, indent = '') {
  if (value === null) return 'None';
  if (value === true) return 'True';
  if (value === false) return 'False';
  if (Array.isArray(value)) return `[${value.map((v) => py(v, indent)).join(', ')}]`;
  if (typeof value === 'object') {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${py(v, indent)}`).join(', ')}}`;
  }
  return JSON.stringify(value);
}

// Fields the openai client takes as arguments; the rest (vLLM's, ours) go in extra_body.
const CLIENT_ARGS = new Set(['model', 'messages', 'prompt', 'stream', 'stream_options', 'temperature', 'top_p',
  'max_tokens', 'seed', 'presence_penalty', 'frequency_penalty', 'stop', 'n']);

export function pythonOf(path, body) {
  const chat = path.endsWith('/chat/completions');
  const args = Object.entries(body).filter(([k]) => CLIENT_ARGS.has(k)).map(([k, v]) => `    ${k}=${py(v)},`);
  const extra = Object.fromEntries(Object.entries(body).filter(([k]) => !CLIENT_ARGS.has(k)));
  if (Object.keys(extra).length) args.push(`    extra_body=${py(extra)},`);
  const read = chat ? 'chunk.choices[0].delta.content or ""' : 'chunk.choices[0].text';
  return ['import os', 'from openai import OpenAI', '',
    `client = OpenAI(base_url=${JSON.stringify(`${location.origin}/v1`)}, api_key=os.environ["PREFIXSERVE_API_KEY"])`,
    `stream = client.${chat ? 'chat.completions' : 'completions'}.create(`, ...args, ')',
    'for chunk in stream:', '    if chunk.choices:', `        print(${read}, end="", flush=True)`].join('\n');
}
