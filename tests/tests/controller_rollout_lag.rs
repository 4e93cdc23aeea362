//! The real controller against a Deployment controller that lags (as a busy
//! controller-manager does): a scale is taken as done only once the Deployment's
//! `observedGeneration` has caught up. Scaled 1 -> 0 -> 1 faster than the lag, the
//! Deployment's status still shows the old pod ready; the cold start must not be
//! reported on that, but once the scale up was acted on.

mod wake_support;

use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use nemesis_controller::policy::ScalingPolicy;
use serde_json::{Value, json};
use wake_support::{APP, NS, Options, Scenario, WakeEnv, eventually, post_alert, quick_server};

const WAKE: &str = "NemesisLagWake";
const SLEEP: &str = "NemesisLagSleep";
const LAG: Duration = Duration::from_millis(2500);

/// zero <-> warm on two alerts, so the test decides when each scale happens.
fn policy() -> Value {
    json!({
        "target": {"deployment": APP, "service": APP},
        "metrics": {"alerts": [WAKE, SLEEP]},
        "initialState": "zero",
        "states": [{"name": "zero", "replicas": 0}, {"name": "warm", "replicas": 1}],
        "transitions": [
            {"from": "zero", "to": "warm", "when": format!("alert({WAKE})")},
            {"from": "warm", "to": "zero", "when": format!("alert({SLEEP})")},
        ],
    })
}

/// The `ms` of each ColdStart Event's `ready <ms> ms after the wake`, oldest first.
async fn cold_starts(events: &Api<Event>) -> anyhow::Result<Vec<u64>> {
    let mut out: Vec<(String, u64)> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ColdStart"))
        .filter_map(|e| {
            let note = e.note?;
            let ms = note
                .strip_prefix("ready ")?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            let at = e.metadata.creation_timestamp.map(|t| t.0.to_string())?;
            Some((at, ms))
        })
        .collect();
    out.sort();
    Ok(out.into_iter().map(|(_, ms)| ms).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_is_done_only_once_the_deployment_controller_caught_up() -> anyhow::Result<()> {
    let env = WakeEnv::start_with(
        Scenario {
            name: "lag",
            pod: quick_server(),
            policy: json!({}),
            scale_on_wake: false,
        },
        Options {
            policy_spec: Some(policy()),
            real_controller: Some(Vec::new()),
            rollout_lag: LAG,
            ..Options::default()
        },
    )
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), NS);
    let events: Api<Event> = Api::namespaced(env.client.clone(), NS);
    let policies: Api<ScalingPolicy> = Api::namespaced(env.client.clone(), NS);
    eventually("the policy at zero", Duration::from_secs(30), || async {
        let p = policies.get(APP).await?;
        Ok((p.status.and_then(|s| s.state).as_deref() == Some("zero")).then_some(()))
    })
    .await?;

    post_alert(&env, WAKE, true).await?;
    eventually(
        "one ready replica, caught up",
        Duration::from_secs(30),
        || async {
            let d = deployments.get(APP).await?;
            let s = d.status.unwrap_or_default();
            Ok((d.spec.replicas == Some(1)
                && s.ready_replicas == Some(1)
                && s.observed_generation == d.metadata.generation)
                .then_some(()))
        },
    )
    .await?;
    eventually("the first cold start", Duration::from_secs(30), || async {
        Ok((cold_starts(&events).await?.len() == 1).then_some(()))
    })
    .await?;

    post_alert(&env, WAKE, false).await?;
    post_alert(&env, SLEEP, true).await?;
    eventually("the scale to zero", Duration::from_secs(30), || async {
        let d = deployments.get(APP).await?;
        Ok((d.spec.replicas == Some(0)).then_some(d))
    })
    .await?;
    // At once, well within the lag: the status still shows the old pod ready.
    post_alert(&env, SLEEP, false).await?;
    post_alert(&env, WAKE, true).await?;
    let stale = deployments.get(APP).await?;
    let s = stale.status.clone().unwrap_or_default();
    anyhow::ensure!(
        s.ready_replicas == Some(1) && s.observed_generation < stale.metadata.generation,
        "the test needs the stale status a lagging controller leaves: {s:?}"
    );

    let starts = eventually("the second cold start", Duration::from_secs(30), || async {
        let s = cold_starts(&events).await?;
        Ok((s.len() == 2).then_some(s))
    })
    .await?;
    let second = *starts.last().context("two cold starts")?;
    anyhow::ensure!(
        second >= 1000,
        "the cold start was reported {second} ms after the wake, before the Deployment \
         controller acted on the scale (lag {LAG:?}): taken as done on the old pod's readiness"
    );
    env.shutdown().await
}
