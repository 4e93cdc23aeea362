//! A real Alertmanager (Debian's `/usr/bin/prometheus-alertmanager`) posts its webhook to
//! the controller's API listener: the firing alert makes an `alert(...)` transition fire
//! and the Deployment scales; the resolved alert brings it back.

mod controller_support;

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use controller_support::*;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::PostParams;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_controller::store::PolicyId;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::json;

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

/// Posts one alert to Alertmanager's API (v2), as Prometheus would; `ends_in` in the
/// past resolves it.
async fn post_alert(
    am: std::net::SocketAddr,
    name: &str,
    ends_in: chrono::Duration,
) -> anyhow::Result<()> {
    let now = Utc::now();
    let alert = json!([{
        "labels": {"alertname": name, "severity": "warning"},
        "annotations": {"summary": "test"},
        "startsAt": (now - chrono::Duration::seconds(30)).to_rfc3339_opts(SecondsFormat::Millis, true),
        "endsAt": (now + ends_in).to_rfc3339_opts(SecondsFormat::Millis, true),
    }]);
    let (status, body) = Http::default()
        .post(am, "/api/v2/alerts", "unused", &alert)
        .await?;
    anyhow::ensure!(
        status == 200,
        "alertmanager refused the alert: {status} {body}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_from_a_real_alertmanager_fires_its_transition_and_its_resolution_undoes_it()
-> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("gpu", 1))
        .await?;
    let ctl_dir = tempfile::tempdir()?;
    let c = start_controller(&server, ctl_dir.path(), &[]).await?;
    wait_leading(&c, Duration::from_secs(10)).await?;

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("alertmanager.yml");
    std::fs::write(
        &config,
        format!(
            "route:\n  receiver: nemesis\n  group_by: ['alertname']\n  group_wait: 1s\n  \
             group_interval: 1s\n  repeat_interval: 1h\n\
             receivers:\n- name: nemesis\n  webhook_configs:\n  \
             - url: http://{}/v1/alerts/alertmanager\n    send_resolved: true\n    \
             http_config:\n      authorization:\n        type: Bearer\n        \
             credentials: {ALERT_TOKEN}\n",
            c.api_addr
        ),
    )?;
    let port = free_port()?;
    let (_am, am) = start_monitoring_process(
        ALERTMANAGER,
        "prometheus-alertmanager",
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.path={}", dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--cluster.listen-address=".to_string(),
        ],
        dir.path(),
        "alertmanager",
        port,
    )
    .await?;

    policies
        .create(
            &PostParams::default(),
            &policy(
                "gpu",
                json!({
                    "target": {"deployment": "gpu"},
                    "metrics": {"alerts": ["GPUPressure"]},
                    "initialState": "calm",
                    "states": [
                        {"name": "calm", "replicas": 1},
                        {"name": "shed", "replicas": 3},
                    ],
                    "transitions": [
                        {"from": "calm", "to": "shed", "when": "alert(GPUPressure)"},
                        {"from": "shed", "to": "calm", "when": "not alert(GPUPressure)"},
                    ],
                }),
            ),
        )
        .await?;
    wait_state(&policies, "gpu", "calm", Duration::from_secs(10)).await?;
    let log = ReplicaLog::start(deployments.clone(), "gpu");

    post_alert(am, "GPUPressure", chrono::Duration::hours(1)).await?;
    wait_replicas(&deployments, "gpu", 3, Duration::from_secs(30)).await?;
    let p = wait_state(&policies, "gpu", "shed", Duration::from_secs(5)).await?;
    let last = p.status.unwrap().last_transition.unwrap();
    assert_eq!((last.from.as_str(), last.to.as_str()), ("calm", "shed"));
    assert!(
        last.reason.contains("alert(GPUPressure)"),
        "{}",
        last.reason
    );

    post_alert(am, "GPUPressure", -chrono::Duration::seconds(1)).await?;
    wait_replicas(&deployments, "gpu", 1, Duration::from_secs(30)).await?;
    wait_state(&policies, "gpu", "calm", Duration::from_secs(5)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log.seen(), vec![1, 3, 1]);
    let transitions = c
        .store
        .transitions(&PolicyId::new("default", "gpu"), 0..u64::MAX)?;
    let pairs: Vec<(&str, &str)> = transitions
        .iter()
        .map(|t| (t.from_state.as_str(), t.to_state.as_str()))
        .collect();
    assert_eq!(pairs, vec![("calm", "shed"), ("shed", "calm")]);
    c.shutdown().await;
    Ok(())
}
