//! Validation of CustomResourceDefinitions: names, group, scope, versions and schemas,
//! as far as serving them needs. Pure functions.

use serde_json::{Value, json};

use super::{immutable, names};
use crate::apiserver::status::Cause;

pub fn validate(obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = vec![];
    let spec = &obj["spec"];
    let group = spec["group"].as_str().unwrap_or("");
    if group.is_empty() {
        causes.push(Cause::required("spec.group"));
    } else {
        if !group.contains('.') {
            causes.push(Cause::invalid(
                "spec.group",
                &json!(group),
                "should be a domain with at least one dot",
            ));
        }
        for e in names::dns1123_subdomain_errors(group) {
            causes.push(Cause::invalid("spec.group", &json!(group), &e));
        }
    }
    let n = &spec["names"];
    let plural = n["plural"].as_str().unwrap_or("");
    for field in ["plural", "kind"] {
        if n[field].as_str().is_none_or(str::is_empty) {
            causes.push(Cause::required(format!("spec.names.{field}")));
        }
    }
    for field in ["plural", "singular"] {
        if let Some(v) = n[field].as_str().filter(|v| !v.is_empty()) {
            for e in names::dns1123_label_errors(v) {
                causes.push(Cause::invalid(format!("spec.names.{field}"), &json!(v), &e));
            }
        }
    }
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    if !name.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    match spec["scope"].as_str() {
        Some("Cluster" | "Namespaced") => {}
        Some(s) => causes.push(Cause::not_supported(
            "spec.scope",
            &json!(s),
            &["Cluster", "Namespaced"],
        )),
        None => causes.push(Cause::required("spec.scope")),
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause::invalid(
            "spec.versions",
            &json!(versions),
            "must have exactly one version marked as storage version",
        ));
    } else {
        let storage = versions.iter().filter(|v| v["storage"] == true).count();
        if storage != 1 {
            causes.push(Cause::invalid(
                "spec.versions",
                &json!(
                    versions
                        .iter()
                        .map(|v| v["name"].clone())
                        .collect::<Vec<_>>()
                ),
                "must have exactly one version marked as storage version",
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (i, v) in versions.iter().enumerate() {
        let vname = v["name"].as_str().unwrap_or("");
        if vname.is_empty() {
            causes.push(Cause::required(format!("spec.versions[{i}].name")));
        } else if !seen.insert(vname.to_owned()) {
            causes.push(Cause::duplicate(
                format!("spec.versions[{i}].name"),
                &json!(vname),
            ));
        }
        let schema = &v["schema"]["openAPIV3Schema"];
        if schema.is_null() {
            causes.push(Cause::required_because(
                format!("spec.versions[{i}].schema.openAPIV3Schema"),
                "schemas are required",
            ));
        } else if schema["type"] != "object" {
            causes.push(Cause::invalid(
                format!("spec.versions[{i}].schema.openAPIV3Schema.type"),
                &schema["type"],
                "must be object at the root",
            ));
        }
    }
    if let Some(s) = spec["conversion"]["strategy"].as_str()
        && s != "None"
    {
        // No webhook can be called from here: versions would be served unconverted.
        causes.push(Cause::not_supported(
            "spec.conversion.strategy",
            &json!(s),
            &["None"],
        ));
    }
    if let Some(old) = old {
        causes.extend(immutable(
            "spec.group",
            &spec["group"],
            &old["spec"]["group"],
        ));
        causes.extend(immutable(
            "spec.scope",
            &spec["scope"],
            &old["spec"]["scope"],
        ));
        causes.extend(immutable(
            "spec.names.plural",
            &n["plural"],
            &old["spec"]["names"]["plural"],
        ));
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_name_must_be_plural_dot_group() {
        let crd = json!({"metadata": {"name": "wrong.example.com"}, "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                          "schema": {"openAPIV3Schema": {"type": "object"}}}]}});
        let causes = validate(&crd, None);
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "metadata.name");
    }

    #[test]
    fn conversion_webhooks_are_refused() {
        let crd = json!({"metadata": {"name": "widgets.example.com"}, "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "kind": "Widget"},
            "conversion": {"strategy": "Webhook"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                          "schema": {"openAPIV3Schema": {"type": "object"}}}]}});
        let causes = validate(&crd, None);
        assert_eq!(causes[0].field, "spec.conversion.strategy");
    }

    #[test]
    fn crd_versions_need_schemas_and_one_storage() {
        let crd = json!({"metadata": {"name": "widgets.example.com"}, "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": false}]}});
        let fields: Vec<_> = validate(&crd, None).into_iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            ["spec.versions", "spec.versions[0].schema.openAPIV3Schema"]
        );
    }
}
