//! Decides which alerts a signal raises or resolves under the rules: a pure function of
//! (rules, signal, now) plus the little memory flapping and sustained thresholds need.
//! It never sends and never stores; the service applies its answer to the outbox.

use std::collections::{BTreeMap, VecDeque};

use super::outbox::{Raise, alert_id};
use super::rule::{CompiledRule, EventKind, Trigger, eval_condition};
use crate::store::{ColdStartOutcome, PolicyId};

/// What happened, as the core reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    Scaled {
        policy: PolicyId,
        from: i32,
        to: i32,
        reason: String,
    },
    Transition {
        policy: PolicyId,
        from: String,
        to: String,
        reason: String,
    },
    ColdStart {
        policy: PolicyId,
        time_to_ready_ms: Option<u64>,
        outcome: ColdStartOutcome,
        held: u64,
    },
    Samples {
        policy: PolicyId,
        values: BTreeMap<String, f64>,
    },
    PolicyInvalid {
        policy: PolicyId,
        message: String,
    },
    PolicyValid {
        policy: PolicyId,
    },
    /// A PromQL source of the policy started failing (or failed its first query): the
    /// policy runs on the source's fallback, or holds without one.
    PrometheusFailing {
        policy: PolicyId,
        source: String,
        message: String,
        fallback: Option<f64>,
    },
    /// The source answered (again, or at its first query).
    PrometheusAnswering {
        policy: PolicyId,
        source: String,
    },
    AgentLost {
        node: String,
    },
    AgentBack {
        node: String,
    },
}

