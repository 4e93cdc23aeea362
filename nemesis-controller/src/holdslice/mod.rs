//! Hold EndpointSlices: callers that never dial a ClusterIP (Ingress controllers,
//! Gateways, NodePort and LoadBalancer traffic, meshes) follow EndpointSlices to pod IPs,
//! so the connect() hooks never see them. While a managed Service has no ready backend
//! (at zero, or being put to sleep) it gets a slice of our own listing the ready agents'
//! hold listeners (node addresses, one port per Service port), so everything that
//! follows EndpointSlices sends new connections to a Nemesis proxy, which holds them,
//! wakes the Service and forwards; once a real backend is ready the slice goes, and
//! nothing of Nemesis stays in the path (the Knative activator's trick, node-local and
//! protocol-agnostic).
//!
//! Owns the hold ports, the slices' lifecycle and the agents' hold-port directives; it
//! never decides when a Service sleeps or wakes (the policy actors do). Runs only while
//! this instance leads.

pub mod plan;
pub mod ports;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use nemesis_common::wire::{Directive, HoldPort, ServiceRef};
use tokio::time::Instant;

use crate::agents::{AgentRegistry, AgentStatus, WakeGate};
use crate::policy::ScalingPolicy;
use plan::{AgentEndpoint, Owner};
pub use ports::{DEFAULT_RANGE, HoldPorts, PortsExhausted};

