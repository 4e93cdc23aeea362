//! The `/scale` subresource: an `autoscaling/v1` Scale view of a Deployment, ReplicaSet or
//! custom resource that declares one, and writing a Scale's replicas back. Pure functions.

use serde_json::{Value, json};

use super::registry::ResourceType;
use super::selector::render_label_selector;
use super::status::{ApiError, Cause};

fn pointer(path: &str) -> String {
    path.replace('.', "/")
}

/// The Scale of `obj` (stored form).
pub fn to_scale(rt: &ResourceType, obj: &Value) -> Value {
    let Some(sp) = &rt.scale else {
        return Value::Null;
    };
    let spec = obj
        .pointer(&pointer(&sp.spec_replicas))
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let status = obj
        .pointer(&pointer(&sp.status_replicas))
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let selector = match &sp.label_selector {
        Some(p) => obj
            .pointer(&pointer(p))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        None => render_label_selector(&obj["spec"]["selector"]),
    };
    let md = &obj["metadata"];
    let mut scale_md = json!({});
    for k in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if !md[k].is_null() {
            scale_md[k] = md[k].clone();
        }
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": scale_md,
        "spec": {"replicas": spec},
        "status": {"replicas": status, "selector": selector},
    })
}

/// Write `scale`'s `spec.replicas` into `obj`; refuses a negative or missing count.
pub fn apply_scale(rt: &ResourceType, obj: &mut Value, scale: &Value) -> Result<(), ApiError> {
    let Some(sp) = &rt.scale else {
        return Err(ApiError::path_not_found());
    };
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_owned();
    let replicas = match scale.pointer("/spec/replicas") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_i64().ok_or_else(|| {
            ApiError::bad_request(format!("Scale in version \"v1\" cannot be handled as a Scale: spec.replicas must be an integer, got {v}"))
        })?,
    };
    if replicas < 0 {
        return Err(ApiError::invalid(
            "Scale",
            "autoscaling",
            &name,
            vec![Cause::invalid(
                "spec.replicas",
                &json!(replicas),
                "must be greater than or equal to 0",
            )],
        ));
    }
    let mut cur = &mut *obj;
    let parts: Vec<&str> = sp
        .spec_replicas
        .trim_start_matches('.')
        .split('.')
        .collect();
    for p in &parts[..parts.len() - 1] {
        if !cur.get(*p).is_some_and(Value::is_object) {
            cur[*p] = json!({});
        }
        cur = cur.get_mut(*p).expect("just ensured");
    }
    cur[parts[parts.len() - 1]] = json!(replicas);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_scale_round_trip() {
        let rt = super::super::registry::builtins()
            .into_iter()
            .find(|t| t.kind == "Deployment")
            .unwrap();
        let mut d = json!({"metadata": {"name": "d", "namespace": "n", "resourceVersion": "7"},
                           "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "x"}}},
                           "status": {"replicas": 1}});
        let s = to_scale(&rt, &d);
        assert_eq!(s["spec"]["replicas"], 2);
        assert_eq!(s["status"], json!({"replicas": 1, "selector": "app=x"}));
        apply_scale(&rt, &mut d, &json!({"spec": {"replicas": 0}})).unwrap();
        assert_eq!(d["spec"]["replicas"], 0);
        assert_eq!(
            apply_scale(&rt, &mut d, &json!({"spec": {"replicas": -1}}))
                .unwrap_err()
                .code,
            422
        );
    }
}
