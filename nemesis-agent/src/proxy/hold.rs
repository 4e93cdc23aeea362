//! Who is held, per Service and in total, and whether a wake-up is in flight: admission
//! against the bounds and single flight, decided under one lock. Never does I/O; the
//! held count is released by dropping a [`HeldGuard`], so no path can leak it.

use crate::metrics::{ProxyMetrics, ServiceLabels};
use nemesis_common::wire::ServiceRef;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct ServiceHolds {
    held: usize,
    /// A wake-up task runs for this Service.
    waking: bool,
    /// Notified when `held` drops to zero, so the wake-up task can stop.
    emptied: Arc<Notify>,
    /// Notified (all waiters) when the controller says no policy manages the Service:
    /// held connections are refused at once instead of waiting for their timeout.
    released: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Inner {
    total: usize,
    services: HashMap<ServiceRef, ServiceHolds>,
}

#[derive(Debug)]
pub(crate) struct Holds {
    inner: Mutex<Inner>,
    max_total: usize,
    metrics: ProxyMetrics,
}

/// Which bound refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    Service,
    Agent,
}

pub(crate) enum Admission {
    Held {
        guard: HeldGuard,
        /// This connection is the one that starts the Service's wake-up.
        start_wake: bool,
        /// Notified when the Service's held connections are to be refused.
        released: Arc<Notify>,
    },
    Refused(Overflow),
}

impl Holds {
    pub(crate) fn new(max_total: usize, metrics: ProxyMetrics) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            max_total,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("holds lock")
    }

    /// Count a new connection as held for `service` if both bounds allow it. When
    /// `needs_wake` (no ready backend) and no wake-up is in flight, this connection starts
    /// one: check and set happen under the same lock, so there is exactly one.
    pub(crate) fn admit(
        self: &Arc<Self>,
        service: &ServiceRef,
        max_held: usize,
        needs_wake: bool,
    ) -> Admission {
        let mut inner = self.lock();
        if inner.total >= self.max_total {
            return Admission::Refused(Overflow::Agent);
        }
        let entry = inner.services.entry(service.clone()).or_default();
        if entry.held >= max_held {
            return Admission::Refused(Overflow::Service);
        }
        entry.held += 1;
        let start_wake = needs_wake && !entry.waking;
        if start_wake {
            entry.waking = true;
        }
        let entry_released = entry.released.clone();
        inner.total += 1;
        let labels = ServiceLabels::from(service);
        self.metrics.held.get_or_create(&labels).inc();
        self.metrics.holds.get_or_create(&labels).inc();
        Admission::Held {
            guard: HeldGuard {
                holds: self.clone(),
                service: service.clone(),
            },
            start_wake,
            released: entry_released,
        }
    }

    pub(crate) fn held(&self, service: &ServiceRef) -> usize {
        self.lock().services.get(service).map_or(0, |s| s.held)
    }

    pub(crate) fn total(&self) -> usize {
        self.lock().total
    }

    /// Notified when the Service's held count drops to zero.
    pub(crate) fn emptied(&self, service: &ServiceRef) -> Arc<Notify> {
        self.lock()
            .services
            .entry(service.clone())
            .or_default()
            .emptied
            .clone()
    }

    /// Start a wake-up flight for a Service whose held connections lost their backends
    /// after the last flight ended (held while it was ready, then its endpoints went away,
    /// as in a scale to zero). Returns whether the caller must run the flight.
    pub(crate) fn claim_wake(&self, service: &ServiceRef) -> bool {
        let mut inner = self.lock();
        match inner.services.get_mut(service) {
            Some(entry) if entry.held > 0 && !entry.waking => {
                entry.waking = true;
                true
            }
            _ => false,
        }
    }

    /// End the Service's wake-up flight. With `only_if_idle`, only when nothing is held
    /// any more (returns whether it ended); a later held connection starts a new one.
    pub(crate) fn end_wake(&self, service: &ServiceRef, only_if_idle: bool) -> bool {
        let mut inner = self.lock();
        let Some(entry) = inner.services.get_mut(service) else {
            return true;
        };
        if only_if_idle && entry.held > 0 {
            return false;
        }
        entry.waking = false;
        if entry.held == 0 {
            inner.services.remove(service);
        }
        true
    }

    /// The controller manages no policy for the Service: end the wake-up flight (the next
    /// held connection asks again) and wake every held connection to be refused.
    pub(crate) fn release_held(&self, service: &ServiceRef) {
        let mut inner = self.lock();
        if let Some(entry) = inner.services.get_mut(service) {
            entry.waking = false;
            entry.released.notify_waiters();
            if entry.held == 0 {
                inner.services.remove(service);
            }
        }
    }

    fn release(&self, service: &ServiceRef) {
        let mut inner = self.lock();
        inner.total -= 1;
        if let Some(entry) = inner.services.get_mut(service) {
            entry.held -= 1;
            if entry.held == 0 {
                entry.emptied.notify_one();
                if !entry.waking {
                    inner.services.remove(service);
                }
            }
        }
        self.metrics
            .held
            .get_or_create(&ServiceLabels::from(service))
            .dec();
    }
}

