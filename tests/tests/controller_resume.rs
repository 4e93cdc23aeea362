//! A leadership term that starts over (the Lease lost for a moment) resumes every
//! policy where it is, even when the policy's status did not catch up with the last
//! transition (a status write that failed or was cut off with the old term): the
//! history this instance recorded is newer than the status, and wins. Resuming from the
//! stale status put a woken Service back to zero with no sleep condition (found by
//! tests/tests/chaos_apiserver.rs). A scale whose answer is lost (made, but answered
//! after the client gave up) is recorded once, when it shows, and not made again. A scale
//! the previous leader made but never recorded is recorded by the next one, once.

mod controller_support;

use std::time::Duration;

use anyhow::Context as _;

use controller_support::*;

const NS: &str = "default";
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use nemesis_common::wire::ServiceRef;
use nemesis_controller::app::Running;
use nemesis_controller::store::PolicyId;
use nemesis_tests::apiserver::faults::{FaultKind, FaultPlan, Phase};
use serde_json::json;

/// What the two term tests share: Deployment `name` and its policy (zero --demand-->
/// warm --alert--> zero; the alert never fires, so the controller never puts it back to
/// zero itself), led by controller A with one agent on `node`, asleep and then woken:
/// 0 -> 1, state `warm`.
struct Woken {
    one: OneDeployment,
    a: Running,
    /// When the policy went to `zero`, before the wake (its status said so).
    zero_since: Option<chrono::DateTime<chrono::Utc>>,
    agent: TestAgent,
    _dir: tempfile::TempDir,
}

impl Woken {
    async fn start(name: &str, node: &str) -> anyhow::Result<Self> {
        let one = OneDeployment::start(name, 0).await?;
        let dir = tempfile::tempdir()?;
        let a = start_controller(&one.server, dir.path(), &[]).await?;
        wait_leading(&a, Duration::from_secs(30)).await?;
        let svc = ServiceRef {
            namespace: NS.into(),
            name: name.into(),
        };
        let agent = TestAgent::start(node, vec![svc.clone()], vec![a.api_addr]);
        let alert = format!("{name}Sleep");
        one.policies
            .create(&PostParams::default(), &zero_until_demand(name, &alert))
            .await?;
        let asleep = wait_state(&one.policies, name, "zero", Duration::from_secs(30)).await?;
        let zero_since = asleep.status.and_then(|s| s.state_since);
        let http = Http::default();
        eventually("the wake-up taken", Duration::from_secs(30), || async {
            let (status, _) = http.wake(a.api_addr, node, &svc, 1).await?;
            Ok((status == 200).then_some(()))
        })
        .await?;
        wait_replicas(&one.deployments, name, 1, Duration::from_secs(30)).await?;
        wait_state(&one.policies, name, "warm", Duration::from_secs(30)).await?;
        Ok(Self {
            one,
            a,
            zero_since,
            agent,
            _dir: dir,
        })
    }

    /// Another instance (`holder`) takes the Lease for 8 s and never renews: A steps
    /// down (its actors end) and leads again once the Lease runs out.
    async fn depose(&self, holder: &str) -> anyhow::Result<()> {
        let leases: Api<Lease> = Api::namespaced(self.one.client.clone(), NS);
        let mut lease = leases.get("nemesis-controller").await?;
        let spec = lease.spec.as_mut().expect("a Lease spec");
        spec.holder_identity = Some(holder.into());
        spec.lease_duration_seconds = Some(8);
        spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        leases
            .replace("nemesis-controller", &PostParams::default(), &lease)
            .await?;
        let mut leading = self.a.leading();
        tokio::time::timeout(Duration::from_secs(30), leading.wait_for(|l| !*l)).await??;
        Ok(())
    }

