//! The controller's Kubernetes API clients, and the bound on their connections.
//!
//! kube's default client keeps every HTTP/1 connection it ever opened (hyper_util's
//! pool has no idle timeout without a timer, and no cap on idle connections per host),
//! so a burst of N concurrent requests leaves N connections (~100 KB each) open for
//! good. At 10,000 policies a wake/status burst held ~9,700 connections (~1 GiB RSS).
//! Bounding the requests in flight bounds the connections the pool ever needs: at most
//! about [`MAX_CONCURRENT_REQUESTS`] (a few more while hyper returns a finished
//! connection to its pool) plus the open watch streams.
//!
//! The bound is a layer ([`RequestLimitLayer`]) on top of kube's own stack (so TLS,
//! auth and kubeconfig handling stay kube's). A request holds its permit until its
//! response body has been read to the end (or dropped): only then is its connection
//! free for the next request, so releasing at the headers would let a burst open up to
//! twice the limit. Watch requests (`watch=true`) bypass it: a watch is one
//! long-lived connection per watcher anyway, and an API server that holds new watches
//! (a partition, a paused test server) must not let waiting watches take every permit
//! and stall the lists and writes behind them.
//!
//! The leader's Lease renewals go through a separate client without the bound: a
//! burst of policy traffic queued behind the limit must never delay a renewal past the
//! renew deadline (that would hand leadership away exactly when the controller is busy).
//! That client is built on the leader's own runtime, not handed to it: a kube client
//! spawns its request queue's worker (tower's `Buffer`) on the runtime it is built on,
//! and every request passes through that worker, so a lease client built on the main
//! runtime waited for the main runtime's scheduler whatever thread the election ran
//! on (at 1,000 agents and 10,000 policies its renewals missed the deadline while the
//! main runtime worked through a burst: see [`LeaseClient`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use kube::client::ClientBuilder;
use tokio::sync::Semaphore;

/// Requests in flight (sent, response not fully read) on the main client. Large enough
/// that a wake's few requests are not queued behind a status-write burst for long (a
/// request to a local API server takes a few ms), small enough that the connections
/// stay a small fixed number.
pub const MAX_CONCURRENT_REQUESTS: usize = 48;

/// The clients one controller uses.
#[derive(Clone)]
pub struct ApiClients {
    /// Everything except leader election: policies, watches, events, status writes.
    pub main: kube::Client,
    /// Leader election's Lease reads and renewals only.
    pub lease: LeaseClient,
}

/// How leader election gets its client.
#[derive(Clone)]
pub enum LeaseClient {
    /// This client, on the caller's runtime (in-process tests that hand the controller
    /// a client).
    Shared(kube::Client),
    /// A client built from this config on a runtime of the election's own, so that
    /// nothing the client does waits for the main runtime: tokio's scheduling is
    /// cooperative, and a burst of policy and agent work on the main runtime once held
    /// renewals past the renew deadline (1,000 agents, 10,000 policies).
    OwnRuntime(Box<kube::Config>),
}

impl LeaseClient {
    /// The client to use on the runtime current at the call: `Shared`'s, or a new one
    /// from `OwnRuntime`'s config (its request queue's worker spawned there).
    pub fn build(self) -> Result<kube::Client, kube::Error> {
        match self {
            LeaseClient::Shared(client) => Ok(client),
            LeaseClient::OwnRuntime(config) => kube::Client::try_from(*config),
        }
    }
}

impl ApiClients {
    /// Both roles share `client` (in-process tests that hand the controller a client).
    pub fn shared(client: kube::Client) -> Self {
        Self {
            main: client.clone(),
            lease: LeaseClient::Shared(client),
        }
    }

    /// Clients from KUBECONFIG, ~/.kube/config or the in-cluster service account, as
    /// `kube::Client::try_default` finds them; the main one bounded.
    pub async fn infer() -> Result<Self, kube::Error> {
        let config = kube::Config::infer()
            .await
            .map_err(kube::Error::InferConfig)?;
        Self::from_config(config)
    }

    /// Clients for `config`: the main one with [`MAX_CONCURRENT_REQUESTS`], the lease one
    /// kube's default, built later on the election's runtime.
    pub fn from_config(config: kube::Config) -> Result<Self, kube::Error> {
        Ok(Self {
            main: bounded(config.clone(), MAX_CONCURRENT_REQUESTS)?,
            lease: LeaseClient::OwnRuntime(Box::new(config)),
        })
    }
}

/// kube's default client for `config` with at most `limit` non-watch requests in flight
/// at a time (more wait for a permit, in order).
pub fn bounded(config: kube::Config, limit: usize) -> Result<kube::Client, kube::Error> {
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&RequestLimitLayer::new(limit))
        .build())
}

/// Whether `query` (a URI's query string) asks for a watch.
fn is_watch(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "watch=true" | "watch=1" | "watch"))
    })
}

/// At most `limit` non-watch requests in flight (until their response body ends) at a time.
#[derive(Clone)]
pub struct RequestLimitLayer {
    permits: Arc<Semaphore>,
}

impl RequestLimitLayer {
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
        }
    }
}

