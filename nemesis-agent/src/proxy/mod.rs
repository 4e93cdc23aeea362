//! The buffering proxy: accepts the connections the eBPF hook sent here because their
//! Service is at zero, wakes the Service once (single flight), holds the connections with
//! what their clients already sent, splices them to the first ready backends, and steps
//! HTTP connections out once their Service goes direct (`relay`). Owns holding and
//! forwarding; never changes which Services are managed or held (see `mode`).
#![deny(unsafe_code)]

mod backend;
pub mod backoff;
mod conn;
pub mod drain;
mod hold;
mod http1;
mod http2;
pub mod mode;
mod refuse;
mod relay;
pub mod sleep_gate;
pub mod sniff;
mod splice;
pub mod table;
pub mod udp_wake;
mod wake;

pub use backoff::Backoff;
pub use drain::{Drain, Want};
pub use mode::{ModeFollower, ModeSink, ModeSinkError, decide_hold};
pub use relay::{ProtocolFollower, Step as FollowStep};
pub use sleep_gate::SleepGates;
pub use table::{
    HoldBounds, ManagedPort, ServiceTable, TableError, service_ports, udp_service_ports,
};

use crate::control::ControllerClient;
use crate::endpoints::EndpointRegistry;
use crate::metrics::ProxyMetrics;
use nemesis_common::wire::ServiceRef;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};

/// Where a connection was going before the hook sent it to the proxy.
pub trait OriginalDestinations: Send + Sync + 'static {
    /// The ClusterIP:port the client at `peer` (the accepted socket's remote address)
    /// dialled; `None` when unknown (the connection is then closed and counted).
    fn lookup(&self, peer: SocketAddr) -> Option<SocketAddr>;
}

/// Every connection went to one destination: for a proxy listener dedicated to one
/// Service port, and for tests and benches that run without the eBPF datapath.
#[derive(Debug, Clone, Copy)]
pub struct FixedDestination(pub SocketAddr);

impl OriginalDestinations for FixedDestination {
    fn lookup(&self, _peer: SocketAddr) -> Option<SocketAddr> {
        Some(self.0)
    }
}

/// Held connections per agent: each costs a socket and a few hundred bytes while idle;
/// 16k keeps a node's worst burst well inside the default fd limits we raise to.
pub const DEFAULT_MAX_HELD_TOTAL: usize = 16 * 1024;
/// One dial of a backend: pods are on the node's network, a SYN unanswered this long is
/// a pod that is not there.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a refused connection is read to recognise an HTTP/1 request line.
pub const DEFAULT_SNIFF_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a closing connection is drained for its peer's FIN.
pub const DEFAULT_CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Re-send an accepted wake-up this often while connections are still held, in case the
/// controller lost it (restart, leader change).
pub const DEFAULT_WAKE_REFRESH: Duration = Duration::from_secs(30);
/// Listen backlog of the proxy socket: a burst of held connects must not be dropped by
/// the kernel before the proxy accepts them (the kernel caps it at somaxconn).
pub const LISTEN_BACKLOG: u32 = 8192;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// This node's name, sent with wake-ups.
    pub node: String,
    pub max_held_total: usize,
    pub connect_timeout: Duration,
    /// Between dials of backends that refuse (ready before listening).
    pub connect_backoff: Backoff,
    /// Between failed wake-up calls.
    pub wake_backoff: Backoff,
    pub wake_refresh: Duration,
    pub sniff_timeout: Duration,
    pub close_linger: Duration,
}

impl ProxyConfig {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            max_held_total: DEFAULT_MAX_HELD_TOTAL,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            // A process that is ready but not yet listening is usually milliseconds away.
            connect_backoff: Backoff::new(Duration::from_millis(10), Duration::from_secs(1)),
            wake_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            wake_refresh: DEFAULT_WAKE_REFRESH,
            sniff_timeout: DEFAULT_SNIFF_TIMEOUT,
            close_linger: DEFAULT_CLOSE_LINGER,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("binding the proxy listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) table: Arc<ServiceTable>,
    pub(crate) endpoints: Arc<EndpointRegistry>,
    pub(crate) destinations: Arc<dyn OriginalDestinations>,
    pub(crate) controller: Option<ControllerClient>,
    pub(crate) metrics: ProxyMetrics,
    pub(crate) holds: Arc<hold::Holds>,
    pub(crate) backends: Arc<backend::BackendLoad>,
    /// The directive epochs applied per Service (the mode follower, once the agent
    /// wires it): a wake-up flight reports the one in force when it began.
    pub(crate) applied_epochs: std::sync::OnceLock<Arc<dyn AppliedEpochs>>,
}

/// Where the proxy reads the directive epoch applied for a Service.
pub trait AppliedEpochs: Send + Sync + 'static {
    fn applied_epoch(&self, service: &ServiceRef) -> Option<u64>;
}

