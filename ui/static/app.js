// The UI's pages: overview (policies), policy detail (timeline, replica chart, cold
// starts), agents, events, the editor, users and tokens, drawn from the JSON API, and
// the shell that routes to them (alerts and reports have modules of their own). Text
// goes in with textContent only (never innerHTML), and every change carries the
// session's CSRF token.
import { timeline, lineChart, legend, stateColor, formatTime } from './charts.js';
import { automaton } from './automaton.js';
import { timeSeries } from './plots.js';
import {
  main, session, setSession, Unauthenticated, can, send, api, h, ago, duration, num,
  card, section, table, showError, WINDOWS,
} from './common.js';
import { alertsPage } from './alerts.js';
import { reportsPage } from './reports.js';

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
      h('td', {}, readyBadge(p), p.paused ? [' ', h('span', { class: 'badge badge-warn', text: 'paused' })] : null, readyNote(p)));
  });
  main.replaceChildren(
    h('div', { class: 'page-head' },
      h('h1', { text: 'Policies' }),
      h('div', { class: 'actions' },
        can('admin') ? h('a', { class: 'button', id: 'new-policy', href: '/edit', text: 'New policy' }) : null,
        h('a', { class: 'button secondary', href: '/api/v1/reports/summary?window=24h&format=csv', text: 'Report (CSV)' }),
        h('a', { class: 'button secondary', href: '/api/v1/reports/summary?window=24h', text: 'Report (JSON)' }))),
    cards,
    section('ScalingPolicies',
      table(['Policy', 'Target', 'State', 'Replicas', 'Last transition', 'Status'], rows,
        list.synced
          ? (can('admin')
            ? 'No ScalingPolicy exists yet. Create one with New policy, or kubectl apply -f a ScalingPolicy manifest.'
            : 'No ScalingPolicy exists yet. An admin can create one here, or with kubectl apply.')
          : 'Waiting for the API server…')));
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

  const actions = h('div', { class: 'actions' });
  if (detail && can('operator')) {
    const verb = detail.paused ? 'resume' : 'pause';
    actions.append(h('button', {
      type: 'button', id: 'pause-toggle', class: 'secondary',
      text: detail.paused ? 'Resume' : 'Pause',
      title: detail.paused ? 'Let the policy scale again' : 'Stop the policy from scaling until resumed',
      onclick: async () => {
        try { await send('POST', `${base}/${verb}`); await policyPage(namespace, name); } catch (e) { showError(e); }
      },
    }));
  }
  if (detail && can('admin')) {
    actions.append(h('a', { class: 'button secondary', id: 'edit-policy', href: `/edit?namespace=${encodeURIComponent(namespace)}&name=${encodeURIComponent(name)}`, text: 'Edit' }));
  }
  const head = h('div', { class: 'page-head' },
    h('div', {},
      h('div', { class: 'crumbs' }, h('a', { href: '/', text: 'Policies' }), ' / ', namespace),
      h('h1', {}, name, ' ', detail ? stateBadge(detail.state) : h('span', { class: 'badge badge-unknown', text: 'deleted' }), ' ', detail ? readyBadge(detail) : null,
        detail && detail.paused ? h('span', { class: 'badge badge-warn', text: 'paused' }) : null)),
    actions, winLinks);

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
      timeSeries({ from: fromMs, to: toMs, height: 160, label: `${n} over the window`, series: [{ name: n, points: pts, color: '#9333ea' }] })));

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

  const diagram = detail && detail.automaton
    ? h('div', { id: 'automaton', class: 'chart-box scroll-x' }, automaton(detail.automaton, detail.state, detail.lastTransition))
    : h('p', { class: 'muted', text: 'The policy is invalid, so there is no automaton to draw; its conditions below say what to fix.' });
  // replaceChildren would write a null as the text "null": absent sections are dropped.
  main.replaceChildren(...[head, cards,
    section('Automaton', diagram),
    section('State timeline', timelineBox),
    section('Replicas', replicaChart),
    section('Time per state', stateBar(hist.timeInStatesMs)),
    metricCharts.length ? section('Metrics', h('div', { class: 'metric-grid' }, metricCharts)) : null,
    section('Cold starts', table(['Wake-up', 'Time to ready', 'Held connections', 'Outcome'], coldRows, 'No cold start in this window.')),
    section('Transitions', table(['When', 'States', 'Replicas', 'Reason'], transRows, 'No transition in this window.')),
    detail ? section('Conditions', table(['Type', 'Status', 'Reason', 'Message', 'Changed'], conds, 'No condition reported yet.')) : null,
    detail ? section('Spec', h('details', {}, h('summary', { text: 'Show the policy spec' }), h('pre', { text: JSON.stringify(detail.spec, null, 2) }))) : null].filter(Boolean));
  if (hist.truncated) main.append(h('p', { class: 'muted small', text: 'Lists show only the most recent entries; counts and statistics cover the whole window.' }));
}

