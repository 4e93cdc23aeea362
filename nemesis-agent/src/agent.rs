//! The agent as one program: the eBPF datapath, the proxy listener(s), the EndpointSlice
//! and managed-Service watches, the mode follower that drives the datapath's modes, the
//! controller client (wake-ups, heartbeats, directives), the dead-man heartbeat and the
//! admin server, started in order and stopped gracefully. Owns composition and
//! lifecycle only; every decision lives in the modules it wires together.
#![deny(unsafe_code)]

use crate::admin::{self, AdminState, Readiness};
use crate::config::RunArgs;
use crate::control::{
    AgentReports, ControlError, ControllerClient, DEFAULT_CALL_TIMEOUT, Heartbeats,
};
use crate::ebpf::{Datapath, LoadError};
use crate::endpoints::{self, EndpointRegistry};
use crate::metrics::Metrics;
use crate::proxy::{
    self, Backoff, ModeFollower, OriginalDestinations, Proxy, ProxyConfig, ProxyError, ServiceTable,
};
use crate::services::{self, DatapathServices, ManagedServices};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the eBPF counters are copied into the metrics and heartbeat reports: a
/// scrape or a report sees counts at most this old.
pub const COUNTERS_INTERVAL: Duration = Duration::from_millis(500);
/// After the last task is stopped, how long a detach waits for a straggling holder of
/// the datapath (a scrape in flight) before it gives up.
const DETACH_WAIT: Duration = Duration::from_secs(2);

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
    #[error("installing the {signal} handler")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The proxy's view of original destinations: the datapath's, held weakly so that a
/// connection task that outlives the agent never keeps the programs attached.
struct DatapathDestinations(Weak<Datapath>);

impl OriginalDestinations for DatapathDestinations {
    fn lookup(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.0.upgrade()?.original_destination(peer).map(|o| o.addr)
    }
}

/// The programs' fail-open counters, read at scrape time, as
/// `nemesis_agent_datapath_errors_total{kind}` (kinds from a fixed list).
#[derive(Debug)]
struct DatapathErrors(Weak<Datapath>);

