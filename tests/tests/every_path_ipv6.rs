//! IPv6-only and dual-stack Services are held and counted by default, end to end with the
//! real controller and agent (real eBPF; the sandbox's pods in the agent's cgroup). The
//! sandbox is dual-stack: pods have an address from 198.18.0.0/15 and one from the
//! unique local fd6e:6d00::/32, IPv6 ClusterIPs come from fd6e:6d00:ffff::/108, and the
//! agent takes the node's addresses of both families (`--node-addresses`, as
//! `status.hostIPs` gives them in the DaemonSet):
//! - IPv6 only: at zero a request through a real nginx (an Ingress following the
//!   EndpointSlices, listening and dialling over IPv6) is held by the agent's hold
//!   listener on the node's IPv6 address, wakes the Service and gets the app's 200;
//! - dual-stack: the node's Service proxy, called on the IPv6 ClusterIP from outside the
//!   intercepted cgroup, forwards to the IPv6 hold slice, and the request is held and
//!   served (by an IPv6 backend: the hold listener stands for the IPv6 ClusterIP);
//! - both: a caller outside the cgroup dialling the pod's IPv6 address keeps the policy
//!   warm for three idle windows (the server-side count sees IPv6 accepts), and the
//!   policy sleeps one idle window after the last request.

mod wake_support;

use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use anyhow::Context as _;
use nemesis_tests::ingress::IngressNginx;
use serde_json::{Value, json};
use tokio::time::Instant;
use wake_support::{
    APP, Families, NS, Options, POD_PORT, SERVER, Scenario, WakeEnv, eventually, http_get,
};

/// The short form's idle window (and rate window, so the window is the whole wait).
const IDLE: Duration = Duration::from_secs(6);
/// What "after the idle window" allows on top: agent counters every 500 ms, reports
/// every 500 ms, controller ticks every 200 ms, status every 500 ms.
const SLACK: Duration = Duration::from_secs(3);
const INGRESS_PORT: u16 = 8088;

