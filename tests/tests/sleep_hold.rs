//! A connection that arrives while the controller puts its Service to sleep, end to
//! end and without random kills (issue 13's chaos lost one this way): every agent has
//! acknowledged `Sleep` (hold every new connect), a client connects and sends its
//! request, then the Deployment is scaled to zero and its pod, which ignores SIGTERM and
//! answers slowly (a loaded app), is SIGKILLed at the end of its grace period. The
//! client must get its answer from the woken pod, not an EOF from the killed one: the
//! proxy holds it instead of forwarding it to the pod going away, asks for a wake-up
//! once that pod is gone, and forwards it to the pod the wake starts.

mod wake_support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use nemesis_common::wire::{AppliedMode, Directive, ServiceDirective, ServiceRef};
use serde_json::json;
use wake_support::{APP, NS, Scenario, WakeEnv, eventually, pod_server};

/// Longer than the grace period (1 s) with room for a loaded machine: the pod answers
/// only after it would have been killed.
const ANSWER_DELAY_MS: &str = "8000";
/// Starting a pod and waking a Service on a loaded machine.
const STEP: Duration = Duration::from_secs(90);

fn slow_answering_pod() -> serde_json::Value {
    let mut pod = pod_server(
        100,
        &["--ignore-sigterm", "--answer-delay-ms", ANSWER_DELAY_MS],
    );
    // The probe is answered at once (the server delays everything else).
    pod["container"]["readinessProbe"]["httpGet"]["path"] = json!("/healthz");
    pod
}

fn sleep_directive(epoch: u64) -> Vec<ServiceDirective> {
    vec![ServiceDirective {
        service: ServiceRef {
            namespace: NS.into(),
            name: APP.into(),
        },
        directive: Directive::Sleep,
        epoch,
        hold_ports: vec![],
    }]
}

async fn scale(env: &WakeEnv, replicas: i32) -> anyhow::Result<()> {
    Api::<Deployment>::namespaced(env.client.clone(), NS)
        .patch_scale(
            APP,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await?;
    Ok(())
}

fn pod_of(body: &str) -> &str {
    body.trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_while_the_service_is_put_to_sleep_is_answered_by_the_woken_pod()
-> anyhow::Result<()> {
    let env = WakeEnv::start(Scenario {
        name: "sleephold",
        pod: slow_answering_pod(),
        policy: json!({}),
        scale_on_wake: true,
    })
    .await?;
    // Warm: the first client wakes the Service (the stand-in controller scales it).
    let first = env
        .run_clients(&["--clients", "1", "--http", "--timeout-ms", "60000"], STEP)
        .await?;
    let old_pod = pod_of(&first[0].http()?.body).to_owned();

    // The controller puts it to sleep: every agent holds new connects first.
    *env.controller.directives.lock().unwrap() = sleep_directive(1);
    eventually("the agent to acknowledge the Sleep", STEP, || async {
        Ok(env
            .controller
            .report()
            .filter(|r| r.mode == AppliedMode::Hold && r.applied_epoch == 1)
            .map(|_| ()))
    })
    .await?;

    // A client connects and sends its request after the agents' acknowledgement.
    let before = env.metrics().await?;
    let client = env
        .clients(&["--clients", "1", "--http", "--timeout-ms", "120000"])
        .await?;
    eventually("the proxy to take the connection", STEP, || async {
        let m = env.metrics().await?;
        let forwarded = m.outcome("forwarded") > before.outcome("forwarded");
        Ok((m.held() >= 1.0 || forwarded).then_some(()))
    })
    .await?;

    // The scale to zero: the pod gets SIGTERM (ignored), then SIGKILL after its grace.
    scale(&env, 0).await?;
    eventually("the old pod to be gone", STEP, || async {
        Ok(env.pod_names().await?.is_empty().then_some(()))
    })
    .await?;
    // The controller wakes the Service again for its held client.
    scale(&env, 1).await?;

    let results = client.finish(STEP).await?;
    anyhow::ensure!(
        results[0].result == "response" && !results[0].text.is_empty(),
        "the client's connection was cut (by the kill of the pod it was sent to?): {:?}",
        results[0]
    );
    let answer = results[0].http()?;
    assert_eq!(answer.status, 200, "{:?}", results[0]);
    assert_ne!(
        pod_of(&answer.body),
        old_pod,
        "answered by the woken pod, not the one the sleep stopped"
    );
    assert!(
        env.controller.wakes() >= 2,
        "the held client asked for the wake (wake-ups: {})",
        env.controller.wakes()
    );
    env.shutdown().await
}