impl Collector for DatapathErrors {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(counters) = self.0.upgrade().and_then(|dp| dp.error_counters().ok()) else {
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
    tasks: Vec<JoinHandle<()>>,
    datapath: Arc<Datapath>,
    proxy: Proxy,
    readiness: Arc<Readiness>,
    detach_on_exit: bool,
    shutdown_grace: Duration,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("admin_addr", &self.admin_addr)
            .field("proxy_addrs", &self.proxy_addrs)
            .field("datapath", &self.datapath)
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

impl Agent {
    /// Starts every part of the agent against the API server of `client`: binds the
    /// proxy listener(s) first (so the datapath is told their real ports), loads or
    /// adopts the datapath, then starts the watches, the proxy, the mode follower, the
    /// controller loop and the admin server.
    pub async fn start(args: &RunArgs, client: kube::Client) -> Result<Agent, AgentError> {
        let node = node_name(args)?;
        let controller = match (&args.controller_url, &args.agent_token_file) {
            (Some(url), Some(token_file)) => Some(ControllerClient::new(
                url,
                read_token(token_file)?,
                DEFAULT_CALL_TIMEOUT,
            )?),
            (Some(_), None) => return Err(AgentError::MissingToken),
            (None, _) => None,
        };

        // The proxy listeners: bound before the datapath redirects anything to them.
        let v4 = proxy::bind(SocketAddr::V4(args.datapath.proxy_v4))?;
        let v4_addr = match v4.local_addr().map_err(AgentError::ProxyAddr)? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound from an IPv4 address"),
        };
        let v6 = match args.datapath.proxy_v6 {
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
        let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
            .await
            .map_err(|source| AgentError::BindAdmin {
                addr: args.admin_listen,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| AgentError::BindAdmin {
                addr: args.admin_listen,
                source,
            })?;

        let mut cfg = args.datapath.to_config();
        cfg.proxy_v4 = Some(v4_addr);
        cfg.proxy_v6 = v6_addr;
        let datapath = Arc::new(
            Datapath::load_or_adopt(&cfg).map_err(|e| AgentError::LoadDatapath(Box::new(e)))?,
        );

        let readiness = Readiness::new();
        readiness.set("datapath", true);
        readiness.set("proxy", true);
        readiness.set("endpoints", false);
        readiness.set("services", false);

        let mut metrics = Metrics::new();
        metrics
            .registry_mut()
            .register_collector(Box::new(DatapathErrors(Arc::downgrade(&datapath))));
        let table = ServiceTable::new();
        let registry = EndpointRegistry::new();
        let dp_services = DatapathServices::new(&datapath, registry.clone());
        let managed = ManagedServices::new(
            table.clone(),
            dp_services.clone(),
            metrics.proxy.clone(),
            metrics.datapath.clone(),
        );
        let modes = ModeFollower::new(table.clone(), registry.clone(), dp_services.clone());
        let mut proxy_config = ProxyConfig::new(node.clone());
        proxy_config.max_held_total = args.max_held_total;
        let proxy = Proxy::new(
            proxy_config,
            table.clone(),
            registry.clone(),
            Arc::new(DatapathDestinations(Arc::downgrade(&datapath))),
            controller.clone(),
            metrics.proxy.clone(),
        );
        let counters = metrics.datapath.clone();
        let registry_text = metrics.into_registry();

        let (stop, _) = watch::channel(false);
        let mut tasks = Vec::new();

        // The dead-man heartbeat: while this beats, hold-mode redirects stay on.
        {
            let dp = Arc::downgrade(&datapath);
            let interval = args.heartbeat_interval;
            tasks.push(tokio::spawn(async move {
                let mut beat = tokio::time::interval(interval);
                beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    beat.tick().await;
                    let Some(dp) = dp.upgrade() else { return };
                    if let Err(error) = dp.heartbeat() {
                        tracing::warn!(error = %services::error_chain(&error), "heartbeat failed; held traffic is released once it is stale");
                    }
                }
            }));
        }

        // EndpointSlices -> ready backends.
        {
            let client = client.clone();
            let registry = registry.clone();
            let readiness = readiness.clone();
            tasks.push(tokio::spawn(async move {
                let watch = endpoints::watch_endpoint_slices(client, registry.clone());
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

        // ScalingPolicies + Services -> managed rows in the table and the datapath.
        {
            let readiness = readiness.clone();
            let managed = managed.clone();
            let registry = registry.clone();
            tasks.push(tokio::spawn(async move {
                let ready = readiness.clone();
                let result =
                    services::watch_managed_services(client, registry, managed, move || {
                        ready.set("services", true);
                        tracing::info!("managed Services synced");
                    })
                    .await;
                if let Err(err) = result {
                    tracing::error!(error = %services::error_chain(&err), "the managed-Service watch stopped");
                    readiness.set("services", false);
                }
            }));
        }

        // Datapath counters -> metrics (and so heartbeat reports).
        {
            let managed = managed.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(COUNTERS_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(err) = managed.refresh_counters() {
                        tracing::debug!(error = %services::error_chain(&err), "datapath counters not refreshed");
                    }
                }
            }));
        }

        tasks.push(tokio::spawn(modes.clone().run()));

        for listener in std::iter::once(v4).chain(v6) {
            let proxy = proxy.clone();
            let stopped = stopped(&stop);
            tasks.push(tokio::spawn(async move {
                // Dropping `serve` closes the listener; accepted connections run on.
                tokio::select! {
                    _ = proxy.serve(listener) => {}
                    _ = stopped => {}
                }
            }));
        }

        if let Some(client) = controller {
            let heartbeats = Heartbeats {
                client,
                node: node.clone(),
                instance: random_instance(),
                interval: args.controller_heartbeat_interval,
                backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
                reports: Arc::new(AgentReports {
                    table: table.clone(),
                    modes: modes.clone(),
                    proxy: proxy.clone(),
                    datapath: counters,
                }),
                directives: modes.clone(),
                kick: modes.changed.clone(),
            };
            tasks.push(tokio::spawn(heartbeats.run()));
        } else {
            tracing::warn!("no --controller-url: held Services are not woken by this agent");
        }

        {
            let state = AdminState {
                registry: registry_text,
                readiness: readiness.clone(),
            };
            let stopped = stopped(&stop);
            tasks.push(tokio::spawn(async move {
                if let Err(err) = admin::serve(admin_listener, state, stopped).await {
                    tracing::error!(%err, "the admin server stopped");
                }
            }));
        }

        let proxy_addrs: Vec<SocketAddr> = std::iter::once(SocketAddr::V4(v4_addr))
            .chain(v6_addr.map(SocketAddr::V6))
            .collect();
        tracing::info!(
            node = %node,
            admin = %admin_addr,
            proxy = ?proxy_addrs,
            cgroup = %datapath.cgroup().display(),
            pin_dir = %datapath.pin_dir().display(),
            "agent started"
        );
        Ok(Agent {
            admin_addr,
            proxy_addrs,
            stop,
            tasks,
            datapath,
            proxy,
            readiness,
            detach_on_exit: args.detach_on_exit,
            shutdown_grace: args.shutdown_grace,
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

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// Whether [`Agent::shutdown`] detaches the datapath (from `--detach-on-exit` at
    /// start); a test of restarts turns it off for one agent.
    pub fn set_detach_on_exit(&mut self, detach: bool) {
        self.detach_on_exit = detach;
    }

    /// True once every readiness condition holds (what `/readyz` answers).
    pub fn is_ready(&self) -> bool {
        self.readiness.check().is_ok()
    }

    /// Stops accepting, lets connections in the proxy's hands finish for up to the
    /// shutdown grace, stops every loop, and detaches the datapath if asked to (else it
    /// stays attached and pinned for the next agent; held traffic is released by the
    /// dead-man switch if none comes).
    pub async fn shutdown(self) -> Result<(), AgentError> {
        let Agent {
            stop,
            tasks,
            datapath,
            proxy,
            detach_on_exit,
            shutdown_grace,
            ..
        } = self;
        stop.send_replace(true);
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
        let mut datapath = datapath;
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

/// `nemesis-agent run`: the agent against the cluster of the ambient kube config, until
/// SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> Result<(), AgentError> {
    let client = kube::Client::try_default()
        .await
        .map_err(AgentError::KubeClient)?;
    let agent = Agent::start(&args, client).await?;
    shutdown_signal().await?;
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
