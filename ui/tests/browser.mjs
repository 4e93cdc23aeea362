// The UI in a real browser (Debian's chromium, driven by playwright-core):
//   node ui/tests/browser.mjs <url> <password> [screenshot.png]
// Logs in as admin, sees the overview list the seeded policy shop/checkout (and why
// shop/blocked is not ready), opens its page and sees the state timeline, the replica
// chart and its metric (drawn by uPlot), takes a screenshot, logs out, and sees a wrong
// password refused with a message. Any console error (a script error or a
// Content-Security-Policy violation) fails the run. Prints one JSON line of findings.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [url, password, screenshot] = process.argv.slice(2);
if (!url || !password) {
  console.error('usage: node ui/tests/browser.mjs <url> <password> [screenshot.png]');
  process.exit(2);
}
const base = url.replace(/\/$/, '');
const POLICY = 'shop/checkout';
const BLOCKED = 'shop/blocked';
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const args = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nemesis-ui-chromium-'));
const findings = {};
const consoleErrors = [];
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath, args, headless: true, viewport: { width: 1280, height: 900 },
  });
  context.setDefaultTimeout(15000);
  const page = context.pages()[0] || await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
  page.on('pageerror', (e) => consoleErrors.push(`page error: ${e.message}`));

  // Not logged in: the app sends the browser to the login page.
  await page.goto(`${base}/`);
  await page.waitForURL(`${base}/login`);
  findings.redirectedToLogin = true;

  // Log in.
  await page.fill('#username', 'admin');
  await page.fill('#password', password);
  await page.click('#login-submit');
  await page.waitForURL(`${base}/`);
  const row = page.locator(`tr[data-policy="${POLICY}"]`);
  await row.waitFor();
  const rowText = await row.innerText();
  check(rowText.includes('warm'), `the overview row shows the state: ${rowText}`);
  check(rowText.includes('2 / 2'), `the overview row shows the replicas: ${rowText}`);
  check(rowText.includes('zero → warm'), `the overview row shows the last transition: ${rowText}`);
  findings.overviewRow = rowText.replace(/\s+/g, ' ').trim();
  // A policy that cannot act says why in its row.
  const blocked = await page.locator(`tr[data-policy="${BLOCKED}"]`).innerText();
  check(blocked.includes('not ready') && blocked.includes(`Deployment ${BLOCKED} does not exist`),
    `the blocked policy's row says why it is not ready: ${blocked}`);
  findings.blockedRow = blocked.replace(/\s+/g, ' ').trim();
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === 'nemesis_session');
  check(session && session.httpOnly && session.sameSite === 'Strict', 'the session cookie is HttpOnly and SameSite=Strict');
  check(await page.evaluate(() => !document.cookie.includes('nemesis_session')), 'scripts cannot read the session cookie');
  if (screenshot) {
    const overview = screenshot.replace(/(\.png)?$/, '-overview.png');
    await page.screenshot({ path: overview, fullPage: true });
    findings.overviewScreenshot = overview;
  }

  // The policy's page: timeline, replica chart, cold starts.
  await row.locator('a.policy-link').click();
  await page.waitForURL(`${base}/policies/shop/checkout`);
  await page.locator('#replica-chart svg path.series').first().waitFor();
  await page.locator('#state-timeline svg rect.segment').first().waitFor();
  findings.timelineSegments = await page.locator('#state-timeline svg rect.segment').count();
  findings.replicaSeries = await page.locator('#replica-chart svg path.series').count();
  const pathLength = await page.locator('#replica-chart svg path.series').first().getAttribute('d');
  check(findings.timelineSegments >= 4, `four state segments in 24 h (got ${findings.timelineSegments})`);
  check(pathLength && pathLength.length > 40, 'the replica line has points');
  // The policy's own metrics are drawn by uPlot (the charting library the controller
  // embeds): a canvas, and a legend naming the series.
  await page.locator('.metric-chart .uplot canvas').first().waitFor();
  const metricLegend = await page.locator('.metric-chart .u-legend').first().innerText();
  check(metricLegend.includes('conns.active'), `the metric chart's legend names it: ${metricLegend}`);
  findings.metricCharts = await page.locator('.metric-chart .uplot').count();
  const coldRows = await page.locator('section:has(h2:text("Cold starts")) tbody tr').count();
  check(coldRows === 3, `three cold starts listed (got ${coldRows})`);
  findings.coldStartRows = coldRows;
  const cards = await page.locator('.cards').innerText();
  check(cards.includes('1.80 s') && cards.includes('4.20 s'), `p50 and p99 time to ready shown: ${cards}`);
  if (screenshot) {
    await page.screenshot({ path: screenshot, fullPage: true });
    findings.screenshot = screenshot;
  }

  // Log out, then a wrong password is refused with a message.
  await page.click('#logout');
  await page.waitForURL(`${base}/login`);
  const status = await page.evaluate(async () => (await fetch('/api/v1/policies')).status);
  check(status === 401, `the API is closed after logout (got ${status})`);
  await page.fill('#username', 'admin');
  await page.fill('#password', `${password}-wrong`);
  await page.click('#login-submit');
  const error = page.locator('#login-error');
  await error.waitFor({ state: 'visible' });
  const errorText = await error.innerText();
  check(errorText === 'Wrong user name or password.', `the error says so: ${errorText}`);
  check(page.url() === `${base}/login`, 'still on the login page');
  findings.wrongPasswordMessage = errorText;

  // The refused login logs a 401 "Failed to load resource" in the console: expected.
  const unexpected = consoleErrors.filter((e) => !/status of 401/.test(e));
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
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
