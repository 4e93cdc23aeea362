//! Wake-ups from agents on their way to the controller core: one in flight per Service
//! (a second wake for a Service already waking is acknowledged, not forwarded), and only
//! for Services a policy manages. It decides nothing about scaling; the core does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use nemesis_common::wire::{ServiceRef, WakeRequest};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Room for a burst of first connections across many Services; single flight bounds it
/// to one entry per Service, so a full queue means the core is stuck.
pub const DEFAULT_QUEUE: usize = 1024;

/// A wake the core never finished (it crashed mid-wake, or forgot to call
/// [`WakeGate::finished`]) is forwarded again after this long, so a Service cannot be
/// stranded at zero. Above any sane scale-from-zero time of the API part; the readiness
/// budget of slow starters is the core's business, not this gate's.
pub const DEFAULT_REFORWARD_AFTER: Duration = Duration::from_secs(300);

/// A wake-up for the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeUp {
    pub service: ServiceRef,
    /// The agent that sent it first.
    pub node: String,
    pub held_connections: u32,
    /// The directive epoch the agent had applied when its flight began (see
    /// [`WakeRequest::applied_epoch`]).
    pub applied_epoch: Option<u64>,
    /// When the controller received it (the start of the wake latency).
    pub received_at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeOutcome {
    /// Sent to the core.
    Forwarded,
    /// The Service is already waking; nothing sent.
    AlreadyWaking,
    /// No policy manages the Service.
    NotManaged,
    /// The core's queue is full or gone; the agent should retry.
    CoreUnavailable,
    /// Not managed (yet): this leader has not listed its policies since it took the
    /// lead; the agent should retry rather than refuse its held connections.
    NotSynced,
}

#[derive(Debug, Default)]
struct State {
    managed: BTreeSet<ServiceRef>,
    /// The policies are listed and their actors started (this term).
    synced: bool,
    waking: BTreeMap<ServiceRef, Instant>,
}

#[derive(Debug)]
pub struct WakeGate {
    state: Mutex<State>,
    /// Bumped when the set of managed Services changes (hold slices follow it).
    managed_changed: tokio::sync::watch::Sender<u64>,
    tx: mpsc::Sender<WakeUp>,
    reforward_after: Duration,
}

// === impl WakeGate ===

