//! The controller's two paths against the test API server and the sandbox (real pod
//! processes, real readiness): a short-form policy keeps a Deployment at zero until a
//! wake-up posted to the agents' API scales it up; once idle it asks every live agent to
//! hold and scales to zero only after each one acknowledged; an agent that never
//! acknowledges keeps the target up; a target scaled outside the policy is put back
//! with an Event saying so; an invalid policy says where it is wrong and scales nothing. Root required (the sandbox makes network namespaces).

mod controller_support;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use controller_support::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use nemesis_common::wire::{Directive, ServiceRef};
use nemesis_controller::policy::{ScalingPolicy, compile};
use nemesis_controller::store::{ColdStartOutcome, PolicyId};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::kubelet::{Sandbox, SandboxOptions};
use serde_json::json;

/// The pod server binary the sandbox runs.
const SERVER: &str = env!("CARGO_BIN_EXE_nemesis-pod-server");
const PORT: u16 = 8080;

struct World {
    server: TestApiServer,
    client: Client,
    sandbox: Option<Sandbox>,
    ns: String,
}

impl World {
    async fn start(prefix: &str, with_sandbox: bool) -> anyhow::Result<Self> {
        init_tracing();
        let server = TestApiServer::start(ApiServerOptions::default()).await?;
        let client = server.client().await?;
        install_crd(&client).await?;
        let ns = format!("{prefix}-{}", std::process::id());
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
            )
            .await
            .context("creating the test namespace")?;
        let sandbox = if with_sandbox {
            Some(Sandbox::start(client.clone(), SandboxOptions::default()).await?)
        } else {
            None
        };
        Ok(Self {
            server,
            client,
            sandbox,
            ns,
        })
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn policies(&self) -> Api<ScalingPolicy> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn svc(&self, name: &str) -> ServiceRef {
        ServiceRef {
            namespace: self.ns.clone(),
            name: name.into(),
        }
    }

    /// A Service and a Deployment of the pod server (HTTP readiness probe) at `replicas`.
    async fn app(&self, name: &str, replicas: i32) -> anyhow::Result<()> {
        Api::<Service>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &service(name))
            .await?;
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name},
                                 "annotations": {"nemesis.test/probe-period-ms": "100"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 2,
                        "containers": [{
                            "name": "server",
                            "image": "local/nemesis-pod-server",
                            "command": [SERVER],
                            "args": ["--port", PORT.to_string()],
                            "ports": [{"name": "http", "containerPort": PORT}],
                            "readinessProbe": {"httpGet": {"path": "/", "port": "http"},
                                               "periodSeconds": 1},
                        }],
                    },
                },
            },
        }))?;
        self.deployments()
            .create(&PostParams::default(), &d)
            .await?;
        Ok(())
    }

    async fn ready_replicas(&self, name: &str) -> anyhow::Result<i32> {
        let d = self.deployments().get(name).await?;
        Ok(d.status.and_then(|s| s.ready_replicas).unwrap_or(0))
    }

    async fn shutdown(self) -> anyhow::Result<()> {
        if let Some(s) = self.sandbox {
            s.shutdown().await?;
        }
        self.server.shutdown().await;
        Ok(())
    }
}

