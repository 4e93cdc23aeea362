//! Shared set-up of the wake end-to-end tests: a test API server with the ScalingPolicy
//! CRD (from `manifests/crd/`), a sandbox node with its kube-proxy stand-in, a Deployment
//! at zero with its Service and policy, the real agent in-process (real eBPF attached to
//! a child cgroup of the test's own, on a scratch bpffs), and a small HTTP server that
//! plays the controller: it checks the bearer token, counts wake-ups and scales the
//! Deployment through `/scale` on the first one. Clients are processes moved into the
//! test's cgroup before they connect (`nemesis-test-client`).
//! [`WakeEnv::start_with`] can instead start the real controller in-process (as
//! `nemesis-controller run` does) and point the agent at it, with a long-form policy.

#![allow(dead_code, reason = "each test file uses its own subset")]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use nemesis_agent::agent::Agent;
use nemesis_agent::config::{Cli, Command};
use nemesis_agent::ebpf::cgroup::ChildCgroup;
use nemesis_agent::ebpf::pins::ScratchBpffs;
use nemesis_agent::ebpf::{Mode, Proto, prereq};
use nemesis_agent::services::scaling_policy_resource;
use nemesis_common::wire::{
    Heartbeat, HeartbeatReply, ServiceDirective, ServiceReport, WakeReply, WakeRequest,
};
use nemesis_controller::app::Running;
use nemesis_controller::config::RunArgs;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::demo::apply::{Manifest, apply_all, read_manifests};
use nemesis_tests::demo::cluster_ip::{cluster_ip, cluster_ip_v6};
use nemesis_tests::kubelet::{Sandbox, SandboxOptions};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const SERVER: &str = env!("CARGO_BIN_EXE_nemesis-pod-server");
pub const CLIENT: &str = env!("CARGO_BIN_EXE_nemesis-test-client");
pub const UDP_CLIENT: &str = env!("CARGO_BIN_EXE_nemesis-udp-client");
pub const TOKEN: &str = "wake-test-agent-token";
/// What the real controller (see [`Options::real_controller`]) wants from Alertmanager.
pub const ALERT_TOKEN: &str = "wake-test-alertmanager-token";
pub const NS: &str = "shop";
pub const APP: &str = "web";
pub const POD_PORT: u16 = 8080;
pub const SERVICE_PORT: u16 = 80;
/// The slow starter of issue 4: its process starts 2 s after the pod.
pub const START_DELAY_MS: u64 = 2000;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "nemesis_agent=info,nemesis_tests=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 20 ms until it yields `Some`, or fails after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    nemesis_tests::wait::eventually_every(Duration::from_millis(20), what, within, check).await
}

// === the pod and its manifests ===

/// The pod server with an HTTP readiness probe probed every `probe_period_ms`, run
/// with `--port POD_PORT` and `extra_args`.
pub fn pod_server(probe_period_ms: u64, extra_args: &[&str]) -> Value {
    let mut args = vec!["--port".to_owned(), POD_PORT.to_string()];
    args.extend(extra_args.iter().map(|a| a.to_string()));
    json!({
        "annotations": {"nemesis.test/probe-period-ms": probe_period_ms.to_string()},
        "container": {
            "name": "server",
            "image": "local/nemesis-pod-server",
            "command": [SERVER],
            "args": args,
            "ports": [{"name": "http", "containerPort": POD_PORT}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        }
    })
}

/// The pod server, ready as soon as it listens (probed every 100 ms).
pub fn quick_server() -> Value {
    pod_server(100, &[])
}

/// The pod server, starting [`START_DELAY_MS`] after its pod (probed every 100 ms).
pub fn slow_server() -> Value {
    let mut pod = pod_server(100, &[]);
    pod["annotations"]["nemesis.test/start-delay-ms"] = json!(START_DELAY_MS.to_string());
    pod
}

/// A pod that says it is ready before its server listens: the probe (`exec true`)
/// passes at once, the server starts `listen_after_ms` later.
pub fn ready_before_listening(listen_after_ms: u64) -> Value {
    let script = format!(
        "sleep {}; exec {SERVER} --port {POD_PORT}",
        listen_after_ms as f64 / 1000.0
    );
    json!({
        "annotations": {"nemesis.test/probe-period-ms": "100"},
        "container": {
            "name": "server",
            "image": "local/nemesis-pod-server",
            "command": ["sh", "-c", script],
            "ports": [{"name": "http", "containerPort": POD_PORT}],
            "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1},
        }
    })
}

fn deployment(pod: &Value) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": APP, "namespace": NS},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": APP}},
            "template": {
                "metadata": {"labels": {"app": APP}, "annotations": pod["annotations"]},
                "spec": {
                    // 1 s unless the pod says otherwise (a pod that must outlive
                    // its Service's endpoints for a while).
                    "terminationGracePeriodSeconds": pod.get("terminationGracePeriodSeconds").cloned().unwrap_or(json!(1)),
                    "containers": [pod["container"]],
                },
            },
        },
    }))?)
}

/// [`deployment`]'s pods, kept by a StatefulSet (its pods `web-0`, `web-1`, ...).
fn stateful_set(pod: &Value) -> anyhow::Result<StatefulSet> {
    let mut v = serde_json::to_value(deployment(pod)?)?;
    v["spec"]["serviceName"] = json!(APP);
    v["kind"] = json!("StatefulSet");
    Ok(serde_json::from_value(v)?)
}

/// The test Service's IP families.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Families {
    /// IPv4 only (what a Service gets when it says nothing).
    #[default]
    V4,
    /// IPv6 only (`ipFamilies: [IPv6]`).
    V6,
    /// Both, IPv4 first (`ipFamilyPolicy: RequireDualStack`).
    Dual,
}

fn service(
    families: Families,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    udp: Option<UdpPort>,
) -> anyhow::Result<Service> {
    let (ips, policy, names) = match families {
        Families::V4 => (vec![v4.to_string()], "SingleStack", vec!["IPv4"]),
        Families::V6 => (vec![v6.to_string()], "SingleStack", vec!["IPv6"]),
        Families::Dual => (
            vec![v4.to_string(), v6.to_string()],
            "RequireDualStack",
            vec!["IPv4", "IPv6"],
        ),
    };
    let mut ports = vec![json!({"name": "http", "port": SERVICE_PORT, "targetPort": "http"})];
    if let Some(udp) = udp {
        ports.push(json!({"name": "dns", "port": udp.port, "targetPort": udp.target_port, "protocol": "UDP"}));
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": APP, "namespace": NS},
        "spec": {
            "clusterIP": ips[0],
            "clusterIPs": ips,
            "ipFamilyPolicy": policy,
            "ipFamilies": names,
            "selector": {"app": APP},
            "ports": ports,
        },
    }))?)
}

