//! Scale-down through the sandbox: pods get SIGTERM, and SIGKILL once the grace period
//! is over; meanwhile the pod is terminating in the API and its endpoint is serving but
//! not ready. Root required.

mod kubelet_support;

use std::time::{Duration, Instant};

use kube::api::PostParams;
use kubelet_support::{Env, pod_ready, processes_with_env, server_deployment, service, wait_for};
use serde_json::json;

fn alive(pid: u32) -> bool {
    // A zombie has no environ left; only a running process counts.
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|e| !e.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_ignoring_sigterm_is_killed_after_the_grace_period() -> anyhow::Result<()> {
    let env = Env::start("kubelet-kill").await?;
    let grace = Duration::from_secs(2);
    env.services()
        .create(&PostParams::default(), &service("stubborn"))
        .await?;
    env.deployments()
        .create(
            &PostParams::default(),
            &server_deployment(
                "stubborn",
                1,
                &["--ignore-sigterm"],
                json!({}),
                grace.as_secs() as i64,
            ),
        )
        .await?;
    let pod = wait_for("a ready pod", Duration::from_secs(20), || async {
        Ok(env.running_pods().await?.into_iter().find(pod_ready))
    })
    .await?;
    let name = pod.metadata.name.clone().unwrap();
    let pids = processes_with_env(&format!("POD_NAME={name}"));
    assert_eq!(pids.len(), 1, "one process for {name}");
    let pid = pids[0];

    env.scale("stubborn", 0).await?;
    let asked = Instant::now();
    // Within the grace period: terminating in the API, endpoint serving but not ready.
    wait_for("a terminating endpoint", grace, || async {
        let eps = env.endpoints("stubborn").await?;
        Ok((eps.len() == 1 && !eps[0].1 && eps[0].2 && eps[0].3).then_some(()))
    })
    .await?;
    let terminating = env.pods().get(&name).await?;
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(
        terminating.metadata.deletion_grace_period_seconds,
        Some(grace.as_secs() as i64)
    );
    tokio::time::sleep(grace / 2).await;
    assert!(alive(pid), "SIGKILLed before the grace period was over");

    wait_for(
        "the process to be killed",
        Duration::from_secs(10),
        || async { Ok((!alive(pid)).then_some(())) },
    )
    .await?;
    let took = asked.elapsed();
    assert!(
        took >= grace - Duration::from_millis(100),
        "killed after {took:?}"
    );
    assert!(
        took < grace + Duration::from_secs(3),
        "killed only after {took:?}"
    );
    wait_for("the pod object to go", Duration::from_secs(10), || async {
        Ok(env.running_pods().await?.is_empty().then_some(()))
    })
    .await?;
    wait_for("no endpoints", Duration::from_secs(10), || async {
        Ok(env.endpoints("stubborn").await?.is_empty().then_some(()))
    })
    .await?;
    assert!(env.processes().is_empty());
    let log = std::fs::read_to_string(env.sandbox.log_path(&env.ns, &name, "server"))?;
    assert!(
        log.contains("ignoring SIGTERM"),
        "the process never saw SIGTERM: {log:?}"
    );
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_honours_sigterm_stops_without_waiting_for_the_grace_period()
-> anyhow::Result<()> {
    let env = Env::start("kubelet-term").await?;
    env.deployments()
        .create(
            &PostParams::default(),
            &server_deployment("polite", 1, &[], json!({}), 30),
        )
        .await?;
    let pod = wait_for("a ready pod", Duration::from_secs(20), || async {
        Ok(env.running_pods().await?.into_iter().find(pod_ready))
    })
    .await?;
    let name = pod.metadata.name.clone().unwrap();
    env.scale("polite", 0).await?;
    let asked = Instant::now();
    wait_for("the pod object to go", Duration::from_secs(10), || async {
        Ok(env.running_pods().await?.is_empty().then_some(()))
    })
    .await?;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "took {:?} of a 30 s grace",
        asked.elapsed()
    );
    assert!(env.processes().is_empty());
    let log = std::fs::read_to_string(env.sandbox.log_path(&env.ns, &name, "server"))?;
    assert!(log.contains("got SIGTERM"), "{log:?}");
    env.shutdown().await
}
