//! The committed CRD YAML is exactly what the Rust types generate, and has the shape
//! `kubectl` relies on (group, version, scope, printer columns, status subresource).

use nemesis_controller::policy::crd_yaml;
use std::path::PathBuf;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crd/scalingpolicy.yaml")
}

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let committed = std::fs::read_to_string(committed_path())
        .expect("manifests/crd/scalingpolicy.yaml exists (run `cargo xtask gen`)");
    let generated = crd_yaml();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| "the lengths".to_string(), |i| format!("line {}", i + 1));
        panic!(
            "manifests/crd/scalingpolicy.yaml is stale (first difference at {line}): run `cargo xtask gen` and commit it"
        );
    }
}

#[test]
fn crd_is_namespaced_v1alpha1_in_the_nemesis_group_with_status() {
    let crd: serde_norway::Value = serde_norway::from_str(&crd_yaml()).unwrap();
    let spec = &crd["spec"];
    assert_eq!(
        crd["metadata"]["name"].as_str(),
        Some("scalingpolicies.nemesis.dev")
    );
    assert_eq!(spec["group"].as_str(), Some("nemesis.dev"));
    assert_eq!(spec["scope"].as_str(), Some("Namespaced"));
    assert_eq!(spec["names"]["kind"].as_str(), Some("ScalingPolicy"));
    let version = &spec["versions"][0];
    assert_eq!(version["name"].as_str(), Some("v1alpha1"));
    assert!(version["subresources"]["status"].is_mapping());
    let columns: Vec<(&str, &str)> = version["additionalPrinterColumns"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["jsonPath"].as_str().unwrap()))
        .collect();
    assert_eq!(
        columns,
        vec![
            ("Target", ".status.target"),
            ("State", ".status.state"),
            ("Replicas", ".status.desiredReplicas"),
            ("Ready", ".status.conditions[?(@.type==\"Ready\")].status"),
            ("Reason", ".status.conditions[?(@.type==\"Ready\")].reason"),
            ("Age", ".metadata.creationTimestamp"),
        ]
    );
    let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    for field in [
        "state",
        "stateSince",
        "lastTransition",
        "metrics",
        "desiredReplicas",
        "conditions",
        "observedGeneration",
    ] {
        assert!(
            status[field].is_mapping(),
            "status.{field} is in the schema"
        );
    }
}

#[test]
fn descriptions_are_whole_paragraphs_for_kubectl_explain() {
    fn walk(v: &serde_norway::Value, path: &str, bad: &mut Vec<String>) {
        match v {
            serde_norway::Value::Mapping(m) => {
                for (k, x) in m {
                    let k = k.as_str().unwrap_or("?");
                    match (k, x.as_str()) {
                        ("description", Some(text)) => {
                            // A line break is a paragraph break or a list item, never a
                            // doc comment's wrap (kubectl explain wraps again).
                            let lines: Vec<&str> = text.lines().collect();
                            for pair in lines.windows(2) {
                                let (a, b) = (pair[0].trim(), pair[1].trim());
                                if !a.is_empty() && !b.is_empty() && !b.starts_with("- ") {
                                    bad.push(format!("{path}: {a:?} / {b:?}"));
                                }
                            }
                        }
                        _ => walk(x, &format!("{path}.{k}"), bad),
                    }
                }
            }
            serde_norway::Value::Sequence(s) => s.iter().for_each(|x| walk(x, path, bad)),
            _ => {}
        }
    }
    let crd: serde_norway::Value = serde_norway::from_str(&crd_yaml()).unwrap();
    let mut bad = Vec::new();
    walk(&crd, "", &mut bad);
    assert!(
        bad.is_empty(),
        "descriptions broken mid-paragraph: {bad:#?}"
    );
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert!(
        spec["description"]
            .as_str()
            .unwrap()
            .contains("and transitions between them"),
        "lines are joined with a space"
    );
}

/// A real API server checks a null against an `enum` even where `nullable: true`
/// (v1.36 refused `targetType: null` with "Unsupported value: null").
#[test]
fn no_nullable_field_has_an_enum_without_null() {
    fn walk(v: &serde_norway::Value, path: &str, bad: &mut Vec<String>) {
        match v {
            serde_norway::Value::Mapping(m) => {
                let nullable = m.get("nullable").and_then(|n| n.as_bool()) == Some(true);
                if let Some(values) = m.get("enum").and_then(|e| e.as_sequence())
                    && nullable
                    && !values.iter().any(|x| x.is_null())
                {
                    bad.push(path.to_owned());
                }
                for (k, x) in m {
                    walk(x, &format!("{path}.{}", k.as_str().unwrap_or("?")), bad);
                }
            }
            serde_norway::Value::Sequence(s) => s.iter().for_each(|x| walk(x, path, bad)),
            _ => {}
        }
    }
    let crd: serde_norway::Value = serde_norway::from_str(&crd_yaml()).unwrap();
    let mut bad = Vec::new();
    walk(&crd, "", &mut bad);
    assert!(
        bad.is_empty(),
        "nullable beside an enum without null: {bad:#?}"
    );
}

#[test]
fn committed_alertrule_crd_matches_the_rust_types_and_has_a_status() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crd/alertrule.yaml");
    let committed = std::fs::read_to_string(&path)
        .expect("manifests/crd/alertrule.yaml exists (run `cargo xtask gen`)");
    let generated = nemesis_controller::notify::rule::crd_yaml();
    assert!(
        committed == generated,
        "manifests/crd/alertrule.yaml is stale: run `cargo xtask gen` and commit it"
    );
    let crd: serde_norway::Value = serde_norway::from_str(&generated).unwrap();
    assert_eq!(
        crd["metadata"]["name"].as_str(),
        Some("alertrules.nemesis.dev")
    );
    assert_eq!(crd["spec"]["scope"].as_str(), Some("Namespaced"));
    let version = &crd["spec"]["versions"][0];
    assert!(version["subresources"]["status"].is_mapping());
}
