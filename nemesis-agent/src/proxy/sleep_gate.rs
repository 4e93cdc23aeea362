//! Which Services the controller is putting to sleep while their backends still run:
//! their held connections must not be sent to those backends, which the scale to zero
//! is about to stop (a pod killed before it answers loses the connection). The mode
//! follower closes and opens the gates (from the `Sleep` directive and the endpoints);
//! held connections and UDP relays read them. Owns only the signal; never touches a
//! connection.

use crate::endpoints::BackendId;
use nemesis_common::wire::ServiceRef;
use std::collections::BTreeSet;
use tokio::sync::watch;

/// The gates, shared by the mode follower (which closes them) and the proxy.
#[derive(Debug)]
pub struct SleepGates {
    closed: watch::Sender<BTreeSet<ServiceRef>>,
}

impl Default for SleepGates {
    fn default() -> Self {
        Self {
            closed: watch::Sender::new(BTreeSet::new()),
        }
    }
}

impl SleepGates {
    /// The Services whose held connections wait now (every other one's may be
    /// forwarded to its ready backends).
    pub fn set_closed(&self, closed: BTreeSet<ServiceRef>) {
        self.closed.send_if_modified(|c| {
            let changed = *c != closed;
            *c = closed;
            changed
        });
    }

    /// Whether `service`'s gate is closed now.
    pub fn is_closed(&self, service: &ServiceRef) -> bool {
        self.closed.borrow().contains(service)
    }

    pub(crate) fn watch(&self, service: &ServiceRef) -> GateWatch {
        GateWatch {
            rx: self.closed.subscribe(),
            service: service.clone(),
        }
    }
}

/// One Service's gate as a held connection or a wake-up flight follows it.
#[derive(Debug, Clone)]
pub(crate) struct GateWatch {
    rx: watch::Receiver<BTreeSet<ServiceRef>>,
    service: ServiceRef,
}

impl GateWatch {
    pub(crate) fn closed(&mut self) -> bool {
        self.rx.borrow_and_update().contains(&self.service)
    }