impl<S> tower::Layer<S> for RequestLimitLayer {
    type Service = RequestLimit<S>;
    fn layer(&self, inner: S) -> RequestLimit<S> {
        RequestLimit {
            inner,
            permits: self.permits.clone(),
        }
    }
}

/// The service of [`RequestLimitLayer`].
pub struct RequestLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, B, R> tower::Service<http::Request<B>> for RequestLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<PermitBody<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let watch = is_watch(req.uri().query());
        // kube's stack below is lazy: nothing is sent (no connection taken) until this
        // future is polled past the permit.
        let response = self.inner.call(req);
        if watch {
            return Box::pin(async move {
                let r = response.await?;
                Ok(r.map(|inner| PermitBody {
                    inner,
                    permit: None,
                }))
            });
        }
        let permits = self.permits.clone();
        Box::pin(async move {
            // The semaphore is never closed, so this only waits.
            let permit = permits.acquire_owned().await.ok();
            let r = response.await?;
            Ok(r.map(|inner| PermitBody { inner, permit }))
        })
    }
}

/// A response body holding its request's permit until the body ends or is dropped.
pub struct PermitBody<B> {
    inner: B,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for PermitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_))))
            || this.inner.is_end_stream()
        {
            this.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A keep-alive HTTP/1.1 server answering every request after `delay`, counting the
    /// connections it accepted.
    async fn counting_server(
        delay: std::time::Duration,
    ) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let watches = Arc::new(AtomicUsize::new(0));
        let held = watches.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let held = held.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // Requests are bodiless GETs: a request ends at the blank line.
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            if head.windows(10).any(|w| w == b"watch=true") {
                                // A server holding new watches: no headers, ever.
                                held.fetch_add(1, Ordering::SeqCst);
                                std::future::pending::<()>().await;
                            }
                            tokio::time::sleep(delay).await;
                            let body = br#"{"major":"1","minor":"30"}"#;
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                                body.len()
                            );
                            if sock.write_all(head.as_bytes()).await.is_err()
                                || sock.write_all(body).await.is_err()
                            {
                                return;
                            }
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (url, accepted, watches)
    }

    async fn burst(client: &kube::Client, requests: usize) {
        let all = (0..requests).map(|_| {
            let client = client.clone();
            async move {
                client
                    .request_text(http::Request::get("/version").body(Vec::new()).unwrap())
                    .await
                    .expect("request to the counting server")
            }
        });
        futures::future::join_all(all).await;
    }

    fn config(url: &str) -> kube::Config {
        let _ = rustls::crypto::ring::default_provider().install_default();
        kube::Config::new(url.parse().unwrap())
    }

    #[test]
    fn watches_are_told_apart_from_other_requests() {
        assert!(is_watch(Some("watch=true")));
        assert!(is_watch(Some(
            "labelSelector=a%3Db&watch=true&timeoutSeconds=290"
        )));
        assert!(is_watch(Some("watch=1")));
        assert!(!is_watch(None));
        assert!(!is_watch(Some("watch=false")));
        assert!(!is_watch(Some(
            "fieldSelector=metadata.name%3Dwatch%3Dtrue"
        )));
        assert!(!is_watch(Some("limit=500")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_opens_at_most_the_limit_of_connections() {
        // Each response waits, so without the bound all 120 requests are in flight at
        // once and the pool opens one connection per request.
        let (url, accepted, _) = counting_server(std::time::Duration::from_millis(200)).await;
        let client = bounded(config(&url), 8).unwrap();
        burst(&client, 120).await;
        // A second burst reuses the pooled connections rather than adding more.
        burst(&client, 120).await;
        let n = accepted.load(Ordering::SeqCst);
        // hyper puts a connection back in its pool a moment after its body's last frame
        // (on the connection's own task), so a request let in by that body's permit can
        // still find the pool empty and open one more: a few over the limit, never a
        // connection per request (120 here without the bound).
        assert!((1..=16).contains(&n), "{n} connections for a limit of 8");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_default_client_opens_one_connection_per_concurrent_request() {
        // The premise the bound exists for: if kube's default client ever caps its own
        // connections, this fails and the bound can be revisited.
        let (url, accepted, _) = counting_server(std::time::Duration::from_millis(500)).await;
        let client = kube::Client::try_from(config(&url)).unwrap();
        burst(&client, 60).await;
        let n = accepted.load(Ordering::SeqCst);
        assert!(n > 8, "only {n} connections for 60 concurrent requests");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watches_waiting_for_headers_do_not_take_the_permits() {
        let (url, _, held) = counting_server(std::time::Duration::from_millis(1)).await;
        let client = bounded(config(&url), 2).unwrap();
        let watches: Vec<_> = (0..6)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    let _ = client
                        .request_text(
                            http::Request::get("/api/v1/pods?watch=true")
                                .body(Vec::new())
                                .unwrap(),
                        )
                        .await;
                })
            })
            .collect();
        // Every watch is at the server (past any permit) before the requests start.
        tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while held.load(Ordering::SeqCst) < 6 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the watches reached the server");
        // With the watches counted, the two permits are gone and this never completes.
        tokio::time::timeout(std::time::Duration::from_secs(60), burst(&client, 10))
            .await
            .expect("requests stalled behind watches that never got headers");
        for w in watches {
            w.abort();
        }
    }
}
