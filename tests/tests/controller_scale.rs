//! What keeps one controller cheap as policies and agents multiply, checked on a small
//! scale with the real controller against the test API server: a controller at steady
//! state (every policy at zero, every agent heartbeating, nothing changing) writes
//! nothing but its Lease renewals, even with a status interval shorter than the window;
//! and it follows its Deployment targets through one shared watch per namespace, not one
//! watch per policy. (`cargo xtask bench --only controller_rss` measures the same at
//! 1,000 agents and 10,000 Services.)

mod controller_support;

use std::time::Duration;

use controller_support::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use nemesis_common::wire::ServiceRef;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_tests::apiserver::{ApiServerOptions, RequestRecord, TestApiServer};
use serde_json::json;

const POLICIES: usize = 24;
const AGENTS: usize = 6;

fn is_write(r: &RequestRecord) -> bool {
    matches!(r.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
}

/// The writes other than Lease renewals among the requests served since `since` (a total
/// of every request counted by the server).
fn writes_since(server: &TestApiServer, since: u64) -> Vec<String> {
    let served = server.request_counts().by_method.values().sum::<u64>() - since;
    let log = server.requests();
    let tail = usize::try_from(served).unwrap_or(usize::MAX).min(log.len());
    log[log.len() - tail..]
        .iter()
        .filter(|r| is_write(r) && !r.path.contains("/leases/"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

fn total(server: &TestApiServer) -> u64 {
    server.request_counts().by_method.values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_controller_writes_nothing_and_shares_its_target_watches() -> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), "default");
    let names: Vec<String> = (0..POLICIES).map(|i| format!("steady-{i}")).collect();
    for name in &names {
        services
            .create(&PostParams::default(), &service(name))
            .await?;
        deployments
            .create(&PostParams::default(), &deployment(name, 0))
            .await?;
        let spec = json!({"target": {"deployment": name, "service": name},
                          "minReplicas": 0, "maxReplicas": 1, "idleTimeout": "1h"});
        policies
            .create(&PostParams::default(), &policy(name, spec))
            .await?;
    }
    let dir = tempfile::tempdir()?;
    // A status interval far below the window: values rewritten on a timer would show.
    let controller = start_controller(&server, dir.path(), &["--status-interval", "1s"]).await?;
    wait_leading(&controller, Duration::from_secs(60)).await?;
    let _agents: Vec<TestAgent> = (0..AGENTS)
        .map(|a| {
            let hosted = names
                .iter()
                .skip(a)
                .step_by(AGENTS)
                .map(|n| ServiceRef {
                    namespace: "default".into(),
                    name: n.clone(),
                })
                .collect();
            TestAgent::start(
                &format!("steady-node-{a}"),
                hosted,
                vec![controller.api_addr],
            )
        })
        .collect();
    for name in &names {
        wait_state(&policies, name, "zero", Duration::from_secs(120)).await?;
    }

    // Settling: adoption writes statuses, hold slices and (once agents report) the
    // first values; wait for a quiet stretch.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let from = total(&server);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let last = writes_since(&server, from);
        if last.is_empty() {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the controller never stopped writing; the last 3 s: {last:?}"
        );
    }

    // Steady: several status intervals and heartbeat rounds, not one write.
    let from = total(&server);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let writes = writes_since(&server, from);
    assert!(
        writes.is_empty(),
        "a steady controller wrote {} times: {writes:?}",
        writes.len()
    );

    // One Deployment watch for the namespace, none per policy.
    let deployment_watches: Vec<RequestRecord> = server
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "GET" && r.path.ends_with("/deployments") && r.query.contains("watch=")
        })
        .collect();
    assert!(
        deployment_watches
            .iter()
            .all(|r| !r.query.contains("metadata.name")),
        "a per-policy Deployment watch: {deployment_watches:?}"
    );
    assert!(
        !deployment_watches.is_empty() && deployment_watches.len() < POLICIES,
        "{} Deployment watches for {POLICIES} policies",
        deployment_watches.len()
    );
    controller.shutdown().await;
    Ok(())
}