// --- agents ---

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
  if (path === '/alerts') return { nav: 'alerts', run: alertsPage, feed: 'alerts' };
  if (path === '/reports') return { nav: 'reports', run: reportsPage, still: true };
  if (path === '/events') return { nav: 'events', run: eventsPage, still: true };
  if (path === '/edit') return { nav: 'edit', run: editPage, still: true };
  if (path === '/users') return { nav: 'users', run: usersPage, still: true };
  if (path === '/tokens') return { nav: 'tokens', run: tokensPage, still: true };
  return { nav: 'overview', run: overview, live: true };
}

// A standby shows the history it pulled from the leader; when it cannot reach the
// leader (or is still catching up) it says so above every page.
async function showReplication() {
  const el = document.getElementById('replication');
  let v;
  try { v = await api('/api/v1/replication'); } catch (e) { return; }
  if (v.role !== 'standby' || !v.stale) {
    el.hidden = true;
    return;
  }
  const last = v.lastPullMs ? ` Last pulled ${new Date(v.lastPullMs).toLocaleString()}.` : '';
  const why = v.error ? ` Cannot reach the leader${v.leader ? ` (${v.leader})` : ''}: ${v.error}.`
    : (v.behind ? ` ${v.behind} records behind the leader.` : ' Not pulled from the leader yet.');
  el.textContent = `This is a standby controller: its history may lack the leader's latest records.${why}${last}`;
  el.hidden = false;
}

async function start() {
  try {
    setSession(await api('/api/v1/session'));
  } catch (e) {
    showError(e);
    return;
  }
  document.getElementById('user').textContent = `${session.user} (${session.role})`;
  for (const a of document.querySelectorAll('[data-min-role]')) {
    if (!can(a.dataset.minRole)) a.remove();
  }
  document.getElementById('logout').addEventListener('click', logout);
  showReplication();
  setInterval(showReplication, 10000);
  const r = route();
  for (const a of document.querySelectorAll('[data-nav]')) {
    a.classList.toggle('active', a.dataset.nav === r.nav);
  }
  // A redraw keeps the keyboard where it was (the same control, found by its id).
  const refresh = async () => {
    const focused = document.activeElement && document.activeElement.id;
    try { await r.run(); } catch (e) { showError(e); }
    const again = focused && document.getElementById(focused);
    if (again) again.focus();
  };
  await refresh();
  if (r.still) return;
  // Live updates: the server pushes the policy list whenever it changes (a wake, a
  // sleep, a new policy); the page redraws at most once a second.
  // Only what the page shows counts as a change (metric values move all the time, and a
  // redraw on each would steal the keyboard focus).
  const policyMatch = window.location.pathname.match(/^\/policies\/([^/]+)\/([^/]+)$/);
  const liveKey = (data) => {
    let ps = JSON.parse(data).policies;
    if (policyMatch) ps = ps.filter((p) => p.namespace === decodeURIComponent(policyMatch[1]) && p.name === decodeURIComponent(policyMatch[2]));
    return JSON.stringify(ps.map((p) => [p.namespace, p.name, p.state, p.replicas, p.desiredReplicas, p.paused, p.ready, p.invalid,
      p.lastTransition && p.lastTransition.atMs, (p.conditions || []).map((c) => c.message)]));
  };
  // The feed this page follows: the policies, or (the alerts page) the alerts Nemesis
  // sends; a redraw at most once a second, and only when what the page shows changed.
  const feed = r.feed || 'policies';
  const keyOf = feed === 'alerts' ? (data) => JSON.stringify(JSON.parse(data).alerts) : liveKey;
  let pending = false;
  let seen = null;
  try {
    seen = keyOf(JSON.stringify(await api(feed === 'alerts' ? '/api/alerts' : '/api/v1/policies')));
  } catch (e) { /* the feed will tell */ }
  const stream = new EventSource('/api/v1/stream');
  stream.addEventListener(feed, (ev) => {
    const key = keyOf(ev.data);
    if (key === seen) return;
    seen = key;
    if (pending) return;
    pending = true;
    setTimeout(async () => { pending = false; await refresh(); }, 1000);
  });
  // Agents and Alertmanager's alerts are not in the feed: those pages also refresh on a
  // timer.
  if (r.nav === 'agents') setInterval(refresh, 10000);
  if (r.nav === 'alerts') setInterval(refresh, 30000);
}

