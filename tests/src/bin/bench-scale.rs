//! Benchmark: one controller process with many simulated agents and managed Services.
//!
//! Starts the test API server in this process, creates `--services` Services, Deployments
//! (at zero) and ScalingPolicies with concurrent requests, starts one real
//! `nemesis-controller` process (the binary next to this one unless `--controller`), and
//! runs `--agents` simulated agents as tokio tasks speaking the real agent HTTP API, each
//! with its own token (a TokenRequest bound to a pod of its node, as its projected volume
//! would hold; the controller reviews it through TokenReview): each heartbeats every `--heartbeat` seconds (with jitter) and reports per-Service counters
//! for the Services it "hosts" (Service `i` lives on agent `i % agents`), acknowledging the
//! directive epochs it receives. Then, while every agent keeps heartbeating:
//!
//! - a steady window of `--steady` seconds with nothing changing: the API server's write
//!   count (POST/PUT/PATCH/DELETE) over it -> `api_writes_per_s_steady` (goal: near 0; the
//!   leader's Lease renewal is the floor), without the TokenReviews, which store nothing
//!   and are reported as `api_token_reviews_per_s_steady` (one per agent per cache period);
//! - the controller's CPU time (`/proc/<pid>/stat`) over the same window ->
//!   `controller_cpu_cores_steady` (CPU-seconds per second);
//! - the controller's resident memory (`VmRSS` of `/proc/<pid>/status`) at the end of it
//!   -> `controller_rss_mib_1k_agents_10k_services` (and the peak, `VmHWM`);
//! - `--wakes` wake-ups sent one at a time by the agent hosting a random Service, each timed
//!   from the wake request to the moment a watch on Deployments sees its scale write
//!   -> `wake_to_scale_ms_p99_under_load`;
//! - the agents' own view: heartbeat round trips and reply sizes.
//!
//! Prints `name=value` lines (what `cargo xtask bench` collects); progress goes to stderr.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use kube::{Api, CustomResourceExt, ResourceExt};
use nemesis_common::stats::percentile_or_nan;
use nemesis_common::wire::{
    AppliedMode, DirectiveView, Heartbeat, HeartbeatReply, ReportDeltas, ServiceRef, ServiceReport,
    ViewUpdate, WakeReply, WakeRequest,
};
use nemesis_controller::notify::rule::AlertRule;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_controller::reconcile::status::VALUE_WRITES_PER_SECOND;
use nemesis_tests::agent_token::mint_agent_token;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use rand::Rng as _;
use serde_json::json;

const NAMESPACE: &str = "default";

#[derive(Parser)]
struct Cli {
    /// Managed Services (each with a Deployment at zero and a ScalingPolicy).
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Simulated agents (one per node).
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// Seconds between an agent's heartbeats (each jittered by up to ±10%).
    #[arg(long, default_value_t = 5.0)]
    heartbeat: f64,
    /// Seconds of the steady window (nothing changing) over which writes are counted.
    #[arg(long, default_value_t = 30.0)]
    steady: f64,
    /// Wake-ups timed under load (one at a time).
    #[arg(long, default_value_t = 100)]
    wakes: usize,
    /// Concurrent create requests while setting up.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Where the controller's log goes (default: a temporary file removed at the end).
    #[arg(long)]
    controller_log: Option<PathBuf>,
    /// The controller binary (default: `nemesis-controller` next to this binary).
    #[arg(long)]
    controller: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    // 1,000 agents hold a connection each (and the API server one per controller
    // connection): a soft limit of 1,024 would fail accepts and connects with EMFILE.
    let files = nemesis_controller::open_files::raise().context("raising RLIMIT_NOFILE")?;
    eprintln!(
        "open-file limit {} (hard {}; was {})",
        files.now.soft, files.now.hard, files.before.soft
    );
    // The test API server stands for a cluster's API server, which runs on machines of
    // its own: on its own threads here, so the simulated agents (parsing whole directive
    // sets by the hundred) cannot starve it of the scheduler and make the controller's
    // Lease renewals time out, a failure no real cluster would show.
    let apiserver = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("apiserver")
        .enable_all()
        .build()?;
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench")
        .enable_all()
        .build()?
        .block_on(run(cli, apiserver.handle().clone()));
    apiserver.shutdown_timeout(Duration::from_secs(5));
    result
}

