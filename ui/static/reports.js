// The reports page: a scope (one Service's policy, a namespace, the cluster) and a
// window, the report's scaling, resources and performance sections drawn from
// `GET /api/reports` (JSON), and the same report to download as CSV, JSON or a printable
// page. Drawn generically: every series the JSON holds (any `{points: [[ms, v]]}`) gets
// a chart and every figure a row, so new ones appear without a change here.
import { main, api, h, duration, card, section, table, WINDOWS } from './common.js';
import { timeSeries, seriesColor } from './plots.js';
import { stateColor } from './charts.js';

const SCOPES = [['service', 'Service'], ['namespace', 'Namespace'], ['cluster', 'Cluster']];
const PRICES = [
  ['priceReplicaHour', 'Replica-hour'], ['priceCpuCoreHour', 'CPU core-hour'],
  ['priceMemoryGibHour', 'Memory GiB-hour'], ['priceGpuHour', 'GPU-hour'],
];

// `cpuCoreHours` -> `CPU core hours`; a key with dots or dashes is a series name: kept.
function words(key) {
  if (/[.\-/]/.test(key)) return key;
  const w = key.replace(/([a-z0-9])([A-Z])/g, '$1 $2').replace(/^./, (c) => c.toUpperCase());
  return w.replace(/\bCpu\b/i, 'CPU').replace(/\bGpu(s?)\b/i, 'GPU$1').replace(/\bGib\b/i, 'GiB').replace(/ Ms$/, '');
}

function isSeries(v) {
  return v && typeof v === 'object' && Array.isArray(v.points) && v.points.every((p) => Array.isArray(p) && p.length === 2);
}

function isFigures(v) {
  return v && typeof v === 'object' && !Array.isArray(v) && !isSeries(v)
    && Object.values(v).length > 0 && Object.values(v).every((x) => x === null || typeof x === 'number' || typeof x === 'boolean');
}

function figure(key, v) {
  if (v === null || v === undefined) return '–';
  if (typeof v === 'boolean') return v ? 'yes' : 'no';
  if (typeof v !== 'number') return String(v);
  if (/Ms$/.test(key)) return duration(v);
  if (/Seconds$/.test(key)) return duration(v * 1000);
  if (Number.isInteger(v)) return v.toLocaleString();
  // Small figures (a young Service's GiB-hours) keep their digits.
  return Math.abs(v) < 1 ? String(Number(v.toPrecision(3))) : v.toFixed(2);
}

// Every series under `obj`, by its path (`performance/conns.rate`).
function seriesIn(obj, prefix = '') {
  const out = [];
  if (!obj || typeof obj !== 'object' || Array.isArray(obj)) return out;
  for (const [k, v] of Object.entries(obj)) {
    const p = prefix ? `${prefix}/${k}` : k;
    if (isSeries(v)) out.push([p, v]);
    else out.push(...seriesIn(v, p));
  }
  return out;
}

// Every number or text under `obj` that is not part of a series, by its path.
function scalarsIn(obj, prefix = '') {
  const out = [];
  if (!obj || typeof obj !== 'object' || Array.isArray(obj) || isSeries(obj)) return out;
  for (const [k, v] of Object.entries(obj)) {
    const p = prefix ? `${prefix}/${k}` : k;
    if (v !== null && typeof v === 'object') out.push(...scalarsIn(v, p));
    else out.push([p, v]);
  }
  return out;
}

// The parts of a Service's report this page draws in its own sections.
const DRAWN = ['namespace', 'name', 'deployment', 'state', 'span', 'scaling', 'resources'];

function query(params, format) {
  const q = new URLSearchParams(params);
  if (format) q.set('format', format);
  return `/api/reports?${q}`;
}

// The picked scope as the API's parameters (from the page's own address).
function paramsOf(search) {
  const s = new URLSearchParams(search);
  const p = new URLSearchParams();
  const scope = SCOPES.some(([v]) => v === s.get('scope')) ? s.get('scope') : 'cluster';
  p.set('scope', scope);
  if (scope !== 'cluster' && s.get('namespace')) p.set('namespace', s.get('namespace'));
  if (scope === 'service' && s.get('name')) p.set('name', s.get('name'));
  p.set('window', WINDOWS.includes(s.get('window')) ? s.get('window') : '24h');
  for (const [k] of PRICES) if (s.get(k)) p.set(k, s.get(k));
  return p;
}

