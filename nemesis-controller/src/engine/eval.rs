//! Runs a compiled program at one instant with three-valued logic: a missing metric makes
//! a comparison *unknown*, and only a *true* condition fires. Owns the arithmetic, the
//! Kleene logic and the `for` trackers' bookkeeping; it never picks a transition.
//!
//! On the stack, numbers are `f64` with NaN for missing, truth values are 1.0, 0.0 and
//! NaN (unknown). Every operation runs on every evaluation (there is no short-circuit),
//! so each `for` tracker sees every tick and "continuously true" means what it says.

use super::observations::Observations;
use crate::policy::CompiledPolicy;
use crate::policy::expr::{ArithOp, CmpOp};
use crate::policy::program::{Code, MAX_STACK, Op};
use chrono::{DateTime, Utc};

/// No tracker running (the slot's condition is not true).
pub const NOT_TRUE: i64 = i64::MIN;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    False,
    True,
    Unknown,
}

impl Truth {
    fn from_f64(v: f64) -> Self {
        if v == 1.0 {
            Truth::True
        } else if v == 0.0 {
            Truth::False
        } else {
            Truth::Unknown
        }
    }
}

const TRUE: f64 = 1.0;
const FALSE: f64 = 0.0;
const UNKNOWN: f64 = f64::NAN;

fn truth(b: bool) -> f64 {
    if b { TRUE } else { FALSE }
}

pub struct Ctx<'a> {
    pub policy: &'a CompiledPolicy,
    pub obs: &'a Observations,
    pub now: DateTime<Utc>,
    pub now_ms: i64,
    /// When the current state was entered (`demand` counts wake-ups since then).
    pub state_since_ms: i64,
    /// Per `for` slot: when its condition became true, or [`NOT_TRUE`].
    pub true_since: &'a mut [i64],
    /// One bit per `for` slot whose tracker was resumed from a status (another
    /// controller started it): kept through unknown values until its condition is known.
    pub resumed: &'a mut u64,
    /// The earliest future instant (ms) at which a condition may change by time alone.
    pub deadline_ms: Option<i64>,
}

impl Ctx<'_> {
    pub fn note_deadline(&mut self, at_ms: i64) {
        if at_ms > self.now_ms && self.deadline_ms.is_none_or(|d| at_ms < d) {
            self.deadline_ms = Some(at_ms);
        }
    }

    /// A condition's truth.
    pub fn truth(&mut self, code: Code) -> Truth {
        Truth::from_f64(self.run(code))
    }

    /// A metric expression's value, `None` when missing or not finite.
    pub fn number(&mut self, code: Code) -> Option<f64> {
        let v = self.run(code);
        v.is_finite().then_some(v)
    }

    fn run(&mut self, code: Code) -> f64 {
        let mut stack = [0.0f64; MAX_STACK];
        let mut sp = 0usize;
        let policy = self.policy;
        for op in &policy.code[code.range()] {
            let v = match *op {
                Op::Const(c) => c,
                Op::Metric(m) => self.obs.metric_ms(self.policy, m, self.now_ms),
                Op::Demand => truth(self.obs.demand_since_ms(self.state_since_ms, self.now_ms)),
                Op::Alert(i) => truth(
                    self.obs
                        .alerts
                        .get(i as usize)
                        .copied()
                        .flatten()
                        .is_some_and(|since| since <= self.now),
                ),
                Op::Schedule(i) => {
                    let state = policy.schedules[i as usize].state_at(self.now);
                    if let Some(until) = state.until {
                        self.note_deadline(until.timestamp_millis());
                    }
                    truth(state.active)
                }
                Op::Neg => {
                    sp -= 1;
                    -stack[sp]
                }
                Op::Not => {
                    sp -= 1;
                    let a = stack[sp];
                    if a.is_nan() { UNKNOWN } else { 1.0 - a }
                }
                Op::Arith(op) => {
                    sp -= 2;
                    let (a, b) = (stack[sp], stack[sp + 1]);
                    let r = match op {
                        ArithOp::Add => a + b,
                        ArithOp::Sub => a - b,
                        ArithOp::Mul => a * b,
                        ArithOp::Div => a / b,
                    };
                    // A division by zero is no value at all, not infinity.
                    if r.is_finite() { r } else { UNKNOWN }
                }
                Op::Cmp(op) => {
                    sp -= 2;
                    let (a, b) = (stack[sp], stack[sp + 1]);
                    if a.is_nan() || b.is_nan() {
                        UNKNOWN
                    } else {
                        truth(match op {
                            CmpOp::Lt => a < b,
                            CmpOp::Le => a <= b,
                            CmpOp::Gt => a > b,
                            CmpOp::Ge => a >= b,
                            CmpOp::Eq => a == b,
                            CmpOp::Ne => a != b,
                        })
                    }
                }
                Op::And => {
                    sp -= 2;
                    let (a, b) = (stack[sp], stack[sp + 1]);
                    if a == FALSE || b == FALSE {
                        FALSE
                    } else if a == TRUE && b == TRUE {
                        TRUE
                    } else {
                        UNKNOWN
                    }
                }
                Op::Or => {
                    sp -= 2;
                    let (a, b) = (stack[sp], stack[sp + 1]);
                    if a == TRUE || b == TRUE {
                        TRUE
                    } else if a == FALSE && b == FALSE {
                        FALSE
                    } else {
                        UNKNOWN
                    }
                }
                // Tables never sit inside an expression's range.
                Op::State { .. } | Op::Source { .. } | Op::Edge { .. } => UNKNOWN,
                Op::Sustained { window_ms, slot } => {
                    sp -= 1;
                    let inner = stack[sp];
                    let tracker = &mut self.true_since[slot as usize];
                    let bit = resumed_bit(slot);
                    if inner.is_nan() && *tracker != NOT_TRUE && *self.resumed & bit != 0 {
                        // A window resumed from another controller's status: this one
                        // has not heard from the agents yet (a heartbeat away), so an
                        // unknown value is no break in the window, only not a firing.
                        UNKNOWN
                    } else if inner != TRUE {
                        *tracker = NOT_TRUE;
                        *self.resumed &= !bit;
                        inner
                    } else {
                        *self.resumed &= !bit;
                        if *tracker == NOT_TRUE {
                            *tracker = self.now_ms;
                        }
                        let due = *tracker + window_ms;
                        if self.now_ms >= due {
                            TRUE
                        } else {
                            self.note_deadline(due);
                            FALSE
                        }
                    }
                }
            };
            stack[sp] = v;
            sp += 1;
        }
        if sp == 0 { UNKNOWN } else { stack[0] }
    }
}

/// The `resumed` bit of a `for` slot; slots past 63 are never resumed (they restart).
pub fn resumed_bit(slot: u32) -> u64 {
    1u64.checked_shl(slot).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kleene_logic_on_the_stack_encoding() {
        assert_eq!(Truth::from_f64(TRUE), Truth::True);
        assert_eq!(Truth::from_f64(FALSE), Truth::False);
        assert_eq!(Truth::from_f64(UNKNOWN), Truth::Unknown);
    }
}
