//! The idle signal from the server side, end to end with the real controller and the
//! real agent (real eBPF; the sandbox's pods run in the agent's cgroup as a node's pods
//! run under the cgroup2 root): a client outside the intercepted cgroup that dials the
//! pod IP directly, as an Ingress controller does, is seen by no connect() hook at all,
//! yet it keeps a short-form policy warm for as long as it sends traffic (three idle
//! windows), and once it stops the policy sleeps after exactly the idle window.

mod wake_support;

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use nemesis_controller::policy::ScalingPolicy;
use serde_json::{Value, json};
use tokio::time::Instant;
use wake_support::{APP, NS, Options, POD_PORT, SERVER, Scenario, WakeEnv, eventually};

/// The short form's idle window (and rate window, so that the window is the whole wait).
const IDLE: Duration = Duration::from_secs(6);
/// What "exactly" allows on top of the window: the agent reads its counters every
/// 500 ms and reports every 500 ms, the controller ticks every 200 ms and writes status
/// every 500 ms.
const SLACK: Duration = Duration::from_secs(3);

fn quick_server() -> Value {
    json!({
        "annotations": {"nemesis.test/probe-period-ms": "100"},
        "container": {
            "name": "server",
            "image": "local/nemesis-pod-server",
            "command": [SERVER],
            "args": ["--port", POD_PORT.to_string()],
            "ports": [{"name": "http", "containerPort": POD_PORT}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        }
    })
}

fn policy() -> Value {
    let idle = format!("{}s", IDLE.as_secs());
    json!({
        "target": {"deployment": APP, "service": APP},
        "minReplicas": 0,
        "maxReplicas": 1,
        "idleTimeout": idle,
        "metrics": {"connections": {"rateWindow": idle}},
        "holdTimeoutSeconds": 30,
    })
}

async fn state(env: &WakeEnv) -> anyhow::Result<Option<String>> {
    let p = Api::<ScalingPolicy>::namespaced(env.client.clone(), NS)
        .get(APP)
        .await?;
    Ok(p.status.and_then(|s| s.state))
}

async fn replicas(env: &WakeEnv) -> anyhow::Result<i32> {
    let d = Api::<Deployment>::namespaced(env.client.clone(), NS)
        .get(APP)
        .await?;
    Ok(d.spec.replicas.unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traffic_straight_to_the_pod_keeps_the_service_warm_and_it_sleeps_one_idle_window_after()
-> anyhow::Result<()> {
    let env = WakeEnv::start_with(
        Scenario {
            name: "ingress-idle",
            pod: quick_server(),
            policy: json!({}),
            scale_on_wake: false,
        },
        Options {
            policy_spec: Some(policy()),
            real_controller: Some(vec![]),
            ..Options::default()
        },
    )
    .await?;
    let result = run(&env).await;
    env.shutdown().await?;
    result
}

async fn run(env: &WakeEnv) -> anyhow::Result<()> {
    eventually("the policy at zero", Duration::from_secs(20), || async {
        Ok((state(env).await?.as_deref() == Some("zero")).then_some(()))
    })
    .await?;
    // Woken once by a caller in the cgroup (the ClusterIP path)...
    let woke = env
        .clients(&[])
        .await?
        .finish(Duration::from_secs(30))
        .await?;
    anyhow::ensure!(
        woke[0].http()?.status == 200,
        "the waking request: {woke:?}"
    );
    let pod = eventually("the pod's IP", Duration::from_secs(10), || async {
        Ok(env.pod_ips().await?.first().copied())
    })
    .await?;
    let pod = SocketAddr::new(pod, POD_PORT);

    // ... then only an "Ingress" sends traffic: from a host of its own on the pod
    // network, outside the intercepted cgroup, to the pod IP. (From the node's own
    // addresses it would count as the node probing its pod, like the sandbox's kubelet
    // whose readiness probes hit the same port all along.)
    let ingress = env.sandbox().outside_host().await?;
    let busy_for = IDLE * 3;
    let every = Duration::from_millis(300);
    let start = Instant::now();
    let clients = env
        .outside_repeating_clients(
            ingress.name(),
            &[
                "--connect",
                &pod.to_string(),
                "--every-ms",
                &every.as_millis().to_string(),
                "--for-ms",
                &busy_for.as_millis().to_string(),
            ],
        )
        .await?;
    while start.elapsed() < busy_for {
        if replicas(env).await? != 1 {
            let m = env.metrics().await?;
            anyhow::bail!(
                "scaled down {:?} into traffic that only reaches the pod by its IP (the agent counted {} accepted connections)",
                start.elapsed(),
                m.sum(
                    "nemesis_agent_service_accepted_connections_total",
                    &[("namespace", NS), ("service", APP)]
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let results = clients.stop(Duration::from_secs(30)).await?;
    let last_done = Instant::now();
    let requests = results.len();
    anyhow::ensure!(requests >= 30, "only {requests} requests in {busy_for:?}");
    for r in &results {
        anyhow::ensure!(r.http()?.status == 200, "a request to the pod IP: {r:?}");
    }
    anyhow::ensure!(
        state(env).await?.as_deref() == Some("warm"),
        "the policy left warm during the traffic"
    );
    // Every one of them counted on the server side (the agent's metrics lag its
    // counters by up to half a second).
    eventually(
        "the agent's server-side count of the requests",
        Duration::from_secs(5),
        || async {
            let accepted = env.metrics().await?.sum(
                "nemesis_agent_service_accepted_connections_total",
                &[("namespace", NS), ("service", APP)],
            );
            Ok((accepted >= requests as f64).then_some(()))
        },
    )
    .await?;

    // Silence: asleep after the idle window, not before.
    let slept = eventually("the policy back at zero", IDLE + SLACK * 3, || async {
        Ok((state(env).await?.as_deref() == Some("zero")).then(Instant::now))
    })
    .await?;
    let after = slept - last_done;
    anyhow::ensure!(
        after >= IDLE && after <= IDLE + SLACK,
        "slept {after:?} after the last request; the idle window is {IDLE:?}"
    );
    Ok(())
}
