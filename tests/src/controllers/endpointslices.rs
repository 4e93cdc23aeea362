//! The EndpointSlice controller: for each Service with a selector, keeps EndpointSlices
//! labelled `kubernetes.io/service-name=<svc>` listing the selected pods with their
//! ready/serving/terminating conditions and the Service's ports resolved against the
//! pods' container ports, each endpoint with its pod's `nodeName` and that Node's zone
//! (its `topology.kubernetes.io/zone` label), as kube-controller-manager fills them. It
//! manages only slices carrying its own `managed-by` label; slices of selector-less
//! Services belong to whoever wrote them.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::{RESYNC, RETRY, api, safe_hash};
use crate::kubelet::call::{CallError, call};

/// The label naming a slice's Service (what kube-proxy and the Nemesis agent select on).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The same manager name as kube-controller-manager's, so consumers see no difference.
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
/// Endpoints per slice, as Kubernetes' default `--max-endpoints-per-slice`.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
/// The Node label an endpoint's `zone` comes from.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Each Node's zone by node name (Nodes without the label are left out).
pub type Zones = BTreeMap<String, String>;

/// The zones of `nodes`, from their [`ZONE_LABEL`].
pub fn zones_of(nodes: &[Node]) -> Zones {
    nodes
        .iter()
        .filter_map(|n| Some((n.name_any(), n.labels().get(ZONE_LABEL)?.clone())))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum SliceError {
    #[error("listing pods for service {service}: {source}")]
    ListPods { service: String, source: CallError },
    #[error("listing nodes for the zones of service {service}'s endpoints: {source}")]
    ListNodes { service: String, source: CallError },
    #[error("listing endpointslices of service {service}: {source}")]
    ListSlices { service: String, source: CallError },
    #[error("writing endpointslice {slice} of service {service}: {source}")]
    WriteSlice {
        service: String,
        slice: String,
        source: CallError,
    },
    #[error("deleting endpointslice {slice} of service {service}: {source}")]
    DeleteSlice {
        service: String,
        slice: String,
        source: CallError,
    },
}

// === the pure part ===

fn selector_of(service: &Service) -> Option<&BTreeMap<String, String>> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
}

/// Whether `service` selects `pod` (same namespace, selector labels all present).
pub fn selects(service: &Service, pod: &Pod) -> bool {
    let Some(selector) = selector_of(service) else {
        return false;
    };
    service.namespace() == pod.namespace()
        && selector.iter().all(|(k, v)| pod.labels().get(k) == Some(v))
}

/// The port a Service port reaches on `pod`: `targetPort` as a number, or the name of a
/// container port; the Service port itself when unset. `None` when the name is unknown.
pub fn target_port(port: &ServicePort, pod: &Pod) -> Option<i32> {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name.as_str())
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol
            })
            .map(|p| p.container_port),
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The families of a Service's slices: `spec.ipFamilies` (the API server sets it), IPv4
/// when unset.
pub fn families(service: &Service) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = service
        .spec
        .iter()
        .flat_map(|s| s.ip_families.iter().flatten())
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some("IPv4"),
            "IPv6" => Some("IPv6"),
            _ => None,
        })
        .collect();
    if out.is_empty() {
        out.push("IPv4");
    }
    out
}

