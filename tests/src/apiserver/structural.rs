//! Checking an object against an OpenAPI v3 structural schema (a CRD's, or a built-in's
//! from `schemas`): types, required fields, enums, bounds, patterns, pruning of unknown
//! fields and defaulting, as the real server does for custom resources. Only ever edits
//! the object it is handed.

use serde_json::{Map, Value};

use super::schemas::resolve;
use super::status::Cause;

#[derive(Debug, Default)]
pub struct Outcome {
    /// Type, required, enum and bound violations.
    pub causes: Vec<Cause>,
    /// Paths of fields the schema does not declare (removed from the object).
    pub unknown: Vec<String>,
}

pub struct Options {
    /// Fill in `default`s of absent properties (CRDs).
    pub defaults: bool,
    /// The object root: `apiVersion`, `kind` and `metadata` are always known there.
    pub root_meta_known: bool,
    /// An object schema with neither `properties` nor `additionalProperties` holds any
    /// fields (built-in Go types such as FieldsV1 and RawExtension); for CRDs such an
    /// object prunes everything, as upstream.
    pub opaque_empty_objects: bool,
}

struct Walker<'a> {
    defs: &'a Map<String, Value>,
    opts: &'a Options,
    out: Outcome,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl Walker<'_> {
    fn type_error(&mut self, path: &str, v: &Value, want: &str) {
        let got = type_name(v);
        let shown = if path.is_empty() {
            "body".to_owned()
        } else {
            path.to_owned()
        };
        self.out.causes.push(Cause::type_invalid(
            path,
            &Value::from(got),
            &format!("{shown} in body must be of type {want}: \"{got}\""),
        ));
    }

    fn walk(&mut self, schema: &Value, v: &mut Value, path: &str, root: bool) {
        let s = resolve(schema, self.defs);
        if s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
            if !(v.is_string() || v.as_i64().is_some() || v.as_u64().is_some() || v.is_number()) {
                self.type_error(path, v, "int-or-string");
            }
            return;
        }
        let ty =
            s.get("type")
                .and_then(Value::as_str)
                .unwrap_or(if s.get("properties").is_some() {
                    "object"
                } else {
                    ""
                });
        match ty {
            "object" => self.object(s, v, path, root),
            "array" => {
                let Some(arr) = v.as_array_mut() else {
                    return self.type_error(path, v, "array");
                };
                let n = arr.len();
                if let Some(item) = s.get("items") {
                    for (i, child) in arr.iter_mut().enumerate() {
                        self.walk(item, child, &format!("{path}[{i}]"), false);
                    }
                }
                if let Some(min) = s.get("minItems").and_then(Value::as_u64)
                    && (n as u64) < min
                {
                    self.out.causes.push(Cause::invalid(
                        path,
                        &Value::from(n),
                        &format!("{path} in body should have at least {min} items"),
                    ));
                }
                if let Some(max) = s.get("maxItems").and_then(Value::as_u64)
                    && (n as u64) > max
                {
                    self.out.causes.push(Cause::too_many(path, n, max as usize));
                }
            }
            "string" => {
                let Some(st) = v.as_str() else {
                    return self.type_error(path, v, "string");
                };
                let len = st.chars().count() as u64;
                if let Some(min) = s.get("minLength").and_then(Value::as_u64)
                    && len < min
                {
                    self.out.causes.push(Cause::invalid(
                        path,
                        v,
                        &format!("{path} in body should be at least {min} chars long"),
                    ));
                }
                if let Some(max) = s.get("maxLength").and_then(Value::as_u64)
                    && len > max
                {
                    self.out.causes.push(Cause {
                        reason: "FieldValueTooLong",
                        field: path.into(),
                        message: format!("Too long: may not be more than {max} bytes"),
                    });
                }
                if let Some(p) = s.get("pattern").and_then(Value::as_str) {
                    match regex::Regex::new(p) {
                        Ok(re) if re.is_match(st) => {}
                        Ok(_) => self.out.causes.push(Cause::invalid(
                            path,
                            v,
                            &format!("{path} in body should match '{p}'"),
                        )),
                        Err(e) => self.out.causes.push(Cause::invalid(
                            path,
                            v,
                            &format!("the schema's pattern '{p}' does not compile: {e}"),
                        )),
                    }
                }
                if s.get("format").and_then(Value::as_str) == Some("byte") {
                    use base64::Engine;
                    if base64::engine::general_purpose::STANDARD
                        .decode(st)
                        .is_err()
                    {
                        self.out
                            .causes
                            .push(Cause::invalid(path, v, "illegal base64 data"));
                    }
                }
                if s.get("format").and_then(Value::as_str) == Some("date-time")
                    && chrono::DateTime::parse_from_rfc3339(st).is_err()
                {
                    self.out.causes.push(Cause::invalid(
                        path,
                        v,
                        &format!("{path} in body must be of type date-time: \"{st}\""),
                    ));
                }
            }
            "integer" => {
                if v.as_i64().is_none() && v.as_u64().is_none() {
                    return self.type_error(path, v, "integer");
                }
                if s.get("format").and_then(Value::as_str) == Some("int32")
                    && v.as_i64().is_none_or(|n| i32::try_from(n).is_err())
                {
                    self.out.causes.push(Cause::invalid(
                        path,
                        v,
                        &format!("{path} in body must be of type int32: \"{v}\""),
                    ));
                }
                self.bounds(s, v, path);
            }
            "number" => {
                if !v.is_number() {
                    return self.type_error(path, v, "number");
                }
                self.bounds(s, v, path);
            }
            "boolean" if !v.is_boolean() => self.type_error(path, v, "boolean"),
            _ => {}
        }
        self.check_enum(s, v, path);
    }

    fn check_enum(&mut self, s: &Value, v: &Value, path: &str) {
        if let Some(allowed) = s.get("enum").and_then(Value::as_array)
            && !allowed.contains(v)
        {
            let names: Vec<String> = allowed
                .iter()
                .map(|a| {
                    a.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| a.to_string())
                })
                .collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            self.out.causes.push(Cause::not_supported(path, v, &refs));
        }
    }

    fn bounds(&mut self, s: &Value, v: &Value, path: &str) {
        let x = v.as_f64().unwrap_or(0.0);
        if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
            let excl = s.get("exclusiveMinimum") == Some(&Value::Bool(true));
            if x < min || (excl && x == min) {
                let op = if excl {
                    "greater than"
                } else {
                    "greater than or equal to"
                };
                self.out.causes.push(Cause::invalid(
                    path,
                    v,
                    &format!("{path} in body should be {op} {min}"),
                ));
            }
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
            let excl = s.get("exclusiveMaximum") == Some(&Value::Bool(true));
            if x > max || (excl && x == max) {
                let op = if excl {
                    "less than"
                } else {
                    "less than or equal to"
                };
                self.out.causes.push(Cause::invalid(
                    path,
                    v,
                    &format!("{path} in body should be {op} {max}"),
                ));
            }
        }
    }

    fn object(&mut self, s: &Value, v: &mut Value, path: &str, root: bool) {
        let Some(map) = v.as_object_mut() else {
            return self.type_error(path, v, "object");
        };
        let props = s.get("properties").and_then(Value::as_object);
        let additional = s.get("additionalProperties");
        let preserve = s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
            || (self.opts.opaque_empty_objects && props.is_none() && additional.is_none());
        let keys: Vec<String> = map.keys().cloned().collect();
        for k in keys {
            let p = join(path, &k);
            if let Some(ps) = props.and_then(|p| p.get(&k)) {
                let resolved = resolve(ps, self.defs);
                let nullable = resolved.get("nullable") == Some(&Value::Bool(true));
                if map[&k].is_null() {
                    // A JSON null in a non-nullable field means "unset", as Go decodes it.
                    // A nullable one keeps it, and upstream still checks it against an
                    // `enum` (`nullable` skips only the type check).
                    if nullable {
                        self.check_enum(resolved, &Value::Null, &p);
                    } else {
                        map.remove(&k);
                    }
                    continue;
                }
                self.walk(ps, map.get_mut(&k).expect("key listed"), &p, false);
            } else if root
                && self.opts.root_meta_known
                && ["apiVersion", "kind", "metadata"].contains(&k.as_str())
            {
                continue;
            } else if let Some(a) = additional.filter(|a| a.is_object()) {
                if map[&k].is_null() {
                    continue;
                }
                self.walk(a, map.get_mut(&k).expect("key listed"), &p, false);
            } else if additional == Some(&Value::Bool(true)) || preserve {
                continue;
            } else {
                self.out.unknown.push(p);
                map.remove(&k);
            }
        }
        if self.opts.defaults
            && let Some(props) = props
        {
            for (k, ps) in props {
                let ps_res = resolve(ps, self.defs);
                if !map.contains_key(k)
                    && let Some(d) = ps_res.get("default")
                {
                    let mut d = d.clone();
                    self.walk(ps, &mut d, &join(path, k), false);
                    map.insert(k.clone(), d);
                }
            }
        }
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(r) = r.as_str()
                && !map.contains_key(r)
            {
                self.out.causes.push(Cause::required(join(path, r)));
            }
        }
    }
}

