//! The controller's own Prometheus metrics (`nemesis_controller_*`), with label sets
//! bounded by enums. It only counts; it must never take a label value from user input or
//! error text (unbounded cardinality), and it serves nothing itself: the admin listener
//! calls [`ControllerMetrics::render`].

use nemesis_common::serve::RejectionCounter;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// What failed, for `nemesis_controller_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A Kubernetes API call other than a scale (get, watch, status patch).
    KubeApi,
    /// A `/scale` read or patch.
    Scale,
    /// A PromQL query (unreachable, timeout, bad query, non-scalar result).
    PrometheusQuery,
    /// The redb history.
    Store,
    /// A policy that did not validate.
    InvalidPolicy,
    /// Agents did not all acknowledge a hold before the deadline.
    AgentAckTimeout,
    /// Acquiring or renewing the leader Lease.
    LeaderElection,
    /// A standby pulling the leader's history (unreachable, refused, bad answer).
    Replication,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::KubeApi,
        ErrorKind::Scale,
        ErrorKind::PrometheusQuery,
        ErrorKind::Store,
        ErrorKind::InvalidPolicy,
        ErrorKind::AgentAckTimeout,
        ErrorKind::LeaderElection,
        ErrorKind::Replication,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::KubeApi => "kube_api",
            ErrorKind::Scale => "scale",
            ErrorKind::PrometheusQuery => "prometheus_query",
            ErrorKind::Store => "store",
            ErrorKind::InvalidPolicy => "invalid_policy",
            ErrorKind::AgentAckTimeout => "agent_ack_timeout",
            ErrorKind::LeaderElection => "leader_election",
            ErrorKind::Replication => "replication",
        }
    }
}

/// Which way a scale went, for `nemesis_controller_scale_operations_total{direction}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleDirection {
    /// 0 -> n.
    FromZero,
    /// n -> m with 0 < n < m.
    Up,
    /// n -> m with 0 < m < n.
    Down,
    /// n -> 0.
    ToZero,
}

impl ScaleDirection {
    /// The direction of a change from `from` to `to` replicas; `None` when equal.
    pub fn of(from: i32, to: i32) -> Option<Self> {
        use std::cmp::Ordering::*;
        match (from.cmp(&to), from <= 0, to <= 0) {
            (Equal, ..) => None,
            (Less, true, _) => Some(ScaleDirection::FromZero),
            (Less, false, _) => Some(ScaleDirection::Up),
            (Greater, _, true) => Some(ScaleDirection::ToZero),
            (Greater, _, false) => Some(ScaleDirection::Down),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ScaleDirection::FromZero => "from_zero",
            ScaleDirection::Up => "up",
            ScaleDirection::Down => "down",
            ScaleDirection::ToZero => "to_zero",
        }
    }
}

/// What one evaluation of a policy concluded, for `nemesis_controller_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionOutcome {
    /// Same state, same replicas.
    Unchanged,
    /// A transition to another state.
    Transition,
    /// Same state, different replicas (a range state following its metric).
    Rescale,
}

impl DecisionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionOutcome::Unchanged => "unchanged",
            DecisionOutcome::Transition => "transition",
            DecisionOutcome::Rescale => "rescale",
        }
    }
}

macro_rules! label_value_as_str {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    )*};
}
/// Why the UI refused a request, for `nemesis_controller_ui_refusals_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UiRefusal {
    /// No session, or it expired (401).
    Unauthenticated,
    /// An API token that is unknown, malformed or wrong (401).
    InvalidToken,
    /// An API token past its expiry (401).
    ExpiredToken,
    /// A role below what the route needs (403).
    Role,
    /// A change without the session's CSRF token (403).
    Csrf,
    /// A change from another site's page (403).
    CrossOrigin,
    /// A login with a wrong user name or password (401).
    WrongCredentials,
    /// A login over the per-address or global attempt limit (429).
    RateLimited,
    /// A login as a user name locked after wrong passwords (429).
    LockedOut,
}

