//! A client for end-to-end tests that must connect from inside a cgroup: it starts,
//! waits for a `go` line on stdin (the test moves it into its cgroup meanwhile, so every
//! connect it makes is seen by the eBPF hooks there), then runs N concurrent clients and
//! prints one JSON line per client. Never retries: each client's fate is reported as is.
//!
//! Usage: nemesis-test-client --connect ADDR [--clients N] [--http | --raw TEXT]
//!        [--give-up-after MS] [--timeout-ms MS]
//!
//! - `--http` (default): `GET /` with `Connection: close`, then read to the end.
//! - `--raw TEXT`: send TEXT (not HTTP) and read to the end.
//! - `--give-up-after MS`: send nothing, wait MS, close (a client that gives up).
//!
//! Each line: `{"client":i,"result":"response"|"error"|"gave_up","text":..,"error":..,
//! "error_kind":..,"ms":..}`; `text` is what came back (lossy UTF-8).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One client's whole exchange must end within this unless told otherwise: a held
/// connection waits for a cold start, which tests keep to seconds.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
enum Mode {
    Http,
    Raw(String),
    GiveUp(Duration),
}

#[derive(Debug, Clone)]
struct Args {
    connect: SocketAddr,
    clients: usize,
    mode: Mode,
    timeout: Duration,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut connect = None;
    let mut clients = 1;
    let mut mode = Mode::Http;
    let mut timeout = DEFAULT_TIMEOUT;
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
            "--timeout-ms" => {
                let v = value(&mut args, "--timeout-ms")?;
                timeout =
                    Duration::from_millis(v.parse().with_context(|| format!("--timeout-ms {v}"))?);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Args {
        connect: connect.context("--connect ADDR is required")?,
        clients,
        mode,
        timeout,
    })
}

async fn exchange(args: &Args, i: usize) -> serde_json::Value {
    let started = Instant::now();
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
        }
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await?;
        Ok(Some(got))
    };
    let ms = || started.elapsed().as_millis() as u64;
    match tokio::time::timeout(args.timeout, run).await {
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
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .context("waiting for `go` on stdin")?;
    if line.trim() != "go" {
        bail!("expected `go` on stdin, got {line:?}");
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.clients {
        let args = args.clone();
        tasks.spawn(async move { exchange(&args, i).await });
    }
    let mut out = tokio::io::stdout();
    while let Some(result) = tasks.join_next().await {
        let line = result.context("a client task failed")?;
        out.write_all(format!("{line}\n").as_bytes()).await?;
    }
    out.flush().await?;
    Ok(())
}
