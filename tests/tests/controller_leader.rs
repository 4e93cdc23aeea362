//! Two controllers against one test API server, elected on a Lease: only the leader
//! scales (the standby refuses wake-ups and records no scale); when the leader dies
//! without a word the standby takes over within the lease duration and finishes the
//! work with no scale repeated or lost; a leader that shuts down hands over at once.

mod controller_support;

use std::time::{Duration, Instant};

use controller_support::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use nemesis_common::wire::ServiceRef;
use nemesis_controller::leader::LEADER_LABEL;
use nemesis_controller::store::PolicyId;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::json;

/// The test controllers' `--lease-duration` and `--retry-period` (see `run_args`).
const LEASE: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_millis(250);

fn scale_records(c: &nemesis_controller::app::Running, ns: &str, name: &str) -> usize {
    c.store
        .scale_events(&PolicyId::new(ns, name), 0..u64::MAX)
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_scales_and_a_killed_leader_is_replaced_without_repeating_or_losing_a_scale()
-> anyhow::Result<()> {
    init_tracing();
    let OneDeployment {
        server,
        client,
        deployments,
        policies,
        log,
    } = OneDeployment::start("web", 1).await?;
    let ns = "default";

    let dir_a = tempfile::tempdir()?;
    let dir_b = tempfile::tempdir()?;
    let a = start_controller(&server, dir_a.path(), &[]).await?;
    wait_leading(&a, Duration::from_secs(10)).await?;
    // B starts after A leads, so A is the leader and B the standby.
    let b = start_controller(&server, dir_b.path(), &[]).await?;
    tokio::time::sleep(LEASE).await;
    assert!(a.is_leading() && !b.is_leading(), "exactly one leader");

    let svc = ServiceRef {
        namespace: ns.into(),
        name: "web".into(),
    };
    let agent = TestAgent::start("node-a", vec![svc.clone()], vec![a.api_addr, b.api_addr]);
    policies
        .create(&PostParams::default(), &busy_policy("web"))
        .await?;
    wait_state(&policies, "web", "low", Duration::from_secs(10)).await?;

    // The standby refuses wake-ups; the leader takes them.
    let http = Http::default();
    let (status, _) = http.wake(b.api_addr, "node-a", &svc, 1).await?;
    assert_eq!(status, 503, "a standby must not take wake-ups");
    let (status, body) = http.wake(a.api_addr, "node-a", &svc, 1).await?;
    assert_eq!(status, 200, "{body}");

    // Load: the leader scales 1 -> 3; the standby does nothing.
    agent.set(|s| s.open = 10);
    wait_replicas(&deployments, "web", 3, Duration::from_secs(10)).await?;
    wait_state(&policies, "web", "high", Duration::from_secs(10)).await?;
    // History is written off the scaling path: wait for the commit.
    eventually("A's scale record", Duration::from_secs(5), || async {
        Ok((scale_records(&a, ns, "web") == 1).then_some(()))
    })
    .await?;
    // The standby made no scale; it holds A's record, pulled from A (history replication).
    eventually("A's scale record on B", Duration::from_secs(60), || async {
        Ok((scale_records(&b, ns, "web") == 1).then_some(()))
    })
    .await?;
    assert_eq!(
        scrape(
            &b,
            "nemesis_controller_scale_operations_total{direction=\"up\"}"
        )
        .await
        .unwrap_or(0.0),
        0.0
    );
    assert_eq!(
        scrape(
            &a,
            "nemesis_controller_scale_operations_total{direction=\"up\"}"
        )
        .await?,
        1.0
    );

    // Kill the leader (nothing released) and drop the load at the same moment.
    let killed = Instant::now();
    a.kill();
    agent.targets.lock().unwrap().retain(|t| *t == b.api_addr);
    agent.set(|s| s.open = 0);
    wait_leading(&b, LEASE * 3).await?;
    let took = killed.elapsed();
    // B saw A's last renewal at most one retry period (plus jitter) after it happened,
    // and needs one more attempt after the lease ran out.
    assert!(
        took <= LEASE + RETRY * 3,
        "the standby took {took:?} to take over (lease {LEASE:?})"
    );
    let lease: Lease = Api::namespaced(client.clone(), ns)
        .get("nemesis-controller")
        .await?;
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some(b.identity.as_str()));
    assert_eq!(spec.lease_transitions, Some(1), "A -> B");

    // B resumes in `high` from the status A wrote, then scales back down once: 3 -> 1.
    wait_replicas(&deployments, "web", 1, Duration::from_secs(10)).await?;
    wait_state(&policies, "web", "low", Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log.seen(), vec![1, 3, 1], "every scale exactly once");
    // B holds A's scale (replicated) and its own.
    eventually("B's scale record", Duration::from_secs(30), || async {
        Ok((scale_records(&b, ns, "web") == 2).then_some(()))
    })
    .await?;
    let transitions = b
        .store
        .transitions(&PolicyId::new(ns, "web"), 0..u64::MAX)?;
    let states: Vec<(&str, &str)> = transitions
        .iter()
        .map(|t| (t.from_state.as_str(), t.to_state.as_str()))
        .collect();
    assert_eq!(states, vec![("low", "high"), ("high", "low")]);
    b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_shuts_down_releases_the_lease_and_the_standby_takes_over_at_once_moving_the_pod_label()
-> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let dir_a = tempfile::tempdir()?;
    let dir_b = tempfile::tempdir()?;
    // The controllers' own Pods (objects only; nothing runs them), for the leader label.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for name in ["ctl-a", "ctl-b"] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "nemesis-controller"}},
            "spec": {"containers": [{"name": "c", "image": "local/controller"}]},
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    let leader_label = |name: &'static str| {
        let pods = pods.clone();
        async move {
            let p = pods.get(name).await?;
            anyhow::Ok(
                p.metadata
                    .labels
                    .unwrap_or_default()
                    .get(LEADER_LABEL)
                    .cloned(),
            )
        }
    };
    // A long lease: only the release can make the hand-over fast.
    let slow = ["--lease-duration", "20s", "--renew-deadline", "10s"];
    let a = start_controller(
        &server,
        dir_a.path(),
        &[&slow[..], &["--pod-name", "ctl-a"]].concat(),
    )
    .await?;
    wait_leading(&a, Duration::from_secs(10)).await?;
    let b = start_controller(
        &server,
        dir_b.path(),
        &[&slow[..], &["--pod-name", "ctl-b"]].concat(),
    )
    .await?;
    eventually(
        "the leader label on A's Pod",
        Duration::from_secs(5),
        || async { Ok((leader_label("ctl-a").await?.as_deref() == Some("true")).then_some(())) },
    )
    .await?;
    assert!(!b.is_leading());
    assert_eq!(leader_label("ctl-b").await?, None);
    let stopped = Instant::now();
    a.shutdown().await;
    wait_leading(&b, Duration::from_secs(5)).await?;
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "hand-over took {:?}",
        stopped.elapsed()
    );
    eventually(
        "the leader label moved to B's Pod",
        Duration::from_secs(5),
        || async {
            let a = leader_label("ctl-a").await?;
            let b = leader_label("ctl-b").await?;
            Ok((a.is_none() && b.as_deref() == Some("true")).then_some(()))
        },
    )
    .await?;
    // A graceful hand-over is a transition too (a real cluster showed 0 after one).
    let lease: Lease = Api::namespaced(client.clone(), "default")
        .get("nemesis-controller")
        .await?;
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some(b.identity.as_str()));
    assert_eq!(spec.lease_transitions, Some(1), "A -> released -> B");
    b.shutdown().await;
    Ok(())
}

