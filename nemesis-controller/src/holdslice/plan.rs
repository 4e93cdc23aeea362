//! What the hold EndpointSlices of a held Service look like: one per IP family the
//! Service has, named after it, labelled as its slice (so kube-proxy, Ingress
//! controllers, Gateways and meshes route to it) but managed by Nemesis (so the
//! EndpointSlice controller leaves it alone), owned by the policy (so it goes with the
//! policy, or with Nemesis when the CRD is removed), listing the ready agents that
//! listen on every hold port of the Service. Pure: objects in, objects out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;
use nemesis_common::wire::{HOLD_SLICE_MANAGED_BY, HoldPort, MANAGED_BY_LABEL};

/// The label by which an EndpointSlice names its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A ready, live agent as a hold slice may list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    pub node: String,
    /// Where its hold listeners are reachable (its node's addresses).
    pub addresses: Vec<IpAddr>,
    /// Hold ports it listens on now.
    pub listening: BTreeSet<u16>,
}

/// The ScalingPolicy that owns the slices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub uid: String,
}

/// An address family of a Service, as EndpointSlices name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn address_type(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    fn holds(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// The name of a Service's hold slice of one family (DNS subdomain: at most 253).
pub fn slice_name(service: &str, family: Family) -> String {
    let mut name = format!("{service}-nemesis-hold-{}", family.suffix());
    name.truncate(253);
    name
}

/// Whether a slice is one of ours.
pub fn is_hold_slice(slice: &EndpointSlice) -> bool {
    slice.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(HOLD_SLICE_MANAGED_BY)
}

/// The families of a Service: `spec.ipFamilies`, else its ClusterIPs', else IPv4.
pub fn families(service: &Service) -> Vec<Family> {
    let Some(spec) = &service.spec else {
        return vec![Family::V4];
    };
    let mut out: Vec<Family> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        })
        .collect();
    if out.is_empty() {
        out = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| if ip.is_ipv4() { Family::V4 } else { Family::V6 })
            .collect();
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        out.push(Family::V4);
    }
    out
}

/// The names of a Service's TCP ports ("" for an unnamed one): what gets hold ports.
pub fn tcp_port_names(service: &Service) -> Vec<String> {
    service
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| p.name.clone().unwrap_or_default())
        .collect()
}

/// Whether any slice of the Service that is not ours has a ready endpoint (an endpoint
/// whose `ready` condition is unset counts as ready, as the API documents).
pub fn has_ready_backend<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> bool {
    slices
        .into_iter()
        .filter(|s| !is_hold_slice(s))
        .flat_map(|s| s.endpoints.iter().flatten())
        .any(|e| {
            e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true) && !e.addresses.is_empty()
        })
}

