//! A UDP client for end-to-end tests that must send from inside a cgroup: it starts,
//! waits for a `go` line on stdin (the test moves it into its cgroup meanwhile, so every
//! datagram it sends is seen by the eBPF hooks there), then makes N DNS-like exchanges
//! one after another with the server at `--connect`, and prints one JSON line each.
//!
//! Usage: nemesis-udp-client --connect ADDR [--count N] [--retry-ms MS] [--timeout-ms MS]
//!        [--connected]
//!
//! - Each exchange sends a 12-byte DNS-like header (id = the exchange's number) and a
//!   question, and waits for a datagram answering that id; UDP may drop, so the query
//!   is sent again every `--retry-ms` (default 1,000) until `--timeout-ms` (default
//!   60,000) have passed.
//! - Unconnected by default (`sendto`/`recvfrom`: the answer's source is reported);
//!   `--connected` connects the socket first (`send`/`recv`; the peer is reported).
//!
//! Each line: `{"id":i,"ok":bool,"from":ADDR,"local":ADDR,"answer":TEXT,"tries":n,
//! "ms":..,"error":..}`; `answer` is what followed the echoed query (lossy UTF-8).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::net::UdpSocket;

struct Args {
    connect: SocketAddr,
    count: u16,
    retry: Duration,
    timeout: Duration,
    connected: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut connect = None;
    let mut count = 1;
    let mut retry = Duration::from_secs(1);
    let mut timeout = Duration::from_secs(60);
    let mut connected = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--connect" => {
                let v = value("--connect")?;
                connect = Some(v.parse().with_context(|| format!("--connect {v}"))?);
            }
            "--count" => {
                let v = value("--count")?;
                count = v.parse().with_context(|| format!("--count {v}"))?;
            }
            "--retry-ms" => {
                let v = value("--retry-ms")?;
                retry =
                    Duration::from_millis(v.parse().with_context(|| format!("--retry-ms {v}"))?);
            }
            "--timeout-ms" => {
                let v = value("--timeout-ms")?;
                timeout =
                    Duration::from_millis(v.parse().with_context(|| format!("--timeout-ms {v}"))?);
            }
            "--connected" => connected = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Args {
        connect: connect.context("--connect ADDR is required")?,
        count,
        retry,
        timeout,
        connected,
    })
}

/// A DNS query for `web.shop.` of type A, with `id`.
fn query(id: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["web", "shop"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;
    if line.trim() != "go" {
        bail!("expected `go` on stdin, got {line:?}");
    }
    let bind: SocketAddr = if args.connect.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind).await?;
    if args.connected {
        socket.connect(args.connect).await?;
    }
    let local = socket.local_addr()?;
    // What the socket says it is connected to (the getpeername hooks show the Service).
    let peer = if args.connected {
        Some(socket.peer_addr()?)
    } else {
        None
    };
    for id in 0..args.count {
        let q = query(id);
        let started = Instant::now();
        let mut tries = 0;
        let mut buf = vec![0u8; 65_536];
        let result: anyhow::Result<(usize, SocketAddr)> = loop {
            if started.elapsed() >= args.timeout {
                break Err(anyhow::anyhow!("no answer within {:?}", args.timeout));
            }
            tries += 1;
            let sent = if args.connected {
                socket.send(&q).await
            } else {
                socket.send_to(&q, args.connect).await
            };
            if let Err(e) = sent {
                // At zero a send may fail (nothing listens yet): tried again.
                eprintln!("send {id}: {e}");
                tokio::time::sleep(args.retry).await;
                continue;
            }
            let deadline = Instant::now() + args.retry;
            // Answers to earlier tries of this id (or to earlier ids) may arrive late:
            // only this id's ends the wait.
            let got = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let r = if args.connected {
                    tokio::time::timeout(left, socket.recv(&mut buf))
                        .await
                        .map(|r| r.map(|n| (n, peer.unwrap_or(args.connect))))
                } else {
                    tokio::time::timeout(left, socket.recv_from(&mut buf)).await
                };
                match r {
                    Err(_) => break None,
                    Ok(Err(e)) => {
                        // An ICMP error of an earlier try (connection refused): wait on.
                        eprintln!("recv {id}: {e}");
                        tokio::time::sleep(left.min(Duration::from_millis(100))).await;
                    }
                    Ok(Ok((n, from))) if n >= q.len() && buf[..2] == q[..2] => {
                        break Some((n, from));
                    }
                    Ok(Ok(_)) => {}
                }
            };
            if let Some(got) = got {
                break Ok(got);
            }
        };
        let ms = started.elapsed().as_millis() as u64;
        let out = match result {
            Ok((n, from)) => {
                let answered = buf[2] & 0x80 != 0;
                json!({
                    "id": id, "ok": answered, "from": from.to_string(),
                    "local": local.to_string(),
                    "answer": String::from_utf8_lossy(&buf[q.len()..n]),
                    "tries": tries, "ms": ms,
                })
            }
            Err(e) => json!({
                "id": id, "ok": false, "local": local.to_string(), "tries": tries,
                "ms": ms, "error": e.to_string(),
            }),
        };
        println!("{out}");
    }
    Ok(())
}