/// The `for` window a leader started survives its death: the standby resumes it from the
/// policy status and fires at the original deadline, not a whole window after it took
/// over. The agent reaches only the leader until it dies, so the new leader knows
/// nothing of the connections for a while (unknown values must not end the window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_for_window_is_replaced_by_one_that_fires_at_the_original_deadline()
-> anyhow::Result<()> {
    const WINDOW: Duration = Duration::from_secs(12);
    init_tracing();
    let OneDeployment {
        server,
        client: _,
        deployments,
        policies,
        log,
    } = OneDeployment::start("win", 3).await?;
    let ns = "default";

    let dir_a = tempfile::tempdir()?;
    let dir_b = tempfile::tempdir()?;
    let a = start_controller(&server, dir_a.path(), &[]).await?;
    wait_leading(&a, Duration::from_secs(10)).await?;
    let b = start_controller(&server, dir_b.path(), &[]).await?;
    tokio::time::sleep(LEASE).await;
    assert!(a.is_leading() && !b.is_leading(), "exactly one leader");

    let svc = ServiceRef {
        namespace: ns.into(),
        name: "win".into(),
    };
    let agent = TestAgent::start("node-w", vec![svc.clone()], vec![a.api_addr]);
    agent.set(|s| s.open = 10);
    policies
        .create(
            &PostParams::default(),
            &policy(
                "win",
                json!({
                    "target": {"deployment": "win", "service": "win"},
                    "initialState": "high",
                    "states": [
                        {"name": "low", "replicas": 1},
                        {"name": "high", "replicas": 3},
                    ],
                    "transitions": [
                        {"from": "low", "to": "high", "when": "conns.active > 5"},
                        {"from": "high", "to": "low", "when": format!("conns.active <= 5 for {}s", WINDOW.as_secs())},
                    ],
                }),
            ),
        )
        .await?;
    wait_state(&policies, "win", "high", Duration::from_secs(20)).await?;

    // The load goes; A starts the window and records it in the status.
    agent.set(|s| s.open = 0);
    let since = eventually(
        "the window in the status",
        Duration::from_secs(20),
        || async {
            let p = policies.get("win").await?;
            Ok(p.status.and_then(|s| s.windows.first().map(|w| w.since)))
        },
    )
    .await?;
    // Kill A five seconds into the window (nothing released); the agent now reaches B.
    let kill_at = since + chrono::TimeDelta::seconds(5);
    if let Ok(wait) = (kill_at - chrono::Utc::now()).to_std() {
        tokio::time::sleep(wait).await;
    }
    assert_eq!(replicas(&deployments, "win").await?, 3, "A fired early");
    let killed = chrono::Utc::now();
    a.kill();
    *agent.targets.lock().unwrap() = vec![b.api_addr];
    wait_leading(&b, Duration::from_secs(30)).await?;

    wait_state(&policies, "win", "low", Duration::from_secs(60)).await?;
    let at = policies
        .get("win")
        .await?
        .status
        .and_then(|s| s.last_transition)
        .map(|t| t.at)
        .expect("a transition record");
    let deadline = since + chrono::TimeDelta::from_std(WINDOW)?;
    // Started afresh, B's window could not end before `killed + WINDOW` (it cannot take
    // over before the kill); resumed, it ends at `since + WINDOW`, five seconds earlier.
    assert!(
        at >= deadline,
        "fired at {at}, before the deadline {deadline}"
    );
    assert!(
        at < killed + chrono::TimeDelta::from_std(WINDOW)?,
        "fired at {at}: a whole window after the take-over ({killed}), not at the original deadline {deadline}"
    );
    wait_replicas(&deployments, "win", 1, Duration::from_secs(20)).await?;
    assert_eq!(log.seen(), vec![3, 1], "one scale, once");
    b.shutdown().await;
    Ok(())
}

