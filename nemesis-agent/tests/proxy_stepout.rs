//! Forwarded connections step out of the proxy once their Service goes direct (issue 9
//! point 4), with real HTTP clients and servers (hyper) on loopback: a keep-alive
//! HTTP/1.1 client gets `Connection: close` on the response in flight and its next
//! request opens a new connection; an HTTP/2 client (prior knowledge) gets a GOAWAY once
//! its open stream has finished and its next request opens a new connection; a raw TCP
//! connection stays spliced; a stopping agent closes an idle keep-alive connection.

mod proxy_support;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{HttpConnector, HttpInfo};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nemesis_agent::metrics::StepOut;
use nemesis_agent::proxy::ProxyConfig;
use proxy_support::*;
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

const WITHIN: Duration = Duration::from_secs(10);

/// A backend speaking HTTP/1.1 (keep-alive) and HTTP/2 (prior knowledge), as hyper
/// serves them; `/slow` answers once `release` is notified. Counts connections.
struct Backend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    release: Arc<Notify>,
}

async fn backend() -> Result<Backend> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let connections = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let (c, r) = (connections.clone(), release.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let r = r.clone();
                    async move {
                        if req.uri().path() == "/slow" {
                            r.notified().await;
                        }
                        let body = format!("hello {}", req.uri().path());
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Backend {
        addr,
        connections,
        release,
    })
}

/// A proxy whose every connection is for Service `web`, already ready on `backend`.
async fn proxy_for(backend: SocketAddr) -> Result<Harness> {
    let h = Harness::start(ProxyConfig::new("node-a"), None).await?;
    let dst = h.manage(&svc("web"), 1, bounds(WITHIN, 100));
    h.default_destination(dst);
    h.ready(&svc("web"), &[backend]);
    Ok(h)
}

/// The Service's connects go direct now: its forwarded connections may step out.
fn go_direct(h: &Harness) {
    h.table.drain().set_direct(BTreeSet::from([svc("web")]));
}

struct Answer {
    status: u16,
    connection: Option<String>,
    body: String,
    /// The client's end of the connection that carried it.
    local: SocketAddr,
}

async fn get(client: &Client<HttpConnector, Empty<Bytes>>, url: &str) -> Result<Answer> {
    let resp = bounded(WITHIN, async {
        client.get(url.parse()?).await.context(url.to_string())
    })
    .await?;
    let local = resp
        .extensions()
        .get::<HttpInfo>()
        .context("the connector's HttpInfo")?
        .local_addr();
    let status = resp.status().as_u16();
    let connection = resp
        .headers()
        .get("connection")
        .map(|v| v.to_str().unwrap_or("?").to_string());
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        connection,
        body: String::from_utf8_lossy(&body).into_owned(),
        local,
    })
}

fn http1_client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn http2_client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

#[tokio::test]
async fn a_keep_alive_client_gets_connection_close_once_warm_and_reconnects() -> Result<()> {
    let b = backend().await?;
    let h = proxy_for(b.addr).await?;
    let client = http1_client();
    let url = format!("http://{}/", h.addr);

    // Held, then forwarded: keep-alive goes on while the Service is still held.
    let first = get(&client, &url).await?;
    let second = get(&client, &url).await?;
    assert_eq!((first.status, second.status), (200, 200));
    assert_eq!(first.local, second.local, "one keep-alive connection");
    assert_eq!(second.connection, None, "nothing added while held");

    go_direct(&h);
    let third = get(&client, &url).await?;
    assert_eq!(third.local, first.local, "the response in flight...");
    assert_eq!(
        third.connection.as_deref(),
        Some("close"),
        "...carries the close"
    );
    assert_eq!(third.body, "hello /");
    wait_until("the connection to leave the proxy", WITHIN, || {
        h.proxy.open_connections() == 0
    })
    .await?;
    assert_eq!(h.metrics.stepped_out_count(StepOut::ConnectionClose), 1);

    let fourth = get(&client, &url).await?;
    assert_ne!(
        fourth.local, first.local,
        "the next request on a new connection"
    );
    assert_eq!(fourth.status, 200);
    assert_eq!(b.connections.load(Ordering::SeqCst), 2);
    Ok(())
}

