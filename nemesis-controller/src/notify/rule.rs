//! The `AlertRule` custom resource (`nemesis.dev/v1alpha1`): what users declare to be told
//! about (scaling events, slow or failed wakes, flapping, a metric over a threshold for a
//! while, an invalid policy, a lost agent) and where it goes. Owns the wire shape and its
//! validation into a [`CompiledRule`] (problems with field and column, as policies get);
//! it never evaluates and never talks to the API.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::ast::{Node, NodeKind};
use crate::policy::duration::parse_duration;
use crate::policy::parser::parse;
use crate::policy::problem::Problem;

/// Events batch for this long by default before one notification carries them all.
pub const DEFAULT_GROUP_WAIT_MS: u64 = 10_000;
/// An event alert (a scale, a slow wake) counts as resolved after this long without a
/// repeat; a repeat inside it is the same alert, counted, not sent again.
pub const DEFAULT_RESOLVE_AFTER_MS: u64 = 5 * 60_000;

/// Tells people about scaling events and thresholds of the ScalingPolicies in its
/// namespace, through the sinks the administrator configured.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[kube(
    group = "nemesis.dev",
    version = "v1alpha1",
    kind = "AlertRule",
    plural = "alertrules",
    shortname = "arule",
    namespaced,
    status = "AlertRuleStatus",
    derive = "PartialEq",
    doc = "Alerts on scaling events and thresholds of the ScalingPolicies in its namespace.",
    printcolumn = r#"{"name":"Policy","type":"string","jsonPath":".spec.policy"}"#,
    printcolumn = r#"{"name":"Severity","type":"string","jsonPath":".spec.severity"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AlertRuleSpec {
    /// The ScalingPolicy (in this namespace) the rule watches; absent: every policy of the
    /// namespace. `agentLost` is about the cluster and ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,

    /// `info`, `warning` (the default) or `critical`; sent as the `severity` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,

    /// Names of the sinks (configured by the administrator) to notify; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sinks: Vec<String>,

    /// How long alerts wait to be sent together in one notification (default `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_wait: Option<String>,

    /// An event alert resolves after this long without a repeat (default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolve_after: Option<String>,

    /// What raises an alert; each entry sets exactly one field.
    pub when: Vec<AlertTrigger>,
}

/// One thing that raises an alert: set exactly one field.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertTrigger {
    /// `ScaledToZero`, `ScaledFromZero`, `HoldsTimedOut` (no pod became ready within the
    /// readiness budget: the held connections were timed out), `HoldsRefused` (an
    /// agent's proxy refused connections at once because a held-connection bound was
    /// reached), `WakeFailed` (a wake was refused or failed), `InvalidPolicy`,
    /// `AgentLost`, `PrometheusFailing` (a PromQL source's query fails: Prometheus down,
    /// slow past the source's timeout, or answering garbage; the policy runs on the
    /// source's `fallback` until it answers again, which resolves the alert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,

    /// A cold start (first wake-up to first ready pod) slower than this (`30s`, `2m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_slower_than: Option<String>,

    /// More than `transitions` state changes within `window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flapping: Option<Flapping>,

    /// A condition over the policy's metrics in the policy language, e.g.
    /// `conns.active > 100 for 5m`; fires once it held for the `for` window and resolves
    /// when it stops holding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Flapping {
    pub transitions: u32,
    pub window: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertRuleStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: True when the rule is valid and evaluated; False with every problem
    /// (field, column, message) otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The CRD as YAML (`manifests/crd/alertrule.yaml`).
pub fn crd_yaml() -> String {
    let mut crd = serde_json::to_value(AlertRule::crd()).expect("a CRD is JSON");
    crate::policy::crd::reflow_descriptions(&mut crd);
    let body = serde_norway::to_string(&crd).expect("a CRD always serializes to YAML");
    format!(
        "# Generated from nemesis-controller/src/notify/rule.rs by `cargo xtask gen`; do not edit.\n{body}"
    )
}

