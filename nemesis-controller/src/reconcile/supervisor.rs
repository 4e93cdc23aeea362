//! One leadership term: follows the warm ScalingPolicy and HorizontalPodAutoscaler
//! caches (`caches`, kept on every instance), keeps one actor per policy, and routes to them
//! what concerns them: spec changes, wake-ups by Service, HPA and alert changes. Each
//! actor watches its own target (`workload`). It holds no scaling logic; dropping the
//! term aborts every actor it started.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::watcher::Event;
use nemesis_common::wire::ServiceRef;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::actor::{Actor, Handle, Msg, Term};
use super::caches::{Caches, is_forbidden};
use super::{AbortOnDrop, Context};
use crate::agents::WakeUp;
use crate::metrics::ErrorKind;
use crate::policy::ScalingPolicy;
use crate::store::PolicyId;

/// Every cached policy is checked for a running actor this often (an actor that died
/// is restarted; a missed event is caught up), beyond the watch events themselves.
const RESYNC: Duration = Duration::from_secs(10);

struct Running {
    handle: Handle,
    service: Option<ServiceRef>,
}

#[derive(Default)]
struct Actors {
    running: HashMap<PolicyId, Running>,
    by_service: HashMap<ServiceRef, BTreeSet<PolicyId>>,
}

fn id_of(p: &ScalingPolicy) -> PolicyId {
    PolicyId::new(p.namespace().unwrap_or_default(), p.name_any())
}

impl Actors {
    fn upsert(
        &mut self,
        ctx: &Arc<Context>,
        term: &Arc<Term>,
        tasks: &mut JoinSet<PolicyId>,
        p: ScalingPolicy,
    ) {
        let id = id_of(&p);
        let ns = id.namespace.clone();
        let service = p.spec.target.service.clone().map(|name| ServiceRef {
            namespace: ns.clone(),
            name,
        });
        let p = Arc::new(p);
        if let Some(r) = self.running.get(&id)
            && r.handle.tx.send(Msg::Spec(p.clone())).is_ok()
        {
            if r.service != service {
                self.unindex(&id);
                self.index(&id, service.clone());
                if let Some(r) = self.running.get_mut(&id) {
                    r.service = service;
                }
            }
            return;
        }
        self.remove(&id);
        let (actor, handle) = Actor::new(ctx.clone(), term.clone(), p);
        let id2 = id.clone();
        tasks.spawn(async move {
            actor.run().await;
            id2
        });
        self.index(&id, service.clone());
        self.running.insert(id, Running { handle, service });
    }

    fn index(&mut self, id: &PolicyId, service: Option<ServiceRef>) {
        if let Some(s) = service {
            let owners = self.by_service.entry(s.clone()).or_default();
            owners.insert(id.clone());
            if owners.len() > 1 {
                tracing::warn!(service = %s, policies = ?owners, "several policies name one Service; wake-ups go to the first");
            }
        }
    }

    fn unindex(&mut self, id: &PolicyId) {
        if let Some(r) = self.running.get(id)
            && let Some(s) = &r.service
            && let Some(set) = self.by_service.get_mut(s)
        {
            set.remove(id);
            if set.is_empty() {
                self.by_service.remove(s);
            }
        }
    }

    /// Drops the actor's handle: it stops taking wake-ups and ends.
    fn remove(&mut self, id: &PolicyId) {
        self.unindex(id);
        self.running.remove(id);
    }

    /// Every actor evaluates now (an HPA or an alert changed).
    fn poke_all(&self) {
        for r in self.running.values() {
            r.handle.poke.notify_one();
        }
    }
}

