//! The OpenAPI v3 schemas of the built-in kinds, generated from k8s-openapi's schemars
//! impls and completed with the list-merge extensions upstream's OpenAPI carries
//! (`x-kubernetes-patch-merge-key`, `-patch-strategy`, `-list-type`, `-list-map-keys`),
//! which strategic merge patch, server-side apply and kubectl read. Built once, read-only.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::{Map, Value, json};

use super::registry::Builtin;

/// (definition, property, patch strategy, merge key, list type, list map keys)
type ListRule = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
);

const LIST_RULES: &[ListRule] = &[
    (
        "io.k8s.api.core.v1.PodSpec",
        "containers",
        "merge",
        "name",
        "map",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "initContainers",
        "merge",
        "name",
        "map",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "ephemeralContainers",
        "merge",
        "name",
        "map",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "volumes",
        "merge,retainKeys",
        "name",
        "map",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "imagePullSecrets",
        "merge",
        "name",
        "map",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "hostAliases",
        "merge",
        "ip",
        "map",
        &["ip"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "topologySpreadConstraints",
        "merge",
        "topologyKey",
        "map",
        &["topologyKey", "whenUnsatisfiable"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "schedulingGates",
        "merge",
        "name",
        "map",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "resourceClaims",
        "merge,retainKeys",
        "name",
        "map",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "ports",
        "merge",
        "containerPort",
        "map",
        &["containerPort", "protocol"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "env",
        "merge",
        "name",
        "map",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "volumeMounts",
        "merge",
        "mountPath",
        "map",
        &["mountPath"],
    ),
    (
        "io.k8s.api.core.v1.Container",
        "volumeDevices",
        "merge",
        "devicePath",
        "map",
        &["devicePath"],
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "ports",
        "merge",
        "containerPort",
        "map",
        &["containerPort", "protocol"],
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "env",
        "merge",
        "name",
        "map",
        &["name"],
    ),
    (
        "io.k8s.api.core.v1.EphemeralContainer",
        "volumeMounts",
        "merge",
        "mountPath",
        "map",
        &["mountPath"],
    ),
    (
        "io.k8s.api.core.v1.ServiceSpec",
        "ports",
        "merge",
        "port",
        "map",
        &["port", "protocol"],
    ),
    (
        "io.k8s.api.core.v1.PodStatus",
        "conditions",
        "merge",
        "type",
        "map",
        &["type"],
    ),
    (
        "io.k8s.api.core.v1.NodeStatus",
        "conditions",
        "merge",
        "type",
        "map",
        &["type"],
    ),
    (
        "io.k8s.api.core.v1.NodeStatus",
        "addresses",
        "merge",
        "type",
        "map",
        &["type"],
    ),
    (
        "io.k8s.api.core.v1.NamespaceStatus",
        "conditions",
        "merge",
        "type",
        "map",
        &["type"],
    ),
    (
        "io.k8s.api.apps.v1.DeploymentStatus",
        "conditions",
        "merge",
        "type",
        "map",
        &["type"],
    ),
    (
        "io.k8s.api.apps.v1.ReplicaSetStatus",
        "conditions",
        "merge",
        "type",
        "map",
        &["type"],
    ),
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "finalizers",
        "merge",
        "",
        "set",
        &[],
    ),
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "ownerReferences",
        "merge",
        "uid",
        "map",
        &["uid"],
    ),
];

/// Fields whose object value is replaced wholesale by SMP `$retainKeys` semantics.
const RETAIN_KEYS: &[(&str, &str)] = &[("io.k8s.api.apps.v1.DeploymentSpec", "strategy")];

pub struct BuiltinSchemas {
    /// Definitions by name, as under `#/components/schemas`.
    pub defs: Map<String, Value>,
    /// The root definition name of each built-in kind.
    pub roots: HashMap<Builtin, String>,
}

macro_rules! root {
    ($gen:ident, $roots:ident, $b:expr, $t:ty) => {{
        let _ = $gen.subschema_for::<$t>();
        $roots.insert($b, <$t as schemars::JsonSchema>::schema_name().into_owned());
    }};
}

fn build() -> BuiltinSchemas {
    use k8s_openapi::api;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
    let mut g = schemars::generate::SchemaSettings::openapi3().into_generator();
    let mut roots = HashMap::new();
    root!(g, roots, Builtin::Namespace, api::core::v1::Namespace);
    root!(g, roots, Builtin::Node, api::core::v1::Node);
    root!(g, roots, Builtin::Pod, api::core::v1::Pod);
    root!(g, roots, Builtin::Service, api::core::v1::Service);
    root!(g, roots, Builtin::Endpoints, api::core::v1::Endpoints);
    root!(g, roots, Builtin::ConfigMap, api::core::v1::ConfigMap);
    root!(g, roots, Builtin::Secret, api::core::v1::Secret);
    root!(g, roots, Builtin::CoreEvent, api::core::v1::Event);
    root!(g, roots, Builtin::EventsV1, api::events::v1::Event);
    root!(g, roots, Builtin::Deployment, api::apps::v1::Deployment);
    root!(g, roots, Builtin::ReplicaSet, api::apps::v1::ReplicaSet);
    root!(g, roots, Builtin::StatefulSet, api::apps::v1::StatefulSet);
    root!(g, roots, Builtin::DaemonSet, api::apps::v1::DaemonSet);
    root!(
        g,
        roots,
        Builtin::PersistentVolumeClaim,
        api::core::v1::PersistentVolumeClaim
    );
    root!(
        g,
        roots,
        Builtin::PodDisruptionBudget,
        api::policy::v1::PodDisruptionBudget
    );
    root!(
        g,
        roots,
        Builtin::HorizontalPodAutoscaler,
        api::autoscaling::v2::HorizontalPodAutoscaler
    );
    root!(
        g,
        roots,
        Builtin::EndpointSlice,
        api::discovery::v1::EndpointSlice
    );
    root!(g, roots, Builtin::Lease, api::coordination::v1::Lease);
    root!(g, roots, Builtin::Crd, ext::CustomResourceDefinition);
    root!(
        g,
        roots,
        Builtin::ServiceAccount,
        api::core::v1::ServiceAccount
    );
    root!(g, roots, Builtin::Role, api::rbac::v1::Role);
    root!(g, roots, Builtin::ClusterRole, api::rbac::v1::ClusterRole);
    root!(g, roots, Builtin::RoleBinding, api::rbac::v1::RoleBinding);
    root!(
        g,
        roots,
        Builtin::ClusterRoleBinding,
        api::rbac::v1::ClusterRoleBinding
    );
    root!(
        g,
        roots,
        Builtin::TokenReview,
        api::authentication::v1::TokenReview
    );
    root!(
        g,
        roots,
        Builtin::SelfSubjectReview,
        api::authentication::v1::SelfSubjectReview
    );
    root!(
        g,
        roots,
        Builtin::SelfSubjectAccessReview,
        api::authorization::v1::SelfSubjectAccessReview
    );
    root!(
        g,
        roots,
        Builtin::SubjectAccessReview,
        api::authorization::v1::SubjectAccessReview
    );
    root!(
        g,
        roots,
        Builtin::LocalSubjectAccessReview,
        api::authorization::v1::LocalSubjectAccessReview
    );
    root!(
        g,
        roots,
        Builtin::SelfSubjectRulesReview,
        api::authorization::v1::SelfSubjectRulesReview
    );
    let _ = g.subschema_for::<k8s_openapi::api::authentication::v1::TokenRequest>();
    let _ = g.subschema_for::<k8s_openapi::api::autoscaling::v1::Scale>();
    let mut defs = g.take_definitions(true);
    for (def, prop, strategy, key, list_type, map_keys) in LIST_RULES {
        if let Some(p) = defs
            .get_mut(*def)
            .and_then(|d| d.pointer_mut(&format!("/properties/{prop}")))
        {
            p["x-kubernetes-patch-strategy"] = json!(strategy);
            if !key.is_empty() {
                p["x-kubernetes-patch-merge-key"] = json!(key);
            }
            p["x-kubernetes-list-type"] = json!(list_type);
            if !map_keys.is_empty() {
                p["x-kubernetes-list-map-keys"] = json!(map_keys);
            }
        }
    }
    for (def, prop) in RETAIN_KEYS {
        if let Some(p) = defs
            .get_mut(*def)
            .and_then(|d| d.pointer_mut(&format!("/properties/{prop}")))
        {
            p["x-kubernetes-patch-strategy"] = json!("retainKeys");
        }
    }
    // `apiextensions/v1.JSON` holds any JSON value (schemars describes it as an object).
    for (name, d) in defs.iter_mut() {
        if name.ends_with(".apiextensions.v1.JSON") {
            let description = d["description"].clone();
            *d = json!({"description": description, "x-kubernetes-preserve-unknown-fields": true});
        }
    }
    // Port protocols default to TCP (upstream's schema says so; list keys rely on it).
    for def in [
        "io.k8s.api.core.v1.ContainerPort",
        "io.k8s.api.core.v1.ServicePort",
        "io.k8s.api.discovery.v1.EndpointPort",
    ] {
        if let Some(p) = defs
            .get_mut(def)
            .and_then(|d| d.pointer_mut("/properties/protocol"))
        {
            p["default"] = json!("TCP");
        }
    }
    // Group/version/kind on the roots, as upstream documents carry them (kubectl explain
    // and the client-side apply schema lookups find kinds by this extension).
    for (b, name) in &roots {
        let rt = super::registry::builtins()
            .into_iter()
            .find(|t| t.builtin == Some(*b));
        if let (Some(rt), Some(d)) = (rt, defs.get_mut(name)) {
            d["x-kubernetes-group-version-kind"] =
                json!([{"group": rt.group, "version": rt.version, "kind": rt.kind}]);
        }
    }
    if let Some(d) = defs.get_mut("io.k8s.api.autoscaling.v1.Scale") {
        d["x-kubernetes-group-version-kind"] =
            json!([{"group": "autoscaling", "version": "v1", "kind": "Scale"}]);
    }
    BuiltinSchemas { defs, roots }
}

pub fn builtin_schemas() -> &'static BuiltinSchemas {
    static S: OnceLock<BuiltinSchemas> = OnceLock::new();
    S.get_or_init(build)
}

