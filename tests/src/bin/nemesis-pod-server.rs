//! A tiny HTTP server for sandbox pods: answers every request with `200` and the pod's
//! name (`POD_NAME`), so a test can tell which pod answered. It listens on
//! `$POD_IP:<port>` unless told otherwise, and exits on SIGTERM unless asked to
//! ignore it (to exercise the kubelet's SIGKILL after the grace period).
//!
//! Usage: nemesis-pod-server [--port N] [--listen ADDR:PORT] [--ignore-sigterm] [--hyper]
//!        [--udp-port N] [--answer-delay-ms MS]
//!
//! With `--answer-delay-ms MS` every request but `GET /healthz` (a readiness probe's) is
//! answered MS after it arrived: a loaded app, which a kill cuts before it answers.
//! By default one request per connection, answered with `connection: close`. With
//! `--hyper`, a real server (hyper) keeps connections alive and speaks HTTP/1.1 and
//! HTTP/2 with prior knowledge, as an app behind a Service does.
//!
//! With `--udp-port N` it also answers UDP on the same address, port N, as a DNS server
//! would a query: each datagram comes back with the response flag (QR, the top bit of
//! its third byte) set, followed by `;peer=ADDR;pod=NAME` (the source address it came
//! from and the pod's name), so a test can tell which pod answered and whether the
//! datagram came straight from its client or through a relay.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};

/// Port when none is given: what the sandbox tests' manifests use.
const DEFAULT_PORT: u16 = 8080;

struct Args {
    listen: SocketAddr,
    ignore_sigterm: bool,
    hyper: bool,
    udp_port: Option<u16>,
    answer_delay: std::time::Duration,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut port = DEFAULT_PORT;
    let mut listen = None;
    let mut ignore_sigterm = false;
    let mut hyper = false;
    let mut udp_port = None;
    let mut answer_delay = std::time::Duration::ZERO;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                let v = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--port needs a value"))?;
                port = v.parse().map_err(|e| anyhow::anyhow!("--port {v}: {e}"))?;
            }
            "--listen" => {
                let v = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--listen needs a value"))?;
                listen = Some(
                    v.parse()
                        .map_err(|e| anyhow::anyhow!("--listen {v}: {e}"))?,
                );
            }
            "--ignore-sigterm" => ignore_sigterm = true,
            "--hyper" => hyper = true,
            "--udp-port" => {
                let v = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--udp-port needs a value"))?;
                udp_port = Some(
                    v.parse()
                        .map_err(|e| anyhow::anyhow!("--udp-port {v}: {e}"))?,
                );
            }
            "--answer-delay-ms" => {
                let v = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--answer-delay-ms needs a value"))?;
                answer_delay = std::time::Duration::from_millis(
                    v.parse()
                        .map_err(|e| anyhow::anyhow!("--answer-delay-ms {v}: {e}"))?,
                );
            }
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let listen = match listen {
        Some(addr) => addr,
        None => {
            let ip = std::env::var("POD_IP")
                .map_err(|_| anyhow::anyhow!("POD_IP is not set and --listen not given"))?;
            SocketAddr::new(
                ip.parse()
                    .map_err(|e| anyhow::anyhow!("POD_IP {ip}: {e}"))?,
                port,
            )
        }
    };
    Ok(Args {
        listen,
        ignore_sigterm,
        hyper,
        udp_port,
        answer_delay,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let name = std::env::var("POD_NAME").unwrap_or_else(|_| "unknown".into());
    let mut sigterm = signal(SignalKind::terminate())?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("{name} listening on {}", listener.local_addr()?);
    if let Some(port) = args.udp_port {
        let socket = tokio::net::UdpSocket::bind(SocketAddr::new(args.listen.ip(), port)).await?;
        println!("{name} answering UDP on {}", socket.local_addr()?);
        tokio::spawn(answer_udp(socket, name.clone()));
    }
    loop {
        tokio::select! {
            _ = sigterm.recv() => {
                if args.ignore_sigterm {
                    println!("{name} ignoring SIGTERM");
                } else {
                    println!("{name} got SIGTERM, exiting");
                    return Ok(());
                }
            }
            accepted = listener.accept() => {
                let (mut stream, _) = accepted?;
                if args.hyper {
                    tokio::spawn(serve_hyper(stream, name.clone()));
                    continue;
                }
                let body = format!("{name}\n");
                let delay = args.answer_delay;
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    // One request per connection is all the tests need.
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    if !delay.is_zero() && !buf[..n].starts_with(b"GET /healthz ") {
                        tokio::time::sleep(delay).await;
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        }
    }
}

/// One connection served by hyper: keep-alive HTTP/1.1 or HTTP/2 (prior knowledge).
async fn serve_hyper(stream: tokio::net::TcpStream, name: String) {
    let body = bytes::Bytes::from(format!("{name}\n"));
    let service = hyper::service::service_fn(move |_req| {
        let body = body.clone();
        async move {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(body)))
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

/// The DNS-like answer to every datagram (see the module's doc).
async fn answer_udp(socket: tokio::net::UdpSocket, name: String) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let mut answer = buf[..n].to_vec();
        if let Some(flags) = answer.get_mut(2) {
            *flags |= 0x80;
        }
        answer.extend_from_slice(format!(";peer={peer};pod={name}").as_bytes());
        let _ = socket.send_to(&answer, peer).await;
    }
}
