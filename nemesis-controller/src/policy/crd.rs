//! The `ScalingPolicy` custom resource (`nemesis.dev/v1alpha1`): the Rust types are the
//! source of the CRD YAML (`nemesis-controller crd`, `cargo xtask gen`). Owns the wire
//! shape and defaults; it never validates (see `compile`) and never talks to the API.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A scaling automaton for one workload (a Deployment, a StatefulSet or any resource with
/// a `/scale` subresource): states with replica counts, and transitions
/// between them on conditions over connection counts, Prometheus queries, alerts,
/// schedules and wake-ups. Only `target` plus the short-form fields (`minReplicas`,
/// `maxReplicas`, `idleTimeout`, `targetMetric`, `targetValue`) gives the classic
/// zero <-> warm automaton.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[kube(
    group = "nemesis.dev",
    version = "v1alpha1",
    kind = "ScalingPolicy",
    plural = "scalingpolicies",
    shortname = "spol",
    namespaced,
    status = "ScalingPolicyStatus",
    derive = "PartialEq",
    doc = "A scaling automaton for one scalable workload (Deployment, StatefulSet, or any resource with a /scale subresource), run by the Nemesis controller.",
    // The JSON form: clippy reads repeated `type_ = ...` in the structured form as
    // duplicated attributes.
    // From the status: the spec has two spellings (`deployment`, or `kind` and `name`)
    // and a column reads one path.
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.target"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.desiredReplicas"}"#,
    // A policy that cannot act (invalid, target missing) has no state yet: without these
    // its row would be blank; `-o wide` adds why.
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicySpec {
    /// What is scaled, and whose traffic is watched and held.
    pub target: TargetRef,

    /// Where conditions read their values from.
    #[serde(default, skip_serializing_if = "MetricSources::is_empty")]
    pub metrics: MetricSources,

    /// The automaton's states (long form). Leave empty to use the short form.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<StateSpec>,

    /// Transitions between states, tried in order; the first whose condition holds fires.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transitions: Vec<TransitionSpec>,

    /// The state a new policy starts in (long form; required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_state: Option<String>,

    /// Short form: the lowest replica count. 0 (the default) scales to zero after
    /// `idleTimeout`; 1 or more keeps a single warm state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<i32>,

    /// Short form: the highest replica count while warm (defaults to 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas: Option<i32>,

    /// Short form: how long without open or new connections before scaling to zero
    /// (`30s`, `10m`, `1h`; default `5m`). Shorter than a minute, `conns.rate` is
    /// averaged over the idle timeout instead of the default minute; a
    /// `metrics.connections.rateWindow` longer than `idleTimeout` is refused (the target
    /// would sleep a rate window after its last connection). Agents report every few
    /// seconds, so the idle time is measured to within a heartbeat (5 s by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,

    /// Short form: the metric expression that sizes the warm state (default
    /// `conns.active`), compared per replica with `targetValue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_metric: Option<String>,

    /// Short form: the value of `targetMetric` one replica should carry; needed when
    /// `maxReplicas` is above the warm minimum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_value: Option<f64>,

    /// How long the target's pods may take to become ready after a wake-up (default
    /// `10m`). A target whose pods have not become ready since the wake is never scaled
    /// back to zero; past the budget the policy reports it. The agents hold the callers
    /// of a sleeping target this long too, unless `holdTimeoutSeconds` is set: set the
    /// budget to the slowest start-up you expect (a model load on a fresh GPU node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_budget: Option<String>,

    /// How long an agent holds a connection while the target wakes, in seconds (1 to
    /// 3600; default: the whole `readinessBudget`). Set it shorter when callers would
    /// rather get a quick `503` with `Retry-After` than wait for a slow start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_timeout_seconds: Option<i32>,

    /// How many connections one agent holds for this Service at most (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_held_connections: Option<i32>,

    /// `true` stops the policy: the controller scales nothing and makes no transition
    /// (a manual `kubectl scale` stays), and the agents hold no connection for the
    /// Service (at zero replicas it refuses connections, as in plain Kubernetes). Set it
    /// back to `false` to resume in the state the status shows; the target is then put
    /// where that state wants it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,

    /// How the agents spread new connections over the target Service's ready backends
    /// (balance mode, the agents' default data path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<LoadBalancingSpec>,
    /// Prometheus queries charted in this Service's reports beside the agents' figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reports: Option<ReportQueries>,
}

