// A policy's automaton as an SVG diagram: states as boxes in a row (the initial one
// first), transitions as arrows labelled with their condition, the current state lit and
// the last transition marked. Built with DOM calls only (no innerHTML), so the strict CSP
// holds and no text from a policy can become markup.
const NS = 'http://www.w3.org/2000/svg';

function el(tag, attrs = {}, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function clip(s, n) {
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}

const BOX_W = 150;
const BOX_H = 54;
const GAP = 110;
const LANE = 26;

export function automaton(a, current, last) {
  const order = [a.initial, ...a.states.map((s) => s.name).filter((n) => n !== a.initial)];
  const index = new Map(order.map((n, i) => [n, i]));
  const x = (n) => 20 + index.get(n) * (BOX_W + GAP);
  // Forward edges (left to right) arc above the boxes, backward ones below; each edge
  // gets its own lane so labels do not overlap.
  const fwd = a.transitions.filter((t) => index.get(t.to) > index.get(t.from));
  const back = a.transitions.filter((t) => index.get(t.to) <= index.get(t.from));
  const top = 30 + fwd.length * LANE;
  const height = top + BOX_H + 30 + back.length * LANE;
  const width = 40 + order.length * BOX_W + (order.length - 1) * GAP;
  const svg = el('svg', {
    viewBox: `0 0 ${width} ${height}`, width, height, class: 'automaton',
    role: 'img', 'aria-label': `State diagram: ${order.join(', ')}`,
  });
  const defs = el('defs');
  for (const [id, cls] of [['arrow', 'edge-head'], ['arrow-last', 'edge-head last']]) {
    const m = el('marker', { id, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' });
    m.append(el('path', { d: 'M 0 0 L 10 5 L 0 10 z', class: cls }));
    defs.append(m);
  }
  svg.append(defs);

  const edge = (t, lane, above) => {
    const isLast = last && last.from === t.from && last.to === t.to;
    const x1 = x(t.from) + BOX_W / 2 + (above ? 20 : -20);
    const x2 = x(t.to) + BOX_W / 2 + (above ? -20 : 20);
    const yBox = above ? top : top + BOX_H;
    const yLane = above ? top - 16 - lane * LANE : top + BOX_H + 16 + lane * LANE;
    const g = el('g', { class: `edge${isLast ? ' last' : ''}`, 'data-edge': `${t.from}->${t.to}` });
    const d = t.from === t.to
      ? `M ${x1} ${yBox} C ${x1} ${yLane}, ${x1 + 40} ${yLane}, ${x1 + 40} ${yBox}`
      : `M ${x1} ${yBox} L ${x1} ${yLane} L ${x2} ${yLane} L ${x2} ${yBox}`;
    g.append(el('path', { d, class: 'edge-line', 'marker-end': `url(#${isLast ? 'arrow-last' : 'arrow'})` }));
    const label = `${t.when}${t.cooldownSeconds ? ` (cooldown ${t.cooldownSeconds}s)` : ''}`;
    const lx = Math.min(x1, x2) + 6;
    const text = el('text', { x: lx, y: yLane - 5, class: 'edge-label' }, clip(label, 48));
    text.append(el('title', {}, label));
    g.append(text);
    if (isLast) g.append(el('text', { x: lx, y: yLane + 14, class: 'edge-last-note' }, 'last transition'));
    svg.append(g);
  };
  fwd.forEach((t, i) => edge(t, i, true));
  back.forEach((t, i) => edge(t, i, false));

  for (const s of a.states) {
    const lit = s.name === current;
    const g = el('g', { class: `state-node${lit ? ' current' : ''}`, 'data-state': s.name });
    g.append(el('rect', { x: x(s.name), y: top, width: BOX_W, height: BOX_H, rx: 10 }));
    g.append(el('text', { x: x(s.name) + BOX_W / 2, y: top + 22, 'text-anchor': 'middle', class: 'state-name' }, clip(s.name, 18)));
    const rep = el('text', { x: x(s.name) + BOX_W / 2, y: top + 40, 'text-anchor': 'middle', class: 'state-replicas' }, clip(`${s.replicas} replicas`, 24));
    rep.append(el('title', {}, `${s.replicas} replicas`));
    g.append(rep);
    if (s.name === a.initial) g.append(el('text', { x: x(s.name), y: top - 4 + BOX_H + 16, class: 'state-initial' }, 'initial'));
    svg.append(g);
  }
  return svg;
}
