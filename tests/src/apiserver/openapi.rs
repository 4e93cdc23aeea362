//! The OpenAPI v3 documents kubectl reads: the `/openapi/v3` index and one document per
//! group version with paths (whose PATCH operations advertise `fieldValidation`, so kubectl
//! leaves validation to this server) and component schemas, built-in and from CRDs.
//! OpenAPI v2 is not served (it is protobuf-only for kubectl); nothing here writes.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::registry::{Registry, ResourceType};
use super::schemas::builtin_schemas;

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

fn prefix(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `com.example.v1.Widget` for group `example.com`: upstream's naming of CR schemas.
fn cr_schema_name(rt: &ResourceType) -> String {
    let mut parts: Vec<&str> = rt.group.split('.').collect();
    parts.reverse();
    format!("{}.{}.{}", parts.join("."), rt.version, rt.kind)
}

fn schema_name(rt: &ResourceType) -> Option<String> {
    if rt.crd.is_some() {
        return Some(cr_schema_name(rt));
    }
    let s = builtin_schemas();
    rt.builtin.and_then(|b| s.roots.get(&b).cloned())
}

fn hash(v: &Value) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in v.to_string().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016X}")
}

fn param(name: &str, ty: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": ty, "uniqueItems": true}})
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn gvk(group: &str, version: &str, kind: &str) -> Value {
    json!({"group": group, "version": version, "kind": kind})
}

fn op(action: &str, gvk: &Value, params: Vec<Value>, response: &str, body: Option<Value>) -> Value {
    let mut o = json!({
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk,
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": schema_ref(response)}}}},
    });
    if let Some(b) = body {
        o["requestBody"] = json!({"content": b, "required": true});
    }
    o
}

fn write_params(patch: bool) -> Vec<Value> {
    let mut p = vec![
        param("dryRun", "string"),
        param("fieldManager", "string"),
        param("fieldValidation", "string"),
    ];
    if patch {
        p.push(param("force", "boolean"));
    }
    p
}

fn paths_for(rt: &ResourceType, schema: &str, out: &mut Map<String, Value>) {
    let base = format!("/{}", prefix(&rt.group, &rt.version));
    let scope = if rt.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}", rt.plural)
    } else {
        format!("{base}/{}", rt.plural)
    };
    let g = gvk(&rt.group, &rt.version, &rt.kind);
    let json_body = json!({"application/json": {"schema": schema_ref(schema)}});
    let mut patch_types = vec![
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/apply-patch+yaml",
    ];
    if rt.builtin.is_some() {
        patch_types.push("application/strategic-merge-patch+json");
    }
    let patch_body: Map<String, Value> = patch_types
        .iter()
        .map(|t| {
            (
                t.to_string(),
                json!({"schema": schema_ref("io.k8s.apimachinery.pkg.apis.meta.v1.Patch")}),
            )
        })
        .collect();
    let mut path_params = vec![];
    if rt.namespaced {
        path_params.push(json!({"name": "namespace", "in": "path", "required": true, "schema": {"type": "string"}}));
    }
    let list_schema = schema; // list responses are not described in detail
    out.insert(
        scope.clone(),
        json!({
            "get": op("list", &g, vec![param("labelSelector", "string"), param("fieldSelector", "string"), param("watch", "boolean")], list_schema, None),
            "post": op("post", &g, write_params(false), schema, Some(json_body.clone())),
            "parameters": path_params.clone(),
        }),
    );
    let mut item_params = path_params.clone();
    item_params.push(
        json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}),
    );
    out.insert(
        format!("{scope}/{{name}}"),
        json!({
            "get": op("get", &g, vec![], schema, None),
            "put": op("put", &g, write_params(false), schema, Some(json_body.clone())),
            "patch": op("patch", &g, write_params(true), schema, Some(Value::Object(patch_body.clone()))),
            "delete": op("delete", &g, vec![param("dryRun", "string"), param("propagationPolicy", "string")], schema, None),
            "parameters": item_params.clone(),
        }),
    );
    if rt.status {
        out.insert(
            format!("{scope}/{{name}}/status"),
            json!({
                "get": op("get", &g, vec![], schema, None),
                "put": op("put", &g, write_params(false), schema, Some(json_body.clone())),
                "patch": op("patch", &g, write_params(true), schema, Some(Value::Object(patch_body.clone()))),
                "parameters": item_params.clone(),
            }),
        );
    }
    if rt.scale.is_some() {
        let sg = gvk("autoscaling", "v1", "Scale");
        let scale = "io.k8s.api.autoscaling.v1.Scale";
        out.insert(
            format!("{scope}/{{name}}/scale"),
            json!({
                "get": op("get", &sg, vec![], scale, None),
                "put": op("put", &sg, write_params(false), scale, Some(json!({"application/json": {"schema": schema_ref(scale)}}))),
                "patch": op("patch", &sg, write_params(true), scale, Some(Value::Object(patch_body))),
                "parameters": item_params,
            }),
        );
    }
}