/// Drops the directives of Services no running policy names: a term starts from the
/// last leader's directives (agents keep their cursors), and a policy deleted or paused
/// while no one led, or after this instance's last copy, has no actor to remove its
/// directive. Called once per term, when the caches are synced and an actor runs for
/// every policy listed.
fn prune_directives(ctx: &Context, policies: &[Arc<ScalingPolicy>]) {
    let named: BTreeSet<ServiceRef> = policies
        .iter()
        .filter(|p| !p.spec.paused)
        .filter_map(|p| {
            Some(ServiceRef {
                namespace: p.namespace().unwrap_or_default(),
                name: p.spec.target.service.clone()?,
            })
        })
        .collect();
    let gone = ctx.registry.retain_directives(|svc| named.contains(svc));
    if gone > 0 {
        tracing::info!(
            gone,
            "dropped the directives of Services no policy manages any more"
        );
    }
}

/// Runs one leadership term over the warm `caches`; it only ends when dropped (or when
/// a cache's watch ends, which the default backoff never lets happen).
pub async fn run_term(
    ctx: Arc<Context>,
    caches: &Caches,
    wake_rx: &mut mpsc::Receiver<WakeUp>,
    synced: &watch::Sender<bool>,
) {
    // Subscribe before reading the stores, so no change falls between the two.
    let mut policies = caches.policies.subscribe();
    let mut hpas = caches.hpas.subscribe();
    let pol_reader = caches.policies.reader.clone();
    let hpa_reader = caches.hpas.reader.clone();
    // The hold EndpointSlices live and die with the term (a follower writes nothing).
    let _hold_slices = AbortOnDrop(tokio::spawn(
        ctx.hold_slices
            .clone()
            .run(pol_reader.clone(), ctx.wakes.clone()),
    ));
    let term = Arc::new(Term {
        hpas: hpa_reader,
        sleep_allowed_from: Instant::now() + ctx.registry.config().lease,
        targets: Arc::new(super::targets::AppsTargets::new(ctx.client.clone())),
    });
    let mut actors = Actors::default();
    let mut tasks: JoinSet<PolicyId> = JoinSet::new();
    let mut alerts = ctx.alerts.subscribe();
    let mut resync = tokio::time::interval(RESYNC);
    // A standby's caches are synced long before it leads: its actors start at once.
    let mut policies_synced = caches.policies.is_synced();
    let mut hpas_synced = caches.hpas.is_synced();
    if !hpas_synced && caches.hpas.is_forbidden() {
        tracing::warn!(
            "starting the policies without HorizontalPodAutoscalers: a policy whose target an HPA scales will fight it until they can be read"
        );
        hpas_synced = true;
    }
    if hpas_synced {
        for p in pol_reader.state() {
            actors.upsert(&ctx, &term, &mut tasks, (*p).clone());
        }
    }
    synced.send_replace(policies_synced && hpas_synced);
    let mut pruned = false;

    loop {
        if !pruned && policies_synced && hpas_synced {
            pruned = true;
            prune_directives(&ctx, &pol_reader.state());
        }
        tokio::select! {
            ev = policies.recv() => match ev {
                // Actors start once the HPA cache is synced (a policy that missed its
                // target's HPA would take the HPA's replicas for a manual scale and put
                // them back); until then the policy cache keeps what arrives.
                Ok(Ok(Event::Apply(p) | Event::InitApply(p))) if hpas_synced => {
                    actors.upsert(&ctx, &term, &mut tasks, p)
                }
                Ok(Ok(Event::Apply(_) | Event::InitApply(_))) => {}
                Ok(Ok(Event::Delete(p))) => {
                    tracing::info!(policy = %id_of(&p), "policy deleted");
                    actors.remove(&id_of(&p));
                }
                Ok(Ok(Event::Init)) => {}
                // A term that fell behind the cache's events reconciles with its store,
                // as after a listing.
                Ok(Ok(Event::InitDone)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    policies_synced = caches.policies.is_synced();
                    let present: BTreeSet<PolicyId> =
                        pol_reader.state().iter().map(|p| id_of(p)).collect();
                    let gone: Vec<PolicyId> = actors
                        .running
                        .keys()
                        .filter(|id| !present.contains(*id))
                        .cloned()
                        .collect();
                    for id in gone {
                        actors.remove(&id);
                    }
                    // The reflector's store shows a listing only from its InitDone on: a
                    // policy listed before the HPA cache synced was skipped above
                    // and was not in the store yet when that sync started actors, so
                    // start it now rather than at the next resync (up to 10 s of
                    // wake-ups refused as unmanaged after every start or failover).
                    if hpas_synced {
                        for p in pol_reader.state() {
                            if !actors.running.contains_key(&id_of(&p)) {
                                actors.upsert(&ctx, &term, &mut tasks, (*p).clone());
                            }
                        }
                    }
                }
                Ok(Err(e)) => {
                    ctx.metrics.error(ErrorKind::KubeApi);
                    tracing::warn!(err = %crate::permissions::explain_chain(&*e), "watching ScalingPolicies failed; retrying");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            ev = hpas.recv() => match ev {
                Ok(Ok(Event::Apply(_) | Event::Delete(_))) => actors.poke_all(),
                Ok(Ok(Event::InitApply(_) | Event::Init)) => {}
                Ok(Ok(Event::InitDone)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    actors.poke_all();
                    if !hpas_synced {
                        hpas_synced = true;
                        for p in pol_reader.state() {
                            actors.upsert(&ctx, &term, &mut tasks, (*p).clone());
                        }
                    }
                }
                Ok(Err(e)) => {
                    ctx.metrics.error(ErrorKind::KubeApi);
                    let why = crate::permissions::explain_chain(&*e);
                    tracing::warn!(err = %why, "watching HorizontalPodAutoscalers failed; retrying");
                    // Without HPAs the policies still run (they just cannot see one);
                    // waiting for a permission that may never come would stop them all.
                    if !hpas_synced && is_forbidden(&e) {
                        tracing::warn!("starting the policies without HorizontalPodAutoscalers: a policy whose target an HPA scales will fight it until they can be read");
                        hpas_synced = true;
                        for p in pol_reader.state() {
                            actors.upsert(&ctx, &term, &mut tasks, (*p).clone());
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            w = wake_rx.recv() => {
                let Some(w) = w else { return };
                let target = actors
                    .by_service
                    .get(&w.service)
                    .and_then(|ids| ids.iter().next())
                    .and_then(|id| actors.running.get(id));
                match target {
                    Some(r) => {
                        if r.handle.tx.send(Msg::Wake(w.clone())).is_err() {
                            ctx.wakes.finished(&w.service);
                        }
                    }
                    None => {
                        tracing::info!(service = %w.service, "wake-up for a Service no running policy names");
                        ctx.wakes.finished(&w.service);
                    }
                }
            }
            r = alerts.changed() => {
                if r.is_err() {
                    return;
                }
                actors.poke_all();
            }
            Some(done) = tasks.join_next() => {
                match done {
                    Ok(id) => tracing::debug!(policy = %id, "policy actor ended"),
                    Err(e) => tracing::error!(err = %e, "a policy actor failed; restarting it at the next resync"),
                }
                // An actor that ended while still listed (it panicked) is forgotten so
                // the resync starts a new one.
                let dead: Vec<PolicyId> = actors
                    .running
                    .iter()
                    .filter(|(_, r)| r.handle.tx.is_closed())
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in dead {
                    actors.remove(&id);
                }
            }
            _ = resync.tick(), if hpas_synced => {
                for p in pol_reader.state() {
                    if !actors.running.contains_key(&id_of(&p)) {
                        actors.upsert(&ctx, &term, &mut tasks, (*p).clone());
                    }
                }
            }
        }
        ctx.wakes.set_synced(policies_synced && hpas_synced);
        synced.send_if_modified(|s| {
            let now = policies_synced && hpas_synced;
            std::mem::replace(s, now) != now
        });
    }
}
