//! Chaos: the real controller and the real agent (as their ServiceAccounts) go through
//! wake and sleep cycles while the test API server injects faults on a seeded schedule
//! (500s, answers held past the client timeout, watches cut, `410 Gone` on watch
//! resumes, `409` on updates) into their requests. Nothing crashes, no replica count is
//! ever written that the policy did not decide (only 0 and 1; to 0 only while the sleep
//! alert fires; to 1 only after a client asked), no scale is recorded twice, and once
//! the faults stop a whole cycle is timed against one before them (the recovery).
//! Then each kind alone, in a seeded order: until it was injected at least once (and
//! for at least [`KIND_AT_LEAST`]), cycles run under it; then the faults stop and the
//! recovery is timed and checked the same way, per kind.
//! `NEMESIS_CHAOS_SEED` repeats a run; `NEMESIS_CHAOS_FAULT_SECS` (default 30) sets how
//! long the mixed faults last.
//!
//! Beside the seeded run, one fault made on purpose: the controller's watch of
//! Deployments lags while another writer scales the target, and the controller decides
//! from what its watch still shows. Its scale is conditional on the version it saw, so
//! it is refused (409) and counted, not made and recorded a second time.

mod wake_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use nemesis_controller::policy::ScalingPolicy;
use nemesis_controller::store::{PolicyId, ScaleRecord, unix_ms};
use nemesis_tests::apiserver::faults::{ALL_KINDS, FaultKind, FaultPlan};
use nemesis_tests::demo::apply::Manifest;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};
use tokio::time::Instant;
use wake_support::{
    APP, NS, Options, POD_PORT, SERVER, SYSTEM_NS, Scenario, WakeEnv, eventually, post_alert,
};

const ALERT: &str = "NemesisChaosSleep";
const CONTROLLER_USER: &str = "system:serviceaccount:nemesis-system:nemesis-controller";
const AGENT_USER: &str = "system:serviceaccount:nemesis-system:nemesis-agent";
/// A step of a cycle under faults: a few answers held past the 10 s client timeout and
/// the watchers' backoff (up to 30 s) fit in it on a loaded machine.
const STEP_UNDER_FAULTS: Duration = Duration::from_secs(90);
/// A step of a cycle without faults: generous, as the machine may be loaded (and the
/// controller may still be winning its Lease back right after the faults).
const STEP: Duration = Duration::from_secs(90);
/// Each kind alone lasts at least this (a cycle or two), and until it was injected.
const KIND_AT_LEAST: Duration = Duration::from_secs(3);
/// A kind not injected within this fails the run: every kind has eligible requests
/// every second (Lease renewals, status patches, reads, watches).
const KIND_WITHIN: Duration = Duration::from_secs(60);

fn as_shipped(_: &mut [Manifest]) {}

/// Ready as soon as it listens, probed every 100 ms.
fn quick_server() -> Value {
    json!({
        "annotations": {"nemesis.test/probe-period-ms": "100"},
        "container": {
            "name": "server",
            "image": "local/nemesis-pod-server",
            "command": [SERVER],
            "args": ["--port", POD_PORT.to_string()],
            "ports": [{"name": "http", "containerPort": POD_PORT}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        }
    })
}

/// zero --demand--> warm --alert--> zero: the only replica counts it decides are 0 and 1,
/// and the test knows when each is due.
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
        "holdTimeoutSeconds": 60,
    })
}

/// What the test did and saw, in order, with when.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    /// A client connected to the Service (demand).
    Client,
    AlertFiring,
    AlertResolved,
    /// The Deployment's `spec.replicas` as the admin's watch saw it change.
    Replicas(i32),
}

type Journal = Arc<Mutex<Vec<(Instant, Step)>>>;

fn note(j: &Journal, s: Step) {
    j.lock().unwrap().push((Instant::now(), s));
}