fn service_name(i: usize) -> String {
    format!("s{i}")
}

fn node_name(a: usize) -> String {
    format!("sim-node-{a}")
}

/// A free loopback port for the controller's listeners (it runs in another process, so
/// port 0 would hide the port from us).
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Resident and peak memory of a process, in MiB, from `/proc/<pid>/status`.
fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: f64 = line
            .trim_start_matches(name)
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("parsing {line:?}"))?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system, every thread) a process has used, in seconds, from
/// `/proc/<pid>/stat` (fields 14 and 15, in clock ticks: USER_HZ, 100 on Linux).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = stat
        .rsplit_once(')')
        .with_context(|| format!("no command name in /proc/{pid}/stat"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .with_context(|| format!("/proc/{pid}/stat has {} fields", fields.len() + 2))?
            .parse::<f64>()
            .with_context(|| format!("field {} of /proc/{pid}/stat", i + 3))
    };
    // Field 3 (the state) is fields[0]: utime (14) and stime (15) are 11 and 12.
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// The size the figures are named for: 1,000 agents, 10,000 Services.
const FULL_AGENTS: usize = 1_000;
const FULL_SERVICES: usize = 10_000;

/// The size a run measured, which every figure's name carries unless it is the full size
/// (then the names are the issue's: `controller_rss_mib_1k_agents_10k_services`,
/// `api_writes_per_s_steady`, `wake_to_scale_ms_p99_under_load`), so a figure of a
/// smaller run is never taken for the full one.
#[derive(Debug, Clone, Copy)]
struct Size {
    agents: usize,
    services: usize,
}

impl Size {
    fn tag(self) -> String {
        let count = |n: usize| {
            if n >= 1000 && n.is_multiple_of(1000) {
                format!("{}k", n / 1000)
            } else {
                n.to_string()
            }
        };
        format!(
            "{}_agents_{}_services",
            count(self.agents),
            count(self.services)
        )
    }

    /// Memory figures always say their size; the others only when it is not the full one.
    fn name(self, figure: &str) -> String {
        if figure.contains("rss") || (self.agents, self.services) != (FULL_AGENTS, FULL_SERVICES) {
            format!("{figure}_{}", self.tag())
        } else {
            figure.to_string()
        }
    }
}

async fn create_objects(client: &kube::Client, cli: &Cli) -> anyhow::Result<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), NAMESPACE);
    futures::stream::iter(0..cli.services)
        .map(|i| {
            let (services, deployments, policies) =
                (services.clone(), deployments.clone(), policies.clone());
            async move {
                let name = service_name(i);
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"selector": {"app": name},
                             "ports": [{"port": 80, "targetPort": 8080}]},
                }))?;
                services.create(&PostParams::default(), &svc).await?;
                let d: Deployment = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {
                        "replicas": 0,
                        "selector": {"matchLabels": {"app": name}},
                        "template": {"metadata": {"labels": {"app": name}},
                                     "spec": {"containers": [{"name": "app", "image": "local/app"}]}},
                    },
                }))?;
                deployments.create(&PostParams::default(), &d).await?;
                let p: ScalingPolicy = serde_json::from_value(json!({
                    "apiVersion": "nemesis.dev/v1alpha1", "kind": "ScalingPolicy",
                    "metadata": {"name": name},
                    "spec": {"target": {"deployment": name, "service": name},
                             "minReplicas": 0, "maxReplicas": 1, "idleTimeout": "1h"},
                }))?;
                policies.create(&PostParams::default(), &p).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(cli.concurrency.max(1))
        .try_collect::<()>()
        .await
}

/// What the agents measured, shared by every agent task.
#[derive(Default)]
struct AgentStats {
    heartbeats: AtomicU64,
    failures: AtomicU64,
    /// Delta replies that did not continue an agent's copy (each then asks for the
    /// whole set at once): should stay 0 with one controller.
    resyncs: AtomicU64,
    /// Heartbeats that got no answer within the client's 30 s.
    timeouts: AtomicU64,
    /// Paged replies with more to follow (each asked again at once).
    pages: AtomicU64,
    /// Report deltas the controller could not take (each resent whole at once).
    report_resends: AtomicU64,
    /// Agents whose latest reply brought no directive change (a delta with nothing in
    /// it and no page to follow): they hold the controller's whole set as it stands.
    current: AtomicU64,
    /// The largest reply, in bytes, over the whole run.
    max_reply: AtomicU64,
    reply_bytes: AtomicU64,
    /// Round trips in ms, and reply sizes in bytes, of the current window.
    rtts: Mutex<Vec<f64>>,
    sizes: Mutex<Vec<f64>>,
}

