//! Validation and compilation: a `ScalingPolicySpec` becomes a `CompiledPolicy`, the only
//! thing the engine accepts, or an `InvalidPolicy` listing every problem with its field
//! and column. Owns the rules of a valid policy; it never evaluates or scales.

use super::crd::{RangeSpec, ScalingPolicySpec, StateSpec, StepSpec, TargetType, TransitionSpec};
use super::duration::parse_duration;
use super::expr::Metric;
use super::parser::parse;
use super::problem::{InvalidPolicy, Problem};
use super::program::{Code, CodeBuf, MAX_STACK, Op};
use super::resolve::{BUILTIN_METRICS, Names, RESERVED_WORDS, Resolver};
use super::schedule::Schedule;
use super::short_form;
use super::target::{WorkloadRef, workload_ref};
use chrono::TimeDelta;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

/// See `nemesis_common::policy` (the agents read the same default).
pub const DEFAULT_READINESS_BUDGET: TimeDelta =
    TimeDelta::seconds(nemesis_common::policy::DEFAULT_READINESS_BUDGET.as_secs() as i64);
/// See `nemesis_common::policy` (the agents read the same default).
pub const DEFAULT_MAX_HELD_CONNECTIONS: u32 = nemesis_common::policy::DEFAULT_MAX_HELD_CONNECTIONS;
/// An explicit `holdTimeoutSeconds` above an hour is a typo (minutes for seconds); a
/// longer hold follows from the readiness budget instead.
pub const MAX_HOLD_TIMEOUT_SECONDS: i64 = 3600;
/// A PromQL instant query that takes longer than this is a Prometheus in trouble.
pub const DEFAULT_PROMETHEUS_TIMEOUT: TimeDelta = TimeDelta::seconds(2);
/// Prometheus's own default scrape interval: querying faster sees no new data.
pub const DEFAULT_PROMETHEUS_INTERVAL: TimeDelta = TimeDelta::seconds(15);
/// Agents heartbeat every few seconds; several missed heartbeats make the counts missing.
pub const CONNECTIONS_STALE_AFTER: TimeDelta = TimeDelta::seconds(30);
pub const DEFAULT_RATE_WINDOW: TimeDelta = TimeDelta::minutes(1);
/// The HPA's default tolerance.
pub const DEFAULT_TOLERANCE: f64 = 0.1;
/// Scale-up default: the HPA's "4 pods per 15 s".
pub const DEFAULT_SCALE_UP: Step = Step {
    max_step: 4,
    period: TimeDelta::seconds(15),
};
/// Scale-down default: slower than up, so a dip does not shed capacity a burst needs.
pub const DEFAULT_SCALE_DOWN: Step = Step {
    max_step: 1,
    period: TimeDelta::seconds(30),
};
/// Bounds that keep a policy readable and its compiled form compact (16-bit indexes).
pub const MAX_STATES: usize = 100;
pub const MAX_TRANSITIONS: usize = 1000;
/// A longer cooldown is a schedule, not a cooldown.
pub const MAX_COOLDOWN: TimeDelta = TimeDelta::days(1);
/// Conditions longer than this are refused (they are evaluated for every policy on every
/// tick, and deep trees cost stack).
pub const MAX_EXPRESSION_BYTES: usize = 2048;

// === compiled policy ===

/// A validated policy, ready for the engine. Only `compile` builds one, so the engine
/// never sees an invalid policy.
///
/// `repr(C)` keeps the fields every decision reads in the first two cache lines: with
/// 10,000 policies per tick the engine is bound by memory, not by arithmetic.
#[derive(Debug, Clone)]
#[repr(C)]
pub struct CompiledPolicy {
    // === hot: read on every decision ===
    /// Everything a decision reads, in one allocation: a header per state
    /// (`Op::State`), a row per Prometheus source (`Op::Source`), then per state its run
    /// of edges (`Op::Edge` followed by the condition's operations), then the range
    /// states' metric expressions.
    pub(crate) code: Box<[Op]>,
    pub(crate) states: Vec<CompiledState>,
    pub(crate) sustained_slots: usize,
    pub(crate) sources: Vec<CompiledSource>,
    pub(crate) schedules: Box<[Schedule]>,
    pub(crate) readiness_budget: TimeDelta,
    pub(crate) initial: usize,
    // === cold ===
    pub(crate) transitions: Vec<CompiledTransition>,
    pub(crate) workload: WorkloadRef,
    pub(crate) service: Option<String>,
    pub(crate) alerts: Vec<String>,
    pub(crate) rate_window: TimeDelta,
    pub(crate) hold_timeout: Duration,
    pub(crate) max_held_connections: u32,
    pub(crate) warnings: Vec<Problem>,
    pub(crate) short_form: bool,
}