    /// Waits until a gate may have opened or closed; never returns once the signal is
    /// gone (nothing can change any more).
    pub(crate) async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Where one Service stands in a sleep the controller asked for (the `Sleep` directive
/// of `epoch`): `reached_zero` once its endpoints were seen empty since, or listing
/// none of the backends they listed when the sleep began (`stopping`: a view that
/// caught up at once may never show the empty moment, e.g. a relist after a `410`),
/// so the backends ready after that are woken ones, not the ones going away. Backends
/// are told apart by their pod as well as their address: a woken pod may get the
/// address of the one the sleep stopped, and taking it for that one would keep the
/// gate closed (and its held connections waiting) until the view changed again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SleepSeen {
    pub epoch: u64,
    pub reached_zero: bool,
    pub stopping: BTreeSet<BackendId>,
}

/// The gate's next state for a Service: `None` when it is not asked to sleep (gate
/// open); else whether its endpoints (the ready backends `ready`) left the sleep's
/// backends. The gate is closed while asked to sleep and not yet at zero. A new
/// `Sleep` epoch is a new handshake (the Service may have been woken in between): it
/// starts from the endpoints now.
pub fn next_sleep(
    prev: Option<SleepSeen>,
    sleep_epoch: Option<u64>,
    ready: &BTreeSet<BackendId>,
) -> Option<SleepSeen> {
    let epoch = sleep_epoch?;
    let (stopping, reached) = match prev {
        Some(p) if p.epoch == epoch => (p.stopping, p.reached_zero),
        _ => (ready.clone(), false),
    };
    let reached_zero = reached || ready.is_empty() || ready.is_disjoint(&stopping);
    Some(SleepSeen {
        epoch,
        reached_zero,
        stopping,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn svc(n: &str) -> ServiceRef {
        ServiceRef {
            namespace: "ns".into(),
            name: n.into(),
        }
    }

    /// Backends at 198.18.0.<l>, each its own pod (`pod-<l>`).
    fn ips(last: &[u8]) -> BTreeSet<BackendId> {
        pods(
            &last
                .iter()
                .map(|l| (*l, format!("pod-{l}")))
                .collect::<Vec<_>>(),
        )
    }

    fn pods(backends: &[(u8, String)]) -> BTreeSet<BackendId> {
        backends
            .iter()
            .map(|(l, pod)| BackendId {
                addr: SocketAddr::from(([198, 18, 0, *l], 8080)),
                pod: Some(pod.clone()),
            })
            .collect()
    }

    fn closed(s: &Option<SleepSeen>) -> bool {
        s.as_ref().is_some_and(|s| !s.reached_zero)
    }

    #[test]
    fn the_gate_closes_on_sleep_with_backends_and_opens_at_zero_or_when_the_sleep_ends() {
        // Asked to sleep while backends run: closed.
        let s = next_sleep(None, Some(7), &ips(&[5]));
        assert!(closed(&s));
        // Still ready: still closed.
        let s = next_sleep(s, Some(7), &ips(&[5]));
        assert!(closed(&s));
        // The scale to zero removed them: open, and stays open for the woken ones.
        let s = next_sleep(s, Some(7), &ips(&[]));
        assert!(!closed(&s));
        let s = next_sleep(s, Some(7), &ips(&[5]));
        assert!(!closed(&s));
        // A new sleep handshake while the woken backends run: closed again.
        let s = next_sleep(s, Some(9), &ips(&[5]));
        assert!(closed(&s));
        // The sleep abandoned (Follow): open, nothing remembered.
        assert_eq!(next_sleep(s, None, &ips(&[5])), None);
        // Asked to sleep at zero already: open.
        assert!(!closed(&next_sleep(None, Some(3), &ips(&[]))));
    }

    #[test]
    fn a_view_that_skips_the_empty_moment_opens_once_the_sleeps_backends_are_gone() {
        let s = next_sleep(None, Some(7), &ips(&[5, 6]));
        // One of them gone, one new: the other is still going away.
        let s = next_sleep(s, Some(7), &ips(&[6, 9]));
        assert!(closed(&s));
        // Only woken ones left.
        let s = next_sleep(s, Some(7), &ips(&[9]));
        assert!(!closed(&s));
    }

    #[test]
    fn a_woken_pod_with_the_stopped_ones_address_opens_the_gate() {
        // The sleep's pod at .5; the view then skips the empty moment (a relist) and
        // shows the woken pod, which got the same address.
        let s = next_sleep(None, Some(7), &pods(&[(5, "web-a".into())]));
        assert!(closed(&s));
        let s = next_sleep(s, Some(7), &pods(&[(5, "web-a".into())]));
        assert!(closed(&s), "the same pod is still the one going away");
        let s = next_sleep(s, Some(7), &pods(&[(5, "web-b".into())]));
        assert!(!closed(&s), "a new pod at the old address is a woken one");
        // Slices that name no pod: the address is all there is to go by.
        let anon = |l: u8| -> BTreeSet<BackendId> {
            [BackendId {
                addr: SocketAddr::from(([198, 18, 0, l], 8080)),
                pod: None,
            }]
            .into()
        };
        let s = next_sleep(None, Some(8), &anon(5));
        assert!(closed(&next_sleep(s, Some(8), &anon(5))));
    }

    #[tokio::test]
    async fn a_watch_sees_its_service_close_and_open() {
        let g = SleepGates::default();
        let mut a = g.watch(&svc("a"));
        assert!(!a.closed());
        g.set_closed([svc("a")].into());
        tokio::time::timeout(std::time::Duration::from_secs(1), a.changed())
            .await
            .expect("a change is signalled");
        assert!(a.closed() && g.is_closed(&svc("a")) && !g.is_closed(&svc("b")));
        g.set_closed(BTreeSet::new());
        assert!(!a.closed());
    }
}
