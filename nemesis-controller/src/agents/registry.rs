//! The agents the controller has heard from (node, instance, lease), the directive for
//! each Service with its epoch, and what every agent reports having applied. Pure state
//! behind one lock, with time passed in; it never dials an agent (agents call in).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nemesis_common::wire::{
    AppliedMode, Directive, DirectivesCursor, Heartbeat, HeartbeatReply, HoldPort,
    MAX_PAGE_DIRECTIVES, ServiceDirective, ServiceRef, ServiceReport,
};
use tokio::sync::watch;
use tokio::time::Instant;

use super::directives::{DirectiveLog, ReplicaError, ReplicaPage};

/// Agents heartbeat every few seconds (and at once after a change); three missed
/// heartbeats at 5 s make an agent dead. Short enough that a dead node does not block a
/// sleep for long, long enough that one slow heartbeat is not a death.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

/// An agent silent this long is dropped from the registry (it stays listed as dead,
/// for the UI, until then).
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryConfig {
    pub lease: Duration,
    pub forget_after: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            lease: DEFAULT_LEASE,
            forget_after: DEFAULT_FORGET_AFTER,
        }
    }
}

/// An agent as the UI and the core see it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentStatus {
    pub node: String,
    pub instance: String,
    pub live: bool,
    /// Whether the agent says it is ready (only ready agents go in hold slices).
    pub ready: bool,
    /// Where its hold listeners are reachable.
    pub addresses: Vec<std::net::IpAddr>,
    pub last_heartbeat: Instant,
    pub services: Vec<ServiceReport>,
}

/// Traffic of one Service summed over the live agents: the client side (connects to its
/// ClusterIP from agent nodes) and the server side (connections its backend pods on
/// agent nodes accepted, whatever path they came by) apart, as each agent reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceActivity {
    pub open_connections: u64,
    pub held_connections: u64,
    /// Connects seen since this controller started, monotonic across agent restarts
    /// (each agent's counter is differenced), so a rate is a plain difference.
    pub connects_total: u64,
    /// Server side: accepted connections open now.
    pub accepted_open: u64,
    /// Server side: accepts seen since this controller started, differenced as
    /// `connects_total` is.
    pub accepted_total: u64,
    /// Connections taken into hold since this controller started, differenced as
    /// `connects_total`: a cold start's held count is the rise over the wake.
    pub holds_total: u64,
    /// Connections refused at a held-connection bound since this controller started,
    /// differenced as `connects_total`.
    pub holds_refused_total: u64,
    /// Errors the agents' proxies saw since this controller started (every kind),
    /// differenced as `connects_total`.
    pub proxy_errors_total: u64,
    /// Last heartbeat that showed any connect, open or held connection.
    pub last_active: Option<Instant>,
    pub reporting_agents: usize,
    /// Live agents whose last report has the Service in hold mode.
    pub holding_agents: usize,
}

/// A `Sleep` a new leader found in its copy of the last leader's directive log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InheritedSleep {
    pub epoch: u64,
    /// The target's `metadata.generation` the last leader saw when it asked for the
    /// sleep (`None`: a leader that predates the note, or a target without one).
    pub target_generation: Option<i64>,
}

/// Why waiting for acknowledgements ended without them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error(
        "agents on nodes {missing:?} did not acknowledge directive epoch {epoch} for {service} within {after:?}"
    )]
    Timeout {
        service: ServiceRef,
        epoch: u64,
        after: Duration,
        missing: Vec<String>,
    },
    #[error("directive epoch {epoch} for {service} was superseded by epoch {current:?}")]
    Superseded {
        service: ServiceRef,
        epoch: u64,
        current: Option<u64>,
    },
    #[error("the hold EndpointSlice of {service} could not be published: {reason}")]
    HoldSlice { service: ServiceRef, reason: String },
}

/// Why a standby did not take a pulled copy of the leader's directives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaApplyError {
    #[error("this instance leads: its directives are its own")]
    Leading,
    #[error(transparent)]
    Copy(#[from] ReplicaError),
}

#[derive(Debug)]
struct AgentEntry {
    instance: String,
    last_heartbeat: Instant,
    reports: BTreeMap<ServiceRef, ServiceReport>,
    /// The number the agent gave these reports (its next delta names it).
    reports_seq: Option<u64>,
    ready: bool,
    addresses: Vec<std::net::IpAddr>,
}

impl AgentEntry {
    fn live_at(&self, now: Instant, lease: Duration) -> bool {
        now.saturating_duration_since(self.last_heartbeat) <= lease
    }
}

#[derive(Debug, Default)]
struct Counters {
    connects_total: u64,
    accepted_total: u64,
    holds_total: u64,
    holds_refused_total: u64,
    proxy_errors_total: u64,
    last_active: Option<Instant>,
}

/// How much of an agent's monotonic `total` is new since its last report: all of it
/// after a restart or for a Service new to a known agent, none on the first report this
/// controller gets from the agent (a baseline, not a burst).
fn new_since(now_total: u64, last: Option<u64>, same_instance: bool, known_agent: bool) -> u64 {
    match (last, same_instance, known_agent) {
        (Some(old), true, _) if now_total >= old => now_total - old,
        // Same process but the counter went back (map recreated), or a restarted agent.
        (Some(_), _, _) | (None, _, true) => now_total,
        (None, _, false) => 0,
    }
}

/// What the reports of live agents add up to for one Service: the part of
/// [`ServiceActivity`] that depends on which agents are live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LiveSums {
    open_connections: u64,
    accepted_open: u64,
    held_connections: u64,
    reporting_agents: usize,
    holding_agents: usize,
}

impl LiveSums {
    fn of(r: &ServiceReport) -> Self {
        Self {
            open_connections: r.open_connections,
            accepted_open: r.accepted_open,
            held_connections: r.held_connections,
            reporting_agents: 1,
            holding_agents: usize::from(r.mode == AppliedMode::Hold),
        }
    }

    fn add(&mut self, o: Self) {
        self.open_connections += o.open_connections;
        self.accepted_open += o.accepted_open;
        self.held_connections += o.held_connections;
        self.reporting_agents += o.reporting_agents;
        self.holding_agents += o.holding_agents;
    }

    /// Takes back what [`LiveSums::add`] added (never more: saturating only guards).
    fn sub(&mut self, o: Self) {
        self.open_connections = self.open_connections.saturating_sub(o.open_connections);
        self.accepted_open = self.accepted_open.saturating_sub(o.accepted_open);
        self.held_connections = self.held_connections.saturating_sub(o.held_connections);
        self.reporting_agents = self.reporting_agents.saturating_sub(o.reporting_agents);
        self.holding_agents = self.holding_agents.saturating_sub(o.holding_agents);
    }
}

#[derive(Debug)]
struct Inner {
    agents: BTreeMap<String, AgentEntry>,
    directives: DirectiveLog,
    last_epoch: u64,
    counters: BTreeMap<ServiceRef, Counters>,
    /// Every agent by its last heartbeat, oldest first: forgetting silent agents takes
    /// the front instead of walking all of them on every heartbeat.
    by_heartbeat: BTreeSet<(Instant, String)>,
    /// The agents whose reports are in `live_sums`, by last heartbeat: those whose lease
    /// ran out are taken off the front (see [`Inner::sweep`]).
    counted: BTreeSet<(Instant, String)>,
    /// Per Service, the sums over the `counted` agents' reports, kept up to date on
    /// every heartbeat: every policy reads its Service's activity every tick, and
    /// walking 1,000 agents for each of 10,000 policies every second under this lock
    /// is what a sum per Service avoids.
    live_sums: HashMap<ServiceRef, LiveSums>,
    /// The latest time `counted` was swept to: a query for an earlier moment (only
    /// tests ask one) cannot use the sums and walks the agents instead.
    swept_to: Option<Instant>,
    /// A leadership term began here and has not ended: the directives are this
    /// instance's to write, and no copy of another leader's may replace them.
    leading: bool,
    /// Bumped whenever an agent enters the live set (registers, restarts, or comes back
    /// after its lease ran out): acknowledgement waiters walk every agent only then.
    joined: u64,
    /// The term this instance leads (or led last), and the Services whose directive it
    /// wrote in that term. The others it holds were inherited from its copy of the last
    /// leader's log, which may be behind what that leader sent the agents.
    term: Option<u64>,
    written_in_term: HashSet<ServiceRef>,
    /// Hold ports assigned to Services that have no directive yet: a Service's first
    /// directive of a term waits until its policy has read the target (see
    /// [`AgentRegistry::open`]).
    early_hold_ports: HashMap<ServiceRef, Vec<HoldPort>>,
}

