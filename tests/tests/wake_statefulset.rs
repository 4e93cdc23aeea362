//! A policy that targets a StatefulSet (`{kind: StatefulSet, name: web}`): the real
//! agent (real eBPF on a child cgroup) and the real controller, as their ServiceAccounts
//! with exactly `manifests/base/rbac.yaml` on the RBAC-enforcing test API server. A held
//! client wakes the set (pod `web-0`) and gets its answer; an alert puts it back to
//! zero; the status names the target; the API server refused nothing. Root required.

mod wake_support;

use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_tests::demo::apply::Manifest;
use serde_json::{Value, json};
use wake_support::{
    APP, NS, Options, SYSTEM_NS, Scenario, WakeEnv, eventually, post_alert, quick_server,
};

const ALERT: &str = "NemesisStatefulSleep";

fn as_shipped(_: &mut [Manifest]) {}

/// zero --demand--> warm --alert--> zero, on the StatefulSet.
fn policy() -> Value {
    json!({
        "target": {"kind": "StatefulSet", "name": APP, "service": APP},
        "metrics": {"alerts": [ALERT]},
        "initialState": "zero",
        "states": [{"name": "zero", "replicas": 0}, {"name": "warm", "replicas": 1}],
        "transitions": [
            {"from": "zero", "to": "warm", "when": "demand"},
            {"from": "warm", "to": "zero", "when": format!("alert({ALERT})")},
        ],
        "holdTimeoutSeconds": 60,
    })
}

async fn wait_policy_state(env: &WakeEnv, state: &str) -> anyhow::Result<ScalingPolicy> {
    let policies: Api<ScalingPolicy> = Api::namespaced(env.client.clone(), NS);
    eventually(
        &format!("the policy in state {state}"),
        Duration::from_secs(60),
        || async {
            let p = policies.get(APP).await?;
            let s = p.status.as_ref().and_then(|s| s.state.as_deref());
            Ok((s == Some(state)).then_some(p))
        },
    )
    .await
}

async fn wait_replicas(env: &WakeEnv, want: i32) -> anyhow::Result<()> {
    let sets: Api<StatefulSet> = Api::namespaced(env.client.clone(), NS);
    eventually(
        &format!("the StatefulSet at {want}"),
        Duration::from_secs(60),
        || async {
            let s = sets.get(APP).await?;
            Ok((s.spec.replicas == Some(want)).then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_is_woken_by_a_held_client_and_put_back_to_zero() -> anyhow::Result<()> {
    let env = WakeEnv::start_with(
        Scenario {
            name: "wakests",
            pod: quick_server(),
            policy: json!({}),
            scale_on_wake: false,
        },
        Options {
            policy_spec: Some(policy()),
            real_controller: Some(vec!["--lease-namespace".into(), SYSTEM_NS.into()]),
            rbac: Some(as_shipped),
            stateful_set: true,
            ..Options::default()
        },
    )
    .await?;
    let p = wait_policy_state(&env, "zero").await?;
    let status = p.status.context("a status")?;
    anyhow::ensure!(
        status.target.as_deref() == Some("StatefulSet/web"),
        "status.target: {:?}",
        status.target
    );

    let results = env
        .run_clients(
            &["--http", "--clients", "1", "--timeout-ms", "60000"],
            Duration::from_secs(90),
        )
        .await?;
    let r = results.first().context("one client")?.http()?;
    anyhow::ensure!(r.status == 200, "the woken StatefulSet answered {r:?}");
    wait_replicas(&env, 1).await?;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), NS);
    anyhow::ensure!(
        pods.get_opt(&format!("{APP}-0")).await?.is_some(),
        "the StatefulSet's pod {APP}-0 runs"
    );
    wait_policy_state(&env, "warm").await?;

    post_alert(&env, ALERT, true).await?;
    wait_replicas(&env, 0).await?;
    wait_policy_state(&env, "zero").await?;

    // The controller read and scaled the StatefulSet with the shipped rules only.
    let requests = env.server.as_ref().context("the API server")?.requests();
    let refused: Vec<String> = requests
        .iter()
        .filter(|r| r.status == 403 || r.status == 401)
        .map(|r| format!("{} {} {}", r.user, r.method, r.path))
        .collect();
    anyhow::ensure!(refused.is_empty(), "refused: {refused:#?}");
    anyhow::ensure!(
        requests.iter().any(|r| r.method == "PATCH"
            && r.path == format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{APP}/scale")),
        "the StatefulSet was scaled through /scale"
    );
    env.shutdown().await
}
