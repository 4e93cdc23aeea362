//! The agent as one program: the eBPF datapath, the proxy listener(s), the EndpointSlice
//! and managed-Service watches, the mode follower that drives the datapath's modes, the
//! controller client (wake-ups, heartbeats, directives), the dead-man heartbeat and the
//! admin server, started in order and stopped gracefully, handing over to a next agent
//! of the same node without a refused connect (see `handover` for why two at once are
//! safe). Owns composition and lifecycle only; every decision lives in the modules it
//! wires together.
#![deny(unsafe_code)]

use crate::admin::{self, AdminState, Readiness};
use crate::config::{DirectMode, RunArgs};
use crate::control::{
    AgentDirectives, AgentReports, ControlError, ControllerClient, DEFAULT_CALL_TIMEOUT, Heartbeats,
};
use crate::ebpf::{Datapath, DatapathConfig, LoadError, pins, prereq};
use crate::endpoints::{self, EndpointRegistry};
use crate::handover::{self, HandoverError, Migration, WriterLock};
use crate::holdports::HoldListeners;
use crate::kube_proxy_skip::{self, SkipError, SkipRule};
use crate::metrics::{DatapathCounters, Metrics, ProxyMetrics};
use crate::proxy::udp_wake::UdpRelays;
use crate::proxy::{
    self, Backoff, ModeFollower, OriginalDestinations, Proxy, ProxyConfig, ProxyError, ServiceTable,
};
use crate::services::{self, DatapathServices, Locality, ManagedServices};
use crate::udphold::UdpHoldBounds;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How often the eBPF counters are copied into the metrics and heartbeat reports: a
/// scrape or a report sees counts at most this old.
pub const COUNTERS_INTERVAL: Duration = Duration::from_millis(500);
/// After the last task is stopped, how long a detach waits for a straggling holder of
/// the datapath (a scrape in flight) before it gives up.
const DETACH_WAIT: Duration = Duration::from_secs(2);
/// Listen backlog of the admin socket: probes and scrapes, a handful at a time.
const ADMIN_BACKLOG: u32 = 128;
/// How long the proxy waits for the managed Services and their EndpointSlices before
/// it accepts anyway: a sync takes well under a second against a live API server.
const SYNC_WAIT_MAX: Duration = Duration::from_secs(10);
/// How long shutdown waits for the admin server to finish the requests in flight.
const LISTENER_CLOSE_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading the agent token {path}")]
    ReadToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent token file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("--controller-url needs --agent-token-file (the bearer token the controller expects)")]
    MissingToken,
    #[error("the node name: {0} (pass --node-name or NEMESIS_AGENT_NODE_NAME)")]
    NodeName(String),
    #[error(transparent)]
    Controller(#[from] ControlError),
    #[error(transparent)]
    BindProxy(#[from] ProxyError),
    #[error("reading the address of the proxy listener")]
    ProxyAddr(#[source] std::io::Error),
    #[error("binding the admin listener on {addr}")]
    BindAdmin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF datapath")]
    LoadDatapath(#[source] Box<LoadError>),
    #[error("detaching the eBPF datapath")]
    Detach(#[source] Box<LoadError>),
    #[error("the datapath is still in use {after:?} after shutdown; left attached and pinned")]
    DatapathInUse { after: Duration },
    #[error("configuring the Kubernetes client (KUBECONFIG, ~/.kube/config or in-cluster)")]
    KubeClient(#[source] kube::Error),
    #[error("waiting for the datapath's writer lock")]
    Handover(#[from] HandoverError),
    #[error("the kube-proxy skip rule")]
    KubeProxySkip(#[from] SkipError),
    #[error("installing the {signal} handler")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The datapath, once this agent holds the writer lock and has loaded it; weakly, so
/// that a connection task or a scrape that outlives the agent never keeps the programs
/// attached. Empty while the agent stands by for another one to hand over.
type LateDatapath = Arc<OnceLock<Weak<Datapath>>>;

/// The proxy's view of original destinations: the datapath's.
struct DatapathDestinations(LateDatapath);

impl OriginalDestinations for DatapathDestinations {
    fn lookup(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.0
            .get()?
            .upgrade()?
            .original_destination(peer)
            .map(|o| o.addr)
    }
}

/// Open-count corrections the reconcile made, read at scrape time, as
/// `nemesis_agent_open_count_corrections_total{side}`.
#[derive(Debug)]
struct CountCorrections(LateDatapath);

impl Collector for CountCorrections {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some((client, server)) = self
            .0
            .get()
            .and_then(Weak::upgrade)
            .map(|dp| dp.corrections())
        else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "nemesis_agent_open_count_corrections",
            "Times an open-connection count was brought back to the live sockets the kernel holds (a close the counters missed), by side",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (side, n) in [("client", client), ("server", server)] {
            ConstCounter::new(n).encode(family.encode_family(&[("side", side)])?)?;
        }
        Ok(())
    }
}

/// The programs' fail-open counters, read at scrape time, as
/// `nemesis_agent_datapath_errors_total{kind}` (kinds from a fixed list).
#[derive(Debug)]
struct DatapathErrors(LateDatapath);

impl Collector for DatapathErrors {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(counters) = self
            .0
            .get()
            .and_then(Weak::upgrade)
            .and_then(|dp| dp.error_counters().ok())
        else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "nemesis_agent_datapath_errors",
            "Connections the eBPF programs let through unchanged because something failed (fail-open), by kind",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (kind, n) in counters.iter() {
            ConstCounter::new(n).encode(family.encode_family(&[("kind", kind)])?)?;
        }
        Ok(())
    }
}

/// A running agent. Stop it with [`Agent::shutdown`].
pub struct Agent {
    admin_addr: SocketAddr,
    proxy_addrs: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    /// The proxy's and the admin server's listeners: closed first at shutdown.
    listeners: Vec<JoinHandle<()>>,
    /// Waits for the writer lock, loads the datapath and runs everything that writes
    /// it; aborting it releases the lock (see `handover`).
    writer: JoinHandle<()>,
    /// What the connections being drained still need (the EndpointSlice watch).
    tasks: Vec<JoinHandle<()>>,
    datapath: Arc<OnceLock<Arc<Datapath>>>,
    proxy: Proxy,
    readiness: Arc<Readiness>,
    failed: Option<oneshot::Receiver<AgentError>>,
    detach_on_exit: bool,
    shutdown_grace: Duration,
    skip: Option<Arc<SkipRule>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("admin_addr", &self.admin_addr)
            .field("proxy_addrs", &self.proxy_addrs)
            .field("datapath", &self.datapath.get())
            .finish_non_exhaustive()
    }
}

fn read_token(path: &std::path::Path) -> Result<String, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|source| AgentError::ReadToken {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(AgentError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
}

fn node_name(args: &RunArgs) -> Result<String, AgentError> {
    if let Some(n) = args.node_name.as_ref().filter(|n| !n.is_empty()) {
        return Ok(n.clone());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| AgentError::NodeName(format!("reading the host name: {e}")))?;
    let host = host.trim();
    if host.is_empty() {
        return Err(AgentError::NodeName("the host name is empty".into()));
    }
    Ok(host.to_string())
}

fn random_instance() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A future that resolves when `stop` turns true (or its sender is gone).
fn stopped(stop: &watch::Sender<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = stop.subscribe();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// The admin listener: SO_REUSEPORT like the proxy's, because the next agent of a
/// hand-over binds the same host port while this one still runs.
fn bind_admin(addr: SocketAddr) -> Result<tokio::net::TcpListener, AgentError> {
    let bind = || -> std::io::Result<tokio::net::TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(ADMIN_BACKLOG)
    };
    bind().map_err(|source| AgentError::BindAdmin { addr, source })
}

/// The directory whose `flock` is the writer lock: the instance's pin directory,
/// created if missing. `None` when it cannot be known before loading (no bpffs, a bad
/// instance name): the load then fails and says why.
fn writer_lock_dir(cfg: &DatapathConfig) -> Option<PathBuf> {
    if !pins::valid_instance(&cfg.instance) {
        return None;
    }
    let bpffs = match &cfg.bpffs {
        Some(b) => b.clone(),
        None => prereq::bpffs_mount(&std::fs::read_to_string("/proc/mounts").ok()?)?,
    };
    let layout = pins::PinLayout::new(&bpffs, &cfg.instance);
    layout.create_dirs().ok()?;
    Some(layout.dir().to_path_buf())
}

/// Everything the writer needs, built before the datapath is there.
struct WriterParts {
    args: RunArgs,
    cfg: DatapathConfig,
    node: String,
    zone: Option<String>,
    kube: kube::Client,
    controller: Option<ControllerClient>,
    table: Arc<ServiceTable>,
    registry: Arc<EndpointRegistry>,
    proxy: Proxy,
    proxy_metrics: ProxyMetrics,
    counters: Arc<DatapathCounters>,
    udp_hold: Arc<crate::udphold::UdpHoldStats>,
    readiness: Arc<Readiness>,
    strong: Arc<OnceLock<Arc<Datapath>>>,
    late: LateDatapath,
    serving: watch::Sender<bool>,
    holds: Arc<HoldListeners>,
    skip: Option<Arc<SkipRule>>,
}

impl WriterParts {
    /// Loads or adopts the datapath (the writer lock is ours, or nobody can hold one)
    /// and returns the loops that write it, which keep `lock` until they are dropped.
    fn activate(
        self,
        lock: Option<WriterLock>,
    ) -> Result<impl std::future::Future<Output = ()> + Send + 'static, AgentError> {
        let WriterParts {
            args,
            cfg,
            node,
            zone,
            kube,
            controller,
            table,
            registry,
            proxy,
            proxy_metrics,
            counters,
            udp_hold,
            readiness,
            strong,
            late,
            serving,
            holds,
            skip,
        } = self;
        let datapath = Arc::new(
            Datapath::load_or_adopt(&cfg).map_err(|e| AgentError::LoadDatapath(Box::new(e)))?,
        );
        let _ = late.set(Arc::downgrade(&datapath));
        let _ = strong.set(datapath.clone());
        readiness.set("datapath", true);
        readiness.set("services", false);

        let dp_services = DatapathServices::with_locality(
            &datapath,
            registry.clone(),
            args.direct_mode,
            Locality {
                node: node_name(&args).ok(),
                zone,
            },
        );
        // UDP ports held at zero: relays on the proxy's addresses, woken through it.
        if let Some(v4) = cfg.proxy_v4 {
            dp_services.set_udp_relays(UdpRelays::new(
                proxy.clone(),
                *v4.ip(),
                cfg.proxy_v6.map(|a| *a.ip()),
                UdpHoldBounds::default(),
                udp_hold,
            ));
        }
        let managed = ManagedServices::new(
            table.clone(),
            dp_services.clone(),
            proxy_metrics.clone(),
            counters.clone(),
        );
        // Balance routes to the ready backends itself: no Service proxy to wait for.
        let direct_after_ready = match args.direct_mode {
            DirectMode::Balance => Duration::ZERO,
            DirectMode::Passthrough => args.direct_after_ready,
        };
        let modes = ModeFollower::with_direct_after(
            table.clone(),
            registry.clone(),
            dp_services.clone(),
            direct_after_ready,
        );
        proxy.report_applied_epochs(modes.clone());
        // Balance: the datapath's backends follow the EndpointSlices.
        let follow_backends = {
            let dp_services = dp_services.clone();
            let mut any = registry.subscribe_any();
            async move {
                loop {
                    for e in dp_services.sync_backends() {
                        tracing::warn!(error = %services::error_chain(&e), "writing balance backends failed; retried at the next endpoints change");
                    }
                    if any.changed().await.is_err() {
                        return;
                    }
                }
            }
        };
        let (services_synced, mut services_synced_rx) = watch::channel(false);

        // The dead-man heartbeat: while this beats, hold-mode redirects stay on.
        let deadman = {
            let dp = Arc::downgrade(&datapath);
            let interval = args.heartbeat_interval;
            async move {
                let mut beat = tokio::time::interval(interval);
                beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    beat.tick().await;
                    let Some(dp) = dp.upgrade() else { return };
                    if let Err(error) = dp.heartbeat() {
                        tracing::warn!(error = %services::error_chain(&error), "heartbeat failed; held traffic is released once it is stale");
                    }
                }
            }
        };
        // The node's own addresses -> the datapath, so the kubelet's probes of local pods
        // are not counted as traffic.
        let host_addresses = {
            let dp = Arc::downgrade(&datapath);
            async move {
                let mut tick = tokio::time::interval(crate::node::REFRESH);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(dp) = dp.upgrade() else { return };
                    let result = crate::node::host_addresses()
                        .map_err(|e| e.to_string())
                        .and_then(|a| {
                            dp.set_host_addresses(&a)
                                .map_err(|e| services::error_chain(&e))
                        });
                    if let Err(error) = result {
                        tracing::warn!(%error, "the node's own addresses were not written: probes of local pods may count as traffic");
                    }
                }
            }
        };

        // Open counts <- the kernel's live sockets, off the runtime's threads (the walk
        // joins each network namespace from a thread of its own).
        let reconcile_counts = {
            let dp = Arc::downgrade(&datapath);
            let every = args.count_reconcile_interval;
            async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(dp) = dp.upgrade() else { return };
                    let swept = Arc::clone(&dp);
                    match tokio::task::spawn_blocking(move || swept.sweep_balanced()).await {
                        Ok(n) if n > 0 => tracing::debug!(
                            entries = n,
                            "removed the records of balanced connects that failed before their SYN"
                        ),
                        Ok(_) => {}
                        Err(err) => tracing::warn!(%err, "the balanced-socket sweep stopped"),
                    }
                    match tokio::task::spawn_blocking(move || dp.reconcile_open_counts()).await {
                        Ok(Ok(r)) if r.client_corrections + r.server_corrections > 0 => {
                            tracing::info!(
                                client = r.client_corrections,
                                server = r.server_corrections,
                                "open-connection counts corrected to the live sockets"
                            );
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => {
                            tracing::warn!(error = %services::error_chain(&err), "reconciling the open counts failed; retried at the next interval")
                        }
                        Err(err) => tracing::warn!(%err, "the open-count reconcile stopped"),
                    }
                }
            }
        };

        // Least connections over a set larger than its candidate list compares the
        // backends the agent last listed as least loaded: the list follows the counts.
        let refresh_candidates = {
            let dp = Arc::downgrade(&datapath);
            async move {
                let every = Duration::from_millis(nemesis_common::maps::LC_REFRESH_MS);
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(dp) = dp.upgrade() else { return };
                    match tokio::task::spawn_blocking(move || dp.refresh_least_loaded()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => {
                            tracing::warn!(error = %services::error_chain(&err), "refreshing the least-connections candidates failed; retried at the next tick")
                        }
                        Err(err) => {
                            tracing::warn!(%err, "the least-connections refresh stopped");
                            return;
                        }
                    }
                }
            }
        };

        drop(datapath);

        // The kube-proxy skip rule (opt-in): installed now that the programs mark
        // balanced connects, and put back ahead of kube-proxy's jump if it moved.
        let keep_skip_rule = async move {
            let Some(skip) = skip else { return };
            let mut tick = tokio::time::interval(kube_proxy_skip::REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let skip = skip.clone();
                let Ok(results) = tokio::task::spawn_blocking(move || skip.ensure()).await else {
                    return;
                };
                log_skip_results(&results, "installed");
            }
        };

        // ScalingPolicies + Services -> managed rows in the table and the datapath.
        let watch_services = {
            let managed = managed.clone();
            let registry = registry.clone();
            let readiness = readiness.clone();
            async move {
                let ready = readiness.clone();
                let explain = readiness.clone();
                let result = services::watch_managed_services(
                    kube,
                    registry,
                    managed,
                    move || {
                        ready.set("services", true);
                        services_synced.send_replace(true);
                        tracing::info!("managed Services synced");
                    },
                    move |why| explain.explain("services", why),
                )
                .await;
                if let Err(err) = result {
                    tracing::error!(error = %services::error_chain(&err), "the managed-Service watch stopped");
                    readiness.set("services", false);
                }
            }
        };

        // Datapath counters -> metrics (and so heartbeat reports).
        let refresh_counters = async move {
            let mut tick = tokio::time::interval(COUNTERS_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(err) = managed.refresh_counters() {
                    tracing::debug!(error = %services::error_chain(&err), "datapath counters not refreshed");
                }
            }
        };

        // The proxy accepts once it knows the managed Services and their endpoints:
        // before that it could only close a held connection as unknown. Meanwhile the
        // kernel queues them. Bounded, so that a cluster that never answers costs a
        // clean close rather than clients waiting on a queue forever.
        let open_proxy = {
            let registry = registry.clone();
            async move {
                let synced = async {
                    let _ = services_synced_rx.wait_for(|s| *s).await;
                    registry.synced().await;
                };
                if tokio::time::timeout(SYNC_WAIT_MAX, synced).await.is_err() {
                    tracing::warn!(after = ?SYNC_WAIT_MAX, "Services or EndpointSlices not synced yet; the proxy accepts anyway");
                }
                serving.send_replace(true);
                std::future::pending::<()>().await;
            }
        };

        // Balance mode: this node's per-backend load out, the other nodes' in.
        let exchange_loads = {
            let client = controller.clone();
            let services = dp_services.clone();
            let node = node.clone();
            let balance = args.direct_mode == DirectMode::Balance;
            async move {
                let (Some(client), true) = (client, balance) else {
                    return;
                };
                crate::loads::LoadExchange {
                    client,
                    node,
                    services,
                    every: crate::loads::LOAD_REPORT_INTERVAL,
                    metrics: proxy_metrics,
                }
                .run()
                .await
            }
        };

        let report = {
            let modes = modes.clone();
            let interval = args.controller_heartbeat_interval;
            let ready = readiness.clone();
            async move {
                let Some(client) = controller else {
                    tracing::warn!(
                        "no --controller-url: held Services are not woken by this agent"
                    );
                    return;
                };
                Heartbeats {
                    client,
                    node,
                    instance: random_instance(),
                    interval,
                    backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
                    addresses: holds.addresses().to_vec(),
                    ready,
                    reports: Arc::new(AgentReports {
                        table,
                        modes: modes.clone(),
                        proxy,
                        datapath: counters,
                        holds: holds.clone(),
                    }),
                    directives: Arc::new(AgentDirectives {
                        modes: modes.clone(),
                        holds,
                    }),
                    kick: modes.changed.clone(),
                }
                .run()
                .await
            }
        };

        Ok(async move {
            let _lock = lock;
            tokio::join!(
                deadman,
                follow_backends,
                watch_services,
                reconcile_counts,
                refresh_candidates,
                keep_skip_rule,
                exchange_loads,
                host_addresses,
                refresh_counters,
                open_proxy,
                modes.run(),
                report
            );
        })
    }
}

impl Agent {
    /// Starts every part of the agent against the API server of `client`: binds the
    /// proxy and admin listeners first (SO_REUSEPORT: a predecessor may still listen
    /// there), starts the admin server and the EndpointSlice watch, then takes the
    /// writer lock of the datapath: at once if no other agent of this instance runs,
    /// loading or adopting the datapath and starting the writers before returning; else
    /// in the background, standing by (listening, queueing, not accepting) until the
    /// other agent lets go (see `handover`).
    pub async fn start(args: &RunArgs, client: kube::Client) -> Result<Agent, AgentError> {
        let node = node_name(args)?;
        let controller = match (&args.controller_url, &args.agent_token_file) {
            (Some(url), Some(token_file)) => {
                // Checked once here so a wrong path fails the start, then read for
                // every call (the kubelet rotates a projected token in place).
                read_token(token_file)?;
                if args.controller_ca_file.is_none() {
                    tracing::warn!(
                        "no --controller-ca-file: the agent's token goes to the controller over plain HTTP"
                    );
                }
                Some(ControllerClient::with_token_file(
                    url,
                    token_file,
                    args.controller_ca_file.as_deref(),
                    DEFAULT_CALL_TIMEOUT,
                )?)
            }
            (Some(_), None) => return Err(AgentError::MissingToken),
            (None, _) => None,
        };

        match handover::enable_listener_migration(Path::new(handover::TCP_MIGRATE_REQ)) {
            Migration::AlreadyOn => {
                tracing::debug!("net.ipv4.tcp_migrate_req is on")
            }
            Migration::TurnedOn => tracing::info!(
                "net.ipv4.tcp_migrate_req turned on: a closing agent's queued connections move to the next one"
            ),
            Migration::Unavailable(why) => tracing::warn!(
                %why,
                "net.ipv4.tcp_migrate_req is off and cannot be turned on: connections queued at this agent's proxy when it stops are reset instead of moving to the next agent (set it on the host, e.g. in the DaemonSet's privileged init container)"
            ),
        }

        // The writer lock, tried once now: free unless another agent of this instance
        // runs (then this one stands by, see below). Tried before binding: only such a
        // successor may share its predecessor's ports.
        let mut cfg = args.datapath.to_config();
        cfg.kube_proxy_skip_mark = args.kube_proxy_skip_mark.unwrap_or(0);
        let skip = match args.kube_proxy_skip_mark {
            Some(mark) => Some(Arc::new(SkipRule::new(
                mark,
                &args.kube_proxy_skip.kube_proxy_skip_commands,
            )?)),
            None => None,
        };
        let lock_dir = writer_lock_dir(&cfg);
        let lock = match &lock_dir {
            Some(dir) => WriterLock::try_acquire(dir)?,
            None => None,
        };
        let standby = lock.is_none() && lock_dir.is_some();
        if !standby {
            // SO_REUSEPORT lets any process of the same user share a port silently; an
            // agent that is nobody's successor must find its ports free, or it would
            // split connections (and health probes) with a stranger.
            let v4 = SocketAddr::V4(args.datapath.proxy_v4);
            proxy::ensure_unused(v4)
                .map_err(|source| proxy::ProxyError::Bind { addr: v4, source })?;
            if let Some(v6) = args.proxy_v6() {
                let v6 = SocketAddr::V6(v6);
                proxy::ensure_unused(v6)
                    .map_err(|source| proxy::ProxyError::Bind { addr: v6, source })?;
            }
            proxy::ensure_unused(args.admin_listen).map_err(|source| AgentError::BindAdmin {
                addr: args.admin_listen,
                source,
            })?;
        }

        // The proxy listeners: bound before the datapath redirects anything to them.
        let v4 = proxy::bind(SocketAddr::V4(args.datapath.proxy_v4))?;
        let v4_addr = match v4.local_addr().map_err(AgentError::ProxyAddr)? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound from an IPv4 address"),
        };
        let v6 = match args.proxy_v6() {
            Some(a) => Some(proxy::bind(SocketAddr::V6(a))?),
            None => None,
        };
        let v6_addr: Option<SocketAddrV6> = match &v6 {
            Some(l) => match l.local_addr().map_err(AgentError::ProxyAddr)? {
                SocketAddr::V6(a) => Some(a),
                SocketAddr::V4(_) => unreachable!("bound from an IPv6 address"),
            },
            None => None,
        };
        let admin_listener = bind_admin(args.admin_listen)?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| AgentError::BindAdmin {
                addr: args.admin_listen,
                source,
            })?;

        cfg.proxy_v4 = Some(v4_addr);
        cfg.proxy_v6 = v6_addr;

        // A standing-by agent is ready once it knows the endpoints: it listens, and it
        // takes over the instant the other agent lets go (a DaemonSet update waits for
        // this before stopping the old agent). "datapath" and "services" join then; an
        // active agent has them from the start, so it is never ready before its load.
        let readiness = Readiness::new();
        readiness.set("proxy", true);
        readiness.set("endpoints", false);
        if !standby {
            readiness.set("datapath", false);
            readiness.set("services", false);
        }

        let late: LateDatapath = Arc::new(OnceLock::new());
        let strong = Arc::new(OnceLock::new());
        let mut metrics = Metrics::new();
        metrics
            .registry_mut()
            .register_collector(Box::new(DatapathErrors(late.clone())));
        metrics
            .registry_mut()
            .register_collector(Box::new(CountCorrections(late.clone())));
        let table = ServiceTable::new();
        let registry = EndpointRegistry::new();
        let mut proxy_config = ProxyConfig::new(node.clone());
        proxy_config.max_held_total = args.max_held_total;
        let proxy = Proxy::new(
            proxy_config,
            table.clone(),
            registry.clone(),
            Arc::new(DatapathDestinations(late.clone())),
            controller.clone(),
            metrics.proxy.clone(),
        );
        let proxy_metrics = metrics.proxy.clone();
        let counters = metrics.datapath.clone();
        let udp_hold = metrics.udp_hold.0.clone();
        let http_rejected = metrics.http_rejected.clone();
        let registry_text = metrics.into_registry();

        let (stop, _) = watch::channel(false);
        let (serving, _) = watch::channel(false);
        let mut listeners = Vec::new();
        let mut tasks = Vec::new();

        // EndpointSlices -> ready backends. Read-only, so a standby agent runs it too.
        {
            let client = client.clone();
            let registry = registry.clone();
            let readiness = readiness.clone();
            tasks.push(tokio::spawn(async move {
                let explain = readiness.clone();
                let watch =
                    endpoints::watch_endpoint_slices(client, registry.clone(), move |why| {
                        explain.explain("endpoints", why)
                    });
                tokio::pin!(watch);
                let result = tokio::select! {
                    r = &mut watch => r,
                    () = registry.synced() => {
                        readiness.set("endpoints", true);
                        watch.await
                    }
                };
                if let Err(err) = result {
                    tracing::error!(%err, "the EndpointSlice watch stopped");
                    readiness.set("endpoints", false);
                }
            }));
        }

        for listener in std::iter::once(v4).chain(v6) {
            let proxy = proxy.clone();
            let stopped = stopped(&stop);
            let mut serving = serving.subscribe();
            listeners.push(tokio::spawn(async move {
                // Listening from the start (the kernel queues connects), accepting once
                // the writer says so; dropping `serve` closes the listener, and the
                // connections already accepted run on.
                let serve = async {
                    if serving.wait_for(|s| *s).await.is_ok() {
                        proxy.serve(listener).await;
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            }));
        }

        {
            let state = AdminState {
                registry: registry_text,
                readiness: readiness.clone(),
                http_rejected,
            };
            let stopped = stopped(&stop);
            listeners.push(tokio::spawn(async move {
                if let Err(err) = admin::serve(admin_listener, state, stopped).await {
                    tracing::error!(%err, "the admin server stopped");
                }
            }));
        }

        let holds = HoldListeners::new(
            proxy.clone(),
            table.clone(),
            args.hold_addresses(),
            serving.subscribe(),
        );
        let parts = WriterParts {
            args: args.clone(),
            cfg: cfg.clone(),
            node: node.clone(),
            zone: crate::zone::resolve(args.zone.as_deref(), &client, &node).await,
            kube: client,
            controller,
            table,
            registry,
            proxy: proxy.clone(),
            proxy_metrics,
            counters,
            udp_hold,
            readiness: readiness.clone(),
            strong: strong.clone(),
            late,
            serving,
            holds,
            skip: skip.clone(),
        };
        let (failed_tx, failed) = oneshot::channel();
        let writer = match (lock, lock_dir) {
            (Some(lock), _) => tokio::spawn(parts.activate(Some(lock))?),
            // Nothing to lock: the load fails and says why.
            (None, None) => tokio::spawn(parts.activate(None)?),
            (None, Some(dir)) => {
                tracing::info!(
                    pin_dir = %dir.display(),
                    "another agent of this instance runs: standing by (listening, not accepting) until it hands over"
                );
                tokio::spawn(async move {
                    let lock = match WriterLock::acquire(&dir).await {
                        Ok(lock) => lock,
                        Err(err) => {
                            let _ = failed_tx.send(err.into());
                            return;
                        }
                    };
                    tracing::info!("the other agent handed over: taking the datapath");
                    match parts.activate(Some(lock)) {
                        Ok(writers) => writers.await,
                        Err(err) => {
                            let _ = failed_tx.send(err);
                        }
                    }
                })
            }
        };

        let proxy_addrs: Vec<SocketAddr> = std::iter::once(SocketAddr::V4(v4_addr))
            .chain(v6_addr.map(SocketAddr::V6))
            .collect();
        tracing::info!(
            node = %node,
            admin = %admin_addr,
            proxy = ?proxy_addrs,
            active = strong.get().is_some(),
            "agent started"
        );
        Ok(Agent {
            admin_addr,
            proxy_addrs,
            stop,
            listeners,
            writer,
            tasks,
            datapath: strong,
            proxy,
            readiness,
            failed: Some(failed),
            detach_on_exit: args.detach_on_exit,
            shutdown_grace: args.shutdown_grace,
            skip,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The proxy's listeners (IPv4 first).
    pub fn proxy_addrs(&self) -> &[SocketAddr] {
        &self.proxy_addrs
    }

    /// The proxy's IPv4 listener, where held IPv4 connects go.
    pub fn proxy_v4(&self) -> SocketAddrV4 {
        match self.proxy_addrs[0] {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("the first proxy address is the IPv4 one"),
        }
    }

    /// Whether this agent holds the writer lock and has the datapath (false while it
    /// stands by for another agent of its instance to hand over).
    pub fn is_active(&self) -> bool {
        self.datapath.get().is_some()
    }

    /// The datapath. Panics while the agent stands by ([`Agent::is_active`] is false):
    /// until the hand-over it is another agent's.
    pub fn datapath(&self) -> &Datapath {
        self.datapath
            .get()
            .expect("the agent stands by: the datapath is still another agent's")
    }

    /// Resolves if the agent cannot go on: a standby agent failed to take over.
    pub async fn failed(&mut self) -> AgentError {
        match self.failed.take() {
            Some(rx) => match rx.await {
                Ok(err) => err,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Whether [`Agent::shutdown`] detaches the datapath (from `--detach-on-exit` at
    /// start); a test of restarts turns it off for one agent.
    pub fn set_detach_on_exit(&mut self, detach: bool) {
        self.detach_on_exit = detach;
    }

    /// How long [`Agent::shutdown`] lets the proxy's connections finish (from
    /// `--shutdown-grace` at start).
    pub fn set_shutdown_grace(&mut self, grace: Duration) {
        self.shutdown_grace = grace;
    }

    /// True once every readiness condition holds (what `/readyz` answers).
    pub fn is_ready(&self) -> bool {
        self.readiness.check().is_ok()
    }

    /// Hands over and stops, in this order: closes the listeners (connections queued
    /// there move to a next agent's, see `handover`), stops every writer of the
    /// datapath and releases the writer lock, lets connections in the proxy's hands
    /// finish for up to the shutdown grace (their endpoints are still watched), stops
    /// the rest, and detaches the datapath if asked to (else it stays attached and
    /// pinned for the next agent; held traffic is released by the dead-man switch if
    /// none comes).
    pub async fn shutdown(self) -> Result<(), AgentError> {
        let Agent {
            stop,
            listeners,
            writer,
            tasks,
            datapath,
            proxy,
            detach_on_exit,
            shutdown_grace,
            skip,
            ..
        } = self;
        stop.send_replace(true);
        for mut t in listeners {
            // The admin server finishes the requests in flight; a stuck scrape must
            // not hold the hand-over up.
            if tokio::time::timeout(LISTENER_CLOSE_MAX, &mut t)
                .await
                .is_err()
            {
                t.abort();
                let _ = t.await;
            }
        }
        // The skip rule goes while this agent still holds the writer lock: a successor
        // installs its own once it has the lock, and this removal cannot undo it.
        // Removing it is always safe (balanced connects only walk kube-proxy's list
        // again, matching nothing).
        if let Some(skip) = skip
            && let Ok(results) = tokio::task::spawn_blocking(move || skip.remove()).await
        {
            log_skip_results(&results, "removed");
        }
        writer.abort();
        let _ = writer.await;
        tracing::info!("listeners closed and the datapath let go; draining");
        // HTTP connections step out at their next safe point instead of being cut at
        // the end of the grace; their clients reconnect to the next agent or direct.
        proxy.drain();
        let deadline = tokio::time::Instant::now() + shutdown_grace;
        while proxy.open_connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = proxy.open_connections();
        if left > 0 {
            tracing::warn!(
                connections = left,
                "shutdown grace over; connections still in the proxy are cut"
            );
        }
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        drop(proxy);
        if !detach_on_exit {
            tracing::info!("datapath left attached and pinned for the next agent");
            return Ok(());
        }
        let Some(mut datapath) = Arc::try_unwrap(datapath)
            .ok()
            .and_then(OnceLock::into_inner)
        else {
            tracing::info!("this agent never held the datapath: nothing to detach");
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + DETACH_WAIT;
        let dp = loop {
            match Arc::try_unwrap(datapath) {
                Ok(dp) => break dp,
                Err(shared) if tokio::time::Instant::now() < deadline => {
                    datapath = shared;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(_) => return Err(AgentError::DatapathInUse { after: DETACH_WAIT }),
            }
        };
        let report = dp.detach().map_err(|e| AgentError::Detach(Box::new(e)))?;
        tracing::info!(
            links = report.links_removed.len(),
            maps = report.maps_removed.len(),
            "datapath detached and unpinned"
        );
        Ok(())
    }
}

/// Logs what [`SkipRule::ensure`] or [`SkipRule::remove`] did per command.
fn log_skip_results(results: &[(String, Result<kube_proxy_skip::Plan, SkipError>)], done: &str) {
    for (command, result) in results {
        match result {
            Ok(plan) if plan.insert || !plan.delete.is_empty() => tracing::info!(
                %command,
                inserted = plan.insert,
                deleted = plan.delete.len(),
                "kube-proxy skip rule {done}"
            ),
            Ok(_) => {}
            Err(err) => tracing::warn!(
                %command,
                error = %services::error_chain(err),
                "the kube-proxy skip rule could not be written: balanced connects still walk kube-proxy's rules (correct, only slower)"
            ),
        }
    }
}

/// `nemesis-agent run`: the agent against the cluster of the ambient kube config, until
/// SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> Result<(), AgentError> {
    let client = kube::Client::try_default()
        .await
        .map_err(AgentError::KubeClient)?;
    let mut agent = Agent::start(&args, client).await?;
    tokio::select! {
        signal = shutdown_signal() => signal?,
        err = agent.failed() => return Err(err),
    }
    tracing::info!("shutting down");
    agent.shutdown().await
}

async fn shutdown_signal() -> Result<(), AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|source| AgentError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| AgentError::Signal {
        signal: "SIGINT",
        source,
    })?;
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
