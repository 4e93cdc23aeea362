//! PATCH bodies other than apply: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and
//! strategic merge patch with the directives kubectl sends (`$patch`, `$retainKeys`,
//! `$setElementOrder/`, `$deleteFromPrimitiveList/`), driven by the merge keys in the
//! built-in schemas. Pure functions over JSON.

use serde_json::{Map, Value};

use super::schemas::{items, list_rule, property};
use super::status::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

pub fn json_patch(doc: &mut Value, body: &[u8]) -> Result<(), ApiError> {
    let p: json_patch::Patch =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    json_patch::patch(doc, &p).map_err(|e| {
        let mut err = ApiError::invalid("", "", "", vec![]);
        err.message = e.to_string();
        err.details = None;
        err
    })
}

pub fn merge_patch(doc: &mut Value, body: &[u8]) -> Result<(), ApiError> {
    let p = parse_json(body)?;
    if !p.is_object() {
        return Err(ApiError::bad_request("a merge patch must be a JSON object"));
    }
    json_patch::merge(doc, &p);
    Ok(())
}

/// Apply a strategic merge patch to `doc` under `schema` (a built-in root schema).
pub fn strategic_merge_patch(
    doc: &mut Value,
    body: &[u8],
    schema: &Value,
    defs: &Map<String, Value>,
) -> Result<(), ApiError> {
    let p = parse_json(body)?;
    let Some(pm) = p.as_object() else {
        return Err(ApiError::bad_request(
            "a strategic merge patch must be a JSON object",
        ));
    };
    let orig = doc.as_object().cloned().unwrap_or_default();
    match merge_map(orig, pm, Some(schema), defs)? {
        Some(m) => *doc = Value::Object(m),
        None => {
            return Err(ApiError::bad_request(
                "a strategic merge patch may not delete the whole object",
            ));
        }
    }
    Ok(())
}

fn directive(m: &Map<String, Value>) -> Option<&str> {
    m.get("$patch").and_then(Value::as_str)
}

/// A patch value with its directives applied against nothing.
fn fresh(
    v: &Value,
    schema: Option<&Value>,
    defs: &Map<String, Value>,
) -> Result<Option<Value>, ApiError> {
    match v {
        Value::Object(m) => Ok(merge_map(Map::new(), m, schema, defs)?.map(Value::Object)),
        Value::Array(a) => Ok(Some(Value::Array(merge_list(vec![], a, schema, defs)?))),
        other => Ok(Some(other.clone())),
    }
}

/// Merge `patch` into `orig`; `None` means `$patch: delete`.
fn merge_map(
    mut orig: Map<String, Value>,
    patch: &Map<String, Value>,
    schema: Option<&Value>,
    defs: &Map<String, Value>,
) -> Result<Option<Map<String, Value>>, ApiError> {
    match directive(patch) {
        Some("delete") => return Ok(None),
        Some("replace") => {
            let mut m = Map::new();
            for (k, v) in patch.iter().filter(|(k, _)| !k.starts_with('$')) {
                if let Some(v) = fresh(v, schema.and_then(|s| property(s, defs, k)), defs)? {
                    m.insert(k.clone(), v);
                }
            }
            return Ok(Some(m));
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown patch type: {other} in map"
            )));
        }
    }
    for (k, pv) in patch {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let drop: Vec<Value> = pv.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(a)) = orig.get_mut(field) {
                a.retain(|x| !drop.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        let child = schema.and_then(|s| property(s, defs, k));
        if pv.is_null() {
            orig.remove(k);
            continue;
        }
        let merged = match (orig.remove(k), pv) {
            (Some(Value::Object(om)), Value::Object(pm)) if !replaces(child) => {
                merge_map(om, pm, child, defs)?.map(Value::Object)
            }
            (Some(Value::Array(oa)), Value::Array(pa)) => {
                Some(Value::Array(merge_list(oa, pa, child, defs)?))
            }
            (_, pv) => fresh(pv, child, defs)?,
        };
        if let Some(v) = merged {
            orig.insert(k.clone(), v);
        }
    }
    if let Some(keep) = patch.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        orig.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, order) in patch {
        if let (Some(field), Some(order)) = (k.strip_prefix("$setElementOrder/"), order.as_array())
        {
            let key = schema
                .and_then(|s| property(s, defs, field))
                .and_then(|c| list_rule(c).1);
            if let Some(Value::Array(a)) = orig.get_mut(field) {
                reorder(a, order, key);
            }
        }
    }
    Ok(Some(orig))
}

fn replaces(schema: Option<&Value>) -> bool {
    schema
        .and_then(|s| list_rule(s).0)
        .is_some_and(|st| st.split(',').any(|x| x == "replace"))
}

/// Order `a` as `order` says (by merge key, or by value); others keep their order after.
fn reorder(a: &mut Vec<Value>, order: &[Value], key: Option<&str>) {
    let id = |v: &Value| -> Value {
        match key {
            Some(k) => v.get(k).cloned().unwrap_or(Value::Null),
            None => v.clone(),
        }
    };
    let pos = |v: &Value| {
        let i = id(v);
        order.iter().position(|o| match key {
            Some(k) => o.get(k) == Some(&i),
            None => *o == i,
        })
    };
    let mut indexed: Vec<(usize, Value)> = std::mem::take(a).into_iter().enumerate().collect();
    indexed.sort_by_key(|(i, v)| (pos(v).unwrap_or(order.len() + i), *i));
    *a = indexed.into_iter().map(|(_, v)| v).collect();
}