// === the validated form ===

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    ScaledToZero,
    ScaledFromZero,
    HoldsTimedOut,
    HoldsRefused,
    WakeFailed,
    InvalidPolicy,
    AgentLost,
    PrometheusFailing,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::ScaledToZero,
        EventKind::ScaledFromZero,
        EventKind::HoldsTimedOut,
        EventKind::HoldsRefused,
        EventKind::WakeFailed,
        EventKind::InvalidPolicy,
        EventKind::AgentLost,
        EventKind::PrometheusFailing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ScaledToZero => "ScaledToZero",
            EventKind::ScaledFromZero => "ScaledFromZero",
            EventKind::HoldsTimedOut => "HoldsTimedOut",
            EventKind::HoldsRefused => "HoldsRefused",
            EventKind::WakeFailed => "WakeFailed",
            EventKind::InvalidPolicy => "InvalidPolicy",
            EventKind::AgentLost => "AgentLost",
            EventKind::PrometheusFailing => "PrometheusFailing",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    Event(EventKind),
    ColdStartSlowerThan {
        ms: u64,
    },
    Flapping {
        transitions: u32,
        window_ms: u64,
    },
    /// `cond` must hold for `for_ms` (0: at once).
    Threshold {
        text: String,
        cond: Node,
        for_ms: u64,
    },
}

impl Trigger {
    /// The trigger's name in labels (`alertname` is built from it).
    pub fn name(&self) -> &'static str {
        match self {
            Trigger::Event(e) => e.as_str(),
            Trigger::ColdStartSlowerThan { .. } => "SlowColdStart",
            Trigger::Flapping { .. } => "Flapping",
            Trigger::Threshold { .. } => "Threshold",
        }
    }
}

/// A valid rule, ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledRule {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub policy: Option<String>,
    pub severity: Severity,
    pub sinks: Vec<String>,
    pub group_wait_ms: u64,
    pub resolve_after_ms: u64,
    pub triggers: Vec<Trigger>,
}

impl CompiledRule {
    /// Whether the rule watches the policy `namespace/name`.
    pub fn watches(&self, namespace: &str, name: &str) -> bool {
        self.namespace == namespace && self.policy.as_deref().is_none_or(|p| p == name)
    }
}

fn duration_ms(path: &str, text: &str, problems: &mut Vec<Problem>) -> Option<u64> {
    match parse_duration(text) {
        Ok(d) if d.num_milliseconds() > 0 => Some(d.num_milliseconds() as u64),
        Ok(_) => {
            problems.push(Problem::at(path, "must be longer than zero"));
            None
        }
        Err(e) => {
            problems.push(Problem::at(
                path,
                format!("{text:?} is not a duration: {e}"),
            ));
            None
        }
    }
}

