//! Validation of Events as upstream's `ValidateEventCreate`/`ValidateEventUpdate`, on the
//! stored core form but by the version the request came in: a "new" Event (with
//! `eventTime`) needs its reporting fields; through `events.k8s.io/v1` the deprecated
//! fields (`lastTimestamp` and the like) must stay unset, so a writer that wants
//! `kubectl get events --sort-by=.lastTimestamp` to work has to use core `v1`. Pure.

use serde_json::Value;

use super::names;
use crate::apiserver::status::Cause;

const REPORTING_INSTANCE_LIMIT: usize = 128;
const ACTION_LIMIT: usize = 128;
const REASON_LIMIT: usize = 128;
const NOTE_LIMIT: usize = 1024;

fn text<'a>(e: &'a Value, field: &str) -> &'a str {
    e[field].as_str().unwrap_or("")
}

fn set(e: &Value, field: &str) -> bool {
    !matches!(e.get(field), None | Some(Value::Null)) && e[field] != ""
}

/// Checks every request version makes (upstream's `legacyValidateEvent`).
fn legacy(e: &Value, via_events_v1: bool) -> Vec<Cause> {
    let mut causes = vec![];
    let ns = e
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let involved_ns = e
        .pointer("/involvedObject/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mismatch = || {
        Cause::invalid(
            "involvedObject.namespace",
            &Value::from(involved_ns),
            "does not match event.namespace",
        )
    };
    if !set(e, "eventTime") {
        if (involved_ns.is_empty() && !ns.is_empty() && ns != "default")
            || (!involved_ns.is_empty() && ns != involved_ns)
        {
            causes.push(mismatch());
        }
    } else {
        if involved_ns.is_empty() && ns != "default" && ns != "kube-system" {
            causes.push(mismatch());
        }
        let controller_field = if via_events_v1 {
            "reportingController"
        } else {
            "reportingComponent"
        };
        let controller = text(e, "reportingComponent");
        if controller.is_empty() {
            causes.push(Cause::required(controller_field));
        } else {
            for m in names::qualified_name_errors(controller) {
                causes.push(Cause::invalid(
                    controller_field,
                    &Value::from(controller),
                    &m,
                ));
            }
        }
        let limited = [
            ("reportingInstance", REPORTING_INSTANCE_LIMIT, true),
            ("action", ACTION_LIMIT, true),
            ("reason", REASON_LIMIT, true),
            ("message", NOTE_LIMIT, false),
        ];
        for (field, limit, required) in limited {
            let v = text(e, field);
            if required && v.is_empty() {
                causes.push(Cause::required(field));
            }
            if v.len() > limit {
                causes.push(Cause::invalid(
                    field,
                    &Value::from(""),
                    &format!("can have at most {limit} characters"),
                ));
            }
        }
    }
    causes
}

fn series(e: &Value) -> Vec<Cause> {
    let mut causes = vec![];
    if let Some(s) = e.get("series").filter(|s| s.is_object()) {
        if s["count"].as_i64().unwrap_or(0) < 2 {
            causes.push(Cause::invalid(
                "series.count",
                &Value::from(""),
                "should be at least 2",
            ));
        }
        if !set(s, "lastObservedTime") {
            causes.push(Cause::required("series.lastObservedTime"));
        }
    }
    causes
}

