//! The bounds of holding: timeout, overflow per Service and per agent, unknown
//! destinations, clients that give up, and back-pressure past the buffer bound.

mod proxy_support;

use anyhow::{Result, ensure};
use nemesis_agent::metrics::Outcome;
use nemesis_agent::proxy::{HoldBounds, ProxyConfig};
use proxy_support::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Read until EOF; an RST (ECONNRESET) is an error here, a FIN is `Ok`.
async fn read_to_eof(stream: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_held_past_the_timeout_gets_a_503_with_retry_after() -> Result<()> {
    bounded(Duration::from_secs(10), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("web");
        let b = HoldBounds {
            retry_after: Duration::from_secs(7),
            ..bounds(Duration::from_millis(500), 10)
        };
        let dst = h.manage(&web, 1, b);
        let started = Instant::now();
        let resp = http_get(h.connect_as(dst).await?, "/slow").await?;
        let waited = started.elapsed();
        let (status, headers, body) = parse_response(&resp)?;
        ensure!(status == "HTTP/1.1 503 Service Unavailable", "{status}");
        ensure!(
            headers.contains("Retry-After: 7") && headers.contains("Connection: close"),
            "{headers}"
        );
        ensure!(body.contains("did not become ready"), "{body}");
        ensure!(
            waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        ensure!(h.metrics.outcome_count(Outcome::Timeout) == 1);
        ensure!(h.proxy.held(&web) == 0);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_tcp_client_held_past_the_timeout_gets_a_clean_close() -> Result<()> {
    bounded(Duration::from_secs(10), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let db = svc("db");
        let dst = h.manage(&db, 1, bounds(Duration::from_millis(300), 10));
        let mut s = h.connect_as(dst).await?;
        s.write_all(&[0x00, 0x00, 0x00, 0x08, b'q', b'u', b'e', b'r', b'y'])
            .await?;
        // FIN, not RST: read_to_end returns Ok with nothing, not ECONNRESET.
        let got = read_to_eof(&mut s).await?;
        ensure!(got.is_empty(), "got {got:?}");
        ensure!(h.metrics.outcome_count(Outcome::Timeout) == 1);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_timeouts_of_minutes_keep_the_connection_held() -> Result<()> {
    bounded(Duration::from_secs(10), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let ml = svc("llm");
        let dst = h.manage(&ml, 1, bounds(Duration::from_secs(15 * 60), 10));
        let client = tokio::spawn({
            let s = h.connect_as(dst).await?;
            async move { http_get(s, "/generate").await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        ensure!(h.proxy.held(&ml) == 1 && !client.is_finished());
        let (backend, _) = http_backend().await?;
        h.ready(&ml, &[backend]);
        let (status, _, _) = parse_response(&client.await??)?;
        ensure!(status == "HTTP/1.1 200 OK");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_per_service_bound_http_gets_503_and_raw_a_clean_close_while_the_held_ones_survive()
-> Result<()> {
    bounded(Duration::from_secs(15), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("web");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(10), 2));
        let mut held = Vec::new();
        for i in 0..2 {
            let s = h.connect_as(dst).await?;
            held.push(tokio::spawn(
                async move { http_get(s, &format!("/{i}")).await },
            ));
        }
        wait_until("2 held", Duration::from_secs(5), || h.proxy.held(&web) == 2).await?;
        let resp = http_get(h.connect_as(dst).await?, "/third").await?;
        let (status, headers, body) = parse_response(&resp)?;
        ensure!(status == "HTTP/1.1 503 Service Unavailable", "{status}");
        ensure!(headers.contains("Retry-After: 5"), "{headers}");
        ensure!(body.contains("too many connections"), "{body}");
        let mut raw = h.connect_as(dst).await?;
        raw.write_all(b"\x16\x03\x01\x00\x05hello").await?;
        ensure!(read_to_eof(&mut raw).await?.is_empty());
        // A raw client that sends nothing is closed once the sniff budget is spent.
        let mut silent = h.connect_as(dst).await?;
        ensure!(read_to_eof(&mut silent).await?.is_empty());
        ensure!(h.metrics.outcome_count(Outcome::Overflow) == 3);

        let (backend, _) = http_backend().await?;
        h.ready(&web, &[backend]);
        for c in held {
            let (status, _, _) = parse_response(&c.await??)?;
            ensure!(status == "HTTP/1.1 200 OK");
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_agent_bound_spans_services() -> Result<()> {
    bounded(Duration::from_secs(10), async {
        let mut config = ProxyConfig::new("n");
        config.max_held_total = 1;
        let h = Harness::start(config, None).await?;
        let (a, b) = (svc("a"), svc("b"));
        let dst_a = h.manage(&a, 1, bounds(Duration::from_secs(10), 10));
        let dst_b = h.manage(&b, 2, bounds(Duration::from_secs(10), 10));
        let first = tokio::spawn({
            let s = h.connect_as(dst_a).await?;
            async move { http_get(s, "/").await }
        });
        wait_until("a held", Duration::from_secs(5), || h.proxy.held(&a) == 1).await?;
        let (status, _, _) = parse_response(&http_get(h.connect_as(dst_b).await?, "/").await?)?;
        ensure!(status == "HTTP/1.1 503 Service Unavailable", "{status}");
        first.abort();
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_to_an_unmanaged_destination_is_closed_and_counted() -> Result<()> {
    bounded(Duration::from_secs(10), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let mut s = h.connect_as(cluster_addr(77)).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        ensure!(read_to_eof(&mut s).await?.is_empty());
        ensure!(h.metrics.outcome_count(Outcome::UnknownDestination) == 1);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_while_held_is_cleaned_up() -> Result<()> {
    bounded(Duration::from_secs(10), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("web");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(60), 10));
        // An HTTP client sends its request, then closes; a raw client closes silently;
        // a third resets.
        let mut http = h.connect_as(dst).await?;
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        let silent = h.connect_as(dst).await?;
        let reset = h.connect_as(dst).await?;
        wait_until("3 held", Duration::from_secs(5), || h.proxy.held(&web) == 3).await?;
        ensure!(h.proxy.open_connections() == 3);
        drop(http);
        drop(silent);
        socket2::SockRef::from(&reset).set_linger(Some(Duration::ZERO))?;
        drop(reset);
        wait_until(
            "nothing held and no connection left in the proxy",
            Duration::from_secs(5),
            || h.proxy.held(&web) == 0 && h.proxy.open_connections() == 0,
        )
        .await?;
        ensure!(h.metrics.held_count(&web) == 0);
        ensure!(h.metrics.outcome_count(Outcome::ClientGone) == 3);
        // The proxy closed its sockets: no TCP connection to its port remains.
        let port = h.addr.port();
        let ss = std::process::Command::new("ss")
            .args([
                "-Htn",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ])
            .output()?;
        let left = String::from_utf8_lossy(&ss.stdout);
        ensure!(left.trim().is_empty(), "sockets left: {left}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_buffer_bound_the_client_is_pushed_back_and_every_byte_arrives_in_order()
-> Result<()> {
    bounded(Duration::from_secs(30), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let up = svc("upload");
        let dst = h.manage(&up, 1, bounds(Duration::from_secs(20), 10));
        // Far more than the 64 KiB bound plus what both sockets' kernel buffers absorb.
        const TOTAL: usize = 48 << 20;
        let payload: Vec<u8> = (0..TOTAL).map(|i| (i % 253) as u8).collect();
        let mut s = h.connect_as(dst).await?;
        let p = payload.clone();
        let writer = tokio::spawn(async move {
            s.write_all(&p).await?;
            s.shutdown().await?;
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).await?;
            anyhow::Ok(reply)
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ensure!(
            !writer.is_finished(),
            "the proxy read everything: no back-pressure"
        );
        ensure!(h.proxy.held(&up) == 1);

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let backend = listener.local_addr()?;
        let sink = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await?;
            let mut got = Vec::with_capacity(TOTAL);
            conn.read_to_end(&mut got).await?;
            conn.write_all(format!("got {}", got.len()).as_bytes())
                .await?;
            anyhow::Ok(got)
        });
        h.ready(&up, &[backend]);
        let got = sink.await??;
        ensure!(
            got.len() == TOTAL,
            "backend got {} of {TOTAL} bytes",
            got.len()
        );
        ensure!(got == payload, "bytes reordered or corrupted");
        ensure!(writer.await?? == format!("got {TOTAL}").into_bytes());
        Ok(())
    })
    .await
}
