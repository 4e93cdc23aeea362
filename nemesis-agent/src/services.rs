//! Which Services this agent manages: those a `ScalingPolicy` names as its target, with
//! the hold bounds the policy sets. Owns the policy and Service watches, their
//! translation into rows of the proxy's table and of the eBPF services table, and the
//! per-Service datapath mode; never decides a mode (`proxy::mode` does) nor holds traffic.
#![deny(unsafe_code)]

use crate::config::DirectMode;
use crate::ebpf::{Datapath, DatapathError, LoadBalancing, Mode, Proto, Tier};
use crate::endpoints::{EndpointRegistry, Place};
use crate::metrics::{DatapathCounters, ProxyMetrics, ServiceCounters};
use crate::proxy::udp_wake::UdpRelays;
use crate::proxy::{
    HoldBounds, ManagedPort, ModeSink, ModeSinkError, ServiceTable, TableError, decide_hold,
    service_ports, udp_service_ports,
};
use crate::udphold::UdpHoldRelay;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject};
use kube::core::GroupVersionKind;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use nemesis_common::policy;
use nemesis_common::wire::{AppliedMode, Directive, ServiceLoads, ServiceRef};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// Open connections per balance-mode backend of one Service.
pub type BackendLoads = Vec<(SocketAddr, u64)>;

/// A policy without `maxHeldConnections` holds this many per agent (the CRD's default).
pub const DEFAULT_POLICY_MAX_HELD: usize = policy::DEFAULT_MAX_HELD_CONNECTIONS as usize;

/// `nemesis.dev/v1alpha1` `ScalingPolicy`, read as a dynamic object: the agent needs
/// three fields and must not fail on the rest (nor depend on the controller crate).
pub fn scaling_policy_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("nemesis.dev", "v1alpha1", "ScalingPolicy"),
        "scalingpolicies",
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error("ScalingPolicy {policy}: {field}: {reason}")]
    ParsePolicy {
        policy: String,
        field: &'static str,
        reason: String,
    },
    #[error(
        "Service {service} is the target of ScalingPolicies {winner} and {loser}; {winner} is used"
    )]
    ConflictingPolicies {
        service: ServiceRef,
        winner: String,
        loser: String,
    },
    #[error(transparent)]
    ServiceRows(#[from] TableError),
    #[error("updating the datapath rows of Service {service}")]
    UpdateDatapath {
        service: ServiceRef,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("removing the stale datapath row {addr}")]
    PruneDatapath {
        addr: SocketAddr,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("reading the datapath counters")]
    ReadCounters(#[source] Box<DatapathError>),
    #[error("the datapath is gone (the agent is shutting down)")]
    DatapathGone,
    #[error("the {what} watch stream ended")]
    WatchEnded { what: &'static str },
}

/// An error and its sources on one line (`a: b: c`), for logs: the variants above keep
/// their source out of their own message, as `anyhow` expects.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

// === the pure part: policies and Services -> rows ===

/// What a policy asks of the agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTarget {
    /// `namespace/name` of the policy.
    pub policy: String,
    pub service: ServiceRef,
    pub bounds: HoldBounds,
    /// `spec.loadBalancing`: how balance mode picks among the Service's backends.
    pub balancing: policy::LoadBalancing,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoadBalancingView {
    algorithm: Option<String>,
    slow_start: Option<String>,
    prefer_same_node: Option<bool>,
    prefer_same_zone: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecView {
    #[serde(default)]
    target: TargetView,
    readiness_budget: Option<serde_json::Value>,
    hold_timeout_seconds: Option<serde_json::Value>,
    max_held_connections: Option<serde_json::Value>,
    /// A paused policy steps out of the Service's traffic (the controller refuses its
    /// wake-ups as unmanaged): nothing is held for it.
    #[serde(default)]
    paused: bool,
    #[serde(default)]
    load_balancing: LoadBalancingView,
}

#[derive(Debug, Default, Deserialize)]
struct TargetView {
    service: Option<String>,
}

/// A positive integer field of a policy, or an error naming it.
fn positive(
    policy: &str,
    field: &'static str,
    v: &serde_json::Value,
) -> Result<u64, ServicesError> {
    v.as_u64()
        .filter(|n| *n > 0)
        .ok_or_else(|| ServicesError::ParsePolicy {
            policy: policy.to_string(),
            field,
            reason: format!("must be a positive integer, got {v}"),
        })
}

/// A duration field of a policy (`10m`, in the controller's grammar) longer than zero,
/// or an error naming it and the column where it goes wrong.
fn positive_duration(
    policy: &str,
    field: &'static str,
    v: &serde_json::Value,
) -> Result<Duration, ServicesError> {
    let error = |reason: String| ServicesError::ParsePolicy {
        policy: policy.to_string(),
        field,
        reason,
    };
    let text = v
        .as_str()
        .ok_or_else(|| error(format!("must be a duration such as `10m`, got {v}")))?;
    match nemesis_common::duration::parse(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(error("must be longer than zero".into())),
        Err(e) => Err(error(e.to_string())),
    }
}

/// The Service a policy targets and its hold bounds; `None` when the policy names no
/// Service (it scales on other metrics, nothing is intercepted) or is paused. An invalid bound is an
/// error: the controller rejects such a policy, so it must change nothing here either.
pub fn policy_target(obj: &DynamicObject) -> Result<Option<PolicyTarget>, ServicesError> {
    let namespace = obj.namespace().unwrap_or_default();
    let policy = format!("{namespace}/{}", obj.name_any());
    let spec: SpecView = match obj.data.get("spec") {
        None | Some(serde_json::Value::Null) => SpecView::default(),
        Some(v) => SpecView::deserialize(v).map_err(|e| ServicesError::ParsePolicy {
            policy: policy.clone(),
            field: "spec",
            reason: e.to_string(),
        })?,
    };
    let Some(service) = spec
        .target
        .service
        .filter(|s| !s.is_empty() && !spec.paused)
    else {
        return Ok(None);
    };
    let budget = match &spec.readiness_budget {
        None => policy::DEFAULT_READINESS_BUDGET,
        Some(v) => positive_duration(&policy, "spec.readinessBudget", v)?,
    };
    let explicit_hold = match &spec.hold_timeout_seconds {
        None => None,
        Some(v) => Some(
            u32::try_from(positive(&policy, "spec.holdTimeoutSeconds", v)?).unwrap_or(u32::MAX),
        ),
    };
    let mut bounds = HoldBounds {
        hold_timeout: policy::hold_timeout(explicit_hold, budget),
        max_held: DEFAULT_POLICY_MAX_HELD,
        ..HoldBounds::default()
    };
    if let Some(v) = &spec.max_held_connections {
        let n = positive(&policy, "spec.maxHeldConnections", v)?;
        bounds.max_held = usize::try_from(n).unwrap_or(usize::MAX);
    }
    let lb = &spec.load_balancing;
    let balancing = policy::LoadBalancing::parse(
        lb.algorithm.as_deref(),
        lb.slow_start.as_deref(),
        lb.prefer_same_node,
        lb.prefer_same_zone,
    )
    .map_err(|errors| {
        let first = &errors[0];
        ServicesError::ParsePolicy {
            policy: policy.clone(),
            field: first.field,
            reason: match first.column {
                Some(c) => format!("column {c}: {}", first.message),
                None => first.message.clone(),
            },
        }
    })?;
    Ok(Some(PolicyTarget {
        policy,
        service: ServiceRef {
            namespace,
            name: service,
        },
        bounds,
        balancing,
    }))
}

/// Rows of every managed Service.
pub type Rows = BTreeMap<ServiceRef, Vec<(SocketAddr, ManagedPort)>>;

/// The rows of every Service some policy targets and that exists, plus what was wrong
/// on the way (a Service named by two policies keeps the first policy by name; a
/// Service whose addresses do not parse is left out).
pub fn desired_rows<'a>(
    targets: impl IntoIterator<Item = &'a PolicyTarget>,
    services: &BTreeMap<ServiceRef, Service>,
) -> (Rows, Vec<ServicesError>) {
    desired_rows_of(targets, services, service_ports)
}

/// The UDP rows of every Service some policy targets and that exists, as
/// [`desired_rows`] gives the TCP ones (with the same problems).
pub fn desired_udp_rows<'a>(
    targets: impl IntoIterator<Item = &'a PolicyTarget>,
    services: &BTreeMap<ServiceRef, Service>,
) -> (Rows, Vec<ServicesError>) {
    desired_rows_of(targets, services, udp_service_ports)
}

type PortsOf = fn(&Service, HoldBounds) -> Result<Vec<(SocketAddr, ManagedPort)>, TableError>;

fn desired_rows_of<'a>(
    targets: impl IntoIterator<Item = &'a PolicyTarget>,
    services: &BTreeMap<ServiceRef, Service>,
    ports_of: PortsOf,
) -> (Rows, Vec<ServicesError>) {
    let mut by_service: BTreeMap<&ServiceRef, &PolicyTarget> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut targets: Vec<&PolicyTarget> = targets.into_iter().collect();
    targets.sort_by(|a, b| a.policy.cmp(&b.policy));
    for t in targets {
        if let Some(winner) = by_service.get(&t.service) {
            problems.push(ServicesError::ConflictingPolicies {
                service: t.service.clone(),
                winner: winner.policy.clone(),
                loser: t.policy.clone(),
            });
            continue;
        }
        by_service.insert(&t.service, t);
    }
    let mut rows = Rows::new();
    for (service, target) in by_service {
        let Some(svc) = services.get(service) else {
            continue;
        };
        match ports_of(svc, target.bounds) {
            Ok(r) if r.is_empty() => {}
            Ok(mut r) => {
                for (_, port) in &mut r {
                    port.balancing = target.balancing;
                }
                rows.insert(service.clone(), r);
            }
            Err(e) => problems.push(e.into()),
        }
    }
    (rows, problems)
}

