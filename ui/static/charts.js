// SVG charts without dependencies: a state timeline (coloured bands) and a line chart
// (step or linear series over time). They draw what they are given; no fetching here.

const SVG = 'http://www.w3.org/2000/svg';

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    el.append(typeof c === 'string' ? document.createTextNode(c) : c);
  }
  return el;
}

const PALETTE = ['#2563eb', '#16a34a', '#d97706', '#9333ea', '#0891b2', '#dc2626', '#4f46e5', '#65a30d'];
const KNOWN = { zero: '#94a3b8', sleeping: '#94a3b8', idle: '#94a3b8', warm: '#16a34a', hot: '#dc2626', busy: '#d97706' };

/// A stable colour per state name.
export function stateColor(name) {
  if (KNOWN[name]) return KNOWN[name];
  let h = 0;
  for (const ch of String(name)) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

function pad(n) { return String(n).padStart(2, '0'); }

export function formatTime(ms, spanMs) {
  const d = new Date(ms);
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  if (spanMs > 2 * 86400000) return `${d.getMonth() + 1}/${d.getDate()}`;
  if (spanMs > 20 * 3600000) return `${d.getMonth() + 1}/${d.getDate()} ${hm}`;
  return hm;
}

function timeTicks(from, to, count) {
  const span = to - from;
  const steps = [60e3, 5 * 60e3, 15 * 60e3, 30 * 60e3, 3600e3, 3 * 3600e3, 6 * 3600e3, 12 * 3600e3, 86400e3, 7 * 86400e3, 30 * 86400e3];
  const step = steps.find((s) => span / s <= count) || steps[steps.length - 1];
  const offset = new Date().getTimezoneOffset() * 60e3;
  const ticks = [];
  for (let t = Math.ceil((from - offset) / step) * step + offset; t <= to; t += step) ticks.push(t);
  return ticks;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function formatValue(v) {
  if (Math.abs(v) >= 1000) return (v / 1000).toFixed(v >= 10000 ? 0 : 1) + 'k';
  if (Number.isInteger(v)) return String(v);
  return v.toFixed(Math.abs(v) < 10 ? 2 : 1);
}

/// segments: [{state, from, to}] within [from, to].
export function timeline({ from, to, segments, width = 900, height = 64 }) {
  const left = 8, right = 8, top = 6, bar = 30;
  const x = (t) => left + ((t - from) / (to - from)) * (width - left - right);
  const root = svg('svg', { viewBox: `0 0 ${width} ${height}`, class: 'chart timeline', role: 'img', 'aria-label': 'State timeline' });
  root.append(svg('rect', { x: left, y: top, width: width - left - right, height: bar, class: 'chart-empty' }));
  for (const s of segments) {
    const x0 = x(Math.max(s.from, from));
    const x1 = x(Math.min(s.to, to));
    if (x1 - x0 <= 0) continue;
    const rect = svg('rect', { x: x0, y: top, width: Math.max(x1 - x0, 1), height: bar, fill: stateColor(s.state), class: 'segment', 'data-state': s.state },
      svg('title', {}, `${s.state}: ${new Date(s.from).toLocaleString()} – ${new Date(s.to).toLocaleString()}`));
    root.append(rect);
    if (x1 - x0 > 48) {
      root.append(svg('text', { x: x0 + 6, y: top + bar / 2 + 4, class: 'segment-label' }, s.state));
    }
  }
  for (const t of timeTicks(from, to, 8)) {
    root.append(svg('text', { x: x(t), y: height - 6, class: 'tick', 'text-anchor': 'middle' }, formatTime(t, to - from)));
  }
  return root;
}

/// series: [{name, points: [[ms, v]], color, step, dashed, area}]
export function lineChart({ from, to, series, width = 900, height = 240, yLabel = '', integer = false }) {
  const left = 46, right = 12, top = 14, bottom = 26;
  const all = series.flatMap((s) => s.points.map((p) => p[1]));
  const maxV = niceMax(Math.max(0, ...all));
  const x = (t) => left + ((t - from) / (to - from)) * (width - left - right);
  const y = (v) => top + (1 - v / maxV) * (height - top - bottom);
  const root = svg('svg', { viewBox: `0 0 ${width} ${height}`, class: 'chart line-chart', role: 'img', 'aria-label': yLabel || 'Chart' });
  const ticks = integer && maxV <= 8 ? Array.from({ length: maxV + 1 }, (_, i) => i) : [0, 0.25, 0.5, 0.75, 1].map((f) => f * maxV);
  for (const v of ticks) {
    root.append(svg('line', { x1: left, x2: width - right, y1: y(v), y2: y(v), class: 'grid' }));
    root.append(svg('text', { x: left - 6, y: y(v) + 4, class: 'tick', 'text-anchor': 'end' }, formatValue(v)));
  }
  for (const t of timeTicks(from, to, 8)) {
    root.append(svg('line', { x1: x(t), x2: x(t), y1: top, y2: height - bottom, class: 'grid grid-v' }));
    root.append(svg('text', { x: x(t), y: height - 8, class: 'tick', 'text-anchor': 'middle' }, formatTime(t, to - from)));
  }
  if (yLabel) {
    root.append(svg('text', { x: 12, y: top + (height - top - bottom) / 2, class: 'axis-label', transform: `rotate(-90 12 ${top + (height - top - bottom) / 2})`, 'text-anchor': 'middle' }, yLabel));
  }
  for (const s of series) {
    if (!s.points.length) continue;
    let d = '';
    s.points.forEach(([t, v], i) => {
      const px = x(t).toFixed(1), py = y(v).toFixed(1);
      if (i === 0) d += `M${px},${py}`;
      else if (s.step) d += `H${px}V${py}`;
      else d += `L${px},${py}`;
    });
    if (s.extendTo !== undefined) d += s.step ? `H${x(s.extendTo).toFixed(1)}` : '';
    if (s.area) {
      const lastX = s.extendTo !== undefined ? x(s.extendTo) : x(s.points[s.points.length - 1][0]);
      const area = `${d}L${lastX.toFixed(1)},${y(0)}L${x(s.points[0][0]).toFixed(1)},${y(0)}Z`;
      root.append(svg('path', { d: area, fill: s.color, class: 'area' }));
    }
    root.append(svg('path', { d, stroke: s.color, class: 'series' + (s.dashed ? ' dashed' : ''), 'data-series': s.name },
      svg('title', {}, s.name)));
    if (s.points.length <= 60 && !s.step) {
      for (const [t, v] of s.points) {
        root.append(svg('circle', { cx: x(t), cy: y(v), r: 2.5, fill: s.color },
          svg('title', {}, `${s.name}: ${formatValue(v)} at ${new Date(t).toLocaleString()}`)));
      }
    }
  }
  return root;
}

/// A legend row for a chart.
export function legend(items) {
  const box = document.createElement('div');
  box.className = 'legend';
  for (const { name, color, dashed } of items) {
    const item = document.createElement('span');
    item.className = 'legend-item';
    const sw = svg('svg', { width: 18, height: 10, 'aria-hidden': 'true' },
      svg('line', { x1: 0, x2: 18, y1: 5, y2: 5, stroke: color, 'stroke-width': 3, 'stroke-dasharray': dashed ? '4 3' : null }));
    item.append(sw, document.createTextNode(name));
    box.append(item);
  }
  return box;
}
