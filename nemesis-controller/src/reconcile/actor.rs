//! One ScalingPolicy's loop while this instance leads: on every tick, wake-up, spec
//! change, new query result, target or HPA change it gathers the observations, calls
//! `engine::decide`, and applies the decision (beside an HPA, only between zero and the
//! HPA's minimum): the `/scale` subresource, the agents' sleep handshake before any
//! scale to zero, status, history and Events. It owns the policy's runtime memory
//! (engine state, wake and sleep progress, its target's watch); it never decides a
//! replica count itself, and never scales after this instance stopped leading.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::reflector;
use kube::{Api, Resource, ResourceExt};
use nemesis_common::wire::{Directive, ServiceRef};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::cold_start;
use super::connections::{self, SideRates};
use super::events::Note;
use super::history::Item;
use super::hpa::{self, HpaView};
use super::inherited_sleep::{self, Verdict};
use super::late_wake;
use super::prom::Poller;
use super::resume;
use super::status::{self, Blocked};
use super::workload::{self, Seen};
use super::{API_TIMEOUT, Context, ReconcileError, backoff};
use crate::agents::{AckError, ServiceActivity, WakeUp};
use crate::engine::{self, Observations, State};
use crate::metrics::{DecisionOutcome, ErrorKind};
use crate::policy::crd::{self, ScalingPolicyStatus};
use crate::policy::short_form::ZERO_STATE;
use crate::policy::{CompiledPolicy, InvalidPolicy, ScalingPolicy, WorkloadRef, compile};
use crate::store::{self, ColdStartOutcome, ColdStartRecord, PolicyId, unix_ms};

/// An invalid policy is looked at again this often (its spec changes arrive as events
/// anyway); it does nothing in between.
const INVALID_RECHECK: Duration = Duration::from_secs(30);
/// The `Ready` condition's message while `spec.paused` is true.
const PAUSED_MESSAGE: &str = "spec.paused is true: the policy scales nothing and holds no \
     connection; set it to false to resume in the state shown";
/// The scale we made is trusted over the cache for this long while the cache catches
/// up, so a lagging watch never makes us scale twice.
const PENDING_SCALE_TRUST: Duration = Duration::from_secs(10);

/// What the supervisor sends an actor.
#[derive(Debug)]
pub enum Msg {
    /// The policy object changed (spec or status).
    Spec(Arc<ScalingPolicy>),
    Wake(WakeUp),
}

/// What the supervisor keeps per actor.
#[derive(Debug, Clone)]
pub struct Handle {
    pub tx: mpsc::UnboundedSender<Msg>,
    /// Evaluate now (the target, an HPA, an alert or a query result changed).
    pub poke: Arc<Notify>,
}

/// What one leadership term shares with its actors.
pub struct Term {
    /// Every HPA: a policy whose target one scales leaves the range above its minimum
    /// to it.
    pub hpas: reflector::Store<HorizontalPodAutoscaler>,
    /// No scale to zero before this: agents that heartbeat to the previous leader need
    /// one agent lease to show up here, and an empty registry would "acknowledge" a
    /// hold no agent applied.
    pub sleep_allowed_from: Instant,
    /// The shared watches of Deployments and StatefulSets (one per kind and namespace).
    pub targets: Arc<super::targets::AppsTargets>,
}

/// A wake in progress: from an agent's wake-up, or a scale from zero the policy made.
#[derive(Debug, Clone)]
struct PendingWake {
    received_at: Instant,
    at: DateTime<Utc>,
    /// Held connections reported (the wake-up's, then the largest heartbeat sum): the
    /// least the cold start held.
    held: u64,
    /// The agents' hold total this wake's count starts from.
    holds_base: u64,
    /// An agent's wake-up: the wake gate must be told when it is done.
    from_agent: bool,
    /// This wake scaled the target from zero: it is a cold start.
    woke_target: bool,
}

type AckFuture = Pin<Box<dyn Future<Output = Result<(), AckError>> + Send>>;

enum SleepPhase {
    Awake,
    /// Every live agent was asked to hold; scaling to zero waits for them all.
    Waiting {
        epoch: u64,
        requested_at: DateTime<Utc>,
        ack: AckFuture,
    },
    /// The last attempt was refused; the next waits until then.
    Backoff {
        until: Instant,
    },
}

/// The target read from the API server (see [`Actor::read_fresh`]).
struct FreshTarget {
    facts: inherited_sleep::Fresh,
    /// The `resourceVersion` its `/scale` was read at.
    version: Option<String>,
}

/// A scale as it is recorded: what, when, in which state and why.
#[derive(Debug, Clone)]
struct Made {
    from: u32,
    to: u32,
    at: DateTime<Utc>,
    state: String,
    reason: String,
    values: BTreeMap<String, f64>,
}

/// How many times a scale refused with 409 (the target changed since it was read: its
/// status, an HPA, a previous leader) is sent again from a fresh read within one
/// evaluation; past that the error waits for the next one.
const CONFLICT_RETRIES: u32 = 3;

/// A scale sent whose outcome is unknown.
#[derive(Debug, Clone)]
struct Unconfirmed(Made);

/// Whether a failed scale may still have been made: no answer, or a server-side error
/// (a 4xx refusal changed nothing).
fn outcome_unknown(e: &ReconcileError) -> bool {
    match e {
        ReconcileError::Timeout { .. } => true,
        ReconcileError::ScaleTarget { source, .. } => {
            !matches!(source, kube::Error::Api(s) if (400..500).contains(&s.code))
        }
        _ => false,
    }
}

/// What one evaluation has to say in the status.
#[derive(Debug, Default)]
struct Report {
    state: Option<(String, DateTime<Utc>)>,
    windows: Vec<(u32, DateTime<Utc>)>,
    desired: Option<u32>,
    metrics: Vec<(String, Option<f64>)>,
    blocked: Option<Blocked>,
    notes: Vec<String>,
    hpa: Option<HpaView>,
}

/// The facts about the target one evaluation used.
#[derive(Debug, Clone, Copy)]
struct Target {
    replicas: u32,
    ready: u32,
}

pub struct Actor {
    id: PolicyId,
    ctx: Arc<Context>,
    term: Arc<Term>,
    rx: mpsc::UnboundedReceiver<Msg>,
    poke: Arc<Notify>,
    obj: Arc<ScalingPolicy>,
    generation: Option<i64>,
    compiled: Result<Arc<CompiledPolicy>, InvalidPolicy>,
    /// The watch of the compiled policy's target (none while the policy is invalid).
    workload: Option<workload::Watch>,
    /// Where the target's `/scale` is, from its watch.
    resource: Option<ApiResource>,
    svc: Option<ServiceRef>,
    engine: Option<State>,
    rates: SideRates,
    poller: Option<Poller>,
    /// The failing sources at the last evaluation and how each failed (for Events).
    prom_failing: BTreeMap<usize, crate::prometheus::PromFailure>,
    last_demand: Option<DateTime<Utc>>,
    last_wake: Option<DateTime<Utc>>,
    ready_since_wake: bool,
    wake: Option<PendingWake>,
    /// Where the next cold start's held count starts.
    holds_baseline: cold_start::Baseline,
    /// A cold start that ended, waiting for the agents' count before it is reported.
    ended: Option<cold_start::Ended>,
    pending_scale: Option<(u32, Instant)>,
    /// The target's `resourceVersion` as its watch last showed it (see
    /// [`workload::Observed::version`]).
    target_version: Option<String>,
    /// The target's `metadata.generation` as its watch last showed it, noted with a
    /// `Sleep` (see [`inherited_sleep`]).
    target_generation: Option<i64>,
    /// A scale whose answer never came (a timeout, a server error): the API server may
    /// have made it. Recorded once it shows, and asked about before the next scale.
    unconfirmed: Option<Unconfirmed>,
    sleep: SleepPhase,
    /// Why the last sleep was refused (shown in status until the next one succeeds).
    sleep_note: Option<String>,
    last_transition: Option<crd::TransitionRecord>,
    /// The reason and values of the latest decision, for scale records.
    last_reason: String,
    last_values: BTreeMap<String, f64>,
    written: Option<(ScalingPolicyStatus, Instant)>,
    last_sample: Option<Instant>,
    /// The agents' refused-hold and proxy-error totals at the last sample: each sample
    /// records the rise since (`None`: the first observation is the baseline).
    proxy_seen: Option<(u64, u64)>,
    failures: u32,
    started: bool,
}

