//! The node's Service proxy, as kube-proxy's old userspace mode did it: for every TCP
//! port of a Service and each of its ClusterIPs that is a loopback address (the
//! sandbox's IPv4 service range is 127.96.0.0/16) or in the IPv6 service range
//! (fd6e:6d00:ffff::/108), a listener on `ClusterIP:port` while the Service has ready
//! endpoints of that family, forwarding each connection to one of them; each family is
//! served from its own EndpointSlices, as kube-proxy does. With no ready endpoint there
//! is no listener, so a connect is refused, as kube-proxy's REJECT rule makes it; that
//! is the very behaviour Nemesis exists to hide. An IPv6 ClusterIP is put on `lo` (as
//! kube-proxy's IPVS mode puts ClusterIPs on a dummy interface) while it is served, and
//! removed after. It binds nothing else.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::controllers::endpointslices::SERVICE_NAME_LABEL;

/// A backend that does not answer a SYN within this is skipped for the next one, as
/// the userspace proxy did; pods are on a local bridge, so a second means it is gone.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

// === the pure part ===

/// Where each Service port is served and which ready endpoints serve it.
pub type Frontends = BTreeMap<SocketAddr, Vec<SocketAddr>>;

/// Whether this proxy serves ClusterIP `ip`: IPv4 loopback, or the IPv6 service range.
pub fn servable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(_) => crate::apiserver::in_service_range(ip),
    }
}

/// The frontends `services` need given `slices`: one per TCP port and servable
/// ClusterIP of a Service, listing the addresses of its ready endpoints of the
/// ClusterIP's family at the slice port of the same name. Ports without a ready
/// endpoint are left out (refused).
pub fn frontends<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: &[Arc<EndpointSlice>],
) -> Frontends {
    let mut out = Frontends::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        let mut ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .filter(|ip| servable(*ip))
            .collect();
        ips.sort();
        ips.dedup();
        for ip in ips {
            frontends_of(svc, ip, slices, &mut out);
        }
    }
    out
}

fn frontends_of(svc: &Service, ip: IpAddr, slices: &[Arc<EndpointSlice>], out: &mut Frontends) {
    let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let Some(spec) = &svc.spec else { return };
    {
        let ns = svc.namespace();
        let name = svc.name_any();
        let own: Vec<&EndpointSlice> = slices
            .iter()
            .map(Arc::as_ref)
            .filter(|s| {
                s.namespace() == ns
                    && s.labels().get(SERVICE_NAME_LABEL) == Some(&name)
                    && s.address_type == family
            })
            .collect();
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let Ok(front_port) = u16::try_from(port.port) else {
                continue;
            };
            let mut backends = Vec::new();
            for slice in &own {
                let Some(target) = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| {
                        p.name == port.name && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                    })
                    .and_then(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok())
                else {
                    continue;
                };
                for ep in slice.endpoints.iter().flatten() {
                    let ready = ep.conditions.as_ref().and_then(|c| c.ready) == Some(true);
                    if !ready {
                        continue;
                    }
                    for addr in &ep.addresses {
                        if let Ok(a) = addr.parse::<IpAddr>() {
                            backends.push(SocketAddr::new(a, target));
                        }
                    }
                }
            }
            if !backends.is_empty() {
                backends.sort();
                backends.dedup();
                out.insert(SocketAddr::new(ip, front_port), backends);
            }
        }
    }
}

// === the I/O part ===

struct Listener {
    backends: watch::Sender<Vec<SocketAddr>>,
    stop: CancellationToken,
}

/// Runs until `cancel` fires; then every listener is closed and every forwarded
/// connection is cut.
pub async fn run(client: Client, cancel: CancellationToken) {
    let (svc_reader, svc_writer) = reflector::store::<Service>();
    let services = reflector::reflector(
        svc_writer,
        watcher(
            kube::Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff(),
    );
    let (slice_reader, slice_writer) = reflector::store::<EndpointSlice>();
    let slices = reflector::reflector(
        slice_writer,
        watcher(
            kube::Api::<EndpointSlice>::all(client),
            watcher::Config::default(),
        )
        .default_backoff(),
    );
    let mut changes = futures::stream::select(services.map(|_| ()), slices.map(|_| ())).boxed();
    let conns = TaskTracker::new();
    let mut listeners: HashMap<SocketAddr, Listener> = HashMap::new();
    let mut local_v6: BTreeSet<IpAddr> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            change = changes.next() => {
                if change.is_none() {
                    break;
                }
                let want = desired(&svc_reader, &slice_reader);
                converge(&mut listeners, &mut local_v6, want, &conns, &cancel);
            }
        }
    }
    for (_, l) in listeners.drain() {
        l.stop.cancel();
    }
    for ip in std::mem::take(&mut local_v6) {
        local_address(ip, false);
    }
    conns.close();
    conns.wait().await;
}

