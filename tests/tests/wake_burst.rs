//! Issue 4, the wake path end to end: 200 clients connect at once to the ClusterIP of a
//! Service at zero whose pod becomes ready 2 s after it is scheduled; the real agent
//! holds them all (real eBPF redirect in the test's cgroup), wakes the Service exactly
//! once, and delivers every request to the pod once it is ready: 0 lost.

mod wake_support;

use std::time::Duration;

use nemesis_agent::ebpf::Mode;
use serde_json::json;
use wake_support::{Scenario, WakeEnv, slow_server};

const CLIENTS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_of_a_zero_scaled_service_all_get_their_response_after_one_wake_up()
-> anyhow::Result<()> {
    let env = WakeEnv::start(Scenario {
        name: "burst",
        pod: slow_server(),
        policy: json!({}),
        scale_on_wake: true,
    })
    .await?;

    let results = env
        .run_clients(
            &["--clients", &CLIENTS.to_string(), "--http"],
            Duration::from_secs(60),
        )
        .await?;
    let pods = env.pod_names().await?;
    assert_eq!(pods.len(), 1, "one pod after the wake-up: {pods:?}");
    let expected_body = format!("{}\n", pods[0]);
    assert_eq!(results.len(), CLIENTS, "every client reported");
    let mut lost = Vec::new();
    for r in &results {
        match r.http() {
            Ok(resp) if resp.status == 200 && resp.body == expected_body => {}
            Ok(resp) => lost.push(format!("client {}: {resp:?}", r.client)),
            Err(e) => lost.push(format!("{e:#}")),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {CLIENTS} clients lost: {lost:#?}",
        lost.len()
    );
    let slowest = results.iter().map(|r| r.ms).max().unwrap_or(0);
    assert!(
        slowest >= 1500,
        "the clients waited for the slow starter (slowest {slowest} ms)"
    );

    assert_eq!(env.controller.wakes(), 1, "exactly one wake-up");
    assert_eq!(
        env.controller
            .unauthorised
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let wake = env.controller.last_wake.lock().unwrap().clone().unwrap();
    assert_eq!(wake.service.to_string(), "shop/web");

    // The agent counted what happened: every connection forwarded, none held now, and
    // the Service flipped to go direct.
    let m = env.metrics().await?;
    assert_eq!(m.outcome("forwarded"), CLIENTS as f64, "forwarded");
    assert_eq!(m.held(), 0.0, "nothing held any more");
    env.wait_mode(Mode::Balance).await?;
    env.shutdown().await
}