#[derive(Debug, Clone)]
#[repr(C)]
pub struct CompiledState {
    pub replicas: Replicas,
    pub name: String,
    /// The same transitions by index, in spec order (the order they are tried).
    pub(crate) outgoing: Vec<usize>,
}

#[derive(Debug, Clone)]
pub enum Replicas {
    Fixed(u32),
    Range(RangeRule),
}

impl Replicas {
    /// The fewest replicas this state can ask for.
    pub fn min(&self) -> u32 {
        match self {
            Replicas::Fixed(n) => *n,
            Replicas::Range(r) => r.min,
        }
    }
}

#[derive(Debug, Clone)]
#[repr(C)]
pub struct RangeRule {
    pub min: u32,
    pub max: u32,
    pub(crate) metric: Code,
    pub target: f64,
    pub tolerance: f64,
    pub up: Step,
    pub down: Step,
    pub target_type: TargetType,
    pub metric_text: String,
    pub(crate) metrics: Vec<Metric>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub max_step: u32,
    pub period: TimeDelta,
}

#[derive(Debug, Clone)]
pub struct CompiledTransition {
    pub from: usize,
    pub to: usize,
    pub(crate) when: Code,
    pub text: String,
    pub cooldown: TimeDelta,
    /// Metrics the condition reads (for the reason, and the missing-data guard).
    pub(crate) metrics: Vec<Metric>,
}

/// A Prometheus source as the poller needs it.
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub struct CompiledSource {
    // The engine reads these two on every use of the metric.
    pub stale_after: TimeDelta,
    pub fallback: Option<f64>,
    pub name: String,
    pub query: String,
    /// `None`: the controller's configured Prometheus.
    pub server: Option<String>,
    pub timeout: Duration,
    pub interval: Duration,
}

impl CompiledPolicy {
    /// What the policy scales.
    pub fn workload(&self) -> &WorkloadRef {
        &self.workload
    }
    pub fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }
    /// State names, in spec order (short form: `zero`, `warm`).
    pub fn state_names(&self) -> impl Iterator<Item = &str> {
        self.states.iter().map(|s| s.name.as_str())
    }
    pub fn states(&self) -> &[CompiledState] {
        &self.states
    }
    pub fn transitions(&self) -> &[CompiledTransition] {
        &self.transitions
    }
    pub fn initial_state(&self) -> &str {
        &self.states[self.initial].name
    }
    pub fn state_index(&self, name: &str) -> Option<usize> {
        self.states.iter().position(|s| s.name == name)
    }
    /// Prometheus sources, in spec order; `Observations::sources` uses the same order.
    pub fn sources(&self) -> &[CompiledSource] {
        &self.sources
    }
    pub fn source_index(&self, name: &str) -> Option<usize> {
        self.sources.iter().position(|s| s.name == name)
    }
    /// Alert names, in spec order; `Observations::alerts` uses the same order.
    pub fn alerts(&self) -> &[String] {
        &self.alerts
    }
    pub fn alert_index(&self, name: &str) -> Option<usize> {
        self.alerts.iter().position(|a| a == name)
    }
    pub fn readiness_budget(&self) -> TimeDelta {
        self.readiness_budget
    }
    /// The window the agents' connection rate is averaged over.
    pub fn rate_window(&self) -> TimeDelta {
        self.rate_window
    }
    /// How long the agents hold a connection while the target wakes
    /// (`holdTimeoutSeconds`, else the readiness budget).
    pub fn hold_timeout(&self) -> Duration {
        self.hold_timeout
    }
    pub fn max_held_connections(&self) -> u32 {
        self.max_held_connections
    }
    /// Problems that do not stop the policy (unreachable states, unused sources).
    pub fn warnings(&self) -> &[Problem] {
        &self.warnings
    }
    pub fn is_short_form(&self) -> bool {
        self.short_form
    }
    /// The `for` trackers the engine keeps for this policy.
    pub fn sustained_slots(&self) -> usize {
        self.sustained_slots
    }
    /// The display name of a metric.
    pub fn metric_name(&self, m: Metric) -> &str {
        match m {
            Metric::ConnsActive => "conns.active",
            Metric::ConnsRate => "conns.rate",
            Metric::ConnsHeld => "conns.held",
            Metric::Replicas => "replicas",
            Metric::ReadyReplicas => "replicas.ready",
            Metric::Source(i) => &self.sources[i as usize].name,
        }
    }
    /// Every metric any condition or range reads, for status and for the pollers.
    pub fn metrics_read(&self) -> Vec<Metric> {
        let mut out: Vec<Metric> = Vec::new();
        let all = self
            .transitions
            .iter()
            .flat_map(|t| t.metrics.iter())
            .chain(self.states.iter().flat_map(|s| match &s.replicas {
                Replicas::Range(r) => r.metrics.as_slice(),
                Replicas::Fixed(_) => &[],
            }));
        for m in all {
            if !out.contains(m) {
                out.push(*m);
            }
        }
        out.sort();
        out
    }
}

