//! Invalid policies are rejected with the field path, the column for expressions, and
//! what was expected; warnings do not stop a policy; the short form expands as documented.

use nemesis_controller::policy::{CompiledPolicy, InvalidPolicy, ScalingPolicySpec, compile};
use std::time::Duration;

fn spec(yaml: &str) -> ScalingPolicySpec {
    serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("test spec does not parse: {e}\n{yaml}"))
}

fn invalid(yaml: &str) -> InvalidPolicy {
    match compile(&spec(yaml)) {
        Ok(_) => panic!("expected the policy to be rejected:\n{yaml}"),
        Err(e) => e,
    }
}

fn valid(yaml: &str) -> CompiledPolicy {
    compile(&spec(yaml)).unwrap_or_else(|e| panic!("expected a valid policy, got {e}\n{yaml}"))
}

/// The only problem's rendering (`path: column N: message`).
fn only_problem(yaml: &str) -> String {
    let e = invalid(yaml);
    assert_eq!(e.problems.len(), 1, "exactly one problem expected: {e}");
    e.problems[0].to_string()
}

/// A valid multi-state policy to mutate in tests.
const BASE: &str = r#"
target: {deployment: ml, service: ml}
metrics:
  prometheus:
    - {name: queue, query: "sum(q)"}
  alerts: [GPUPressure]
initialState: zero
states:
  - {name: zero, replicas: 0}
  - {name: warm, range: {min: 1, max: 4, metric: queue, target: 10}}
  - {name: burst, replicas: 8}
transitions:
  - {from: zero, to: warm, when: demand}
  - {from: warm, to: burst, when: "queue > 40 for 30s"}
  - {from: burst, to: warm, when: "queue < 10 for 5m or alert(GPUPressure)"}
  - {from: warm, to: zero, when: "conns.active == 0 for 10m"}
"#;

fn base_with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "BASE contains {from}");
    BASE.replacen(from, to, 1)
}

#[test]
fn the_base_policy_is_valid_without_warnings() {
    let p = valid(BASE);
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
    assert_eq!(p.transitions().len(), 4);
}

#[test]
fn unknown_metric_names_the_transition_field_and_column() {
    let yaml = base_with("queue < 10 for 5m", "queu < 10 for 5m");
    assert_eq!(
        only_problem(&yaml),
        "spec.transitions[2].when: column 1: unknown metric `queu`; did you mean `queue`? (known: conns.active, conns.rate, conns.held, replicas, replicas.ready, queue, demand; a Prometheus source is named in spec.metrics.prometheus)"
    );
}

#[test]
fn syntax_errors_say_what_was_expected_and_where() {
    let yaml = base_with("queue > 40 for 30s", "queue > for 30s");
    assert_eq!(
        only_problem(&yaml),
        "spec.transitions[1].when: column 9: expected a number, a metric, a function or `(`, found `for`"
    );
    let yaml = base_with("queue > 40 for 30s", "queue > 40 for 30");
    assert_eq!(
        only_problem(&yaml),
        "spec.transitions[1].when: column 18: `30` after `for` needs a unit, for example `30s` or `30m`"
    );
    let yaml = base_with("conns.active == 0 for 10m", "conns.active = 0 for 10m");
    assert_eq!(
        only_problem(&yaml),
        "spec.transitions[3].when: column 14: `=` is not an operator here: compare with `==`"
    );
}

#[test]
fn type_errors_point_at_the_operand() {
    let yaml = base_with("when: demand}", "when: queue + 1}");
    let p = only_problem(&yaml);
    assert!(
        p.starts_with("spec.transitions[0].when: column 1: a condition must be true or false"),
        "{p}"
    );
}

#[test]
fn unknown_states_in_transitions_list_the_known_ones() {
    let yaml = base_with("{from: zero, to: warm", "{from: zer0, to: warm");
    assert_eq!(
        only_problem(&yaml),
        "spec.transitions[0].from: unknown state `zer0` (states: zero, warm, burst)"
    );
    let yaml = base_with("to: burst", "to: bursty");
    assert_eq!(
        only_problem(&yaml),
        "spec.transitions[1].to: unknown state `bursty` (states: zero, warm, burst)"
    );
}

