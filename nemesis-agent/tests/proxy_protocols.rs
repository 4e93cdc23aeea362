//! The proxy holds at the TCP level, so any protocol crosses it: HTTP/2 cleartext with
//! gRPC-style bidirectional streams and trailers, a WebSocket that stays open, raw TCP
//! (client-speaks-first with half-close, and server-speaks-first).

mod proxy_support;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nemesis_agent::proxy::ProxyConfig;
use proxy_support::*;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

type FrameTx = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

/// An h2c (prior knowledge) server: each stream echoes every request message upper-cased
/// as soon as it arrives, then ends with gRPC-style trailers.
async fn h2c_backend() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let (mut tx, rx): (FrameTx, _) = mpsc::channel(16);
                    let mut body = req.into_body();
                    tokio::spawn(async move {
                        while let Some(Ok(frame)) = body.frame().await {
                            if let Ok(data) = frame.into_data() {
                                let up = Bytes::from(data.to_ascii_uppercase());
                                if tx.send(Ok(Frame::data(up))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                    });
                    let mut resp = Response::new(StreamBody::new(rx));
                    resp.headers_mut()
                        .insert("content-type", "application/grpc".parse().unwrap());
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_bidirectional_streams_with_trailers_cross_a_cold_start() -> Result<()> {
    bounded(Duration::from_secs(15), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let grpc = svc("grpc");
        let dst = h.manage(&grpc, 1, bounds(Duration::from_secs(10), 10));
        let stream = h.connect_as(dst).await?;
        let client = tokio::spawn(async move {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await?;
            tokio::spawn(conn);
            // Three multiplexed streams, each a ping-pong of three messages.
            let calls = (0..3).map(|s| {
                let mut sender = sender.clone();
                async move {
                    let (mut tx, rx): (FrameTx, _) = mpsc::channel(4);
                    let req = Request::post("http://grpc.shop/echo.Echo/Chat")
                        .header("content-type", "application/grpc")
                        .body(StreamBody::new(rx))?;
                    tx.send(Ok(Frame::data(Bytes::from(format!("s{s} m0")))))
                        .await?;
                    let resp = sender.send_request(req).await?;
                    ensure!(resp.status() == 200, "status {}", resp.status());
                    let mut body = resp.into_body();
                    for m in 0..3 {
                        let frame = body.frame().await.context("stream ended early")??;
                        let data = frame.into_data().map_err(|_| anyhow::anyhow!("not data"))?;
                        ensure!(data == format!("S{s} M{m}").as_bytes(), "got {data:?}");
                        if m < 2 {
                            tx.send(Ok(Frame::data(Bytes::from(format!("s{s} m{}", m + 1)))))
                                .await?;
                        }
                    }
                    drop(tx); // end of request stream
                    let trailers = loop {
                        let frame = body.frame().await.context("no trailers")??;
                        if let Ok(t) = frame.into_trailers() {
                            break t;
                        }
                    };
                    ensure!(trailers.get("grpc-status").map(|v| v.as_bytes()) == Some(&b"0"[..]));
                    anyhow::Ok(())
                }
            });
            for r in futures::future::join_all(calls).await {
                r?;
            }
            anyhow::Ok(())
        });
        wait_until("held", Duration::from_secs(5), || h.proxy.held(&grpc) == 1).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.ready(&grpc, &[h2c_backend().await?]);
        client.await??;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgraded_through_a_cold_start_stays_open_and_exchanges_messages() -> Result<()>
{
    bounded(Duration::from_secs(15), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let chat = svc("chat");
        let dst = h.manage(&chat, 1, bounds(Duration::from_secs(10), 10));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let backend = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        let reply = match msg {
                            Message::Text(t) => Message::text(format!("echo: {t}")),
                            Message::Close(_) => return,
                            _ => continue,
                        };
                        if ws.send(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let stream = h.connect_as(dst).await?;
        let client = tokio::spawn(async move {
            let (mut ws, resp) =
                tokio_tungstenite::client_async("ws://chat.shop/room", stream).await?;
            ensure!(resp.status() == 101, "{}", resp.status());
            // Stays open across pauses: a long-lived connection, not one request.
            for i in 0..10 {
                ws.send(Message::text(format!("hi {i}"))).await?;
                let reply = ws.next().await.context("closed early")??;
                ensure!(reply == Message::text(format!("echo: hi {i}")), "{reply:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ws.close(None).await?;
            anyhow::Ok(())
        });
        wait_until("held", Duration::from_secs(5), || h.proxy.held(&chat) == 1).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.ready(&chat, &[backend]);
        client.await??;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_line_protocol_with_half_close_crosses_a_cold_start() -> Result<()> {
    bounded(Duration::from_secs(15), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let calc = svc("calc");
        let dst = h.manage(&calc, 1, bounds(Duration::from_secs(10), 10));
        // "SUM a b c\n" -> "<sum>\n" per line; at EOF: "BYE <lines>\n" and close.
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let backend = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let mut n = 0;
                    while let Ok(Some(line)) = lines.next_line().await {
                        n += 1;
                        let sum: i64 = line
                            .split_whitespace()
                            .skip(1)
                            .filter_map(|x| x.parse::<i64>().ok())
                            .sum();
                        if w.write_all(format!("{sum}\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let _ = w.write_all(format!("BYE {n}\n").as_bytes()).await;
                });
            }
        });
        // Client 1: sends everything while held, half-closes, reads all answers.
        let mut batch = h.connect_as(dst).await?;
        batch.write_all(b"SUM 1 2 3\nSUM 10 20\n").await?;
        batch.shutdown().await?;
        // Client 2: interactive, line by line.
        let interactive = h.connect_as(dst).await?;
        wait_until("2 held", Duration::from_secs(5), || {
            h.proxy.held(&calc) == 2
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        ensure!(
            h.proxy.held(&calc) == 2,
            "a half-closed client with data stays held"
        );
        h.ready(&calc, &[backend]);
        let mut out = String::new();
        batch.read_to_string(&mut out).await?;
        ensure!(out == "6\n30\nBYE 2\n", "{out:?}");

        let (r, mut w) = interactive.into_split();
        let mut lines = BufReader::new(r).lines();
        for i in 1..=5i64 {
            w.write_all(format!("SUM {i} {i}\n").as_bytes()).await?;
            ensure!(lines.next_line().await?.as_deref() == Some(&*format!("{}", 2 * i)));
        }
        w.shutdown().await?;
        ensure!(lines.next_line().await?.as_deref() == Some("BYE 5"));
        ensure!(lines.next_line().await?.is_none());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_speaks_first_protocol_gets_its_greeting_after_the_cold_start() -> Result<()> {
    bounded(Duration::from_secs(10), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let smtp = svc("smtp");
        let dst = h.manage(&smtp, 1, bounds(Duration::from_secs(10), 10));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let backend = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(b"220 ready\r\n").await;
                    let mut buf = [0u8; 64];
                    if let Ok(n) = s.read(&mut buf).await {
                        let _ = s.write_all(&[b"250 ", &buf[..n]].concat()).await;
                    }
                });
            }
        });
        let mut c = h.connect_as(dst).await?;
        wait_until("held", Duration::from_secs(5), || h.proxy.held(&smtp) == 1).await?;
        h.ready(&smtp, &[backend]);
        let mut greeting = [0u8; 11];
        c.read_exact(&mut greeting).await?;
        ensure!(&greeting == b"220 ready\r\n");
        c.write_all(b"HELO x\r\n").await?;
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await?;
        ensure!(
            reply == b"250 HELO x\r\n",
            "{:?}",
            String::from_utf8_lossy(&reply)
        );
        Ok(())
    })
    .await
}

/// A response whose end is the backend's close (HTTP/1.0 style: no length, the close
/// delimits the body) reaches the client whole and then its EOF, when the close comes
/// with the bytes (one read takes all) and when it comes behind more than one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_ends_with_the_backends_close_arrives_whole_then_eof() -> Result<()> {
    bounded(Duration::from_secs(20), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("close-delimited");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(15), 10));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let backend = listener.local_addr()?;
        // The body's size is the request's path: "/<n>".
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut buf = [0u8; 1024];
                        match s.read(&mut buf).await {
                            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    let path = String::from_utf8_lossy(&head);
                    let n: usize = path
                        .split_whitespace()
                        .nth(1)
                        .and_then(|p| p.trim_start_matches('/').parse().ok())
                        .unwrap_or(0);
                    let mut response = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
                    response.extend((0..n).map(|i| b'a' + (i % 26) as u8));
                    let _ = s.write_all(&response).await;
                    // Dropped: the FIN follows the last byte.
                });
            }
        });
        let sizes = [2usize, 100 * 1024];
        let mut clients = Vec::new();
        for n in sizes {
            let mut c = h.connect_as(dst).await?;
            c.write_all(format!("GET /{n} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await?;
            clients.push((n, c));
        }
        wait_until("both held", Duration::from_secs(10), || {
            h.proxy.held(&web) == sizes.len()
        })
        .await?;
        h.ready(&web, &[backend]);
        for (n, mut c) in clients {
            let mut got = Vec::new();
            c.read_to_end(&mut got).await?;
            let text = String::from_utf8_lossy(&got);
            let (head, body) = text
                .split_once("\r\n\r\n")
                .context("no end of the response head")?;
            ensure!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
            ensure!(
                body.len() == n,
                "body of {} bytes, expected {n}",
                body.len()
            );
            ensure!(
                body.bytes()
                    .enumerate()
                    .all(|(i, b)| b == b'a' + (i % 26) as u8),
                "the body of {n} bytes came changed"
            );
        }
        Ok(())
    })
    .await
}

