//! The mode of every managed Service in the datapath: hold while it has no ready
//! backend (or the controller asked to hold it for a scale-down), direct once it has one
//! and the node's Service proxy has had [`DIRECT_AFTER_READY`] to program it.
//! Owns the decision and its application through a [`ModeSink`], and tells the proxy
//! which Services go direct (`drain`) and which are being put to sleep with their
//! backends still up (`sleep_gate`); never touches connections (those already
//! forwarded step out through the proxy's `relay`).

use super::sleep_gate::{SleepSeen, next_sleep};
use super::table::ServiceTable;
use crate::endpoints::EndpointRegistry;
use nemesis_common::wire::{AppliedMode, Directive, ServiceDirective, ServiceRef};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A held Service whose backends just became ready stays held this long (the proxy
/// forwards its connects at once meanwhile) before connects go direct: direct means
/// through kube-proxy (or whatever serves the ClusterIP), which programs the new
/// endpoints on its own schedule (kube-proxy's `minSyncPeriod` defaults to 1 s), and a
/// connect sent direct before that is refused. Seen end to end in the sandbox: its
/// Service proxy opened the ClusterIP 7 ms after the agent went direct, and a connect in
/// between was refused. Backends that were ready all along (a sleep given up) go direct
/// at once.
pub const DIRECT_AFTER_READY: Duration = Duration::from_secs(2);

/// Where modes are applied: the eBPF service table (the datapath engineer implements it).
pub trait ModeSink: Send + Sync + 'static {
    /// Make new connects to `service` go to the proxy (`hold`) or direct (balance or
    /// passthrough, the datapath's choice); returns the mode now in force.
    fn set_hold(&self, service: &ServiceRef, hold: bool) -> Result<AppliedMode, ModeSinkError>;
}

#[derive(Debug, thiserror::Error)]
#[error("setting the datapath mode: {0}")]
pub struct ModeSinkError(pub Box<dyn std::error::Error + Send + Sync>);

/// Hold unless a backend is ready and the controller does not want the Service held.
pub fn decide_hold(ready: bool, directive: Directive) -> bool {
    directive == Directive::Sleep || !ready
}

/// [`decide_hold`] with the hand-over: a Service held now (`held`) and ready since
/// `ready_since` stays held until `ready_since + handover`. Returns whether to hold, and
/// when to decide again if that changes by time alone.
fn hold_with_handover(
    want_hold: bool,
    held: bool,
    ready_since: Option<Instant>,
    handover: Duration,
    now: Instant,
) -> (bool, Option<Instant>) {
    match ready_since {
        Some(since) if held && !want_hold && now < since + handover => {
            (true, Some(since + handover))
        }
        _ => (want_hold, None),
    }
}

#[derive(Debug, Clone, Copy)]
struct Desired {
    directive: Directive,
    epoch: u64,
    /// A `Follow` after a completed sleep (see `ServiceDirective::after_zero`).
    after_zero: bool,
}

#[derive(Debug, Clone, Copy)]
struct Applied {
    hold: bool,
    mode: AppliedMode,
    epoch: u64,
}

/// Applies [`decide_hold`] for every Service of the table whenever its endpoints, the
/// table or a directive change; a failed application is retried every `retry`.
pub struct ModeFollower {
    table: Arc<ServiceTable>,
    endpoints: Arc<EndpointRegistry>,
    sink: Arc<dyn ModeSink>,
    desired: Mutex<HashMap<ServiceRef, Desired>>,
    applied: Mutex<HashMap<ServiceRef, Applied>>,
    /// Since when each Service has had a ready backend without a break.
    ready_since: Mutex<HashMap<ServiceRef, Instant>>,
    /// The Services asked to sleep, and whether they reached zero since (see
    /// `sleep_gate`).
    sleeps: Mutex<HashMap<ServiceRef, SleepSeen>>,
    /// The next time a hand-over ends (a pass is due then).
    recheck_at: Mutex<Option<Instant>>,
    kick: Notify,
    /// Notified after a mode was applied (e.g. to send a heartbeat at once).
    pub changed: Arc<Notify>,
    retry: Duration,
    handover: Duration,
}

