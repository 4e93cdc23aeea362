//! The UDP hold relay's ([`crate::udphold`]) view of the proxy: its held flows take one
//! place in the proxy's hold table while any is held, so the Service's wake-up goes
//! through the same single flight as held TCP connections (sent to the controller,
//! refreshed, ended when a backend is ready), and its ready backends come from the same
//! EndpointSlice registry. Owns no socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use nemesis_common::wire::ServiceRef;

use super::Proxy;
use super::hold::{Admission, HeldGuard};
use crate::udphold::{UdpHoldBounds, UdpHoldRelay, UdpHoldStats, UdpWake};

/// Binds the agent's UDP hold relays: on the proxy's address of each family (where the
/// datapath sends held datagrams), each waking through the proxy.
pub struct UdpRelays {
    proxy: Proxy,
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
    bounds: UdpHoldBounds,
    /// Every relay's counts, for the agent's metrics.
    stats: Arc<UdpHoldStats>,
}

impl std::fmt::Debug for UdpRelays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpRelays")
            .field("v4", &self.v4)
            .field("v6", &self.v6)
            .field("bounds", &self.bounds)
            .finish()
    }
}

impl UdpRelays {
    /// Relays on `v4` (and `v6`), within `bounds` each, counting into `stats`.
    pub fn new(
        proxy: Proxy,
        v4: Ipv4Addr,
        v6: Option<Ipv6Addr>,
        bounds: UdpHoldBounds,
        stats: Arc<UdpHoldStats>,
    ) -> Self {
        Self {
            proxy,
            v4,
            v6,
            bounds,
            stats,
        }
    }

    /// A relay for the UDP port `port_name` of `service` in the family of `ipv4`, or
    /// `None` when the agent has no proxy address of that family (its datagrams are
    /// then let through at zero, as the datapath does without a hold socket). Must run
    /// on a tokio runtime.
    pub fn bind(
        &self,
        service: &ServiceRef,
        port_name: &str,
        ipv4: bool,
    ) -> std::io::Result<Option<UdpHoldRelay>> {
        let ip: IpAddr = match (ipv4, self.v6) {
            (true, _) => self.v4.into(),
            (false, Some(v6)) => v6.into(),
            (false, None) => return Ok(None),
        };
        let wake = Arc::new(ProxyUdpWake::new(
            self.proxy.clone(),
            service.clone(),
            port_name,
            ipv4,
        ));
        UdpHoldRelay::bind_now(
            SocketAddr::new(ip, 0),
            wake,
            self.bounds,
            self.stats.clone(),
        )
        .map(Some)
    }
}

/// One UDP Service port of one address family, as the relay asks about it.
pub struct ProxyUdpWake {
    proxy: Proxy,
    service: ServiceRef,
    port_name: String,
    ipv4: bool,
    /// The relay's place in the hold table while it holds datagrams.
    held: Mutex<Option<HeldGuard>>,
}

impl ProxyUdpWake {
    /// For the UDP port `port_name` ("" for a single unnamed port) of `service`; `ipv4`:
    /// the relay's family (its backends must be of the same one).
    pub fn new(proxy: Proxy, service: ServiceRef, port_name: &str, ipv4: bool) -> Self {
        Self {
            proxy,
            service,
            port_name: port_name.to_string(),
            ipv4,
            held: Mutex::new(None),
        }
    }

    /// Whether the relay's held flows count in the proxy's hold table now.
    pub fn holding(&self) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

impl UdpWake for ProxyUdpWake {
    fn wake(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &self.proxy.shared;
        let needs_wake = shared.endpoints.current(&self.service).is_empty();
        if held.is_some() {
            // In the table already: its flight runs, or it was held while the Service was
            // being put to sleep, and its backends have gone since (as a held connection
            // does, it asks for the wake then).
            if needs_wake && shared.holds.claim_wake(&self.service) {
                tokio::spawn(super::wake::run_wake(shared.clone(), self.service.clone()));
            }
            return;
        }
        // The relay bounds its own datagrams; here it is one holder among the
        // connections, under the agent's total bound.
        match shared.holds.admit(&self.service, usize::MAX, needs_wake) {
            Admission::Held {
                guard, start_wake, ..
            } => {
                if start_wake {
                    tokio::spawn(super::wake::run_wake(shared.clone(), self.service.clone()));
                }
                *held = Some(guard);
            }
            Admission::Refused(overflow) => {
                tracing::warn!(service = %self.service, ?overflow, "UDP hold: the agent's hold bound is reached; no wake-up asked");
            }
        }
    }

