//! The Alertmanager webhook receiver fed by a real Alertmanager (Debian's
//! `/usr/bin/prometheus-alertmanager`) on loopback, plus its own refusals via `oneshot`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use chrono::{SecondsFormat, Utc};
use http::{StatusCode, header};
use http_body_util::BodyExt;
use nemesis_controller::alerts::{
    ALERTMANAGER_PATH, AlertApi, AlertBook, FiringAlerts, alert_routes,
};
use nemesis_controller::auth::BearerToken;
use tokio::sync::watch;
use tower::ServiceExt;

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";
const TOKEN: &str = "alertmanager-token-for-tests";

struct ChildGuard {
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
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

/// Serves the receiver on loopback; records the status of every answer it gives.
async fn serve_receiver(book: Arc<AlertBook>) -> Result<(String, Arc<Mutex<Vec<StatusCode>>>)> {
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let seen = statuses.clone();
    let app = alert_routes(AlertApi {
        book,
        token: BearerToken::from_value(TOKEN)?,
    })
    .layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let seen = seen.clone();
            async move {
                let resp = next.run(req).await;
                seen.lock().unwrap().push(resp.status());
                resp
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}{ALERTMANAGER_PATH}"), statuses))
}

/// Starts Alertmanager (no clustering) on a free loopback port, sending every alert to
/// `webhook` with `token` as a Bearer token after 1 s of grouping.
async fn start_alertmanager(
    dir: &Path,
    webhook: &str,
    token: &str,
) -> Result<(ChildGuard, String)> {
    let auth = format!("authorization:\n        type: Bearer\n        credentials: {token}\n");
    start_alertmanager_with(dir, webhook, &auth).await
}

/// As [`start_alertmanager`], with `auth` (YAML under the webhook's `http_config`,
/// indented by 6) for credentials.
async fn start_alertmanager_with(
    dir: &Path,
    webhook: &str,
    auth: &str,
) -> Result<(ChildGuard, String)> {
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        format!(
            "route:\n  receiver: nemesis\n  group_by: ['alertname']\n  group_wait: 1s\n  \
             group_interval: 1s\n  repeat_interval: 1h\n\
             receivers:\n- name: nemesis\n  webhook_configs:\n  - url: {webhook}\n    \
             send_resolved: true\n    http_config:\n      {auth}"
        ),
    )?;
    let port = free_port()?;
    let log = dir.join("alertmanager.log");
    let child = Command::new(ALERTMANAGER)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| {
            format!("starting {ALERTMANAGER} (Debian package `prometheus-alertmanager`)")
        })?;
    let mut guard = ChildGuard { child, log };
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{url}/-/ready")).send().await
            && r.status().is_success()
        {
            return Ok((guard, url));
        }
        if let Some(status) = guard.child.try_wait()? {
            bail!("alertmanager exited with {status}:\n{}", guard.log_tail());
        }
        if Instant::now() > deadline {
            bail!("alertmanager not ready after 30 s:\n{}", guard.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Posts one alert to Alertmanager's API (v2), as Prometheus would.
async fn post_alert(am: &str, name: &str, ends_in: Option<chrono::Duration>) -> Result<()> {
    let now = Utc::now();
    let mut alert = serde_json::json!({
        "labels": { "alertname": name, "severity": "warning" },
        "annotations": { "summary": "test" },
        "startsAt": (now - chrono::Duration::seconds(1)).to_rfc3339_opts(SecondsFormat::Millis, true),
    });
    if let Some(d) = ends_in {
        alert["endsAt"] = (now + d)
            .to_rfc3339_opts(SecondsFormat::Millis, true)
            .into();
    }
    let resp = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?
        .post(format!("{am}/api/v2/alerts"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&serde_json::json!([alert]))?)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!(
            "alertmanager refused the alert: {} {}",
            resp.status(),
            resp.text().await?
        );
    }
    Ok(())
}

async fn wait_until(
    rx: &mut watch::Receiver<FiringAlerts>,
    what: &str,
    pred: impl Fn(&FiringAlerts) -> bool,
) -> Result<()> {
    let waited = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|f| pred(f)))
        .await
        .map(|r| r.map(|_| ()));
    match waited {
        Ok(r) => r.with_context(|| format!("waiting for {what}"))?,
        Err(_) => bail!(
            "timed out waiting for {what}; firing now: {:?}",
            *rx.borrow()
        ),
    }
    Ok(())
}

#[tokio::test]
async fn alerts_from_a_real_alertmanager_fire_and_resolve() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let book = Arc::new(AlertBook::new());
    let mut rx = book.subscribe();
    let (webhook, statuses) = serve_receiver(book.clone()).await?;
    let (_am, am) = start_alertmanager(dir.path(), &webhook, TOKEN).await?;

    // Resolved by posting it again with an end in the past.
    post_alert(&am, "GPUPressure", None).await?;
    wait_until(&mut rx, "GPUPressure firing", |f| {
        f.contains_key("GPUPressure")
    })
    .await?;
    let since = book.firing()["GPUPressure"].since;
    assert!(
        Utc::now() - since < chrono::Duration::seconds(60),
        "since = {since}"
    );
    post_alert(&am, "GPUPressure", Some(chrono::Duration::seconds(-1))).await?;
    wait_until(&mut rx, "GPUPressure resolved", |f| {
        !f.contains_key("GPUPressure")
    })
    .await?;

    // Resolved by its endsAt passing, with nobody posting again.
    post_alert(&am, "QueueBacklog", Some(chrono::Duration::seconds(4))).await?;
    wait_until(&mut rx, "QueueBacklog firing", |f| {
        f.contains_key("QueueBacklog")
    })
    .await?;
    wait_until(&mut rx, "QueueBacklog resolved at endsAt", |f| f.is_empty()).await?;

    let statuses = statuses.lock().unwrap().clone();
    assert!(
        !statuses.is_empty() && statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    Ok(())
}

