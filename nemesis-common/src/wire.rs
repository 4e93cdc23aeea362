//! Messages between agents and the controller (JSON over HTTP, bearer token from a
//! Secret). The agent calls the controller; the controller never dials agents, so an
//! agent behind any network path works and a restarted controller needs no agent list.
//!
//! - `POST /v1/agents/heartbeat` with [`Heartbeat`] -> [`HeartbeatReply`]: registers the
//!   agent, reports what it applied and its per-Service counters, and fetches the
//!   desired directives. Sent every few seconds, and at once after a change. The reply
//!   carries only the directives changed since the [`DirectivesCursor`] the heartbeat
//!   names (the whole set on first contact, after a controller change or a gap); the
//!   agent keeps the whole set in a [`DirectiveView`].
//! - `POST /v1/agents/wake` with [`WakeRequest`] -> [`WakeReply`]: the first held
//!   connection of a Service (single flight per Service on the agent).
//! - `POST /v1/agents/loads` with [`LoadReport`] -> [`LoadReply`]: balance mode's
//!   cluster-wide load, every half second: the agent's open connections per backend out, the
//!   other nodes' sums back. Apart from the heartbeat so it stays small and frequent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `endpointslice.kubernetes.io/managed-by` value of the hold EndpointSlices the
/// controller publishes for held Services (listing agents' hold listeners): the
/// Kubernetes EndpointSlice controller leaves them alone, and agents leave them out of
/// a Service's backends (connecting to themselves would loop).
pub const HOLD_SLICE_MANAGED_BY: &str = "controller.nemesis.dev";

/// The label by which EndpointSlices name their manager.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// A Service port's hold listener: every agent listens on `port` of its node addresses
/// for the Service port named `name` ("" for a single unnamed port), so a connection
/// arriving there is known to be for that Service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HoldPort {
    pub name: String,
    pub port: u16,
}

/// A Kubernetes Service, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl core::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the controller wants an agent to do with a Service, beyond the agent's own rule
/// (hold while the Service has no ready endpoint, go direct once it has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Directive {
    /// Follow the endpoints: hold at zero, direct when warm.
    Follow,
    /// Hold every new connection even though backends may still be ready: the controller
    /// is about to scale the target to zero and waits for every agent to acknowledge.
    Sleep,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDirective {
    pub service: ServiceRef,
    pub directive: Directive,
    /// Increases with every change the controller makes for this Service; an agent
    /// acknowledges by reporting the epoch it applied.
    pub epoch: u64,
    /// Where every agent listens for this Service's connections routed to it by the hold
    /// EndpointSlice (callers that never dial the ClusterIP: Ingress controllers,
    /// NodePorts, meshes). Empty from controllers that predate it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hold_ports: Vec<HoldPort>,
}

/// The mode an agent's eBPF table has for a Service right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AppliedMode {
    Passthrough,
    Hold,
    Balance,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReport {
    pub service: ServiceRef,
    pub mode: AppliedMode,
    /// Epoch of the last directive applied for this Service (0: none yet).
    pub applied_epoch: u64,
    pub connects_total: u64,
    pub open_connections: u64,
    pub closed_total: u64,
    /// Connections held by this agent's proxy right now.
    pub held_connections: u64,
    /// Connections the Service's backend pods on this node accepted, in total (server
    /// side: whatever path they came by). 0 from agents that predate it.
    #[serde(default)]
    pub accepted_total: u64,
    /// Accepted connections open now.
    #[serde(default)]
    pub accepted_open: u64,
    /// Hold ports this agent listens on for the Service now (see [`HoldPort`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hold_ports: Vec<u16>,
    /// Connections this agent's proxy took into hold since it started (the controller
    /// differences it: the held count of a cold start includes those already forwarded).
    /// Absent from agents older than the field.
    #[serde(default)]
    pub holds_total: u64,
    /// Connections this agent's proxy refused at once because a held-connection bound
    /// (the Service's `maxHeldConnections` or the agent's total) was reached, since it
    /// started; differenced like `holds_total`. 0 from agents that predate it.
    #[serde(default)]
    pub holds_refused_total: u64,
    /// Errors this agent's proxy saw for the Service since it started, differenced like
    /// `holds_total`: dials of a ready backend that failed or timed out, and forwarded
    /// connections that ended in a reset or another I/O error. 0 from agents that
    /// predate it.
    #[serde(default)]
    pub proxy_errors: ProxyErrors,
}

/// The proxy's errors for one Service, by kind (monotonic per agent process).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyErrors {
    /// A ready backend refused the connection (or another connect error).
    #[serde(default)]
    pub connect_failed: u64,
    /// A ready backend did not answer the connect within the proxy's connect timeout.
    #[serde(default)]
    pub connect_timeouts: u64,
    /// A forwarded connection was reset (by the client or the backend).
    #[serde(default)]
    pub resets: u64,
    /// A forwarded connection ended with another I/O error (including timeouts).
    #[serde(default)]
    pub other: u64,
}