/// The pod server on every address of the pod (`[::]` takes IPv4 too, so the kubelet's
/// IPv4 readiness probe still reaches it).
fn dual_stack_server() -> Value {
    json!({
        "annotations": {"nemesis.test/probe-period-ms": "100"},
        "container": {
            "name": "server",
            "image": "local/nemesis-pod-server",
            "command": [SERVER],
            "args": ["--listen", format!("[::]:{POD_PORT}")],
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
        "holdTimeoutSeconds": 60,
    })
}

async fn start(name: &'static str, families: Families) -> anyhow::Result<WakeEnv> {
    WakeEnv::start_with(
        Scenario {
            name,
            pod: dual_stack_server(),
            policy: json!({}),
            scale_on_wake: false,
        },
        Options {
            policy_spec: Some(policy()),
            real_controller: Some(vec![]),
            families,
            ..Options::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ipv6_only_service_is_held_through_an_ingress_kept_warm_over_ipv6_and_sleeps()
-> anyhow::Result<()> {
    let env = start("v6-only", Families::V6).await?;
    let result = ipv6_only(&env).await;
    env.shutdown().await?;
    result
}

async fn ipv6_only(env: &WakeEnv) -> anyhow::Result<()> {
    env.wait_held_families(&["IPv6"]).await?;
    anyhow::ensure!(
        env.hold_slices().await?.iter().all(|(_, t, _)| t == "IPv6"),
        "an IPv6-only Service gets an IPv6 hold slice only: {:?}",
        env.hold_slices().await?
    );
    let netns = env.sandbox().outside_host().await?;
    let nginx = IngressNginx::start(
        env.client.clone(),
        netns.name(),
        SocketAddr::from((netns.ip_v6(), INGRESS_PORT)),
        NS,
        APP,
        "http",
    )
    .await?;
    env.held_through_nginx(&nginx, env.sandbox().gateway_v6().into())
        .await?;
    nginx.shutdown().await;
    warm_over_ipv6_then_sleep(env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dual_stack_service_is_held_through_the_node_service_proxy_on_its_ipv6_cluster_ip()
-> anyhow::Result<()> {
    let env = start("v6-dual", Families::Dual).await?;
    let result = dual_stack(&env).await;
    env.shutdown().await?;
    result
}

async fn dual_stack(env: &WakeEnv) -> anyhow::Result<()> {
    env.wait_held_families(&["IPv4", "IPv6"]).await?;
    let v6 = env.service_addr_v6.context("the IPv6 ClusterIP")?;
    let SocketAddr::V6(v6_front) = v6 else {
        anyhow::bail!("{v6} is not an IPv6 address");
    };
    // The Service proxy serves the IPv6 ClusterIP once the IPv6 hold slice lists the
    // agent: it puts the address on lo and listens, a moment after the slice appears.
    // Only a listening socket is waited for: a connect would itself be held.
    eventually(
        &format!("the node's Service proxy listening on {v6}"),
        Duration::from_secs(30),
        || async { Ok(listening_v6(v6_front)?.then_some(())) },
    )
    .await?;
    // This test process is outside the intercepted cgroup: its connect to the IPv6
    // ClusterIP is the node's Service proxy's, which follows the IPv6 EndpointSlices to
    // the agent's hold listener on the node's IPv6 address.
    let (status, body) = http_get(v6, "/").await.context("GET the IPv6 ClusterIP")?;
    anyhow::ensure!(status == 200, "the Service answered {status}: {body}");
    anyhow::ensure!(
        env.replicas().await? == 1,
        "the request did not wake the Service"
    );
    let m = env.metrics().await?;
    anyhow::ensure!(
        m.ebpf_connects() == 0.0,
        "no connect() hook saw this caller, yet it was held"
    );
    anyhow::ensure!(
        m.sum(
            "nemesis_agent_proxy_wakeups_total",
            &[("namespace", NS), ("service", APP)]
        ) >= 1.0,
        "the agent's proxy sent no wake-up"
    );
    eventually(
        "both hold slices gone once warm",
        Duration::from_secs(15),
        || async { Ok(env.hold_slices().await?.is_empty().then_some(())) },
    )
    .await?;
    warm_over_ipv6_then_sleep(env).await
}

/// A caller outside the cgroup dialling the pod's IPv6 address keeps the policy warm
/// for three idle windows; it sleeps one idle window after the last request.
async fn warm_over_ipv6_then_sleep(env: &WakeEnv) -> anyhow::Result<()> {
    let pod = eventually(
        "the pod's IPv6 address",
        Duration::from_secs(10),
        || async { Ok(env.pod_ips_of(true).await?.first().copied()) },
    )
    .await?;
    anyhow::ensure!(
        matches!(pod, IpAddr::V6(ip) if ip.segments()[..2] == [0xfd6e, 0x6d00]),
        "the pod's IPv6 address {pod} is in the sandbox's unique local range"
    );
    let last = env
        .keep_warm_from_outside(SocketAddr::new(pod, POD_PORT), IDLE * 3)
        .await?;
    let slept = eventually("the policy back at zero", IDLE + SLACK * 3, || async {
        Ok((env.policy_state().await?.as_deref() == Some("zero")).then(Instant::now))
    })
    .await?;
    // Asleep no sooner than a window after the last request reached the pod, and no
    // later than a window (plus the reporting lag) after it was done.
    let (after_start, after_done) = (slept - last.started, slept - last.done);
    anyhow::ensure!(
        after_start >= IDLE && after_done <= IDLE + SLACK,
        "slept {after_done:?} after the last request to the pod's IPv6 address was done ({after_start:?} after it started); the idle window is {IDLE:?}"
    );
    Ok(())
}

/// Whether a TCP socket listens on `addr` in this network namespace (`/proc/net/tcp6`
/// writes each 32-bit word of the address in host order, state 0A is LISTEN).
fn listening_v6(addr: SocketAddrV6) -> anyhow::Result<bool> {
    let want: String = addr
        .ip()
        .octets()
        .chunks(4)
        .map(|w| format!("{:02X}{:02X}{:02X}{:02X}", w[3], w[2], w[1], w[0]))
        .collect::<String>()
        + &format!(":{:04X}", addr.port());
    let text = std::fs::read_to_string("/proc/net/tcp6")?;
    Ok(text.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() > 3 && cols[1] == want && cols[3] == "0A"
    }))
}
