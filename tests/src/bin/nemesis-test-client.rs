//! A client for end-to-end tests that must connect from inside a cgroup: it starts,
//! waits for a `go` line on stdin (the test moves it into its cgroup meanwhile, so every
//! connect it makes is seen by the eBPF hooks there), then runs N concurrent clients and
//! prints one JSON line per client. Never retries: each client's fate is reported as is.
//!
//! Usage: nemesis-test-client --connect ADDR [--clients N] [--http | --raw TEXT]
//!        [--give-up-after MS] [--timeout-ms MS] [--keep-alive N | --h2 N --interval-ms MS]
//!        [--every-ms MS --max-connections N --for-ms MS]
//!
//! - `--http` (default): `GET /` with `Connection: close`, then read to the end.
//! - `--raw TEXT`: send TEXT (not HTTP) and read to the end.
//! - `--give-up-after MS`: send nothing, wait MS, close (a client that gives up).
//! - `--keep-alive N` / `--h2 N`: one real HTTP client (hyper's pooled client) making N
//!   requests one after another, `--interval-ms` apart (default 200), on keep-alive
//!   HTTP/1.1 or HTTP/2 with prior knowledge: it reconnects only when a connection is
//!   closed (`Connection: close`, GOAWAY), as applications' clients do. One line per
//!   request, with `status`, `connection` (the response's header) and `local` (the
//!   client's end of the connection that carried it).
//! - `--every-ms MS`: instead of N clients at once, start a new client every MS (without
//!   waiting for the ones still running) until a `stop` line (or EOF) on stdin,
//!   `--max-connections` clients (default 2,000) or `--for-ms` (default 60,000) since
//!   `go`, whichever comes first; then wait for every client started.
//!
//! Each line: `{"client":i,"result":"response"|"error"|"gave_up","text":..,"error":..,
//! "error_kind":..,"ms":..,"started_ms":..}`; `text` is what came back (lossy UTF-8),
//! `started_ms` when the client started, counted from `go`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One client's whole exchange must end within this unless told otherwise: a held
/// connection waits for a cold start, which tests keep to seconds.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds of a repeating run unless told otherwise: a load that can never run away.
const DEFAULT_MAX_CONNECTIONS: usize = 2_000;
const DEFAULT_REPEAT_FOR: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
enum Mode {
    Http,
    Raw(String),
    GiveUp(Duration),
    /// N requests on one pooled client, HTTP/2 when `http2`.
    Reuse {
        requests: usize,
        http2: bool,
    },
}

/// Between the requests of `--keep-alive` / `--h2` unless told otherwise.
const DEFAULT_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
struct Args {
    connect: SocketAddr,
    clients: usize,
    mode: Mode,
    timeout: Duration,
    repeat: Option<Repeat>,
    interval: Duration,
}