#[test]
fn duplicate_states_are_rejected() {
    let yaml = base_with("{name: burst, replicas: 8}", "{name: warm, replicas: 8}");
    let e = invalid(&yaml);
    assert_eq!(
        e.problems[0].to_string(),
        "spec.states[2].name: duplicate state `warm` (also spec.states[1])"
    );
}

#[test]
fn range_bounds_and_targets_are_checked() {
    let yaml = base_with("min: 1, max: 4", "min: 5, max: 4");
    assert_eq!(
        only_problem(&yaml),
        "spec.states[1].range.max: must be at least min (5), is 4"
    );
    let yaml = base_with("target: 10}", "target: 0}");
    assert_eq!(
        only_problem(&yaml),
        "spec.states[1].range.target: must be above 0 (is 0)"
    );
    let yaml = base_with("min: 1, max: 4", "min: -1, max: 4");
    assert_eq!(
        only_problem(&yaml),
        "spec.states[1].range.min: must not be negative (is -1)"
    );
    let yaml = base_with("target: 10}", "target: 10, tolerance: 1.5}");
    assert_eq!(
        only_problem(&yaml),
        "spec.states[1].range.tolerance: must be at least 0 and below 1 (is 1.5)"
    );
    let yaml = base_with(
        "target: 10}",
        "target: 10, scaleUp: {maxStep: 0, period: 10}}",
    );
    let e = invalid(&yaml);
    let all: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        all,
        vec![
            "spec.states[1].range.scaleUp.maxStep: must be at least 1 (is 0)",
            "spec.states[1].range.scaleUp.period: column 3: `10` needs a unit: ms, s, m, h or d (for example `10s`)",
        ]
    );
}

#[test]
fn a_range_metric_must_be_a_number() {
    let yaml = base_with("metric: queue,", "metric: \"queue > 1\",");
    let p = only_problem(&yaml);
    assert!(
        p.starts_with(
            "spec.states[1].range.metric: column 1: a metric expression must be a number"
        ),
        "{p}"
    );
}

#[test]
fn negative_fixed_replicas_are_rejected() {
    let yaml = base_with("replicas: 8", "replicas: -2");
    assert_eq!(
        only_problem(&yaml),
        "spec.states[2].replicas: must not be negative (is -2)"
    );
}

#[test]
fn a_state_needs_exactly_one_of_replicas_and_range() {
    let yaml = base_with("{name: burst, replicas: 8}", "{name: burst}");
    assert_eq!(
        only_problem(&yaml),
        "spec.states[2]: needs `replicas` (a fixed count) or `range` (min, max, metric, target)"
    );
    let yaml = base_with(
        "{name: burst, replicas: 8}",
        "{name: burst, replicas: 8, range: {min: 1, max: 2, metric: queue, target: 1}}",
    );
    assert_eq!(
        only_problem(&yaml),
        "spec.states[2]: give either `replicas` or `range`, not both"
    );
}

#[test]
fn the_initial_state_is_required_and_must_exist() {
    let yaml = base_with("initialState: zero\n", "");
    assert_eq!(
        only_problem(&yaml),
        "spec.initialState: is required: name the state a new policy starts in"
    );
    let yaml = base_with("initialState: zero", "initialState: cold");
    assert_eq!(
        only_problem(&yaml),
        "spec.initialState: unknown state `cold` (states: zero, warm, burst)"
    );
}

#[test]
fn a_transition_to_its_own_state_is_rejected() {
    let yaml = base_with("{from: zero, to: warm", "{from: zero, to: zero");
    assert_eq!(
        only_problem(&yaml),
        "spec.transitions[0].to: a transition from `zero` to itself changes nothing"
    );
}

