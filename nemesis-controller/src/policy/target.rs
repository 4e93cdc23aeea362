//! What a policy scales: `spec.target` read as a workload reference (API version, kind,
//! name), with `deployment: web` as the shorthand for `kind: Deployment, name: web`.
//! Owns the rules of a well-formed reference and the defaults of the kinds everybody
//! has; it never asks the API whether the kind exists (that is `reconcile::workload`).

use super::crd::TargetRef;
use super::problem::Problem;

/// The `apps/v1` kinds a target may name without `apiVersion`: every cluster serves them.
const APPS_KINDS: [&str; 2] = ["Deployment", "StatefulSet"];
const APPS_V1: &str = "apps/v1";

/// The resource a policy scales through its `/scale` subresource, in the policy's
/// namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadRef {
    /// `group/version`, or `version` for the core group.
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

impl WorkloadRef {
    pub fn deployment(name: &str) -> Self {
        Self {
            api_version: APPS_V1.into(),
            kind: "Deployment".into(),
            name: name.into(),
        }
    }

    /// The API group (empty for the core group).
    pub fn group(&self) -> &str {
        self.api_version
            .rsplit_once('/')
            .map_or("", |(group, _)| group)
    }

    pub fn version(&self) -> &str {
        self.api_version
            .rsplit_once('/')
            .map_or(self.api_version.as_str(), |(_, v)| v)
    }

    /// An `apps/v1` Deployment or StatefulSet: their status has `readyReplicas`, so
    /// readiness needs no pod watch.
    pub fn is_apps_kind(&self) -> bool {
        self.group() == "apps" && APPS_KINDS.contains(&self.kind.as_str())
    }
}

impl std::fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// Reads `spec.target`; every problem names its field (and for `apiVersion` and `kind`
/// the column of the first character that cannot be there).
pub fn workload_ref(t: &TargetRef) -> Result<WorkloadRef, Vec<Problem>> {
    let mut problems = Vec::new();
    let long_form = t.kind.is_some() || t.name.is_some() || t.api_version.is_some();
    match (&t.deployment, long_form) {
        (Some(_), true) => {
            problems.push(Problem::at(
                "spec.target.deployment",
                "give either `deployment` (a Deployment's name) or `kind` and `name`, not both",
            ));
            return Err(problems);
        }
        (Some(d), false) => {
            check_name("spec.target.deployment", "Deployment", d, &mut problems);
            return if problems.is_empty() {
                Ok(WorkloadRef::deployment(d))
            } else {
                Err(problems)
            };
        }
        (None, false) => {
            problems.push(Problem::at(
                "spec.target",
                "name what is scaled: `kind` and `name` (with `apiVersion` unless the kind \
                 is Deployment or StatefulSet), or `deployment: <name>`",
            ));
            return Err(problems);
        }
        (None, true) => {}
    }
    let kind = t.kind.clone().unwrap_or_default();
    if kind.is_empty() {
        problems.push(Problem::at(
            "spec.target.kind",
            "is required with `name` (e.g. `StatefulSet`, or a custom resource's kind)",
        ));
    } else if let Some(at) = bad_kind_char(&kind) {
        problems.push(Problem::in_expression(
            "spec.target.kind",
            &kind,
            at,
            format!(
                "`{kind}` is not a kind (letters and digits, starting with an uppercase letter)"
            ),
        ));
    }
    let name = t.name.clone().unwrap_or_default();
    if name.is_empty() {
        problems.push(Problem::at("spec.target.name", "is required with `kind`"));
    } else {
        let what = if kind.is_empty() { "object" } else { &kind };
        check_name("spec.target.name", what, &name, &mut problems);
    }
    let api_version = match &t.api_version {
        Some(v) => {
            if let Some((at, why)) = bad_api_version(v) {
                problems.push(Problem::in_expression(
                    "spec.target.apiVersion",
                    v,
                    at,
                    format!("`{v}` is not an API version (`group/version`, e.g. `argoproj.io/v1alpha1`): {why}"),
                ));
            }
            v.clone()
        }
        None if APPS_KINDS.contains(&kind.as_str()) => APPS_V1.into(),
        // A missing or malformed kind is already reported; its default cannot be known.
        None if kind.is_empty() || bad_kind_char(&kind).is_some() => String::new(),
        None => {
            problems.push(Problem::at(
                "spec.target.apiVersion",
                format!(
                    "is required for kind `{kind}` (only Deployment and StatefulSet default to `apps/v1`)"
                ),
            ));
            String::new()
        }
    };
    if problems.is_empty() {
        Ok(WorkloadRef {
            api_version,
            kind,
            name,
        })
    } else {
        Err(problems)
    }
}

fn check_name(path: &str, what: &str, name: &str, problems: &mut Vec<Problem>) {
    if !is_dns_subdomain(name) {
        problems.push(Problem::at(
            path,
            format!(
                "`{name}` is not a valid {what} name (lowercase letters, digits, `-` and `.`, \
                 at most 253)"
            ),
        ));
    }
}

/// The byte offset of the first character a kind cannot have.
fn bad_kind_char(kind: &str) -> Option<usize> {
    kind.char_indices()
        .find(|(i, c)| {
            if *i == 0 {
                !c.is_ascii_uppercase()
            } else {
                !c.is_ascii_alphanumeric()
            }
        })
        .map(|(i, _)| i)
}

