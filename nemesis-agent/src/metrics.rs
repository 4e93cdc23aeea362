//! The agent's Prometheus metrics (prometheus-client): the proxy's families and the eBPF
//! datapath's per-Service counters. Owns names, help texts and label sets (all bounded:
//! a Service label only for managed Services, outcomes and directions from fixed enums);
//! never serves them (see `admin`).
#![deny(unsafe_code)]

use nemesis_common::wire::ServiceRef;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

/// How a connection accepted by the proxy ended its time in the proxy's hands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Connected to a ready backend and spliced.
    Forwarded,
    /// The hold budget ran out before a backend was ready.
    Timeout,
    /// Refused because the Service's or the agent's held-connection bound was reached.
    Overflow,
    /// The client closed or reset while held.
    ClientGone,
    /// The original destination is not a managed Service (or could not be recovered, or
    /// the controller rejected the wake-up: no policy manages it).
    UnknownDestination,
    /// Ready backends existed but none accepted a connection within the hold budget.
    BackendFailed,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Forwarded,
        Outcome::Timeout,
        Outcome::Overflow,
        Outcome::ClientGone,
        Outcome::UnknownDestination,
        Outcome::BackendFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Timeout => "timeout",
            Outcome::Overflow => "overflow",
            Outcome::ClientGone => "client_gone",
            Outcome::UnknownDestination => "unknown_destination",
            Outcome::BackendFailed => "backend_failed",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// Which way proxied bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    ClientToBackend,
    BackendToClient,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Direction::ClientToBackend => "client_to_backend",
            Direction::BackendToClient => "backend_to_client",
        })
    }
}

/// The protocol of a forwarded connection the proxy followed to step it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
}

/// How a forwarded connection stepped out of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepOut {
    /// `Connection: close` on the response in flight, the connection closed after it.
    ConnectionClose,
    /// Closed while waiting for its next request (the agent stopping).
    IdleClose,
    /// An HTTP/2 GOAWAY once no stream was open.
    Goaway,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
        }
    }
}

impl StepOut {
    pub const ALL: [StepOut; 3] = [
        StepOut::ConnectionClose,
        StepOut::IdleClose,
        StepOut::Goaway,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepOut::ConnectionClose => "connection_close",
            StepOut::IdleClose => "idle_close",
            StepOut::Goaway => "goaway",
        }
    }

    /// The protocol that ends this way.
    pub fn protocol(self) -> Protocol {
        match self {
            StepOut::ConnectionClose | StepOut::IdleClose => Protocol::Http1,
            StepOut::Goaway => Protocol::Http2,
        }
    }
}

impl EncodeLabelValue for Protocol {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for StepOut {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StepOutLabels {
    pub protocol: Protocol,
    pub how: StepOut,
}

/// What answered a wake-up request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WakeResult {
    Accepted,
    Rejected,
    Failed,
}

impl EncodeLabelValue for WakeResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            WakeResult::Accepted => "accepted",
            WakeResult::Rejected => "rejected",
            WakeResult::Failed => "failed",
        })
    }
}

/// How one exchange of balance mode's loads with the controller went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoadExchangeResult {
    /// The controller took this node's loads and answered the other nodes'.
    Ok,
    /// The call failed (unreachable, refused, bad reply): choices keep the last remote
    /// loads for a few seconds, then use this node's alone.
    Failed,
}

impl EncodeLabelValue for LoadExchangeResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            LoadExchangeResult::Ok => "ok",
            LoadExchangeResult::Failed => "failed",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LoadExchangeLabels {
    pub result: LoadExchangeResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub service: String,
}

impl From<&ServiceRef> for ServiceLabels {
    fn from(s: &ServiceRef) -> Self {
        Self {
            namespace: s.namespace.clone(),
            service: s.name.clone(),
        }
    }
}

/// What went wrong for the proxy between a held connection and its Service's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyErrorKind {
    /// A ready backend refused the connect (or another connect error).
    ConnectFailed,
    /// A ready backend did not answer the connect within the connect timeout.
    ConnectTimeout,
    /// A forwarded connection was reset by either side.
    Reset,
    /// A forwarded connection ended with another I/O error.
    Other,
}

impl ProxyErrorKind {
    pub const ALL: [ProxyErrorKind; 4] = [
        ProxyErrorKind::ConnectFailed,
        ProxyErrorKind::ConnectTimeout,
        ProxyErrorKind::Reset,
        ProxyErrorKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyErrorKind::ConnectFailed => "connect_failed",
            ProxyErrorKind::ConnectTimeout => "connect_timeout",
            ProxyErrorKind::Reset => "reset",
            ProxyErrorKind::Other => "other",
        }
    }

    /// The kind of a forwarded connection's I/O error.
    pub fn of_io(err: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match err.kind() {
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => ProxyErrorKind::Reset,
            _ => ProxyErrorKind::Other,
        }
    }
}