async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crd/scalingpolicy.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let crd: CustomResourceDefinition =
        serde_norway::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &crd)
        .await
        .context("creating the ScalingPolicy CRD")?;
    let policies: Api<DynamicObject> = Api::all_with(client.clone(), &scaling_policy_resource());
    eventually("the ScalingPolicy API", Duration::from_secs(10), || async {
        Ok(policies.list(&ListParams::default()).await.ok().map(|_| ()))
    })
    .await
}

// === the controller, played by the test ===

/// A real HTTP server with the controller's agent API: wake-ups are counted and the
/// first one scales the Deployment to 1 (when `scale_on_wake`); heartbeats are kept.
pub struct TestController {
    pub url: String,
    /// Wake-up requests with the right token.
    pub wakes: Arc<AtomicUsize>,
    pub unauthorised: Arc<AtomicUsize>,
    pub last_wake: Arc<Mutex<Option<WakeRequest>>>,
    pub last_heartbeat: Arc<Mutex<Option<Heartbeat>>>,
    pub scale_on_wake: Arc<AtomicBool>,
    /// What every heartbeat is answered with.
    pub directives: Arc<Mutex<Vec<ServiceDirective>>>,
    /// Balance mode's load reports, summed by the real controller's board.
    pub loads: Arc<nemesis_controller::agents::LoadBoard>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestController {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct ControllerState {
    client: Client,
    wakes: Arc<AtomicUsize>,
    unauthorised: Arc<AtomicUsize>,
    last_wake: Arc<Mutex<Option<WakeRequest>>>,
    last_heartbeat: Arc<Mutex<Option<Heartbeat>>>,
    scale_on_wake: Arc<AtomicBool>,
    directives: Arc<Mutex<Vec<ServiceDirective>>>,
    loads: Arc<nemesis_controller::agents::LoadBoard>,
}

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    r
}

async fn controller_call(
    state: ControllerState,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let authorised = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {TOKEN}").as_str());
    let path = req.uri().path().to_string();
    let post = req.method() == hyper::Method::POST;
    let body = req.into_body().collect().await?.to_bytes();
    if !authorised {
        state.unauthorised.fetch_add(1, Ordering::SeqCst);
        return Ok(reply(
            StatusCode::UNAUTHORIZED,
            b"{\"error\":\"bad token\"}".to_vec(),
        ));
    }
    Ok(match (post, path.as_str()) {
        (true, "/v1/agents/wake") => match serde_json::from_slice::<WakeRequest>(&body) {
            Ok(w) => {
                *state.last_wake.lock().expect("lock") = Some(w);
                let n = state.wakes.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 && state.scale_on_wake.load(Ordering::SeqCst) {
                    let deployments: Api<Deployment> = Api::namespaced(state.client.clone(), NS);
                    let scaled = tokio::time::timeout(
                        Duration::from_secs(5),
                        deployments.patch_scale(
                            APP,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"spec": {"replicas": 1}})),
                        ),
                    )
                    .await;
                    if !matches!(scaled, Ok(Ok(_))) {
                        return Ok(reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("{{\"error\":\"scaling failed: {scaled:?}\"}}").into_bytes(),
                        ));
                    }
                }
                let r = WakeReply {
                    accepted: true,
                    message: "waking".into(),
                };
                reply(StatusCode::OK, serde_json::to_vec(&r).expect("json"))
            }
            Err(e) => reply(StatusCode::BAD_REQUEST, e.to_string().into_bytes()),
        },
        (true, "/v1/agents/heartbeat") => match serde_json::from_slice::<Heartbeat>(&body) {
            Ok(h) => {
                *state.last_heartbeat.lock().expect("lock") = Some(h);
                let r = HeartbeatReply {
                    directives: state.directives.lock().expect("lock").clone(),
                    lease_seconds: 10,
                    cursor: None,
                    delta: false,
                    removed: vec![],
                    more: false,
                    reports_seq: None,
                };
                reply(StatusCode::OK, serde_json::to_vec(&r).expect("json"))
            }
            Err(e) => reply(StatusCode::BAD_REQUEST, e.to_string().into_bytes()),
        },
        (true, "/v1/agents/loads") => {
            match serde_json::from_slice::<nemesis_common::wire::LoadReport>(&body) {
                Ok(report) => {
                    let r = state.loads.report(report, tokio::time::Instant::now());
                    reply(StatusCode::OK, serde_json::to_vec(&r).expect("json"))
                }
                Err(e) => reply(StatusCode::BAD_REQUEST, e.to_string().into_bytes()),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            b"{\"error\":\"no such route\"}".to_vec(),
        ),
    })
}

impl TestController {
    pub async fn start(client: Client, scale_on_wake: bool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = ControllerState {
            client,
            wakes: Arc::default(),
            unauthorised: Arc::default(),
            last_wake: Arc::default(),
            last_heartbeat: Arc::default(),
            scale_on_wake: Arc::new(AtomicBool::new(scale_on_wake)),
            directives: Arc::default(),
            loads: Arc::default(),
        };
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| controller_call(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            url,
            wakes: state.wakes,
            unauthorised: state.unauthorised,
            last_wake: state.last_wake,
            last_heartbeat: state.last_heartbeat,
            scale_on_wake: state.scale_on_wake,
            directives: state.directives,
            loads: state.loads,
            task,
        })
    }

    pub fn wakes(&self) -> usize {
        self.wakes.load(Ordering::SeqCst)
    }

    /// The test Service's report in the last heartbeat.
    pub fn report(&self) -> Option<ServiceReport> {
        let hb = self.last_heartbeat.lock().expect("lock").clone()?;
        hb.services
            .into_iter()
            .find(|s| s.service.namespace == NS && s.service.name == APP)
    }
}

// === the environment ===