impl AppliedEpochs for mode::ModeFollower {
    fn applied_epoch(&self, service: &ServiceRef) -> Option<u64> {
        self.applied(service).map(|(_, epoch)| epoch)
    }
}

/// The proxy; cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Bind the proxy's listening socket with a backlog for bursts. SO_REUSEPORT: during a
/// hand-over the next agent listens on the same address beside this one, and the
/// connections queued here when this listener closes move to it (see `handover`). A
/// port-0 bind never joins another socket's group: the kernel picks a port no
/// SO_REUSEPORT socket holds.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().map_err(|source| ProxyError::Bind { addr, source })
}

/// Fails with `AddrInUse` when something already listens on `addr` (port 0: never).
/// The listeners are SO_REUSEPORT for hand-overs, and the kernel lets any socket of the
/// same user join such a group, so an agent that is no one's successor checks first
/// that it would not be sharing its port with a stranger.
pub fn ensure_unused(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    // A plain bind (no SO_REUSEPORT) conflicts with any listener on the address.
    std::net::TcpListener::bind(addr).map(drop)
}

impl Proxy {
    /// `controller: None` runs without wake-ups (Services wake by other means).
    pub fn new(
        config: ProxyConfig,
        table: Arc<ServiceTable>,
        endpoints: Arc<EndpointRegistry>,
        destinations: Arc<dyn OriginalDestinations>,
        controller: Option<ControllerClient>,
        metrics: ProxyMetrics,
    ) -> Self {
        let holds = hold::Holds::new(config.max_held_total, metrics.clone());
        Self {
            shared: Arc::new(Shared {
                config,
                table,
                endpoints,
                destinations,
                controller,
                metrics,
                holds,
                backends: Arc::new(backend::BackendLoad::default()),
                applied_epochs: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Where wake-ups read the directive epoch applied for their Service (set once;
    /// without it they carry none, and the controller counts every one as demand).
    pub fn report_applied_epochs(&self, epochs: Arc<dyn AppliedEpochs>) {
        let _ = self.shared.applied_epochs.set(epochs);
    }

    /// Accept connections forever, each in a task of its own. Dropping this future stops
    /// accepting; connections already accepted run on.
    pub async fn serve(&self, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tokio::spawn(conn::handle(self.shared.clone(), stream, peer));
                }
                Err(err) => {
                    // Out of fds or memory: back off instead of spinning; the kernel keeps
                    // the connection in the backlog meanwhile.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// As [`Proxy::serve`], for a listener dedicated to one Service port (a hold
    /// listener): every connection is taken as dialled to `destination`, the Service
    /// port's ClusterIP:port.
    pub async fn serve_to(&self, listener: TcpListener, destination: SocketAddr) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tokio::spawn(conn::handle_to(
                        self.shared.clone(),
                        stream,
                        peer,
                        Some(destination),
                    ));
                }
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Every forwarded connection steps out at its next safe point (an HTTP/1 response
    /// with `Connection: close`, an HTTP/2 GOAWAY; an idle HTTP/1 connection is closed),
    /// whatever its Service: the agent is stopping, and its clients' next connects go to
    /// the next agent or direct. Other protocols keep their connections until they end.
    pub fn drain(&self) {
        self.shared.table.drain().shutdown();
    }

    /// Connections held for a Service right now.
    pub fn held(&self, service: &ServiceRef) -> usize {
        self.shared.holds.held(service)
    }

    /// Connections taken into hold for `service` since the agent started.
    pub fn holds_total(&self, service: &ServiceRef) -> u64 {
        self.shared.metrics.holds_total(service)
    }

    /// Connections refused at a held-connection bound for `service` since the agent
    /// started.
    pub fn holds_refused_total(&self, service: &ServiceRef) -> u64 {
        self.shared.metrics.holds_refused_total(service)
    }

    /// The proxy's errors for `service` since the agent started.
    pub fn errors_total(&self, service: &ServiceRef) -> nemesis_common::wire::ProxyErrors {
        self.shared.metrics.errors_total(service)
    }

    /// Connections held for all Services right now.
    pub fn held_total(&self) -> usize {
        self.shared.holds.total()
    }

    /// Client connections in the proxy's hands (held, being refused or forwarded).
    pub fn open_connections(&self) -> i64 {
        self.shared.metrics.open.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_another_reuseport_listener_holds_is_reported_in_use() {
        // What a stranger's SO_REUSEPORT listener looks like: bind() would silently join it.
        let stranger = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = stranger.local_addr().unwrap();
        let err = ensure_unused(addr).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        drop(stranger);
        ensure_unused(addr).unwrap();
        ensure_unused("127.0.0.1:0".parse().unwrap()).unwrap();
    }
}