// --- events ---

const KINDS = [['transition', 'Transitions'], ['scale', 'Scale events'], ['coldStart', 'Cold starts']];

// The record as the store keeps it (snake_case fields; the outcome is tagged by kind).
function eventSummary(e) {
  const r = e.record;
  if (e.kind === 'transition') return `${r.from_state} → ${r.to_state} (${r.from_replicas} → ${r.to_replicas}): ${r.reason}`;
  if (e.kind === 'scale') return `scaled ${r.from_replicas} → ${r.to_replicas} in ${r.state}: ${r.reason}`;
  const o = r.outcome || {};
  const outcome = o.kind === 'failed' && o.message ? `failed (${o.message})` : o.kind;
  return `cold start: ${outcome}${r.time_to_ready_ms != null ? ` after ${duration(r.time_to_ready_ms)}` : ''}, ${r.held_connections} held`;
}

async function eventsPage() {
  document.title = 'Events · Nemesis';
  const params = new URLSearchParams(window.location.search);
  const list = await api('/api/v1/policies');
  const policy = h('select', { id: 'ev-policy', name: 'policy', 'aria-label': 'Policy' },
    h('option', { value: '', text: 'All policies' }),
    list.policies.map((p) => h('option', { value: `${p.namespace}/${p.name}`, text: `${p.namespace}/${p.name}`, selected: params.get('policy') === `${p.namespace}/${p.name}` })));
  const chosen = (params.get('kind') || '').split(',').filter(Boolean);
  const kinds = KINDS.map(([k, label]) => h('label', { class: 'check' },
    h('input', { type: 'checkbox', name: 'kind', value: k, checked: !chosen.length || chosen.includes(k) }), ` ${label}`));
  const search = h('input', { type: 'search', id: 'ev-search', name: 'q', placeholder: 'Search reasons, states…', value: params.get('q') || '', 'aria-label': 'Search' });
  const win = h('select', { name: 'window', 'aria-label': 'Window' }, WINDOWS.map((w) => h('option', { value: w, text: `last ${w}`, selected: (params.get('window') || '24h') === w })));
  const form = h('form', { class: 'filters', id: 'ev-filters' }, policy, kinds, search, win, h('button', { type: 'submit', text: 'Apply' }));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    if (policy.value) q.set('policy', policy.value);
    const ks = [...form.querySelectorAll('input[name=kind]:checked')].map((i) => i.value);
    if (ks.length && ks.length < KINDS.length) q.set('kind', ks.join(','));
    if (search.value.trim()) q.set('q', search.value.trim());
    q.set('window', win.value);
    window.history.replaceState(null, '', `/events?${q}`);
    eventsPage().catch(showError);
  });
  const tbody = h('tbody', { id: 'ev-rows' });
  const more = h('button', { type: 'button', class: 'secondary', id: 'ev-more', text: 'Older events' });
  const empty = h('p', { class: 'muted empty', text: 'No event matches. Widen the window, pick more kinds, or clear the search.' });
  const wrap = h('div', { class: 'table-wrap' }, h('table', {},
    h('thead', {}, h('tr', {}, ['When', 'Policy', 'Kind', 'What'].map((x) => h('th', { text: x })))), tbody));
  const q = new URLSearchParams(window.location.search);
  q.set('limit', '50');
  let before = null;
  const load = async () => {
    const page = await api(`/api/v1/events?${q}${before ? `&before=${before}` : ''}`);
    for (const e of page.events) {
      tbody.append(h('tr', { 'data-kind': e.kind },
        h('td', { text: new Date(e.atMs).toLocaleString() }),
        h('td', {}, h('a', { href: `/policies/${encodeURIComponent(e.namespace)}/${encodeURIComponent(e.name)}`, text: `${e.namespace}/${e.name}` })),
        h('td', {}, h('span', { class: 'badge', text: e.kind })),
        h('td', { class: 'reason', text: eventSummary(e) })));
    }
    before = page.nextBefore;
    more.hidden = !before;
    empty.hidden = tbody.children.length > 0;
    wrap.hidden = tbody.children.length === 0;
  };
  more.addEventListener('click', () => load().catch(showError));
  main.replaceChildren(h('div', { class: 'page-head' }, h('h1', { text: 'Events' })), section('Filter', form), section('Events', empty, wrap, more));
  await load();
}

