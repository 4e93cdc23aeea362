//! Shared fixtures of the proxy tests: a proxy on a loopback port with its own table,
//! endpoint registry and metrics; a small real HTTP server that plays the controller
//! (counts wake-ups, checks the token); backends. All on 127.0.0.1 with ports from 0.
#![allow(dead_code)] // each test file uses a different part

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nemesis_agent::control::ControllerClient;
use nemesis_agent::endpoints::{EndpointRegistry, ServiceEndpoints};
use nemesis_agent::metrics::{Metrics, ProxyMetrics};
use nemesis_agent::proxy::{
    HoldBounds, ManagedPort, OriginalDestinations, Proxy, ProxyConfig, ServiceTable,
};
use nemesis_common::wire::{ServiceRef, WakeReply, WakeRequest};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub const TOKEN: &str = "test-token-7f3a";

pub fn svc(name: &str) -> ServiceRef {
    ServiceRef {
        namespace: "shop".into(),
        name: name.into(),
    }
}

/// Poll `cond` every 10 ms until it holds or `within` passes.
pub async fn wait_until(
    what: &str,
    within: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

// === the controller ===

/// A real HTTP server answering `POST /v1/agents/wake` like the controller would.
pub struct TestController {
    pub url: String,
    /// Wake-ups with the right token that were answered `accepted`.
    pub accepted: Arc<AtomicUsize>,
    /// Every request that reached the server (including failed and unauthorised ones).
    pub requests: Arc<AtomicUsize>,
    pub unauthorised: Arc<AtomicUsize>,
    pub last_wake: Arc<Mutex<Option<WakeRequest>>>,
    /// Answer wake-ups with `accepted: false` (no policy manages the Service).
    pub reject: Arc<AtomicBool>,
}

impl TestController {
    /// Answers the first `fail_first` wake-ups with 503, then accepts.
    pub async fn start(fail_first: usize) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let unauthorised = Arc::new(AtomicUsize::new(0));
        let last_wake = Arc::new(Mutex::new(None));
        let reject = Arc::new(AtomicBool::new(false));
        let rj = reject.clone();
        let (a, r, u, l) = (
            accepted.clone(),
            requests.clone(),
            unauthorised.clone(),
            last_wake.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (a, r, u, l) = (a.clone(), r.clone(), u.clone(), l.clone());
                let rj = rj.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (a, r, u, l) = (a.clone(), r.clone(), u.clone(), l.clone());
                        let rejecting = rj.load(Ordering::SeqCst);
                        async move {
                            let n = r.fetch_add(1, Ordering::SeqCst);
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await?.to_bytes();
                            let reply = if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
                                u.fetch_add(1, Ordering::SeqCst);
                                text(StatusCode::UNAUTHORIZED, "bad token")
                            } else if path != "/v1/agents/wake" {
                                text(StatusCode::NOT_FOUND, "no such path")
                            } else if n < fail_first {
                                text(StatusCode::SERVICE_UNAVAILABLE, "not now")
                            } else {
                                match serde_json::from_slice::<WakeRequest>(&body) {
                                    Ok(w) if rejecting => {
                                        *l.lock().unwrap() = Some(w);
                                        let reply = WakeReply {
                                            accepted: false,
                                            message: "no ScalingPolicy for this Service".into(),
                                        };
                                        Response::new(Full::new(Bytes::from(
                                            serde_json::to_vec(&reply).unwrap(),
                                        )))
                                    }
                                    Ok(w) => {
                                        *l.lock().unwrap() = Some(w);
                                        a.fetch_add(1, Ordering::SeqCst);
                                        let reply = WakeReply {
                                            accepted: true,
                                            message: "waking".into(),
                                        };
                                        Response::new(Full::new(Bytes::from(
                                            serde_json::to_vec(&reply).unwrap(),
                                        )))
                                    }
                                    Err(e) => text(StatusCode::BAD_REQUEST, &e.to_string()),
                                }
                            };
                            Ok::<_, hyper::Error>(reply)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            url,
            accepted,
            requests,
            unauthorised,
            last_wake,
            reject,
        })
    }

    pub fn client(&self) -> ControllerClient {
        ControllerClient::new(&self.url, TOKEN, Duration::from_secs(2)).expect("controller client")
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

// === the proxy ===

/// Original destinations by client address, registered before the client connects
/// (stands in for the eBPF map in these unit-level tests).
#[derive(Default)]
pub struct PeerDestinations {
    by_peer: Mutex<HashMap<SocketAddr, SocketAddr>>,
    /// For peers not registered.
    default: Mutex<Option<SocketAddr>>,
}

impl OriginalDestinations for PeerDestinations {
    fn lookup(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.by_peer
            .lock()
            .unwrap()
            .get(&peer)
            .copied()
            .or(*self.default.lock().unwrap())
    }
}

pub struct Harness {
    pub proxy: Proxy,
    pub addr: SocketAddr,
    pub table: Arc<ServiceTable>,
    pub endpoints: Arc<EndpointRegistry>,
    pub destinations: Arc<PeerDestinations>,
    pub metrics: ProxyMetrics,
    pub registry: Arc<Registry>,
    pub datapath: Arc<nemesis_agent::metrics::DatapathCounters>,
}

/// The ClusterIP:port of the `n`-th test Service.
pub fn cluster_addr(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 96, 0, n], 80))
}