impl ProxyErrors {
    pub fn total(&self) -> u64 {
        self.connect_failed + self.connect_timeouts + self.resets + self.other
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// The node the agent runs on (unique per agent).
    pub node: String,
    /// Random per agent process, so the controller sees a restart.
    pub instance: String,
    pub services: Vec<ServiceReport>,
    /// The node addresses its hold listeners are reachable on (the hold EndpointSlice
    /// lists these). Empty: this agent serves no hold listener.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::IpAddr>,
    /// Whether the agent is ready (its `/readyz`): only ready agents are listed in hold
    /// EndpointSlices. Agents that predate it count as ready.
    #[serde(default = "ready_by_default")]
    pub ready: bool,
    /// The cursor of the last reply whose directives this agent holds: the reply then
    /// carries only what changed since. Absent: the agent wants the whole set (first
    /// contact, or an agent that predates deltas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directives_cursor: Option<DirectivesCursor>,
}

fn ready_by_default() -> bool {
    true
}

/// A point in a controller's sequence of directive changes: `stream` names the sequence
/// (random per controller process, so a restarted or new leader never takes another's
/// version for its own) and `version` counts the changes in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectivesCursor {
    pub stream: u64,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatReply {
    /// With `delta` false: every directive. With `delta` true: those new or changed
    /// since the heartbeat's cursor.
    pub directives: Vec<ServiceDirective>,
    /// How long until the controller considers this agent dead without a heartbeat.
    pub lease_seconds: u32,
    /// Where this reply brings the agent's copy; the next heartbeat sends it back.
    /// Absent from controllers that predate deltas (their replies are whole sets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<DirectivesCursor>,
    /// True: `directives` and `removed` are changes since the heartbeat's cursor.
    #[serde(default, skip_serializing_if = "is_false")]
    pub delta: bool,
    /// With `delta`: Services whose directive is gone since the heartbeat's cursor.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<ServiceRef>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// An agent's copy of the controller's directives, kept in step by heartbeat replies:
/// a whole set replaces it, a delta patches it. Send [`DirectiveView::cursor`] in each
/// heartbeat and hand [`DirectiveView::apply`] the reply to that heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectiveView {
    cursor: Option<DirectivesCursor>,
    directives: BTreeMap<ServiceRef, ServiceDirective>,
}

/// What [`DirectiveView::apply`] did with a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewUpdate {
    /// A whole set replaced the copy.
    Replaced,
    /// A delta patched the copy.
    Patched,
    /// A delta that does not continue this copy (another controller's stream, or a
    /// version behind the copy's): ignored, and the cursor dropped so that the next
    /// heartbeat asks for the whole set.
    Resync,
}

impl DirectiveView {
    /// The cursor to send with the next heartbeat.
    pub fn cursor(&self) -> Option<DirectivesCursor> {
        self.cursor
    }

    /// Applies the reply to a heartbeat that carried [`DirectiveView::cursor`].
    pub fn apply(&mut self, reply: &HeartbeatReply) -> ViewUpdate {
        if !reply.delta {
            self.directives = reply
                .directives
                .iter()
                .map(|d| (d.service.clone(), d.clone()))
                .collect();
            self.cursor = reply.cursor;
            return ViewUpdate::Replaced;
        }
        let continues = match (self.cursor, reply.cursor) {
            (Some(mine), Some(next)) => mine.stream == next.stream && next.version >= mine.version,
            _ => false,
        };
        if !continues {
            self.cursor = None;
            return ViewUpdate::Resync;
        }
        for svc in &reply.removed {
            self.directives.remove(svc);
        }
        for d in &reply.directives {
            self.directives.insert(d.service.clone(), d.clone());
        }
        self.cursor = reply.cursor;
        ViewUpdate::Patched
    }

    /// Every directive, by Service.
    pub fn directives(&self) -> impl ExactSizeIterator<Item = &ServiceDirective> {
        self.directives.values()
    }

    pub fn get(&self, svc: &ServiceRef) -> Option<&ServiceDirective> {
        self.directives.get(svc)
    }

    pub fn len(&self) -> usize {
        self.directives.len()
    }

    pub fn is_empty(&self) -> bool {
        self.directives.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WakeRequest {
    pub node: String,
    pub service: ServiceRef,
    /// Connections held for this Service when the wake-up was sent.
    pub held_connections: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WakeReply {
    /// False when no policy manages this Service (the agent then releases or closes).
    pub accepted: bool,
    pub message: String,
}

/// Open connections to one backend (address and port, as EndpointSlices list it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendLoad {
    pub addr: std::net::SocketAddr,
    pub open: u64,
}

/// A balanced Service's open connections per backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceLoads {
    pub service: ServiceRef,
    #[serde(default)]
    pub backends: Vec<BackendLoad>,
}

/// An agent's balance-mode load: the connections its node has open now to each
/// backend of each balanced Service (backends with none may be left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    pub node: String,
    #[serde(default)]
    pub services: Vec<ServiceLoads>,
}