/// How a test wants its world.
pub struct Scenario {
    /// Short and unique per test: names the cgroup, the pin instance and the bpffs.
    pub name: &'static str,
    /// [`slow_server`] or [`ready_before_listening`].
    pub pod: Value,
    /// Extra `spec` fields of the ScalingPolicy (hold bounds).
    pub policy: Value,
    /// Whether the first wake-up scales the Deployment to 1.
    pub scale_on_wake: bool,
}

/// What a test may want beyond [`Scenario`]; the default is [`WakeEnv::start`]'s world.
#[derive(Debug, Default)]
pub struct Options {
    /// The whole ScalingPolicy `spec` (a long-form automaton), instead of the short
    /// form extended by [`Scenario::policy`].
    pub policy_spec: Option<Value>,
    /// Start the real controller in-process (extra `nemesis-controller run` flags) and
    /// point the agent at it; the stand-in [`TestController`] still runs but is never
    /// called, and `scale_on_wake` means nothing.
    pub real_controller: Option<Vec<String>>,
    /// Run the agent and the real controller as their ServiceAccounts, with exactly the
    /// rules of `manifests/base/rbac.yaml` once this edit (which may remove one) is made.
    pub rbac: Option<RbacEdit>,
    /// Return once everything is started, without waiting for the agent to be ready
    /// (a test that expects it never to be).
    pub skip_ready_wait: bool,
    /// The sandbox's Deployment controller acts this long after a change
    /// ([`SandboxOptions::rollout_lag`]).
    pub rollout_lag: Duration,
    /// The app is a StatefulSet (named [`APP`], at zero) instead of a Deployment; the
    /// policy must then target it (`{kind: StatefulSet, name: APP}`).
    pub stateful_set: bool,
    /// The Service's IP families (ClusterIPs from the sandbox's blocks of each).
    pub families: Families,
    /// A UDP port of the Service too (named `dns`), beside its TCP `http` port.
    pub udp_port: Option<UdpPort>,
    /// The sandbox node's zone (its Node's `topology.kubernetes.io/zone` label, there
    /// before the agent starts and reads it).
    pub node_zone: Option<String>,
}

/// A UDP Service port and the numeric port it reaches on the pods.
#[derive(Debug, Clone, Copy)]
pub struct UdpPort {
    pub port: u16,
    pub target_port: u16,
}

/// Changes the objects of `manifests/base/rbac.yaml` before they are applied.
pub type RbacEdit = fn(&mut [Manifest]);

/// The namespace of the install, where its ServiceAccounts and Lease live.
pub const SYSTEM_NS: &str = "nemesis-system";

/// Applies the install's namespace and RBAC (edited) with the admin `client`, and
/// returns clients for the agent's and the controller's ServiceAccounts.
async fn install_rbac(
    server: &TestApiServer,
    client: &Client,
    edit: RbacEdit,
) -> anyhow::Result<(Client, Client)> {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base");
    let mut manifests = read_manifests(&[base.join("namespace.yaml"), base.join("rbac.yaml")])?;
    edit(&mut manifests);
    apply_all(client, &manifests)
        .await
        .context("applying manifests/base/rbac.yaml")?;
    let as_sa = |name: &str| -> anyhow::Result<String> {
        Ok(server.service_account_token(SYSTEM_NS, name)?)
    };
    Ok((
        server.client_with_token(&as_sa("nemesis-agent")?).await?,
        server
            .client_with_token(&as_sa("nemesis-controller")?)
            .await?,
    ))
}

/// An [`RbacEdit`] helper: removes from `role` (a ClusterRole or Role of the install)
/// the rule for `resource`, and fails the test when there is none.
pub fn remove_rule(manifests: &mut [Manifest], role: &str, resource: &str) {
    let m = manifests
        .iter_mut()
        .find(|m| {
            matches!(m.kind(), "ClusterRole" | "Role")
                && m.object.metadata.name.as_deref() == Some(role)
        })
        .unwrap_or_else(|| panic!("no role {role} in manifests/base/rbac.yaml"));
    let rules = m.object.data["rules"]
        .as_array_mut()
        .expect("a role has rules");
    let before = rules.len();
    rules.retain(|r| {
        !r["resources"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == resource))
    });
    assert_eq!(
        before - 1,
        rules.len(),
        "{role} has one rule for {resource}"
    );
}

pub struct WakeEnv {
    pub server: Option<TestApiServer>,
    pub client: Client,
    pub sandbox: Option<Sandbox>,
    pub controller: TestController,
    /// The real controller, when [`Options::real_controller`] asked for it.
    pub real: Option<Running>,
    pub agent: Option<Agent>,
    cgroup: Option<ChildCgroup>,
    bpffs: Option<ScratchBpffs>,
    /// `ClusterIP:80` of the Service (its first ClusterIP: the IPv6 one of an IPv6-only
    /// Service).
    pub service_addr: SocketAddr,
    /// `[IPv6 ClusterIP]:80` of an IPv6 or dual-stack Service.
    pub service_addr_v6: Option<SocketAddr>,
    /// The agent's command line, for a restart.
    agent_argv: Vec<String>,
    /// The client the agent runs with (the admin's, or its ServiceAccount's).
    agent_client: Client,
    _dir: tempfile::TempDir,
}

impl WakeEnv {
    pub async fn start(sc: Scenario) -> anyhow::Result<Self> {
        Self::start_with(sc, Options::default()).await
    }

    pub async fn start_with(sc: Scenario, opts: Options) -> anyhow::Result<Self> {
        Self::start_with_agent_flags(sc, opts, &[]).await
    }

