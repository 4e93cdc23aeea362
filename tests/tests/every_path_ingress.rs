//! Callers that never dial a ClusterIP, end to end with the real controller and agent
//! (real eBPF; the sandbox's pods in the agent's cgroup as a node's pods are under the
//! cgroup2 root):
//! - a real nginx in a network namespace of its own, outside the intercepted cgroup,
//!   whose upstream follows the Service's EndpointSlices (as ingress-nginx does): at
//!   zero its request is held through the hold EndpointSlice, wakes the Service and
//!   gets the app's answer; traffic only through it keeps the policy warm; silence puts
//!   it to sleep after the idle window; the hold slice is there exactly while the
//!   Service has no ready backend;
//! - 200 concurrent requests through nginx at zero: one wake-up, every one served;
//! - the node's Service proxy (kube-proxy's part) called from outside the intercepted
//!   cgroup: at zero it forwards to the hold slice's listener, which holds and serves.

mod wake_support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use kube::Api;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_tests::ingress::IngressNginx;
use serde_json::{Value, json};
use tokio::time::Instant;
use wake_support::{APP, NS, Options, Scenario, WakeEnv, eventually, http_get, quick_server};

/// The short form's idle window (and rate window, so the window is the whole wait).
const IDLE: Duration = Duration::from_secs(6);
/// What "after the idle window" allows on top: agent counters every 500 ms, reports
/// every 500 ms, controller ticks every 200 ms, status every 500 ms.
const SLACK: Duration = Duration::from_secs(3);
const INGRESS_PORT: u16 = 8088;

fn policy() -> Value {
    let idle = format!("{}s", IDLE.as_secs());
    json!({
        "target": {"deployment": APP, "service": APP},
        "minReplicas": 0,
        "maxReplicas": 1,
        "idleTimeout": idle,
        "metrics": {"connections": {"rateWindow": idle}},
        "holdTimeoutSeconds": 60,
    })
}