    fn backend(&self) -> Option<SocketAddr> {
        // The backends of a Service being put to sleep are about to stop: the held
        // datagrams wait for the sleep to be given up or for the woken backends.
        if self
            .proxy
            .shared
            .table
            .sleep_gates()
            .is_closed(&self.service)
        {
            return None;
        }
        let eps = self.proxy.shared.endpoints.current(&self.service);
        let ready = eps.udp_backends(&self.port_name);
        // Spread the relay's flows: any ready backend of the family will do.
        let family: Vec<SocketAddr> = ready
            .into_iter()
            .filter(|b| b.is_ipv4() == self.ipv4)
            .collect();
        if family.is_empty() {
            return None;
        }
        // The hold ends once a backend is ready: the flight ends with it.
        self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        let pick = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize);
        Some(family[pick % family.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ControllerClient;
    use crate::endpoints::{EndpointRegistry, ServiceEndpoints};
    use crate::metrics::Metrics;
    use crate::proxy::{FixedDestination, ProxyConfig, ServiceTable};
    use axum::{Json, Router, routing::post};
    use nemesis_common::wire::WakeReply;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn a_held_udp_flow_asks_the_controller_for_a_wake_and_finds_the_udp_backend() {
        let wakes = Arc::new(AtomicUsize::new(0));
        let seen = wakes.clone();
        let app = Router::new().route(
            crate::control::WAKE_PATH,
            post(move || {
                seen.fetch_add(1, Ordering::SeqCst);
                async move {
                    Json(WakeReply {
                        accepted: true,
                        message: String::new(),
                    })
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let controller =
            ControllerClient::new(&format!("http://{addr}"), "token", Duration::from_secs(5))
                .unwrap();
        let endpoints = EndpointRegistry::new();
        let proxy = Proxy::new(
            ProxyConfig::new("node-a"),
            ServiceTable::new(),
            endpoints.clone(),
            Arc::new(FixedDestination("127.96.0.1:53".parse().unwrap())),
            Some(controller),
            Metrics::new().proxy,
        );
        let dns = ServiceRef {
            namespace: "kube-system".into(),
            name: "dns".into(),
        };
        let w = ProxyUdpWake::new(proxy.clone(), dns.clone(), "dns", true);
        assert_eq!(w.backend(), None, "at zero");
        w.wake();
        w.wake();
        assert!(w.holding());
        assert_eq!(proxy.held(&dns), 1, "the relay is one holder");
        tokio::time::timeout(Duration::from_secs(10), async {
            while wakes.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the controller got the wake-up");
        assert_eq!(wakes.load(Ordering::SeqCst), 1, "single flight");
        // A TCP port's backends are not the UDP port's.
        let backend: SocketAddr = "198.18.0.9:5353".parse().unwrap();
        endpoints.publish(
            &dns,
            ServiceEndpoints::default().with_port("dns", [backend]),
        );
        assert_eq!(w.backend(), None, "a TCP port named dns is not the UDP one");
        endpoints.publish(
            &dns,
            ServiceEndpoints::default().with_port("udp/dns", [backend]),
        );
        assert_eq!(w.backend(), Some(backend));
        assert!(!w.holding(), "the hold ends once a backend is ready");
        assert_eq!(proxy.held(&dns), 0);

        // Being put to sleep: a flow held now waits rather than go to the backend the
        // scale to zero is about to stop, and asks for no wake while it is listed.
        let gates = proxy.shared.table.sleep_gates();
        gates.set_closed([dns.clone()].into());
        w.wake();
        assert!(w.holding());
        assert_eq!(w.backend(), None, "not the backend going away");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            wakes.load(Ordering::SeqCst),
            1,
            "no wake-up while it is listed"
        );
        // The sleep given up: the same backend.
        gates.set_closed(Default::default());
        assert_eq!(w.backend(), Some(backend));
    }
}