impl Signal {
    fn policy(&self) -> Option<&PolicyId> {
        match self {
            Signal::Scaled { policy, .. }
            | Signal::Transition { policy, .. }
            | Signal::ColdStart { policy, .. }
            | Signal::Samples { policy, .. }
            | Signal::PolicyInvalid { policy, .. }
            | Signal::PolicyValid { policy }
            | Signal::PrometheusFailing { policy, .. }
            | Signal::PrometheusAnswering { policy, .. } => Some(policy),
            Signal::AgentLost { .. } | Signal::AgentBack { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Raise(Raise),
    Resolve(String),
}

/// Memory across signals: recent transition times (flapping) and since when a
/// threshold has held.
#[derive(Debug, Default)]
pub struct Memory {
    transitions: BTreeMap<PolicyId, VecDeque<u64>>,
    /// (rule key, trigger index, policy) -> since when the condition holds.
    holding: BTreeMap<(String, usize, PolicyId), u64>,
}

/// Transitions remembered per policy at most (flapping windows beyond it undercount).
const MAX_REMEMBERED_TRANSITIONS: usize = 1_000;

impl Memory {
    /// Forgets rules that are gone.
    pub fn retain_rules(&mut self, keys: &[&str]) {
        self.holding.retain(|(k, ..), _| keys.contains(&k.as_str()));
    }
}

struct Subject<'a> {
    kind: &'a str,
    /// What the alert is about (`ns/policy` or an agent's node).
    what: String,
    labels: Vec<(&'static str, String)>,
}

fn raise(rule: &CompiledRule, index: usize, t: &Trigger, s: Subject<'_>, summary: String) -> Raise {
    let mut labels = BTreeMap::from([
        ("alertname".to_string(), format!("Nemesis{}", t.name())),
        ("severity".to_string(), rule.severity.as_str().to_string()),
        ("nemesis_rule".to_string(), rule.key.clone()),
        ("trigger".to_string(), t.name().to_string()),
    ]);
    for (k, v) in s.labels {
        labels.insert(k.to_string(), v);
    }
    let event_like = !matches!(
        t,
        Trigger::Threshold { .. }
            | Trigger::Event(
                EventKind::InvalidPolicy | EventKind::AgentLost | EventKind::PrometheusFailing
            )
    );
    Raise {
        id: alert_id(&[&rule.key, &index.to_string(), s.kind, &s.what]),
        rule: rule.key.clone(),
        severity: rule.severity,
        summary,
        labels,
        sinks: rule.sinks.clone(),
        group_wait_ms: rule.group_wait_ms,
        resolve_after_ms: event_like.then_some(rule.resolve_after_ms),
    }
}

fn policy_subject(p: &PolicyId) -> Subject<'static> {
    Subject {
        kind: "policy",
        what: p.key(),
        labels: vec![
            ("namespace", p.namespace.clone()),
            ("policy", p.name.clone()),
        ],
    }
}

/// The alerts `signal` raises or resolves under `rules` at `now_ms`. `all_sinks` is
/// used for rules that name none.
pub fn evaluate(
    rules: &[CompiledRule],
    all_sinks: &[String],
    signal: &Signal,
    mem: &mut Memory,
    now_ms: u64,
) -> Vec<Action> {
    if let Signal::Transition { policy, .. } = signal {
        let q = mem.transitions.entry(policy.clone()).or_default();
        q.push_back(now_ms);
        while q.len() > MAX_REMEMBERED_TRANSITIONS {
            q.pop_front();
        }
    }
    let mut out = Vec::new();
    for rule in rules {
        if let Some(p) = signal.policy()
            && !rule.watches(&p.namespace, &p.name)
        {
            continue;
        }
        let rule_with_sinks;
        let rule = if rule.sinks.is_empty() {
            rule_with_sinks = CompiledRule {
                sinks: all_sinks.to_vec(),
                ..rule.clone()
            };
            &rule_with_sinks
        } else {
            rule
        };
        for (i, t) in rule.triggers.iter().enumerate() {
            on_trigger(rule, i, t, signal, mem, now_ms, &mut out);
        }
    }
    out
}

fn on_trigger(
    rule: &CompiledRule,
    i: usize,
    t: &Trigger,
    signal: &Signal,
    mem: &mut Memory,
    now_ms: u64,
    out: &mut Vec<Action>,
) {
    match (t, signal) {
        (
            Trigger::Event(EventKind::ScaledToZero),
            Signal::Scaled {
                policy,
                from,
                to,
                reason,
            },
        ) if *to == 0 && *from > 0 => out.push(Action::Raise(raise(
            rule,
            i,
            t,
            policy_subject(policy),
            format!("{policy} scaled from {from} to zero: {reason}"),
        ))),
        (
            Trigger::Event(EventKind::ScaledFromZero),
            Signal::Scaled {
                policy,
                from,
                to,
                reason,
            },
        ) if *from == 0 && *to > 0 => out.push(Action::Raise(raise(
            rule,
            i,
            t,
            policy_subject(policy),
            format!("{policy} scaled from zero to {to}: {reason}"),
        ))),
        (
            Trigger::ColdStartSlowerThan { ms },
            Signal::ColdStart {
                policy,
                time_to_ready_ms: Some(took),
                held,
                ..
            },
        ) if took > ms => out.push(Action::Raise(raise(
            rule,
            i,
            t,
            policy_subject(policy),
            format!(
                "{policy} took {:.1} s to wake (bound {:.1} s), {held} connection(s) held",
                *took as f64 / 1000.0,
                *ms as f64 / 1000.0
            ),
        ))),
        (
            Trigger::Event(EventKind::HoldsTimedOut),
            Signal::ColdStart {
                policy,
                outcome: ColdStartOutcome::Timeout,
                held,
                ..
            },
        ) => out.push(Action::Raise(raise(
            rule,
            i,
            t,
            policy_subject(policy),
            format!(
                "{policy}: no pod became ready within the readiness budget; {held} held connection(s) timed out"
            ),
        ))),
        (Trigger::Event(EventKind::HoldsRefused), Signal::Samples { policy, values }) => {
            let refused = values
                .get(crate::reports::HOLDS_REFUSED_SERIES)
                .copied()
                .unwrap_or(0.0);
            if refused > 0.0 {
                out.push(Action::Raise(raise(
                    rule,
                    i,
                    t,
                    policy_subject(policy),
                    format!(
                        "{policy}: {refused} connection(s) refused at once: the held-connection bound was reached"
                    ),
                )));
            }
        }
        (
            Trigger::Event(EventKind::WakeFailed),
            Signal::ColdStart {
                policy,
                outcome: ColdStartOutcome::Failed { message },
                held,
                ..
            },
        ) => out.push(Action::Raise(raise(
            rule,
            i,
            t,
            policy_subject(policy),
            format!("{policy}: a wake failed ({message}); {held} connection(s) were held"),
        ))),
        (
            Trigger::Flapping {
                transitions,
                window_ms,
            },
            Signal::Transition { policy, from, to, .. },
        ) => {
            let n = mem.transitions.get(policy).map_or(0, |q| {
                q.iter()
                    .filter(|at| **at + window_ms > now_ms)
                    .count()
            });
            if n > *transitions as usize {
                out.push(Action::Raise(raise(
                    rule,
                    i,
                    t,
                    policy_subject(policy),
                    format!(
                        "{policy} is flapping: {n} transitions within {} s (latest {from} -> {to})",
                        window_ms / 1000
                    ),
                )));
            }
        }
        (Trigger::Threshold { text, cond, for_ms }, Signal::Samples { policy, values }) => {
            let key = (rule.key.clone(), i, policy.clone());
            let r = raise(rule, i, t, policy_subject(policy), String::new());
            match eval_condition(cond, values) {
                Some(true) => {
                    let since = *mem.holding.entry(key).or_insert(now_ms);
                    if now_ms.saturating_sub(since) >= *for_ms {
                        let seen: Vec<String> = values
                            .iter()
                            .filter(|(k, _)| text.contains(k.as_str()))
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect();
                        out.push(Action::Raise(Raise {
                            summary: format!("{policy}: {text} (values: {})", seen.join(", ")),
                            ..r
                        }));
                    }
                }
                Some(false) => {
                    mem.holding.remove(&key);
                    out.push(Action::Resolve(r.id));
                }
                None => {}
            }
        }
        (Trigger::Event(EventKind::InvalidPolicy), Signal::PolicyInvalid { policy, message }) => {
            out.push(Action::Raise(raise(
                rule,
                i,
                t,
                policy_subject(policy),
                format!("{policy} is invalid and scales nothing: {message}"),
            )))
        }
        (Trigger::Event(EventKind::InvalidPolicy), Signal::PolicyValid { policy }) => {
            out.push(Action::Resolve(
                raise(rule, i, t, policy_subject(policy), String::new()).id,
            ))
        }
        (
            Trigger::Event(EventKind::PrometheusFailing),
            Signal::PrometheusFailing {
                policy,
                source,
                message,
                fallback,
            },
        ) => {
            let runs_on = match fallback {
                Some(f) => format!("its conditions see the declared fallback {f}"),
                None => "no fallback is declared: transitions reading it hold and ranges keep their replicas".to_string(),
            };
            out.push(Action::Raise(raise(
                rule,
                i,
                t,
                source_subject(policy, source),
                format!("{policy}: PromQL source `{source}` failing ({message}); {runs_on} until Prometheus answers"),
            )))
        }
        (
            Trigger::Event(EventKind::PrometheusFailing),
            Signal::PrometheusAnswering { policy, source },
        ) => out.push(Action::Resolve(
            raise(rule, i, t, source_subject(policy, source), String::new()).id,
        )),
        (Trigger::Event(EventKind::AgentLost), Signal::AgentLost { node }) => {
            out.push(Action::Raise(raise(
                rule,
                i,
                t,
                agent_subject(node),
                format!("the Nemesis agent on node {node} stopped reporting"),
            )))
        }
        (Trigger::Event(EventKind::AgentLost), Signal::AgentBack { node }) => out.push(
            Action::Resolve(raise(rule, i, t, agent_subject(node), String::new()).id),
        ),
        _ => {}
    }
}

/// One alert per (policy, source): two sources fail and recover apart.
fn source_subject(p: &PolicyId, source: &str) -> Subject<'static> {
    Subject {
        kind: "prometheus-source",
        what: format!("{}/{source}", p.key()),
        labels: vec![
            ("namespace", p.namespace.clone()),
            ("policy", p.name.clone()),
            ("source", source.to_string()),
        ],
    }
}

fn agent_subject(node: &str) -> Subject<'static> {
    Subject {
        kind: "agent",
        what: node.to_string(),
        labels: vec![("node", node.to_string())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::rule::{AlertRule, compile};

    fn rules(when: serde_json::Value) -> Vec<CompiledRule> {
        let mut r = AlertRule::new(
            "r",
            serde_json::from_value(serde_json::json!({"when": when, "sinks": ["s"]})).unwrap(),
        );
        r.metadata.namespace = Some("ns".into());
        vec![compile(&r).unwrap()]
    }

    fn p() -> PolicyId {
        PolicyId::new("ns", "web")
    }

    fn raised(a: &[Action]) -> Vec<&Raise> {
        a.iter()
            .filter_map(|a| match a {
                Action::Raise(r) => Some(r),
                Action::Resolve(_) => None,
            })
            .collect()
    }

    #[test]
    fn scale_events_raise_only_their_direction_and_only_in_the_rules_namespace() {
        let r = rules(serde_json::json!([{"event": "ScaledToZero"}]));
        let mut m = Memory::default();
        let down = Signal::Scaled {
            policy: p(),
            from: 2,
            to: 0,
            reason: "idle".into(),
        };
        let up = Signal::Scaled {
            policy: p(),
            from: 0,
            to: 1,
            reason: "demand".into(),
        };
        let elsewhere = Signal::Scaled {
            policy: PolicyId::new("other", "web"),
            from: 2,
            to: 0,
            reason: "idle".into(),
        };
        let a = evaluate(&r, &[], &down, &mut m, 0);
        let a = raised(&a);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].labels["alertname"], "NemesisScaledToZero");
        assert_eq!(a[0].labels["policy"], "web");
        assert_eq!(a[0].sinks, vec!["s".to_string()]);
        assert!(a[0].resolve_after_ms.is_some());
        assert!(evaluate(&r, &[], &up, &mut m, 0).is_empty());
        assert!(evaluate(&r, &[], &elsewhere, &mut m, 0).is_empty());
    }