impl EncodeLabelValue for ProxyErrorKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ProxyErrorLabels {
    pub namespace: String,
    pub service: String,
    pub kind: ProxyErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WakeLabels {
    pub namespace: String,
    pub service: String,
    pub result: WakeResult,
}

fn hold_histogram() -> Histogram {
    // 1 ms .. ~27 min in x3 steps: a warm retry is milliseconds, an ML cold start minutes.
    Histogram::new(exponential_buckets(0.001, 3.0, 15))
}

/// The proxy's metric families; cheap to clone (every family is shared).
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    pub held: Family<ServiceLabels, Gauge>,
    /// Connections taken into hold since the agent started, per Service: what a cold
    /// start held is a difference of these (the gauge misses those already forwarded).
    pub holds: Family<ServiceLabels, Counter>,
    /// Connections refused at once at a held-connection bound, per Service (the
    /// controller reports them and alerts on them: `HoldsRefused`).
    pub holds_refused: Family<ServiceLabels, Counter>,
    /// Errors seen between held connections and their Service's backends, per Service
    /// and kind.
    pub errors: Family<ProxyErrorLabels, Counter>,
    pub hold_duration: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    pub wakeups: Family<WakeLabels, Counter>,
    pub outcomes: Family<OutcomeLabels, Counter>,
    pub bytes: Family<DirectionLabels, Counter>,
    /// Forwarded connections ended at a safe point so that their next requests go direct.
    pub stepped_out: Family<StepOutLabels, Counter>,
    /// Connections the proxy has in hand (held, refusing or forwarding).
    pub open: Gauge,
    /// Balance mode's load exchanges with the controller, by result (beside the proxy's
    /// families because every loop of the agent gets these).
    pub load_exchanges: Family<LoadExchangeLabels, Counter>,
}

impl ProxyMetrics {
    fn new() -> Self {
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        let hold_duration: Family<OutcomeLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(hold_histogram);
        // Every outcome and direction is present from the start, so a rate() over them
        // never misses a series (empty families are not exported at all).
        for outcome in Outcome::ALL {
            let _ = outcomes.get_or_create(&OutcomeLabels { outcome });
            let _ = hold_duration.get_or_create(&OutcomeLabels { outcome });
        }
        let bytes = Family::<DirectionLabels, Counter>::default();
        for direction in [Direction::ClientToBackend, Direction::BackendToClient] {
            let _ = bytes.get_or_create(&DirectionLabels { direction });
        }
        let stepped_out = Family::<StepOutLabels, Counter>::default();
        for how in StepOut::ALL {
            let _ = stepped_out.get_or_create(&StepOutLabels {
                protocol: how.protocol(),
                how,
            });
        }
        let load_exchanges = Family::<LoadExchangeLabels, Counter>::default();
        for result in [LoadExchangeResult::Ok, LoadExchangeResult::Failed] {
            let _ = load_exchanges.get_or_create(&LoadExchangeLabels { result });
        }
        Self {
            load_exchanges,
            held: Family::default(),
            holds: Family::default(),
            holds_refused: Family::default(),
            errors: Family::default(),
            hold_duration,
            wakeups: Family::default(),
            outcomes,
            bytes,
            stepped_out,
            open: Gauge::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "nemesis_agent_proxy_held_connections",
            "Connections held by the proxy, waiting for a ready backend, per Service",
            self.held.clone(),
        );
        registry.register(
            "nemesis_agent_proxy_holds",
            "Connections the proxy took into hold since the agent started, per Service",
            self.holds.clone(),
        );
        registry.register(
            "nemesis_agent_proxy_holds_refused",
            "Connections the proxy refused at once because a held-connection bound (the \
             Service's or the agent's) was reached, per Service",
            self.holds_refused.clone(),
        );
        registry.register(
            "nemesis_agent_proxy_errors",
            "Errors the proxy saw for a Service: backend dials that failed or timed out, \
             forwarded connections reset or failed; per Service and kind",
            self.errors.clone(),
        );
        registry.register_with_unit(
            "nemesis_agent_proxy_hold_duration",
            "Time from accept until a held connection was forwarded or refused, by outcome",
            Unit::Seconds,
            self.hold_duration.clone(),
        );
        registry.register(
            "nemesis_agent_proxy_wakeups",
            "Wake-up requests sent to the controller, per Service and result",
            self.wakeups.clone(),
        );
        registry.register(
            "nemesis_agent_proxy_outcomes",
            "Connections accepted by the proxy, by how they left it",
            self.outcomes.clone(),
        );
        registry.register_with_unit(
            "nemesis_agent_proxy_transferred",
            "Bytes the proxy delivered, by direction",
            Unit::Bytes,
            self.bytes.clone(),
        );
        registry.register(
            "nemesis_agent_proxy_stepped_out",
            "Forwarded connections the proxy ended at a point their protocol makes safe, \
             once their Service went direct or the agent was stopping, so that their next \
             requests go direct; by protocol and how",
            self.stepped_out.clone(),
        );
        registry.register(
            "nemesis_agent_proxy_open_connections",
            "Client connections the proxy has in hand (held, refusing or forwarding)",
            self.open.clone(),
        );
        registry.register(
            "nemesis_agent_load_exchanges",
            "Balance mode's exchanges of per-backend open connections with the controller \
             (this node's out, the other nodes' in), by result",
            self.load_exchanges.clone(),
        );
    }

