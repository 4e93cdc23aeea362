//! What a policy's status says, built from the engine's state and the actor's findings,
//! and when it is worth a write: at once when anything but the metric values changed,
//! the metric values at most every status interval. Pure; the actor patches.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::policy::crd::{ForWindow, MetricValue, ScalingPolicyStatus, TransitionRecord};
use crate::policy::status::{CONDITION_READY, policy_conditions};
use crate::policy::{CompiledPolicy, InvalidPolicy, WorkloadRef};
use crate::reconcile::hpa::{CONDITION_HPA, HpaView};
use crate::reconcile::prom::SourceError;

/// The condition saying whether the policy's PromQL sources answer.
pub const CONDITION_PROMETHEUS: &str = "PrometheusQueries";

/// One PromQL source as the `PrometheusQueries` condition reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceHealth {
    pub name: String,
    pub fallback: Option<f64>,
    /// Why its latest query failed; `None`: it answered (or has not run yet).
    pub error: Option<SourceError>,
}

/// Why a valid policy cannot act right now (the `Ready` condition turns `False`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// PascalCase, e.g. `TargetNotFound`.
    pub reason: &'static str,
    pub message: String,
}

/// Everything a status is built from.
pub struct Input<'a> {
    pub compiled: Result<&'a CompiledPolicy, &'a InvalidPolicy>,
    pub generation: Option<i64>,
    pub previous: &'a ScalingPolicyStatus,
    /// The engine's state name and since when (`None`: not running).
    pub state: Option<(String, DateTime<Utc>)>,
    /// The running `for` windows (clause, since) of that state.
    pub windows: Vec<(u32, DateTime<Utc>)>,
    pub desired: Option<u32>,
    pub last_transition: Option<TransitionRecord>,
    pub metrics: Vec<(String, Option<f64>)>,
    pub blocked: Option<Blocked>,
    /// Appended to the `Ready` message (a failing PromQL source, a refused sleep).
    pub notes: Vec<String>,
    /// What the policy scales (`None` while invalid).
    pub target: Option<&'a WorkloadRef>,
    /// The HPA that shares the target, if any.
    pub hpa: Option<&'a HpaView>,
    /// The policy's PromQL sources (none: no `PrometheusQueries` condition).
    pub sources: Vec<SourceHealth>,
    pub now: DateTime<Utc>,
}

/// `PrometheusQueries`: `True` while every source answers; `False` with the first
/// failing source's kind of failure as the reason, and for each failing source what it
/// runs on (its declared fallback, or nothing: the policy holds) and the error.
fn prometheus_condition(sources: &[SourceHealth]) -> Option<(&'static str, &'static str, String)> {
    if sources.is_empty() {
        return None;
    }
    let failing: Vec<&SourceHealth> = sources.iter().filter(|s| s.error.is_some()).collect();
    let Some(first) = failing.first().and_then(|s| s.error.as_ref()) else {
        return Some((
            "True",
            "Answering",
            "every PromQL source answers".to_string(),
        ));
    };
    let parts: Vec<String> = failing
        .iter()
        .filter_map(|s| {
            let e = s.error.as_ref()?;
            let runs_on = match s.fallback {
                Some(f) => format!("on its fallback {f}"),
                None => "no fallback: holding".to_string(),
            };
            Some(format!(
                "source `{}` {runs_on} ({}): {}",
                s.name,
                e.failure.as_str(),
                e.message
            ))
        })
        .collect();
    Some(("False", first.failure.condition_reason(), parts.join("; ")))
}

