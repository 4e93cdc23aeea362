//! A connection that arrives while the controller puts its Service to sleep, end to
//! end and without random kills (issue 13's chaos lost one this way): every agent has
//! acknowledged `Sleep` (hold every new connect), a client connects and sends its
//! request, then the Deployment is scaled to zero and its pod, which ignores SIGTERM and
//! answers slowly (a loaded app), is SIGKILLed at the end of its grace period. The
//! client must get its answer from the woken pod, not an EOF from the killed one: the
//! proxy holds it instead of forwarding it to the pod going away, asks for a wake-up
//! once that pod is gone, and forwards it to the pod the wake starts.
//!
//! The same for a client that comes through the hold port (as an Ingress controller
//! does: it dials the address the hold EndpointSlice lists, the agent's hold listener on
//! the node's address, from a pod of its own outside the intercepted cgroup).

mod wake_support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use nemesis_common::wire::{AppliedMode, Directive, HoldPort, ServiceDirective, ServiceRef};
use serde_json::json;
use wake_support::{APP, NS, Options, Scenario, WakeEnv, eventually, pod_server};

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

fn sleep_directive(epoch: u64, hold_ports: Vec<HoldPort>) -> Vec<ServiceDirective> {
    vec![ServiceDirective {
        service: ServiceRef {
            namespace: NS.into(),
            name: APP.into(),
        },
        directive: Directive::Sleep,
        epoch,
        hold_ports,
        after_zero: false,
    }]
}

