// The UI as people use it, each in their own browser context (Debian's chromium driven
// by playwright-core) against a real controller on the test API server:
//   node ui/tests/roles.mjs <url> <admin password> <screenshot dir>
// The users vera (viewer, password vera-password-1) and otto (operator,
// otto-password-1) exist; a Deployment and Service named web exist in default, api in
// shop (run by the sandbox kubelet, at zero) with an AlertRule; no policy.
// A viewer sees no edit controls and the API refuses its change with 403; an admin
// creates the policy through the guided form (a typo first, shown with field and column)
// and shop/api's in the YAML editor, and issues a token; the viewer's open overview shows the new policy without a reload;
// an operator sees the automaton, pauses the policy, and the viewer sees it paused live.
// Then shop/api (at zero, an AlertRule on ScaledFromZero with a webhook sink) wakes:
// the script sends the wake request the node agent sends for a held connection
// (NEMESIS_E2E_WAKE: path, agent token, body), the viewer's open overview shows the
// transition out of zero and the operator's open alerts page the alert with its
// delivery, both without a reload; the viewer has no Acknowledge button and the API
// answers its acknowledgement with 403; the operator acknowledges through the page; the
// admin opens the reports page (charts drawn by uPlot) and downloads the CSV, which the
// Rust side checks. The pages are reachable by keyboard; a screenshot of every page is
// kept; any console error (a script error, a CSP violation) fails the run. Prints one
// JSON line.
import path from 'node:path';
import { chromium } from 'playwright-core';

const [url, password, shots] = process.argv.slice(2);
const wake = process.env.NEMESIS_E2E_WAKE ? JSON.parse(process.env.NEMESIS_E2E_WAKE) : null;
if (!url || !password || !shots) {
  console.error('usage: node ui/tests/roles.mjs <url> <admin password> <screenshot dir>');
  process.exit(2);
}
const base = url.replace(/\/$/, '');
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const args = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
// Generous: the machine running the tests is busy.
const WAIT = 60000;

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

const findings = { screenshots: [] };
const consoleErrors = [];
let browser;

async function shot(page, name) {
  // A JavaScript null written into the page as text is a rendering bug.
  const text = await page.locator('main').innerText();
  check(!/(^|\n)null(\n|$)/.test(text), `the ${name} page shows a stray "null"`);
  check(!/undefined|NaN|\[object Object\]/.test(text), `the ${name} page shows a missing value: ${text}`);
  const file = path.join(shots, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  findings.screenshots.push(file);
}

async function as(user, pw) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  context.setDefaultTimeout(WAIT);
  const page = await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(`${user}: ${m.text()}`); });
  page.on('pageerror', (e) => consoleErrors.push(`${user}: page error: ${e.message}`));
  await page.goto(`${base}/login`);
  await page.fill('#username', user);
  await page.fill('#password', pw);
  await page.click('#login-submit');
  await page.waitForURL(`${base}/`);
  await page.locator('section.panel').first().waitFor();
  return page;
}

// A change through the API with the page's own session and CSRF token.
async function apiChange(page, method, p, body) {
  return page.evaluate(async ([method, p, body]) => {
    const s = await (await fetch('/api/v1/session')).json();
    const r = await fetch(p, {
      method, headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': s.csrfToken },
      body: JSON.stringify(body),
    });
    return r.status;
  }, [method, p, body]);
}

