//! Turns a parsed condition into the engine's `Expr`: resolves names (metrics, alerts,
//! `demand`, functions), checks types (numbers vs truth values) and numbers the `for`
//! trackers. Owns the language's meaning; it never evaluates anything.

use super::ast::{BinOp, Node, NodeKind};
use super::duration::format_duration;
use super::expr::{ArithOp, CmpOp, Expr, Metric};
use super::lexer::Span;
use super::schedule::{DEFAULT_SCHEDULE_WINDOW, MAX_SCHEDULE_WINDOW, Schedule, ScheduleError};
use chrono::TimeDelta;

/// What names a policy defines, for resolving its expressions.
pub struct Names<'a> {
    /// Prometheus source names, in spec order.
    pub sources: &'a [String],
    /// Declared alert names, in spec order.
    pub alerts: &'a [String],
    /// Whether the policy names a Service (the `conns.*` metrics and `demand` need one).
    pub has_service: bool,
}

/// Names that always exist; Prometheus sources may not take them.
pub const BUILTIN_METRICS: &[(&str, &str)] = &[
    ("conns.active", "open connections to the target Service"),
    (
        "conns.rate",
        "new connections per second to the target Service",
    ),
    ("conns.held", "connections held by the agents"),
    ("replicas", "the target's replicas"),
    ("replicas.ready", "the target's ready replicas"),
];

/// Words the language itself uses; no Prometheus source may be called one of these.
pub const RESERVED_WORDS: &[&str] = &[
    "and", "or", "not", "for", "true", "false", "demand", "alert", "schedule", "conns", "replicas",
];

/// One problem in one expression: where (byte span) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveError {
    pub span: Span,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Num,
    Bool,
    /// A duration literal; reads as seconds where a number is expected.
    Dur,
    Str,
    /// Already reported; suppresses follow-on errors.
    Error,
}

impl Ty {
    fn describe(self) -> &'static str {
        match self {
            Ty::Num => "a number",
            Ty::Bool => "a condition (true or false)",
            Ty::Dur => "a duration",
            Ty::Str => "a string",
            Ty::Error => "an invalid expression",
        }
    }
}

pub struct Resolver<'a> {
    names: &'a Names<'a>,
    /// The next free `for` tracker slot (shared across the policy's expressions).
    pub next_slot: usize,
    pub errors: Vec<ResolveError>,
    /// Prometheus sources and alerts referenced, for "declared but unused" warnings.
    pub used_sources: Vec<bool>,
    pub used_alerts: Vec<bool>,
}

impl<'a> Resolver<'a> {
    pub fn new(names: &'a Names<'a>) -> Self {
        Self {
            names,
            next_slot: 0,
            errors: Vec::new(),
            used_sources: vec![false; names.sources.len()],
            used_alerts: vec![false; names.alerts.len()],
        }
    }

    /// Resolves a transition condition: it must be true or false.
    pub fn condition(&mut self, node: &Node) -> Option<Expr> {
        let before = self.errors.len();
        let (expr, ty) = self.node(node);
        if ty != Ty::Bool && ty != Ty::Error {
            self.error(
                node.span,
                format!(
                    "a condition must be true or false, but this is {}; compare it, e.g. `... > 0`",
                    ty.describe()
                ),
            );
        }
        (self.errors.len() == before).then_some(expr)
    }

    /// Resolves a metric expression for a range state: it must be a number and may not
    /// hold conditions.
    pub fn number(&mut self, node: &Node) -> Option<Expr> {
        let before = self.errors.len();
        let (expr, ty) = self.node(node);
        match ty {
            Ty::Num | Ty::Dur | Ty::Error => {}
            other => self.error(
                node.span,
                format!(
                    "a metric expression must be a number, but this is {}",
                    other.describe()
                ),
            ),
        }
        (self.errors.len() == before).then_some(expr)
    }

    fn error(&mut self, span: Span, message: String) {
        self.errors.push(ResolveError { span, message });
    }