// --- the policy editor (admin) ---

const FORM_FIELDS = [
  ['namespace', 'Namespace', 'text', 'The namespace of the Deployment and the policy.'],
  ['name', 'Policy name', 'text', 'A name for the policy; lowercase letters, digits and dashes.'],
  ['deployment', 'Deployment', 'text', 'The Deployment to scale, in the same namespace.'],
  ['service', 'Service', 'text', 'The Service whose connections wake it and keep it awake. Connections that arrive while it is at zero are held until a replica is ready.'],
  ['minReplicas', 'Replicas when busy (min)', 'number', 'How many replicas run while there is traffic, at least. Leave empty for 1.'],
  ['maxReplicas', 'Most replicas (max)', 'number', 'Never more than this. Leave empty to keep exactly the minimum.'],
  ['idleTimeout', 'Idle window', 'text', 'How long without connections before scaling to zero, such as 10m or 1h.'],
  ['targetMetric', 'Follow metric (optional)', 'text', 'A metric to scale on between min and max, such as conns.active.'],
  ['targetValue', 'Target per replica (optional)', 'number', 'The value of that metric each replica should carry.'],
];

function problemList(problems) {
  if (!problems.length) return h('p', { class: 'ok', role: 'status', text: 'No problems found.' });
  return h('ul', { class: 'problems', role: 'alert' }, problems.map((p) => h('li', {},
    h('code', { text: p.field }),
    p.line ? ` line ${p.line}` : '', p.column ? ` column ${p.column}` : '', `: ${p.message}`)));
}