/// `spec.loadBalancing`: the algorithm, slow start and topology preference of balance
/// mode. Every field is optional.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancingSpec {
    /// `p2c` (the default: two random backends, the one with fewer open connections),
    /// `leastConnections`, `roundRobin` or `random`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// A newly ready backend's share of new connections ramps up linearly over this
    /// window (`30s`, at most `1h`; default none), for servers that warm caches or JIT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<String>,
    /// Prefer backends on the caller's node; new connections spill over to the others
    /// when the local ones carry well above the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefer_same_node: Option<bool>,
    /// Prefer backends in the caller's zone (the agent's `--zone`), with the same
    /// spill-over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefer_same_zone: Option<bool>,
}

/// PromQL range queries a report charts for the Service, over the report's window at its
/// step, against the controller's `--prometheus-url`. Each must return one series (wrap
/// it in `sum(...)`, `histogram_quantile(...)`, ...). `$namespace` is replaced by the
/// policy's namespace, `$pod` by a regular expression matching the target's pods and
/// `$range` by the report's step (at least a minute).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportQueries {
    /// The Service's latency, e.g. `histogram_quantile(0.99, sum by (le)
    /// (rate(http_request_duration_seconds_bucket{namespace="$namespace"}[5m])))`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<String>,
    /// The Service's error rate, e.g. `sum(rate(http_requests_total{code=~"5.."}[5m]))`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<String>,
}

/// What is scaled: `kind` and `name` (and `apiVersion` unless the kind is Deployment or
/// StatefulSet) of any resource with a `/scale` subresource in the policy's namespace,
/// or `deployment: <name>` for a Deployment. The controller finds the kind through API
/// discovery; readiness is read from the resource's status (`readyReplicas` for
/// Deployments and StatefulSets) or its `/scale` selector's ready pods. When a
/// HorizontalPodAutoscaler scales the same target, the policy only moves it between zero
/// and the HPA's `minReplicas` and leaves the range above to the HPA.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Shorthand for `kind: Deployment, name: <this>`; give it or `kind` and `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// The target's kind: `Deployment`, `StatefulSet`, or a custom resource's kind (an
    /// Argo `Rollout`) whose API serves `/scale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The kind's `group/version` (`argoproj.io/v1alpha1`); defaults to `apps/v1` for
    /// Deployment and StatefulSet, required for every other kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// The target's name, in the policy's namespace (with `kind`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The Service whose connections are counted and held while the target is at zero.
    /// Needed for `conns.*` and `demand`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricSources {
    /// The agents' connection counts (`conns.active`, `conns.rate`, `conns.held`); always
    /// available when `target.service` is set, this only tunes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<ConnectionsSource>,
    /// PromQL instant queries; each is a metric named by its `name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prometheus: Vec<PrometheusSource>,
    /// Alertmanager alert names this policy reacts to with `alert(Name)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
}

