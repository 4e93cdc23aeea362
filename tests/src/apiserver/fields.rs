//! Field ownership (`metadata.managedFields`, FieldsV1) and server-side apply: field sets
//! of objects under a schema (associative lists by their keys, sets, atomic lists),
//! conflicts between managers, removal of fields a manager stopped applying, and the merge
//! of an applied configuration into the live object. Pure functions over JSON.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::meta;
use super::schemas::{builtin_schemas, resolve};
use super::status::{ApiError, Cause};

/// One step of a field path, as FieldsV1 spells it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pe {
    /// `f:<name>`
    Field(String),
    /// `k:<json of the key fields>`
    Key(String),
    /// `v:<json of the value>`
    Val(String),
}

pub type Path = Vec<Pe>;
pub type FieldSet = BTreeSet<Path>;

/// The schema context a field set is computed under.
#[derive(Clone, Copy)]
pub struct Schema<'a> {
    pub root: Option<&'a Value>,
    pub defs: &'a Map<String, Value>,
}

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

/// Top-level and metadata fields no manager owns.
fn ignored(path: &[Pe]) -> bool {
    match path {
        [Pe::Field(f)] => matches!(f.as_str(), "apiVersion" | "kind"),
        [Pe::Field(m), Pe::Field(f)] if m == "metadata" => matches!(
            f.as_str(),
            "name"
                | "namespace"
                | "uid"
                | "resourceVersion"
                | "generation"
                | "creationTimestamp"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
                | "managedFields"
                | "selfLink"
        ),
        _ => false,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum ListKind<'a> {
    Atomic,
    Set,
    Map(&'a [Value]),
}

fn child<'a>(
    schema: Option<&'a Value>,
    defs: &'a Map<String, Value>,
    key: &str,
    at_root: bool,
) -> Option<&'a Value> {
    if at_root && key == "metadata" {
        return builtin_schemas().defs.get(OBJECT_META);
    }
    let s = resolve(schema?, defs);
    s.get("properties")
        .and_then(|p| p.get(key))
        .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
}

fn list_kind<'a>(schema: Option<&'a Value>, defs: &'a Map<String, Value>) -> ListKind<'a> {
    let Some(s) = schema else {
        return ListKind::Atomic;
    };
    // The extensions sit on the property schema; look there, then on the resolved one.
    let get = |k: &str| s.get(k).or_else(|| resolve(s, defs).get(k));
    match get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => ListKind::Set,
        Some("map") => ListKind::Map(
            get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[]),
        ),
        _ => ListKind::Atomic,
    }
}

fn is_atomic_map(schema: Option<&Value>, defs: &Map<String, Value>) -> bool {
    schema.is_some_and(|s| {
        let r = resolve(s, defs);
        r.get("x-kubernetes-map-type").and_then(Value::as_str) == Some("atomic")
            || s.get("x-kubernetes-map-type").and_then(Value::as_str) == Some("atomic")
    })
}

fn items<'a>(schema: Option<&'a Value>, defs: &'a Map<String, Value>) -> Option<&'a Value> {
    schema.and_then(|s| resolve(s, defs).get("items"))
}

/// The key of an associative-list item: its key fields (schema defaults filling absent
/// ones, as the server defaults them before merging).
fn item_key(
    item: &Value,
    keys: &[Value],
    item_schema: Option<&Value>,
    defs: &Map<String, Value>,
) -> String {
    let mut k = Map::new();
    for key in keys.iter().filter_map(Value::as_str) {
        let v = item.get(key).cloned().or_else(|| {
            child(item_schema, defs, key, false).and_then(|s| {
                resolve(s, defs)
                    .get("default")
                    .or(s.get("default"))
                    .cloned()
            })
        });
        if let Some(v) = v {
            k.insert(key.to_owned(), v);
        }
    }
    Value::Object(k).to_string()
}

