//! One pod's life on the simulated node: its network namespace, its container processes
//! (restarted by the restart policy), readiness probing, status reports, and graceful
//! termination on deletion. It writes only the pod's status and the final grace-0
//! delete that completes a graceful deletion; never the spec.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::api_route::{self, ApiRoute};
use super::call::{CallError, call};
use super::container::{self, PodPlacement};
use super::events::{Recorder, Source};
use super::images::{Image, ImageStore};
use super::probe::{self, Outcome, ProbePlan, Readiness};
use super::process::{ContainerProcess, exit_code};
use super::status::{self, ContainerView, PodView};
use super::volumes::{self, PodVolumes};
use crate::netns::{PodNetns, PodNetwork};

/// Default `terminationGracePeriodSeconds`, as in Kubernetes.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Pause before retrying a failed API call or namespace set-up.
const RETRY: Duration = Duration::from_millis(500);
/// Pause before retrying volumes whose Secret or claim is missing: each failure is an
/// Event, so not too often.
const VOLUME_RETRY: Duration = Duration::from_secs(1);
/// Crash-loop back-off, as the kubelet: 10 s doubling to 5 min (the first restart is
/// immediate), reset after a run of 10 min.
const BACKOFF_BASE: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
const BACKOFF_RESET: Duration = Duration::from_secs(600);

/// What every worker of one kubelet shares.
pub struct WorkerEnv {
    pub client: Client,
    pub network: Arc<PodNetwork>,
    pub node_name: String,
    /// Whether pods with no `spec.nodeName` run here too.
    pub adopt_unbound: bool,
    pub work_dir: PathBuf,
    /// Where container processes go (see `SandboxOptions::pod_cgroup`).
    pub pod_cgroup: Option<PathBuf>,
    /// Events about the pods, for `kubectl describe pod`.
    pub events: Arc<Recorder>,
    /// The API server's CA, for the pods' `ca.crt`.
    pub ca_pem: Option<String>,
    /// The images this node has; `None`: every container runs its `command` on the host.
    pub images: Option<Arc<ImageStore>>,
    /// The API server's address, for `KUBERNETES_SERVICE_HOST`/`_PORT` and the route to
    /// it from pods' namespaces.
    pub api_server: Option<std::net::SocketAddr>,
    /// Where PersistentVolumeClaims' data lives on this node.
    pub claims_dir: PathBuf,
}

impl std::fmt::Debug for WorkerEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerEnv")
            .field("node_name", &self.node_name)
            .field("work_dir", &self.work_dir)
            .finish_non_exhaustive()
    }
}