impl MetricSources {
    pub fn is_empty(&self) -> bool {
        self.connections.is_none() && self.prometheus.is_empty() && self.alerts.is_empty()
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionsSource {
    /// The window `conns.rate` is averaged over (default `1m`, or the short form's
    /// `idleTimeout` when shorter); in the short form, at most `idleTimeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_window: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSource {
    /// The metric's name in conditions (`queue > 20`): lowercase letters, digits, `_`.
    pub name: String,
    /// A PromQL instant query returning one number (a scalar or a one-sample vector).
    pub query: String,
    /// The Prometheus base URL; defaults to the controller's `--prometheus-url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// How long one query may take (default `2s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// How often the query runs (default `15s`); a sample older than three intervals
    /// counts as missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// The value conditions see when the query fails, times out or returns nothing.
    /// Without it the policy holds: transitions that read this metric do not fire and
    /// range states keep their replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<f64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateSpec {
    /// Letters, digits, `-` and `_`; unique within the policy.
    pub name: String,
    /// A fixed replica count (give this or `range`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Replicas driven by a metric within min..max (give this or `replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<RangeSpec>,
}

/// Replicas follow a metric as the HPA does: `desired = ceil(current * metric / target)`
/// (`targetType: Value`) or `ceil(metric / target)` (`AverageValue`: the target is per
/// replica), within min..max, unchanged while within `tolerance` of the target, and moved
/// at most `maxStep` replicas per `period` each way.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RangeSpec {
    /// The fewest replicas (0 allows the formula to reach zero).
    pub min: i32,
    pub max: i32,
    /// A metric expression, e.g. `queue` or `queue / 2`.
    pub metric: String,
    /// The metric's target value (per replica with `AverageValue`).
    pub target: f64,
    /// `Value` (default) or `AverageValue`.
    // The schema of the enum itself, not of `Option`: kube's derive puts
    // `nullable: true` beside an `enum` that lacks null, and a real API server then
    // refuses `targetType: null` ("Unsupported value: null"). Without `nullable` it
    // prunes a null as unset, which is what `None` means here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "TargetType")]
    pub target_type: Option<TargetType>,
    /// Relative distance from the target within which nothing changes (default 0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    /// Default: 4 replicas per 15s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<StepSpec>,
    /// Default: 1 replica per 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<StepSpec>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum TargetType {
    /// `desired = ceil(current * metric / target)`: the metric is a per-replica level.
    #[default]
    Value,
    /// `desired = ceil(metric / target)`: the metric is a total, the target per replica.
    AverageValue,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepSpec {
    /// The most replicas added (or removed) within one period.
    pub max_step: i32,
    /// `15s`, `1m`, ...
    pub period: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransitionSpec {
    /// A state name, or `*` for every state other than `to`.
    pub from: String,
    /// The state entered when `when` holds.
    pub to: String,
    /// A condition, e.g. `queue > 20 for 30s`, `conns.active == 0 for 10m`, `demand`,
    /// `alert(GPUPressure)`, `schedule("0 8 * * MON-FRI", "Europe/Paris", for 10h)`.
    pub when: String,
    /// The transition waits this long after the policy last changed state or replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The automaton's current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// When the current state was entered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_since: Option<DateTime<Utc>>,
    /// The replicas the policy wants now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// The last state change, with its reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<TransitionRecord>,
    /// The latest value of every metric the policy reads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricValue>,
    /// The target as `Kind/name` (the `Target` column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The HorizontalPodAutoscaler that scales the same target, if any: the policy then
    /// scales only between zero and its `minReplicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub horizontal_pod_autoscaler: Option<String>,
    /// `Ready` (the policy runs), `Invalid` (rejected, with the reason) and
    /// `HorizontalPodAutoscaler` (an HPA shares the target).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `for` windows running in the current state: a controller that takes over
    /// (a new leader, a restart) resumes them for the same generation and state, so a
    /// transition fires at its original deadline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<ForWindow>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForWindow {
    /// The `for` clause, counted from 0 in the order the policy's conditions give them.
    pub clause: u32,
    /// Since when its condition has held without a break.
    pub since: DateTime<Utc>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransitionRecord {
    pub from: String,
    /// The state entered when `when` holds.
    pub to: String,
    pub at: DateTime<Utc>,
    /// The condition that fired, with the values it saw.
    pub reason: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricValue {
    /// As conditions name it (`conns.active`, `queue`).
    pub name: String,
    /// Absent when the metric is missing (no agent reports, the query failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}

/// The CRD as YAML, exactly as committed in `manifests/crd/scalingpolicy.yaml`.
pub fn crd_yaml() -> String {
    let mut crd = serde_json::to_value(ScalingPolicy::crd()).expect("a CRD is JSON");
    reflow_descriptions(&mut crd);
    let body = serde_norway::to_string(&crd).expect("a CRD always serializes to YAML");
    format!(
        "# Generated from nemesis-controller/src/policy/crd.rs by `cargo xtask gen`; do not edit.\n{body}"
    )
}

/// Joins the lines of each paragraph of every `description` (doc comments wrap at 90
/// columns; `kubectl explain` wraps again and kept those breaks mid-sentence). Blank
/// lines and list items (`- `) keep their breaks.
pub(crate) fn reflow_descriptions(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                match x {
                    serde_json::Value::String(text) if k == "description" => {
                        *text = reflow(text);
                    }
                    _ => reflow_descriptions(x),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(reflow_descriptions),
        _ => {}
    }
}

fn reflow(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut previous_blank = true;
    for line in text.lines() {
        let blank = line.trim().is_empty();
        let list_item = line.trim_start().starts_with("- ");
        if !out.is_empty() {
            if blank || previous_blank || list_item {
                out.push('\n');
            } else {
                out.push(' ');
            }
        }
        out.push_str(if blank { "" } else { line.trim_end() });
        previous_blank = blank;
    }
    out
}
