//! Scale to zero under continuous traffic, end to end with the real controller (started
//! in-process as `nemesis-controller run` does) and the real agent (real eBPF on a child
//! cgroup) on the sandbox. A client in the intercepted cgroup opens a new connection
//! every 30 ms throughout; an Alertmanager webhook the test posts sends the policy from
//! warm to zero; the controller asks the agent to hold, waits for its acknowledgement,
//! only then scales to 0; held connections wake it again. Every connection is served.

mod wake_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use nemesis_agent::ebpf::{Mode, Proto};
use nemesis_common::wire::{AppliedMode, Directive, ServiceRef};
use nemesis_controller::agents::AgentRegistry;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_controller::store::{ColdStartOutcome, PolicyId};
use serde_json::{Value, json};
use tokio::time::Instant;
use wake_support::{APP, NS, Options, Scenario, WakeEnv, eventually, pod_server, post_alert};

/// The alert that sends the policy to sleep.
const ALERT: &str = "NemesisSleepNow";
/// One new connection this often (each one a `GET` with `Connection: close`).
const EVERY_MS: &str = "30";
/// The clients run at least this long (about 200 connections), however fast the cycle.
const TRAFFIC_AT_LEAST: Duration = Duration::from_secs(6);

/// zero --demand--> warm --alert--> zero: the sleep is an event the test controls, so it
/// fires while the client keeps the Service busy (an idle window never would).
fn policy() -> Value {
    json!({
        "target": {"deployment": APP, "service": APP},
        "metrics": {"alerts": [ALERT]},
        "initialState": "zero",
        "states": [
            {"name": "zero", "replicas": 0},
            {"name": "warm", "replicas": 1},
        ],
        "transitions": [
            {"from": "zero", "to": "warm", "when": "demand"},
            {"from": "warm", "to": "zero", "when": format!("alert({ALERT})")},
        ],
        "holdTimeoutSeconds": 30,
    })
}

fn svc() -> ServiceRef {
    ServiceRef {
        namespace: NS.into(),
        name: APP.into(),
    }
}

/// What the controller's registry said about the agent when the Deployment was seen at 0.
#[derive(Debug, Clone)]
struct AtZero {
    at: Instant,
    directive: Option<(Directive, u64)>,
    /// (live, mode, applied epoch) of every agent that reports the Service.
    agents: Vec<(bool, AppliedMode, u64)>,
}

/// Every distinct `spec.replicas` of the Deployment in order with when the watch saw it,
/// and the registry's view at each drop to 0.
#[derive(Default)]
struct Log {
    replicas: Vec<(Instant, i32)>,
    at_zero: Vec<AtZero>,
}

fn watch_deployment(
    api: Api<Deployment>,
    registry: Arc<AgentRegistry>,
) -> (Arc<Mutex<Log>>, tokio_util::task::AbortOnDropHandle<()>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let l2 = log.clone();
    let cfg = watcher::Config::default().fields(&format!("metadata.name={APP}"));
    let task = tokio::spawn(async move {
        // With a backoff: once the API server is gone, a watcher without one retries in
        // a loop that never yields, and the runtime can then never shut down.
        let stream = watcher::watcher(api, cfg).default_backoff();
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            let (Ok(Event::Apply(d)) | Ok(Event::InitApply(d))) = ev else {
                continue;
            };
            let now = Instant::now();
            let r = d.spec.replicas.unwrap_or(1);
            let mut log = l2.lock().unwrap();
            if log.replicas.last().map(|(_, x)| *x) == Some(r) {
                continue;
            }
            log.replicas.push((now, r));
            if r == 0 && log.replicas.len() > 1 {
                let agents = registry
                    .agents(now)
                    .into_iter()
                    .filter_map(|a| {
                        let rep = a.services.iter().find(|s| s.service == svc())?;
                        Some((a.live, rep.mode, rep.applied_epoch))
                    })
                    .collect();
                let directive = registry.directive(&svc()).map(|d| (d.directive, d.epoch));
                log.at_zero.push(AtZero {
                    at: now,
                    directive,
                    agents,
                });
            }
        }
    });
    (log, tokio_util::task::AbortOnDropHandle::new(task))
}

fn replicas_seen(log: &Mutex<Log>) -> Vec<i32> {
    log.lock()
        .unwrap()
        .replicas
        .iter()
        .map(|(_, r)| *r)
        .collect()
}

