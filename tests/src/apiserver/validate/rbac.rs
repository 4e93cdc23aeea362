//! Roles and bindings as upstream's `rbac/validation` checks them: every rule names its
//! verbs and either resources (with API groups) or non-resource URLs, never both and
//! never URLs in a namespaced Role; a binding's `roleRef` is one it may reference and
//! never changes; each subject is a kind upstream knows, with what that kind needs.

use serde_json::{Value, json};

use super::super::status::Cause;
use super::immutable;

fn non_empty(v: &Value) -> bool {
    v.as_array().is_some_and(|a| !a.is_empty())
}

pub fn role(obj: &Value, namespaced: bool) -> Vec<Cause> {
    let mut causes = vec![];
    for (i, rule) in obj["rules"].as_array().into_iter().flatten().enumerate() {
        let f = |x: &str| format!("rules[{i}].{x}");
        if !non_empty(&rule["verbs"]) {
            causes.push(Cause::required_because(
                f("verbs"),
                "verbs must contain at least one value",
            ));
        }
        if non_empty(&rule["nonResourceURLs"]) {
            if namespaced {
                causes.push(Cause::invalid(
                    f("nonResourceURLs"),
                    &rule["nonResourceURLs"],
                    "namespaced rules cannot apply to non-resource URLs",
                ));
            }
            if non_empty(&rule["apiGroups"]) || non_empty(&rule["resources"]) {
                causes.push(Cause::invalid(
                    f("nonResourceURLs"),
                    &rule["nonResourceURLs"],
                    "rules cannot apply to both regular resources and non-resource URLs",
                ));
            }
            continue;
        }
        if !non_empty(&rule["apiGroups"]) {
            causes.push(Cause::required_because(
                f("apiGroups"),
                "resource rules must supply at least one api group",
            ));
        }
        if !non_empty(&rule["resources"]) {
            causes.push(Cause::required_because(
                f("resources"),
                "resource rules must supply at least one resource",
            ));
        }
    }
    causes
}

pub fn binding(obj: &Value, old: Option<&Value>, namespaced: bool) -> Vec<Cause> {
    let mut causes = vec![];
    let r = &obj["roleRef"];
    if r["apiGroup"] != "rbac.authorization.k8s.io" {
        causes.push(Cause::not_supported(
            "roleRef.apiGroup",
            &r["apiGroup"],
            &["rbac.authorization.k8s.io"],
        ));
    }
    let kinds: &[&str] = if namespaced {
        &["Role", "ClusterRole"]
    } else {
        &["ClusterRole"]
    };
    if !kinds.contains(&r["kind"].as_str().unwrap_or("")) {
        causes.push(Cause::not_supported("roleRef.kind", &r["kind"], kinds));
    }
    if r["name"].as_str().is_none_or(str::is_empty) {
        causes.push(Cause::required("roleRef.name"));
    }
    if let Some(old) = old
        && let Some(mut c) = immutable("roleRef", r, &old["roleRef"])
    {
        c.message = format!("{}: cannot change roleRef", c.message);
        causes.push(c);
    }
    for (i, s) in obj["subjects"].as_array().into_iter().flatten().enumerate() {
        let f = |x: &str| format!("subjects[{i}].{x}");
        if s["name"].as_str().is_none_or(str::is_empty) {
            causes.push(Cause::required(f("name")));
        }
        match s["kind"].as_str().unwrap_or("") {
            "ServiceAccount" => {
                if s["apiGroup"].as_str().is_some_and(|g| !g.is_empty()) {
                    causes.push(Cause::not_supported(f("apiGroup"), &s["apiGroup"], &[""]));
                }
                if !namespaced && s["namespace"].as_str().is_none_or(str::is_empty) {
                    causes.push(Cause::required(f("namespace")));
                }
            }
            "User" | "Group" => {
                if s["apiGroup"] != "rbac.authorization.k8s.io" {
                    causes.push(Cause::not_supported(
                        f("apiGroup"),
                        &s["apiGroup"],
                        &["rbac.authorization.k8s.io"],
                    ));
                }
            }
            other => causes.push(Cause::not_supported(
                f("kind"),
                &json!(other),
                &["ServiceAccount", "User", "Group"],
            )),
        }
    }
    causes
}