pub fn build(input: Input<'_>) -> ScalingPolicyStatus {
    let mut conditions = policy_conditions(
        input.compiled,
        input.generation,
        &input.previous.conditions,
        input.now,
    );
    if let Some(ready) = conditions.iter_mut().find(|c| c.type_ == CONDITION_READY) {
        if let Some(b) = &input.blocked {
            set(
                ready,
                "False",
                b.reason,
                &b.message,
                &input.previous.conditions,
                input.now,
            );
        }
        if !input.notes.is_empty() {
            ready.message = format!("{}; {}", ready.message, input.notes.join("; "));
        }
    }
    if let Some((status, reason, message)) = prometheus_condition(&input.sources) {
        let mut c = Condition {
            type_: CONDITION_PROMETHEUS.to_string(),
            observed_generation: input.generation,
            status: String::new(),
            reason: String::new(),
            message: String::new(),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        };
        set(
            &mut c,
            status,
            reason,
            &message,
            &input.previous.conditions,
            input.now,
        );
        conditions.push(c);
    }
    if let (Some(h), Some(t)) = (input.hpa, input.target) {
        let mut c = Condition {
            type_: CONDITION_HPA.to_string(),
            observed_generation: input.generation,
            status: String::new(),
            reason: String::new(),
            message: String::new(),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        };
        set(
            &mut c,
            "True",
            "SharedWithHPA",
            &h.message(t),
            &input.previous.conditions,
            input.now,
        );
        conditions.push(c);
    }
    let (state, state_since, windows) = match input.state {
        Some((s, since)) => (
            Some(s),
            Some(since),
            input
                .windows
                .into_iter()
                .map(|(clause, since)| ForWindow { clause, since })
                .collect(),
        ),
        None => (
            input.previous.state.clone(),
            input.previous.state_since,
            input.previous.windows.clone(),
        ),
    };
    ScalingPolicyStatus {
        observed_generation: input.generation,
        state,
        state_since,
        desired_replicas: input
            .desired
            .map(|d| i32::try_from(d).unwrap_or(i32::MAX))
            .or(input.previous.desired_replicas),
        last_transition: input
            .last_transition
            .or_else(|| input.previous.last_transition.clone()),
        metrics: input
            .metrics
            .into_iter()
            .map(|(name, value)| MetricValue {
                name,
                value: value.filter(|v| v.is_finite()),
                at: Some(input.now),
            })
            .collect(),
        target: input.target.map(ToString::to_string),
        horizontal_pod_autoscaler: input.hpa.map(|h| h.name.clone()),
        conditions,
        windows,
    }
}

/// Sets a condition's status, reason and message; its `lastTransitionTime` moves only
/// when the status differs from the one in `previous`.
fn set(
    c: &mut Condition,
    status: &str,
    reason: &str,
    message: &str,
    previous: &[Condition],
    now: DateTime<Utc>,
) {
    c.status = status.to_string();
    c.reason = reason.to_string();
    c.message = message.to_string();
    c.last_transition_time = previous
        .iter()
        .find(|p| p.type_ == c.type_ && p.status == status)
        .map(|p| p.last_transition_time.clone())
        .unwrap_or_else(|| {
            Time(
                Timestamp::new(now.timestamp(), now.timestamp_subsec_nanos() as i32)
                    .unwrap_or(Timestamp::UNIX_EPOCH),
            )
        });
}

/// The status without its metric values: a change here is written at once.
pub fn significant(s: &ScalingPolicyStatus) -> ScalingPolicyStatus {
    ScalingPolicyStatus {
        metrics: s
            .metrics
            .iter()
            .map(|m| MetricValue {
                name: m.name.clone(),
                value: None,
                at: None,
            })
            .collect(),
        ..s.clone()
    }
}

/// Whether `new` should be written, given what was written last and how long ago.
pub fn worth_writing(
    new: &ScalingPolicyStatus,
    written: Option<&ScalingPolicyStatus>,
    since_written: Option<std::time::Duration>,
    interval: std::time::Duration,
) -> bool {
    match (written, since_written) {
        (Some(old), Some(age)) => {
            significant(old) != significant(new) || (age >= interval && values(old) != values(new))
        }
        _ => true,
    }
}

/// Whether `new` differs from `written` in more than the metric values (such a write
/// always goes; a values-only one waits for the [`WriteBudget`]).
pub fn significant_change(
    new: &ScalingPolicyStatus,
    written: Option<&ScalingPolicyStatus>,
) -> bool {
    written.is_none_or(|old| significant(old) != significant(new))
}

