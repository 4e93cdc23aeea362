//! Shared set-up for the controller tests: the ScalingPolicy CRD on a test API server,
//! controllers started in-process exactly as `nemesis-controller run` starts them,
//! a test agent that heartbeats over the real HTTP API (and acknowledges directives
//! when told to), a small HTTP client, and waits that fail with what they waited for.

#![allow(dead_code, reason = "each test file uses its own subset")]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, CustomResourceExt};
use nemesis_common::wire::{
    AppliedMode, Directive, Heartbeat, HeartbeatReply, ServiceRef, ServiceReport,
};
use nemesis_controller::app::{self, Running};
use nemesis_controller::config::RunArgs;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_tests::apiserver::TestApiServer;
use serde_json::{Value, json};
use tokio_util::task::AbortOnDropHandle;

pub const ALERT_TOKEN: &str = "alertmanager-token-for-controller-tests";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "nemesis_controller=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Installs the ScalingPolicy CRD and waits until the API serves it.
pub async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &ScalingPolicy::crd())
        .await
        .context("creating the ScalingPolicy CRD")?;
    let policies: Api<ScalingPolicy> = Api::all(client.clone());
    eventually("the ScalingPolicy API", Duration::from_secs(10), || async {
        Ok(policies.list(&ListParams::default()).await.ok().map(|_| ()))
    })
    .await
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// The settings every test controller shares: loopback ports picked by the kernel,
/// short leases and ticks so a test runs in seconds, files in `dir`.
pub fn run_args(dir: &Path, extra: &[&str]) -> anyhow::Result<RunArgs> {
    let alert_token = dir.join("alert-token");
    std::fs::write(&alert_token, ALERT_TOKEN)?;
    let store = dir.join("history.redb");
    let mut args = nemesis_tests::controller_flags::argv_with_defaults(extra);
    args.extend([
        "--alertmanager-token-file".into(),
        alert_token.display().to_string(),
        "--store-path".into(),
        store.display().to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Ok(Cli::try_parse_from(args)?.run)
}

/// A controller in this process against `server`, with its files in `dir`.
pub async fn start_controller(
    server: &TestApiServer,
    dir: &Path,
    extra: &[&str],
) -> anyhow::Result<Running> {
    let args = run_args(dir, extra)?;
    let client = server.client().await?;
    let c = app::start(&args, client.clone()).await?;
    register_agent_api(c.api_addr, client);
    Ok(c)
}

// === agent identities ===

/// The API server behind each controller's agent API (by address), so test agents and
/// wake-ups can get a token of their node's own from the controller's address alone.
type Issuers = Mutex<BTreeMap<SocketAddr, (Client, BTreeMap<String, String>)>>;

fn issuers() -> &'static Issuers {
    static ISSUERS: std::sync::OnceLock<Issuers> = std::sync::OnceLock::new();
    ISSUERS.get_or_init(Default::default)
}

/// Lets [`agent_token`] mint tokens for the controller listening at `api_addr`.
pub fn register_agent_api(api_addr: SocketAddr, client: Client) {
    issuers()
        .lock()
        .unwrap()
        .insert(api_addr, (client, BTreeMap::new()));
}

/// A token as the agent of `node` has it: from a TokenRequest for the agents'
/// ServiceAccount with the controller's audience, bound to a pod scheduled to `node`
/// (made here: `nemesis-agent-<node>`), from the API server behind the controller at
/// `api_addr`. Cached per controller and node.
pub async fn agent_token(api_addr: SocketAddr, node: &str) -> anyhow::Result<String> {
    let client = {
        let map = issuers().lock().unwrap();
        let (client, tokens) = map
            .get(&api_addr)
            .with_context(|| format!("no controller registered at {api_addr}"))?;
        if let Some(t) = tokens.get(node) {
            return Ok(t.clone());
        }
        client.clone()
    };
    let token = mint_agent_token(&client, node).await?;
    if let Some((_, tokens)) = issuers().lock().unwrap().get_mut(&api_addr) {
        tokens.insert(node.to_owned(), token.clone());
    }
    Ok(token)
}

#[allow(unused_imports, reason = "each test file uses its own subset")]
pub use nemesis_tests::agent_token::{AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, mint_agent_token};

pub async fn wait_leading(c: &Running, within: Duration) -> anyhow::Result<()> {
    let mut rx = c.leading();
    tokio::time::timeout(within, rx.wait_for(|l| *l))
        .await
        .with_context(|| format!("{} did not lead within {within:?}", c.identity))??;
    Ok(())
}

/// Polls `check` every 50 ms until it yields `Some`, or fails after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    nemesis_tests::wait::eventually_every(Duration::from_millis(50), what, within, check).await
}

// === objects ===