// === drafts: long and short form, normalised ===

/// A state to validate, with the field paths its problems are reported at.
pub struct DraftState {
    pub spec: StateSpec,
    pub path: String,
    pub name_path: String,
    pub replicas_path: String,
    pub range_path: String,
    pub metric_path: String,
}

impl DraftState {
    fn long(i: usize, spec: &StateSpec) -> Self {
        let path = format!("spec.states[{i}]");
        Self {
            spec: spec.clone(),
            name_path: format!("{path}.name"),
            replicas_path: format!("{path}.replicas"),
            range_path: format!("{path}.range"),
            metric_path: format!("{path}.range.metric"),
            path,
        }
    }

    /// A state the short form made; problems point at the short-form fields.
    pub fn generated(spec: StateSpec, path: &str, metric_path: &str) -> Self {
        Self {
            spec,
            path: path.into(),
            name_path: path.into(),
            replicas_path: path.into(),
            range_path: path.into(),
            metric_path: metric_path.into(),
        }
    }
}

pub struct DraftTransition {
    pub spec: TransitionSpec,
    pub from_path: String,
    pub to_path: String,
    pub when_path: String,
    pub cooldown_path: String,
}

impl DraftTransition {
    fn long(i: usize, spec: &TransitionSpec) -> Self {
        let path = format!("spec.transitions[{i}]");
        Self {
            spec: spec.clone(),
            from_path: format!("{path}.from"),
            to_path: format!("{path}.to"),
            when_path: format!("{path}.when"),
            cooldown_path: format!("{path}.cooldown"),
        }
    }

    pub fn generated(spec: TransitionSpec, path: &str) -> Self {
        Self {
            spec,
            from_path: path.into(),
            to_path: path.into(),
            when_path: path.into(),
            cooldown_path: path.into(),
        }
    }
}

pub struct Draft {
    pub states: Vec<DraftState>,
    pub transitions: Vec<DraftTransition>,
    pub initial: Option<String>,
    pub initial_path: String,
    /// The rate window the automaton needs, when not the one the spec gives (the short
    /// form's idle timeout shorter than the default window).
    pub rate_window: Option<TimeDelta>,
}

// === compile ===