    fn node(&mut self, node: &Node) -> (Expr, Ty) {
        match &node.kind {
            NodeKind::Number(n) => (Expr::Num(*n), Ty::Num),
            NodeKind::Duration(ms) => (Expr::Num(*ms as f64 / 1000.0), Ty::Dur),
            NodeKind::Bool(b) => (Expr::Bool(*b), Ty::Bool),
            NodeKind::Str(_) => {
                self.error(
                    node.span,
                    "a string can only be an argument of `schedule(...)` or `alert(...)`".into(),
                );
                (Expr::Bool(false), Ty::Error)
            }
            NodeKind::Name(name) => self.name(name, node.span),
            NodeKind::Call {
                name,
                name_span,
                args,
            } => self.call(name, *name_span, args, node.span),
            NodeKind::Neg(inner) => {
                let (e, ty) = self.node(inner);
                self.want_number(ty, inner.span, "`-`");
                (Expr::Neg(Box::new(e)), num_or_error(ty))
            }
            NodeKind::Not(inner) => {
                let (e, ty) = self.node(inner);
                self.want_bool(ty, inner.span, "`not`");
                (Expr::Not(Box::new(e)), bool_or_error(ty))
            }
            NodeKind::Binary { op, lhs, rhs } => self.binary(*op, lhs, rhs),
            NodeKind::Sustained {
                cond,
                window_ms,
                window_span,
            } => {
                let (e, ty) = self.node(cond);
                self.want_bool(ty, cond.span, "`for`");
                let window = TimeDelta::milliseconds(*window_ms);
                if window <= TimeDelta::zero() {
                    self.error(
                        *window_span,
                        "a `for` window must be longer than zero".into(),
                    );
                }
                let slot = self.next_slot;
                self.next_slot += 1;
                (
                    Expr::Sustained {
                        cond: Box::new(e),
                        window,
                        slot,
                    },
                    bool_or_error(ty),
                )
            }
        }
    }

    fn want_number(&mut self, ty: Ty, span: Span, op: &str) {
        if !matches!(ty, Ty::Num | Ty::Dur | Ty::Error) {
            self.error(
                span,
                format!("{op} needs a number here, but this is {}", ty.describe()),
            );
        }
    }

    fn want_bool(&mut self, ty: Ty, span: Span, op: &str) {
        if !matches!(ty, Ty::Bool | Ty::Error) {
            self.error(
                span,
                format!("{op} needs a condition here, but this is {}", ty.describe()),
            );
        }
    }

    fn name(&mut self, name: &str, span: Span) -> (Expr, Ty) {
        let metric = match name {
            "demand" => {
                if !self.names.has_service {
                    self.error(span, "`demand` needs `spec.target.service`".into());
                    return (Expr::Bool(false), Ty::Error);
                }
                return (Expr::Demand, Ty::Bool);
            }
            "conns.active" => Some(Metric::ConnsActive),
            "conns.rate" => Some(Metric::ConnsRate),
            "conns.held" => Some(Metric::ConnsHeld),
            "replicas" => Some(Metric::Replicas),
            "replicas.ready" => Some(Metric::ReadyReplicas),
            _ => None,
        };
        if let Some(m) = metric {
            if name.starts_with("conns.") && !self.names.has_service {
                self.error(
                    span,
                    format!(
                        "`{name}` counts a Service's connections and needs `spec.target.service`"
                    ),
                );
                return (Expr::Num(0.0), Ty::Error);
            }
            return (Expr::Metric(m), Ty::Num);
        }
        if let Some(i) = self.names.sources.iter().position(|s| s == name) {
            self.used_sources[i] = true;
            return (Expr::Metric(Metric::Source(i as u32)), Ty::Num);
        }
        if name == "alert" || name == "schedule" {
            self.error(
                span,
                format!("`{name}` is a function: call it as `{name}(...)`"),
            );
            return (Expr::Num(0.0), Ty::Error);
        }
        let mut known: Vec<String> = BUILTIN_METRICS.iter().map(|(n, _)| n.to_string()).collect();
        known.extend(self.names.sources.iter().cloned());
        known.push("demand".into());
        let hint = match closest(name, &known) {
            Some(near) => format!("; did you mean `{near}`?"),
            None => String::new(),
        };
        self.error(
            span,
            format!(
                "unknown metric `{name}`{hint} (known: {}; a Prometheus source is named in spec.metrics.prometheus)",
                known.join(", ")
            ),
        );
        (Expr::Num(0.0), Ty::Error)
    }

