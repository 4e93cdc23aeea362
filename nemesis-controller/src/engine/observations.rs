//! What the engine is told about the world at one instant: metric samples with their
//! times, events (wake-ups, alerts), and the target's replicas. Owns the shape and the
//! freshness rules; gathering the data is the reconciler's and the pollers' job.

use crate::policy::CompiledPolicy;
use crate::policy::compile::CONNECTIONS_STALE_AFTER;
use crate::policy::expr::Metric;
use crate::policy::program::Op;
use chrono::{DateTime, Utc};

/// How long a wake-up counts as demand. Wake-ups are pushed and evaluated at once, so this
/// only has to cover a missed or slow evaluation; held connections keep signalling demand
/// beyond it for as long as they wait. A wake-up must not count forever: one that came
/// in while warm would then block every later sleep.
pub const DEMAND_WINDOW: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// One value of a Prometheus source and when it was measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub value: f64,
    pub at: DateTime<Utc>,
}

/// The agents' counts for the target Service, summed over live agents.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionSample {
    pub active: f64,
    /// New connections per second over the policy's rate window.
    pub rate: f64,
    pub held: f64,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    /// The target's replicas (`/scale` spec).
    pub replicas: u32,
    pub ready_replicas: u32,
    /// `None`: no live agent reports this Service.
    pub connections: Option<ConnectionSample>,
    /// One entry per `CompiledPolicy::sources()`, in that order; `None` when the query
    /// failed or has not run.
    pub sources: Vec<Option<Sample>>,
    /// One entry per `CompiledPolicy::alerts()`: `Some(since)` while the alert fires.
    pub alerts: Vec<Option<DateTime<Utc>>>,
    /// The latest wake-up (an agent holding a connection for this Service).
    pub last_demand: Option<DateTime<Utc>>,
    /// When the target was last scaled up from zero.
    pub last_wake: Option<DateTime<Utc>>,
    /// Whether any pod became ready since `last_wake`.
    pub ready_since_wake: bool,
}

impl Observations {
    /// Empty observations sized for `policy`'s sources and alerts.
    pub fn for_policy(policy: &CompiledPolicy) -> Self {
        Self {
            sources: vec![None; policy.sources().len()],
            alerts: vec![None; policy.alerts().len()],
            ..Self::default()
        }
    }

    /// Sets a Prometheus source's sample by name; `false` if the policy has no such source.
    pub fn set_source(
        &mut self,
        policy: &CompiledPolicy,
        name: &str,
        sample: Option<Sample>,
    ) -> bool {
        let Some(i) = policy.source_index(name) else {
            return false;
        };
        if self.sources.len() <= i {
            self.sources.resize(policy.sources().len(), None);
        }
        self.sources[i] = sample;
        true
    }

    /// Marks an alert firing since `since` (or resolved with `None`); `false` if the
    /// policy does not declare it.
    pub fn set_alert(
        &mut self,
        policy: &CompiledPolicy,
        name: &str,
        since: Option<DateTime<Utc>>,
    ) -> bool {
        let Some(i) = policy.alert_index(name) else {
            return false;
        };
        if self.alerts.len() <= i {
            self.alerts.resize(policy.alerts().len(), None);
        }
        self.alerts[i] = since;
        true
    }

    /// A metric's value as conditions see it at `now`: stale or missing samples are
    /// `None`, unless the source declares a fallback.
    pub fn metric(&self, policy: &CompiledPolicy, m: Metric, now: DateTime<Utc>) -> Option<f64> {
        let v = self.metric_ms(policy, m, now.timestamp_millis());
        (!v.is_nan()).then_some(v)
    }

    /// [`Self::metric`] on millisecond timestamps, NaN for missing: the engine's hot path.
    pub(crate) fn metric_ms(&self, policy: &CompiledPolicy, m: Metric, now_ms: i64) -> f64 {
        let conns = || {
            self.connections.filter(|c| {
                now_ms - c.at.timestamp_millis() <= CONNECTIONS_STALE_AFTER.num_milliseconds()
            })
        };
        let v = match m {
            Metric::ConnsActive => conns().map(|c| c.active),
            Metric::ConnsRate => conns().map(|c| c.rate),
            Metric::ConnsHeld => conns().map(|c| c.held),
            Metric::Replicas => Some(self.replicas as f64),
            Metric::ReadyReplicas => Some(self.ready_replicas as f64),
            Metric::Source(i) => {
                let i = i as usize;
                // The source's row in the policy's hot code (after the state headers).
                let Some(Op::Source { stale_ms, fallback }) =
                    policy.code.get(policy.states.len() + i).copied()
                else {
                    return f64::NAN;
                };
                self.sources
                    .get(i)
                    .copied()
                    .flatten()
                    .filter(|s| {
                        now_ms - s.at.timestamp_millis() <= i64::from(stale_ms)
                            && s.value.is_finite()
                    })
                    .map_or(fallback, |s| s.value)
                    .into()
            }
        };
        v.filter(|v| v.is_finite()).unwrap_or(f64::NAN)
    }

    /// A recent wake-up (within [`DEMAND_WINDOW`]) since `since`, or connections held
    /// right now.
    pub fn demand_since(&self, since: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        self.demand_since_ms(since.timestamp_millis(), now.timestamp_millis())
    }

    pub(crate) fn demand_since_ms(&self, since_ms: i64, now_ms: i64) -> bool {
        self.last_demand.is_some_and(|t| {
            let t = t.timestamp_millis();
            t >= since_ms && now_ms - t <= DEMAND_WINDOW.num_milliseconds()
        }) || self.connections.is_some_and(|c| {
            c.held > 0.0
                && now_ms - c.at.timestamp_millis() <= CONNECTIONS_STALE_AFTER.num_milliseconds()
        })
    }

    /// Pods were started by a wake and none has become ready since.
    pub fn awaiting_readiness(&self) -> bool {
        self.last_wake.is_some() && !self.ready_since_wake
    }
}
