//! A Deployment through the sandbox against the test API server: scaled to 2 it gives
//! two processes answering on their own pod IPs and an EndpointSlice with two ready
//! endpoints; scaled to 0 it gives no endpoint, no pod, no process. Root required.

mod kubelet_support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use kube::api::PostParams;
use kubelet_support::{
    Env, PORT, http_get, pod_ip, pod_ready, server_deployment, service, wait_for,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_scaled_to_two_serves_on_two_pod_ips_then_to_zero_leaves_nothing()
-> anyhow::Result<()> {
    let env = Env::start("kubelet-deploy").await?;
    env.services()
        .create(&PostParams::default(), &service("web"))
        .await?;
    env.deployments()
        .create(
            &PostParams::default(),
            &server_deployment("web", 0, &[], json!({}), 5),
        )
        .await?;
    env.scale("web", 2).await?;

    let deployment = wait_for("2 available replicas", Duration::from_secs(30), || async {
        let d = env.deployments().get("web").await?;
        let s = d.status.clone().unwrap_or_default();
        Ok((s.available_replicas == Some(2) && s.ready_replicas == Some(2)).then_some(d))
    })
    .await?;
    let status = deployment.status.unwrap();
    assert_eq!(status.replicas, Some(2));
    assert_eq!(status.updated_replicas, Some(2));
    assert_eq!(status.observed_generation, deployment.metadata.generation);
    let available = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_.as_deref() == Some("Available"))
        .unwrap();
    assert_eq!(available.status.as_deref(), Some("True"));

    let pods = env.running_pods().await?;
    assert_eq!(pods.len(), 2);
    let mut ips = BTreeSet::new();
    for pod in &pods {
        assert!(pod_ready(pod), "{pod:?}");
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let container = &status.container_statuses.as_ref().unwrap()[0];
        assert!(container.ready && container.state.as_ref().unwrap().running.is_some());
        assert_eq!(
            pod.spec.as_ref().unwrap().node_name.as_deref(),
            Some(env.sandbox.node_name())
        );
        let ip = pod_ip(pod).expect("pod IP");
        assert!(
            ip.octets()[0] == 198 && ip.octets()[1] & 0xfe == 18,
            "{ip} outside 198.18.0.0/15"
        );
        // Each process answers on its own pod IP, with its own name.
        let body = http_get(SocketAddr::from((ip, PORT)))?;
        assert_eq!(body.trim(), pod.metadata.name.as_deref().unwrap());
        ips.insert(ip.to_string());
    }
    assert_eq!(ips.len(), 2, "two distinct pod IPs");
    assert_eq!(env.processes().len(), 2, "one process per pod");

    let endpoints = wait_for("two ready endpoints", Duration::from_secs(10), || async {
        let eps = env.endpoints("web").await?;
        Ok((eps.len() == 2 && eps.iter().all(|e| e.1)).then_some(eps))
    })
    .await?;
    let addresses: BTreeSet<String> = endpoints.iter().map(|e| e.0.clone()).collect();
    assert_eq!(addresses, ips);
    let slice = env
        .slices()
        .list(&kube::api::ListParams::default().labels("kubernetes.io/service-name=web"))
        .await?
        .items
        .remove(0);
    let port = &slice.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.port),
        (Some("web"), Some(i32::from(PORT)))
    );
    assert_eq!(slice.address_type, "IPv4");

    env.scale("web", 0).await?;
    wait_for("no pods", Duration::from_secs(30), || async {
        Ok(env.running_pods().await?.is_empty().then_some(()))
    })
    .await?;
    wait_for("no endpoints", Duration::from_secs(10), || async {
        Ok(env.endpoints("web").await?.is_empty().then_some(()))
    })
    .await?;
    assert_eq!(env.processes(), Vec::<u32>::new(), "no process left");
    for ip in &ips {
        let addr: SocketAddr = format!("{ip}:{PORT}").parse()?;
        assert!(
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
            "{addr} still answers"
        );
    }
    let d = env.deployments().get("web").await?;
    let s = d.status.unwrap_or_default();
    assert_eq!(
        (s.replicas, s.ready_replicas, s.available_replicas),
        (None, None, None)
    );
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_change_rolls_the_pods_without_losing_a_ready_endpoint() -> anyhow::Result<()> {
    let env = Env::start("kubelet-roll").await?;
    env.services()
        .create(&PostParams::default(), &service("roll"))
        .await?;
    env.deployments()
        .create(
            &PostParams::default(),
            &server_deployment("roll", 2, &[], json!({}), 5),
        )
        .await?;
    wait_for("two ready endpoints", Duration::from_secs(30), || async {
        let eps = env.endpoints("roll").await?;
        Ok((eps.iter().filter(|e| e.1).count() == 2).then_some(()))
    })
    .await?;
    let old: BTreeSet<String> = env
        .running_pods()
        .await?
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();

    env.deployments()
        .patch(
            "roll",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"spec": {"template": {"metadata": {"annotations": {"rev": "2"}}}}}),
            ),
        )
        .await?;
    let fewest_ready = std::cell::Cell::new(usize::MAX);
    wait_for("the rollout to finish", Duration::from_secs(30), || {
        let env = &env;
        let old = &old;
        let fewest = &fewest_ready;
        async move {
            let ready = env.endpoints("roll").await?.iter().filter(|e| e.1).count();
            fewest.set(fewest.get().min(ready));
            let d = env.deployments().get("roll").await?;
            let s = d.status.unwrap_or_default();
            let pods = env.running_pods().await?;
            let done = s.updated_replicas == Some(2)
                && s.available_replicas == Some(2)
                && s.replicas == Some(2)
                && pods.len() == 2
                && pods
                    .iter()
                    .all(|p| !old.contains(p.metadata.name.as_deref().unwrap()));
            Ok(done.then_some(()))
        }
    })
    .await?;
    let fewest_ready = fewest_ready.get();
    assert!(
        fewest_ready >= 2,
        "ready endpoints dropped to {fewest_ready} during the rollout"
    );
    let d = env.deployments().get("roll").await?;
    let progressing = d
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_.as_deref() == Some("Progressing"))
        .unwrap();
    assert_eq!(
        progressing.reason.as_deref(),
        Some("NewReplicaSetAvailable")
    );
    env.shutdown().await
}
