//! Issue 2 (point 6) with the whole agent: an agent that stops without detaching leaves
//! its programs attached and its maps pinned, so connects go on being seen while no
//! agent runs; the next agent of the same instance adopts them: the Service keeps its
//! row and mode, and its counters continue.

mod wake_support;

use std::time::Duration;

use nemesis_agent::ebpf::Mode;
use serde_json::json;
use wake_support::{Scenario, WakeEnv, eventually, http_get, slow_server};

async fn all_ok(env: &WakeEnv, clients: usize) -> anyhow::Result<()> {
    let results = env
        .run_clients(
            &["--clients", &clients.to_string(), "--http"],
            Duration::from_secs(30),
        )
        .await?;
    for r in &results {
        let resp = r.http()?;
        anyhow::ensure!(resp.status == 200, "client {}: {resp:?}", r.client);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_the_datapath_and_counting_never_stops() -> anyhow::Result<()> {
    let mut env = WakeEnv::start(Scenario {
        name: "restart",
        pod: slow_server(),
        policy: json!({}),
        scale_on_wake: true,
    })
    .await?;
    all_ok(&env, 1).await?;
    env.wait_mode(Mode::Balance).await?;
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

    let before = eventually(
        "the waking connect to be counted",
        Duration::from_secs(5),
        || async {
            let m = env.metrics().await?;
            Ok((m.ebpf_connects() == 1.0).then_some(m))
        },
    )
    .await?;
    assert_eq!(before.ebpf_connects(), 1.0);

    // Five clients while no agent runs: the programs, still attached, let them through
    // (the Service is warm, so direct) and count them.
    env.stop_agent_keeping_datapath().await?;
    all_ok(&env, 5).await?;
    env.start_agent_again().await?;

    let dp = env.agent().datapath();
    assert_eq!(
        dp.services().len(),
        1,
        "the Service's row was adopted, not duplicated"
    );
    env.wait_mode(Mode::Balance).await?;
    eventually(
        "the counters to continue",
        Duration::from_secs(5),
        || async { Ok((env.metrics().await?.ebpf_connects() == 6.0).then_some(())) },
    )
    .await?;

    // The new agent goes on: more direct connects are counted, none meets its proxy.
    all_ok(&env, 5).await?;
    let after = eventually(
        "the new connects to be counted",
        Duration::from_secs(5),
        || async {
            let m = env.metrics().await?;
            Ok((m.ebpf_connects() == 11.0).then_some(m))
        },
    )
    .await?;
    assert_eq!(
        after.proxy_outcomes(),
        0.0,
        "the new agent's proxy saw nothing"
    );
    assert_eq!(env.controller.wakes(), 1);
    env.shutdown().await
}
