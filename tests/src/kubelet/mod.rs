//! The simulated node: a kubelet that runs pods as local processes, each in a network
//! namespace of its own with an address from 198.18.0.0/15, plus the controllers around
//! it (Deployments, EndpointSlices, garbage collection). Everything talks to the API
//! only through kube-rs, so it runs against the project's test API server or any other.
//!
//! # Use
//!
//! ```no_run
//! # async fn demo(client: kube::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use nemesis_tests::kubelet::{Sandbox, SandboxOptions};
//!
//! let sandbox = Sandbox::start(client, SandboxOptions::default()).await?;
//! // Create Deployments and Services through the API as usual: pods appear as
//! // processes, become Ready by their readiness probes, and fill EndpointSlices.
//! println!("pods live in {} behind {}", sandbox.subnet(), sandbox.gateway());
//! sandbox.shutdown().await?; // kills every process, removes every namespace
//! # Ok(()) }
//! ```
//!
//! # What a pod gets
//!
//! - Each container run from its image when the node has it ([`SandboxOptions::images`]:
//!   OCI archives, [`images`]): chrooted into an overlay of the image's root with the
//!   image's entrypoint, cmd, env and user, overridden by the pod's `command`, `args`,
//!   `env` and `securityContext` (`runAsUser`, `runAsGroup`, `readOnlyRootFilesystem`),
//!   its `volumeMounts` ([`volumes`]: Secret, ConfigMap, hostPath, emptyDir, a PVC as a
//!   node directory), the ServiceAccount token, and a kubelet-managed `/etc/hosts` that
//!   names the Services. Otherwise its `command` + `args` run on the host (`command` is
//!   then required). Either way with `ip netns exec` in the pod's namespace (the
//!   node's with `hostNetwork`), in a process group of its own, env `POD_NAME`,
//!   `POD_NAMESPACE`, `POD_IP`, `HOSTNAME`, `KUBERNETES_SERVICE_HOST`/`_PORT` (with
//!   [`SandboxOptions::api_server`]), then the spec's `env` (values, `$(VAR)`
//!   expansion, downward-API `fieldRef`s, `secretKeyRef`, `configMapKeyRef`); output
//!   appended to [`Sandbox::log_path`].
//! - `eth0` with the pod IPs (dual-stack: IPv4 from 198.18.0.0/15 first, IPv6 from
//!   fd6e:6d00::/32; `status.podIPs` lists both), default routes of both families via
//!   the sandbox bridge, `lo` up. The root namespace reaches pod IPs through the
//!   bridge, so tests can dial pods directly. A Service's EndpointSlices come one set
//!   per family of its `ipFamilies`.
//! - Readiness from the container's `readinessProbe` (`tcpSocket`, `httpGet` or `exec`),
//!   dialled from the root namespace; no probe means ready once running. Annotations
//!   for tests: [`START_DELAY_ANNOTATION`] (the process sleeps this many ms before it
//!   runs its command: a slow ML server), [`PROBE_PERIOD_ANNOTATION`] and
//!   [`PROBE_INITIAL_DELAY_ANNOTATION`] (sub-second probe timing).
//! - Restarts by `restartPolicy` with the kubelet's crash-loop back-off.
//! - On deletion: SIGTERM to the process group, SIGKILL after the grace period
//!   (`deletionGracePeriodSeconds` when the server set a positive one, else
//!   `terminationGracePeriodSeconds`, default 30 s), then the namespace is removed and a
//!   grace-0 delete completes the graceful deletion, as a kubelet does. The API server
//!   keeps a deleted pod that is bound to a node (`spec.nodeName`) until then, so the
//!   pod shows as terminating in the API (and its endpoint as `terminating`) while its
//!   process winds down; an unbound pod is removed at once and only its process gets
//!   the grace period.
//!
//! The kubelet registers its Node (Ready, at 127.0.0.1, its log endpoint as the kubelet
//! port) and serves container logs there for the API server's `pods/log`
//! (`kubectl logs`, [`logs`]); it records the pod Events `kubectl describe pod` shows
//! ([`events`]). Each pod's containers find a token of its ServiceAccount, bound to the
//! pod, at `/var/run/secrets/kubernetes.io/serviceaccount` ([`service_account`]).
//!
//! With [`SandboxOptions::service_proxy`], the node also runs kube-proxy's part:
//! `ClusterIP:port` of every Service with ready endpoints accepts connections and
//! forwards them to a ready pod ([`service_proxy`]).
//!
//! Pods are taken when `spec.nodeName` is empty or equals [`SandboxOptions::node_name`];
//! the ReplicaSet controller binds the pods it creates to that node. Several nodes on one
//! API server: start one `Sandbox` per node, all but the first with `controllers: false`
//! and `adopt_unbound_pods: false`; each gets a /24 of its own. The root namespace
//! reaches every pod; pod-to-pod traffic across nodes would need IP forwarding on the
//! host, which the sandbox does not switch on.
//!
//! # Not simulated
//!
//! Pulling images, resources, init and ephemeral containers, liveness/startup probes,
//! `envFrom` (refused with `CreateContainerConfigError`), other volume types (refused
//! by name), volumes of containers run on the host,
//! `maxSurge`/`maxUnavailable` beyond "new pods first, old ones once they are ready",
//! `spec.paused` rollouts beyond "do nothing", Node heartbeats and capacity.

