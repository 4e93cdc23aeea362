//! Alerts out against real servers on loopback: Debian's Alertmanager receives and lists
//! the alert through its v2 API; a real SMTP server (aiosmtpd from PyPI, installed by
//! `cargo xtask setup`, with AUTH PLAIN) receives the mail; a local HTTP receiver checks
//! the HMAC-SHA256 signature independently (ring's verify); a Slack-like receiver takes
//! the incoming-webhook JSON. Plus retries with backoff, deduplication, grouping, the
//! rate limit, the outbox surviving a restart, and the UI's `/api/alerts`, ack and
//! `/api/sinks`.

mod ui_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::routing::post;
use http::{HeaderMap, StatusCode};
use nemesis_controller::metrics::ControllerMetrics;
use nemesis_controller::notify::evaluate::Signal;
use nemesis_controller::notify::outbox::{AlertState, DeliveryState, Outbox};
use nemesis_controller::notify::rule::{AlertRule, CompiledRule, compile};
use nemesis_controller::notify::sinks::{
    SIGNATURE_HEADER, Sender, TIMESTAMP_HEADER, parse_config, parse_sinks,
};
use nemesis_controller::notify::{Notifier, NotifyHandle, NotifyTap, OutboxStore, RuleSource};
use nemesis_controller::store::PolicyId;
use nemesis_controller::ui::UiConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";
const AIOSMTPD_PYTHON: &str = "/opt/nemesis/aiosmtpd/bin/python";
const HMAC_KEY: &str = "hmac-key-for-the-alerts-out-tests";
const SMTP_USER: &str = "nemesis";
const SMTP_PASSWORD: &str = "smtp-password-for-tests";
/// Everything here starts processes and sends over loopback on a loaded machine.
const WAIT: Duration = Duration::from_secs(90);

// === real servers ===