fn desired(services: &Store<Service>, slices: &Store<EndpointSlice>) -> Frontends {
    let services = services.state();
    frontends(services.iter().map(Arc::as_ref), &slices.state())
}

fn converge(
    listeners: &mut HashMap<SocketAddr, Listener>,
    local_v6: &mut BTreeSet<IpAddr>,
    mut want: Frontends,
    conns: &TaskTracker,
    cancel: &CancellationToken,
) {
    listeners.retain(|front, l| {
        let keep = want.contains_key(front);
        if !keep {
            tracing::info!(%front, "service has no ready endpoint: closing its listener");
            l.stop.cancel();
        }
        keep
    });
    // IPv6 ClusterIPs no listener uses any more leave `lo`.
    local_v6.retain(|ip| {
        let used = listeners.keys().chain(want.keys()).any(|f| f.ip() == *ip);
        if !used {
            local_address(*ip, false);
        }
        used
    });
    for (front, backends) in std::mem::take(&mut want) {
        if let Some(l) = listeners.get(&front) {
            l.backends.send_if_modified(|old| {
                let changed = *old != backends;
                *old = backends.clone();
                changed
            });
            continue;
        }
        if front.is_ipv6() && local_v6.insert(front.ip()) {
            local_address(front.ip(), true);
        }
        let std_listener = match bind(front) {
            Ok(l) => l,
            Err(err) => {
                tracing::warn!(%front, %err, "cannot serve this Service address (another sandbox's service proxy may hold it)");
                continue;
            }
        };
        tracing::info!(%front, ?backends, "serving service address");
        let (tx, rx) = watch::channel(backends);
        let stop = cancel.child_token();
        conns.spawn(accept_loop(std_listener, rx, stop.clone(), conns.clone()));
        listeners.insert(front, Listener { backends: tx, stop });
    }
}

/// Puts (or takes) IPv6 ClusterIP `ip` on `lo`, so that it is a local address this
/// proxy can bind and the node's processes reach. `nodad`: usable at once. Failures are
/// logged; the bind that follows says what it means.
fn local_address(ip: IpAddr, add: bool) {
    let addr = format!("{ip}/128");
    let verb = if add { "add" } else { "del" };
    let out = std::process::Command::new("ip")
        .args(["-6", "addr", verb, &addr, "dev", "lo"])
        .args(add.then_some("nodad"))
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => tracing::debug!(%ip, verb, "ClusterIP on lo"),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            // Already there (another listener's port of the same Service, a
            // restart): fine.
            if !(add && err.contains("exists")) {
                tracing::warn!(%ip, verb, err = %err.trim(), "changing a ClusterIP on lo failed");
            }
        }
        Err(err) => tracing::warn!(%ip, verb, %err, "running ip failed"),
    }
}

/// Binds now (not in the task), so a failure is seen at once.
fn bind(front: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if front.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(front)?;
    sock.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    backends: watch::Receiver<Vec<SocketAddr>>,
    stop: CancellationToken,
    conns: TaskTracker,
) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (client, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                tracing::warn!(%err, "accepting a service connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let candidates = backends.borrow().clone();
        let start = next.fetch_add(1, Ordering::Relaxed);
        let stop = stop.clone();
        conns.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = forward(client, peer, candidates, start) => {}
            }
        });
    }
}