async function editPage() {
  document.title = 'Edit a policy · Nemesis';
  if (!can('admin')) {
    main.replaceChildren(h('div', { class: 'panel' }, h('h1', { text: 'Edit a policy' }), h('p', { text: 'Only admins edit policies. Ask an admin, or read the policies from the overview.' })));
    return;
  }
  const params = new URLSearchParams(window.location.search);
  let detail = null;
  if (params.get('namespace') && params.get('name')) {
    detail = await api(`/api/v1/policies/${encodeURIComponent(params.get('namespace'))}/${encodeURIComponent(params.get('name'))}`).catch(() => null);
  }
  const spec = detail ? detail.spec : {};
  const initial = {
    namespace: detail ? detail.namespace : (params.get('namespace') || 'default'),
    name: detail ? detail.name : '',
    deployment: spec.target ? spec.target.deployment : '',
    service: spec.target && spec.target.service ? spec.target.service : '',
    minReplicas: spec.minReplicas ?? '', maxReplicas: spec.maxReplicas ?? '',
    idleTimeout: spec.idleTimeout || '10m', targetMetric: spec.targetMetric || '', targetValue: spec.targetValue ?? '',
  };
  const inputs = {};
  const form = h('form', { id: 'guided-form', class: 'form-grid' }, FORM_FIELDS.map(([key, label, type, help]) => {
    const id = `f-${key}`;
    inputs[key] = h('input', { id, name: key, type, value: initial[key], 'aria-describedby': `${id}-help`, step: type === 'number' ? 'any' : undefined });
    return h('div', { class: 'field' }, h('label', { for: id, text: label }), inputs[key], h('div', { id: `${id}-help`, class: 'muted small help', text: help }));
  }));
  const formDraft = () => {
    const f = {};
    for (const [key, , type] of FORM_FIELDS) {
      const v = inputs[key].value.trim();
      if (v === '') continue;
      f[key] = type === 'number' ? Number(v) : v;
    }
    return { form: f };
  };
  const yaml = h('textarea', { id: 'yaml-editor', rows: 22, spellcheck: 'false', 'aria-label': 'Policy YAML',
    text: JSON.stringify({ apiVersion: 'nemesis.dev/v1alpha1', kind: 'ScalingPolicy', metadata: { name: initial.name || 'my-policy', namespace: initial.namespace }, spec: detail ? detail.spec : { target: { deployment: 'my-app', service: 'my-app' }, idleTimeout: '10m' } }, null, 2) });
  const out = h('div', { id: 'edit-result', 'aria-live': 'polite' });
  const run = async (draft, apply) => {
    out.replaceChildren(h('p', { class: 'muted', text: apply ? 'Applying…' : 'Checking…' }));
    const resp = await fetch(`/api/v1/policy-drafts/${apply ? 'apply' : 'validate'}`, {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': session.csrfToken },
      body: JSON.stringify(draft),
    });
    const v = await resp.json().catch(() => ({}));
    if (!resp.ok && resp.status !== 422) { out.replaceChildren(h('p', { class: 'error', role: 'alert', text: v.error || `HTTP ${resp.status}` })); return; }
    const parts = [problemList(v.problems || [])];
    if (apply && v.valid) {
      parts.push(h('p', { class: 'ok', role: 'status' }, 'Applied. ', h('a', { href: `/policies/${encodeURIComponent(v.namespace)}/${encodeURIComponent(v.name)}`, text: `Open ${v.namespace}/${v.name}` })));
    } else if (v.manifest) {
      parts.push(h('details', {}, h('summary', { text: 'The policy as it would be applied' }), h('pre', { text: v.manifest })));
    }
    out.replaceChildren(...parts);
  };
  const guided = h('div', { id: 'tab-guided' }, h('p', { class: 'muted', text: 'The short form: scale to zero after an idle window, wake on the first connection. Every field is checked by the controller before anything is applied.' }), form,
    h('div', { class: 'actions' },
      h('button', { type: 'button', class: 'secondary', id: 'form-check', text: 'Check', onclick: () => run(formDraft(), false).catch(showError) }),
      h('button', { type: 'button', id: 'form-apply', text: 'Apply', onclick: () => run(formDraft(), true).catch(showError) })));
  const full = h('div', { id: 'tab-yaml', hidden: true }, h('p', { class: 'muted', text: 'A full ScalingPolicy in YAML (JSON is YAML too): states, transitions, metrics. Problems name the field and, in expressions, the column — as kubectl describe shows them.' }), yaml,
    h('div', { class: 'actions' },
      h('button', { type: 'button', class: 'secondary', id: 'yaml-check', text: 'Check', onclick: () => run({ yaml: yaml.value }, false).catch(showError) }),
      h('button', { type: 'button', id: 'yaml-apply', text: 'Apply', onclick: () => run({ yaml: yaml.value }, true).catch(showError) })));
  const tab = (id, label, show) => h('button', {
    type: 'button', role: 'tab', id, class: show ? 'tab' : 'tab secondary', 'aria-selected': String(show), text: label,
    onclick: (ev) => {
      guided.hidden = !show;
      full.hidden = show;
      for (const b of ev.target.parentElement.children) {
        const on = b === ev.target;
        b.classList.toggle('secondary', !on);
        b.setAttribute('aria-selected', String(on));
      }
    },
  });
  main.replaceChildren(
    h('div', { class: 'page-head' }, h('h1', { text: detail ? `Edit ${detail.namespace}/${detail.name}` : 'New policy' })),
    h('div', { class: 'segmented', role: 'tablist' }, tab('tab-guided-btn', 'Guided form', true), tab('tab-yaml-btn', 'YAML', false)),
    section('Policy', guided, full), section('Result', out));
}

// --- users and tokens (admin) ---

const ROLES = ['viewer', 'operator', 'admin'];

function roleSelect(value, onchange, label) {
  return h('select', { 'aria-label': label, onchange }, ROLES.map((r) => h('option', { value: r, text: r, selected: r === value })));
}

