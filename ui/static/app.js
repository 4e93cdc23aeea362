// The UI's pages: overview (policies), policy detail (timeline, replica chart, cold
// starts), agents and alerts, drawn from the JSON API. Text goes in with textContent
// only (never innerHTML), and every change carries the session's CSRF token.
import { timeline, lineChart, legend, stateColor, formatTime } from './charts.js';

const main = document.getElementById('main');
let session = null;

class Unauthenticated extends Error {}

async function api(path, options = {}) {
  const resp = await fetch(path, { credentials: 'same-origin', ...options });
  if (resp.status === 401) {
    window.location.assign('/login');
    throw new Unauthenticated('not logged in');
  }
  const body = await resp.json().catch(() => null);
  if (!resp.ok) throw new Error((body && body.error) || `HTTP ${resp.status}`);
  return body;
}

// --- DOM helpers ---

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
  return el;
}

function ago(ms) {
  if (ms === null || ms === undefined) return '–';
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

function duration(ms) {
  if (ms === null || ms === undefined) return '–';
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${(s / 3600).toFixed(1)} h`;
}

function num(v, digits = 0) {
  return v === null || v === undefined ? '–' : Number(v).toFixed(digits);
}

function stateBadge(state) {
  if (!state) return h('span', { class: 'badge badge-unknown', text: 'unknown' });
  const b = h('span', { class: 'badge state', text: state, 'data-state': state });
  b.style.setProperty('--state-color', stateColor(state));
  return b;
}

function readyBadge(p) {
  if (p.invalid) return h('span', { class: 'badge badge-bad', text: 'invalid' });
  if (p.ready === true) return h('span', { class: 'badge badge-ok', text: 'ready' });
  if (p.ready === false) return h('span', { class: 'badge badge-warn', text: 'not ready' });
  return h('span', { class: 'badge badge-unknown', text: 'no status' });
}

// Why a policy is not acting (kubectl shows it as the Ready or Invalid condition):
// the badge alone left the user to guess between a typo and a missing Deployment.
function readyNote(p) {
  if (p.ready === true && !p.invalid) return null;
  const c = (p.conditions || []).find((x) => x.type === (p.invalid ? 'Invalid' : 'Ready'));
  return c && c.message ? h('div', { class: 'muted small reason ready-note', text: c.message }) : null;
}

function card(label, value, sub) {
  return h('div', { class: 'card' },
    h('div', { class: 'card-label', text: label }),
    h('div', { class: 'card-value', text: value }),
    sub ? h('div', { class: 'card-sub muted', text: sub }) : null);
}

function section(title, ...body) {
  return h('section', { class: 'panel' }, h('h2', { text: title }), ...body);
}

function table(headers, rows, empty) {
  if (!rows.length) return h('p', { class: 'muted empty', text: empty });
  return h('div', { class: 'table-wrap' },
    h('table', {},
      h('thead', {}, h('tr', {}, headers.map((x) => h('th', { text: x })))),
      h('tbody', {}, rows)));
}

function showError(e) {
  if (e instanceof Unauthenticated) return;
  main.replaceChildren(h('div', { class: 'panel error-panel', role: 'alert' },
    h('h2', { text: 'Something went wrong' }), h('p', { text: e.message })));
}

// --- overview ---

async function overview() {
  document.title = 'Policies · Nemesis';
  const [list, report] = await Promise.all([
    api('/api/v1/policies'),
    api('/api/v1/reports/summary?window=24h'),
  ]);
  const ps = list.policies;
  const atZero = ps.filter((p) => p.desiredReplicas === 0).length;
  const cs = report.totals.coldStarts;
  const cards = h('div', { class: 'cards' },
    card('Policies', String(ps.length), list.synced ? `${ps.filter((p) => p.ready).length} ready` : 'loading from the API server…'),
    card('At zero', String(atZero), 'desired replicas 0'),
    card('Cold starts (24 h)', String(cs.count), `p50 ${duration(cs.p50Ms)} · p99 ${duration(cs.p99Ms)}`),
    card('Replica-hours (24 h)', (report.totals.replicaSeconds / 3600).toFixed(2), `${report.totals.transitions} transitions`));

  const rows = ps.map((p) => {
    const id = `${p.namespace}/${p.name}`;
    const lt = p.lastTransition;
    return h('tr', { 'data-policy': id },
      h('td', {}, h('a', { href: `/policies/${encodeURIComponent(p.namespace)}/${encodeURIComponent(p.name)}`, class: 'policy-link', text: id })),
      h('td', {}, h('span', { text: p.target }), p.service ? h('span', { class: 'muted', text: ` · svc ${p.service}` }) : null),
      h('td', {}, stateBadge(p.state), h('div', { class: 'muted small', text: p.stateSinceMs ? `since ${ago(p.stateSinceMs)}` : '' })),
      h('td', { class: 'num', title: 'current / desired' }, `${num(p.replicas)} / ${num(p.desiredReplicas)}`),
      h('td', {}, lt ? [h('div', { text: `${lt.from} → ${lt.to} · ${ago(lt.atMs)}` }), h('div', { class: 'muted small reason', text: lt.reason })] : h('span', { class: 'muted', text: 'none yet' })),
      h('td', {}, readyBadge(p), readyNote(p)));
  });
  main.replaceChildren(
    h('div', { class: 'page-head' },
      h('h1', { text: 'Policies' }),
      h('div', { class: 'actions' },
        h('a', { class: 'button secondary', href: '/api/v1/reports/summary?window=24h&format=csv', text: 'Report (CSV)' }),
        h('a', { class: 'button secondary', href: '/api/v1/reports/summary?window=24h', text: 'Report (JSON)' }))),
    cards,
    section('ScalingPolicies',
      table(['Policy', 'Target', 'State', 'Replicas', 'Last transition', 'Status'], rows,
        list.synced ? 'No ScalingPolicy exists yet.' : 'Waiting for the API server…')));
}

// --- policy detail ---

function segmentsOf(hist) {
  const { fromMs, toMs } = hist.window;
  const segs = [];
  let state = hist.stateAtStart;
  let cursor = fromMs;
  for (const t of hist.transitions) {
    if (state) segs.push({ state, from: cursor, to: t.atMs });
    state = t.to;
    cursor = t.atMs;
  }
  if (state) segs.push({ state, from: cursor, to: toMs });
  return segs;
}

function replicaSeries(hist) {
  const { toMs } = hist.window;
  const s = hist.series || {};
  const out = [];
  if (s['nemesis.replicas']) {
    out.push({ name: 'replicas', points: s['nemesis.replicas'], color: '#2563eb', step: true, area: true, extendTo: toMs });
  } else if (hist.scaleEvents.length || hist.replicasAtStart !== null) {
    // No samples (e.g. a standby's fresh store): the scale events make the same curve.
    const pts = [];
    if (hist.replicasAtStart !== null) pts.push([hist.window.fromMs, hist.replicasAtStart]);
    for (const e of hist.scaleEvents) pts.push([e.atMs, e.toReplicas]);
    out.push({ name: 'replicas (scale events)', points: pts, color: '#2563eb', step: true, area: true, extendTo: toMs });
  }
  if (s['nemesis.replicas.ready']) out.push({ name: 'ready', points: s['nemesis.replicas.ready'], color: '#16a34a', step: true, extendTo: toMs });
  if (s['nemesis.replicas.desired']) out.push({ name: 'desired', points: s['nemesis.replicas.desired'], color: '#d97706', step: true, dashed: true, extendTo: toMs });
  return out;
}

function stateBar(ms) {
  const total = Object.values(ms).reduce((a, b) => a + b, 0);
  if (!total) return h('p', { class: 'muted', text: 'No state is known for this window.' });
  const bar = h('div', { class: 'state-bar' });
  const items = [];
  for (const [state, v] of Object.entries(ms).sort((a, b) => b[1] - a[1])) {
    const part = h('div', { class: 'state-bar-part', title: `${state}: ${duration(v)}` });
    part.style.width = `${(100 * v) / total}%`;
    part.style.background = stateColor(state);
    bar.append(part);
    items.push(h('span', { class: 'legend-item' }, stateBadge(state), ` ${(100 * v / total).toFixed(1)}% · ${duration(v)}`));
  }
  return h('div', {}, bar, h('div', { class: 'legend' }, items));
}

const WINDOWS = ['1h', '6h', '24h', '7d', '30d'];

async function policyPage(namespace, name) {
  const params = new URLSearchParams(window.location.search);
  const win = WINDOWS.includes(params.get('window')) ? params.get('window') : '24h';
  const base = `/api/v1/policies/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}`;
  document.title = `${namespace}/${name} · Nemesis`;
  const [detail, hist] = await Promise.all([
    api(base).catch((e) => { if (e instanceof Unauthenticated) throw e; return null; }),
    api(`${base}/history?window=${win}`),
  ]);
  const { fromMs, toMs } = hist.window;
  const st = hist.coldStartStats;
  const winLinks = h('div', { class: 'segmented' }, WINDOWS.map((w) =>
    h('a', { href: `?window=${w}`, class: w === win ? 'active' : '', text: w })));

  const head = h('div', { class: 'page-head' },
    h('div', {},
      h('div', { class: 'crumbs' }, h('a', { href: '/', text: 'Policies' }), ' / ', namespace),
      h('h1', {}, name, ' ', detail ? stateBadge(detail.state) : h('span', { class: 'badge badge-unknown', text: 'deleted' }), ' ', detail ? readyBadge(detail) : null)),
    winLinks);

  const cards = h('div', { class: 'cards' },
    card('Replicas', detail ? `${num(detail.replicas)} / ${num(detail.desiredReplicas)}` : '–', 'current / desired'),
    card('Cold starts', String(st.count), `${st.ready} ready · ${st.timeouts} timed out · ${st.failures} failed`),
    card('Time to ready p50', duration(st.p50Ms), `p99 ${duration(st.p99Ms)} · max ${duration(st.maxMs)}`),
    card('Replica-seconds', hist.replicaSeconds === null ? '–' : Math.round(hist.replicaSeconds).toLocaleString(),
      hist.replicaSeconds === null ? 'no scale event yet' : `avg ${(hist.replicaSeconds / hist.window.seconds).toFixed(2)} replicas`),
    card('Transitions', String(hist.transitionCount), `${hist.scaleEventCount} scale events`));

  const series = replicaSeries(hist);
  const replicaChart = series.length
    ? h('div', { id: 'replica-chart', class: 'chart-box' }, lineChart({ from: fromMs, to: toMs, series, yLabel: 'replicas', integer: true }), legend(series))
    : h('p', { class: 'muted', text: 'No replica samples or scale events in this window.' });

  const segs = segmentsOf(hist);
  const timelineBox = segs.length
    ? h('div', { id: 'state-timeline', class: 'chart-box' }, timeline({ from: fromMs, to: toMs, segments: segs }))
    : h('p', { class: 'muted', text: 'No state is known for this window.' });

  const metricCharts = Object.entries(hist.series || {})
    .filter(([n]) => !n.startsWith('nemesis.'))
    .map(([n, pts]) => h('div', { class: 'metric-chart' }, h('h3', { text: n }),
      lineChart({ from: fromMs, to: toMs, height: 160, series: [{ name: n, points: pts, color: '#9333ea' }] })));

  const coldRows = hist.coldStarts.slice().reverse().map((c) => h('tr', {},
    h('td', { text: new Date(c.wakeAtMs).toLocaleString() }),
    h('td', { class: 'num', text: duration(c.timeToReadyMs) }),
    h('td', { class: 'num', text: String(c.heldConnections) }),
    h('td', {}, h('span', { class: `badge ${c.outcome === 'ready' ? 'badge-ok' : 'badge-bad'}`, text: c.outcome }), c.message ? h('span', { class: 'muted small', text: ` ${c.message}` }) : null)));

  const transRows = hist.transitions.slice().reverse().map((t) => h('tr', {},
    h('td', { text: new Date(t.atMs).toLocaleString() }),
    h('td', {}, stateBadge(t.from), ' → ', stateBadge(t.to)),
    h('td', { class: 'num', text: `${t.fromReplicas} → ${t.toReplicas}` }),
    h('td', { class: 'reason', text: t.reason })));

  const conds = detail ? detail.conditions.map((c) => h('tr', {},
    h('td', { text: c.type }), h('td', { text: c.status }), h('td', { text: c.reason }),
    h('td', { class: 'reason', text: c.message }), h('td', { text: ago(c.lastTransitionMs) }))) : [];

  main.replaceChildren(head, cards,
    section('State timeline', timelineBox),
    section('Replicas', replicaChart),
    section('Time per state', stateBar(hist.timeInStatesMs)),
    metricCharts.length ? section('Metrics', h('div', { class: 'metric-grid' }, metricCharts)) : null,
    section('Cold starts', table(['Wake-up', 'Time to ready', 'Held connections', 'Outcome'], coldRows, 'No cold start in this window.')),
    section('Transitions', table(['When', 'States', 'Replicas', 'Reason'], transRows, 'No transition in this window.')),
    detail ? section('Conditions', table(['Type', 'Status', 'Reason', 'Message', 'Changed'], conds, 'No condition reported yet.')) : null,
    detail ? section('Spec', h('details', {}, h('summary', { text: 'Show the policy spec' }), h('pre', { text: JSON.stringify(detail.spec, null, 2) }))) : null);
  if (hist.truncated) main.append(h('p', { class: 'muted small', text: 'Lists show only the most recent entries; counts and statistics cover the whole window.' }));
}

// --- agents and alerts ---

async function agentsPage() {
  document.title = 'Agents · Nemesis';
  const list = await api('/api/v1/agents');
  const rows = list.agents.map((a) => h('tr', { 'data-agent': a.node },
    h('td', { text: a.node }),
    h('td', { class: 'mono small', text: a.instance }),
    h('td', {}, h('span', { class: `badge ${a.live ? 'badge-ok' : 'badge-bad'}`, text: a.live ? 'live' : 'silent' })),
    h('td', { text: ago(Date.now() - a.lastHeartbeatSecondsAgo * 1000) }),
    h('td', {}, a.services.length ? h('details', {}, h('summary', { text: `${a.services.length} service${a.services.length === 1 ? '' : 's'}` }),
      h('ul', { class: 'plain' }, a.services.map((s) => h('li', {},
        `${s.namespace}/${s.name}: `, h('span', { class: 'badge', text: s.mode }),
        ` ${s.openConnections} open · ${s.heldConnections} held · ${s.connectsTotal} connects`)))) : h('span', { class: 'muted', text: 'none' }))));
  main.replaceChildren(
    h('div', { class: 'page-head' }, h('h1', { text: 'Agents' })),
    h('div', { class: 'cards' }, card('Live agents', String(list.live), `${list.agents.length} known`)),
    section('Node agents', table(['Node', 'Instance', 'Status', 'Last heartbeat', 'Services'], rows, 'No agent has called in yet.')));
}

async function alertsPage() {
  document.title = 'Alerts · Nemesis';
  const list = await api('/api/v1/alerts');
  const rows = list.alerts.map((a) => h('tr', { 'data-alert': a.name },
    h('td', { text: a.name }),
    h('td', {}, h('span', { class: `badge ${a.firing ? 'badge-bad' : 'badge-unknown'}`, text: a.firing ? 'firing' : 'quiet' })),
    h('td', { text: a.sinceMs ? ago(a.sinceMs) : '–' }),
    h('td', { class: 'num', text: String(a.instances) }),
    h('td', { text: a.policies.join(', ') || '–' })));
  main.replaceChildren(
    h('div', { class: 'page-head' }, h('h1', { text: 'Alerts' })),
    list.webhookConfigured ? null : h('p', { class: 'notice', text: 'The Alertmanager webhook is not configured (--alertmanager-token-file): no alert can fire.' }),
    section('Alerts', table(['Alert', 'Status', 'Since', 'Instances', 'Policies reacting'], rows, 'No alert is firing and no policy waits for one.')));
}

// --- shell ---

async function logout() {
  try {
    await api('/logout', { method: 'POST', headers: { 'X-CSRF-Token': session.csrfToken } });
  } catch (e) {
    if (e instanceof Unauthenticated) return;
  }
  window.location.assign('/login');
}

function route() {
  const path = window.location.pathname;
  const m = path.match(/^\/policies\/([^/]+)\/([^/]+)$/);
  if (m) return { nav: 'overview', run: () => policyPage(decodeURIComponent(m[1]), decodeURIComponent(m[2])) };
  if (path === '/agents') return { nav: 'agents', run: agentsPage };
  if (path === '/alerts') return { nav: 'alerts', run: alertsPage };
  return { nav: 'overview', run: overview };
}

async function start() {
  try {
    session = await api('/api/v1/session');
  } catch (e) {
    showError(e);
    return;
  }
  document.getElementById('user').textContent = session.user;
  document.getElementById('logout').addEventListener('click', logout);
  const r = route();
  for (const a of document.querySelectorAll('[data-nav]')) {
    a.classList.toggle('active', a.dataset.nav === r.nav);
  }
  const refresh = async () => {
    try { await r.run(); } catch (e) { showError(e); }
  };
  await refresh();
  // Live pages refresh; a detail page keeps still so a chart can be read.
  if (r.nav !== 'overview' || window.location.pathname === '/') setInterval(refresh, 10000);
}

start();