/// The field manager of our server-side applies.
const FIELD_MANAGER: &str = "nemesis-controller";
/// Every API call gives up after this (the next pass retries).
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// A pass runs at most this often however fast heartbeats and watch events arrive, and
/// at least this often (a missed event never leaves a slice wrong for long).
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(200);
const MAX_PASS_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HoldSliceError {
    #[error("reading Service {service}: {source}")]
    GetService {
        service: ServiceRef,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Ports(#[from] PortsExhausted),
    #[error("writing hold EndpointSlice {namespace}/{name}: {source}")]
    Apply {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting hold EndpointSlice {namespace}/{name}: {source}")]
    Delete {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what} did not answer within {after:?}")]
    Timeout { what: String, after: Duration },
}

/// The publisher; shared by the leadership term's loop and the policy actors' sleep
/// handshake.
pub struct HoldSlices {
    client: Client,
    registry: Arc<AgentRegistry>,
    ports: Mutex<HoldPorts>,
    /// The slices we applied last, by (namespace, name): identical ones are not
    /// written again, so a steady state costs no API writes.
    written: Mutex<BTreeMap<(String, String), EndpointSlice>>,
}

impl std::fmt::Debug for HoldSlices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldSlices").finish_non_exhaustive()
    }
}

/// The agents of `agents` that can be listed for `svc`, with the hold ports each listens
/// on for it. A pass reads the registry once and calls this per Service (reading it per
/// Service copied every agent's reports once per Service: 10^7 copies a pass at 1,000
/// agents and 10,000 Services).
fn endpoints_for(agents: &[AgentStatus], svc: &ServiceRef) -> Vec<AgentEndpoint> {
    agents
        .iter()
        .filter(|a| a.live && a.ready && !a.addresses.is_empty())
        .map(|a| AgentEndpoint {
            listening: a
                .services
                .iter()
                .find(|r| &r.service == svc)
                .map(|r| r.hold_ports.iter().copied().collect())
                .unwrap_or_default(),
            node: a.node.clone(),
            addresses: a.addresses.clone(),
        })
        .collect()
}

fn owner(policy: &ScalingPolicy) -> Owner {
    Owner {
        api_version: ScalingPolicy::api_version(&()).into_owned(),
        kind: ScalingPolicy::kind(&()).into_owned(),
        name: policy.name_any(),
        uid: policy.uid().unwrap_or_default(),
    }
}

async fn timed<T>(
    what: impl FnOnce() -> String,
    f: impl std::future::Future<Output = T>,
) -> Result<T, HoldSliceError> {
    tokio::time::timeout(API_TIMEOUT, f)
        .await
        .map_err(|_| HoldSliceError::Timeout {
            what: what(),
            after: API_TIMEOUT,
        })
}

// === impl HoldSlices ===

impl HoldSlices {
    pub fn new(client: Client, registry: Arc<AgentRegistry>, range: (u16, u16)) -> Self {
        Self {
            client,
            registry,
            ports: Mutex::new(HoldPorts::new(range)),
            written: Mutex::new(BTreeMap::new()),
        }
    }

    /// The live, ready agents that can be listed for `svc`, with the hold ports each
    /// listens on for it.
    fn agents_for(&self, svc: &ServiceRef) -> Vec<AgentEndpoint> {
        endpoints_for(&self.registry.agents(Instant::now()), svc)
    }

    /// The hold ports of `service`'s TCP ports, handed to the agents with its directive.
    fn assign_ports(
        &self,
        svc: &ServiceRef,
        service: &Service,
    ) -> Result<Vec<HoldPort>, PortsExhausted> {
        let names = plan::tcp_port_names(service);
        let ports = self
            .ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .assign(svc, &names)?;
        self.registry.set_hold_ports(svc, ports.clone());
        Ok(ports)
    }

    /// Publishes the hold slices of `svc` now, whatever its endpoints: the sleep
    /// handshake calls this after every agent holds and before the scale to zero, so a
    /// caller that follows EndpointSlices never meets a Service without endpoints.
    /// Returns how many agents the slices list (0 too when the Service does not exist).
    pub async fn publish_held(
        &self,
        svc: &ServiceRef,
        policy: &ScalingPolicy,
    ) -> Result<usize, HoldSliceError> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &svc.namespace);
        let found = timed(|| format!("reading Service {svc}"), api.get_opt(&svc.name))
            .await?
            .map_err(|source| HoldSliceError::GetService {
                service: svc.clone(),
                source,
            })?;
        // No Service, nothing routes to it by its slices: nothing to hold there.
        let Some(service) = found else {
            return Ok(0);
        };
        let ports = self.assign_ports(svc, &service)?;
        let agents = self.agents_for(svc);
        let slices = self.plan(&service, &ports, &agents, &owner(policy), &[]);
        // Per family, the agents its slices list together.
        let mut per_family: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &slices {
            *per_family.entry(s.address_type.as_str()).or_default() +=
                s.endpoints.as_ref().map_or(0, Vec::len);
        }
        let listed = per_family.into_values().max().unwrap_or(0);
        for slice in slices {
            self.apply(slice, None, true).await?;
        }
        Ok(listed)
    }

    /// The hold slices `service` wants, each agent kept in the slice that lists it now:
    /// as we wrote it last (the cache lags our writes), else as `cached` shows it.
    fn plan(
        &self,
        service: &Service,
        ports: &[HoldPort],
        agents: &[AgentEndpoint],
        owner: &Owner,
        cached: &[&EndpointSlice],
    ) -> Vec<EndpointSlice> {
        let namespace = service.namespace().unwrap_or_default();
        let prefix = format!("{}-nemesis-hold-", service.name_any());
        let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let mut previous: Vec<&EndpointSlice> = written
            .range((namespace.clone(), prefix.clone())..)
            .take_while(|((ns, name), _)| *ns == namespace && name.starts_with(&prefix))
            .map(|(_, s)| s)
            .collect();
        previous.extend(cached.iter().copied().filter(|s| {
            plan::is_hold_slice(s) && !written.contains_key(&(namespace.clone(), s.name_any()))
        }));
        plan::hold_slices(
            service,
            ports,
            agents,
            owner,
            &previous,
            plan::MAX_ENDPOINTS,
        )
    }

    /// Server-side applies `slice` unless it is what we applied last, or, when we have
    /// not written it, what `stored` (the cache's copy) already says (`force`: even so).
    async fn apply(
        &self,
        slice: EndpointSlice,
        stored: Option<&EndpointSlice>,
        force: bool,
    ) -> Result<bool, HoldSliceError> {
        let namespace = slice.namespace().unwrap_or_default();
        let name = slice.name_any();
        let key = (namespace.clone(), name.clone());
        if !force {
            let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
            let unchanged = match written.get(&key) {
                Some(ours) => ours == &slice,
                // A slice an earlier term (or leader) left right is left alone. Nothing is
                // recorded as written: if the cache's copy was stale, the pass after the
                // watch catches up sees the difference and writes.
                None => stored.is_some_and(|s| plan::says_the_same(&slice, s)),
            };
            if unchanged {
                return Ok(false);
            }
        }
        let mut body = serde_json::to_value(&slice).unwrap_or_default();
        if let Some(obj) = body.as_object_mut() {
            obj.insert("apiVersion".into(), "discovery.k8s.io/v1".into());
            obj.insert("kind".into(), "EndpointSlice".into());
        }
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &namespace);
        timed(
            || format!("writing hold EndpointSlice {namespace}/{name}"),
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            ),
        )
        .await?
        .map_err(|source| HoldSliceError::Apply {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
        tracing::info!(slice = %format!("{namespace}/{name}"), agents = slice.endpoints.as_ref().map_or(0, Vec::len), "hold EndpointSlice published");
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, slice);
        Ok(true)
    }

    fn wrote(&self, key: &(String, String)) -> bool {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }

    /// A slice was deleted (the watch says so): the next pass writes it again if wanted.
    fn forget(&self, slice: &EndpointSlice) {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(slice.namespace().unwrap_or_default(), slice.name_any()));
    }

    async fn delete(&self, namespace: &str, name: &str) -> Result<(), HoldSliceError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), namespace);
        let result = timed(
            || format!("deleting hold EndpointSlice {namespace}/{name}"),
            api.delete(name, &DeleteParams::default()),
        )
        .await?;
        match result {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(HoldSliceError::Delete {
                    namespace: namespace.into(),
                    name: name.into(),
                    source,
                });
            }
        }
        tracing::info!(slice = %format!("{namespace}/{name}"), "hold EndpointSlice removed");
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(namespace.to_string(), name.to_string()));
        Ok(())
    }

    /// Keeps every managed Service's hold ports and hold slices right while this
    /// instance leads: a slice while the Service has no ready backend or is being put
    /// to sleep, none otherwise; slices of Services no valid policy manages any more
    /// (or left by an earlier controller) are removed. Never ends by itself.
    pub async fn run(self: Arc<Self>, policies: Store<ScalingPolicy>, wakes: Arc<WakeGate>) {
        let (svc_reader, svc_writer) = reflector::store::<Service>();
        let services = reflector::reflector(
            svc_writer,
            watcher(
                Api::<Service>::all(self.client.clone()),
                watcher::Config::default(),
            )
            .default_backoff(),
        );
        let (slice_reader, slice_writer) = reflector::store::<EndpointSlice>();
        let slices = reflector::reflector(
            slice_writer,
            watcher(
                Api::<EndpointSlice>::all(self.client.clone()),
                watcher::Config::default().labels(plan::SERVICE_NAME_LABEL),
            )
            .default_backoff(),
        );
        let this = self.clone();
        let slices = slices.map(move |ev| {
            if let Ok(watcher::Event::Delete(s)) = &ev {
                this.forget(s);
            }
        });
        let mut events = futures::stream::select(services.map(|_| ()), slices).boxed();
        // Heartbeats that change nothing a slice shows do not start a pass.
        let mut changed = self.registry.subscribe_topology();
        let mut managed = wakes.subscribe_managed();
        let (mut services_ready, mut slices_ready) = (false, false);
        let mut seeded = false;
        loop {
            tokio::select! {
                e = events.next() => if e.is_none() { return },
                _ = changed.changed() => {}
                _ = managed.changed() => {}
                _ = tokio::time::sleep(MAX_PASS_INTERVAL) => {}
            }
            // Let a burst of heartbeats and events settle into one pass.
            tokio::time::sleep(MIN_PASS_INTERVAL).await;
            // Unconstrained: under the scheduler's budget a long drain stops early and the
            // caches fall behind (they did, by thousands of events, at 10,000 Services).
            while tokio::task::unconstrained(events.next())
                .now_or_never()
                .flatten()
                .is_some()
            {}
            changed.borrow_and_update();
            managed.borrow_and_update();
            if !services_ready {
                services_ready = svc_reader.wait_until_ready().now_or_never().is_some();
            }
            if !slices_ready {
                slices_ready = slice_reader.wait_until_ready().now_or_never().is_some();
            }
            if !(services_ready && slices_ready) {
                continue;
            }
            if !seeded {
                self.seed(&slice_reader.state());
                seeded = true;
            }
            if let Err(e) = self
                .pass(&policies, &wakes, &svc_reader, &slice_reader)
                .await
            {
                tracing::warn!(err = %e, "hold EndpointSlices not in step yet; retrying");
            }
        }
    }

    /// Hold ports as an earlier controller left them: in the directives this leader
    /// goes on from (a copy of the last leader's, which agents listen on: the same
    /// ports keep those directives unchanged, and agents get an empty delta), then in
    /// its slices.
    fn seed(&self, slices: &[Arc<EndpointSlice>]) {
        let directives = self.registry.directives();
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        for d in &directives {
            for p in &d.hold_ports {
                ports.seed(&d.service, &p.name, p.port);
            }
        }
        for s in slices.iter().filter(|s| plan::is_hold_slice(s)) {
            let Some(name) = s.labels().get(plan::SERVICE_NAME_LABEL) else {
                continue;
            };
            let svc = ServiceRef {
                namespace: s.namespace().unwrap_or_default(),
                name: name.clone(),
            };
            for p in s.ports.iter().flatten() {
                if let Some(port) = p.port.and_then(|p| u16::try_from(p).ok()) {
                    ports.seed(&svc, p.name.as_deref().unwrap_or(""), port);
                }
            }
        }
    }

    /// One pass over every managed Service.
    async fn pass(
        &self,
        policies: &Store<ScalingPolicy>,
        wakes: &WakeGate,
        services: &Store<Service>,
        slices: &Store<EndpointSlice>,
    ) -> Result<(), HoldSliceError> {
        let all_slices = slices.state();
        let mut by_service: BTreeMap<ServiceRef, Vec<&EndpointSlice>> = BTreeMap::new();
        for s in &all_slices {
            if let Some(name) = s.labels().get(plan::SERVICE_NAME_LABEL) {
                by_service
                    .entry(ServiceRef {
                        namespace: s.namespace().unwrap_or_default(),
                        name: name.clone(),
                    })
                    .or_default()
                    .push(s);
            }
        }
        let mut desired: Vec<EndpointSlice> = Vec::new();
        // Only agents with hold listeners can be listed: most passes copy none.
        let agents: Vec<AgentStatus> = self
            .registry
            .agents(Instant::now())
            .into_iter()
            .filter(|a| !a.addresses.is_empty())
            .collect();
        let mut managed: BTreeSet<ServiceRef> = BTreeSet::new();
        let mut first_error = None;
        for policy in policies.state() {
            let Some(name) = policy.spec.target.service.clone() else {
                continue;
            };
            let svc = ServiceRef {
                namespace: policy.namespace().unwrap_or_default(),
                name,
            };
            // Only a valid, running policy wakes what its slices hold.
            if !wakes.is_managed(&svc) || !managed.insert(svc.clone()) {
                continue;
            }
            let Some(service) = services.get(&ObjectRef::new(&svc.name).within(&svc.namespace))
            else {
                continue;
            };
            let ports = match self.assign_ports(&svc, &service) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(service = %svc, err = %e, "no hold ports");
                    first_error.get_or_insert(e.into());
                    continue;
                }
            };
            let sleeping = self
                .registry
                .directive(&svc)
                .is_some_and(|d| d.directive == Directive::Sleep);
            let own = by_service.get(&svc).map(Vec::as_slice).unwrap_or(&[]);
            if sleeping || !plan::has_ready_backend(own.iter().copied()) {
                let agents = endpoints_for(&agents, &svc);
                desired.extend(self.plan(&service, &ports, &agents, &owner(&policy), own));
            }
        }
        // Ports of Services no longer managed go back.
        {
            let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
            for svc in ports.services().difference(&managed) {
                ports.release(svc);
            }
        }
        let wanted: BTreeSet<(String, String)> = desired
            .iter()
            .map(|s| (s.namespace().unwrap_or_default(), s.name_any()))
            .collect();
        let present: BTreeMap<(String, String), &EndpointSlice> = all_slices
            .iter()
            .filter(|s| plan::is_hold_slice(s))
            .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), &**s))
            .collect();
        for slice in desired {
            // A slice missing from the cache is written even if we wrote it as it is, so
            // one deleted behind our back comes back; but the cache lags our own writes
            // (it learns of them by watch), so a slice we wrote is "missing" only once
            // the watch has shown it gone (see `forget`).
            let key = (slice.namespace().unwrap_or_default(), slice.name_any());
            let stored = present.get(&key).copied();
            let unknown = stored.is_none() && !self.wrote(&key);
            if let Err(e) = self.apply(slice, stored, unknown).await {
                tracing::warn!(err = %e, "hold EndpointSlice not written");
                first_error.get_or_insert(e);
            }
        }
        for (namespace, name) in present.keys().filter(|k| !wanted.contains(*k)) {
            if let Err(e) = self.delete(namespace, name).await {
                tracing::warn!(err = %e, "hold EndpointSlice not removed");
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

use futures::FutureExt as _;