struct ChildGuard {
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Alertmanager with a route to nowhere: it only has to receive and list alerts.
async fn start_alertmanager(dir: &Path) -> Result<(ChildGuard, String)> {
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        "route:\n  receiver: blackhole\nreceivers:\n- name: blackhole\n",
    )?;
    let port = free_port()?;
    let log = dir.join("alertmanager.log");
    let child = Command::new(ALERTMANAGER)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", dir.join("am-data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {ALERTMANAGER} (`prometheus-alertmanager`)"))?;
    let mut guard = ChildGuard { child, log };
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let ready = wait_for("Alertmanager to be ready", async || {
        if let Ok(Some(st)) = guard.child.try_wait() {
            panic!("Alertmanager exited ({st}):\n{}", guard.log());
        }
        let r = http.get(format!("{url}/-/ready")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    ready.with_context(|| guard.log())?;
    Ok((guard, url))
}

/// aiosmtpd with AUTH PLAIN/LOGIN required (no TLS on loopback), into a Maildir.
async fn start_smtp(dir: &Path) -> Result<(ChildGuard, u16, PathBuf)> {
    let script = dir.join("smtpd.py");
    std::fs::write(
        &script,
        r#"
import sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import AuthResult
port, box, user, pw = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def auth(server, session, envelope, mechanism, data):
    ok = data.login.decode() == user and data.password.decode() == pw
    return AuthResult(success=ok)
c = Controller(Mailbox(box), hostname="127.0.0.1", port=port, authenticator=auth,
               auth_required=True, auth_require_tls=False)
c.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"#,
    )?;
    let port = free_port()?;
    let maildir = dir.join("maildir");
    let log = dir.join("smtpd.log");
    let child = Command::new(AIOSMTPD_PYTHON)
        .arg(&script)
        .arg(port.to_string())
        .arg(&maildir)
        .args([SMTP_USER, SMTP_PASSWORD])
        .stdout(std::fs::File::create(dir.join("smtpd.out"))?)
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| {
            format!("starting {AIOSMTPD_PYTHON} (aiosmtpd, installed by `cargo xtask setup`)")
        })?;
    let mut guard = ChildGuard { child, log };
    let r = wait_for("aiosmtpd to listen", async || {
        if let Ok(Some(st)) = guard.child.try_wait() {
            panic!("aiosmtpd exited ({st}):\n{}", guard.log());
        }
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(drop)
    })
    .await;
    r.with_context(|| guard.log())?;
    Ok((guard, port, maildir))
}

fn mails(maildir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(maildir.join("new")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect()
}

// === local receivers ===

#[derive(Clone, Debug)]
struct Received {
    signature_ok: bool,
    body: serde_json::Value,
}

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    /// Answer 503 to this many requests first.
    fail_first: Arc<AtomicUsize>,
}

impl Receiver {
    fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// Checks the signature with ring's own verify over "<timestamp>.<body>": 401 when wrong.
async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let sig = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .unwrap_or("");
    let ts = headers
        .get(TIMESTAMP_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let tag: Vec<u8> = (0..sig.len() / 2)
        .filter_map(|i| u8::from_str_radix(sig.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HMAC_KEY.as_bytes());
    let signed = [ts.as_bytes(), b".", &body].concat();
    let signature_ok = !ts.is_empty() && ring::hmac::verify(&key, &signed, &tag).is_ok();
    let fresh = ts
        .parse::<i64>()
        .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() < 300);
    r.got.lock().unwrap().push(Received {
        signature_ok,
        body: serde_json::from_slice(&body).unwrap_or_default(),
    });
    if !(signature_ok && fresh) {
        return StatusCode::UNAUTHORIZED;
    }
    if r.fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    StatusCode::OK
}

/// As Slack's incoming webhooks: a JSON object with `text`, answered `ok`.
async fn slack(State(r): State<Receiver>, body: Bytes) -> (StatusCode, &'static str) {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let ok = v["text"].is_string();
    r.got.lock().unwrap().push(Received {
        signature_ok: false,
        body: v,
    });
    if ok {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::BAD_REQUEST, "invalid_payload")
    }
}

async fn serve(r: Receiver) -> Result<String> {
    let app = Router::new()
        .route("/hook", post(hook))
        .route("/services/T000/B000/slack-secret-part", post(slack))
        .with_state(r);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

// === the notifier under test ===

#[derive(Default)]
struct MemStore {
    saved: Mutex<Option<Vec<u8>>>,
}

impl MemStore {
    fn outbox(&self) -> Option<Outbox> {
        let s = self.saved.lock().unwrap();
        s.as_ref().map(|b| serde_json::from_slice(b).unwrap())
    }
}

/// The notifier's handle on a [`MemStore`] the test keeps reading.
struct Shared(Arc<MemStore>);

impl OutboxStore for Shared {
    fn load(&self) -> futures::future::BoxFuture<'_, Result<Option<Outbox>, String>> {
        Box::pin(async move { Ok(self.0.outbox()) })
    }
    fn save<'a>(&'a self, json: &'a [u8]) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            *self.0.saved.lock().unwrap() = Some(json.to_vec());
            Ok(())
        })
    }
}

fn rule(name: &str, spec: serde_json::Value) -> CompiledRule {
    let mut r = AlertRule::new(name, serde_json::from_value(spec).unwrap());
    r.metadata.namespace = Some("shop".into());
    compile(&r).unwrap()
}

