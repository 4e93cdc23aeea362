//! Issue 4, stepping out of the path, end to end: once the woken Service has a ready
//! endpoint its datapath mode flips, the agent reports the new mode to the controller,
//! and new connections go straight to the ClusterIP (served here by the sandbox's
//! kube-proxy stand-in): the eBPF hooks still count them, the proxy never sees them.
//! A connection that reaches the proxy without a redirect is closed and counted.

mod wake_support;

use std::net::SocketAddr;
use std::time::Duration;

use nemesis_agent::ebpf::Mode;
use nemesis_common::wire::AppliedMode;
use serde_json::json;
use tokio::io::AsyncReadExt;
use wake_support::{Scenario, WakeEnv, eventually, http_get, slow_server};

const CLIENTS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_warm_new_connections_bypass_the_proxy() -> anyhow::Result<()> {
    let env = WakeEnv::start(Scenario {
        name: "bypass",
        pod: slow_server(),
        policy: json!({}),
        scale_on_wake: true,
    })
    .await?;

    // Wake it with one client.
    let first = env
        .run_clients(&["--clients", "1", "--http"], Duration::from_secs(30))
        .await?;
    assert_eq!(first[0].http()?.status, 200);
    env.wait_mode(Mode::Balance).await?;
    eventually(
        "the controller to hear of the flip",
        Duration::from_secs(5),
        || async {
            let hb = env.controller.last_heartbeat.lock().unwrap().clone();
            Ok(hb
                .and_then(|hb| hb.services.into_iter().find(|s| s.service.name == "web"))
                .filter(|s| s.mode == AppliedMode::Balance)
                .map(|_| ()))
        },
    )
    .await?;
    // kube-proxy's part serves the ClusterIP (this process is outside the cgroup).
    eventually(
        "the ClusterIP to be served",
        Duration::from_secs(10),
        || async {
            Ok(http_get(env.service_addr, "/")
                .await
                .ok()
                .filter(|(status, _)| *status == 200)
                .map(|_| ()))
        },
    )
    .await?;

    // Counters settle (the agent copies them every 500 ms).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = env.metrics().await?;
    assert_eq!(
        before.ebpf_connects(),
        1.0,
        "the waking connect was counted"
    );

    let results = env
        .run_clients(
            &["--clients", &CLIENTS.to_string(), "--http"],
            Duration::from_secs(30),
        )
        .await?;
    let pods = env.pod_names().await?;
    for r in &results {
        let resp = r.http()?;
        assert_eq!(resp.status, 200, "client {}: {resp:?}", r.client);
        assert_eq!(resp.body, format!("{}\n", pods[0]));
    }
    let after = eventually(
        "the eBPF counters to show the new connects",
        Duration::from_secs(5),
        || async {
            let m = env.metrics().await?;
            Ok((m.ebpf_connects() >= before.ebpf_connects() + CLIENTS as f64).then_some(m))
        },
    )
    .await?;
    assert_eq!(
        after.ebpf_connects(),
        before.ebpf_connects() + CLIENTS as f64,
        "every new connect counted once"
    );
    assert_eq!(
        after.proxy_outcomes(),
        before.proxy_outcomes(),
        "the proxy accepted none of them"
    );
    assert_eq!(after.proxy_open(), 0.0);
    assert_eq!(env.controller.wakes(), 1);

    // A connection the hooks did not redirect (this process dials the proxy itself)
    // has no original destination: it is closed cleanly and counted.
    let mut direct = tokio::net::TcpStream::connect(SocketAddr::V4(env.agent().proxy_v4())).await?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), direct.read_to_end(&mut got)).await??;
    assert!(got.is_empty(), "closed without a word: {got:?}");
    eventually(
        "the unknown destination to be counted",
        Duration::from_secs(5),
        || async { Ok((env.metrics().await?.outcome("unknown_destination") == 1.0).then_some(())) },
    )
    .await?;
    env.shutdown().await
}