impl UiRefusal {
    pub const ALL: [UiRefusal; 9] = [
        UiRefusal::Unauthenticated,
        UiRefusal::InvalidToken,
        UiRefusal::ExpiredToken,
        UiRefusal::Role,
        UiRefusal::Csrf,
        UiRefusal::CrossOrigin,
        UiRefusal::WrongCredentials,
        UiRefusal::RateLimited,
        UiRefusal::LockedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UiRefusal::Unauthenticated => "unauthenticated",
            UiRefusal::InvalidToken => "invalid_token",
            UiRefusal::ExpiredToken => "expired_token",
            UiRefusal::Role => "role",
            UiRefusal::Csrf => "csrf",
            UiRefusal::CrossOrigin => "cross_origin",
            UiRefusal::WrongCredentials => "wrong_credentials",
            UiRefusal::RateLimited => "rate_limited",
            UiRefusal::LockedOut => "locked_out",
        }
    }
}

/// Why the agent API refused a caller, for
/// `nemesis_controller_agent_auth_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentAuthRefusal {
    /// No `Authorization: Bearer` header (401).
    Missing,
    /// Not a JWT, or the API server did not authenticate it (forged, revoked) (401).
    InvalidToken,
    /// Past its expiry (401).
    ExpiredToken,
    /// Issued for another audience (401).
    WrongAudience,
    /// Authenticated, but not the agents' ServiceAccount (403).
    WrongServiceAccount,
    /// Not bound to a pod on a node (403).
    NoNode,
    /// A message about another node than the token's (403).
    OtherNode,
    /// The TokenReview could not be made (503).
    ReviewUnavailable,
}

impl AgentAuthRefusal {
    pub const ALL: [AgentAuthRefusal; 8] = [
        AgentAuthRefusal::Missing,
        AgentAuthRefusal::InvalidToken,
        AgentAuthRefusal::ExpiredToken,
        AgentAuthRefusal::WrongAudience,
        AgentAuthRefusal::WrongServiceAccount,
        AgentAuthRefusal::NoNode,
        AgentAuthRefusal::OtherNode,
        AgentAuthRefusal::ReviewUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentAuthRefusal::Missing => "missing",
            AgentAuthRefusal::InvalidToken => "invalid_token",
            AgentAuthRefusal::ExpiredToken => "expired_token",
            AgentAuthRefusal::WrongAudience => "wrong_audience",
            AgentAuthRefusal::WrongServiceAccount => "wrong_service_account",
            AgentAuthRefusal::NoNode => "no_node",
            AgentAuthRefusal::OtherNode => "other_node",
            AgentAuthRefusal::ReviewUnavailable => "review_unavailable",
        }
    }
}

/// What became of one notification, for `nemesis_controller_alert_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryOutcome {
    Delivered,
    /// Refused or unreachable; retried with backoff.
    Failed,
    /// Held back by the sink's rate limit; sent later.
    RateLimited,
}

impl DeliveryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Failed => "failed",
            DeliveryOutcome::RateLimited => "rate_limited",
        }
    }
}

