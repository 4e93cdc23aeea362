//! The leader election under API server faults (the test API server's injector): a
//! `409` on a renewal of a Lease that still names this instance, or an answer held back
//! past the client's patience, must not make the leader step down while its renew
//! deadline has room; stepping down stops every policy actor, and the next term resumes
//! from whatever status the API server last recorded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use nemesis_controller::leader::{self, Attempt, LeaderConfig, LeaseLock};
use nemesis_controller::metrics::ControllerMetrics;
use nemesis_tests::apiserver::faults::{FaultKind, FaultPlan, Phase};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::wait::eventually_every;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn config(name: &str, retry: Duration) -> LeaderConfig {
    LeaderConfig {
        lease_name: name.into(),
        namespace: "default".into(),
        identity: format!("{name}-a"),
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: retry,
        history_url: None,
    }
}

/// One kind of fault on every request (everybody's) for `secs`.
fn only(kind: FaultKind, secs: u64) -> FaultPlan {
    FaultPlan {
        seed: 1,
        phases: vec![Phase {
            start: Duration::ZERO,
            end: Duration::from_secs(secs),
            kind,
            probability: 1.0,
        }],
        users: Vec::new(),
        subresource: None,
        slow_by: Duration::from_secs(12),
    }
}

async fn renew_time(client: &Client, name: &str) -> anyhow::Result<Option<String>> {
    let lease: Lease = Api::namespaced(client.clone(), "default").get(name).await?;
    Ok(lease
        .spec
        .and_then(|s| s.renew_time)
        .map(|t| format!("{:?}", t.0)))
}

/// A running election; `stepped_down` turns true the first time it publishes `false`
/// after leading.
struct Election {
    stepped_down: Arc<AtomicBool>,
    leading: watch::Receiver<bool>,
    shutdown: CancellationToken,
    _task: tokio_util::task::AbortOnDropHandle<()>,
    _watch: tokio_util::task::AbortOnDropHandle<()>,
}

async fn elect(client: Client, cfg: LeaderConfig) -> anyhow::Result<Election> {
    let (tx, leading) = watch::channel(false);
    let (epoch, _) = watch::channel(0);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(leader::run(
        LeaseLock::new(client, cfg),
        tx,
        epoch,
        ControllerMetrics::new(),
        shutdown.clone(),
    ));
    let mut rx = leading.clone();
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|l| *l))
        .await
        .context("the only candidate did not lead within 60 s")??;
    let stepped_down = Arc::new(AtomicBool::new(false));
    let flag = stepped_down.clone();
    let watch_task = tokio::spawn(async move {
        if rx.wait_for(|l| !*l).await.is_ok() {
            flag.store(true, Ordering::SeqCst);
        }
    });
    Ok(Election {
        stepped_down,
        leading,
        shutdown,
        _task: tokio_util::task::AbortOnDropHandle::new(task),
        _watch: tokio_util::task::AbortOnDropHandle::new(watch_task),
    })
}

/// `plan` hits the renewals, runs out, and one more renewal lands: the leader never
/// stepped down.
async fn rides_out(
    server: &TestApiServer,
    client: &Client,
    name: &str,
    e: &Election,
    plan: FaultPlan,
) -> anyhow::Result<()> {
    let lasts = plan.duration();
    server.inject_faults(plan);
    let started = tokio::time::Instant::now();
    eventually_every(
        Duration::from_millis(20),
        "the faults to hit the renewals",
        Duration::from_secs(60),
        || async { Ok((server.fault_counts().total() >= 2).then_some(())) },
    )
    .await?;
    tokio::time::sleep_until(started + lasts).await;
    let counts = server.stop_faults();
    let after = renew_time(client, name).await?;
    eventually_every(
        Duration::from_millis(100),
        "a renewal once the faults stopped",
        Duration::from_secs(60),
        || async { Ok((renew_time(client, name).await? != after).then_some(())) },
    )
    .await?;
    anyhow::ensure!(
        !e.stepped_down.load(Ordering::SeqCst) && *e.leading.borrow(),
        "the leader stepped down under {counts:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_on_renewing_a_lease_still_ours_keeps_the_leader_leading() -> anyhow::Result<()>
{
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;

    // One attempt on its own: a 409 while the Lease still names us is not "lost".
    let name = "lease-conflict-once";
    let mut lock = LeaseLock::new(client.clone(), config(name, Duration::from_millis(200)));
    assert_eq!(lock.try_acquire_or_renew().await?, Attempt::Leading);
    server.inject_faults(only(FaultKind::Conflict, 120));
    assert_eq!(lock.try_acquire_or_renew().await?, Attempt::StillOurs);
    let counts = server.stop_faults();
    anyhow::ensure!(counts.conflicts >= 1, "no 409 was injected: {counts:?}");
    assert_eq!(lock.try_acquire_or_renew().await?, Attempt::Leading);

    // The election: every update refused for 2 s (renewals every 200 ms), well within
    // the 10 s renew deadline.
    let name = "lease-conflicts";
    let e = elect(client.clone(), config(name, Duration::from_millis(200))).await?;
    rides_out(&server, &client, name, &e, only(FaultKind::Conflict, 2)).await?;
    e.shutdown.cancel();
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_held_past_the_attempt_do_not_use_up_the_renew_deadline() -> anyhow::Result<()> {
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    // Every answer held 12 s (past the 10 s renew deadline) for 3 s: an attempt that
    // waited for its answer would step down; one that gives up and retries renews as
    // soon as the answers come back.
    let name = "lease-slow";
    let e = elect(client.clone(), config(name, Duration::from_secs(1))).await?;
    rides_out(&server, &client, name, &e, only(FaultKind::Slow, 3)).await?;
    e.shutdown.cancel();
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_is_one_round_trip_so_slow_answers_still_fit_the_attempt() -> anyhow::Result<()> {
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    // Every answer 600 ms late for 8 s, twice the 4 s renew deadline; an attempt gives
    // up after the 1 s retry period. A GET then a PUT (1.2 s) never fits, and the leader
    // steps down at its deadline; a PUT of its own last write (0.6 s) does.
    let name = "lease-one-round-trip";
    let cfg = LeaderConfig {
        lease_duration: Duration::from_secs(6),
        renew_deadline: Duration::from_secs(4),
        ..config(name, Duration::from_secs(1))
    };
    let e = elect(client.clone(), cfg).await?;
    let plan = FaultPlan {
        slow_by: Duration::from_millis(600),
        ..only(FaultKind::Slow, 8)
    };
    rides_out(&server, &client, name, &e, plan).await?;
    e.shutdown.cancel();
    server.shutdown().await;
    Ok(())
}
