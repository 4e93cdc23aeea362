//! The agent's admin listener under hostile clients, on real sockets: a body (no route
//! takes one) is refused with 413 whether declared or chunked, a request head sent a
//! byte at a time is cut off within the bound while `/healthz` answers meanwhile, and
//! every refusal is counted in `nemesis_agent_http_rejected_total`.

use anyhow::{Result, ensure};
use nemesis_agent::admin::{ADMIN_LIMITS, AdminState, Readiness, serve_with};
use nemesis_agent::metrics::Metrics;
use nemesis_common::serve::{Limits, Rejection};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Far past any limit: a pass means the server cut the client off.
const DRIP_FOR: Duration = Duration::from_secs(60);

/// Sends `head` and `body` at once; the whole answer.
async fn send(addr: SocketAddr, head: &str, body: &[u8]) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("{head}connection: close\r\n\r\n").as_bytes())
        .await?;
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    tokio::time::timeout(DRIP_FOR, s.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Sends a head a header line every 200 ms until the server closes; what it answered.
async fn slow_head(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await?;
    let start = Instant::now();
    let mut out = Vec::new();
    for i in 0.. {
        ensure!(
            start.elapsed() < DRIP_FOR,
            "a header drip went on for {DRIP_FOR:?}"
        );
        if s.write_all(format!("x-drip-{i}: a\r\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
        let mut b = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&b[..n]),
            Err(_) => {}
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_refuses_bodies_and_cuts_slow_heads() -> Result<()> {
    let metrics = Metrics::new();
    let rejected = metrics.http_rejected.clone();
    let readiness = Readiness::new();
    readiness.set("proxy", true);
    let state = AdminState {
        registry: metrics.into_registry(),
        readiness,
        http_rejected: rejected.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let limits = Limits {
        header_read_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        ..ADMIN_LIMITS
    };
    tokio::spawn(serve_with(listener, state, limits, std::future::pending()));
    let count = |r| rejected.count("admin", r);

    // A declared body, however it would be sent.
    let r = send(
        addr,
        "POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 10000\r\n",
        b" ",
    )
    .await?;
    ensure!(r.starts_with("HTTP/1.1 413 "), "{r}");
    ensure!(
        r.contains("larger than this listener's limit of 0 bytes"),
        "{r}"
    );
    // A chunked one.
    let r = send(
        addr,
        "POST /metrics HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n",
        b"5\r\nhello\r\n",
    )
    .await?;
    ensure!(r.starts_with("HTTP/1.1 413 "), "{r}");
    ensure!(r.contains("takes no request body"), "{r}");
    ensure!(count(Rejection::BodyTooLarge) == 2);

    // A slow head is cut off; a polite client is answered meanwhile.
    let polite = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        send(addr, "GET /healthz HTTP/1.1\r\nhost: x\r\n", b"").await
    };
    let (slow, polite) = tokio::join!(slow_head(addr), polite);
    ensure!(slow?.is_empty(), "closed without an answer");
    let polite = polite?;
    ensure!(polite.starts_with("HTTP/1.1 200 "), "{polite}");
    ensure!(count(Rejection::HeaderTimeout) == 1);

    // Connected, nothing sent: closed too.
    let mut s = TcpStream::connect(addr).await?;
    let mut out = Vec::new();
    tokio::time::timeout(DRIP_FOR, s.read_to_end(&mut out)).await??;
    ensure!(out.is_empty() && count(Rejection::HeaderTimeout) == 2);

    let m = send(addr, "GET /metrics HTTP/1.1\r\nhost: x\r\n", b"").await?;
    ensure!(
        m.contains(
            r#"nemesis_agent_http_rejected_total{listener="admin",reason="body_too_large"} 2"#
        ),
        "{m}"
    );
    Ok(())
}