// === impl DatapathServices ===

/// The eBPF services table, kept per managed Service: its addresses and the mode they
/// share. Holds the datapath weakly, so that the agent alone decides when it is dropped.
#[derive(Debug)]
pub struct DatapathServices {
    datapath: Weak<Datapath>,
    endpoints: Arc<EndpointRegistry>,
    state: Mutex<HashMap<ServiceRef, DatapathRows>>,
    /// The UDP rows of each Service (apart: a ClusterIP may have TCP and UDP 53). Locked
    /// after `state` when both are.
    udp: Mutex<HashMap<ServiceRef, BTreeMap<SocketAddr, UdpRow>>>,
    /// Binds the hold relays of UDP rows; until set, UDP rows are held without one
    /// (their datagrams go on unchanged at zero).
    relays: OnceLock<UdpRelays>,
    direct: DirectMode,
    locality: Locality,
}

/// One UDP Service port of one ClusterIP.
#[derive(Debug)]
struct UdpRow {
    port_name: String,
    balancing: LoadBalancing,
    /// Where its datagrams are held at zero (in UDP_HOLD while it lives).
    _relay: Option<UdpHoldRelay>,
}

/// This agent's node and zone, against which balance mode tiers the backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    pub node: Option<String>,
    pub zone: Option<String>,
}

impl Locality {
    /// The tier of a backend that runs at `place` (unknown: the farthest).
    pub fn tier(&self, place: Option<&Place>) -> Tier {
        let Some(place) = place else {
            return Tier::Remote;
        };
        let same = |mine: &Option<String>, theirs: &Option<String>| matches!((mine, theirs), (Some(a), Some(b)) if a == b);
        if same(&self.node, &place.node) {
            Tier::Node
        } else if same(&self.zone, &place.zone) {
            Tier::Zone
        } else {
            Tier::Remote
        }
    }
}

#[derive(Debug, Default)]
struct DatapathRows {
    addrs: BTreeSet<SocketAddr>,
    /// Each row's Service port name, numeric `targetPort` (where its backends are) and
    /// how balance mode picks among them.
    ports: BTreeMap<SocketAddr, (String, Option<u16>, LoadBalancing)>,
    /// The mode last set through [`ModeSink::set_hold`]; `None` before the first.
    hold: Option<bool>,
}

impl DatapathServices {
    /// Direct (not held) Services are left to kube-proxy (passthrough).
    pub fn new(datapath: &Arc<Datapath>, endpoints: Arc<EndpointRegistry>) -> Arc<Self> {
        Self::with_direct_mode(datapath, endpoints, DirectMode::Passthrough)
    }