/// Validates and compiles a policy. Every problem found is reported, not only the first.
pub fn compile(spec: &ScalingPolicySpec) -> Result<CompiledPolicy, InvalidPolicy> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();

    let workload = check_target(spec, &mut errors);
    let sources = compile_sources(spec, &mut errors);
    let alerts = check_alerts(spec, &mut errors);
    check_report_queries(spec, &mut errors);
    let rate_window = spec
        .metrics
        .connections
        .as_ref()
        .and_then(|c| c.rate_window.as_deref())
        .map_or(DEFAULT_RATE_WINDOW, |text| {
            positive_duration(text, "spec.metrics.connections.rateWindow", &mut errors)
                .unwrap_or(DEFAULT_RATE_WINDOW)
        });
    let readiness_budget =
        spec.readiness_budget
            .as_deref()
            .map_or(DEFAULT_READINESS_BUDGET, |text| {
                positive_duration(text, "spec.readinessBudget", &mut errors)
                    .unwrap_or(DEFAULT_READINESS_BUDGET)
            });
    // An invalid override is reported; the value beside it never reaches an agent.
    let explicit_hold = spec.hold_timeout_seconds.map(|v| {
        bounded(
            Some(v),
            1,
            1..=MAX_HOLD_TIMEOUT_SECONDS,
            "spec.holdTimeoutSeconds",
            &mut errors,
        )
    });
    let hold_timeout = nemesis_common::policy::hold_timeout(
        explicit_hold,
        readiness_budget.to_std().unwrap_or_default(),
    );
    let max_held_connections = bounded(
        spec.max_held_connections,
        DEFAULT_MAX_HELD_CONNECTIONS,
        1..=1_000_000,
        "spec.maxHeldConnections",
        &mut errors,
    );

    if let Some(lb) = &spec.load_balancing
        && let Err(problems) = nemesis_common::policy::LoadBalancing::parse(
            lb.algorithm.as_deref(),
            lb.slow_start.as_deref(),
            lb.prefer_same_node,
            lb.prefer_same_zone,
        )
    {
        errors.extend(problems.into_iter().map(|p| Problem {
            path: p.field.to_string(),
            column: p.column,
            message: p.message,
        }));
    }

    let short = short_form::is_short_form(spec);
    let long =
        !spec.states.is_empty() || !spec.transitions.is_empty() || spec.initial_state.is_some();
    let draft = if short && long {
        errors.push(Problem::at(
            "spec.states",
            "use either the short form (minReplicas, maxReplicas, idleTimeout, targetMetric, targetValue) or states and transitions, not both",
        ));
        None
    } else if long {
        Some(Draft {
            states: spec
                .states
                .iter()
                .enumerate()
                .map(|(i, s)| DraftState::long(i, s))
                .collect(),
            transitions: spec
                .transitions
                .iter()
                .enumerate()
                .map(|(i, t)| DraftTransition::long(i, t))
                .collect(),
            initial: spec.initial_state.clone(),
            initial_path: "spec.initialState".into(),
            rate_window: None,
        })
    } else {
        // No automaton at all: the classic one with its defaults.
        short_form::expand(spec, &mut errors, &mut warnings)
    };

    let rate_window = draft
        .as_ref()
        .and_then(|d| d.rate_window)
        .unwrap_or(rate_window);
    let source_names: Vec<String> = sources.iter().map(|s| s.name.clone()).collect();
    let alert_names = alerts.clone();
    let names = Names {
        sources: &source_names,
        alerts: &alert_names,
        has_service: spec.target.service.is_some(),
    };
    let mut resolver = Resolver::new(&names);
    let mut code = CodeBuf::default();
    let automaton =
        draft.map(|d| compile_automaton(d, &mut resolver, &mut code, &mut errors, &mut warnings));

    if !errors.is_empty() {
        return Err(InvalidPolicy { problems: errors });
    }
    // Usage warnings come first, so warnings read in field order (metrics before states).
    let shape_warnings = std::mem::take(&mut warnings);
    for (i, used) in resolver.used_sources.iter().enumerate() {
        if !used {
            warnings.push(Problem::at(
                format!("spec.metrics.prometheus[{i}]"),
                format!(
                    "`{}` is never used by a condition or range",
                    sources[i].name
                ),
            ));
        }
    }
    for (i, used) in resolver.used_alerts.iter().enumerate() {
        if !used {
            warnings.push(Problem::at(
                format!("spec.metrics.alerts[{i}]"),
                format!("alert `{}` is never used by a condition", alerts[i]),
            ));
        }
    }
    warnings.extend(shape_warnings);
    let (mut states, mut transitions, initial) =
        automaton.expect("no errors means the automaton compiled");
    let hot = layout(&mut states, &mut transitions, &sources, &code.ops);
    Ok(CompiledPolicy {
        workload: workload.expect("no errors means the target was read"),
        service: spec.target.service.clone(),
        states,
        transitions,
        initial,
        sources,
        alerts,
        sustained_slots: resolver.next_slot,
        readiness_budget,
        rate_window,
        hold_timeout,
        max_held_connections,
        warnings,
        short_form: !long,
        code: hot.into_boxed_slice(),
        schedules: code.schedules.into_boxed_slice(),
    })
}