    #[test]
    fn a_slow_cold_start_and_a_timed_out_hold_raise() {
        let r = rules(serde_json::json!([
            {"coldStartSlowerThan": "10s"}, {"event": "HoldsTimedOut"}
        ]));
        let mut m = Memory::default();
        let cs = |ms: Option<u64>, outcome| Signal::ColdStart {
            policy: p(),
            time_to_ready_ms: ms,
            outcome,
            held: 3,
        };
        assert!(
            evaluate(
                &r,
                &[],
                &cs(Some(9_000), ColdStartOutcome::Ready),
                &mut m,
                0
            )
            .is_empty()
        );
        let a = evaluate(
            &r,
            &[],
            &cs(Some(12_000), ColdStartOutcome::Ready),
            &mut m,
            0,
        );
        assert!(raised(&a)[0].summary.contains("12.0 s"), "{a:?}");
        let a = evaluate(&r, &[], &cs(None, ColdStartOutcome::Timeout), &mut m, 0);
        assert_eq!(raised(&a)[0].labels["trigger"], "HoldsTimedOut");
    }

    #[test]
    fn refused_holds_in_a_sample_raise_and_a_sample_without_them_does_not() {
        let r = rules(serde_json::json!([{"event": "HoldsRefused"}]));
        let mut m = Memory::default();
        let sample = |refused: Option<f64>| Signal::Samples {
            policy: p(),
            values: refused
                .map(|v| (crate::reports::HOLDS_REFUSED_SERIES.to_string(), v))
                .into_iter()
                .chain([("conns.active".to_string(), 3.0)])
                .collect(),
        };
        assert!(evaluate(&r, &[], &sample(None), &mut m, 0).is_empty());
        assert!(evaluate(&r, &[], &sample(Some(0.0)), &mut m, 0).is_empty());
        let a = evaluate(&r, &[], &sample(Some(7.0)), &mut m, 0);
        let a = raised(&a);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].labels["alertname"], "NemesisHoldsRefused");
        assert!(
            a[0].summary.contains("7 connection(s) refused"),
            "{}",
            a[0].summary
        );
        assert!(
            a[0].resolve_after_ms.is_some(),
            "an event: resolves by itself"
        );
    }

    #[test]
    fn flapping_counts_transitions_within_the_window() {
        let r = rules(serde_json::json!([{"flapping": {"transitions": 2, "window": "1m"}}]));
        let mut m = Memory::default();
        let t = Signal::Transition {
            policy: p(),
            from: "a".into(),
            to: "b".into(),
            reason: String::new(),
        };
        assert!(evaluate(&r, &[], &t, &mut m, 0).is_empty());
        assert!(evaluate(&r, &[], &t, &mut m, 1_000).is_empty());
        assert_eq!(evaluate(&r, &[], &t, &mut m, 2_000).len(), 1);
        // The first two fell out of the window.
        assert!(evaluate(&r, &[], &t, &mut m, 61_500).is_empty());
    }

    #[test]
    fn a_threshold_fires_after_its_window_and_resolves_when_it_stops_holding() {
        let r = rules(serde_json::json!([{"threshold": "conns.active > 10 for 30s"}]));
        let mut m = Memory::default();
        let s = |v: f64| Signal::Samples {
            policy: p(),
            values: BTreeMap::from([("conns.active".to_string(), v)]),
        };
        assert!(evaluate(&r, &[], &s(20.0), &mut m, 0).is_empty());
        assert!(evaluate(&r, &[], &s(20.0), &mut m, 29_000).is_empty());
        let a = evaluate(&r, &[], &s(20.0), &mut m, 30_000);
        let fired = raised(&a);
        assert_eq!(fired.len(), 1);
        assert!(fired[0].resolve_after_ms.is_none());
        assert!(fired[0].summary.contains("conns.active=20"));
        let id = fired[0].id.clone();
        assert_eq!(
            evaluate(&r, &[], &s(5.0), &mut m, 31_000),
            vec![Action::Resolve(id)]
        );
        // The window starts over.
        assert!(evaluate(&r, &[], &s(20.0), &mut m, 32_000).is_empty());
    }

    #[test]
    fn an_invalid_policy_and_a_lost_agent_fire_until_they_are_fixed() {
        let r = rules(serde_json::json!([{"event": "InvalidPolicy"}, {"event": "AgentLost"}]));
        let mut m = Memory::default();
        let bad = Signal::PolicyInvalid {
            policy: p(),
            message: "spec.x: nope".into(),
        };
        let a = evaluate(&r, &[], &bad, &mut m, 0);
        let id = raised(&a)[0].id.clone();
        assert!(raised(&a)[0].resolve_after_ms.is_none());
        assert_eq!(
            evaluate(&r, &[], &Signal::PolicyValid { policy: p() }, &mut m, 1),
            vec![Action::Resolve(id)]
        );
        let lost = evaluate(&r, &[], &Signal::AgentLost { node: "n1".into() }, &mut m, 0);
        assert_eq!(raised(&lost)[0].labels["node"], "n1");
        assert_eq!(
            evaluate(&r, &[], &Signal::AgentBack { node: "n1".into() }, &mut m, 0).len(),
            1
        );
    }

    #[test]
    fn a_failing_prometheus_source_fires_per_source_until_it_answers_again() {
        let r = rules(serde_json::json!([{"event": "PrometheusFailing"}]));
        let mut m = Memory::default();
        let failing = |source: &str, fallback| Signal::PrometheusFailing {
            policy: p(),
            source: source.into(),
            message: "Prometheus at http://p:9090 did not answer within 2s".into(),
            fallback,
        };
        let a = evaluate(&r, &[], &failing("queue", Some(20.0)), &mut m, 0);
        let queue = raised(&a)[0].clone();
        assert_eq!(queue.labels["alertname"], "NemesisPrometheusFailing");
        assert_eq!(queue.labels["source"], "queue");
        assert!(queue.resolve_after_ms.is_none(), "fires until resolved");
        assert!(
            queue.summary.contains("did not answer within 2s")
                && queue.summary.contains("declared fallback 20"),
            "{}",
            queue.summary
        );
        let a = evaluate(&r, &[], &failing("gpu", None), &mut m, 0);
        let gpu = raised(&a)[0].clone();
        assert_ne!(gpu.id, queue.id, "one alert per source");
        assert!(gpu.summary.contains("no fallback"), "{}", gpu.summary);
        let back = Signal::PrometheusAnswering {
            policy: p(),
            source: "queue".into(),
        };
        assert_eq!(
            evaluate(&r, &[], &back, &mut m, 1),
            vec![Action::Resolve(queue.id)]
        );
        // Other rules' triggers ignore it.
        let other = rules(serde_json::json!([{"event": "InvalidPolicy"}]));
        assert!(evaluate(&other, &[], &failing("queue", None), &mut m, 2).is_empty());
    }

    #[test]
    fn a_rule_without_sinks_goes_to_every_sink() {
        let mut r = rules(serde_json::json!([{"event": "ScaledToZero"}]));
        r[0].sinks.clear();
        let all = vec!["a".to_string(), "b".to_string()];
        let down = Signal::Scaled {
            policy: p(),
            from: 1,
            to: 0,
            reason: String::new(),
        };
        let a = evaluate(&r, &all, &down, &mut Memory::default(), 0);
        assert_eq!(raised(&a)[0].sinks, all);
    }
}