fn merge_list(
    mut orig: Vec<Value>,
    patch: &[Value],
    schema: Option<&Value>,
    defs: &Map<String, Value>,
) -> Result<Vec<Value>, ApiError> {
    let (strategy, key) = schema.map(list_rule).unwrap_or((None, None));
    let merging = strategy.is_some_and(|s| s.split(',').any(|x| x == "merge"));
    let item_schema = schema.and_then(|s| items(s, defs));
    // `[{"$patch": "replace"}, ...]` replaces the list with the other items.
    if patch
        .iter()
        .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        let mut out = vec![];
        for p in patch.iter().filter(|p| p.get("$patch").is_none()) {
            out.extend(fresh(p, item_schema, defs)?);
        }
        return Ok(out);
    }
    if !merging {
        let mut out = vec![];
        for p in patch {
            out.extend(fresh(p, item_schema, defs)?);
        }
        return Ok(out);
    }
    match key {
        Some(key) => {
            for p in patch {
                let Some(pm) = p.as_object() else {
                    return Err(ApiError::bad_request(format!(
                        "list items must be objects to merge by \"{key}\""
                    )));
                };
                let Some(kv) = pm.get(key) else {
                    return Err(ApiError::bad_request(format!(
                        "map: {p} does not contain declared merge key: {key}"
                    )));
                };
                let at = orig.iter().position(|o| o.get(key) == Some(kv));
                match (at, directive(pm)) {
                    (Some(i), Some("delete")) => {
                        orig.remove(i);
                    }
                    (None, Some("delete")) => {}
                    (Some(i), _) => {
                        let om = orig[i].as_object().cloned().unwrap_or_default();
                        match merge_map(om, pm, item_schema, defs)? {
                            Some(m) => orig[i] = Value::Object(m),
                            None => {
                                orig.remove(i);
                            }
                        }
                    }
                    (None, _) => {
                        if let Some(m) = merge_map(Map::new(), pm, item_schema, defs)? {
                            orig.push(Value::Object(m));
                        }
                    }
                }
            }
        }
        None => {
            for p in patch {
                if !orig.contains(p) {
                    orig.push(p.clone());
                }
            }
        }
    }
    Ok(orig)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::registry::Builtin;
    use crate::apiserver::schemas::builtin_schemas;
    use serde_json::json;

    fn smp(doc: &mut Value, patch: Value) {
        let s = builtin_schemas();
        let root = &s.defs[&s.roots[&Builtin::Deployment]];
        strategic_merge_patch(doc, patch.to_string().as_bytes(), root, &s.defs).unwrap();
    }

    fn deploy() -> Value {
        json!({"metadata": {"name": "d", "finalizers": ["a"]}, "spec": {"replicas": 1,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%"}},
            "template": {"spec": {"containers": [
                {"name": "app", "image": "v1", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                {"name": "side", "image": "s1"}]}}}})
    }

    #[test]
    fn containers_and_env_merge_by_name() {
        let mut d = deploy();
        smp(
            &mut d,
            json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "v2", "env": [{"name": "B", "value": "3"}, {"name": "A", "$patch": "delete"}]}]}}}}),
        );
        let cs = &d["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs.as_array().unwrap().len(), 2);
        assert_eq!(cs[0]["image"], "v2");
        assert_eq!(cs[0]["env"], json!([{"name": "B", "value": "3"}]));
        assert_eq!(cs[1]["image"], "s1");
    }

    #[test]
    fn set_element_order_and_null_deletion() {
        let mut d = deploy();
        smp(
            &mut d,
            json!({"spec": {"replicas": null, "template": {"spec": {
            "$setElementOrder/containers": [{"name": "side"}, {"name": "app"}]}}}}),
        );
        assert!(d["spec"].get("replicas").is_none());
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["name"],
            "side"
        );
    }

    #[test]
    fn retain_keys_and_primitive_list_merge() {
        let mut d = deploy();
        smp(
            &mut d,
            json!({"metadata": {"finalizers": ["b"]},
                           "spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate", "rollingUpdate": null}}}),
        );
        assert_eq!(d["spec"]["strategy"], json!({"type": "Recreate"}));
        assert_eq!(d["metadata"]["finalizers"], json!(["a", "b"]));
        smp(
            &mut d,
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        );
        assert_eq!(d["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn json_and_merge_patches() {
        let mut d = json!({"a": {"b": 1}, "l": [1, 2]});
        merge_patch(&mut d, br#"{"a": {"c": 2, "b": null}}"#).unwrap();
        assert_eq!(d, json!({"a": {"c": 2}, "l": [1, 2]}));
        json_patch(&mut d, br#"[{"op": "add", "path": "/l/-", "value": 3}]"#).unwrap();
        assert_eq!(d["l"], json!([1, 2, 3]));
        let e = json_patch(&mut d, br#"[{"op": "test", "path": "/l/0", "value": 9}]"#).unwrap_err();
        assert_eq!(e.code, 422);
    }
}