    /// As [`Self::start_with`], with `agent_flags` set (or replaced) on the agent's
    /// command line, e.g. `("--direct-mode", "balance")`.
    pub async fn start_with_agent_flags(
        sc: Scenario,
        opts: Options,
        agent_flags: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        init_tracing();
        let unique = format!("{}-{}", sc.name, std::process::id());
        let server = TestApiServer::start(ApiServerOptions::default()).await?;
        let client = server.client().await?;
        install_crd(&client).await?;
        if opts.real_controller.is_some() {
            // Before the controller starts, so its AlertRule watch lists at once.
            nemesis_tests::crds::install_alert_rule_crd(&client).await?;
        }
        let (agent_client, controller_client) = match opts.rbac {
            Some(edit) => install_rbac(&server, &client, edit).await?,
            None => (client.clone(), client.clone()),
        };
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
            )
            .await
            .context("creating the namespace")?;
        // The agent's cgroup first: the sandbox's pods run in it, as a node's pods sit
        // under the cgroup2 root where a DaemonSet agent attaches, so the server-side
        // hooks see what they accept.
        let mounts = std::fs::read_to_string("/proc/mounts")?;
        let root = prereq::cgroup2_mount(&mounts).context("a cgroup2 mount (run as root)")?;
        let cg_name = format!("nemesis-wake-{unique}");
        let cgroup = ChildCgroup::create(&root, &cg_name).context("creating the test cgroup")?;
        let sandbox = Sandbox::start(
            client.clone(),
            SandboxOptions {
                service_proxy: true,
                pod_cgroup: Some(cgroup.path().to_path_buf()),
                rollout_lag: opts.rollout_lag,
                zone: opts.node_zone.clone(),
                ..SandboxOptions::default()
            },
        )
        .await?;
        let ip =
            cluster_ip(sandbox.subnet_index(), 0).context("a ClusterIP of the sandbox's block")?;
        let ip6 = cluster_ip_v6(sandbox.subnet_index(), 0)
            .context("an IPv6 ClusterIP of the sandbox's block")?;
        let service_addr_v6 =
            (opts.families != Families::V4).then(|| SocketAddr::from((ip6, SERVICE_PORT)));
        let service_addr = match opts.families {
            Families::V6 => SocketAddr::from((ip6, SERVICE_PORT)),
            Families::V4 | Families::Dual => SocketAddr::from((ip, SERVICE_PORT)),
        };
        if opts.stateful_set {
            Api::<StatefulSet>::namespaced(client.clone(), NS)
                .create(&PostParams::default(), &stateful_set(&sc.pod)?)
                .await
                .context("creating the StatefulSet")?;
        } else {
            Api::<Deployment>::namespaced(client.clone(), NS)
                .create(&PostParams::default(), &deployment(&sc.pod)?)
                .await
                .context("creating the Deployment")?;
        }
        Api::<Service>::namespaced(client.clone(), NS)
            .create(
                &PostParams::default(),
                &service(opts.families, ip, ip6, opts.udp_port)?,
            )
            .await
            .context("creating the Service")?;
        let spec = match opts.policy_spec {
            Some(spec) => spec,
            None => {
                let mut spec = json!({
                    "target": {"deployment": APP, "service": APP},
                    "minReplicas": 0,
                    "maxReplicas": 1,
                    "idleTimeout": "10m",
                });
                if let (Some(spec), Some(extra)) = (spec.as_object_mut(), sc.policy.as_object()) {
                    spec.extend(extra.clone());
                }
                spec
            }
        };
        let policy = DynamicObject::new(APP, &scaling_policy_resource())
            .within(NS)
            .data(json!({ "spec": spec }));
        Api::<DynamicObject>::namespaced_with(client.clone(), NS, &scaling_policy_resource())
            .create(&PostParams::default(), &policy)
            .await
            .context("creating the ScalingPolicy")?;

        let controller = TestController::start(client.clone(), sc.scale_on_wake).await?;
        let dir = tempfile::tempdir()?;
        let token_file = dir.path().join("agent-token");
        let real = match &opts.real_controller {
            Some(extra) => Some(start_real_controller(controller_client, dir.path(), extra).await?),
            None => None,
        };
        // The real controller reviews the agent's own token (bound to a pod of this
        // node); the test controller takes its fixed one.
        let token = match &real {
            Some(_) => {
                nemesis_tests::agent_token::mint_agent_token(&client, sandbox.node_name()).await?
            }
            None => TOKEN.to_owned(),
        };
        std::fs::write(&token_file, format!("{token}\n"))?;
        let controller_url = real.as_ref().map_or_else(
            || controller.url.clone(),
            |r| format!("http://{}", r.api_addr),
        );
        let bpffs = ScratchBpffs::mount(&cg_name).context("mounting a scratch bpffs")?;
        let argv: Vec<String> = [
            "nemesis-agent",
            "run",
            "--instance",
            &format!("w-{unique}"),
            "--cgroup",
            &cgroup.path().display().to_string(),
            "--bpffs",
            &bpffs.path().display().to_string(),
            "--proxy-v4",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--controller-url",
            &controller_url,
            "--agent-token-file",
            &token_file.display().to_string(),
            "--node-name",
            sandbox.node_name(),
            // The node's addresses as pods and other hosts reach them (its
            // status.hostIPs): where the hold EndpointSlices send callers that never
            // dial the ClusterIP, and the IPv6 one takes the IPv6 proxy listener.
            "--node-addresses",
            &format!("{},{}", sandbox.gateway(), sandbox.gateway_v6()),
            "--controller-heartbeat-interval",
            "500ms",
            "--deadman-max-age",
            "30s",
            "--shutdown-grace",
            "2s",
            "--detach-on-exit",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let argv = with_flags(&argv, agent_flags);
        let agent = start_agent(&argv, &agent_client).await?;
        let env = WakeEnv {
            server: Some(server),
            client,
            sandbox: Some(sandbox),
            controller,
            real,
            agent: Some(agent),
            cgroup: Some(cgroup),
            bpffs: Some(bpffs),
            service_addr,
            service_addr_v6,
            agent_argv: argv,
            agent_client,
            _dir: dir,
        };
        if opts.skip_ready_wait {
            return Ok(env);
        }
        env.wait_ready().await?;
        env.wait_mode(Mode::Hold).await?;
        Ok(env)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        eventually("the agent to be ready", Duration::from_secs(15), || async {
            Ok((self.http_get_admin("/readyz").await?.0 == 200).then_some(()))
        })
        .await
    }

    /// Stops the agent leaving its datapath attached and pinned, as a DaemonSet's agent
    /// does on a restart.
    pub async fn stop_agent_keeping_datapath(&mut self) -> anyhow::Result<()> {
        let mut old = self.agent.take().context("an agent to stop")?;
        old.set_detach_on_exit(false);
        old.shutdown().await.context("stopping the agent")
    }

