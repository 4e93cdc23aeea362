//! Conditions and metric expressions after names are resolved and types checked: what the
//! engine evaluates. Owns the resolved shape; building it is `resolve`'s job and
//! evaluating it is the engine's.

use super::schedule::Schedule;
use chrono::TimeDelta;

/// A value the engine reads from observations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Open connections to the target Service, summed over live agents.
    ConnsActive,
    /// New connections per second to the target Service.
    ConnsRate,
    /// Connections the agents hold while the target is at zero or asleep.
    ConnsHeld,
    /// The target's replicas (its `/scale` spec).
    Replicas,
    /// The target's ready replicas.
    ReadyReplicas,
    /// A Prometheus source, by its index in `spec.metrics.prometheus`.
    Source(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug, Clone)]
pub enum Expr {
    Num(f64),
    Bool(bool),
    Metric(Metric),
    Neg(Box<Expr>),
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    /// True once `cond` has been true at every evaluation for `window`; `slot` indexes the
    /// "true since" tracker in the engine's state.
    Sustained {
        cond: Box<Expr>,
        window: TimeDelta,
        slot: usize,
    },
    /// A wake-up within the last minute and since the current state was entered, or a
    /// connection held right now.
    Demand,
    /// An Alertmanager alert, by its index in `spec.metrics.alerts`, is firing.
    Alert(usize),
    Schedule(Box<Schedule>),
}

impl Expr {
    /// Every metric the expression reads, in first-use order, without repeats.
    pub fn metrics(&self) -> Vec<Metric> {
        let mut out = Vec::new();
        self.collect_metrics(&mut out);
        out
    }

    fn collect_metrics(&self, out: &mut Vec<Metric>) {
        match self {
            Expr::Metric(m) => {
                if !out.contains(m) {
                    out.push(*m);
                }
            }
            Expr::Neg(e) | Expr::Not(e) => e.collect_metrics(out),
            Expr::Sustained { cond, .. } => cond.collect_metrics(out),
            Expr::Arith(_, a, b) | Expr::Cmp(_, a, b) | Expr::And(a, b) | Expr::Or(a, b) => {
                a.collect_metrics(out);
                b.collect_metrics(out);
            }
            Expr::Num(_) | Expr::Bool(_) | Expr::Demand | Expr::Alert(_) | Expr::Schedule(_) => {}
        }
    }
}