/// Every change of the Deployment's replicas, through the admin's own watch (the faults
/// hit only the controller's and the agent's requests).
fn watch_replicas(api: Api<Deployment>, j: Journal) -> tokio_util::task::AbortOnDropHandle<()> {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={APP}"));
    let task = tokio::spawn(async move {
        let stream = watcher::watcher(api, cfg).default_backoff();
        futures::pin_mut!(stream);
        let mut last = None;
        while let Some(ev) = stream.next().await {
            let (Ok(Event::Apply(d)) | Ok(Event::InitApply(d))) = ev else {
                continue;
            };
            let r = d.spec.replicas.unwrap_or(1);
            if last != Some(r) {
                last = Some(r);
                note(&j, Step::Replicas(r));
            }
        }
    });
    tokio_util::task::AbortOnDropHandle::new(task)
}

fn replicas_now(j: &Journal) -> Option<i32> {
    j.lock().unwrap().iter().rev().find_map(|(_, s)| match s {
        Step::Replicas(r) => Some(*r),
        _ => None,
    })
}

async fn wait_replicas(j: &Journal, want: i32, within: Duration) -> anyhow::Result<()> {
    eventually(&format!("the Deployment at {want}"), within, || async {
        Ok((replicas_now(j) == Some(want)).then_some(()))
    })
    .await
}

async fn wait_policy_state(env: &WakeEnv, state: &str, within: Duration) -> anyhow::Result<()> {
    let policies: Api<ScalingPolicy> = Api::namespaced(env.client.clone(), NS);
    eventually(&format!("the policy in state {state}"), within, || async {
        let p = policies.get(APP).await?;
        Ok((p.status.and_then(|s| s.state).as_deref() == Some(state)).then_some(()))
    })
    .await
}

/// What the clients of one cycle got.
#[derive(Debug, Default, Clone, Copy)]
struct Served {
    ok: usize,
    failed: usize,
}