    /// Starts a new agent with the same command line (and so the same instance), which
    /// adopts what an earlier one left pinned.
    pub async fn start_agent_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.agent.is_none(), "an agent is running");
        self.agent = Some(start_agent(&self.agent_argv, &self.agent_client).await?);
        self.wait_ready().await
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent running")
    }

    /// Waits until the Service's row in the datapath has `mode`.
    pub async fn wait_mode(&self, mode: Mode) -> anyhow::Result<()> {
        eventually(
            &format!("{} in {mode:?} mode in the datapath", self.service_addr),
            Duration::from_secs(15),
            || async {
                Ok(self
                    .agent()
                    .datapath()
                    .service(self.service_addr, Proto::Tcp)
                    .filter(|e| e.mode == mode)
                    .map(|_| ()))
            },
        )
        .await
    }

    /// `(status, body)` of a GET on the agent's admin listener.
    pub async fn http_get_admin(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.agent().admin_addr(), path).await
    }

    /// The agent's metrics, parsed.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let (status, text) = self.http_get_admin("/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(Metrics::parse(&text))
    }

    /// Starts `nemesis-test-client` with `args` (plus `--connect` to the Service), moves
    /// it into the test's cgroup, and lets it go.
    pub async fn clients(&self, args: &[&str]) -> anyhow::Result<Clients> {
        Ok(self
            .clients_together(&[args])
            .await?
            .pop()
            .expect("one set of clients"))
    }

    /// Spawns `cmd` (a `nemesis-test-client` command line, `--connect` added here) and
    /// moves it into the test's cgroup; it waits for `go` on the returned stdin, so
    /// nothing connects before the cgroup's hooks apply to it.
    fn spawn_client_in_cgroup(
        &self,
        mut cmd: tokio::process::Command,
    ) -> anyhow::Result<(tokio::process::Child, tokio::process::ChildStdin)> {
        cmd.arg("--connect").arg(self.service_addr.to_string());
        self.spawn_in_cgroup(cmd)
    }

    /// Spawns `cmd` (which waits for `go` on stdin, given on the returned handle) and
    /// moves it into the test's cgroup, stdout piped.
    pub fn spawn_in_cgroup(
        &self,
        mut cmd: tokio::process::Command,
    ) -> anyhow::Result<(tokio::process::Child, tokio::process::ChildStdin)> {
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning nemesis-test-client")?;
        let pid = child.id().context("the client's pid")?;
        self.cgroup
            .as_ref()
            .expect("cgroup")
            .add_process(pid)
            .context("moving the client into the test cgroup")?;
        let stdin = child.stdin.take().context("client stdin")?;
        Ok((child, stdin))
    }

    /// Like [`Self::clients`] for several sets, all let go at the same moment (so that a
    /// slow process start cannot put them in separate wake-up flights).
    pub async fn clients_together(&self, sets: &[&[&str]]) -> anyhow::Result<Vec<Clients>> {
        let mut ready = Vec::new();
        for args in sets {
            let mut cmd = tokio::process::Command::new(CLIENT);
            cmd.args(*args);
            ready.push(self.spawn_client_in_cgroup(cmd)?);
        }
        let mut out = Vec::new();
        for (child, mut stdin) in ready {
            stdin.write_all(b"go\n").await?;
            drop(stdin);
            out.push(Clients { child });
        }
        Ok(out)
    }

    /// Starts `nemesis-test-client` in repeating mode (`args` must include `--every-ms`)
    /// in the test's cgroup; it connects until [`RepeatingClients::stop`].
    pub async fn repeating_clients(&self, args: &[&str]) -> anyhow::Result<RepeatingClients> {
        let mut cmd = tokio::process::Command::new(CLIENT);
        cmd.args(args);
        let (child, mut stdin) = self.spawn_client_in_cgroup(cmd)?;
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
        Ok(RepeatingClients {
            clients: Clients { child },
            stdin,
        })
    }

    /// Starts `nemesis-test-client` in repeating mode (`args` include `--every-ms` and
    /// their own `--connect`) inside network namespace `netns`, as a process of the
    /// test's own cgroup (not the intercepted one): a caller no connect() hook of the
    /// agent sees, such as an Ingress controller's pod. It connects until
    /// [`RepeatingClients::stop`] or one of its bounds.
    pub async fn outside_repeating_clients(
        &self,
        netns: &str,
        args: &[&str],
    ) -> anyhow::Result<RepeatingClients> {
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", netns, CLIENT])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning nemesis-test-client in a namespace")?;
        let mut stdin = child.stdin.take().context("client stdin")?;
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
        Ok(RepeatingClients {
            clients: Clients { child },
            stdin,
        })
    }

    pub fn sandbox(&self) -> &Sandbox {
        self.sandbox.as_ref().expect("the sandbox runs")
    }

    /// Runs clients to completion (bounded by `within`) and returns their results.
    pub async fn run_clients(
        &self,
        args: &[&str],
        within: Duration,
    ) -> anyhow::Result<Vec<ClientResult>> {
        self.clients(args).await?.finish(within).await
    }

    /// Pod name of the Deployment's pod, once there is one.
    pub async fn pod_names(&self) -> anyhow::Result<Vec<String>> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), NS);
        Ok(pods
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect())
    }

    /// The pod IPs of the test's pods (from their status).
    pub async fn pod_ips(&self) -> anyhow::Result<Vec<std::net::IpAddr>> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), NS);
        Ok(pods
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.status?.pod_ip?.parse().ok())
            .collect())
    }

    /// Stops the agent (detaching its programs), the sandbox and the API server, then
    /// removes the cgroup and the scratch bpffs.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(real) = self.real.take() {
            real.shutdown().await;
        }
        if let Some(agent) = self.agent.take() {
            agent.shutdown().await.context("stopping the agent")?;
        }
        if let Some(sandbox) = self.sandbox.take() {
            sandbox.shutdown().await.context("stopping the sandbox")?;
        }
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        if let Some(cg) = self.cgroup.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !cg.processes().unwrap_or_default().is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            cg.remove().context("removing the test cgroup")?;
        }
        drop(self.bpffs.take());
        Ok(())
    }
}

#[derive(clap::Parser)]
struct ControllerCli {
    #[command(flatten)]
    run: RunArgs,
}