#[tokio::test]
async fn an_h2_client_gets_goaway_once_its_stream_is_done_and_reconnects() -> Result<()> {
    let b = backend().await?;
    let h = proxy_for(b.addr).await?;
    let client = http2_client();
    let base = format!("http://{}", h.addr);

    let first = get(&client, &format!("{base}/")).await?;
    assert_eq!(first.status, 200);
    // A stream open when the Service goes direct: no GOAWAY while it runs.
    let slow = {
        let client = client.clone();
        let url = format!("{base}/slow");
        tokio::spawn(async move { get(&client, &url).await })
    };
    wait_until("the slow stream to reach the backend", WITHIN, || {
        b.connections.load(Ordering::SeqCst) == 1 && !slow.is_finished()
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    go_direct(&h);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.metrics.stepped_out_count(StepOut::Goaway),
        0,
        "no GOAWAY while a stream is open"
    );
    b.release.notify_one();
    let slow = slow.await??;
    assert_eq!((slow.status, slow.body.as_str()), (200, "hello /slow"));
    assert_eq!(slow.local, first.local);
    wait_until("the GOAWAY once the stream ended", WITHIN, || {
        h.metrics.stepped_out_count(StepOut::Goaway) == 1 && h.proxy.open_connections() == 0
    })
    .await?;

    let next = get(&client, &format!("{base}/")).await?;
    assert_eq!(next.status, 200);
    assert_ne!(
        next.local, first.local,
        "the next request on a new connection"
    );
    assert_eq!(b.connections.load(Ordering::SeqCst), 2);
    Ok(())
}

#[tokio::test]
async fn an_idle_h2_connection_gets_goaway_as_soon_as_its_service_goes_direct() -> Result<()> {
    let b = backend().await?;
    let h = proxy_for(b.addr).await?;
    let client = http2_client();
    let url = format!("http://{}/", h.addr);
    let first = get(&client, &url).await?;
    go_direct(&h);
    wait_until("the GOAWAY", WITHIN, || {
        h.metrics.stepped_out_count(StepOut::Goaway) == 1 && h.proxy.open_connections() == 0
    })
    .await?;
    let next = get(&client, &url).await?;
    ensure!(
        next.local != first.local,
        "a new connection after the GOAWAY"
    );
    Ok(())
}

#[tokio::test]
async fn a_stopping_agent_closes_an_idle_keep_alive_connection_and_steps_busy_ones_out()
-> Result<()> {
    let b = backend().await?;
    let h = proxy_for(b.addr).await?;
    let idle = http1_client();
    let busy = http1_client();
    let url = format!("http://{}/", h.addr);
    get(&idle, &url).await?;
    let slow = {
        let busy = busy.clone();
        let url = format!("http://{}/slow", h.addr);
        tokio::spawn(async move { get(&busy, &url).await })
    };
    wait_until("both connections forwarded", WITHIN, || {
        b.connections.load(Ordering::SeqCst) == 2
    })
    .await?;
    // Still held in the datapath, but the agent stops.
    h.proxy.drain();
    wait_until("the idle connection closed", WITHIN, || {
        h.metrics.stepped_out_count(StepOut::IdleClose) == 1
    })
    .await?;
    // The idle one's task lets go of its gauge just after counting the close.
    wait_until(
        "only the busy one left, finishing its response",
        WITHIN,
        || h.proxy.open_connections() == 1,
    )
    .await?;
    b.release.notify_one();
    let slow = slow.await??;
    assert_eq!(slow.connection.as_deref(), Some("close"));
    wait_until("every connection gone", WITHIN, || {
        h.proxy.open_connections() == 0
    })
    .await?;
    assert_eq!(h.metrics.stepped_out_count(StepOut::ConnectionClose), 1);
    // The idle client's pool noticed the close: its next request connects anew.
    let again = get(&idle, &url).await?;
    assert_eq!(again.status, 200);
    Ok(())
}

#[tokio::test]
async fn other_protocols_stay_spliced_when_their_service_goes_direct() -> Result<()> {
    // An echo server: a protocol the proxy cannot end safely.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let echo = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let h = proxy_for(echo).await?;
    let mut conn = tokio::net::TcpStream::connect(h.addr).await?;
    let mut buf = [0u8; 5];
    conn.write_all(b"ping1").await?;
    bounded(WITHIN, async { Ok(conn.read_exact(&mut buf).await?) }).await?;
    go_direct(&h);
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.write_all(b"ping2").await?;
    bounded(WITHIN, async { Ok(conn.read_exact(&mut buf).await?) }).await?;
    assert_eq!(&buf, b"ping2", "still spliced, untouched");
    assert_eq!(h.proxy.open_connections(), 1);
    for how in StepOut::ALL {
        assert_eq!(h.metrics.stepped_out_count(how), 0, "{how:?}");
    }
    Ok(())
}
