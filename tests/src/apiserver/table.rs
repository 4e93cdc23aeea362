//! Server-side printing: `meta.k8s.io/v1` Table responses (what `kubectl get` asks for),
//! with kubectl's usual columns for built-in kinds and a CRD's additionalPrinterColumns
//! (a small JSONPath subset) for custom resources. Read-only views of objects.

use serde_json::{Value, json};

use super::meta::{age_secs, human_duration};
use super::registry::{Builtin, ResourceType};
use super::selector::render_label_selector;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncludeObject {
    None,
    #[default]
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "Metadata" => Some(IncludeObject::Metadata),
            "None" => Some(IncludeObject::None),
            "Object" => Some(IncludeObject::Object),
            _ => None,
        }
    }
}

type Cell = fn(&Value) -> Value;

struct Column {
    name: &'static str,
    ty: &'static str,
    format: &'static str,
    priority: u8,
    cell: Cell,
}

const fn col(name: &'static str, priority: u8, cell: Cell) -> Column {
    Column {
        name,
        ty: "string",
        format: "",
        priority,
        cell,
    }
}

const fn int_col(name: &'static str, priority: u8, cell: Cell) -> Column {
    Column {
        name,
        ty: "integer",
        format: "",
        priority,
        cell,
    }
}

fn name_cell(o: &Value) -> Value {
    o["metadata"]["name"].clone()
}

fn age_cell(o: &Value) -> Value {
    let ts = o["metadata"]["creationTimestamp"].as_str().unwrap_or("");
    json!(
        age_secs(ts)
            .map(human_duration)
            .unwrap_or_else(|| "<unknown>".into())
    )
}

fn int_at(o: &Value, p: &str) -> i64 {
    o.pointer(p).and_then(Value::as_i64).unwrap_or(0)
}

fn str_or(o: &Value, p: &str, dflt: &str) -> Value {
    json!(
        o.pointer(p)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(dflt)
    )
}

fn containers(o: &Value, p: &str, field: &str) -> Value {
    let v: Vec<&str> = o
        .pointer(p)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c[field].as_str())
        .collect();
    json!(v.join(","))
}

fn pod_ready(o: &Value) -> Value {
    let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
    let ready = o["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["ready"] == true)
        .count();
    json!(format!("{ready}/{total}"))
}

fn pod_status(o: &Value) -> Value {
    if !o["metadata"]["deletionTimestamp"].is_null() {
        return json!("Terminating");
    }
    for cs in o["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(r) = cs["state"]["waiting"]["reason"].as_str() {
            return json!(r);
        }
        if let Some(r) = cs["state"]["terminated"]["reason"].as_str() {
            return json!(r);
        }
    }
    str_or(
        o,
        "/status/reason",
        o["status"]["phase"].as_str().unwrap_or("Unknown"),
    )
}