/// The endpoint for `pod` in a slice of `family` (`IPv4`, `IPv6`), or `None` when it has
/// no address of that family or has finished. Its `zone` is its node's in `zones`
/// (none when the node has no zone label, or no Node object: Kubernetes would leave such
/// a pod out until its Node shows up, the sandbox keeps it without a zone).
pub fn endpoint(
    pod: &Pod,
    publish_not_ready: bool,
    family: &str,
    zones: &Zones,
) -> Option<Endpoint> {
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let of_family = |ip: &&str| match ip.parse::<std::net::IpAddr>() {
        Ok(a) => a.is_ipv4() == (family == "IPv4"),
        Err(_) => false,
    };
    let ip = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .find(of_family)?;
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let ready = pod_ready(pod);
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let zone = node_name.as_ref().and_then(|n| zones.get(n)).cloned();
    Some(Endpoint {
        addresses: vec![ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(publish_not_ready || (ready && !terminating)),
            serving: Some(publish_not_ready || ready),
            terminating: Some(terminating),
        }),
        node_name,
        zone,
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: pod.namespace(),
            name: Some(pod.name_any()),
            uid: pod.uid(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The slices `service` should have given `pods`: endpoints grouped by their resolved
/// ports (pods may number a named port differently), at most
/// [`MAX_ENDPOINTS_PER_SLICE`] per slice, names stable so reconciles are idempotent.
/// A service selecting nothing gets one empty slice, as Kubernetes' placeholder. A
/// dual-stack Service gets a set of slices per family, as kube-controller-manager does.
/// `zones` gives each endpoint its node's zone.
pub fn desired_slices(service: &Service, pods: &[Pod], zones: &Zones) -> Vec<EndpointSlice> {
    families(service)
        .into_iter()
        .flat_map(|family| desired_slices_of(service, pods, family, zones))
        .collect()
}

fn desired_slices_of(
    service: &Service,
    pods: &[Pod],
    family: &str,
    zones: &Zones,
) -> Vec<EndpointSlice> {
    if selector_of(service).is_none() {
        return Vec::new();
    }
    let spec = service.spec.as_ref();
    let publish_not_ready = spec
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let service_ports: &[ServicePort] = spec.and_then(|s| s.ports.as_deref()).unwrap_or(&[]);
    let mut sorted: Vec<&Pod> = pods.iter().filter(|p| selects(service, p)).collect();
    sorted.sort_by_key(|p| p.name_any());
    let mut groups: BTreeMap<Vec<(String, i32, String)>, Vec<Endpoint>> = BTreeMap::new();
    for pod in sorted {
        let Some(endpoint) = endpoint(pod, publish_not_ready, family, zones) else {
            continue;
        };
        let ports: Vec<(String, i32, String)> = service_ports
            .iter()
            .filter_map(|sp| {
                let port = target_port(sp, pod)?;
                Some((
                    sp.name.clone().unwrap_or_default(),
                    port,
                    sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                ))
            })
            .collect();
        groups.entry(ports).or_default().push(endpoint);
    }
    if groups.is_empty() {
        groups.insert(Vec::new(), Vec::new());
    }
    let svc = service.name_any();
    let mut slices = Vec::new();
    for (ports, endpoints) in groups {
        // IPv4 names as before dual-stack; other families hash their name in.
        let key = if family == "IPv4" {
            format!("{ports:?}")
        } else {
            format!("{family}{ports:?}")
        };
        let base = format!("{svc}-{}", safe_hash(key.as_bytes()));
        let app_protocol = |name: &str| {
            service_ports
                .iter()
                .find(|p| p.name.as_deref().unwrap_or("") == name)
                .and_then(|p| p.app_protocol.clone())
        };
        let slice_ports: Vec<EndpointPort> = ports
            .iter()
            .map(|(name, port, protocol)| EndpointPort {
                name: Some(name.clone()),
                port: Some(*port),
                protocol: Some(protocol.clone()),
                app_protocol: app_protocol(name),
            })
            .collect();
        let chunks: Vec<Vec<Endpoint>> = if endpoints.is_empty() {
            vec![Vec::new()]
        } else {
            endpoints
                .chunks(MAX_ENDPOINTS_PER_SLICE)
                .map(<[Endpoint]>::to_vec)
                .collect()
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            let name = if i == 0 {
                base.clone()
            } else {
                format!("{base}-{i}")
            };
            slices.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: service.namespace(),
                    labels: Some(slice_labels(service)),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Service".into(),
                        name: svc.clone(),
                        uid: service.uid().unwrap_or_default(),
                        controller: Some(true),
                        block_owner_deletion: Some(true),
                    }]),
                    ..Default::default()
                },
                address_type: family.into(),
                endpoints: Some(chunk),
                ports: (!slice_ports.is_empty()).then(|| slice_ports.clone()),
            });
        }
    }
    slices
}