/// One wake (a client at zero, answered by the woken pod) and one sleep (the alert, then
/// 0 and the policy back in `zero`); returns how long it took and what the client got.
async fn cycle(env: &WakeEnv, j: &Journal, within: Duration) -> anyhow::Result<Served> {
    let timeout_ms = within.as_millis().to_string();
    let mut served = Served::default();
    let start = Instant::now();
    // A client not served (refused while the controller could not act) tries again, as
    // a real one would; the refusals are counted.
    while served.ok == 0 && start.elapsed() < within {
        note(j, Step::Client);
        let results = env
            .run_clients(
                &["--http", "--clients", "1", "--timeout-ms", &timeout_ms],
                within + Duration::from_secs(10),
            )
            .await?;
        for r in &results {
            match r.http() {
                Ok(h) if h.status == 200 => served.ok += 1,
                _ => {
                    println!("a client not served: {r:?}");
                    served.failed += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    wait_replicas(j, 1, within).await?;
    wait_policy_state(env, "warm", within).await?;
    note(j, Step::AlertFiring);
    post_alert(env, ALERT, true).await?;
    wait_replicas(j, 0, within).await?;
    wait_policy_state(env, "zero", within).await?;
    // Asleep: the alert has done its job (and must not send the next wake back).
    post_alert(env, ALERT, false).await?;
    note(j, Step::AlertResolved);
    // The pod gone: while it still terminates (ready), a client is forwarded to it
    // without a wake-up, and the next cycle would wait for a scale nobody asked for.
    eventually("the pod gone", within, || async {
        Ok(env.pod_names().await?.is_empty().then_some(()))
    })
    .await?;
    Ok(served)
}

/// Every replica count written is one the policy decided when it was written: only 0
/// and 1, a rise to 1 only after a client asked since the last fall, a fall to 0 only
/// while the sleep alert fired.
fn check_decided(journal: &[(Instant, Step)]) -> anyhow::Result<usize> {
    let mut demand = false;
    let mut firing = false;
    let mut changes = 0;
    let mut first = true;
    for (_, s) in journal {
        match s {
            Step::Client => demand = true,
            Step::AlertFiring => firing = true,
            Step::AlertResolved => firing = false,
            Step::Replicas(r) if first => {
                anyhow::ensure!(*r == 0, "the Deployment started at {r}, not 0");
                first = false;
            }
            Step::Replicas(1) => {
                anyhow::ensure!(demand, "scaled to 1 with no client asking: {journal:?}");
                anyhow::ensure!(!firing, "scaled to 1 while the sleep alert fired");
                changes += 1;
            }
            Step::Replicas(0) => {
                anyhow::ensure!(firing, "scaled to 0 with no sleep alert: {journal:?}");
                demand = false;
                changes += 1;
            }
            Step::Replicas(r) => anyhow::bail!("a replica count the policy never decides: {r}"),
        }
    }
    Ok(changes)
}

fn fault_secs() -> anyhow::Result<u64> {
    match std::env::var("NEMESIS_CHAOS_FAULT_SECS") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("NEMESIS_CHAOS_FAULT_SECS={v:?} is not a number of seconds")),
        Err(_) => Ok(30),
    }
}

/// The real controller and agent with the chaos policy, at zero; the journal of the
/// Deployment's replicas (and the watch that keeps it, to hold while the test runs).
async fn start(
    name: &'static str,
) -> anyhow::Result<(WakeEnv, Journal, tokio_util::task::AbortOnDropHandle<()>)> {
    let env = WakeEnv::start_with(
        Scenario {
            name,
            pod: quick_server(),
            policy: json!({}),
            scale_on_wake: false,
        },
        Options {
            policy_spec: Some(policy()),
            real_controller: Some(vec!["--lease-namespace".into(), SYSTEM_NS.into()]),
            rbac: Some(as_shipped),
            ..Options::default()
        },
    )
    .await?;
    let journal: Journal = Arc::default();
    let watch = watch_replicas(Api::namespaced(env.client.clone(), NS), journal.clone());
    wait_replicas(&journal, 0, STEP).await?;
    wait_policy_state(&env, "zero", STEP).await?;
    Ok((env, journal, watch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_faults_on_a_seeded_schedule_never_make_a_wrong_scale_and_it_recovers()
-> anyhow::Result<()> {
    let seed = nemesis_tests::chaos::seed("chaos_apiserver");
    let (env, journal, _watch) = start("chaosapi").await?;

    // A cycle before the faults: the yardstick for the recovery.
    let t = Instant::now();
    let before = cycle(&env, &journal, STEP).await?;
    let baseline = t.elapsed();
    anyhow::ensure!(
        before.ok == 1 && before.failed == 0,
        "the cycle before the faults: {before:?}"
    );

    let plan = FaultPlan::seeded(seed, Duration::from_secs(fault_secs()?))
        .for_users(&[CONTROLLER_USER, AGENT_USER]);
    println!("fault plan (seed {seed}):");
    for p in &plan.phases {
        println!(
            "  {:>6} ms .. {:>6} ms  {:<14} p={:.2}",
            p.start.as_millis(),
            p.end.as_millis(),
            p.kind.name(),
            p.probability
        );
    }
    let server = env.server.as_ref().context("the API server")?;
    let faults_until = Instant::now() + plan.duration();
    server.inject_faults(plan);
    let mut under = Served::default();
    let mut cycles = 0;
    while Instant::now() < faults_until {
        let s = cycle(&env, &journal, STEP_UNDER_FAULTS)
            .await
            .with_context(|| {
                format!(
                    "a cycle under faults (seed {seed}, injected so far {:?}); journal: {:?}",
                    server.fault_counts(),
                    journal.lock().unwrap()
                )
            })?;
        under.ok += s.ok;
        under.failed += s.failed;
        cycles += 1;
    }
    let counts = server.stop_faults();
    let stopped = Instant::now();
    println!("injected: {counts:?}; {cycles} cycles under faults, clients {under:?}");
    anyhow::ensure!(counts.total() > 0, "no fault was injected: {counts:?}");
    let real = env.real.as_ref().context("the real controller")?;

    // Recovery: a whole cycle once the faults stop, every client served.
    let recovery = recover(&env, &journal, stopped, "the mixed faults").await?;
    println!("api_fault_recovery_ms={}", recovery.as_millis());
    println!("api_cycle_ms_before_faults={}", baseline.as_millis());

    // Each kind alone, then its recovery.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut order: Vec<FaultKind> = ALL_KINDS.into_iter().collect();
    order.shuffle(&mut rng);
    let mut all = counts;
    let mut per_kind = Vec::new();
    for &kind in &order {
        let probability = match kind {
            FaultKind::Slow => rng.random_range(0.1..=0.3),
            _ => rng.random_range(0.2..=0.6),
        };
        let (injected, cycles) = one_kind(&env, &journal, kind, probability, seed).await?;
        let stopped = Instant::now();
        let now = server.stop_faults();
        let what = format!("{} alone (p={probability:.2}, seed {seed})", kind.name());
        anyhow::ensure!(
            now.of(kind) > all.of(kind),
            "{what}: not injected in {KIND_WITHIN:?}: {now:?}"
        );
        all = now;
        let recovery = recover(&env, &journal, stopped, &what).await?;
        println!(
            "{what}: {injected} injected over {cycles} cycles; recovered in {} ms ({:.2} cycles before the faults)",
            recovery.as_millis(),
            recovery.as_secs_f64() / baseline.as_secs_f64()
        );
        per_kind.push((kind, recovery));
    }
    for (kind, recovery) in &per_kind {
        println!(
            "api_fault_recovery_ms_{}={}",
            kind.name().replace('-', "_"),
            recovery.as_millis()
        );
    }
    let missing: Vec<_> = order
        .iter()
        .filter(|k| all.of(**k) == 0)
        .map(|k| k.name())
        .collect();
    anyhow::ensure!(missing.is_empty(), "never injected: {missing:?} ({all:?})");

    // No wrong scale, in the order things happened.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let journal = journal.lock().unwrap().clone();
    let changes = check_decided(&journal)?;
    let counts = all;
    // Each scale the controller recorded is one the Deployment made, none twice. A
    // scale whose answer was lost (held past the timeout) is recorded once it shows;
    // one that shows only after the policy moved on may stay unrecorded.
    let store = real.store.clone();
    let id = PolicyId::new(NS, APP);
    let records = eventually("the scale records", Duration::from_secs(60), || async {
        let r = store.scale_events(&id, 0..u64::MAX)?;
        Ok((r.len() >= changes.saturating_sub(counts.slow as usize)).then_some(r))
    })
    .await?;
    anyhow::ensure!(
        records.len() <= changes,
        "{} scale records for {changes} changes of the Deployment: a scale recorded twice",
        records.len()
    );
    for w in records.windows(2) {
        anyhow::ensure!(
            w[0].to_replicas != w[1].to_replicas,
            "two scales to {} in a row: {records:?}",
            w[0].to_replicas
        );
    }
    // Nothing crashed: the controller still leads and serves, the agent is ready. (A
    // 409 on a renewal of the Lease it still holds does not make it step down; renewals
    // failing past the renew deadline would, for a moment: it must lead again.)
    eventually(
        "the controller leading",
        Duration::from_secs(60),
        || async { Ok(real.is_leading().then_some(())) },
    )
    .await?;
    let (status, _) = env.http_get_admin("/readyz").await?;
    anyhow::ensure!(status == 200, "the agent's /readyz answered {status}");
    println!(
        "seed {seed}: {changes} replica changes, {} scale records, {} cycles under faults",
        records.len(),
        cycles
    );
    env.shutdown().await
}

/// `kind` alone (see [`FaultPlan::only`]) on the controller's and the agent's requests,
/// cycles running under it until it was injected and [`KIND_AT_LEAST`] passed. Returns
/// how many were injected and the cycles run; the faults are still on.
async fn one_kind(
    env: &WakeEnv,
    j: &Journal,
    kind: FaultKind,
    probability: f64,
    seed: u64,
) -> anyhow::Result<(u64, usize)> {
    let server = env.server.as_ref().context("the API server")?;
    let before = server.fault_counts().of(kind);
    let plan = FaultPlan::only(seed, kind, KIND_WITHIN, probability)
        .for_users(&[CONTROLLER_USER, AGENT_USER]);
    let started = Instant::now();
    server.inject_faults(plan);
    let mut cycles = 0;
    loop {
        cycle(env, j, STEP_UNDER_FAULTS).await.with_context(|| {
            format!(
                "a cycle under {} alone (seed {seed}, injected so far {:?}); journal: {:?}",
                kind.name(),
                server.fault_counts(),
                j.lock().unwrap()
            )
        })?;
        cycles += 1;
        let injected = server.fault_counts().of(kind) - before;
        if (injected > 0 && started.elapsed() >= KIND_AT_LEAST) || started.elapsed() >= KIND_WITHIN
        {
            return Ok((injected, cycles));
        }
    }
}

/// After faults stopped at `stopped`: a whole cycle with every client served, no
/// replica count the policy did not decide, the controller leading and the agent
/// ready. Returns the time from `stopped` to the end of that cycle.
async fn recover(
    env: &WakeEnv,
    j: &Journal,
    stopped: Instant,
    after: &str,
) -> anyhow::Result<Duration> {
    let served = cycle(env, j, STEP)
        .await
        .with_context(|| format!("the cycle after {after}"))?;
    let recovery = stopped.elapsed();
    anyhow::ensure!(
        served.ok == 1 && served.failed == 0,
        "the cycle after {after}: {served:?}"
    );
    check_decided(&j.lock().unwrap()).with_context(|| format!("after {after}"))?;
    // Nothing crashed: the controller still leads and serves, the agent is ready. (A
    // 409 on a renewal of the Lease it still holds does not make it step down; renewals
    // failing past the renew deadline would, for a moment: it must lead again.)
    let real = env.real.as_ref().context("the real controller")?;
    eventually(
        &format!("the controller leading after {after}"),
        Duration::from_secs(60),
        || async { Ok(real.is_leading().then_some(())) },
    )
    .await?;
    let (status, _) = env.http_get_admin("/readyz").await?;
    anyhow::ensure!(
        status == 200,
        "the agent's /readyz answered {status} after {after}"
    );
    Ok(recovery)
}

/// The history's scale records of the test's policy, oldest first (without the
/// recovered ones that repeat the change before them, as every reader sees it).
fn scale_records(env: &WakeEnv) -> anyhow::Result<Vec<ScaleRecord>> {
    let real = env.real.as_ref().context("the real controller")?;
    Ok(real
        .store
        .scale_events(&PolicyId::new(NS, APP), 0..u64::MAX)?)
}

fn targets(records: &[ScaleRecord]) -> Vec<i32> {
    records.iter().map(|r| r.to_replicas).collect()
}

/// The run's `...,1,0,0,1,...` without the luck: the controller's watch of Deployments
/// lags (the test API server holds its events back) while another writer scales the
/// target to zero, as a previous leader would, whose record this replica's history
/// already has (standbys pull the leader's records). The controller then decides from
/// its stale view (one replica) to put the Service to sleep and scales to zero. That
/// scale carries the resourceVersion the watch showed, so the API server refuses it
/// (409); the controller reads `/scale`, finds the target at zero already and records
/// nothing. Without the condition the patch changes nothing yet is recorded: two scales
/// to 0 in a row. Once the watch catches up a wake works as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_decided_on_a_stale_watch_is_refused_and_recorded_once() -> anyhow::Result<()> {
    let env = WakeEnv::start_with(
        Scenario {
            name: "stalewatch",
            pod: quick_server(),
            policy: json!({}),
            scale_on_wake: false,
        },
        Options {
            policy_spec: Some(policy()),
            real_controller: Some(vec!["--lease-namespace".into(), SYSTEM_NS.into()]),
            rbac: Some(as_shipped),
            ..Options::default()
        },
    )
    .await?;
    let result = stale_watch(&env).await;
    if let Some(server) = env.server.as_ref() {
        server.release_watch_events();
    }
    env.shutdown().await?;
    result
}

async fn stale_watch(env: &WakeEnv) -> anyhow::Result<()> {
    let journal: Journal = Arc::default();
    let _watch = watch_replicas(Api::namespaced(env.client.clone(), NS), journal.clone());
    wait_replicas(&journal, 0, STEP).await?;
    wait_policy_state(env, "zero", STEP).await?;
    let real = env.real.as_ref().context("the real controller")?;
    let server = env.server.as_ref().context("the API server")?;
    let id = PolicyId::new(NS, APP);
    let timeout_ms = STEP.as_millis().to_string();
    let client = ["--http", "--clients", "1", "--timeout-ms", &timeout_ms];

    // Warm: a client wakes the Service; the controller scales 0 -> 1 and records it.
    let woken = env
        .run_clients(&client, STEP + Duration::from_secs(10))
        .await?;
    anyhow::ensure!(woken[0].http()?.status == 200, "the wake: {woken:?}");
    wait_replicas(&journal, 1, STEP).await?;
    wait_policy_state(env, "warm", STEP).await?;
    // The cold start ends when the controller's watch shows the pod ready: from then on
    // its view is one replica.
    eventually("the cold start recorded", STEP, || async {
        Ok((!real.store.cold_starts(&id, 0..u64::MAX)?.is_empty()).then_some(()))
    })
    .await?;
    let records = eventually("the wake's scale record", STEP, || async {
        let r = scale_records(env)?;
        Ok((!r.is_empty()).then_some(r))
    })
    .await?;
    anyhow::ensure!(targets(&records) == [1], "before the fault: {records:?}");

    // The controller's watch of Deployments stops showing changes; another writer
    // scales the target to zero, and its record is in this replica's history.
    server.hold_watch_events("apps", "deployments", &[CONTROLLER_USER]);
    Api::<Deployment>::namespaced(env.client.clone(), NS)
        .patch_scale(
            APP,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .context("the other writer's scale to zero")?;
    real.store.record_scale(&ScaleRecord {
        at_ms: unix_ms(SystemTime::now()),
        policy: id.clone(),
        state: "zero".into(),
        from_replicas: 1,
        to_replicas: 0,
        reason: "made by the previous leader (the test)".into(),
        metrics: BTreeMap::new(),
        recovered: false,
    })?;
    wait_replicas(&journal, 0, STEP).await?;

    // The policy wants zero; the controller's view still says one replica.
    post_alert(env, ALERT, true).await?;
    wait_policy_state(env, "zero", STEP).await?;
    eventually(
        "the controller's scale to zero (refused, or made and recorded)",
        STEP,
        || async {
            let made = scale_records(env)?.len() > 2;
            Ok((real.metrics.scale_conflicts() > 0 || made).then_some(()))
        },
    )
    .await?;
    let records = scale_records(env)?;
    anyhow::ensure!(
        targets(&records) == [1, 0],
        "one change of the Deployment recorded twice (a scale decided on a stale watch was made): {records:?}"
    );
    anyhow::ensure!(real.metrics.scale_conflicts() >= 1, "no conflict counted");
    let refused = server.requests().into_iter().any(|r| {
        r.user == CONTROLLER_USER
            && r.method == "PATCH"
            && r.path.ends_with(&format!("/deployments/{APP}/scale"))
            && r.status == 409
    });
    anyhow::ensure!(
        refused,
        "the API server refused no scale of the controller's with 409"
    );

    // The watch catches up; the Deployment is where the policy wants it, and stays.
    server.release_watch_events();
    post_alert(env, ALERT, false).await?;
    eventually("the pod gone", STEP, || async {
        Ok(env.pod_names().await?.is_empty().then_some(()))
    })
    .await?;
    anyhow::ensure!(
        replicas_now(&journal) == Some(0),
        "{:?}",
        journal.lock().unwrap()
    );

    // A wake from the fresh view: scaled and recorded once.
    let woken = env
        .run_clients(&client, STEP + Duration::from_secs(10))
        .await?;
    anyhow::ensure!(woken[0].http()?.status == 200, "the wake after: {woken:?}");
    wait_replicas(&journal, 1, STEP).await?;
    let records = eventually("the second wake's record", STEP, || async {
        let r = scale_records(env)?;
        Ok((r.len() >= 3).then_some(r))
    })
    .await?;
    anyhow::ensure!(targets(&records) == [1, 0, 1], "{records:?}");
    // Woken after a completed sleep: the agents are told, so a view of the endpoints
    // that still lists the stopped pod sends it nothing.
    let svc = nemesis_common::wire::ServiceRef {
        namespace: NS.into(),
        name: APP.into(),
    };
    let directive = real
        .registry
        .directive(&svc)
        .context("the Service's directive")?;
    anyhow::ensure!(
        directive.directive == nemesis_common::wire::Directive::Follow && directive.after_zero,
        "the wake's directive: {directive:?}"
    );
    println!(
        "scale conflicts counted: {}; records: {:?}",
        real.metrics.scale_conflicts(),
        targets(&records)
    );
    Ok(())
}
