//! The admin listener, apart from the proxy: `/metrics` with the proxy's and the
//! datapath's figures, `/healthz`, `/readyz`; and the heartbeat loop against a controller.

mod proxy_support;

use anyhow::{Result, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nemesis_agent::admin::{AdminState, Readiness};
use nemesis_agent::control::{AgentReports, Heartbeats};
use nemesis_agent::metrics::ServiceCounters;
use nemesis_agent::proxy::{Backoff, ModeFollower, ModeSink, ModeSinkError, ProxyConfig};
use nemesis_common::wire::{
    AppliedMode, Directive, Heartbeat, HeartbeatReply, ServiceDirective, ServiceRef,
};
use proxy_support::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn get(addr: std::net::SocketAddr, path: &str) -> Result<(String, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let (status, _, body) = parse_response(&out)?;
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_serves_metrics_health_and_readiness_apart_from_the_proxy() -> Result<()> {
    bounded(Duration::from_secs(15), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("web");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(5), 10));
        let readiness = Readiness::new();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let admin = listener.local_addr()?;
        ensure!(admin != h.addr);
        let state = AdminState {
            registry: h.registry.clone(),
            readiness: readiness.clone(),
            http_rejected: Default::default(),
        };
        tokio::spawn(nemesis_agent::admin::serve(
            listener,
            state,
            std::future::pending(),
        ));

        ensure!(get(admin, "/healthz").await?.0 == "HTTP/1.1 200 OK");
        let (status, body) = get(admin, "/readyz").await?;
        ensure!(
            status == "HTTP/1.1 503 Service Unavailable",
            "{status} {body}"
        );
        readiness.set("datapath", true);
        readiness.set("proxy", false);
        let (status, body) = get(admin, "/readyz").await?;
        ensure!(
            status.contains("503") && body.contains("proxy"),
            "{status} {body}"
        );
        readiness.set("proxy", true);
        ensure!(get(admin, "/readyz").await?.0 == "HTTP/1.1 200 OK");

        // Hold one connection, forward it, then read the figures.
        let client = tokio::spawn({
            let s = h.connect_as(dst).await?;
            async move { http_get(s, "/x").await }
        });
        wait_until("held", Duration::from_secs(5), || h.proxy.held(&web) == 1).await?;
        let (_, body) = get(admin, "/metrics").await?;
        ensure!(
            body.contains(
                r#"nemesis_agent_proxy_held_connections{namespace="shop",service="web"} 1"#
            ),
            "{body}"
        );
        let (backend, _) = http_backend().await?;
        h.ready(&web, &[backend]);
        client.await??;
        h.datapath.set(
            &web,
            ServiceCounters {
                connects_total: 12,
                open_connections: 2,
                closed_total: 10,
                ..ServiceCounters::default()
            },
        );
        let (_, body) = get(admin, "/metrics").await?;
        for line in [
            r#"nemesis_agent_proxy_held_connections{namespace="shop",service="web"} 0"#,
            r#"nemesis_agent_proxy_outcomes_total{outcome="forwarded"} 1"#,
            r#"nemesis_agent_proxy_hold_duration_seconds_count{outcome="forwarded"} 1"#,
            r#"nemesis_agent_service_connects_total{namespace="shop",service="web"} 12"#,
            r#"nemesis_agent_service_open_connections{namespace="shop",service="web"} 2"#,
        ] {
            ensure!(body.contains(line), "missing {line} in\n{body}");
        }
        let up = body
            .lines()
            .find(|l| {
                l.starts_with(
                    r#"nemesis_agent_proxy_transferred_bytes_total{direction="client_to_backend"}"#,
                )
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0);
        ensure!(up > 30, "client_to_backend bytes: {up}");
        Ok(())
    })
    .await
}

