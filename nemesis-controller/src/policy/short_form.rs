//! The short form (`minReplicas`, `maxReplicas`, `idleTimeout`, `targetMetric`,
//! `targetValue`) expanded into the classic automaton:
//!
//! ```text
//! zero (0 replicas) --[demand or conns.active > 0]--> warm
//! warm (1..max)     --[(conns.active == 0 and conns.held == 0) for idleTimeout
//!                       and conns.rate == 0 for (idleTimeout - rateWindow)]--> zero
//! ```
//! starting in `warm`, so a new policy never cuts a running Deployment off without an idle
//! window first. `conns.rate` reads 0 only a rate window after the last connect, so it is
//! sustained for the rest of the idle timeout only: the target sleeps `idleTimeout` after
//! its last connection, not `idleTimeout + rateWindow`. An idle timeout shorter than the
//! default rate window (1m) makes it the rate window; shorter than a rate window the spec
//! sets, it is refused (the rate window would set the idle time: a 20s policy slept 65 s
//! after its last connection). With `minReplicas >= 1` there is only `warm`. Owns that
//! expansion only; the expanded states are validated like hand-written ones.

use super::compile::{DEFAULT_RATE_WINDOW, Draft, DraftState, DraftTransition};
use super::crd::{RangeSpec, ScalingPolicySpec, StateSpec, TargetType, TransitionSpec};
use super::duration::{format_duration, parse_duration};
use super::problem::Problem;
use chrono::TimeDelta;

/// KEDA's default cooldown before scaling to zero; long enough to ride out a pause
/// between bursts, short enough that an idle service stops costing within minutes.
pub const DEFAULT_IDLE_TIMEOUT: TimeDelta = TimeDelta::minutes(5);

/// The metric the warm state follows when the short form names none.
pub const DEFAULT_TARGET_METRIC: &str = "conns.active";

pub const ZERO_STATE: &str = "zero";
pub const WARM_STATE: &str = "warm";

/// Whether the spec uses any short-form field.
pub fn is_short_form(spec: &ScalingPolicySpec) -> bool {
    spec.min_replicas.is_some()
        || spec.max_replicas.is_some()
        || spec.idle_timeout.is_some()
        || spec.target_metric.is_some()
        || spec.target_value.is_some()
}

