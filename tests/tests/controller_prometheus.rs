//! A PromQL-driven policy with a real Prometheus (Debian's `/usr/bin/prometheus`)
//! scraping a gauge this test serves on loopback: the range state follows the query as
//! the HPA formula does, up when the gauge rises and back down when it falls.

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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let value = value.clone();
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
                let v = f64::from_bits(value.load(Ordering::SeqCst));
                let body = format!("# TYPE {GAUGE} gauge\n{GAUGE}{{queue=\"jobs\"}} {v}\n");
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

    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("worker", 1))
        .await?;
    let log = ReplicaLog::start(deployments.clone(), "worker");
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
