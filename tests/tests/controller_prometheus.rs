//! A PromQL-driven policy with a real Prometheus (Debian's `/usr/bin/prometheus`)
//! scraping a gauge this test serves on loopback: the range state follows the query as
//! the HPA formula does, up when the gauge rises and back down when it falls. Reports
//! with a real Prometheus scraping cAdvisor-named series of known values: the measured
//! CPU core-hours and memory GiB-hours, the policy's `spec.reports` series; and a dead or
//! garbage-answering Prometheus gives a note in the report, not a failure.

mod controller_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use controller_support::*;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::PostParams;
use nemesis_controller::policy::{ScalingPolicy, compile};
use nemesis_controller::store::PolicyId;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const GAUGE: &str = "nemesis_test_queue_depth";

/// Serves `GAUGE` with the value in `value` (f64 bits) at any path, one response per
/// connection.
async fn serve_exporter(value: Arc<AtomicU64>) -> anyhow::Result<std::net::SocketAddr> {
    serve_text(Arc::new(move || {
        let v = f64::from_bits(value.load(Ordering::SeqCst));
        format!("# TYPE {GAUGE} gauge\n{GAUGE}{{queue=\"jobs\"}} {v}\n")
    }))
    .await
}

/// Serves what `body` gives at any path (200, Prometheus' text format), one response
/// per connection.
async fn serve_text(
    body: Arc<dyn Fn() -> String + Send + Sync>,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = 0;
                while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                    if got == buf.len() {
                        return;
                    }
                }
                let body = body();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promql_policy_with_a_real_prometheus_scales_up_and_back_down() -> anyhow::Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let gauge = Arc::new(AtomicU64::new(0f64.to_bits()));
    let exporter = serve_exporter(gauge.clone()).await?;
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n- job_name: exporter\n  static_configs:\n  - targets: ['{exporter}']\n"
        ),
    )?;
    let port = free_port()?;
    let (_prom, prom) = start_monitoring_process(
        PROMETHEUS,
        "prometheus",
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ],
        dir.path(),
        "prometheus",
        port,
    )
    .await?;

    let OneDeployment {
        server,
        client: _,
        deployments,
        policies,
        log,
    } = OneDeployment::start("worker", 1).await?;
    let url = format!("http://{prom}");
    let ctl_dir = tempfile::tempdir()?;
    let c = start_controller(&server, ctl_dir.path(), &["--prometheus-url", &url]).await?;
    wait_leading(&c, Duration::from_secs(10)).await?;

    let p = policy(
        "worker",
        json!({
            "target": {"deployment": "worker"},
            "metrics": {"prometheus": [{
                "name": "queue",
                "query": format!("sum({GAUGE}) or vector(0)"),
                "interval": "1s",
                "timeout": "1s",
            }]},
            "initialState": "busy",
            "states": [{
                "name": "busy",
                "range": {
                    "min": 1, "max": 4, "metric": "queue", "target": 10,
                    "targetType": "AverageValue",
                    "scaleUp": {"maxStep": 4, "period": "1s"},
                    "scaleDown": {"maxStep": 4, "period": "1s"},
                },
            }],
        }),
    );
    compile(&p.spec).map_err(|e| anyhow::anyhow!("{e}"))?;
    policies.create(&PostParams::default(), &p).await?;
    wait_state(&policies, "worker", "busy", Duration::from_secs(10)).await?;

    // 35 queued jobs at 10 per replica: 4 replicas.
    gauge.store(35f64.to_bits(), Ordering::SeqCst);
    wait_replicas(&deployments, "worker", 4, Duration::from_secs(30)).await?;
    let status = policies.get("worker").await?.status.unwrap();
    let queue = status.metrics.iter().find(|m| m.name == "queue");
    assert!(
        queue.is_some(),
        "the status shows the query's value: {status:?}"
    );
    // The queue drains: back to 1.
    gauge.store(5f64.to_bits(), Ordering::SeqCst);
    wait_replicas(&deployments, "worker", 1, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(log.seen(), vec![1, 4, 1]);

    let id = PolicyId::new("default", "worker");
    let scales: Vec<(i32, i32)> = c
        .store
        .scale_events(&id, 0..u64::MAX)?
        .iter()
        .map(|s| (s.from_replicas, s.to_replicas))
        .collect();
    assert_eq!(scales, vec![(1, 4), (4, 1)]);
    let up = &c.store.scale_events(&id, 0..u64::MAX)?[0];
    assert!(up.reason.contains("queue=35"), "{}", up.reason);
    assert_eq!(up.metrics.get("queue"), Some(&35.0));
    c.shutdown().await;
    Ok(())
}

const REPORT_PASSWORD: &str = "reports-admin-password";