impl Harness {
    pub async fn start(config: ProxyConfig, controller: Option<ControllerClient>) -> Result<Self> {
        let metrics = Metrics::new();
        let proxy_metrics = metrics.proxy.clone();
        let datapath = metrics.datapath.clone();
        let registry = metrics.into_registry();
        let table = ServiceTable::new();
        let endpoints = EndpointRegistry::new();
        let destinations = Arc::new(PeerDestinations::default());
        let proxy = Proxy::new(
            config,
            table.clone(),
            endpoints.clone(),
            destinations.clone(),
            controller,
            proxy_metrics.clone(),
        );
        let listener = nemesis_agent::proxy::bind("127.0.0.1:0".parse()?)?;
        let addr = listener.local_addr()?;
        let p = proxy.clone();
        tokio::spawn(async move { p.serve(listener).await });
        Ok(Self {
            proxy,
            addr,
            table,
            endpoints,
            destinations,
            metrics: proxy_metrics,
            registry,
            datapath,
        })
    }

    /// Manage a one-port Service at `cluster_addr(n)`, port name "http".
    pub fn manage(&self, service: &ServiceRef, n: u8, bounds: HoldBounds) -> SocketAddr {
        let addr = cluster_addr(n);
        self.table.upsert_service(
            service,
            vec![(
                addr,
                ManagedPort {
                    service: service.clone(),
                    port_name: "http".into(),
                    target_port: None,
                    bounds,
                    balancing: Default::default(),
                },
            )],
        );
        addr
    }

    /// Every connection not registered otherwise goes to `dst`.
    pub fn default_destination(&self, dst: SocketAddr) {
        *self.destinations.default.lock().unwrap() = Some(dst);
    }

    /// The client at `peer` dialled `dst`.
    pub fn destinations_insert(&self, peer: SocketAddr, dst: SocketAddr) {
        self.destinations.by_peer.lock().unwrap().insert(peer, dst);
    }

    /// Connect to the proxy as a client that dialled `dst`.
    pub async fn connect_as(&self, dst: SocketAddr) -> Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse()?)?;
        let local = socket.local_addr()?;
        self.destinations.by_peer.lock().unwrap().insert(local, dst);
        Ok(socket.connect(self.addr).await?)
    }

    /// The backends of `service`'s "http" port become ready.
    pub fn ready(&self, service: &ServiceRef, backends: &[SocketAddr]) {
        self.endpoints.publish(
            service,
            ServiceEndpoints::default().with_port("http", backends.iter().copied()),
        );
    }

    pub fn metrics_text(&self) -> String {
        nemesis_agent::metrics::encode_text(&self.registry).expect("encode metrics")
    }
}

pub fn bounds(hold_timeout: Duration, max_held: usize) -> HoldBounds {
    HoldBounds {
        hold_timeout,
        max_held,
        ..HoldBounds::default()
    }
}

// === backends ===

/// An HTTP/1.1 backend answering `hello <path> <body>`; returns its address and a
/// counter of requests served.
pub async fn http_backend_on(listener: TcpListener) -> Result<Arc<AtomicUsize>> {
    let served = Arc::new(AtomicUsize::new(0));
    let s = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await?.to_bytes();
                        s.fetch_add(1, Ordering::SeqCst);
                        let reply = format!("hello {path} {}", String::from_utf8_lossy(&body));
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(reply))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(served)
}

pub async fn http_backend() -> Result<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((addr, http_backend_on(listener).await?))
}

/// One HTTP/1.1 request with `Connection: close` over `stream`; the whole response.
pub async fn http_get(mut stream: TcpStream, path: &str) -> Result<String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    stream
        .read_to_end(&mut out)
        .await
        .context("reading the response")?;
    Ok(String::from_utf8(out)?)
}

/// Split an HTTP/1 response into (status line, headers, body).
pub fn parse_response(resp: &str) -> Result<(String, String, String)> {
    let (head, body) = resp.split_once("\r\n\r\n").context("no end of headers")?;
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Ok((status.to_string(), headers.to_string(), body.to_string()))
}

/// Run a test body with an overall bound, so a hang fails instead of stalling CI.
pub async fn bounded<T>(within: Duration, f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(within, f)
        .await
        .with_context(|| format!("test did not finish within {within:?}"))?
}

/// Keeps the compiler from flagging the executor import in files that do not use it.
pub fn executor() -> TokioExecutor {
    TokioExecutor::new()
}
