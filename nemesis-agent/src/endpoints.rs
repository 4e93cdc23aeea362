//! Ready backends of Services, from their EndpointSlices: one `watch` channel per Service
//! that the proxy and the mode follower subscribe to. Owns the EndpointSlice watch and the
//! slice -> backends translation; never decides what to do with a Service (hold, flip).
#![deny(unsafe_code)]

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use nemesis_common::wire::ServiceRef;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The label by which the EndpointSlice controller names a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Ready backends of one Service, merged over all its EndpointSlices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceEndpoints {
    /// Ready backends per EndpointSlice port name; a Service port and its slice port share
    /// a name ("" when the Service has one unnamed port), which is how a Service port is
    /// mapped to the port its pods listen on, whatever its `targetPort` says.
    by_port: BTreeMap<String, BTreeSet<SocketAddr>>,
    /// Ready addresses of slices that list no ports (selector-less Services managed by
    /// hand); reached at the Service port's numeric `targetPort`.
    portless: BTreeSet<IpAddr>,
    /// Where each ready address runs (its endpoint's `nodeName` and `zone`), for
    /// balance mode's topology preference.
    places: BTreeMap<IpAddr, Place>,
    /// The pod behind each ready address (its endpoint's `targetRef`: the uid, else the
    /// name), where the slice says: a pod started in a stopped one's place may get its
    /// address, and only this tells the two apart.
    pods: BTreeMap<IpAddr, String>,
}

/// One ready backend as told apart from every other: its address and, where the slice
/// names it, its pod. Two pods that had the same address one after the other are two
/// backends.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendId {
    pub addr: SocketAddr,
    pub pod: Option<String>,
}

/// Where an endpoint runs, as its EndpointSlice says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Place {
    pub node: Option<String>,
    pub zone: Option<String>,
}

/// UDP ports are kept beside the TCP ones under this prefix (Service port names are DNS
/// labels, which never contain it), so a TCP lookup never meets a UDP port.
const UDP_PORT_PREFIX: &str = "udp/";

impl ServiceEndpoints {
    /// Backends for one named port, e.g. for tests: `ServiceEndpoints::default().with_port("http", addrs)`.
    pub fn with_port(
        mut self,
        port_name: &str,
        backends: impl IntoIterator<Item = SocketAddr>,
    ) -> Self {
        self.by_port
            .entry(port_name.to_string())
            .or_default()
            .extend(backends);
        self
    }

    /// No ready address at all: the Service is at zero (or all its pods are unready).
    pub fn is_empty(&self) -> bool {
        self.portless.is_empty() && self.by_port.values().all(BTreeSet::is_empty)
    }

    /// Every ready backend of every port (port 0 for the addresses of slices that list
    /// no ports): what tells one set of pods from another.
    pub fn addresses(&self) -> BTreeSet<SocketAddr> {
        self.by_port
            .values()
            .flatten()
            .copied()
            .chain(self.portless.iter().map(|ip| SocketAddr::new(*ip, 0)))
            .collect()
    }