#[test]
fn alerts_must_be_declared_and_schedules_well_formed() {
    let yaml = base_with("alert(GPUPressure)", "alert(DiskFull)");
    assert_eq!(
        only_problem(&yaml),
        "spec.transitions[2].when: column 28: alert `DiskFull` is not declared in spec.metrics.alerts"
    );
    let yaml = base_with(
        "when: demand}",
        r#"when: 'schedule("0 8 * * MON-FRI", "Europe/Pariss")'}"#,
    );
    let p = only_problem(&yaml);
    assert!(
        p.starts_with("spec.transitions[0].when: column 29: unknown time zone `Europe/Pariss`"),
        "{p}"
    );
    let yaml = base_with("when: demand}", r#"when: 'schedule("0 25 * * *")'}"#);
    let p = only_problem(&yaml);
    assert!(
        p.starts_with("spec.transitions[0].when: column 10: bad cron pattern `0 25 * * *`"),
        "{p}"
    );
}

#[test]
fn connection_metrics_need_a_service() {
    let yaml = base_with("{deployment: ml, service: ml}", "{deployment: ml}");
    let e = invalid(&yaml);
    let all: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        all,
        vec![
            "spec.transitions[0].when: column 1: `demand` needs `spec.target.service`",
            "spec.transitions[3].when: column 1: `conns.active` counts a Service's connections and needs `spec.target.service`",
        ]
    );
}

#[test]
fn prometheus_sources_are_checked() {
    let yaml = base_with(
        "{name: queue, query: \"sum(q)\"}",
        "{name: demand, query: \"\"}",
    );
    let e = invalid(&yaml);
    assert_eq!(
        e.problems[0].to_string(),
        "spec.metrics.prometheus[0].name: `demand` is a reserved word of the policy language"
    );
    assert_eq!(
        e.problems[1].to_string(),
        "spec.metrics.prometheus[0].query: must not be empty"
    );
    let yaml = base_with(
        "{name: queue, query: \"sum(q)\"}",
        "{name: queue, query: q, server: \"prom:9090\", timeout: 2 s}",
    );
    let all: Vec<String> = invalid(&yaml)
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        all,
        vec![
            "spec.metrics.prometheus[0].server: `prom:9090` is not an http:// or https:// URL",
            "spec.metrics.prometheus[0].timeout: column 2: `2 s`: write the unit right after the number, as in `2s` (units: ms, s, m, h, d)",
        ]
    );
    let yaml = base_with(
        "{name: queue, query: \"sum(q)\"}",
        "{name: queue, query: a}\n    - {name: queue, query: b}",
    );
    assert_eq!(
        only_problem(&yaml),
        "spec.metrics.prometheus[1].name: duplicate source `queue`"
    );
}

#[test]
fn agent_bounds_are_checked() {
    let yaml = format!("{BASE}holdTimeoutSeconds: 0\nmaxHeldConnections: -5\n");
    let all: Vec<String> = invalid(&yaml)
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        all,
        vec![
            "spec.holdTimeoutSeconds: must be between 1 and 3600 (is 0)",
            "spec.maxHeldConnections: must be between 1 and 1000000 (is -5)",
        ]
    );
    let p = valid(&format!(
        "{BASE}holdTimeoutSeconds: 120\nmaxHeldConnections: 50\n"
    ));
    assert_eq!(
        (p.hold_timeout(), p.max_held_connections()),
        (Duration::from_secs(120), 50)
    );
}

#[test]
fn load_balancing_fields_are_checked_with_field_and_column() {
    let yaml = format!(
        "{BASE}loadBalancing:\n  algorithm: fastest\n  slowStart: 30 s\n  preferSameNode: true\n"
    );
    let all: Vec<String> = invalid(&yaml)
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(
        all[0],
        "spec.loadBalancing.algorithm: unknown algorithm `fastest`; use one of p2c, leastConnections, roundRobin, random"
    );
    assert!(
        all[1].starts_with("spec.loadBalancing.slowStart: column 3: "),
        "{}",
        all[1]
    );
    let too_long = format!("{BASE}loadBalancing: {{slowStart: 2h}}\n");
    assert_eq!(
        only_problem(&too_long),
        "spec.loadBalancing.slowStart: must be at most 1h"
    );
    valid(&format!(
        "{BASE}loadBalancing:\n  algorithm: leastConnections\n  slowStart: 20s\n  preferSameZone: true\n"
    ));
    valid(&format!("{BASE}loadBalancing: {{}}\n"));
}

#[test]
fn the_hold_timeout_defaults_to_the_readiness_budget() {
    // A slow starter's callers are held for as long as its start-up may take...
    let p = valid(&format!("{BASE}readinessBudget: 15m\n"));
    assert_eq!(p.hold_timeout(), Duration::from_secs(900));
    // ...longer than the hour an explicit holdTimeoutSeconds is bounded by, too...
    let p = valid(&format!("{BASE}readinessBudget: 2h\n"));
    assert_eq!(p.hold_timeout(), Duration::from_secs(7200));
    // ...unless the policy says otherwise.
    let p = valid(&format!(
        "{BASE}readinessBudget: 15m\nholdTimeoutSeconds: 30\n"
    ));
    assert_eq!(p.hold_timeout(), Duration::from_secs(30));
}

