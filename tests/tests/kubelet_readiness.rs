//! Readiness through the sandbox: a slow starter (start delay) runs but is not Ready,
//! and not a ready endpoint, until its server listens; then it is both. Root required.

mod kubelet_support;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use kube::api::PostParams;
use kubelet_support::{
    Env, PORT, http_get, pod_ip, pod_ready, server_deployment, service, wait_for,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_starter_becomes_ready_only_after_it_listens() -> anyhow::Result<()> {
    let env = Env::start("kubelet-ready").await?;
    env.services()
        .create(&PostParams::default(), &service("slow"))
        .await?;
    let delay = Duration::from_millis(2000);
    let annotations = json!({"nemesis.test/start-delay-ms": delay.as_millis().to_string()});
    env.deployments()
        .create(
            &PostParams::default(),
            &server_deployment("slow", 1, &[], annotations, 5),
        )
        .await?;

    // The container runs (the process exists, in its netns) but does not listen yet.
    let pod = wait_for("a running container", Duration::from_secs(20), || async {
        let pods = env.running_pods().await?;
        Ok(pods.into_iter().find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                })
        }))
    })
    .await?;
    let seen_running = Instant::now();
    let ip = pod_ip(&pod).expect("a running pod has an IP");
    let addr = SocketAddr::from((ip, PORT));
    assert!(!pod_ready(&pod), "ready before listening: {:?}", pod.status);
    assert!(
        !env.processes().is_empty(),
        "the slow starter's process runs"
    );
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "the server listens before its start delay is over"
    );
    let endpoints = wait_for("a not-ready endpoint", Duration::from_secs(5), || async {
        let eps = env.endpoints("slow").await?;
        Ok((!eps.is_empty()).then_some(eps))
    })
    .await?;
    if seen_running.elapsed() < delay / 2 {
        assert_eq!(endpoints, [(ip.to_string(), false, false, false)]);
    }

    // Ready follows the first successful probe once the server listens.
    let pod = wait_for(
        "the pod to become Ready",
        Duration::from_secs(20),
        || async {
            let pod = env
                .pods()
                .get(pod.metadata.name.as_deref().unwrap())
                .await?;
            Ok(pod_ready(&pod).then_some(pod))
        },
    )
    .await?;
    let waited = seen_running.elapsed();
    assert!(
        waited >= delay - Duration::from_millis(700),
        "Ready after {waited:?}, before the {delay:?} start delay could be over"
    );
    assert_eq!(
        http_get(addr)?.trim(),
        pod.metadata.name.as_deref().unwrap()
    );
    wait_for("a ready endpoint", Duration::from_secs(5), || async {
        let eps = env.endpoints("slow").await?;
        Ok((eps == [(ip.to_string(), true, true, false)]).then_some(()))
    })
    .await?;
    let log = std::fs::read_to_string(env.sandbox.log_path(
        &env.ns,
        pod.metadata.name.as_deref().unwrap(),
        "server",
    ))?;
    assert!(log.contains("listening on"), "container log: {log:?}");
    env.shutdown().await
}
