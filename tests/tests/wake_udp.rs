//! A UDP Service port end to end, with the real agent (real eBPF on a child cgroup) in
//! balance mode: at zero, a DNS-like query sent to the ClusterIP is held by the agent's
//! UDP hold relay, which asks for one wake-up; once the pod is ready the relay sends it
//! on and relays the answer, which the client's `recvfrom` sees coming from the
//! ClusterIP. Warm, the datapath sends each datagram straight to the pod (the pod sees
//! the client's own port, not the relay's), still answered from the ClusterIP, and so
//! is a connected socket. Over IPv4 and over IPv6 (an IPv6-only Service).

mod wake_support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use nemesis_agent::ebpf::{Mode, Proto};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use wake_support::{
    APP, Families, NS, Options, POD_PORT, Scenario, UDP_CLIENT, UdpPort, WakeEnv, eventually,
    slow_server,
};

const DNS_PORT: u16 = 53;
const POD_DNS_PORT: u16 = 5353;

/// Runs `nemesis-udp-client` in the test's cgroup against `addr` and returns its lines.
async fn exchange(env: &WakeEnv, addr: SocketAddr, extra: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut cmd = tokio::process::Command::new(UDP_CLIENT);
    cmd.arg("--connect")
        .arg(addr.to_string())
        // Generous: the first exchange waits for a cold start on a loaded machine.
        .args(["--timeout-ms", "90000"])
        .args(extra);
    let (mut child, mut stdin) = env.spawn_in_cgroup(cmd)?;
    stdin.write_all(b"go\n").await?;
    drop(stdin);
    let stdout = child.stdout.take().context("client stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut out = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await? {
            out.push(serde_json::from_str::<Value>(&line).with_context(|| line.clone())?);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(150), read)
        .await
        .context("the UDP client did not finish")??;
    let status = child.wait().await?;
    anyhow::ensure!(status.success(), "the UDP client failed: {status}");
    Ok(out)
}

/// The port the pod saw the query come from (`;peer=ADDR` in the answer).
fn peer_port(line: &Value) -> anyhow::Result<u16> {
    let answer = line["answer"].as_str().context("an answer")?;
    let peer = answer
        .split(';')
        .find_map(|f| f.strip_prefix("peer="))
        .with_context(|| format!("no peer in {answer:?}"))?;
    Ok(peer.parse::<SocketAddr>()?.port())
}

