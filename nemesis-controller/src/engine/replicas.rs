//! How many replicas a range state wants: the HPA formula with its tolerance, clamped to
//! min..max, and moved at most `maxStep` replicas per period each way. Owns that
//! arithmetic only; guards about zero and readiness live in `decide`.

use super::state::StepWindow;
use crate::policy::compile::{RangeRule, Step};
use crate::policy::crd::TargetType;
use chrono::{DateTime, Utc};

pub struct RangeOutcome {
    pub replicas: u32,
    /// The formula wanted more (or fewer) replicas than the step rate allows now.
    pub step_limited_until: Option<DateTime<Utc>>,
    /// The formula's answer before clamping and step limits (`None`: not computed).
    pub wanted: Option<u32>,
}

/// The replicas a range state asks for, given the current count and the metric's value
/// (`None`: missing; the count then stays, clamped into min..max).
pub fn range_replicas(
    r: &RangeRule,
    current: u32,
    value: Option<f64>,
    up_window: &mut Option<StepWindow>,
    down_window: &mut Option<StepWindow>,
    now: DateTime<Utc>,
) -> RangeOutcome {
    let clamped = current.clamp(r.min, r.max);
    let stay = |replicas| RangeOutcome {
        replicas,
        step_limited_until: None,
        wanted: None,
    };
    if clamped != current {
        // Entering the range (from zero, or from a larger fixed state): min..max applies at
        // once; step limits bound the metric's pull, not the state's own bounds.
        return stay(clamped);
    }
    let Some(value) = value else {
        return stay(current);
    };
    let (ratio, raw) = match r.target_type {
        TargetType::Value => {
            let ratio = value / r.target;
            (ratio, (current as f64 * ratio).ceil())
        }
        TargetType::AverageValue => {
            let raw = (value / r.target).ceil();
            let ratio = if current == 0 {
                f64::INFINITY
            } else {
                value / (r.target * current as f64)
            };
            (ratio, raw)
        }
    };
    // The epsilon keeps a ratio of exactly 1 + tolerance (0.66 / 0.6) inside despite
    // binary fractions.
    if current > 0 && (ratio - 1.0).abs() <= r.tolerance + 1e-9 {
        return stay(current);
    }
    let raw = if raw.is_finite() {
        raw.clamp(0.0, u32::MAX as f64) as u32
    } else {
        current
    };
    let want = raw.clamp(r.min, r.max);
    let (replicas, until) = if want > current {
        let (allowed, until) = step(r.up, up_window, current, now);
        (
            want.min(current.max(allowed)),
            (want > allowed).then_some(until),
        )
    } else if want < current {
        let (base, until) = window(r.down, down_window, current, now);
        let floor = base.saturating_sub(r.down.max_step);
        (
            want.max(floor.min(current)),
            (want < floor).then_some(until),
        )
    } else {
        (current, None)
    };
    RangeOutcome {
        replicas,
        step_limited_until: until,
        wanted: Some(want),
    }
}

/// The most replicas allowed now going up, and when the window ends.
fn step(
    s: Step,
    w: &mut Option<StepWindow>,
    current: u32,
    now: DateTime<Utc>,
) -> (u32, DateTime<Utc>) {
    let (base, until) = window(s, w, current, now);
    (base.saturating_add(s.max_step), until)
}

/// The open window's base (opening a new one when none is open), and its end.
fn window(
    s: Step,
    w: &mut Option<StepWindow>,
    current: u32,
    now: DateTime<Utc>,
) -> (u32, DateTime<Utc>) {
    match *w {
        Some(open) if now < open.start + s.period => (open.base, open.start + s.period),
        _ => {
            *w = Some(StepWindow {
                start: now,
                base: current,
            });
            (current, now + s.period)
        }
    }
}
