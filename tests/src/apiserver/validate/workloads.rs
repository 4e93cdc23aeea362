//! Validation of Pods, Deployments and ReplicaSets (and the pod template they share), to
//! the depth Nemesis and its tests rely on. Pure functions.

use serde_json::{Value, json};

use super::immutable;
use super::names;
use crate::apiserver::status::Cause;

const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

/// `spec` of a Pod or of a pod template, at `path`.
fn pod_spec(spec: &Value, path: &str, restart_must_be_always: bool) -> Vec<Cause> {
    let mut causes = vec![];
    let containers = spec["containers"].as_array();
    if containers.is_none_or(|c| c.is_empty()) {
        causes.push(Cause::required(format!("{path}.containers")));
    }
    let mut seen = std::collections::HashSet::new();
    for field in ["initContainers", "containers"] {
        for (i, c) in spec[field].as_array().into_iter().flatten().enumerate() {
            let p = format!("{path}.{field}[{i}]");
            let name = c["name"].as_str().unwrap_or("");
            if name.is_empty() {
                causes.push(Cause::required(format!("{p}.name")));
            } else {
                for e in names::dns1123_label_errors(name) {
                    causes.push(Cause::invalid(format!("{p}.name"), &json!(name), &e));
                }
                if !seen.insert(name.to_owned()) {
                    causes.push(Cause::duplicate(format!("{p}.name"), &json!(name)));
                }
            }
            if c["image"].as_str().is_none_or(str::is_empty) {
                causes.push(Cause::required(format!("{p}.image")));
            }
            for (j, port) in c["ports"].as_array().into_iter().flatten().enumerate() {
                let pp = format!("{p}.ports[{j}]");
                match port["containerPort"].as_i64() {
                    Some(n) if (1..=65535).contains(&n) => {}
                    Some(n) => causes.push(Cause::invalid(
                        format!("{pp}.containerPort"),
                        &json!(n),
                        "must be between 1 and 65535, inclusive",
                    )),
                    None => causes.push(Cause::required(format!("{pp}.containerPort"))),
                }
                if let Some(proto) = port["protocol"].as_str()
                    && !PROTOCOLS.contains(&proto)
                {
                    causes.push(Cause::not_supported(
                        format!("{pp}.protocol"),
                        &json!(proto),
                        &PROTOCOLS,
                    ));
                }
                if let Some(n) = port["name"].as_str() {
                    for e in names::port_name_errors(n) {
                        causes.push(Cause::invalid(format!("{pp}.name"), &json!(n), &e));
                    }
                }
            }
            for (j, env) in c["env"].as_array().into_iter().flatten().enumerate() {
                if env["name"].as_str().is_none_or(str::is_empty) {
                    causes.push(Cause::required(format!("{p}.env[{j}].name")));
                }
            }
        }
    }
    if let Some(rp) = spec["restartPolicy"].as_str() {
        let allowed: &[&str] = if restart_must_be_always {
            &["Always"]
        } else {
            &["Always", "OnFailure", "Never"]
        };
        if !allowed.contains(&rp) {
            causes.push(Cause::not_supported(
                format!("{path}.restartPolicy"),
                &json!(rp),
                allowed,
            ));
        }
    }
    if let Some(g) = spec["terminationGracePeriodSeconds"].as_i64()
        && g < 0
    {
        causes.push(Cause::invalid(
            format!("{path}.terminationGracePeriodSeconds"),
            &json!(g),
            "must be greater than or equal to 0",
        ));
    }
    causes
}

/// The Go rendering of a label map in messages: `map[string]string{"a":"b"}`.
fn go_map(v: &Value) -> Value {
    let mut pairs: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("\"{k}\":\"{}\"", v.as_str().unwrap_or("")))
        .collect();
    pairs.sort();
    Value::String(format!("map[string]string{{{}}}", pairs.join(", ")))
}

