// The alerts page: the alerts Nemesis sends (the outbox: rule, Service, severity,
// since, state, delivery to each sink), the sinks they go to, and the Alertmanager
// alerts policies react to. Operators and admins acknowledge; a viewer gets no button
// (and the API refuses one with 403). The app redraws it on the live feed's `alerts`
// event.
import {
  main, can, send, api, h, ago, card, section, table, showError, Unauthenticated,
} from './common.js';

// Shown when nothing was ever raised: what to declare, with a rule that works as is.
const RULE_EXAMPLE = `apiVersion: nemesis.dev/v1alpha1
kind: AlertRule
metadata:
  name: wakes
  namespace: default        # the namespace of the ScalingPolicies it watches
spec:
  severity: info
  when:
  - event: ScaledFromZero
  - event: ScaledToZero
  - coldStartSlowerThan: 30s
  - flapping: {transitions: 6, window: 10m}`;

const SEVERITY = { critical: 'badge-bad', warning: 'badge-warn', info: 'badge-unknown' };

function severityBadge(s) {
  return h('span', { class: `badge ${SEVERITY[s] || ''}`, text: s });
}

function stateCell(a) {
  const firing = a.state === 'firing';
  return [
    h('span', { class: `badge ${firing ? 'badge-bad' : 'badge-ok'}`, text: a.state }),
    a.acknowledgedBy
      ? h('div', { class: 'muted small ack-note', text: `acknowledged by ${a.acknowledgedBy} ${ago(a.acknowledgedAtMs)}` })
      : null,
    a.count > 1 ? h('div', { class: 'muted small', text: `seen ${a.count} times, last ${ago(a.lastSeenMs)}` }) : null,
  ];
}

function whenNext(ms) {
  const s = Math.round((ms - Date.now()) / 1000);
  return s <= 0 ? 'now' : s < 120 ? `in ${s} s` : `in ${Math.round(s / 60)} min`;
}

// One line per sink: delivered (when), pending (attempts, next try, last error) or
// failed (why).
function deliveryCell(a) {
  const ds = Object.entries(a.deliveries || {});
  if (!ds.length) return h('span', { class: 'muted', text: 'no sink' });
  return h('ul', { class: 'plain deliveries' }, ds.map(([sink, d]) => {
    const cls = d.state === 'delivered' ? 'badge-ok' : d.state === 'failed' ? 'badge-bad' : 'badge-warn';
    let note = '';
    if (d.state === 'delivered') note = d.deliveredAtMs ? ` ${ago(d.deliveredAtMs)}` : '';
    else if (d.state === 'pending') note = d.attempts ? ` · attempt ${d.attempts}, next ${whenNext(d.nextAttemptMs)}` : ` · ${whenNext(d.nextAttemptMs)}`;
    else note = ` after ${d.attempts} attempts`;
    return h('li', { 'data-sink': sink },
      h('span', { class: 'mono small', text: sink }), ' ',
      h('span', { class: `badge ${cls}`, text: d.state }),
      h('span', { class: 'muted small', text: note }),
      d.lastError && d.state !== 'delivered' ? h('div', { class: 'error small reason', text: d.lastError }) : null);
  }));
}

// What the alert is about: the policy (namespace/name) or the agent's node.
function subject(a) {
  const l = a.labels || {};
  if (l.namespace && l.policy) {
    return h('a', { href: `/policies/${encodeURIComponent(l.namespace)}/${encodeURIComponent(l.policy)}`, text: `${l.namespace}/${l.policy}` });
  }
  if (l.node) return h('span', { text: `node ${l.node}` });
  return h('span', { class: 'muted', text: '–' });
}

function alertRow(a, leading, redraw, note) {
  const canAck = can('operator') && !a.acknowledgedBy;
  const ack = canAck ? h('button', {
    type: 'button', class: 'secondary ack', id: `ack-${a.id}`,
    'aria-label': `Acknowledge ${a.labels.alertname || a.rule} ${a.labels.policy || ''}`.trim(),
    disabled: !leading,
    title: leading ? 'Mark it seen: the alert stays, with who acknowledged it' : 'This instance is a standby: acknowledge on the leader',
    text: 'Acknowledge',
    onclick: async (ev) => {
      ev.target.disabled = true;
      try {
        await send('POST', `/api/alerts/${encodeURIComponent(a.id)}/ack`);
        flash = { until: Date.now() + FLASH_MS, text: `Acknowledged: ${a.summary}` };
        await redraw();
      } catch (e) {
        if (e instanceof Unauthenticated) return;
        ev.target.disabled = false;
        note.replaceChildren(h('p', { class: 'error', role: 'alert', text: e.message }));
      }
    },
  }) : null;
  return h('tr', { 'data-alert': a.id, 'data-state': a.state, 'data-acknowledged': a.acknowledgedBy ? 'true' : 'false' },
    h('td', {}, h('div', { text: a.labels.alertname || a.rule }), h('div', { class: 'muted small', text: `rule ${a.rule}` })),
    h('td', {}, subject(a)),
    h('td', {}, severityBadge(a.severity)),
    h('td', { title: new Date(a.startsAtMs).toLocaleString() },
      ago(a.startsAtMs), a.endsAtMs ? h('div', { class: 'muted small', text: `ended ${ago(a.endsAtMs)}` }) : null),
    h('td', {}, stateCell(a)),
    h('td', { class: 'reason' }, a.summary),
    h('td', {}, deliveryCell(a)),
    h('td', {}, ack));
}

