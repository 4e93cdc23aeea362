//! The decision engine: a pure function of (compiled policy, engine state, observations,
//! now) returning the next state, the replicas wanted, why, and when to look again.
//! Owns every scaling rule (transitions, cooldowns, `for` windows, the zero guards, the
//! HPA formula); it never does I/O, never reads a clock, and only accepts a validated
//! `CompiledPolicy`, so an invalid policy cannot scale anything.

pub mod eval;
pub mod observations;
pub mod replicas;
pub mod state;

pub use observations::{ConnectionSample, Observations, Sample};
pub use state::State;

use crate::policy::CompiledPolicy;
use crate::policy::compile::Replicas;
use crate::policy::expr::Metric;
use crate::policy::program::{Code, Op};
use chrono::{DateTime, Utc};
use eval::{Ctx, NOT_TRUE, Truth};
use std::fmt::Write as _;
use std::time::Duration;

/// Never wait longer than this between two evaluations: data can change without any
/// deadline announcing it, and a missed event must not strand a target.
pub const MAX_REQUEUE: Duration = Duration::from_secs(30);
/// Never re-evaluate sooner: observations do not refresh faster than this anyway.
pub const MIN_REQUEUE: Duration = Duration::from_secs(1);

/// A transition that fired.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub from: String,
    pub to: String,
    /// The condition as written.
    pub condition: String,
    /// The metrics the condition read, with the values it saw (`None`: missing).
    pub values: Vec<(String, Option<f64>)>,
    /// Whether `demand` held, when the condition reads it: a wake-up fires
    /// `demand or conns.active > 0` with `conns.active=0`, and the reason must say so.
    pub demand: Option<bool>,
}

/// A range state moved its replicas.
#[derive(Debug, Clone, PartialEq)]
pub struct Rescaled {
    pub metric: String,
    pub value: f64,
    pub target: f64,
}

/// Why something the policy would otherwise do did not happen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hold {
    /// A transition's condition holds, but its cooldown has not passed.
    Cooldown {
        transition: usize,
        until: DateTime<Utc>,
    },
    /// Scaling to zero was due, but the pods started by the last wake are not ready yet.
    ReadinessPending { woke_at: DateTime<Utc> },
    /// Scaling to zero was due, but a wake-up or a held connection came in.
    DemandPending,
    /// A metric the decision needs is missing (no fallback declared): hold, never zero.
    MissingMetric(Metric),
    /// The range formula wants more change than the step rate allows before `until`.
    StepLimit { until: DateTime<Utc> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The engine state to pass to the next call.
    pub state: State,
    pub desired_replicas: u32,
    pub transition: Option<Fired>,
    pub rescaled: Option<Rescaled>,
    pub hold: Option<Hold>,
    /// Pods started by the last wake have not become ready within the readiness budget.
    pub readiness_overdue: bool,
    /// When to evaluate again at the latest.
    pub requeue_after: Duration,
}

impl Decision {
    /// The target goes from zero to some replicas: the caller records the wake time.
    pub fn wakes(&self, obs: &Observations) -> bool {
        obs.replicas == 0 && self.desired_replicas > 0
    }

    /// A short account of the decision for status, history and logs.
    pub fn reason(&self, policy: &CompiledPolicy) -> String {
        let mut out = String::new();
        if let Some(t) = &self.transition {
            let _ = write!(out, "{} -> {}: `{}`", t.from, t.to, t.condition);
            if !t.values.is_empty() || t.demand.is_some() {
                let values: Vec<String> = t
                    .demand
                    .map(|d| format!("demand={d}"))
                    .into_iter()
                    .chain(t.values.iter().map(|(n, v)| match v {
                        Some(v) => format!("{n}={v}"),
                        None => format!("{n}=missing"),
                    }))
                    .collect();
                let _ = write!(out, " ({})", values.join(", "));
            }
        }
        if let Some(r) = &self.rescaled {
            if !out.is_empty() {
                out.push_str("; ");
            }
            let _ = write!(
                out,
                "replicas -> {}: {}={} for target {}",
                self.desired_replicas, r.metric, r.value, r.target
            );
        }
        if let Some(h) = &self.hold {
            if !out.is_empty() {
                out.push_str("; ");
            }
            match h {
                Hold::Cooldown { transition, until } => {
                    let t = &policy.transitions[*transition];
                    let _ = write!(
                        out,
                        "held: {} -> {} waits for its cooldown until {}",
                        policy.states[t.from].name,
                        policy.states[t.to].name,
                        until.to_rfc3339()
                    );
                }
                Hold::ReadinessPending { woke_at } => {
                    let _ = write!(
                        out,
                        "held: not scaling to zero, no pod became ready since the wake at {}",
                        woke_at.to_rfc3339()
                    );
                }
                Hold::DemandPending => {
                    out.push_str("held: not scaling to zero, a wake-up or held connection came in");
                }
                Hold::MissingMetric(m) => {
                    let _ = write!(out, "held: `{}` is missing", policy.metric_name(*m));
                }
                Hold::StepLimit { until } => {
                    let _ = write!(out, "held: step rate limit until {}", until.to_rfc3339());
                }
            }
        }
        if self.readiness_overdue {
            if !out.is_empty() {
                out.push_str("; ");
            }
            out.push_str("pods not ready within the readiness budget");
        }
        if out.is_empty() {
            out.push_str("steady");
        }
        out
    }
}