impl WorkerEnv {
    /// Log file of a container: `<work_dir>/logs/<namespace>_<pod>_<container>.log`.
    pub fn log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.work_dir
            .join("logs")
            .join(format!("{namespace}_{pod}_{container}.log"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("reporting status of pod {pod}: {source}")]
    ReportStatus { pod: String, source: CallError },
    #[error("deleting pod {pod}: {source}")]
    DeletePod { pod: String, source: CallError },
}

/// The grace period for stopping `pod`: the deletion's own grace period when the API
/// server set one, otherwise the pod's `terminationGracePeriodSeconds` (default 30 s).
/// A grace of 0 means a forced deletion (the object is already gone), which still gets
/// the spec's SIGTERM-then-SIGKILL rather than none.
pub fn termination_grace(pod: &Pod) -> Duration {
    let spec = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .map(|s| Duration::from_secs(s.max(0) as u64))
        .unwrap_or(DEFAULT_GRACE);
    match pod.metadata.deletion_grace_period_seconds {
        Some(g) if g > 0 => Duration::from_secs(g as u64),
        _ => spec,
    }
}

/// Delay before restart number `streak` of a crashing container.
pub fn restart_backoff(streak: u32) -> Duration {
    if streak <= 1 {
        return Duration::ZERO;
    }
    BACKOFF_BASE
        .saturating_mul(1u32 << (streak - 2).min(16))
        .min(BACKOFF_MAX)
}

/// Whether a container that exited with `code` is started again under `policy`.
pub fn restarts(policy: &str, code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Runs the pod last seen on `updates` until it is deleted (a `None` on `updates`, or a
/// deletion timestamp) or `cancel` fires; its processes and namespace are gone on return.
pub async fn run(
    env: Arc<WorkerEnv>,
    mut updates: watch::Receiver<Option<Pod>>,
    cancel: CancellationToken,
) {
    let Some(pod) = updates.borrow_and_update().clone() else {
        return;
    };
    let mut worker = Worker::new(env, pod);
    let end = worker.live(&mut updates, &cancel).await;
    tracing::debug!(pod = %worker.key, ?end, "pod worker ending");
    match end {
        End::Cancelled => worker.stop_all(Duration::ZERO).await,
        End::Gone => {
            let grace = termination_grace(&worker.pod);
            worker.stop_all(grace).await;
        }
        End::Deleting => {
            let grace = termination_grace(&worker.pod);
            worker.record_killing();
            worker.stop_all(grace).await;
            if !worker.report_until_done(&mut updates, &cancel).await {
                worker.teardown_network().await;
                return;
            }
        }
    }
    worker.teardown_network().await;
    if end == End::Deleting {
        worker.complete_deletion(&mut updates, &cancel).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The sandbox is shutting down: kill now, write nothing to the API.
    Cancelled,
    /// The pod object disappeared without us: stop, write nothing.
    Gone,
    /// The pod is being deleted: stop gracefully, report, complete the deletion.
    Deleting,
}

struct Slot {
    spec: Container,
    view: ContainerView,
    process: Option<ContainerProcess>,
    /// Bumped on every start, so exits and probe results of an earlier run are ignored.
    generation: u64,
    probe: Option<ProbePlan>,
    readiness: Readiness,
    next_probe: Option<Instant>,
    probing: bool,
    restart_at: Option<Instant>,
    crash_streak: u32,
    started: Option<(Instant, Time)>,
    /// The spec cannot be run (immutable, so retrying is pointless).
    config_error: bool,
}

type ProbeDone = (usize, u64, Outcome);

struct Worker {
    env: Arc<WorkerEnv>,
    api: Api<Pod>,
    pod: Pod,
    key: String,
    netns: Option<PodNetns>,
    slots: Vec<Slot>,
    start_time: Option<Time>,
    reported: Option<PodStatus>,
    report_retry_at: Option<Instant>,
    /// The pod's projected ServiceAccount token directory, once written.
    service_account: Option<std::path::PathBuf>,
    /// Its volumes and the objects its env reads, once ready.
    volumes: PodVolumes,
    /// Each container's image, by container name, when the node has it.
    images: std::collections::HashMap<String, Arc<Image>>,
    /// The pod's way to the API server from its own namespace.
    api_route: Option<ApiRoute>,
    /// The init containers' statuses.
    init_views: Vec<ContainerView>,
    exits_tx: mpsc::UnboundedSender<(usize, u64, ExitStatus)>,
    exits_rx: mpsc::UnboundedReceiver<(usize, u64, ExitStatus)>,
    probes: FuturesUnordered<BoxFuture<'static, ProbeDone>>,
}

impl Worker {
    fn new(env: Arc<WorkerEnv>, pod: Pod) -> Self {
        let namespace = pod.namespace().unwrap_or_else(|| "default".into());
        let api = Api::namespaced(env.client.clone(), &namespace);
        let key = format!("{namespace}/{}", pod.name_any());
        let slots = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| Slot {
                spec: c.clone(),
                view: ContainerView {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    state: status::waiting("ContainerCreating", None),
                    last_state: None,
                    ready: false,
                    restart_count: 0,
                    container_id: None,
                },
                process: None,
                generation: 0,
                probe: None,
                readiness: Readiness::new(1, 3),
                next_probe: None,
                probing: false,
                restart_at: None,
                crash_streak: 0,
                started: None,
                config_error: false,
            })
            .collect();
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Self {
            env,
            api,
            pod,
            key,
            netns: None,
            slots,
            start_time: None,
            reported: None,
            report_retry_at: None,
            service_account: None,
            volumes: PodVolumes::default(),
            images: std::collections::HashMap::new(),
            api_route: None,
            init_views: Vec::new(),
            exits_tx,
            exits_rx,
            probes: FuturesUnordered::new(),
        }
    }

    fn name(&self) -> String {
        self.pod.name_any()
    }

    fn deleting(&self) -> bool {
        self.pod.metadata.deletion_timestamp.is_some()
    }

    fn host_network(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    }

    /// The pod's address: its namespace's, or the node's on the host network.
    fn pod_ip(&self) -> Option<std::net::Ipv4Addr> {
        if self.host_network() {
            return Some(self.env.network.gateway());
        }
        self.netns.as_ref().map(|n| n.ip())
    }

    /// Whether the pod's network is there (always, on the host network).
    fn network_ready(&self) -> bool {
        self.host_network() || self.netns.is_some()
    }

    /// The pod's IPv6 address: its namespace's, or the node's on the host network.
    fn pod_ip_v6(&self) -> Option<std::net::Ipv6Addr> {
        if self.host_network() {
            return Some(self.env.network.gateway_v6());
        }
        self.netns.as_ref().map(|n| n.ip_v6())
    }

    /// Where a container runs: the namespace's name (empty: the node's), the pod's
    /// addresses and the node's, of both families; `None` before the pod has a network.
    fn addresses(&self) -> Option<Addresses> {
        let net = &self.env.network;
        match (&self.netns, self.host_network()) {
            (_, true) => Some(Addresses {
                netns: String::new(),
                pod_ip: net.gateway(),
                pod_ip_v6: net.gateway_v6(),
                host_ip: net.gateway(),
                host_ip_v6: net.gateway_v6(),
            }),
            (Some(ns), false) => Some(Addresses {
                netns: ns.name().to_string(),
                pod_ip: ns.ip(),
                pod_ip_v6: ns.ip_v6(),
                host_ip: ns.gateway(),
                host_ip_v6: ns.gateway_v6(),
            }),
            (None, false) => None,
        }
    }

    /// Volumes, env sources, images and the API route: what must be there before any
    /// container starts. An error is for an event and a retry.
    async fn prepare_containers(&mut self) -> Result<(), String> {
        let pod_ip = self.pod_ip().ok_or("no pod network yet")?;
        let pod_dir = self.pod_dir();
        self.volumes = volumes::prepare(
            &self.env.client,
            &self.pod,
            &pod_dir,
            &self.env.claims_dir,
            pod_ip,
        )
        .await
        .map_err(|e| format!("MountVolume.SetUp failed: {e}"))?;
        if let Some(store) = &self.env.images {
            let inits = self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.init_containers.clone())
                .unwrap_or_default();
            let containers: Vec<Container> = self
                .slots
                .iter()
                .map(|s| s.spec.clone())
                .chain(inits)
                .collect();
            for container in &containers {
                let Some(reference) = container.image.clone() else {
                    continue;
                };
                if self.images.contains_key(&container.name) || !store.has(&reference) {
                    continue;
                }
                let store = Arc::clone(store);
                let image = tokio::task::spawn_blocking(move || store.resolve(&reference))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                self.images.insert(container.name.clone(), image);
            }
        }
        if let (Some(api), Some(netns), None) = (
            self.env.api_server,
            self.netns.as_ref(),
            self.api_route.as_ref(),
        ) {
            self.api_route = Some(api_route::serve(netns.name(), api).map_err(|e| e.to_string())?);
        }
        Ok(())
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    /// Applies the newest pod from `updates`; `Some(end)` when the pod is going away.
    fn take_update(&mut self, updates: &mut watch::Receiver<Option<Pod>>) -> Option<End> {
        match updates.borrow_and_update().clone() {
            None => Some(End::Gone),
            Some(pod) => {
                self.pod = pod;
                self.deleting().then_some(End::Deleting)
            }
        }
    }

    /// Waits `delay` unless the pod goes away or the sandbox stops first.
    async fn pause(
        &mut self,
        delay: Duration,
        updates: &mut watch::Receiver<Option<Pod>>,
        cancel: &CancellationToken,
    ) -> Option<End> {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Some(End::Cancelled),
                changed = updates.changed() => {
                    if changed.is_err() {
                        return Some(End::Cancelled);
                    }
                    if let Some(end) = self.take_update(updates) {
                        return Some(end);
                    }
                }
                _ = tokio::time::sleep_until(until) => return None,
            }
        }
    }

    async fn live(
        &mut self,
        updates: &mut watch::Receiver<Option<Pod>>,
        cancel: &CancellationToken,
    ) -> End {
        if self.deleting() {
            return End::Deleting;
        }
        let phase = self.pod.status.as_ref().and_then(|s| s.phase.clone());
        if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
            // A finished pod from an earlier kubelet: it stays finished.
            return self.idle(updates, cancel).await;
        }
        if self.host_network() {
            self.start_time = Some(now());
            let message = format!(
                "Successfully assigned {} to {}",
                self.key, self.env.node_name
            );
            self.event(None, Source::Scheduler, false, "Scheduled", message);
        }
        while !self.network_ready() {
            match self.env.network.attach().await {
                Ok(ns) => {
                    self.netns = Some(ns);
                    self.start_time = Some(now());
                    let message = format!(
                        "Successfully assigned {} to {}",
                        self.key, self.env.node_name
                    );
                    self.event(None, Source::Scheduler, false, "Scheduled", message);
                }
                Err(err) => {
                    tracing::warn!(pod = %self.key, %err, "pod network set-up failed, retrying");
                    if let Some(end) = self.pause(RETRY, updates, cancel).await {
                        return end;
                    }
                }
            }
        }
        // The token volume comes before any container, as the kubelet mounts volumes first.
        loop {
            let dir = self.pod_dir().join("serviceaccount");
            let ca = self.env.ca_pem.clone();
            match super::service_account::project(&self.env.client, &self.pod, &dir, ca.as_deref())
                .await
            {
                Ok(projected) => {
                    self.service_account = projected;
                    break;
                }
                Err(err) => {
                    tracing::warn!(pod = %self.key, %err, "projecting the ServiceAccount token failed, retrying");
                    let message =
                        format!("MountVolume.SetUp failed for volume \"kube-api-access\" : {err}");
                    self.event(None, Source::Kubelet, true, "FailedMount", message);
                    if let Some(end) = self.pause(RETRY, updates, cancel).await {
                        return end;
                    }
                }
            }
        }
        // Then the other volumes, env sources and images: a Secret created after the
        // pod (as the install's are) is waited for, as on a cluster.
        loop {
            match self.prepare_containers().await {
                Ok(()) => break,
                Err(message) => {
                    tracing::warn!(pod = %self.key, %message, "preparing the pod's containers failed, retrying");
                    self.event(None, Source::Kubelet, true, "FailedMount", message);
                    if let Some(end) = self.pause(VOLUME_RETRY, updates, cancel).await {
                        return end;
                    }
                }
            }
        }
        if let Some(end) = self.run_init_containers(updates, cancel).await {
            return end;
        }
        let _ = self.report().await;
        for i in 0..self.slots.len() {
            self.start(i);
        }
        loop {
            let _ = self.report().await;
            let deadline = self.next_deadline();
            tokio::select! {
                _ = cancel.cancelled() => return End::Cancelled,
                changed = updates.changed() => {
                    if changed.is_err() {
                        return End::Cancelled;
                    }
                    if let Some(end) = self.take_update(updates) {
                        return end;
                    }
                }
                Some((i, generation, status)) = self.exits_rx.recv() => {
                    self.on_exit(i, generation, status);
                }
                Some((i, generation, outcome)) = self.probes.next(), if !self.probes.is_empty() => {
                    self.on_probe(i, generation, outcome);
                }
                _ = sleep_until_opt(deadline) => self.on_timer(),
            }
        }
    }

