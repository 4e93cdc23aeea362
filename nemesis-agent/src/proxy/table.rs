//! The managed-Service table of the proxy: ClusterIP:port -> Service, port and hold bounds.
//! Owns the translation of a Kubernetes Service into table rows; never decides which
//! Services are managed (the agent's policy watch does) nor what happens to a connection.

use super::drain::Drain;
use super::sleep_gate::SleepGates;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use nemesis_common::wire::ServiceRef;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// Five minutes: long enough for a slow starter (an ML model pulling weights on a fresh
/// GPU node), short enough that a Service that never comes up frees its clients.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(300);
/// Held connections per Service: a burst of a few thousand clients is held, more is an
/// overload the Service would not absorb on its first pod anyway.
pub const DEFAULT_MAX_HELD_PER_SERVICE: usize = 4096;
/// 64 KiB per held connection: a request line, headers and a small body; past it the
/// proxy stops reading and TCP pushes back on the client.
pub const DEFAULT_BUFFER_BYTES: usize = 64 * 1024;
/// `Retry-After` of a refused HTTP/1 request: a cold start is seconds away, not minutes.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Per-Service bounds of holding, from the Service's policy (defaults above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldBounds {
    /// From accept until a backend must have taken the connection.
    pub hold_timeout: Duration,
    /// Connections held at once for this Service on this node.
    pub max_held: usize,
    /// Bytes buffered per held connection before the proxy stops reading.
    pub buffer_bytes: usize,
    /// `Retry-After` sent with a 503 to a refused HTTP/1 client.
    pub retry_after: Duration,
}

impl Default for HoldBounds {
    fn default() -> Self {
        Self {
            hold_timeout: DEFAULT_HOLD_TIMEOUT,
            max_held: DEFAULT_MAX_HELD_PER_SERVICE,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            retry_after: DEFAULT_RETRY_AFTER,
        }
    }
}

/// One Service port as the proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedPort {
    pub service: ServiceRef,
    /// The Service port's name ("" when unnamed): its EndpointSlice port has the same name.
    pub port_name: String,
    /// The numeric `targetPort`, for slices that list no ports.
    pub target_port: Option<u16>,
    pub bounds: HoldBounds,
    /// How balance mode picks among the port's backends (the policy's
    /// `spec.loadBalancing`).
    pub balancing: nemesis_common::policy::LoadBalancing,
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("Service {service}: clusterIP {ip:?} is not an IP address")]
    ParseClusterIp { service: ServiceRef, ip: String },
    #[error("Service {service}: port {port} of {name:?} is out of range")]
    PortOutOfRange {
        service: ServiceRef,
        name: String,
        port: i32,
    },
}

/// The table rows of a Service: every ClusterIP (both families) times every TCP port.
/// A headless Service (`clusterIP: None`) has no rows: there is nothing to intercept.
pub fn service_ports(
    svc: &Service,
    bounds: HoldBounds,
) -> Result<Vec<(SocketAddr, ManagedPort)>, TableError> {
    ports_of_protocol(svc, bounds, "TCP")
}

/// The UDP ports of `svc` as rows, as [`service_ports`] gives its TCP ones. Kept apart:
/// a ClusterIP may serve TCP 53 and UDP 53, which the proxy's table (keyed by address)
/// could not tell apart.
pub fn udp_service_ports(
    svc: &Service,
    bounds: HoldBounds,
) -> Result<Vec<(SocketAddr, ManagedPort)>, TableError> {
    ports_of_protocol(svc, bounds, "UDP")
}

fn ports_of_protocol(
    svc: &Service,
    bounds: HoldBounds,
    protocol: &str,
) -> Result<Vec<(SocketAddr, ManagedPort)>, TableError> {
    let service = ServiceRef {
        namespace: svc.namespace().unwrap_or_default(),
        name: svc.name_any(),
    };
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(Vec::new());
    };
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if ips.is_empty()
        && let Some(ip) = spec.cluster_ip.as_deref()
    {
        ips.push(ip);
    }
    let mut rows = Vec::new();
    for ip in ips {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let ip: IpAddr = ip.parse().map_err(|_| TableError::ParseClusterIp {
            service: service.clone(),
            ip: ip.to_string(),
        })?;
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().unwrap_or("TCP") != protocol {
                continue;
            }
            let name = port.name.clone().unwrap_or_default();
            let number = u16::try_from(port.port).map_err(|_| TableError::PortOutOfRange {
                service: service.clone(),
                name: name.clone(),
                port: port.port,
            })?;
            let target_port = match &port.target_port {
                None => Some(number),
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                // A named targetPort is resolved per pod; the slice's port carries it.
                Some(IntOrString::String(_)) => None,
            };
            rows.push((
                SocketAddr::new(ip, number),
                ManagedPort {
                    service: service.clone(),
                    port_name: name,
                    target_port,
                    bounds,
                    balancing: Default::default(),
                },
            ));
        }
    }
    Ok(rows)
}