/// A Deployment nobody runs pods for (tests without a sandbox).
pub fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "local/app"}]},
            },
        },
    }))
    .expect("valid deployment")
}

pub fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "web", "port": 80, "targetPort": "http"}],
        },
    }))
    .expect("valid service")
}

pub fn policy(name: &str, spec: Value) -> ScalingPolicy {
    serde_json::from_value(json!({
        "apiVersion": "nemesis.dev/v1alpha1",
        "kind": "ScalingPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("valid ScalingPolicy")
}

/// A policy on Deployment and Service `name` that starts at zero (0 replicas), wakes to
/// 1 on demand, and goes back to zero only when the alert `alert` fires.
pub fn zero_until_demand(name: &str, alert: &str) -> ScalingPolicy {
    policy(
        name,
        json!({
            "target": {"deployment": name, "service": name},
            "metrics": {"alerts": [alert]},
            "initialState": "zero",
            "states": [{"name": "zero", "replicas": 0}, {"name": "warm", "replicas": 1}],
            "transitions": [
                {"from": "zero", "to": "warm", "when": "demand"},
                {"from": "warm", "to": "zero", "when": format!("alert({alert})")},
            ],
        }),
    )
}

/// A policy on Deployment and Service `name`: 1 replica ("low") until more than 5
/// connections are open, then 3 ("high") until 5 or fewer are.
pub fn busy_policy(name: &str) -> ScalingPolicy {
    policy(
        name,
        json!({
            "target": {"deployment": name, "service": name},
            "initialState": "low",
            "states": [
                {"name": "low", "replicas": 1},
                {"name": "high", "replicas": 3},
            ],
            "transitions": [
                {"from": "low", "to": "high", "when": "conns.active > 5"},
                {"from": "high", "to": "low", "when": "conns.active <= 5"},
            ],
        }),
    )
}

pub async fn replicas(api: &Api<Deployment>, name: &str) -> anyhow::Result<i32> {
    Ok(api.get(name).await?.spec.replicas.unwrap_or(1))
}

pub async fn wait_replicas(
    api: &Api<Deployment>,
    name: &str,
    want: i32,
    within: Duration,
) -> anyhow::Result<Instant> {
    eventually(
        &format!("Deployment {name} at {want} replicas"),
        within,
        || async { Ok((replicas(api, name).await? == want).then(Instant::now)) },
    )
    .await
}

pub async fn wait_state(
    api: &Api<ScalingPolicy>,
    name: &str,
    state: &str,
    within: Duration,
) -> anyhow::Result<ScalingPolicy> {
    eventually(
        &format!("policy {name} in state {state}"),
        within,
        || async {
            let p = api.get(name).await?;
            let s = p.status.as_ref().and_then(|s| s.state.as_deref());
            Ok((s == Some(state)).then_some(p))
        },
    )
    .await
}

/// How most controller tests begin: a test API server with the ScalingPolicy CRD and
/// one Deployment in `default`, whose replica counts are logged from the start.
pub struct OneDeployment {
    pub server: TestApiServer,
    pub client: Client,
    pub deployments: Api<Deployment>,
    pub policies: Api<ScalingPolicy>,
    pub log: ReplicaLog,
}

impl OneDeployment {
    /// Deployment `name` at `replicas`.
    pub async fn start(name: &str, replicas: i32) -> anyhow::Result<Self> {
        let server =
            TestApiServer::start(nemesis_tests::apiserver::ApiServerOptions::default()).await?;
        let client = server.client().await?;
        install_crd(&client).await?;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
        let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), "default");
        deployments
            .create(&PostParams::default(), &deployment(name, replicas))
            .await
            .with_context(|| format!("creating Deployment {name}"))?;
        let log = ReplicaLog::start(deployments.clone(), name);
        Ok(Self {
            server,
            client,
            deployments,
            policies,
            log,
        })
    }
}

/// Every distinct `spec.replicas` a Deployment had, in order, as a watch sees them.
pub struct ReplicaLog {
    seen: Arc<Mutex<Vec<i32>>>,
    _task: AbortOnDropHandle<()>,
}

impl ReplicaLog {
    pub fn start(api: Api<Deployment>, name: &str) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let task = tokio::spawn(async move {
            use futures::StreamExt;
            use kube::runtime::WatchStreamExt;
            // With a backoff: once the API server is gone, a watcher without one retries
            // refused connects that complete without ever yielding, pinning a worker
            // so the test's runtime can never shut down (seen: hangs to the 300 s kill).
            let stream = watcher::watcher(api, cfg).default_backoff();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                if let Ok(Event::Apply(d) | Event::InitApply(d)) = ev {
                    let r = d.spec.replicas.unwrap_or(1);
                    let mut s = s2.lock().unwrap();
                    if s.last() != Some(&r) {
                        s.push(r);
                    }
                }
            }
        });
        Self {
            seen,
            _task: AbortOnDropHandle::new(task),
        }
    }

    pub fn seen(&self) -> Vec<i32> {
        self.seen.lock().unwrap().clone()
    }
}