fn policy_id(p: &ScalingPolicy) -> PolicyId {
    PolicyId::new(p.namespace().unwrap_or_default(), p.name_any())
}

// === impl Actor ===

impl Actor {
    pub fn new(ctx: Arc<Context>, term: Arc<Term>, obj: Arc<ScalingPolicy>) -> (Self, Handle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let poke = Arc::new(Notify::new());
        let compiled = compile(&obj.spec).map(Arc::new);
        let rates = SideRates::new(
            compiled
                .as_ref()
                .map_or(crate::policy::compile::DEFAULT_RATE_WINDOW, |c| {
                    c.rate_window()
                }),
        );
        let actor = Self {
            id: policy_id(&obj),
            ctx,
            term,
            rx,
            poke: poke.clone(),
            generation: None,
            compiled,
            workload: None,
            resource: None,
            svc: None,
            engine: None,
            rates,
            poller: None,
            prom_failing: BTreeMap::new(),
            last_demand: None,
            last_wake: None,
            ready_since_wake: false,
            wake: None,
            holds_baseline: cold_start::Baseline::default(),
            ended: None,
            pending_scale: None,
            target_version: None,
            target_generation: None,
            unconfirmed: None,
            sleep: SleepPhase::Awake,
            sleep_note: None,
            last_transition: obj.status.as_ref().and_then(|s| s.last_transition.clone()),
            last_reason: String::new(),
            last_values: BTreeMap::new(),
            written: None,
            last_sample: None,
            proxy_seen: None,
            failures: 0,
            started: false,
            obj,
        };
        (actor, Handle { tx, poke })
    }

    /// Runs until the supervisor drops the handle (the policy was deleted). Start it
    /// only once the term's HPA cache is synced.
    pub async fn run(mut self) {
        self.adopt_spec(self.obj.clone());
        let mut next = Instant::now();
        loop {
            tokio::select! {
                m = self.rx.recv() => match m {
                    None => break,
                    Some(Msg::Spec(p)) => {
                        if !self.adopt_spec(p) {
                            continue;
                        }
                    }
                    Some(Msg::Wake(w)) => self.on_wake(w),
                },
                r = wait_ack(&mut self.sleep) => self.on_ack(r).await,
                _ = self.poke.notified() => {}
                _ = tokio::time::sleep_until(next) => {}
            }
            let wait = self.tick().await;
            next = Instant::now() + wait;
        }
        self.stop();
    }

    fn namespace(&self) -> &str {
        &self.id.namespace
    }

    // --- spec ---

    /// Takes a new version of the object; `true` when the spec changed (a new
    /// generation) and the policy must be evaluated at once.
    fn adopt_spec(&mut self, obj: Arc<ScalingPolicy>) -> bool {
        let generation = obj.metadata.generation;
        let first = !self.started;
        self.obj = obj;
        if !first && generation == self.generation {
            return false;
        }
        self.started = true;
        self.generation = generation;
        let now = Utc::now();
        if self.obj.spec.paused {
            self.pause(now);
        }
        let new = compile(&self.obj.spec).map(Arc::new);
        let old_svc = self.svc.take();
        match (&self.compiled, &new) {
            (Ok(old), Ok(n)) if !first => {
                self.engine = self.engine.as_ref().map(|s| s.carry_over(old, n, now));
            }
            _ => self.engine = None,
        }
        self.compiled = new;
        let target = self.compiled.as_ref().ok().map(|c| c.workload().clone());
        if target.as_ref() != self.workload.as_ref().map(|w| &w.target) {
            self.resource = None;
            self.pending_scale = None;
            self.workload = target.map(|t| {
                workload::Watch::start(
                    self.ctx.client.clone(),
                    self.term.targets.clone(),
                    &self.id.namespace,
                    t,
                    self.poke.clone(),
                )
            });
        }
        let paused = self.obj.spec.paused;
        match &self.compiled {
            Ok(c) => {
                // A paused policy manages no Service: wake-ups are refused as unmanaged
                // and the agents hold nothing for it (they skip paused policies too).
                self.svc = c.service().filter(|_| !paused).map(|name| ServiceRef {
                    namespace: self.id.namespace.clone(),
                    name: name.to_string(),
                });
                self.rates.set_window(c.rate_window());
                // The old poller goes first: its failing sources stop counting before
                // the new one's first queries count theirs.
                self.poller = None;
                self.prom_failing.clear();
                self.poller = (!c.sources().is_empty()).then(|| {
                    Poller::start(
                        self.id.clone(),
                        self.ctx.prom.clone(),
                        c.sources(),
                        self.poke.clone(),
                        self.ctx.metrics.clone(),
                        self.ctx.history.clone(),
                    )
                });
                tracing::info!(policy = %self.id, generation = ?generation, "policy valid; running it");
                self.ctx
                    .history
                    .signal(crate::notify::validity(self.id.clone(), None));
            }
            Err(e) => {
                self.poller = None;
                self.ctx.metrics.error(ErrorKind::InvalidPolicy);
                tracing::warn!(policy = %self.id, err = %e, "policy invalid; nothing is scaled for it");
                self.emit(true, "InvalidPolicy", "Validate", e.to_string());
                self.ctx.history.signal(crate::notify::validity(
                    self.id.clone(),
                    Some(e.to_string()),
                ));
            }
        }
        if old_svc != self.svc
            && let Some(old) = &old_svc
        {
            self.ctx.wakes.set_managed(old, false);
            self.ctx.registry.remove(old);
        }
        if let Some(svc) = &self.svc {
            self.ctx.wakes.set_managed(svc, true);
        }
        // Status is rewritten for the new generation.
        self.written = None;
        true
    }

    /// Stops acting: no wake or sleep in progress, and no engine state (a resume starts
    /// from the state the status shows, with its windows restarted).
    fn pause(&mut self, now: DateTime<Utc>) {
        if self.wake.is_some() {
            self.finish_wake(
                ColdStartOutcome::Failed {
                    message: "the policy was paused".into(),
                },
                now,
            );
        }
        self.report_cold_start(true);
        self.sleep = SleepPhase::Awake;
        self.sleep_note = None;
        self.engine = None;
        self.pending_scale = None;
        tracing::info!(policy = %self.id, "policy paused (spec.paused); it scales nothing");
    }

    // --- events from outside ---