impl Inner {
    fn add_sums(&mut self, reports: &BTreeMap<ServiceRef, ServiceReport>) {
        for (svc, r) in reports {
            self.live_sums
                .entry(svc.clone())
                .or_default()
                .add(LiveSums::of(r));
        }
    }

    fn sub_sums(
        live_sums: &mut HashMap<ServiceRef, LiveSums>,
        reports: &BTreeMap<ServiceRef, ServiceReport>,
    ) {
        for (svc, r) in reports {
            if let Some(s) = live_sums.get_mut(svc) {
                s.sub(LiveSums::of(r));
                if s.reporting_agents == 0 {
                    live_sums.remove(svc);
                }
            }
        }
    }

    /// Takes an agent out, with its part of the indexes and sums.
    fn remove_agent(&mut self, node: &str) -> Option<AgentEntry> {
        let a = self.agents.remove(node)?;
        let key = (a.last_heartbeat, node.to_string());
        self.by_heartbeat.remove(&key);
        if self.counted.remove(&key) {
            Self::sub_sums(&mut self.live_sums, &a.reports);
        }
        Some(a)
    }

    /// Puts a live agent in, counted in the sums.
    fn insert_agent(&mut self, node: String, a: AgentEntry) {
        self.by_heartbeat.insert((a.last_heartbeat, node.clone()));
        self.counted.insert((a.last_heartbeat, node.clone()));
        self.add_sums(&a.reports);
        self.agents.insert(node, a);
    }

    /// Drops agents silent for longer than `forget_after`.
    fn forget_silent(&mut self, now: Instant, forget_after: Duration) {
        let Some(cutoff) = now.checked_sub(forget_after) else {
            return;
        };
        while let Some((at, node)) = self.by_heartbeat.first().cloned()
            && at < cutoff
        {
            self.remove_agent(&node);
        }
    }

    /// Takes the agents whose lease ran out by `now` out of the sums.
    fn sweep(&mut self, now: Instant, lease: Duration) {
        self.swept_to = Some(self.swept_to.map_or(now, |t| t.max(now)));
        let Some(cutoff) = now.checked_sub(lease) else {
            return;
        };
        while let Some((at, node)) = self.counted.first().cloned()
            && at < cutoff
        {
            self.counted.remove(&(at, node.clone()));
            if let Some(a) = self.agents.get(&node) {
                Self::sub_sums(&mut self.live_sums, &a.reports);
            }
        }
    }
}

#[derive(Debug)]
pub struct AgentRegistry {
    config: RegistryConfig,
    inner: Mutex<Inner>,
    /// Bumped on every heartbeat and directive change; waiters re-check on it.
    changed: watch::Sender<u64>,
    /// Balance mode's per-backend load reports (apart from the heartbeats' state).
    loads: super::loads::LoadBoard,
    /// Bumped only when what hold EndpointSlices show may have changed: an agent came,
    /// restarted, changed readiness, addresses or hold listeners, or a directive changed.
    /// At 1,000 agents heartbeats arrive 200 times a second; a steady one changes none
    /// of this.
    topology: watch::Sender<u64>,
}

// === impl AgentRegistry ===