    /// Counts one load exchange.
    pub fn load_exchange(&self, result: LoadExchangeResult) {
        self.load_exchanges
            .get_or_create(&LoadExchangeLabels { result })
            .inc();
    }

    pub fn outcome(&self, outcome: Outcome) {
        self.outcomes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn outcome_count(&self, outcome: Outcome) -> u64 {
        self.outcomes
            .get_or_create(&OutcomeLabels { outcome })
            .get()
    }

    pub fn stepped_out(&self, how: StepOut) {
        self.stepped_out
            .get_or_create(&StepOutLabels {
                protocol: how.protocol(),
                how,
            })
            .inc();
    }

    pub fn stepped_out_count(&self, how: StepOut) -> u64 {
        self.stepped_out
            .get_or_create(&StepOutLabels {
                protocol: how.protocol(),
                how,
            })
            .get()
    }

    pub fn held_count(&self, service: &ServiceRef) -> i64 {
        self.held.get_or_create(&service.into()).get()
    }

    pub fn holds_total(&self, service: &ServiceRef) -> u64 {
        self.holds.get_or_create(&service.into()).get()
    }

    pub fn holds_refused_total(&self, service: &ServiceRef) -> u64 {
        self.holds_refused.get_or_create(&service.into()).get()
    }

    /// Counts a proxy error for `service`.
    pub fn error(&self, service: &ServiceRef, kind: ProxyErrorKind) {
        self.errors
            .get_or_create(&ProxyErrorLabels {
                namespace: service.namespace.clone(),
                service: service.name.clone(),
                kind,
            })
            .inc();
    }

    /// The proxy's errors for `service` since the agent started, by kind.
    pub fn errors_total(&self, service: &ServiceRef) -> nemesis_common::wire::ProxyErrors {
        let n = |kind| {
            self.errors
                .get(&ProxyErrorLabels {
                    namespace: service.namespace.clone(),
                    service: service.name.clone(),
                    kind,
                })
                .map_or(0, |c| c.get())
        };
        nemesis_common::wire::ProxyErrors {
            connect_failed: n(ProxyErrorKind::ConnectFailed),
            connect_timeouts: n(ProxyErrorKind::ConnectTimeout),
            resets: n(ProxyErrorKind::Reset),
            other: n(ProxyErrorKind::Other),
        }
    }

    pub fn bytes_total(&self, direction: Direction) -> u64 {
        self.bytes
            .get_or_create(&DirectionLabels { direction })
            .get()
    }

    /// Drop the series of a Service that is no longer managed.
    pub fn forget_service(&self, service: &ServiceRef) {
        let labels = ServiceLabels::from(service);
        self.held.remove(&labels);
        self.holds.remove(&labels);
        self.holds_refused.remove(&labels);
        for kind in ProxyErrorKind::ALL {
            self.errors.remove(&ProxyErrorLabels {
                namespace: labels.namespace.clone(),
                service: labels.service.clone(),
                kind,
            });
        }
        for result in [
            WakeResult::Accepted,
            WakeResult::Rejected,
            WakeResult::Failed,
        ] {
            self.wakeups.remove(&WakeLabels {
                namespace: labels.namespace.clone(),
                service: labels.service.clone(),
                result,
            });
        }
    }
}

// === impl DatapathCounters ===

/// Per-Service counters kept by the eBPF programs (cumulative in pinned maps, so they
/// survive agent restarts). The datapath code copies them here from its maps; a scrape
/// encodes the latest copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    pub connects_total: u64,
    pub open_connections: u64,
    pub closed_total: u64,
    /// Connections the Service's backend pods on this node accepted (server side).
    pub accepted_total: u64,
    /// Accepted connections open now.
    pub accepted_open: u64,
}