/// A port free on both of the node's addresses (where the agent's hold listeners bind:
/// the sandbox's gateways are this test's own).
fn free_hold_port(v4: IpAddr, v6: IpAddr) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let a = std::net::TcpListener::bind(SocketAddr::new(v4, 0))?;
        let port = a.local_addr()?.port();
        if std::net::TcpListener::bind(SocketAddr::new(v6, port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no port free on both {v4} and {v6}")
}

/// How the client reaches the Service.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// Dials the ClusterIP from the intercepted cgroup (the connect() hook sends it to
    /// the proxy).
    ClusterIp,
    /// Dials the node's hold listener from a host of its own, as an Ingress controller
    /// following the hold EndpointSlice does.
    HoldPort,
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
    let result = held_through_the_sleep(&env, Path::ClusterIp).await;
    env.shutdown().await?;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_through_the_hold_port_while_the_service_is_put_to_sleep_is_answered_by_the_woken_pod()
-> anyhow::Result<()> {
    let env = WakeEnv::start(Scenario {
        name: "sleepholdport",
        pod: slow_answering_pod(),
        policy: json!({}),
        scale_on_wake: true,
    })
    .await?;
    let result = held_through_the_sleep(&env, Path::HoldPort).await;
    env.shutdown().await?;
    result
}

/// A client started, as its path needs.
enum Client {
    Intercepted(wake_support::Clients),
    Outside(wake_support::RepeatingClients),
}

impl Client {
    async fn finish(self, within: Duration) -> anyhow::Result<Vec<wake_support::ClientResult>> {
        match self {
            Client::Intercepted(c) => c.finish(within).await,
            Client::Outside(c) => c.finish(within).await,
        }
    }
}

async fn held_through_the_sleep(env: &WakeEnv, path: Path) -> anyhow::Result<()> {
    // Warm: the first client wakes the Service (the stand-in controller scales it).
    let first = env
        .run_clients(&["--clients", "1", "--http", "--timeout-ms", "60000"], STEP)
        .await?;
    let old_pod = pod_of(&first[0].http()?.body).to_owned();

    // The controller puts it to sleep: every agent holds new connects first (and
    // listens on the Service's hold port, which the hold slice lists meanwhile).
    let node_v4 = IpAddr::from(env.sandbox().gateway());
    let hold_ports = match path {
        Path::ClusterIp => vec![],
        Path::HoldPort => vec![HoldPort {
            name: "http".into(),
            port: free_hold_port(node_v4, IpAddr::from(env.sandbox().gateway_v6()))?,
        }],
    };
    let want_ports: Vec<u16> = hold_ports.iter().map(|p| p.port).collect();
    *env.controller.directives.lock().unwrap() = sleep_directive(1, hold_ports);
    eventually("the agent to acknowledge the Sleep", STEP, || async {
        Ok(env
            .controller
            .report()
            .filter(|r| r.mode == AppliedMode::Hold && r.applied_epoch == 1)
            .filter(|r| want_ports.iter().all(|p| r.hold_ports.contains(p)))
            .map(|_| ()))
    })
    .await?;

    // A client connects and sends its request after the agents' acknowledgement.
    let before = env.metrics().await?;
    let args = ["--clients", "1", "--http", "--timeout-ms", "120000"];
    // The Ingress controller's host (kept until the client is done).
    let mut ingress = None;
    let client = match path {
        Path::ClusterIp => Client::Intercepted(env.clients(&args).await?),
        Path::HoldPort => {
            let host = env.sandbox().outside_host().await?;
            let hold = SocketAddr::new(node_v4, want_ports[0]).to_string();
            let mut argv = vec!["--connect", hold.as_str()];
            argv.extend(args);
            let c = env
                .outside_repeating_clients(host.name(), &argv)
                .await
                .context("a client through the hold port")?;
            ingress = Some(host);
            Client::Outside(c)
        }
    };
    eventually("the proxy to take the connection", STEP, || async {
        let m = env.metrics().await?;
        let forwarded = m.outcome("forwarded") > before.outcome("forwarded");
        Ok((m.held() >= 1.0 || forwarded).then_some(()))
    })
    .await?;

    // The scale to zero: the pod gets SIGTERM (ignored), then SIGKILL after its grace.
    scale(env, 0).await?;
    eventually("the old pod to be gone", STEP, || async {
        Ok(env.pod_names().await?.is_empty().then_some(()))
    })
    .await?;
    // The controller wakes the Service again for its held client.
    scale(env, 1).await?;

    let results = client.finish(STEP).await?;
    drop(ingress);
    anyhow::ensure!(
        results.len() == 1 && results[0].result == "response" && !results[0].text.is_empty(),
        "the client's connection was cut (by the kill of the pod it was sent to?): {results:?}"
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
    Ok(())
}

const AGENT_USER: &str = "system:serviceaccount:nemesis-system:nemesis-agent";

/// The wake's `Follow` after a completed sleep, as the controller sends it.
fn follow_after_zero(epoch: u64) -> Vec<ServiceDirective> {
    let mut d = sleep_directive(epoch, vec![]);
    d[0].directive = Directive::Follow;
    d[0].after_zero = true;
    d
}

/// After a sleep completes (the scale to zero made) the Service is woken again, and the
/// controller sends `Follow` while this agent's view of the endpoints still lists the
/// pod of the previous cycle as ready (its EndpointSlice watch lags: the test API server
/// holds the agent's events back). That pod is terminating (it ignores SIGTERM and has a
/// long grace period); a connection held during the sleep must not be sent to it, but
/// to the woken pod once the agent sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_after_a_completed_sleep_sends_nothing_to_the_pod_the_sleep_stopped()
-> anyhow::Result<()> {
    let mut pod = slow_answering_pod();
    // Alive (and listed, in the agent's lagging view) well after the wake's Follow.
    pod["terminationGracePeriodSeconds"] = json!(10);
    let env = lagging_env("sleepfollow", pod).await?;
    let result = woken_while_the_view_lags(&env).await;
    finish(env, result).await
}

async fn woken_while_the_view_lags(env: &WakeEnv) -> anyhow::Result<()> {
    let server = env.server.as_ref().context("the API server")?;
    let Lagging {
        old_pod,
        before,
        client,
    } = held_while_the_view_lags(env).await?;

    // The sleep completes: scaled to zero, the old pod terminating (for a while: it
    // ignores SIGTERM). Then the wake: a new pod, ready, and `Follow`.
    scale(env, 0).await?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(env.client.clone(), NS);
    // Terminating before the wake (scaled back at once, the scale to zero could be
    // folded away and the old pod kept).
    eventually("the old pod terminating", STEP, || async {
        let p = pods.get_opt(&old_pod).await?;
        Ok(p.is_none_or(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(()))
    })
    .await?;
    scale(env, 1).await?;
    eventually("the woken pod ready", STEP, || async {
        let list = pods.list(&Default::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|p| {
                p.metadata.name.as_deref() != Some(old_pod.as_str())
                    && p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .then_some(()))
    })
    .await?;
    *env.controller.directives.lock().unwrap() = follow_after_zero(2);
    eventually("the agent to apply the Follow", STEP, || async {
        Ok(env
            .controller
            .report()
            .filter(|r| r.applied_epoch == 2)
            .map(|_| ()))
    })
    .await?;
    // Give a wrong forward its chance (it would go at once), then let the agent see
    // the endpoints as they are.
    let forwarded = eventually(
        "a forward while the view lags",
        Duration::from_secs(5),
        || async {
            let m = env.metrics().await?;
            Ok((m.outcome("forwarded") > before.outcome("forwarded")).then_some(()))
        },
    )
    .await
    .is_ok();
    server.release_watch_events();
    let pod = answered_by(client).await?;
    anyhow::ensure!(
        pod != old_pod,
        "answered by the terminating pod of the previous cycle (forwarded while the agent's view lagged: {forwarded})"
    );
    Ok(())
}

/// The sleep completes and the Service is woken while the agent's view of the
/// endpoints lags; the woken pod gets the address of the pod the sleep stopped (the
/// sandbox reuses addresses lowest first; so do many CNIs' allocators). Then the agent's
/// EndpointSlice watch is cut and its resume answered `410 Gone`: it relists, and the
/// relist shows the woken pod at once, never the empty moment in between. The
/// connection held through the sleep must go to the woken pod, not wait behind the
/// sleep's gate for a pod it takes for the stopped one (the chaos test's
/// `410-on-resume` phase lost connections this way, at the 60 s hold budget).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_pod_at_the_stopped_ones_address_seen_through_a_relist_takes_the_held_connection()
-> anyhow::Result<()> {
    let env = lagging_env("sleepreuse", wake_support::quick_server()).await?;
    let result = woken_at_the_old_address(&env).await;
    finish(env, result).await
}

async fn woken_at_the_old_address(env: &WakeEnv) -> anyhow::Result<()> {
    use nemesis_tests::apiserver::faults::{FaultKind, FaultPlan};
    let server = env.server.as_ref().context("the API server")?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(env.client.clone(), NS);
    let ready_pod = || async {
        let list = pods.list(&Default::default()).await?;
        anyhow::Ok(list.items.into_iter().find(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        }))
    };
    let ip = |p: &k8s_openapi::api::core::v1::Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default()
    };
    let Lagging {
        old_pod, client, ..
    } = held_while_the_view_lags(env).await?;
    // Still running: the sleep is acknowledged, not yet made.
    let old = eventually("the first pod", STEP, || async { ready_pod().await }).await?;
    anyhow::ensure!(old.metadata.name.as_deref() == Some(old_pod.as_str()));

    // The sleep completes (the old pod gone, its address free), then the wake.
    scale(env, 0).await?;
    eventually("the old pod gone", STEP, || async {
        Ok(pods.get_opt(&old_pod).await?.is_none().then_some(()))
    })
    .await?;
    scale(env, 1).await?;
    let new = eventually("the woken pod ready", STEP, || async { ready_pod().await }).await?;
    anyhow::ensure!(
        ip(&new) == ip(&old),
        "the woken pod got {} and the stopped one had {}: the sandbox no longer reuses \
         addresses lowest first, and this test needs it to",
        ip(&new),
        ip(&old)
    );
    *env.controller.directives.lock().unwrap() = follow_after_zero(2);
    eventually("the agent to apply the Follow", STEP, || async {
        Ok(env
            .controller
            .report()
            .filter(|r| r.applied_epoch == 2)
            .map(|_| ()))
    })
    .await?;

    // The agent's watches cut, every resume answered 410: it relists, and its view
    // jumps from the old pod to the woken one at the same address.
    let gone_before = server.fault_counts().of(FaultKind::GoneOnResume);
    server.inject_faults(
        FaultPlan::only(7, FaultKind::GoneOnResume, Duration::from_secs(60), 1.0)
            .for_users(&[AGENT_USER]),
    );
    eventually("a 410 on the agent's resume", STEP, || async {
        Ok((server.fault_counts().of(FaultKind::GoneOnResume) > gone_before).then_some(()))
    })
    .await?;
    // A relist after it (the watcher backs off about a second first).
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.stop_faults();
    server.release_watch_events();

    let pod = answered_by(client).await?;
    anyhow::ensure!(
        pod == new.metadata.name.as_deref().unwrap_or_default(),
        "answered by {pod} and not by the woken pod"
    );
    Ok(())
}

/// An environment whose agent's watch events the test may hold back or fault (with the
/// API server's RBAC as installed, so the agent is a user of its own).
async fn lagging_env(name: &'static str, pod: serde_json::Value) -> anyhow::Result<WakeEnv> {
    WakeEnv::start_with(
        Scenario {
            name,
            pod,
            policy: json!({}),
            scale_on_wake: true,
        },
        Options {
            rbac: Some(|_| {}),
            ..Options::default()
        },
    )
    .await
}

/// Lets the agent's watches go (faults stopped, held events released) before the
/// environment shuts down; prints the test's error first.
async fn finish(env: WakeEnv, result: anyhow::Result<()>) -> anyhow::Result<()> {
    if let Some(s) = env.server.as_ref() {
        s.stop_faults();
        s.release_watch_events();
    }
    if let Err(e) = &result {
        eprintln!("{e:?}");
    }
    env.shutdown().await?;
    result
}

/// A connection held through a sleep while the agent's view of the endpoints lags.
struct Lagging {
    /// The pod that answered before the sleep.
    old_pod: String,
    /// The agent's metrics before the held connection.
    before: wake_support::Metrics,
    client: wake_support::Clients,
}

/// A first client served, the Sleep acknowledged by the agent, then its EndpointSlice
/// events held back (the old pod stays listed) and a client held by the proxy.
async fn held_while_the_view_lags(env: &WakeEnv) -> anyhow::Result<Lagging> {
    let server = env.server.as_ref().context("the API server")?;
    let first = env
        .run_clients(&["--clients", "1", "--http", "--timeout-ms", "60000"], STEP)
        .await?;
    let old_pod = pod_of(&first[0].http()?.body).to_owned();
    *env.controller.directives.lock().unwrap() = sleep_directive(1, vec![]);
    eventually("the agent to acknowledge the Sleep", STEP, || async {
        Ok(env
            .controller
            .report()
            .filter(|r| r.mode == AppliedMode::Hold && r.applied_epoch == 1)
            .map(|_| ()))
    })
    .await?;
    // From now on the agent's view of the endpoints lags: the old pod stays listed.
    server.hold_watch_events("discovery.k8s.io", "endpointslices", &[AGENT_USER]);
    let before = env.metrics().await?;
    let client = env
        .clients(&["--clients", "1", "--http", "--timeout-ms", "120000"])
        .await?;
    eventually("the proxy to hold the connection", STEP, || async {
        Ok((env.metrics().await?.held() >= 1.0).then_some(()))
    })
    .await?;
    Ok(Lagging {
        old_pod,
        before,
        client,
    })
}

/// The held client's answer: a whole `200`, from the pod it names.
async fn answered_by(client: wake_support::Clients) -> anyhow::Result<String> {
    let results = client.finish(STEP).await?;
    anyhow::ensure!(
        results[0].result == "response" && !results[0].text.is_empty(),
        "the held connection was cut or not answered: {:?}",
        results[0]
    );
    let answer = results[0].http()?;
    anyhow::ensure!(answer.status == 200, "{:?}", results[0]);
    Ok(pod_of(&answer.body).to_owned())
}
