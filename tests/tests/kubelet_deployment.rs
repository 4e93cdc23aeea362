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
