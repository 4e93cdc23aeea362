//! The ColdStart Event and history count every connection held over a wake, end to end
//! with the real agent (real eBPF on a child cgroup) and the real controller: ten
//! clients, one every 100 ms, wake a Service at zero whose pod is ready 2 s later. A
//! trial against a real cluster showed "1 connection held" for ten held and forwarded:
//! the count was the wake-up's (sent at the first) or the held gauge of a heartbeat,
//! which sees the ten only if one happens to fall between the last hold and the
//! forward. Here that timing varies; `controller_reconcile` pins the count down with
//! stand-in agents.

mod wake_support;

use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_controller::store::{ColdStartOutcome, PolicyId};
use serde_json::json;
use wake_support::{APP, NS, Options, Scenario, WakeEnv, eventually, slow_server};

const CLIENTS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cold_start_counts_every_connection_held_and_forwarded() -> anyhow::Result<()> {
    let env = WakeEnv::start_with_agent_flags(
        Scenario {
            name: "coldcount",
            pod: slow_server(),
            policy: json!({}),
            scale_on_wake: false,
        },
        Options {
            policy_spec: None,
            real_controller: Some(Vec::new()),
            ..Options::default()
        },
        // The default interval, as on a cluster.
        &[("--controller-heartbeat-interval", "5s".to_string())],
    )
    .await?;
    let policies: Api<ScalingPolicy> = Api::namespaced(env.client.clone(), NS);
    eventually(
        "the controller to run the policy (status state zero)",
        Duration::from_secs(30),
        || async {
            let state = policies.get(APP).await?.status.and_then(|s| s.state);
            Ok((state.as_deref() == Some("zero")).then_some(()))
        },
    )
    .await?;

    let results = env
        .repeating_clients(&[
            "--http",
            "--every-ms",
            "100",
            "--max-connections",
            &CLIENTS.to_string(),
            "--for-ms",
            "5000",
        ])
        .await?
        .finish(Duration::from_secs(60))
        .await?;
    let served = results
        .iter()
        .filter(|r| r.http().is_ok_and(|h| h.status == 200))
        .count();
    assert_eq!(served, CLIENTS, "every client served: {results:?}");
    let m = env.metrics().await?;
    assert_eq!(
        m.sum(
            "nemesis_agent_proxy_holds_total",
            &[("namespace", NS), ("service", APP)]
        ),
        CLIENTS as f64,
        "the agent counted its holds"
    );

    let store = env
        .real
        .as_ref()
        .context("the real controller")?
        .store
        .clone();
    let id = PolicyId::new(NS, APP);
    let cold = eventually("the cold start record", Duration::from_secs(20), || {
        let (store, id) = (store.clone(), id.clone());
        async move { Ok(store.cold_starts(&id, 0..u64::MAX)?.into_iter().next()) }
    })
    .await?;
    assert_eq!(cold.outcome, ColdStartOutcome::Ready, "{cold:?}");
    assert_eq!(cold.held_connections, CLIENTS as u64, "{cold:?}");
    let events: Api<Event> = Api::namespaced(env.client.clone(), NS);
    let note = eventually("the ColdStart Event", Duration::from_secs(10), || async {
        Ok(events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ColdStart"))
            .and_then(|e| e.note))
    })
    .await?;
    assert!(note.ends_with(", 10 connections held"), "{note}");
    env.shutdown().await
}
