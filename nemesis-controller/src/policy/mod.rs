//! The `ScalingPolicy` resource and its language: CRD types, the condition language
//! (lexer, parser, name resolution), the short form, and validation into a
//! `CompiledPolicy`. Owns what a policy means; it never evaluates one against live data
//! (that is `engine`) and never talks to Kubernetes.
//!
//! # The condition language
//!
//! A transition's `when` is a condition; a range state's `metric` is a number.
//!
//! - Numbers: `20`, `0.5`; durations `500ms`, `30s`, `10m`, `1h`, `2d`, `1h30m` (read as
//!   seconds where a number is expected: `conns.rate * 1m > 100` is "more than 100 new
//!   connections a minute").
//! - Metrics: `conns.active` (open connections to the target Service, summed over live
//!   agents), `conns.rate` (new connections per second), `conns.held` (connections the
//!   agents hold), `replicas`, `replicas.ready`, and every Prometheus source by its name
//!   (`queue`). `conns.*` and `demand` need `spec.target.service`.
//! - Operators, loosest first: `or`, `and`, `not`, `for`, comparisons
//!   (`> >= < <= == !=`, not chainable), `+ -`, `* /`, unary `-`; parentheses group.
//! - `cond for 10m`: true once `cond` has been true at every evaluation for ten minutes
//!   without a break; it sustains the comparison before it (`a == 0 for 10m and b` is
//!   `(a == 0 for 10m) and b`); parenthesise to sustain a combination. The window starts
//!   again whenever the state changes or the controller restarts, so neither ever
//!   shortens an idle window.
//! - `demand`: a wake-up (an agent holding a first connection) within the last minute
//!   and since the current state was entered, or any connection held right now.
//! - `alert(GPUPressure)` (or `alert("GPUPressure")`): the alert, declared in
//!   `spec.metrics.alerts`, is firing (Alertmanager webhook).
//! - `schedule("0 8 * * MON-FRI", "Europe/Paris", for 10h)`: a cron pattern (five fields,
//!   or six with seconds) read in an IANA time zone (default `UTC`); true from each time
//!   the pattern fires until the window has passed (`for` is optional; without a window,
//!   one minute, the pattern's resolution). So `schedule(...)` alone is an event that
//!   holds for the minute it fires, and with a window it is a recurring time range.
//!
//! # Missing data
//!
//! A metric is missing when no agent reports (or its counts are older than 30 s), or a
//! Prometheus query failed, timed out, returned nothing or is older than three intervals;
//! a source's `fallback` then stands in. Missing values make comparisons *unknown*
//! (three-valued logic: `unknown and false` is false, `unknown or true` is true), a
//! division by zero too, and only a *true* condition fires. On top of that, a transition
//! into a state that can have zero replicas never fires while a metric it reads is
//! missing, while a wake-up or held connection is pending, or while the pods started by
//! the last wake have not become ready: missing data never scales anything to zero.
//! Why a query fails (refused, timeout, an HTTP error, not JSON, the wrong shape, ...)
//! is the `PrometheusQueries` condition's reason, the `reason` label of
//! `nemesis_controller_prometheus_errors_total`, and an AlertRule's `PrometheusFailing`
//! alert, resolved when the source answers again.
//!
//! # Replicas
//!
//! A state has a fixed `replicas` count or a `range`: `desired = ceil(current * metric /
//! target)` (`targetType: Value`) or `ceil(metric / target)` (`AverageValue`, target per
//! replica), unchanged within `tolerance` (10%) of the target, clamped to min..max (at
//! once when entering the state), and moved by at most `maxStep` replicas per `period`
//! each way (defaults: up 4 per 15 s, down 1 per 30 s). With `Value`, a range at 0
//! replicas stays at 0 (the formula multiplies by the current count): wake it with a
//! transition, or give it `min: 1`.
//!
//! # Transitions
//!
//! The current state's transitions are tried in spec order and the first that is true,
//! past its `cooldown` (counted from the policy's last change of state or replicas) and
//! clear of the zero guards fires; one transition per evaluation. `from: "*"` stands for
//! every state other than `to`.

pub mod ast;
pub mod compile;
pub mod crd;
pub mod duration;
pub mod expr;
pub mod lexer;
pub mod parser;
pub mod problem;
pub mod program;
pub mod promql;
pub mod resolve;
pub mod schedule;
pub mod short_form;
pub mod status;
pub mod target;

pub use compile::{CompiledPolicy, CompiledSource, Replicas, compile};
pub use crd::{ScalingPolicy, ScalingPolicySpec, ScalingPolicyStatus, crd_yaml};
pub use problem::{InvalidPolicy, Problem};
pub use target::WorkloadRef;