/// How many values-only status writes the whole controller makes per second, at most:
/// with 10,000 busy policies the status interval alone would allow 650 a second. The
/// values are for people reading `kubectl get`; a skipped write is retried at the
/// policy's next tick, so values stay at most a few intervals old.
pub const VALUE_WRITES_PER_SECOND: f64 = 20.0;

/// A token bucket shared by every policy's actor for values-only status writes. Time is
/// passed in; the bucket holds at most one second's worth.
#[derive(Debug)]
pub struct WriteBudget {
    per_second: f64,
    state: std::sync::Mutex<(f64, Option<std::time::Instant>)>,
}

impl WriteBudget {
    pub fn new(per_second: f64) -> Self {
        Self {
            per_second,
            state: std::sync::Mutex::new((per_second, None)),
        }
    }

    /// Takes one write from the budget if there is one left at `now`.
    pub fn take(&self, now: std::time::Instant) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *st;
        if let Some(l) = *last {
            let refill = now.saturating_duration_since(l).as_secs_f64() * self.per_second;
            *tokens = (*tokens + refill).min(self.per_second.max(1.0));
        }
        *last = Some(now);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The top-level status fields that differ between `old` and `new` (for the log).
pub fn changed_fields(old: &ScalingPolicyStatus, new: &ScalingPolicyStatus) -> Vec<String> {
    let (o, n) = (
        serde_json::to_value(old).unwrap_or_default(),
        serde_json::to_value(new).unwrap_or_default(),
    );
    let (Some(o), Some(n)) = (o.as_object(), n.as_object()) else {
        return vec![];
    };
    let mut keys: Vec<String> = o
        .keys()
        .chain(n.keys())
        .filter(|k| o.get(*k) != n.get(*k))
        .cloned()
        .collect();
    keys.dedup();
    keys
}

fn values(s: &ScalingPolicyStatus) -> Vec<Option<f64>> {
    s.metrics.iter().map(|m| m.value).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::TimeZone;

    use super::*;
    use crate::policy::compile;
    use crate::policy::crd::{ScalingPolicySpec, TargetRef};

    fn policy() -> CompiledPolicy {
        compile(&ScalingPolicySpec {
            target: TargetRef {
                deployment: Some("web".into()),
                service: Some("web".into()),
                ..Default::default()
            },
            idle_timeout: Some("1m".into()),
            ..Default::default()
        })
        .unwrap()
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
    }

    fn input<'a>(p: &'a CompiledPolicy, prev: &'a ScalingPolicyStatus) -> Input<'a> {
        Input {
            compiled: Ok(p),
            generation: Some(2),
            previous: prev,
            state: Some(("warm".into(), now())),
            windows: vec![],
            desired: Some(1),
            last_transition: None,
            metrics: vec![("conns.active".into(), Some(3.0))],
            blocked: None,
            notes: vec![],
            target: Some(p.workload()),
            hpa: None,
            sources: vec![],
            now: now(),
        }
    }

    #[test]
    fn failing_prometheus_sources_say_how_they_fail_and_what_they_run_on() {
        use crate::prometheus::PromFailure;
        let p = policy();
        let prev = ScalingPolicyStatus::default();
        let source = |name: &str, fallback, error: Option<(PromFailure, &str)>| SourceHealth {
            name: name.into(),
            fallback,
            error: error.map(|(failure, m)| SourceError {
                failure,
                message: m.into(),
            }),
        };
        let cond = |s: &ScalingPolicyStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == CONDITION_PROMETHEUS)
                .cloned()
        };
        assert!(
            cond(&build(input(&p, &prev))).is_none(),
            "no sources: no condition"
        );
        let ok = build(Input {
            sources: vec![source("queue", Some(20.0), None)],
            ..input(&p, &prev)
        });
        let c = cond(&ok).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "Answering")
        );
        let failing = build(Input {
            sources: vec![
                source("ok", None, None),
                source(
                    "queue",
                    Some(20.0),
                    Some((PromFailure::Timeout, "did not answer within 2s")),
                ),
                source(
                    "gpu",
                    None,
                    Some((PromFailure::Refused, "connection refused")),
                ),
            ],
            now: now() + chrono::TimeDelta::seconds(5),
            ..input(&p, &ok)
        });
        let c = cond(&failing).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Timeout"));
        assert_eq!(
            c.message,
            "source `queue` on its fallback 20 (timeout): did not answer within 2s; \
             source `gpu` no fallback: holding (refused): connection refused"
        );
        assert_ne!(
            c.last_transition_time,
            cond(&ok).unwrap().last_transition_time
        );
        assert!(significant_change(&failing, Some(&ok)), "written at once");
    }

    #[test]
    fn the_write_budget_refills_at_its_rate_and_holds_one_second_at_most() {
        let b = WriteBudget::new(2.0);
        let t0 = std::time::Instant::now();
        assert!(b.take(t0));
        assert!(b.take(t0));
        assert!(!b.take(t0), "two a second: the third waits");
        assert!(b.take(t0 + Duration::from_millis(500)));
        assert!(!b.take(t0 + Duration::from_millis(500)));
        // An hour idle refills one second's worth, not an hour's.
        let later = t0 + Duration::from_secs(3600);
        assert!(b.take(later) && b.take(later) && !b.take(later));
    }

    #[test]
    fn only_metric_values_changing_is_not_significant() {
        let p = policy();
        let prev = ScalingPolicyStatus::default();
        let a = build(input(&p, &prev));
        let mut b = a.clone();
        b.metrics[0].value = Some(4.0);
        assert!(!significant_change(&b, Some(&a)));
        assert!(significant_change(&b, None));
        b.state = Some("zero".into());
        assert!(significant_change(&b, Some(&a)));
    }

    #[test]
    fn an_hpa_on_the_target_is_named_in_the_status_and_a_condition() {
        let p = policy();
        let prev = ScalingPolicyStatus::default();
        let h = HpaView {
            name: "web-hpa".into(),
            min: 2,
            max: 6,
        };
        let s = build(Input {
            hpa: Some(&h),
            ..input(&p, &prev)
        });
        assert_eq!(s.target.as_deref(), Some("Deployment/web"));
        assert_eq!(s.horizontal_pod_autoscaler.as_deref(), Some("web-hpa"));
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_HPA)
            .unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "SharedWithHPA")
        );
        assert!(c.message.contains("between 0 and 2"), "{}", c.message);
        let gone = build(input(&p, &s));
        assert_eq!(gone.horizontal_pod_autoscaler, None);
        assert!(gone.conditions.iter().all(|c| c.type_ != CONDITION_HPA));
    }

    #[test]
    fn a_blocked_policy_is_not_ready_and_says_why() {
        let p = policy();
        let prev = ScalingPolicyStatus::default();
        let s = build(Input {
            blocked: Some(Blocked {
                reason: "TargetNotFound",
                message: "Deployment ns/web does not exist".into(),
            }),
            ..input(&p, &prev)
        });
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, "TargetNotFound");
        assert_eq!(s.state.as_deref(), Some("warm"));
        assert_eq!(s.desired_replicas, Some(1));
        assert_eq!(s.observed_generation, Some(2));
    }

    #[test]
    fn metric_values_alone_are_written_at_most_every_interval() {
        let p = policy();
        let prev = ScalingPolicyStatus::default();
        let a = build(input(&p, &prev));
        let mut i = input(&p, &prev);
        i.metrics = vec![("conns.active".into(), Some(4.0))];
        let b = build(i);
        let interval = Duration::from_secs(15);
        assert!(worth_writing(&a, None, None, interval));
        assert!(!worth_writing(
            &b,
            Some(&a),
            Some(Duration::from_secs(1)),
            interval
        ));
        assert!(worth_writing(&b, Some(&a), Some(interval), interval));
        assert!(!worth_writing(&a, Some(&a), Some(interval), interval));
        let mut i = input(&p, &prev);
        i.desired = Some(2);
        let c = build(i);
        assert!(worth_writing(&c, Some(&a), Some(Duration::ZERO), interval));
    }
}