struct Running {
    handle: NotifyHandle,
    tap: NotifyTap,
    metrics: ControllerMetrics,
    stop: CancellationToken,
    _leading: watch::Sender<bool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn start(sinks_yaml: &str, rules: Vec<CompiledRule>, store: Arc<MemStore>) -> Running {
    let sinks = parse_sinks("test sinks", sinks_yaml).unwrap();
    let (lead_tx, leading) = watch::channel(true);
    let metrics = ControllerMetrics::new();
    let (n, handle, tap) = Notifier::new(
        sinks,
        Box::new(Shared(store)),
        RuleSource::Fixed(rules),
        Sender::new("test-instance".into(), "http://127.0.0.1:1/alerts".into()),
        metrics.clone(),
        None,
        leading,
    );
    let stop = CancellationToken::new();
    tokio::spawn(n.run(stop.clone()));
    Running {
        handle,
        tap,
        metrics,
        stop,
        _leading: lead_tx,
    }
}

fn scaled_to_zero(policy: &str) -> Signal {
    Signal::Scaled {
        policy: PolicyId::new("shop", policy),
        from: 2,
        to: 0,
        reason: "conns.active == 0 for 5m".into(),
    }
}

/// Waits until every delivery of every alert is in `state`.
async fn all_deliveries(h: &NotifyHandle, n_alerts: usize, state: DeliveryState) -> Result<()> {
    wait_for("the deliveries", async || {
        let alerts = h.alerts();
        (alerts.len() == n_alerts
            && alerts
                .iter()
                .all(|a| a.deliveries.values().all(|d| d.state == state)))
        .then_some(())
    })
    .await
    .with_context(|| format!("{:#?}", h.alerts()))
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sink_kind_receives_the_alert_from_real_servers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_am, am_url) = start_alertmanager(dir.path()).await?;
    let (_smtp, smtp_port, maildir) = start_smtp(dir.path()).await?;
    let rx = Receiver::default();
    let base = serve(rx.clone()).await?;
    let sinks = format!(
        r#"
sinks:
- {{name: hook, kind: webhook, url: "{base}/hook", hmacKey: "{HMAC_KEY}"}}
- {{name: chat, kind: slack, url: "{base}/services/T000/B000/slack-secret-part"}}
- {{name: am, kind: alertmanager, url: "{am_url}"}}
- name: mail
  kind: smtp
  host: 127.0.0.1
  port: {smtp_port}
  from: nemesis@cluster.test
  to: [oncall@team.test]
  username: {SMTP_USER}
  password: {SMTP_PASSWORD}
"#
    );
    let r = rule(
        "to-zero",
        serde_json::json!({"when": [{"event": "ScaledToZero"}], "groupWait": "1s", "severity": "info"}),
    );
    let n = start(&sinks, vec![r], Arc::default());
    n.tap.send(scaled_to_zero("checkout"));
    all_deliveries(&n.handle, 1, DeliveryState::Delivered).await?;

    // The webhook: signed (checked by the receiver), grouped under the rule, firing.
    let got = rx.all();
    let hooks: Vec<&Received> = got.iter().filter(|g| g.body["version"] == "1").collect();
    assert_eq!(hooks.len(), 1, "{got:#?}");
    assert!(hooks[0].signature_ok);
    let b = &hooks[0].body;
    assert_eq!(b["group"], "shop/to-zero");
    assert_eq!(b["status"], "firing");
    assert_eq!(b["alerts"][0]["labels"]["alertname"], "NemesisScaledToZero");
    assert_eq!(b["alerts"][0]["labels"]["policy"], "checkout");
    assert_eq!(b["alerts"][0]["labels"]["severity"], "info");
    // Slack: one text naming the alert.
    let chat: Vec<&Received> = got.iter().filter(|g| g.body["text"].is_string()).collect();
    assert_eq!(chat.len(), 1);
    let text = chat[0].body["text"].as_str().unwrap();
    assert!(text.contains("[FIRING] info NemesisScaledToZero"), "{text}");
    assert!(
        text.contains("shop/checkout scaled from 2 to zero"),
        "{text}"
    );

