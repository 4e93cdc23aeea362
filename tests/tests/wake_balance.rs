//! Balance mode end to end: with `--direct-mode balance` the real agent holds a Service
//! at zero, a held client wakes it, and the moment the pod is ready the datapath goes
//! direct by itself (no wait for the node's Service proxy): the next connect is sent by
//! the eBPF hook straight to the pod IP, past both the sandbox's Service proxy and the
//! agent's proxy, and counted on that backend.

mod wake_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nemesis_agent::ebpf::{Mode, Proto};
use serde_json::json;
use wake_support::{Options, POD_PORT, Scenario, WakeEnv, eventually, slow_server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_service_goes_straight_to_the_pod_ip_right_after_the_flip() -> anyhow::Result<()> {
    let env = WakeEnv::start_with_agent_flags(
        Scenario {
            name: "balance",
            pod: slow_server(),
            policy: json!({}),
            scale_on_wake: true,
        },
        Options::default(),
        &[("--direct-mode", "balance".to_string())],
    )
    .await?;
    let dp = env.agent().datapath();
    assert!(
        dp.backends(env.service_addr, Proto::Tcp)?.is_empty(),
        "at zero: no backend"
    );

    // A held client wakes it and gets its answer through the agent's proxy.
    let first = env
        .run_clients(&["--clients", "1", "--http"], Duration::from_secs(30))
        .await?;
    assert_eq!(first[0].http()?.status, 200);
    let answered = Instant::now();
    assert_eq!(env.controller.wakes(), 1);

    // The flip follows readiness at once: well inside the 2 s a passthrough agent
    // leaves kube-proxy.
    env.wait_mode(Mode::Balance).await?;
    let flip = answered.elapsed();
    assert!(
        flip < Duration::from_millis(1500),
        "balance mode came {flip:?} after the answer"
    );
    let pod_ips = env.pod_ips().await?;
    assert_eq!(pod_ips.len(), 1, "one pod: {pod_ips:?}");
    let pod = SocketAddr::new(pod_ips[0], POD_PORT);
    let backends = dp.backends(env.service_addr, Proto::Tcp)?;
    assert_eq!(
        backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
        vec![pod],
        "the ready pod is the one backend"
    );
    let before = env.metrics().await?;

    // Right after the flip: a connection that stays open a while, so where it went can
    // be seen while it is there.
    let lingering = env
        .clients(&["--clients", "1", "--give-up-after", "3000"])
        .await?;
    eventually(
        "the new connection to count on the pod IP",
        Duration::from_secs(2),
        || async {
            Ok(dp
                .backends(env.service_addr, Proto::Tcp)?
                .iter()
                .any(|b| b.addr == pod && b.open_now == 1)
                .then_some(()))
        },
    )
    .await?;
    let during = env.metrics().await?;
    assert_eq!(during.proxy_open(), 0.0, "the agent's proxy holds nothing");
    assert_eq!(
        during.proxy_outcomes(),
        before.proxy_outcomes(),
        "the agent's proxy took no connection"
    );
    let slot = dp
        .service(env.service_addr, Proto::Tcp)
        .expect("the Service row")
        .slot;
    assert_eq!(
        dp.stats(slot)?.redirected,
        1,
        "only the waking connect was redirected"
    );
    let r = lingering.finish(Duration::from_secs(10)).await?;
    assert_eq!(r[0].result, "gave_up", "{:?}", r[0]);

    // Ordinary requests now go direct too and are answered by the pod; the per-backend
    // count comes back down and the metric shows the backend.
    let more = env
        .run_clients(&["--clients", "5", "--http"], Duration::from_secs(30))
        .await?;
    let pods = env.pod_names().await?;
    for c in &more {
        let resp = c.http()?;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, format!("{}\n", pods[0]));
    }
    assert_eq!(dp.stats(slot)?.redirected, 1);
    eventually(
        "the backend's count to come down",
        Duration::from_secs(5),
        || async {
            Ok(dp
                .backends(env.service_addr, Proto::Tcp)?
                .iter()
                .all(|b| b.open_now == 0)
                .then_some(()))
        },
    )
    .await?;
    // The agent copies the counters every 500 ms.
    let series = format!(
        "nemesis_agent_backend_open_connections{{namespace=\"shop\",service=\"web\",backend=\"{pod}\"}} 0"
    );
    let text = eventually(
        "the per-backend series on /metrics",
        Duration::from_secs(5),
        || async {
            let (_, text) = env.http_get_admin("/metrics").await?;
            Ok(text.contains(&series).then_some(text))
        },
    )
    .await;
    if text.is_err() {
        let (_, now) = env.http_get_admin("/metrics").await?;
        panic!("{series:?} is not on /metrics:\n{now}");
    }
    assert_eq!(env.controller.wakes(), 1);
    env.shutdown().await
}