impl AgentRegistry {
    pub fn new(config: RegistryConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner {
                agents: BTreeMap::new(),
                // Random per process: a restarted or new leader never patches an agent's
                // copy with its own versions.
                directives: DirectiveLog::new(rand::random()),
                last_epoch: 0,
                counters: BTreeMap::new(),
                by_heartbeat: BTreeSet::new(),
                counted: BTreeSet::new(),
                live_sums: HashMap::new(),
                swept_to: None,
                leading: false,
                joined: 0,
                term: None,
                written_in_term: HashSet::new(),
                early_hold_ports: HashMap::new(),
            }),
            changed: watch::channel(0).0,
            loads: super::loads::LoadBoard::default(),
            topology: watch::channel(0).0,
        }
    }

    /// Balance mode's cluster-wide load (see [`super::loads`]).
    pub fn loads(&self) -> &super::loads::LoadBoard {
        &self.loads
    }

    pub fn config(&self) -> RegistryConfig {
        self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A directive or an agent's slice-visible state changed.
    fn notify_topology(&self) {
        self.notify();
        self.topology.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn is_live(&self, a: &AgentEntry, now: Instant) -> bool {
        now.saturating_duration_since(a.last_heartbeat) <= self.config.lease
    }

    /// Registers or refreshes an agent and returns the directives it must apply: those
    /// changed since the heartbeat's cursor, or all of them, in pages to agents that take
    /// them (see [`DirectiveLog::since`]). A report delta is recorded only onto exactly
    /// the reports it was made against; otherwise the agent is left as it was and the
    /// reply, without `reports_seq`, asks for every report.
    pub fn heartbeat(&self, hb: Heartbeat, now: Instant) -> HeartbeatReply {
        let forget_after = self.config.forget_after;
        let mut topology_changed = false;
        let reply = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            inner.forget_silent(now, forget_after);
            let page = hb.pages.then_some(MAX_PAGE_DIRECTIVES);
            let changes = inner.directives.since(hb.directives_cursor, page);
            let base_held = hb.reports_since.is_none_or(|since| {
                inner
                    .agents
                    .get(&hb.node)
                    .is_some_and(|a| a.instance == hb.instance && a.reports_seq == Some(since))
            });
            let reports_seq = if base_held {
                let seq = hb.reports_seq;
                topology_changed = Self::record(inner, hb, now, self.config.lease);
                seq
            } else {
                tracing::debug!(node = %hb.node, "a report delta against reports not held: asking for all");
                None
            };
            HeartbeatReply {
                directives: changes.directives,
                lease_seconds: u32::try_from(self.config.lease.as_secs()).unwrap_or(u32::MAX),
                cursor: Some(changes.cursor),
                delta: changes.delta,
                removed: changes.removed,
                more: changes.more,
                reports_seq,
            }
        };
        if topology_changed {
            self.notify_topology();
        } else {
            self.notify();
        }
        reply
    }

    /// Records a heartbeat's reports: all of them, or a delta onto the agent's held
    /// reports (the caller checked they are the ones it was made against). True when
    /// what hold EndpointSlices show may have changed.
    fn record(inner: &mut Inner, hb: Heartbeat, now: Instant, lease: Duration) -> bool {
        let Heartbeat {
            node,
            instance,
            services,
            addresses,
            ready,
            reports_seq,
            reports_since,
            gone,
            ..
        } = hb;
        let mut prev = inner.remove_agent(&node);
        match &prev {
            None => {
                tracing::info!(node = %node, instance = %instance, "agent registered")
            }
            Some(p) if p.instance != instance => tracing::info!(
                node = %node, old = %p.instance, new = %instance, "agent restarted"
            ),
            Some(p) if !p.live_at(now, lease) => tracing::warn!(
                node = %node,
                silent_ms = now.saturating_duration_since(p.last_heartbeat).as_millis() as u64,
                lease_ms = lease.as_millis() as u64,
                "agent heard from again after its lease ran out (it was counted as gone meanwhile)"
            ),
            Some(_) => {}
        }
        let delta = reports_since.is_some();
        let known = prev.is_some();
        // A delta patches the held reports; a full report replaces them.
        let mut reports = match (&mut prev, delta) {
            (Some(p), true) => std::mem::take(&mut p.reports),
            _ => BTreeMap::new(),
        };
        let same_instance = prev.as_ref().filter(|p| p.instance == instance);
        let mut hold_changed = false;
        for svc in &gone {
            hold_changed |= reports.remove(svc).is_some();
        }
        for r in services {
            // Epochs must keep rising across controller restarts: never hand out an
            // epoch at or below one an agent has already applied.
            inner.last_epoch = inner.last_epoch.max(r.applied_epoch);
            let old = if delta {
                reports.get(&r.service)
            } else {
                same_instance.and_then(|p| p.reports.get(&r.service))
            };
            let same = old.is_some();
            let connects = new_since(r.connects_total, old.map(|o| o.connects_total), same, known);
            let accepts = new_since(r.accepted_total, old.map(|o| o.accepted_total), same, known);
            let holds = new_since(r.holds_total, old.map(|o| o.holds_total), same, known);
            let refused = new_since(
                r.holds_refused_total,
                old.map(|o| o.holds_refused_total),
                same,
                known,
            );
            let errors = new_since(
                r.proxy_errors.total(),
                old.map(|o| o.proxy_errors.total()),
                same,
                known,
            );
            hold_changed |= delta && old.is_none_or(|o| o.hold_ports != r.hold_ports);
            let c = inner.counters.entry(r.service.clone()).or_default();
            c.connects_total += connects;
            c.accepted_total += accepts;
            c.holds_total += holds;
            c.holds_refused_total += refused;
            c.proxy_errors_total += errors;
            if connects > 0 || accepts > 0 || r.is_active() {
                c.last_active = Some(now);
            }
            reports.insert(r.service.clone(), r);
        }
        if delta {
            // Agents send every active report in each delta; one kept from before that
            // shows connections still counts as activity now.
            for r in reports.values().filter(|r| r.is_active()) {
                if let Some(c) = inner.counters.get_mut(&r.service) {
                    c.last_active = Some(now);
                }
            }
        }
        if prev
            .as_ref()
            .is_none_or(|p| p.instance != instance || !p.live_at(now, lease))
        {
            inner.joined = inner.joined.wrapping_add(1);
        }
        let topology_changed = match &prev {
            None => true,
            Some(p) => {
                p.instance != instance
                    || p.ready != ready
                    || p.addresses != addresses
                    || !p.live_at(now, lease)
                    || if delta {
                        hold_changed
                    } else {
                        p.reports.len() != reports.len()
                            || reports.iter().any(|(svc, r)| {
                                p.reports
                                    .get(svc)
                                    .is_none_or(|o| o.hold_ports != r.hold_ports)
                            })
                    }
            }
        };
        inner.insert_agent(
            node,
            AgentEntry {
                instance,
                last_heartbeat: now,
                reports,
                reports_seq,
                ready,
                addresses,
            },
        );
        topology_changed
    }

    fn next_epoch(inner: &mut Inner) -> u64 {
        // Wall-clock microseconds as a floor keep epochs rising across controller
        // restarts even before any agent reported its applied epoch.
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        inner.last_epoch = (inner.last_epoch + 1).max(wall);
        inner.last_epoch
    }

    /// Sets `svc`'s directive, with `target_generation` noted in the log (see
    /// [`DirectiveLog::set_noted`]); the same one again keeps its epoch (and note),
    /// unless `renew_inherited` and it was inherited (not written in this term).
    fn set(
        &self,
        svc: &ServiceRef,
        directive: Directive,
        after_zero: bool,
        renew_inherited: bool,
        target_generation: Option<i64>,
    ) -> u64 {
        let (epoch, changed) = {
            let mut inner = self.lock();
            let inherited = !inner.written_in_term.contains(svc);
            match inner.directives.get(svc) {
                Some(d)
                    if d.directive == directive
                        && d.after_zero == after_zero
                        && !(renew_inherited && inherited) =>
                {
                    (d.epoch, false)
                }
                _ => {
                    let epoch = Self::next_epoch(&mut inner);
                    let hold_ports = inner
                        .directives
                        .get(svc)
                        .map(|d| d.hold_ports.clone())
                        .unwrap_or_default();
                    inner.directives.set_noted(
                        ServiceDirective {
                            service: svc.clone(),
                            directive,
                            epoch,
                            hold_ports,
                            after_zero,
                        },
                        target_generation,
                    );
                    inner.written_in_term.insert(svc.clone());
                    (epoch, true)
                }
            }
        };
        if changed {
            tracing::info!(service = %svc, ?directive, after_zero, epoch, "service directive changed");
            self.notify_topology();
        }
        epoch
    }

    /// Asks every agent to hold new connections of `svc` (before a scale to zero).
    /// Returns the epoch to wait for; asking again while already asked returns the same.
    /// `target_generation`: the target's `metadata.generation` as the caller sees it,
    /// kept with the `Sleep` for a leader that inherits it (see [`InheritedSleep`]).
    pub fn request_sleep(&self, svc: &ServiceRef, target_generation: Option<i64>) -> u64 {
        self.set(svc, Directive::Sleep, false, false, target_generation)
    }

    /// Back to the agents' own rule for `svc` (hold at zero, direct when warm): a sleep
    /// given up, whose backends stay.
    pub fn follow(&self, svc: &ServiceRef) -> u64 {
        self.set(svc, Directive::Follow, false, false, None)
    }

    /// `svc`'s directive if it is a `Sleep` this instance did not write in its term:
    /// the last leader's, from the copy of its log (which may be behind what that leader
    /// did next), with the target's generation it was asked at.
    pub fn inherited_sleep(&self, svc: &ServiceRef) -> Option<InheritedSleep> {
        let inner = self.lock();
        let d = inner.directives.get(svc)?;
        (d.directive == Directive::Sleep && !inner.written_in_term.contains(svc)).then(|| {
            InheritedSleep {
                epoch: d.epoch,
                target_generation: inner.directives.target_generation(svc),
            }
        })
    }

    /// [`Self::follow`] when `svc` is woken from zero (its target was at zero: a sleep
    /// completed, or it was scaled down otherwise): agents send nothing to the backends
    /// they listed during a sleep (stopped by the scale, whatever their view of the
    /// endpoints still says). A directive inherited from the last leader gets a new
    /// epoch even when it is this one: the copy it came from may be behind what that
    /// leader sent (a `Sleep` with a higher epoch, which agents would keep).
    pub fn follow_after_zero(&self, svc: &ServiceRef) -> u64 {
        self.set(svc, Directive::Follow, true, true, None)
    }

    /// The first directive of `svc` in this term, once its policy has read the target
    /// (`at_zero`: its replicas are 0); nothing when one is held already (this term's, or
    /// the last leader's from the copy). Otherwise a `Follow`, and after zero when the
    /// target is at zero: this instance holds nothing of an earlier leader's directives
    /// (it started after that leader stopped, or its copy never came), and that leader
    /// may have put the Service to sleep and scaled it down. Agents still holding that
    /// `Sleep` then keep its stopping pods apart until they are gone; a plain `Follow`
    /// would end the sleep for them as if its pods stayed.
    pub fn open(&self, svc: &ServiceRef, at_zero: bool) {
        let opened = {
            let mut inner = self.lock();
            if inner.directives.get(svc).is_some() {
                None
            } else {
                let epoch = Self::next_epoch(&mut inner);
                let hold_ports = inner.early_hold_ports.remove(svc).unwrap_or_default();
                inner.directives.set(ServiceDirective {
                    service: svc.clone(),
                    directive: Directive::Follow,
                    epoch,
                    hold_ports,
                    after_zero: at_zero,
                });
                inner.written_in_term.insert(svc.clone());
                Some(epoch)
            }
        };
        if let Some(epoch) = opened {
            tracing::info!(service = %svc, after_zero = at_zero, epoch, "first directive of the term");
            self.notify_topology();
        }
    }

    /// The hold ports every agent must listen on for `svc`, sent with its directive
    /// (kept until [`Self::open`] when it has none yet).
    pub fn set_hold_ports(&self, svc: &ServiceRef, ports: Vec<HoldPort>) {
        let changed = {
            let mut inner = self.lock();
            match inner.directives.get(svc) {
                Some(d) if d.hold_ports == ports => false,
                Some(d) => {
                    let d = ServiceDirective {
                        hold_ports: ports,
                        ..d.clone()
                    };
                    inner.directives.set(d);
                    true
                }
                None => {
                    inner.early_hold_ports.insert(svc.clone(), ports);
                    false
                }
            }
        };
        if changed {
            self.notify_topology();
        }
    }

    /// This instance leads from now on, in the Lease's term `term` (its
    /// `leaseTransitions`): it goes on writing the directives it holds, a copy of the
    /// last leader's or its own (see [`DirectiveLog::begin_term`]), so agents keep their
    /// cursors. Call before anything writes a directive in the term.
    pub fn begin_term(&self, term: u64) {
        let (cursor, held) = {
            let mut inner = self.lock();
            inner.leading = true;
            inner.directives.begin_term(term);
            if inner.term != Some(term) {
                inner.term = Some(term);
                inner.written_in_term.clear();
            }
            (inner.directives.cursor(), inner.directives.len())
        };
        tracing::info!(
            term,
            stream = cursor.stream,
            version = cursor.version,
            directives = held,
            "leading on from the directives held"
        );
    }

    /// The term ended: a copy of the next leader's directives may replace these.
    pub fn end_term(&self) {
        self.lock().leading = false;
    }

    /// Where this instance's directives stand (a standby pulls from here).
    pub fn directives_cursor(&self) -> DirectivesCursor {
        self.lock().directives.cursor()
    }

    /// A page of the directive log for a standby at `since` (see
    /// [`DirectiveLog::replica_page`]).
    pub fn replica_page(&self, since: Option<DirectivesCursor>, size: usize) -> ReplicaPage {
        self.lock().directives.replica_page(since, size)
    }

    /// Takes a complete run of pages pulled from the leader, asked from `from`, as this
    /// standby's directives (see [`DirectiveLog::apply_replica`]). Refused while this
    /// instance leads. Returns how many changes it took.
    pub fn apply_replica(
        &self,
        from: DirectivesCursor,
        pages: &[ReplicaPage],
    ) -> Result<usize, ReplicaApplyError> {
        let taken = {
            let mut inner = self.lock();
            if inner.leading {
                return Err(ReplicaApplyError::Leading);
            }
            let taken = inner.directives.apply_replica(Some(from), pages)?;
            // The leader's epochs are the floor for this instance's own, should it lead.
            let highest = inner.directives.iter().map(|d| d.epoch).max().unwrap_or(0);
            inner.last_epoch = inner.last_epoch.max(highest);
            taken
        };
        if taken > 0 {
            self.notify_topology();
        }
        Ok(taken)
    }

    /// Drops every directive whose Service `keep` does not name (a new leader's copy may
    /// hold Services whose policy went while no one led). Returns how many went.
    pub fn retain_directives(&self, keep: impl Fn(&ServiceRef) -> bool) -> usize {
        let gone = {
            let mut inner = self.lock();
            let drop: Vec<ServiceRef> = inner
                .directives
                .iter()
                .filter(|d| !keep(&d.service))
                .map(|d| d.service.clone())
                .collect();
            for svc in &drop {
                inner.directives.remove(svc);
            }
            drop.len()
        };
        if gone > 0 {
            self.notify_topology();
        }
        gone
    }

    /// A receiver that changes on every heartbeat and directive change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A receiver that changes when an agent's identity, readiness, addresses or hold
    /// listeners change, or a directive does (not on heartbeats that only refresh).
    pub fn subscribe_topology(&self) -> watch::Receiver<u64> {
        self.topology.subscribe()
    }

    /// Drops the directive of a Service no policy manages any more.
    pub fn remove(&self, svc: &ServiceRef) {
        let removed = {
            let mut inner = self.lock();
            inner.early_hold_ports.remove(svc);
            inner.directives.remove(svc)
        };
        if removed {
            self.notify_topology();
        }
    }

    pub fn directive(&self, svc: &ServiceRef) -> Option<ServiceDirective> {
        self.lock().directives.get(svc).cloned()
    }

    /// Every directive (what a heartbeat without a cursor gets), by Service.
    pub fn directives(&self) -> Vec<ServiceDirective> {
        self.lock().directives.since(None, None).directives
    }

    /// Nodes of live agents that have not applied `epoch` (or later) for `svc`.
    pub fn unacknowledged(&self, svc: &ServiceRef, epoch: u64, now: Instant) -> Vec<String> {
        let inner = self.lock();
        inner
            .agents
            .iter()
            .filter(|(_, a)| self.is_live(a, now))
            .filter(|(_, a)| a.reports.get(svc).is_none_or(|r| r.applied_epoch < epoch))
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// True when `epoch` is still the current directive for `svc` and every live agent
    /// has applied it. With no live agent at all this is (vacuously) true: check
    /// [`AgentRegistry::live_count`] if that matters.
    pub fn all_live_acknowledged(&self, svc: &ServiceRef, epoch: u64, now: Instant) -> bool {
        self.current_epoch(svc) == Some(epoch) && self.unacknowledged(svc, epoch, now).is_empty()
    }

    fn current_epoch(&self, svc: &ServiceRef) -> Option<u64> {
        self.lock().directives.get(svc).map(|d| d.epoch)
    }

    /// Waits until [`AgentRegistry::all_live_acknowledged`] holds, re-checking on every
    /// heartbeat and when a lease runs out. Fails at `timeout`, or at once when the
    /// directive changes to another epoch.
    pub async fn wait_acknowledged(
        &self,
        svc: &ServiceRef,
        epoch: u64,
        timeout: Duration,
    ) -> Result<(), AckError> {
        let deadline = Instant::now() + timeout;
        let mut changed = self.changed.subscribe();
        let mut last = None;
        loop {
            changed.borrow_and_update();
            let now = Instant::now();
            let (current, missing) = self.still_unacknowledged(svc, epoch, now, &mut last);
            if current != Some(epoch) {
                return Err(AckError::Superseded {
                    service: svc.clone(),
                    epoch,
                    current,
                });
            }
            if missing.is_empty() {
                return Ok(());
            }
            if now >= deadline {
                return Err(AckError::Timeout {
                    service: svc.clone(),
                    epoch,
                    after: timeout,
                    missing,
                });
            }
            // A missing agent may also stop counting by its lease running out.
            let wake_at = self
                .next_lease_expiry(&missing)
                .map_or(deadline, |t| t.min(deadline));
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    /// The current epoch of `svc` and [`AgentRegistry::unacknowledged`], for a waiter
    /// that re-checks on every heartbeat: every heartbeat of 1,000 agents wakes every
    /// waiter, so it re-checks only the nodes missing at its last check (`last`) unless
    /// an agent joined the live set since, and walks every agent again before it says
    /// none is missing (an agent may have dropped the Service's report meanwhile).
    fn still_unacknowledged(
        &self,
        svc: &ServiceRef,
        epoch: u64,
        now: Instant,
        last: &mut Option<(u64, Vec<String>)>,
    ) -> (Option<u64>, Vec<String>) {
        let inner = self.lock();
        let current = inner.directives.get(svc).map(|d| d.epoch);
        let missing = |a: &AgentEntry| {
            self.is_live(a, now) && a.reports.get(svc).is_none_or(|r| r.applied_epoch < epoch)
        };
        let walk = || -> Vec<String> {
            inner
                .agents
                .iter()
                .filter(|(_, a)| missing(a))
                .map(|(node, _)| node.clone())
                .collect()
        };
        let nodes = match last.take() {
            Some((joined, before)) if joined == inner.joined => {
                let left: Vec<String> = before
                    .into_iter()
                    .filter(|n| inner.agents.get(n).is_some_and(missing))
                    .collect();
                if left.is_empty() { walk() } else { left }
            }
            _ => walk(),
        };
        *last = Some((inner.joined, nodes.clone()));
        (current, nodes)
    }

    fn next_lease_expiry(&self, nodes: &[String]) -> Option<Instant> {
        let inner = self.lock();
        nodes
            .iter()
            .filter_map(|n| inner.agents.get(n))
            // Just past the lease, so the re-check sees the agent dead.
            .map(|a| a.last_heartbeat + self.config.lease + Duration::from_millis(1))
            .min()
    }

    pub fn live_count(&self, now: Instant) -> usize {
        let inner = self.lock();
        inner
            .agents
            .values()
            .filter(|a| self.is_live(a, now))
            .count()
    }

    pub fn agents(&self, now: Instant) -> Vec<AgentStatus> {
        let inner = self.lock();
        inner
            .agents
            .iter()
            .map(|(node, a)| AgentStatus {
                node: node.clone(),
                instance: a.instance.clone(),
                live: self.is_live(a, now),
                ready: a.ready,
                addresses: a.addresses.clone(),
                last_heartbeat: a.last_heartbeat,
                services: a.reports.values().cloned().collect(),
            })
            .collect()
    }

    /// Traffic of `svc` over the live agents.
    pub fn service_activity(&self, svc: &ServiceRef, now: Instant) -> ServiceActivity {
        let mut inner = self.lock();
        let mut act = ServiceActivity::default();
        if let Some(c) = inner.counters.get(svc) {
            act.connects_total = c.connects_total;
            act.accepted_total = c.accepted_total;
            act.holds_total = c.holds_total;
            act.holds_refused_total = c.holds_refused_total;
            act.proxy_errors_total = c.proxy_errors_total;
            act.last_active = c.last_active;
        }
        inner.sweep(now, self.config.lease);
        let live = if inner.swept_to.is_some_and(|t| t <= now) {
            inner.live_sums.get(svc).copied().unwrap_or_default()
        } else {
            // A moment before the last sweep: the sums are ahead of it.
            let mut live = LiveSums::default();
            for a in inner.agents.values().filter(|a| self.is_live(a, now)) {
                if let Some(r) = a.reports.get(svc) {
                    live.add(LiveSums::of(r));
                }
            }
            live
        };
        act.open_connections = live.open_connections;
        act.accepted_open = live.accepted_open;
        act.held_connections = live.held_connections;
        act.reporting_agents = live.reporting_agents;
        act.holding_agents = live.holding_agents;
        act
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> ServiceRef {
        ServiceRef {
            namespace: "ns".into(),
            name: "web".into(),
        }
    }

    fn report(applied_epoch: u64, connects_total: u64, open: u64) -> ServiceReport {
        ServiceReport {
            service: svc(),
            mode: AppliedMode::Passthrough,
            applied_epoch,
            connects_total,
            open_connections: open,
            closed_total: 0,
            held_connections: 0,
            accepted_total: 0,
            accepted_open: 0,
            hold_ports: vec![],
            holds_total: 0,
            holds_refused_total: 0,
            proxy_errors: Default::default(),
        }
    }

    fn hb(node: &str, instance: &str, services: Vec<ServiceReport>) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            instance: instance.into(),
            services,
            addresses: vec![],
            ready: true,
            directives_cursor: None,
            pages: false,
            reports_seq: None,
            reports_since: None,
            gone: vec![],
        }
    }

    fn named(name: &str, connects_total: u64, open: u64) -> ServiceReport {
        ServiceReport {
            service: ServiceRef {
                namespace: "ns".into(),
                name: name.into(),
            },
            ..report(0, connects_total, open)
        }
    }

    fn held_reports(r: &AgentRegistry, node: &str, now: Instant) -> Vec<ServiceReport> {
        r.agents(now)
            .into_iter()
            .find(|a| a.node == node)
            .map(|a| a.services)
            .unwrap_or_default()
    }

    #[test]
    fn report_deltas_patch_the_held_reports_and_others_ask_for_all() {
        let r = AgentRegistry::new(RegistryConfig::default());
        let t0 = Instant::now();
        let beat = |seq, since, services, gone| Heartbeat {
            reports_seq: Some(seq),
            reports_since: since,
            gone,
            ..hb("a", "1", services)
        };
        let reply = r.heartbeat(
            beat(
                1,
                None,
                vec![named("api", 0, 0), named("web", 10, 0)],
                vec![],
            ),
            t0,
        );
        assert_eq!(reply.reports_seq, Some(1));
        // Only web changed: api is kept as it was, web's connects are differenced.
        let t1 = t0 + Duration::from_secs(5);
        let reply = r.heartbeat(beat(2, Some(1), vec![named("web", 15, 0)], vec![]), t1);
        assert_eq!(reply.reports_seq, Some(2));
        assert_eq!(
            held_reports(&r, "a", t1),
            vec![named("api", 0, 0), named("web", 15, 0)]
        );
        assert_eq!(
            r.service_activity(&named("web", 0, 0).service, t1)
                .connects_total,
            5
        );
        // api is gone; web keeps an open connection, sent again unchanged.
        let t2 = t1 + Duration::from_secs(5);
        let gone = vec![named("api", 0, 0).service];
        r.heartbeat(beat(3, Some(2), vec![named("web", 15, 1)], gone), t2);
        assert_eq!(held_reports(&r, "a", t2), vec![named("web", 15, 1)]);
        // A delta against other reports (a lost reply, a restarted agent) changes nothing
        // and asks for every report; so does one to a controller that never had them.
        let t3 = t2 + Duration::from_secs(5);
        let stale = r.heartbeat(beat(4, Some(2), vec![named("web", 99, 0)], vec![]), t3);
        assert_eq!(stale.reports_seq, None);
        let other = Heartbeat {
            instance: "2".into(),
            ..beat(4, Some(3), vec![], vec![])
        };
        assert_eq!(r.heartbeat(other, t3).reports_seq, None);
        assert_eq!(held_reports(&r, "a", t3), vec![named("web", 15, 1)]);
        let web = r.service_activity(&named("web", 0, 0).service, t3);
        assert_eq!((web.connects_total, web.open_connections), (5, 1));
        let fresh = AgentRegistry::new(RegistryConfig::default());
        assert_eq!(
            fresh
                .heartbeat(beat(4, Some(3), vec![], vec![]), t3)
                .reports_seq,
            None
        );
        assert!(fresh.agents(t3).is_empty(), "not registered from a delta");
        // An old agent (no numbers) is answered without one.
        assert_eq!(r.heartbeat(hb("b", "1", vec![]), t3).reports_seq, None);
    }

    #[test]
    fn a_kept_report_with_open_connections_is_activity() {
        let r = AgentRegistry::new(RegistryConfig::default());
        let t0 = Instant::now();
        let beat = |seq, since, services| Heartbeat {
            reports_seq: Some(seq),
            reports_since: since,
            ..hb("a", "1", services)
        };
        r.heartbeat(beat(1, None, vec![named("web", 0, 2)]), t0);
        let t1 = t0 + Duration::from_secs(5);
        // An agent that left an active report out: still active.
        r.heartbeat(beat(2, Some(1), vec![]), t1);
        assert_eq!(
            r.service_activity(&named("web", 0, 0).service, t1)
                .last_active,
            Some(t1)
        );
    }

    /// An agent keeping its reports by deltas ([`ReportDeltas`]) through changes, lost
    /// replies, restarts and controller changes: whenever a reply acknowledges its
    /// heartbeat, the controller holds exactly the agent's reports.
    #[test]
    fn reports_kept_by_deltas_match_the_agents_whatever_was_lost() {
        use nemesis_common::wire::ReportDeltas;
        use rand::{Rng as _, SeedableRng as _};
        let seed = rand::random::<u64>();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut r = AgentRegistry::new(RegistryConfig::default());
        let mut deltas = ReportDeltas::default();
        let mut instance = 0;
        let mut current: BTreeMap<String, ServiceReport> = BTreeMap::new();
        let mut now = Instant::now();
        let mut sent_deltas = 0;
        for step in 0..3000 {
            now += Duration::from_millis(100);
            for _ in 0..rng.random_range(0..3) {
                let name = format!("s{}", rng.random_range(0..30));
                if rng.random_bool(0.2) {
                    current.remove(&name);
                } else {
                    let mut rep = named(&name, rng.random_range(0..4), 0);
                    rep.open_connections = rng.random_range(0..2);
                    rep.hold_ports = vec![rng.random_range(20000..20003)];
                    current.insert(name, rep);
                }
            }
            match rng.random_range(0..100) {
                0 => r = AgentRegistry::new(RegistryConfig::default()),
                1 => {
                    instance += 1;
                    deltas = ReportDeltas::default();
                }
                _ => {}
            }
            let mut beat = hb("a", &instance.to_string(), vec![]);
            deltas.prepare(&mut beat, current.values().cloned().collect());
            sent_deltas += usize::from(beat.reports_since.is_some());
            let reply = r.heartbeat(beat, now);
            if rng.random_bool(0.05) {
                deltas.failed();
                continue;
            }
            let again = deltas.acknowledge(&reply);
            if reply.reports_seq.is_some() {
                let held = held_reports(&r, "a", now);
                assert_eq!(
                    held,
                    current.values().cloned().collect::<Vec<_>>(),
                    "seed {seed}, step {step}"
                );
            } else {
                assert!(
                    again,
                    "seed {seed}, step {step}: a refused delta is resent whole"
                );
            }
        }
        assert!(sent_deltas > 1500, "mostly deltas: {sent_deltas}");
    }

    #[test]
    fn heartbeats_with_a_cursor_get_only_the_directives_changed_since() {
        let r = AgentRegistry::new(RegistryConfig::default());
        let t0 = Instant::now();
        let other = ServiceRef {
            namespace: "ns".into(),
            name: "api".into(),
        };
        r.follow(&svc());
        r.follow(&other);
        for i in 0..4 {
            r.follow(&ServiceRef {
                namespace: "ns".into(),
                name: format!("s{i}"),
            });
        }
        let first = r.heartbeat(hb("a", "1", vec![]), t0);
        assert!(!first.delta);
        assert_eq!(first.directives.len(), 6);
        let beat = |cursor| Heartbeat {
            directives_cursor: cursor,
            ..hb("a", "1", vec![])
        };
        let steady = r.heartbeat(beat(first.cursor), t0);
        assert!(steady.delta && steady.directives.is_empty() && steady.removed.is_empty());
        let e = r.request_sleep(&svc(), None);
        r.remove(&other);
        let changed = r.heartbeat(beat(steady.cursor), t0);
        assert!(changed.delta);
        assert_eq!(changed.directives.len(), 1);
        assert_eq!(
            (changed.directives[0].directive, changed.directives[0].epoch),
            (Directive::Sleep, e)
        );
        assert_eq!(changed.removed, vec![other]);
        // Another controller's cursor (a failover): the whole set.
        let foreign = nemesis_common::wire::DirectivesCursor {
            stream: changed.cursor.unwrap().stream.wrapping_add(1),
            version: 1,
        };
        let whole = r.heartbeat(beat(Some(foreign)), t0);
        assert!(!whole.delta);
        assert_eq!(whole.directives.len(), 5);
    }

    #[test]
    fn sleep_is_acknowledged_only_when_every_live_agent_applied_its_epoch() {
        let r = AgentRegistry::new(RegistryConfig::default());
        let t0 = Instant::now();
        r.heartbeat(hb("a", "1", vec![report(0, 0, 0)]), t0);
        r.heartbeat(hb("b", "1", vec![]), t0);
        let e = r.request_sleep(&svc(), None);
        assert_eq!(
            r.request_sleep(&svc(), None),
            e,
            "asking twice is one request"
        );
        assert!(!r.all_live_acknowledged(&svc(), e, t0));
        let reply = r.heartbeat(hb("a", "1", vec![report(e, 0, 0)]), t0);
        assert_eq!(reply.directives.len(), 1);
        assert_eq!(reply.directives[0].directive, Directive::Sleep);
        assert_eq!(r.unacknowledged(&svc(), e, t0), vec!["b".to_string()]);
        // "b" never reported the Service: it has not applied anything for it.
        r.heartbeat(hb("b", "1", vec![report(e, 0, 0)]), t0);
        assert!(r.all_live_acknowledged(&svc(), e, t0));
    }

    #[test]
    fn dead_agents_do_not_block_acknowledgement() {
        let r = AgentRegistry::new(RegistryConfig::default());
        let t0 = Instant::now();
        r.heartbeat(hb("a", "1", vec![]), t0);
        let e = r.request_sleep(&svc(), None);
        let later = t0 + DEFAULT_LEASE + Duration::from_secs(1);
        r.heartbeat(hb("b", "1", vec![report(e, 0, 0)]), later);
        assert_eq!(r.live_count(later), 1);
        assert!(r.all_live_acknowledged(&svc(), e, later));
        assert!(!r.all_live_acknowledged(&svc(), e, t0));
    }

    #[test]
    fn a_superseded_epoch_is_never_acknowledged() {
        let r = AgentRegistry::new(RegistryConfig::default());
        let t0 = Instant::now();
        let sleep = r.request_sleep(&svc(), None);
        let follow = r.follow(&svc());
        assert!(follow > sleep);
        r.heartbeat(hb("a", "1", vec![report(follow, 0, 0)]), t0);
        assert!(!r.all_live_acknowledged(&svc(), sleep, t0));
        assert!(r.all_live_acknowledged(&svc(), follow, t0));
    }

    #[test]
    fn epochs_rise_above_any_epoch_an_agent_already_applied() {
        let r = AgentRegistry::new(RegistryConfig::default());
        let far = u64::MAX / 2;
        r.heartbeat(hb("a", "1", vec![report(far, 0, 0)]), Instant::now());
        assert!(r.request_sleep(&svc(), None) > far);
    }

    #[test]
    fn connect_counts_are_differenced_per_agent_and_survive_agent_restarts() {
        let r = AgentRegistry::new(RegistryConfig::default());
        let t0 = Instant::now();
        // First sight of an agent is a baseline.
        r.heartbeat(hb("a", "1", vec![report(0, 100, 0)]), t0);
        assert_eq!(r.service_activity(&svc(), t0).connects_total, 0);
        assert_eq!(r.service_activity(&svc(), t0).last_active, None);
        let t1 = t0 + Duration::from_secs(1);
        r.heartbeat(hb("a", "1", vec![report(0, 105, 2)]), t1);
        let act = r.service_activity(&svc(), t1);
        assert_eq!((act.connects_total, act.open_connections), (5, 2));
        assert_eq!(act.last_active, Some(t1));
        // Restart: the new process counts from zero.
        let t2 = t1 + Duration::from_secs(1);
        r.heartbeat(hb("a", "2", vec![report(0, 3, 0)]), t2);
        assert_eq!(r.service_activity(&svc(), t2).connects_total, 8);
        // No change: not active.
        let t3 = t2 + Duration::from_secs(1);
        r.heartbeat(hb("a", "2", vec![report(0, 3, 0)]), t3);
        assert_eq!(r.service_activity(&svc(), t3).last_active, Some(t2));
    }

    #[test]
    fn holds_are_differenced_like_connects_and_holding_agents_counted() {
        let r = AgentRegistry::new(RegistryConfig::default());
        let t0 = Instant::now();
        let holding = |holds_total, held| ServiceReport {
            mode: AppliedMode::Hold,
            held_connections: held,
            holds_total,
            ..report(0, 0, 0)
        };
        r.heartbeat(hb("a", "1", vec![holding(7, 0)]), t0);
        r.heartbeat(hb("b", "1", vec![report(0, 0, 0)]), t0);
        let act = r.service_activity(&svc(), t0);
        assert_eq!((act.holds_total, act.holding_agents), (0, 1));
        // Ten held on a (four of them still held), three on a restarted b.
        let t1 = t0 + Duration::from_secs(1);
        r.heartbeat(hb("a", "1", vec![holding(17, 4)]), t1);
        r.heartbeat(hb("b", "2", vec![holding(3, 0)]), t1);
        let act = r.service_activity(&svc(), t1);
        assert_eq!(
            (act.holds_total, act.held_connections, act.holding_agents),
            (13, 4, 2)
        );
        r.heartbeat(hb("a", "1", vec![report(0, 0, 0)]), t1);
        assert_eq!(r.service_activity(&svc(), t1).holding_agents, 1);
    }

    #[test]
    fn refused_holds_and_proxy_errors_are_differenced_like_connects() {
        let r = AgentRegistry::new(RegistryConfig::default());
        let t0 = Instant::now();
        let with = |refused, connect_failed, resets| ServiceReport {
            holds_refused_total: refused,
            proxy_errors: nemesis_common::wire::ProxyErrors {
                connect_failed,
                resets,
                ..Default::default()
            },
            ..report(0, 0, 0)
        };
        // The first report of an agent is a baseline.
        r.heartbeat(hb("a", "1", vec![with(5, 2, 1)]), t0);
        let act = r.service_activity(&svc(), t0);
        assert_eq!((act.holds_refused_total, act.proxy_errors_total), (0, 0));
        r.heartbeat(hb("a", "1", vec![with(8, 3, 1)]), t0);
        let act = r.service_activity(&svc(), t0);
        assert_eq!((act.holds_refused_total, act.proxy_errors_total), (3, 1));
        // A restarted agent counts from zero again: all of it is new.
        r.heartbeat(hb("a", "2", vec![with(2, 0, 4)]), t0);
        let act = r.service_activity(&svc(), t0);
        assert_eq!((act.holds_refused_total, act.proxy_errors_total), (5, 5));
    }

    /// The per-Service sums kept on heartbeats agree with a walk over the live agents
    /// (what [`AgentRegistry::agents`] shows) through registrations, restarts, changed
    /// and dropped reports, leases running out, returns and forgotten agents.
    #[test]
    fn activity_sums_match_a_walk_over_the_live_agents() {
        use rand::{Rng as _, SeedableRng as _};
        let r = AgentRegistry::new(RegistryConfig {
            lease: Duration::from_secs(15),
            forget_after: Duration::from_secs(60),
        });
        let services: Vec<ServiceRef> = (0..4)
            .map(|i| ServiceRef {
                namespace: "ns".into(),
                name: format!("s{i}"),
            })
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let mut now = Instant::now();
        for step in 0..3000 {
            now += Duration::from_millis(rng.random_range(0..2000));
            // n0 beats about every 64 steps, n7 every 4: some outlive their lease.
            let node = format!("n{}", rng.random_range(0..64u32).isqrt());
            let mut reports = Vec::new();
            for s in &services {
                if rng.random_bool(0.3) {
                    continue;
                }
                reports.push(ServiceReport {
                    service: s.clone(),
                    mode: if rng.random_bool(0.5) {
                        AppliedMode::Hold
                    } else {
                        AppliedMode::Passthrough
                    },
                    open_connections: rng.random_range(0..5),
                    accepted_open: rng.random_range(0..5),
                    held_connections: rng.random_range(0..5),
                    ..report(0, 0, 0)
                });
            }
            // Some nodes go quiet for a while, past their lease or past being forgotten.
            if rng.random_bool(0.9) {
                let instance = rng.random_range(0..2).to_string();
                r.heartbeat(hb(&node, &instance, reports), now);
            }
            // Mostly now (the sums), sometimes ahead (a sweep) and then behind it (a walk).
            let ahead = if rng.random_bool(0.8) {
                0
            } else {
                rng.random_range(0..20_000)
            };
            let query = now + Duration::from_millis(ahead);
            for svc in &services {
                let mut want = ServiceActivity::default();
                for a in r.agents(query).iter().filter(|a| a.live) {
                    if let Some(rep) = a.services.iter().find(|x| &x.service == svc) {
                        want.open_connections += rep.open_connections;
                        want.accepted_open += rep.accepted_open;
                        want.held_connections += rep.held_connections;
                        want.reporting_agents += 1;
                        want.holding_agents += usize::from(rep.mode == AppliedMode::Hold);
                    }
                }
                let got = r.service_activity(svc, query);
                assert_eq!(
                    (
                        got.open_connections,
                        got.accepted_open,
                        got.held_connections,
                        got.reporting_agents,
                        got.holding_agents
                    ),
                    (
                        want.open_connections,
                        want.accepted_open,
                        want.held_connections,
                        want.reporting_agents,
                        want.holding_agents
                    ),
                    "step {step}, {svc} at +{:?}",
                    query - now
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_when_the_last_agent_acknowledges_or_its_lease_expires() {
        let r = std::sync::Arc::new(AgentRegistry::new(RegistryConfig::default()));
        r.heartbeat(hb("a", "1", vec![]), Instant::now());
        r.heartbeat(hb("b", "1", vec![]), Instant::now());
        let e = r.request_sleep(&svc(), None);
        let r2 = r.clone();
        let acker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            r2.heartbeat(hb("a", "1", vec![report(e, 0, 0)]), Instant::now());
        });
        let start = Instant::now();
        // "b" never acknowledges; it stops counting when its lease runs out.
        r.wait_acknowledged(&svc(), e, Duration::from_secs(60))
            .await
            .unwrap();
        let waited = start.elapsed();
        assert!(waited >= DEFAULT_LEASE && waited < DEFAULT_LEASE + Duration::from_secs(1));
        acker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_times_out_naming_the_missing_nodes() {
        let r = AgentRegistry::new(RegistryConfig::default());
        let e = r.request_sleep(&svc(), None);
        r.heartbeat(hb("a", "1", vec![]), Instant::now());
        let err = r
            .wait_acknowledged(&svc(), e, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, AckError::Timeout { missing, .. } if missing == &["a".to_string()]),
            "{err}"
        );
        let follow = r.follow(&svc());
        assert!(matches!(
            r.wait_acknowledged(&svc(), e, Duration::from_secs(2)).await,
            Err(AckError::Superseded { current: Some(c), .. }) if c == follow
        ));
    }

    /// The waiter re-checks only the nodes it found missing, yet an agent that joins
    /// while it waits is waited for and named.
    #[tokio::test(start_paused = true)]
    async fn agents_joining_during_a_wait_are_waited_for_and_named() {
        let r = std::sync::Arc::new(AgentRegistry::new(RegistryConfig::default()));
        r.heartbeat(hb("a", "1", vec![]), Instant::now());
        let e = r.request_sleep(&svc(), None);
        let r2 = r.clone();
        let steps = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            r2.heartbeat(hb("b", "1", vec![]), Instant::now());
            tokio::time::sleep(Duration::from_secs(1)).await;
            r2.heartbeat(hb("a", "1", vec![]), Instant::now());
        });
        let err = r
            .wait_acknowledged(&svc(), e, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, AckError::Timeout { missing, .. } if missing == &["a".to_string(), "b".to_string()]),
            "{err}"
        );
        steps.await.unwrap();
        let (a_only, b_joins) = (Duration::from_secs(1), Duration::from_secs(3));
        let e = r.request_sleep(
            &ServiceRef {
                namespace: "ns".into(),
                name: "other".into(),
            },
            None,
        );
        let other = |epoch| ServiceReport {
            service: ServiceRef {
                namespace: "ns".into(),
                name: "other".into(),
            },
            ..report(epoch, 0, 0)
        };
        let r2 = r.clone();
        let steps = tokio::spawn(async move {
            tokio::time::sleep(a_only).await;
            r2.heartbeat(hb("c", "1", vec![]), Instant::now());
            r2.heartbeat(hb("a", "1", vec![other(e)]), Instant::now());
            r2.heartbeat(hb("b", "1", vec![other(e)]), Instant::now());
            tokio::time::sleep(b_joins).await;
            r2.heartbeat(hb("c", "1", vec![other(e)]), Instant::now());
        });
        let start = Instant::now();
        r.wait_acknowledged(&other(0).service, e, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(
            start.elapsed() >= a_only + b_joins,
            "returned before c acknowledged"
        );
        steps.await.unwrap();
    }

    #[test]
    fn a_leading_registry_takes_no_copy_and_a_standby_leads_on_from_its_copy() {
        let leader = AgentRegistry::new(RegistryConfig::default());
        leader.begin_term(1);
        let e = leader.request_sleep(&svc(), None);
        let agent = leader.heartbeat(hb("a", "1", vec![]), Instant::now());
        let standby = AgentRegistry::new(RegistryConfig::default());
        let from = standby.directives_cursor();
        let page = leader.replica_page(Some(from), 100);
        assert_eq!(
            standby.apply_replica(from, std::slice::from_ref(&page)),
            Ok(1)
        );
        assert_eq!(standby.directives(), leader.directives());
        // Its own epochs rise above the copied ones, whatever the clock says.
        assert!(standby.lock().last_epoch >= e);
        standby.begin_term(2);
        assert!(
            standby
                .apply_replica(standby.directives_cursor(), &[page])
                .is_err(),
            "a leader's directives are its own"
        );
        let beat = Heartbeat {
            directives_cursor: agent.cursor,
            ..hb("a", "1", vec![])
        };
        let reply = standby.heartbeat(beat, Instant::now());
        assert!(reply.delta && reply.directives.is_empty(), "{reply:?}");
        standby.end_term();
    }

    #[test]
    fn a_services_first_directive_of_a_term_waits_for_its_target_and_is_after_zero_at_zero() {
        let r = AgentRegistry::new(RegistryConfig::default());
        r.begin_term(1);
        let ports = vec![HoldPort {
            name: "http".into(),
            port: 30001,
        }];
        r.set_hold_ports(&svc(), ports.clone());
        assert_eq!(
            r.directive(&svc()),
            None,
            "no directive before the target is read"
        );
        r.open(&svc(), true);
        let d = r.directive(&svc()).expect("opened");
        assert_eq!(
            (d.directive, d.after_zero, d.hold_ports.clone()),
            (Directive::Follow, true, ports)
        );
        // Opened once: the target's later replicas change nothing.
        r.open(&svc(), false);
        assert_eq!(r.directive(&svc()), Some(d));
        let warm = ServiceRef {
            namespace: "ns".into(),
            name: "warm".into(),
        };
        r.open(&warm, false);
        let w = r.directive(&warm).expect("opened");
        assert_eq!((w.directive, w.after_zero), (Directive::Follow, false));
        assert!(w.hold_ports.is_empty());
        r.end_term();
    }

    /// The standby's copy is behind: the leader sent a `Sleep` after the copy's
    /// `Follow` (after zero, from an earlier wake). The new leader's wake from zero must
    /// reach agents holding that `Sleep`, whose epoch is above the copy's.
    #[test]
    fn a_wake_from_zero_renews_a_directive_inherited_from_a_copy_that_is_behind() {
        let leader = AgentRegistry::new(RegistryConfig::default());
        leader.begin_term(1);
        leader.follow_after_zero(&svc());
        let standby = AgentRegistry::new(RegistryConfig::default());
        let from = standby.directives_cursor();
        let page = leader.replica_page(Some(from), 100);
        assert_eq!(standby.apply_replica(from, &[page]), Ok(1));
        let sleep = leader.request_sleep(&svc(), None);
        // A take-over comes a Lease's duration later: the wall clock (the epochs' floor
        // across instances) has moved on.
        std::thread::sleep(std::time::Duration::from_millis(2));
        standby.begin_term(2);
        let wake = standby.follow_after_zero(&svc());
        assert!(
            wake > sleep,
            "the wake's epoch {wake} is not above the old leader's Sleep {sleep}"
        );
        assert_eq!(standby.follow_after_zero(&svc()), wake, "renewed once");
        standby.end_term();
    }

    /// The target's generation a leader saw when it asked for a sleep reaches the
    /// standby's copy with the `Sleep` (in the same change, so a copy never holds one
    /// without the other), and the standby, leading, finds it there as the last
    /// leader's; once it writes its own directive it inherits nothing.
    #[test]
    fn a_sleep_reaches_the_copy_with_the_targets_generation_and_is_inherited_until_replaced() {
        let leader = AgentRegistry::new(RegistryConfig::default());
        leader.begin_term(1);
        let sleep = leader.request_sleep(&svc(), Some(7));
        assert_eq!(leader.request_sleep(&svc(), Some(9)), sleep, "asked once");
        assert_eq!(leader.inherited_sleep(&svc()), None, "its own");
        // A hold-port change moves the directive to a new version, the note with it.
        leader.set_hold_ports(
            &svc(),
            vec![HoldPort {
                name: "http".into(),
                port: 30001,
            }],
        );
        let standby = AgentRegistry::new(RegistryConfig::default());
        let from = standby.directives_cursor();
        let page = leader.replica_page(Some(from), 100);
        assert_eq!(standby.apply_replica(from, &[page]), Ok(1));
        let want = Some(InheritedSleep {
            epoch: sleep,
            target_generation: Some(7),
        });
        assert_eq!(standby.inherited_sleep(&svc()), want);
        standby.begin_term(2);
        assert_eq!(standby.inherited_sleep(&svc()), want, "the last leader's");
        standby.follow(&svc());
        assert_eq!(standby.inherited_sleep(&svc()), None);
        // Its own Sleep, noted without a generation, carries none to its standby.
        standby.request_sleep(&svc(), None);
        let next = AgentRegistry::new(RegistryConfig::default());
        let from = next.directives_cursor();
        let page = standby.replica_page(Some(from), 100);
        next.apply_replica(from, &[page]).unwrap();
        assert_eq!(
            next.inherited_sleep(&svc()).map(|s| s.target_generation),
            Some(None)
        );
        standby.end_term();
    }
}
