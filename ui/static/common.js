// What every page shares: the session and its role, the JSON API (with the CSRF token
// on changes), DOM building (text goes in with textContent only, never innerHTML),
// formatting, and the page's frame (cards, panels, tables, the error panel).

export const main = document.getElementById('main');
/// The logged-in user ({user, role, csrfToken}); set once by the app at start.
export let session = null;

export function setSession(s) {
  session = s;
}

export class Unauthenticated extends Error {}

const RANK = { viewer: 0, operator: 1, admin: 2 };

// Whether the logged-in user has at least `role` (the server checks again on every
// change; this only decides which controls are drawn).
export function can(role) {
  return session && RANK[session.role] >= RANK[role];
}

// A change: JSON body, the session's CSRF token.
export function send(method, path, body) {
  const headers = { 'X-CSRF-Token': session.csrfToken };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  return api(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
}

export async function api(path, options = {}) {
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

export function h(tag, attrs = {}, ...children) {
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

export function ago(ms) {
  if (ms === null || ms === undefined) return '–';
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

export function duration(ms) {
  if (ms === null || ms === undefined) return '–';
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${(s / 3600).toFixed(1)} h`;
}

export function num(v, digits = 0) {
  return v === null || v === undefined ? '–' : Number(v).toFixed(digits);
}

export function card(label, value, sub) {
  return h('div', { class: 'card' },
    h('div', { class: 'card-label', text: label }),
    h('div', { class: 'card-value', text: value }),
    sub ? h('div', { class: 'card-sub muted', text: sub }) : null);
}

export function section(title, ...body) {
  return h('section', { class: 'panel' }, h('h2', { text: title }), ...body);
}

export function table(headers, rows, empty) {
  if (!rows.length) return h('p', { class: 'muted empty', text: empty });
  return h('div', { class: 'table-wrap' },
    h('table', {},
      h('thead', {}, h('tr', {}, headers.map((x) => h('th', { text: x })))),
      h('tbody', {}, rows)));
}

export function showError(e) {
  if (e instanceof Unauthenticated) return;
  main.replaceChildren(h('div', { class: 'panel error-panel', role: 'alert' },
    h('h2', { text: 'Something went wrong' }), h('p', { text: e.message })));
}


/// The windows the pages offer (the API takes any from 1m to 400d).
export const WINDOWS = ['1h', '6h', '24h', '7d', '30d'];
