//! The mode of every managed Service in the datapath: hold while it has no ready
//! backend (or the controller asked to hold it for a scale-down), direct once it has one.
//! Owns the decision and its application through a [`ModeSink`]; never touches
//! connections (those already held drain through the proxy).

use super::table::ServiceTable;
use crate::endpoints::EndpointRegistry;
use nemesis_common::wire::{AppliedMode, Directive, ServiceDirective, ServiceRef};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

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

#[derive(Debug, Clone, Copy)]
struct Desired {
    directive: Directive,
    epoch: u64,
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
    kick: Notify,
    /// Notified after a mode was applied (e.g. to send a heartbeat at once).
    pub changed: Arc<Notify>,
    retry: Duration,
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
        Arc::new(Self {
            table,
            endpoints,
            sink,
            desired: Mutex::new(HashMap::new()),
            applied: Mutex::new(HashMap::new()),
            kick: Notify::new(),
            changed: Arc::new(Notify::new()),
            retry: Duration::from_secs(1),
        })
    }

    /// Record the controller's directives (newer epochs only) and re-decide.
    pub fn apply_directives(&self, directives: &[ServiceDirective]) {
        let mut desired = self.desired.lock().expect("mode desired lock");
        for d in directives {
            let cur = desired.entry(d.service.clone()).or_insert(Desired {
                directive: Directive::Follow,
                epoch: 0,
            });
            if d.epoch >= cur.epoch {
                *cur = Desired {
                    directive: d.directive,
                    epoch: d.epoch,
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
        let mut all_ok = true;
        let mut any_change = false;
        for svc in services {
            let want = desired.get(&svc).copied().unwrap_or(Desired {
                directive: Directive::Follow,
                epoch: 0,
            });
            let ready = !self.endpoints.current(&svc).is_empty();
            let hold = decide_hold(ready, want.directive);
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
        drop(applied);
        if any_change {
            self.changed.notify_one();
        }
        all_ok
    }

    /// Follow changes forever.
    pub async fn run(self: Arc<Self>) {
        let mut table = self.table.subscribe();
        let mut endpoints = self.endpoints.subscribe_any();
        loop {
            table.borrow_and_update();
            endpoints.borrow_and_update();
            let ok = self.sync_once();
            tokio::select! {
                _ = table.changed() => {}
                _ = endpoints.changed() => {}
                _ = self.kick.notified() => {}
                _ = tokio::time::sleep(self.retry), if !ok => {}
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
}