label_value_as_str!(
    crate::prometheus::PromFailure,
    ErrorKind,
    ScaleDirection,
    DecisionOutcome,
    UiRefusal,
    DeliveryOutcome,
    AgentAuthRefusal
);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AgentAuthLabels {
    reason: AgentAuthRefusal,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UiRefusalLabels {
    reason: UiRefusal,
}

/// `sink` is a name from the administrator's sinks file (a handful), never user input.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DeliveryLabels {
    sink: String,
    outcome: DeliveryOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PromErrorLabels {
    reason: crate::prometheus::PromFailure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    kind: ErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ScaleLabels {
    direction: ScaleDirection,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    outcome: DecisionOutcome,
}

/// Wake latency buckets: 1 ms doubling to about 16 s. The goal is <= 10 ms to the scale
/// PATCH; the upper buckets catch a slow or struggling API server.
const WAKE_LATENCY_BUCKETS: (f64, f64, u16) = (0.001, 2.0, 15);

/// Cheap to clone; every clone updates the same series.
#[derive(Clone)]
pub struct ControllerMetrics {
    reconciles: Counter,
    errors: Family<ErrorLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    scale_operations: Family<ScaleLabels, Counter>,
    /// `nemesis_controller_scale_conflicts_total`: scales refused with 409 because the
    /// target changed since this controller's watch showed it (another writer).
    scale_conflicts: Counter,
    wake_latency: Histogram,
    live_agents: Gauge,
    leader: Gauge,
    /// `nemesis_controller_leadership_lost_total`: times this instance stopped leading
    /// without being asked to (no renewal within the renew deadline, or another holder).
    leadership_lost: Counter,
    ui_refusals: Family<UiRefusalLabels, Counter>,
    agent_auth_refused: Family<AgentAuthLabels, Counter>,
    alerts_raised: Counter,
    /// `nemesis_controller_prometheus_errors_total{reason}`: failed PromQL source queries.
    prometheus_errors: Family<PromErrorLabels, Counter>,
    /// `nemesis_controller_prometheus_failing_sources`: PromQL sources whose latest query
    /// failed, over the policies this instance runs (their fallback stands in).
    prometheus_failing_sources: Gauge,
    /// `nemesis_controller_history_write_errors_total`: history records not committed
    /// (disk full, I/O errors); they are retried, and the count says the disk needs care.
    history_write_errors: Counter,
    alert_deliveries: Family<DeliveryLabels, Counter>,
    alert_outbox_pending: Gauge,
    replication_lag: Gauge,
    replication_source_up: Gauge,
    replicated_records: Counter,
    /// `nemesis_controller_http_rejected_total{listener, reason}`: the listeners' limits.
    http_rejected: RejectionCounter,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for ControllerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerMetrics").finish_non_exhaustive()
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nemesis_controller");
        let reconciles = Counter::default();
        registry.register(
            "reconciles",
            "ScalingPolicy reconciliations run",
            reconciles.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "errors",
            "Errors by the kind of operation that failed",
            errors.clone(),
        );
        // Pre-create every series so a rate() sees 0 rather than a missing series.
        for kind in ErrorKind::ALL {
            let _ = errors.get_or_create(&ErrorLabels { kind });
        }
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Policy evaluations by what they concluded",
            decisions.clone(),
        );
        let scale_operations = Family::<ScaleLabels, Counter>::default();
        registry.register(
            "scale_operations",
            "Scale patches acknowledged by the API server, by direction",
            scale_operations.clone(),
        );
        let scale_conflicts = Counter::default();
        registry.register(
            "scale_conflicts",
            "Scales refused with 409 because the target changed since its watch showed it (another writer: a previous leader, an HPA); each is read again",
            scale_conflicts.clone(),
        );
        let (start, factor, len) = WAKE_LATENCY_BUCKETS;
        let wake_latency = Histogram::new(exponential_buckets(start, factor, len));
        registry.register(
            "wake_latency_seconds",
            "From a wake-up received from an agent to the scale-up acknowledged by the API server",
            wake_latency.clone(),
        );
        let live_agents = Gauge::default();
        registry.register(
            "live_agents",
            "Agents whose heartbeat lease has not expired",
            live_agents.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this instance holds the leader Lease and acts, else 0",
            leader.clone(),
        );
        let leadership_lost = Counter::default();
        registry.register(
            "leadership_lost",
            "Times this instance stopped leading without shutting down: no renewal within the renew deadline, or another holder took the Lease",
            leadership_lost.clone(),
        );
        let ui_refusals = Family::<UiRefusalLabels, Counter>::default();
        registry.register(
            "ui_refusals",
            "UI and UI API requests refused, by reason",
            ui_refusals.clone(),
        );
        for reason in UiRefusal::ALL {
            let _ = ui_refusals.get_or_create(&UiRefusalLabels { reason });
        }
        let agent_auth_refused = Family::<AgentAuthLabels, Counter>::default();
        registry.register(
            "agent_auth_refused",
            "Agent API requests refused by authentication, by reason",
            agent_auth_refused.clone(),
        );
        for reason in AgentAuthRefusal::ALL {
            let _ = agent_auth_refused.get_or_create(&AgentAuthLabels { reason });
        }
        let alerts_raised = Counter::default();
        registry.register(
            "alerts_raised",
            "Alerts raised by AlertRules (repeats of a firing alert not counted)",
            alerts_raised.clone(),
        );
        let prometheus_errors = Family::<PromErrorLabels, Counter>::default();
        registry.register(
            "prometheus_errors",
            "PromQL source queries that failed, by reason (refused, timeout, http_status, not_json, wrong_shape, ...)",
            prometheus_errors.clone(),
        );
        for reason in crate::prometheus::PromFailure::ALL {
            let _ = prometheus_errors.get_or_create(&PromErrorLabels { reason });
        }
        let prometheus_failing_sources = Gauge::default();
        registry.register(
            "prometheus_failing_sources",
            "PromQL sources whose latest query failed (their policy runs on the declared fallback, or holds)",
            prometheus_failing_sources.clone(),
        );
        let history_write_errors = Counter::default();
        registry.register(
            "history_write_errors",
            "History writes (transactions) that failed, e.g. with the volume full; the records are retried",
            history_write_errors.clone(),
        );
        let alert_deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "alert_deliveries",
            "Notifications to alert sinks, by sink and outcome",
            alert_deliveries.clone(),
        );
        let alert_outbox_pending = Gauge::default();
        registry.register(
            "alert_outbox_pending",
            "Alert deliveries waiting in the outbox (all sinks)",
            alert_outbox_pending.clone(),
        );
        let replication_lag = Gauge::default();
        registry.register(
            "history_replication_lag_records",
            "Records the leader holds that this standby had not pulled at its last pull (0 on the leader)",
            replication_lag.clone(),
        );
        let replication_source_up = Gauge::default();
        registry.register(
            "history_replication_source_up",
            "1 while this standby's last pull from the leader succeeded (1 on the leader), else 0",
            replication_source_up.clone(),
        );
        let replicated_records = Counter::default();
        registry.register(
            "history_replicated_records",
            "History records pulled from the leader and stored here",
            replicated_records.clone(),
        );
        let http_rejected = RejectionCounter::default();
        http_rejected.register(&mut registry, "http_rejected");
        Self {
            replication_lag,
            replication_source_up,
            replicated_records,
            http_rejected,
            alerts_raised,
            prometheus_errors,
            prometheus_failing_sources,
            history_write_errors,
            alert_deliveries,
            alert_outbox_pending,
            reconciles,
            errors,
            decisions,
            scale_operations,
            scale_conflicts,
            wake_latency,
            live_agents,
            leader,
            leadership_lost,
            ui_refusals,
            agent_auth_refused,
            registry: Arc::new(registry),
        }
    }

    /// What the HTTP listeners count their refusals in (see `nemesis_common::serve`).
    pub fn http_rejected(&self) -> &RejectionCounter {
        &self.http_rejected
    }

    /// A standby's state after a pull: records still behind, and whether the leader
    /// answered.
    pub fn set_replication(&self, behind: u64, source_up: bool) {
        self.replication_lag
            .set(i64::try_from(behind).unwrap_or(i64::MAX));
        self.replication_source_up.set(i64::from(source_up));
    }

    pub fn replicated(&self, records: u64) {
        self.replicated_records.inc_by(records);
    }

    pub fn reconciled(&self) {
        self.reconciles.inc();
    }

    pub fn ui_refused(&self, reason: UiRefusal) {
        self.ui_refusals
            .get_or_create(&UiRefusalLabels { reason })
            .inc();
    }

    pub fn agent_auth_refused(&self, reason: AgentAuthRefusal) {
        self.agent_auth_refused
            .get_or_create(&AgentAuthLabels { reason })
            .inc();
    }

    /// How many agent API requests were refused for `reason`.
    pub fn agent_auth_refusals(&self, reason: AgentAuthRefusal) -> u64 {
        self.agent_auth_refused
            .get_or_create(&AgentAuthLabels { reason })
            .get()
    }

    /// How many requests were refused for `reason` (tests and the UI's own checks).
    pub fn ui_refusals(&self, reason: UiRefusal) -> u64 {
        self.ui_refusals
            .get_or_create(&UiRefusalLabels { reason })
            .get()
    }

    /// A history write failed (also counted as a `store` error).
    pub fn history_write_failed(&self) {
        self.history_write_errors.inc();
        self.error(ErrorKind::Store);
    }

    /// A PromQL source query failed (also counted as a `prometheus_query` error).
    pub fn prometheus_failed(&self, reason: crate::prometheus::PromFailure) {
        self.prometheus_errors
            .get_or_create(&PromErrorLabels { reason })
            .inc();
        self.error(ErrorKind::PrometheusQuery);
    }

    /// How many source queries failed for `reason`.
    pub fn prometheus_failures(&self, reason: crate::prometheus::PromFailure) -> u64 {
        self.prometheus_errors
            .get_or_create(&PromErrorLabels { reason })
            .get()
    }

    /// A source started (`+1`) or stopped (`-1`) failing.
    pub fn prometheus_failing_sources_add(&self, delta: i64) {
        self.prometheus_failing_sources.inc_by(delta);
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    pub fn decided(&self, outcome: DecisionOutcome) {
        self.decisions
            .get_or_create(&DecisionLabels { outcome })
            .inc();
    }

    /// Counts a scale from `from` to `to` replicas (nothing when they are equal).
    pub fn scaled(&self, from: i32, to: i32) {
        if let Some(direction) = ScaleDirection::of(from, to) {
            self.scale_operations
                .get_or_create(&ScaleLabels { direction })
                .inc();
        }
    }

    /// A scale refused because the target changed since it was read.
    pub fn scale_conflict(&self) {
        self.scale_conflicts.inc();
    }

    /// Scales refused with 409 so far.
    pub fn scale_conflicts(&self) -> u64 {
        self.scale_conflicts.get()
    }

    pub fn observe_wake_latency(&self, latency: Duration) {
        self.wake_latency.observe(latency.as_secs_f64());
    }

    pub fn set_live_agents(&self, n: usize) {
        self.live_agents.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn leadership_lost(&self) {
        self.leadership_lost.inc();
    }

    pub fn alert_raised(&self) {
        self.alerts_raised.inc();
    }

    pub fn alert_delivery(&self, sink: &str, outcome: DeliveryOutcome) {
        self.alert_deliveries
            .get_or_create(&DeliveryLabels {
                sink: sink.to_string(),
                outcome,
            })
            .inc();
    }

    pub fn set_alert_outbox_pending(&self, n: usize) {
        self.alert_outbox_pending
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The OpenMetrics text exposition, for `GET /metrics` on the admin listener
    /// (content type `application/openmetrics-text; version=1.0.0; charset=utf-8`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`ControllerMetrics::render`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of one sample line, e.g. `series("x_total{kind=\"a\"}")`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_metric_is_rendered_with_its_prefixed_name_and_counts() {
        let m = ControllerMetrics::new();
        m.reconciled();
        m.reconciled();
        m.error(ErrorKind::PrometheusQuery);
        m.decided(DecisionOutcome::Transition);
        m.scaled(0, 3);
        m.scaled(3, 0);
        m.scaled(3, 3);
        m.observe_wake_latency(Duration::from_millis(3));
        m.set_live_agents(4);
        m.set_leader(true);
        m.leadership_lost();
        let t = m.clone().render();
        assert_eq!(
            sample(&t, "nemesis_controller_leadership_lost_total"),
            Some(1.0)
        );
        assert_eq!(sample(&t, "nemesis_controller_reconciles_total"), Some(2.0));
        assert_eq!(
            sample(
                &t,
                "nemesis_controller_errors_total{kind=\"prometheus_query\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "nemesis_controller_errors_total{kind=\"store\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &t,
                "nemesis_controller_decisions_total{outcome=\"transition\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "nemesis_controller_scale_operations_total{direction=\"from_zero\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "nemesis_controller_scale_operations_total{direction=\"to_zero\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "nemesis_controller_wake_latency_seconds_count"),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "nemesis_controller_wake_latency_seconds_bucket{le=\"0.004\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "nemesis_controller_wake_latency_seconds_bucket{le=\"0.002\"}"
            ),
            Some(0.0)
        );
        assert_eq!(sample(&t, "nemesis_controller_live_agents"), Some(4.0));
        assert_eq!(sample(&t, "nemesis_controller_leader"), Some(1.0));
        assert!(t.ends_with("# EOF\n"));
    }

    #[test]
    fn scale_direction_names_zero_crossings_apart() {
        assert_eq!(ScaleDirection::of(0, 1), Some(ScaleDirection::FromZero));
        assert_eq!(ScaleDirection::of(1, 2), Some(ScaleDirection::Up));
        assert_eq!(ScaleDirection::of(2, 1), Some(ScaleDirection::Down));
        assert_eq!(ScaleDirection::of(2, 0), Some(ScaleDirection::ToZero));
        assert_eq!(ScaleDirection::of(2, 2), None);
    }
}