/// The Service's labels plus the two that identify the slice, as Kubernetes copies them.
fn slice_labels(service: &Service) -> BTreeMap<String, String> {
    let mut labels = service.labels().clone();
    labels.retain(|k, _| k != SERVICE_NAME_LABEL && k != MANAGED_BY_LABEL);
    labels.insert(SERVICE_NAME_LABEL.into(), service.name_any());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    labels
}

/// Whether `existing` already says what `desired` says (ignoring server-set metadata).
fn same_content(existing: &EndpointSlice, desired: &EndpointSlice) -> bool {
    let eps = |s: &EndpointSlice| s.endpoints.clone().unwrap_or_default();
    let ports = |s: &EndpointSlice| s.ports.clone().unwrap_or_default();
    existing.address_type == desired.address_type
        && eps(existing) == eps(desired)
        && ports(existing) == ports(desired)
        && existing.metadata.labels == desired.metadata.labels
        && existing.metadata.owner_references == desired.metadata.owner_references
}

// === the I/O part ===

struct Context {
    client: Client,
}

/// Runs the controller until `cancel` fires; `namespace` limits it to one namespace.
pub async fn run(client: Client, namespace: Option<String>, cancel: CancellationToken) {
    let services: Api<Service> = api(&client, namespace.as_deref());
    let pods: Api<Pod> = api(&client, namespace.as_deref());
    let slices: Api<EndpointSlice> = api(&client, namespace.as_deref());
    let nodes: Api<Node> = Api::all(client.clone());
    let controller = Controller::new(services, watcher::Config::default());
    let store = controller.store();
    let every_service = controller.store();
    let managed = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    controller
        // A pod change concerns every Service selecting it (also on its deletion).
        .watches(pods, watcher::Config::default(), move |pod: Pod| {
            store
                .state()
                .into_iter()
                .filter(|svc| selects(svc, &pod))
                .map(|svc| ObjectRef::from_obj(&*svc))
                .collect::<Vec<_>>()
        })
        // A Node's zone is in its pods' endpoints: a Node change concerns every Service
        // (a sandbox has few of both).
        .watches(nodes, watcher::Config::default(), move |_: Node| {
            every_service
                .state()
                .into_iter()
                .map(|svc| ObjectRef::from_obj(&*svc))
                .collect::<Vec<_>>()
        })
        // Someone editing or deleting our slices gets them put back.
        .owns(slices, managed)
        .graceful_shutdown_on(cancel.cancelled_owned())
        .run(reconcile, error_policy, Arc::new(Context { client }))
        .for_each(|res| async move {
            if let Err(err) = res {
                tracing::debug!(%err, "endpointslice controller");
            }
        })
        .await;
}

fn error_policy(service: Arc<Service>, err: &SliceError, _: Arc<Context>) -> Action {
    tracing::warn!(service = %service.name_any(), %err, "reconcile failed");
    Action::requeue(RETRY)
}