/// A client every `every` until stopped or a bound is reached.
#[derive(Debug, Clone, Copy)]
struct Repeat {
    every: Duration,
    max_connections: usize,
    max_for: Duration,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut connect = None;
    let mut clients = 1;
    let mut mode = Mode::Http;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut every = None;
    let mut max_connections = DEFAULT_MAX_CONNECTIONS;
    let mut max_for = DEFAULT_REPEAT_FOR;
    let mut interval = DEFAULT_INTERVAL;
    let ms = |v: &str, flag: &str| -> anyhow::Result<Duration> {
        Ok(Duration::from_millis(
            v.parse().with_context(|| format!("{flag} {v}"))?,
        ))
    };
    let mut args = std::env::args().skip(1);
    let value = |args: &mut std::iter::Skip<std::env::Args>, flag: &str| {
        args.next().with_context(|| format!("{flag} needs a value"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--connect" => {
                let v = value(&mut args, "--connect")?;
                connect = Some(v.parse().with_context(|| format!("--connect {v}"))?);
            }
            "--clients" => {
                let v = value(&mut args, "--clients")?;
                clients = v.parse().with_context(|| format!("--clients {v}"))?;
            }
            "--http" => mode = Mode::Http,
            "--raw" => mode = Mode::Raw(value(&mut args, "--raw")?),
            "--give-up-after" => {
                let v = value(&mut args, "--give-up-after")?;
                mode = Mode::GiveUp(Duration::from_millis(
                    v.parse().with_context(|| format!("--give-up-after {v}"))?,
                ));
            }
            flag @ ("--keep-alive" | "--h2") => {
                let v = value(&mut args, flag)?;
                mode = Mode::Reuse {
                    requests: v.parse().with_context(|| format!("{flag} {v}"))?,
                    http2: flag == "--h2",
                };
            }
            "--interval-ms" => interval = ms(&value(&mut args, "--interval-ms")?, "--interval-ms")?,
            "--timeout-ms" => {
                let v = value(&mut args, "--timeout-ms")?;
                timeout =
                    Duration::from_millis(v.parse().with_context(|| format!("--timeout-ms {v}"))?);
            }
            "--every-ms" => every = Some(ms(&value(&mut args, "--every-ms")?, "--every-ms")?),
            "--max-connections" => {
                let v = value(&mut args, "--max-connections")?;
                max_connections = v
                    .parse()
                    .with_context(|| format!("--max-connections {v}"))?;
            }
            "--for-ms" => max_for = ms(&value(&mut args, "--for-ms")?, "--for-ms")?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Args {
        connect: connect.context("--connect ADDR is required")?,
        clients,
        mode,
        timeout,
        repeat: every.map(|every| Repeat {
            every,
            max_connections,
            max_for,
        }),
        interval,
    })
}

async fn exchange(args: &Args, i: usize, go: Instant) -> serde_json::Value {
    let started = Instant::now();
    let started_ms = started.duration_since(go).as_millis() as u64;
    let run = async {
        let mut stream = TcpStream::connect(args.connect).await?;
        match &args.mode {
            Mode::GiveUp(after) => {
                tokio::time::sleep(*after).await;
                drop(stream);
                return Ok::<_, std::io::Error>(None);
            }
            Mode::Http => {
                let req = format!(
                    "GET /?client={i} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                    args.connect
                );
                stream.write_all(req.as_bytes()).await?;
            }
            Mode::Raw(text) => stream.write_all(text.as_bytes()).await?,
            Mode::Reuse { .. } => unreachable!("run by `reuse`"),
        }
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await?;
        Ok(Some(got))
    };
    let ms = || started.elapsed().as_millis() as u64;
    let mut line = match tokio::time::timeout(args.timeout, run).await {
        Ok(Ok(Some(got))) => json!({
            "client": i, "result": "response",
            "text": String::from_utf8_lossy(&got), "ms": ms(),
        }),
        Ok(Ok(None)) => json!({"client": i, "result": "gave_up", "ms": ms()}),
        Ok(Err(e)) => json!({
            "client": i, "result": "error", "error": e.to_string(),
            "error_kind": format!("{:?}", e.kind()), "ms": ms(),
        }),
        Err(_) => json!({
            "client": i, "result": "error", "error": "timed out",
            "error_kind": "TimedOut", "ms": ms(),
        }),
    };
    line["started_ms"] = json!(started_ms);
    line
}

/// `--keep-alive` / `--h2`: the requests of one pooled client, one line each.
async fn reuse(args: &Args, requests: usize, http2: bool, go: Instant) -> Vec<serde_json::Value> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpInfo;
    let client = Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(http2)
        .build_http::<Empty<bytes::Bytes>>();
    let mut lines = Vec::new();
    for i in 0..requests {
        if i > 0 {
            tokio::time::sleep(args.interval).await;
        }
        let started = Instant::now();
        let url = format!("http://{}/?request={i}", args.connect);
        let run = async {
            let resp = client.get(url.parse()?).await?;
            let local = resp
                .extensions()
                .get::<HttpInfo>()
                .map(|info| info.local_addr().to_string());
            let status = resp.status().as_u16();
            let connection = resp
                .headers()
                .get("connection")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, connection, local, body))
        };
        let ms = started.elapsed().as_millis() as u64;
        let mut line = match tokio::time::timeout(args.timeout, run).await {
            Ok(Ok((status, connection, local, body))) => json!({
                "client": i, "result": "response", "status": status,
                "connection": connection, "local": local,
                "text": String::from_utf8_lossy(&body), "ms": started.elapsed().as_millis() as u64,
            }),
            Ok(Err(e)) => json!({
                "client": i, "result": "error", "error": format!("{e:#}"), "ms": ms,
            }),
            Err(_) => json!({
                "client": i, "result": "error", "error": "timed out",
                "error_kind": "TimedOut", "ms": ms,
            }),
        };
        line["started_ms"] = json!(started.duration_since(go).as_millis() as u64);
        lines.push(line);
    }
    lines
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(run());
    // Tokio reads stdin with a blocking read on a thread of its own that cannot be
    // cancelled: a run that ended by a bound (`--max-connections`, `--for-ms`) while
    // stdin stays open would hang in the runtime's drop until the next line.
    rt.shutdown_background();
    result
}

async fn run() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    stdin
        .read_line(&mut line)
        .await
        .context("waiting for `go` on stdin")?;
    if line.trim() != "go" {
        bail!("expected `go` on stdin, got {line:?}");
    }
    let go = Instant::now();
    if let Mode::Reuse { requests, http2 } = args.mode {
        let mut out = tokio::io::stdout();
        for line in reuse(&args, requests, http2, go).await {
            out.write_all(format!("{line}\n").as_bytes()).await?;
        }
        out.flush().await?;
        return Ok(());
    }
    let mut tasks = tokio::task::JoinSet::new();
    match args.repeat {
        None => {
            for i in 0..args.clients {
                let args = args.clone();
                tasks.spawn(async move { exchange(&args, i, go).await });
            }
        }
        Some(r) => {
            // Anything on stdin after `go` (a `stop` line, or EOF) ends the run.
            let mut stop = Box::pin(async move {
                let mut rest = String::new();
                let _ = stdin.read_line(&mut rest).await;
            });
            let mut tick = tokio::time::interval(r.every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let end = tokio::time::Instant::from_std(go + r.max_for);
            for i in 0..r.max_connections {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stop => break,
                    _ = tokio::time::sleep_until(end) => break,
                }
                let args = args.clone();
                tasks.spawn(async move { exchange(&args, i, go).await });
            }
        }
    }
    let mut out = tokio::io::stdout();
    while let Some(result) = tasks.join_next().await {
        let line = result.context("a client task failed")?;
        out.write_all(format!("{line}\n").as_bytes()).await?;
    }
    out.flush().await?;
    Ok(())
}