/// The real controller against `server` (agents authenticate with their own
/// ServiceAccount tokens), with its alert token and history in `dir`, loopback ports picked by the kernel, and ticks and
/// leases short enough for a test; waits until it leads.
async fn start_real_controller(
    client: Client,
    dir: &Path,
    extra: &[String],
) -> anyhow::Result<Running> {
    let alert_token = dir.join("alert-token");
    std::fs::write(&alert_token, ALERT_TOKEN)?;
    let mut args = nemesis_tests::controller_flags::argv_with_defaults(extra);
    for (flag, path) in [
        ("--alertmanager-token-file", alert_token),
        ("--store-path", dir.join("history.redb")),
    ] {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    args.extend(extra.iter().cloned());
    let run = ControllerCli::try_parse_from(args)?.run;
    let running = nemesis_controller::app::start(&run, client)
        .await
        .context("starting the real controller")?;
    let mut leading = running.leading();
    tokio::time::timeout(Duration::from_secs(10), leading.wait_for(|l| *l))
        .await
        .context("the real controller did not lead within 10 s")??;
    Ok(running)
}

async fn start_agent(argv: &[String], client: &Client) -> anyhow::Result<Agent> {
    let Command::Run(args) = Cli::try_parse_from(argv)?.command else {
        bail!("expected the run command");
    };
    Ok(Agent::start(&args, client.clone()).await?)
}

/// Posts an Alertmanager (payload version 4) notification for `alert` to the real
/// controller's receiver, as Alertmanager's webhook would.
pub async fn post_alert(env: &WakeEnv, alert: &str, firing: bool) -> anyhow::Result<()> {
    let addr = env.real.as_ref().context("the real controller")?.api_addr;
    post_alert_to(addr, alert, firing).await
}

/// [`post_alert`] to the controller API at `addr` (one outside the [`WakeEnv`]).
pub async fn post_alert_to(addr: SocketAddr, alert: &str, firing: bool) -> anyhow::Result<()> {
    let body = nemesis_tests::alertmanager_payload::webhook(alert, firing).to_string();
    let status = if firing { "firing" } else { "resolved" };
    let run = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!(
                "POST /v1/alerts/alertmanager HTTP/1.1\r\nHost: {addr}\r\n\
                 Authorization: Bearer {ALERT_TOKEN}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok::<_, anyhow::Error>(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .context("posting the alert timed out")??;
    anyhow::ensure!(
        text.starts_with("HTTP/1.1 200"),
        "the controller refused the {status} alert: {text}"
    );
    Ok(())
}

// === clients ===

/// A running `nemesis-test-client`.
pub struct Clients {
    child: tokio::process::Child,
}

impl Clients {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn finish(self, within: Duration) -> anyhow::Result<Vec<ClientResult>> {
        let out = tokio::time::timeout(within, self.child.wait_with_output())
            .await
            .with_context(|| format!("the clients did not finish within {within:?}"))??;
        anyhow::ensure!(
            out.status.success(),
            "nemesis-test-client failed: {}",
            out.status
        );
        let mut results: Vec<ClientResult> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .context("parsing the clients' results")?;
        results.sort_by_key(|r| r.client);
        Ok(results)
    }
}

/// A `nemesis-test-client --every-ms` run: it keeps starting clients until stopped.
pub struct RepeatingClients {
    clients: Clients,
    stdin: tokio::process::ChildStdin,
}

impl RepeatingClients {
    /// Tells it to start no more clients, and waits (bounded by `within`) for the results
    /// of all it started.
    pub async fn stop(mut self, within: Duration) -> anyhow::Result<Vec<ClientResult>> {
        // A client that already stopped by a bound has closed its stdin: that is fine.
        let _ = self.stdin.write_all(b"stop\n").await;
        drop(self.stdin);
        self.clients.finish(within).await
    }

    /// Waits (bounded by `within`) until it stops by its own bounds (`--max-connections`,
    /// `--for-ms`) and for the results of all it started.
    pub async fn finish(self, within: Duration) -> anyhow::Result<Vec<ClientResult>> {
        let results = self.clients.finish(within).await;
        drop(self.stdin);
        results
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClientResult {
    pub client: usize,
    /// `response`, `error` or `gave_up`.
    pub result: String,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub error_kind: String,
    pub ms: u64,
    /// When it started, from `go` (milliseconds).
    #[serde(default)]
    pub started_ms: u64,
    /// `--keep-alive` / `--h2`: the response's status and `connection` header, and the
    /// client's end of the connection that carried it.
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub connection: Option<String>,
    #[serde(default)]
    pub local: Option<String>,
}

/// An HTTP/1.1 response, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl ClientResult {
    /// The response as HTTP, or why it is not one.
    pub fn http(&self) -> anyhow::Result<HttpResponse> {
        if self.result != "response" {
            bail!(
                "client {} got no response: {} {}",
                self.client,
                self.result,
                self.error
            );
        }
        parse_http(&self.text).with_context(|| format!("client {}: {:?}", self.client, self.text))
    }
}

pub fn parse_http(text: &str) -> anyhow::Result<HttpResponse> {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of the header")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().context("no status line")?;
    let mut parts = status_line.splitn(3, ' ');
    anyhow::ensure!(
        parts.next() == Some("HTTP/1.1"),
        "not an HTTP/1.1 status line: {status_line:?}"
    );
    let status: u16 = parts.next().context("no status code")?.parse()?;
    let mut headers = BTreeMap::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .with_context(|| format!("bad header {line:?}"))?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    if let Some(len) = headers.get("content-length") {
        let len: usize = len.parse()?;
        anyhow::ensure!(
            len == body.len(),
            "content-length {len} but {} body bytes",
            body.len()
        );
    }
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

// === small HTTP and metrics helpers ===

pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let run = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        let r = parse_http_lenient(&text)?;
        Ok::<_, anyhow::Error>(r)
    };
    // Generous: on a loaded machine a request through nginx to a pod took over 5 s.
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out after 30 s"))?
}

/// Status and body, de-chunking a chunked body (axum streams `/metrics`).
fn parse_http_lenient(text: &str) -> anyhow::Result<(u16, String)> {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of the header")?;
    let status: u16 = head.split(' ').nth(1).context("no status code")?.parse()?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if !chunked {
        return Ok((status, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").context("bad chunk")?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    Ok((status, out))
}

/// Samples of a Prometheus text exposition: `name{labels}` -> value.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                if let Some((k, v)) = pair.split_once('=') {
                    map.insert(k.to_string(), v.trim_matches('"').to_string());
                }
            }
            samples.push((name.to_string(), map, value));
        }
        Metrics { samples }
    }

    /// Sum of the samples of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Held connections of the test's Service.
    pub fn held(&self) -> f64 {
        self.sum(
            "nemesis_agent_proxy_held_connections",
            &[("namespace", NS), ("service", APP)],
        )
    }

    pub fn outcome(&self, outcome: &str) -> f64 {
        self.sum(
            "nemesis_agent_proxy_outcomes_total",
            &[("outcome", outcome)],
        )
    }

    /// Connections the proxy accepted and let go of, whatever the outcome.
    pub fn proxy_outcomes(&self) -> f64 {
        self.sum("nemesis_agent_proxy_outcomes_total", &[])
    }

    pub fn proxy_open(&self) -> f64 {
        self.sum("nemesis_agent_proxy_open_connections", &[])
    }

    /// connect() calls to the Service seen by the eBPF hooks.
    pub fn ebpf_connects(&self) -> f64 {
        self.sum(
            "nemesis_agent_service_connects_total",
            &[("namespace", NS), ("service", APP)],
        )
    }
}