    /// The ready backends for the Service port named `port_name`, whose numeric
    /// `targetPort` (if any) reaches pods of slices that list no ports.
    pub fn backends(&self, port_name: &str, target_port: Option<u16>) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self
            .by_port
            .get(port_name)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        if let Some(port) = target_port {
            out.extend(self.portless.iter().map(|ip| SocketAddr::new(*ip, port)));
        }
        out
    }

    /// The ready backends for the UDP Service port named `port_name` (the UDP hold
    /// relay's; TCP's [`ServiceEndpoints::backends`] never lists UDP ports).
    pub fn udp_backends(&self, port_name: &str) -> Vec<SocketAddr> {
        self.by_port
            .get(&format!("{UDP_PORT_PREFIX}{port_name}"))
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Every ready backend with the pod behind it (see [`BackendId`]): what tells one
    /// set of pods from another, even when a new pod reuses a stopped one's address.
    pub fn backend_ids(&self) -> BTreeSet<BackendId> {
        self.addresses()
            .into_iter()
            .map(|addr| BackendId {
                addr,
                pod: self.pods.get(&addr.ip()).cloned(),
            })
            .collect()
    }

    /// Records the pod behind a backend address, e.g. for tests.
    pub fn with_pod(mut self, ip: IpAddr, pod: &str) -> Self {
        self.pods.insert(ip, pod.to_string());
        self
    }

    /// Where a backend address runs, if its slice said.
    pub fn place(&self, ip: &IpAddr) -> Option<&Place> {
        self.places.get(ip)
    }

    /// Records where a backend runs, e.g. for tests.
    pub fn with_place(mut self, ip: IpAddr, place: Place) -> Self {
        self.places.insert(ip, place);
        self
    }

    fn merge(&mut self, other: &ServiceEndpoints) {
        self.places
            .extend(other.places.iter().map(|(k, v)| (*k, v.clone())));
        self.pods
            .extend(other.pods.iter().map(|(k, v)| (*k, v.clone())));
        for (name, addrs) in &other.by_port {
            self.by_port
                .entry(name.clone())
                .or_default()
                .extend(addrs.iter().copied());
        }
        self.portless.extend(other.portless.iter().copied());
    }
}

/// The Service a slice belongs to, from its label; `None` for slices of no Service.
pub fn slice_service(slice: &EndpointSlice) -> Option<ServiceRef> {
    let name = slice.labels().get(SERVICE_NAME_LABEL)?;
    Some(ServiceRef {
        namespace: slice.namespace().unwrap_or_default(),
        name: name.clone(),
    })
}

/// The ready backends one slice contributes. Only TCP ports count (the proxy holds TCP);
/// an endpoint whose `ready` condition is unset counts as ready, as the API documents;
/// a terminating one never does (it gets no new connections, even while it still
/// serves); addresses that are not IPs (FQDN slices) are skipped.
pub fn slice_endpoints(slice: &EndpointSlice) -> ServiceEndpoints {
    let mut out = ServiceEndpoints::default();
    let mut ready_ips: Vec<IpAddr> = vec![];
    for ep in slice.endpoints.iter().flatten() {
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        if !ready || terminating {
            continue;
        }
        let pod = ep.target_ref.as_ref().and_then(|r| {
            r.uid.clone().or_else(|| {
                r.name
                    .as_ref()
                    .map(|n| format!("{}/{n}", r.namespace.as_deref().unwrap_or_default()))
            })
        });
        for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
            ready_ips.push(ip);
            if let Some(pod) = &pod {
                out.pods.insert(ip, pod.clone());
            }
            if ep.node_name.is_some() || ep.zone.is_some() {
                out.places.insert(
                    ip,
                    Place {
                        node: ep.node_name.clone(),
                        zone: ep.zone.clone(),
                    },
                );
            }
        }
    }
    // No ready address contributes nothing, not even an empty port entry: an empty
    // Service must compare equal to "no slices yet", or the registry would announce a
    // change that is none (and a wake-up flight would be sent again).
    if ready_ips.is_empty() {
        return out;
    }
    match slice.ports.as_deref() {
        None | Some([]) => out.portless.extend(ready_ips),
        Some(ports) => {
            for port in ports {
                let Some(prefix) = (match port.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => Some(""),
                    "UDP" => Some(UDP_PORT_PREFIX),
                    _ => None,
                }) else {
                    continue;
                };
                let Some(number) = port.port.and_then(|p| u16::try_from(p).ok()) else {
                    continue;
                };
                let name = format!("{prefix}{}", port.name.as_deref().unwrap_or_default());
                out.by_port
                    .entry(name)
                    .or_default()
                    .extend(ready_ips.iter().map(|ip| SocketAddr::new(*ip, number)));
            }
        }
    }
    out
}

