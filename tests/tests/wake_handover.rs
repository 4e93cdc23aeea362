//! Zero-gap agent restart (a DaemonSet rollout with `maxSurge: 1`): while agent A holds
//! connections of a Service at zero, agent B of the same instance starts on the same
//! proxy port (SO_REUSEPORT) and stands by, listening but neither accepting nor writing
//! the datapath; A is stopped as SIGTERM stops it (listeners closed first, then the
//! datapath let go, then its held connections drained), B takes the datapath over.
//! A client connects all along, one new connection every few tens of milliseconds:
//! every one is served, none refused: those A held (drained by A once the app is up),
//! those queued at B while it stood by, those made during the hand-over, and those made
//! once the Service is warm.

mod wake_support;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use nemesis_agent::handover::{TCP_MIGRATE_REQ, parse_migrate_req};
use serde_json::json;
use wake_support::{APP, Clients, NS, Scenario, WakeEnv, eventually, http_get, slow_server};

/// One new client connection this often.
const EVERY: Duration = Duration::from_millis(40);
/// A bound on the whole run's connections, whatever the timings.
const MAX_CONNECTIONS: usize = 200;

/// Starts one client connection every [`EVERY`] for `period` (bounded by
/// [`MAX_CONNECTIONS`]), each a process in the test's cgroup doing one HTTP GET.
async fn connect_for(
    env: &WakeEnv,
    running: &mut Vec<Clients>,
    period: Duration,
) -> anyhow::Result<()> {
    let end = Instant::now() + period;
    while Instant::now() < end && running.len() < MAX_CONNECTIONS {
        running.push(env.clients(&["--clients", "1", "--http"]).await?);
        tokio::time::sleep(EVERY).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_takes_over_and_no_connection_is_refused() -> anyhow::Result<()> {
    let mut env = WakeEnv::start(Scenario {
        name: "handover",
        pod: slow_server(),
        // Held until the test scales the app, long after the hand-over.
        policy: json!({"holdTimeoutSeconds": 60}),
        scale_on_wake: false,
    })
    .await?;
    assert_eq!(
        std::fs::read_to_string(TCP_MIGRATE_REQ)
            .ok()
            .and_then(|t| parse_migrate_req(&t)),
        Some(true),
        "the agent turns on the migration of a closing listener's queue"
    );
    let mut running = Vec::new();

    // A alone holds the first connections.
    connect_for(&env, &mut running, Duration::from_millis(400)).await?;
    let held_by_a = running.len();
    eventually("A to hold them", Duration::from_secs(10), || async {
        Ok((env.metrics().await?.held() == held_by_a as f64).then_some(()))
    })
    .await?;

    // B on the same port: it stands by while A holds the writer lock; connects go on,
    // the kernel spreading them over A's and B's queues.
    let port = env.agent().proxy_v4();
    let b = env
        .start_second_agent(&[("--proxy-v4", port.to_string())])
        .await?;
    assert_eq!(b.proxy_v4(), port);
    assert!(!b.is_active(), "B stands by while A runs");
    // Ready while standing by: a DaemonSet update stops A only once B is ready.
    eventually("B to be ready", Duration::from_secs(10), || async {
        Ok((http_get(b.admin_addr(), "/readyz").await?.0 == 200).then_some(()))
    })
    .await?;
    connect_for(&env, &mut running, Duration::from_millis(800)).await?;
    assert!(!b.is_active(), "B still stands by: A has not let go");

    // SIGTERM to A, as the kubelet sends it once B is ready; connects go on meanwhile.
    let mut a = env.agent.take().context("agent A")?;
    a.set_detach_on_exit(false);
    a.set_shutdown_grace(Duration::from_secs(30));
    let a_stopping = tokio::spawn(a.shutdown());
    connect_for(&env, &mut running, Duration::from_millis(400)).await?;
    eventually("B to take over", Duration::from_secs(10), || async {
        Ok(b.is_active().then_some(()))
    })
    .await?;
    env.agent = Some(b);

    // The app comes up; A drains what it held, B serves the rest, then the Service
    // flips to direct and later connects bypass the proxy.
    Api::<Deployment>::namespaced(env.client.clone(), NS)
        .patch_scale(
            APP,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .context("scaling the app to 1")?;
    connect_for(&env, &mut running, Duration::from_secs(4)).await?;
    tokio::time::timeout(Duration::from_secs(40), a_stopping)
        .await
        .context("A did not stop within its grace")???;

    let total = running.len();
    let mut results = Vec::new();
    for clients in running {
        results.extend(clients.finish(Duration::from_secs(40)).await?);
    }
    assert_eq!(results.len(), total);
    let pods = env.pod_names().await?;
    assert_eq!(pods.len(), 1, "{pods:?}");
    let expected = format!("{}\n", pods[0]);
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| match r.http() {
            Ok(resp) if resp.status == 200 && resp.body == expected => None,
            Ok(resp) => Some(format!("{}: {resp:?}", r.client)),
            Err(e) => Some(format!("{e:#}")),
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {total} connections not served: {failed:?}",
        failed.len()
    );

    // B accepted what queued at it while standing by and what came during the hand-over.
    let m = env.metrics().await?;
    assert!(
        m.outcome("forwarded") >= 1.0,
        "B forwarded held connections: {}",
        m.outcome("forwarded")
    );
    assert_eq!(m.outcome("unknown_destination"), 0.0);
    tracing::info!(
        total,
        held_by_a,
        forwarded_by_b = m.outcome("forwarded"),
        "hand-over served every connection"
    );
    env.shutdown().await
}
