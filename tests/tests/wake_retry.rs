//! Issue 4, ready before listening, end to end: the pod's readiness probe passes before
//! its server listens (a common bug of real apps), so the held connections meet a
//! backend that refuses; the proxy retries within the hold budget and every client is
//! served all the same.

mod wake_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;
use wake_support::{APP, NS, POD_PORT, Scenario, WakeEnv, eventually, ready_before_listening};

const CLIENTS: usize = 20;
const LISTEN_AFTER_MS: u64 = 1500;

/// The ready addresses of the Service's slices.
async fn ready_addresses(slices: &Api<EndpointSlice>) -> Vec<String> {
    let Ok(list) = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
    else {
        return vec![];
    };
    list.items
        .into_iter()
        .flat_map(|s| s.endpoints.into_iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_connections_are_served_when_the_backend_is_ready_before_it_listens()
-> anyhow::Result<()> {
    let env = WakeEnv::start(Scenario {
        name: "retry",
        pod: ready_before_listening(LISTEN_AFTER_MS),
        policy: json!({}),
        scale_on_wake: true,
    })
    .await?;

    // Watch for the moment the pod is ready, and dial it directly then: the test is
    // only meaningful if the endpoint was ready while nothing listened.
    let refused_while_ready = Arc::new(AtomicBool::new(false));
    let seen = refused_while_ready.clone();
    let slices: Api<EndpointSlice> = Api::namespaced(env.client.clone(), NS);
    let observer = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if let Some(ip) = ready_addresses(&slices).await.first() {
                let addr = SocketAddr::new(ip.parse().expect("pod IP"), POD_PORT);
                if let Ok(Err(e)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                    && e.kind() == std::io::ErrorKind::ConnectionRefused
                {
                    seen.store(true, Ordering::SeqCst);
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    let results = env
        .run_clients(
            &["--clients", &CLIENTS.to_string(), "--http"],
            Duration::from_secs(30),
        )
        .await?;
    observer.await?;
    assert!(
        refused_while_ready.load(Ordering::SeqCst),
        "the pod was ready while its port still refused connections"
    );
    let pods = env.pod_names().await?;
    for r in &results {
        let resp = r.http()?;
        assert_eq!(resp.status, 200, "client {}: {resp:?}", r.client);
        assert_eq!(resp.body, format!("{}\n", pods[0]));
    }
    let m = env.metrics().await?;
    assert_eq!(m.outcome("forwarded"), CLIENTS as f64);
    assert_eq!(m.outcome("backend_failed"), 0.0);
    // The refused dials are the proxy's errors for the Service, reported to the controller.
    let failed = m.sum(
        "nemesis_agent_proxy_errors_total",
        &[
            ("namespace", NS),
            ("service", APP),
            ("kind", "connect_failed"),
        ],
    );
    assert!(failed >= 1.0, "the refused dials were counted: {failed}");
    eventually(
        "the proxy's errors in a heartbeat",
        Duration::from_secs(30),
        || async {
            Ok(env
                .controller
                .report()
                .filter(|r| r.proxy_errors.connect_failed as f64 == failed)
                .map(|_| ()))
        },
    )
    .await?;
    assert_eq!(env.controller.wakes(), 1);
    env.shutdown().await
}
