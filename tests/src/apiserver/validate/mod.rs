//! Semantic validation of objects before they are stored, as the real API server's
//! `ValidateX` functions do it for the kinds Nemesis touches: names, labels, Deployments,
//! Pods, Services, EndpointSlices, CRDs. Returns causes; never changes an object.

mod crd;
mod events;
mod names;
mod network;
mod rbac;
mod workloads;

use serde_json::Value;

pub use names::{label_value_errors, qualified_name_errors};

use super::registry::{Builtin, ResourceType};
use super::status::Cause;

/// Total size limit of annotations, as upstream (256 KiB).
const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// The name rule of a kind.
fn name_errors(rt: &ResourceType, name: &str) -> Vec<String> {
    match rt.builtin {
        Some(Builtin::Namespace) => names::dns1123_label_errors(name),
        Some(Builtin::Service) => names::dns1035_label_errors(name),
        Some(Builtin::Crd) => vec![], // checked against spec.names in crd::validate
        // `system:masters`-style names: any path segment.
        Some(
            Builtin::Role
            | Builtin::ClusterRole
            | Builtin::RoleBinding
            | Builtin::ClusterRoleBinding,
        ) => names::path_segment_errors(name),
        _ => names::dns1123_subdomain_errors(name),
    }
}

fn validate_metadata(rt: &ResourceType, obj: &Value) -> Vec<Cause> {
    let mut causes = vec![];
    let md = &obj["metadata"];
    let name = md["name"].as_str().unwrap_or("");
    if name.is_empty() {
        causes.push(Cause::required_because(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        for e in name_errors(rt, name) {
            causes.push(Cause::invalid("metadata.name", &Value::from(name), &e));
        }
    }
    if let Some(labels) = md["labels"].as_object() {
        for (k, v) in labels {
            for e in names::qualified_name_errors(k) {
                causes.push(Cause::invalid(
                    "metadata.labels",
                    &Value::from(k.as_str()),
                    &e,
                ));
            }
            let v = v.as_str().unwrap_or("");
            for e in names::label_value_errors(v) {
                causes.push(Cause::invalid("metadata.labels", &Value::from(v), &e));
            }
        }
    }
    if let Some(ann) = md["annotations"].as_object() {
        let mut total = 0;
        for (k, v) in ann {
            total += k.len() + v.as_str().map_or(0, str::len);
            for e in names::qualified_name_errors(&k.to_lowercase()) {
                causes.push(Cause::invalid(
                    "metadata.annotations",
                    &Value::from(k.as_str()),
                    &e,
                ));
            }
        }
        if total > MAX_ANNOTATIONS_BYTES {
            causes.push(Cause {
                reason: "FieldValueTooLong",
                field: "metadata.annotations".into(),
                message: format!("Too long: may not be more than {MAX_ANNOTATIONS_BYTES} bytes"),
            });
        }
    }
    causes
}

/// All validation causes for `obj` in its storage form `rt` (created when `old` is
/// `None`, else updated), sent as `served` (Events are checked by the request's version).
pub fn validate(
    rt: &ResourceType,
    served: &ResourceType,
    obj: &Value,
    old: Option<&Value>,
) -> Vec<Cause> {
    let mut causes = validate_metadata(rt, obj);
    match rt.builtin {
        Some(Builtin::CoreEvent) => causes.extend(events::validate(
            obj,
            old,
            served.builtin == Some(Builtin::EventsV1),
        )),
        Some(Builtin::Deployment) => causes.extend(workloads::deployment(obj, old)),
        Some(Builtin::ReplicaSet) => causes.extend(workloads::replica_set(obj, old)),
        Some(Builtin::StatefulSet) => causes.extend(workloads::stateful_set(obj, old)),
        Some(Builtin::Pod) => causes.extend(workloads::pod(obj, old)),
        Some(Builtin::Service) => causes.extend(network::service(obj, old)),
        Some(Builtin::EndpointSlice) => causes.extend(network::endpoint_slice(obj)),
        Some(Builtin::Endpoints) => causes.extend(network::endpoints(obj)),
        Some(Builtin::ConfigMap) => causes.extend(config_map(obj)),
        Some(Builtin::Secret) => causes.extend(secret(obj)),
        Some(Builtin::Crd) => causes.extend(crd::validate(obj, old)),
        Some(Builtin::Role) => causes.extend(rbac::role(obj, true)),
        Some(Builtin::ClusterRole) => causes.extend(rbac::role(obj, false)),
        Some(Builtin::RoleBinding) => causes.extend(rbac::binding(obj, old, true)),
        Some(Builtin::ClusterRoleBinding) => causes.extend(rbac::binding(obj, old, false)),
        _ => {}
    }
    causes
}

fn config_map(obj: &Value) -> Vec<Cause> {
    let mut causes = vec![];
    for field in ["data", "binaryData"] {
        for k in obj[field].as_object().into_iter().flat_map(|m| m.keys()) {
            for e in names::config_key_errors(k) {
                causes.push(Cause::invalid(field, &Value::from(k.as_str()), &e));
            }
        }
    }
    causes
}

fn secret(obj: &Value) -> Vec<Cause> {
    let mut causes = vec![];
    for k in obj["data"].as_object().into_iter().flat_map(|m| m.keys()) {
        for e in names::config_key_errors(k) {
            causes.push(Cause::invalid(
                format!("data[{k}]"),
                &Value::from(k.as_str()),
                &e,
            ));
        }
    }
    causes
}

/// An immutable field: `Invalid value: <new>: field is immutable`.
pub(crate) fn immutable(field: &str, new: &Value, old: &Value) -> Option<Cause> {
    (new != old).then(|| Cause::invalid(field, new, "field is immutable"))
}
