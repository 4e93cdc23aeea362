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

/// Whether `stored` (the slice as the API server has it) already says everything
/// `desired` says: the fields a hold slice owns, other managers' labels aside. A new
/// leadership term has no record of what it wrote, and without this it rewrote every
/// hold slice the last leader had left right (10,000 writes at 10,000 Services, in the
/// middle of the takeover). Absent and empty lists are the same list.
pub fn says_the_same(desired: &EndpointSlice, stored: &EndpointSlice) -> bool {
    let ours = |s: &EndpointSlice| {
        let labels = s.metadata.labels.as_ref();
        [SERVICE_NAME_LABEL, MANAGED_BY_LABEL].map(|k| labels.and_then(|l| l.get(k)).cloned())
    };
    desired.metadata.name == stored.metadata.name
        && desired.metadata.namespace == stored.metadata.namespace
        && ours(desired) == ours(stored)
        && desired
            .metadata
            .owner_references
            .as_deref()
            .unwrap_or_default()
            == stored
                .metadata
                .owner_references
                .as_deref()
                .unwrap_or_default()
        && desired.address_type == stored.address_type
        && desired.endpoints.as_deref().unwrap_or_default()
            == stored.endpoints.as_deref().unwrap_or_default()
        && desired.ports.as_deref().unwrap_or_default()
            == stored.ports.as_deref().unwrap_or_default()
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

/// Endpoints per hold slice at most: the API server refuses a slice of more than 1,000
/// (EndpointSlice validation); a Service held on more nodes gets several slices, which
/// kube-proxy, Ingress controllers and meshes merge by their service-name label.
pub const MAX_ENDPOINTS: usize = 1000;

/// The index of a hold slice of `service` and `family` by its name: 0 for the first
/// ([`slice_name`]), `k` for `{slice_name}-{k}`; `None` for any other name.
pub fn slice_index(name: &str, service: &str, family: Family) -> Option<usize> {
    let base = slice_name(service, family);
    if name == base {
        return Some(0);
    }
    let k: usize = name.strip_prefix(&base)?.strip_prefix('-')?.parse().ok()?;
    (k > 0 && name == indexed_name(&base, k)).then_some(k)
}

fn indexed_name(base: &str, k: usize) -> String {
    if k == 0 {
        base.to_string()
    } else {
        format!("{base}-{k}")
    }
}

/// The hold slices of `service` listing the `agents` that listen on every one of
/// `ports`: per family, as many slices of at most `max` endpoints as the agents fill.
/// `previous` (its hold slices as they are, ours or the cluster's) keeps each agent in
/// the slice that lists it now, so a node coming or going rewrites one slice, not all
/// of them; new agents fill the lowest slice with room. The first slice of a family is
/// always there (empty when no agent listens); emptied further ones are left out (the
/// caller deletes what it no longer wants).
pub fn hold_slices(
    service: &Service,
    ports: &[HoldPort],
    agents: &[AgentEndpoint],
    owner: &Owner,
    previous: &[&EndpointSlice],
    max: usize,
) -> Vec<EndpointSlice> {
    let max = max.max(1);
    let name = service.name_any();
    let namespace = service.namespace().unwrap_or_default();
    let wanted: BTreeSet<u16> = ports.iter().map(|p| p.port).collect();
    let listed: Vec<&AgentEndpoint> = agents
        .iter()
        .filter(|a| wanted.is_subset(&a.listening))
        .collect();
    let slice_ports: Vec<EndpointPort> = ports
        .iter()
        .map(|p| EndpointPort {
            name: Some(p.name.clone()),
            port: Some(i32::from(p.port)),
            protocol: Some("TCP".into()),
            app_protocol: None,
        })
        .collect();
    let mut out = Vec::new();
    for family in families(service) {
        // Every listed agent with an address of this family, by node.
        let mut pool: BTreeMap<&str, Endpoint> = listed
            .iter()
            .filter_map(|a| {
                let addr = a.addresses.iter().find(|ip| family.holds(ip))?;
                Some((
                    a.node.as_str(),
                    Endpoint {
                        addresses: vec![addr.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            serving: Some(true),
                            terminating: Some(false),
                        }),
                        node_name: Some(a.node.clone()),
                        ..Endpoint::default()
                    },
                ))
            })
            .collect();
        // Agents stay where they are listed (the first `max` of a slice).
        let mut slices: BTreeMap<usize, BTreeMap<String, Endpoint>> = BTreeMap::new();
        slices.insert(0, BTreeMap::new());
        let mut was: Vec<(usize, &EndpointSlice)> = previous
            .iter()
            .filter(|s| is_hold_slice(s) && s.address_type == family.address_type())
            .filter_map(|s| Some((slice_index(&s.name_any(), &name, family)?, *s)))
            .collect();
        was.sort_by_key(|(k, _)| *k);
        for (k, s) in was {
            let slot = slices.entry(k).or_default();
            for node in s
                .endpoints
                .iter()
                .flatten()
                .filter_map(|e| e.node_name.as_deref())
            {
                if slot.len() < max
                    && let Some(e) = pool.remove(node)
                {
                    slot.insert(node.to_string(), e);
                }
            }
        }
        // Newcomers fill the lowest slices with room, then new ones.
        let mut k = 0;
        for (node, e) in pool {
            while slices.get(&k).is_some_and(|s| s.len() >= max) {
                k += 1;
            }
            slices.entry(k).or_default().insert(node.to_string(), e);
        }
        let base = slice_name(&name, family);
        for (k, endpoints) in slices {
            if k > 0 && endpoints.is_empty() {
                continue;
            }
            out.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(indexed_name(&base, k)),
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
                endpoints: Some(endpoints.into_values().collect()),
                ports: Some(slice_ports.clone()),
            });
        }
    }
    out
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
        let slices = hold_slices(&svc, &ports, &agents, &owner(), &[], MAX_ENDPOINTS);
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
    fn a_stored_slice_says_the_same_as_the_planned_one_whatever_the_server_added() {
        let svc = service(&["IPv4"], json!([{"name": "http", "port": 80}]));
        let ports = vec![HoldPort {
            name: "http".into(),
            port: 20000,
        }];
        let agents = [agent("a", &["198.18.0.1"], &[20000])];
        let desired = hold_slices(&svc, &ports, &agents, &owner(), &[], MAX_ENDPOINTS).remove(0);
        // What the API server hands back: the same fields, plus its own metadata and
        // another manager's label.
        let mut stored = desired.clone();
        stored.metadata.resource_version = Some("42".into());
        stored.metadata.uid = Some("uid-9".into());
        stored
            .metadata
            .labels
            .get_or_insert_default()
            .insert("team".into(), "shop".into());
        assert!(says_the_same(&desired, &stored));

        let moved = hold_slices(
            &svc,
            &ports,
            &[agent("b", &["198.18.1.1"], &[20000])],
            &owner(),
            &[],
            MAX_ENDPOINTS,
        )
        .remove(0);
        assert!(!says_the_same(&moved, &stored), "another agent listed");
        let mut other_port = desired.clone();
        other_port.ports.as_mut().unwrap()[0].port = Some(20001);
        assert!(!says_the_same(&other_port, &stored), "another hold port");
        let mut unlabelled = stored.clone();
        unlabelled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(SERVICE_NAME_LABEL);
        assert!(
            !says_the_same(&desired, &unlabelled),
            "its Service label gone"
        );
        let mut no_owner = stored.clone();
        no_owner.metadata.owner_references = None;
        assert!(!says_the_same(&desired, &no_owner), "its owner gone");

        let mut empty = desired.clone();
        empty.endpoints = Some(vec![]);
        let mut absent = stored.clone();
        absent.endpoints = None;
        assert!(says_the_same(&empty, &absent), "[] and absent are one list");
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
        let slices = hold_slices(&svc, &ports, &agents, &owner(), &[], MAX_ENDPOINTS);
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

    fn nodes(s: &EndpointSlice) -> Vec<&str> {
        s.endpoints
            .iter()
            .flatten()
            .map(|e| e.node_name.as_deref().unwrap())
            .collect()
    }

    fn names(slices: &[EndpointSlice]) -> Vec<&str> {
        slices
            .iter()
            .map(|s| s.metadata.name.as_deref().unwrap())
            .collect()
    }

    #[test]
    fn agents_past_the_limit_spill_into_further_slices_and_stay_put_as_nodes_change() {
        let svc = service(&["IPv4"], json!([{"port": 80}]));
        let ports = vec![HoldPort {
            name: String::new(),
            port: 20000,
        }];
        let agent_n = |n: u8| agent(&format!("n{n}"), &[&format!("198.18.0.{n}")], &[20000]);
        let agents: Vec<AgentEndpoint> = (1..=5).map(agent_n).collect();
        let first = hold_slices(&svc, &ports, &agents, &owner(), &[], 2);
        assert_eq!(
            names(&first),
            [
                "web-nemesis-hold-ipv4",
                "web-nemesis-hold-ipv4-1",
                "web-nemesis-hold-ipv4-2"
            ]
        );
        let listed: Vec<Vec<&str>> = first.iter().map(nodes).collect();
        assert_eq!(listed, [vec!["n1", "n2"], vec!["n3", "n4"], vec!["n5"]]);
        assert!(first.iter().all(is_hold_slice));

        // n2 goes, n0 and n6 come: only the slice that lost n2 and the one with room
        // change; n0 does not push everyone along.
        let mut agents: Vec<AgentEndpoint> =
            agents.into_iter().filter(|a| a.node != "n2").collect();
        agents.push(agent_n(0));
        agents.push(agent_n(6));
        let prev: Vec<&EndpointSlice> = first.iter().collect();
        let next = hold_slices(&svc, &ports, &agents, &owner(), &prev, 2);
        let listed: Vec<Vec<&str>> = next.iter().map(nodes).collect();
        assert_eq!(
            listed,
            [vec!["n0", "n1"], vec!["n3", "n4"], vec!["n5", "n6"]]
        );
        assert_eq!(next[1], first[1], "an untouched slice is unchanged");

        // Nodes leaving empty a further slice: it is no longer wanted (the caller
        // deletes it); the first slice stays, even empty.
        let prev: Vec<&EndpointSlice> = next.iter().collect();
        let only_n5 = [agent_n(5)];
        let last = hold_slices(&svc, &ports, &only_n5, &owner(), &prev, 2);
        assert_eq!(
            names(&last),
            ["web-nemesis-hold-ipv4", "web-nemesis-hold-ipv4-2"]
        );
        assert!(nodes(&last[0]).is_empty());
        let none = hold_slices(&svc, &ports, &[], &owner(), &[], 2);
        assert_eq!(names(&none), ["web-nemesis-hold-ipv4"]);
    }

    #[test]
    fn a_thousand_and_one_nodes_fit_in_slices_the_api_server_accepts() {
        let svc = service(&["IPv4"], json!([{"port": 80}]));
        let ports = vec![HoldPort {
            name: String::new(),
            port: 20000,
        }];
        let agents: Vec<AgentEndpoint> = (0..1001u32)
            .map(|i| {
                let ip = format!("198.18.{}.{}", i / 250, i % 250 + 1);
                agent(&format!("node-{i:04}"), &[&ip], &[20000])
            })
            .collect();
        let slices = hold_slices(&svc, &ports, &agents, &owner(), &[], MAX_ENDPOINTS);
        let sizes: Vec<usize> = slices.iter().map(|s| nodes(s).len()).collect();
        assert_eq!(sizes, [1000, 1]);
    }

    #[test]
    fn slice_names_parse_back_to_their_index() {
        assert_eq!(
            slice_index("web-nemesis-hold-ipv4", "web", Family::V4),
            Some(0)
        );
        assert_eq!(
            slice_index("web-nemesis-hold-ipv4-3", "web", Family::V4),
            Some(3)
        );
        assert_eq!(
            slice_index("web-nemesis-hold-ipv4-03", "web", Family::V4),
            None
        );
        assert_eq!(
            slice_index("web-nemesis-hold-ipv4-0", "web", Family::V4),
            None
        );
        assert_eq!(
            slice_index("web-nemesis-hold-ipv6-1", "web", Family::V4),
            None
        );
        assert_eq!(
            slice_index("web-x-nemesis-hold-ipv4", "web", Family::V4),
            None
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