/// Lays out the hot code (see `CompiledPolicy::code`) from the expressions compiled in
/// spec order, and points every `Code` at its new place.
fn layout(
    states: &mut [CompiledState],
    transitions: &mut [CompiledTransition],
    sources: &[CompiledSource],
    ops: &[Op],
) -> Vec<Op> {
    let mut hot = Vec::with_capacity(states.len() + sources.len() + ops.len() + transitions.len());
    hot.extend(states.iter().map(|s| Op::State {
        edges_start: 0,
        edges_len: 0,
        fixed: match s.replicas {
            Replicas::Fixed(n) => n,
            Replicas::Range(_) => u32::MAX,
        },
    }));
    hot.extend(sources.iter().map(|s| Op::Source {
        stale_ms: s.stale_after.num_milliseconds().clamp(0, u32::MAX as i64) as u32,
        fallback: s.fallback.unwrap_or(f64::NAN),
    }));
    for (i, state) in states.iter().enumerate() {
        let start = hot.len();
        for &ti in &state.outgoing {
            let t = &mut transitions[ti];
            let cond = &ops[t.when.range()];
            hot.push(Op::Edge {
                transition: ti as u16,
                to: t.to as u16,
                cond_len: cond.len() as u16,
                to_zero: false,
                cooldown_ms: t.cooldown.num_milliseconds().clamp(0, u32::MAX as i64) as u32,
            });
            t.when = Code {
                start: hot.len() as u32,
                len: cond.len() as u32,
            };
            hot.extend_from_slice(cond);
        }
        let len = hot.len() - start;
        if let Op::State {
            edges_start,
            edges_len,
            ..
        } = &mut hot[i]
        {
            *edges_start = start as u32;
            *edges_len = len as u32;
        }
    }
    for op in hot.iter_mut() {
        if let Op::Edge { to, to_zero, .. } = op {
            *to_zero = states[*to as usize].replicas.min() == 0;
        }
    }
    for state in states.iter_mut() {
        if let Replicas::Range(r) = &mut state.replicas {
            let metric = &ops[r.metric.range()];
            r.metric = Code {
                start: hot.len() as u32,
                len: metric.len() as u32,
            };
            hot.extend_from_slice(metric);
        }
    }
    hot
}

type Automaton = (Vec<CompiledState>, Vec<CompiledTransition>, usize);

fn compile_automaton(
    draft: Draft,
    resolver: &mut Resolver<'_>,
    code: &mut CodeBuf,
    errors: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Automaton {
    if draft.states.is_empty() {
        errors.push(Problem::at(
            "spec.states",
            "a policy needs at least one state",
        ));
    }
    let mut states: Vec<CompiledState> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, d) in draft.states.iter().enumerate() {
        let name = d.spec.name.as_str();
        if !is_state_name(name) {
            errors.push(Problem::at(
                &d.name_path,
                format!("`{name}` is not a valid state name: use letters, digits, `-` and `_`"),
            ));
        } else if let Some(first) = seen.insert(name, i) {
            errors.push(Problem::at(
                &d.name_path,
                format!("duplicate state `{name}` (also spec.states[{first}])"),
            ));
        }
        let replicas = compile_replicas(d, resolver, code, errors);
        states.push(CompiledState {
            name: name.to_string(),
            replicas: replicas.unwrap_or(Replicas::Fixed(0)),
            outgoing: Vec::new(),
        });
    }
    let index = |states: &[CompiledState], name: &str| states.iter().position(|s| s.name == name);

    let mut transitions = Vec::new();
    for d in &draft.transitions {
        let t = &d.spec;
        let to = index(&states, &t.to);
        if to.is_none() {
            errors.push(unknown_state(&d.to_path, &t.to, &states));
        }
        let froms: Vec<usize> = if t.from == "*" {
            (0..states.len()).filter(|&s| Some(s) != to).collect()
        } else {
            match index(&states, &t.from) {
                Some(f) => {
                    if Some(f) == to {
                        errors.push(Problem::at(
                            &d.to_path,
                            format!("a transition from `{}` to itself changes nothing", t.from),
                        ));
                    }
                    vec![f]
                }
                None => {
                    errors.push(unknown_state(&d.from_path, &t.from, &states));
                    vec![]
                }
            }
        };
        let when = compile_expression(&t.when, &d.when_path, resolver, code, errors, true);
        let cooldown = match &t.cooldown {
            None => TimeDelta::zero(),
            Some(text) => match parse_duration(text) {
                Ok(c) if c <= MAX_COOLDOWN => c,
                Ok(_) => {
                    errors.push(Problem::at(&d.cooldown_path, "must be at most 1d"));
                    TimeDelta::zero()
                }
                Err(e) => {
                    errors.push(Problem::in_expression(
                        &d.cooldown_path,
                        text,
                        e.offset,
                        e.message,
                    ));
                    TimeDelta::zero()
                }
            },
        };
        if let (Some(to), Some((when, metrics))) = (to, when) {
            for from in froms {
                if from == to {
                    continue;
                }
                transitions.push(CompiledTransition {
                    from,
                    to,
                    when,
                    text: t.when.clone(),
                    cooldown,
                    metrics: metrics.clone(),
                });
            }
        }
    }
    if states.len() > MAX_STATES {
        errors.push(Problem::at(
            "spec.states",
            format!(
                "has {} states; at most {MAX_STATES} are allowed",
                states.len()
            ),
        ));
    }
    if transitions.len() > MAX_TRANSITIONS {
        errors.push(Problem::at(
            "spec.transitions",
            format!(
                "make {} transitions (after `*` expands); at most {MAX_TRANSITIONS} are allowed",
                transitions.len()
            ),
        ));
    }
    for (i, t) in transitions.iter().enumerate() {
        states[t.from].outgoing.push(i);
    }

    let initial = match &draft.initial {
        None => {
            errors.push(Problem::at(
                &draft.initial_path,
                "is required: name the state a new policy starts in",
            ));
            0
        }
        Some(name) => index(&states, name).unwrap_or_else(|| {
            errors.push(unknown_state(&draft.initial_path, name, &states));
            0
        }),
    };

    if errors.is_empty() {
        warn_about_shape(&draft, &states, &transitions, initial, warnings);
    }
    (states, transitions, initial)
}