impl std::fmt::Debug for ModeFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModeFollower")
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl ModeFollower {
    pub fn new(
        table: Arc<ServiceTable>,
        endpoints: Arc<EndpointRegistry>,
        sink: Arc<dyn ModeSink>,
    ) -> Arc<Self> {
        Self::with_direct_after(table, endpoints, sink, DIRECT_AFTER_READY)
    }

    /// As [`ModeFollower::new`], with the hand-over to the Service proxy after
    /// `direct_after_ready` instead of [`DIRECT_AFTER_READY`].
    pub fn with_direct_after(
        table: Arc<ServiceTable>,
        endpoints: Arc<EndpointRegistry>,
        sink: Arc<dyn ModeSink>,
        direct_after_ready: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            table,
            endpoints,
            sink,
            desired: Mutex::new(HashMap::new()),
            applied: Mutex::new(HashMap::new()),
            ready_since: Mutex::new(HashMap::new()),
            sleeps: Mutex::new(HashMap::new()),
            recheck_at: Mutex::new(None),
            kick: Notify::new(),
            changed: Arc::new(Notify::new()),
            retry: Duration::from_secs(1),
            handover: direct_after_ready,
        })
    }

    /// Record the controller's directives, the whole set (newer epochs only), and
    /// re-decide. A Service whose directive is gone from the set is back to `Follow`: a
    /// `Sleep` left behind by a policy deleted mid-sleep would hold its new connections
    /// for good.
    pub fn apply_directives(&self, directives: &[ServiceDirective]) {
        let mut desired = self.desired.lock().expect("mode desired lock");
        let listed: std::collections::HashSet<&ServiceRef> =
            directives.iter().map(|d| &d.service).collect();
        desired.retain(|svc, _| listed.contains(svc));
        for d in directives {
            let cur = desired.entry(d.service.clone()).or_insert(Desired {
                directive: Directive::Follow,
                epoch: 0,
                after_zero: false,
            });
            if d.epoch >= cur.epoch {
                *cur = Desired {
                    directive: d.directive,
                    epoch: d.epoch,
                    after_zero: d.after_zero,
                };
            }
        }
        drop(desired);
        self.kick.notify_one();
    }

    /// The mode in force for a Service and the directive epoch it satisfies.
    pub fn applied(&self, service: &ServiceRef) -> Option<(AppliedMode, u64)> {
        self.applied
            .lock()
            .expect("mode applied lock")
            .get(service)
            .map(|a| (a.mode, a.epoch))
    }

    /// One pass over all managed Services; false if some application failed.
    pub fn sync_once(&self) -> bool {
        let services = self.table.services();
        let desired = self.desired.lock().expect("mode desired lock").clone();
        let mut applied = self.applied.lock().expect("mode applied lock");
        applied.retain(|svc, _| services.contains(svc));
        let mut ready_since = self.ready_since.lock().expect("mode ready lock");
        ready_since.retain(|svc, _| services.contains(svc));
        // The gates first: a Service told to sleep is held in the datapath below, and
        // the connections that brings to the proxy must find its gate closed already.
        let gated = self.close_sleep_gates(&services, &desired);
        let now = Instant::now();
        let mut recheck_at: Option<Instant> = None;
        let mut all_ok = true;
        let mut any_change = false;
        for svc in services {
            let want = desired.get(&svc).copied().unwrap_or(Desired {
                directive: Directive::Follow,
                epoch: 0,
                after_zero: false,
            });
            let ready = !self.endpoints.current(&svc).is_empty();
            let since = if ready {
                Some(*ready_since.entry(svc.clone()).or_insert(now))
            } else {
                ready_since.remove(&svc);
                None
            };
            let held = applied.get(&svc).is_some_and(|a| a.hold);
            // Gated (woken after a sleep whose stopped backends this agent still lists):
            // held, as the new connects must not go direct to them.
            let (hold, until) = hold_with_handover(
                decide_hold(ready, want.directive) || gated.contains(&svc),
                held,
                since,
                self.handover,
                now,
            );
            if let Some(t) = until {
                recheck_at = Some(recheck_at.map_or(t, |r| r.min(t)));
            }
            match applied.get_mut(&svc) {
                Some(a) if a.hold == hold => a.epoch = want.epoch,
                _ => match self.sink.set_hold(&svc, hold) {
                    Ok(mode) => {
                        tracing::info!(service = %svc, hold, ?mode, ready, "datapath mode set");
                        applied.insert(
                            svc,
                            Applied {
                                hold,
                                mode,
                                epoch: want.epoch,
                            },
                        );
                        any_change = true;
                    }
                    Err(err) => {
                        tracing::warn!(service = %svc, hold, %err, "setting the datapath mode failed; will retry");
                        all_ok = false;
                    }
                },
            }
        }
        // Connections the proxy forwarded for a Service that now goes direct may step
        // out: their clients' next connects no longer come back to the proxy.
        self.table.drain().set_direct(
            applied
                .iter()
                .filter(|(_, a)| !a.hold)
                .map(|(svc, _)| svc.clone())
                .collect(),
        );
        drop(applied);
        drop(ready_since);
        *self.recheck_at.lock().expect("mode recheck lock") = recheck_at;
        if any_change {
            self.changed.notify_one();
        }
        all_ok
    }

    /// Closes the gate of every Service asked to sleep that has not reached zero since,
    /// and of every Service woken after a sleep whose zero this agent has not seen yet
    /// (its view of the endpoints still lists the backends the scale to zero stopped);
    /// opens every other. Returns the closed ones.
    fn close_sleep_gates(
        &self,
        services: &BTreeSet<ServiceRef>,
        desired: &HashMap<ServiceRef, Desired>,
    ) -> BTreeSet<ServiceRef> {
        let mut sleeps = self.sleeps.lock().expect("mode sleeps lock");
        let mut closed = BTreeSet::new();
        for svc in services {
            let prev = sleeps.remove(svc);
            let sleep_epoch = match desired.get(svc) {
                Some(d) if d.directive == Directive::Sleep => Some(d.epoch),
                // The sleep completed and this is the wake: it goes on for this agent
                // until it sees the sleep's backends go.
                Some(d) if d.after_zero => prev.as_ref().map(|p| p.epoch),
                _ => None,
            };
            let ready = self.endpoints.current(svc).backend_ids();
            if let Some(seen) = next_sleep(prev, sleep_epoch, &ready) {
                if !seen.reached_zero {
                    closed.insert(svc.clone());
                }
                sleeps.insert(svc.clone(), seen);
            }
        }
        sleeps.retain(|svc, _| services.contains(svc));
        drop(sleeps);
        self.table.sleep_gates().set_closed(closed.clone());
        closed
    }

    /// Follow changes forever.
    pub async fn run(self: Arc<Self>) {
        let mut table = self.table.subscribe();
        let mut endpoints = self.endpoints.subscribe_any();
        loop {
            table.borrow_and_update();
            endpoints.borrow_and_update();
            let ok = self.sync_once();
            let recheck_at = *self.recheck_at.lock().expect("mode recheck lock");
            tokio::select! {
                _ = table.changed() => {}
                _ = endpoints.changed() => {}
                _ = self.kick.notified() => {}
                _ = tokio::time::sleep(self.retry), if !ok => {}
                _ = tokio::time::sleep_until(recheck_at.unwrap_or_else(Instant::now)), if recheck_at.is_some() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_exactly_when_not_ready_or_told_to_sleep() {
        assert!(decide_hold(false, Directive::Follow));
        assert!(!decide_hold(true, Directive::Follow));
        assert!(decide_hold(true, Directive::Sleep));
        assert!(decide_hold(false, Directive::Sleep));
    }

    #[test]
    fn a_held_service_goes_direct_only_after_the_hand_over() {
        let t0 = Instant::now();
        let h = Duration::from_secs(2);
        let later = |ms| t0 + Duration::from_millis(ms);
        // Just ready while held: still held, decided again when the hand-over ends.
        assert_eq!(
            hold_with_handover(false, true, Some(t0), h, later(10)),
            (true, Some(later(2000)))
        );
        assert_eq!(
            hold_with_handover(false, true, Some(t0), h, later(2000)),
            (false, None)
        );
        // Ready all along (a sleep given up): direct at once.
        assert_eq!(
            hold_with_handover(false, true, Some(t0), h, later(60_000)),
            (false, None)
        );
        // Already direct, or not ready, or told to sleep: no hand-over.
        assert_eq!(
            hold_with_handover(false, false, Some(t0), h, later(10)),
            (false, None)
        );
        assert_eq!(
            hold_with_handover(true, true, None, h, later(10)),
            (true, None)
        );
        assert_eq!(
            hold_with_handover(true, true, Some(t0), h, later(10)),
            (true, None)
        );
    }
}
