// A line chart as inline SVG (no library): the loss curves of a training job, redrawn as points arrive.
const NS = 'http://www.w3.org/2000/svg';
const W = 640;
const H = 280;
const PAD = { left: 56, right: 16, top: 16, bottom: 40 };

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

/** Round tick values spanning [lo, hi]. */
function ticks(lo, hi, count = 5) {
  if (hi <= lo) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((m) => m >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

/**
 * Draw series [{name, cls, points: [[step, loss], ...]}] into `svg` (an <svg> made by `lossChart`).
 * x: step, y: loss; each series is a polyline with a dot per point (a single point still shows).
 */
export function drawLoss(svg, series) {
  const all = series.flatMap((one) => one.points);
  svg.replaceChildren(s('title', {}, 'Loss by step'),
    s('desc', {}, series.map((one) => `${one.name}: ${one.points.length} points${one.points.length
      ? `, last ${one.points.at(-1)[1].toFixed(4)} at step ${one.points.at(-1)[0]}` : ''}`).join('; ')));
  if (!all.length) {
    svg.append(s('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'axis-label' }, 'No metrics yet'));
    return;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(Math.max(...xs), Math.min(...xs) + 1)];
  const pad = (Math.max(...ys) - Math.min(...ys)) * 0.05 || Math.abs(ys[0]) * 0.05 || 1;
  const [y0, y1] = [Math.min(...ys) - pad, Math.max(...ys) + pad];
  const px = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const py = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);
  const axes = s('g', { class: 'axes' });
  for (const t of ticks(y0, y1)) {
    axes.append(s('line', { x1: PAD.left, x2: W - PAD.right, y1: py(t), y2: py(t), class: 'grid' }),
      s('text', { x: PAD.left - 6, y: py(t) + 4, 'text-anchor': 'end' }, String(Number(t.toPrecision(4)))));
  }
  for (const t of ticks(x0, x1).filter(Number.isInteger)) {
    axes.append(s('text', { x: px(t), y: H - PAD.bottom + 16, 'text-anchor': 'middle' }, String(t)));
  }
  axes.append(s('text', { x: (W + PAD.left) / 2, y: H - 6, 'text-anchor': 'middle', class: 'axis-label' }, 'step'),
    s('text', { x: 12, y: H / 2, transform: `rotate(-90 12 ${H / 2})`, 'text-anchor': 'middle',
      class: 'axis-label' }, 'loss'));
  svg.append(axes);
  for (const one of series) {
    if (!one.points.length) continue;
    const g = s('g', { class: `series ${one.cls}`, 'data-series': one.cls, 'data-points': one.points.length });
    g.append(s('polyline', { points: one.points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(' ') }));
    for (const [x, y] of one.points) g.append(s('circle', { cx: px(x).toFixed(1), cy: py(y).toFixed(1), r: 2.5 }));
    svg.append(g);
  }
}

/** An empty chart element; draw into it with drawLoss. */
export function lossChart() {
  return s('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', class: 'chart', 'aria-labelledby': 'loss-legend' });
}
