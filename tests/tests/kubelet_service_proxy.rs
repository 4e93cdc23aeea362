//! The sandbox's Service proxy (kube-proxy's part of the node): a ClusterIP accepts
//! connections only while its Service has ready endpoints, spreads them over the ready
//! pods, and refuses again once the Deployment is at zero. Root required.

mod kubelet_support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;
use kubelet_support::{server_deployment, service, wait_for};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::demo::cluster_ip;
use nemesis_tests::kubelet::{Sandbox, SandboxOptions};
use serde_json::json;

/// One `GET /` over a fresh connection: the pod's name, or the connect error.
fn get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_string())
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_ip_serves_ready_pods_and_is_refused_at_zero() -> anyhow::Result<()> {
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    let sandbox = Sandbox::start(
        client.clone(),
        SandboxOptions {
            service_proxy: true,
            ..Default::default()
        },
    )
    .await?;
    let ns = format!("svcproxy-{}", std::process::id());
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    // A ClusterIP of this sandbox's own block: parallel sandboxes never share it.
    let ip: Ipv4Addr = cluster_ip::cluster_ip(sandbox.subnet_index(), 0).context("block")?;
    let addr = SocketAddr::from((ip, 80));
    let mut svc = service("web");
    svc.spec.as_mut().context("spec")?.cluster_ip = Some(ip.to_string());
    let deployments = Api::namespaced(client.clone(), &ns);
    deployments
        .create(
            &PostParams::default(),
            &server_deployment("web", 0, &[], json!({}), 2),
        )
        .await?;
    Api::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &svc)
        .await?;

    // No endpoints: refused, as kube-proxy's REJECT rule makes it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = get(addr).expect_err("a Service at zero accepts nothing");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    // Two ready pods: both answer through the ClusterIP.
    deployments
        .patch_scale(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await?;
    let seen = wait_for(
        "both pods to answer on the ClusterIP",
        Duration::from_secs(30),
        || async {
            let mut seen = BTreeSet::new();
            for _ in 0..10 {
                if let Ok(name) = get(addr) {
                    seen.insert(name);
                }
            }
            Ok((seen.len() == 2).then_some(seen))
        },
    )
    .await?;
    assert!(seen.iter().all(|n| n.starts_with("web-")), "{seen:?}");

    // Back to zero: refused again once the endpoints are gone.
    deployments
        .patch_scale(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await?;
    wait_for(
        "the ClusterIP to refuse again",
        Duration::from_secs(30),
        || async {
            Ok(get(addr)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
                .then_some(()))
        },
    )
    .await?;

    sandbox.shutdown().await?;
    server.shutdown().await;
    // The listener is closed with the sandbox.
    let err = get(addr).expect_err("nothing listens after shutdown");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    Ok(())
}