/// Follow `$ref` and single-element `allOf` wrappers to the schema they stand for.
pub fn resolve<'a>(schema: &'a Value, defs: &'a Map<String, Value>) -> &'a Value {
    let mut cur = schema;
    for _ in 0..32 {
        if let Some(r) = cur.get("$ref").and_then(Value::as_str) {
            match r.rsplit('/').next().and_then(|n| defs.get(n)) {
                Some(d) => cur = d,
                None => return cur,
            }
        } else if let Some([one]) = cur
            .get("allOf")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
        {
            cur = one;
        } else {
            return cur;
        }
    }
    cur
}

/// The schema of property `name` of an object schema, resolved.
pub fn property<'a>(
    schema: &'a Value,
    defs: &'a Map<String, Value>,
    name: &str,
) -> Option<&'a Value> {
    let s = resolve(schema, defs);
    if let Some(p) = s.get("properties").and_then(|p| p.get(name)) {
        return Some(p);
    }
    s.get("additionalProperties").filter(|a| a.is_object())
}

/// The list-merge extensions of a property schema (which sit on the property, not on
/// the resolved item schema).
pub fn list_rule(prop: &Value) -> (Option<&str>, Option<&str>) {
    (
        prop.get("x-kubernetes-patch-strategy")
            .and_then(Value::as_str),
        prop.get("x-kubernetes-patch-merge-key")
            .and_then(Value::as_str),
    )
}

/// The item schema of an array schema, resolved.
pub fn items<'a>(schema: &'a Value, defs: &'a Map<String, Value>) -> Option<&'a Value> {
    resolve(schema, defs).get("items").map(|i| resolve(i, defs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_spec_containers_merge_by_name() {
        let s = builtin_schemas();
        let root = &s.defs[&s.roots[&Builtin::Deployment]];
        let spec = property(root, &s.defs, "spec").unwrap();
        let tmpl = property(spec, &s.defs, "template").unwrap();
        let pspec = property(tmpl, &s.defs, "spec").unwrap();
        let containers = property(pspec, &s.defs, "containers").unwrap();
        assert_eq!(list_rule(containers), (Some("merge"), Some("name")));
        let c = items(containers, &s.defs).unwrap();
        let ports = property(c, &s.defs, "ports").unwrap();
        assert_eq!(list_rule(ports), (Some("merge"), Some("containerPort")));
    }
}