async fn start(name: &'static str) -> anyhow::Result<WakeEnv> {
    WakeEnv::start_with(
        Scenario {
            name,
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
    .await
}

async fn ingress(
    env: &WakeEnv,
    netns: &nemesis_tests::netns::PodNetns,
) -> anyhow::Result<IngressNginx> {
    IngressNginx::start(
        env.client.clone(),
        netns.name(),
        SocketAddr::from((netns.ip(), INGRESS_PORT)),
        NS,
        APP,
        "http",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ingress_is_held_at_zero_keeps_the_service_warm_and_lets_it_sleep() -> anyhow::Result<()>
{
    let env = start("ing-cycle").await?;
    let result = cycle(&env).await;
    env.shutdown().await?;
    result
}

async fn cycle(env: &WakeEnv) -> anyhow::Result<()> {
    env.wait_held().await?;
    let netns = env.sandbox().outside_host().await?;
    let nginx = ingress(env, &netns).await?;
    // Held at zero: the request through nginx wakes the Service and gets its answer;
    // once warm nginx goes straight to the pod.
    env.held_through_nginx(&nginx, env.sandbox().gateway().into())
        .await?;

    // Traffic only through nginx keeps it warm for three idle windows.
    let start = Instant::now();
    let mut last = Instant::now();
    while start.elapsed() < IDLE * 3 {
        let (status, _) = http_get(nginx.addr(), "/").await?;
        anyhow::ensure!(status == 200, "nginx answered {status} while warm");
        last = Instant::now();
        anyhow::ensure!(
            env.replicas().await? == 1,
            "scaled down {:?} into traffic that only comes through the Ingress",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Silence: asleep after the idle window, and held again.
    let slept = eventually("back at zero", IDLE + SLACK * 3, || async {
        Ok((env.policy_state().await?.as_deref() == Some("zero")).then(Instant::now))
    })
    .await?;
    let after = slept - last;
    anyhow::ensure!(
        after >= IDLE && after <= IDLE + SLACK,
        "slept {after:?} after the last request through nginx; the idle window is {IDLE:?}"
    );
    eventually(
        "the hold slice back at zero",
        Duration::from_secs(15),
        || async {
            Ok(env
                .hold_slices()
                .await?
                .iter()
                .any(|(_, _, n)| *n == 1)
                .then_some(()))
        },
    )
    .await?;
    anyhow::ensure!(
        nginx.reloads() >= 2,
        "nginx was reloaded {} times",
        nginx.reloads()
    );
    nginx.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_requests_through_the_ingress_at_zero_make_one_wake_up_and_are_all_served()
-> anyhow::Result<()> {
    let env = start("ing-burst").await?;
    let result = burst(&env).await;
    env.shutdown().await?;
    result
}

async fn burst(env: &WakeEnv) -> anyhow::Result<()> {
    env.wait_held().await?;
    let netns = env.sandbox().outside_host().await?;
    let nginx = ingress(env, &netns).await?;
    // The clients call nginx from the node (outside the intercepted cgroup).
    let out = tokio::process::Command::new(wake_support::CLIENT)
        .args(["--connect", &nginx.addr().to_string(), "--clients", "200"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut out = out;
    {
        use tokio::io::AsyncWriteExt as _;
        let mut stdin = out.stdin.take().context("stdin")?;
        stdin.write_all(b"go\n").await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(60), out.wait_with_output())
        .await
        .context("the 200 clients did not finish in 60 s")??;
    let results: Vec<wake_support::ClientResult> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(results.len() == 200, "{} results", results.len());
    for r in &results {
        let http = r.http()?;
        anyhow::ensure!(
            http.status == 200,
            "client {}: {} {}",
            r.client,
            http.status,
            http.body
        );
    }
    let m = env.metrics().await?;
    let wakeups = m.sum(
        "nemesis_agent_proxy_wakeups_total",
        &[("namespace", NS), ("service", APP), ("result", "accepted")],
    );
    anyhow::ensure!(wakeups == 1.0, "{wakeups} wake-ups for 200 held requests");
    nginx.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_nodes_service_proxy_called_from_outside_the_cgroup_is_held_through_the_hold_slice()
-> anyhow::Result<()> {
    let env = start("ing-kproxy").await?;
    let result = node_proxy(&env).await;
    env.shutdown().await?;
    result
}

/// Whether `e` is a refused connect (nothing listened, nothing was held).
fn refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

async fn node_proxy(env: &WakeEnv) -> anyhow::Result<()> {
    env.wait_held().await?;
    // This test process is not in the intercepted cgroup: its connect to the ClusterIP
    // is the node's Service proxy's business, which follows the EndpointSlices, so at
    // zero it forwards to the hold listener.
    // The Service proxy picks the hold slice up a moment after the agent holds: until
    // then the ClusterIP has no endpoint and refuses, which holds and wakes nothing, so
    // a refused connect is tried again.
    let (status, body) = eventually(
        "the ClusterIP answering through the hold slice",
        Duration::from_secs(60),
        || async {
            match http_get(env.service_addr, "/").await {
                Ok(answer) => Ok(Some(answer)),
                Err(e) if refused(&e) => Ok(None),
                Err(e) => Err(e.context("GET the ClusterIP")),
            }
        },
    )
    .await?;
    anyhow::ensure!(status == 200, "the Service answered {status}: {body}");
    anyhow::ensure!(env.replicas().await? == 1);
    let m = env.metrics().await?;
    anyhow::ensure!(
        m.ebpf_connects() == 0.0,
        "no connect() hook saw this caller, yet it was held"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_hold_slice_goes_with_its_service_its_policy_and_nemesis() -> anyhow::Result<()> {
    let mut env = start("ing-stale").await?;
    let result = stale(&mut env).await;
    env.shutdown().await?;
    result
}

async fn stale(env: &mut WakeEnv) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{DeleteParams, PostParams};

    env.wait_held().await?;
    let services: Api<Service> = Api::namespaced(env.client.clone(), NS);
    let policies: Api<ScalingPolicy> = Api::namespaced(env.client.clone(), NS);

    // The Service goes: so does its slice; it comes back with the Service.
    let mut svc = services.get(APP).await?;
    services.delete(APP, &DeleteParams::default()).await?;
    gone(env, "the hold slice gone with its Service").await?;
    svc.metadata.resource_version = None;
    svc.metadata.uid = None;
    services.create(&PostParams::default(), &svc).await?;
    env.wait_held().await?;

    // The policy goes: so does the slice.
    let mut pol = policies.get(APP).await?;
    policies.delete(APP, &DeleteParams::default()).await?;
    gone(env, "the hold slice gone with its policy").await?;
    pol.metadata.resource_version = None;
    pol.metadata.uid = None;
    pol.status = None;
    policies.create(&PostParams::default(), &pol).await?;
    env.wait_held().await?;

    // Nemesis uninstalled while held: its controller gone (as `kill -9`), then its CRD.
    // Nothing of Nemesis runs to clean up; the slice still goes, with the policy that
    // owns it.
    if let Some(real) = env.real.take() {
        real.kill();
    }
    anyhow::ensure!(
        !env.hold_slices().await?.is_empty(),
        "still held before the uninstall"
    );
    Api::<CustomResourceDefinition>::all(env.client.clone())
        .delete("scalingpolicies.nemesis.dev", &DeleteParams::default())
        .await?;
    gone(env, "the hold slice gone with Nemesis").await?;
    Ok(())
}

async fn gone(env: &WakeEnv, what: &str) -> anyhow::Result<()> {
    eventually(what, Duration::from_secs(15), || async {
        Ok(env.hold_slices().await?.is_empty().then_some(()))
    })
    .await
}