/// Deployments and ReplicaSets: selector, template, replicas.
fn replicated(obj: &Value, old: Option<&Value>, kind_word: &str) -> Vec<Cause> {
    let mut causes = vec![];
    let spec = &obj["spec"];
    if let Some(r) = spec["replicas"].as_i64()
        && r < 0
    {
        causes.push(Cause::invalid(
            "spec.replicas",
            &json!(r),
            "must be greater than or equal to 0",
        ));
    }
    let sel = &spec["selector"];
    if sel.is_null() {
        causes.push(Cause::required("spec.selector"));
    } else if sel["matchLabels"].as_object().is_none_or(|m| m.is_empty())
        && sel["matchExpressions"]
            .as_array()
            .is_none_or(|m| m.is_empty())
    {
        causes.push(Cause::invalid(
            "spec.selector",
            sel,
            &format!("empty selector is invalid for {kind_word}"),
        ));
    } else {
        let labels = spec["template"]["metadata"]["labels"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let selector = crate::apiserver::selector::render_label_selector(sel);
        let matches = crate::apiserver::selector::LabelSelector::parse(&selector)
            .is_ok_and(|s| s.matches(&labels));
        if !matches {
            causes.push(Cause::invalid(
                "spec.template.metadata.labels",
                &go_map(&spec["template"]["metadata"]["labels"]),
                "`selector` does not match template `labels`",
            ));
        }
    }
    causes.extend(pod_spec(
        &spec["template"]["spec"],
        "spec.template.spec",
        true,
    ));
    if let Some(old) = old
        && let Some(c) = immutable("spec.selector", sel, &old["spec"]["selector"])
    {
        causes.push(c);
    }
    causes
}

pub fn deployment(obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = replicated(obj, old, "deployment");
    let strategy = &obj["spec"]["strategy"];
    if let Some(t) = strategy["type"].as_str() {
        if !["RollingUpdate", "Recreate"].contains(&t) {
            causes.push(Cause::not_supported(
                "spec.strategy.type",
                &json!(t),
                &["Recreate", "RollingUpdate"],
            ));
        } else if t == "Recreate" && !strategy["rollingUpdate"].is_null() {
            causes.push(Cause::forbidden(
                "spec.strategy.rollingUpdate",
                "may not be specified when strategy `type` is 'Recreate'",
            ));
        }
    }
    causes
}

pub fn replica_set(obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    replicated(obj, old, "replicaset")
}

/// A StatefulSet: what every replicated workload needs, and the fields upstream keeps
/// immutable (everything but replicas, template, updateStrategy, minReadySeconds,
/// ordinals, the claim retention policy).
pub fn stateful_set(obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = replicated(obj, old, "statefulset");
    let policy = &obj["spec"]["podManagementPolicy"];
    if let Some(p) = policy.as_str()
        && !["OrderedReady", "Parallel"].contains(&p)
    {
        causes.push(Cause::not_supported(
            "spec.podManagementPolicy",
            policy,
            &["OrderedReady", "Parallel"],
        ));
    }
    if let Some(old) = old {
        let frozen = |v: &Value| {
            let mut s = v["spec"].clone();
            if let Some(m) = s.as_object_mut() {
                for k in [
                    "replicas",
                    "template",
                    "updateStrategy",
                    "minReadySeconds",
                    "ordinals",
                    "persistentVolumeClaimRetentionPolicy",
                    "revisionHistoryLimit",
                ] {
                    m.remove(k);
                }
            }
            s
        };
        if frozen(obj) != frozen(old) {
            causes.push(Cause::forbidden(
                "spec",
                "updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'revisionHistoryLimit', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
            ));
        }
    }
    causes
}

/// The pod spec fields an update may change, as upstream lists them.
const POD_MUTABLE: &str = "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)";

pub fn pod(obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = pod_spec(&obj["spec"], "spec", false);
    if let Some(old) = old {
        let strip = |spec: &Value| {
            let mut s = spec.clone();
            for field in ["containers", "initContainers"] {
                if let Some(cs) = s.get_mut(field).and_then(Value::as_array_mut) {
                    for c in cs {
                        c["image"] = Value::Null;
                    }
                }
            }
            if let Some(m) = s.as_object_mut() {
                m.remove("activeDeadlineSeconds");
                m.remove("tolerations");
                m.remove("terminationGracePeriodSeconds");
            }
            s
        };
        if strip(&obj["spec"]) != strip(&old["spec"]) {
            causes.push(Cause::forbidden("spec", POD_MUTABLE));
        }
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(labels: Value) -> Value {
        json!({"metadata": {"name": "d"}, "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": labels},
                         "spec": {"containers": [{"name": "c", "image": "i"}]}}}})
    }

    #[test]
    fn deployment_selector_must_match_template_labels() {
        assert!(deployment(&deploy(json!({"app": "web"})), None).is_empty());
        let causes = deployment(&deploy(json!({"app": "other"})), None);
        assert_eq!(causes[0].field, "spec.template.metadata.labels");
    }

    #[test]
    fn deployment_selector_is_immutable() {
        let old = deploy(json!({"app": "web"}));
        let mut new = old.clone();
        new["spec"]["selector"] = json!({"matchLabels": {"app": "web", "x": "y"}});
        new["spec"]["template"]["metadata"]["labels"]["x"] = json!("y");
        let causes = deployment(&new, Some(&old));
        assert!(
            causes
                .iter()
                .any(|c| c.field == "spec.selector" && c.message.contains("immutable"))
        );
    }

    #[test]
    fn pod_needs_containers_with_images_and_unique_names() {
        let p = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "a"}]}});
        let causes = pod(&p, None);
        let fields: Vec<_> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.containers[1].name", "spec.containers[1].image"]
        );
    }

    #[test]
    fn pod_spec_is_immutable_except_images() {
        let old = json!({"spec": {"containers": [{"name": "a", "image": "x"}]}});
        let new = json!({"spec": {"containers": [{"name": "a", "image": "y"}]}});
        assert!(pod(&new, Some(&old)).is_empty());
        let new = json!({"spec": {"nodeName": "n", "containers": [{"name": "a", "image": "x"}]}});
        assert_eq!(pod(&new, Some(&old))[0].field, "spec");
    }
}
