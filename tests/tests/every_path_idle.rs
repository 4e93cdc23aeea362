//! The idle signal from the server side, end to end with the real controller and the
//! real agent (real eBPF; the sandbox's pods run in the agent's cgroup as a node's pods
//! run under the cgroup2 root): a client outside the intercepted cgroup that dials the
//! pod IP directly, as an Ingress controller does, is seen by no connect() hook at all,
//! yet it keeps a short-form policy warm for as long as it sends traffic (three idle
//! windows), and once it stops the policy sleeps after exactly the idle window.

mod wake_support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use wake_support::{APP, Options, POD_PORT, Scenario, WakeEnv, eventually, quick_server};

/// The short form's idle window (and rate window, so that the window is the whole wait).
const IDLE: Duration = Duration::from_secs(6);
/// What "exactly" allows on top of the window: the agent reads its counters every
/// 500 ms and reports every 500 ms, the controller ticks every 200 ms and writes status
/// every 500 ms.
const SLACK: Duration = Duration::from_secs(3);

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
        Ok((env.policy_state().await?.as_deref() == Some("zero")).then_some(()))
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
    // network, outside the intercepted cgroup, to the pod IP, for three idle windows.
    let last = env.keep_warm_from_outside(pod, IDLE * 3).await?;

    // Silence: asleep after the idle window, not before.
    let slept = eventually("the policy back at zero", IDLE + SLACK * 3, || async {
        Ok((env.policy_state().await?.as_deref() == Some("zero")).then(Instant::now))
    })
    .await?;
    // Asleep no sooner than a window after the last request reached the pod, and no
    // later than a window (plus the reporting lag) after it was done.
    let (after_start, after_done) = (slept - last.started, slept - last.done);
    anyhow::ensure!(
        after_start >= IDLE && after_done <= IDLE + SLACK,
        "slept {after_done:?} after the last request was done ({after_start:?} after it started); the idle window is {IDLE:?}"
    );
    Ok(())
}