/// Check `obj` against `schema`; unknown fields are removed and reported.
pub fn check(
    schema: &Value,
    defs: &Map<String, Value>,
    obj: &mut Value,
    opts: &Options,
) -> Outcome {
    let mut w = Walker {
        defs,
        opts,
        out: Outcome::default(),
    };
    w.walk(schema, obj, "", true);
    w.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn crd_opts() -> Options {
        Options {
            defaults: true,
            root_meta_known: true,
            opaque_empty_objects: false,
        }
    }

    #[test]
    fn types_required_enum_and_bounds_are_checked() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object",
            "required": ["target"],
            "properties": {
                "target": {"type": "string"},
                "replicas": {"type": "integer", "minimum": 0},
                "mode": {"type": "string", "enum": ["a", "b"]}}}}});
        let mut obj = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n"},
                             "spec": {"replicas": -1, "mode": "c"}});
        let out = check(&schema, &Map::new(), &mut obj, &crd_opts());
        let fields: Vec<_> = out.causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["spec.mode", "spec.replicas", "spec.target"]);
        let mut obj = json!({"spec": {"target": 5}});
        let out = check(&schema, &Map::new(), &mut obj, &crd_opts());
        assert!(out.causes[0].message.contains("must be of type string"));
    }

    #[test]
    fn null_is_unset_unless_nullable_and_a_nullable_enum_still_needs_null_listed() {
        let schema = json!({"type": "object", "properties": {
            "plain": {"type": "string", "enum": ["Value", "AverageValue"]},
            "nullable": {"type": "string", "nullable": true, "enum": ["Value", "AverageValue"]},
            "listed": {"type": "string", "nullable": true, "enum": ["Value", null]},
            "free": {"type": "string", "nullable": true}}});
        let mut obj = json!({"plain": null, "nullable": null, "listed": null, "free": null});
        let out = check(&schema, &Map::new(), &mut obj, &crd_opts());
        let causes: Vec<_> = out
            .causes
            .iter()
            .map(|c| (c.field.as_str(), c.message.as_str()))
            .collect();
        // The message a kube-apiserver v1.36 gave for `targetType: null`.
        assert_eq!(
            causes,
            [(
                "nullable",
                "Unsupported value: null: supported values: \"Value\", \"AverageValue\""
            )]
        );
        assert_eq!(obj, json!({"nullable": null, "listed": null, "free": null}));
    }

    #[test]
    fn int32_and_date_time_formats_are_checked() {
        let schema = json!({"type": "object", "properties": {
            "n": {"type": "integer", "format": "int32"},
            "t": {"type": "string", "format": "date-time"}}});
        let mut ok = json!({"n": 5, "t": "2025-01-01T00:00:00Z"});
        assert!(
            check(&schema, &Map::new(), &mut ok, &crd_opts())
                .causes
                .is_empty()
        );
        let mut bad = json!({"n": 4_294_967_296u64, "t": "yesterday"});
        let fields: Vec<_> = check(&schema, &Map::new(), &mut bad, &crd_opts())
            .causes
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(fields, ["n", "t"]);
    }

    #[test]
    fn unknown_fields_are_pruned_unless_preserved() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {"a": {"type": "string"}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}});
        let mut obj = json!({"spec": {"a": "x", "b": 1}, "free": {"anything": [1]}, "extra": true});
        let out = check(&schema, &Map::new(), &mut obj, &crd_opts());
        assert_eq!(out.unknown, ["extra", "spec.b"]);
        assert_eq!(obj, json!({"spec": {"a": "x"}, "free": {"anything": [1]}}));
    }

    #[test]
    fn defaults_fill_absent_properties() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object",
            "properties": {"idle": {"type": "string", "default": "10m"}}}}});
        let mut obj = json!({"spec": {}});
        check(&schema, &Map::new(), &mut obj, &crd_opts());
        assert_eq!(obj["spec"]["idle"], "10m");
    }

    #[test]
    fn builtin_schemas_flag_unknown_deployment_fields() {
        let s = super::super::schemas::builtin_schemas();
        let root = &s.defs[&s.roots[&super::super::registry::Builtin::Deployment]];
        let mut obj = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"replicaz": 1, "replicas": 2, "selector": {"matchLabels": {"a": "b"}},
                     "template": {"spec": {"containers": [{"name": "c", "image": "i", "imagez": 1}]}}}});
        let out = check(
            root,
            &s.defs,
            &mut obj,
            &Options {
                defaults: false,
                root_meta_known: true,
                opaque_empty_objects: true,
            },
        );
        assert_eq!(
            out.unknown,
            ["spec.replicaz", "spec.template.spec.containers[0].imagez"]
        );
        assert!(out.causes.is_empty(), "{:?}", out.causes);
    }
}