/// A controller with the UI (and `extra` flags) and a logged-in admin session, with the
/// Deployment `worker` and its policy `spec`.
async fn report_controller(
    server: &TestApiServer,
    dir: &std::path::Path,
    extra: &[&str],
    spec: serde_json::Value,
) -> anyhow::Result<(
    nemesis_controller::app::Running,
    nemesis_tests::ui_client::Session,
)> {
    let client = server.client().await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    if deployments.get_opt("worker").await?.is_none() {
        deployments
            .create(&PostParams::default(), &deployment("worker", 1))
            .await?;
        let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), "default");
        policies
            .create(&PostParams::default(), &policy("worker", spec))
            .await?;
    }
    let pw = dir.join("ui-password");
    std::fs::write(&pw, REPORT_PASSWORD)?;
    let pw = pw.display().to_string();
    let mut args = vec!["--ui-password-file", pw.as_str()];
    args.extend_from_slice(extra);
    let c = start_controller(server, dir, &args).await?;
    let session = nemesis_tests::ui_client::login(c.api_addr, "admin", REPORT_PASSWORD).await?;
    Ok((c, session))
}

/// The report of `worker` once the UI's policy cache has it.
async fn worker_report(
    session: &nemesis_tests::ui_client::Session,
    query: &str,
) -> anyhow::Result<serde_json::Value> {
    let path = format!("/api/reports?scope=service&namespace=default&name=worker&{query}");
    nemesis_tests::wait::eventually_every(
        Duration::from_millis(250),
        "the worker's report",
        Duration::from_secs(60),
        || async {
            let (status, v) = session.get(&path).await?;
            match status {
                200 => Ok(Some(v)),
                404 => Ok(None),
                _ => anyhow::bail!("the report: {status} {v}"),
            }
        },
    )
    .await
}

fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .expect("a valid time")
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn close(v: &serde_json::Value, want: f64, tolerance: f64, what: &str) {
    let got = v.as_f64().unwrap_or(f64::NAN);
    assert!(
        (got - want).abs() <= want.abs() * tolerance,
        "{what}: {got} is not {want} ± {:.0}%",
        tolerance * 100.0
    );
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_measures_cpu_and_memory_and_charts_the_policys_queries_from_prometheus()
-> anyhow::Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    // cAdvisor's series for one pod of `worker` (half a core, 2 GiB), and series the
    // default queries must leave out: the pause container, the pod-level cgroup, a
    // Deployment whose name starts with `worker-`, another namespace. Each of those is
    // far larger, so counting any of them would show.
    let started = std::time::Instant::now();
    let exporter = serve_text(Arc::new(move || {
        let t = started.elapsed().as_secs_f64();
        let cpu = |labels: &str, cores: f64| {
            format!(
                "container_cpu_usage_seconds_total{{{labels}}} {}\n",
                1000.0 + cores * t
            )
        };
        let mem = |labels: &str, bytes: f64| {
            format!("container_memory_working_set_bytes{{{labels}}} {bytes}\n")
        };
        let pod = r#"namespace="default",pod="worker-5d8f7c9b4-x2x7q""#;
        let gib = 1024.0 * 1024.0 * 1024.0;
        let mut out = String::from("# TYPE container_cpu_usage_seconds_total counter\n");
        for (labels, cores) in [
            (format!(r#"{pod},container="app""#), 0.5),
            (format!(r#"{pod},container="POD""#), 50.0),
            (format!(r#"{pod},container="""#), 50.0),
            (
                r#"namespace="default",pod="worker-api-5d8f7c9b4-x2x7q",container="app""#.into(),
                50.0,
            ),
            (
                r#"namespace="other",pod="worker-5d8f7c9b4-x2x7q",container="app""#.into(),
                50.0,
            ),
        ] {
            out.push_str(&cpu(&labels, cores));
        }
        out.push_str("# TYPE container_memory_working_set_bytes gauge\n");
        for (labels, bytes) in [
            (format!(r#"{pod},container="app""#), 2.0 * gib),
            (format!(r#"{pod},container="POD""#), 100.0 * gib),
            (format!(r#"{pod},container="""#), 100.0 * gib),
            (
                r#"namespace="other",pod="worker-5d8f7c9b4-x2x7q",container="app""#.into(),
                100.0 * gib,
            ),
        ] {
            out.push_str(&mem(&labels, bytes));
        }
        out.push_str("# TYPE nemesis_test_latency_seconds gauge\n");
        out.push_str("nemesis_test_latency_seconds{namespace=\"default\"} 0.25\n");
        out.push_str("# TYPE nemesis_test_errors_total counter\n");
        out.push_str(&format!(
            "nemesis_test_errors_total{{namespace=\"default\"}} {}\n",
            2.0 * t
        ));
        out
    }))
    .await?;
    let (_prom, prom) = start_prometheus(dir.path(), exporter).await?;
    let url = format!("http://{prom}");

    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let ctl_dir = tempfile::tempdir()?;
    let (c, session) = report_controller(
        &server,
        ctl_dir.path(),
        &["--prometheus-url", &url],
        json!({
            "target": {"deployment": "worker"},
            "minReplicas": 1,
            "maxReplicas": 1,
            "reports": {
                "latency": "max(nemesis_test_latency_seconds{namespace=\"$namespace\"})",
                "errorRate": "sum(irate(nemesis_test_errors_total{namespace=\"$namespace\"}[10s]))",
            },
        }),
    )
    .await?;

    // From the first second Prometheus has a rate, a minute (the shortest report).
    let prom_client =
        nemesis_controller::prometheus::PromClient::new(&url, Duration::from_secs(5))?;
    eventually(
        "a CPU rate in Prometheus",
        Duration::from_secs(60),
        || async {
            Ok(prom_client
                .query("sum(rate(container_cpu_usage_seconds_total[1m]))")
                .await
                .ok())
        },
    )
    .await?;
    let from = (now_ms() / 1000 + 1) * 1000;
    let to = from + 60_000;
    while now_ms() < to + 2_000 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let query = format!("from={}&to={}", rfc3339(from), rfc3339(to));
    let v = worker_report(&session, &query).await?;
    let s = &v["services"][0];
    let m = &s["resources"]["measured"];
    assert!(m["notes"].is_null(), "no note when all went well: {m:#}");
    // Half a core for a minute; 2 GiB for a minute.
    close(&m["cpuCoreHours"], 0.5 / 60.0, 0.05, "CPU core-hours");
    close(&m["memoryGibHours"], 2.0 / 60.0, 0.05, "memory GiB-hours");
    assert!(
        s["resources"]["used"]["cpuCoreHours"].is_number(),
        "the request-based figures stay beside: {s:#}"
    );
    close(
        &v["totals"]["measured"]["cpuCoreHours"],
        0.5 / 60.0,
        0.05,
        "total",
    );
    // The policy's own series, over the window.
    let latency = &s["performance"]["latency"];
    close(&latency["avg"], 0.25, 0.01, "latency");
    assert!(
        latency["points"].as_array().unwrap().len() >= 30,
        "{latency:#}"
    );
    close(
        &s["performance"]["errorRate"]["avg"],
        2.0,
        0.05,
        "error rate",
    );
    assert!(s["notes"].is_null(), "{s:#}");

    let (status, csv) = session
        .get(&format!(
            "/api/reports?scope=service&namespace=default&name=worker&{query}&format=csv"
        ))
        .await?;
    assert_eq!(status, 200);
    let csv = csv.as_str().unwrap_or_default().to_string();
    let header: Vec<&str> = csv.lines().next().unwrap_or_default().split(',').collect();
    let row: Vec<&str> = csv.lines().nth(1).unwrap_or_default().split(',').collect();
    let col = |name: &str| {
        let i = header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("a {name} column: {csv}"));
        row[i]
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("{name} is a number: {csv}"))
    };
    assert!((col("latency_avg") - 0.25).abs() < 0.01, "{csv}");
    assert!(
        (col("measured_cpu_core_hours") - 0.5 / 60.0).abs() < 0.001,
        "{csv}"
    );
    let (status, html) = session
        .get(&format!(
            "/api/reports?scope=service&namespace=default&name=worker&{query}&format=html"
        ))
        .await?;
    assert_eq!(status, 200);
    let html = html.as_str().unwrap_or_default();
    assert!(html.contains("Measured by Prometheus"), "{html}");
    assert!(html.contains("latency"), "{html}");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_garbage_answering_prometheus_gives_a_note_in_the_report_not_a_failure()
-> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let spec = json!({
        "target": {"deployment": "worker"},
        "minReplicas": 1,
        "maxReplicas": 1,
        "reports": {"latency": "max(nemesis_test_latency_seconds)"},
    });
    // Nothing listens on this port: connection refused.
    let dead = format!("http://127.0.0.1:{}", free_port()?);
    let garbage = serve_text(Arc::new(|| "this is not the query API\n".to_string())).await?;
    let garbage = format!("http://{garbage}");
    for (url, says) in [
        (dead.as_str(), "unreachable"),
        (garbage.as_str(), "is not the query API's JSON"),
    ] {
        let ctl_dir = tempfile::tempdir()?;
        let (c, session) = report_controller(
            &server,
            ctl_dir.path(),
            &["--prometheus-url", url],
            spec.clone(),
        )
        .await?;
        let v = worker_report(&session, "window=1h").await?;
        let s = &v["services"][0];
        let m = &s["resources"]["measured"];
        assert!(m["cpuCoreHours"].is_null(), "{url}: {m:#}");
        assert!(m["memoryGibHours"].is_null(), "{url}: {m:#}");
        let notes = m["notes"].to_string();
        assert!(
            notes.contains("CPU usage from Prometheus unavailable"),
            "{url}: {notes}"
        );
        assert!(notes.contains(says), "{url}: {notes}");
        let notes = s["notes"].to_string();
        assert!(
            notes.contains("the latency series (spec.reports)"),
            "{url}: {notes}"
        );
        // The rest of the report is there.
        assert!(s["resources"]["atMax"]["replicaHours"].is_number(), "{s:#}");
        let (status, html) = session
            .get("/api/reports?scope=service&namespace=default&name=worker&window=1h&format=html")
            .await?;
        assert_eq!(status, 200, "{url}: {html}");
        assert!(
            html.as_str()
                .unwrap_or_default()
                .contains("usage from Prometheus unavailable")
        );
        c.shutdown().await;
    }
    Ok(())
}