function pickers(policies, params, go) {
  const namespaces = [...new Set(policies.map((p) => p.namespace))].sort();
  const scope = h('select', { id: 'report-scope', name: 'scope' },
    SCOPES.map(([v, label]) => h('option', { value: v, text: label, selected: params.get('scope') === v })));
  const ns = h('select', { id: 'report-namespace', name: 'namespace' },
    namespaces.map((n) => h('option', { value: n, text: n, selected: params.get('namespace') === n })));
  const svc = h('select', { id: 'report-service', name: 'name' });
  const fillServices = () => {
    svc.replaceChildren(...policies.filter((p) => p.namespace === ns.value).map((p) =>
      h('option', { value: p.name, text: p.service ? `${p.name} (Service ${p.service})` : p.name, selected: params.get('name') === p.name })));
  };
  fillServices();
  ns.addEventListener('change', fillServices);
  const win = h('select', { id: 'report-window', name: 'window' },
    WINDOWS.map((w) => h('option', { value: w, text: `last ${w}`, selected: params.get('window') === w })));
  const nsField = h('div', { class: 'field' }, h('label', { for: 'report-namespace', text: 'Namespace' }), ns);
  const svcField = h('div', { class: 'field' }, h('label', { for: 'report-service', text: 'Service (its ScalingPolicy)' }), svc);
  const show = () => {
    nsField.hidden = scope.value === 'cluster';
    svcField.hidden = scope.value !== 'service';
  };
  show();
  scope.addEventListener('change', show);
  const prices = PRICES.map(([k, label]) => h('div', { class: 'field' },
    h('label', { for: `report-${k}`, text: `${label} price` }),
    h('input', { id: `report-${k}`, name: k, type: 'number', min: '0', step: 'any', value: params.get(k) || '' })));
  const form = h('form', { id: 'report-form', class: 'form-grid' },
    h('div', { class: 'field' }, h('label', { for: 'report-scope', text: 'Scope' }), scope),
    nsField, svcField,
    h('div', { class: 'field' }, h('label', { for: 'report-window', text: 'Window' }), win),
    h('details', { class: 'prices' }, h('summary', { text: 'Prices (optional: adds costs and the saving in money)' }),
      h('div', { class: 'form-grid' }, prices)),
    h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'report-show', text: 'Show report' })));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (String(v).trim()) q.set(k, String(v).trim());
    go(q);
  });
  return form;
}

function downloads(params) {
  return h('div', { class: 'actions', id: 'report-downloads' },
    h('a', { class: 'button secondary', id: 'report-csv', href: query(params, 'csv'), download: '', text: 'CSV' }),
    h('a', { class: 'button secondary', id: 'report-json', href: query(params, 'json'), download: 'nemesis-report.json', text: 'JSON' }),
    h('a', { class: 'button secondary', id: 'report-html', href: query(params, 'html'), target: '_blank', rel: 'noopener', text: 'Printable page' }));
}

// --- scaling ---

function stateBar(seconds) {
  const total = Object.values(seconds).reduce((a, b) => a + b, 0);
  if (!total) return h('span', { class: 'muted', text: 'no state known' });
  const bar = h('div', { class: 'state-bar', role: 'img', 'aria-label': Object.entries(seconds).map(([s, v]) => `${s} ${duration(v * 1000)}`).join(', ') });
  for (const [state, v] of Object.entries(seconds).sort((a, b) => b[1] - a[1])) {
    const part = h('div', { class: 'state-bar-part', title: `${state}: ${duration(v * 1000)} (${(100 * v / total).toFixed(1)}%)` });
    part.style.width = `${(100 * v) / total}%`;
    part.style.background = stateColor(state);
    bar.append(part);
  }
  return bar;
}