/// Validates `rule`; every problem says its field (and column in a threshold).
pub fn compile(rule: &AlertRule) -> Result<CompiledRule, Vec<Problem>> {
    let spec = &rule.spec;
    let mut problems = Vec::new();
    let severity = match spec.severity.as_deref() {
        None | Some("warning") => Severity::Warning,
        Some("info") => Severity::Info,
        Some("critical") => Severity::Critical,
        Some(other) => {
            problems.push(Problem::at(
                "spec.severity",
                format!("{other:?} is not one of info, warning, critical"),
            ));
            Severity::Warning
        }
    };
    let group_wait_ms = spec
        .group_wait
        .as_deref()
        .and_then(|t| duration_ms("spec.groupWait", t, &mut problems))
        .unwrap_or(DEFAULT_GROUP_WAIT_MS);
    let resolve_after_ms = spec
        .resolve_after
        .as_deref()
        .and_then(|t| duration_ms("spec.resolveAfter", t, &mut problems))
        .unwrap_or(DEFAULT_RESOLVE_AFTER_MS);
    for (i, s) in spec.sinks.iter().enumerate() {
        if s.trim().is_empty() {
            problems.push(Problem::at(
                format!("spec.sinks[{i}]"),
                "a sink name is empty",
            ));
        }
    }
    if spec.when.is_empty() {
        problems.push(Problem::at(
            "spec.when",
            "name at least one trigger (event, coldStartSlowerThan, flapping or threshold)",
        ));
    }
    let mut triggers = Vec::new();
    for (i, t) in spec.when.iter().enumerate() {
        let path = format!("spec.when[{i}]");
        let set = [
            t.event.is_some(),
            t.cold_start_slower_than.is_some(),
            t.flapping.is_some(),
            t.threshold.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if set != 1 {
            problems.push(Problem::at(
                &path,
                format!(
                    "set exactly one of event, coldStartSlowerThan, flapping, threshold ({set} set)"
                ),
            ));
            continue;
        }
        if let Some(e) = &t.event {
            match EventKind::ALL.iter().find(|k| k.as_str() == e) {
                Some(k) => triggers.push(Trigger::Event(*k)),
                None => problems.push(Problem::at(
                    format!("{path}.event"),
                    format!(
                        "{e:?} is not one of {}",
                        EventKind::ALL.map(EventKind::as_str).join(", ")
                    ),
                )),
            }
        } else if let Some(d) = &t.cold_start_slower_than {
            if let Some(ms) = duration_ms(&format!("{path}.coldStartSlowerThan"), d, &mut problems)
            {
                triggers.push(Trigger::ColdStartSlowerThan { ms });
            }
        } else if let Some(f) = &t.flapping {
            let window = duration_ms(&format!("{path}.flapping.window"), &f.window, &mut problems);
            if f.transitions == 0 {
                problems.push(Problem::at(
                    format!("{path}.flapping.transitions"),
                    "must be at least 1",
                ));
            } else if let Some(window_ms) = window {
                triggers.push(Trigger::Flapping {
                    transitions: f.transitions,
                    window_ms,
                });
            }
        } else if let Some(text) = &t.threshold {
            match threshold(&format!("{path}.threshold"), text) {
                Ok(t) => triggers.push(t),
                Err(p) => problems.push(p),
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let namespace = rule.namespace().unwrap_or_default();
    let name = rule.name_any();
    Ok(CompiledRule {
        key: format!("{namespace}/{name}"),
        namespace,
        name,
        policy: spec.policy.clone().filter(|p| !p.is_empty()),
        severity,
        sinks: spec.sinks.clone(),
        group_wait_ms,
        resolve_after_ms,
        triggers,
    })
}

/// A threshold: a comparison (or `and`/`or`/`not` of them) over metric names and
/// numbers, optionally sustained (`... for 5m`).
fn threshold(path: &str, text: &str) -> Result<Trigger, Problem> {
    let node = parse(text).map_err(|e| Problem::in_expression(path, text, e.offset, e.message))?;
    let (cond, for_ms) = match node.kind {
        NodeKind::Sustained {
            cond, window_ms, ..
        } => (*cond, window_ms.max(0) as u64),
        _ => (node, 0),
    };
    check_boolean(path, text, &cond)?;
    Ok(Trigger::Threshold {
        text: text.to_string(),
        cond,
        for_ms,
    })
}

fn check_boolean(path: &str, text: &str, n: &Node) -> Result<(), Problem> {
    use crate::policy::ast::BinOp::*;
    match &n.kind {
        NodeKind::Bool(_) => Ok(()),
        NodeKind::Not(x) => check_boolean(path, text, x),
        NodeKind::Binary { op, lhs, rhs } => match op {
            And | Or => {
                check_boolean(path, text, lhs)?;
                check_boolean(path, text, rhs)
            }
            Lt | Le | Gt | Ge | Eq | Ne => {
                check_number(path, text, lhs)?;
                check_number(path, text, rhs)
            }
            _ => Err(Problem::in_expression(
                path,
                text,
                n.span.start,
                "a threshold must be a comparison such as `conns.active > 100`",
            )),
        },
        _ => Err(Problem::in_expression(
            path,
            text,
            n.span.start,
            "a threshold must be a comparison such as `conns.active > 100`",
        )),
    }
}

fn check_number(path: &str, text: &str, n: &Node) -> Result<(), Problem> {
    match &n.kind {
        NodeKind::Number(_) | NodeKind::Name(_) => Ok(()),
        NodeKind::Neg(x) => check_number(path, text, x),
        NodeKind::Binary { op, lhs, rhs }
            if op.symbol().len() == 1 && "+-*/".contains(op.symbol()) =>
        {
            check_number(path, text, lhs)?;
            check_number(path, text, rhs)
        }
        NodeKind::Call {
            name, name_span, ..
        } => Err(Problem::in_expression(
            path,
            text,
            name_span.start,
            format!(
                "`{name}(...)` is not available in alert thresholds: use metric names and numbers"
            ),
        )),
        NodeKind::Sustained { window_span, .. } => Err(Problem::in_expression(
            path,
            text,
            window_span.start,
            "`for` goes once, at the end of the threshold",
        )),
        _ => Err(Problem::in_expression(
            path,
            text,
            n.span.start,
            "expected a number or a metric name here",
        )),
    }
}

/// Evaluates a threshold condition over the latest metric values; `None` when a metric
/// it names has no value (an absent metric neither fires nor resolves an alert).
pub fn eval_condition(n: &Node, values: &BTreeMap<String, f64>) -> Option<bool> {
    use crate::policy::ast::BinOp::*;
    match &n.kind {
        NodeKind::Bool(b) => Some(*b),
        NodeKind::Not(x) => eval_condition(x, values).map(|b| !b),
        NodeKind::Binary { op, lhs, rhs } => match op {
            And => Some(eval_condition(lhs, values)? && eval_condition(rhs, values)?),
            Or => Some(eval_condition(lhs, values)? || eval_condition(rhs, values)?),
            _ => {
                let (a, b) = (eval_number(lhs, values)?, eval_number(rhs, values)?);
                Some(match op {
                    Lt => a < b,
                    Le => a <= b,
                    Gt => a > b,
                    Ge => a >= b,
                    Eq => a == b,
                    Ne => a != b,
                    _ => return None,
                })
            }
        },
        _ => None,
    }
}

fn eval_number(n: &Node, values: &BTreeMap<String, f64>) -> Option<f64> {
    use crate::policy::ast::BinOp::*;
    let v = match &n.kind {
        NodeKind::Number(v) => *v,
        NodeKind::Name(name) => *values.get(name)?,
        NodeKind::Neg(x) => -eval_number(x, values)?,
        NodeKind::Binary { op, lhs, rhs } => {
            let (a, b) = (eval_number(lhs, values)?, eval_number(rhs, values)?);
            match op {
                Add => a + b,
                Sub => a - b,
                Mul => a * b,
                Div => a / b,
                _ => return None,
            }
        }
        _ => return None,
    };
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(spec: serde_json::Value) -> AlertRule {
        let mut r = AlertRule::new("r", serde_json::from_value(spec).unwrap());
        r.metadata.namespace = Some("ns".into());
        r
    }

    #[test]
    fn a_valid_rule_compiles_every_trigger_kind() {
        let c = compile(&rule(serde_json::json!({
            "policy": "web", "severity": "critical", "sinks": ["mail"], "groupWait": "2s",
            "when": [
                {"event": "ScaledToZero"},
                {"coldStartSlowerThan": "30s"},
                {"flapping": {"transitions": 4, "window": "10m"}},
                {"threshold": "conns.active > 100 for 5m"}
            ]
        })))
        .unwrap();
        assert_eq!(c.key, "ns/r");
        assert_eq!(c.severity, Severity::Critical);
        assert_eq!(c.group_wait_ms, 2000);
        assert_eq!(c.triggers.len(), 4);
        assert!(matches!(
            c.triggers[1],
            Trigger::ColdStartSlowerThan { ms: 30_000 }
        ));
        assert!(matches!(
            c.triggers[3],
            Trigger::Threshold {
                for_ms: 300_000,
                ..
            }
        ));
        assert!(c.watches("ns", "web") && !c.watches("ns", "api") && !c.watches("x", "web"));
    }

    #[test]
    fn problems_name_the_field_and_the_column() {
        let e = compile(&rule(serde_json::json!({
            "severity": "loud",
            "when": [
                {"event": "Exploded"},
                {"threshold": "conns.active > > 3"},
                {"threshold": "rate(x) > 3"},
                {"event": "AgentLost", "threshold": "x > 1"},
                {"flapping": {"transitions": 0, "window": "1m"}},
                {"coldStartSlowerThan": "soon"}
            ]
        })))
        .unwrap_err();
        let text: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert!(text[0].starts_with("spec.severity: \"loud\""), "{text:?}");
        assert!(
            text[1].starts_with("spec.when[0].event: \"Exploded\""),
            "{text:?}"
        );
        assert!(
            text[2].starts_with("spec.when[1].threshold: column 16:"),
            "{text:?}"
        );
        assert!(
            text[3].starts_with("spec.when[2].threshold: column 1: `rate(...)`"),
            "{text:?}"
        );
        assert!(
            text[4].starts_with("spec.when[3]: set exactly one"),
            "{text:?}"
        );
        assert!(
            text[5].starts_with("spec.when[4].flapping.transitions"),
            "{text:?}"
        );
        assert!(
            text[6].starts_with("spec.when[5].coldStartSlowerThan"),
            "{text:?}"
        );
    }

    #[test]
    fn thresholds_evaluate_over_values_and_missing_metrics_say_nothing() {
        let Trigger::Threshold { cond, .. } = threshold("t", "a * 2 > b and not (c == 1)").unwrap()
        else {
            panic!()
        };
        let v = |a: f64, b: f64, c: f64| {
            BTreeMap::from([("a".into(), a), ("b".into(), b), ("c".into(), c)])
        };
        assert_eq!(eval_condition(&cond, &v(3.0, 5.0, 0.0)), Some(true));
        assert_eq!(eval_condition(&cond, &v(2.0, 5.0, 0.0)), Some(false));
        assert_eq!(eval_condition(&cond, &v(3.0, 5.0, 1.0)), Some(false));
        assert_eq!(eval_condition(&cond, &BTreeMap::new()), None);
    }
}