// === impl EndpointRegistry ===

/// One `watch` channel of [`ServiceEndpoints`] per Service. Publishers (the slice watcher,
/// or a test) replace a Service's backends; subscribers see the latest value at once and
/// every change after it.
#[derive(Debug)]
pub struct EndpointRegistry {
    channels: Mutex<HashMap<ServiceRef, watch::Sender<Arc<ServiceEndpoints>>>>,
    /// Bumped on every change of any Service, for those that follow all Services at once.
    any_change: watch::Sender<u64>,
    /// True once a publisher has published a complete listing (see [`Self::mark_synced`]).
    synced: watch::Sender<bool>,
}

impl Default for EndpointRegistry {
    fn default() -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            any_change: watch::Sender::new(0),
            synced: watch::Sender::new(false),
        }
    }
}

impl EndpointRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn sender(&self, service: &ServiceRef) -> watch::Sender<Arc<ServiceEndpoints>> {
        let mut channels = self.channels.lock().expect("endpoint registry lock");
        channels
            .entry(service.clone())
            .or_insert_with(|| watch::Sender::new(Arc::new(ServiceEndpoints::default())))
            .clone()
    }

    /// Follow one Service's ready backends (empty until something is published).
    pub fn subscribe(&self, service: &ServiceRef) -> watch::Receiver<Arc<ServiceEndpoints>> {
        self.sender(service).subscribe()
    }

    /// The Service's ready backends now.
    pub fn current(&self, service: &ServiceRef) -> Arc<ServiceEndpoints> {
        self.sender(service).borrow().clone()
    }

    /// Replace a Service's ready backends; subscribers are woken only on a real change.
    pub fn publish(&self, service: &ServiceRef, endpoints: ServiceEndpoints) {
        let changed = self.sender(service).send_if_modified(|cur| {
            if **cur == endpoints {
                false
            } else {
                *cur = Arc::new(endpoints);
                true
            }
        });
        if changed {
            self.any_change.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Wakes on every change of any Service's backends.
    pub fn subscribe_any(&self) -> watch::Receiver<u64> {
        self.any_change.subscribe()
    }

    /// Every Service's backends have been published from a complete listing: an empty
    /// Service is now really at zero, not merely not listed yet.
    pub fn mark_synced(&self) {
        self.synced.send_replace(true);
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Resolves once [`Self::mark_synced`] was called.
    pub async fn synced(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|s| *s).await;
    }
}

// === impl SliceIndex ===

/// The slices seen so far, so that a change of one slice republishes the merge of all
/// slices of its Service. Kept apart from the watch so it is tested without an API server.
#[derive(Debug, Default)]
pub struct SliceIndex {
    /// (namespace, slice name) -> (Service, what the slice contributes).
    slices: HashMap<(String, String), (ServiceRef, ServiceEndpoints)>,
}

impl SliceIndex {
    fn key(slice: &EndpointSlice) -> (String, String) {
        (slice.namespace().unwrap_or_default(), slice.name_any())
    }

    /// Record an added or changed slice; returns the Services whose backends may change
    /// (two when a slice moved between Services).
    pub fn apply(&mut self, slice: &EndpointSlice) -> Vec<ServiceRef> {
        let key = Self::key(slice);
        let old = self.slices.remove(&key).map(|(svc, _)| svc);
        let mut touched: Vec<ServiceRef> = old.into_iter().collect();
        if let Some(svc) = slice_service(slice) {
            self.slices
                .insert(key, (svc.clone(), slice_endpoints(slice)));
            if !touched.contains(&svc) {
                touched.push(svc);
            }
        }
        touched
    }

    /// Forget a deleted slice; returns its Service.
    pub fn delete(&mut self, slice: &EndpointSlice) -> Option<ServiceRef> {
        self.slices.remove(&Self::key(slice)).map(|(svc, _)| svc)
    }

    /// Replace everything with a fresh listing; returns every Service seen before or now.
    pub fn replace_all(&mut self, slices: &[EndpointSlice]) -> BTreeSet<ServiceRef> {
        let mut touched: BTreeSet<ServiceRef> =
            self.slices.values().map(|(svc, _)| svc.clone()).collect();
        self.slices.clear();
        for slice in slices {
            touched.extend(self.apply(slice));
        }
        touched
    }

    /// The merged ready backends of one Service.
    pub fn service_endpoints(&self, service: &ServiceRef) -> ServiceEndpoints {
        let mut out = ServiceEndpoints::default();
        for (svc, eps) in self.slices.values() {
            if svc == service {
                out.merge(eps);
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointsError {
    #[error("the EndpointSlice watch stream ended")]
    WatchEnded,
}

/// Watch every EndpointSlice that belongs to a Service (cluster-wide, by the
/// [`SERVICE_NAME_LABEL`] label) and publish each Service's ready backends into
/// `registry`. Runs until the stream ends; watch errors are retried with kube-rs's backoff,
/// and each is told to `on_error` in words for the operator (a 403 names the permission).
/// Every Service's backends are published, not only those managed now, so a Service that
/// becomes managed later has its backends at once.
pub async fn watch_endpoint_slices(
    client: kube::Client,
    registry: Arc<EndpointRegistry>,
    on_error: impl Fn(String) + Send,
) -> Result<(), EndpointsError> {
    let api: Api<EndpointSlice> = Api::all(client);
    // Not the hold slices the controller publishes for held Services: they list the
    // agents themselves, and taking them for backends would send held connections in
    // a loop.
    let config = watcher::Config::default().labels(&format!(
        "{SERVICE_NAME_LABEL},{}!={}",
        nemesis_common::wire::MANAGED_BY_LABEL,
        nemesis_common::wire::HOLD_SLICE_MANAGED_BY
    ));
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    let mut index = SliceIndex::default();
    // Slices of a relist, applied at once on `InitDone` so that a relist never publishes
    // a half-listed Service as empty.
    let mut relist: Option<Vec<EndpointSlice>> = None;
    while let Some(event) = stream.next().await {
        let touched: Vec<ServiceRef> = match event {
            Err(err) => {
                let why = format!("EndpointSlices: {}", crate::permissions::explain(&err));
                tracing::warn!(error = %why, "EndpointSlice watch failed; retrying");
                on_error(why);
                continue;
            }
            Ok(watcher::Event::Init) => {
                relist = Some(Vec::new());
                continue;
            }
            Ok(watcher::Event::InitApply(slice)) => {
                relist.get_or_insert_with(Vec::new).push(slice);
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let slices = relist.take().unwrap_or_default();
                tracing::debug!(slices = slices.len(), "EndpointSlices listed");
                let touched = index.replace_all(&slices);
                for svc in &touched {
                    registry.publish(svc, index.service_endpoints(svc));
                }
                registry.mark_synced();
                continue;
            }
            Ok(watcher::Event::Apply(slice)) => index.apply(&slice),
            Ok(watcher::Event::Delete(slice)) => index.delete(&slice).into_iter().collect(),
        };
        for svc in touched {
            let eps = index.service_endpoints(&svc);
            tracing::debug!(service = %svc, ready = !eps.is_empty(), "ready endpoints changed");
            registry.publish(&svc, eps);
        }
    }
    Err(EndpointsError::WatchEnded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use kube::api::ObjectMeta;

    fn slice(
        name: &str,
        svc: &str,
        ports: &[(&str, i32)],
        eps: &[(&str, Option<bool>)],
    ) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
                ..Default::default()
            },
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some(n.to_string()),
                        port: Some(*p),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: Some(
                eps.iter()
                    .map(|(ip, ready)| Endpoint {
                        addresses: vec![ip.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    fn svc(name: &str) -> ServiceRef {
        ServiceRef {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    #[test]
    fn only_ready_endpoints_are_backends_and_unset_ready_counts_as_ready() {
        let s = slice(
            "a-1",
            "a",
            &[("http", 8080)],
            &[
                ("198.18.0.5", Some(true)),
                ("198.18.0.6", Some(false)),
                ("198.18.0.7", None),
            ],
        );
        let eps = slice_endpoints(&s);
        assert_eq!(
            eps.backends("http", None),
            vec![
                "198.18.0.5:8080".parse().unwrap(),
                "198.18.0.7:8080".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_terminating_endpoint_is_no_backend_and_ready_ones_carry_their_place() {
        let mut s = slice(
            "a-1",
            "a",
            &[("http", 8080)],
            &[("198.18.0.5", Some(true)), ("198.18.0.6", Some(true))],
        );
        let eps_list = s.endpoints.as_mut().unwrap();
        eps_list[0].node_name = Some("node-a".into());
        eps_list[0].zone = Some("z1".into());
        // Still serving its open connections, but on its way out.
        eps_list[1].conditions.as_mut().unwrap().terminating = Some(true);
        let eps = slice_endpoints(&s);
        assert_eq!(
            eps.backends("http", None),
            vec!["198.18.0.5:8080".parse().unwrap()]
        );
        let place = eps.place(&"198.18.0.5".parse().unwrap()).unwrap();
        assert_eq!(place.node.as_deref(), Some("node-a"));
        assert_eq!(place.zone.as_deref(), Some("z1"));
        assert!(eps.place(&"198.18.0.6".parse().unwrap()).is_none());
    }

    #[test]
    fn service_port_maps_to_slice_port_by_name_not_by_number() {
        let s = slice(
            "a-1",
            "a",
            &[("http", 8080), ("grpc", 9090)],
            &[("198.18.0.5", Some(true))],
        );
        let eps = slice_endpoints(&s);
        assert_eq!(
            eps.backends("grpc", Some(80)),
            vec!["198.18.0.5:9090".parse().unwrap()]
        );
        assert!(eps.backends("metrics", None).is_empty());
    }

    #[test]
    fn udp_ports_are_kept_apart_from_tcp_ports_of_the_same_name() {
        let mut s = slice(
            "dns-1",
            "dns",
            &[("dns", 53), ("dns-tcp", 53)],
            &[("198.18.0.5", Some(true))],
        );
        s.ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
        let eps = slice_endpoints(&s);
        assert_eq!(
            eps.udp_backends("dns"),
            vec!["198.18.0.5:53".parse().unwrap()]
        );
        assert!(eps.backends("dns", None).is_empty(), "not a TCP port");
        assert!(eps.udp_backends("dns-tcp").is_empty(), "not a UDP port");
        assert_eq!(eps.backends("dns-tcp", None).len(), 1);
    }

    #[test]
    fn a_slice_without_ports_is_reached_at_the_numeric_target_port() {
        let mut s = slice("a-1", "a", &[], &[("198.18.0.5", Some(true))]);
        s.ports = None;
        let eps = slice_endpoints(&s);
        assert!(!eps.is_empty());
        assert_eq!(
            eps.backends("", Some(7000)),
            vec!["198.18.0.5:7000".parse().unwrap()]
        );
        assert!(eps.backends("", None).is_empty());
    }

    #[test]
    fn a_pod_in_a_stopped_ones_address_is_another_backend() {
        let with_pod = |uid: Option<&str>, name: &str| {
            let mut s = slice(
                "s1",
                "web",
                &[("http", 8080)],
                &[("198.18.0.5", Some(true))],
            );
            s.endpoints.as_mut().unwrap()[0].target_ref =
                Some(k8s_openapi::api::core::v1::ObjectReference {
                    kind: Some("Pod".into()),
                    namespace: Some("ns".into()),
                    name: Some(name.into()),
                    uid: uid.map(str::to_string),
                    ..Default::default()
                });
            slice_endpoints(&s)
        };
        let (a, b) = (
            with_pod(Some("uid-a"), "web-a"),
            with_pod(Some("uid-b"), "web-b"),
        );
        // The same backends to dial, but not the same pods: a change to publish.
        assert_eq!(a.backends("http", None), b.backends("http", None));
        assert_ne!(a, b);
        let id = |e: &ServiceEndpoints| e.backend_ids().into_iter().next().unwrap();
        assert_eq!(id(&a).pod.as_deref(), Some("uid-a"));
        // No uid (a hand-made slice): the pod's name.
        assert_eq!(
            id(&with_pod(None, "web-c")).pod.as_deref(),
            Some("ns/web-c")
        );
        // No targetRef at all: the address alone.
        let plain = slice_endpoints(&slice(
            "s1",
            "web",
            &[("http", 8080)],
            &[("198.18.0.5", None)],
        ));
        assert_eq!(id(&plain).pod, None);
    }

    #[test]
    fn all_unready_is_empty() {
        let s = slice("a-1", "a", &[("http", 80)], &[("198.18.0.5", Some(false))]);
        assert!(slice_endpoints(&s).is_empty());
    }

    #[test]
    fn a_slice_without_ready_endpoints_equals_no_slice_at_all() {
        let s = slice("a-1", "a", &[("http", 80)], &[("198.18.0.5", Some(false))]);
        assert_eq!(slice_endpoints(&s), ServiceEndpoints::default());
        let reg = EndpointRegistry::new();
        let mut rx = reg.subscribe(&svc("a"));
        reg.publish(&svc("a"), slice_endpoints(&s));
        assert!(!rx.has_changed().unwrap(), "no change to announce");
        rx.borrow_and_update();
    }

    #[test]
    fn backends_of_a_service_merge_over_its_slices_and_deletes_remove_them() {
        let mut idx = SliceIndex::default();
        idx.apply(&slice(
            "a-1",
            "a",
            &[("", 80)],
            &[("198.18.0.5", Some(true))],
        ));
        idx.apply(&slice(
            "a-2",
            "a",
            &[("", 80)],
            &[("198.18.0.6", Some(true))],
        ));
        idx.apply(&slice(
            "b-1",
            "b",
            &[("", 80)],
            &[("198.18.0.7", Some(true))],
        ));
        assert_eq!(idx.service_endpoints(&svc("a")).backends("", None).len(), 2);
        assert_eq!(idx.delete(&slice("a-1", "a", &[], &[])), Some(svc("a")));
        assert_eq!(
            idx.service_endpoints(&svc("a")).backends("", None),
            vec!["198.18.0.6:80".parse().unwrap()]
        );
    }

    #[test]
    fn a_relist_touches_services_that_disappeared() {
        let mut idx = SliceIndex::default();
        idx.apply(&slice(
            "a-1",
            "a",
            &[("", 80)],
            &[("198.18.0.5", Some(true))],
        ));
        let touched = idx.replace_all(&[slice("b-1", "b", &[("", 80)], &[])]);
        assert_eq!(touched, [svc("a"), svc("b")].into());
        assert!(idx.service_endpoints(&svc("a")).is_empty());
    }

    #[test]
    fn registry_wakes_subscribers_only_on_a_real_change() {
        let reg = EndpointRegistry::new();
        let mut rx = reg.subscribe(&svc("a"));
        let mut any = reg.subscribe_any();
        let eps = ServiceEndpoints::default().with_port("", ["198.18.0.5:80".parse().unwrap()]);
        reg.publish(&svc("a"), eps.clone());
        assert!(rx.has_changed().unwrap());
        assert!(any.has_changed().unwrap());
        rx.borrow_and_update();
        any.borrow_and_update();
        reg.publish(&svc("a"), eps);
        assert!(!rx.has_changed().unwrap());
        assert!(!any.has_changed().unwrap());
    }
}
