//! The agent's hold listeners: for every managed Service port, a listener on each of the
//! node's hold addresses at the port the controller assigned to it (the same on every
//! node). The controller's hold EndpointSlice sends callers that follow EndpointSlices
//! (Ingress controllers, NodePorts, meshes) here while the Service has no ready backend;
//! the port says which Service port they meant, and the proxy holds, wakes and forwards
//! them exactly as the connects the eBPF hook redirects. Owns the listeners only.
#![deny(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use nemesis_common::wire::{HoldPort, ServiceDirective, ServiceRef};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::proxy::{self, Proxy, ServiceTable};

/// One Service port's listeners (one per hold address).
struct Listening {
    name: String,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The hold listeners of this agent.
pub struct HoldListeners {
    proxy: Proxy,
    table: Arc<ServiceTable>,
    addresses: Vec<IpAddr>,
    /// Accepting starts when this turns true (a standing-by agent listens but waits).
    serving: watch::Receiver<bool>,
    state: Mutex<BTreeMap<(ServiceRef, u16), Listening>>,
    /// Ports that could not be bound, logged once each.
    failed: Mutex<BTreeSet<(IpAddr, u16)>>,
}

impl std::fmt::Debug for HoldListeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldListeners")
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

impl HoldListeners {
    /// Listeners on `addresses` (none: this agent serves no hold listener, and reports
    /// no address, so hold slices never list it).
    pub fn new(
        proxy: Proxy,
        table: Arc<ServiceTable>,
        addresses: Vec<IpAddr>,
        serving: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            proxy,
            table,
            addresses,
            serving,
            state: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(BTreeSet::new()),
        })
    }

    /// Where the hold listeners are reachable (reported to the controller).
    pub fn addresses(&self) -> &[IpAddr] {
        &self.addresses
    }

    /// Makes the listeners those of `directives`' hold ports: new ones are bound (on
    /// every address; SO_REUSEPORT, so that an agent's successor can bind beside it),
    /// those of ports no directive names any more are closed (their accepted
    /// connections run on). A port whose Service port the table does not know yet is
    /// tried again at the next call.
    pub fn apply(&self, directives: &[ServiceDirective]) {
        if self.addresses.is_empty() {
            return;
        }
        let wanted: BTreeMap<(ServiceRef, u16), &HoldPort> = directives
            .iter()
            .flat_map(|d| {
                d.hold_ports
                    .iter()
                    .map(move |p| ((d.service.clone(), p.port), p))
            })
            .collect();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.retain(|k, l| wanted.get(k).is_some_and(|p| p.name == l.name));
        for ((svc, port), hold) in wanted {
            if state.contains_key(&(svc.clone(), port)) {
                continue;
            }
            if self
                .table
                .address_of(&svc, &hold.name, self.addresses[0])
                .is_none()
            {
                continue;
            }
            let mut tasks = Vec::new();
            for ip in &self.addresses {
                // A listener stands for the Service's ClusterIP of its own family.
                let Some(destination) = self.table.address_of(&svc, &hold.name, *ip) else {
                    continue;
                };
                let addr = SocketAddr::new(*ip, port);
                match proxy::bind(addr) {
                    Ok(listener) => {
                        let proxy = self.proxy.clone();
                        let mut serving = self.serving.clone();
                        tasks.push(tokio::spawn(async move {
                            if serving.wait_for(|s| *s).await.is_ok() {
                                proxy.serve_to(listener, destination).await;
                            }
                        }));
                        tracing::info!(service = %svc, port = %hold.name, %addr, %destination, "hold listener up");
                    }
                    Err(err) => {
                        let first = self
                            .failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert((*ip, port));
                        if first {
                            tracing::warn!(service = %svc, %err, "hold listener not bound: hold EndpointSlices will not list this node for the Service");
                        }
                    }
                }
            }
            // Reported only when every address listens: a slice lists the node's
            // addresses, and each must answer.
            if tasks.len() == self.addresses.len() {
                state.insert(
                    (svc, port),
                    Listening {
                        name: hold.name.clone(),
                        tasks,
                    },
                );
            }
        }
    }

    /// The hold ports listening for `svc` now.
    pub fn listening(&self, svc: &ServiceRef) -> Vec<u16> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|(s, _)| s == svc)
            .map(|(_, p)| *p)
            .collect()
    }
}