/// A backend that answers, half-closes and reads on (to learn that its client is done)
/// sees the client's close as a clean EOF, not a reset, when the client closes after
/// the answer's EOF: the proxy then closes its backend socket with nothing unread in it
/// (and no shutdown before the close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_reads_on_after_its_answer_sees_the_clients_close_as_eof() -> Result<()> {
    bounded(Duration::from_secs(20), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("reads-on");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(15), 10));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let backend = listener.local_addr()?;
        let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let ended_tx = ended_tx.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut buf = [0u8; 1024];
                        match s.read(&mut buf).await {
                            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    let answer =
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
                    if s.write_all(answer).await.is_err() || s.shutdown().await.is_err() {
                        return;
                    }
                    // What the read after the answer ends with: Ok(0) is the FIN.
                    let mut rest = Vec::new();
                    let _ = ended_tx.send(s.read_to_end(&mut rest).await.map(|_| rest));
                });
            }
        });
        let clients = 3;
        let mut held = Vec::new();
        for _ in 0..clients {
            let mut c = h.connect_as(dst).await?;
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await?;
            held.push(c);
        }
        wait_until("all held", Duration::from_secs(10), || {
            h.proxy.held(&web) == clients
        })
        .await?;
        h.ready(&web, &[backend]);
        for mut c in held {
            let mut got = Vec::new();
            c.read_to_end(&mut got).await?;
            ensure!(
                got.ends_with(b"\r\n\r\nok"),
                "{:?}",
                String::from_utf8_lossy(&got)
            );
            drop(c);
        }
        for _ in 0..clients {
            let end = ended.recv().await.context("the backend task ended early")?;
            match end {
                Ok(rest) => ensure!(rest.is_empty(), "the backend got {rest:?} after its answer"),
                Err(err) => anyhow::bail!("the backend's read after its answer failed: {err}"),
            }
        }
        Ok(())
    })
    .await
}