/// Alertmanager's `basic_auth` (the token as the password file's content) is taken too.
#[tokio::test]
async fn a_real_alertmanager_with_basic_auth_fires() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let book = Arc::new(AlertBook::new());
    let mut rx = book.subscribe();
    let (webhook, statuses) = serve_receiver(book.clone()).await?;
    let password = dir.path().join("am-password");
    std::fs::write(&password, TOKEN)?;
    let auth = format!(
        "basic_auth:\n        username: alertmanager\n        password_file: {}\n",
        password.display()
    );
    let (_am, am) = start_alertmanager_with(dir.path(), &webhook, &auth).await?;
    post_alert(&am, "GPUPressure", None).await?;
    wait_until(&mut rx, "GPUPressure firing", |f| {
        f.contains_key("GPUPressure")
    })
    .await?;
    let statuses = statuses.lock().unwrap().clone();
    assert!(
        !statuses.is_empty() && statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    Ok(())
}

/// A wrong password in `basic_auth` is refused like a wrong Bearer token.
#[tokio::test]
async fn a_real_alertmanager_with_a_wrong_basic_password_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let book = Arc::new(AlertBook::new());
    let (webhook, statuses) = serve_receiver(book.clone()).await?;
    let auth = "basic_auth:\n        username: alertmanager\n        password: nope\n";
    let (_am, am) = start_alertmanager_with(dir.path(), &webhook, auth).await?;
    post_alert(&am, "GPUPressure", None).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while statuses.lock().unwrap().is_empty() {
        if Instant::now() > deadline {
            bail!("alertmanager never called the receiver");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        statuses
            .lock()
            .unwrap()
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED)
    );
    assert!(book.firing().is_empty());
    Ok(())
}

#[tokio::test]
async fn a_real_alertmanager_with_the_wrong_token_is_refused_and_fires_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let book = Arc::new(AlertBook::new());
    let (webhook, statuses) = serve_receiver(book.clone()).await?;
    let (_am, am) = start_alertmanager(dir.path(), &webhook, "not-the-token").await?;
    post_alert(&am, "GPUPressure", None).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while statuses.lock().unwrap().is_empty() {
        if Instant::now() > deadline {
            bail!("alertmanager never called the receiver");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        statuses
            .lock()
            .unwrap()
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED)
    );
    assert!(book.firing().is_empty());
    Ok(())
}

// === oneshot: refusals ===

fn app(book: Arc<AlertBook>) -> Router {
    alert_routes(AlertApi {
        book,
        token: BearerToken::from_value(TOKEN).unwrap(),
    })
}

async fn call(app: Router, token: Option<&str>, body: &str) -> (StatusCode, serde_json::Value) {
    let mut req = Request::post(ALERTMANAGER_PATH).header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = app
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

const FIRING: &str = r#"{"version":"4","status":"firing","receiver":"r","groupKey":"g",
  "alerts":[{"status":"firing","labels":{"alertname":"A"},"startsAt":"2030-01-01T00:00:00Z",
  "endsAt":"0001-01-01T00:00:00Z","fingerprint":"f1"}]}"#;

#[tokio::test]
async fn webhooks_without_the_token_are_401_and_change_nothing() {
    let book = Arc::new(AlertBook::new());
    let (status, v) = call(app(book.clone()), None, FIRING).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(v["error"].as_str().unwrap().contains("Authorization"));
    let (status, _) = call(app(book.clone()), Some("nope"), FIRING).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(book.firing().is_empty());
    let (status, v) = call(app(book.clone()), Some(TOKEN), FIRING).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["firing"], 1);
    assert!(book.firing().contains_key("A"));
}

#[tokio::test]
async fn other_payload_versions_and_garbled_bodies_get_clear_errors() {
    let book = Arc::new(AlertBook::new());
    let (status, v) = call(
        app(book.clone()),
        Some(TOKEN),
        &FIRING.replace("\"4\"", "\"3\""),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        v["error"].as_str().unwrap().contains("version \"3\""),
        "{v}"
    );
    let (status, v) = call(app(book.clone()), Some(TOKEN), "{\"version\":").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("Alertmanager webhook"),
        "{v}"
    );
    let (status, v) = call(
        app(book.clone()),
        Some(TOKEN),
        &FIRING.replace("2030-01-01T00:00:00Z", "yesterday"),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        v["error"].as_str().unwrap().contains("alerts[0].startsAt"),
        "{v}"
    );
    assert!(book.firing().is_empty());
}