/// Where and why `v` is not `group/version` or `version`.
fn bad_api_version(v: &str) -> Option<(usize, &'static str)> {
    if v.is_empty() {
        return Some((0, "it is empty"));
    }
    let (group, version, version_at) = match v.split_once('/') {
        Some((g, ver)) => (Some(g), ver, g.len() + 1),
        None => (None, v, 0),
    };
    if let Some(g) = group {
        if g.is_empty() {
            return Some((0, "the group is empty"));
        }
        if let Some(i) = g
            .char_indices()
            .find(|(_, c)| {
                !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.')
            })
            .map(|(i, _)| i)
        {
            return Some((i, "a group has lowercase letters, digits, `-` and `.`"));
        }
    }
    if version.is_empty() {
        return Some((version_at, "the version is empty"));
    }
    if let Some(i) = version
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .map(|(i, _)| i)
    {
        return Some((
            version_at + i,
            "a version has lowercase letters and digits only (`v1`, `v1beta2`)",
        ));
    }
    None
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(json: serde_json::Value) -> TargetRef {
        serde_json::from_value(json).unwrap()
    }

    fn errors(json: serde_json::Value) -> Vec<String> {
        workload_ref(&target(json))
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn deployment_is_the_shorthand_for_an_apps_v1_deployment() {
        let w = workload_ref(&target(serde_json::json!({"deployment": "web"}))).unwrap();
        assert_eq!(w, WorkloadRef::deployment("web"));
        assert_eq!((w.group(), w.version()), ("apps", "v1"));
        assert!(w.is_apps_kind());
        assert_eq!(w.to_string(), "Deployment/web");
    }

    #[test]
    fn statefulsets_default_to_apps_v1_and_other_kinds_need_an_api_version() {
        let w = workload_ref(&target(
            serde_json::json!({"kind": "StatefulSet", "name": "db"}),
        ))
        .unwrap();
        assert_eq!(w.api_version, "apps/v1");
        assert!(w.is_apps_kind());
        let w = workload_ref(&target(serde_json::json!({
            "kind": "Rollout", "apiVersion": "argoproj.io/v1alpha1", "name": "web"
        })))
        .unwrap();
        assert_eq!((w.group(), w.version()), ("argoproj.io", "v1alpha1"));
        assert!(!w.is_apps_kind());
        assert_eq!(
            errors(serde_json::json!({"kind": "Rollout", "name": "web"})),
            [
                "spec.target.apiVersion: is required for kind `Rollout` (only Deployment and StatefulSet default to `apps/v1`)"
            ]
        );
    }

    #[test]
    fn a_core_group_version_has_no_group() {
        let w = workload_ref(&target(serde_json::json!({
            "kind": "ReplicationController", "apiVersion": "v1", "name": "old"
        })))
        .unwrap();
        assert_eq!((w.group(), w.version()), ("", "v1"));
    }

    #[test]
    fn malformed_references_name_their_field_and_column() {
        assert_eq!(
            errors(serde_json::json!({"deployment": "web", "kind": "StatefulSet", "name": "db"})),
            [
                "spec.target.deployment: give either `deployment` (a Deployment's name) or `kind` and `name`, not both"
            ]
        );
        assert_eq!(errors(serde_json::json!({"service": "web"})).len(), 1);
        assert_eq!(
            errors(serde_json::json!({"kind": "statefulSet", "name": "db"})),
            [
                "spec.target.kind: column 1: `statefulSet` is not a kind (letters and digits, starting with an uppercase letter)"
            ]
        );
        assert_eq!(
            errors(
                serde_json::json!({"kind": "Model", "apiVersion": "ml.example.com/V1", "name": "m"})
            ),
            [
                "spec.target.apiVersion: column 16: `ml.example.com/V1` is not an API version (`group/version`, e.g. `argoproj.io/v1alpha1`): a version has lowercase letters and digits only (`v1`, `v1beta2`)"
            ]
        );
        assert_eq!(
            errors(serde_json::json!({"kind": "Model", "apiVersion": "ML/v1", "name": "m"})),
            [
                "spec.target.apiVersion: column 1: `ML/v1` is not an API version (`group/version`, e.g. `argoproj.io/v1alpha1`): a group has lowercase letters, digits, `-` and `.`"
            ]
        );
        assert_eq!(
            errors(serde_json::json!({"kind": "StatefulSet"})),
            ["spec.target.name: is required with `kind`"]
        );
        assert_eq!(
            errors(serde_json::json!({"name": "db"})),
            [
                "spec.target.kind: is required with `name` (e.g. `StatefulSet`, or a custom resource's kind)"
            ]
        );
        assert_eq!(
            errors(serde_json::json!({"deployment": "Web"})),
            [
                "spec.target.deployment: `Web` is not a valid Deployment name (lowercase letters, digits, `-` and `.`, at most 253)"
            ]
        );
        assert_eq!(
            errors(serde_json::json!({"kind": "StatefulSet", "name": "db_1"})),
            [
                "spec.target.name: `db_1` is not a valid StatefulSet name (lowercase letters, digits, `-` and `.`, at most 253)"
            ]
        );
    }
}