#[test]
fn cooldowns_and_budgets_are_durations() {
    let yaml = base_with("when: demand}", "when: demand, cooldown: 5 minutes}");
    assert_eq!(
        only_problem(&yaml),
        "spec.transitions[0].cooldown: column 2: `5 minutes`: write the unit right after the number, as in `5m` (units: ms, s, m, h, d)"
    );
    let yaml = base_with("when: demand}", "when: demand, cooldown: 2hours}");
    assert_eq!(
        only_problem(&yaml),
        "spec.transitions[0].cooldown: column 2: unknown unit `hours`: write `2h` (units: ms, s, m, h, d)"
    );
    let yaml = format!("{BASE}readinessBudget: 10y\n");
    assert_eq!(
        only_problem(&yaml),
        "spec.readinessBudget: column 3: unknown unit `y`: use ms, s, m, h or d"
    );
}

#[test]
fn cooldowns_and_query_intervals_are_bounded() {
    let yaml = base_with("when: demand}", "when: demand, cooldown: 2d}");
    assert_eq!(
        only_problem(&yaml),
        "spec.transitions[0].cooldown: must be at most 1d"
    );
    let yaml = base_with("query: \"sum(q)\"}", "query: \"sum(q)\", interval: 2h}");
    assert_eq!(
        only_problem(&yaml),
        "spec.metrics.prometheus[0].interval: must be between 1s and 1h"
    );
}

#[test]
fn state_and_transition_counts_are_bounded() {
    let mut yaml = String::from("target: {deployment: w}\ninitialState: s0\nstates:\n");
    for i in 0..101 {
        yaml.push_str(&format!("  - {{name: s{i}, replicas: 1}}\n"));
    }
    yaml.push_str("transitions:\n  - {from: \"*\", to: s0, when: \"replicas > 5\"}\n");
    let all: Vec<String> = invalid(&yaml)
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        all,
        vec!["spec.states: has 101 states; at most 100 are allowed"]
    );
}

#[test]
fn every_problem_is_reported_at_once_in_field_order() {
    let yaml = BASE
        .replacen("min: 1, max: 4", "min: 5, max: 4", 1)
        .replacen("queue > 40 for 30s", "queue >> 40", 1)
        .replacen("to: zero, when", "to: nowhere, when", 1);
    let paths: Vec<String> = invalid(&yaml)
        .problems
        .into_iter()
        .map(|p| p.path)
        .collect();
    assert_eq!(
        paths,
        vec![
            "spec.states[1].range.max",
            "spec.transitions[1].when",
            "spec.transitions[3].to",
        ]
    );
}

#[test]
fn overlong_expressions_are_refused() {
    let long = format!("queue > 1{}", " or queue > 1".repeat(200));
    let yaml = base_with("when: demand}", &format!("when: \"{long}\"}}"));
    let p = only_problem(&yaml);
    assert!(
        p.starts_with("spec.transitions[0].when: is 2609 bytes long; at most 2048"),
        "{p}"
    );
}

#[test]
fn invalid_target_names_are_rejected() {
    let yaml = base_with(
        "{deployment: ml, service: ml}",
        "{deployment: My_App, service: ml}",
    );
    let p = only_problem(&yaml);
    assert!(
        p.starts_with("spec.target.deployment: `My_App` is not a valid Deployment name"),
        "{p}"
    );
}

#[test]
fn unreachable_states_and_unused_sources_are_warnings_not_errors() {
    let p = valid(
        r#"
target: {deployment: ml, service: ml}
metrics:
  prometheus:
    - {name: queue, query: "sum(q)"}
  alerts: [GPUPressure]
initialState: zero
states:
  - {name: zero, replicas: 0}
  - {name: warm, replicas: 2}
  - {name: parked, replicas: 1}
transitions:
  - {from: zero, to: warm, when: demand}
  - {from: warm, to: zero, when: "conns.active == 0 for 10m"}
"#,
    );
    let warnings: Vec<String> = p.warnings().iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        vec![
            "spec.metrics.prometheus[0]: `queue` is never used by a condition or range",
            "spec.metrics.alerts[0]: alert `GPUPressure` is never used by a condition",
            "spec.states[2]: state `parked` is unreachable from the initial state `zero`",
        ]
    );
}

