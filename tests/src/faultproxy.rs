//! A fault-injecting HTTP proxy for chaos tests: it stands between a client (the
//! controller) and a real server (Prometheus) on loopback and, request by request,
//! passes the request through, answers it only after a delay (past the client's
//! deadline), answers in the server's place (garbage, an HTTP error), or stops listening
//! altogether (the client meets a refused connection, as with the server down). It owns
//! the faults only: which fault when is the test's business, drawn from its seed.
//!
//! It works per request, not per connection, so a client's pooled keep-alive connection
//! meets the fault set now, not the one set when it connected.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

/// An answer the proxy gives in the server's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Requests go to the upstream and its answers come back.
    Pass,
    /// The upstream's answer comes back this much later (the client has usually given
    /// up by then).
    Slow(Duration),
    /// Every request gets this answer; the upstream is not asked.
    Answer(Answer),
    /// Not listening: connections are refused, and open ones are closed.
    Down,
}

/// How long re-opening the listening port may take (another socket may hold the port
/// for a moment after it was closed).
const REBIND_WITHIN: Duration = Duration::from_secs(60);

struct Inner {
    addr: SocketAddr,
    upstream: Mutex<SocketAddr>,
    fault: Mutex<Fault>,
    /// Cancelled when the proxy goes down: the accept loop (whose end closes the port)
    /// and its connections stop.
    listening: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
    client: Client<HttpConnector, Full<Bytes>>,
    passed: AtomicU64,
    faulted: AtomicU64,
}

/// Stops listening (and closes every connection) when dropped.
pub struct FaultProxy {
    inner: Arc<Inner>,
}

impl FaultProxy {
    /// Listens on an ephemeral loopback port, passing requests to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            addr,
            upstream: Mutex::new(upstream),
            fault: Mutex::new(Fault::Pass),
            listening: Mutex::new(None),
            client: Client::builder(TokioExecutor::new()).build_http(),
            passed: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
        });
        serve(inner.clone(), listener);
        Ok(Self { inner })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Where passed requests go from now on (a server restarted on another port).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.inner.upstream.lock().unwrap() = upstream;
    }

    /// Applies `fault` to every request from now on. `Down` closes the port and every
    /// open connection; any other fault after `Down` opens the same port again.
    pub async fn set(&self, fault: Fault) -> anyhow::Result<()> {
        let was_down = self.inner.listening.lock().unwrap().is_none();
        *self.inner.fault.lock().unwrap() = fault.clone();
        match (fault == Fault::Down, was_down) {
            (true, false) => {
                let running = self.inner.listening.lock().unwrap().take();
                if let Some((token, accept_loop)) = running {
                    token.cancel();
                    // Only once the loop has ended is the port closed.
                    let _ = accept_loop.await;
                }
            }
            (false, true) => {
                let listener = rebind(self.inner.addr).await?;
                serve(self.inner.clone(), listener);
            }
            _ => {}
        }
        Ok(())
    }

    /// Requests passed to the upstream, and requests answered with a fault.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.inner.passed.load(Ordering::SeqCst),
            self.inner.faulted.load(Ordering::SeqCst),
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some((token, _)) = self.inner.listening.lock().unwrap().take() {
            token.cancel();
        }
    }
}

async fn rebind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + REBIND_WITHIN;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%addr, err = %e, "fault proxy: port not free yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("re-opening the fault proxy's {addr}"));
            }
        }
    }
}

fn serve(inner: Arc<Inner>, listener: tokio::net::TcpListener) {
    let token = CancellationToken::new();
    let inner2 = inner.clone();
    let token2 = token.clone();
    let accept_loop = tokio::spawn(async move {
        let (inner, token) = (inner2, token2);
        loop {
            let stream = tokio::select! {
                _ = token.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                },
            };
            let (inner, token) = (inner.clone(), token.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    let inner = inner.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&inner, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                // Going down drops the connection, closing its socket.
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = conn => {}
                }
            });
        }
    });
    *inner.listening.lock().unwrap() = Some((token, accept_loop));
}

async fn handle(inner: &Inner, req: hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
    let fault = inner.fault.lock().unwrap().clone();
    let delay = match fault {
        Fault::Pass => None,
        Fault::Slow(d) => Some(d),
        // The listener is closing; a request that got in first gets a reset instead
        // of an answer (its connection is dropped with the token).
        Fault::Down => Some(Duration::from_secs(3600)),
        Fault::Answer(a) => {
            inner.faulted.fetch_add(1, Ordering::SeqCst);
            return respond(a.status, a.content_type, Bytes::from(a.body));
        }
    };
    let counter = if delay.is_some() {
        &inner.faulted
    } else {
        &inner.passed
    };
    counter.fetch_add(1, Ordering::SeqCst);
    let upstream = *inner.upstream.lock().unwrap();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut out = hyper::Request::builder()
        .method(parts.method)
        .uri(format!("http://{upstream}{path}"));
    for (k, v) in &parts.headers {
        if k != hyper::header::HOST {
            out = out.header(k, v);
        }
    }
    let Ok(out) = out.body(Full::new(body)) else {
        return respond(
            500,
            "text/plain",
            Bytes::from_static(b"fault proxy: bad request"),
        );
    };
    let answer = match inner.client.request(out).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut r = hyper::Response::new(Full::new(body));
            *r.status_mut() = parts.status;
            for (k, v) in &parts.headers {
                if k != hyper::header::CONTENT_LENGTH && k != hyper::header::TRANSFER_ENCODING {
                    r.headers_mut().insert(k, v.clone());
                }
            }
            r
        }
        Err(e) => respond(
            502,
            "text/plain",
            Bytes::from(format!("fault proxy: upstream {upstream}: {e}")),
        ),
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    answer
}

fn respond(status: u16, content_type: &str, body: Bytes) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(body));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr) -> anyhow::Result<(u16, String)> {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let req = hyper::Request::get(format!("http://{addr}/x")).body(Full::new(Bytes::new()))?;
        let resp = client.request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// An upstream that answers `ok` to everything.
    async fn upstream() -> anyhow::Result<SocketAddr> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(|_req: hyper::Request<Incoming>| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Ok(addr)
    }

    #[tokio::test]
    async fn passes_answers_in_place_refuses_when_down_and_comes_back_on_the_same_port()
    -> anyhow::Result<()> {
        let proxy = FaultProxy::start(upstream().await?).await?;
        assert_eq!(get(proxy.addr()).await?, (200, "ok".to_string()));
        proxy
            .set(Fault::Answer(Answer {
                status: 503,
                content_type: "text/plain",
                body: "nope".into(),
            }))
            .await?;
        assert_eq!(get(proxy.addr()).await?, (503, "nope".to_string()));
        proxy.set(Fault::Down).await?;
        let refused = tokio::net::TcpStream::connect(proxy.addr()).await;
        assert_eq!(
            refused.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        proxy.set(Fault::Pass).await?;
        assert_eq!(get(proxy.addr()).await?, (200, "ok".to_string()));
        let slow = tokio::time::timeout(Duration::from_millis(300), async {
            proxy.set(Fault::Slow(Duration::from_secs(30))).await?;
            get(proxy.addr()).await
        })
        .await;
        assert!(slow.is_err(), "a slow answer misses a short deadline");
        assert_eq!(proxy.counts(), (2, 2));
        Ok(())
    }
}