// === HTTP ===

pub struct Http {
    client: HttpClient<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self {
            client: HttpClient::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl Http {
    /// POSTs JSON with a bearer token; returns the status and the JSON answer.
    pub async fn post(
        &self,
        addr: SocketAddr,
        path: &str,
        token: &str,
        body: &Value,
    ) -> anyhow::Result<(u16, Value)> {
        let req = http::Request::post(format!("http://{addr}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
        let resp = tokio::time::timeout(Duration::from_secs(5), self.client.request(req))
            .await
            .with_context(|| format!("POST {path} to {addr} timed out"))??;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }

    pub async fn get(&self, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
        let req = http::Request::get(format!("http://{addr}{path}")).body(Full::default())?;
        let resp = tokio::time::timeout(Duration::from_secs(5), self.client.request(req))
            .await
            .with_context(|| format!("GET {path} from {addr} timed out"))??;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// A wake-up as an agent sends it.
    pub async fn wake(
        &self,
        addr: SocketAddr,
        node: &str,
        svc: &ServiceRef,
        held: u32,
    ) -> anyhow::Result<(u16, Value)> {
        self.send_wake(addr, node, svc, held, None).await
    }

    /// [`Http::wake`] from a flight begun with directive `epoch` applied.
    pub async fn wake_applied(
        &self,
        addr: SocketAddr,
        node: &str,
        svc: &ServiceRef,
        held: u32,
        epoch: u64,
    ) -> anyhow::Result<(u16, Value)> {
        self.send_wake(addr, node, svc, held, Some(epoch)).await
    }

    async fn send_wake(
        &self,
        addr: SocketAddr,
        node: &str,
        svc: &ServiceRef,
        held: u32,
        epoch: Option<u64>,
    ) -> anyhow::Result<(u16, Value)> {
        let token = agent_token(addr, node).await?;
        let mut body = json!({"node": node, "service": svc, "heldConnections": held});
        if let Some(e) = epoch {
            body["appliedEpoch"] = json!(e);
        }
        self.post(addr, "/v1/agents/wake", &token, &body).await
    }
}

/// Posts an Alertmanager webhook to the controller, as Alertmanager does.
pub async fn post_alert(api: SocketAddr, alert: &str, firing: bool) -> anyhow::Result<()> {
    let body = nemesis_tests::alertmanager_payload::webhook(alert, firing);
    let (code, answer) = Http::default()
        .post(api, "/v1/alerts/alertmanager", ALERT_TOKEN, &body)
        .await?;
    anyhow::ensure!(
        code == 200,
        "the controller refused the alert: {code} {answer}"
    );
    Ok(())
}

/// The value of one sample line of an OpenMetrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

pub async fn scrape(c: &Running, series: &str) -> anyhow::Result<f64> {
    let (_, text) = Http::default().get(c.admin_addr, "/metrics").await?;
    metric(&text, series).with_context(|| format!("no {series} in /metrics"))
}

// === a test agent ===

/// What a test agent reports and does; tests change it while it runs.
#[derive(Debug, Clone)]
pub struct AgentState {
    pub open: u64,
    pub held: u64,
    /// Connections taken into hold since the agent started.
    pub holds: u64,
    /// The Service is in hold mode (at zero, or asked to sleep).
    pub holding: bool,
    pub connects: u64,
    /// Apply (acknowledge) directives; `false` plays an agent stuck before applying.
    pub ack: bool,
    /// Heartbeat at all (`false`: the agent died).
    pub alive: bool,
    /// Epoch applied per Service.
    pub applied: BTreeMap<ServiceRef, u64>,
    /// Every directive applied: (epoch, directive, when the heartbeat reporting it left).
    pub acks: Vec<(u64, Directive, Instant)>,
    /// Acknowledged but not yet reported.
    pending: Vec<(u64, Directive)>,
}

/// An agent that heartbeats to every controller in `targets` every 100 ms over HTTP.
pub struct TestAgent {
    pub node: String,
    pub state: Arc<Mutex<AgentState>>,
    pub targets: Arc<Mutex<Vec<SocketAddr>>>,
    _task: AbortOnDropHandle<()>,
}

impl TestAgent {
    pub fn start(node: &str, services: Vec<ServiceRef>, targets: Vec<SocketAddr>) -> Self {
        let state = Arc::new(Mutex::new(AgentState {
            open: 0,
            held: 0,
            holds: 0,
            holding: false,
            connects: 0,
            ack: true,
            alive: true,
            applied: BTreeMap::new(),
            acks: Vec::new(),
            pending: Vec::new(),
        }));
        let targets = Arc::new(Mutex::new(targets));
        let task = tokio::spawn(heartbeats(
            node.to_string(),
            format!("{node}-{:08x}", rand::random::<u32>()),
            services,
            state.clone(),
            targets.clone(),
        ));
        Self {
            node: node.to_string(),
            state,
            targets,
            _task: AbortOnDropHandle::new(task),
        }
    }

    pub fn set(&self, f: impl FnOnce(&mut AgentState)) {
        f(&mut self.state.lock().unwrap());
    }

    pub fn snapshot(&self) -> AgentState {
        self.state.lock().unwrap().clone()
    }
}

async fn heartbeats(
    node: String,
    instance: String,
    services: Vec<ServiceRef>,
    state: Arc<Mutex<AgentState>>,
    targets: Arc<Mutex<Vec<SocketAddr>>>,
) {
    let http = Http::default();
    loop {
        let beat = {
            let mut st = state.lock().unwrap();
            if !st.alive {
                None
            } else {
                let reports: Vec<ServiceReport> = services
                    .iter()
                    .map(|s| ServiceReport {
                        service: s.clone(),
                        mode: if st.holding {
                            AppliedMode::Hold
                        } else {
                            AppliedMode::Passthrough
                        },
                        applied_epoch: st.applied.get(s).copied().unwrap_or(0),
                        connects_total: st.connects,
                        open_connections: st.open,
                        closed_total: 0,
                        held_connections: st.held,
                        accepted_total: 0,
                        accepted_open: 0,
                        hold_ports: vec![],
                        holds_total: st.holds,
                        holds_refused_total: 0,
                        proxy_errors: Default::default(),
                    })
                    .collect();
                let reported = std::mem::take(&mut st.pending);
                let hb = Heartbeat {
                    node: node.clone(),
                    instance: instance.clone(),
                    services: reports,
                    addresses: vec![],
                    ready: true,
                    directives_cursor: None,
                    pages: false,
                    reports_seq: None,
                    reports_since: None,
                    gone: vec![],
                };
                Some((
                    serde_json::to_value(hb).expect("heartbeat serializes"),
                    reported,
                ))
            }
        };
        let Some((body, reported)) = beat else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let now = Instant::now();
        if !reported.is_empty() {
            let mut st = state.lock().unwrap();
            st.acks
                .extend(reported.into_iter().map(|(e, d)| (e, d, now)));
        }
        let addrs = targets.lock().unwrap().clone();
        for addr in addrs {
            let Ok(token) = agent_token(addr, &node).await else {
                continue;
            };
            let Ok((200, reply)) = http.post(addr, "/v1/agents/heartbeat", &token, &body).await
            else {
                continue;
            };
            let Ok(reply) = serde_json::from_value::<HeartbeatReply>(reply) else {
                continue;
            };
            let mut st = state.lock().unwrap();
            if !st.ack {
                continue;
            }
            for d in reply.directives {
                if !services.contains(&d.service) {
                    continue;
                }
                let applied = st.applied.entry(d.service.clone()).or_insert(0);
                if d.epoch > *applied {
                    *applied = d.epoch;
                    st.pending.push((d.epoch, d.directive));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// === real monitoring processes ===

/// Kills (SIGKILL) and reaps the child when dropped, so a failing test leaves nothing.
pub struct ChildGuard {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl ChildGuard {
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Debian's Prometheus scraping `target` every second, its TSDB in `dir` (kept across
/// restarts), on a fresh loopback port.
pub async fn start_prometheus(
    dir: &std::path::Path,
    target: std::net::SocketAddr,
) -> anyhow::Result<(ChildGuard, std::net::SocketAddr)> {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n- job_name: exporter\n  static_configs:\n  - targets: ['{target}']\n"
        ),
    )?;
    let port = free_port()?;
    start_monitoring_process(
        "/usr/bin/prometheus",
        "prometheus",
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ],
        dir,
        "prometheus",
        port,
    )
    .await
}

/// Starts `program` with `args` (stderr to `dir/<name>.log`) and waits until
/// `GET /-/ready` on `port` answers 200.
pub async fn start_monitoring_process(
    program: &str,
    package: &str,
    args: &[String],
    dir: &Path,
    name: &str,
    port: u16,
) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let log = dir.join(format!("{name}.log"));
    let child = std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {program} (Debian package `{package}`)"))?;
    let mut guard = ChildGuard { child, log };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let http = Http::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = http.get(addr, "/-/ready").await {
            return Ok((guard, addr));
        }
        if let Some(status) = guard.child.try_wait()? {
            bail!("{name} exited with {status}:\n{}", guard.log_tail());
        }
        if Instant::now() > deadline {
            bail!("{name} not ready after 30 s:\n{}", guard.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
