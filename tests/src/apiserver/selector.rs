//! Label and field selectors: parsing the query-string syntax kubectl and kube-rs send,
//! and matching objects against them. Knows which fields each kind can be selected on;
//! never reads the store.

use serde_json::{Map, Value};

use super::registry::{Builtin, ResourceType};
use super::status::ApiError;

#[derive(Debug, Clone, PartialEq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Gt(String, i64),
    Lt(String, i64),
}

/// A parsed `labelSelector`; empty matches everything.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LabelSelector(Vec<LabelReq>);

/// Split on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out
}

fn bad_label(term: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!("unable to parse requirement: {term}: {why}"))
}

fn check_key(term: &str, key: &str) -> Result<String, ApiError> {
    let key = key.trim();
    let errs = super::validate::qualified_name_errors(key);
    if let Some(e) = errs.first() {
        return Err(bad_label(
            term,
            &format!("invalid label key \"{key}\": {e}"),
        ));
    }
    Ok(key.to_owned())
}

fn check_value(term: &str, v: &str) -> Result<String, ApiError> {
    let v = v.trim();
    if let Some(e) = super::validate::label_value_errors(v).first() {
        return Err(bad_label(
            term,
            &format!("invalid label value: \"{v}\": {e}"),
        ));
    }
    Ok(v.to_owned())
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = vec![];
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for raw in split_top(s) {
            let term = raw.trim();
            if term.is_empty() {
                return Err(bad_label(s, "found ',', expected: identifier"));
            }
            if let Some(k) = term.strip_prefix('!') {
                reqs.push(LabelReq::NotExists(check_key(term, k)?));
            } else if let Some(open) = term.find('(') {
                let close = term
                    .rfind(')')
                    .filter(|c| *c > open && term[c + 1..].trim().is_empty())
                    .ok_or_else(|| bad_label(term, "expected ')'"))?;
                let head = term[..open].trim();
                let (key, op) = head
                    .rsplit_once(char::is_whitespace)
                    .ok_or_else(|| bad_label(term, "expected 'in' or 'notin'"))?;
                let values = term[open + 1..close]
                    .split(',')
                    .map(|v| check_value(term, v))
                    .collect::<Result<Vec<_>, _>>()?;
                let key = check_key(term, key)?;
                match op.trim() {
                    "in" => reqs.push(LabelReq::In(key, values)),
                    "notin" => reqs.push(LabelReq::NotIn(key, values)),
                    other => return Err(bad_label(term, &format!("unknown operator '{other}'"))),
                }
            } else if let Some((k, v)) = term.split_once("!=") {
                reqs.push(LabelReq::NotEq(check_key(term, k)?, check_value(term, v)?));
            } else if let Some((k, v)) = term.split_once("==") {
                reqs.push(LabelReq::Eq(check_key(term, k)?, check_value(term, v)?));
            } else if let Some((k, v)) = term.split_once('=') {
                reqs.push(LabelReq::Eq(check_key(term, k)?, check_value(term, v)?));
            } else if let Some((k, v)) = term.split_once('>') {
                let n = v.trim().parse().map_err(|_| {
                    bad_label(
                        term,
                        "for 'Gt', 'Lt' operators, the value must be an integer",
                    )
                })?;
                reqs.push(LabelReq::Gt(check_key(term, k)?, n));
            } else if let Some((k, v)) = term.split_once('<') {
                let n = v.trim().parse().map_err(|_| {
                    bad_label(
                        term,
                        "for 'Gt', 'Lt' operators, the value must be an integer",
                    )
                })?;
                reqs.push(LabelReq::Lt(check_key(term, k)?, n));
            } else {
                reqs.push(LabelReq::Exists(check_key(term, term)?));
            }
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, labels: &Map<String, Value>) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::Eq(k, v) => get(k) == Some(v),
            LabelReq::NotEq(k, v) => get(k) != Some(v),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            LabelReq::Gt(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x > *n),
            LabelReq::Lt(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x < *n),
        })
    }
}

/// Render a `metav1.LabelSelector` (matchLabels + matchExpressions) in query syntax.
pub fn render_label_selector(sel: &Value) -> String {
    let mut parts = vec![];
    if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
        let mut keys: Vec<_> = m.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in keys {
            parts.push(format!("{k}={}", v.as_str().unwrap_or("")));
        }
    }
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap_or("");
        let vals: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        match e["operator"].as_str().unwrap_or("") {
            "In" => parts.push(format!("{key} in ({})", vals.join(","))),
            "NotIn" => parts.push(format!("{key} notin ({})", vals.join(","))),
            "Exists" => parts.push(key.to_owned()),
            "DoesNotExist" => parts.push(format!("!{key}")),
            _ => {}
        }
    }
    parts.join(",")
}