    async fn shutdown(self) {
        self.a.shutdown().await;
        self.one.server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_term_resumes_from_the_history_when_the_status_is_one_transition_behind()
-> anyhow::Result<()> {
    init_tracing();
    let w = Woken::start("resumed", "node-r").await?;
    let (a, deployments, policies, log) = (&w.a, &w.one.deployments, &w.one.policies, &w.one.log);
    // Another instance takes the Lease for a while: A steps down, its actors end.
    w.depose("someone-else").await?;

    // The status as if A's last write had been lost: still `zero` since before the wake.
    policies
        .patch_status(
            "resumed",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "state": "zero",
                "stateSince": w.zero_since.expect("stateSince in the status"),
                "lastTransition": null,
                "desiredReplicas": 0,
            }})),
        )
        .await?;
    let p = policies.get("resumed").await?;
    assert_eq!(
        p.status.and_then(|s| s.state).as_deref(),
        Some("zero"),
        "the stale status in place"
    );

    // The other instance never renews: A leads again, a new term. It must resume in
    // `warm` (its history holds zero -> warm, newer than the status) and say so.
    wait_leading(a, Duration::from_secs(60)).await?;
    wait_state(policies, "resumed", "warm", Duration::from_secs(60)).await?;
    // One more evaluation round with the agents heard (a sleep would have been asked by
    // now): still at 1, and the Deployment went 0 -> 1 only.
    eventually(
        "a few evaluations of the new term",
        Duration::from_secs(60),
        || async {
            let p = policies.get("resumed").await?;
            let st = p.status.unwrap_or_default();
            Ok(
                (st.state.as_deref() == Some("warm") && st.desired_replicas == Some(1))
                    .then_some(()),
            )
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(replicas(deployments, "resumed").await?, 1);
    assert_eq!(log.seen(), vec![0, 1], "no scale back to zero");
    w.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_whose_answer_is_lost_is_recorded_once_and_not_repeated() -> anyhow::Result<()> {
    init_tracing();
    let OneDeployment {
        server,
        client: _,
        deployments,
        policies,
        log,
    } = OneDeployment::start("lost", 1).await?;
    let ns = "default";
    let dir = tempfile::tempdir()?;
    // A renew deadline the held answers below cannot use up (they hit the Lease too).
    let a = start_controller(
        &server,
        dir.path(),
        &["--lease-duration", "30s", "--renew-deadline", "20s"],
    )
    .await?;
    wait_leading(&a, Duration::from_secs(30)).await?;
    let svc = ServiceRef {
        namespace: ns.into(),
        name: "lost".into(),
    };
    let agent = TestAgent::start("node-l", vec![svc], vec![a.api_addr]);
    policies
        .create(&PostParams::default(), &busy_policy("lost"))
        .await?;
    wait_state(&policies, "lost", "low", Duration::from_secs(30)).await?;

    // Every answer held past the controller's 10 s API timeout for 3 s (the requests are
    // carried out at once): the scale 1 -> 3 is made, its answer lost.
    server.inject_faults(FaultPlan {
        seed: 2,
        phases: vec![Phase {
            start: Duration::ZERO,
            end: Duration::from_secs(3),
            kind: FaultKind::Slow,
            probability: 1.0,
        }],
        users: Vec::new(),
        subresource: None,
        slow_by: Duration::from_secs(12),
    });
    agent.set(|s| s.open = 10);
    wait_replicas(&deployments, "lost", 3, Duration::from_secs(60)).await?;
    let counts = server.stop_faults();
    anyhow::ensure!(counts.slow > 0, "no answer was held: {counts:?}");
    let records = |a: &nemesis_controller::app::Running| -> anyhow::Result<Vec<(i32, i32)>> {
        Ok(a.store
            .scale_events(&PolicyId::new(ns, "lost"), 0..u64::MAX)?
            .iter()
            .map(|r| (r.from_replicas, r.to_replicas))
            .collect())
    };
    // Recorded once it shows (the controller gave up on its answer after 10 s).
    eventually(
        "the lost scale recorded",
        Duration::from_secs(60),
        || async { Ok((records(&a)? == vec![(1, 3)]).then_some(())) },
    )
    .await?;
    wait_state(&policies, "lost", "high", Duration::from_secs(60)).await?;
    // Back down, answered this time.
    agent.set(|s| s.open = 0);
    wait_replicas(&deployments, "lost", 1, Duration::from_secs(60)).await?;
    eventually(
        "the scale down recorded",
        Duration::from_secs(60),
        || async { Ok((records(&a)? == vec![(1, 3), (3, 1)]).then_some(())) },
    )
    .await?;
    assert_eq!(log.seen(), vec![1, 3, 1], "every scale made once");
    a.shutdown().await;
    server.shutdown().await;
    Ok(())
}

/// A wake-up that comes in while the policy waits on a scale to zero whose answer is
/// lost (made at once, answered after the controller's 10 s API timeout) is answered by
/// the wake that follows. It must not count as new demand in the state it woke, or the
/// next sleep (its alert still firing) waits out the whole demand window (60 s): found
/// by chaos_apiserver's `slow` phase, whose recovery took 70 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_that_waited_behind_a_lost_scale_does_not_hold_off_the_next_sleep()
-> anyhow::Result<()> {
    init_tracing();
    let name = "latewake";
    let node = "node-w";
    let w = Woken::start(name, node).await?;
    let svc = ServiceRef {
        namespace: NS.into(),
        name: name.into(),
    };
    // No kubelet here: the woken pod's readiness is written as one would write it (a
    // policy does not sleep a wake that never became ready).
    let ready = |n: i32| {
        let api = w.one.deployments.clone();
        async move {
            let generation = api.get(name).await?.metadata.generation;
            api.patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "replicas": n,
                    "readyReplicas": n,
                    "observedGeneration": generation,
                }})),
            )
            .await?;
            anyhow::Ok(())
        }
    };
    ready(1).await?;
    let log = ReplicaLog::start(w.one.deployments.clone(), name);
    // Every answer to a `/scale` request held past the API timeout: the scale to zero
    // is made, its answer lost, and the actor waits on it meanwhile.
    w.one.server.inject_faults(
        FaultPlan::only(3, FaultKind::Slow, Duration::from_secs(60), 1.0).for_subresource("scale"),
    );
    post_alert(w.a.api_addr, &format!("{name}Sleep"), true).await?;
    eventually(
        "the scale to zero made",
        Duration::from_secs(30),
        || async { Ok(log.seen().contains(&0).then_some(())) },
    )
    .await?;
    // The actor is still waiting on that answer: this wake-up waits behind it, while
    // the agent reports the connection it holds (so the first evaluation after the
    // answer wakes the Service before the actor gets to the wake-up).
    w.agent.set(|s| s.held = 1);
    let (status, _) = Http::default().wake(w.a.api_addr, node, &svc, 1).await?;
    anyhow::ensure!(status == 200, "the wake-up answered {status}");
    w.one.server.stop_faults();
    wait_replicas(&w.one.deployments, name, 1, Duration::from_secs(60)).await?;
    ready(1).await?;
    // The woken pod took the held connection.
    w.agent.set(|s| s.held = 0);
    let woken = std::time::Instant::now();
    // The alert still fires: the policy goes back to zero as soon as the wake is ready,
    // not a demand window (60 s) later.
    let within = nemesis_controller::engine::observations::DEMAND_WINDOW
        .to_std()?
        .mul_f64(0.5);
    wait_replicas(&w.one.deployments, name, 0, within)
        .await
        .with_context(|| {
            format!(
                "the next sleep was held off (still at 1 {:?} after the wake)",
                woken.elapsed()
            )
        })?;
    assert_eq!(log.seen(), vec![1, 0, 1, 0], "every scale made once");
    w.shutdown().await;
    Ok(())
}

