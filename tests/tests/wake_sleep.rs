//! The sleep handshake on the agent's side, end to end: the controller's heartbeat
//! reply asks to hold a warm Service (`Sleep`, before it scales to zero); the agent
//! flips the datapath to hold and acknowledges the epoch in its next heartbeat. A connect
//! meanwhile goes to the proxy, which holds it (its backends are about to be stopped)
//! and reports it held; `Follow` at a newer epoch (the sleep given up) flips the
//! datapath back and sends the held connections to the still-ready pod.
//! (`sleep_hold` follows a held connection through the scale to zero instead.)

mod wake_support;

use std::time::Duration;

use nemesis_agent::ebpf::Mode;
use nemesis_common::wire::{AppliedMode, Directive, ServiceDirective, ServiceRef};
use serde_json::json;
use wake_support::{APP, NS, Scenario, WakeEnv, eventually, slow_server};

fn directive(directive: Directive, epoch: u64) -> Vec<ServiceDirective> {
    vec![ServiceDirective {
        service: ServiceRef {
            namespace: NS.into(),
            name: APP.into(),
        },
        directive,
        epoch,
        hold_ports: vec![],
        after_zero: false,
    }]
}

async fn acknowledged(env: &WakeEnv, mode: AppliedMode, epoch: u64) -> anyhow::Result<()> {
    eventually(
        &format!("the agent to acknowledge epoch {epoch} in {mode:?}"),
        Duration::from_secs(5),
        || async {
            Ok(env
                .controller
                .report()
                .filter(|r| r.mode == mode && r.applied_epoch == epoch)
                .map(|_| ()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_directive_holds_a_warm_service_and_is_acknowledged() -> anyhow::Result<()> {
    let env = WakeEnv::start(Scenario {
        name: "sleep",
        pod: slow_server(),
        policy: json!({}),
        scale_on_wake: true,
    })
    .await?;
    let first = env
        .run_clients(&["--clients", "1", "--http"], Duration::from_secs(30))
        .await?;
    assert_eq!(first[0].http()?.status, 200);
    env.wait_mode(Mode::Balance).await?;

    *env.controller.directives.lock().unwrap() = directive(Directive::Sleep, 1);
    env.wait_mode(Mode::Hold).await?;
    acknowledged(&env, AppliedMode::Hold, 1).await?;

    let before = env.metrics().await?;
    let held = env
        .clients(&["--clients", "3", "--http", "--timeout-ms", "60000"])
        .await?;
    eventually("3 connections held", Duration::from_secs(30), || async {
        Ok((env.metrics().await?.held() == 3.0).then_some(()))
    })
    .await?;
    eventually(
        "the controller to see them held",
        Duration::from_secs(30),
        || async {
            Ok(env
                .controller
                .report()
                .filter(|r| r.held_connections == 3)
                .map(|_| ()))
        },
    )
    .await?;
    let during = env.metrics().await?;
    assert_eq!(
        env.controller.wakes(),
        1,
        "no wake-up while the backends are listed"
    );
    assert_eq!(
        during.outcome("forwarded"),
        before.outcome("forwarded"),
        "nothing sent to the pod the sleep is about to stop"
    );

    // The sleep given up: the held connections go to the pod that stays.
    *env.controller.directives.lock().unwrap() = directive(Directive::Follow, 2);
    for r in &held.finish(Duration::from_secs(60)).await? {
        assert_eq!(r.http()?.status, 200, "client {}", r.client);
    }
    let after = env.metrics().await?;
    assert_eq!(
        after.outcome("forwarded") - before.outcome("forwarded"),
        3.0,
        "held by the proxy, then forwarded to the still-ready pod"
    );
    env.wait_mode(Mode::Balance).await?;
    acknowledged(&env, AppliedMode::Balance, 2).await?;
    env.shutdown().await
}