fn pod_restarts(o: &Value) -> Value {
    let n: i64 = o["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["restartCount"].as_i64().unwrap_or(0))
        .sum();
    json!(n)
}

fn svc_ports(o: &Value) -> Value {
    let ports: Vec<String> = o["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
        .collect();
    json!(if ports.is_empty() {
        "<none>".to_owned()
    } else {
        ports.join(",")
    })
}

fn svc_selector(o: &Value) -> Value {
    let mut pairs: Vec<String> = o["spec"]["selector"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    pairs.sort();
    json!(if pairs.is_empty() {
        "<none>".to_owned()
    } else {
        pairs.join(",")
    })
}

fn slice_ports(o: &Value) -> Value {
    let ports: Vec<String> = o["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["port"].as_i64().map(|n| n.to_string()))
        .collect();
    json!(if ports.is_empty() {
        "<unset>".to_owned()
    } else {
        ports.join(",")
    })
}

fn list_addresses(addrs: Vec<String>) -> Value {
    if addrs.is_empty() {
        return json!("<none>");
    }
    let shown = addrs.iter().take(3).cloned().collect::<Vec<_>>().join(",");
    if addrs.len() > 3 {
        json!(format!("{shown} + {} more...", addrs.len() - 3))
    } else {
        json!(shown)
    }
}

fn slice_endpoints(o: &Value) -> Value {
    let addrs = o["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    list_addresses(addrs)
}

fn endpoints_cell(o: &Value) -> Value {
    let mut addrs = vec![];
    for s in o["subsets"].as_array().into_iter().flatten() {
        for a in s["addresses"].as_array().into_iter().flatten() {
            for p in s["ports"].as_array().into_iter().flatten() {
                addrs.push(format!("{}:{}", a["ip"].as_str().unwrap_or(""), p["port"]));
            }
        }
    }
    list_addresses(addrs)
}

fn node_status(o: &Value) -> Value {
    let ready = o["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready");
    let mut s = match ready.and_then(|c| c["status"].as_str()) {
        Some("True") => "Ready".to_owned(),
        Some(_) => "NotReady".to_owned(),
        None => "Unknown".to_owned(),
    };
    if o["spec"]["unschedulable"] == true {
        s.push_str(",SchedulingDisabled");
    }
    json!(s)
}

fn node_address(o: &Value, ty: &str) -> Value {
    let a = o["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["type"] == ty);
    json!(a.and_then(|a| a["address"].as_str()).unwrap_or("<none>"))
}

fn count(o: &Value, field: &str) -> Value {
    let n = o[field].as_object().map_or(0, |m| m.len())
        + if field == "data" {
            o["binaryData"].as_object().map_or(0, |m| m.len())
        } else {
            0
        };
    json!(n)
}

fn event_object(o: &Value) -> Value {
    let io = &o["involvedObject"];
    json!(format!(
        "{}/{}",
        io["kind"].as_str().unwrap_or("").to_lowercase(),
        io["name"].as_str().unwrap_or("")
    ))
}

/// As upstream's `printEvent`: a series' last observation first (an events.k8s.io repeat
/// only moves that), then `lastTimestamp`, then when it first happened.
fn event_last_seen(o: &Value) -> Value {
    let ts = o["series"]["lastObservedTime"]
        .as_str()
        .or_else(|| o["lastTimestamp"].as_str())
        .or_else(|| o["eventTime"].as_str())
        .or_else(|| o["metadata"]["creationTimestamp"].as_str())
        .unwrap_or("");
    json!(
        age_secs(ts)
            .map(human_duration)
            .unwrap_or_else(|| "<unknown>".into())
    )
}

fn columns(b: Option<Builtin>) -> Vec<Column> {
    let name = Column {
        name: "Name",
        ty: "string",
        format: "name",
        priority: 0,
        cell: name_cell,
    };
    let age = col("Age", 0, age_cell);
    match b {
        Some(Builtin::Pod) => vec![
            name,
            col("Ready", 0, pod_ready),
            col("Status", 0, pod_status),
            int_col("Restarts", 0, pod_restarts),
            age,
            col("IP", 1, |o| str_or(o, "/status/podIP", "<none>")),
            col("Node", 1, |o| str_or(o, "/spec/nodeName", "<none>")),
            col("Nominated Node", 1, |o| {
                str_or(o, "/status/nominatedNodeName", "<none>")
            }),
            col("Readiness Gates", 1, |_| json!("<none>")),
        ],
        Some(Builtin::Deployment) => vec![
            name,
            col("Ready", 0, |o| {
                json!(format!(
                    "{}/{}",
                    int_at(o, "/status/readyReplicas"),
                    int_at(o, "/spec/replicas")
                ))
            }),
            int_col("Up-to-date", 0, |o| {
                json!(int_at(o, "/status/updatedReplicas"))
            }),
            int_col("Available", 0, |o| {
                json!(int_at(o, "/status/availableReplicas"))
            }),
            age,
            col("Containers", 1, |o| {
                containers(o, "/spec/template/spec/containers", "name")
            }),
            col("Images", 1, |o| {
                containers(o, "/spec/template/spec/containers", "image")
            }),
            col("Selector", 1, |o| {
                json!(render_label_selector(&o["spec"]["selector"]))
            }),
        ],
        Some(Builtin::ReplicaSet) => vec![
            name,
            int_col("Desired", 0, |o| json!(int_at(o, "/spec/replicas"))),
            int_col("Current", 0, |o| json!(int_at(o, "/status/replicas"))),
            int_col("Ready", 0, |o| json!(int_at(o, "/status/readyReplicas"))),
            age,
            col("Containers", 1, |o| {
                containers(o, "/spec/template/spec/containers", "name")
            }),
            col("Images", 1, |o| {
                containers(o, "/spec/template/spec/containers", "image")
            }),
            col("Selector", 1, |o| {
                json!(render_label_selector(&o["spec"]["selector"]))
            }),
        ],
        Some(Builtin::Service) => vec![
            name,
            col("Type", 0, |o| str_or(o, "/spec/type", "ClusterIP")),
            col("Cluster-IP", 0, |o| str_or(o, "/spec/clusterIP", "<none>")),
            col("External-IP", 0, |_| json!("<none>")),
            col("Port(s)", 0, svc_ports),
            age,
            col("Selector", 1, svc_selector),
        ],
        Some(Builtin::EndpointSlice) => vec![
            name,
            col("AddressType", 0, |o| str_or(o, "/addressType", "")),
            col("Ports", 0, slice_ports),
            col("Endpoints", 0, slice_endpoints),
            age,
        ],
        Some(Builtin::Endpoints) => vec![name, col("Endpoints", 0, endpoints_cell), age],
        Some(Builtin::Namespace) => vec![
            name,
            col("Status", 0, |o| str_or(o, "/status/phase", "Active")),
            age,
        ],
        Some(Builtin::Node) => vec![
            name,
            col("Status", 0, node_status),
            col("Roles", 0, |_| json!("<none>")),
            age,
            col("Version", 0, |o| {
                str_or(o, "/status/nodeInfo/kubeletVersion", "")
            }),
            col("Internal-IP", 1, |o| node_address(o, "InternalIP")),
            col("External-IP", 1, |o| node_address(o, "ExternalIP")),
            col("OS-Image", 1, |o| {
                str_or(o, "/status/nodeInfo/osImage", "<unknown>")
            }),
            col("Kernel-Version", 1, |o| {
                str_or(o, "/status/nodeInfo/kernelVersion", "<unknown>")
            }),
            col("Container-Runtime", 1, |o| {
                str_or(o, "/status/nodeInfo/containerRuntimeVersion", "<unknown>")
            }),
        ],
        Some(Builtin::ConfigMap) => vec![name, int_col("Data", 0, |o| count(o, "data")), age],
        Some(Builtin::Secret) => vec![
            name,
            col("Type", 0, |o| str_or(o, "/type", "Opaque")),
            int_col("Data", 0, |o| count(o, "data")),
            age,
        ],
        Some(Builtin::Lease) => vec![
            name,
            col("Holder", 0, |o| str_or(o, "/spec/holderIdentity", "")),
            age,
        ],
        Some(Builtin::CoreEvent | Builtin::EventsV1) => vec![
            col("Last Seen", 0, event_last_seen),
            col("Type", 0, |o| str_or(o, "/type", "")),
            col("Reason", 0, |o| str_or(o, "/reason", "")),
            col("Object", 0, event_object),
            col("Message", 0, |o| str_or(o, "/message", "")),
            Column {
                name: "Name",
                ty: "string",
                format: "name",
                priority: 1,
                cell: name_cell,
            },
        ],
        Some(Builtin::Crd) => vec![
            name,
            Column {
                name: "Created At",
                ty: "date",
                format: "",
                priority: 0,
                cell: |o| o["metadata"]["creationTimestamp"].clone(),
            },
        ],
        Some(Builtin::StatefulSet) => vec![
            name,
            col("Ready", 0, |o| {
                json!(format!(
                    "{}/{}",
                    int_at(o, "/status/readyReplicas"),
                    int_at(o, "/spec/replicas")
                ))
            }),
            age,
            col("Containers", 1, |o| {
                containers(o, "/spec/template/spec/containers", "name")
            }),
            col("Images", 1, |o| {
                containers(o, "/spec/template/spec/containers", "image")
            }),
        ],
        Some(Builtin::HorizontalPodAutoscaler) => vec![
            name,
            col("Reference", 0, |o| {
                json!(format!(
                    "{}/{}",
                    o["spec"]["scaleTargetRef"]["kind"].as_str().unwrap_or(""),
                    o["spec"]["scaleTargetRef"]["name"].as_str().unwrap_or("")
                ))
            }),
            col("Targets", 0, |o| {
                json!(match o["spec"]["metrics"].as_array().map_or(0, Vec::len) {
                    0 => "<none>".to_string(),
                    n => format!("{n} metric(s)"),
                })
            }),
            int_col("MinPods", 0, |o| {
                json!(o["spec"]["minReplicas"].as_i64().unwrap_or(1))
            }),
            int_col("MaxPods", 0, |o| json!(int_at(o, "/spec/maxReplicas"))),
            int_col("Replicas", 0, |o| {
                json!(int_at(o, "/status/currentReplicas"))
            }),
            age,
        ],
        Some(Builtin::ServiceAccount) => vec![
            name,
            int_col("Secrets", 0, |o| {
                json!(o["secrets"].as_array().map_or(0, Vec::len))
            }),
            age,
        ],
        Some(Builtin::Role | Builtin::ClusterRole) => vec![
            name,
            Column {
                name: "Created At",
                ty: "date",
                format: "",
                priority: 0,
                cell: |o| o["metadata"]["creationTimestamp"].clone(),
            },
        ],
        Some(Builtin::RoleBinding | Builtin::ClusterRoleBinding) => vec![
            name,
            col("Role", 0, |o| {
                json!(format!(
                    "{}/{}",
                    o["roleRef"]["kind"].as_str().unwrap_or(""),
                    o["roleRef"]["name"].as_str().unwrap_or("")
                ))
            }),
            age,
            col("Users", 1, |o| subjects(o, "User")),
            col("Groups", 1, |o| subjects(o, "Group")),
            col("ServiceAccounts", 1, |o| subjects(o, "ServiceAccount")),
        ],
        _ => vec![name, age],
    }
}

/// A binding's subjects of one kind, as kubectl prints them (`ns/name` for accounts).
fn subjects(o: &Value, kind: &str) -> Value {
    let names: Vec<String> = o["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["kind"] == kind)
        .map(|s| {
            let name = s["name"].as_str().unwrap_or("");
            match s["namespace"].as_str().filter(|n| !n.is_empty()) {
                Some(ns) if kind == "ServiceAccount" => format!("{ns}/{name}"),
                _ => name.to_owned(),
            }
        })
        .collect();
    json!(names.join(", "))
}

/// Evaluate the JSONPath subset printer columns use: `.a.b`, `.a[0].b`, `.a[*].b`,
/// `.a[?(@.k=="v")].b`. Several matches are joined with commas, as kubectl does.
pub fn json_path(obj: &Value, path: &str) -> Vec<Value> {
    let mut cur = vec![obj.clone()];
    let mut rest = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('$');
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let key = &r[..end];
            cur = cur.iter().filter_map(|v| v.get(key).cloned()).collect();
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else {
                return vec![];
            };
            let sel = &r[..end];
            rest = &r[end + 1..];
            let arrays: Vec<Vec<Value>> =
                cur.iter().filter_map(|v| v.as_array().cloned()).collect();
            cur = if sel == "*" {
                arrays.into_iter().flatten().collect()
            } else if let Ok(i) = sel.parse::<usize>() {
                arrays
                    .into_iter()
                    .filter_map(|a| a.get(i).cloned())
                    .collect()
            } else if let Some(f) = sel.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let Some((k, v)) = f.split_once("==") else {
                    return vec![];
                };
                let v = v.trim().trim_matches('"').trim_matches('\'');
                let k = k.trim();
                arrays
                    .into_iter()
                    .flatten()
                    .filter(|item| {
                        item.get(k).is_some_and(|x| {
                            x.as_str().map_or_else(|| x.to_string(), str::to_owned) == v
                        })
                    })
                    .collect()
            } else {
                return vec![];
            };
        } else {
            return vec![];
        }
    }
    cur
}

fn crd_cell(obj: &Value, path: &str, ty: &str) -> Value {
    let vals = json_path(obj, path);
    match vals.as_slice() {
        [] => Value::Null,
        [one] if ty == "date" => json!(
            one.as_str()
                .and_then(age_secs)
                .map(human_duration)
                .unwrap_or_default()
        ),
        [one] => one.clone(),
        many => json!(
            many.iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

fn row_object(rt: &ResourceType, obj: &Value, include: IncludeObject) -> Option<Value> {
    match include {
        IncludeObject::None => None,
        IncludeObject::Object => Some(obj.clone()),
        IncludeObject::Metadata => {
            let _ = rt;
            Some(
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}),
            )
        }
    }
}

/// A Table of `objs` (already in the served version) of type `rt`.
pub fn table(
    rt: &ResourceType,
    objs: &[Value],
    rv: &str,
    include: IncludeObject,
    api_version: &str,
) -> Value {
    let (defs, rows): (Vec<Value>, Vec<Value>) = if let Some(crd) =
        rt.crd.as_ref().filter(|c| !c.printer_columns.is_empty())
    {
        let mut defs = vec![
            json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
        ];
        for c in &crd.printer_columns {
            defs.push(json!({
                "name": c["name"], "type": c["type"], "format": c["format"].as_str().unwrap_or(""),
                "description": c["description"].as_str().unwrap_or(""), "priority": c["priority"].as_i64().unwrap_or(0),
            }));
        }
        let rows = objs
            .iter()
            .map(|o| {
                let mut cells = vec![o["metadata"]["name"].clone()];
                for c in &crd.printer_columns {
                    cells.push(crd_cell(
                        o,
                        c["jsonPath"].as_str().unwrap_or(""),
                        c["type"].as_str().unwrap_or("string"),
                    ));
                }
                cells
            })
            .map(|cells| json!({"cells": cells}))
            .collect();
        (defs, rows)
    } else {
        let cols = columns(rt.builtin);
        let defs = cols
            .iter()
            .map(|c| json!({"name": c.name, "type": c.ty, "format": c.format, "description": "", "priority": c.priority}))
            .collect();
        let rows = objs
            .iter()
            .map(|o| json!({"cells": cols.iter().map(|c| (c.cell)(o)).collect::<Vec<_>>()}))
            .collect();
        (defs, rows)
    };
    let rows: Vec<Value> = rows
        .into_iter()
        .zip(objs)
        .map(|(mut r, o)| {
            if let Some(obj) = row_object(rt, o, include) {
                r["object"] = obj;
            }
            r
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": api_version,
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": defs,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_path_subset() {
        let o = json!({"status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]},
                       "spec": {"l": [1, 2]}});
        assert_eq!(
            json_path(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            vec![json!("True")]
        );
        assert_eq!(json_path(&o, ".spec.l[1]"), vec![json!(2)]);
        assert_eq!(json_path(&o, ".spec.l[*]").len(), 2);
        assert!(json_path(&o, ".missing.x").is_empty());
    }

    #[test]
    fn an_event_series_is_last_seen_at_its_last_observation() {
        let ago = |h: i64| (chrono::Utc::now() - chrono::Duration::hours(h)).to_rfc3339();
        let e = json!({"eventTime": ago(72), "series": {"count": 2, "lastObservedTime": ago(20)}});
        assert_eq!(event_last_seen(&e), json!("20h"));
        let e = json!({"eventTime": ago(72), "lastTimestamp": ago(20)});
        assert_eq!(event_last_seen(&e), json!("20h"));
        assert_eq!(event_last_seen(&json!({"eventTime": ago(72)})), json!("3d"));
    }

    #[test]
    fn deployment_rows_show_ready_counts() {
        let rt = super::super::registry::builtins()
            .into_iter()
            .find(|t| t.kind == "Deployment")
            .unwrap();
        let d = json!({"metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
                       "spec": {"replicas": 2}, "status": {"readyReplicas": 1, "updatedReplicas": 2, "availableReplicas": 1}});
        let t = table(&rt, &[d], "5", IncludeObject::Metadata, "meta.k8s.io/v1");
        assert_eq!(t["rows"][0]["cells"][0], "web");
        assert_eq!(t["rows"][0]["cells"][1], "1/2");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}
