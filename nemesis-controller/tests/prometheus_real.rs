//! The PromQL client against a real Prometheus (Debian's `/usr/bin/prometheus`) that
//! scrapes a gauge this test serves on loopback, and against dead or silent servers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::routing::get;
use nemesis_controller::prometheus::{PromClient, PromError};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const GAUGE: &str = "nemesis_test_queue_depth";

/// Kills (SIGKILL) and reaps the child when dropped, so a failing test leaves nothing.
struct ChildGuard {
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Serves `GAUGE` with the value in `value` (f64 bits) at `/metrics`.
async fn serve_exporter(value: Arc<AtomicU64>) -> Result<std::net::SocketAddr> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let v = f64::from_bits(value.load(Ordering::SeqCst));
            async move { format!("# TYPE {GAUGE} gauge\n{GAUGE}{{queue=\"jobs\"}} {v}\n") }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// Starts Prometheus on a free loopback port, scraping `target` every second, and waits
/// until it is ready.
async fn start_prometheus(
    dir: &Path,
    target: std::net::SocketAddr,
) -> Result<(ChildGuard, String)> {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n- job_name: exporter\n  static_configs:\n  - targets: ['{target}']\n"
        ),
    )?;
    let port = free_port()?;
    let log = dir.join("prometheus.log");
    let child = Command::new(PROMETHEUS)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {PROMETHEUS} (Debian package `prometheus`)"))?;
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
            bail!("prometheus exited with {status}:\n{}", guard.log_tail());
        }
        if Instant::now() > deadline {
            bail!("prometheus not ready after 30 s:\n{}", guard.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `query` until it returns `want` (Prometheus sees a change after its next scrape).
async fn wait_for_value(client: &PromClient, query: &str, want: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        match client.query(query).await {
            Ok(v) if v == want => return Ok(()),
            other => last = Some(other),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("`{query}` never returned {want}; last answer: {last:?}")
}

#[tokio::test]
async fn queries_against_a_real_prometheus_follow_a_changing_gauge() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let value = Arc::new(AtomicU64::new(3.0f64.to_bits()));
    let exporter = serve_exporter(value.clone()).await?;
    let (_prom, url) = start_prometheus(dir.path(), exporter).await?;
    let client = PromClient::new(&url, Duration::from_secs(5))?;

    wait_for_value(&client, GAUGE, 3.0).await?;
    value.store(42.0f64.to_bits(), Ordering::SeqCst);
    wait_for_value(&client, GAUGE, 42.0).await?;
    assert_eq!(client.query(&format!("sum({GAUGE}) * 2")).await?, 84.0);
    assert_eq!(client.query("scalar(vector(1.5))").await?, 1.5);
    value.store(0.5f64.to_bits(), Ordering::SeqCst);
    wait_for_value(&client, &format!("max({GAUGE})"), 0.5).await?;
    Ok(())
}

#[tokio::test]
async fn a_real_prometheus_reports_bad_promql_and_results_that_are_not_one_number() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exporter = serve_exporter(Arc::new(AtomicU64::new(1.0f64.to_bits()))).await?;
    let (_prom, url) = start_prometheus(dir.path(), exporter).await?;
    let client = PromClient::new(&url, Duration::from_secs(5))?;
    wait_for_value(&client, GAUGE, 1.0).await?;

    let err = client.query("sum(rate(").await.unwrap_err();
    assert!(matches!(err, PromError::Rejected { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("bad_data") && msg.contains("parse error"),
        "{msg}"
    );
    assert!(
        msg.contains("sum(rate("),
        "the message names the query: {msg}"
    );

    let err = client
        .query("nemesis_test_never_exported")
        .await
        .unwrap_err();
    assert!(matches!(err, PromError::EmptyResult { .. }), "{err:?}");

    // The gauge and Prometheus' own `up` series: two series.
    let err = client
        .query(&format!("{{__name__=~\"{GAUGE}|up\"}}"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PromError::MultipleSeries { count: 2, .. }),
        "{err:?}"
    );

    let err = client.query(&format!("{GAUGE}[1m]")).await.unwrap_err();
    assert!(matches!(err, PromError::NotScalar { .. }), "{err:?}");

    let err = client.query("vector(0) / 0").await.unwrap_err();
    assert!(matches!(err, PromError::NotANumber { .. }), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn a_stopped_prometheus_is_reported_unreachable_with_its_url() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exporter = serve_exporter(Arc::new(AtomicU64::new(7.0f64.to_bits()))).await?;
    let (mut prom, url) = start_prometheus(dir.path(), exporter).await?;
    let client = PromClient::new(&url, Duration::from_secs(5))?;
    wait_for_value(&client, GAUGE, 7.0).await?;

    prom.stop();
    let started = Instant::now();
    let err = client.query(GAUGE).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a refused connect is immediate"
    );
    assert!(matches!(err, PromError::Refused { .. }), "{err:?}");
    assert_eq!(
        err.failure(),
        nemesis_controller::prometheus::PromFailure::Refused
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("Prometheus at {url} unreachable")),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("connection refused"), "{msg}");
    Ok(())
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_at_the_configured_timeout() -> Result<()> {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let client = PromClient::new(&format!("http://{addr}"), Duration::from_millis(300))?;
    let started = Instant::now();
    let err = client.query("up").await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, PromError::Timeout { .. }), "{err:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(
        err.to_string().contains("did not answer within 300ms"),
        "{err}"
    );
    holder.abort();
    Ok(())
}