/// The hold slices of `service` (one per family) listing the `agents` that listen on
/// every one of `ports`.
pub fn hold_slices(
    service: &Service,
    ports: &[HoldPort],
    agents: &[AgentEndpoint],
    owner: &Owner,
) -> Vec<EndpointSlice> {
    let name = service.name_any();
    let namespace = service.namespace().unwrap_or_default();
    let wanted: BTreeSet<u16> = ports.iter().map(|p| p.port).collect();
    let mut listed: Vec<&AgentEndpoint> = agents
        .iter()
        .filter(|a| wanted.is_subset(&a.listening))
        .collect();
    listed.sort_by(|a, b| a.node.cmp(&b.node));
    let slice_ports: Vec<EndpointPort> = ports
        .iter()
        .map(|p| EndpointPort {
            name: Some(p.name.clone()),
            port: Some(i32::from(p.port)),
            protocol: Some("TCP".into()),
            app_protocol: None,
        })
        .collect();
    families(service)
        .into_iter()
        .map(|family| {
            let endpoints: Vec<Endpoint> = listed
                .iter()
                .filter_map(|a| {
                    let addrs: Vec<String> = a
                        .addresses
                        .iter()
                        .filter(|ip| family.holds(ip))
                        .map(|ip| ip.to_string())
                        .take(1)
                        .collect();
                    (!addrs.is_empty()).then(|| Endpoint {
                        addresses: addrs,
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            serving: Some(true),
                            terminating: Some(false),
                        }),
                        node_name: Some(a.node.clone()),
                        ..Endpoint::default()
                    })
                })
                .collect();
            EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(slice_name(&name, family)),
                    namespace: Some(namespace.clone()),
                    labels: Some(BTreeMap::from([
                        (SERVICE_NAME_LABEL.to_string(), name.clone()),
                        (
                            MANAGED_BY_LABEL.to_string(),
                            HOLD_SLICE_MANAGED_BY.to_string(),
                        ),
                    ])),
                    owner_references: Some(vec![OwnerReference {
                        api_version: owner.api_version.clone(),
                        kind: owner.kind.clone(),
                        name: owner.name.clone(),
                        uid: owner.uid.clone(),
                        controller: Some(false),
                        block_owner_deletion: Some(false),
                    }]),
                    ..ObjectMeta::default()
                },
                address_type: family.address_type().to_string(),
                endpoints: Some(endpoints),
                ports: Some(slice_ports.clone()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(families: &[&str], ports: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ipFamilies": families, "ports": ports, "clusterIP": "127.96.0.1"},
        }))
        .unwrap()
    }

    fn agent(node: &str, addrs: &[&str], listening: &[u16]) -> AgentEndpoint {
        AgentEndpoint {
            node: node.into(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            listening: listening.iter().copied().collect(),
        }
    }

    fn owner() -> Owner {
        Owner {
            api_version: "nemesis.dev/v1alpha1".into(),
            kind: "ScalingPolicy".into(),
            name: "web".into(),
            uid: "u-1".into(),
        }
    }

    #[test]
    fn a_slice_lists_every_agent_that_listens_on_all_the_services_hold_ports() {
        let svc = service(
            &["IPv4"],
            json!([{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "grpc", "port": 9090}]),
        );
        assert_eq!(tcp_port_names(&svc), ["http", "grpc"]);
        let ports = vec![
            HoldPort {
                name: "http".into(),
                port: 20000,
            },
            HoldPort {
                name: "grpc".into(),
                port: 20001,
            },
        ];
        let agents = [
            agent("b", &["198.18.1.1"], &[20000, 20001, 20007]),
            agent("a", &["198.18.0.1", "fd00::1"], &[20000, 20001]),
            agent("c", &["198.18.2.1"], &[20000]), // not listening on grpc's yet
        ];
        let slices = hold_slices(&svc, &ports, &agents, &owner());
        assert_eq!(slices.len(), 1);
        let s = &slices[0];
        assert_eq!(s.metadata.name.as_deref(), Some("web-nemesis-hold-ipv4"));
        assert_eq!(s.address_type, "IPv4");
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], HOLD_SLICE_MANAGED_BY);
        let listed: Vec<(&str, &str)> = s
            .endpoints
            .iter()
            .flatten()
            .map(|e| (e.node_name.as_deref().unwrap(), e.addresses[0].as_str()))
            .collect();
        assert_eq!(listed, [("a", "198.18.0.1"), ("b", "198.18.1.1")]);
        let p: Vec<(Option<&str>, Option<i32>)> = s
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.port))
            .collect();
        assert_eq!(
            p,
            [(Some("http"), Some(20000)), (Some("grpc"), Some(20001))]
        );
        assert_eq!(s.metadata.owner_references.as_ref().unwrap()[0].uid, "u-1");
        assert!(is_hold_slice(s));
    }

    #[test]
    fn a_dual_stack_service_gets_a_slice_per_family_with_that_familys_addresses() {
        let svc = service(&["IPv6", "IPv4"], json!([{"port": 80}]));
        let ports = vec![HoldPort {
            name: String::new(),
            port: 20000,
        }];
        let agents = [
            agent("a", &["198.18.0.1", "fd00::1"], &[20000]),
            agent("b", &["198.18.1.1"], &[20000]),
        ];
        let slices = hold_slices(&svc, &ports, &agents, &owner());
        let by_type: Vec<(&str, Vec<&str>)> = slices
            .iter()
            .map(|s| {
                (
                    s.address_type.as_str(),
                    s.endpoints
                        .iter()
                        .flatten()
                        .map(|e| e.addresses[0].as_str())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            by_type,
            [
                ("IPv4", vec!["198.18.0.1", "198.18.1.1"]),
                ("IPv6", vec!["fd00::1"])
            ]
        );
        assert_eq!(
            slices[1].metadata.name.as_deref(),
            Some("web-nemesis-hold-ipv6")
        );
    }

    #[test]
    fn ready_backends_are_read_from_other_slices_only() {
        let slice = |managed: &str, ready: Option<bool>| -> EndpointSlice {
            serde_json::from_value(json!({
                "metadata": {"name": "s", "labels": {MANAGED_BY_LABEL: managed}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["198.18.0.5"], "conditions": {"ready": ready}}],
            }))
            .unwrap()
        };
        assert!(!has_ready_backend(&[slice(
            HOLD_SLICE_MANAGED_BY,
            Some(true)
        )]));
        assert!(!has_ready_backend(&[slice(
            "endpointslice-controller.k8s.io",
            Some(false)
        )]));
        assert!(has_ready_backend(&[slice(
            "endpointslice-controller.k8s.io",
            None
        )]));
        assert!(has_ready_backend(&[
            slice(HOLD_SLICE_MANAGED_BY, Some(true)),
            slice("endpointslice-controller.k8s.io", Some(true)),
        ]));
    }
}
