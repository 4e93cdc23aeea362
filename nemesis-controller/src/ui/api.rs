//! The UI's read-only JSON API (every route needs a session, see `guard`):
//!
//! - `GET /api/v1/policies`: every policy with its state, replicas, conditions and last
//!   transition;
//! - `GET /api/v1/policies/{namespace}/{name}`: the same for one, with its spec;
//! - `GET /api/v1/policies/{namespace}/{name}/history?window=24h`: transitions, scale
//!   events, cold starts (p50/p99 time to ready), time per state, replica-seconds and the
//!   replica and metric series over the window;
//! - `GET /api/v1/agents`, `GET /api/v1/alerts`.
//!
//! Times are Unix milliseconds. Store reads run on the blocking pool; views are built by
//! plain functions of what was read.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::UiState;
use super::error::HttpError;
use super::policies::id_of;
use crate::policy::ScalingPolicy;
use crate::policy::crd::ScalingPolicySpec;
use crate::policy::duration::parse_duration;
use crate::store::{
    ColdStartOutcome, ColdStartStats, MetricPoint, PolicyId, Store, StoreError, unix_ms,
};

/// The window a history or report covers unless the request names one.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Shorter windows say nothing a chart can show.
pub const MIN_WINDOW: Duration = Duration::from_secs(60);
/// Events are kept a year by default; a bit more covers a leap year.
pub const MAX_WINDOW: Duration = Duration::from_secs(400 * 24 * 3600);
/// The most recent events of each kind a history answer carries (a flapping policy can
/// have many; the counts and statistics still cover the whole window).
pub const MAX_EVENTS: usize = 2_000;
/// Points per chart series: about one per pixel column of a wide chart.
pub const MAX_POINTS: usize = 400;
/// The latest replica sample counts as current for this long: an unchanged value is
/// written again every [`crate::reconcile::thinning::REFRESH`], a change at once.
const CURRENT_SAMPLE_AGE: Duration =
    Duration::from_secs(crate::reconcile::thinning::REFRESH.as_secs() + 120);
/// Series a history answer carries besides the policy's own metrics.
pub const REPLICA_SERIES: [&str; 3] = [
    "nemesis.replicas",
    "nemesis.replicas.ready",
    "nemesis.replicas.desired",
];
/// A policy's own metrics charted at most (its status lists them).
const MAX_METRIC_SERIES: usize = 16;

// === windows ===

#[derive(Debug, Deserialize)]
pub struct WindowQuery {
    pub window: Option<String>,
    pub format: Option<String>,
}

/// A time window ending now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Window {
    pub from_ms: u64,
    pub to_ms: u64,
    pub seconds: u64,
}

impl Window {
    /// Parses `window` (`30m`, `24h`, `7d`; absent: 24 h) ending at `now_ms`.
    pub fn parse(text: Option<&str>, now_ms: u64) -> Result<Self, HttpError> {
        let len = match text.map(str::trim).filter(|t| !t.is_empty()) {
            None => DEFAULT_WINDOW,
            Some(t) => parse_duration(t)
                .ok()
                .and_then(|d| d.to_std().ok())
                .ok_or_else(|| {
                    HttpError::bad_request(format!(
                        "window: {t:?} is not a duration (e.g. 30m, 24h, 7d)"
                    ))
                })?,
        };
        if len < MIN_WINDOW || len > MAX_WINDOW {
            return Err(HttpError::bad_request(format!(
                "window: must be between 1m and 400d, is {}s",
                len.as_secs()
            )));
        }
        let ms = u64::try_from(len.as_millis()).unwrap_or(u64::MAX);
        Ok(Self {
            from_ms: now_ms.saturating_sub(ms),
            to_ms: now_ms,
            seconds: len.as_secs(),
        })
    }

    pub fn range(&self) -> Range<u64> {
        self.from_ms..self.to_ms
    }

    /// The window from `start_ms` on when that is inside it: nothing is known of a policy
    /// before it was created, and the figures must not count the time before as its
    /// first state (a policy a few minutes old showed 24 h at zero).
    pub fn starting_no_earlier_than(self, start_ms: Option<u64>) -> Self {
        match start_ms {
            Some(start) if start > self.from_ms && start < self.to_ms => Self {
                from_ms: start,
                to_ms: self.to_ms,
                seconds: ((self.to_ms - start) / 1000).max(1),
            },
            _ => self,
        }
    }
}

pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

pub(crate) fn query_error(r: QueryRejection) -> HttpError {
    HttpError::bad_request(format!("bad query string: {}", r.body_text()))
}

/// Runs store reads on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    doing: &'static str,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, HttpError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(HttpError::internal(doing, &e)),
        Err(e) => Err(HttpError::internal(doing, &e)),
    }
}

// === policies ===

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionView {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastTransitionView {
    pub from: String,
    pub to: String,
    pub at_ms: i64,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricView {
    pub name: String,
    pub value: Option<f64>,
    pub at_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    pub namespace: String,
    pub name: String,
    /// What the policy scales, as `Kind/name`.
    pub target: String,
    pub service: Option<String>,
    pub state: Option<String>,
    pub state_since_ms: Option<i64>,
    /// What the policy wants (its status).
    pub desired_replicas: Option<i32>,
    /// What the target had at the latest sample (within the last two minutes).
    pub replicas: Option<f64>,
    pub ready_replicas: Option<f64>,
    /// The `Ready` condition's status: the policy runs.
    pub ready: Option<bool>,
    /// The `Invalid` condition is `True`.
    pub invalid: bool,
    pub last_transition: Option<LastTransitionView>,
    pub conditions: Vec<ConditionView>,
    pub metrics: Vec<MetricView>,
    pub generation: Option<i64>,
    pub observed_generation: Option<i64>,
    /// `spec.paused`: the policy scales nothing until resumed.
    pub paused: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyList {
    /// False until the first list from the API server arrived.
    pub synced: bool,
    pub policies: Vec<PolicyView>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDetail {
    #[serde(flatten)]
    pub view: PolicyView,
    pub spec: ScalingPolicySpec,
    /// The automaton the spec compiles to (the short form expanded); `None` when the
    /// spec is invalid (the conditions say why).
    pub automaton: Option<AutomatonView>,
}

/// A policy's automaton as the diagram draws it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutomatonView {
    pub initial: String,
    pub states: Vec<AutomatonState>,
    pub transitions: Vec<AutomatonEdge>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutomatonState {
    pub name: String,
    /// `2`, or `1-5 following <metric> toward <target>`.
    pub replicas: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutomatonEdge {
    pub from: String,
    pub to: String,
    pub when: String,
    pub cooldown_seconds: i64,
}

/// The compiled automaton of `spec`, for the diagram.
pub fn automaton_view(spec: &ScalingPolicySpec) -> Option<AutomatonView> {
    use crate::policy::compile::{Replicas, compile};
    let c = compile(spec).ok()?;
    let name = |i: usize| c.states.get(i).map(|s| s.name.clone()).unwrap_or_default();
    Some(AutomatonView {
        initial: name(c.initial),
        states: c
            .states
            .iter()
            .map(|s| AutomatonState {
                name: s.name.clone(),
                replicas: match &s.replicas {
                    Replicas::Fixed(n) => n.to_string(),
                    Replicas::Range(r) => format!(
                        "{}-{} following {} toward {}",
                        r.min, r.max, r.metric_text, r.target
                    ),
                },
            })
            .collect(),
        transitions: c
            .transitions
            .iter()
            .map(|t| AutomatonEdge {
                from: name(t.from),
                to: name(t.to),
                when: t.text.clone(),
                cooldown_seconds: t.cooldown.num_seconds(),
            })
            .collect(),
    })
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// Latest replica counts from the samples, if recent enough.
#[derive(Debug, Clone, Copy, Default)]
pub struct Current {
    pub replicas: Option<f64>,
    pub ready: Option<f64>,
}

pub fn policy_view(p: &ScalingPolicy, current: Current) -> PolicyView {
    let id = id_of(p);
    let status = p.status.clone().unwrap_or_default();
    let conditions: Vec<ConditionView> = status
        .conditions
        .iter()
        .map(|c| ConditionView {
            kind: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            last_transition_ms: c.last_transition_time.0.as_millisecond(),
        })
        .collect();
    let cond = |kind: &str| conditions.iter().find(|c| c.kind == kind);
    PolicyView {
        namespace: id.namespace,
        name: id.name,
        target: crate::policy::target::workload_ref(&p.spec.target)
            .map(|w| w.to_string())
            .unwrap_or_else(|_| "(invalid target)".into()),
        service: p.spec.target.service.clone(),
        state: status.state.clone(),
        state_since_ms: status.state_since.map(ms),
        desired_replicas: status.desired_replicas,
        replicas: current.replicas,
        ready_replicas: current.ready,
        ready: cond("Ready").map(|c| c.status == "True"),
        invalid: cond("Invalid").is_some_and(|c| c.status == "True"),
        last_transition: status.last_transition.as_ref().map(|t| LastTransitionView {
            from: t.from.clone(),
            to: t.to.clone(),
            at_ms: ms(t.at),
            reason: t.reason.clone(),
        }),
        metrics: status
            .metrics
            .iter()
            .map(|m| MetricView {
                name: m.name.clone(),
                value: m.value,
                at_ms: m.at.map(ms),
            })
            .collect(),
        conditions,
        generation: p.metadata.generation,
        observed_generation: status.observed_generation,
        paused: p.spec.paused,
    }
}

/// The latest replica samples of each policy.
pub(crate) fn current_replicas(
    store: &Store,
    ids: &[PolicyId],
    now_ms: u64,
) -> Result<Vec<Current>, StoreError> {
    let since = now_ms.saturating_sub(CURRENT_SAMPLE_AGE.as_millis() as u64);
    let keys: Vec<(&PolicyId, &str)> = ids
        .iter()
        .flat_map(|id| [(id, "nemesis.replicas"), (id, "nemesis.replicas.ready")])
        .collect();
    let latest = store.latest_samples(&keys, since..now_ms + 1)?;
    let value =
        |p: &Option<MetricPoint>| p.as_ref().map(|p| p.value.mean()).filter(|v| v.is_finite());
    Ok(latest
        .chunks(2)
        .map(|pair| Current {
            replicas: value(&pair[0]),
            ready: value(&pair[1]),
        })
        .collect())
}

pub async fn policies(State(ui): State<UiState>) -> Result<Json<PolicyList>, HttpError> {
    let list = ui.sources.policies.list();
    let ids: Vec<PolicyId> = list.iter().map(|p| id_of(p)).collect();
    let store = ui.sources.store.clone();
    let now = now_ms();
    let current = blocking("reading replica samples", move || {
        current_replicas(&store, &ids, now)
    })
    .await?;
    Ok(Json(PolicyList {
        synced: ui.sources.policies.is_synced(),
        policies: list
            .iter()
            .zip(current)
            .map(|(p, c)| policy_view(p, c))
            .collect(),
    }))
}

/// Checks a namespace or name as Kubernetes spells them (DNS-1123: lowercase letters,
/// digits, `-` and `.`, at most 253 characters).
pub(crate) fn policy_id(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<PolicyId, HttpError> {
    let Path((namespace, name)) =
        path.map_err(|r| HttpError::bad_request(format!("bad path: {}", r.body_text())))?;
    for (what, v) in [("namespace", &namespace), ("name", &name)] {
        let ok = !v.is_empty()
            && v.len() <= 253
            && v.bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.'));
        if !ok {
            return Err(HttpError::bad_request(format!(
                "{what}: {v:?} is not a Kubernetes name (lowercase letters, digits, '-' and '.')"
            )));
        }
    }
    Ok(PolicyId::new(namespace, name))
}

pub async fn policy(
    State(ui): State<UiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<PolicyDetail>, HttpError> {
    let id = policy_id(path)?;
    let p = ui.sources.policies.get(&id).ok_or_else(|| {
        HttpError::not_found(format!(
            "no ScalingPolicy {id} (its history may still be there: .../history)"
        ))
    })?;
    let store = ui.sources.store.clone();
    let now = now_ms();
    let ids = vec![id];
    let current = blocking("reading replica samples", move || {
        current_replicas(&store, &ids, now)
    })
    .await?;
    Ok(Json(PolicyDetail {
        view: policy_view(&p, current.first().copied().unwrap_or_default()),
        spec: p.spec.clone(),
        automaton: automaton_view(&p.spec),
    }))
}

// === history ===

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransitionView {
    pub at_ms: u64,
    pub from: String,
    pub to: String,
    pub from_replicas: i32,
    pub to_replicas: i32,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleView {
    pub at_ms: u64,
    pub state: String,
    pub from_replicas: i32,
    pub to_replicas: i32,
    pub reason: String,
    /// Recorded by a later leader, which found the change made but not recorded (see
    /// `store::scales`); absent otherwise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ColdStartView {
    pub wake_at_ms: u64,
    pub time_to_ready_ms: Option<u64>,
    pub held_connections: u64,
    /// `ready`, `timeout` or `failed`.
    pub outcome: &'static str,
    pub message: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryView {
    pub namespace: String,
    pub name: String,
    pub window: Window,
    /// The policy is in the cache (false: deleted, or not seen yet).
    pub known: bool,
    /// The state and replicas when the window began (for timelines).
    pub state_at_start: Option<String>,
    pub replicas_at_start: Option<i32>,
    pub transitions: Vec<TransitionView>,
    pub scale_events: Vec<ScaleView>,
    pub cold_starts: Vec<ColdStartView>,
    /// Some lists hold only their most recent [`MAX_EVENTS`] entries.
    pub truncated: bool,
    pub transition_count: usize,
    pub scale_event_count: usize,
    pub cold_start_stats: ColdStartStats,
    pub time_in_states_ms: BTreeMap<String, u64>,
    pub replica_seconds: Option<f64>,
    /// Metric name -> `[unix ms, value]` points, averaged down to at most [`MAX_POINTS`].
    pub series: BTreeMap<String, Vec<[f64; 2]>>,
}

/// Averages points into at most `max` equal time buckets over `window`; non-finite
/// values are left out.
pub fn downsample(points: &[MetricPoint], window: Range<u64>, max: usize) -> Vec<[f64; 2]> {
    let span = window.end.saturating_sub(window.start).max(1);
    let max = max.max(1);
    let mut buckets: Vec<(f64, f64, u32)> = vec![(0.0, 0.0, 0); max];
    for p in points {
        let v = p.value.mean();
        if !v.is_finite() || p.at_ms < window.start || p.at_ms >= window.end {
            continue;
        }
        let i = (((p.at_ms - window.start) as u128 * max as u128) / span as u128) as usize;
        let b = &mut buckets[i.min(max - 1)];
        b.0 += p.at_ms as f64;
        b.1 += v;
        b.2 += 1;
    }
    buckets
        .into_iter()
        .filter(|b| b.2 > 0)
        .map(|(t, v, n)| [(t / f64::from(n)).round(), v / f64::from(n)])
        .collect()
}

fn outcome(o: &ColdStartOutcome) -> (&'static str, Option<String>) {
    match o {
        ColdStartOutcome::Ready => ("ready", None),
        ColdStartOutcome::Timeout => ("timeout", None),
        ColdStartOutcome::Failed { message } => ("failed", Some(message.clone())),
    }
}

fn keep_last<T>(mut v: Vec<T>, n: usize) -> (Vec<T>, bool) {
    if v.len() > n {
        v.drain(..v.len() - n);
        (v, true)
    } else {
        (v, false)
    }
}

/// Reads and builds a policy's history over `window`.
pub fn read_history(
    store: &Store,
    id: &PolicyId,
    window: Window,
    metrics: &[String],
    known: bool,
) -> Result<HistoryView, StoreError> {
    let range = window.range();
    let transitions = store.transitions(id, range.clone())?;
    let scales = store.scale_events(id, range.clone())?;
    let colds = store.cold_starts(id, range.clone())?;
    let time_in_states_ms = store.time_in_states(id, range.clone())?;
    let replica_seconds = store.replica_seconds(id, range.clone())?;
    let cold_start_stats = crate::store::reports::cold_start_stats(&colds);

    // Without a transition in the window, the state did not change: the one state the
    // time-per-state figures name is the state it started in.
    let state_at_start = transitions
        .first()
        .map(|t| t.from_state.clone())
        .or_else(|| {
            (time_in_states_ms.len() == 1)
                .then(|| time_in_states_ms.keys().next().cloned())
                .flatten()
        });
    let replicas_at_start = scales.first().map(|s| s.from_replicas).or_else(|| {
        replica_seconds
            .filter(|_| window.seconds > 0)
            .map(|rs| (rs / window.seconds as f64).round() as i32)
    });

    let mut series = BTreeMap::new();
    let names = REPLICA_SERIES
        .iter()
        .map(|s| s.to_string())
        .chain(metrics.iter().take(MAX_METRIC_SERIES).cloned());
    for name in names {
        let points = store.samples(id, &name, range.clone())?;
        let ds = downsample(&points, range.clone(), MAX_POINTS);
        if !ds.is_empty() {
            series.insert(name, ds);
        }
    }

    let transition_count = transitions.len();
    let scale_event_count = scales.len();
    let (transitions, t_cut) = keep_last(transitions, MAX_EVENTS);
    let (scales, s_cut) = keep_last(scales, MAX_EVENTS);
    let (colds, c_cut) = keep_last(colds, MAX_EVENTS);
    Ok(HistoryView {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        window,
        known,
        state_at_start,
        replicas_at_start,
        transitions: transitions
            .into_iter()
            .map(|t| TransitionView {
                at_ms: t.at_ms,
                from: t.from_state,
                to: t.to_state,
                from_replicas: t.from_replicas,
                to_replicas: t.to_replicas,
                reason: t.reason,
            })
            .collect(),
        scale_events: scales
            .into_iter()
            .map(|s| ScaleView {
                at_ms: s.at_ms,
                state: s.state,
                from_replicas: s.from_replicas,
                to_replicas: s.to_replicas,
                reason: s.reason,
                recovered: s.recovered,
            })
            .collect(),
        cold_starts: colds
            .into_iter()
            .map(|c| {
                let (outcome, message) = outcome(&c.outcome);
                ColdStartView {
                    wake_at_ms: c.wake_at_ms,
                    time_to_ready_ms: c.time_to_ready_ms,
                    held_connections: c.held_connections,
                    outcome,
                    message,
                }
            })
            .collect(),
        truncated: t_cut || s_cut || c_cut,
        transition_count,
        scale_event_count,
        cold_start_stats,
        time_in_states_ms,
        replica_seconds,
        series,
    })
}

pub async fn history(
    State(ui): State<UiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<WindowQuery>, QueryRejection>,
) -> Result<Json<HistoryView>, HttpError> {
    let id = policy_id(path)?;
    let Query(q) = query.map_err(query_error)?;
    let window = Window::parse(q.window.as_deref(), now_ms())?;
    let policy = ui.sources.policies.get(&id);
    let metrics: Vec<String> = policy
        .as_ref()
        .and_then(|p| p.status.as_ref())
        .map(|s| s.metrics.iter().map(|m| m.name.clone()).collect())
        .unwrap_or_default();
    let known = policy.is_some();
    let created_ms = policy
        .as_ref()
        .and_then(|p| p.metadata.creation_timestamp.as_ref())
        .and_then(|t| u64::try_from(t.0.as_millisecond()).ok());
    let window = window.starting_no_earlier_than(created_ms);
    let store = ui.sources.store.clone();
    let view = blocking("reading the policy's history", move || {
        read_history(&store, &id, window, &metrics, known)
    })
    .await?;
    Ok(Json(view))
}

// === agents and alerts ===

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentServiceView {
    pub namespace: String,
    pub name: String,
    pub mode: nemesis_common::wire::AppliedMode,
    pub applied_epoch: u64,
    pub open_connections: u64,
    pub held_connections: u64,
    pub connects_total: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    pub node: String,
    pub instance: String,
    pub live: bool,
    pub last_heartbeat_seconds_ago: f64,
    pub services: Vec<AgentServiceView>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentList {
    pub live: usize,
    pub agents: Vec<AgentView>,
}

/// `GET /api/v1/replication`: whether this instance's history is the leader's, or how
/// far behind it may be (a standby that cannot reach the leader says so here).
pub async fn replication(State(ui): State<UiState>) -> Json<crate::replication::ReplicationView> {
    Json(ui.replication.view())
}

pub async fn agents(State(ui): State<UiState>) -> Json<AgentList> {
    let now = Instant::now();
    let agents: Vec<AgentView> = ui
        .sources
        .registry
        .agents(now)
        .into_iter()
        .map(|a| AgentView {
            node: a.node,
            instance: a.instance,
            live: a.live,
            last_heartbeat_seconds_ago: now
                .saturating_duration_since(a.last_heartbeat)
                .as_secs_f64(),
            services: a
                .services
                .into_iter()
                .map(|s| AgentServiceView {
                    namespace: s.service.namespace,
                    name: s.service.name,
                    mode: s.mode,
                    applied_epoch: s.applied_epoch,
                    open_connections: s.open_connections,
                    held_connections: s.held_connections,
                    connects_total: s.connects_total,
                })
                .collect(),
        })
        .collect();
    Json(AgentList {
        live: agents.iter().filter(|a| a.live).count(),
        agents,
    })
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertView {
    pub name: String,
    pub firing: bool,
    pub since_ms: Option<i64>,
    pub instances: usize,
    /// Policies whose `metrics.alerts` name this alert (`namespace/name`).
    pub policies: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertList {
    /// The Alertmanager webhook is served (without it nothing can fire).
    pub webhook_configured: bool,
    /// Firing alerts first, then the ones policies wait for.
    pub alerts: Vec<AlertView>,
}

pub fn alert_views(
    firing: &crate::alerts::FiringAlerts,
    policies: &[Arc<ScalingPolicy>],
) -> Vec<AlertView> {
    let mut watchers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in policies {
        for a in &p.spec.metrics.alerts {
            watchers
                .entry(a.clone())
                .or_default()
                .push(id_of(p).to_string());
        }
    }
    let mut out: Vec<AlertView> = firing
        .values()
        .map(|a| AlertView {
            name: a.name.clone(),
            firing: true,
            since_ms: Some(ms(a.since)),
            instances: a.instances,
            policies: watchers.remove(&a.name).unwrap_or_default(),
        })
        .collect();
    out.extend(watchers.into_iter().map(|(name, policies)| AlertView {
        name,
        firing: false,
        since_ms: None,
        instances: 0,
        policies,
    }));
    out
}

pub async fn alerts(State(ui): State<UiState>) -> Json<AlertList> {
    Json(AlertList {
        webhook_configured: ui.sources.alert_webhook,
        alerts: alert_views(&ui.sources.alerts.firing(), &ui.sources.policies.list()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SampleValue;

    fn pt(at_ms: u64, value: f64) -> MetricPoint {
        MetricPoint {
            at_ms,
            value: SampleValue::Raw { value },
        }
    }

    #[test]
    fn windows_parse_the_policy_spelling_and_refuse_silly_lengths() {
        let w = Window::parse(Some("2h"), 10_000_000).unwrap();
        assert_eq!(
            (w.from_ms, w.to_ms, w.seconds),
            (2_800_000, 10_000_000, 7200)
        );
        assert_eq!(Window::parse(None, 100_000_000).unwrap().seconds, 86_400);
        for bad in ["abc", "10", "5s", "401d", "-1h"] {
            let e = Window::parse(Some(bad), 1).unwrap_err();
            assert_eq!(e.status, http::StatusCode::BAD_REQUEST, "{bad}");
            assert!(e.message.starts_with("window:"), "{}", e.message);
        }
    }

    #[test]
    fn downsampling_averages_per_bucket_and_skips_non_finite_values() {
        let pts = [
            pt(0, 1.0),
            pt(10, 3.0),
            pt(50, f64::NAN),
            pt(60, 5.0),
            pt(200, 9.0),
        ];
        let ds = downsample(&pts, 0..100, 2);
        assert_eq!(ds, vec![[5.0, 2.0], [60.0, 5.0]]);
        assert!(downsample(&[], 0..100, 10).is_empty());
        let many: Vec<MetricPoint> = (0..10_000).map(|i| pt(i, 1.0)).collect();
        assert_eq!(downsample(&many, 0..10_000, MAX_POINTS).len(), MAX_POINTS);
    }
}