#[test]
fn a_zero_state_without_a_way_out_is_a_warning() {
    let yaml = base_with("  - {from: zero, to: warm, when: demand}\n", "");
    let p = valid(&yaml.replace("initialState: zero", "initialState: warm"));
    let warnings: Vec<String> = p.warnings().iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        vec![
            "spec.states[0]: state `zero` can reach 0 replicas and has no transition out: the target would stay asleep"
        ]
    );
}

#[test]
fn from_star_means_every_other_state() {
    let yaml = base_with(
        "  - {from: warm, to: zero",
        "  - {from: \"*\", to: burst, when: alert(GPUPressure)}\n  - {from: warm, to: zero",
    );
    let p = valid(&yaml);
    let from_star: Vec<(usize, usize)> = p
        .transitions()
        .iter()
        .filter(|t| t.text == "alert(GPUPressure)")
        .map(|t| (t.from, t.to))
        .collect();
    assert_eq!(from_star, vec![(0, 2), (1, 2)]);
}

// === short form ===

#[test]
fn a_policy_with_only_a_target_gets_the_classic_automaton_with_defaults() {
    let p = valid("target: {deployment: web, service: web}");
    assert!(p.is_short_form());
    assert!(p.state_names().eq(["zero", "warm"]));
    assert_eq!(p.initial_state(), "warm");
    let texts: Vec<&str> = p.transitions().iter().map(|t| t.text.as_str()).collect();
    assert_eq!(
        texts,
        vec![
            "demand or conns.active > 0",
            "(conns.active == 0 and conns.held == 0) for 5m and conns.rate == 0 for 4m",
        ]
    );
    // The readiness budget's default, 10 minutes (it was 60 s: an ML model's first
    // callers got a 503 long before the start-up the policy allows was over).
    assert_eq!(p.hold_timeout(), Duration::from_secs(600));
    assert_eq!(p.max_held_connections(), 1024);
}

#[test]
fn short_form_with_a_range_follows_the_target_per_replica() {
    let p = valid(
        "target: {deployment: web, service: web}\nmaxReplicas: 6\nidleTimeout: 90s\ntargetValue: 25\n",
    );
    match &p.states()[1].replicas {
        nemesis_controller::policy::Replicas::Range(r) => {
            assert_eq!((r.min, r.max, r.target), (1, 6, 25.0));
            assert_eq!(r.metric_text, "conns.active");
        }
        other => panic!("warm is a range: {other:?}"),
    }
    assert_eq!(
        p.transitions()[1].text,
        "(conns.active == 0 and conns.held == 0) for 1m30s and conns.rate == 0 for 30s"
    );
}

#[test]
fn short_form_idle_window_counts_the_rate_window_once() {
    // `conns.rate` reads 0 a rate window after the last connect: sustained only for what
    // is left of the idle timeout, and not at all when the rate window is as long.
    let idle = |extra: &str| {
        let p = valid(&format!(
            "target: {{deployment: web, service: web}}\nidleTimeout: 30s\n{extra}"
        ));
        p.transitions()[1].text.clone()
    };
    assert_eq!(
        idle(""),
        "(conns.active == 0 and conns.held == 0) for 30s and conns.rate == 0"
    );
    assert_eq!(
        idle("metrics: {connections: {rateWindow: 30s}}\n"),
        "(conns.active == 0 and conns.held == 0) for 30s and conns.rate == 0"
    );
    assert_eq!(
        idle("metrics: {connections: {rateWindow: 10s}}\n"),
        "(conns.active == 0 and conns.held == 0) for 30s and conns.rate == 0 for 20s"
    );
}

#[test]
fn short_form_with_min_above_zero_never_sleeps() {
    let p = valid("target: {deployment: web}\nminReplicas: 2\nmaxReplicas: 2\n");
    assert!(p.state_names().eq(["warm"]));
    assert!(p.transitions().is_empty());
}

