//! API errors and their wire form, the `meta.k8s.io/v1` `Status` object, with the codes,
//! reasons, details and causes a real kube-apiserver sends. Every refusal of the server
//! goes through here; nothing here touches the store.

use serde_json::{Value, json};

/// One field-level cause of an `Invalid` (422) or `BadRequest` error.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

impl Cause {
    pub fn invalid(field: impl Into<String>, value: &Value, detail: &str) -> Self {
        Cause {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: format!("Invalid value: {}: {detail}", render_value(value)),
        }
    }
    pub fn required(field: impl Into<String>) -> Self {
        Cause {
            reason: "FieldValueRequired",
            field: field.into(),
            message: "Required value".into(),
        }
    }
    pub fn required_because(field: impl Into<String>, detail: &str) -> Self {
        Cause {
            reason: "FieldValueRequired",
            field: field.into(),
            message: format!("Required value: {detail}"),
        }
    }
    pub fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| format!("\"{s}\"")).collect();
        Cause {
            reason: "FieldValueNotSupported",
            field: field.into(),
            message: format!(
                "Unsupported value: {}: supported values: {}",
                render_value(value),
                list.join(", ")
            ),
        }
    }
    pub fn forbidden(field: impl Into<String>, detail: &str) -> Self {
        Cause {
            reason: "FieldValueForbidden",
            field: field.into(),
            message: format!("Forbidden: {detail}"),
        }
    }
    pub fn duplicate(field: impl Into<String>, value: &Value) -> Self {
        Cause {
            reason: "FieldValueDuplicate",
            field: field.into(),
            message: format!("Duplicate value: {}", render_value(value)),
        }
    }
    pub fn too_many(field: impl Into<String>, got: usize, max: usize) -> Self {
        Cause {
            reason: "FieldValueTooMany",
            field: field.into(),
            message: format!("Too many: {got}: must have at most {max} items"),
        }
    }
    pub fn type_invalid(field: impl Into<String>, value: &Value, detail: &str) -> Self {
        Cause {
            reason: "FieldValueTypeInvalid",
            field: field.into(),
            message: format!("Invalid value: {}: {detail}", render_value(value)),
        }
    }
    /// The `<field>: <message>` line of an Invalid error's message.
    pub fn line(&self) -> String {
        if self.field.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.field, self.message)
        }
    }
}

/// The Go `%#v`-like rendering the real server uses in messages: strings quoted, the rest as JSON.
fn render_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    }
}

/// An error the API answers with. `kind` in details is the plural resource for most errors
/// and the Kind for `Invalid`, as upstream does.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Box<Details>>,
    /// Seconds the client should wait before retrying (`retryAfterSeconds`).
    pub retry_after: Option<u32>,
    /// The Status's `metadata.continue` (an expired list continuation's way on).
    pub list_continue: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Details {
    pub name: String,
    pub group: String,
    pub kind: String,
    pub causes: Vec<Cause>,
}