/// ClusterIP:port -> [`ManagedPort`] of every managed Service. Read on every accepted
/// connection, written when a Service or its policy changes. Carries the [`Drain`]
/// signal too: the mode follower and the proxy share the table, and the signal is how
/// the one tells the other which Services' forwarded connections may step out, as the
/// [`SleepGates`] are which Services' held connections must wait.
#[derive(Debug)]
pub struct ServiceTable {
    rows: RwLock<HashMap<SocketAddr, Arc<ManagedPort>>>,
    /// Services with UDP ports, by Service: the proxy never accepts their datagrams
    /// (the UDP hold relay does), but their modes follow their endpoints all the same.
    udp: RwLock<BTreeMap<ServiceRef, Vec<SocketAddr>>>,
    changes: watch::Sender<u64>,
    drain: Drain,
    sleep_gates: SleepGates,
}

impl Default for ServiceTable {
    fn default() -> Self {
        Self {
            rows: RwLock::new(HashMap::new()),
            udp: RwLock::new(BTreeMap::new()),
            changes: watch::Sender::new(0),
            drain: Drain::default(),
            sleep_gates: SleepGates::default(),
        }
    }
}

impl ServiceTable {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replace all rows of `service` with `rows` (which must all name `service`).
    pub fn upsert_service(&self, service: &ServiceRef, rows: Vec<(SocketAddr, ManagedPort)>) {
        {
            let mut table = self.rows.write().expect("service table lock");
            table.retain(|_, p| &p.service != service);
            for (addr, port) in rows {
                debug_assert_eq!(&port.service, service);
                table.insert(addr, Arc::new(port));
            }
        }
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn remove_service(&self, service: &ServiceRef) {
        self.rows
            .write()
            .expect("service table lock")
            .retain(|_, p| &p.service != service);
        self.udp
            .write()
            .expect("service table lock")
            .remove(service);
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Replace the UDP ports of `service` (none: it has no UDP port managed).
    pub fn upsert_udp_service(&self, service: &ServiceRef, addrs: Vec<SocketAddr>) {
        {
            let mut udp = self.udp.write().expect("service table lock");
            if addrs.is_empty() {
                udp.remove(service);
            } else {
                udp.insert(service.clone(), addrs);
            }
        }
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The UDP ports of `service` now.
    pub fn udp_addrs(&self, service: &ServiceRef) -> Vec<SocketAddr> {
        self.udp
            .read()
            .expect("service table lock")
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    pub fn lookup(&self, destination: SocketAddr) -> Option<Arc<ManagedPort>> {
        self.rows
            .read()
            .expect("service table lock")
            .get(&destination)
            .cloned()
    }

    /// The ClusterIP:port of `service`'s port named `port_name` in the family of
    /// `family` (a dual-stack Service's IPv6 callers stand for its IPv6 ClusterIP, so
    /// they are forwarded to IPv6 backends), else of the other family (a single-stack
    /// Service reached through a listener of the other family).
    pub fn address_of(
        &self,
        service: &ServiceRef,
        port_name: &str,
        family: IpAddr,
    ) -> Option<SocketAddr> {
        self.rows
            .read()
            .expect("service table lock")
            .iter()
            .filter(|(_, p)| &p.service == service && p.port_name == port_name)
            .map(|(a, _)| *a)
            .min_by_key(|a| (a.is_ipv6() != family.is_ipv6(), *a))
    }

    /// Every managed Service, of TCP or UDP ports.
    pub fn services(&self) -> BTreeSet<ServiceRef> {
        let mut out: BTreeSet<ServiceRef> = self
            .rows
            .read()
            .expect("service table lock")
            .values()
            .map(|p| p.service.clone())
            .collect();
        out.extend(self.udp.read().expect("service table lock").keys().cloned());
        out
    }

    /// Wakes on every change of the table.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// When forwarded connections should step out of the proxy.
    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// Which Services' held connections wait for the controller's sleep to end.
    pub fn sleep_gates(&self) -> &SleepGates {
        &self.sleep_gates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use kube::api::ObjectMeta;

    fn svc(cluster_ips: &[&str], ports: Vec<ServicePort>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: cluster_ips.first().map(|s| s.to_string()),
                cluster_ips: Some(cluster_ips.iter().map(|s| s.to_string()).collect()),
                ports: Some(ports),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn port(
        name: Option<&str>,
        port: i32,
        target: Option<IntOrString>,
        proto: &str,
    ) -> ServicePort {
        ServicePort {
            name: name.map(str::to_string),
            port,
            target_port: target,
            protocol: Some(proto.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_service_with_udp_ports_only_is_among_the_services() {
        let t = ServiceTable::new();
        let svc = ServiceRef {
            namespace: "ns".into(),
            name: "dns".into(),
        };
        let addr: SocketAddr = "127.96.0.10:53".parse().unwrap();
        t.upsert_udp_service(&svc, vec![addr]);
        assert!(t.services().contains(&svc));
        assert_eq!(t.lookup(addr), None, "the proxy never takes a UDP port");
        assert_eq!(t.udp_addrs(&svc), vec![addr]);
        t.remove_service(&svc);
        assert!(t.services().is_empty());
    }

    #[test]
    fn every_cluster_ip_and_tcp_port_is_a_row_and_udp_is_skipped() {
        let s = svc(
            &["127.96.0.10", "::1"],
            vec![
                port(Some("http"), 80, Some(IntOrString::Int(8080)), "TCP"),
                port(
                    Some("grpc"),
                    9090,
                    Some(IntOrString::String("grpc".into())),
                    "TCP",
                ),
                port(Some("dns"), 53, None, "UDP"),
            ],
        );
        let rows = service_ports(&s, HoldBounds::default()).unwrap();
        let addrs: BTreeSet<SocketAddr> = rows.iter().map(|(a, _)| *a).collect();
        assert_eq!(
            addrs,
            [
                "127.96.0.10:80".parse().unwrap(),
                "127.96.0.10:9090".parse().unwrap(),
                "[::1]:80".parse().unwrap(),
                "[::1]:9090".parse().unwrap()
            ]
            .into()
        );
        let http = &rows.iter().find(|(a, _)| a.port() == 80).unwrap().1;
        assert_eq!(
            (http.port_name.as_str(), http.target_port),
            ("http", Some(8080))
        );
        let grpc = &rows.iter().find(|(a, _)| a.port() == 9090).unwrap().1;
        assert_eq!(grpc.target_port, None);
    }

    #[test]
    fn headless_service_has_no_rows() {
        let s = svc(&["None"], vec![port(None, 80, None, "TCP")]);
        assert!(service_ports(&s, HoldBounds::default()).unwrap().is_empty());
    }

    #[test]
    fn a_bad_cluster_ip_is_an_error_naming_the_service() {
        let s = svc(&["127.96.0.300"], vec![port(None, 80, None, "TCP")]);
        let err = service_ports(&s, HoldBounds::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ns/web") && err.contains("127.96.0.300"),
            "{err}"
        );
    }

    #[test]
    fn upsert_replaces_the_rows_of_a_service() {
        let t = ServiceTable::new();
        let s = svc(&["127.96.0.10"], vec![port(None, 80, None, "TCP")]);
        let rows = service_ports(&s, HoldBounds::default()).unwrap();
        let svc_ref = rows[0].1.service.clone();
        t.upsert_service(&svc_ref, rows);
        assert!(t.lookup("127.96.0.10:80".parse().unwrap()).is_some());
        let s2 = svc(&["127.96.0.10"], vec![port(None, 81, None, "TCP")]);
        t.upsert_service(&svc_ref, service_ports(&s2, HoldBounds::default()).unwrap());
        assert!(t.lookup("127.96.0.10:80".parse().unwrap()).is_none());
        assert!(t.lookup("127.96.0.10:81".parse().unwrap()).is_some());
        t.remove_service(&svc_ref);
        assert!(t.services().is_empty());
    }
}