    fn binary(&mut self, op: BinOp, lhs: &Node, rhs: &Node) -> (Expr, Ty) {
        let (a, ta) = self.node(lhs);
        let (b, tb) = self.node(rhs);
        let (a, b) = (Box::new(a), Box::new(b));
        let symbol = format!("`{}`", op.symbol());
        match op {
            BinOp::And | BinOp::Or => {
                self.want_bool(ta, lhs.span, &symbol);
                self.want_bool(tb, rhs.span, &symbol);
                let ty = if ta == Ty::Error || tb == Ty::Error {
                    Ty::Error
                } else {
                    Ty::Bool
                };
                let e = if op == BinOp::And {
                    Expr::And(a, b)
                } else {
                    Expr::Or(a, b)
                };
                (e, ty)
            }
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div => {
                self.want_number(ta, lhs.span, &symbol);
                self.want_number(tb, rhs.span, &symbol);
                let ty = if ta == Ty::Error || tb == Ty::Error {
                    Ty::Error
                } else {
                    Ty::Num
                };
                let aop = match op {
                    BinOp::Add => ArithOp::Add,
                    BinOp::Sub => ArithOp::Sub,
                    BinOp::Mul => ArithOp::Mul,
                    _ => ArithOp::Div,
                };
                (Expr::Arith(aop, a, b), ty)
            }
            _ => {
                self.want_number(ta, lhs.span, &symbol);
                self.want_number(tb, rhs.span, &symbol);
                let ty = if ta == Ty::Error || tb == Ty::Error {
                    Ty::Error
                } else {
                    Ty::Bool
                };
                let cop = match op {
                    BinOp::Lt => CmpOp::Lt,
                    BinOp::Le => CmpOp::Le,
                    BinOp::Gt => CmpOp::Gt,
                    BinOp::Ge => CmpOp::Ge,
                    BinOp::Eq => CmpOp::Eq,
                    _ => CmpOp::Ne,
                };
                (Expr::Cmp(cop, a, b), ty)
            }
        }
    }

    fn call(&mut self, name: &str, name_span: Span, args: &[Node], span: Span) -> (Expr, Ty) {
        match name {
            "alert" => self.alert(args, span),
            "schedule" => self.schedule(args, span),
            _ => {
                self.error(
                    name_span,
                    format!("unknown function `{name}`: the functions are `alert(...)` and `schedule(...)`"),
                );
                (Expr::Bool(false), Ty::Error)
            }
        }
    }

    fn alert(&mut self, args: &[Node], span: Span) -> (Expr, Ty) {
        let [arg] = args else {
            self.error(
                span,
                "`alert` takes one alert name, e.g. `alert(GPUPressure)`".into(),
            );
            return (Expr::Bool(false), Ty::Error);
        };
        let alert = match &arg.kind {
            NodeKind::Name(n) | NodeKind::Str(n) => n,
            _ => {
                self.error(
                    arg.span,
                    "expected an alert name, e.g. `alert(GPUPressure)`".into(),
                );
                return (Expr::Bool(false), Ty::Error);
            }
        };
        match self.names.alerts.iter().position(|a| a == alert) {
            Some(i) => {
                self.used_alerts[i] = true;
                (Expr::Alert(i), Ty::Bool)
            }
            None => {
                self.error(
                    arg.span,
                    format!("alert `{alert}` is not declared in spec.metrics.alerts"),
                );
                (Expr::Bool(false), Ty::Error)
            }
        }
    }