    fn on_wake(&mut self, w: WakeUp) {
        let now = Utc::now();
        let directive = self
            .svc
            .as_ref()
            .and_then(|s| self.ctx.registry.directive(s));
        let replicas = self.target().ok().map(|t| t.replicas);
        if late_wake::already_answered(w.applied_epoch, directive.as_ref(), replicas) {
            // Still a wake in progress for the cold start's count below; only not demand.
            tracing::info!(
                policy = %self.id,
                node = %w.node,
                held = w.held_connections,
                applied_epoch = ?w.applied_epoch,
                woken_epoch = ?directive.as_ref().map(|d| d.epoch),
                "a late wake-up from before the target was woken: not new demand"
            );
        } else {
            // Demand dates from when the wake-up came in, not from when this actor got
            // to it. One that waited behind a slow call (a scale to zero whose answer is
            // lost takes the whole API timeout) is answered by the wake that follows;
            // stamped `now`, it would count as new demand in the state it woke and hold
            // the next sleep off for a whole `DEMAND_WINDOW`. Nothing genuine is lost: a
            // wake-up that came in during a sleep handshake still dates after the
            // request (`on_ack` abandons the sleep), and connections still held keep
            // signalling demand on their own.
            let waited = chrono::TimeDelta::from_std(w.received_at.elapsed()).unwrap_or_default();
            self.last_demand = Some(now - waited);
        }
        tracing::debug!(policy = %self.id, node = %w.node, held = w.held_connections, "wake-up");
        match &mut self.wake {
            Some(p) => p.held = p.held.max(u64::from(w.held_connections)),
            None => {
                let holds_base = self.new_holds_base();
                self.wake = Some(PendingWake {
                    received_at: w.received_at,
                    at: now,
                    held: u64::from(w.held_connections),
                    holds_base,
                    from_agent: true,
                    woke_target: false,
                })
            }
        }
    }

    // --- one evaluation ---

    /// Evaluates and applies; returns how long until the next evaluation at the latest.
    async fn tick(&mut self) -> Duration {
        let tick = self.ctx.settings.tick;
        self.ctx.metrics.reconciled();
        if !self.ctx.is_leading() {
            return tick;
        }
        let now = Utc::now();
        let compiled = match &self.compiled {
            Ok(c) => c.clone(),
            Err(e) => {
                let e = e.clone();
                self.write_status(Err(&e), Report::default(), now).await;
                return INVALID_RECHECK;
            }
        };

        if self.obj.spec.paused {
            let report = Report {
                blocked: Some(Blocked {
                    reason: "Paused",
                    message: PAUSED_MESSAGE.to_string(),
                }),
                ..Report::default()
            };
            self.write_status(Ok(&compiled), report, now).await;
            return INVALID_RECHECK;
        }
        let target = match self.target() {
            Ok(t) => t,
            // Not listed yet: its watch pokes as soon as it is.
            Err(None) => return tick,
            Err(Some(blocked)) => {
                let report = Report {
                    blocked: Some(blocked),
                    ..Report::default()
                };
                self.write_status(Ok(&compiled), report, now).await;
                return backoff(tick, 3);
            }
        };
        if let Some(svc) = &self.svc {
            // The Service's first directive of this term (if this instance holds none)
            // depends on where the target is.
            self.ctx.registry.open(svc, target.replicas == 0);
        }
        let hpa = hpa::find(
            self.term.hpas.state().iter().map(|h| h.as_ref()),
            self.namespace(),
            compiled.workload(),
        );
        // A scale whose answer was lost shows in the target's watch: it was made.
        if let Some(Unconfirmed(m)) = &self.unconfirmed
            && target.replicas == m.to
        {
            let m = m.clone();
            self.unconfirmed = None;
            tracing::info!(policy = %self.id, from = m.from, to = m.to, "a scale whose answer was lost was made");
            self.made(m);
        }
        if !self.ready_since_wake && self.last_wake.is_some() && target.ready > 0 {
            self.ready_since_wake = true;
        }

        let obs = self.observe(&compiled, target, now);
        let state = match self.engine.take() {
            Some(s) => s,
            None => {
                let state = self.initial_state(&compiled, target, now);
                self.recover_unrecorded_scale(&compiled, &state, target, hpa.is_some(), now);
                state
            }
        };
        let from_state = state.name(&compiled).to_string();
        let d = engine::decide(&compiled, &state, &obs, now);
        self.engine = Some(d.state.clone());
        // Beside an HPA the policy owns only zero and the wake to the HPA's minimum.
        let desired = hpa::replicas(d.desired_replicas, target.replicas, hpa.as_ref());
        // A transition starts a new state at `now`: wake-ups before it are spent (the
        // engine keeps milliseconds, so one in the same millisecond would otherwise
        // count as demand in the new state and block its next sleep for a minute).
        if d.transition.is_some() && self.last_demand.is_some_and(|t| t <= now) {
            self.last_demand = None;
        }
        let outcome = if d.transition.is_some() {
            DecisionOutcome::Transition
        } else if d.rescaled.is_some() {
            DecisionOutcome::Rescale
        } else {
            DecisionOutcome::Unchanged
        };
        self.ctx.metrics.decided(outcome);
        let values = engine::metric_values(&compiled, &obs, now);
        let reason = d.reason(&compiled);
        tracing::debug!(
            policy = %self.id,
            state = %d.state.name(&compiled),
            desired,
            replicas = target.replicas,
            ready = target.ready,
            ?values,
            %reason,
            "evaluated"
        );
        if d.transition.is_some() || d.rescaled.is_some() {
            self.last_reason = reason.clone();
            self.last_values = values
                .iter()
                .filter_map(|(n, v)| v.map(|v| (n.clone(), v)))
                .collect();
        }
        if let Some(t) = &d.transition {
            tracing::info!(policy = %self.id, from = %t.from, to = %t.to, %reason, "transition");
            self.ctx
                .history
                .record(Item::Transition(store::TransitionRecord {
                    at_ms: unix_ms(now.into()),
                    policy: self.id.clone(),
                    from_state: from_state.clone(),
                    to_state: t.to.clone(),
                    from_replicas: to_i32(target.replicas),
                    to_replicas: to_i32(desired),
                    reason: reason.clone(),
                    metrics: self.last_values.clone(),
                }));
            self.last_transition = Some(crd::TransitionRecord {
                from: t.from.clone(),
                to: t.to.clone(),
                at: now,
                reason: reason.clone(),
            });
            self.emit(false, "Transition", "Evaluate", reason.clone());
        }

        // Nothing was decided, yet the target is not where the state wants it: someone
        // scaled it (`kubectl scale`). The scale that puts it back must say so rather
        // than repeat the last transition's reason. Not while a sleep is under way: that
        // scale carries its transition's reason, and a retried scale keeps its own.
        if d.transition.is_none()
            && d.rescaled.is_none()
            && target.replicas != desired
            && matches!(self.sleep, SleepPhase::Awake)
            && self.failures == 0
        {
            self.last_reason = outside_scale_reason(
                compiled.workload(),
                target.replicas,
                d.state.name(&compiled),
                desired,
            );
        }
        let mut wait = d.requeue_after.min(tick);
        match self.apply(&compiled, desired, target, now).await {
            Ok(()) => self.failures = 0,
            Err(e) => {
                self.failures += 1;
                wait = backoff(tick, self.failures);
                tracing::warn!(policy = %self.id, err = %e, retry_in = ?wait, "applying a decision failed");
                self.emit(true, "ScaleFailed", "Scale", e.to_string());
            }
        }
        let target = self.target().unwrap_or(target);
        self.follow_wake(&compiled, target, now);
        self.report_cold_start(false);
        if d.readiness_overdue {
            tracing::warn!(policy = %self.id, "pods not ready within the readiness budget");
        }

        let mut notes = Vec::new();
        if let Some(p) = &self.poller {
            let errors = p.errors();
            for (i, e) in &errors {
                let name = compiled.sources()[*i].name.as_str();
                notes.push(format!("PromQL source `{name}` failing: {}", e.message));
            }
            self.note_prometheus(&compiled, &errors);
        }
        if let Some(n) = &self.sleep_note {
            notes.push(n.clone());
        }
        if d.hold.is_some() || d.readiness_overdue {
            notes.push(reason.clone());
        }
        let st = self
            .engine
            .as_ref()
            .map(|s| (s.name(&compiled).to_string(), s.since));
        let windows = self.engine.as_ref().map(State::windows).unwrap_or_default();
        let report = Report {
            state: st,
            windows,
            desired: Some(desired),
            metrics: values.clone(),
            blocked: None,
            notes,
            hpa,
        };
        self.write_status(Ok(&compiled), report, now).await;
        self.sample(&values, target, desired, now);
        wait
    }