/// TCP sockets of this machine's root namespace whose local port is `port`, by state
/// (`/proc/net/tcp` hex states: 01 established, 08 close-wait, 0A listen, ...).
pub fn sockets_on_port(port: u16) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(file)?;
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 4 {
                continue;
            }
            let Some((_, p)) = cols[1].rsplit_once(':') else {
                continue;
            };
            if u16::from_str_radix(p, 16).ok() == Some(port) {
                *out.entry(cols[3].to_string()).or_default() += 1;
            }
        }
    }
    Ok(out)
}

// === more agents, other proxy addresses, clients in a pod's network namespace ===

/// `argv` with each `(flag, value)` of `flags` replacing the flag's value, or appended.
fn with_flags(argv: &[String], flags: &[(&str, String)]) -> Vec<String> {
    let mut out = argv.to_vec();
    for (flag, value) in flags {
        match out.iter().position(|a| a == flag) {
            Some(i) if i + 1 < out.len() => out[i + 1] = value.clone(),
            _ => out.extend([flag.to_string(), value.clone()]),
        }
    }
    out
}

impl WakeEnv {
    /// Stops the agent (leaving its datapath attached and pinned) and starts it again
    /// with `flags` changed in its command line, e.g. another `--proxy-v4`; later
    /// restarts keep the change.
    pub async fn restart_agent_with(&mut self, flags: &[(&str, String)]) -> anyhow::Result<()> {
        self.stop_agent_keeping_datapath().await?;
        self.agent_argv = with_flags(&self.agent_argv, flags);
        self.start_agent_again().await
    }

    /// The agent's command line with `flags` changed (to run it as a process).
    pub fn agent_command_line(&self, flags: &[(&str, String)]) -> Vec<String> {
        with_flags(&self.agent_argv, flags)
    }

    /// A second agent of the same instance beside the running one (a DaemonSet's
    /// surge), with `flags` changed, e.g. `--proxy-v4` at the first agent's port. The
    /// caller stops it (it does not detach unless `--detach-on-exit` stays set).
    pub async fn start_second_agent(&self, flags: &[(&str, String)]) -> anyhow::Result<Agent> {
        start_agent(&with_flags(&self.agent_argv, flags), &self.client).await
    }

    /// Like [`Self::clients`], from inside the network namespace `netns` (a pod's):
    /// `ip netns exec` keeps the pid, which joins the test's cgroup before `go`.
    pub async fn clients_in_netns(&self, netns: &str, args: &[&str]) -> anyhow::Result<Clients> {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", netns, CLIENT]).args(args);
        let (child, mut stdin) = self.spawn_client_in_cgroup(cmd)?;
        stdin.write_all(b"go\n").await?;
        drop(stdin);
        Ok(Clients { child })
    }
}

// === callers that never dial a ClusterIP (the every_path_* tests) ===

/// How often a caller outside the cgroup sends a request while it keeps a Service warm.
const OUTSIDE_EVERY: Duration = Duration::from_millis(300);

impl WakeEnv {
    /// The ScalingPolicy's `status.state` (`zero`, `warm`, ...).
    pub async fn policy_state(&self) -> anyhow::Result<Option<String>> {
        let p =
            Api::<nemesis_controller::policy::ScalingPolicy>::namespaced(self.client.clone(), NS)
                .get(APP)
                .await?;
        Ok(p.status.and_then(|s| s.state))
    }

    /// The Deployment's `spec.replicas`.
    pub async fn replicas(&self) -> anyhow::Result<i32> {
        let d = Api::<Deployment>::namespaced(self.client.clone(), NS)
            .get(APP)
            .await?;
        Ok(d.spec.replicas.unwrap_or(0))
    }

    /// The Service's hold EndpointSlices: name, address type and how many agents each
    /// lists.
    pub async fn hold_slices(&self) -> anyhow::Result<Vec<(String, String, usize)>> {
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        use nemesis_common::wire::{HOLD_SLICE_MANAGED_BY, MANAGED_BY_LABEL};
        let lp =
            ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={HOLD_SLICE_MANAGED_BY}"));
        Ok(Api::<EndpointSlice>::namespaced(self.client.clone(), NS)
            .list(&lp)
            .await?
            .items
            .into_iter()
            .map(|s| {
                (
                    s.metadata.name.unwrap_or_default(),
                    s.address_type,
                    s.endpoints.map_or(0, |e| e.len()),
                )
            })
            .collect())
    }

    /// Waits until the policy is at zero and there is a hold slice listing this node's
    /// agent for each of `families` (`IPv4`, `IPv6`).
    pub async fn wait_held_families(&self, families: &[&str]) -> anyhow::Result<()> {
        eventually("the policy at zero", Duration::from_secs(30), || async {
            Ok((self.policy_state().await?.as_deref() == Some("zero")).then_some(()))
        })
        .await?;
        eventually(
            &format!("hold slices of {families:?} listing the agent"),
            Duration::from_secs(15),
            || async {
                let slices = self.hold_slices().await?;
                Ok(families
                    .iter()
                    .all(|f| slices.iter().any(|(_, t, n)| t == f && *n == 1))
                    .then_some(()))
            },
        )
        .await
    }