/// Every metric the policy reads, with its value at `now` (for status).
pub fn metric_values(
    policy: &CompiledPolicy,
    obs: &Observations,
    now: DateTime<Utc>,
) -> Vec<(String, Option<f64>)> {
    policy
        .metrics_read()
        .into_iter()
        .map(|m| {
            (
                policy.metric_name(m).to_string(),
                obs.metric(policy, m, now),
            )
        })
        .collect()
}

/// Decides one step of `policy` at `now`.
///
/// Order: the current state's transitions are tried in spec order; the first whose
/// condition is true, whose cooldown has passed and that passes the zero guards fires
/// (one transition per call). Then the (new) state's replicas are computed: a fixed count,
/// or the range formula. The zero guards: a transition into a state that can reach zero
/// replicas, or a range dropping to zero, is held while pods started by a wake have not
/// become ready, while a wake-up or held connection is pending, or while a metric it
/// reads is missing.
pub fn decide(
    policy: &CompiledPolicy,
    state: &State,
    obs: &Observations,
    now: DateTime<Utc>,
) -> Decision {
    let mut next = state.clone();
    next.fit(policy, now);
    let now_ms = now.timestamp_millis();
    let last_change_ms = state.last_change.map(|t| t.timestamp_millis());
    let mut hold: Option<Hold> = None;
    let mut fired: Option<(usize, Code)> = None;

    let mut ctx = Ctx {
        policy,
        obs,
        now,
        now_ms,
        state_since_ms: next.since.timestamp_millis(),
        true_since: &mut next.true_since,
        resumed: &mut next.resumed,
        deadline_ms: None,
    };
    let code = &policy.code;
    let (mut pc, end) = match code.get(next.current) {
        Some(Op::State {
            edges_start,
            edges_len,
            ..
        }) => (*edges_start as usize, (*edges_start + *edges_len) as usize),
        _ => (0, 0),
    };
    while pc < end {
        let Op::Edge {
            transition,
            cond_len,
            to_zero,
            cooldown_ms,
            ..
        } = code[pc]
        else {
            break;
        };
        let cond = Code {
            start: pc as u32 + 1,
            len: cond_len as u32,
        };
        pc += 1 + cond_len as usize;
        let ti = transition as usize;
        if ctx.truth(cond) != Truth::True {
            continue;
        }
        let cooldown_ms = i64::from(cooldown_ms);
        if let Some(changed) = last_change_ms
            && cooldown_ms > 0
            && now_ms < changed + cooldown_ms
        {
            ctx.note_deadline(changed + cooldown_ms);
            hold.get_or_insert(Hold::Cooldown {
                transition: ti,
                until: state.last_change.unwrap_or(now) + policy.transitions[ti].cooldown,
            });
            continue;
        }
        if to_zero
            && let Some(h) = zero_guard(
                policy,
                &policy.transitions[ti].metrics,
                obs,
                next.since,
                now,
            )
        {
            hold.get_or_insert(h);
            continue;
        }
        fired = Some((ti, cond));
        break;
    }
    let mut deadline_ms = ctx.deadline_ms;

    let transition = fired.map(|(ti, cond)| {
        let t = &policy.transitions[ti];
        let reads_demand = code[cond.range()].iter().any(|op| matches!(op, Op::Demand));
        let demand = reads_demand.then(|| obs.demand_since(next.since, now));
        next.current = t.to;
        next.since = now;
        next.true_since.iter_mut().for_each(|s| *s = NOT_TRUE);
        next.resumed = 0;
        // Held reasons were about the state just left.
        hold = None;
        Fired {
            from: policy.states[t.from].name.clone(),
            to: policy.states[t.to].name.clone(),
            condition: t.text.clone(),
            values: t
                .metrics
                .iter()
                .map(|m| {
                    (
                        policy.metric_name(*m).to_string(),
                        obs.metric(policy, *m, now),
                    )
                })
                .collect(),
            demand,
        }
    });

    let mut rescaled = None;
    let fixed = match code.get(next.current) {
        Some(Op::State { fixed, .. }) if *fixed != u32::MAX => Some(*fixed),
        _ => None,
    };
    let desired = match fixed
        .map(Replicas::Fixed)
        .as_ref()
        .unwrap_or(&policy.states[next.current].replicas)
    {
        Replicas::Fixed(n) => *n,
        Replicas::Range(r) => {
            let mut vctx = Ctx {
                policy,
                obs,
                now,
                now_ms,
                state_since_ms: next.since.timestamp_millis(),
                true_since: &mut [],
                resumed: &mut 0,
                deadline_ms: None,
            };
            let value = vctx.number(r.metric);
            if value.is_none() && obs.replicas >= r.min && obs.replicas <= r.max {
                let missing = r
                    .metrics
                    .iter()
                    .find(|m| obs.metric(policy, **m, now).is_none());
                if let Some(m) = missing {
                    hold.get_or_insert(Hold::MissingMetric(*m));
                }
            }
            let out = replicas::range_replicas(
                r,
                obs.replicas,
                value,
                &mut next.up_window,
                &mut next.down_window,
                now,
            );
            if let Some(until) = out.step_limited_until {
                hold.get_or_insert(Hold::StepLimit { until });
                let until_ms = until.timestamp_millis();
                if deadline_ms.is_none_or(|d| until_ms < d) {
                    deadline_ms = Some(until_ms);
                }
            }
            let mut n = out.replicas;
            if n == 0
                && obs.replicas > 0
                && let Some(h) = zero_guard(policy, &r.metrics, obs, next.since, now)
            {
                hold.get_or_insert(h);
                n = 1.min(r.max);
            }
            // Only the formula's moves are rescales; clamping into the range on entry
            // is the transition's doing.
            if n != obs.replicas
                && out.wanted.is_some()
                && let Some(v) = value
            {
                rescaled = Some(Rescaled {
                    metric: r.metric_text.clone(),
                    value: v,
                    target: r.target,
                });
            }
            n
        }
    };

    let readiness_overdue = match obs.last_wake {
        Some(woke) if !obs.ready_since_wake => {
            let due_ms = woke.timestamp_millis() + policy.readiness_budget.num_milliseconds();
            if now_ms < due_ms && deadline_ms.is_none_or(|d| due_ms < d) {
                deadline_ms = Some(due_ms);
            }
            now_ms >= due_ms
        }
        _ => false,
    };

    if next.desired != Some(desired) || transition.is_some() {
        next.last_change = Some(now);
    }
    next.desired = Some(desired);

    let requeue_after = if transition.is_some() || desired != obs.replicas {
        MIN_REQUEUE
    } else {
        deadline_ms.map_or(MAX_REQUEUE, |d| {
            Duration::from_millis((d - now_ms).max(0) as u64).clamp(MIN_REQUEUE, MAX_REQUEUE)
        })
    };

    Decision {
        state: next,
        desired_replicas: desired,
        transition,
        rescaled,
        hold,
        readiness_overdue,
        requeue_after,
    }
}

/// Why scaling to zero must wait, if it must.
fn zero_guard(
    policy: &CompiledPolicy,
    metrics: &[Metric],
    obs: &Observations,
    state_since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<Hold> {
    if obs.awaiting_readiness() {
        return Some(Hold::ReadinessPending {
            woke_at: obs.last_wake.unwrap_or(now),
        });
    }
    if obs.demand_since(state_since, now) {
        return Some(Hold::DemandPending);
    }
    metrics
        .iter()
        .find(|m| obs.metric(policy, **m, now).is_none())
        .map(|m| Hold::MissingMetric(*m))
}