// Polls `cond` (async, true when done) every second until it holds or `ms` passed.
async function until(what, ms, cond) {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// Tabs through the page and returns a description of each focused element.
async function tabStops(page, n) {
  await page.locator('body').click({ position: { x: 5, y: 5 } });
  const stops = [];
  for (let i = 0; i < n; i++) {
    await page.keyboard.press('Tab');
    stops.push(await page.evaluate(() => {
      const e = document.activeElement;
      if (!e || e === document.body) return '';
      return `${e.tagName.toLowerCase()}${e.id ? `#${e.id}` : ''}${e.getAttribute('href') ? `[href=${e.getAttribute('href')}]` : ''}`;
    }));
  }
  return stops;
}

try {
  browser = await chromium.launch({ executablePath, args, headless: true });

  // --- the viewer: reads, cannot edit ---
  const viewer = await as('vera', 'vera-password-1');
  const empty = await page_text(viewer, 'main');
  check(empty.includes('No ScalingPolicy exists yet') && empty.includes('An admin can create one'),
    `the empty overview says what to do next: ${empty}`);
  for (const sel of ['nav a[href="/users"]', 'nav a[href="/tokens"]', 'nav a[href="/edit"]', '#new-policy']) {
    check(await viewer.locator(sel).count() === 0, `a viewer has no ${sel}`);
  }
  const refused = await apiChange(viewer, 'POST', '/api/v1/policy-drafts/apply',
    { form: { namespace: 'default', name: 'sneaky', deployment: 'web' } });
  check(refused === 403, `the API refuses a viewer's edit (got ${refused})`);
  findings.viewerApplyStatus = refused;
  await shot(viewer, 'viewer-overview-empty');
  // Marks this page: a reload would lose the mark.
  await viewer.evaluate(() => { window.__noReload = true; });

  // --- the admin: creates the policy through the guided form ---
  const admin = await as('admin', password);
  await admin.click('#new-policy');
  await admin.waitForURL(`${base}/edit`);
  await admin.fill('#f-namespace', 'default');
  await admin.fill('#f-name', 'web');
  await admin.fill('#f-deployment', 'web');
  await admin.fill('#f-service', 'web');
  await admin.fill('#f-idleTimeout', '10x');
  await admin.click('#form-check');
  const problem = admin.locator('#edit-result .problems li').first();
  await problem.waitFor();
  const problemText = await problem.innerText();
  check(problemText.includes('spec.idleTimeout') && problemText.includes('column'),
    `the typo is shown with its field and column: ${problemText}`);
  findings.formProblem = problemText;
  await shot(admin, 'admin-editor-problem');
  await admin.fill('#f-idleTimeout', '10m');
  await admin.click('#form-apply');
  await admin.locator('#edit-result .ok >> text=Applied').waitFor();
  await shot(admin, 'admin-editor-applied');
  // The YAML tab is there and reachable.
  await admin.click('#tab-yaml-btn');
  await admin.locator('#yaml-editor').waitFor({ state: 'visible' });
  await shot(admin, 'admin-editor-yaml');
  // The full form: shop/api's policy (at zero until a connection comes), in YAML.
  await admin.fill('#yaml-editor', [
    'apiVersion: nemesis.dev/v1alpha1', 'kind: ScalingPolicy',
    'metadata: {name: api, namespace: shop}',
    'spec:', '  target: {deployment: api, service: api}',
    '  minReplicas: 0', '  maxReplicas: 1', '  idleTimeout: 1h', ''].join('\n'));
  await admin.click('#yaml-apply');
  await admin.locator('#edit-result .ok >> text=Applied').waitFor();

  // The viewer's open overview shows it without a reload.
  const row = viewer.locator('tr[data-policy="default/web"]');
  await row.waitFor();
  check(await viewer.evaluate(() => window.__noReload === true), 'the overview updated without a reload');
  findings.liveRow = (await row.innerText()).replace(/\s+/g, ' ').trim();

  // Users and tokens pages.
  await admin.goto(`${base}/users`);
  await admin.locator('tr[data-user="otto"]').waitFor();
  await shot(admin, 'admin-users');
  await admin.goto(`${base}/tokens`);
  await admin.fill('#new-token-name', 'ci');
  await admin.fill('#new-token-expires', '7d');
  await admin.click('#new-token button[type=submit]');
  const secret = await admin.locator('#new-token-secret').innerText();
  check(secret.startsWith('nmt_'), `the token is shown once: ${secret.slice(0, 8)}…`);
  await admin.locator('tr[data-token]').first().waitFor();
  await shot(admin, 'admin-tokens');
  await admin.goto(`${base}/events`);
  await admin.locator('#ev-filters').waitFor();
  await shot(admin, 'admin-events');
  await admin.goto(`${base}/agents`);
  await admin.locator('h1 >> text=Agents').waitFor();
  await shot(admin, 'admin-agents');
  await admin.goto(`${base}/alerts`);
  await admin.locator('h1 >> text=Alerts').waitFor();
  await shot(admin, 'admin-alerts');

  // --- the operator: sees the automaton, pauses ---
  const operator = await as('otto', 'otto-password-1');
  check(await operator.locator('nav a[href="/users"]').count() === 0, 'an operator has no Users page');
  await operator.goto(`${base}/policies/default/web`);
  await operator.locator('#automaton svg g.state-node').first().waitFor();
  findings.automatonStates = await operator.locator('#automaton svg g.state-node').count();
  findings.automatonEdges = await operator.locator('#automaton svg g.edge').count();
  check(findings.automatonStates >= 2 && findings.automatonEdges >= 2,
    `the automaton is drawn: ${findings.automatonStates} states, ${findings.automatonEdges} transitions`);
  check(await operator.locator('#edit-policy').count() === 0, 'an operator cannot edit');
  const stops = await tabStops(operator, 30);
  findings.tabStops = stops.filter(Boolean);
  for (const want of ['[href=/events]', '#pause-toggle', '#logout']) {
    check(stops.some((s) => s.includes(want)), `${want} is reachable by keyboard: ${stops.join(' ')}`);
  }
  await shot(operator, 'operator-policy');
  await operator.click('#pause-toggle');
  await operator.locator('h1 .badge >> text=paused').waitFor();
  // The viewer sees it paused, live.
  await row.locator('.badge >> text=paused').waitFor();
  check(await viewer.evaluate(() => window.__noReload === true), 'still no reload');
  await shot(viewer, 'viewer-overview-live');
  await viewer.goto(`${base}/policies/default/web`);
  await viewer.locator('#automaton svg').waitFor();
  check(await viewer.locator('#pause-toggle').count() === 0, 'a viewer has no pause control');
  await shot(viewer, 'viewer-policy');

  // --- a wake, live; an alert, acknowledged; the report ---
  check(wake, 'NEMESIS_E2E_WAKE names the wake request');
  await viewer.goto(`${base}/`);
  const apiRow = viewer.locator('tr[data-policy="shop/api"]');
  await apiRow.waitFor();
  await viewer.waitForFunction(() => {
    const r = document.querySelector('tr[data-policy="shop/api"] [data-state]');
    return r && r.dataset.state === 'zero';
  }, null, { timeout: 120000 });
  await viewer.evaluate(() => { window.__noReload = true; });
  await operator.goto(`${base}/alerts`);
  const emptyAlerts = operator.locator('#alerts-empty');
  await emptyAlerts.waitFor();
  const emptyText = await emptyAlerts.innerText();
  check(emptyText.includes('AlertRule') && emptyText.includes('kubectl apply'), `the empty alerts page says what to do: ${emptyText}`);
  await shot(operator, 'operator-alerts-empty');
  await operator.evaluate(() => { window.__noReload = true; });

  // The node agent's wake request (a held connection arrived for shop/api).
  const woke = await fetch(`${base}${wake.path}`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${wake.token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(wake.body),
  });
  const wokeBody = await woke.json().catch(() => null);
  check(woke.status === 200 && wokeBody && wokeBody.accepted === true, `the wake is accepted: ${woke.status} ${JSON.stringify(wokeBody)}`);

  // The viewer's open overview shows it, without a reload.
  await viewer.waitForFunction(() => {
    const r = document.querySelector('tr[data-policy="shop/api"]');
    return r && /zero →/.test(r.innerText);
  }, null, { timeout: 120000 });
  check(await viewer.evaluate(() => window.__noReload === true), 'the wake showed without a reload');
  findings.wakeRow = (await apiRow.innerText()).replace(/\s+/g, ' ').trim();
  await shot(viewer, 'viewer-overview-woken');

  // The operator's open alerts page shows the alert and its delivery, live.
  const alertRow = operator.locator('tr[data-alert]').first();
  await alertRow.waitFor({ timeout: 120000 });
  await operator.locator('tr[data-alert] li[data-sink="hook"] .badge >> text=delivered').waitFor({ timeout: 120000 });
  check(await operator.evaluate(() => window.__noReload === true), 'the alert showed without a reload');
  const alertText = (await alertRow.innerText()).replace(/\s+/g, ' ');
  check(alertText.includes('NemesisScaledFromZero') && alertText.includes('shop/api') && alertText.includes('firing'),
    `the alert row names the rule, the Service and its state: ${alertText}`);
  findings.alertRow = alertText.trim();
  const alertId = await alertRow.getAttribute('data-alert');

  // The viewer: no button, and the API refuses.
  await viewer.goto(`${base}/alerts`);
  await viewer.locator(`tr[data-alert="${alertId}"]`).waitFor();
  check(await viewer.locator('button.ack').count() === 0, 'a viewer has no Acknowledge button');
  const viewerAck = await apiChange(viewer, 'POST', `/api/alerts/${encodeURIComponent(alertId)}/ack`);
  check(viewerAck === 403, `the API refuses a viewer's acknowledgement (got ${viewerAck})`);
  findings.viewerAckStatus = viewerAck;
  await shot(viewer, 'viewer-alerts');

  // The operator acknowledges, by keyboard.
  const ackStops = await tabStops(operator, 40);
  check(ackStops.some((x) => x.startsWith('button#ack-')), `Acknowledge is reachable by keyboard: ${ackStops.join(' ')}`);
  await operator.locator('button.ack').first().focus();
  await operator.keyboard.press('Enter');
  await operator.locator(`tr[data-alert="${alertId}"] .ack-note >> text=acknowledged by otto`).waitFor();
  await operator.locator('#alerts-note >> text=Acknowledged').waitFor();
  check(await operator.locator('button.ack').count() === 0, 'no button left once acknowledged');
  await shot(operator, 'operator-alerts-acknowledged');

  // Wait for the wake's cold start to be recorded (the pod is ready), then the report.
  await until('the wake\'s cold start, ready', 120000, () => admin.evaluate(async () => {
    const r = await fetch('/api/v1/events?policy=shop/api&kind=coldStart&window=1h');
    const page = await r.json();
    return page.events.some((e) => e.record.outcome && e.record.outcome.kind === 'ready');
  }));
  // The events page lists the wake: its transition, scale and cold start.
  await admin.goto(`${base}/events?policy=shop/api`);
  await admin.locator('#ev-rows tr[data-kind="coldStart"]').waitFor();
  const coldText = await admin.locator('#ev-rows tr[data-kind="coldStart"]').first().innerText();
  check(coldText.includes('cold start: ready'), `the cold start is listed: ${coldText}`);
  const wakeText = await admin.locator('#ev-rows tr[data-kind="transition"]').first().innerText();
  check(wakeText.includes('zero → warm'), `the wake's transition is listed: ${wakeText}`);
  await shot(admin, 'admin-events-wake');
  await admin.goto(`${base}/reports`);
  await admin.locator('#report-form').waitFor();
  await shot(admin, 'admin-reports-cluster');
  await admin.selectOption('#report-scope', 'namespace');
  await admin.selectOption('#report-namespace', 'shop');
  await admin.selectOption('#report-window', '1h');
  await admin.click('#report-show');
  await admin.locator('#report-scaling tr[data-report-service="shop/api"]').waitFor();
  await admin.locator('#report-performance .plot canvas').first().waitFor();
  findings.reportCharts = await admin.locator('#report-performance .uplot').count();
  check(findings.reportCharts >= 1, `the report's series are charted: ${findings.reportCharts}`);
  const transitionsListed = await admin.locator('#report-scaling tr[data-transition]').count();
  check(transitionsListed >= 1, `the report lists the wake's transition (got ${transitionsListed})`);
  const reportStops = await tabStops(admin, 40);
  for (const want of ['select#report-scope', 'a#report-csv', 'button#report-show']) {
    check(reportStops.some((x) => x.startsWith(want)), `${want} is reachable by keyboard: ${reportStops.join(' ')}`);
  }
  await shot(admin, 'admin-reports-shop');
  const [download] = await Promise.all([admin.waitForEvent('download'), admin.click('#report-csv')]);
  const csvFile = path.join(shots, 'report-shop.csv');
  await download.saveAs(csvFile);
  findings.reportCsv = csvFile;
  const html = await admin.evaluate(async () => {
    const a = document.getElementById('report-html');
    const r = await fetch(a.href);
    return [r.status, r.headers.get('content-type')];
  });
  check(html[0] === 200 && html[1].startsWith('text/html'), `the printable page is served: ${html}`);
  // The page draws whatever the report holds: a series and a figure it has never seen
  // (added to the server's answer on the way) get a chart and a row.
  const isReport = (u) => u.pathname === '/api/reports' && u.searchParams.get('format') === 'json';
  await admin.route(isReport, async (route) => {
    const resp = await route.fetch();
    const r = await resp.json();
    for (const s of r.services) {
      s.performance['latency.p99'] = { points: [[r.span.fromMs + 60000, 12], [r.span.toMs - 60000, 30]], avg: 21, max: 30 };
      s.proxy = { errors: 3 };
    }
    await route.fulfill({ response: resp, json: r });
  });
  await admin.click('#report-show');
  await admin.locator('[data-series="performance/latency.p99"] .uplot canvas').waitFor();
  const extra = await admin.locator('tr[data-figure="proxy/errors"]').innerText();
  check(extra.includes('shop/api') && extra.includes('3'), `a new figure gets a row: ${extra}`);
  await admin.unroute(isReport);

  // 401 and 403 answers are logged by chromium as failed loads: expected, nothing else.
  const unexpected = consoleErrors.filter((e) => !/status of 40[13]/.test(e));
  check(unexpected.length === 0, `no console errors: ${JSON.stringify(unexpected)}`);
  findings.ok = true;
  console.log(JSON.stringify(findings));
} catch (e) {
  findings.ok = false;
  findings.error = String(e && e.stack || e);
  findings.consoleErrors = consoleErrors;
  console.log(JSON.stringify(findings));
  process.exitCode = 1;
} finally {
  if (browser) await browser.close().catch(() => {});
}

async function page_text(page, sel) {
  return (await page.locator(sel).innerText()).replace(/\s+/g, ' ');
}