fn collect(
    v: &Value,
    schema: Option<&Value>,
    defs: &Map<String, Value>,
    path: &mut Path,
    out: &mut FieldSet,
    at_root: bool,
) {
    match v {
        Value::Object(m) if !is_atomic_map(schema, defs) => {
            if m.is_empty() && !path.is_empty() {
                out.insert(path.clone());
            }
            for (k, cv) in m {
                path.push(Pe::Field(k.clone()));
                if !ignored(path) {
                    collect(cv, child(schema, defs, k, at_root), defs, path, out, false);
                }
                path.pop();
            }
        }
        Value::Array(a) => match list_kind(schema, defs) {
            ListKind::Atomic => {
                out.insert(path.clone());
            }
            ListKind::Set => {
                if a.is_empty() {
                    out.insert(path.clone());
                }
                for item in a {
                    path.push(Pe::Val(item.to_string()));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListKind::Map(keys) => {
                if a.is_empty() {
                    out.insert(path.clone());
                }
                let is = items(schema, defs);
                for item in a {
                    path.push(Pe::Key(item_key(item, keys, is, defs)));
                    out.insert(path.clone());
                    collect(item, is, defs, path, out, false);
                    path.pop();
                }
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The fields `v` sets, under `schema`.
pub fn field_set(v: &Value, schema: Schema) -> FieldSet {
    let mut out = FieldSet::new();
    collect(v, schema.root, schema.defs, &mut vec![], &mut out, true);
    out
}

/// The value at `path` in `v`.
fn value_at<'a>(v: &'a Value, path: &[Pe], schema: Schema) -> Option<&'a Value> {
    let mut cur = v;
    let mut s = schema.root;
    for (i, pe) in path.iter().enumerate() {
        match pe {
            Pe::Field(f) => {
                s = child(s, schema.defs, f, i == 0);
                cur = cur.get(f)?;
            }
            Pe::Key(k) => {
                let keys = match list_kind(s, schema.defs) {
                    ListKind::Map(keys) => keys,
                    _ => &[],
                };
                let is = items(s, schema.defs);
                cur = cur
                    .as_array()?
                    .iter()
                    .find(|it| item_key(it, keys, is, schema.defs) == *k)?;
                s = is;
            }
            Pe::Val(val) => {
                cur = cur.as_array()?.iter().find(|it| it.to_string() == *val)?;
            }
        }
    }
    Some(cur)
}

/// Remove the field at `path` from `v` (if there).
fn remove_at(v: &mut Value, path: &[Pe], schema: Schema) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut s = schema.root;
    for (i, pe) in parent.iter().enumerate() {
        if let Pe::Field(f) = pe {
            s = child(s, schema.defs, f, i == 0);
        } else if matches!(pe, Pe::Key(_)) {
            s = items(s, schema.defs);
        }
    }
    // Find the parent mutably by walking again.
    let Some(parent_v) = value_at_mut(v, parent, schema) else {
        return;
    };
    match last {
        Pe::Field(f) => {
            if let Some(m) = parent_v.as_object_mut() {
                m.remove(f);
            }
        }
        Pe::Key(k) => {
            let keys = match list_kind(s, schema.defs) {
                ListKind::Map(keys) => keys,
                _ => &[],
            };
            let is = items(s, schema.defs);
            if let Some(a) = parent_v.as_array_mut() {
                a.retain(|it| item_key(it, keys, is, schema.defs) != *k);
            }
        }
        Pe::Val(val) => {
            if let Some(a) = parent_v.as_array_mut() {
                a.retain(|it| it.to_string().as_str() != val.as_str());
            }
        }
    }
}

fn value_at_mut<'a>(v: &'a mut Value, path: &[Pe], schema: Schema) -> Option<&'a mut Value> {
    let mut cur = v;
    let mut s = schema.root;
    for (i, pe) in path.iter().enumerate() {
        match pe {
            Pe::Field(f) => {
                s = child(s, schema.defs, f, i == 0);
                cur = cur.get_mut(f)?;
            }
            Pe::Key(k) => {
                let keys = match list_kind(s, schema.defs) {
                    ListKind::Map(keys) => keys,
                    _ => &[],
                };
                let is = items(s, schema.defs);
                cur = cur
                    .as_array_mut()?
                    .iter_mut()
                    .find(|it| item_key(it, keys, is, schema.defs) == *k)?;
                s = is;
            }
            Pe::Val(val) => {
                cur = cur
                    .as_array_mut()?
                    .iter_mut()
                    .find(|it| it.to_string() == *val)?;
            }
        }
    }
    Some(cur)
}

/// Merge an applied configuration into `live`: maps by key, associative lists by item
/// key, sets by value, everything else replaced.
fn merge(
    live: &mut Value,
    cfg: &Value,
    schema: Option<&Value>,
    defs: &Map<String, Value>,
    at_root: bool,
) {
    match (live, cfg) {
        (Value::Object(lm), Value::Object(cm)) if !is_atomic_map(schema, defs) => {
            for (k, cv) in cm {
                if cv.is_null() {
                    lm.remove(k);
                    continue;
                }
                let cs = child(schema, defs, k, at_root);
                match lm.get_mut(k) {
                    Some(lv) => merge(lv, cv, cs, defs, false),
                    None => {
                        lm.insert(k.clone(), cv.clone());
                    }
                }
            }
        }
        (Value::Array(la), Value::Array(ca)) => match list_kind(schema, defs) {
            ListKind::Atomic => *la = ca.clone(),
            ListKind::Set => {
                for item in ca {
                    if !la.contains(item) {
                        la.push(item.clone());
                    }
                }
            }
            ListKind::Map(keys) => {
                let is = items(schema, defs);
                for item in ca {
                    let k = item_key(item, keys, is, defs);
                    match la.iter_mut().find(|it| item_key(it, keys, is, defs) == k) {
                        Some(existing) => merge(existing, item, is, defs, false),
                        None => la.push(item.clone()),
                    }
                }
            }
        },
        (live, cfg) => *live = cfg.clone(),
    }
}

// === FieldsV1 encoding ===

fn pe_key(pe: &Pe) -> String {
    match pe {
        Pe::Field(f) => format!("f:{f}"),
        Pe::Key(k) => format!("k:{k}"),
        Pe::Val(v) => format!("v:{v}"),
    }
}

pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = json!({});
    for path in set {
        let mut cur = &mut root;
        for pe in path {
            let k = pe_key(pe);
            if cur.get(&k).is_none() {
                cur[&k] = json!({});
            }
            cur = cur.get_mut(&k).expect("just inserted");
        }
    }
    // A member that also has members below it carries ".".
    fn mark(node: &mut Value, path: &mut Path, set: &FieldSet) {
        let Some(m) = node.as_object_mut() else {
            return;
        };
        let keys: Vec<String> = m.keys().cloned().collect();
        for k in keys {
            let pe = match k.split_at(2) {
                ("f:", r) => Pe::Field(r.into()),
                ("k:", r) => Pe::Key(r.into()),
                ("v:", r) => Pe::Val(r.into()),
                _ => continue,
            };
            path.push(pe);
            let childv = m.get_mut(&k).expect("listed");
            let has_children = childv.as_object().is_some_and(|c| !c.is_empty());
            mark(childv, path, set);
            if has_children && set.contains(path) {
                childv[".".to_string()] = json!({});
            }
            path.pop();
        }
    }
    mark(&mut root, &mut vec![], set);
    root
}

pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn walk(node: &Value, path: &mut Path, out: &mut FieldSet) {
        let Some(m) = node.as_object() else { return };
        for (k, child) in m {
            if k == "." {
                out.insert(path.clone());
                continue;
            }
            let pe = match k.split_at_checked(2) {
                Some(("f:", r)) => Pe::Field(r.into()),
                Some(("k:", r)) => Pe::Key(r.into()),
                Some(("v:", r)) => Pe::Val(r.into()),
                _ => continue,
            };
            path.push(pe);
            if child.as_object().is_none_or(|c| c.is_empty()) {
                out.insert(path.clone());
            } else {
                walk(child, path, out);
            }
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut vec![], &mut out);
    out
}

// === managedFields entries ===

#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    subresource: Option<String>,
    time: String,
    set: FieldSet,
}

fn entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| Entry {
            manager: e["manager"].as_str().unwrap_or("").into(),
            operation: e["operation"].as_str().unwrap_or("Update").into(),
            api_version: e["apiVersion"].as_str().unwrap_or("").into(),
            subresource: e["subresource"].as_str().map(str::to_owned),
            time: e["time"].as_str().unwrap_or("").into(),
            set: from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

fn write_entries(obj: &mut Value, es: Vec<Entry>) {
    let arr: Vec<Value> = es
        .into_iter()
        .filter(|e| !e.set.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager, "operation": e.operation, "apiVersion": e.api_version,
                "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(&e.set),
            });
            if let Some(s) = e.subresource {
                v["subresource"] = json!(s);
            }
            v
        })
        .collect();
    let md = meta::metadata_mut(obj);
    if arr.is_empty() {
        md.remove("managedFields");
    } else {
        md.insert("managedFields".into(), Value::Array(arr));
    }
}

