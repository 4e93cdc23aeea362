//! The sandbox's Service proxy (kube-proxy's part of the node): a ClusterIP accepts
//! connections only while its Service has ready endpoints, spreads them over the ready
//! pods, and refuses again once the Deployment is at zero. A dual-stack Service gets an
//! IPv6 ClusterIP too, served from its IPv6 EndpointSlices; the API server defaults and
//! refuses IP families as kube-apiserver does. Root required.

mod kubelet_support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
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

/// The message of the 422 Invalid a Service with `spec` is refused with.
async fn refused(services: &Api<Service>, spec: serde_json::Value) -> anyhow::Result<String> {
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "bad"}, "spec": spec}))?;
    match services.create(&PostParams::default(), &svc).await {
        Err(kube::Error::Api(e)) if e.code == 422 => Ok(e.message),
        other => anyhow::bail!("expected 422 Invalid, got {other:?}"),
    }
}

/// Whether `ip` is an address of `lo` now (`/proc/net/if_inet6`: 32 hex digits, then the
/// interface name last).
fn on_lo(ip: Ipv6Addr) -> anyhow::Result<bool> {
    let hex: String = ip.octets().iter().map(|b| format!("{b:02x}")).collect();
    let text = std::fs::read_to_string("/proc/net/if_inet6")?;
    Ok(text.lines().any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.first() == Some(&hex.as_str()) && cols.last() == Some(&"lo")
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_service_is_served_on_each_cluster_ip_from_the_slices_of_its_family()
-> anyhow::Result<()> {
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
    let ns = format!("svcproxy6-{}", std::process::id());
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);

    // Families defaulted and refused as kube-apiserver does.
    let ports = json!([{"port": 80}]);
    let msg = refused(
        &services,
        json!({"ports": ports, "ipFamilyPolicy": "SingleStack",
                         "ipFamilies": ["IPv4", "IPv6"]}),
    )
    .await?;
    assert!(
        msg.contains("spec.ipFamilyPolicy")
            && msg.contains("must be 'RequireDualStack' or 'PreferDualStack'"),
        "{msg}"
    );
    let msg = refused(
        &services,
        json!({"ports": ports, "ipFamilyPolicy": "Sometimes"}),
    )
    .await?;
    assert!(
        msg.contains("spec.ipFamilyPolicy: Unsupported value: \"Sometimes\""),
        "{msg}"
    );
    let msg = refused(
        &services,
        json!({"ports": ports, "ipFamilyPolicy": "RequireDualStack",
                         "ipFamilies": ["IPv6", "IPv6"]}),
    )
    .await?;
    assert!(
        msg.contains("spec.ipFamilies[1]: Duplicate value: \"IPv6\""),
        "{msg}"
    );
    let msg = refused(
        &services,
        json!({"ports": ports, "clusterIP": "fd6e:6d00:ffff::9",
                         "ipFamilies": ["IPv4"]}),
    )
    .await?;
    assert!(
        msg.contains("spec.clusterIPs[0]") && msg.contains("expected an IPv4 value"),
        "{msg}"
    );
    let msg = refused(
        &services,
        json!({"ports": ports, "clusterIP": "fd6e:6d00:0:1::9"}),
    )
    .await?;
    assert!(
        msg.contains("The range of valid IPs is fd6e:6d00:ffff::/108"),
        "{msg}"
    );
    let single: Service = serde_json::from_value(json!({
        "metadata": {"name": "v6"},
        "spec": {"ports": ports, "ipFamilies": ["IPv6"]},
    }))?;
    let single = services.create(&PostParams::default(), &single).await?;
    let spec = single.spec.context("spec")?;
    assert_eq!(spec.ip_families, Some(vec!["IPv6".to_string()]));
    assert_eq!(spec.ip_family_policy.as_deref(), Some("SingleStack"));
    let ip: IpAddr = spec.cluster_ip.as_deref().context("a ClusterIP")?.parse()?;
    assert!(
        nemesis_tests::apiserver::in_service_range(ip) && ip.is_ipv6(),
        "{ip}"
    );

    // A dual-stack Service with ClusterIPs of this sandbox's own blocks.
    let v4 = cluster_ip::cluster_ip(sandbox.subnet_index(), 0).context("block")?;
    let v6 = cluster_ip::cluster_ip_v6(sandbox.subnet_index(), 0).context("block")?;
    let mut svc = service("web");
    {
        let spec = svc.spec.as_mut().context("spec")?;
        spec.ip_family_policy = Some("PreferDualStack".into());
        spec.cluster_ips = Some(vec![v4.to_string(), v6.to_string()]);
    }
    let created = services.create(&PostParams::default(), &svc).await?;
    let spec = created.spec.context("spec")?;
    assert_eq!(
        spec.ip_families,
        Some(vec!["IPv4".to_string(), "IPv6".to_string()])
    );
    assert_eq!(spec.cluster_ip, Some(v4.to_string()));
    let deployments = Api::namespaced(client.clone(), &ns);
    deployments
        .create(
            &PostParams::default(),
            &server_deployment("web", 1, &["--listen", "[::]:8080"], json!({}), 2),
        )
        .await?;

    // One slice per family, each listing the pod's address of its family.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let lp = kube::api::ListParams::default().labels("kubernetes.io/service-name=web");
    let families = wait_for(
        "a ready endpoint in a slice of each family",
        Duration::from_secs(30),
        || async {
            let mut ready = BTreeSet::new();
            for s in slices.list(&lp).await?.items {
                for ep in s.endpoints.iter().flatten() {
                    if ep.conditions.as_ref().and_then(|c| c.ready) != Some(true) {
                        continue;
                    }
                    for a in &ep.addresses {
                        let ip: IpAddr = a.parse()?;
                        anyhow::ensure!(
                            ip.is_ipv6() == (s.address_type == "IPv6"),
                            "{a} in an {} slice",
                            s.address_type
                        );
                        ready.insert(s.address_type.clone());
                    }
                }
            }
            Ok((ready.len() == 2).then_some(ready))
        },
    )
    .await?;
    assert_eq!(families.len(), 2);

    // Both ClusterIPs answer, each from the pod.
    for addr in [SocketAddr::from((v4, 80)), SocketAddr::from((v6, 80))] {
        let name = wait_for(
            &format!("the pod to answer on {addr}"),
            Duration::from_secs(30),
            || async { Ok(get(addr).ok().filter(|n| n.starts_with("web-"))) },
        )
        .await?;
        assert!(name.starts_with("web-"), "{name}");
    }
    assert!(on_lo(v6)?, "the IPv6 ClusterIP {v6} is on lo while served");

    // At zero: refused on both, and the IPv6 ClusterIP leaves lo.
    deployments
        .patch_scale(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await?;
    wait_for(
        "both ClusterIPs to refuse again",
        Duration::from_secs(30),
        || async {
            let refused = |a: SocketAddr| {
                get(a).is_err_and(|e| {
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::AddrNotAvailable
                            | std::io::ErrorKind::NetworkUnreachable
                            | std::io::ErrorKind::HostUnreachable
                    )
                })
            };
            Ok(
                (refused(SocketAddr::from((v4, 80))) && refused(SocketAddr::from((v6, 80))))
                    .then_some(()),
            )
        },
    )
    .await?;
    assert!(!on_lo(v6)?, "{v6} left lo once nothing serves it");

    sandbox.shutdown().await?;
    server.shutdown().await;
    Ok(())
}