#[derive(Debug, Clone, PartialEq)]
struct FieldReq {
    field: String,
    value: String,
    negate: bool,
}

/// A parsed `fieldSelector`; empty matches everything.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldSelector(Vec<FieldReq>);

/// Split on an unescaped `sep`, undoing `\` escapes in the parts.
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            cur.push(c);
            if let Some(n) = chars.next() {
                cur.push(n);
            }
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = vec![];
        if s.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for term in split_escaped(s, ',') {
            let (field, value, negate) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, false)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                )));
            };
            reqs.push(FieldReq {
                field: field.trim().to_owned(),
                value: unescape(value.trim()),
                negate,
            });
        }
        Ok(FieldSelector(reqs))
    }

    /// Refuse fields this kind cannot be selected on, as the real server does.
    pub fn check_supported(&self, rt: &ResourceType) -> Result<(), ApiError> {
        for r in &self.0 {
            let crd_field = rt
                .crd
                .as_ref()
                .is_some_and(|c| c.selectable.contains(&r.field));
            if !crd_field && !supported_fields(rt).contains(&r.field.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {}",
                    r.field
                )));
            }
        }
        Ok(())
    }

    pub fn matches(&self, rt: &ResourceType, obj: &Value) -> bool {
        self.0.iter().all(|r| {
            let v = field_value(rt, obj, &r.field);
            (v == r.value) != r.negate
        })
    }
}

fn supported_fields(rt: &ResourceType) -> Vec<&'static str> {
    let mut f = vec!["metadata.name", "metadata.namespace"];
    match rt.builtin {
        Some(Builtin::Pod) => f.extend([
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ]),
        Some(Builtin::CoreEvent) => f.extend([
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ]),
        Some(Builtin::EventsV1) => f.extend([
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
            "reason",
            "reportingController",
            "type",
        ]),
        Some(Builtin::Secret) => f.push("type"),
        Some(Builtin::Namespace) => f.push("status.phase"),
        Some(Builtin::Node) => f.push("spec.unschedulable"),
        Some(Builtin::ReplicaSet) => f.push("status.replicas"),
        _ => {}
    }
    f
}

/// The string value of a selectable field (empty when absent, as upstream).
fn field_value(rt: &ResourceType, obj: &Value, field: &str) -> String {
    let path = match (rt.builtin, field) {
        (Some(Builtin::CoreEvent), "source") => "source.component",
        _ => field,
    };
    let mut cur = obj;
    for p in path.split('.') {
        match cur.get(p) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn label_selector_supports_every_operator() {
        let l = labels(json!({"app": "web", "tier": "front", "n": "5"}));
        for (sel, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, api)", true),
            ("app notin (web)", false),
            ("missing notin (web)", true),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("app=web,tier=back", false),
            ("n>4", true),
            ("n<4", false),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&l),
                want,
                "{sel}"
            );
        }
    }

    #[test]
    fn label_selector_rejects_bad_syntax() {
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a,,b").is_err());
        assert!(LabelSelector::parse("bad key=x").is_err());
    }

    #[test]
    fn field_selector_matches_and_rejects_unknown_fields() {
        let rt = super::super::registry::builtins()
            .into_iter()
            .find(|t| t.kind == "Pod")
            .unwrap();
        let pod =
            json!({"metadata": {"name": "a", "namespace": "ns"}, "status": {"phase": "Running"}});
        let fs = FieldSelector::parse("metadata.name=a,status.phase!=Pending").unwrap();
        fs.check_supported(&rt).unwrap();
        assert!(fs.matches(&rt, &pod));
        let bad = FieldSelector::parse("spec.containers=x").unwrap();
        assert_eq!(bad.check_supported(&rt).unwrap_err().code, 400);
    }

    #[test]
    fn renders_label_selector_objects() {
        let s = json!({"matchLabels": {"b": "2", "a": "1"},
                       "matchExpressions": [{"key": "c", "operator": "In", "values": ["x", "y"]}]});
        assert_eq!(render_label_selector(&s), "a=1,b=2,c in (x,y)");
    }
}
