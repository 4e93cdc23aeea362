//! A resolved expression flattened into postfix operations over one stack of `f64`, so
//! the engine evaluates 10,000 policies per tick without chasing a pointer per node.
//! Numbers are `f64` (NaN: missing); truth values are 1.0 (true), 0.0 (false), NaN
//! (unknown). Owns the encoding; the engine's `eval` runs it.

use super::expr::{ArithOp, CmpOp, Expr, Metric};
use super::schedule::Schedule;

/// The deepest stack a program may need; deeper expressions are refused at validation.
pub const MAX_STACK: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Const(f64),
    Metric(Metric),
    Neg,
    Arith(ArithOp),
    Cmp(CmpOp),
    Not,
    And,
    Or,
    /// Pops a truth; true once it has been true for `window_ms` (tracker `slot`).
    Sustained {
        window_ms: i64,
        slot: u32,
    },
    Demand,
    Alert(u32),
    /// Index into the policy's schedules.
    Schedule(u32),

    // Tables, not operations: they sit outside every expression's range, so the policy's
    // hot data is one allocation (see `CompiledPolicy::code`).
    /// The header of a state (the first ops of a policy's code, one per state): where
    /// its run of edges is, and its fixed replicas (`u32::MAX` for a range).
    State {
        edges_start: u32,
        edges_len: u32,
        fixed: u32,
    },
    /// A Prometheus source's freshness bound and fallback (NaN: none), after the headers.
    Source {
        stale_ms: u32,
        fallback: f64,
    },
    /// One transition in its state's run; its condition's `cond_len` ops follow it.
    Edge {
        transition: u16,
        to: u16,
        cond_len: u16,
        to_zero: bool,
        cooldown_ms: u32,
    },
}

/// Where one expression's operations sit in its policy's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Code {
    pub start: u32,
    pub len: u32,
}

impl Code {
    pub fn range(self) -> std::ops::Range<usize> {
        self.start as usize..(self.start + self.len) as usize
    }
}

/// Why an expression cannot become a program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooDeep {
    pub depth: usize,
}

/// All of one policy's operations and schedules, in one place each: the engine touches a
/// few contiguous cache lines per policy instead of a node per allocation.
#[derive(Debug, Clone, Default)]
pub struct CodeBuf {
    pub ops: Vec<Op>,
    pub schedules: Vec<Schedule>,
}

impl CodeBuf {
    /// Appends `expr`'s operations; nothing is appended when it is refused.
    pub fn emit(&mut self, expr: &Expr) -> Result<Code, TooDeep> {
        let (ops_before, schedules_before) = (self.ops.len(), self.schedules.len());
        let mut b = Builder {
            buf: self,
            depth: 0,
            max: 0,
        };
        b.emit(expr);
        let max = b.max;
        if max > MAX_STACK {
            self.ops.truncate(ops_before);
            self.schedules.truncate(schedules_before);
            return Err(TooDeep { depth: max });
        }
        Ok(Code {
            start: ops_before as u32,
            len: (self.ops.len() - ops_before) as u32,
        })
    }
}

struct Builder<'a> {
    buf: &'a mut CodeBuf,
    depth: usize,
    max: usize,
}

impl Builder<'_> {
    fn push(&mut self, op: Op) {
        self.depth += 1;
        self.max = self.max.max(self.depth);
        self.buf.ops.push(op);
    }

    /// An operation that pops `n` values and pushes one.
    fn reduce(&mut self, n: usize, op: Op) {
        self.depth -= n;
        self.push(op);
    }

    fn emit(&mut self, e: &Expr) {
        match e {
            Expr::Num(n) => self.push(Op::Const(*n)),
            Expr::Bool(b) => self.push(Op::Const(if *b { 1.0 } else { 0.0 })),
            Expr::Metric(m) => self.push(Op::Metric(*m)),
            Expr::Neg(a) => {
                self.emit(a);
                self.reduce(1, Op::Neg);
            }
            Expr::Not(a) => {
                self.emit(a);
                self.reduce(1, Op::Not);
            }
            Expr::Arith(op, a, b) => self.binary(a, b, Op::Arith(*op)),
            Expr::Cmp(op, a, b) => self.binary(a, b, Op::Cmp(*op)),
            Expr::And(a, b) => self.binary(a, b, Op::And),
            Expr::Or(a, b) => self.binary(a, b, Op::Or),
            Expr::Sustained { cond, window, slot } => {
                self.emit(cond);
                self.reduce(
                    1,
                    Op::Sustained {
                        window_ms: window.num_milliseconds(),
                        slot: *slot as u32,
                    },
                );
            }
            Expr::Demand => self.push(Op::Demand),
            Expr::Alert(i) => self.push(Op::Alert(*i as u32)),
            Expr::Schedule(s) => {
                self.buf.schedules.push((**s).clone());
                self.push(Op::Schedule((self.buf.schedules.len() - 1) as u32));
            }
        }
    }

    fn binary(&mut self, a: &Expr, b: &Expr, op: Op) {
        self.emit(a);
        self.emit(b);
        self.reduce(2, op);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parser::parse;
    use crate::policy::resolve::{Names, Resolver};

    fn program(text: &str) -> Result<Vec<Op>, TooDeep> {
        let sources = vec!["queue".to_string()];
        let names = Names {
            sources: &sources,
            alerts: &[],
            has_service: true,
        };
        let mut r = Resolver::new(&names);
        let e = r.condition(&parse(text).unwrap()).unwrap();
        let mut buf = CodeBuf::default();
        buf.ops.push(Op::Const(7.0));
        let code = buf.emit(&e)?;
        assert_eq!(code.start, 1, "code is appended after what was there");
        Ok(buf.ops[code.range()].to_vec())
    }

    #[test]
    fn postfix_order_follows_the_tree() {
        let p = program("queue + 1 > 2 for 5s").unwrap();
        assert_eq!(
            p,
            vec![
                Op::Metric(Metric::Source(0)),
                Op::Const(1.0),
                Op::Arith(ArithOp::Add),
                Op::Const(2.0),
                Op::Cmp(CmpOp::Gt),
                Op::Sustained {
                    window_ms: 5000,
                    slot: 0
                },
            ]
        );
    }

    #[test]
    fn an_operation_fits_in_sixteen_bytes() {
        // Four operations per cache line: the engine's inner loop is memory-bound.
        assert_eq!(std::mem::size_of::<Op>(), 16);
    }

    #[test]
    fn too_deep_expressions_are_refused() {
        let deep = format!("{}queue{} > 1", "(1 + ".repeat(60), ")".repeat(60));
        // The parser allows 64 levels of parentheses; the stack bound is what stops it.
        assert_eq!(program(&deep).unwrap_err(), TooDeep { depth: 61 });
        assert!(
            program(&format!(
                "{}queue{} > 1",
                "(1 + ".repeat(20),
                ")".repeat(20)
            ))
            .is_ok()
        );
    }
}