/// The eBPF counters per Service, exported as `nemesis_agent_service_connects_total`,
/// `nemesis_agent_service_open_connections` and `nemesis_agent_service_closed_total`.
/// The datapath engineer's loop calls [`DatapathCounters::set`] after each map read.
#[derive(Debug, Default)]
pub struct DatapathCounters {
    services: RwLock<BTreeMap<ServiceRef, ServiceCounters>>,
    /// Balance mode: open connections per ready backend (at most
    /// `nemesis_common::maps::MAX_BACKENDS` per Service port, so the labels are bounded).
    backends: RwLock<BTreeMap<ServiceRef, Vec<(SocketAddr, u64)>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendLabels {
    namespace: String,
    service: String,
    backend: String,
}

impl DatapathCounters {
    pub fn set(&self, service: &ServiceRef, counters: ServiceCounters) {
        self.services
            .write()
            .expect("datapath counters lock")
            .insert(service.clone(), counters);
    }

    pub fn remove(&self, service: &ServiceRef) {
        self.services
            .write()
            .expect("datapath counters lock")
            .remove(service);
        self.backends
            .write()
            .expect("datapath counters lock")
            .remove(service);
    }

    /// Balance mode: the open connections of each ready backend of `service` (all its
    /// ports); an empty list drops its series.
    pub fn set_backends(&self, service: &ServiceRef, backends: Vec<(SocketAddr, u64)>) {
        let mut b = self.backends.write().expect("datapath counters lock");
        if backends.is_empty() {
            b.remove(service);
        } else {
            b.insert(service.clone(), backends);
        }
    }