#[test]
fn short_form_problems_name_the_short_form_fields() {
    assert_eq!(
        only_problem("target: {deployment: web, service: web}\nminReplicas: 3\nmaxReplicas: 2\n"),
        "spec.maxReplicas: must be at least minReplicas (3), is 2"
    );
    assert_eq!(
        only_problem("target: {deployment: web, service: web}\nmaxReplicas: 4\n"),
        "spec.targetValue: is needed because maxReplicas (4) is above the warm minimum (1): the value of `conns.active` one replica should carry"
    );
    assert_eq!(
        only_problem("target: {deployment: web, service: web}\nminReplicas: 1\nidleTimeout: 5m\n"),
        "spec.idleTimeout: only applies when scaling to zero, which needs minReplicas: 0 (is 1)"
    );
    assert_eq!(
        only_problem("target: {deployment: web}\nidleTimeout: 5m\n"),
        "spec.target.service: the short form wakes and sleeps on the Service's connections: name the Service"
    );
    assert_eq!(
        only_problem("target: {deployment: web, service: web}\nmaxReplicas: 3\ntargetValue: 5\ntargetMetric: \"conns.activ\"\n")
            .split(';')
            .next()
            .unwrap(),
        "spec.targetMetric: column 1: unknown metric `conns.activ`"
    );
    assert_eq!(
        only_problem("target: {deployment: web, service: web}\nidleTimeout: 10\n"),
        "spec.idleTimeout: column 3: `10` needs a unit: ms, s, m, h or d (for example `10s`)"
    );
}

#[test]
fn short_form_and_states_cannot_be_mixed() {
    let yaml = format!("{BASE}maxReplicas: 3\n");
    assert_eq!(
        only_problem(&yaml),
        "spec.states: use either the short form (minReplicas, maxReplicas, idleTimeout, targetMetric, targetValue) or states and transitions, not both"
    );
}

#[test]
fn short_form_idle_timeout_shorter_than_the_rate_window_sets_it_or_is_refused() {
    // A 20s policy slept 65 s after its last connection: the 1m rate window read the
    // connect for a minute. Without a given window, the idle timeout is the window.
    let p = valid("target: {deployment: web, service: web}\nidleTimeout: 20s\n");
    assert_eq!(p.rate_window(), chrono::TimeDelta::seconds(20));
    assert_eq!(
        p.transitions()[1].text,
        "(conns.active == 0 and conns.held == 0) for 20s and conns.rate == 0"
    );
    let p = valid("target: {deployment: web, service: web}\n");
    assert_eq!(p.rate_window(), chrono::TimeDelta::minutes(1));
    assert_eq!(
        only_problem(
            "target: {deployment: web, service: web}\nidleTimeout: 20s\nmetrics: {connections: {rateWindow: 1m}}\n"
        ),
        "spec.idleTimeout: idleTimeout (20s) is shorter than metrics.connections.rateWindow (1m): conns.rate reads 0 only a rate window after the last connect, so the target would sleep 1m after it; set rateWindow to at most 20s, or leave it out (it then follows idleTimeout)"
    );
    assert!(
        only_problem(
            "target: {deployment: web, service: web}\nmetrics: {connections: {rateWindow: 10m}}\n"
        )
        .starts_with("spec.metrics.connections.rateWindow: idleTimeout (5m) is shorter")
    );
    // The long form keeps the window it is given.
    let p = valid(&base_with(
        "alerts: [GPUPressure]",
        "alerts: [GPUPressure]\n  connections: {rateWindow: 2m}",
    ));
    assert_eq!(p.rate_window(), chrono::TimeDelta::minutes(2));
}

#[test]
fn report_queries_are_checked_with_field_and_column() {
    let ok = format!(
        "{BASE}reports:\n  latency: 'histogram_quantile(0.99, sum by (le) (rate(h_bucket{{namespace=\"$namespace\"}}[5m])))'\n  errorRate: 'sum(rate(e[5m]))'\n"
    );
    valid(&ok);
    let bad = format!("{BASE}reports:\n  latency: 'sum(rate(h[5m])'\n  errorRate: ' '\n");
    let e = invalid(&bad);
    let all: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        all,
        vec![
            "spec.reports.latency: column 4: `(` is never closed".to_string(),
            "spec.reports.errorRate: must not be empty (leave the field out instead)".to_string(),
        ]
    );
}