    fn schedule(&mut self, args: &[Node], span: Span) -> (Expr, Ty) {
        const USAGE: &str = "`schedule` takes a cron pattern, then optionally a time zone and a window: `schedule(\"0 8 * * MON-FRI\", \"Europe/Paris\", for 10h)`";
        let mut pattern: Option<(&str, Span)> = None;
        let mut tz: Option<(&str, Span)> = None;
        let mut window: Option<(i64, Span)> = None;
        for (i, arg) in args.iter().enumerate() {
            match (&arg.kind, i) {
                (NodeKind::Str(s), 0) => pattern = Some((s, arg.span)),
                (NodeKind::Str(s), 1) => tz = Some((s, arg.span)),
                (NodeKind::Duration(ms), 1 | 2) if window.is_none() => {
                    window = Some((*ms, arg.span))
                }
                _ => {
                    self.error(arg.span, USAGE.into());
                    return (Expr::Bool(false), Ty::Error);
                }
            }
        }
        let Some((pattern, pattern_span)) = pattern else {
            self.error(span, USAGE.into());
            return (Expr::Bool(false), Ty::Error);
        };
        let window = match window {
            None => DEFAULT_SCHEDULE_WINDOW,
            Some((ms, wspan)) => {
                let w = TimeDelta::milliseconds(ms);
                if w <= TimeDelta::zero() || w > MAX_SCHEDULE_WINDOW {
                    self.error(
                        wspan,
                        format!(
                            "a schedule window must be longer than zero and at most {}",
                            format_duration(MAX_SCHEDULE_WINDOW)
                        ),
                    );
                    return (Expr::Bool(false), Ty::Error);
                }
                w
            }
        };
        match Schedule::new(pattern, tz.map(|t| t.0), window) {
            Ok(s) => (Expr::Schedule(Box::new(s)), Ty::Bool),
            Err(ScheduleError::Pattern(m)) => {
                self.error(pattern_span, format!("bad cron pattern `{pattern}`: {m}"));
                (Expr::Bool(false), Ty::Error)
            }
            Err(ScheduleError::TimeZone(m)) => {
                self.error(tz.map(|t| t.1).unwrap_or(span), m);
                (Expr::Bool(false), Ty::Error)
            }
        }
    }
}

fn num_or_error(ty: Ty) -> Ty {
    if ty == Ty::Error { Ty::Error } else { Ty::Num }
}

fn bool_or_error(ty: Ty) -> Ty {
    if ty == Ty::Error { Ty::Error } else { Ty::Bool }
}