/// Lease renewals never wait for the main runtime. Here both of its worker threads are
/// held (as a long burst of CPU work holds the scheduler's queue) for three renew
/// deadlines; the leader must keep leading and keep renewing. Before the lease client
/// was built on the election's own runtime, its request queue ran on the main one, and
/// the leader stepped down at the first renew deadline.
#[test]
fn a_leader_whose_main_runtime_is_held_past_the_renew_deadline_keeps_leading() -> anyhow::Result<()>
{
    const RENEW_DEADLINE: Duration = Duration::from_secs(2); // as `run_args` sets it
    init_tracing();
    // The API server and the test's own checks run apart from the controller's runtime.
    let side = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let server = side.block_on(TestApiServer::start(ApiServerOptions::default()))?;
    let client = side.block_on(server.client())?;
    side.block_on(install_crd(&client))?;
    let config = side.block_on(server.config())?;
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let args = run_args(dir.path(), &[])?;
    let running = main.block_on(async {
        let clients = nemesis_controller::api_client::ApiClients::from_config(config)?;
        anyhow::Ok(nemesis_controller::app::start_with(&args, clients).await?)
    })?;
    main.block_on(wait_leading(&running, Duration::from_secs(30)))?;

    let stepped_down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut leading = running.leading();
    let flag = stepped_down.clone();
    side.spawn(async move {
        if leading.wait_for(|l| !*l).await.is_ok() {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let renewed = || {
        side.block_on(leases.get("nemesis-controller"))
            .map(|l| l.spec.unwrap_or_default())
    };
    let before = renewed()?;

    // Both workers at once (a barrier only both can pass), for three renew deadlines.
    let held = RENEW_DEADLINE * 3;
    let both = std::sync::Arc::new(std::sync::Barrier::new(2));
    let holds: Vec<_> = (0..2)
        .map(|_| {
            let both = both.clone();
            main.spawn(async move {
                both.wait();
                std::thread::sleep(held);
            })
        })
        .collect();
    std::thread::sleep(held / 2);
    let during = renewed()?;
    for h in holds {
        main.block_on(h)?;
    }

    anyhow::ensure!(
        !stepped_down.load(std::sync::atomic::Ordering::SeqCst),
        "the leader stepped down while its main runtime was held for {held:?}"
    );
    assert_eq!(
        during.lease_transitions, before.lease_transitions,
        "the Lease changed hands"
    );
    assert_ne!(
        during.renew_time, before.renew_time,
        "no renewal landed while the main runtime was held"
    );
    // Both stop inside the runtime they run on.
    {
        let _on = main.enter();
        running.kill();
    }
    let _on = side.enter();
    drop(server);
    Ok(())
}

/// A new leader leaves alone the hold EndpointSlices the last one left right: at 10,000
/// Services a takeover rewrote every one (10,000 writes while the new term settled).
/// It still writes what is wrong: a slice deleted behind its back comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_does_not_rewrite_the_hold_slices_the_last_one_left_right()
-> anyhow::Result<()> {
    const SLICE: &str = "held-nemesis-hold-ipv4";
    init_tracing();
    let OneDeployment {
        server,
        client,
        policies,
        ..
    } = OneDeployment::start("held", 0).await?;
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &service("held"))
        .await?;
    policies
        .create(&PostParams::default(), &busy_policy("held"))
        .await?;
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), "default");
    let dir_a = tempfile::tempdir()?;
    let a = start_controller(&server, dir_a.path(), &[]).await?;
    wait_leading(&a, Duration::from_secs(10)).await?;
    // No pod ever runs here, so the Service never has a ready backend: it is held.
    eventually("A's hold slice", Duration::from_secs(20), || async {
        Ok(slices.get_opt(SLICE).await?.map(|_| ()))
    })
    .await?;
    a.kill();

    let dir_b = tempfile::tempdir()?;
    let b = start_controller(&server, dir_b.path(), &[]).await?;
    // Marks where B's requests begin in the server's log.
    let marker = "b-takes-over";
    let _ = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), "default")
        .get_opt(marker)
        .await?;
    wait_leading(&b, Duration::from_secs(10)).await?;
    // Longer than the hold-slice loop's longest interval between passes (5 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let writes_of_the_slice = || {
        let log = server.requests();
        let from = log
            .iter()
            .rposition(|r| r.path.ends_with(marker))
            .expect("the marker request is in the log");
        log[from..]
            .iter()
            .filter(|r| r.method != "GET" && r.path.ends_with(SLICE))
            .count()
    };
    assert_eq!(
        writes_of_the_slice(),
        0,
        "the new leader rewrote a hold slice that was right"
    );
    // B's passes run: a slice deleted behind its back is written again.
    slices.delete(SLICE, &Default::default()).await?;
    eventually("B's hold slice", Duration::from_secs(20), || async {
        Ok(slices.get_opt(SLICE).await?.map(|_| ()))
    })
    .await?;
    assert!(
        writes_of_the_slice() >= 1,
        "B wrote the deleted slice again"
    );
    b.shutdown().await;
    Ok(())
}