fn local_port(line: &Value) -> anyhow::Result<u16> {
    let local = line["local"].as_str().context("a local address")?;
    Ok(local.parse::<SocketAddr>()?.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_like_query_at_zero_is_held_wakes_once_and_is_answered_from_the_cluster_ip()
-> anyhow::Result<()> {
    let mut pod = slow_server();
    pod["container"]["args"] = json!([
        "--port",
        POD_PORT.to_string(),
        "--udp-port",
        POD_DNS_PORT.to_string()
    ]);
    start_and_run("udp", pod, Families::V4).await
}

/// The same over IPv6: an IPv6-only Service, the relay on the agent's IPv6 proxy
/// address, IPv6 backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_ipv6_a_query_at_zero_is_held_and_answered_from_the_ipv6_cluster_ip()
-> anyhow::Result<()> {
    let mut pod = slow_server();
    // `[::]` takes IPv4 too, so the kubelet's IPv4 readiness probe still reaches it.
    pod["container"]["args"] = json!([
        "--listen",
        format!("[::]:{POD_PORT}"),
        "--udp-port",
        POD_DNS_PORT.to_string()
    ]);
    start_and_run("udp6", pod, Families::V6).await
}

async fn start_and_run(name: &'static str, pod: Value, families: Families) -> anyhow::Result<()> {
    let env = WakeEnv::start_with_agent_flags(
        Scenario {
            name,
            pod,
            policy: json!({}),
            scale_on_wake: true,
        },
        Options {
            udp_port: Some(UdpPort {
                port: DNS_PORT,
                target_port: POD_DNS_PORT,
            }),
            families,
            ..Options::default()
        },
        &[("--direct-mode", "balance".to_string())],
    )
    .await?;
    let result = run(&env).await;
    env.shutdown().await?;
    result
}

async fn run(env: &WakeEnv) -> anyhow::Result<()> {
    let dns = SocketAddr::new(env.service_addr.ip(), DNS_PORT);
    let dp = env.agent().datapath();
    eventually(
        "the UDP row held in the datapath",
        Duration::from_secs(30),
        || async {
            Ok(dp
                .service(dns, Proto::Udp)
                .filter(|e| e.mode == Mode::Hold)
                .map(|_| ()))
        },
    )
    .await?;
    assert_eq!(env.controller.wakes(), 0, "nothing woke it yet");

    // At zero: held by the relay, one wake-up, answered once the pod is ready. Sent
    // again only every 5 s: a query sent again after the flip goes straight to the pod,
    // and its answer could overtake the relayed one.
    let cold = exchange(env, dns, &["--count", "1", "--retry-ms", "5000"]).await?;
    assert_eq!(cold.len(), 1, "{cold:?}");
    let first = &cold[0];
    eprintln!("cold exchange: {first}");
    assert_eq!(first["ok"], json!(true), "{first}");
    assert_eq!(
        first["from"],
        json!(dns.to_string()),
        "recvfrom shows the ClusterIP: {first}"
    );
    if first["tries"] == json!(1) {
        // Sent once, at zero: only the relay can have delivered it.
        assert_ne!(
            peer_port(first)?,
            local_port(first)?,
            "held: the pod got it from the agent's relay, not from the client: {first}"
        );
    }
    // Only the relay asks for a wake-up: nothing else called the Service.
    assert_eq!(env.controller.wakes(), 1, "one wake-up for the held flow");
    // The relay's work shows in the agent's metrics: the flow, its held datagram
    // forwarded to the pod, nothing dropped (one datagram is far within the bounds).
    eventually(
        "the UDP hold relay's counts in the agent's metrics",
        Duration::from_secs(30),
        || async {
            let m = env.metrics().await?;
            let count = |name: &str, labels: &[(&str, &str)]| m.sum(name, labels);
            let held = count(
                "nemesis_agent_udp_hold_datagrams_total",
                &[("outcome", "held")],
            );
            let forwarded = count(
                "nemesis_agent_udp_hold_datagrams_total",
                &[("outcome", "forwarded")],
            );
            let dropped = count(
                "nemesis_agent_udp_hold_datagrams_total",
                &[("outcome", "dropped")],
            );
            let flows = count("nemesis_agent_udp_hold_flows_total", &[]);
            anyhow::ensure!(dropped == 0.0, "nothing dropped, got {dropped}");
            Ok((held >= 1.0 && forwarded >= 1.0 && flows >= 1.0).then_some(()))
        },
    )
    .await?;

    // Warm: balance mode sends each datagram straight to the pod.
    eventually(
        "the UDP row in balance mode",
        Duration::from_secs(30),
        || async {
            Ok(dp
                .service(dns, Proto::Udp)
                .filter(|e| e.mode == Mode::Balance)
                .map(|_| ()))
        },
    )
    .await?;
    let warm = exchange(env, dns, &["--count", "3"]).await?;
    eprintln!("warm exchanges: {warm:?}");
    assert_eq!(warm.len(), 3, "{warm:?}");
    for line in &warm {
        assert_eq!(line["ok"], json!(true), "{line}");
        assert_eq!(line["from"], json!(dns.to_string()), "{line}");
        assert_eq!(
            peer_port(line)?,
            local_port(line)?,
            "direct: the pod saw the client's own port: {line}"
        );
    }
    // A connected socket too: its peer is the ClusterIP.
    let connected = exchange(env, dns, &["--count", "1", "--connected"]).await?;
    assert_eq!(connected[0]["ok"], json!(true), "{connected:?}");
    assert_eq!(
        connected[0]["from"],
        json!(dns.to_string()),
        "{connected:?}"
    );
    assert_eq!(peer_port(&connected[0])?, local_port(&connected[0])?);
    assert_eq!(env.controller.wakes(), 1, "warm datagrams wake nothing");
    // Counted: each UDP flow (the held one, the unconnected and the connected socket)
    // is a connect of the Service, which keeps it warm. No TCP client ever called it.
    eventually(
        "the UDP flows counted as the Service's connects",
        Duration::from_secs(30),
        || async {
            let connects = env.metrics().await?.sum(
                "nemesis_agent_service_connects_total",
                &[("namespace", NS), ("service", APP)],
            );
            Ok((connects >= 3.0).then_some(()))
        },
    )
    .await?;
    Ok(())
}