    /// As [`DatapathServices::new`], with direct Services served as `direct` says: in
    /// [`DirectMode::Balance`] the datapath sends each connect to a ready backend itself,
    /// from the backends [`DatapathServices::sync_backends`] writes.
    pub fn with_direct_mode(
        datapath: &Arc<Datapath>,
        endpoints: Arc<EndpointRegistry>,
        direct: DirectMode,
    ) -> Arc<Self> {
        Self::with_locality(datapath, endpoints, direct, Locality::default())
    }

    /// As [`DatapathServices::with_direct_mode`], on a node at `locality` (for the
    /// policies' same-node and same-zone preferences).
    pub fn with_locality(
        datapath: &Arc<Datapath>,
        endpoints: Arc<EndpointRegistry>,
        direct: DirectMode,
        locality: Locality,
    ) -> Arc<Self> {
        Arc::new(Self {
            datapath: Arc::downgrade(datapath),
            endpoints,
            state: Mutex::new(HashMap::new()),
            udp: Mutex::new(HashMap::new()),
            relays: OnceLock::new(),
            direct,
            locality,
        })
    }

    fn mode_of(&self, hold: bool) -> Mode {
        match (hold, self.direct) {
            (true, _) => Mode::Hold,
            (false, DirectMode::Passthrough) => Mode::Passthrough,
            (false, DirectMode::Balance) => Mode::Balance,
        }
    }

    /// Writes every managed Service port's ready backends into the datapath (call it
    /// whenever endpoints change): as the (address, port) pairs whose accepts count for
    /// the Service (server side), and in balance mode as where connects go. A Service
    /// that fails is reported and the others go on.
    pub fn sync_backends(&self) -> Vec<ServicesError> {
        let dp = match self.datapath() {
            Ok(dp) => dp,
            Err(e) => return vec![e],
        };
        let mut errors: Vec<ServicesError> = {
            let state = self.state.lock().expect("datapath services lock");
            state
                .iter()
                .filter_map(|(svc, rows)| self.write_backends(&dp, svc, rows).err())
                .collect()
        };
        let udp = self.udp.lock().expect("datapath services lock");
        errors.extend(
            udp.iter()
                .filter_map(|(svc, rows)| self.write_udp_backends(&dp, svc, rows).err()),
        );
        errors
    }

    /// The hold relays of UDP rows are bound by `relays` from now on (rows set before
    /// keep going without one).
    pub fn set_udp_relays(&self, relays: UdpRelays) {
        let _ = self.relays.set(relays);
    }

