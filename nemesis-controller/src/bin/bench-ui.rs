//! `ui_overview_p99_ms`: the 99th percentile time of the UI's overview API
//! (`GET /api/v1/policies`, what the overview page and the live feed read) with 1,000
//! ScalingPolicies in the cache and 1,000,000 events in the history store (1,000 per
//! Service over 30 days), through the real router with a session, as a browser asks.
//! Also `ui_summary_24h_p99_ms`: the overview page's other call, the 24 h summary report
//! over all of them. Prints `NAME=VALUE` lines for `cargo xtask bench`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use chrono::Utc;
use nemesis_controller::metrics::ControllerMetrics;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_controller::policy::crd::{ScalingPolicySpec, ScalingPolicyStatus, TargetRef};
use nemesis_controller::store::{PolicyId, Retention, Store, TransitionRecord, unix_ms};
use nemesis_controller::ui::{
    self, AdminPassword, Directory, PolicyCache, UiConfig, UiSources, UiState,
};
use tower::ServiceExt;

const SERVICES: usize = 1_000;
const EVENTS: usize = 1_000_000;
const DAYS: u64 = 30;
const RUNS: usize = 300;
const SUMMARY_RUNS: usize = 50;
const PASSWORD: &str = "bench-password-1";

fn policy(i: usize) -> ScalingPolicy {
    let name = format!("svc-{i:04}");
    let mut p = ScalingPolicy::new(
        &name,
        ScalingPolicySpec {
            target: TargetRef {
                deployment: Some(name.clone()),
                service: Some(name.clone()),
                ..Default::default()
            },
            idle_timeout: Some("10m".into()),
            ..Default::default()
        },
    );
    p.metadata.namespace = Some(format!("team-{}", i % 20));
    p.status = Some(ScalingPolicyStatus {
        state: Some(if i.is_multiple_of(3) { "zero" } else { "warm" }.into()),
        state_since: Some(Utc::now()),
        desired_replicas: Some(if i.is_multiple_of(3) { 0 } else { 2 }),
        ..Default::default()
    });
    p
}

fn seed(store: &Store, ids: &[PolicyId], now: u64) -> Result<()> {
    let span = DAYS * 86_400_000;
    let per = EVENTS / ids.len();
    let mut batch = Vec::with_capacity(50_000);
    for (n, id) in ids.iter().enumerate() {
        for k in 0..per {
            let warm = k % 2 == 0;
            batch.push(TransitionRecord {
                at_ms: now - span + (k as u64 * span / per as u64) + n as u64,
                policy: id.clone(),
                from_state: if warm { "zero" } else { "warm" }.into(),
                to_state: if warm { "warm" } else { "zero" }.into(),
                from_replicas: if warm { 0 } else { 2 },
                to_replicas: if warm { 2 } else { 0 },
                reason: if warm { "demand" } else { "idle for 10m" }.into(),
                metrics: BTreeMap::new(),
            });
            if batch.len() == batch.capacity() {
                store.record_transitions(&batch)?;
                batch.clear();
            }
        }
    }
    store.record_transitions(&batch)?;
    store.record_samples(
        now - 2_000,
        ids.iter().flat_map(|id| {
            [
                (id, "nemesis.replicas", 2.0),
                (id, "nemesis.replicas.ready", 2.0),
            ]
        }),
    )?;
    Ok(())
}

fn request(path: &str, cookie: Option<&str>, body: Option<String>) -> http::Request<Body> {
    let mut b = http::Request::builder()
        .method(if body.is_some() { "POST" } else { "GET" })
        .uri(path)
        .header("host", "127.0.0.1:8080");
    if let Some(c) = cookie {
        b = b.header("cookie", c);
    }
    b.extensions_mut()
        .unwrap()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40_000))));
    match body {
        Some(json) => b
            .header("content-type", "application/json")
            .body(Body::from(json))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

async fn p99(router: &Router, path: &str, cookie: &str, runs: usize) -> Result<f64> {
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + 10 {
        let t = Instant::now();
        let resp = router
            .clone()
            .oneshot(request(path, Some(cookie), None))
            .await?;
        ensure!(resp.status() == 200, "{path}: {}", resp.status());
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await?;
        ensure!(bytes.len() > 1_000, "{path}: a suspiciously short answer");
        // The first ten warm the caches, as a page that has been open a while.
        if i >= 10 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    let idx = ((times.len() as f64) * 0.99).ceil() as usize - 1;
    Ok(times[idx.min(times.len() - 1)].as_secs_f64() * 1_000.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let dir = tempfile_dir()?;
    let store = Arc::new(Store::open(dir.join("history.redb"), Retention::default())?);
    let now = unix_ms(SystemTime::now());
    let (cache, mut feed) = PolicyCache::new();
    let policies: Vec<ScalingPolicy> = (0..SERVICES).map(policy).collect();
    let ids: Vec<PolicyId> = policies
        .iter()
        .map(|p| {
            PolicyId::new(
                p.metadata.namespace.clone().unwrap(),
                p.metadata.name.clone().unwrap(),
            )
        })
        .collect();
    for p in policies {
        feed.upsert(p);
    }
    let started = Instant::now();
    seed(&store, &ids, now)?;
    eprintln!(
        "seeded {EVENTS} events for {SERVICES} Services in {:?}",
        started.elapsed()
    );
    let state = UiState::new(
        UiConfig::default(),
        AdminPassword::from_plaintext(PASSWORD)?,
        Arc::new(Directory::in_memory(ui::DEFAULT_USER)),
        ControllerMetrics::new(),
        UiSources::local(store, cache),
    );
    let router = ui::router(state);
    let resp = router
        .clone()
        .oneshot(request(
            "/login",
            None,
            Some(format!(r#"{{"username":"admin","password":"{PASSWORD}"}}"#)),
        ))
        .await?;
    ensure!(resp.status() == 200, "login: {}", resp.status());
    let cookie = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("nemesis_session="))
        .and_then(|c| c.split(';').next())
        .context("no session cookie")?
        .to_string();
    let overview = p99(&router, "/api/v1/policies", &cookie, RUNS).await?;
    println!("ui_overview_p99_ms={overview:.2}");
    let summary = p99(
        &router,
        "/api/v1/reports/summary?window=24h",
        &cookie,
        SUMMARY_RUNS,
    )
    .await?;
    println!("ui_summary_24h_p99_ms={summary:.2}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// A fresh directory under the system's temp dir (no tempfile crate outside tests).
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("nemesis-bench-ui-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