    /// The target's replicas (our own recent scale wins over a lagging watch) and ready
    /// replicas; `Err(None)` while its watch has not listed it yet, `Err(Some(why))`
    /// when it cannot be used (missing, kind not served, no `/scale`, unreadable).
    fn target(&mut self) -> Result<Target, Option<Blocked>> {
        let seen = self.workload.as_ref().map_or(Seen::Unknown, |w| w.seen());
        let observed = match seen {
            Seen::Unknown => return Err(None),
            Seen::Blocked(b) => return Err(Some(b)),
            Seen::Present(o) => o,
        };
        let (cached, ready) = (observed.replicas, observed.ready);
        self.resource = Some(observed.resource);
        self.target_version = observed.version;
        self.target_generation = observed.generation;
        let replicas = match self.pending_scale {
            Some((n, _)) if n == cached => {
                self.pending_scale = None;
                cached
            }
            Some((n, at)) if at.elapsed() < PENDING_SCALE_TRUST => n,
            _ => {
                self.pending_scale = None;
                cached
            }
        };
        Ok(Target { replicas, ready })
    }

    fn observe(&mut self, c: &CompiledPolicy, target: Target, now: DateTime<Utc>) -> Observations {
        let mut obs = Observations::for_policy(c);
        obs.replicas = target.replicas;
        obs.ready_replicas = target.ready;
        if let Some(svc) = &self.svc {
            let act = self.ctx.registry.service_activity(svc, Instant::now());
            obs.connections = connections::sample(&act, &mut self.rates, now);
            match &mut self.wake {
                Some(w) => w.held = w.held.max(act.held_connections),
                None if self.ended.is_none() => self.holds_baseline.observe(&act),
                None => {}
            }
        }
        if let Some(p) = &self.poller {
            obs.sources = p.samples();
        }
        if !c.alerts().is_empty() {
            let firing = self.ctx.alerts.firing();
            for (i, name) in c.alerts().iter().enumerate() {
                obs.alerts[i] = firing.get(name).map(|a| a.since);
            }
        }
        obs.last_demand = self.last_demand;
        obs.last_wake = self.last_wake;
        obs.ready_since_wake = self.ready_since_wake;
        obs
    }

    /// Where a policy starts when this term first runs it: the state its status records
    /// (a restart or a new leader resumes), else the short form's `zero` for a target
    /// already at zero (a new policy must not wake it without demand), else the initial
    /// state. Pods still starting count as a wake in progress, so they are never put to
    /// sleep before they become ready.
    fn initial_state(&mut self, c: &CompiledPolicy, target: Target, now: DateTime<Utc>) -> State {
        if target.replicas > 0 && target.ready == 0 {
            self.last_wake = Some(now);
            self.ready_since_wake = false;
        }
        let status = self.obj.status.as_ref();
        let from_status = status.and_then(|s| {
            s.state.as_deref().map(|state| resume::FromStatus {
                state,
                since: s.state_since,
            })
        });
        let latest = self.ctx.history.latest_transition(&self.id);
        let created = self.created();
        match resume::resume_point(from_status, latest.as_ref(), created, now, |n| {
            c.state_index(n).is_some()
        }) {
            resume::Resume::Status { state: name, since } => {
                let mut state = State::resume(c, &name, since, now);
                // The windows were counted for this generation's program: an edited
                // policy numbers its clauses anew, so they restart.
                if let Some(s) = status
                    && s.observed_generation.is_some()
                    && s.observed_generation == self.generation
                {
                    let windows: Vec<_> = s.windows.iter().map(|w| (w.clause, w.since)).collect();
                    state.resume_windows(&windows, now);
                }
                return state;
            }
            resume::Resume::History { state: name, since } => {
                tracing::info!(
                    policy = %self.id,
                    state = %name,
                    status = ?status.and_then(|s| s.state.as_deref()),
                    "resuming from the history's latest transition: the status has not caught up with it"
                );
                return State::resume(c, &name, since, now);
            }
            resume::Resume::Nothing => {}
        }
        if c.is_short_form() && target.replicas == 0 && c.state_index(ZERO_STATE).is_some() {
            return State::resume(c, ZERO_STATE, now, now);
        }
        State::initial(c, now)
    }

    /// Records the change of the target that this instance's history lacks when it
    /// starts running the policy (a new term): the previous leader scaled and was killed
    /// before its record was committed. Before this term's first scale, so the history
    /// stays in order.
    fn recover_unrecorded_scale(
        &mut self,
        c: &CompiledPolicy,
        state: &State,
        target: Target,
        beside_hpa: bool,
        now: DateTime<Utc>,
    ) {
        let last = self.ctx.history.latest_scale(&self.id);
        let Some((from, to)) =
            resume::unrecorded_scale(last.as_ref(), target.replicas, beside_hpa, self.created())
        else {
            return;
        };
        let reason = format!(
            "found at {to} replicas when this leader started running the policy, while the \
             history's last scale left {from}: made by the previous leader (stopped before \
             it recorded the scale) or outside Nemesis"
        );
        tracing::info!(policy = %self.id, from, to, "recording a scale the history lacks");
        self.ctx.history.record(Item::Scale(store::ScaleRecord {
            at_ms: unix_ms(now.into()),
            policy: self.id.clone(),
            state: state.name(c).to_string(),
            from_replicas: to_i32(from),
            to_replicas: to_i32(to),
            reason,
            metrics: BTreeMap::new(),
            recovered: true,
        }));
    }