    /// Balance mode: the ready backends of each UDP row, where its datagrams go.
    fn write_udp_backends(
        &self,
        dp: &Datapath,
        service: &ServiceRef,
        rows: &BTreeMap<SocketAddr, UdpRow>,
    ) -> Result<(), ServicesError> {
        if self.direct != DirectMode::Balance {
            return Ok(());
        }
        let eps = self.endpoints.current(service);
        let max = nemesis_common::maps::MAX_BACKENDS as usize;
        for (addr, row) in rows {
            let tiered: Vec<(SocketAddr, Tier)> = eps
                .udp_backends(&row.port_name)
                .into_iter()
                .filter(|b| b.is_ipv4() == addr.is_ipv4())
                .take(max)
                .map(|b| (b, self.locality.tier(eps.place(&b.ip()))))
                .collect();
            dp.set_balance(*addr, Proto::Udp, &tiered, row.balancing)
                .map_err(|source| ServicesError::UpdateDatapath {
                    service: service.clone(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// Make `rows_in` the UDP rows of `service`, as [`DatapathServices::set_rows`] does
    /// the TCP ones; a new row gets its hold relay (in UDP_HOLD) before its mode.
    pub fn set_udp_rows(
        &self,
        service: &ServiceRef,
        rows_in: &[(SocketAddr, ManagedPort)],
    ) -> Result<(), ServicesError> {
        let dp = self.datapath()?;
        let hold = {
            let state = self.state.lock().expect("datapath services lock");
            state.get(service).and_then(|r| r.hold)
        }
        .unwrap_or_else(|| {
            decide_hold(
                !self.endpoints.current(service).is_empty(),
                Directive::Follow,
            )
        });
        let update = |source| ServicesError::UpdateDatapath {
            service: service.clone(),
            source: Box::new(source),
        };
        let mode = self.mode_of(hold);
        let mut udp = self.udp.lock().expect("datapath services lock");
        let rows = udp.entry(service.clone()).or_default();
        let wanted: BTreeMap<SocketAddr, &ManagedPort> =
            rows_in.iter().map(|(a, p)| (*a, p)).collect();
        let gone: Vec<SocketAddr> = rows
            .keys()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            dp.remove_service(addr, Proto::Udp).map_err(update)?;
            rows.remove(&addr);
        }
        for (addr, port) in wanted {
            if let Some(row) = rows.get_mut(&addr) {
                row.balancing = port.balancing;
                if row.port_name == port.port_name {
                    continue;
                }
            }
            let relay = match self.relays.get() {
                None => None,
                Some(r) => match r.bind(service, &port.port_name, addr.is_ipv4()) {
                    Ok(relay) => relay,
                    Err(error) => {
                        tracing::warn!(service = %service, %addr, %error, "binding the UDP hold relay failed; this port's datagrams go on unheld at zero");
                        None
                    }
                },
            };
            let relay_port = relay.as_ref().map(|r| r.local_addr().port());
            let (v4, v6) = if addr.is_ipv4() {
                (relay_port, None)
            } else {
                (None, relay_port)
            };
            dp.set_udp_hold(addr, v4, v6).map_err(update)?;
            dp.upsert_service(addr, Proto::Udp, mode).map_err(update)?;
            rows.insert(
                addr,
                UdpRow {
                    port_name: port.port_name.clone(),
                    balancing: port.balancing,
                    _relay: relay,
                },
            );
        }
        let result = self.write_udp_backends(&dp, service, rows);
        if rows.is_empty() {
            udp.remove(service);
        }
        result
    }

    /// Forget the UDP rows of a Service no longer managed (their relays close).
    fn remove_udp(&self, dp: &Datapath, service: &ServiceRef) -> Result<(), ServicesError> {
        let mut udp = self.udp.lock().expect("datapath services lock");
        if let Some(rows) = udp.get_mut(service) {
            let addrs: Vec<SocketAddr> = rows.keys().copied().collect();
            for addr in addrs {
                dp.remove_service(addr, Proto::Udp).map_err(|source| {
                    ServicesError::UpdateDatapath {
                        service: service.clone(),
                        source: Box::new(source),
                    }
                })?;
                rows.remove(&addr);
            }
            udp.remove(service);
        }
        Ok(())
    }

    /// The ready backends of each of `rows` into the datapath: always as server-side
    /// ports, in balance mode also as balance backends.
    fn write_backends(
        &self,
        dp: &Datapath,
        service: &ServiceRef,
        rows: &DatapathRows,
    ) -> Result<(), ServicesError> {
        let eps = self.endpoints.current(service);
        for (addr, (port_name, target_port, balancing)) in &rows.ports {
            let mut backends: Vec<SocketAddr> = eps
                .backends(port_name, *target_port)
                .into_iter()
                // A connect can only be rewritten within its address family, and each
                // family's backends count on the row (slot) of that family.
                .filter(|b| b.is_ipv4() == addr.is_ipv4())
                .collect();
            dp.set_server_ports(*addr, Proto::Tcp, &backends)
                .map_err(|source| ServicesError::UpdateDatapath {
                    service: service.clone(),
                    source: Box::new(source),
                })?;
            if self.direct != DirectMode::Balance {
                continue;
            }
            let max = nemesis_common::maps::MAX_BACKENDS as usize;
            if backends.len() > max {
                // Balancing over the first `max` still beats failing open to kube-proxy.
                tracing::warn!(service = %service, ready = backends.len(), max, "more ready backends than balance mode takes; using the first");
                backends.truncate(max);
            }
            let tiered: Vec<(SocketAddr, Tier)> = backends
                .iter()
                .map(|b| (*b, self.locality.tier(eps.place(&b.ip()))))
                .collect();
            dp.set_balance(*addr, Proto::Tcp, &tiered, *balancing)
                .map_err(|source| ServicesError::UpdateDatapath {
                    service: service.clone(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// Balance mode: open connections per backend of every managed Service.
    pub fn backend_counters(&self) -> Result<Vec<(ServiceRef, BackendLoads)>, ServicesError> {
        if self.direct != DirectMode::Balance {
            return Ok(vec![]);
        }
        let dp = self.datapath()?;
        let state = self.state.lock().expect("datapath services lock");
        let mut out = vec![];
        for (svc, rows) in state.iter() {
            let mut list = vec![];
            for addr in &rows.addrs {
                let backends = dp
                    .backends(*addr, Proto::Tcp)
                    .map_err(|e| ServicesError::ReadCounters(Box::new(e)))?;
                list.extend(backends.iter().map(|b| (b.addr, b.open_now)));
            }
            out.push((svc.clone(), list));
        }
        Ok(out)
    }

    /// Balance mode: the other nodes' open connections per backend (as the controller
    /// sums them) into the datapath, where every choice adds them to this node's own.
    /// A managed Service `remote` does not name has no load elsewhere. Returns how many
    /// backends carry a remote load.
    pub fn set_remote_loads(&self, remote: &[ServiceLoads]) -> Result<usize, ServicesError> {
        if self.direct != DirectMode::Balance {
            return Ok(0);
        }
        let dp = self.datapath()?;
        let state = self.state.lock().expect("datapath services lock");
        let mut loaded = 0;
        for (svc, rows) in state.iter() {
            let theirs: Vec<(SocketAddr, u64)> = remote
                .iter()
                .filter(|l| l.service == *svc)
                .flat_map(|l| l.backends.iter().map(|b| (b.addr, b.open)))
                .collect();
            for addr in &rows.addrs {
                let family: Vec<(SocketAddr, u64)> = theirs
                    .iter()
                    .copied()
                    .filter(|(b, _)| b.is_ipv4() == addr.is_ipv4())
                    .collect();
                loaded += dp
                    .set_remote_loads(*addr, Proto::Tcp, &family)
                    .map_err(|source| ServicesError::UpdateDatapath {
                        service: svc.clone(),
                        source: Box::new(source),
                    })?;
            }
        }
        Ok(loaded)
    }

    fn datapath(&self) -> Result<Arc<Datapath>, ServicesError> {
        self.datapath.upgrade().ok_or(ServicesError::DatapathGone)
    }

    /// Make `addrs` the rows of `service`. New rows get the Service's mode: the one set
    /// last, or (for a Service new to this agent) hold exactly when it has no ready
    /// backend, so that no connect meets a ClusterIP without endpoints.
    pub fn set_rows(
        &self,
        service: &ServiceRef,
        rows_in: &[(SocketAddr, ManagedPort)],
    ) -> Result<(), ServicesError> {
        let addrs: BTreeSet<SocketAddr> = rows_in.iter().map(|(a, _)| *a).collect();
        let dp = self.datapath()?;
        let mut state = self.state.lock().expect("datapath services lock");
        let rows = state.entry(service.clone()).or_default();
        let hold = rows.hold.unwrap_or_else(|| {
            decide_hold(
                !self.endpoints.current(service).is_empty(),
                Directive::Follow,
            )
        });
        let update = |source| ServicesError::UpdateDatapath {
            service: service.clone(),
            source: Box::new(source),
        };
        let mode = self.mode_of(hold);
        for addr in addrs.difference(&rows.addrs) {
            dp.upsert_service(*addr, Proto::Tcp, mode).map_err(update)?;
        }
        for addr in rows.addrs.difference(&addrs) {
            dp.remove_service(*addr, Proto::Tcp).map_err(update)?;
        }
        rows.addrs = addrs;
        rows.ports = rows_in
            .iter()
            .map(|(a, p)| (*a, (p.port_name.clone(), p.target_port, p.balancing)))
            .collect();
        self.write_backends(&dp, service, rows)
    }

    /// Forget a Service that is no longer managed: its connects go untouched.
    pub fn remove(&self, service: &ServiceRef) -> Result<(), ServicesError> {
        let dp = self.datapath()?;
        self.remove_udp(&dp, service)?;
        let mut state = self.state.lock().expect("datapath services lock");
        if let Some(rows) = state.remove(service) {
            for addr in rows.addrs {
                dp.remove_service(addr, Proto::Tcp).map_err(|source| {
                    ServicesError::UpdateDatapath {
                        service: service.clone(),
                        source: Box::new(source),
                    }
                })?;
            }
        }
        Ok(())
    }

    /// Remove datapath rows of no managed Service (left by an earlier agent for Services
    /// that stopped being managed while it was away); returns how many.
    pub fn prune_unmanaged(&self) -> Result<usize, ServicesError> {
        let dp = self.datapath()?;
        let state = self.state.lock().expect("datapath services lock");
        let mut managed: std::collections::HashSet<(SocketAddr, Proto)> = state
            .values()
            .flat_map(|r| r.addrs.iter().map(|a| (*a, Proto::Tcp)))
            .collect();
        managed.extend(
            self.udp
                .lock()
                .expect("datapath services lock")
                .values()
                .flat_map(|r| r.keys().map(|a| (*a, Proto::Udp))),
        );
        let mut removed = 0;
        for entry in dp.services() {
            if !managed.contains(&(entry.addr, entry.proto)) {
                dp.remove_service(entry.addr, entry.proto)
                    .map_err(|source| ServicesError::PruneDatapath {
                        addr: entry.addr,
                        source: Box::new(source),
                    })?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The eBPF counters of every managed Service, summed over its rows.
    pub fn counters(&self) -> Result<Vec<(ServiceRef, ServiceCounters)>, ServicesError> {
        let dp = self.datapath()?;
        let by_addr: HashMap<(SocketAddr, Proto), crate::ebpf::ServiceCounters> = dp
            .all_stats()
            .map_err(|e| ServicesError::ReadCounters(Box::new(e)))?
            .into_iter()
            .map(|(e, c)| ((e.addr, e.proto), c))
            .collect();
        let state = self.state.lock().expect("datapath services lock");
        let udp = self.udp.lock().expect("datapath services lock");
        let services: BTreeSet<&ServiceRef> = state.keys().chain(udp.keys()).collect();
        Ok(services
            .into_iter()
            .map(|svc| {
                let tcp = state
                    .get(svc)
                    .into_iter()
                    .flat_map(|r| r.addrs.iter().map(|a| (*a, Proto::Tcp)));
                // A UDP flow's first datagram counts as a connect.
                let udp_rows = udp
                    .get(svc)
                    .into_iter()
                    .flat_map(|r| r.keys().map(|a| (*a, Proto::Udp)));
                let mut sum = ServiceCounters::default();
                for c in tcp.chain(udp_rows).filter_map(|k| by_addr.get(&k)) {
                    sum.connects_total += c.connects;
                    sum.open_connections += c.open_now;
                    sum.closed_total += c.closed;
                    sum.accepted_total += c.accepted;
                    sum.accepted_open += c.accepted_open;
                }
                (svc.clone(), sum)
            })
            .collect())
    }
}

impl ModeSink for DatapathServices {
    fn set_hold(&self, service: &ServiceRef, hold: bool) -> Result<AppliedMode, ModeSinkError> {
        let dp = self.datapath().map_err(|e| ModeSinkError(Box::new(e)))?;
        let mut state = self.state.lock().expect("datapath services lock");
        let rows = state.entry(service.clone()).or_default();
        // Balance: the backends first, so the first direct connect finds them.
        if !hold {
            self.write_backends(&dp, service, rows)
                .map_err(|e| ModeSinkError(Box::new(e)))?;
        }
        let mode = self.mode_of(hold);
        for addr in &rows.addrs {
            dp.set_mode(*addr, Proto::Tcp, mode)
                .map_err(|e| ModeSinkError(Box::new(e)))?;
        }
        let udp = self.udp.lock().expect("datapath services lock");
        if let Some(udp_rows) = udp.get(service) {
            if !hold {
                self.write_udp_backends(&dp, service, udp_rows)
                    .map_err(|e| ModeSinkError(Box::new(e)))?;
            }
            for addr in udp_rows.keys() {
                dp.set_mode(*addr, Proto::Udp, mode)
                    .map_err(|e| ModeSinkError(Box::new(e)))?;
            }
        }
        rows.hold = Some(hold);
        Ok(match mode {
            Mode::Hold => AppliedMode::Hold,
            Mode::Balance => AppliedMode::Balance,
            Mode::Passthrough => AppliedMode::Passthrough,
        })
    }
}

// === impl ManagedServices ===

/// Applies desired rows to the proxy's table and the datapath, changing only what changed.
#[derive(Debug)]
pub struct ManagedServices {
    table: Arc<ServiceTable>,
    datapath: Arc<DatapathServices>,
    proxy_metrics: ProxyMetrics,
    counters: Arc<DatapathCounters>,
    applied: Mutex<Option<Rows>>,
    applied_udp: Mutex<Rows>,
}

impl ManagedServices {
    pub fn new(
        table: Arc<ServiceTable>,
        datapath: Arc<DatapathServices>,
        proxy_metrics: ProxyMetrics,
        counters: Arc<DatapathCounters>,
    ) -> Arc<Self> {
        Arc::new(Self {
            table,
            datapath,
            proxy_metrics,
            counters,
            applied: Mutex::new(None),
            applied_udp: Mutex::new(Rows::new()),
        })
    }

    /// Bring table and datapath to `desired`. The datapath goes first, so a Service the
    /// proxy knows always has its rows (and mode) in the kernel. A Service that fails is
    /// retried at the next apply; the others go on.
    pub fn apply(&self, desired: &Rows) -> Vec<ServicesError> {
        let mut applied = self.applied.lock().expect("managed services lock");
        let first = applied.is_none();
        let old = applied.take().unwrap_or_default();
        let mut now = Rows::new();
        let mut problems = Vec::new();
        for (service, rows) in &old {
            if desired.contains_key(service) {
                continue;
            }
            self.table.remove_service(service);
            self.proxy_metrics.forget_service(service);
            self.counters.remove(service);
            match self.datapath.remove(service) {
                Ok(()) => tracing::info!(service = %service, "Service no longer managed"),
                Err(e) => {
                    // Keep it as applied, so the next apply removes it again.
                    problems.push(e);
                    now.insert(service.clone(), rows.clone());
                }
            }
        }
        for (service, rows) in desired {
            if old.get(service) == Some(rows) {
                now.insert(service.clone(), rows.clone());
                continue;
            }
            match self.datapath.set_rows(service, rows) {
                Ok(()) => {
                    self.table.upsert_service(service, rows.clone());
                    tracing::info!(service = %service, rows = rows.len(), "Service managed");
                    now.insert(service.clone(), rows.clone());
                }
                Err(e) => problems.push(e),
            }
        }
        if first {
            match self.datapath.prune_unmanaged() {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "stale datapath rows removed"),
                Err(e) => problems.push(e),
            }
        }
        *applied = Some(now);
        problems
    }

    /// Bring the UDP rows to `desired`, changing only what changed. Call it before
    /// [`ManagedServices::apply`] of the TCP rows: the first of those prunes the
    /// datapath rows (TCP and UDP) of no managed port.
    pub fn apply_udp(&self, desired: &Rows) -> Vec<ServicesError> {
        let mut applied = self.applied_udp.lock().expect("managed services lock");
        let mut problems = Vec::new();
        let gone: Vec<ServiceRef> = applied
            .keys()
            .filter(|s| !desired.contains_key(*s))
            .cloned()
            .collect();
        for service in gone {
            match self.datapath.set_udp_rows(&service, &[]) {
                Ok(()) => {
                    self.table.upsert_udp_service(&service, Vec::new());
                    applied.remove(&service);
                }
                Err(e) => problems.push(e),
            }
        }
        for (service, rows) in desired {
            if applied.get(service) == Some(rows) {
                continue;
            }
            match self.datapath.set_udp_rows(service, rows) {
                Ok(()) => {
                    self.table
                        .upsert_udp_service(service, rows.iter().map(|(a, _)| *a).collect());
                    tracing::info!(service = %service, rows = rows.len(), "UDP ports of the Service managed");
                    applied.insert(service.clone(), rows.clone());
                }
                Err(e) => problems.push(e),
            }
        }
        problems
    }

    /// Copy the datapath's counters into the metrics.
    pub fn refresh_counters(&self) -> Result<(), ServicesError> {
        for (svc, c) in self.datapath.counters()? {
            self.counters.set(&svc, c);
        }
        for (svc, list) in self.datapath.backend_counters()? {
            self.counters.set_backends(&svc, list);
        }
        Ok(())
    }
}

// === the watch ===

/// What the watches have seen, keyed by object.
#[derive(Debug, Default)]
struct Seen {
    policies: BTreeMap<(String, String), Option<PolicyTarget>>,
    services: BTreeMap<ServiceRef, Service>,
    policies_listed: bool,
    services_listed: bool,
}

enum Change {
    // Boxed: objects are hundreds of bytes, and events queue in the merged stream.
    Policy(Box<watcher::Event<DynamicObject>>),
    Service(Box<watcher::Event<Service>>),
}

fn policy_key(obj: &DynamicObject) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

fn service_key(svc: &Service) -> ServiceRef {
    ServiceRef {
        namespace: svc.namespace().unwrap_or_default(),
        name: svc.name_any(),
    }
}

fn parse_policy(obj: &DynamicObject) -> Option<PolicyTarget> {
    match policy_target(obj) {
        Ok(t) => t,
        Err(err) => {
            tracing::warn!(error = %error_chain(&err), "ScalingPolicy ignored by the agent");
            None
        }
    }
}

/// Waits for the endpoints to be listed (so a warm Service is not held by mistake at
/// start), then follows ScalingPolicies and Services cluster-wide and applies the
/// managed rows on every change; `on_synced` runs once, after the first apply. Returns
/// only if a watch stream ends; watch errors are retried with kube-rs's backoff, and
/// each is told to `on_error` in words for the operator (a 403 names the permission).
pub async fn watch_managed_services(
    client: kube::Client,
    endpoints: Arc<EndpointRegistry>,
    managed: Arc<ManagedServices>,
    on_synced: impl FnOnce() + Send,
    on_error: impl Fn(String) + Send,
) -> Result<(), ServicesError> {
    let policies: Api<DynamicObject> = Api::all_with(client.clone(), &scaling_policy_resource());
    let services: Api<Service> = Api::all(client);
    let policy_events = watcher(policies, watcher::Config::default())
        .default_backoff()
        .map(|e| e.map(|ev| Change::Policy(Box::new(ev))));
    let service_events = watcher(services, watcher::Config::default())
        .default_backoff()
        .map(|e| e.map(|ev| Change::Service(Box::new(ev))));
    let mut events = std::pin::pin!(futures::stream::select(policy_events, service_events));
    let mut seen = Seen::default();
    let mut relist_policies: Option<Vec<DynamicObject>> = None;
    let mut relist_services: Option<Vec<Service>> = None;
    let mut on_synced = Some(on_synced);
    endpoints.synced().await;
    while let Some(event) = events.next().await {
        match event {
            Err(err) => {
                let why = format!(
                    "ScalingPolicies/Services: {}",
                    crate::permissions::explain(&err)
                );
                tracing::warn!(error = %why, "ScalingPolicy/Service watch failed; retrying");
                on_error(why);
                continue;
            }
            Ok(Change::Policy(e)) => match *e {
                watcher::Event::Init => relist_policies = Some(Vec::new()),
                watcher::Event::InitApply(o) => {
                    relist_policies.get_or_insert_with(Vec::new).push(o)
                }
                watcher::Event::InitDone => {
                    seen.policies = relist_policies
                        .take()
                        .unwrap_or_default()
                        .iter()
                        .map(|o| (policy_key(o), parse_policy(o)))
                        .collect();
                    seen.policies_listed = true;
                }
                watcher::Event::Apply(o) => {
                    seen.policies.insert(policy_key(&o), parse_policy(&o));
                }
                watcher::Event::Delete(o) => {
                    seen.policies.remove(&policy_key(&o));
                }
            },
            Ok(Change::Service(e)) => match *e {
                watcher::Event::Init => relist_services = Some(Vec::new()),
                watcher::Event::InitApply(s) => {
                    relist_services.get_or_insert_with(Vec::new).push(s)
                }
                watcher::Event::InitDone => {
                    seen.services = relist_services
                        .take()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|s| (service_key(&s), s))
                        .collect();
                    seen.services_listed = true;
                }
                watcher::Event::Apply(s) => {
                    seen.services.insert(service_key(&s), s);
                }
                watcher::Event::Delete(s) => {
                    seen.services.remove(&service_key(&s));
                }
            },
        }
        if !(seen.policies_listed && seen.services_listed) {
            continue;
        }
        let (rows, mut problems) = desired_rows(seen.policies.values().flatten(), &seen.services);
        // Its problems are the TCP call's (the same policies and Services), but for
        // the UDP ports' own.
        let (udp_rows, udp_problems) =
            desired_udp_rows(seen.policies.values().flatten(), &seen.services);
        problems.extend(udp_problems.into_iter().filter(|p| {
            matches!(
                p,
                ServicesError::ServiceRows(TableError::PortOutOfRange { .. })
            )
        }));
        // UDP first: the first TCP apply prunes the rows of no managed port.
        problems.extend(managed.apply_udp(&udp_rows));
        problems.extend(managed.apply(&rows));
        for err in problems {
            tracing::warn!(error = %error_chain(&err), "managing Services");
        }
        if let Some(f) = on_synced.take() {
            f();
        }
    }
    Err(ServicesError::WatchEnded {
        what: "ScalingPolicy/Service",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> DynamicObject {
        DynamicObject::new(name, &scaling_policy_resource())
            .within(ns)
            .data(json!({ "spec": spec }))
    }

    fn service(ns: &str, name: &str, ip: &str) -> (ServiceRef, Service) {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}
        }))
        .unwrap();
        (
            ServiceRef {
                namespace: ns.into(),
                name: name.into(),
            },
            svc,
        )
    }

    #[test]
    fn a_policy_without_bounds_gets_the_crd_defaults() {
        let p = policy(
            "shop",
            "web",
            json!({"target": {"deployment": "web", "service": "web-svc"}}),
        );
        let t = policy_target(&p).unwrap().unwrap();
        assert_eq!(t.policy, "shop/web");
        assert_eq!(
            t.service,
            ServiceRef {
                namespace: "shop".into(),
                name: "web-svc".into()
            }
        );
        // Held for the whole readiness budget (10 minutes), not the 60 s that gave an
        // ML model's first callers a 503 while it was still loading as planned.
        assert_eq!(t.bounds.hold_timeout, Duration::from_secs(600));
        assert_eq!(t.bounds.max_held, 1024);
    }

    #[test]
    fn load_balancing_comes_from_the_policy_and_a_bad_field_is_named() {
        let spec = |lb: serde_json::Value| json!({"target": {"deployment": "web", "service": "web"}, "loadBalancing": lb});
        let t = policy_target(&policy(
            "shop",
            "web",
            json!({"target": {"service": "web"}}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(t.balancing, LoadBalancing::default(), "p2c by default");
        let t = policy_target(&policy(
            "shop",
            "web",
            spec(json!({"algorithm": "random", "slowStart": "20s", "preferSameZone": true})),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(t.balancing.algorithm, crate::ebpf::Algorithm::Random);
        assert_eq!(t.balancing.slow_start, Duration::from_secs(20));
        assert!(t.balancing.prefer_same_zone && !t.balancing.prefer_same_node);
        let err = policy_target(&policy(
            "shop",
            "web",
            spec(json!({"algorithm": "fastest"})),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(
                "ScalingPolicy shop/web: spec.loadBalancing.algorithm: unknown algorithm `fastest`"
            ),
            "{err}"
        );
    }

    #[test]
    fn backends_are_tiered_by_the_agents_node_and_zone() {
        let here = Locality {
            node: Some("node-a".into()),
            zone: Some("z1".into()),
        };
        let at = |node: &str, zone: &str| Place {
            node: Some(node.into()),
            zone: Some(zone.into()),
        };
        assert_eq!(here.tier(Some(&at("node-a", "z1"))), Tier::Node);
        assert_eq!(here.tier(Some(&at("node-b", "z1"))), Tier::Zone);
        assert_eq!(here.tier(Some(&at("node-c", "z2"))), Tier::Remote);
        assert_eq!(here.tier(None), Tier::Remote, "unknown: the farthest");
        // An agent that knows no zone never calls anything same-zone.
        let nowhere = Locality::default();
        assert_eq!(nowhere.tier(Some(&at("node-b", "z1"))), Tier::Remote);
    }

    #[test]
    fn the_hold_timeout_follows_the_readiness_budget_unless_set() {
        let target = |extra: serde_json::Value| {
            let mut spec = json!({"target": {"deployment": "web", "service": "web"}});
            spec.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            policy_target(&policy("shop", "web", spec))
        };
        for (extra, hold) in [
            (json!({"readinessBudget": "15m"}), 900),
            (json!({"readinessBudget": "1h30m"}), 5400),
            (
                json!({"readinessBudget": "15m", "holdTimeoutSeconds": 45}),
                45,
            ),
            (json!({"holdTimeoutSeconds": 45}), 45),
        ] {
            let t = target(extra.clone()).unwrap().unwrap();
            assert_eq!(t.bounds.hold_timeout, Duration::from_secs(hold), "{extra}");
        }
        for (bad, says) in [
            (
                json!("15 minutes"),
                "column 3: `15 minutes`: write the unit right after",
            ),
            (json!("10y"), "column 3: unknown unit `y`"),
            (json!("0s"), "must be longer than zero"),
            (json!(600), "must be a duration such as `10m`, got 600"),
        ] {
            let err = target(json!({"readinessBudget": bad}))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("shop/web: spec.readinessBudget: ") && err.contains(says),
                "{err}"
            );
        }
    }

    #[test]
    fn hold_bounds_come_from_the_policy() {
        let p = policy(
            "shop",
            "web",
            json!({"target": {"deployment": "web", "service": "web"},
                   "holdTimeoutSeconds": 600, "maxHeldConnections": 3}),
        );
        let t = policy_target(&p).unwrap().unwrap();
        assert_eq!(t.bounds.hold_timeout, Duration::from_secs(600));
        assert_eq!(t.bounds.max_held, 3);
    }

    #[test]
    fn a_policy_without_a_service_manages_nothing() {
        let p = policy("shop", "batch", json!({"target": {"deployment": "batch"}}));
        assert_eq!(policy_target(&p).unwrap(), None);
    }

    #[test]
    fn a_paused_policy_manages_nothing_until_resumed() {
        let spec =
            |paused| json!({"target": {"deployment": "web", "service": "web"}, "paused": paused});
        assert_eq!(
            policy_target(&policy("shop", "web", spec(true))).unwrap(),
            None
        );
        assert!(
            policy_target(&policy("shop", "web", spec(false)))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn a_bad_bound_is_an_error_naming_the_policy_and_the_field() {
        for bad in [json!(0), json!(-5), json!("ten"), json!(1.5)] {
            let p = policy(
                "shop",
                "web",
                json!({"target": {"deployment": "web", "service": "web"},
                       "maxHeldConnections": bad}),
            );
            let err = policy_target(&p).unwrap_err().to_string();
            assert!(
                err.contains("shop/web") && err.contains("spec.maxHeldConnections"),
                "{err}"
            );
        }
        let p = policy("shop", "web", json!({"target": "web"}));
        let err = policy_target(&p).unwrap_err().to_string();
        assert!(err.contains("shop/web") && err.contains("spec"), "{err}");
    }

    #[test]
    fn only_services_that_exist_and_are_targeted_get_rows() {
        let targets = [
            policy_target(&policy(
                "shop",
                "a",
                json!({"target": {"deployment": "a", "service": "a"}}),
            ))
            .unwrap()
            .unwrap(),
            policy_target(&policy(
                "shop",
                "b",
                json!({"target": {"deployment": "b", "service": "missing"}}),
            ))
            .unwrap()
            .unwrap(),
        ];
        let services: BTreeMap<_, _> = [
            service("shop", "a", "127.96.0.10"),
            service("shop", "untargeted", "127.96.0.11"),
            service("other", "a", "127.96.0.12"),
        ]
        .into_iter()
        .collect();
        let (rows, problems) = desired_rows(&targets, &services);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(rows.len(), 1);
        let (svc, r) = rows.iter().next().unwrap();
        assert_eq!(svc.to_string(), "shop/a");
        assert_eq!(r[0].0, "127.96.0.10:80".parse().unwrap());
        assert_eq!(r[0].1.port_name, "web");
        assert_eq!(r[0].1.bounds.hold_timeout, policy::DEFAULT_READINESS_BUDGET);
    }

    #[test]
    fn two_policies_for_one_service_keep_the_first_by_name_and_say_so() {
        let a = policy_target(&policy(
            "shop",
            "z-late",
            json!({"target": {"deployment": "a", "service": "a"}, "maxHeldConnections": 9}),
        ))
        .unwrap()
        .unwrap();
        let b = policy_target(&policy(
            "shop",
            "a-early",
            json!({"target": {"deployment": "a", "service": "a"}, "maxHeldConnections": 2}),
        ))
        .unwrap()
        .unwrap();
        let services: BTreeMap<_, _> = [service("shop", "a", "127.96.0.10")].into_iter().collect();
        let (rows, problems) = desired_rows([&a, &b], &services);
        assert_eq!(rows.values().next().unwrap()[0].1.bounds.max_held, 2);
        assert_eq!(problems.len(), 1);
        let msg = problems[0].to_string();
        assert!(msg.contains("shop/a-early is used"), "{msg}");
    }

    #[test]
    fn a_service_with_a_bad_cluster_ip_is_reported_and_left_out() {
        let t = policy_target(&policy(
            "shop",
            "a",
            json!({"target": {"deployment": "a", "service": "a"}}),
        ))
        .unwrap()
        .unwrap();
        let services: BTreeMap<_, _> = [service("shop", "a", "127.96.0.999")].into_iter().collect();
        let (rows, problems) = desired_rows([&t], &services);
        assert!(rows.is_empty());
        assert!(problems[0].to_string().contains("127.96.0.999"));
    }

    #[test]
    fn the_error_chain_names_every_cause() {
        let err = ServicesError::ReadCounters(Box::new(DatapathError::TableFull { max: 3 }));
        assert_eq!(
            error_chain(&err),
            "reading the datapath counters: the services table is full (3 services)"
        );
    }

    #[test]
    fn udp_ports_are_rows_of_their_own_beside_tcp_ports_of_the_same_number() {
        let t = policy_target(&policy(
            "kube-system",
            "dns",
            json!({"target": {"deployment": "dns", "service": "dns"}}),
        ))
        .unwrap()
        .unwrap();
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "dns", "namespace": "kube-system"},
            "spec": {"clusterIP": "127.96.0.10", "clusterIPs": ["127.96.0.10"],
                     "ports": [{"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                               {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}
        }))
        .unwrap();
        let svc_ref = ServiceRef {
            namespace: "kube-system".into(),
            name: "dns".into(),
        };
        let services: BTreeMap<_, _> = [(svc_ref.clone(), svc)].into_iter().collect();
        let (tcp, problems) = desired_rows([&t], &services);
        assert!(problems.is_empty(), "{problems:?}");
        let (udp, problems) = desired_udp_rows([&t], &services);
        assert!(problems.is_empty(), "{problems:?}");
        let addr: SocketAddr = "127.96.0.10:53".parse().unwrap();
        assert_eq!(tcp[&svc_ref].len(), 1);
        assert_eq!(tcp[&svc_ref][0].0, addr);
        assert_eq!(tcp[&svc_ref][0].1.port_name, "dns-tcp");
        assert_eq!(udp[&svc_ref].len(), 1);
        assert_eq!(udp[&svc_ref][0].0, addr);
        assert_eq!(udp[&svc_ref][0].1.port_name, "dns");
        assert_eq!(udp[&svc_ref][0].1.target_port, Some(5353));
    }

    #[test]
    fn a_headless_service_is_not_managed() {
        let t = policy_target(&policy(
            "shop",
            "a",
            json!({"target": {"deployment": "a", "service": "a"}}),
        ))
        .unwrap()
        .unwrap();
        let services: BTreeMap<_, _> = [service("shop", "a", "None")].into_iter().collect();
        let (rows, problems) = desired_rows([&t], &services);
        assert!(rows.is_empty() && problems.is_empty());
    }
}