/// Causes for an Event (core form) created or updated through `events.k8s.io/v1` when
/// `via_events_v1`, else through core `v1`.
pub fn validate(e: &Value, old: Option<&Value>, via_events_v1: bool) -> Vec<Cause> {
    let mut causes = legacy(e, via_events_v1);
    if !via_events_v1 {
        return causes;
    }
    match old {
        None => {
            causes.extend(series(e));
            if !set(e, "eventTime") {
                causes.push(Cause::required("eventTime"));
            }
            let type_ = text(e, "type");
            if type_ != "Normal" && type_ != "Warning" {
                causes.push(Cause::invalid(
                    "type",
                    &Value::from(""),
                    &format!("has invalid value: {type_}"),
                ));
            }
            let source_set = e
                .get("source")
                .is_some_and(|s| set(s, "component") || set(s, "host"));
            // Named as events.k8s.io/v1 names them.
            for (shown, is_set) in [
                ("deprecatedFirstTimestamp", set(e, "firstTimestamp")),
                ("deprecatedLastTimestamp", set(e, "lastTimestamp")),
                ("deprecatedCount", e["count"].as_i64().unwrap_or(0) != 0),
                ("deprecatedSource", source_set),
            ] {
                if is_set {
                    causes.push(Cause::invalid(shown, &Value::from(""), "needs to be unset"));
                }
            }
        }
        Some(old) => {
            if e.get("series") != old.get("series") {
                causes.extend(series(e));
            }
            for field in [
                "involvedObject",
                "reason",
                "message",
                "source",
                "firstTimestamp",
                "lastTimestamp",
                "count",
                "type",
                "eventTime",
                "action",
                "related",
                "reportingComponent",
                "reportingInstance",
            ] {
                if e.get(field) != old.get(field) {
                    causes.push(Cause::invalid(
                        field,
                        e.get(field).unwrap_or(&Value::Null),
                        "field is immutable",
                    ));
                }
            }
        }
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn new_event() -> Value {
        json!({"metadata": {"name": "e", "namespace": "demo"},
               "involvedObject": {"kind": "ScalingPolicy", "namespace": "demo", "name": "p"},
               "eventTime": "2025-01-01T00:00:00.000000Z", "type": "Normal",
               "reason": "ColdStart", "action": "Wake", "message": "ready",
               "reportingComponent": "nemesis.dev/controller", "reportingInstance": "c-0"})
    }

    fn fields(causes: &[Cause]) -> Vec<&str> {
        causes.iter().map(|c| c.field.as_str()).collect()
    }

    #[test]
    fn deprecated_timestamps_are_refused_through_events_v1_and_welcome_through_core() {
        let mut e = new_event();
        e["lastTimestamp"] = json!("2025-01-01T00:00:00Z");
        e["firstTimestamp"] = json!("2025-01-01T00:00:00Z");
        e["count"] = json!(1);
        assert!(validate(&e, None, false).is_empty());
        let causes = validate(&e, None, true);
        assert_eq!(
            fields(&causes),
            [
                "deprecatedFirstTimestamp",
                "deprecatedLastTimestamp",
                "deprecatedCount"
            ]
        );
        assert_eq!(
            causes[1].line(),
            "deprecatedLastTimestamp: Invalid value: \"\": needs to be unset"
        );
    }

    #[test]
    fn a_new_event_needs_its_reporting_fields_and_a_matching_namespace() {
        let mut e = new_event();
        for f in ["reportingComponent", "reportingInstance", "action"] {
            e.as_object_mut().unwrap().remove(f);
        }
        e["involvedObject"]["namespace"] = json!("");
        assert_eq!(
            fields(&validate(&e, None, false)),
            [
                "involvedObject.namespace",
                "reportingComponent",
                "reportingInstance",
                "action"
            ]
        );
        assert_eq!(
            fields(&validate(&e, None, true))[..2],
            ["involvedObject.namespace", "reportingController"]
        );
        // An old-style Event (no eventTime) needs none of them.
        let old_style = json!({"metadata": {"name": "e", "namespace": "demo"},
            "involvedObject": {"namespace": "demo"}, "reason": "X", "message": "m"});
        assert!(validate(&old_style, None, false).is_empty());
    }

    #[test]
    fn an_events_v1_update_changes_only_the_series() {
        let old = new_event();
        let mut e = old.clone();
        e["series"] = json!({"count": 2, "lastObservedTime": "2025-01-01T00:00:10.000000Z"});
        assert!(validate(&e, Some(&old), true).is_empty());
        e["series"]["count"] = json!(1);
        e["message"] = json!("changed");
        assert_eq!(
            fields(&validate(&e, Some(&old), true)),
            ["series.count", "message"]
        );
    }
}