async fn wait_replicas_seen(
    log: &Mutex<Log>,
    want: &[i32],
    within: Duration,
) -> anyhow::Result<()> {
    eventually(&format!("replicas {want:?}"), within, || async {
        Ok((replicas_seen(log) == want).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_is_served_while_the_service_sleeps_after_its_agents_hold()
-> anyhow::Result<()> {
    let env = WakeEnv::start_with(
        Scenario {
            name: "sthru",
            pod: pod_server(100, &["--ignore-sigterm"]),
            policy: json!({}),
            scale_on_wake: false,
        },
        Options {
            policy_spec: Some(policy()),
            real_controller: Some(Vec::new()),
            ..Options::default()
        },
    )
    .await?;
    let real = env.real.as_ref().context("the real controller")?;
    let (log, watch) = watch_deployment(
        Api::namespaced(env.client.clone(), NS),
        real.registry.clone(),
    );
    wait_replicas_seen(&log, &[0], Duration::from_secs(10)).await?;
    // Traffic starts once the controller runs the policy (it writes the state into the
    // status after it manages the Service): a wake-up before that is refused as
    // unmanaged and its held clients get a 503 (seen on a loaded machine: 10 s of them,
    // 316 of 554 connections refused, before any sleep).
    let policies: Api<ScalingPolicy> = Api::namespaced(env.client.clone(), NS);
    eventually(
        "the controller to run the policy (status state zero)",
        Duration::from_secs(30),
        || async {
            let p = policies.get(APP).await?;
            let state = p.status.and_then(|s| s.state);
            Ok((state.as_deref() == Some("zero")).then_some(()))
        },
    )
    .await?;

    // The datapath mode of the Service as it changes, sampled every 2 ms while the
    // scenario runs (the agent is in this process).
    let modes: Mutex<Vec<(Instant, Mode)>> = Mutex::new(Vec::new());
    let sample_modes = async {
        loop {
            let mode = env
                .agent()
                .datapath()
                .service(env.service_addr, Proto::Tcp)
                .map(|e| e.mode);
            if let Some(mode) = mode {
                let mut m = modes.lock().unwrap();
                if m.last().map(|(_, x)| *x) != Some(mode) {
                    m.push((Instant::now(), mode));
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };

    let scenario = async {
        let clients = env
            .repeating_clients(&[
                "--http",
                "--every-ms",
                EVERY_MS,
                "--max-connections",
                "2000",
                "--for-ms",
                "60000",
                "--timeout-ms",
                "30000",
            ])
            .await?;
        let traffic_from = Instant::now();
        // The first connects wake it from zero; then they go direct.
        wait_replicas_seen(&log, &[0, 1], Duration::from_secs(15)).await?;
        env.wait_mode(Mode::Balance).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = env.metrics().await?;

        post_alert(&env, ALERT, true).await?;
        wait_replicas_seen(&log, &[0, 1, 0], Duration::from_secs(30)).await?;
        // Asleep: the alert has done its job (and must not send the woken target back).
        post_alert(&env, ALERT, false).await?;
        wait_replicas_seen(&log, &[0, 1, 0, 1], Duration::from_secs(30)).await?;
        env.wait_mode(Mode::Balance).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = env.metrics().await?;
        // Traffic for long enough to count as continuous (a connection every 30 ms): in
        // balance mode the whole cycle can take under 3 s.
        tokio::time::sleep_until(traffic_from + TRAFFIC_AT_LEAST).await;
        let results = clients.stop(Duration::from_secs(40)).await?;
        Ok::<_, anyhow::Error>((before, after, results))
    };
    let (before, after, results) = tokio::select! {
        r = scenario => r?,
        _ = sample_modes => unreachable!("the sampler never ends"),
    };

    // Every connection: a complete, correct 200 from a pod of the Deployment.
    let mut failures = Vec::new();
    for r in &results {
        match r.http() {
            Ok(h) if h.status == 200 && h.body.starts_with(&format!("{APP}-")) => {}
            Ok(h) => failures.push(format!(
                "client {} (started {} ms, took {} ms): {} {:?}",
                r.client, r.started_ms, r.ms, h.status, h.body
            )),
            Err(e) => failures.push(format!(
                "client {} (started {} ms, took {} ms): {e:#} [{}]",
                r.client, r.started_ms, r.ms, r.error_kind
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} connections not served:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n")
    );
    assert!(
        results.len() >= 100,
        "continuous traffic: only {} connections",
        results.len()
    );
    // Served by the first pod, then (it was gone) by the one the wake started.
    let mut pods: Vec<String> = Vec::new();
    let mut by_start = results.clone();
    by_start.sort_by_key(|r| r.started_ms);
    for r in &by_start {
        let pod = r.http()?.body.trim().to_string();
        if !pods.contains(&pod) {
            pods.push(pod);
        }
    }
    assert_eq!(
        pods.len(),
        2,
        "one pod before the sleep, another after: {pods:?}"
    );
    let slowest = results.iter().map(|r| r.ms).max().unwrap_or(0);
    eprintln!(
        "{} connections, all served; slowest {slowest} ms",
        results.len()
    );

    // The order: at the moment the Deployment went to 0, the controller's current
    // directive was Sleep and the (only, live) agent had acknowledged it in hold mode.
    let drops = log.lock().unwrap().at_zero.clone();
    let [at_zero] = drops.as_slice() else {
        panic!("one drop to zero expected: {:?}", replicas_seen(&log));
    };
    let Some((Directive::Sleep, epoch)) = at_zero.directive else {
        panic!("no Sleep directive when the Deployment reached 0: {at_zero:?}");
    };
    assert_eq!(
        at_zero.agents.len(),
        1,
        "exactly our agent reports: {at_zero:?}"
    );
    let (live, mode, applied) = at_zero.agents[0];
    assert!(live, "{at_zero:?}");
    assert_eq!(mode, AppliedMode::Hold, "{at_zero:?}");
    assert!(
        applied >= epoch,
        "acknowledged before the scale: {at_zero:?}"
    );
    // ... and the datapath had flipped to hold before that.
    let modes = modes.lock().unwrap().clone();
    let held_from = modes
        .iter()
        .rev()
        .find(|(at, m)| *at < at_zero.at && *m == Mode::Hold)
        .map(|(at, _)| *at);
    let direct_before_zero = modes
        .iter()
        .filter(|(at, m)| *at < at_zero.at && *m == Mode::Balance)
        .map(|(at, _)| *at)
        .next_back();
    assert!(
        held_from
            .zip(direct_before_zero)
            .is_some_and(|(h, d)| h > d),
        "the datapath was not holding when the Deployment reached 0: {modes:?} at {:?}",
        at_zero.at
    );

    // Connections went through the proxy during the cycle, and held ones woke it.
    let forwarded = after.outcome("forwarded") - before.outcome("forwarded");
    assert!(forwarded >= 1.0, "no connection went through the proxy");
    let wakeups = |m: &wake_support::Metrics| {
        m.sum(
            "nemesis_agent_proxy_wakeups_total",
            &[("namespace", NS), ("service", APP), ("result", "accepted")],
        )
    };
    assert!(
        wakeups(&after) - wakeups(&before) >= 1.0,
        "the proxy held connections while the target was at zero and woke it"
    );
    for outcome in ["timeout", "overflow", "client_gone", "backend_failed"] {
        assert_eq!(
            after.outcome(outcome),
            before.outcome(outcome),
            "proxy outcome {outcome}"
        );
    }

    // The controller's history tells the same story.
    let id = PolicyId::new(NS, APP);
    let store = env.real.as_ref().context("controller")?.store.clone();
    let transitions = eventually(
        "three transitions in the history",
        Duration::from_secs(5),
        || {
            let store = store.clone();
            let id = id.clone();
            async move {
                let t = store.transitions(&id, 0..u64::MAX)?;
                Ok((t.len() >= 3).then_some(t))
            }
        },
    )
    .await?;
    let pairs: Vec<(&str, &str)> = transitions
        .iter()
        .map(|t| (t.from_state.as_str(), t.to_state.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [("zero", "warm"), ("warm", "zero"), ("zero", "warm")]
    );
    let scales: Vec<(i32, i32)> = store
        .scale_events(&id, 0..u64::MAX)?
        .iter()
        .map(|s| (s.from_replicas, s.to_replicas))
        .collect();
    assert_eq!(scales, [(0, 1), (1, 0), (0, 1)]);
    let sleep_at = transitions[1].at_ms;
    let cold = eventually("the second cold start", Duration::from_secs(5), || {
        let store = store.clone();
        let id = id.clone();
        async move {
            let c = store.cold_starts(&id, sleep_at..u64::MAX)?;
            Ok(c.into_iter().next())
        }
    })
    .await?;
    assert_eq!(cold.outcome, ColdStartOutcome::Ready, "{cold:?}");
    assert!(
        cold.held_connections >= 1,
        "connections were held while it woke: {cold:?}"
    );

    // The agent talked to the real controller only.
    assert_eq!(env.controller.wakes(), 0);
    assert!(env.controller.last_heartbeat.lock().unwrap().is_none());
    drop(watch);
    env.shutdown().await
}
