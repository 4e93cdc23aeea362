//! The EndpointSlice watch against the project's test API server (the real wire protocol
//! through kube-rs): ready backends per Service appear, change and disappear, and
//! survive a watch interruption. (Lives here, not in the agent crate, so the agent never
//! needs this crate as a dev-dependency while this crate depends on the agent.)

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use nemesis_agent::endpoints::{EndpointRegistry, SERVICE_NAME_LABEL, watch_endpoint_slices};
use nemesis_common::wire::ServiceRef;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use std::net::SocketAddr;
use std::time::Duration;

fn slice(name: &str, service: &str, ips: &[(&str, bool)]) -> EndpointSlice {
    EndpointSlice {
        address_type: "IPv4".into(),
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into()),
            ..Default::default()
        },
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        endpoints: Some(
            ips.iter()
                .map(|(ip, ready)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(*ready),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

async fn bounded<T>(within: Duration, f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(within, f)
        .await
        .with_context(|| format!("test did not finish within {within:?}"))?
}

async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn backends(reg: &EndpointRegistry, svc: &ServiceRef) -> Vec<SocketAddr> {
    reg.current(svc).backends("http", None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_backends_follow_the_endpoint_slices_of_each_service() -> Result<()> {
    bounded(Duration::from_secs(30), async {
        let server = TestApiServer::start(ApiServerOptions::default()).await?;
        let client = server.client().await?;
        let registry = EndpointRegistry::new();
        let watch = tokio::spawn(watch_endpoint_slices(
            client.clone(),
            registry.clone(),
            |_| {},
        ));
        let api: Api<EndpointSlice> = Api::namespaced(client, "default");
        let web = ServiceRef {
            namespace: "default".into(),
            name: "web".into(),
        };
        let a: SocketAddr = "198.18.0.5:8080".parse()?;
        let b: SocketAddr = "198.18.0.6:8080".parse()?;

        // Scaled up, but the pod is not ready yet: no backend.
        api.create(
            &PostParams::default(),
            &slice("web-1", "web", &[("198.18.0.5", false)]),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        ensure!(backends(&registry, &web).is_empty());

        let mut rx = registry.subscribe(&web);
        api.replace(
            "web-1",
            &PostParams::default(),
            &slice("web-1", "web", &[("198.18.0.5", true)]),
        )
        .await?;
        tokio::time::timeout(Duration::from_secs(5), rx.changed()).await??;
        ensure!(
            backends(&registry, &web) == vec![a],
            "{:?}",
            backends(&registry, &web)
        );

        // A second slice of the same Service adds to it; another Service's slice does not.
        api.create(
            &PostParams::default(),
            &slice("web-2", "web", &[("198.18.0.6", true)]),
        )
        .await?;
        api.create(
            &PostParams::default(),
            &slice("db-1", "db", &[("198.18.0.7", true)]),
        )
        .await?;
        wait_until("both web backends", Duration::from_secs(5), || {
            backends(&registry, &web) == vec![a, b]
        })
        .await?;

        // The watch is cut and resumed: the state stays right, and later changes arrive.
        server.interrupt_watches();
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.resume_watches();
        api.delete("web-1", &DeleteParams::default()).await?;
        wait_until("web-1 gone", Duration::from_secs(10), || {
            backends(&registry, &web) == vec![b]
        })
        .await?;
        api.delete("web-2", &DeleteParams::default()).await?;
        wait_until("web at zero", Duration::from_secs(10), || {
            registry.current(&web).is_empty()
        })
        .await?;
        let db = ServiceRef {
            namespace: "default".into(),
            name: "db".into(),
        };
        ensure!(backends(&registry, &db) == vec!["198.18.0.7:8080".parse()?]);
        ensure!(!watch.is_finished(), "the watch ended");
        watch.abort();
        Ok(())
    })
    .await
}