/// The schema of an object of the given served type.
pub fn schema_for(
    rt: &super::registry::ResourceType,
) -> (Option<Value>, &'static Map<String, Value>) {
    let s = builtin_schemas();
    if let Some(crd) = &rt.crd {
        return (Some(crd.schema.clone()), &s.defs);
    }
    let root = rt
        .builtin
        .and_then(|b| s.roots.get(&b))
        .and_then(|r| s.defs.get(r))
        .cloned();
    (root, &s.defs)
}

fn status_scoped(set: &FieldSet, sub: Option<&str>) -> FieldSet {
    set.iter()
        .filter(|p| {
            let is_status = p.first() == Some(&Pe::Field("status".into()));
            if sub == Some("status") {
                is_status
            } else {
                !is_status
            }
        })
        .cloned()
        .collect()
}

/// Record a non-apply write by `manager`: it owns the fields it changed, which no other
/// manager owns any more. A no-op without a manager.
pub fn record_update(
    new: &mut Value,
    old: Option<&Value>,
    manager: &str,
    api_version: &str,
    sub: Option<&str>,
    schema: Schema,
) {
    if manager.is_empty() {
        return;
    }
    let sent = new.pointer("/metadata/managedFields").cloned();
    let before = old.and_then(|o| o.pointer("/metadata/managedFields").cloned());
    match sent.as_ref().and_then(Value::as_array) {
        // `[{}]` resets field ownership.
        Some(a) if a.len() == 1 && a[0].as_object().is_some_and(Map::is_empty) => {
            meta::metadata_mut(new).remove("managedFields");
            return;
        }
        // A writer that changes managedFields itself (kubectl migrating client-side
        // apply ownership, say) gets them as it sent them.
        Some(a) if !a.is_empty() && sent != before => return,
        _ => {}
    }
    let mut es = old.map(entries).unwrap_or_default();
    let new_set = field_set(new, schema);
    let old_set = old.map(|o| field_set(o, schema)).unwrap_or_default();
    let mut changed: FieldSet = new_set
        .iter()
        .filter(|p| old.is_none_or(|o| value_at(o, p, schema) != value_at(new, p, schema)))
        .cloned()
        .collect();
    changed.extend(old_set.difference(&new_set).cloned());
    let changed = if sub.is_some() {
        status_scoped(&changed, sub)
    } else {
        changed
    };
    if changed.is_empty() {
        if let Some(o) = old {
            let mf = o.pointer("/metadata/managedFields").cloned();
            if let Some(mf) = mf {
                meta::metadata_mut(new).insert("managedFields".into(), mf);
            }
        }
        return;
    }
    for e in es.iter_mut() {
        e.set
            .retain(|p| !changed.contains(p) && new_set.contains(p));
    }
    let owned: FieldSet = changed.intersection(&new_set).cloned().collect();
    let now = meta::now_rfc3339();
    match es.iter_mut().find(|e| {
        e.manager == manager && e.operation == "Update" && e.subresource.as_deref() == sub
    }) {
        Some(e) => {
            e.set.extend(owned);
            e.time = now;
            e.api_version = api_version.into();
        }
        None => es.push(Entry {
            manager: manager.into(),
            operation: "Update".into(),
            api_version: api_version.into(),
            subresource: sub.map(str::to_owned),
            time: now,
            set: owned,
        }),
    }
    write_entries(new, es);
}