    // Alertmanager lists it.
    let listed: serde_json::Value = serde_json::from_str(
        &reqwest::get(format!(
            "{am_url}/api/v2/alerts?filter=alertname%3D%22NemesisScaledToZero%22"
        ))
        .await?
        .text()
        .await?,
    )?;
    let list = listed.as_array().context("Alertmanager's alert list")?;
    assert_eq!(list.len(), 1, "{listed:#}");
    assert_eq!(list[0]["labels"]["policy"], "checkout");
    assert!(
        list[0]["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("scaled from 2 to zero")
    );

    // The mail arrived (through AUTH PLAIN).
    let mail = wait_for("the mail", async || mails(&maildir).into_iter().next()).await?;
    assert!(
        mail.contains("Subject: Nemesis: 1 firing, 0 resolved (shop/to-zero)"),
        "{mail}"
    );
    assert!(mail.contains("To: oncall@team.test"), "{mail}");
    assert!(
        mail.contains("shop/checkout scaled from 2 to zero"),
        "{mail}"
    );

    // Counters and metrics.
    let metrics = n.metrics.render();
    for sink in ["hook", "chat", "am", "mail"] {
        let line = format!(
            "nemesis_controller_alert_deliveries_total{{sink=\"{sink}\",outcome=\"delivered\"}} 1"
        );
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    assert!(metrics.contains("nemesis_controller_alerts_raised_total 1"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_is_retried_with_backoff_and_a_wrong_key_is_refused() -> Result<()> {
    let rx = Receiver::default();
    rx.fail_first.store(2, Ordering::SeqCst);
    let base = serve(rx.clone()).await?;
    let sinks = format!(
        r#"
sinks:
- {{name: hook, kind: webhook, url: "{base}/hook", hmacKey: "{HMAC_KEY}"}}
- {{name: forged, kind: webhook, url: "{base}/hook", hmacKey: "not-the-receivers-key"}}
"#
    );
    let r = rule(
        "to-zero",
        serde_json::json!({"when": [{"event": "ScaledToZero"}], "groupWait": "1s"}),
    );
    let n = start(&sinks, vec![r], Arc::default());
    n.tap.send(scaled_to_zero("checkout"));
    // 503, 503 (1 s, 2 s backoff), then delivered.
    wait_for("the hook delivery", async || {
        let a = n.handle.alerts();
        let d = a.first()?.deliveries.get("hook")?.clone();
        (d.state == DeliveryState::Delivered).then_some(())
    })
    .await?;
    let a = &n.handle.alerts()[0];
    assert_eq!(a.deliveries["hook"].attempts, 3, "{a:#?}");
    // The wrong key keeps failing, with the receiver's answer shown.
    let forged = wait_for("the forged sink's failures", async || {
        let a = n.handle.alerts();
        let d = a.first()?.deliveries.get("forged")?.clone();
        (d.attempts >= 2).then_some(d)
    })
    .await?;
    assert_eq!(forged.state, DeliveryState::Pending);
    assert!(
        forged.last_error.as_deref().unwrap().contains("401"),
        "{forged:?}"
    );
    let got = rx.all();
    assert!(got.iter().any(|g| !g.signature_ok));
    assert_eq!(got.iter().filter(|g| g.signature_ok).count(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_are_deduplicated_and_a_rules_alerts_are_grouped() -> Result<()> {
    let rx = Receiver::default();
    let base = serve(rx.clone()).await?;
    let sinks = format!(
        "sinks:\n- {{name: hook, kind: webhook, url: \"{base}/hook\", hmacKey: \"{HMAC_KEY}\"}}\n"
    );
    let r = rule(
        "to-zero",
        serde_json::json!({"when": [{"event": "ScaledToZero"}], "groupWait": "10s"}),
    );
    let n = start(&sinks, vec![r], Arc::default());
    n.tap.send(scaled_to_zero("checkout"));
    n.tap.send(scaled_to_zero("cart"));
    n.tap.send(scaled_to_zero("checkout"));
    all_deliveries(&n.handle, 2, DeliveryState::Delivered).await?;
    let got = rx.all();
    assert_eq!(got.len(), 1, "one notification for the group: {got:#?}");
    assert_eq!(got[0].body["alerts"].as_array().unwrap().len(), 2);
    let checkout = n
        .handle
        .alerts()
        .into_iter()
        .find(|a| a.labels["policy"] == "checkout")
        .unwrap();
    assert_eq!(checkout.count, 2);
    // Another repeat while firing: counted, not sent.
    n.tap.send(scaled_to_zero("checkout"));
    wait_for("the repeat to be counted", async || {
        n.handle
            .alerts()
            .iter()
            .any(|a| a.labels["policy"] == "checkout" && a.count == 3)
            .then_some(())
    })
    .await?;
    assert_eq!(rx.all().len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_notifications_back_without_dropping_them() -> Result<()> {
    let rx = Receiver::default();
    let base = serve(rx.clone()).await?;
    let sinks = format!(
        "sinks:\n- {{name: hook, kind: webhook, url: \"{base}/hook\", hmacKey: \"{HMAC_KEY}\", rateLimitPerMinute: 1}}\n"
    );
    let rules = vec![
        rule(
            "a",
            serde_json::json!({"when": [{"event": "ScaledToZero"}], "groupWait": "1s"}),
        ),
        rule(
            "b",
            serde_json::json!({"when": [{"event": "ScaledToZero"}], "groupWait": "1s"}),
        ),
    ];
    let n = start(&sinks, rules, Arc::default());
    n.tap.send(scaled_to_zero("checkout"));
    wait_for("one delivery and one held back", async || {
        let sinks = n.handle.sinks();
        let c = &sinks[0].counters;
        (c.delivered == 1 && c.rate_limited >= 1).then_some(())
    })
    .await?;
    let states: Vec<DeliveryState> = n
        .handle
        .alerts()
        .iter()
        .map(|a| a.deliveries["hook"].state)
        .collect();
    assert!(states.contains(&DeliveryState::Delivered));
    assert!(states.contains(&DeliveryState::Pending), "{states:?}");
    assert_eq!(rx.all().len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_saved_before_a_crash_is_delivered_after_restart() -> Result<()> {
    let rx = Receiver::default();
    rx.fail_first.store(usize::MAX / 2, Ordering::SeqCst);
    let base = serve(rx.clone()).await?;
    let sinks = format!(
        "sinks:\n- {{name: hook, kind: webhook, url: \"{base}/hook\", hmacKey: \"{HMAC_KEY}\"}}\n"
    );
    let r = || {
        rule(
            "invalid",
            serde_json::json!({"when": [{"event": "InvalidPolicy"}], "groupWait": "1s"}),
        )
    };
    let store = Arc::new(MemStore::default());
    let first = start(&sinks, vec![r()], store.clone());
    first.tap.send(Signal::PolicyInvalid {
        policy: PolicyId::new("shop", "checkout"),
        message: "spec.maxReplicas: must be at least 1".into(),
    });
    // Saved, tried, refused: then the instance dies.
    wait_for("a failed attempt in the saved outbox", async || {
        let o = store.outbox()?;
        let a = o.alerts.values().next()?;
        (a.deliveries["hook"].attempts >= 1).then_some(())
    })
    .await?;
    drop(first);
    rx.fail_first.store(0, Ordering::SeqCst);
    let second = start(&sinks, vec![r()], store.clone());
    all_deliveries(&second.handle, 1, DeliveryState::Delivered).await?;
    let a = &second.handle.alerts()[0];
    assert_eq!(a.state, AlertState::Firing);
    assert!(a.summary.contains("spec.maxReplicas"), "{a:?}");
    // The policy fixed: resolved and told.
    second.tap.send(Signal::PolicyValid {
        policy: PolicyId::new("shop", "checkout"),
    });
    wait_for("the resolution to be delivered", async || {
        let a = second.handle.alerts();
        let a = a.first()?;
        (a.state == AlertState::Resolved && a.deliveries["hook"].state == DeliveryState::Delivered)
            .then_some(())
    })
    .await?;
    let last = rx.all().last().cloned().unwrap();
    assert_eq!(last.body["status"], "resolved");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_lists_alerts_with_delivery_state_acknowledges_and_hides_sink_secrets() -> Result<()>
{
    use ui_support::{CLIENT, fixture_with, get_json, login, request, send};
    let rx = Receiver::default();
    let base = serve(rx.clone()).await?;
    let sinks = format!(
        r#"
sinks:
- {{name: hook, kind: webhook, url: "{base}/hook", hmacKey: "{HMAC_KEY}"}}
- {{name: chat, kind: slack, url: "{base}/services/T000/B000/slack-secret-part"}}
- {{name: mail, kind: smtp, host: 127.0.0.1, port: 1, from: a@b.test, to: [c@d.test], username: u, password: {SMTP_PASSWORD}}}
"#
    );
    let r = rule(
        "to-zero",
        serde_json::json!({"when": [{"event": "ScaledToZero"}], "groupWait": "1s", "sinks": ["hook", "mail"]}),
    );
    let n = start(&sinks, vec![r], Arc::default());
    let f = fixture_with(UiConfig::default(), Some(n.handle.clone()));
    n.tap.send(scaled_to_zero("checkout"));
    wait_for("the hook delivery and a mail failure", async || {
        let a = n.handle.alerts();
        let a = a.first()?;
        (a.deliveries["hook"].state == DeliveryState::Delivered
            && a.deliveries["mail"].attempts >= 1)
            .then_some(())
    })
    .await?;

    let login = login(&f.router).await;
    let (status, v) = get_json(&f.router, "/api/alerts", &login).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["leading"], true);
    let a = &v["alerts"][0];
    assert_eq!(a["rule"], "shop/to-zero");
    assert_eq!(a["state"], "firing");
    assert_eq!(a["labels"]["alertname"], "NemesisScaledToZero");
    assert_eq!(a["deliveries"]["hook"]["state"], "delivered");
    assert_eq!(a["deliveries"]["mail"]["state"], "pending");
    assert!(
        a["deliveries"]["mail"]["lastError"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:1")
    );
    assert!(a["deliveries"]["mail"]["nextAttemptMs"].as_u64().is_some());
    let id = a["id"].as_str().unwrap().to_string();

    // Acknowledging needs the CSRF token, like every change.
    let ack = |csrf: Option<&str>| {
        let mut b = request("POST", &format!("/api/alerts/{id}/ack"), CLIENT)
            .header("cookie", &login.cookie);
        if let Some(t) = csrf {
            b = b.header("x-csrf-token", t);
        }
        b.body(Body::empty()).unwrap()
    };
    let (resp, _) = send(&f.router, ack(None)).await;
    assert_eq!(resp.status(), 403);
    let (resp, body) = send(&f.router, ack(Some(&login.csrf))).await;
    assert_eq!(resp.status(), 200, "{body}");
    let (_, v) = get_json(&f.router, "/api/alerts", &login).await;
    assert_eq!(v["alerts"][0]["acknowledgedBy"], "admin");
    let missing = request("POST", "/api/alerts/0000000000000000/ack", CLIENT)
        .header("cookie", &login.cookie)
        .header("x-csrf-token", &login.csrf)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&f.router, missing).await.0.status(), 404);
    // Without a session: nothing.
    let anon = request("GET", "/api/alerts", CLIENT)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&f.router, anon).await.0.status(), 401);

    let (status, v) = get_json(&f.router, "/api/sinks", &login).await;
    assert_eq!(status, 200);
    let text = v.to_string();
    for secret in [HMAC_KEY, "slack-secret-part", SMTP_PASSWORD] {
        assert!(!text.contains(secret), "{secret} shown: {text}");
    }
    let names: Vec<&str> = v["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hook", "chat", "mail"]);
    assert_eq!(v["sinks"][0]["kind"], "webhook");
    assert_eq!(v["sinks"][0]["counters"]["delivered"], 1);
    assert!(v["sinks"][2]["counters"]["failed"].as_u64().unwrap() >= 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_report_goes_out_by_webhook_and_by_mail_once_per_firing() -> Result<()> {
    use nemesis_controller::store::{Retention, Store};
    use nemesis_controller::ui::reports::ScheduledReports;
    use nemesis_controller::ui::{PolicyCache, UiSources};

    let dir = tempfile::tempdir()?;
    let (_smtp, smtp_port, maildir) = start_smtp(dir.path()).await?;
    let rx = Receiver::default();
    let base = serve(rx.clone()).await?;
    let store = Arc::new(Store::open(
        dir.path().join("h.redb"),
        Retention::default(),
    )?);
    let now = ui_support::now_ms();
    ui_support::seed(&store, &ui_support::id(), now);
    let (policies, mut feed) = PolicyCache::new();
    feed.upsert(ui_support::policy(ui_support::NS, ui_support::NAME, now));
    let sources = UiSources {
        alert_webhook: false,
        ..UiSources::local(store, policies)
    };
    // Every minute: the first firing after start goes out (none for the past).
    let config = parse_config(
        "test sinks",
        &format!(
            r#"
sinks:
- {{name: hook, kind: webhook, url: "{base}/hook", hmacKey: "{HMAC_KEY}"}}
- {{name: mail, kind: smtp, host: 127.0.0.1, port: {smtp_port}, from: nemesis@cluster.test, to: [team@team.test], username: {SMTP_USER}, password: {SMTP_PASSWORD}}}
reports:
- {{name: weekly, schedule: "* * * * *", window: 7d, namespace: shop, sinks: [hook, mail]}}
"#
        ),
    )?;
    let (lead_tx, leading) = watch::channel(true);
    let store = Arc::new(MemStore::default());
    let (n, handle, _tap) = Notifier::new(
        config.sinks,
        Box::new(Shared(store.clone())),
        RuleSource::Fixed(vec![]),
        Sender::new("test-instance".into(), "http://127.0.0.1:1/alerts".into()),
        ControllerMetrics::new(),
        None,
        leading,
    );
    let n = n.with_reports(config.reports, Arc::new(ScheduledReports(sources)));
    let stop = CancellationToken::new();
    tokio::spawn(n.run(stop.clone()));

    let report = wait_for("the webhook report", async || {
        rx.all().into_iter().find(|g| g.body["kind"] == "report")
    })
    .await?;
    assert!(report.signature_ok);
    let r = &report.body["report"];
    assert_eq!(r["scope"], "namespace");
    assert_eq!(r["services"][0]["name"], "checkout");
    assert_eq!(r["services"][0]["scaling"]["wakes"]["count"], 3);
    assert!(
        report.body["title"]
            .as_str()
            .unwrap()
            .starts_with("Nemesis report weekly: ")
    );
    let mail = wait_for("the mailed report", async || {
        mails(&maildir).into_iter().next()
    })
    .await?;
    assert!(mail.contains("Subject: Nemesis report weekly: "), "{mail}");
    assert!(
        mail.contains("shop/checkout: 3 transitions; 3 wakes"),
        "{mail}"
    );
    assert!(mail.contains("scope,namespace,name,deployment"), "{mail}");
    // Marked sent (for the next leader), once per sink.
    let sent = wait_for("the marks in the outbox", async || {
        let o = store.outbox()?;
        (o.reports_sent.len() == 2).then_some(o.reports_sent)
    })
    .await?;
    assert_eq!(sent["weekly/hook"], sent["weekly/mail"]);
    assert_eq!(sent["weekly/hook"] % 60_000, 0);
    assert_eq!(handle.sinks()[0].counters.delivered, 1);
    // Never the same firing twice.
    let titles: Vec<String> = rx
        .all()
        .iter()
        .filter(|g| g.body["kind"] == "report")
        .map(|g| g.body["title"].to_string())
        .collect();
    let distinct: std::collections::BTreeSet<&String> = titles.iter().collect();
    assert_eq!(distinct.len(), titles.len(), "{titles:?}");
    stop.cancel();
    drop(lead_tx);
    Ok(())
}