async function usersPage() {
  document.title = 'Users · Nemesis';
  const list = await api('/api/v1/users');
  const note = h('div', { id: 'users-note', 'aria-live': 'polite' });
  const rows = list.users.map((u) => h('tr', { 'data-user': u.name },
    h('td', { text: u.name }),
    h('td', {}, u.builtIn ? h('span', { class: 'badge', text: 'admin (built-in)' }) : roleSelect(u.role, async (ev) => {
      try { await send('PUT', `/api/v1/users/${encodeURIComponent(u.name)}`, { role: ev.target.value }); note.replaceChildren(h('p', { class: 'ok', text: `${u.name} is now ${ev.target.value}.` })); } catch (e) { showError(e); }
    }, `Role of ${u.name}`)),
    h('td', {}, u.builtIn ? h('span', { class: 'muted small', text: 'set by the controller\'s password file' }) : h('button', { type: 'button', class: 'danger', text: 'Delete', 'aria-label': `Delete ${u.name}`, onclick: async () => {
      if (!window.confirm(`Delete ${u.name}? Their sessions and tokens end.`)) return;
      try { await send('DELETE', `/api/v1/users/${encodeURIComponent(u.name)}`); await usersPage(); } catch (e) { showError(e); }
    } }))));
  const name = h('input', { id: 'new-user-name', name: 'name', required: true, autocomplete: 'off' });
  const pw = h('input', { id: 'new-user-password', name: 'password', type: 'password', required: true, minlength: 8, autocomplete: 'new-password' });
  const role = roleSelect('viewer', null, 'Role of the new user');
  role.id = 'new-user-role';
  const form = h('form', { id: 'new-user', class: 'form-grid' },
    h('div', { class: 'field' }, h('label', { for: 'new-user-name', text: 'Name' }), name),
    h('div', { class: 'field' }, h('label', { for: 'new-user-password', text: 'Password (8 characters or more)' }), pw),
    h('div', { class: 'field' }, h('label', { for: 'new-user-role', text: 'Role' }), role,
      h('div', { class: 'muted small help', text: 'Viewer: reads everything. Operator: also pauses, resumes and acknowledges alerts. Admin: also edits policies and manages users and tokens.' })),
    h('div', { class: 'actions' }, h('button', { type: 'submit', text: 'Add user' })));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try { await send('POST', '/api/v1/users', { name: name.value.trim(), role: role.value, password: pw.value }); await usersPage(); } catch (e) { note.replaceChildren(h('p', { class: 'error', role: 'alert', text: e.message })); }
  });
  main.replaceChildren(h('div', { class: 'page-head' }, h('h1', { text: 'Users' })), note,
    section('Users', table(['Name', 'Role', ''], rows, 'Only the built-in admin exists. Add people below.')),
    section('Add a user', form));
}

async function tokensPage() {
  document.title = 'API tokens · Nemesis';
  const list = await api('/api/v1/tokens');
  const shown = h('div', { id: 'token-shown', 'aria-live': 'polite' });
  const rows = list.tokens.map((t) => h('tr', { 'data-token': t.id },
    h('td', { text: t.name }), h('td', { class: 'mono small', text: t.id }), h('td', { text: t.role }),
    h('td', { text: t.createdBy }),
    h('td', {}, t.expired ? h('span', { class: 'badge badge-bad', text: 'expired' }) : new Date(t.expiresMs).toLocaleString()),
    h('td', {}, h('button', { type: 'button', class: 'danger', text: 'Revoke', 'aria-label': `Revoke ${t.name}`, onclick: async () => {
      try { await send('DELETE', `/api/v1/tokens/${t.id}`); await tokensPage(); } catch (e) { showError(e); }
    } }))));
  const name = h('input', { id: 'new-token-name', required: true, autocomplete: 'off' });
  const role = roleSelect('viewer', null, 'Role of the new token');
  role.id = 'new-token-role';
  const expires = h('input', { id: 'new-token-expires', value: '30d' });
  const form = h('form', { id: 'new-token', class: 'form-grid' },
    h('div', { class: 'field' }, h('label', { for: 'new-token-name', text: 'What it is for' }), name),
    h('div', { class: 'field' }, h('label', { for: 'new-token-role', text: 'Role' }), role),
    h('div', { class: 'field' }, h('label', { for: 'new-token-expires', text: 'Expires in' }), expires, h('div', { class: 'muted small help', text: 'Such as 12h, 30d; at most 366d.' })),
    h('div', { class: 'actions' }, h('button', { type: 'submit', text: 'Create token' })));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      const t = await send('POST', '/api/v1/tokens', { name: name.value.trim(), role: role.value, expiresIn: expires.value.trim() });
      await tokensPage();
      document.getElementById('token-shown').replaceChildren(h('div', { class: 'notice', role: 'status' },
        h('p', { text: 'Copy the token now: it is shown only this once. Send it as Authorization: Bearer <token>.' }),
        h('pre', { id: 'new-token-secret', class: 'mono', text: t.secret })));
    } catch (e) { shown.replaceChildren(h('p', { class: 'error', role: 'alert', text: e.message })); }
  });
  main.replaceChildren(h('div', { class: 'page-head' }, h('h1', { text: 'API tokens' })), shown,
    section('Tokens', table(['Name', 'Id', 'Role', 'Created by', 'Expires', ''], rows, 'No token yet. Create one below for a script or a CI job.')),
    section('Create a token', form));
}

start();