fn render_path(p: &Path) -> String {
    let mut s = String::new();
    for pe in p {
        match pe {
            Pe::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            Pe::Key(k) => s.push_str(&format!(
                "[{}]",
                k.trim_start_matches('{')
                    .trim_end_matches('}')
                    .replace(':', "=")
            )),
            Pe::Val(v) => s.push_str(&format!("[{v}]")),
        }
    }
    s
}

/// Server-side apply of `cfg` by `manager` onto `live` (`None`: the object is created).
/// Returns the object to store, with managedFields updated.
pub fn apply(
    live: Option<&Value>,
    cfg: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
    sub: Option<&str>,
    schema: Schema,
) -> Result<Value, ApiError> {
    let cfg_set = status_scoped(&field_set(cfg, schema), sub);
    let mut es = live.map(entries).unwrap_or_default();
    let mine = |e: &Entry| {
        e.manager == manager && e.operation == "Apply" && e.subresource.as_deref() == sub
    };
    let base = live.cloned().unwrap_or_else(|| json!({}));
    // Conflicts: fields others own that this apply would set to a different value.
    let mut conflicts: Vec<(Path, String)> = vec![];
    for e in es.iter().filter(|e| !mine(e)) {
        for p in cfg_set.intersection(&e.set) {
            let (a, b) = (value_at(&base, p, schema), value_at(cfg, p, schema));
            let both_objects = a.is_some_and(Value::is_object) && b.is_some_and(Value::is_object);
            if !both_objects && a != b {
                conflicts.push((p.clone(), e.manager.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let causes: Vec<Cause> = conflicts
            .iter()
            .map(|(p, m)| Cause {
                reason: "FieldManagerConflict",
                field: render_path(p),
                message: format!("conflict with \"{m}\""),
            })
            .collect();
        let lines: Vec<String> = conflicts
            .iter()
            .map(|(p, m)| format!("- {m}: {}", render_path(p)))
            .collect();
        let msg = if conflicts.len() == 1 {
            format!(
                "Apply failed with 1 conflict: conflict with \"{}\": {}",
                conflicts[0].1,
                render_path(&conflicts[0].0)
            )
        } else {
            format!(
                "Apply failed with {} conflicts: conflicts with:\n{}",
                conflicts.len(),
                lines.join("\n")
            )
        };
        return Err(ApiError::apply_conflict(msg, causes));
    }
    let conflicting: FieldSet = conflicts.into_iter().map(|(p, _)| p).collect();
    let previous: FieldSet = es
        .iter()
        .filter(|e| mine(e))
        .flat_map(|e| e.set.iter().cloned())
        .collect();
    let others: FieldSet = es
        .iter()
        .filter(|e| !mine(e))
        .flat_map(|e| e.set.iter().cloned())
        .collect();
    let mut obj = base;
    for p in previous.difference(&cfg_set) {
        if others.contains(p) {
            continue;
        }
        remove_at(&mut obj, p, schema);
        // A list or map left empty by the removal, that nobody sets, goes too.
        let mut parent: &[Pe] = &p[..p.len() - 1];
        while !parent.is_empty() && !others.contains(parent) && !cfg_set.contains(parent) {
            let empty = value_at(&obj, parent, schema).is_some_and(|v| {
                v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(Map::is_empty)
            });
            let has_owned_below = cfg_set
                .iter()
                .chain(others.iter())
                .any(|o| o.starts_with(parent));
            if !empty || has_owned_below {
                break;
            }
            remove_at(&mut obj, parent, schema);
            parent = &parent[..parent.len() - 1];
        }
    }
    let mut cfg_scoped = cfg.clone();
    if let Some(m) = cfg_scoped.as_object_mut() {
        if sub == Some("status") {
            m.retain(|k, _| k == "status" || k == "metadata" || k == "apiVersion" || k == "kind");
        } else if live.is_some() {
            m.remove("status");
        }
    }
    merge(&mut obj, &cfg_scoped, schema.root, schema.defs, true);
    for e in es.iter_mut().filter(|e| !mine(e)) {
        e.set.retain(|p| !conflicting.contains(p));
    }
    es.retain(|e| !mine(e));
    es.push(Entry {
        manager: manager.into(),
        operation: "Apply".into(),
        api_version: api_version.into(),
        subresource: sub.map(str::to_owned),
        time: meta::now_rfc3339(),
        set: cfg_set,
    });
    write_entries(&mut obj, es);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy_schema() -> Schema<'static> {
        let s = builtin_schemas();
        Schema {
            root: s
                .defs
                .get(&s.roots[&super::super::registry::Builtin::Deployment]),
            defs: &s.defs,
        }
    }

    fn deploy(image: &str, replicas: i64) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {"a": "b"}},
               "spec": {"replicas": replicas, "selector": {"matchLabels": {"a": "b"}},
                        "template": {"metadata": {"labels": {"a": "b"}},
                                     "spec": {"containers": [{"name": "c", "image": image,
                                              "ports": [{"containerPort": 80}]}]}}}})
    }

    #[test]
    fn fields_v1_round_trips_with_associative_keys() {
        let set = field_set(&deploy("x", 1), deploy_schema());
        let v1 = to_fields_v1(&set);
        let c = &v1["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"];
        assert_eq!(c["."], json!({}));
        assert!(
            c["f:ports"]["k:{\"containerPort\":80,\"protocol\":\"TCP\"}"].is_object(),
            "{c}"
        );
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn apply_conflicts_with_another_managers_field_unless_forced() {
        let s = deploy_schema();
        let created = apply(None, &deploy("x", 1), "alice", false, "apps/v1", None, s).unwrap();
        let err = apply(
            Some(&created),
            &deploy("x", 3),
            "bob",
            false,
            "apps/v1",
            None,
            s,
        )
        .unwrap_err();
        assert_eq!(err.code, 409);
        assert!(err.message.contains("alice"), "{}", err.message);
        let forced = apply(
            Some(&created),
            &deploy("x", 3),
            "bob",
            true,
            "apps/v1",
            None,
            s,
        )
        .unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        // Same value, different manager: shared, no conflict.
        apply(
            Some(&created),
            &deploy("x", 1),
            "bob",
            false,
            "apps/v1",
            None,
            s,
        )
        .unwrap();
    }

    #[test]
    fn apply_removes_fields_the_manager_stopped_applying() {
        let s = deploy_schema();
        let mut with_env = deploy("x", 1);
        with_env["spec"]["template"]["spec"]["containers"][0]["env"] =
            json!([{"name": "A", "value": "1"}]);
        let live = apply(None, &with_env, "alice", false, "apps/v1", None, s).unwrap();
        let next = apply(
            Some(&live),
            &deploy("y", 1),
            "alice",
            false,
            "apps/v1",
            None,
            s,
        )
        .unwrap();
        let c = &next["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "y");
        assert!(c.get("env").is_none(), "{c}");
    }

    #[test]
    fn updates_take_ownership_of_changed_fields() {
        let s = deploy_schema();
        let live = apply(None, &deploy("x", 1), "alice", false, "apps/v1", None, s).unwrap();
        let mut scaled = live.clone();
        scaled["spec"]["replicas"] = json!(5);
        record_update(&mut scaled, Some(&live), "scaler", "apps/v1", None, s);
        // alice re-applies replicas 1: it now conflicts with the scaler.
        let err = apply(
            Some(&scaled),
            &deploy("x", 1),
            "alice",
            false,
            "apps/v1",
            None,
            s,
        )
        .unwrap_err();
        assert!(err.message.contains("scaler"), "{}", err.message);
    }
}