/// `deployments.apps` or `pods`: how upstream names a resource in messages.
pub fn qualified(plural: &str, group: &str) -> String {
    if group.is_empty() {
        plural.to_owned()
    } else {
        format!("{plural}.{group}")
    }
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after: None,
            list_continue: None,
        }
    }
    pub fn with_continue(mut self, token: String) -> Self {
        self.list_continue = Some(token);
        self
    }
    fn with_details(mut self, name: &str, group: &str, kind: &str) -> Self {
        self.details = Some(Box::new(Details {
            name: name.into(),
            group: group.into(),
            kind: kind.into(),
            causes: vec![],
        }));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }
    pub fn forbidden(plural: &str, group: &str, name: &str, why: &str) -> Self {
        let q = qualified(plural, group);
        Self::new(
            403,
            "Forbidden",
            format!("{q} \"{name}\" is forbidden: {why}"),
        )
        .with_details(name, group, plural)
    }
    /// A request the authorizer refused: `<resource> ["name"] is forbidden: why`, or
    /// `forbidden: why` for a non-resource path (upstream's `NewForbidden`).
    pub fn forbidden_resource(plural: &str, group: &str, name: &str, why: &str) -> Self {
        let q = qualified(plural, group);
        let message = if plural.is_empty() {
            format!("forbidden: {why}")
        } else if name.is_empty() {
            format!("{q} is forbidden: {why}")
        } else {
            format!("{q} \"{name}\" is forbidden: {why}")
        };
        let e = Self::new(403, "Forbidden", message);
        if plural.is_empty() {
            e
        } else {
            e.with_details(name, group, plural)
        }
    }
    pub fn not_found(plural: &str, group: &str, name: &str) -> Self {
        let q = qualified(plural, group);
        Self::new(404, "NotFound", format!("{q} \"{name}\" not found"))
            .with_details(name, group, plural)
    }
    /// A path that names no resource at all.
    pub fn path_not_found() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }
    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }
    pub fn not_acceptable(accept: &str) -> Self {
        Self::new(
            406,
            "NotAcceptable",
            format!(
                "only the following media types are accepted: application/json, application/yaml (asked for {accept})"
            ),
        )
    }
    pub fn already_exists(plural: &str, group: &str, name: &str) -> Self {
        let q = qualified(plural, group);
        Self::new(
            409,
            "AlreadyExists",
            format!("{q} \"{name}\" already exists"),
        )
        .with_details(name, group, plural)
    }
    pub fn conflict(plural: &str, group: &str, name: &str, why: &str) -> Self {
        let q = qualified(plural, group);
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {q} \"{name}\": {why}"),
        )
        .with_details(name, group, plural)
    }
    pub fn stale(plural: &str, group: &str, name: &str) -> Self {
        Self::conflict(
            plural,
            group,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }
    /// A server-side apply conflict: `causes` name the fields and their managers.
    pub fn apply_conflict(message: String, causes: Vec<Cause>) -> Self {
        let mut e = Self::new(409, "Conflict", message);
        e.details = Some(Box::new(Details {
            causes,
            ..Details::default()
        }));
        e
    }
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }
    pub fn unsupported_media_type(got: &str, accepted: &[&str]) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({got}) - accepted media types include: {}",
                accepted.join(", ")
            ),
        )
    }
    /// 422 Invalid: `Kind.group "name" is invalid: field: message, ...`.
    pub fn invalid(kind: &str, group: &str, name: &str, causes: Vec<Cause>) -> Self {
        let q = if group.is_empty() {
            kind.to_owned()
        } else {
            format!("{kind}.{group}")
        };
        let lines: Vec<String> = causes.iter().map(Cause::line).collect();
        let msg = if lines.len() == 1 {
            format!("{q} \"{name}\" is invalid: {}", lines[0])
        } else {
            format!("{q} \"{name}\" is invalid: [{}]", lines.join(", "))
        };
        let mut e = Self::new(422, "Invalid", msg);
        e.details = Some(Box::new(Details {
            name: name.into(),
            group: group.into(),
            kind: kind.into(),
            causes,
        }));
        e
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(504, "Timeout", message)
    }

    /// The `Status` object sent as the response body (and in watch `ERROR` events).
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            let mut dj = serde_json::Map::new();
            if !d.name.is_empty() {
                dj.insert("name".into(), json!(d.name));
            }
            if !d.group.is_empty() {
                dj.insert("group".into(), json!(d.group));
            }
            if !d.kind.is_empty() {
                dj.insert("kind".into(), json!(d.kind));
            }
            if !d.causes.is_empty() {
                let causes: Vec<Value> = d
                    .causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect();
                dj.insert("causes".into(), Value::Array(causes));
            }
            if let Some(r) = self.retry_after {
                dj.insert("retryAfterSeconds".into(), json!(r));
            }
            s["details"] = Value::Object(dj);
        }
        if let Some(t) = &self.list_continue {
            s["metadata"] = json!({ "continue": t });
        }
        if s["message"] == "" {
            s.as_object_mut().map(|m| m.remove("message"));
        }
        s
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_the_qualified_resource() {
        let s = ApiError::not_found("deployments", "apps", "web").to_status();
        assert_eq!(s["code"], 404);
        assert_eq!(s["reason"], "NotFound");
        assert_eq!(s["message"], "deployments.apps \"web\" not found");
        assert_eq!(s["details"]["kind"], "deployments");
    }

    #[test]
    fn invalid_lists_every_cause_with_its_field() {
        let e = ApiError::invalid(
            "Service",
            "",
            "x",
            vec![
                Cause::required("spec.ports"),
                Cause::invalid("metadata.name", &json!("X"), "bad"),
            ],
        );
        let s = e.to_status();
        assert_eq!(s["code"], 422);
        assert_eq!(
            s["message"],
            "Service \"x\" is invalid: [spec.ports: Required value, metadata.name: Invalid value: \"X\": bad]"
        );
        assert_eq!(s["details"]["causes"][1]["field"], "metadata.name");
    }
}