/// Round robin from `start`, skipping backends that do not accept.
async fn forward(mut client: TcpStream, peer: SocketAddr, backends: Vec<SocketAddr>, start: usize) {
    let n = backends.len();
    for i in 0..n {
        let backend = backends[(start + i) % n];
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await {
            Ok(Ok(mut upstream)) => {
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(%peer, %backend, %err, "forwarded connection ended with an error");
                }
                return;
            }
            Ok(Err(err)) => {
                tracing::warn!(%peer, %backend, %err, "backend refused; trying the next")
            }
            Err(_) => tracing::warn!(%peer, %backend, "backend did not answer; trying the next"),
        }
    }
    tracing::warn!(%peer, "no backend accepted; closing the client connection");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(ns: &str, name: &str, ip: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": ports}
        }))
        .unwrap()
    }

    fn slice(
        ns: &str,
        svc: &str,
        ports: serde_json::Value,
        eps: serde_json::Value,
    ) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("{svc}-x"), "namespace": ns,
                             "labels": {SERVICE_NAME_LABEL: svc}},
                "addressType": "IPv4",
                "ports": ports,
                "endpoints": eps
            }))
            .unwrap(),
        )
    }

    #[test]
    fn ready_endpoints_of_the_named_port_serve_the_cluster_ip() {
        let s = svc(
            "demo",
            "hello",
            "127.96.0.7",
            json!([{"name": "http", "port": 80, "targetPort": "http"},
                   {"name": "admin", "port": 81}]),
        );
        let sl = slice(
            "demo",
            "hello",
            json!([{"name": "http", "port": 8080}, {"name": "admin", "port": 9090}]),
            json!([
                {"addresses": ["198.18.3.2"], "conditions": {"ready": true}},
                {"addresses": ["198.18.3.3"], "conditions": {"ready": false}},
            ]),
        );
        let f = frontends([&s], &[sl]);
        assert_eq!(
            f.get(&"127.96.0.7:80".parse().unwrap()),
            Some(&vec!["198.18.3.2:8080".parse().unwrap()])
        );
        assert_eq!(
            f.get(&"127.96.0.7:81".parse().unwrap()),
            Some(&vec!["198.18.3.2:9090".parse().unwrap()])
        );
    }

    #[test]
    fn each_cluster_ip_is_served_from_the_slices_of_its_family() {
        let s: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"clusterIP": "127.96.0.7",
                     "clusterIPs": ["127.96.0.7", "fd6e:6d00:ffff::7"],
                     "ports": [{"name": "http", "port": 80}]}
        }))
        .unwrap();
        let v4 = slice(
            "demo",
            "web",
            json!([{"name": "http", "port": 8080}]),
            json!([{"addresses": ["198.18.3.2"], "conditions": {"ready": true}}]),
        );
        let mut v6 = (*slice(
            "demo",
            "web",
            json!([{"name": "http", "port": 8080}]),
            json!([{"addresses": ["fd6e:6d00:0:3::2"], "conditions": {"ready": true}}]),
        ))
        .clone();
        v6.address_type = "IPv6".into();
        let f = frontends([&s], &[v4, Arc::new(v6)]);
        assert_eq!(
            f.get(&"127.96.0.7:80".parse().unwrap()),
            Some(&vec!["198.18.3.2:8080".parse().unwrap()])
        );
        assert_eq!(
            f.get(&"[fd6e:6d00:ffff::7]:80".parse().unwrap()),
            Some(&vec!["[fd6e:6d00:0:3::2]:8080".parse().unwrap()])
        );
        // An IPv6 address outside the service range is never bound.
        assert!(!servable("fd6e:6d00:0:3::9".parse().unwrap()));
        assert!(servable("fd6e:6d00:ffff::9".parse().unwrap()));
    }

    #[test]
    fn a_service_without_ready_endpoints_gets_no_listener() {
        let s = svc("demo", "hello", "127.96.0.7", json!([{"port": 80}]));
        let not_ready = slice(
            "demo",
            "hello",
            json!([{"port": 8080}]),
            json!([{"addresses": ["198.18.3.2"], "conditions": {"ready": false}}]),
        );
        assert!(frontends([&s], &[not_ready]).is_empty());
        assert!(frontends([&s], &[]).is_empty());
    }

    #[test]
    fn only_loopback_cluster_ips_of_tcp_ports_in_the_same_namespace_are_served() {
        let eps = json!([{"addresses": ["198.18.3.2"], "conditions": {"ready": true}}]);
        let public = svc("demo", "a", "203.0.113.9", json!([{"port": 80}]));
        let headless = svc("demo", "b", "None", json!([{"port": 80}]));
        let udp = svc(
            "demo",
            "c",
            "127.96.0.9",
            json!([{"port": 53, "protocol": "UDP"}]),
        );
        let other_ns = svc("other", "d", "127.96.0.10", json!([{"port": 80}]));
        let slices = [
            slice("demo", "a", json!([{"port": 80}]), eps.clone()),
            slice("demo", "b", json!([{"port": 80}]), eps.clone()),
            slice(
                "demo",
                "c",
                json!([{"port": 53, "protocol": "UDP"}]),
                eps.clone(),
            ),
            slice("demo", "d", json!([{"port": 80}]), eps),
        ];
        assert!(frontends([&public, &headless, &udp, &other_ns], &slices).is_empty());
    }
}