/// The other nodes' open connections per backend, summed, for the Services of the
/// report (only backends some other node has connections to are listed); reports
/// older than the controller's bound (about two report intervals) are left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReply {
    #[serde(default)]
    pub services: Vec<ServiceLoads>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> ServiceRef {
        ServiceRef {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn directive(name: &str, epoch: u64) -> ServiceDirective {
        ServiceDirective {
            service: svc(name),
            directive: Directive::Follow,
            epoch,
            hold_ports: vec![],
        }
    }

    fn reply(
        delta: bool,
        cursor: Option<(u64, u64)>,
        directives: Vec<ServiceDirective>,
        removed: Vec<ServiceRef>,
    ) -> HeartbeatReply {
        HeartbeatReply {
            directives,
            lease_seconds: 15,
            cursor: cursor.map(|(stream, version)| DirectivesCursor { stream, version }),
            delta,
            removed,
        }
    }

    fn names(view: &DirectiveView) -> Vec<(String, u64)> {
        view.directives()
            .map(|d| (d.service.name.clone(), d.epoch))
            .collect()
    }

    #[test]
    fn a_whole_set_replaces_the_copy_and_a_delta_patches_it() {
        let mut view = DirectiveView::default();
        assert_eq!(view.cursor(), None);
        let full = reply(
            false,
            Some((7, 3)),
            vec![directive("a", 1), directive("b", 2)],
            vec![],
        );
        assert_eq!(view.apply(&full), ViewUpdate::Replaced);
        assert_eq!(
            view.cursor(),
            Some(DirectivesCursor {
                stream: 7,
                version: 3
            })
        );
        let delta = reply(true, Some((7, 5)), vec![directive("c", 4)], vec![svc("a")]);
        assert_eq!(view.apply(&delta), ViewUpdate::Patched);
        assert_eq!(names(&view), vec![("b".into(), 2), ("c".into(), 4)]);
        assert_eq!(view.cursor().map(|c| c.version), Some(5));
        // Nothing changed: an empty delta keeps everything.
        assert_eq!(
            view.apply(&reply(true, Some((7, 5)), vec![], vec![])),
            ViewUpdate::Patched
        );
        assert_eq!(view.len(), 2);
    }

    #[test]
    fn a_delta_of_another_stream_or_behind_the_copy_asks_for_the_whole_set() {
        let mut view = DirectiveView::default();
        view.apply(&reply(false, Some((7, 3)), vec![directive("a", 1)], vec![]));
        let other = reply(true, Some((8, 9)), vec![directive("b", 2)], vec![]);
        assert_eq!(view.apply(&other), ViewUpdate::Resync);
        assert_eq!(
            view.cursor(),
            None,
            "the next heartbeat asks for everything"
        );
        assert_eq!(
            names(&view),
            vec![("a".into(), 1)],
            "the copy is kept meanwhile"
        );

        view.apply(&reply(false, Some((7, 3)), vec![directive("a", 1)], vec![]));
        assert_eq!(
            view.apply(&reply(true, Some((7, 2)), vec![], vec![svc("a")])),
            ViewUpdate::Resync
        );
        // A delta without a cursor, or to a copy without one, never patches.
        let mut fresh = DirectiveView::default();
        assert_eq!(
            fresh.apply(&reply(true, Some((7, 3)), vec![directive("a", 1)], vec![])),
            ViewUpdate::Resync
        );
        assert!(fresh.is_empty());
    }

    #[test]
    fn replies_from_controllers_that_predate_deltas_are_whole_sets() {
        let old: HeartbeatReply = serde_json::from_str(
            r#"{"directives":[{"service":{"namespace":"ns","name":"a"},"directive":"sleep","epoch":4}],"leaseSeconds":15}"#,
        )
        .unwrap();
        assert!(!old.delta && old.cursor.is_none());
        let mut view = DirectiveView::default();
        assert_eq!(view.apply(&old), ViewUpdate::Replaced);
        assert_eq!(view.cursor(), None);
        assert_eq!(
            view.get(&svc("a")).map(|d| d.directive),
            Some(Directive::Sleep)
        );
        // And a heartbeat without a cursor reads as one from an older agent.
        let hb: Heartbeat =
            serde_json::from_str(r#"{"node":"n","instance":"i","services":[]}"#).unwrap();
        assert_eq!(hb.directives_cursor, None);
    }
}
