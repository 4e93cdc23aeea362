//! `report_30d_ms`: the time of `GET /api/reports?namespace=..&name=..&window=30d` for one
//! Service with 30 days of history as the controller keeps it (one-minute buckets of its
//! five sampled series after compaction, the last hour raw at 10 s; four transitions and
//! scale events and two cold starts a day), through the UI's router with a session, JSON
//! encoded. Prints the median of several runs as `report_30d_ms=<ms>` for `cargo xtask
//! bench`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail};
use axum::body::Body;
use axum::extract::ConnectInfo;
use http::Request;
use nemesis_controller::metrics::ControllerMetrics;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_controller::policy::crd::{ScalingPolicySpec, TargetRef};
use nemesis_controller::store::{
    ColdStartOutcome, ColdStartRecord, PolicyId, Retention, ScaleRecord, Store, TransitionRecord,
    unix_ms,
};
use nemesis_controller::ui::{
    self, AdminPassword, Directory, PolicyCache, UiConfig, UiSources, UiState,
};
use tower::ServiceExt;

const DAY: u64 = 24 * 3_600_000;
const DAYS: u64 = 30;
const RUNS: usize = 15;
const PASSWORD: &str = "bench-password-0123";
const SERIES: [&str; 5] = [
    "nemesis.replicas",
    "nemesis.replicas.ready",
    "nemesis.replicas.desired",
    "conns.active",
    "conns.rate",
];

fn seed(store: &Store, id: &PolicyId, now: u64) -> Result<()> {
    let start = now - DAYS * DAY;
    // Awake from 08:00 to 20:00 every day (a working-hours service), asleep otherwise.
    let warm = |at: u64| (at % DAY) >= 8 * 3_600_000 && (at % DAY) < 20 * 3_600_000;
    let mut batch = Vec::new();
    let mut at = start;
    while at < now {
        let step = if now - at <= 3_600_000 {
            10_000
        } else {
            60_000
        };
        let w = warm(at);
        let conns = if w {
            5.0 + ((at / 60_000) % 17) as f64
        } else {
            0.0
        };
        let replicas = if w { 3.0 } else { 0.0 };
        for (m, v) in SERIES
            .iter()
            .zip([replicas, replicas, replicas, conns, conns / 10.0])
        {
            batch.push((at, *m, v));
        }
        if batch.len() >= 50_000 {
            store.record_sample_batch(batch.drain(..).map(|(a, m, v)| (a, id, m, v)))?;
        }
        at += step;
    }
    store.record_sample_batch(batch.drain(..).map(|(a, m, v)| (a, id, m, v)))?;
    for d in 0..DAYS {
        let day = start - start % DAY + d * DAY;
        for (at, from, to, fr, tr) in [
            (day + 8 * 3_600_000, "zero", "warm", 0, 3),
            (day + 20 * 3_600_000, "warm", "zero", 3, 0),
        ] {
            if at < start || at >= now {
                continue;
            }
            store.record_transition(&TransitionRecord {
                at_ms: at,
                policy: id.clone(),
                from_state: from.into(),
                to_state: to.into(),
                from_replicas: fr,
                to_replicas: tr,
                reason: "demand".into(),
                metrics: Default::default(),
            })?;
            store.record_scale(&ScaleRecord {
                at_ms: at,
                policy: id.clone(),
                state: to.into(),
                from_replicas: fr,
                to_replicas: tr,
                reason: "demand".into(),
                metrics: Default::default(),
                recovered: false,
            })?;
            if tr > 0 {
                store.record_cold_start(&ColdStartRecord {
                    wake_at_ms: at,
                    policy: id.clone(),
                    time_to_ready_ms: Some(1_500 + (d * 137) % 3_000),
                    held_connections: 4,
                    outcome: ColdStartOutcome::Ready,
                })?;
            }
        }
    }
    let report = store.compact(now)?;
    eprintln!("seeded 30 days: {report:?}");
    Ok(())
}

fn request(method: &str, uri: &str) -> http::request::Builder {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "127.0.0.1:8080");
    let addr: SocketAddr = "127.0.0.1:40000".parse().expect("an address");
    b.extensions_mut()
        .expect("a builder")
        .insert(ConnectInfo(addr));
    b
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let dir = tempfile_dir()?;
    let store = Arc::new(Store::open(dir.join("history.redb"), Retention::default())?);
    let now = unix_ms(SystemTime::now());
    let id = PolicyId::new("shop", "checkout");
    let seeded = Instant::now();
    seed(&store, &id, now)?;
    eprintln!("seeding took {:?}", seeded.elapsed());

    let (cache, mut feed) = PolicyCache::new();
    let mut p = ScalingPolicy::new(
        "checkout",
        ScalingPolicySpec {
            target: TargetRef {
                deployment: Some("checkout".into()),
                service: Some("checkout".into()),
                ..Default::default()
            },
            max_replicas: Some(3),
            ..Default::default()
        },
    );
    p.metadata.namespace = Some("shop".into());
    feed.upsert(p);
    let state = UiState::new(
        UiConfig::default(),
        AdminPassword::from_plaintext(PASSWORD)?,
        Arc::new(Directory::in_memory(ui::DEFAULT_USER)),
        ControllerMetrics::new(),
        UiSources {
            alert_webhook: false,
            ..UiSources::local(store, cache)
        },
    );
    let router = ui::router(state);
    let login = router
        .clone()
        .oneshot(
            request("POST", "/login")
                .header("content-type", "application/json")
                .body(Body::from(
                    serde_json::json!({"username": "admin", "password": PASSWORD}).to_string(),
                ))?,
        )
        .await?;
    let cookie = login
        .headers()
        .get("set-cookie")
        .context("no session cookie")?
        .to_str()?
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();

    let mut ms = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        let resp = router
            .clone()
            .oneshot(
                request(
                    "GET",
                    "/api/reports?namespace=shop&name=checkout&window=30d",
                )
                .header("cookie", &cookie)
                .body(Body::empty())?,
            )
            .await?;
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if !status.is_success() {
            bail!(
                "the report answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let wakes = v["services"][0]["scaling"]["wakes"]["count"].as_u64();
        if wakes.unwrap_or(0) < DAYS - 1 {
            bail!("the report missed the seeded history: {wakes:?} wakes");
        }
    }
    ms.sort_by(f64::total_cmp);
    println!("report_30d_ms={:.2}", ms[RUNS / 2]);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A fresh folder under the system's temp dir (no dev-dependency in a binary).
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "nemesis-bench-report-{}-{}",
        std::process::id(),
        unix_ms(SystemTime::now())
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