    /// [`Self::wait_held_families`] for an IPv4 Service.
    pub async fn wait_held(&self) -> anyhow::Result<()> {
        self.wait_held_families(&["IPv4"]).await
    }

    /// The pod IPs of the test's pods of one family (from `status.podIPs`).
    pub async fn pod_ips_of(&self, v6: bool) -> anyhow::Result<Vec<std::net::IpAddr>> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), NS);
        Ok(pods
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.status?.pod_ips)
            .flatten()
            .filter_map(|ip| ip.ip.parse::<std::net::IpAddr>().ok())
            .filter(|ip| ip.is_ipv6() == v6)
            .collect())
    }

    /// At zero, a request through `nginx` (an Ingress following the EndpointSlices) is
    /// held by the agent's hold listener at `hold_ip` (the node's address of the
    /// family), wakes the Service and gets the app's 200; once warm the hold slices are
    /// gone and nginx's upstream is the pod's address of that family.
    pub async fn held_through_nginx(
        &self,
        nginx: &nemesis_tests::ingress::IngressNginx,
        hold_ip: std::net::IpAddr,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            !nginx.upstream().is_empty() && nginx.upstream().iter().all(|u| u.ip() == hold_ip),
            "at zero nginx's upstream is the agents' hold listeners at {hold_ip}: {:?}",
            nginx.upstream()
        );
        let (status, body) = http_get(nginx.addr(), "/")
            .await
            .context("GET through nginx at zero")?;
        anyhow::ensure!(
            status == 200,
            "nginx answered {status}: {body}\n{}",
            nginx.error_log()
        );
        anyhow::ensure!(
            self.replicas().await? == 1,
            "the request did not wake the Service"
        );
        let m = self.metrics().await?;
        anyhow::ensure!(
            m.sum(
                "nemesis_agent_proxy_wakeups_total",
                &[("namespace", NS), ("service", APP)]
            ) >= 1.0,
            "the agent's proxy sent no wake-up"
        );
        eventually(
            "the hold slices gone once warm",
            Duration::from_secs(15),
            || async { Ok(self.hold_slices().await?.is_empty().then_some(())) },
        )
        .await?;
        let pods: Vec<SocketAddr> = self
            .pod_ips_of(hold_ip.is_ipv6())
            .await?
            .into_iter()
            .map(|ip| SocketAddr::new(ip, POD_PORT))
            .collect();
        anyhow::ensure!(
            !pods.is_empty(),
            "the woken pod has an address of the family"
        );
        eventually(
            "nginx's upstream to be the pod",
            Duration::from_secs(10),
            || async { Ok((nginx.upstream() == pods).then_some(())) },
        )
        .await
    }

    /// Sends a request every 300 ms for `busy_for` straight to `pod` (a pod's IP and
    /// port) from a host of its own on the pod network, outside the intercepted cgroup,
    /// as an Ingress controller's pod does: no connect() hook sees it. (From the node's
    /// own addresses it would count as the node probing its pod, like the kubelet's
    /// readiness probes.) Fails if the Deployment leaves one replica meanwhile, if a
    /// request fails, or if the agent did not count every one on the server side. Then
    /// one last request from the same host, alone, so that the test knows when the last
    /// request was: it returns when that one started and when it was done.
    pub async fn keep_warm_from_outside(
        &self,
        pod: SocketAddr,
        busy_for: Duration,
    ) -> anyhow::Result<LastRequest> {
        let caller = self.sandbox().outside_host().await?;
        let start = tokio::time::Instant::now();
        let clients = self
            .outside_repeating_clients(
                caller.name(),
                &[
                    "--connect",
                    &pod.to_string(),
                    "--every-ms",
                    &OUTSIDE_EVERY.as_millis().to_string(),
                    "--for-ms",
                    &busy_for.as_millis().to_string(),
                ],
            )
            .await?;
        let accepted = |m: &Metrics| {
            m.sum(
                "nemesis_agent_service_accepted_connections_total",
                &[("namespace", NS), ("service", APP)],
            )
        };
        let counted_before = accepted(&self.metrics().await?);
        while start.elapsed() < busy_for {
            if self.replicas().await? != 1 {
                let m = self.metrics().await?;
                bail!(
                    "scaled down {:?} into traffic that only reaches the pod by its IP {pod} (the agent counted {} accepted connections)",
                    start.elapsed(),
                    accepted(&m) - counted_before,
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut results = clients.stop(Duration::from_secs(30)).await?;
        // The repeating client's last request ended some time before it exited: the
        // last one is made alone, timed from before its start to after its end.
        let started = tokio::time::Instant::now();
        let last = self
            .outside_repeating_clients(caller.name(), &["--connect", &pod.to_string()])
            .await?
            .finish(Duration::from_secs(30))
            .await?;
        let last_request = LastRequest {
            started,
            done: tokio::time::Instant::now(),
        };
        anyhow::ensure!(last.len() == 1, "the last request: {last:?}");
        results.extend(last);
        let requests = results.len();
        // Half the nominal rate: a loaded machine starts processes slowly.
        let least = (busy_for.as_millis() / OUTSIDE_EVERY.as_millis() / 2) as usize;
        anyhow::ensure!(
            requests >= least,
            "only {requests} requests in {busy_for:?}"
        );
        for r in &results {
            anyhow::ensure!(r.http()?.status == 200, "a request to {pod}: {r:?}");
        }
        anyhow::ensure!(
            self.policy_state().await?.as_deref() == Some("warm"),
            "the policy left warm during the traffic"
        );
        // Every one of them counted on the server side (the agent's metrics lag its
        // counters by up to half a second).
        eventually(
            "the agent's server-side count of the requests",
            Duration::from_secs(5),
            || async {
                let counted = accepted(&self.metrics().await?) - counted_before;
                Ok((counted >= requests as f64).then_some(()))
            },
        )
        .await?;
        Ok(last_request)
    }
}

/// When the last request of [`WakeEnv::keep_warm_from_outside`] was: it reached the pod
/// between `started` and `done`, so an idle window after it ends no sooner than
/// `started` + window and no later than `done` + window (plus the reporting lag).
#[derive(Debug, Clone, Copy)]
pub struct LastRequest {
    pub started: tokio::time::Instant,
    pub done: tokio::time::Instant,
}