/// Names of all schemas reachable from `roots` through `$ref`s.
fn closure(roots: &[String], defs: &Map<String, Value>) -> BTreeSet<String> {
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    out.push(r.rsplit('/').next().unwrap_or("").to_owned());
                }
                m.values().for_each(|c| refs(c, out));
            }
            Value::Array(a) => a.iter().for_each(|c| refs(c, out)),
            _ => {}
        }
    }
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.to_vec();
    while let Some(n) = todo.pop() {
        if !seen.insert(n.clone()) {
            continue;
        }
        if let Some(d) = defs.get(&n) {
            let mut found = vec![];
            refs(d, &mut found);
            todo.extend(found);
        }
    }
    seen
}

/// The custom resource's schema as upstream publishes it: the CRD's, plus the standard
/// object fields and its group/version/kind.
fn cr_schema(rt: &ResourceType) -> Value {
    let mut s = rt
        .crd
        .as_ref()
        .map(|c| c.schema.clone())
        .unwrap_or_else(|| json!({"type": "object"}));
    if !s["properties"].is_object() {
        s["properties"] = json!({});
    }
    s["properties"]["apiVersion"] = json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."});
    s["properties"]["kind"] = json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."});
    s["properties"]["metadata"] =
        json!({"allOf": [schema_ref(OBJECT_META)], "description": "Standard object's metadata."});
    s["x-kubernetes-group-version-kind"] = json!([gvk(&rt.group, &rt.version, &rt.kind)]);
    s
}

pub fn group_version_doc(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let types = reg.in_group_version(group, version);
    if types.is_empty() {
        return None;
    }
    let s = builtin_schemas();
    let mut paths = Map::new();
    let mut roots = vec![OBJECT_META.to_owned()];
    let mut schemas = Map::new();
    for rt in &types {
        let Some(name) = schema_name(rt) else {
            continue;
        };
        paths_for(rt, &name, &mut paths);
        if rt.crd.is_some() {
            schemas.insert(name, cr_schema(rt));
        } else {
            roots.push(name);
        }
        if rt.scale.is_some() {
            roots.push("io.k8s.api.autoscaling.v1.Scale".into());
        }
    }
    for n in closure(&roots, &s.defs) {
        if let Some(d) = s.defs.get(&n) {
            schemas.insert(n, d.clone());
        }
    }
    schemas.insert(
        "io.k8s.apimachinery.pkg.apis.meta.v1.Patch".into(),
        json!({"type": "object", "description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body."}),
    );
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// The `/openapi/v3` index: one entry per group version, with a content hash.
pub fn index(reg: &Registry) -> Value {
    let mut paths = Map::new();
    for (g, vs) in reg.groups() {
        for v in vs {
            if let Some(doc) = group_version_doc(reg, &g, &v) {
                let p = prefix(&g, &v);
                paths.insert(
                    p.clone(),
                    json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", hash(&doc))}),
                );
            }
        }
    }
    json!({"paths": paths})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_patch_advertises_field_validation() {
        let doc = group_version_doc(&Registry::default(), "apps", "v1").unwrap();
        let p = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(p["x-kubernetes-group-version-kind"]["kind"], "Deployment");
        assert!(
            p["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["name"] == "fieldValidation")
        );
        assert!(doc["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"].is_object());
    }

    #[test]
    fn index_lists_core_and_groups() {
        let idx = index(&Registry::default());
        assert!(
            idx["paths"]["api/v1"]["serverRelativeURL"]
                .as_str()
                .unwrap()
                .starts_with("/openapi/v3/api/v1?hash=")
        );
        assert!(idx["paths"]["apis/apps/v1"].is_object());
    }
}