fn warn_about_shape(
    draft: &Draft,
    states: &[CompiledState],
    transitions: &[CompiledTransition],
    initial: usize,
    warnings: &mut Vec<Problem>,
) {
    let mut reached = vec![false; states.len()];
    let mut queue = VecDeque::from([initial]);
    reached[initial] = true;
    while let Some(s) = queue.pop_front() {
        for &t in &states[s].outgoing {
            let to = transitions[t].to;
            if !reached[to] {
                reached[to] = true;
                queue.push_back(to);
            }
        }
    }
    for (i, s) in states.iter().enumerate() {
        if !reached[i] {
            warnings.push(Problem::at(
                &draft.states[i].path,
                format!(
                    "state `{}` is unreachable from the initial state `{}`",
                    s.name, states[initial].name
                ),
            ));
        }
        if reached[i] && s.replicas.min() == 0 && s.outgoing.is_empty() && states.len() > 1 {
            warnings.push(Problem::at(
                &draft.states[i].path,
                format!(
                    "state `{}` can reach 0 replicas and has no transition out: the target would stay asleep",
                    s.name
                ),
            ));
        }
    }
}

fn unknown_state(path: &str, name: &str, states: &[CompiledState]) -> Problem {
    let known: Vec<&str> = states.iter().map(|s| s.name.as_str()).collect();
    Problem::at(
        path,
        format!("unknown state `{name}` (states: {})", known.join(", ")),
    )
}

fn is_state_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Parses, resolves and emits one expression, reporting problems at `path` with columns.
fn compile_expression(
    text: &str,
    path: &str,
    resolver: &mut Resolver<'_>,
    code: &mut CodeBuf,
    errors: &mut Vec<Problem>,
    condition: bool,
) -> Option<(Code, Vec<Metric>)> {
    if text.len() > MAX_EXPRESSION_BYTES {
        errors.push(Problem::at(
            path,
            format!(
                "is {} bytes long; at most {MAX_EXPRESSION_BYTES} are allowed",
                text.len()
            ),
        ));
        return None;
    }
    let node = match parse(text) {
        Ok(n) => n,
        Err(e) => {
            errors.push(Problem::in_expression(path, text, e.offset, e.message));
            return None;
        }
    };
    let before = resolver.errors.len();
    let expr = if condition {
        resolver.condition(&node)
    } else {
        resolver.number(&node)
    };
    for e in resolver.errors.drain(before..) {
        errors.push(Problem::in_expression(path, text, e.span.start, e.message));
    }
    let expr = expr?;
    match code.emit(&expr) {
        Ok(at) => Some((at, expr.metrics())),
        Err(e) => {
            errors.push(Problem::at(
                path,
                format!(
                    "is nested too deeply ({} values pending at once; at most {MAX_STACK}): split it or drop parentheses",
                    e.depth
                ),
            ));
            None
        }
    }
}

fn compile_replicas(
    d: &DraftState,
    resolver: &mut Resolver<'_>,
    code: &mut CodeBuf,
    errors: &mut Vec<Problem>,
) -> Option<Replicas> {
    match (&d.spec.replicas, &d.spec.range) {
        (Some(_), Some(_)) => {
            errors.push(Problem::at(
                &d.path,
                "give either `replicas` or `range`, not both",
            ));
            None
        }
        (None, None) => {
            errors.push(Problem::at(
                &d.path,
                "needs `replicas` (a fixed count) or `range` (min, max, metric, target)",
            ));
            None
        }
        (Some(n), None) => {
            if *n < 0 {
                errors.push(Problem::at(
                    &d.replicas_path,
                    format!("must not be negative (is {n})"),
                ));
                None
            } else {
                Some(Replicas::Fixed(*n as u32))
            }
        }
        (None, Some(r)) => compile_range(d, r, resolver, code, errors).map(Replicas::Range),
    }
}