/// The Events the controller published about policy `name`, as (reason, note).
async fn events(client: &Client, ns: &str, name: &str) -> anyhow::Result<Vec<(String, String)>> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_scales_from_zero_and_an_idle_target_sleeps_only_after_every_agent_holds()
-> anyhow::Result<()> {
    let w = World::start("ctl-wake-sleep", true).await?;
    w.app("web", 0).await?;
    let dir = tempfile::tempdir()?;
    let c = start_controller(&w.server, dir.path(), &[]).await?;
    wait_leading(&c, Duration::from_secs(10)).await?;
    let svc = w.svc("web");
    // Two agents: one acknowledges at once, the other a second and a half late.
    let quick = TestAgent::start("node-a", vec![svc.clone()], vec![c.api_addr]);
    let slow = TestAgent::start("node-b", vec![svc.clone()], vec![c.api_addr]);
    let log = ReplicaLog::start(w.deployments(), "web");
    w.policies()
        .create(
            &PostParams::default(),
            &policy(
                "web",
                json!({
                    "target": {"deployment": "web", "service": "web"},
                    "minReplicas": 0,
                    "maxReplicas": 1,
                    "idleTimeout": "3s",
                }),
            ),
        )
        .await?;

    // A new policy on a target at zero starts asleep and leaves it there.
    let p = wait_state(&w.policies(), "web", "zero", Duration::from_secs(10)).await?;
    let ready = p.status.unwrap().conditions;
    assert!(
        ready
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "{ready:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(replicas(&w.deployments(), "web").await?, 0);

    // The wake-up: scaled to 1 at once, and the pod becomes ready. The wake-up says 3
    // held; the agents go on holding, 12 in all, and forward them all at readiness.
    quick.set(|s| (s.holding, s.holds) = (true, 10));
    slow.set(|s| (s.holding, s.holds) = (true, 2));
    let http = Http::default();
    let woke = Instant::now();
    let (status, body) = http.wake(c.api_addr, "node-a", &svc, 3).await?;
    assert_eq!(
        (status, body["accepted"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    // "At once": the wake request itself scales; the bound leaves room for a loaded
    // machine (1 s failed there) and the replica wait above is the real limit.
    let scaled = wait_replicas(&w.deployments(), "web", 1, Duration::from_secs(5)).await?;
    assert!(
        scaled - woke < Duration::from_secs(3),
        "scaled {:?} after the wake",
        scaled - woke
    );
    eventually("a ready pod", Duration::from_secs(30), || async {
        Ok((w.ready_replicas("web").await? == 1).then_some(()))
    })
    .await?;
    quick.set(|s| s.holding = false);
    slow.set(|s| s.holding = false);
    let id = PolicyId::new(&w.ns, "web");
    let cold = eventually("the cold start record", Duration::from_secs(10), || async {
        let v = c.store.cold_starts(&id, 0..u64::MAX)?;
        Ok((!v.is_empty()).then_some(v))
    })
    .await?;
    assert_eq!(cold.len(), 1);
    assert_eq!(cold[0].outcome, ColdStartOutcome::Ready);
    assert!(cold[0].time_to_ready_ms.is_some_and(|ms| ms > 0));
    // Every connection held over the wake (a real cluster's Event said "1 connection
    // held" for 10: the count was the wake-up's, or a heartbeat's gauge).
    assert_eq!(cold[0].held_connections, 12, "{:?}", cold[0]);
    assert_eq!(
        scrape(&c, "nemesis_controller_wake_latency_seconds_count").await?,
        1.0
    );
    assert_eq!(scrape(&c, "nemesis_controller_live_agents").await?, 2.0);
    assert_eq!(
        scrape(
            &c,
            "nemesis_controller_scale_operations_total{direction=\"from_zero\"}"
        )
        .await?,
        1.0
    );
    assert!(
        scrape(
            &c,
            "nemesis_controller_decisions_total{outcome=\"transition\"}"
        )
        .await?
            >= 1.0
    );
    assert!(scrape(&c, "nemesis_controller_reconciles_total").await? > 1.0);
    wait_state(&w.policies(), "web", "warm", Duration::from_secs(5)).await?;

    // Idle: both agents report nothing open. The slow agent holds back its answer.
    slow.set(|s| s.ack = false);
    let sleep_asked = eventually("a hold request", Duration::from_secs(20), || async {
        Ok(c.registry
            .directive(&svc)
            .filter(|d| d.directive == Directive::Sleep)
            .map(|d| (d.epoch, Instant::now())))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        replicas(&w.deployments(), "web").await?,
        1,
        "not scaled to zero while an agent has not acknowledged"
    );
    slow.set(|s| s.ack = true);
    let zero = wait_replicas(&w.deployments(), "web", 0, Duration::from_secs(10)).await?;
    for agent in [&quick, &slow] {
        let acks = agent.snapshot().acks;
        let (_, _, at) = acks
            .iter()
            .find(|(e, d, _)| *e == sleep_asked.0 && *d == Directive::Sleep)
            .with_context(|| format!("{} never acknowledged: {acks:?}", agent.node))?;
        assert!(
            *at < zero,
            "{} acknowledged after the scale to zero",
            agent.node
        );
    }
    wait_state(&w.policies(), "web", "zero", Duration::from_secs(5)).await?;
    assert_eq!(log.seen(), vec![0, 1, 0]);

    // The history has both transitions and both scales.
    let transitions = c.store.transitions(&id, 0..u64::MAX)?;
    let pairs: Vec<(String, String)> = transitions
        .iter()
        .map(|t| (t.from_state.clone(), t.to_state.clone()))
        .collect();
    assert_eq!(
        pairs,
        vec![
            ("zero".to_string(), "warm".to_string()),
            ("warm".to_string(), "zero".to_string())
        ]
    );
    // The scale event is written once the PATCH is acknowledged, which can be a moment
    // after the Deployment already shows 0; wait (bounded) rather than race it.
    let scales = eventually(
        "both scale events in the history",
        Duration::from_secs(5),
        || async {
            let scales: Vec<(i32, i32)> = c
                .store
                .scale_events(&id, 0..u64::MAX)?
                .iter()
                .map(|s| (s.from_replicas, s.to_replicas))
                .collect();
            Ok((scales.len() >= 2).then_some(scales))
        },
    )
    .await?;
    assert_eq!(scales, vec![(0, 1), (1, 0)]);
    let reasons: Vec<String> = events(&w.client, &w.ns, "web")
        .await?
        .into_iter()
        .map(|e| e.0)
        .collect();
    for want in ["ScaledFromZero", "ScaledToZero", "ColdStart", "Transition"] {
        assert!(
            reasons.iter().any(|r| r == want),
            "no {want} Event in {reasons:?}"
        );
    }
    // `kubectl get events --sort-by=.lastTimestamp` orders them as they happened: the
    // scale from zero before the one to zero (a real cluster showed ours without
    // lastTimestamp, sorted anyhow).
    let out = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(w.server.kubeconfig_path())
        .args([
            "get",
            "events",
            "-n",
            &w.ns,
            "--sort-by=.lastTimestamp",
            "--no-headers",
        ])
        .args(["-o", "custom-columns=LAST:.lastTimestamp,REASON:.reason"])
        .output()
        .await
        .context("running kubectl (is it installed?)")?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(&str, &str)> = table
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(last, reason)| (last, reason.trim()))
        .collect();
    assert!(rows.iter().all(|(last, _)| last.ends_with('Z')), "{table}");
    let at = |reason: &str| rows.iter().position(|(_, r)| *r == reason);
    assert!(
        at("ScaledFromZero") < at("ScaledToZero") && at("ScaledFromZero").is_some(),
        "{table}"
    );
    let cold_note = events(&w.client, &w.ns, "web")
        .await?
        .into_iter()
        .find_map(|(r, n)| (r == "ColdStart").then_some(n))
        .unwrap_or_default();
    assert!(cold_note.ends_with(", 12 connections held"), "{cold_note}");
    // Each transition is an Event with its own note (`kubectl describe` showed the
    // sleep as a second `zero -> warm` when series ignored the note).
    eventually(
        "a Transition Event for each transition",
        Duration::from_secs(5),
        || async {
            let notes: Vec<String> = events(&w.client, &w.ns, "web")
                .await?
                .into_iter()
                .filter(|(r, _)| r == "Transition")
                .map(|(_, n)| n)
                .collect();
            let both = ["zero -> warm", "warm -> zero"]
                .iter()
                .all(|t| notes.iter().any(|n| n.starts_with(t)));
            Ok(both.then_some(()))
        },
    )
    .await?;
    c.shutdown().await;
    w.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_scaled_outside_the_policy_is_put_back_with_an_event_that_says_so()
-> anyhow::Result<()> {
    let w = World::start("ctl-outside", false).await?;
    w.app("web", 0).await?;
    let dir = tempfile::tempdir()?;
    let c = start_controller(&w.server, dir.path(), &[]).await?;
    wait_leading(&c, Duration::from_secs(10)).await?;
    let _agent = TestAgent::start("node-a", vec![w.svc("web")], vec![c.api_addr]);
    w.policies()
        .create(
            &PostParams::default(),
            &policy(
                "web",
                json!({
                    "target": {"deployment": "web", "service": "web"},
                    "minReplicas": 0,
                    "maxReplicas": 1,
                    "idleTimeout": "1h",
                }),
            ),
        )
        .await?;
    wait_state(&w.policies(), "web", "zero", Duration::from_secs(10)).await?;
    // `kubectl scale deploy web --replicas=2`.
    w.deployments()
        .patch_scale(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await?;
    wait_replicas(&w.deployments(), "web", 0, Duration::from_secs(20)).await?;
    let note = eventually("a ScaledToZero Event", Duration::from_secs(5), || async {
        Ok(events(&w.client, &w.ns, "web")
            .await?
            .into_iter()
            .find(|(r, _)| r == "ScaledToZero")
            .map(|(_, n)| n))
    })
    .await?;
    assert_eq!(
        note,
        "Deployment web scaled from 2 to 0: Deployment web had 2 replicas, set outside the \
         policy; state `zero` wants 0"
    );
    c.shutdown().await;
    w.shutdown().await
}

/// `spec.paused` is the way to scale by hand: a paused policy leaves a manual scale alone,
/// says so in its Ready condition and refuses wake-ups as unmanaged; resumed, it puts
/// the target back where its state wants it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_policy_leaves_a_manual_scale_alone_until_resumed() -> anyhow::Result<()> {
    let w = World::start("ctl-paused", false).await?;
    w.app("web", 0).await?;
    let dir = tempfile::tempdir()?;
    let c = start_controller(&w.server, dir.path(), &["--tick-interval", "250ms"]).await?;
    wait_leading(&c, Duration::from_secs(10)).await?;
    let svc = w.svc("web");
    let _agent = TestAgent::start("node-a", vec![svc.clone()], vec![c.api_addr]);
    w.policies()
        .create(
            &PostParams::default(),
            &policy(
                "web",
                json!({
                    "target": {"deployment": "web", "service": "web"},
                    "minReplicas": 0,
                    "maxReplicas": 1,
                    "idleTimeout": "1h",
                }),
            ),
        )
        .await?;
    wait_state(&w.policies(), "web", "zero", Duration::from_secs(10)).await?;
    let merge = |v: serde_json::Value| kube::api::Patch::Merge(v);
    let pp = kube::api::PatchParams::default();
    w.policies()
        .patch("web", &pp, &merge(json!({"spec": {"paused": true}})))
        .await?;
    let ready = eventually(
        "Ready False, reason Paused",
        Duration::from_secs(10),
        || async {
            let p = w.policies().get("web").await?;
            Ok(p.status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.reason == "Paused"))
        },
    )
    .await?;
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("spec.paused is true"),
        "{}",
        ready.message
    );
    // `kubectl scale deploy web --replicas=2` stays.
    w.deployments()
        .patch_scale("web", &pp, &merge(json!({"spec": {"replicas": 2}})))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        replicas(&w.deployments(), "web").await?,
        2,
        "a paused policy scaled"
    );
    let (status, body) = Http::default().wake(c.api_addr, "node-a", &svc, 1).await?;
    assert_eq!(
        (status, body["accepted"].as_bool()),
        (200, Some(false)),
        "a paused policy takes no wake-up: {body}"
    );
    assert_eq!(
        w.policies()
            .get("web")
            .await?
            .status
            .and_then(|s| s.state)
            .as_deref(),
        Some("zero"),
        "the state is kept"
    );
    // Resumed: back where state `zero` wants it.
    w.policies()
        .patch("web", &pp, &merge(json!({"spec": {"paused": false}})))
        .await?;
    wait_replicas(&w.deployments(), "web", 0, Duration::from_secs(20)).await?;
    c.shutdown().await;
    w.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_acknowledges_the_hold_keeps_the_target_up() -> anyhow::Result<()> {
    let w = World::start("ctl-no-ack", true).await?;
    w.app("web", 1).await?;
    eventually("a ready pod", Duration::from_secs(30), || async {
        Ok((w.ready_replicas("web").await? == 1).then_some(()))
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let c = start_controller(&w.server, dir.path(), &["--sleep-ack-timeout", "2s"]).await?;
    wait_leading(&c, Duration::from_secs(10)).await?;
    let svc = w.svc("web");
    let stuck = TestAgent::start("node-a", vec![svc.clone()], vec![c.api_addr]);
    stuck.set(|s| s.ack = false);
    w.policies()
        .create(
            &PostParams::default(),
            &policy(
                "web",
                json!({
                    "target": {"deployment": "web", "service": "web"},
                    "minReplicas": 0,
                    "idleTimeout": "2s",
                }),
            ),
        )
        .await?;
    wait_state(&w.policies(), "web", "zero", Duration::from_secs(20)).await?;
    eventually(
        "an acknowledgement timeout",
        Duration::from_secs(15),
        || async {
            Ok((scrape(
                &c,
                "nemesis_controller_errors_total{kind=\"agent_ack_timeout\"}",
            )
            .await?
                >= 1.0)
                .then_some(()))
        },
    )
    .await?;
    assert_eq!(replicas(&w.deployments(), "web").await?, 1);
    // Released: the agents go back to following the endpoints.
    assert_eq!(
        c.registry.directive(&svc).map(|d| d.directive),
        Some(Directive::Follow)
    );
    let ev = eventually(
        "a SleepAbandoned Event",
        Duration::from_secs(10),
        || async {
            Ok(events(&w.client, &w.ns, "web")
                .await?
                .into_iter()
                .find(|e| e.0 == "SleepAbandoned"))
        },
    )
    .await?;
    assert!(
        ev.1.contains("node-a"),
        "the Event names the node: {}",
        ev.1
    );
    // The agent recovers: the next attempt succeeds.
    stuck.set(|s| s.ack = true);
    wait_replicas(&w.deployments(), "web", 0, Duration::from_secs(20)).await?;
    c.shutdown().await;
    w.shutdown().await
}

/// A client that arrives while the agents are asked to hold (before the scale to zero)
/// is held by its agent, which asks for a wake-up at once (its backends are about to be
/// stopped): the controller gives the sleep up instead of scaling the target away
/// under it, and the agents go back to following the endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_during_the_sleep_handshake_gives_the_sleep_up() -> anyhow::Result<()> {
    let w = World::start("ctl-wake-in-sleep", true).await?;
    w.app("web", 1).await?;
    eventually("a ready pod", Duration::from_secs(30), || async {
        Ok((w.ready_replicas("web").await? == 1).then_some(()))
    })
    .await?;
    let dir = tempfile::tempdir()?;
    // No acknowledgement timeout within the test: the handshake stays open until the
    // agent acknowledges.
    let c = start_controller(&w.server, dir.path(), &["--sleep-ack-timeout", "300s"]).await?;
    wait_leading(&c, Duration::from_secs(10)).await?;
    let svc = w.svc("web");
    let agent = TestAgent::start("node-a", vec![svc.clone()], vec![c.api_addr]);
    // Slow to apply the hold: the handshake is open while the client arrives.
    agent.set(|s| s.ack = false);
    let log = ReplicaLog::start(w.deployments(), "web");
    w.policies()
        .create(
            &PostParams::default(),
            &policy(
                "web",
                json!({
                    "target": {"deployment": "web", "service": "web"},
                    "minReplicas": 0,
                    "idleTimeout": "2s",
                }),
            ),
        )
        .await?;
    eventually(
        "the agents asked to hold",
        Duration::from_secs(30),
        || async {
            Ok(
                (c.registry.directive(&svc).map(|d| d.directive) == Some(Directive::Sleep))
                    .then_some(()),
            )
        },
    )
    .await?;
    let (status, body) = Http::default().wake(c.api_addr, "node-a", &svc, 1).await?;
    assert_eq!(
        (status, body["accepted"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    eventually("the sleep given up", Duration::from_secs(20), || async {
        Ok(
            (c.registry.directive(&svc).map(|d| d.directive) == Some(Directive::Follow))
                .then_some(()),
        )
    })
    .await?;
    assert!(
        c.registry.directive(&svc).is_some_and(|d| !d.after_zero),
        "a sleep given up keeps its pods: the agents may use them at once"
    );
    eventually(
        "a SleepCancelled Event",
        Duration::from_secs(10),
        || async {
            Ok(events(&w.client, &w.ns, "web")
                .await?
                .into_iter()
                .find(|e| e.0 == "SleepCancelled"))
        },
    )
    .await?;
    assert_eq!(replicas(&w.deployments(), "web").await?, 1);
    assert!(
        !log.seen().contains(&0),
        "scaled to zero under the client: {:?}",
        log.seen()
    );
    c.shutdown().await;
    w.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_reports_the_field_and_column_and_scales_nothing() -> anyhow::Result<()> {
    let w = World::start("ctl-invalid", false).await?;
    w.deployments()
        .create(&PostParams::default(), &deployment("web", 2))
        .await?;
    let dir = tempfile::tempdir()?;
    let c = start_controller(&w.server, dir.path(), &[]).await?;
    wait_leading(&c, Duration::from_secs(10)).await?;
    let svc = w.svc("web");
    let _agent = TestAgent::start("node-a", vec![svc.clone()], vec![c.api_addr]);
    let log = ReplicaLog::start(w.deployments(), "web");
    let broken = policy(
        "web",
        json!({
            "target": {"deployment": "web", "service": "web"},
            "initialState": "zero",
            "states": [{"name": "zero", "replicas": 0}, {"name": "up", "replicas": 5}],
            "transitions": [
                {"from": "zero", "to": "up", "when": "conns.active >> 3"},
                {"from": "up", "to": "zero", "when": "conns.active == 0 for 1s"},
            ],
        }),
    );
    let expected: Vec<String> = compile(&broken.spec)
        .unwrap_err()
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        expected[0].starts_with("spec.transitions[0].when: column "),
        "{expected:?}"
    );
    w.policies().create(&PostParams::default(), &broken).await?;
    let invalid = eventually("the Invalid condition", Duration::from_secs(10), || async {
        let p = w.policies().get("web").await?;
        Ok(p.status
            .into_iter()
            .flat_map(|s| s.conditions)
            .find(|c| c.type_ == "Invalid" && c.status == "True"))
    })
    .await?;
    assert_eq!(invalid.message, expected.join("; "));
    let p = w.policies().get("web").await?;
    let status = p.status.unwrap();
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
    assert_eq!(status.state, None, "an invalid policy never ran");

    // Nothing is managed: a wake-up is declined, and the Deployment keeps its 2.
    let (code, body) = Http::default().wake(c.api_addr, "node-a", &svc, 1).await?;
    assert_eq!(
        (code, body["accepted"].as_bool()),
        (200, Some(false)),
        "{body}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(log.seen(), vec![2]);
    assert!(
        c.store
            .scale_events(&PolicyId::new(&w.ns, "web"), 0..u64::MAX)?
            .is_empty()
    );
    assert!(
        scrape(
            &c,
            "nemesis_controller_errors_total{kind=\"invalid_policy\"}"
        )
        .await?
            >= 1.0
    );

    // Fixing the expression makes it run (and start in its initial state).
    let fixed = json!({"spec": {"transitions": [
        {"from": "zero", "to": "up", "when": "conns.active > 3"},
        {"from": "up", "to": "zero", "when": "conns.active == 0 for 1s"},
    ]}});
    w.policies()
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&fixed),
        )
        .await?;
    wait_state(&w.policies(), "web", "zero", Duration::from_secs(10)).await?;
    wait_replicas(&w.deployments(), "web", 0, Duration::from_secs(15)).await?;
    let (_, body) = Http::default().wake(c.api_addr, "node-a", &svc, 1).await?;
    assert_eq!(body["accepted"].as_bool(), Some(true), "{body}");

    // Deleted: its Service is no longer managed and its agents' directive is dropped.
    w.policies()
        .delete("web", &kube::api::DeleteParams::default())
        .await?;
    eventually("the Service unmanaged", Duration::from_secs(10), || async {
        let (_, body) = Http::default().wake(c.api_addr, "node-a", &svc, 1).await?;
        Ok(
            (body["accepted"].as_bool() == Some(false) && c.registry.directive(&svc).is_none())
                .then_some(()),
        )
    })
    .await?;
    c.shutdown().await;
    w.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_watches_and_a_compacted_watch_history_do_not_stop_the_controller() -> anyhow::Result<()>
{
    let w = World::start("ctl-watch-cut", false).await?;
    w.deployments()
        .create(&PostParams::default(), &deployment("web", 0))
        .await?;
    let dir = tempfile::tempdir()?;
    let c = start_controller(&w.server, dir.path(), &[]).await?;
    wait_leading(&c, Duration::from_secs(10)).await?;
    let svc = w.svc("web");
    let _agent = TestAgent::start("node-a", vec![svc.clone()], vec![c.api_addr]);
    w.policies()
        .create(
            &PostParams::default(),
            &policy(
                "web",
                json!({
                    "target": {"deployment": "web", "service": "web"},
                    "minReplicas": 0, "maxReplicas": 1, "idleTimeout": "1h",
                }),
            ),
        )
        .await?;
    wait_state(&w.policies(), "web", "zero", Duration::from_secs(10)).await?;

    // A partition: every watch ends and new ones hang; the history they would resume
    // from is compacted away meanwhile (the next watch gets 410 and relists).
    w.server.interrupt_watches();
    // Created while nobody watches: the controller must find them after the relist.
    w.deployments()
        .create(&PostParams::default(), &deployment("late", 0))
        .await?;
    w.policies()
        .create(
            &PostParams::default(),
            &policy(
                "late",
                json!({
                    "target": {"deployment": "late", "service": "late"},
                    "minReplicas": 0, "maxReplicas": 1, "idleTimeout": "1h",
                }),
            ),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    w.server.compact_watch_history();
    w.server.resume_watches();

    // The wake path still works, and the policy keeps being evaluated.
    let (code, body) = Http::default().wake(c.api_addr, "node-a", &svc, 1).await?;
    assert_eq!(
        (code, body["accepted"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    wait_replicas(&w.deployments(), "web", 1, Duration::from_secs(5)).await?;
    wait_state(&w.policies(), "web", "warm", Duration::from_secs(10)).await?;
    wait_state(&w.policies(), "late", "zero", Duration::from_secs(15)).await?;
    let late = w.svc("late");
    let (code, body) = Http::default().wake(c.api_addr, "node-a", &late, 1).await?;
    assert_eq!(
        (code, body["accepted"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    wait_replicas(&w.deployments(), "late", 1, Duration::from_secs(5)).await?;
    c.shutdown().await;
    w.shutdown().await
}