/// A leader killed after its scale reached the API server and before the scale's record
/// was committed leaves a change no replica's history holds (found by the 50-round
/// tests/tests/chaos_leader.rs). Here the "previous leader" is another Lease holder that
/// puts the Deployment to sleep and records nothing; when A leads again it finds the
/// target at 0 while its history ends at 1, and records the change once, as recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_the_previous_leader_did_not_record_is_recorded_once_by_the_next()
-> anyhow::Result<()> {
    init_tracing();
    let w = Woken::start("unrecorded", "node-u").await?;
    let (a, deployments, policies, log) = (&w.a, &w.one.deployments, &w.one.policies, &w.one.log);
    let id = PolicyId::new(NS, "unrecorded");
    let records = || -> anyhow::Result<Vec<(i32, i32, bool)>> {
        Ok(a.store
            .scale_events(&id, 0..u64::MAX)?
            .iter()
            .map(|r| (r.from_replicas, r.to_replicas, r.recovered))
            .collect())
    };
    eventually("the wake recorded", Duration::from_secs(30), || async {
        Ok((records()? == vec![(0, 1, false)]).then_some(()))
    })
    .await?;

    // Another instance takes the Lease: A steps down, its actors end.
    w.depose("previous-leader").await?;

    // The other instance puts the Deployment to sleep through /scale and writes the
    // status, then dies before its history record is committed: none exists.
    deployments
        .patch_scale(
            "unrecorded",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await?;
    policies
        .patch_status(
            "unrecorded",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "state": "zero",
                "stateSince": k8s_openapi::jiff::Timestamp::now().to_string(),
                "desiredReplicas": 0,
            }})),
        )
        .await?;

    // It never renews: A leads again and finds the target at 0, its history at 1.
    wait_leading(a, Duration::from_secs(60)).await?;
    eventually(
        "the sleep recorded as recovered",
        Duration::from_secs(60),
        || async { Ok((records()? == vec![(0, 1, false), (1, 0, true)]).then_some(())) },
    )
    .await?;
    let recovered = a.store.scale_events(&id, 0..u64::MAX)?[1].clone();
    assert!(
        recovered.reason.contains("previous leader"),
        "{}",
        recovered.reason
    );
    assert_eq!(recovered.state, "zero");
    // More evaluations of the term: the change is recorded once, and A scaled nothing
    // itself (the 3 s only give a wrong second record or scale the time to show).
    wait_state(policies, "unrecorded", "zero", Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(records()?, vec![(0, 1, false), (1, 0, true)]);
    assert_eq!(
        log.seen(),
        vec![0, 1, 0],
        "no scale of A's after the takeover"
    );
    w.shutdown().await;
    Ok(())
}