fn compile_range(
    d: &DraftState,
    r: &RangeSpec,
    resolver: &mut Resolver<'_>,
    code: &mut CodeBuf,
    errors: &mut Vec<Problem>,
) -> Option<RangeRule> {
    let before = errors.len();
    let p = &d.range_path;
    let sub = |field: &str| {
        if p.ends_with(".range") {
            format!("{p}.{field}")
        } else {
            p.clone()
        }
    };
    if r.min < 0 {
        errors.push(Problem::at(
            sub("min"),
            format!("must not be negative (is {})", r.min),
        ));
    }
    if r.max < 1 {
        errors.push(Problem::at(
            sub("max"),
            format!("must be at least 1 (is {})", r.max),
        ));
    } else if r.min > r.max {
        errors.push(Problem::at(
            sub("max"),
            format!("must be at least min ({}), is {}", r.min, r.max),
        ));
    }
    if !(r.target.is_finite() && r.target > 0.0) {
        errors.push(Problem::at(
            sub("target"),
            format!("must be above 0 (is {})", r.target),
        ));
    }
    let tolerance = r.tolerance.unwrap_or(DEFAULT_TOLERANCE);
    if !(0.0..1.0).contains(&tolerance) {
        errors.push(Problem::at(
            sub("tolerance"),
            format!("must be at least 0 and below 1 (is {tolerance})"),
        ));
    }
    let up = compile_step(
        r.scale_up.as_ref(),
        DEFAULT_SCALE_UP,
        &sub("scaleUp"),
        errors,
    );
    let down = compile_step(
        r.scale_down.as_ref(),
        DEFAULT_SCALE_DOWN,
        &sub("scaleDown"),
        errors,
    );
    let metric = compile_expression(&r.metric, &d.metric_path, resolver, code, errors, false);
    if errors.len() > before {
        return None;
    }
    let (metric, metrics) = metric?;
    Some(RangeRule {
        min: r.min as u32,
        max: r.max as u32,
        metrics,
        metric,
        metric_text: r.metric.clone(),
        target: r.target,
        target_type: r.target_type.unwrap_or_default(),
        tolerance,
        up,
        down,
    })
}

fn compile_step(
    spec: Option<&StepSpec>,
    default: Step,
    path: &str,
    errors: &mut Vec<Problem>,
) -> Step {
    let Some(s) = spec else { return default };
    if s.max_step < 1 {
        errors.push(Problem::at(
            format!("{path}.maxStep"),
            format!("must be at least 1 (is {})", s.max_step),
        ));
    }
    let period =
        positive_duration(&s.period, &format!("{path}.period"), errors).unwrap_or(default.period);
    Step {
        max_step: s.max_step.max(1) as u32,
        period,
    }
}

fn positive_duration(text: &str, path: &str, errors: &mut Vec<Problem>) -> Option<TimeDelta> {
    match parse_duration(text) {
        Ok(d) if d > TimeDelta::zero() => Some(d),
        Ok(_) => {
            errors.push(Problem::at(path, "must be longer than zero"));
            None
        }
        Err(e) => {
            errors.push(Problem::in_expression(path, text, e.offset, e.message));
            None
        }
    }
}

fn bounded(
    value: Option<i32>,
    default: u32,
    range: std::ops::RangeInclusive<i64>,
    path: &str,
    errors: &mut Vec<Problem>,
) -> u32 {
    match value {
        None => default,
        Some(v) if range.contains(&(v as i64)) => v as u32,
        Some(v) => {
            errors.push(Problem::at(
                path,
                format!(
                    "must be between {} and {} (is {v})",
                    range.start(),
                    range.end()
                ),
            ));
            default
        }
    }
}

fn check_target(spec: &ScalingPolicySpec, errors: &mut Vec<Problem>) -> Option<WorkloadRef> {
    let workload = match workload_ref(&spec.target) {
        Ok(w) => Some(w),
        Err(problems) => {
            errors.extend(problems);
            None
        }
    };
    if let Some(svc) = &spec.target.service
        && !is_dns_label(svc)
    {
        errors.push(Problem::at(
            "spec.target.service",
            format!("`{svc}` is not a valid Service name (lowercase letters, digits and `-`, at most 63)"),
        ));
    }
    workload
}