#[tracing::instrument(skip_all, fields(service = %service.name_any()))]
async fn reconcile(service: Arc<Service>, ctx: Arc<Context>) -> Result<Action, SliceError> {
    if service.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = service.namespace().unwrap_or_default();
    let name = service.name_any();
    let key = format!("{namespace}/{name}");
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let slices_api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
    let pods = match selector_of(&service) {
        None => Vec::new(),
        Some(labels) => {
            let selector: Selector = labels.clone().into_iter().collect();
            let listed = call(pods_api.list(&ListParams::default().labels_from(&selector)))
                .await
                .map_err(|source| SliceError::ListPods {
                    service: key.clone(),
                    source,
                })?;
            // The server filtered already; checking again costs nothing.
            listed
                .items
                .into_iter()
                .filter(|p| selector.matches(p.labels()))
                .collect()
        }
    };
    // Only the nodes' labels matter; a sandbox has a handful of Nodes.
    let zones = if pods.is_empty() {
        Zones::new()
    } else {
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        let listed = call(nodes.list(&ListParams::default()))
            .await
            .map_err(|source| SliceError::ListNodes {
                service: key.clone(),
                source,
            })?;
        zones_of(&listed.items)
    };
    let desired = desired_slices(&service, &pods, &zones);
    let existing = call(slices_api.list(&ListParams::default().labels(&format!(
        "{SERVICE_NAME_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}"
    ))))
    .await
    .map_err(|source| SliceError::ListSlices {
        service: key.clone(),
        source,
    })?
    .items;
    for want in &desired {
        let slice_name = want.name_any();
        let result = match existing.iter().find(|e| e.name_any() == slice_name) {
            Some(have) if same_content(have, want) => continue,
            Some(have) => {
                let mut replacement = want.clone();
                replacement.metadata.resource_version = have.resource_version();
                call(slices_api.replace(&slice_name, &PostParams::default(), &replacement)).await
            }
            None => call(slices_api.create(&PostParams::default(), want)).await,
        };
        if let Err(source) = result {
            return Err(SliceError::WriteSlice {
                service: key,
                slice: slice_name,
                source,
            });
        }
        tracing::debug!(slice = %slice_name, endpoints = want.endpoints.as_ref().map_or(0, Vec::len), "endpointslice written");
    }
    for stale in existing
        .iter()
        .filter(|e| !desired.iter().any(|d| d.name_any() == e.name_any()))
    {
        match call(slices_api.delete(&stale.name_any(), &DeleteParams::default())).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(source) => {
                return Err(SliceError::DeleteSlice {
                    service: key,
                    slice: stale.name_any(),
                    source,
                });
            }
        }
    }
    Ok(Action::requeue(RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, ContainerPort, PodCondition, PodSpec, PodStatus, ServiceSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn service(target: Option<IntOrString>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("demo".into()),
                uid: Some("svc-uid".into()),
                labels: Some([("team".to_string(), "ml".to_string())].into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some([("app".to_string(), "web".to_string())].into()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: target,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn pod(name: &str, ip: Option<&str>, ready: bool, port: i32) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("demo".into()),
                uid: Some(format!("{name}-uid")),
                labels: Some([("app".to_string(), "web".to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                containers: vec![Container {
                    name: "app".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("serve".into()),
                        container_port: port,
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: ip.map(String::from),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn conditions(slice: &EndpointSlice) -> Vec<(String, bool, bool, bool)> {
        slice
            .endpoints
            .iter()
            .flatten()
            .map(|e| {
                let c = e.conditions.clone().unwrap();
                (
                    e.addresses[0].clone(),
                    c.ready.unwrap(),
                    c.serving.unwrap(),
                    c.terminating.unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn ready_and_not_ready_pods_are_listed_with_their_conditions() {
        let pods = [
            pod("b", Some("198.18.1.3"), false, 8080),
            pod("a", Some("198.18.1.2"), true, 8080),
            pod("no-ip", None, false, 8080),
        ];
        let slices = desired_slices(&service(Some(IntOrString::Int(8080))), &pods, &Zones::new());
        assert_eq!(slices.len(), 1);
        let s = &slices[0];
        assert_eq!(s.address_type, "IPv4");
        assert_eq!(
            conditions(s),
            [
                ("198.18.1.2".into(), true, true, false),
                ("198.18.1.3".into(), false, false, false)
            ]
        );
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(labels["team"], "ml");
        let port = &s.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.port),
            (Some("http"), Some(8080))
        );
        let target = s.endpoints.as_ref().unwrap()[0].target_ref.clone().unwrap();
        assert_eq!(target.kind.as_deref(), Some("Pod"));
        assert_eq!(target.uid.as_deref(), Some("a-uid"));
    }

    #[test]
    fn endpoints_carry_their_pods_node_and_that_nodes_zone() {
        let mut elsewhere = pod("b", Some("198.18.1.3"), true, 8080);
        elsewhere.spec.as_mut().unwrap().node_name = Some("node-2".into());
        let mut unbound = pod("c", Some("198.18.1.4"), true, 8080);
        unbound.spec.as_mut().unwrap().node_name = None;
        let pods = [pod("a", Some("198.18.1.2"), true, 8080), elsewhere, unbound];
        let nodes: Vec<Node> = [("node-1", Some("zone-a")), ("node-2", None)]
            .iter()
            .map(|(name, zone)| {
                let mut labels = serde_json::json!({"kubernetes.io/hostname": name});
                if let Some(z) = zone {
                    labels[ZONE_LABEL] = serde_json::json!(z);
                }
                serde_json::from_value(
                    serde_json::json!({"metadata": {"name": name, "labels": labels}}),
                )
                .unwrap()
            })
            .collect();
        let zones = zones_of(&nodes);
        assert_eq!(zones, Zones::from([("node-1".into(), "zone-a".into())]));
        let slices = desired_slices(&service(Some(IntOrString::Int(8080))), &pods, &zones);
        let placed: Vec<(Option<String>, Option<String>)> = slices[0]
            .endpoints
            .iter()
            .flatten()
            .map(|e| (e.node_name.clone(), e.zone.clone()))
            .collect();
        assert_eq!(
            placed,
            [
                (Some("node-1".into()), Some("zone-a".into())),
                (Some("node-2".into()), None),
                (None, None),
            ]
        );
    }

    #[test]
    fn terminating_pods_are_serving_but_not_ready() {
        let mut leaving = pod("a", Some("198.18.1.2"), true, 8080);
        leaving.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        let slices = desired_slices(&service(None), &[leaving], &Zones::new());
        assert_eq!(
            conditions(&slices[0]),
            [("198.18.1.2".into(), false, true, true)]
        );
    }

    #[test]
    fn named_target_ports_resolve_per_pod_and_split_slices() {
        let svc = service(Some(IntOrString::String("serve".into())));
        let pods = [
            pod("a", Some("198.18.1.2"), true, 8080),
            pod("b", Some("198.18.1.3"), true, 9090),
        ];
        let slices = desired_slices(&svc, &pods, &Zones::new());
        let mut ports: Vec<i32> = slices
            .iter()
            .map(|s| s.ports.as_ref().unwrap()[0].port.unwrap())
            .collect();
        ports.sort();
        assert_eq!(ports, [8080, 9090]);
        assert_ne!(slices[0].metadata.name, slices[1].metadata.name);
    }

    #[test]
    fn a_service_selecting_nothing_gets_one_empty_slice_and_no_selector_gets_none() {
        let slices = desired_slices(&service(None), &[], &Zones::new());
        assert_eq!(slices.len(), 1);
        assert!(slices[0].endpoints.as_ref().unwrap().is_empty());
        let mut manual = service(None);
        manual.spec.as_mut().unwrap().selector = None;
        assert!(
            desired_slices(
                &manual,
                &[pod("a", Some("198.18.1.2"), true, 80)],
                &Zones::new()
            )
            .is_empty()
        );
    }

    #[test]
    fn pods_of_other_labels_or_namespaces_are_not_selected() {
        let svc = service(None);
        let mut other = pod("x", Some("198.18.1.9"), true, 80);
        other.metadata.namespace = Some("elsewhere".into());
        assert!(!selects(&svc, &other));
        let mut unlabelled = pod("y", Some("198.18.1.8"), true, 80);
        unlabelled.metadata.labels = None;
        assert!(!selects(&svc, &unlabelled));
    }

    #[test]
    fn slice_names_are_stable_across_reconciles() {
        let pods = [pod("a", Some("198.18.1.2"), true, 8080)];
        let one = desired_slices(&service(None), &pods, &Zones::new());
        let two = desired_slices(&service(None), &pods, &Zones::new());
        assert_eq!(one, two);
        assert!(same_content(&one[0], &two[0]));
    }

    #[test]
    fn large_services_are_split_at_one_hundred_endpoints() {
        let pods: Vec<Pod> = (0..150)
            .map(|i| {
                pod(
                    &format!("p{i:03}"),
                    Some(&format!("198.18.{}.{}", i / 200, 2 + i % 200)),
                    true,
                    80,
                )
            })
            .collect();
        let slices = desired_slices(&service(None), &pods, &Zones::new());
        let sizes: Vec<usize> = slices
            .iter()
            .map(|s| s.endpoints.as_ref().unwrap().len())
            .collect();
        assert_eq!(sizes, [100, 50]);
    }
}
