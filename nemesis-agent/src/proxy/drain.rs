//! When forwarded connections should step out of the proxy: once their Service's new
//! connects go direct (the mode follower publishes which do), or all of them when the
//! agent stops. Owns only the signal; never touches a connection (`relay` does, at a
//! point its protocol makes safe).

use nemesis_common::wire::ServiceRef;
use std::collections::BTreeSet;
use tokio::sync::watch;

/// What a forwarded connection of one Service is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Stay: the Service's connects still come to the proxy, so a reconnect would too.
    Stay,
    /// Step out at the next safe point: a new connection goes direct.
    StepOut,
    /// The agent is stopping: step out at the next safe point, and close what is idle.
    Shutdown,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct State {
    direct: BTreeSet<ServiceRef>,
    shutdown: bool,
}

/// The signal, shared by the mode follower (which Services go direct), the agent
/// (shutdown) and every forwarded connection.
#[derive(Debug)]
pub struct Drain {
    state: watch::Sender<State>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            state: watch::Sender::new(State::default()),
        }
    }
}

impl Drain {
    /// The Services whose new connects go direct now (every other one is held, or not
    /// known to be direct yet).
    pub fn set_direct(&self, direct: BTreeSet<ServiceRef>) {
        self.state.send_if_modified(|s| {
            let changed = s.direct != direct;
            s.direct = direct;
            changed
        });
    }

    /// Every forwarded connection steps out at its next safe point, whatever its Service.
    pub fn shutdown(&self) {
        self.state
            .send_if_modified(|s| !std::mem::replace(&mut s.shutdown, true));
    }

    pub(crate) fn watch(&self, service: &ServiceRef) -> DrainWatch {
        DrainWatch {
            rx: self.state.subscribe(),
            service: service.clone(),
        }
    }
}

/// One connection's view of the signal.
#[derive(Debug, Clone)]
pub(crate) struct DrainWatch {
    rx: watch::Receiver<State>,
    service: ServiceRef,
}

impl DrainWatch {
    /// What is wanted now.
    pub(crate) fn now(&self) -> Want {
        let s = self.rx.borrow();
        if s.shutdown {
            Want::Shutdown
        } else if s.direct.contains(&self.service) {
            Want::StepOut
        } else {
            Want::Stay
        }
    }

    /// Waits until what is wanted may have changed; never returns once the signal is gone
    /// (the connection then simply stays).
    pub(crate) async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(n: &str) -> ServiceRef {
        ServiceRef {
            namespace: "ns".into(),
            name: n.into(),
        }
    }

    #[tokio::test]
    async fn a_connection_steps_out_when_its_service_goes_direct_or_the_agent_stops() {
        let d = Drain::default();
        let mut a = d.watch(&svc("a"));
        let b = d.watch(&svc("b"));
        assert_eq!((a.now(), b.now()), (Want::Stay, Want::Stay));
        d.set_direct([svc("a")].into());
        tokio::time::timeout(std::time::Duration::from_secs(1), a.changed())
            .await
            .expect("a change is signalled");
        assert_eq!((a.now(), b.now()), (Want::StepOut, Want::Stay));
        // Held again (a scale to zero): a new connection would come back to the proxy.
        d.set_direct(BTreeSet::new());
        assert_eq!(a.now(), Want::Stay);
        d.shutdown();
        assert_eq!((a.now(), b.now()), (Want::Shutdown, Want::Shutdown));
    }

    #[tokio::test]
    async fn an_unchanged_set_wakes_nobody() {
        let d = Drain::default();
        let mut a = d.watch(&svc("a"));
        d.set_direct([svc("b")].into());
        a.changed().await;
        d.set_direct([svc("b")].into());
        let woke = tokio::time::timeout(std::time::Duration::from_millis(50), a.changed()).await;
        assert!(woke.is_err(), "the same set again is no change");
    }
}