fn is_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

fn is_source_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// `spec.reports`: each query present is non-empty and its brackets and quotes match
/// (Prometheus checks the rest when the report runs, and the report says what it said).
fn check_report_queries(spec: &ScalingPolicySpec, errors: &mut Vec<Problem>) {
    let Some(r) = &spec.reports else { return };
    for (field, q) in [("latency", &r.latency), ("errorRate", &r.error_rate)] {
        let Some(q) = q else { continue };
        let path = format!("spec.reports.{field}");
        if q.trim().is_empty() {
            errors.push(Problem::at(
                path,
                "must not be empty (leave the field out instead)",
            ));
        } else if let Err((offset, message)) = super::promql::check_brackets(q) {
            errors.push(Problem::in_expression(path, q, offset, message));
        }
    }
}

fn compile_sources(spec: &ScalingPolicySpec, errors: &mut Vec<Problem>) -> Vec<CompiledSource> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, s) in spec.metrics.prometheus.iter().enumerate() {
        let path = format!("spec.metrics.prometheus[{i}]");
        if !is_source_name(&s.name) {
            errors.push(Problem::at(
                format!("{path}.name"),
                format!("`{}` is not a valid metric name: lowercase letters, digits and `_`, starting with a letter", s.name),
            ));
        } else if RESERVED_WORDS.contains(&s.name.as_str())
            || BUILTIN_METRICS.iter().any(|(n, _)| *n == s.name)
        {
            errors.push(Problem::at(
                format!("{path}.name"),
                format!("`{}` is a reserved word of the policy language", s.name),
            ));
        } else if !seen.insert(s.name.as_str()) {
            errors.push(Problem::at(
                format!("{path}.name"),
                format!("duplicate source `{}`", s.name),
            ));
        }
        if s.query.trim().is_empty() {
            errors.push(Problem::at(format!("{path}.query"), "must not be empty"));
        }
        if let Some(server) = &s.server
            && !(server.starts_with("http://") || server.starts_with("https://"))
        {
            errors.push(Problem::at(
                format!("{path}.server"),
                format!("`{server}` is not an http:// or https:// URL"),
            ));
        }
        let timeout = s
            .timeout
            .as_deref()
            .map_or(DEFAULT_PROMETHEUS_TIMEOUT, |t| {
                positive_duration(t, &format!("{path}.timeout"), errors)
                    .unwrap_or(DEFAULT_PROMETHEUS_TIMEOUT)
            });
        if timeout > TimeDelta::seconds(60) {
            errors.push(Problem::at(format!("{path}.timeout"), "must be at most 1m"));
        }
        let interval = s
            .interval
            .as_deref()
            .map_or(DEFAULT_PROMETHEUS_INTERVAL, |t| {
                positive_duration(t, &format!("{path}.interval"), errors)
                    .unwrap_or(DEFAULT_PROMETHEUS_INTERVAL)
            });
        if interval < TimeDelta::seconds(1) || interval > TimeDelta::hours(1) {
            errors.push(Problem::at(
                format!("{path}.interval"),
                "must be between 1s and 1h",
            ));
        }
        if let Some(f) = s.fallback
            && !f.is_finite()
        {
            errors.push(Problem::at(
                format!("{path}.fallback"),
                "must be a finite number",
            ));
        }
        out.push(CompiledSource {
            name: s.name.clone(),
            query: s.query.clone(),
            server: s.server.clone(),
            timeout: timeout.to_std().unwrap_or(Duration::from_secs(2)),
            interval: interval.to_std().unwrap_or(Duration::from_secs(15)),
            stale_after: interval * 3 + timeout,
            fallback: s.fallback,
        });
    }
    out
}

fn check_alerts(spec: &ScalingPolicySpec, errors: &mut Vec<Problem>) -> Vec<String> {
    let mut seen = HashSet::new();
    for (i, a) in spec.metrics.alerts.iter().enumerate() {
        let path = format!("spec.metrics.alerts[{i}]");
        if a.is_empty() || a.chars().any(|c| c.is_whitespace() || c == '(' || c == ')') {
            errors.push(Problem::at(
                &path,
                format!("`{a}` is not a valid alert name"),
            ));
        } else if !seen.insert(a.as_str()) {
            errors.push(Problem::at(&path, format!("duplicate alert `{a}`")));
        }
    }
    spec.metrics.alerts.clone()
}