function sinkRows(sinks) {
  return sinks.map((s) => h('tr', { 'data-sink': s.name },
    h('td', { class: 'mono', text: s.name }),
    h('td', {}, h('span', { class: 'badge', text: s.kind })),
    h('td', { class: 'mono small reason', text: s.target }),
    h('td', { class: 'num', text: String(s.counters.delivered) }),
    h('td', { class: 'num', text: String(s.counters.failed) }),
    h('td', { class: 'num', text: String(s.counters.rateLimited) }),
    h('td', {},
      s.counters.lastDeliveredAtMs ? h('div', { text: `delivered ${ago(s.counters.lastDeliveredAtMs)}` }) : h('span', { class: 'muted', text: 'nothing delivered yet' }),
      s.counters.lastError ? h('div', { class: 'error small reason', text: s.counters.lastError }) : null)));
}

function inboundRows(list) {
  return list.alerts.map((a) => h('tr', { 'data-inbound': a.name },
    h('td', { text: a.name }),
    h('td', {}, h('span', { class: `badge ${a.firing ? 'badge-bad' : 'badge-unknown'}`, text: a.firing ? 'firing' : 'quiet' })),
    h('td', { text: a.sinceMs ? ago(a.sinceMs) : '–' }),
    h('td', { class: 'num', text: String(a.instances) }),
    h('td', { text: a.policies.join(', ') || '–' })));
}

function emptyState(sinksConfigured) {
  return h('div', { class: 'empty-state', id: 'alerts-empty' },
    h('p', { text: 'No alert has been raised. Nemesis raises alerts for the AlertRules declared in a namespace: scaling to or from zero, slow cold starts, held connections timed out, flapping, a metric over a threshold, an invalid policy, a lost agent.' }),
    h('p', { text: 'Declare one with kubectl apply -f rule.yaml, for example:' }),
    h('pre', { class: 'mono', text: RULE_EXAMPLE }),
    h('p', { class: 'muted small', text: sinksConfigured
      ? 'kubectl describe alertrule wakes shows whether it is valid (field and column when it is not).'
      : 'Then tell an administrator to configure where alerts go (--alert-sinks-file: webhook, Slack, Alertmanager, e-mail; see manifests/README.md).' }));
}

let view = 'all';
// A message the page shows for a while across redraws (the acknowledgement redraws it,
// and so does the live feed right after).
let flash = null;
const FLASH_MS = 30000;
const VIEWS = [['all', 'All'], ['firing', 'Firing'], ['open', 'Not acknowledged']];

export async function alertsPage() {
  document.title = 'Alerts · Nemesis';
  const [out, sinks, inbound] = await Promise.all([
    api('/api/alerts'),
    api('/api/sinks'),
    api('/api/v1/alerts'),
  ]);
  if (flash && Date.now() > flash.until) flash = null;
  const note = h('div', { id: 'alerts-note', 'aria-live': 'polite' },
    flash ? h('p', { class: 'ok', role: 'status', text: flash.text }) : null);
  const firing = out.alerts.filter((a) => a.state === 'firing');
  const open = firing.filter((a) => !a.acknowledgedBy);
  const undelivered = out.alerts.filter((a) => Object.values(a.deliveries || {}).some((d) => d.state !== 'delivered')).length;
  const shown = view === 'firing' ? firing : view === 'open' ? open : out.alerts;
  const redraw = () => alertsPage().catch(showError);
  const filter = h('div', { class: 'segmented', role: 'group', 'aria-label': 'Which alerts' }, VIEWS.map(([v, label]) =>
    h('button', {
      type: 'button', class: v === view ? 'active' : '', 'aria-pressed': String(v === view), id: `alerts-view-${v}`, text: label,
      onclick: () => { view = v; redraw(); },
    })));
  const rows = shown.map((a) => alertRow(a, out.leading, redraw, note));
  const alertsBody = out.alerts.length
    ? table(['Alert', 'Service', 'Severity', 'Since', 'State', 'Summary', 'Delivery', ''], rows,
      view === 'firing' ? 'Nothing is firing.' : 'Every firing alert is acknowledged.')
    : emptyState(out.sinksConfigured > 0);
  main.replaceChildren(...[
    h('div', { class: 'page-head' }, h('h1', { text: 'Alerts' }), filter),
    note,
    out.leading ? null : h('p', { class: 'notice', text: 'This instance is a standby: it shows the alerts as the leader last saved them, and cannot acknowledge.' }),
    out.sinksConfigured ? null : h('p', { class: 'notice', id: 'no-sinks', text: 'No sink is configured: alerts are listed here but sent nowhere. An administrator adds sinks with --alert-sinks-file (see manifests/README.md).' }),
    h('div', { class: 'cards' },
      card('Firing', String(firing.length), `${open.length} not acknowledged`),
      card('Raised (recent)', String(out.alerts.length), 'resolved ones stay for 24 h'),
      card('Sinks', String(out.sinksConfigured), sinks.sinks.map((s) => s.kind).join(', ') || 'none configured'),
      card('Awaiting delivery', String(undelivered), 'pending or failed to a sink')),
    h('section', { class: 'panel', id: 'alerts-out' }, h('h2', { text: 'Alerts from Nemesis' }), alertsBody),
    section('Sinks', table(['Sink', 'Kind', 'Target', 'Delivered', 'Failed', 'Rate limited', 'Last'], sinkRows(sinks.sinks),
      'No sink is configured.')),
    section('Alertmanager alerts policies react to',
      inbound.webhookConfigured ? null : h('p', { class: 'notice', text: 'The Alertmanager webhook is not configured (--alertmanager-token-file): no Alertmanager alert reaches the policies.' }),
      table(['Alert', 'Status', 'Since', 'Instances', 'Policies reacting'], inboundRows(inbound),
        'No Alertmanager alert is firing and no policy waits for one.')),
  ].filter(Boolean));
}
