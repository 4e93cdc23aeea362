//! Evaluates a compiled expression at one instant with three-valued logic: a missing
//! metric makes a comparison *unknown*, and only a *true* condition fires. Owns the
//! arithmetic and the `for` trackers' bookkeeping; it never picks a transition.

use super::observations::Observations;
use crate::policy::CompiledPolicy;
use crate::policy::expr::{ArithOp, CmpOp, Expr};
use chrono::{DateTime, Utc};

/// Kleene's logic: `unknown and false` is false, `unknown or true` is true, anything
/// else with unknown is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    False,
    True,
    Unknown,
}

impl Truth {
    fn not(self) -> Self {
        match self {
            Truth::True => Truth::False,
            Truth::False => Truth::True,
            Truth::Unknown => Truth::Unknown,
        }
    }
    fn and(self, other: Self) -> Self {
        match (self, other) {
            (Truth::False, _) | (_, Truth::False) => Truth::False,
            (Truth::True, Truth::True) => Truth::True,
            _ => Truth::Unknown,
        }
    }
    fn or(self, other: Self) -> Self {
        match (self, other) {
            (Truth::True, _) | (_, Truth::True) => Truth::True,
            (Truth::False, Truth::False) => Truth::False,
            _ => Truth::Unknown,
        }
    }
}

pub struct Ctx<'a> {
    pub policy: &'a CompiledPolicy,
    pub obs: &'a Observations,
    pub now: DateTime<Utc>,
    /// When the current state was entered (`demand` counts wake-ups since then).
    pub state_since: DateTime<Utc>,
    pub true_since: &'a mut [Option<DateTime<Utc>>],
    /// The earliest future instant at which a condition may change by time alone.
    pub deadline: Option<DateTime<Utc>>,
}

impl Ctx<'_> {
    pub fn note_deadline(&mut self, at: DateTime<Utc>) {
        if at > self.now && self.deadline.is_none_or(|d| at < d) {
            self.deadline = Some(at);
        }
    }

    /// A number, or `None` when a metric it reads is missing or the arithmetic has no
    /// finite answer (a division by zero).
    pub fn number(&mut self, e: &Expr) -> Option<f64> {
        let v = match e {
            Expr::Num(n) => *n,
            Expr::Metric(m) => self.obs.metric(self.policy, *m, self.now)?,
            Expr::Neg(inner) => -self.number(inner)?,
            Expr::Arith(op, a, b) => {
                // Both sides are evaluated, so `for` trackers below them stay current.
                let (a, b) = (self.number(a), self.number(b));
                let (a, b) = (a?, b?);
                match op {
                    ArithOp::Add => a + b,
                    ArithOp::Sub => a - b,
                    ArithOp::Mul => a * b,
                    ArithOp::Div => a / b,
                }
            }
            // The resolver only lets numbers here.
            _ => return None,
        };
        v.is_finite().then_some(v)
    }

    /// Evaluates a condition. Every `for` below is evaluated on every call (no
    /// short-circuit), so each tracker sees every tick and "continuously true" holds.
    pub fn truth(&mut self, e: &Expr) -> Truth {
        match e {
            Expr::Bool(b) => truth_of(*b),
            Expr::Cmp(op, a, b) => {
                let (a, b) = (self.number(a), self.number(b));
                let (Some(a), Some(b)) = (a, b) else {
                    return Truth::Unknown;
                };
                truth_of(match op {
                    CmpOp::Lt => a < b,
                    CmpOp::Le => a <= b,
                    CmpOp::Gt => a > b,
                    CmpOp::Ge => a >= b,
                    CmpOp::Eq => a == b,
                    CmpOp::Ne => a != b,
                })
            }
            Expr::Not(inner) => self.truth(inner).not(),
            Expr::And(a, b) => {
                let a = self.truth(a);
                a.and(self.truth(b))
            }
            Expr::Or(a, b) => {
                let a = self.truth(a);
                a.or(self.truth(b))
            }
            Expr::Sustained { cond, window, slot } => {
                let inner = self.truth(cond);
                if inner != Truth::True {
                    self.true_since[*slot] = None;
                    return inner;
                }
                let since = *self.true_since[*slot].get_or_insert(self.now);
                let due = since + *window;
                if self.now >= due {
                    Truth::True
                } else {
                    self.note_deadline(due);
                    Truth::False
                }
            }
            Expr::Demand => truth_of(self.obs.demand_since(self.state_since, self.now)),
            Expr::Alert(i) => truth_of(
                self.obs
                    .alerts
                    .get(*i)
                    .copied()
                    .flatten()
                    .is_some_and(|since| since <= self.now),
            ),
            Expr::Schedule(s) => {
                let state = s.state_at(self.now);
                if let Some(until) = state.until {
                    self.note_deadline(until);
                }
                truth_of(state.active)
            }
            Expr::Num(_) | Expr::Metric(_) | Expr::Neg(_) | Expr::Arith(..) => Truth::Unknown,
        }
    }
}

fn truth_of(b: bool) -> Truth {
    if b { Truth::True } else { Truth::False }
}