    /// When the policy object was created.
    fn created(&self) -> Option<DateTime<Utc>> {
        self.obj
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| DateTime::<Utc>::from_timestamp_millis(t.0.as_millisecond()))
    }

    // --- applying a decision ---

    /// Puts the target at `desired` (the decision's replicas, as the HPA leaves them).
    async fn apply(
        &mut self,
        c: &CompiledPolicy,
        desired: u32,
        target: Target,
        now: DateTime<Utc>,
    ) -> Result<(), ReconcileError> {
        if desired == 0 {
            if target.replicas == 0 {
                return Ok(());
            }
            let Some(svc) = self.svc.clone() else {
                // Nothing intercepts this target's traffic: there is nobody to ask.
                return self.scale(c, target.replicas, 0, now).await;
            };
            if let SleepPhase::Backoff { until } = self.sleep {
                if Instant::now() < until {
                    return Ok(());
                }
                self.sleep = SleepPhase::Awake;
            }
            if matches!(self.sleep, SleepPhase::Awake) {
                if Instant::now() < self.term.sleep_allowed_from {
                    tracing::debug!(policy = %self.id, "not sleeping yet: agents are still reporting to this new leader");
                    return Ok(());
                }
                self.request_sleep(&svc, now);
            }
            return Ok(());
        }

        if let Some(svc) = self.svc.clone() {
            if matches!(self.sleep, SleepPhase::Waiting { .. }) {
                tracing::info!(policy = %self.id, "sleep cancelled: the policy wants replicas again");
                self.emit(
                    false,
                    "SleepCancelled",
                    "Sleep",
                    format!("{} wants {desired} replicas again", self.id),
                );
            }
            self.sleep = SleepPhase::Awake;
            let mut target = target;
            let mut woken_from_zero = false;
            if target.replicas > 0
                && let Some(sleep) = self.ctx.registry.inherited_sleep(&svc)
                // Set by `target()`, which read the target this tick.
                && let Some(resource) = self.resource.clone()
            {
                // The last leader's `Sleep`, and the target up: whether it went through
                // zero since is read from the API server, not from the copy or the
                // watch (see `inherited_sleep` for why this suffices).
                let fresh = self.read_fresh(c, resource, desired).await?;
                let verdict = inherited_sleep::judge(sleep.target_generation, fresh.facts);
                tracing::info!(
                    policy = %self.id,
                    service = %svc,
                    sleep_epoch = sleep.epoch,
                    noted_generation = ?sleep.target_generation,
                    generation = ?fresh.facts.generation,
                    replicas = fresh.facts.replicas,
                    watched_replicas = target.replicas,
                    ?verdict,
                    "a Sleep inherited from the last leader, with the target up"
                );
                match verdict {
                    Verdict::AtZero => {
                        // The watch is behind: scale from the zero just read.
                        target.replicas = 0;
                        self.target_version = fresh.version;
                        self.pending_scale = None;
                    }
                    Verdict::WokenFromZero => woken_from_zero = true,
                    Verdict::GivenUp => {}
                }
            }
            if target.replicas != desired {
                self.scale(c, target.replicas, desired, now).await?;
            }
            if target.replicas == 0 || woken_from_zero {
                // Woken from zero (the scale above was conditional on the target's
                // version at zero), or found woken from zero since the last leader's
                // `Sleep`: the pods a sleep stopped may still be listed (terminating) in
                // an agent's view, and it must send them nothing. The target's zero is
                // the fact, not this instance's directive: a leader that took over after
                // the sleep completed may hold none of it, or a copy of the old leader's
                // log from before its `Sleep`.
                self.ctx.registry.follow_after_zero(&svc);
            } else if self
                .ctx
                .registry
                .directive(&svc)
                .is_some_and(|d| d.directive == Directive::Sleep)
            {
                // Not scaled to zero: the sleep is given up and its pods stay.
                self.ctx.registry.follow(&svc);
            }
            return Ok(());
        }
        if target.replicas != desired {
            self.scale(c, target.replicas, desired, now).await?;
        }
        Ok(())
    }

    fn request_sleep(&mut self, svc: &ServiceRef, now: DateTime<Utc>) {
        let epoch = self.ctx.registry.request_sleep(svc, self.target_generation);
        let registry = self.ctx.registry.clone();
        let timeout = self.ctx.settings.sleep_ack_timeout;
        let svc2 = svc.clone();
        let holds = self.ctx.hold_slices.clone();
        let policy = self.obj.clone();
        // Every agent holds first, then the hold slice goes up: only then may the
        // endpoints go, so neither a connect() nor an Ingress meets an empty Service.
        let ack: AckFuture = Box::pin(async move {
            registry.wait_acknowledged(&svc2, epoch, timeout).await?;
            holds
                .publish_held(&svc2, &policy)
                .await
                .map(drop)
                .map_err(|e| AckError::HoldSlice {
                    service: svc2.clone(),
                    reason: e.to_string(),
                })
        });
        tracing::info!(policy = %self.id, service = %svc, epoch, "asking every live agent to hold before scaling to zero");
        self.sleep = SleepPhase::Waiting {
            epoch,
            requested_at: now,
            ack,
        };
    }

    /// The agents answered (or did not): scale to zero only if every live agent holds,
    /// nothing is open or held, and no wake-up came in since the request.
    async fn on_ack(&mut self, result: Result<(), AckError>) {
        let SleepPhase::Waiting {
            epoch,
            requested_at,
            ..
        } = std::mem::replace(&mut self.sleep, SleepPhase::Awake)
        else {
            return;
        };
        let (Some(svc), Ok(c)) = (self.svc.clone(), self.compiled.clone()) else {
            return;
        };
        if !self.ctx.is_leading() {
            return;
        }
        match result {
            Ok(()) => {
                let act = self.ctx.registry.service_activity(&svc, Instant::now());
                let demand = self.last_demand.is_some_and(|t| t >= requested_at);
                let wants_zero = self.engine.as_ref().and_then(|s| s.desired) == Some(0);
                if !wants_zero {
                    self.ctx.registry.follow(&svc);
                    return;
                }
                let open = act.open_connections.max(act.accepted_open);
                if open > 0 || act.held_connections > 0 || demand {
                    let why = format!(
                        "sleep abandoned: {} open and {} held connections{} while the agents acknowledged the hold",
                        open,
                        act.held_connections,
                        if demand { " and a wake-up" } else { "" }
                    );
                    tracing::info!(policy = %self.id, epoch, %why);
                    self.emit(false, "SleepAbandoned", "Sleep", why.clone());
                    self.sleep_note = Some(why);
                    self.ctx.registry.follow(&svc);
                    return;
                }
                let Ok(target) = self.target() else {
                    return;
                };
                if target.replicas == 0 {
                    return;
                }
                let now = Utc::now();
                match self.scale(&c, target.replicas, 0, now).await {
                    Ok(()) => {
                        self.sleep_note = None;
                    }
                    Err(e) => {
                        // Agents hold while the backends still run: let them go.
                        self.ctx.registry.follow(&svc);
                        self.failures += 1;
                        self.sleep = SleepPhase::Backoff {
                            until: Instant::now() + backoff(self.ctx.settings.tick, self.failures),
                        };
                        tracing::warn!(policy = %self.id, err = %e, "scaling to zero failed");
                        self.emit(true, "ScaleFailed", "Scale", e.to_string());
                    }
                }
            }
            Err(e @ (AckError::Timeout { .. } | AckError::HoldSlice { .. })) => {
                self.ctx.metrics.error(ErrorKind::AgentAckTimeout);
                let why = format!("sleep abandoned, not scaling to zero: {e}");
                tracing::warn!(policy = %self.id, %why);
                self.emit(true, "SleepAbandoned", "Sleep", why.clone());
                self.sleep_note = Some(why);
                self.ctx.registry.follow(&svc);
                self.sleep = SleepPhase::Backoff {
                    until: Instant::now() + self.ctx.settings.sleep_ack_timeout,
                };
            }
            Err(AckError::Superseded { .. }) => {}
        }
    }

    /// Scales through the `/scale` subresource and records it.
    async fn scale(
        &mut self,
        c: &CompiledPolicy,
        from: u32,
        to: u32,
        now: DateTime<Utc>,
    ) -> Result<(), ReconcileError> {
        self.scale_conditionally(c, from, to, now, CONFLICT_RETRIES)
            .await
    }

    /// [`Self::scale`], sent again from a fresh read at most `retries` times when the
    /// target changed since it was read (see [`Self::after_conflict`]).
    async fn scale_conditionally(
        &mut self,
        c: &CompiledPolicy,
        from: u32,
        to: u32,
        now: DateTime<Utc>,
        retries: u32,
    ) -> Result<(), ReconcileError> {
        if !self.ctx.is_leading() {
            return Ok(());
        }
        let target = c.workload();
        let name = target.name.as_str();
        // Only a watched target is scaled, so its resource is known by now.
        let Some(resource) = self.resource.clone() else {
            return Ok(());
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.ctx.client.clone(), self.namespace(), &resource);
        let mut from = from;
        if let Some(Unconfirmed(lost)) = self.unconfirmed.clone() {
            // The last scale may have been made though its answer was lost, and the
            // watch may not show it yet: ask, so it is recorded once and not repeated.
            let current = self
                .read_scale(c, &api, to)
                .await?
                .spec
                .and_then(|s| s.replicas)
                .unwrap_or(0);
            let current = u32::try_from(current).unwrap_or(0);
            self.unconfirmed = None;
            if current == lost.to {
                tracing::info!(policy = %self.id, from = lost.from, to = lost.to, "a scale whose answer was lost was made");
                self.made(lost);
            }
            if current == to {
                self.pending_scale = Some((to, Instant::now()));
                return Ok(());
            }
            from = current;
        }
        let state = self
            .engine
            .as_ref()
            .map(|s| s.name(c).to_string())
            .unwrap_or_default();
        let made = Made {
            from,
            to,
            at: now,
            state,
            reason: self.last_reason.clone(),
            values: self.last_values.clone(),
        };
        // Conditional on the version `from` was read at: a previous leader's scale the
        // watch has not shown yet makes this a 409, not a second record of one change.
        let mut patch = serde_json::json!({ "spec": { "replicas": to } });
        if let Some(v) = &self.target_version {
            patch["metadata"] = serde_json::json!({ "resourceVersion": v });
        }
        let result = tokio::time::timeout(
            API_TIMEOUT,
            api.patch_scale(name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await;
        let conflict = matches!(&result, Ok(Err(kube::Error::Api(s))) if s.code == 409);
        if conflict {
            self.ctx.metrics.scale_conflict();
        }
        if conflict && retries > 0 {
            return match self.after_conflict(c, &api, to, now).await? {
                Some(current) => {
                    Box::pin(self.scale_conditionally(c, current, to, now, retries - 1)).await
                }
                None => Ok(()),
            };
        }
        let err = match result {
            Ok(Ok(_)) => None,
            Ok(Err(source)) => Some(ReconcileError::ScaleTarget {
                kind: target.kind.clone(),
                namespace: self.id.namespace.clone(),
                name: name.to_string(),
                replicas: to,
                source,
            }),
            Err(_) => Some(ReconcileError::Timeout {
                what: format!("scaling {} {}/{name}", target.kind, self.id.namespace),
                after: API_TIMEOUT,
            }),
        };
        if let Some(e) = err {
            self.ctx.metrics.error(ErrorKind::Scale);
            if outcome_unknown(&e) {
                self.unconfirmed = Some(Unconfirmed(made));
            }
            return Err(e);
        }
        self.made(made);
        Ok(())
    }

    /// The target as the API server has it now, not as a watch or cache shows it: its
    /// `/scale` (replicas, and the version a scale from them is conditional on), then
    /// the object listed by name (its generation: a list without a version is read
    /// from storage, and `list` is what the controller's role grants on targets).
    async fn read_fresh(
        &mut self,
        c: &CompiledPolicy,
        resource: ApiResource,
        to: u32,
    ) -> Result<FreshTarget, ReconcileError> {
        let target = c.workload();
        let name = target.name.as_str();
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.ctx.client.clone(), self.namespace(), &resource);
        let scale = self.read_scale(c, &api, to).await?;
        let replicas = scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0);
        let by_name = ListParams::default().fields(&format!("metadata.name={name}"));
        let listed = match tokio::time::timeout(API_TIMEOUT, api.list(&by_name)).await {
            Ok(Ok(list)) => list,
            Ok(Err(source)) => {
                self.ctx.metrics.error(ErrorKind::Scale);
                return Err(ReconcileError::ReadTarget {
                    kind: target.kind.clone(),
                    namespace: self.id.namespace.clone(),
                    name: name.to_string(),
                    source,
                });
            }
            Err(_) => {
                self.ctx.metrics.error(ErrorKind::Scale);
                return Err(ReconcileError::Timeout {
                    what: format!("listing {} {}/{name}", target.kind, self.id.namespace),
                    after: API_TIMEOUT,
                });
            }
        };
        Ok(FreshTarget {
            facts: inherited_sleep::Fresh {
                replicas: u32::try_from(replicas).unwrap_or(u32::MAX),
                generation: listed.items.first().and_then(|o| o.metadata.generation),
            },
            version: scale.metadata.resource_version,
        })
    }

    /// The target's `/scale` as the API server has it now (an error names the scale to
    /// `to` it was read for).
    async fn read_scale(
        // `&mut`: the actor is Send but not Sync, and this borrow lives across an await.
        &mut self,
        c: &CompiledPolicy,
        api: &Api<DynamicObject>,
        to: u32,
    ) -> Result<Scale, ReconcileError> {
        let target = c.workload();
        let name = target.name.as_str();
        match tokio::time::timeout(API_TIMEOUT, api.get_scale(name)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(source)) => {
                self.ctx.metrics.error(ErrorKind::Scale);
                Err(ReconcileError::ScaleTarget {
                    kind: target.kind.clone(),
                    namespace: self.id.namespace.clone(),
                    name: name.to_string(),
                    replicas: to,
                    source,
                })
            }
            Err(_) => {
                self.ctx.metrics.error(ErrorKind::Scale);
                Err(ReconcileError::Timeout {
                    what: format!(
                        "reading the scale of {} {}/{name}",
                        target.kind, self.id.namespace
                    ),
                    after: API_TIMEOUT,
                })
            }
        }
    }

    /// A scale refused because the target changed since the watch showed it (another
    /// writer: a previous leader whose scale this term's watch has not shown yet, or an
    /// HPA). Reads the target: if it is already where this scale would take it, nothing
    /// is made or recorded by this leader (a change the history lacks is recorded as
    /// recovered, as at the start of a term) and it returns None; otherwise it returns
    /// the replicas read, to send the scale again from, conditional on that version.
    async fn after_conflict(
        &mut self,
        c: &CompiledPolicy,
        api: &Api<DynamicObject>,
        to: u32,
        now: DateTime<Utc>,
    ) -> Result<Option<u32>, ReconcileError> {
        let read = self.read_scale(c, api, to).await?;
        let current = u32::try_from(read.spec.and_then(|s| s.replicas).unwrap_or(0)).unwrap_or(0);
        tracing::info!(
            policy = %self.id,
            current,
            to,
            "the target changed since its watch showed it (another writer); read it again"
        );
        self.target_version = read.metadata.resource_version;
        if current == to {
            self.pending_scale = Some((to, Instant::now()));
            if let Some(state) = self.engine.clone() {
                let hpa = hpa::find(
                    self.term.hpas.state().iter().map(|h| h.as_ref()),
                    self.namespace(),
                    c.workload(),
                );
                let seen = Target {
                    replicas: current,
                    ready: 0,
                };
                self.recover_unrecorded_scale(c, &state, seen, hpa.is_some(), now);
            }
            return Ok(None);
        }
        Ok(Some(current))
    }

    /// Everything a scale that was made changes: metrics, the wake in progress, the
    /// history record, the Event.
    fn made(&mut self, m: Made) {
        let Made {
            from,
            to,
            at: now,
            state,
            reason: why,
            values,
        } = m;
        let Ok(c) = self.compiled.clone() else {
            return;
        };
        let target = c.workload();
        let name = target.name.as_str();
        let acked = Instant::now();
        self.ctx.metrics.scaled(to_i32(from), to_i32(to));
        self.pending_scale = Some((to, acked));
        if from == 0 && to > 0 {
            self.last_wake = Some(now);
            self.ready_since_wake = false;
            match &mut self.wake {
                Some(w) if !w.woke_target => {
                    w.woke_target = true;
                    let latency = acked.saturating_duration_since(w.received_at);
                    self.ctx.metrics.observe_wake_latency(latency);
                    tracing::info!(
                        policy = %self.id,
                        replicas = to,
                        wake_latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
                        "scaled from zero on a wake-up"
                    );
                }
                Some(_) => {}
                None => {
                    let holds_base = self.new_holds_base();
                    self.wake = Some(PendingWake {
                        received_at: acked,
                        at: now,
                        held: 0,
                        holds_base,
                        from_agent: false,
                        woke_target: true,
                    })
                }
            }
        }
        tracing::info!(policy = %self.id, from, to, %state, "scaled");
        self.ctx.history.record(Item::Scale(store::ScaleRecord {
            at_ms: unix_ms(now.into()),
            policy: self.id.clone(),
            state,
            from_replicas: to_i32(from),
            to_replicas: to_i32(to),
            reason: why.clone(),
            metrics: values,
            recovered: false,
        }));
        let reason = if to == 0 {
            "ScaledToZero"
        } else if from == 0 {
            "ScaledFromZero"
        } else {
            "Scaled"
        };
        self.emit(
            false,
            reason,
            "Scale",
            format!("{} {name} scaled from {from} to {to}: {why}", target.kind),
        );
    }

    /// Ends a wake once a pod is ready, the readiness budget is spent, or (when the
    /// policy kept the target at zero) the agents' hold time is over.
    fn follow_wake(&mut self, c: &CompiledPolicy, target: Target, now: DateTime<Utc>) {
        let Some(w) = &self.wake else { return };
        let age = (now - w.at).to_std().unwrap_or_default();
        let outcome = if target.replicas > 0 && target.ready > 0 {
            Some(ColdStartOutcome::Ready)
        } else if (w.woke_target || target.replicas > 0)
            && age > c.readiness_budget().to_std().unwrap_or_default()
        {
            Some(ColdStartOutcome::Timeout)
        } else if !w.woke_target && target.replicas == 0 && age > c.hold_timeout() {
            Some(ColdStartOutcome::Failed {
                message: "the policy kept the target at zero for the whole hold time".into(),
            })
        } else {
            None
        };
        if let Some(o) = outcome {
            self.finish_wake(o, now);
        }
    }

    fn finish_wake(&mut self, outcome: ColdStartOutcome, now: DateTime<Utc>) {
        let Some(w) = self.wake.take() else { return };
        if w.from_agent
            && let Some(svc) = &self.svc
        {
            self.ctx.wakes.finished(svc);
        }
        if !w.woke_target {
            // What it held was refused, not part of the next cold start.
            if let Some(act) = self.activity() {
                self.holds_baseline.reset(&act);
            }
            return;
        }
        let time_to_ready_ms = (outcome == ColdStartOutcome::Ready)
            .then(|| u64::try_from((now - w.at).num_milliseconds().max(0)).unwrap_or(0));
        tracing::info!(policy = %self.id, ?outcome, ?time_to_ready_ms, "cold start ended");
        // At most one cold start waits for its count.
        self.report_cold_start(true);
        self.ended = Some(cold_start::Ended {
            wake_at: w.at,
            outcome,
            time_to_ready_ms,
            held_floor: w.held,
            base: w.holds_base,
            deadline: Instant::now() + cold_start::COUNT_WAIT,
        });
        self.report_cold_start(false);
    }

    /// The Event and history record of the cold start that ended, once the agents'
    /// count is in (or at once with `now_or_never`).
    fn report_cold_start(&mut self, now_or_never: bool) {
        let Some(e) = &self.ended else { return };
        let at = if now_or_never {
            e.deadline
        } else {
            Instant::now()
        };
        let act = self.activity();
        let Some(held) = e.held(act.as_ref(), at) else {
            return;
        };
        let Some(e) = self.ended.take() else { return };
        // Counted: what the agents hold from here on belongs to the next one.
        if let Some(act) = &act {
            self.holds_baseline.reset(act);
        }
        tracing::info!(policy = %self.id, outcome = ?e.outcome, held, "cold start counted");
        let warning = e.outcome != ColdStartOutcome::Ready;
        self.emit(
            warning,
            if warning {
                "ColdStartFailed"
            } else {
                "ColdStart"
            },
            "Wake",
            match e.time_to_ready_ms {
                Some(ms) => cold_start_note(ms, held),
                None => format!("no pod became ready: {:?}", e.outcome),
            },
        );
        self.ctx.history.record(Item::ColdStart(ColdStartRecord {
            wake_at_ms: unix_ms(e.wake_at.into()),
            policy: self.id.clone(),
            time_to_ready_ms: e.time_to_ready_ms,
            held_connections: held,
            outcome: e.outcome,
        }));
    }

    /// The Service's traffic over the live agents, if the policy names a Service.
    fn activity(&self) -> Option<ServiceActivity> {
        let svc = self.svc.as_ref()?;
        Some(self.ctx.registry.service_activity(svc, Instant::now()))
    }

    /// The agents' hold total a wake starting now counts from (a cold start still
    /// waiting for its count is counted first, so the two never share connections).
    fn new_holds_base(&mut self) -> u64 {
        self.report_cold_start(true);
        self.activity()
            .map_or(0, |act| self.holds_baseline.for_wake(&act))
    }

    // --- status, samples, events ---

    async fn write_status(
        &mut self,
        compiled: Result<&CompiledPolicy, &InvalidPolicy>,
        report: Report,
        now: DateTime<Utc>,
    ) {
        let previous = self
            .written
            .as_ref()
            .map(|(s, _)| s.clone())
            .or_else(|| self.obj.status.clone())
            .unwrap_or_default();
        let sources = match (compiled, &self.poller) {
            (Ok(c), Some(p)) => {
                let errors = p.errors();
                c.sources()
                    .iter()
                    .enumerate()
                    .map(|(i, s)| status::SourceHealth {
                        name: s.name.clone(),
                        fallback: s.fallback,
                        error: errors.iter().find(|(j, _)| *j == i).map(|(_, e)| e.clone()),
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let new = status::build(status::Input {
            sources,
            compiled,
            generation: self.generation,
            previous: &previous,
            state: report.state,
            windows: report.windows,
            desired: report.desired,
            last_transition: self.last_transition.clone(),
            metrics: report.metrics,
            blocked: report.blocked,
            notes: report.notes,
            target: compiled.ok().map(|c| c.workload()),
            hpa: report.hpa.as_ref(),
            now,
        });
        self.patch_status(new).await;
    }

    async fn patch_status(&mut self, new: ScalingPolicyStatus) {
        let written = self.written.as_ref().map(|(s, _)| s);
        let age = self.written.as_ref().map(|(_, at)| at.elapsed());
        if !status::worth_writing(&new, written, age, self.ctx.settings.status_interval) {
            return;
        }
        // Values-only writes share one budget across every policy (next tick retries).
        if !status::significant_change(&new, written)
            && !self.ctx.status_budget.take(std::time::Instant::now())
        {
            return;
        }
        if !self.ctx.is_leading() {
            return;
        }
        tracing::debug!(
            policy = %self.id,
            changed = ?written.map(|w| status::changed_fields(w, &new)),
            was = ?written.map(|w| w.metrics.iter().map(|m| (m.name.as_str(), m.value)).collect::<Vec<_>>()),
            now = ?new.metrics.iter().map(|m| (m.name.as_str(), m.value)).collect::<Vec<_>>(),
            "writing status"
        );
        let api: Api<ScalingPolicy> = Api::namespaced(self.ctx.client.clone(), self.namespace());
        let mut patch = serde_json::json!({ "status": new });
        // A merge patch keeps a field it does not name: an HPA that went away must be
        // cleared by name.
        if new.horizontal_pod_autoscaler.is_none() {
            patch["status"]["horizontalPodAutoscaler"] = serde_json::Value::Null;
        }
        let result = tokio::time::timeout(
            API_TIMEOUT,
            api.patch_status(
                &self.id.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .await;
        match result {
            Ok(Ok(_)) => self.written = Some((new, Instant::now())),
            Ok(Err(source)) => {
                self.ctx.metrics.error(ErrorKind::KubeApi);
                let e = ReconcileError::PatchStatus {
                    namespace: self.id.namespace.clone(),
                    name: self.id.name.clone(),
                    source,
                };
                tracing::warn!(policy = %self.id, err = %e, "status not written; retrying next tick");
            }
            Err(_) => {
                self.ctx.metrics.error(ErrorKind::KubeApi);
                tracing::warn!(policy = %self.id, after = ?API_TIMEOUT, "status write timed out");
            }
        }
    }

    fn sample(
        &mut self,
        values: &[(String, Option<f64>)],
        target: Target,
        desired: u32,
        now: DateTime<Utc>,
    ) {
        if self
            .last_sample
            .is_some_and(|t| t.elapsed() < self.ctx.settings.sample_interval)
        {
            return;
        }
        self.last_sample = Some(Instant::now());
        let mut out: Vec<(String, f64)> = values
            .iter()
            .filter_map(|(n, v)| v.map(|v| (n.clone(), v)))
            .collect();
        out.push(("nemesis.replicas".into(), f64::from(target.replicas)));
        out.push(("nemesis.replicas.ready".into(), f64::from(target.ready)));
        out.push(("nemesis.replicas.desired".into(), f64::from(desired)));
        if let Some(act) = self.activity() {
            let now_seen = (act.holds_refused_total, act.proxy_errors_total);
            // A total that went back (a new registry) counts from zero.
            let rise = |now: u64, before: u64| if now >= before { now - before } else { now };
            if let Some((refused, errors)) = self.proxy_seen {
                out.push((
                    crate::reports::HOLDS_REFUSED_SERIES.into(),
                    rise(now_seen.0, refused) as f64,
                ));
                out.push((
                    crate::reports::PROXY_ERRORS_SERIES.into(),
                    rise(now_seen.1, errors) as f64,
                ));
            }
            self.proxy_seen = Some(now_seen);
        }
        self.ctx.history.record(Item::Samples {
            at_ms: unix_ms(now.into()),
            policy: self.id.clone(),
            values: out,
        });
    }

    /// Events when a PromQL source starts failing, fails differently, or answers again:
    /// `kubectl describe` then tells the story without reading the status over time.
    fn note_prometheus(
        &mut self,
        compiled: &CompiledPolicy,
        errors: &[(usize, crate::reconcile::prom::SourceError)],
    ) {
        let now: BTreeMap<usize, crate::prometheus::PromFailure> =
            errors.iter().map(|(i, e)| (*i, e.failure)).collect();
        if now == self.prom_failing {
            return;
        }
        for (i, e) in errors {
            if self.prom_failing.get(i) == Some(&e.failure) {
                continue;
            }
            let src = &compiled.sources()[*i];
            let runs_on = match src.fallback {
                Some(f) => format!("conditions see its fallback {f}"),
                None => "no fallback: the policy holds".to_string(),
            };
            self.emit(
                true,
                "PrometheusFailing",
                "Query",
                format!(
                    "PromQL source `{}` failing ({runs_on}): {}",
                    src.name, e.message
                ),
            );
        }
        for i in self.prom_failing.keys() {
            if !now.contains_key(i)
                && let Some(src) = compiled.sources().get(*i)
            {
                self.emit(
                    false,
                    "PrometheusAnswering",
                    "Query",
                    format!("PromQL source `{}` answers again", src.name),
                );
            }
        }
        self.prom_failing = now;
    }

    fn emit(&self, warning: bool, reason: &'static str, action: &'static str, message: String) {
        self.ctx.events.emit(Note {
            regarding: self.obj.object_ref(&()),
            warning,
            reason,
            action,
            message,
        });
    }

    /// The policy is gone: stop taking its wake-ups and release its agents' directive.
    fn stop(&mut self) {
        let now = Utc::now();
        if self.wake.as_ref().is_some_and(|w| w.woke_target) {
            self.finish_wake(
                ColdStartOutcome::Failed {
                    message: "the policy was deleted".into(),
                },
                now,
            );
        }
        self.report_cold_start(true);
        if let Some(svc) = &self.svc {
            self.ctx.wakes.set_managed(svc, false);
            self.ctx.registry.remove(svc);
        }
        tracing::info!(policy = %self.id, "policy removed; no longer managed");
    }
}

async fn wait_ack(phase: &mut SleepPhase) -> Result<(), AckError> {
    match phase {
        SleepPhase::Waiting { ack, .. } => ack.as_mut().await,
        _ => std::future::pending().await,
    }
}

/// Why a target is scaled back when it was scaled outside the policy.
fn outside_scale_reason(target: &WorkloadRef, replicas: u32, state: &str, desired: u32) -> String {
    format!(
        "{} {} had {replicas} replicas, set outside the policy; state `{state}` wants {desired}",
        target.kind, target.name
    )
}

/// The `ColdStart` Event's note: `ready 205 ms after the wake, 1 connection held`.
fn cold_start_note(ms: u64, held: u64) -> String {
    let s = if held == 1 { "" } else { "s" };
    format!("ready {ms} ms after the wake, {held} connection{s} held")
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::{ReconcileError, cold_start_note, outcome_unknown};

    fn scale_error(code: u16) -> ReconcileError {
        ReconcileError::ScaleTarget {
            kind: "Deployment".into(),
            namespace: "ns".into(),
            name: "web".into(),
            replicas: 0,
            source: kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn only_a_refusal_proves_a_failed_scale_was_not_made() {
        assert!(!outcome_unknown(&scale_error(403)));
        assert!(!outcome_unknown(&scale_error(409)));
        assert!(outcome_unknown(&scale_error(500)));
        assert!(outcome_unknown(&scale_error(504)));
        assert!(outcome_unknown(&ReconcileError::Timeout {
            what: "scaling".into(),
            after: std::time::Duration::from_secs(10),
        }));
    }

    #[test]
    fn the_cold_start_note_counts_held_connections_in_words() {
        assert_eq!(
            cold_start_note(205, 1),
            "ready 205 ms after the wake, 1 connection held"
        );
        assert_eq!(
            cold_start_note(90, 0),
            "ready 90 ms after the wake, 0 connections held"
        );
        assert_eq!(
            cold_start_note(90, 3),
            "ready 90 ms after the wake, 3 connections held"
        );
    }
}