impl WakeGate {
    /// The gate and the receiver the core reads wake-ups from.
    pub fn new(queue: usize, reforward_after: Duration) -> (Self, mpsc::Receiver<WakeUp>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let gate = Self {
            state: Mutex::new(State::default()),
            managed_changed: tokio::sync::watch::channel(0).0,
            tx,
            reforward_after,
        };
        (gate, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a Service as managed by a policy (or not any more).
    pub fn set_managed(&self, svc: &ServiceRef, managed: bool) {
        let changed = {
            let mut st = self.lock();
            if managed {
                st.managed.insert(svc.clone())
            } else {
                st.waking.remove(svc);
                st.managed.remove(svc)
            }
        };
        if changed {
            self.managed_changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// A receiver that changes when a Service becomes managed or stops being managed.
    pub fn subscribe_managed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.managed_changed.subscribe()
    }

    /// Forgets every managed Service and wake in flight (this instance stopped leading:
    /// wake-ups are refused until policies are managed again).
    pub fn unmanage_all(&self) {
        {
            let mut st = self.lock();
            st.managed.clear();
            st.waking.clear();
            st.synced = false;
        }
        self.managed_changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Whether this leader has listed its policies and started their actors: until
    /// then an unmanaged Service may be one whose actor is not running yet.
    pub fn set_synced(&self, synced: bool) {
        self.lock().synced = synced;
    }

    /// Passes a wake-up on unless one for the same Service is in flight. The check and
    /// the insert happen under one lock, so two agents racing send one wake-up.
    pub fn wake(&self, req: &WakeRequest, now: Instant) -> WakeOutcome {
        let mut st = self.lock();
        if !st.managed.contains(&req.service) {
            return if st.synced {
                WakeOutcome::NotManaged
            } else {
                WakeOutcome::NotSynced
            };
        }
        if let Some(since) = st.waking.get(&req.service)
            && now.saturating_duration_since(*since) < self.reforward_after
        {
            return WakeOutcome::AlreadyWaking;
        }
        let wake = WakeUp {
            service: req.service.clone(),
            node: req.node.clone(),
            held_connections: req.held_connections,
            applied_epoch: req.applied_epoch,
            received_at: now,
        };
        match self.tx.try_send(wake) {
            Ok(()) => {
                st.waking.insert(req.service.clone(), now);
                WakeOutcome::Forwarded
            }
            Err(e) => {
                tracing::error!(service = %req.service, err = %e, "wake-up queue unavailable");
                WakeOutcome::CoreUnavailable
            }
        }
    }

    /// The core is done with a wake (target ready, or the wake failed): the next
    /// wake-up for the Service is forwarded again.
    pub fn finished(&self, svc: &ServiceRef) {
        self.lock().waking.remove(svc);
    }

    /// Whether a running, valid policy manages the Service.
    pub fn is_managed(&self, svc: &ServiceRef) -> bool {
        self.lock().managed.contains(svc)
    }

    pub fn is_waking(&self, svc: &ServiceRef) -> bool {
        self.lock().waking.contains_key(svc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(node: &str) -> WakeRequest {
        WakeRequest {
            node: node.into(),
            service: ServiceRef {
                namespace: "ns".into(),
                name: "web".into(),
            },
            held_connections: 1,
            applied_epoch: None,
        }
    }

    #[test]
    fn one_wake_in_flight_per_service_until_the_core_finishes_it() {
        let (gate, mut rx) = WakeGate::new(8, DEFAULT_REFORWARD_AFTER);
        let now = Instant::now();
        gate.set_synced(true);
        assert_eq!(gate.wake(&req("a"), now), WakeOutcome::NotManaged);
        gate.set_managed(&req("a").service, true);
        assert_eq!(gate.wake(&req("a"), now), WakeOutcome::Forwarded);
        assert_eq!(gate.wake(&req("b"), now), WakeOutcome::AlreadyWaking);
        assert_eq!(rx.try_recv().unwrap().node, "a");
        assert!(rx.try_recv().is_err());
        gate.finished(&req("a").service);
        assert_eq!(gate.wake(&req("b"), now), WakeOutcome::Forwarded);
        assert_eq!(rx.try_recv().unwrap().node, "b");
    }

    #[test]
    fn an_unmanaged_service_is_retried_until_the_policies_are_listed_then_refused() {
        let (gate, _rx) = WakeGate::new(8, DEFAULT_REFORWARD_AFTER);
        let now = Instant::now();
        assert_eq!(gate.wake(&req("a"), now), WakeOutcome::NotSynced);
        gate.set_synced(true);
        assert_eq!(gate.wake(&req("a"), now), WakeOutcome::NotManaged);
        // Losing the lead forgets the listing too.
        gate.unmanage_all();
        assert_eq!(gate.wake(&req("a"), now), WakeOutcome::NotSynced);
    }

    #[test]
    fn a_wake_the_core_never_finished_is_forwarded_again_after_the_limit() {
        let (gate, mut rx) = WakeGate::new(8, Duration::from_secs(10));
        gate.set_managed(&req("a").service, true);
        let t0 = Instant::now();
        assert_eq!(gate.wake(&req("a"), t0), WakeOutcome::Forwarded);
        let t1 = t0 + Duration::from_secs(9);
        assert_eq!(gate.wake(&req("a"), t1), WakeOutcome::AlreadyWaking);
        let t2 = t0 + Duration::from_secs(10);
        assert_eq!(gate.wake(&req("a"), t2), WakeOutcome::Forwarded);
        assert_eq!(rx.try_recv().unwrap().received_at, t0);
        assert_eq!(rx.try_recv().unwrap().received_at, t2);
    }

    #[test]
    fn a_full_or_closed_queue_is_reported_and_does_not_block_later_wakes() {
        let (gate, rx) = WakeGate::new(1, DEFAULT_REFORWARD_AFTER);
        let other = ServiceRef {
            namespace: "ns".into(),
            name: "other".into(),
        };
        gate.set_managed(&req("a").service, true);
        gate.set_managed(&other, true);
        let now = Instant::now();
        assert_eq!(gate.wake(&req("a"), now), WakeOutcome::Forwarded);
        let mut r2 = req("a");
        r2.service = other.clone();
        assert_eq!(gate.wake(&r2, now), WakeOutcome::CoreUnavailable);
        assert!(
            !gate.is_waking(&other),
            "a refused wake must not count as in flight"
        );
        drop(rx);
        gate.finished(&req("a").service);
        assert_eq!(gate.wake(&req("a"), now), WakeOutcome::CoreUnavailable);
    }
}