    pub fn backends(&self, service: &ServiceRef) -> Vec<(SocketAddr, u64)> {
        self.backends
            .read()
            .expect("datapath counters lock")
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    pub fn get(&self, service: &ServiceRef) -> Option<ServiceCounters> {
        self.services
            .read()
            .expect("datapath counters lock")
            .get(service)
            .copied()
    }

    pub fn snapshot(&self) -> BTreeMap<ServiceRef, ServiceCounters> {
        self.services
            .read()
            .expect("datapath counters lock")
            .clone()
    }
}

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot();
        let mut family = encoder.encode_descriptor(
            "nemesis_agent_service_connects",
            "connect() calls to the Service seen by the eBPF hooks on this node",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (svc, c) in &snapshot {
            let labels = ServiceLabels::from(svc);
            ConstCounter::new(c.connects_total).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "nemesis_agent_service_closed",
            "Connections to the Service closed, seen by the eBPF hooks on this node",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (svc, c) in &snapshot {
            let labels = ServiceLabels::from(svc);
            ConstCounter::new(c.closed_total).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "nemesis_agent_service_open_connections",
            "Open connections to the Service from this node, seen by the eBPF hooks",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (svc, c) in &snapshot {
            let labels = ServiceLabels::from(svc);
            ConstGauge::new(c.open_connections).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "nemesis_agent_service_accepted_connections",
            "Connections the Service's backend pods on this node accepted, whatever path they came by (ClusterIP, pod IP from an Ingress or mesh, NodePort), seen by the eBPF hooks",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (svc, c) in &snapshot {
            let labels = ServiceLabels::from(svc);
            ConstCounter::new(c.accepted_total).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "nemesis_agent_service_accepted_open_connections",
            "Connections the Service's backend pods on this node accepted that are open now",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (svc, c) in &snapshot {
            let labels = ServiceLabels::from(svc);
            ConstGauge::new(c.accepted_open).encode(family.encode_family(&labels)?)?;
        }
        let backends = self
            .backends
            .read()
            .expect("datapath counters lock")
            .clone();
        let mut family = encoder.encode_descriptor(
            "nemesis_agent_backend_open_connections",
            "Balance mode: open connections the eBPF hooks on this node sent to each ready backend",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (svc, list) in &backends {
            for (addr, open) in list {
                let labels = BackendLabels {
                    namespace: svc.namespace.clone(),
                    service: svc.name.clone(),
                    backend: addr.to_string(),
                };
                ConstGauge::new(*open).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The UDP hold relays' counts over every Service port of this node (relays come and
/// go with their Service rows; these totals only grow).
#[derive(Debug, Clone, Default)]
pub struct UdpHoldTotals(pub Arc<crate::udphold::UdpHoldStats>);

impl Collector for UdpHoldTotals {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.0;
        let mut family = encoder.encode_descriptor(
            "nemesis_agent_udp_hold_datagrams",
            "UDP datagrams of zero-scaled Services at this node's hold relays, by outcome: held (kept until a backend is ready), forwarded (sent to a backend, held or later), dropped (a per-flow or node bound was reached, or the flow expired holding them)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (outcome, n) in [
            ("held", s.held.load(Relaxed)),
            ("forwarded", s.forwarded.load(Relaxed)),
            ("dropped", s.dropped.load(Relaxed)),
        ] {
            ConstCounter::new(n).encode(family.encode_family(&[("outcome", outcome)])?)?;
        }
        for (name, help, n) in [
            (
                "nemesis_agent_udp_hold_replies",
                "Backend replies the hold relays sent back to held UDP flows",
                s.replies.load(Relaxed),
            ),
            (
                "nemesis_agent_udp_hold_flows",
                "UDP flows (client address x Service port) the hold relays took",
                s.flows.load(Relaxed),
            ),
        ] {
            let family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            ConstCounter::new(n).encode(family)?;
        }
        Ok(())
    }
}

// === impl Metrics ===

/// Every metric of the agent, registered in one registry. Build it once at start-up,
/// hand clones of the parts to their users, and freeze the registry for the admin server
/// with [`Metrics::into_registry`] (other modules may register more before that).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub proxy: ProxyMetrics,
    pub datapath: Arc<DatapathCounters>,
    /// `nemesis_agent_udp_hold_*`: the UDP hold relays' totals.
    pub udp_hold: UdpHoldTotals,
    /// `nemesis_agent_http_rejected_total{listener, reason}`: the admin listener's limits.
    pub http_rejected: nemesis_common::serve::RejectionCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let proxy = ProxyMetrics::new();
        proxy.register(&mut registry);
        let datapath = Arc::new(DatapathCounters::default());
        registry.register_collector(Box::new(datapath.clone()));
        let udp_hold = UdpHoldTotals::default();
        registry.register_collector(Box::new(udp_hold.clone()));
        let http_rejected = nemesis_common::serve::RejectionCounter::default();
        http_rejected.register(&mut registry, "nemesis_agent_http_rejected");
        Self {
            registry,
            proxy,
            datapath,
            udp_hold,
            http_rejected,
        }
    }

    /// For other modules' metrics, before the registry is frozen.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn into_registry(self) -> Arc<Registry> {
        Arc::new(self.registry)
    }
}

/// The registry in Prometheus text format (OpenMetrics 1.0 text, `# EOF` terminated).
pub fn encode_text(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_is_exported_from_the_start_with_unit_suffixed_names() {
        let m = Metrics::new();
        let text = encode_text(&m.into_registry()).unwrap();
        for o in Outcome::ALL {
            assert!(
                text.contains(&format!(
                    "nemesis_agent_proxy_outcomes_total{{outcome=\"{}\"}} 0",
                    o.as_str()
                )),
                "{text}"
            );
        }
        assert!(
            text.contains("# TYPE nemesis_agent_proxy_hold_duration_seconds histogram"),
            "{text}"
        );
        assert!(text.contains("# TYPE nemesis_agent_proxy_transferred_bytes counter"));
    }

    #[test]
    fn datapath_counters_are_encoded_per_service() {
        let m = Metrics::new();
        let svc = ServiceRef {
            namespace: "ns".into(),
            name: "web".into(),
        };
        m.datapath.set(
            &svc,
            ServiceCounters {
                connects_total: 7,
                open_connections: 3,
                closed_total: 4,
                accepted_total: 9,
                accepted_open: 2,
            },
        );
        let text = encode_text(&m.into_registry()).unwrap();
        assert!(
            text.contains(
                "nemesis_agent_service_connects_total{namespace=\"ns\",service=\"web\"} 7"
            ),
            "{text}"
        );
        assert!(text.contains(
            "nemesis_agent_service_open_connections{namespace=\"ns\",service=\"web\"} 3"
        ));
        assert!(
            text.contains("nemesis_agent_service_closed_total{namespace=\"ns\",service=\"web\"} 4")
        );
        assert!(text.contains(
            "nemesis_agent_service_accepted_connections_total{namespace=\"ns\",service=\"web\"} 9"
        ));
        assert!(text.contains(
            "nemesis_agent_service_accepted_open_connections{namespace=\"ns\",service=\"web\"} 2"
        ));
    }
}