/// Expands the short form; problems name the short-form fields.
pub fn expand(
    spec: &ScalingPolicySpec,
    errors: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Option<Draft> {
    let before = errors.len();
    let min = spec.min_replicas.unwrap_or(0);
    if min < 0 {
        errors.push(Problem::at(
            "spec.minReplicas",
            format!("must not be negative (is {min})"),
        ));
    }
    let warm_min = min.max(1);
    let max = spec.max_replicas.unwrap_or(warm_min);
    if max < 1 {
        errors.push(Problem::at(
            "spec.maxReplicas",
            format!("must be at least 1 (is {max})"),
        ));
    } else if max < min {
        errors.push(Problem::at(
            "spec.maxReplicas",
            format!("must be at least minReplicas ({min}), is {max}"),
        ));
    }
    let idle = match &spec.idle_timeout {
        None => DEFAULT_IDLE_TIMEOUT,
        Some(text) => match parse_duration(text) {
            Ok(d) if d >= TimeDelta::seconds(1) => d,
            Ok(_) => {
                errors.push(Problem::at("spec.idleTimeout", "must be at least 1s"));
                DEFAULT_IDLE_TIMEOUT
            }
            Err(e) => {
                errors.push(Problem::in_expression(
                    "spec.idleTimeout",
                    text,
                    e.offset,
                    e.message,
                ));
                DEFAULT_IDLE_TIMEOUT
            }
        },
    };
    if min > 0 && spec.idle_timeout.is_some() {
        errors.push(Problem::at(
            "spec.idleTimeout",
            format!("only applies when scaling to zero, which needs minReplicas: 0 (is {min})"),
        ));
    }
    if min == 0 && spec.target.service.is_none() {
        errors.push(Problem::at(
            "spec.target.service",
            "the short form wakes and sleeps on the Service's connections: name the Service",
        ));
    }
    let metric = spec
        .target_metric
        .clone()
        .unwrap_or_else(|| DEFAULT_TARGET_METRIC.to_string());
    let warm_replicas = if max > warm_min {
        match spec.target_value {
            Some(v) if v.is_finite() && v > 0.0 => Some(RangeSpec {
                min: warm_min,
                max,
                metric,
                target: v,
                target_type: Some(TargetType::AverageValue),
                ..RangeSpec::default()
            }),
            Some(v) => {
                errors.push(Problem::at(
                    "spec.targetValue",
                    format!("must be above 0 (is {v})"),
                ));
                None
            }
            None => {
                errors.push(Problem::at(
                    "spec.targetValue",
                    format!(
                        "is needed because maxReplicas ({max}) is above the warm minimum ({warm_min}): the value of `{metric}` one replica should carry"
                    ),
                ));
                None
            }
        }
    } else {
        if spec.target_metric.is_some() || spec.target_value.is_some() {
            warnings.push(Problem::at(
                "spec.targetValue",
                format!("unused: maxReplicas ({max}) leaves nothing to size between {warm_min} and {max}"),
            ));
        }
        None
    };
    if errors.len() > before {
        return None;
    }

    let warm = DraftState::generated(
        StateSpec {
            name: WARM_STATE.into(),
            replicas: warm_replicas.is_none().then_some(warm_min),
            range: warm_replicas,
        },
        "spec.maxReplicas",
        "spec.targetMetric",
    );
    let mut draft = Draft {
        states: vec![],
        transitions: vec![],
        initial: Some(WARM_STATE.into()),
        initial_path: "spec.minReplicas".into(),
        rate_window: None,
    };
    if min == 0 {
        let given = given_rate_window(spec);
        let window = match idle_rate_window(idle, given) {
            Ok(w) => w,
            Err(message) => {
                let path = if spec.idle_timeout.is_some() {
                    "spec.idleTimeout"
                } else {
                    "spec.metrics.connections.rateWindow"
                };
                errors.push(Problem::at(path, message));
                return None;
            }
        };
        draft.rate_window = (Some(window) != given).then_some(window);
        draft.states.push(DraftState::generated(
            StateSpec {
                name: ZERO_STATE.into(),
                replicas: Some(0),
                range: None,
            },
            "spec.minReplicas",
            "spec.minReplicas",
        ));
        draft.states.push(warm);
        draft.transitions.push(DraftTransition::generated(
            TransitionSpec {
                from: ZERO_STATE.into(),
                to: WARM_STATE.into(),
                when: "demand or conns.active > 0".into(),
                cooldown: None,
            },
            "spec.minReplicas",
        ));
        draft.transitions.push(DraftTransition::generated(
            TransitionSpec {
                from: WARM_STATE.into(),
                to: ZERO_STATE.into(),
                when: idle_condition(idle, window),
                cooldown: None,
            },
            "spec.idleTimeout",
        ));
    } else {
        draft.states.push(warm);
    }
    Some(draft)
}

/// The window `conns.rate` is averaged over as the spec gives it; an invalid one is
/// reported by `compile`.
fn given_rate_window(spec: &ScalingPolicySpec) -> Option<TimeDelta> {
    spec.metrics
        .connections
        .as_ref()
        .and_then(|c| c.rate_window.as_deref())
        .and_then(|text| parse_duration(text).ok())
        .filter(|d| *d > TimeDelta::zero())
}

/// The rate window of a short form that sleeps after `idle`. `conns.rate` reads 0 only a
/// rate window after the last connect, so a window longer than the idle timeout would set
/// the idle time instead: without a given window it shrinks to the idle timeout; a given
/// one longer than it is an error (the message says what to write).
pub fn idle_rate_window(idle: TimeDelta, given: Option<TimeDelta>) -> Result<TimeDelta, String> {
    match given {
        None => Ok(idle.min(DEFAULT_RATE_WINDOW)),
        Some(w) if w <= idle => Ok(w),
        Some(w) => Err(format!(
            "idleTimeout ({}) is shorter than metrics.connections.rateWindow ({}): conns.rate \
             reads 0 only a rate window after the last connect, so the target would sleep {} \
             after it; set rateWindow to at most {}, or leave it out (it then follows \
             idleTimeout)",
            format_duration(idle),
            format_duration(w),
            format_duration(w),
            format_duration(idle),
        )),
    }
}

/// Nothing open or held for `idle`, and no connect for `idle` (or for the rate window
/// when that is longer): the rate is 0 from a rate window after the last connect on.
fn idle_condition(idle: TimeDelta, rate_window: TimeDelta) -> String {
    let quiet = format!(
        "(conns.active == 0 and conns.held == 0) for {} and conns.rate == 0",
        format_duration(idle)
    );
    let rest = idle - rate_window;
    if rest > TimeDelta::zero() {
        format!("{quiet} for {}", format_duration(rest))
    } else {
        quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_window_never_outlasts_the_idle_timeout() {
        let s = TimeDelta::seconds;
        let cases = [
            // (idle, given, window)
            (s(20), None, Ok(s(20))),
            (s(300), None, Ok(DEFAULT_RATE_WINDOW)),
            (s(60), None, Ok(s(60))),
            (s(20), Some(s(10)), Ok(s(10))),
            (s(20), Some(s(20)), Ok(s(20))),
            (s(300), Some(s(120)), Ok(s(120))),
        ];
        for (idle, given, want) in cases {
            assert_eq!(idle_rate_window(idle, given), want, "{idle} {given:?}");
        }
        assert_eq!(
            idle_rate_window(s(20), Some(s(60))).unwrap_err(),
            "idleTimeout (20s) is shorter than metrics.connections.rateWindow (1m): conns.rate \
             reads 0 only a rate window after the last connect, so the target would sleep 1m \
             after it; set rateWindow to at most 20s, or leave it out (it then follows \
             idleTimeout)"
        );
    }
}