/// The known name closest to a misspelt one, when it is close enough to be a typo.
fn closest<'k>(name: &str, known: &'k [String]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::super::parser::parse;
    use super::*;

    fn names() -> (Vec<String>, Vec<String>) {
        (
            vec!["queue".into(), "gpu".into()],
            vec!["GPUPressure".into()],
        )
    }

    fn resolve(text: &str, has_service: bool) -> Result<Expr, Vec<ResolveError>> {
        let (sources, alerts) = names();
        let names = Names {
            sources: &sources,
            alerts: &alerts,
            has_service,
        };
        let mut r = Resolver::new(&names);
        let node = parse(text).unwrap();
        r.condition(&node).ok_or(r.errors)
    }

    fn first_error(text: &str) -> (usize, String) {
        let e = resolve(text, true).unwrap_err().remove(0);
        (e.span.start, e.message)
    }

    #[test]
    fn known_names_resolve_to_metrics_alerts_and_demand() {
        let e = resolve(
            "queue > 20 and conns.active == 0 or demand or alert(GPUPressure)",
            true,
        )
        .unwrap();
        assert_eq!(e.metrics(), vec![Metric::Source(0), Metric::ConnsActive]);
    }

    #[test]
    fn each_for_gets_its_own_tracker_slot() {
        let (sources, alerts) = names();
        let names = Names {
            sources: &sources,
            alerts: &alerts,
            has_service: true,
        };
        let mut r = Resolver::new(&names);
        r.condition(&parse("queue > 1 for 5s or gpu > 2 for 1m").unwrap())
            .unwrap();
        r.condition(&parse("queue < 1 for 5s").unwrap()).unwrap();
        assert_eq!(r.next_slot, 3);
        assert_eq!(r.used_sources, vec![true, true]);
    }

    #[test]
    fn unknown_metric_is_named_with_a_suggestion() {
        let (at, msg) = first_error("queu > 20");
        assert_eq!(at, 0);
        assert!(
            msg.starts_with("unknown metric `queu`; did you mean `queue`?"),
            "{msg}"
        );
        let (at, msg) = first_error("conns.active == 0 and conns.actve > 1");
        assert_eq!(at, 22);
        assert!(msg.contains("did you mean `conns.active`"), "{msg}");
    }

    #[test]
    fn type_errors_point_at_the_operand() {
        let (at, msg) = first_error("queue > 1 and 5");
        assert_eq!(at, 14);
        assert!(msg.contains("`and` needs a condition"), "{msg}");
        let (at, msg) = first_error("queue + (gpu > 1) > 3");
        assert_eq!(at, 8);
        assert!(msg.contains("`+` needs a number"), "{msg}");
        let (at, msg) = first_error("queue");
        assert_eq!(at, 0);
        assert!(msg.contains("must be true or false"), "{msg}");
        let (at, msg) = first_error("queue for 5m");
        assert_eq!(at, 0);
        assert!(msg.contains("`for` needs a condition"), "{msg}");
    }

    #[test]
    fn durations_read_as_seconds_in_arithmetic() {
        assert!(resolve("queue * 1m > 30s", true).is_ok());
    }

    #[test]
    fn alerts_must_be_declared() {
        let (at, msg) = first_error("alert(DiskFull)");
        assert_eq!(at, 6);
        assert_eq!(
            msg,
            "alert `DiskFull` is not declared in spec.metrics.alerts"
        );
        assert!(resolve("alert('GPUPressure')", true).is_ok());
        assert!(first_error("alert()").1.contains("takes one alert name"));
    }

    #[test]
    fn schedules_check_pattern_zone_and_window() {
        assert!(
            resolve(
                "schedule(\"0 8 * * MON-FRI\", \"Europe/Paris\", for 8h)",
                true
            )
            .is_ok()
        );
        assert!(resolve("schedule(\"0 8 * * *\", 8h)", true).is_ok());
        assert!(resolve("schedule(\"0 8 * * *\")", true).is_ok());
        let (at, msg) = first_error("schedule(\"0 8 * *\", \"UTC\")");
        assert_eq!(at, 9);
        assert!(msg.starts_with("bad cron pattern"), "{msg}");
        let (at, msg) = first_error("schedule(\"0 8 * * *\", \"Europe/Pariss\")");
        assert_eq!(at, 22);
        assert!(msg.contains("unknown time zone `Europe/Pariss`"), "{msg}");
        let (_, msg) = first_error("schedule(8h)");
        assert!(msg.contains("takes a cron pattern"), "{msg}");
    }

    #[test]
    fn connection_metrics_need_a_service() {
        let e = resolve("conns.active == 0", false).unwrap_err();
        assert!(e[0].message.contains("needs `spec.target.service`"));
        assert!(resolve("demand", false).is_err());
        assert!(resolve("replicas.ready == 0", false).is_ok());
    }

    #[test]
    fn unknown_function_and_bare_function_names_are_explained() {
        assert!(
            first_error("cpu(1) > 2")
                .1
                .starts_with("unknown function `cpu`")
        );
        assert!(first_error("alert").1.contains("is a function"));
    }

    #[test]
    fn all_errors_of_an_expression_are_reported() {
        let errs = resolve("foo > 1 and bar > 2", true).unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[1].span.start, 12);
    }
}