function scaling(r) {
  const w = r.totals.wakes || {};
  const cards = h('div', { class: 'cards' },
    card('Transitions', String(r.totals.transitions), `${r.totals.services} service${r.totals.services === 1 ? '' : 's'}`),
    card('Wakes', String(w.count ?? 0), `${w.ready ?? 0} ready · ${w.holdsTimedOut ?? 0} timed out · ${w.failed ?? 0} failed`),
    card('Cold start p50', duration(w.p50Ms), `p95 ${duration(w.p95Ms)} · p99 ${duration(w.p99Ms)} · max ${duration(w.maxMs)}`));
  // One row per Service: every figure of its wakes, whatever the report adds.
  const wakeKeys = [...new Set(r.services.flatMap((s) => Object.keys(s.scaling.wakes || {})))];
  const rows = r.services.map((s) => h('tr', { 'data-report-service': `${s.namespace}/${s.name}` },
    h('td', { text: `${s.namespace}/${s.name}` }),
    h('td', { class: 'num', text: String(s.scaling.transitions) }),
    wakeKeys.map((k) => h('td', { class: 'num', text: figure(k, s.scaling.wakes[k]) })),
    h('td', { class: 'state-cell' }, stateBar(s.scaling.timeInStatesSeconds || {}))));
  const transitions = r.services.flatMap((s) => (s.scaling.transitionsListed || []).map((t) => ({ ...t, svc: `${s.namespace}/${s.name}` })))
    .sort((a, b) => b.atMs - a.atMs);
  const trows = transitions.map((t) => h('tr', { 'data-transition': `${t.from}>${t.to}` },
    h('td', { text: new Date(t.atMs).toLocaleString() }),
    h('td', { text: t.svc }),
    h('td', { text: `${t.from} → ${t.to}` }),
    h('td', { class: 'reason', text: t.reason })));
  return h('section', { class: 'panel', id: 'report-scaling' }, h('h2', { text: 'Scaling' }), cards,
    table(['Service', 'Transitions', ...wakeKeys.map((k) => (k === 'count' ? 'Wakes' : words(k))), 'Time in each state'], rows, 'No ScalingPolicy in this scope.'),
    h('h3', { text: 'Transitions and their reasons' }),
    table(['When', 'Service', 'Transition', 'Reason'], trows, 'No transition in this window.'));
}

// --- resources ---

// Usage-like figures under `resources` (used, atMax, saved, and whatever else the
// report adds with number fields), as rows.
function usageTable(resources, id) {
  const groups = Object.entries(resources || {}).filter(([, v]) => isFigures(v));
  const keys = [...new Set(groups.flatMap(([, v]) => Object.keys(v)))];
  const rows = groups.map(([g, v]) => h('tr', { 'data-usage': g },
    h('td', { text: words(g) }), keys.map((k) => h('td', { class: 'num', text: figure(k, v[k]) }))));
  return h('div', { id }, table(['', ...keys.map(words)], rows, 'No resource figures.'));
}

// Used against kept at max, one bar pair per unit.
function usageBars(t) {
  if (!t.used || !t.atMax) return null;
  const units = Object.keys(t.atMax).filter((k) => typeof t.atMax[k] === 'number' && t.atMax[k] > 0);
  if (!units.length) return h('p', { class: 'muted', text: 'Nothing would have run at max either: no figure to compare.' });
  return h('div', { class: 'usage-bars', role: 'list' }, units.map((k) => {
    const used = t.used[k] || 0, max = t.atMax[k];
    const fill = h('div', { class: 'usage-used' });
    fill.style.width = `${Math.min(100, (100 * used) / max)}%`;
    return h('div', { class: 'usage-row', role: 'listitem' },
      h('div', { class: 'usage-label', text: words(k) }),
      h('div', { class: 'usage-track', title: `${figure(k, used)} used of ${figure(k, max)} at max` }, fill),
      h('div', { class: 'usage-figure num', text: `${figure(k, used)} / ${figure(k, max)} · saved ${max ? (100 * (1 - used / max)).toFixed(0) : 0}%` }));
  }));
}

function resources(r) {
  const t = r.totals;
  const perService = r.services.map((s) => h('details', { class: 'service-usage', 'data-report-service': `${s.namespace}/${s.name}` },
    h('summary', { text: `${s.namespace}/${s.name}: ${figure('replicaHours', s.resources.used?.replicaHours)} replica-hours used, max ${s.resources.maxReplicas} replicas${s.resources.known === false ? ' (no scale event yet: nothing counted)' : ''}` }),
    s.resources.perReplica ? h('p', { class: 'muted small', text: `Each replica requests ${Object.entries(s.resources.perReplica).map(([k, v]) => `${figure(k, v)} ${words(k).toLowerCase()}`).join(', ')}.` }) : null,
    usageTable(s.resources, null)));
  return h('section', { class: 'panel', id: 'report-resources' }, h('h2', { text: 'Resources' }),
    h('p', { class: 'muted', text: 'What the Services used against the same Services kept at their maximum all window, from their pods\' requests; the difference is the saving.' }),
    usageBars(t),
    usageTable({ used: t.used, atMax: t.atMax, saved: t.saved, ...Object.fromEntries(Object.entries(t).filter(([k, v]) => !['used', 'atMax', 'saved', 'wakes'].includes(k) && isFigures(v))) }, 'report-usage-totals'),
    perService.length ? h('h3', { text: 'Per Service' }) : null, perService);
}