struct Sink;
impl ModeSink for Sink {
    fn set_hold(&self, _: &ServiceRef, hold: bool) -> Result<AppliedMode, ModeSinkError> {
        Ok(if hold {
            AppliedMode::Hold
        } else {
            AppliedMode::Passthrough
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_report_services_and_apply_the_directives_they_get_back() -> Result<()> {
    bounded(Duration::from_secs(15), async {
        let h = Harness::start(ProxyConfig::new("node-b"), None).await?;
        let web = svc("web");
        h.manage(&web, 1, bounds(Duration::from_secs(5), 10));
        h.datapath.set(
            &web,
            ServiceCounters {
                connects_total: 5,
                open_connections: 1,
                closed_total: 4,
                ..ServiceCounters::default()
            },
        );
        let modes = ModeFollower::new(h.table.clone(), h.endpoints.clone(), Arc::new(Sink));
        tokio::spawn(modes.clone().run());

        // The controller: records heartbeats, asks to hold `web` for a scale-down.
        let beats: Arc<Mutex<Vec<Heartbeat>>> = Arc::default();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let b = beats.clone();
        let w = web.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (b, w) = (b.clone(), w.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (b, w) = (b.clone(), w.clone());
                        async move {
                            let ok = req.uri().path() == "/v1/agents/heartbeat"
                                && req.headers().get("authorization").map(|v| v.as_bytes())
                                    == Some(format!("Bearer {TOKEN}").as_bytes());
                            let body = req.into_body().collect().await?.to_bytes();
                            if ok && let Ok(hb) = serde_json::from_slice::<Heartbeat>(&body) {
                                b.lock().unwrap().push(hb);
                            }
                            let reply = HeartbeatReply {
                                directives: vec![ServiceDirective {
                                    service: w,
                                    directive: Directive::Sleep,
                                    epoch: 9,
                                    hold_ports: vec![],
                                    after_zero: false,
                                }],
                                lease_seconds: 3,
                                cursor: None,
                                delta: false,
                                removed: vec![],
                                more: false,
                                reports_seq: None,
                            };
                            Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(
                                serde_json::to_vec(&reply).unwrap(),
                            ))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let client =
            nemesis_agent::control::ControllerClient::new(&url, TOKEN, Duration::from_secs(2))?;
        let kick = modes.changed.clone();
        tokio::spawn(
            Heartbeats {
                client,
                node: "node-b".into(),
                instance: "i-1".into(),
                interval: Duration::from_millis(200),
                backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(1)),
                reports: Arc::new(AgentReports {
                    table: h.table.clone(),
                    modes: modes.clone(),
                    proxy: h.proxy.clone(),
                    datapath: h.datapath.clone(),
                    holds: nemesis_agent::holdports::HoldListeners::new(
                        h.proxy.clone(),
                        h.table.clone(),
                        vec![],
                        tokio::sync::watch::channel(true).1,
                    ),
                }),
                directives: modes.clone(),
                kick,
                addresses: vec![],
                ready: Arc::new(AlwaysReady),
            }
            .run(),
        );
        // The agent applies epoch 9 and acknowledges it in a later heartbeat.
        wait_until("epoch 9 acknowledged", Duration::from_secs(5), || {
            beats
                .lock()
                .unwrap()
                .iter()
                .any(|hb| hb.services.iter().any(|s| s.applied_epoch == 9))
        })
        .await?;
        let hb = beats.lock().unwrap().last().cloned().unwrap();
        ensure!(hb.node == "node-b" && hb.instance == "i-1");
        let report = hb
            .services
            .iter()
            .find(|s| s.service == web)
            .expect("web reported");
        ensure!(
            report.mode == AppliedMode::Hold
                && report.connects_total == 5
                && report.open_connections == 1,
            "{report:?}"
        );
        Ok(())
    })
    .await
}

/// An agent that is always ready, for heartbeats in tests.
struct AlwaysReady;

impl nemesis_agent::control::ReadySource for AlwaysReady {
    fn is_ready(&self) -> bool {
        true
    }
}
