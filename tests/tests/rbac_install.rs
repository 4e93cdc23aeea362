//! The real agent (real eBPF on a child cgroup) and the real controller run as their
//! ServiceAccounts, with exactly the rules of `manifests/base/rbac.yaml` applied to the
//! test API server, which enforces them as a cluster does. With the rules as shipped a
//! wake and a sleep go through and the server refuses nothing; with one rule removed the
//! component that needs it fails, saying which permission it lacks (verb, resource, API
//! group, namespace) and where its rules are granted.

mod wake_support;

use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_tests::demo::apply::Manifest;
use serde_json::{Value, json};
use wake_support::{
    APP, NS, Options, SYSTEM_NS, Scenario, WakeEnv, eventually, post_alert, quick_server,
    remove_rule,
};

const ALERT: &str = "NemesisRbacSleep";
const CONTROLLER_USER: &str = "system:serviceaccount:nemesis-system:nemesis-controller";
const AGENT_USER: &str = "system:serviceaccount:nemesis-system:nemesis-agent";

fn as_shipped(_: &mut [Manifest]) {}

fn without_scale(m: &mut [Manifest]) {
    remove_rule(m, "nemesis-controller", "deployments/scale");
}

fn without_endpoint_slices(m: &mut [Manifest]) {
    remove_rule(m, "nemesis-agent", "endpointslices");
}

/// zero --demand--> warm --alert--> zero: the sleep comes when the test says.
fn policy() -> Value {
    json!({
        "target": {"deployment": APP, "service": APP},
        "metrics": {"alerts": [ALERT]},
        "initialState": "zero",
        "states": [{"name": "zero", "replicas": 0}, {"name": "warm", "replicas": 1}],
        "transitions": [
            {"from": "zero", "to": "warm", "when": "demand"},
            {"from": "warm", "to": "zero", "when": format!("alert({ALERT})")},
        ],
        "holdTimeoutSeconds": 30,
    })
}

async fn start(
    name: &'static str,
    rbac: wake_support::RbacEdit,
    real: bool,
) -> anyhow::Result<WakeEnv> {
    WakeEnv::start_with(
        Scenario {
            name,
            pod: quick_server(),
            policy: json!({}),
            scale_on_wake: false,
        },
        Options {
            policy_spec: Some(policy()),
            real_controller: real.then(|| vec!["--lease-namespace".into(), SYSTEM_NS.into()]),
            rbac: Some(rbac),
            skip_ready_wait: !real,
            ..Options::default()
        },
    )
    .await
}

async fn wait_policy_state(env: &WakeEnv, state: &str) -> anyhow::Result<()> {
    let policies: Api<ScalingPolicy> = Api::namespaced(env.client.clone(), NS);
    eventually(
        &format!("the policy in state {state}"),
        Duration::from_secs(30),
        || async {
            let p = policies.get(APP).await?;
            Ok((p.status.and_then(|s| s.state).as_deref() == Some(state)).then_some(()))
        },
    )
    .await
}

async fn wait_replicas(env: &WakeEnv, want: i32) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), NS);
    eventually(
        &format!("the Deployment at {want}"),
        Duration::from_secs(30),
        || async {
            let d = deployments.get(APP).await?;
            Ok((d.spec.replicas == Some(want)).then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_rules_are_enough_for_a_wake_and_a_sleep() -> anyhow::Result<()> {
    let env = start("rbacok", as_shipped, true).await?;
    wait_policy_state(&env, "zero").await?;
    let results = env
        .run_clients(
            &["--http", "--clients", "1", "--timeout-ms", "30000"],
            Duration::from_secs(40),
        )
        .await?;
    let r = results.first().context("one client")?.http()?;
    anyhow::ensure!(r.status == 200, "the woken service answered {r:?}");
    wait_replicas(&env, 1).await?;

    post_alert(&env, ALERT, true).await?;
    wait_replicas(&env, 0).await?;
    wait_policy_state(&env, "zero").await?;

    // Both components spoke to the API as their ServiceAccounts, and the server refused
    // neither anything (a refusal retried in the background would hide here).
    let requests = env.server.as_ref().context("the API server")?.requests();
    for user in [CONTROLLER_USER, AGENT_USER] {
        anyhow::ensure!(
            requests.iter().any(|r| r.user == user),
            "no request from {user}"
        );
    }
    let refused: Vec<_> = requests
        .iter()
        .filter(|r| r.status == 403 || r.status == 401)
        .collect();
    anyhow::ensure!(refused.is_empty(), "refused: {refused:#?}");
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_without_the_scale_rule_says_which_permission_it_lacks() -> anyhow::Result<()>
{
    let env = start("rbacscale", without_scale, true).await?;
    wait_policy_state(&env, "zero").await?;
    // A held client asks for a wake-up; the scale that should follow is refused.
    let clients = env
        .clients(&["--http", "--clients", "1", "--timeout-ms", "30000"])
        .await?;
    let events: Api<Event> = Api::namespaced(env.client.clone(), NS);
    let note = eventually("a ScaleFailed Event", Duration::from_secs(30), || async {
        Ok(events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ScaleFailed"))
            .and_then(|e| e.note))
    })
    .await?;
    for want in [
        "permission denied",
        &format!(
            "User \"{CONTROLLER_USER}\" cannot patch resource \"deployments/scale\" in API group \"apps\" in the namespace \"{NS}\""
        ),
        "ClusterRole nemesis-controller",
        "manifests/base/rbac.yaml",
    ] {
        anyhow::ensure!(
            note.contains(want),
            "the Event's note lacks {want:?}: {note}"
        );
    }
    anyhow::ensure!(
        !note.contains("Status {"),
        "no debug dump in the note: {note}"
    );
    // It is the only thing refused: the rest of the rules still hold.
    let requests = env.server.as_ref().context("the API server")?.requests();
    let refused: Vec<String> = requests
        .iter()
        .filter(|r| r.status == 403)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    anyhow::ensure!(
        !refused.is_empty()
            && refused
                .iter()
                .all(|r| r
                    == &format!("PATCH /apis/apps/v1/namespaces/{NS}/deployments/{APP}/scale")),
        "refused: {refused:?}"
    );
    // The held client would wait out its hold; it leaves the cgroup now.
    drop(clients);
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_the_endpoint_slice_rule_is_unready_and_says_why() -> anyhow::Result<()> {
    let env = start("rbaceps", without_endpoint_slices, false).await?;
    let body = eventually(
        "the agent's /readyz to say why it is not ready",
        Duration::from_secs(30),
        || async {
            let (status, body) = env.http_get_admin("/readyz").await?;
            Ok((status == 503 && body.contains("permission denied")).then_some(body))
        },
    )
    .await?;
    for want in [
        "endpoints (EndpointSlices: permission denied",
        &format!(
            "User \"{AGENT_USER}\" cannot list resource \"endpointslices\" in API group \"discovery.k8s.io\" at the cluster scope"
        ),
        "ClusterRole nemesis-agent in manifests/base/rbac.yaml",
    ] {
        anyhow::ensure!(body.contains(want), "/readyz lacks {want:?}: {body}");
    }
    env.shutdown().await
}