// --- performance (and any other series) ---

// One chart per series path, a line per Service.
function charts(r) {
  const byPath = new Map();
  r.services.forEach((s) => {
    const rest = Object.fromEntries(Object.entries(s).filter(([k]) => !['span'].includes(k)));
    for (const [path, series] of seriesIn(rest)) {
      if (!byPath.has(path)) byPath.set(path, []);
      byPath.get(path).push({ svc: `${s.namespace}/${s.name}`, series });
    }
  });
  const from = r.span.fromMs, to = r.span.toMs;
  const boxes = [...byPath.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([path, list]) => {
    const name = path.split('/').pop();
    const stats = list.length === 1
      ? [list[0].series.avg != null ? `avg ${figure('', list[0].series.avg)}` : null, list[0].series.max != null ? `max ${figure('', list[0].series.max)}` : null].filter(Boolean).join(' · ')
      : `${list.length} services`;
    return h('div', { class: 'metric-chart', 'data-series': path },
      h('h3', {}, path.replace(/\//g, ' · '), stats ? h('span', { class: 'muted small', text: ` (${stats})` }) : null),
      timeSeries({
        from, to, height: 200, label: `${path} over the window`,
        series: list.map((x, i) => ({ name: list.length === 1 ? name : x.svc, points: x.series.points, color: seriesColor(i), step: /replicas/.test(name), area: list.length === 1 })),
      }));
  });
  // Figures beside the series (counts of errors, refusals...), whatever the report adds.
  const figures = r.services.flatMap((s) => scalarsIn(Object.fromEntries(Object.entries(s).filter(([k]) => !DRAWN.includes(k))))
    .map(([p, v]) => h('tr', { 'data-figure': p }, h('td', { text: `${s.namespace}/${s.name}` }), h('td', { text: p.replace(/\//g, ' · ') }),
      h('td', { class: 'num', text: figure(p.split('/').pop(), v) }))));
  return h('section', { class: 'panel', id: 'report-performance' }, h('h2', { text: 'Performance' }),
    boxes.length
      ? h('div', { class: 'metric-grid' }, boxes)
      : h('p', { class: 'muted empty', text: 'No sample in this window: the policies record connection rates and open connections while agents report them. Pick a longer window, or check the Agents page.' }),
    figures.length ? [h('h3', { text: 'Figures' }), table(['Service', 'Figure', 'Value'], figures, '')] : null);
}

export async function reportsPage() {
  document.title = 'Reports · Nemesis';
  const list = await api('/api/v1/policies');
  const params = paramsOf(window.location.search);
  const go = (q) => {
    window.history.replaceState(null, '', `/reports?${q}`);
    reportsPage().catch((e) => out.replaceChildren(h('p', { class: 'error', role: 'alert', text: e.message })));
  };
  const out = h('div', { id: 'report', 'aria-live': 'polite' });
  const head = h('div', { class: 'page-head' }, h('h1', { text: 'Reports' }), downloads(params));
  // A service scope needs a policy: without one, say what to pick instead of failing.
  const incomplete = (params.get('scope') === 'service' && !params.get('name')) || (params.get('scope') === 'namespace' && !params.get('namespace'));
  main.replaceChildren(head, section('Scope and window', pickers(list.policies, params, go)), out);
  if (!list.policies.length) {
    out.replaceChildren(h('div', { class: 'panel empty-state' },
      h('p', { text: 'No ScalingPolicy exists yet, so there is nothing to report. Create one (New policy, or kubectl apply -f a ScalingPolicy manifest); its transitions, wakes, resources and connections are reported from then on.' })));
    return;
  }
  if (incomplete) {
    out.replaceChildren(h('p', { class: 'muted panel', text: 'Pick a namespace and a Service, then Show report.' }));
    return;
  }
  out.replaceChildren(h('p', { class: 'muted', text: 'Building the report…' }));
  const r = await api(query(params, 'json'));
  const what = r.scope === 'service' ? `${r.namespace}/${r.name}` : r.scope === 'namespace' ? `namespace ${r.namespace}` : 'the cluster';
  out.replaceChildren(
    h('p', { class: 'muted', id: 'report-span', text: `Report for ${what}, ${new Date(r.span.fromMs).toLocaleString()} to ${new Date(r.span.toMs).toLocaleString()}.` }),
    scaling(r), resources(r), charts(r));
}