pub mod api_route;
pub mod call;
pub mod container;
pub mod events;
pub mod images;
pub mod logs;
pub mod pods;
pub mod probe;
pub mod process;
pub mod service_account;
pub mod service_proxy;
pub mod status;
pub mod volumes;
pub mod worker;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::controllers;
use crate::netns::{NetnsError, PodNetwork};

pub use container::START_DELAY_ANNOTATION;
pub use probe::{
    INITIAL_DELAY_ANNOTATION as PROBE_INITIAL_DELAY_ANNOTATION,
    PERIOD_ANNOTATION as PROBE_PERIOD_ANNOTATION,
};

/// How long shutdown waits for the loops to stop their processes before it gives up
/// on them (Drop of what is left still kills and removes everything).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// The node this kubelet plays; pods bound elsewhere are left alone.
    pub node_name: String,
    /// Where pod scratch directories and container logs go. `None`: a fresh directory
    /// under the system temp dir, removed on shutdown or drop (kept when dropped during
    /// a panic, so a failed test's container logs can be read).
    pub work_dir: Option<PathBuf>,
    /// Watch and act in this namespace only; `None` for all namespaces.
    pub namespace: Option<String>,
    /// Run the Deployment and EndpointSlice controllers and the garbage collector. A
    /// second "node" on the same API server sets this to `false` (one set of
    /// controllers per cluster) ...
    pub controllers: bool,
    /// ... and this too, so that pods without `spec.nodeName` run on the first node
    /// only. Pods for the second node name it in `spec.nodeName`.
    pub adopt_unbound_pods: bool,
    /// Serve Service ClusterIPs as kube-proxy would ([`service_proxy`]): connects to
    /// `ClusterIP:port` reach a ready pod, or are refused when there is none. Off by
    /// default: ClusterIPs of parallel test API servers overlap, and only one process
    /// can listen on an address; the demo turns it on with ClusterIPs of its own.
    pub service_proxy: bool,
    /// The cgroup v2 directory every container process joins, as a real node's pods sit
    /// in the cgroup tree where the Nemesis agent attaches (the cgroup2 root); tests put
    /// pods under the child cgroup their agent attaches to, so the server-side hooks see
    /// the connections the pods accept. `None`: the processes stay where the test is.
    pub pod_cgroup: Option<PathBuf>,
    /// How long the Deployment controller waits before it acts on a new generation (a
    /// busy controller-manager's lag: `observedGeneration` trails `generation`, and the
    /// status still describes the previous spec). Zero by default.
    pub rollout_lag: std::time::Duration,
    /// The API server's CA certificate (PEM), written beside each pod's ServiceAccount
    /// token as `ca.crt` ([`service_account`]); `None`: no `ca.crt`.
    pub ca_pem: Option<String>,
    /// The images loaded into this node ([`images`]): a container whose image is here
    /// runs from it; any other runs its `command` on the host. `None`: no images.
    pub images: Option<Arc<images::ImageStore>>,
    /// The API server (on the host's loopback): pods get `KUBERNETES_SERVICE_HOST` and
    /// `_PORT`, and a route to it from their own namespaces ([`api_route`]), so
    /// in-cluster clients work. `None`: neither.
    pub api_server: Option<std::net::SocketAddr>,
    /// The node's zone: its Node's `topology.kubernetes.io/zone` label, as a cloud's
    /// node controller sets it (and so the `zone` of its pods' EndpointSlice
    /// endpoints). `None`: no zone label.
    pub zone: Option<String>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            node_name: "nemesis-sandbox".into(),
            work_dir: None,
            namespace: None,
            controllers: true,
            adopt_unbound_pods: true,
            service_proxy: false,
            pod_cgroup: None,
            rollout_lag: std::time::Duration::ZERO,
            ca_pem: None,
            images: None,
            api_server: None,
            zone: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("setting up pod networking: {0}")]
    CreateNetwork(#[from] NetnsError),
    #[error("creating sandbox work directory {path}: {source}")]
    CreateWorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the sandbox loops did not stop within {SHUTDOWN_TIMEOUT:?}")]
    StopLoops,
    #[error("removing pod networking: {0}")]
    RemoveNetwork(#[source] NetnsError),
    #[error(transparent)]
    LogServer(#[from] logs::LogServerError),
}

/// A running simulated node. Stop it with [`Sandbox::shutdown`]; dropping it does the
/// same on a best-effort basis.
#[derive(Debug)]
pub struct Sandbox {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    network: Arc<PodNetwork>,
    env: Arc<worker::WorkerEnv>,
    owned_work_dir: bool,
}

static SANDBOXES_IN_PROCESS: AtomicU32 = AtomicU32::new(0);

impl Sandbox {
    /// Sets up pod networking and starts the kubelet, the Deployment and EndpointSlice
    /// controllers and the garbage collector as tokio tasks.
    pub async fn start(client: Client, opts: SandboxOptions) -> Result<Self, SandboxError> {
        let (work_dir, owned_work_dir) = match opts.work_dir {
            Some(dir) => (dir, false),
            None => (
                std::env::temp_dir().join(format!(
                    "nemesis-sandbox-{}-{}",
                    std::process::id(),
                    SANDBOXES_IN_PROCESS.fetch_add(1, Ordering::Relaxed)
                )),
                true,
            ),
        };
        std::fs::create_dir_all(&work_dir).map_err(|source| SandboxError::CreateWorkDir {
            path: work_dir.clone(),
            source,
        })?;
        let network = PodNetwork::create().await?;
        let claims_dir = work_dir.join("claims");
        let env = Arc::new(worker::WorkerEnv {
            client: client.clone(),
            network: Arc::clone(&network),
            node_name: opts.node_name.clone(),
            adopt_unbound: opts.adopt_unbound_pods,
            work_dir,
            pod_cgroup: opts.pod_cgroup.clone(),
            events: events::Recorder::new(client.clone(), opts.node_name.clone()),
            ca_pem: opts.ca_pem.clone(),
            images: opts.images.clone(),
            api_server: opts.api_server,
            claims_dir,
        });
        let cancel = CancellationToken::new();
        // `kubectl logs` reaches container logs through the Node, as on a cluster.
        let log_addr = logs::serve(env.work_dir.join("logs"), cancel.child_token()).await?;
        logs::register_node(
            &client,
            &opts.node_name,
            opts.zone.as_deref(),
            log_addr.port(),
        )
        .await?;
        let ns = opts.namespace.clone();
        let pods_api: kube::Api<Pod> = match &ns {
            Some(ns) => kube::Api::namespaced(client.clone(), ns),
            None => kube::Api::all(client.clone()),
        };
        let mut tasks = vec![tokio::spawn(pods::run(
            Arc::clone(&env),
            pods_api,
            cancel.child_token(),
        ))];
        if opts.service_proxy {
            tasks.push(tokio::spawn(service_proxy::run(
                client.clone(),
                cancel.child_token(),
            )));
        }
        if opts.controllers {
            tasks.push(tokio::spawn(controllers::deployments::run(
                client.clone(),
                ns.clone(),
                opts.rollout_lag,
                cancel.child_token(),
            )));
            tasks.push(tokio::spawn(controllers::replicasets::run(
                client.clone(),
                ns.clone(),
                Some(opts.node_name.clone()),
                cancel.child_token(),
            )));
            tasks.push(tokio::spawn(controllers::statefulsets::run(
                client.clone(),
                ns.clone(),
                Some(opts.node_name.clone()),
                cancel.child_token(),
            )));
            tasks.push(tokio::spawn(controllers::daemonsets::run(
                client.clone(),
                ns.clone(),
                cancel.child_token(),
            )));
            tasks.push(tokio::spawn(controllers::endpointslices::run(
                client.clone(),
                ns.clone(),
                cancel.child_token(),
            )));
            tasks.push(tokio::spawn(controllers::gc::run(
                client,
                ns,
                cancel.child_token(),
            )));
        }
        tracing::info!(
            node = %opts.node_name,
            subnet = %network.subnet(),
            work_dir = %env.work_dir.display(),
            "sandbox started"
        );
        Ok(Self {
            cancel,
            tasks,
            network,
            env,
            owned_work_dir,
        })
    }

    pub fn node_name(&self) -> &str {
        &self.env.node_name
    }

    /// The /24 pod IPs of this sandbox come from.
    pub fn subnet(&self) -> String {
        self.network.subnet()
    }

    /// Which of the 512 /24s of 198.18.0.0/15 this sandbox holds: unique among live
    /// sandboxes on this machine (a lock file claims it), so other per-sandbox names
    /// and addresses can be derived from it without colliding.
    pub fn subnet_index(&self) -> u16 {
        self.network.index()
    }

    /// The bridge address: the node's address as pods see it (`status.hostIP`).
    pub fn gateway(&self) -> Ipv4Addr {
        self.network.gateway()
    }

    /// The bridge's IPv6 address: the node's IPv6 address as pods see it (the second
    /// of `status.hostIPs`).
    pub fn gateway_v6(&self) -> std::net::Ipv6Addr {
        self.network.gateway_v6()
    }

    pub fn work_dir(&self) -> &Path {
        &self.env.work_dir
    }

    /// A network namespace on this node's pod bridge that belongs to no pod: a host of
    /// its own for a caller that must be neither the node (whose addresses the agent
    /// treats as its own probes) nor a sandbox pod, e.g. an Ingress controller's pod or
    /// a machine outside the cluster. Removed when the handle is dropped or torn down.
    pub async fn outside_host(&self) -> Result<crate::netns::PodNetns, SandboxError> {
        Ok(self.network.attach().await?)
    }

    /// Where a container's stdout and stderr go.
    pub fn log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.env.log_path(namespace, pod, container)
    }

    /// Stops every loop, kills every process the sandbox started, removes every network
    /// namespace, veth and the bridge. Pod objects are left in the API as they are.
    pub async fn shutdown(mut self) -> Result<(), SandboxError> {
        self.cancel.cancel();
        let tasks = std::mem::take(&mut self.tasks);
        let joined = tokio::time::timeout(SHUTDOWN_TIMEOUT, futures::future::join_all(tasks)).await;
        let network = self.network.shutdown().await;
        if self.owned_work_dir {
            let _ = std::fs::remove_dir_all(&self.env.work_dir);
        }
        joined.map_err(|_| SandboxError::StopLoops)?;
        network.map_err(SandboxError::RemoveNetwork)?;
        tracing::info!(node = %self.env.node_name, "sandbox stopped");
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Shutdown not called: abort the loops. Their workers' processes and namespaces
        // are killed and removed by their own Drop as the tasks are dropped, and the
        // bridge once the last namespace handle is gone.
        self.cancel.cancel();
        for task in &self.tasks {
            task.abort();
        }
        // A panicking test keeps its container logs for the post-mortem.
        if self.owned_work_dir && !self.tasks.is_empty() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.env.work_dir);
        }
    }
}