impl AgentStats {
    fn reset_window(&self) {
        self.rtts.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.sizes.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

struct AgentApi {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    base: String,
    /// Each agent's own token (index = agent), as its projected volume would hold it:
    /// bound to a pod of its node, reviewed by the controller through TokenReview.
    tokens: Vec<String>,
}

impl AgentApi {
    /// POSTs `body` to `path` as agent `agent`.
    async fn post<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        agent: usize,
        path: &str,
        body: &T,
    ) -> anyhow::Result<(R, usize)> {
        let req = http::Request::post(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.tokens[agent]))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.http.request(req))
            .await
            .with_context(|| format!("{path}: no answer within 30 s"))??;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("{path}: {status} {}", String::from_utf8_lossy(&bytes));
        }
        Ok((serde_json::from_slice(&bytes)?, bytes.len()))
    }
}

/// One simulated agent: heartbeats forever, reporting the Services it hosts with the
/// directive epochs it last received for them.
async fn agent(
    index: usize,
    hosted: Vec<ServiceRef>,
    api: Arc<AgentApi>,
    every: Duration,
    stats: Arc<AgentStats>,
) {
    let node = node_name(index);
    let instance = format!("{:016x}", rand::random::<u64>());
    // The agent's copy of the directives, patched by each reply as the real agent's, and
    // its side of report deltas.
    let mut view = DirectiveView::default();
    let mut deltas = ReportDeltas::default();
    // Whether this agent counts in `stats.current`.
    let mut current = false;
    // Spread the first beats over one interval, as agents started at different times.
    let first = every.mul_f64(rand::rng().random_range(0.0..1.0));
    tokio::time::sleep(first).await;
    loop {
        let mut hb = Heartbeat {
            node: node.clone(),
            instance: instance.clone(),
            services: Vec::new(),
            addresses: vec![],
            ready: true,
            directives_cursor: view.cursor(),
            pages: true,
            reports_seq: None,
            reports_since: None,
            gone: Vec::new(),
        };
        let reports = hosted
            .iter()
            .map(|s| ServiceReport {
                service: s.clone(),
                mode: AppliedMode::Hold,
                applied_epoch: view.get(s).map_or(0, |d| d.epoch),
                connects_total: 0,
                open_connections: 0,
                closed_total: 0,
                held_connections: 0,
                accepted_total: 0,
                accepted_open: 0,
                hold_ports: vec![],
                holds_total: 0,
                holds_refused_total: 0,
                proxy_errors: Default::default(),
            })
            .collect();
        deltas.prepare(&mut hb, reports);
        let start = Instant::now();
        match api
            .post::<_, HeartbeatReply>(index, "/v1/agents/heartbeat", &hb)
            .await
        {
            Ok((reply, size)) => {
                let ms = start.elapsed().as_secs_f64() * 1000.0;
                stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                stats.reply_bytes.fetch_add(size as u64, Ordering::Relaxed);
                stats.max_reply.fetch_max(size as u64, Ordering::Relaxed);
                stats
                    .rtts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(ms);
                stats
                    .sizes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(size as f64);
                let again = deltas.acknowledge(&reply);
                if again {
                    stats.report_resends.fetch_add(1, Ordering::Relaxed);
                }
                let now_current = reply.delta
                    && !reply.more
                    && reply.directives.is_empty()
                    && reply.removed.is_empty();
                if now_current != current {
                    current = now_current;
                    if current {
                        stats.current.fetch_add(1, Ordering::Relaxed);
                    } else {
                        stats.current.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                match view.apply(&reply) {
                    ViewUpdate::Resync => {
                        stats.resyncs.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    // The next page at once, as the real agent asks.
                    ViewUpdate::Partial => {
                        stats.pages.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    ViewUpdate::Replaced | ViewUpdate::Patched if again => continue,
                    ViewUpdate::Replaced | ViewUpdate::Patched => {}
                }
            }
            Err(e) => {
                deltas.failed();
                stats.failures.fetch_add(1, Ordering::Relaxed);
                if e.to_string().contains("no answer within") {
                    stats.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(node, err = %e, "heartbeat failed");
            }
        }
        let jitter = rand::rng().random_range(0.9..1.1);
        tokio::time::sleep(every.mul_f64(jitter)).await;
    }
}

/// Waits until every agent holds the controller's whole directive set as it stands
/// (its latest reply brought no change), so that the steady window measures steady
/// heartbeats and not the tail of the adoption's directive delivery. Returns the
/// seconds from `start` (the controller's start), or `None` after `limit`.
async fn wait_every_agent_current(
    stats: &AgentStats,
    agents: usize,
    start: Instant,
    limit: Duration,
) -> Option<f64> {
    let t = Instant::now();
    let mut said = Instant::now();
    loop {
        let current = stats.current.load(Ordering::Relaxed);
        if current >= agents as u64 {
            let s = start.elapsed().as_secs_f64();
            eprintln!(
                "every agent holds the whole directive set {s:.1} s after the controller started ({:.1} s waited for it)",
                t.elapsed().as_secs_f64()
            );
            return Some(s);
        }
        if t.elapsed() > limit {
            eprintln!(
                "only {current} of {agents} agents hold the whole directive set after {:.0} s more: the steady window opens anyway",
                limit.as_secs_f64()
            );
            return None;
        }
        if said.elapsed() > Duration::from_secs(10) {
            said = Instant::now();
            eprintln!("{current} of {agents} agents hold the whole directive set");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kills the controller process when the benchmark ends however it ends.
struct ChildGuard(tokio::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// Open descriptors of process `pid` (`/proc/<pid>/fd`).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The most descriptors each of two processes held, sampled every second.
#[derive(Default)]
struct FdPeaks {
    bench: AtomicU64,
    controller: AtomicU64,
}

/// `nemesis_controller_leadership_lost_total` from the controller's `/metrics`.
async fn leadership_lost(
    http: &HttpClient<HttpConnector, Full<Bytes>>,
    admin: SocketAddr,
) -> anyhow::Result<u64> {
    let req =
        http::Request::get(format!("http://{admin}/metrics")).body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), http.request(req))
        .await
        .context("the controller's /metrics: no answer within 30 s")??;
    let text = String::from_utf8(resp.into_body().collect().await?.to_bytes().to_vec())?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("nemesis_controller_leadership_lost_total "))
        .context("no nemesis_controller_leadership_lost_total in the controller's /metrics")?;
    Ok(line.trim().parse::<f64>()? as u64)
}

/// Says on stderr, loudly, when the controller lost its Lease during `phase`: every
/// agent then takes the whole directive set again and the figures are not a steady
/// controller's.
fn report_lease(phase: &str, lost_before: u64, lost_now: u64) {
    if lost_now > lost_before {
        eprintln!(
            "LEASE LOST: the controller stopped leading {} time(s) during {phase} (the figures below include re-adoption)",
            lost_now - lost_before
        );
    } else {
        eprintln!("lease kept through {phase}");
    }
    // The machine's load says how much of a late renewal was the bench's neighbours.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "load average after {phase}: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}

async fn run(cli: Cli, apiserver: tokio::runtime::Handle) -> anyhow::Result<()> {
    let t_setup = Instant::now();
    // Started on its own runtime: its accept loop and connections run there.
    let server = apiserver
        .spawn(TestApiServer::start(ApiServerOptions::default()))
        .await??;
    let client = server.client().await?;
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &ScalingPolicy::crd())
        .await
        .context("installing the ScalingPolicy CRD")?;
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &AlertRule::crd())
        .await
        .context("installing the AlertRule CRD")?;
    create_objects(&client, &cli).await?;
    eprintln!(
        "created {} Services, Deployments and ScalingPolicies in {:.1} s",
        cli.services,
        t_setup.elapsed().as_secs_f64()
    );

    // Scale writes, as a watch sees them: Deployment name -> when replicas went above 0.
    let scaled: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch_ready = Arc::new(tokio::sync::Notify::new());
    {
        let (scaled, ready) = (scaled.clone(), watch_ready.clone());
        let api: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
        tokio::spawn(async move {
            // With backoff: a watch failing without it retried in a busy loop (thousands
            // of attempts a second) and took the CPU the API server needed.
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = stream.next().await {
                let now = Instant::now();
                match ev {
                    Ok(watcher::Event::Apply(d)) => {
                        if d.spec.replicas.unwrap_or(0) > 0 {
                            let mut m = scaled.lock().unwrap_or_else(|e| e.into_inner());
                            m.entry(d.name_any()).or_insert(now);
                        }
                    }
                    Ok(watcher::Event::InitDone) => ready.notify_one(),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(err = %e, "Deployment watch"),
                }
            }
        });
    }

    // The policies' statuses, as a watch shows them.
    let (policy_cache, policy_writer) = reflector::store::<ScalingPolicy>();
    tokio::spawn(
        reflector::reflector(
            policy_writer,
            watcher(
                Api::<ScalingPolicy>::namespaced(client.clone(), NAMESPACE),
                watcher::Config::default(),
            )
            .default_backoff(),
        )
        .for_each(|_| futures::future::ready(())),
    );

    // Each agent's own token, minted as the kubelet would for its projected volume (a
    // pod of its node, the agents' ServiceAccount, the controller's audience): the
    // controller reviews each once per cache period, as it would in a cluster.
    let t_tokens = Instant::now();
    let tokens: Vec<String> = futures::stream::iter(0..cli.agents.max(1))
        .map(|a| {
            let client = client.clone();
            async move { mint_agent_token(&client, &node_name(a)).await }
        })
        .buffered(cli.concurrency.max(1))
        .try_collect()
        .await
        .context("minting the agents' tokens")?;
    eprintln!(
        "{} agent tokens minted in {:.1} s",
        tokens.len(),
        t_tokens.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir()?;
    let controller_bin = match &cli.controller {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the benchmark binary has no directory")?
            .join("nemesis-controller"),
    };
    let (listen, admin) = (free_port()?, free_port()?);
    let log_path = cli
        .controller_log
        .clone()
        .unwrap_or_else(|| dir.path().join("controller.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let child = tokio::process::Command::new(&controller_bin)
        .arg("run")
        .args(["--listen", &listen.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--lease-namespace", NAMESPACE])
        .args([
            "--store-path",
            &dir.path().join("history.redb").display().to_string(),
        ])
        .args(["--hold-ports", "20000-59999"])
        .env("KUBECONFIG", server.kubeconfig_path())
        .env(
            "RUST_LOG",
            std::env::var("BENCH_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", controller_bin.display()))?;
    let pid = child.id().context("the controller exited at once")?;
    let mut child = ChildGuard(child);
    eprintln!(
        "controller {} (pid {pid}) on {listen}; its log: {}",
        controller_bin.display(),
        log_path.display()
    );
    let fd_peaks = Arc::new(FdPeaks::default());
    let fd_sampler = {
        let peaks = fd_peaks.clone();
        tokio::spawn(async move {
            let me = std::process::id();
            loop {
                peaks
                    .bench
                    .fetch_max(open_fds(me) as u64, Ordering::Relaxed);
                peaks
                    .controller
                    .fetch_max(open_fds(pid) as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    // The agents start with the controller: they retry until it listens.
    let api = Arc::new(AgentApi {
        http: HttpClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(cli.agents)
            .build_http(),
        base: format!("http://{listen}"),
        tokens,
    });
    let stats = Arc::new(AgentStats::default());
    let every = Duration::from_secs_f64(cli.heartbeat);
    let mut hosted: Vec<Vec<ServiceRef>> = vec![Vec::new(); cli.agents.max(1)];
    for i in 0..cli.services {
        hosted[i % cli.agents.max(1)].push(ServiceRef {
            namespace: NAMESPACE.into(),
            name: service_name(i),
        });
    }
    let mut agent_tasks = Vec::new();
    for (a, h) in hosted.into_iter().enumerate().take(cli.agents) {
        agent_tasks.push(tokio::spawn(agent(a, h, api.clone(), every, stats.clone())));
    }

    // Every policy adopted at zero: its status says so (read from the watch's cache:
    // listing 10,000 policies every few seconds loaded the API server the controller
    // needs for its Lease).
    let t_adopt = Instant::now();
    let mut last_progress = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait()? {
            bail!(
                "the controller exited ({status}); see {}",
                log_path.display()
            );
        }
        let at_zero = policy_cache
            .state()
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.state.as_deref()) == Some("zero"))
            .count();
        if at_zero == cli.services {
            break;
        }
        if last_progress.elapsed() > Duration::from_secs(30) {
            last_progress = Instant::now();
            eprintln!(
                "{at_zero} of {} policies at zero after {:.0} s",
                cli.services,
                t_adopt.elapsed().as_secs_f64()
            );
        }
        if t_adopt.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {at_zero} of {} policies at zero after 600 s",
                cli.services
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let adopted_s = t_adopt.elapsed().as_secs_f64();
    eprintln!("every policy at zero {adopted_s:.1} s after the controller started");
    let lost_adopted = leadership_lost(&api.http, admin).await?;
    report_lease("setup and adoption", 0, lost_adopted);
    // Settle: every agent has beaten at least twice, and what adoption wrote is done:
    // wait for a 5 s stretch with at most a write a second. The adoption wrote each
    // status before any agent reported its Service (metric values unknown); each
    // policy's values change once, to known, when agents report it, and values-only
    // writes share one budget across the controller: at 10,000 policies and 20 a
    // second, up to 500 s. Wait for that, with room.
    tokio::time::sleep(every * 2).await;
    tokio::time::timeout(Duration::from_secs(60), watch_ready.notified())
        .await
        .ok();
    let t_settle = Instant::now();
    let value_writes = cli.services as f64 / VALUE_WRITES_PER_SECOND;
    let settle_limit = Duration::from_secs_f64((value_writes * 1.5).max(120.0) + 60.0);
    let settled_s = loop {
        let w0 = server.request_counts().state_writes();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let w = server.request_counts().state_writes() - w0;
        if w <= 5 || t_settle.elapsed() > settle_limit {
            let s = t_settle.elapsed().as_secs_f64();
            eprintln!(
                "settled after {s:.1} s ({w} writes in the last 5 s; {value_writes:.0} s of \
                 values-only writes expected at {VALUE_WRITES_PER_SECOND}/s)"
            );
            break s;
        }
    };

    let directives_everywhere =
        wait_every_agent_current(&stats, cli.agents, t_adopt, Duration::from_secs(300)).await;

    // Steady window: nothing changes; count what is written anyway.
    let lost_before_steady = leadership_lost(&api.http, admin).await?;
    report_lease("settling", lost_adopted, lost_before_steady);
    stats.reset_window();
    let before = server.request_counts();
    let beats_before = stats.heartbeats.load(Ordering::Relaxed);
    let timeouts_before = stats.timeouts.load(Ordering::Relaxed);
    let pages_before = stats.pages.load(Ordering::Relaxed);
    let cpu_before = cpu_seconds(pid)?;
    let t_steady = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(cli.steady)).await;
    let window = t_steady.elapsed().as_secs_f64();
    // CPU-seconds per second: 1.0 is one core busy all the window.
    let cpu_cores = (cpu_seconds(pid)? - cpu_before) / window;
    let after = server.request_counts();
    // Reviews (the agents' tokens checked once per cache period) store nothing: they
    // are counted apart from the writes.
    let writes = after.state_writes() - before.state_writes();
    let reviews = after.reviews - before.reviews;
    let beats = stats.heartbeats.load(Ordering::Relaxed) - beats_before;
    let timeouts_steady = stats.timeouts.load(Ordering::Relaxed) - timeouts_before;
    let pages_steady = stats.pages.load(Ordering::Relaxed) - pages_before;
    let (rss, hwm) = memory_mib(pid)?;
    let lost_after_steady = leadership_lost(&api.http, admin).await?;
    report_lease("the steady window", lost_before_steady, lost_after_steady);
    // Which writes: the request log's tail (it keeps the latest few thousand).
    let log = server.requests();
    let served: u64 =
        after.by_method.values().sum::<u64>() - before.by_method.values().sum::<u64>();
    let tail = usize::try_from(served).unwrap_or(usize::MAX).min(log.len());
    let mut by_path: HashMap<String, u64> = HashMap::new();
    for r in &log[log.len() - tail..] {
        if ["POST", "PUT", "PATCH", "DELETE"].contains(&r.method.as_str())
            && !(r.method == "POST" && r.path.ends_with("reviews"))
        {
            *by_path
                .entry(format!("{} {}", r.method, r.path))
                .or_default() += 1;
        }
    }
    let mut by_path: Vec<_> = by_path.into_iter().collect();
    by_path.sort_by_key(|p| std::cmp::Reverse(p.1));
    for (p, n) in by_path.iter().take(10) {
        eprintln!("steady write: {n} x {p}");
    }
    let mut rtts = stats.rtts.lock().unwrap_or_else(|e| e.into_inner()).clone();
    rtts.sort_by(f64::total_cmp);
    let mut sizes = stats
        .sizes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    sizes.sort_by(f64::total_cmp);
    let failures = stats.failures.load(Ordering::Relaxed);
    eprintln!(
        "steady window {window:.1} s: {writes} writes, {reviews} token reviews, {beats} heartbeats ({:.0}/s), {timeouts_steady} timed out, {failures} failed in total, controller CPU {cpu_cores:.3} cores",
        beats as f64 / window
    );
    eprintln!(
        "heartbeats in the window: p50 {:.0} ms, p99 {:.0} ms; replies p50 {:.0} B, p99 {:.0} B, largest of the run {} B; {} pages, {} report resends so far",
        percentile_or_nan(&rtts, 50.0),
        percentile_or_nan(&rtts, 99.0),
        percentile_or_nan(&sizes, 50.0),
        percentile_or_nan(&sizes, 99.0),
        stats.max_reply.load(Ordering::Relaxed),
        stats.pages.load(Ordering::Relaxed),
        stats.report_resends.load(Ordering::Relaxed),
    );

    // Wakes under load: the agent hosting a random Service asks, the watch sees the scale.
    let mut latencies = Vec::new();
    let mut wake_retries = 0u64;
    let mut rng_pick: Vec<usize> = (0..cli.services).collect();
    {
        use rand::seq::SliceRandom as _;
        rng_pick.shuffle(&mut rand::rng());
    }
    for &i in rng_pick.iter().take(cli.wakes.min(cli.services)) {
        let name = service_name(i);
        let waker = i % cli.agents.max(1);
        let req = WakeRequest {
            node: node_name(waker),
            service: ServiceRef {
                namespace: NAMESPACE.into(),
                name: name.clone(),
            },
            held_connections: 1,
            applied_epoch: None,
        };
        let start = Instant::now();
        // A controller that lost its Lease under load answers 503 until it leads again:
        // the agent retries, as the real one does (the time counts in the figure).
        let reply: WakeReply = loop {
            match api.post(waker, "/v1/agents/wake", &req).await {
                Ok((reply, _)) => break reply,
                Err(e)
                    if e.to_string().contains("503")
                        && start.elapsed() < Duration::from_secs(60) =>
                {
                    wake_retries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        };
        if !reply.accepted {
            bail!("wake-up of {name} refused: {}", reply.message);
        }
        let deadline = start + Duration::from_secs(60);
        loop {
            if let Some(at) = scaled.lock().unwrap_or_else(|e| e.into_inner()).get(&name) {
                latencies.push(at.saturating_duration_since(start).as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > deadline {
                bail!("the wake-up of {name} was not scaled within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    latencies.sort_by(f64::total_cmp);
    let (rss_end, hwm_end) = memory_mib(pid)?;
    let lost_end = leadership_lost(&api.http, admin).await?;
    report_lease("the wakes", lost_after_steady, lost_end);
    fd_sampler.abort();
    let limit = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .map(|l| {
                        l.split_whitespace()
                            .skip(3)
                            .take(2)
                            .collect::<Vec<_>>()
                            .join("/")
                    })
            })
            .unwrap_or_else(|| "?".into())
    };
    eprintln!(
        "open descriptors at most: bench {} (limit soft/hard {}), controller {} (limit {})",
        fd_peaks.bench.load(Ordering::Relaxed),
        limit(std::process::id()),
        fd_peaks.controller.load(Ordering::Relaxed),
        limit(pid),
    );
    if let Ok(m) = std::fs::metadata(dir.path().join("history.redb")) {
        eprintln!(
            "history store {:.1} MiB after {:.0} s; controller CPU {:.1} s in all",
            m.len() as f64 / (1024.0 * 1024.0),
            t_adopt.elapsed().as_secs_f64(),
            cpu_seconds(pid)?
        );
    }
    eprintln!(
        "{} agents, {} Services; RSS {rss:.1} MiB after the steady window, {rss_end:.1} MiB after the wakes (peak {:.1} MiB)",
        cli.agents,
        cli.services,
        hwm.max(hwm_end)
    );

    let size = Size {
        agents: cli.agents,
        services: cli.services,
    };
    let figure = |name: &str, value: f64, decimals: usize| {
        println!("{}={value:.decimals$}", size.name(name));
    };
    // Not a figure of merit but the run's validity: any loss means every agent took the
    // whole directive set again and the controller re-adopted every policy.
    figure("controller_lease_losses", lost_end as f64, 0);
    figure("policies_at_zero_s", adopted_s, 1);
    // From the end of adoption (every agent beaten twice after it) until the status
    // writes went quiet: the values-only writes draining at their budget.
    figure("status_writes_settled_s", settled_s, 1);
    // Seconds from the controller's start until every agent's latest reply brought no
    // directive change (NaN: not within the wait's limit).
    figure(
        "directives_at_every_agent_s",
        directives_everywhere.unwrap_or(f64::NAN),
        1,
    );
    figure("controller_rss_mib", rss, 1);
    figure("controller_peak_rss_mib", hwm.max(hwm_end), 1);
    figure("controller_cpu_cores_steady", cpu_cores, 3);
    figure("api_writes_per_s_steady", writes as f64 / window, 3);
    figure("api_token_reviews_per_s_steady", reviews as f64 / window, 3);
    figure(
        "wake_to_scale_ms_p99_under_load",
        percentile_or_nan(&latencies, 99.0),
        3,
    );
    figure(
        "wake_to_scale_ms_p50_under_load",
        percentile_or_nan(&latencies, 50.0),
        3,
    );
    figure("wake_retries_503", wake_retries as f64, 0);
    figure(
        "agent_heartbeat_ms_p99_under_load",
        percentile_or_nan(&rtts, 99.0),
        3,
    );
    figure(
        "agent_heartbeat_reply_bytes_p50",
        percentile_or_nan(&sizes, 50.0),
        0,
    );
    figure(
        "agent_heartbeat_reply_bytes_p99",
        percentile_or_nan(&sizes, 99.0),
        0,
    );
    figure(
        "agent_heartbeat_resyncs",
        stats.resyncs.load(Ordering::Relaxed) as f64,
        0,
    );
    figure("agent_heartbeat_timeouts_steady", timeouts_steady as f64, 0);
    // Directive pages with more to follow taken in the steady window (0 when every
    // agent held the whole set before it opened).
    figure("agent_heartbeat_pages_steady", pages_steady as f64, 0);
    figure(
        "agent_heartbeat_ms_p50_under_load",
        percentile_or_nan(&rtts, 50.0),
        3,
    );
    figure(
        "agent_heartbeat_failures_total",
        stats.failures.load(Ordering::Relaxed) as f64,
        0,
    );
    figure(
        "agent_heartbeat_reply_bytes_max",
        stats.max_reply.load(Ordering::Relaxed) as f64,
        0,
    );
    figure(
        "agent_heartbeat_pages_total",
        stats.pages.load(Ordering::Relaxed) as f64,
        0,
    );
    figure(
        "agent_heartbeat_report_resends_total",
        stats.report_resends.load(Ordering::Relaxed) as f64,
        0,
    );
    figure(
        "bench_open_fds_max",
        fd_peaks.bench.load(Ordering::Relaxed) as f64,
        0,
    );
    figure(
        "controller_open_fds_max",
        fd_peaks.controller.load(Ordering::Relaxed) as f64,
        0,
    );

    for t in agent_tasks {
        t.abort();
    }
    drop(child);
    server.shutdown().await;
    Ok(())
}