/// One held connection; dropping it (forwarded, refused, client gone, task cancelled)
/// releases the count.
#[derive(Debug)]
pub(crate) struct HeldGuard {
    holds: Arc<Holds>,
    service: ServiceRef,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.holds.release(&self.service);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn svc(n: &str) -> ServiceRef {
        ServiceRef {
            namespace: "ns".into(),
            name: n.into(),
        }
    }

    fn held(a: Admission) -> (HeldGuard, bool) {
        match a {
            Admission::Held {
                guard, start_wake, ..
            } => (guard, start_wake),
            Admission::Refused(o) => panic!("refused: {o:?}"),
        }
    }

    #[test]
    fn only_the_first_held_connection_starts_a_wake_up() {
        let h = Holds::new(100, Metrics::new().proxy);
        let (g1, w1) = held(h.admit(&svc("a"), 10, true));
        let (_g2, w2) = held(h.admit(&svc("a"), 10, true));
        let (_g3, w3) = held(h.admit(&svc("b"), 10, true));
        assert_eq!((w1, w2, w3), (true, false, true));
        drop(g1);
        let (_g4, w4) = held(h.admit(&svc("a"), 10, true));
        assert!(!w4, "the flight is still on while the wake-up task runs");
    }

    #[test]
    fn a_new_flight_starts_after_the_last_one_ended() {
        let h = Holds::new(100, Metrics::new().proxy);
        let (g, w) = held(h.admit(&svc("a"), 10, true));
        assert!(w);
        assert!(!h.end_wake(&svc("a"), true), "still held");
        drop(g);
        assert!(h.end_wake(&svc("a"), true));
        let (_g, w) = held(h.admit(&svc("a"), 10, true));
        assert!(w);
    }

    #[test]
    fn bounds_per_service_and_per_agent_refuse_and_release_on_drop() {
        let m = Metrics::new().proxy;
        let h = Holds::new(3, m.clone());
        let a1 = held(h.admit(&svc("a"), 2, false)).0;
        let _a2 = held(h.admit(&svc("a"), 2, false)).0;
        assert!(matches!(
            h.admit(&svc("a"), 2, false),
            Admission::Refused(Overflow::Service)
        ));
        let _b1 = held(h.admit(&svc("b"), 2, false)).0;
        assert!(matches!(
            h.admit(&svc("b"), 2, false),
            Admission::Refused(Overflow::Agent)
        ));
        assert_eq!((h.held(&svc("a")), h.total()), (2, 3));
        assert_eq!(m.held_count(&svc("a")), 2);
        drop(a1);
        assert_eq!((h.held(&svc("a")), h.total()), (1, 2));
        assert_eq!(m.held_count(&svc("a")), 1);
        // Refusals are not holds; a release does not take one back.
        assert_eq!((m.holds_total(&svc("a")), m.holds_total(&svc("b"))), (2, 1));
    }
}
