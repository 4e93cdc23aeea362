//! This node's zone for balance mode's `preferSameZone`: the `--zone` flag when given,
//! else the `topology.kubernetes.io/zone` label of the agent's own Node object. A
//! DaemonSet has one pod template for every node and the downward API does not expose
//! node labels, so reading the Node is the only way every agent learns its own zone
//! without per-node configuration.
#![deny(unsafe_code)]

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use std::time::Duration;

/// The well-known label kubelets and cloud providers set on nodes.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// How long the agent waits for its Node before starting without a zone: balancing
/// works without it (same-node preference only), so it never holds the start.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The zone label of `node`, if it has a non-empty one.
pub fn zone_of(node: &Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .filter(|z| !z.trim().is_empty())
        .map(|z| z.trim().to_string())
}

/// `flag` when set, else the zone label of Node `node` read through `client`. A failed
/// read is logged with what to fix and yields no zone.
pub async fn resolve(flag: Option<&str>, client: &kube::Client, node: &str) -> Option<String> {
    if let Some(z) = flag.map(str::trim).filter(|z| !z.is_empty()) {
        return Some(z.to_string());
    }
    let nodes: Api<Node> = Api::all(client.clone());
    match tokio::time::timeout(LOOKUP_TIMEOUT, nodes.get(node)).await {
        Ok(Ok(n)) => {
            let zone = zone_of(&n);
            match &zone {
                Some(z) => {
                    tracing::info!(node, zone = %z, "zone read from the node's {ZONE_LABEL} label")
                }
                None => tracing::info!(
                    node,
                    "the node has no {ZONE_LABEL} label: same-zone preference is off"
                ),
            }
            zone
        }
        Ok(Err(e)) => {
            tracing::warn!(node, error = %e, "cannot read this node's {ZONE_LABEL} label (the agent's ClusterRole needs get on nodes; or set --zone): same-zone preference is off");
            None
        }
        Err(_) => {
            tracing::warn!(
                node,
                "reading this node's {ZONE_LABEL} label timed out after {LOOKUP_TIMEOUT:?}: same-zone preference is off (set --zone to skip the lookup)"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn node(labels: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        );
        n
    }

    #[test]
    fn the_zone_comes_from_the_topology_label_only() {
        assert_eq!(
            zone_of(&node(&[(ZONE_LABEL, "eu-1a")])).as_deref(),
            Some("eu-1a")
        );
        assert_eq!(
            zone_of(&node(&[("failure-domain.beta.kubernetes.io/zone", "x")])),
            None
        );
        assert_eq!(zone_of(&node(&[(ZONE_LABEL, "  ")])), None);
        assert_eq!(zone_of(&Node::default()), None);
    }
}