    /// The launch of `container` (an init container) in this pod, or why it cannot run.
    fn launch_of(&self, container: &Container) -> Result<super::process::Launch, String> {
        let addrs = self.addresses().ok_or("no pod network")?;
        let namespace = self.pod.namespace().unwrap_or_default();
        let pod_dir = self.pod_dir();
        let place = PodPlacement {
            netns: &addrs.netns,
            pod_ip: addrs.pod_ip,
            pod_ip_v6: addrs.pod_ip_v6,
            node_name: &self.env.node_name,
            host_ip: addrs.host_ip,
            host_ip_v6: addrs.host_ip_v6,
            pod_dir: &pod_dir,
            log_path: self.env.log_path(&namespace, &self.name(), &container.name),
            cgroup: self.env.pod_cgroup.as_deref(),
            service_account: self.service_account.as_deref(),
            host_network: self.host_network(),
            volumes: &self.volumes,
            image: self.images.get(&container.name).map(|i| i.as_ref()),
            api_server: self.env.api_server,
        };
        let launch = container::launch(&self.pod, container, &place).map_err(|e| e.to_string())?;
        let scratch = launch.image.as_ref().map(|i| i.scratch.as_path());
        for dir in [Some(pod_dir.as_path()), launch.log_path.parent(), scratch]
            .into_iter()
            .flatten()
        {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Ok(launch)
    }

    /// Runs the init containers one after the other, each to a successful exit (retried
    /// with the crash-loop back-off unless the restart policy is `Never`), as the
    /// kubelet does before it starts any other container. `Some(end)` when the pod goes
    /// away (or the sandbox stops) meanwhile; a pod whose init container failed under
    /// `Never` stays as it is until deleted.
    async fn run_init_containers(
        &mut self,
        updates: &mut watch::Receiver<Option<Pod>>,
        cancel: &CancellationToken,
    ) -> Option<End> {
        let inits = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.clone())
            .unwrap_or_default();
        if inits.is_empty() {
            return None;
        }
        self.init_views = inits
            .iter()
            .map(|c| ContainerView {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                state: status::waiting("PodInitializing", None),
                last_state: None,
                ready: false,
                restart_count: 0,
                container_id: None,
            })
            .collect();
        for slot in &mut self.slots {
            slot.view.state = status::waiting("PodInitializing", None);
        }
        for (i, c) in inits.iter().enumerate() {
            let mut streak = 0u32;
            loop {
                let launch = match self.launch_of(c) {
                    Ok(l) => l,
                    Err(message) => {
                        self.init_views[i].state =
                            status::waiting("CreateContainerConfigError", Some(message.clone()));
                        self.event(
                            Some(&c.name),
                            Source::Kubelet,
                            true,
                            "Failed",
                            format!("Error: {message}"),
                        );
                        let _ = self.report().await;
                        return Some(self.idle(updates, cancel).await);
                    }
                };
                let mut process = match ContainerProcess::spawn(&launch) {
                    Ok(p) => p,
                    Err(err) => {
                        self.init_views[i].state =
                            status::waiting("RunContainerError", Some(err.to_string()));
                        let _ = self.report().await;
                        streak += 1;
                        if let Some(end) = self
                            .pause(restart_backoff(streak).max(RETRY), updates, cancel)
                            .await
                        {
                            return Some(end);
                        }
                        continue;
                    }
                };
                let started = now();
                self.init_views[i].state = status::running(started.clone());
                self.init_views[i].container_id = Some(format!("nemesis://{}", process.pid()));
                self.event(
                    Some(&c.name),
                    Source::Kubelet,
                    false,
                    "Created",
                    format!("Created container: {}", c.name),
                );
                self.event(
                    Some(&c.name),
                    Source::Kubelet,
                    false,
                    "Started",
                    format!("Started container {}", c.name),
                );
                let _ = self.report().await;
                let exit = loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return Some(End::Cancelled),
                        changed = updates.changed() => {
                            if changed.is_err() {
                                return Some(End::Cancelled);
                            }
                            if let Some(end) = self.take_update(updates) {
                                process.stop(termination_grace(&self.pod)).await;
                                return Some(end);
                            }
                        }
                        status = process.exited() => break status,
                    }
                };
                let code = exit_code(exit);
                let reason = if code == 0 { "Completed" } else { "Error" };
                self.init_views[i].state = status::terminated(code, reason, Some(started), now());
                tracing::info!(pod = %self.key, container = %c.name, code, "init container exited");
                if code == 0 {
                    break;
                }
                if self.restart_policy() == "Never" {
                    let _ = self.report().await;
                    return Some(self.idle(updates, cancel).await);
                }
                streak += 1;
                self.init_views[i].restart_count += 1;
                let _ = self.report().await;
                if let Some(end) = self
                    .pause(restart_backoff(streak).max(RETRY), updates, cancel)
                    .await
                {
                    return Some(end);
                }
            }
        }
        for slot in &mut self.slots {
            slot.view.state = status::waiting("ContainerCreating", None);
        }
        None
    }

    /// Nothing to run: wait for the pod to go.
    async fn idle(
        &mut self,
        updates: &mut watch::Receiver<Option<Pod>>,
        cancel: &CancellationToken,
    ) -> End {
        loop {
            if let Some(end) = self.pause(Duration::from_secs(3600), updates, cancel).await {
                return end;
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .iter()
            .flat_map(|s| [s.restart_at, s.next_probe.filter(|_| !s.probing)])
            .chain([self.report_retry_at])
            .flatten()
            .min()
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if slot.restart_at.is_some_and(|t| t <= now) {
                slot.restart_at = None;
                self.start(i);
                continue;
            }
            if slot.next_probe.is_some_and(|t| t <= now) && !slot.probing && slot.process.is_some()
            {
                self.launch_probe(i, now);
            }
        }
    }

    fn start(&mut self, i: usize) {
        let Some(addrs) = self.addresses() else {
            return;
        };
        let host_network = self.host_network();
        let namespace = self.pod.namespace().unwrap_or_default();
        let name = self.name();
        let pod_dir = self.pod_dir();
        let service_account = self.service_account.clone();
        let image = self.images.get(&self.slots[i].spec.name).cloned();
        let slot = &mut self.slots[i];
        if slot.config_error {
            return;
        }
        let place = PodPlacement {
            netns: &addrs.netns,
            pod_ip: addrs.pod_ip,
            pod_ip_v6: addrs.pod_ip_v6,
            node_name: &self.env.node_name,
            host_ip: addrs.host_ip,
            host_ip_v6: addrs.host_ip_v6,
            pod_dir: &pod_dir,
            log_path: self.env.log_path(&namespace, &name, &slot.spec.name),
            cgroup: self.env.pod_cgroup.as_deref(),
            service_account: service_account.as_deref(),
            host_network,
            volumes: &self.volumes,
            image: image.as_deref(),
            api_server: self.env.api_server,
        };
        let prepared = container::launch(&self.pod, &slot.spec, &place)
            .map_err(|e| e.to_string())
            .and_then(|launch| {
                let probe = slot
                    .spec
                    .readiness_probe
                    .as_ref()
                    .map(|p| probe::plan(p, &self.pod, &slot.spec, addrs.pod_ip))
                    .transpose()
                    .map_err(|e| e.to_string())?;
                Ok((launch, probe))
            });
        let (launch, probe) = match prepared {
            Ok(ok) => ok,
            Err(message) => {
                tracing::warn!(pod = %self.key, container = %slot.spec.name, %message, "container config error");
                slot.config_error = true;
                slot.view.state =
                    status::waiting("CreateContainerConfigError", Some(message.clone()));
                let name = slot.spec.name.clone();
                self.event(
                    Some(&name),
                    Source::Kubelet,
                    true,
                    "Failed",
                    format!("Error: {message}"),
                );
                return;
            }
        };
        let scratch = launch.image.as_ref().map(|i| i.scratch.as_path());
        let dirs = [Some(pod_dir.as_path()), launch.log_path.parent(), scratch];
        let spawned = dirs
            .into_iter()
            .flatten()
            .try_for_each(std::fs::create_dir_all)
            .map_err(|e| e.to_string())
            .and_then(|()| ContainerProcess::spawn(&launch).map_err(|e| e.to_string()));
        let process = match spawned {
            Ok(p) => p,
            Err(message) => {
                tracing::warn!(pod = %self.key, container = %slot.spec.name, %message, "container start failed");
                slot.crash_streak += 1;
                slot.restart_at =
                    Some(Instant::now() + restart_backoff(slot.crash_streak).max(RETRY));
                slot.view.state = status::waiting("RunContainerError", Some(message.clone()));
                let name = slot.spec.name.clone();
                self.event(
                    Some(&name),
                    Source::Kubelet,
                    true,
                    "Failed",
                    format!("Error: {message}"),
                );
                return;
            }
        };
        tracing::info!(pod = %self.key, container = %slot.spec.name, pid = process.pid(), ip = %addrs.pod_ip, image = image.is_some(), "container started");
        let (cname, image) = (
            slot.spec.name.clone(),
            slot.spec.image.clone().unwrap_or_default(),
        );
        slot.generation += 1;
        let generation = slot.generation;
        let mut exit = process.exit_watch();
        let tx = self.exits_tx.clone();
        tokio::spawn(async move {
            if let Ok(status) = exit.wait_for(Option::is_some).await
                && let Some(status) = *status
            {
                let _ = tx.send((i, generation, status));
            }
        });
        let started = now();
        slot.view.container_id = Some(format!("nemesis://{}", process.pid()));
        slot.view.state = status::running(started.clone());
        slot.started = Some((Instant::now(), started));
        slot.process = Some(process);
        slot.probing = false;
        match &probe {
            Some(plan) => {
                slot.readiness = Readiness::new(plan.success_threshold, plan.failure_threshold);
                slot.next_probe = Some(Instant::now() + plan.initial_delay);
                slot.view.ready = false;
            }
            None => {
                // No readiness probe: ready as soon as it runs, as Kubernetes has it.
                slot.next_probe = None;
                slot.view.ready = true;
            }
        }
        slot.probe = probe;
        // Images are loaded into the node, never pulled: "already present".
        self.event(
            Some(&cname),
            Source::Kubelet,
            false,
            "Pulled",
            format!("Container image \"{image}\" already present on machine"),
        );
        self.event(
            Some(&cname),
            Source::Kubelet,
            false,
            "Created",
            format!("Created container: {cname}"),
        );
        self.event(
            Some(&cname),
            Source::Kubelet,
            false,
            "Started",
            format!("Started container {cname}"),
        );
    }

    fn event(
        &self,
        container: Option<&str>,
        source: Source,
        warning: bool,
        reason: &str,
        message: String,
    ) {
        self.env
            .events
            .record(&self.pod, container, source, warning, reason, message);
    }

    /// The pod's scratch directory: `<work>/pods/<ns>_<name>_<uid prefix>`.
    fn pod_dir(&self) -> std::path::PathBuf {
        let namespace = self.pod.namespace().unwrap_or_default();
        let uid = self.pod.uid().unwrap_or_default();
        self.env.work_dir.join("pods").join(format!(
            "{namespace}_{}_{}",
            self.name(),
            &uid[..uid.len().min(8)]
        ))
    }

    fn record_killing(&self) {
        for slot in self.slots.iter().filter(|s| s.process.is_some()) {
            let name = slot.spec.name.clone();
            self.event(
                Some(&name),
                Source::Kubelet,
                false,
                "Killing",
                format!("Stopping container {name}"),
            );
        }
    }

    fn launch_probe(&mut self, i: usize, now: Instant) {
        if !self.network_ready() {
            return;
        }
        let ns = self
            .netns
            .as_ref()
            .map(|n| n.name().to_string())
            .unwrap_or_default();
        let slot = &mut self.slots[i];
        let Some(plan) = slot.probe.clone() else {
            return;
        };
        slot.probing = true;
        slot.next_probe = Some(now + plan.period);
        let generation = slot.generation;
        self.probes.push(Box::pin(async move {
            let outcome = probe::check(&plan.action, &ns, plan.timeout).await;
            (i, generation, outcome)
        }));
    }

    fn on_probe(&mut self, i: usize, generation: u64, outcome: Outcome) {
        let slot = &mut self.slots[i];
        if slot.generation != generation || slot.process.is_none() {
            return;
        }
        slot.probing = false;
        let success = outcome == Outcome::Success;
        if let Outcome::Failure(why) = &outcome {
            let name = slot.spec.name.clone();
            let message = format!("Readiness probe failed: {why}");
            self.env.events.record(
                &self.pod,
                Some(&name),
                Source::Kubelet,
                true,
                "Unhealthy",
                message,
            );
        }
        let slot = &mut self.slots[i];
        if slot.readiness.observe(success) {
            tracing::info!(pod = %self.key, container = %slot.spec.name, ready = slot.readiness.is_ready(), ?outcome, "readiness changed");
        }
        slot.view.ready = slot.readiness.is_ready();
    }

    fn on_exit(&mut self, i: usize, generation: u64, exit: ExitStatus) {
        let policy = self.restart_policy();
        let slot = &mut self.slots[i];
        if slot.generation != generation {
            return;
        }
        slot.process = None;
        slot.probing = false;
        slot.next_probe = None;
        slot.view.ready = false;
        let code = exit_code(exit);
        let (ran_for, started) = slot
            .started
            .take()
            .map(|(at, t)| (at.elapsed(), Some(t)))
            .unwrap_or((Duration::ZERO, None));
        let reason = if code == 0 { "Completed" } else { "Error" };
        let state = status::terminated(code, reason, started, now());
        tracing::info!(pod = %self.key, container = %slot.spec.name, code, "container exited");
        if !restarts(&policy, code) {
            slot.view.state = state;
            return;
        }
        if ran_for >= BACKOFF_RESET {
            slot.crash_streak = 0;
        }
        slot.crash_streak += 1;
        slot.view.restart_count += 1;
        slot.view.last_state = Some(state);
        let delay = restart_backoff(slot.crash_streak);
        if delay.is_zero() {
            self.start(i);
        } else {
            slot.view.state = status::waiting(
                "CrashLoopBackOff",
                Some(format!(
                    "back-off {}s restarting failed container={} pod={}",
                    delay.as_secs(),
                    slot.spec.name,
                    self.pod.name_any()
                )),
            );
            slot.restart_at = Some(Instant::now() + delay);
            let name = slot.spec.name.clone();
            let message = format!(
                "Back-off restarting failed container {name} in pod {}",
                self.pod.name_any()
            );
            self.event(Some(&name), Source::Kubelet, true, "BackOff", message);
        }
    }

    fn view(&self) -> PodView {
        PodView {
            pod_ip: self.pod_ip().map(|ip| ip.to_string()),
            pod_ip_v6: self.pod_ip_v6().map(|ip| ip.to_string()),
            host_ip: self
                .network_ready()
                .then(|| self.env.network.gateway().to_string()),
            host_ip_v6: self
                .network_ready()
                .then(|| self.env.network.gateway_v6().to_string()),
            start_time: self.start_time.clone(),
            sandbox_ready: self.network_ready(),
            restart_policy: self.restart_policy(),
            containers: self.slots.iter().map(|s| s.view.clone()).collect(),
            init_containers: self.init_views.clone(),
        }
    }

    /// Sends the pod status if it changed since the last report.
    async fn report(&mut self) -> Result<(), WorkerError> {
        let mut status = status::pod_status(&self.view(), self.reported.as_ref(), &now());
        if self.deleting() {
            status = terminal_status(status);
        }
        if self.reported.as_ref() == Some(&status) {
            return Ok(());
        }
        let patch = json!({ "status": status });
        match call(self.api.patch_status(
            &self.name(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ))
        .await
        {
            Ok(_) => {
                self.reported = Some(status);
                self.report_retry_at = None;
                Ok(())
            }
            Err(source) => {
                let err = WorkerError::ReportStatus {
                    pod: self.key.clone(),
                    source,
                };
                tracing::warn!(pod = %self.key, %err, "status report failed");
                self.report_retry_at = Some(Instant::now() + RETRY);
                Err(err)
            }
        }
    }

    /// Final status after the containers stopped; retried a few times. `false` when the
    /// sandbox was cancelled meanwhile.
    async fn report_until_done(
        &mut self,
        updates: &mut watch::Receiver<Option<Pod>>,
        cancel: &CancellationToken,
    ) -> bool {
        for _ in 0..5 {
            match self.report().await {
                Ok(()) => return true,
                Err(WorkerError::ReportStatus { source, .. }) if source.is_not_found() => {
                    return true;
                }
                Err(_) => {
                    if let Some(End::Cancelled) = self.pause(RETRY, updates, cancel).await {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Completes a graceful deletion once the containers are gone, as a kubelet does: a
    /// grace-0 delete bound to this pod's uid; retried until it lands or the pod is gone.
    async fn complete_deletion(
        &mut self,
        updates: &mut watch::Receiver<Option<Pod>>,
        cancel: &CancellationToken,
    ) {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: self.pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        loop {
            match call(self.api.delete(&self.name(), &params)).await {
                // 404: gone already; 409: the name now belongs to another pod.
                Ok(_) => return,
                Err(e) if e.is_not_found() || e.is_conflict() => return,
                Err(source) => {
                    let err = WorkerError::DeletePod {
                        pod: self.key.clone(),
                        source,
                    };
                    tracing::warn!(pod = %self.key, %err, "retrying");
                    if let Some(End::Cancelled | End::Gone) =
                        self.pause(RETRY, updates, cancel).await
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Stops every container within `grace` (all at once, as the kubelet does).
    async fn stop_all(&mut self, grace: Duration) {
        let mut indices = Vec::new();
        let mut stops = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            slot.restart_at = None;
            slot.next_probe = None;
            slot.view.ready = false;
            // Exits and probes of the run being stopped are no longer of interest.
            slot.generation += 1;
            if let Some(mut process) = slot.process.take() {
                let (key, name) = (self.key.clone(), slot.spec.name.clone());
                indices.push(i);
                stops.push(async move {
                    let stopped = process.stop(grace).await;
                    tracing::info!(pod = %key, container = %name, code = exit_code(stopped.status), killed = stopped.killed, "container stopped");
                    stopped
                });
            }
        }
        let results = futures::future::join_all(stops).await;
        for (i, stopped) in indices.into_iter().zip(results) {
            let slot = &mut self.slots[i];
            let code = exit_code(stopped.status);
            let started = slot.started.take().map(|(_, t)| t);
            let reason = if code == 0 { "Completed" } else { "Error" };
            slot.view.state = status::terminated(code, reason, started, now());
        }
    }

    async fn teardown_network(&mut self) {
        self.api_route = None;
        if let Some(ns) = self.netns.take() {
            let name = ns.name().to_string();
            if let Err(err) = ns.teardown().await {
                tracing::warn!(pod = %self.key, netns = %name, %err, "pod netns teardown failed");
            }
        }
    }
}

/// After deletion the kubelet reports the pod terminal (Kubernetes 1.27+), whatever the
/// restart policy, so nobody waits for a restart that will not come.
fn terminal_status(mut status: PodStatus) -> PodStatus {
    let stopped = status
        .container_statuses
        .iter()
        .flatten()
        .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_none()));
    if stopped {
        let failed = status.container_statuses.iter().flatten().any(|c| {
            c.state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .is_none_or(|t| t.exit_code != 0)
        });
        status.phase = Some(if failed { "Failed" } else { "Succeeded" }.into());
    }
    status
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// See [`Worker::addresses`].
struct Addresses {
    netns: String,
    pod_ip: std::net::Ipv4Addr,
    pod_ip_v6: std::net::Ipv6Addr,
    host_ip: std::net::Ipv4Addr,
    host_ip_v6: std::net::Ipv6Addr,
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    fn pod(spec_grace: Option<i64>, deletion_grace: Option<i64>) -> Pod {
        let mut pod = Pod {
            spec: Some(PodSpec {
                termination_grace_period_seconds: spec_grace,
                ..Default::default()
            }),
            ..Default::default()
        };
        pod.metadata.deletion_grace_period_seconds = deletion_grace;
        pod
    }

    #[test]
    fn grace_comes_from_the_deletion_then_the_spec_then_30s() {
        assert_eq!(termination_grace(&pod(None, None)), DEFAULT_GRACE);
        assert_eq!(
            termination_grace(&pod(Some(2), None)),
            Duration::from_secs(2)
        );
        assert_eq!(
            termination_grace(&pod(Some(2), Some(5))),
            Duration::from_secs(5)
        );
        assert_eq!(
            termination_grace(&pod(Some(2), Some(0))),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn crash_backoff_is_immediate_then_doubles_to_five_minutes() {
        assert_eq!(restart_backoff(1), Duration::ZERO);
        assert_eq!(restart_backoff(2), Duration::from_secs(10));
        assert_eq!(restart_backoff(3), Duration::from_secs(20));
        assert_eq!(restart_backoff(7), Duration::from_secs(300));
        assert_eq!(restart_backoff(50), Duration::from_secs(300));
    }

    #[test]
    fn restart_policy_decides_who_comes_back() {
        assert!(restarts("Always", 0));
        assert!(restarts("OnFailure", 1));
        assert!(!restarts("OnFailure", 0));
        assert!(!restarts("Never", 1));
    }
}
