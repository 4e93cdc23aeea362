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
    /// On a `Follow`: the target was scaled to zero since the Service's last `Sleep`
    /// (that sleep completed; this is the wake). The backends an agent listed during the
    /// sleep are the ones the scale stopped, even while its view of the endpoints still
    /// lists them: it sends them nothing new and keeps holding until it sees them go.
    /// False on a sleep given up (its backends stay) and from controllers that predate it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub after_zero: bool,
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
    /// The agent takes directives in pages (see [`HeartbeatReply::more`]). Agents that
    /// predate pages get a whole set, or any delta, in one reply.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pages: bool,
    /// Numbers this heartbeat's reports (rising per agent process). A reply naming it in
    /// [`HeartbeatReply::reports_seq`] says the controller holds them as this agent's, so
    /// the next heartbeat may send only what changed since (see `reports_since`).
    /// Absent from agents that predate report deltas: every heartbeat has every report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reports_seq: Option<u64>,
    /// Present: `services` holds only the reports that differ from those of the
    /// heartbeat numbered so, plus every report showing open, accepted-open or held
    /// connections (changed or not, so that activity is seen on every beat), and `gone`
    /// the Services dropped since. A controller not holding exactly those reports
    /// answers without `reports_seq`, and the agent sends all of them at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reports_since: Option<u64>,
    /// With `reports_since`: Services reported then and not any more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gone: Vec<ServiceRef>,
}

/// A bound on what one [`Heartbeat`] may list in `services` plus `gone` (the agent API
/// refuses more): a full report at 10,000 Services is about 2.5 MB, so an agent that
/// knows more than this many Services must rely on report deltas.
pub const MAX_HEARTBEAT_REPORTS: usize = 30_000;

impl ServiceReport {
    /// Whether the report shows connections open or held now: such reports travel in
    /// every heartbeat, changed or not (the controller refreshes activity from them).
    pub fn is_active(&self) -> bool {
        self.open_connections > 0 || self.accepted_open > 0 || self.held_connections > 0
    }
}

fn ready_by_default() -> bool {
    true
}

/// A point in a controller's sequence of directive changes: `stream` names the sequence
/// (random, so a controller never takes another sequence's version for its own; a new
/// leader that holds a copy of the old one's sequence goes on in it) and `version`, which
/// rises with the changes, says where in it. Opaque to agents: they send back the last
/// one they got.
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
    /// More changes follow this reply (only to agents that take `pages`): the agent
    /// applies this one and asks again at once with the reply's cursor. A reply is at
    /// most [`MAX_PAGE_DIRECTIVES`] directives, so that a whole set of 10,000 (after a
    /// controller change) or a mass change travels in bounded pieces.
    #[serde(default, skip_serializing_if = "is_false")]
    pub more: bool,
    /// The `reports_seq` of the heartbeat whose reports the controller now holds for this
    /// agent. Absent: it holds none the agent can send changes against (an older
    /// controller, a new leader, or a delta against reports it does not hold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reports_seq: Option<u64>,
}

/// The most directives (and removals) one paged reply carries: about 130 KB.
pub const MAX_PAGE_DIRECTIVES: usize = 1000;

fn is_false(b: &bool) -> bool {
    !*b
}

/// An agent's copy of the controller's directives, kept in step by heartbeat replies:
/// a whole set replaces it, a delta patches it. Send [`DirectiveView::cursor`] in each
/// heartbeat and hand [`DirectiveView::apply`] the reply to that heartbeat.
///
/// A paged reply (`more`) is applied to a copy being built while the one in use stays
/// as it was: a whole set arriving in pieces never leaves the agent with half of it
/// (hold listeners of the missing half closed). [`DirectiveView::directives`] is the
/// copy in use; the one being built takes its place with the last page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectiveView {
    cursor: Option<DirectivesCursor>,
    directives: BTreeMap<ServiceRef, ServiceDirective>,
    /// A whole set (and the changes since) arriving in pages, until the last one.
    building: Option<BTreeMap<ServiceRef, ServiceDirective>>,
}

/// What [`DirectiveView::apply`] did with a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewUpdate {
    /// A whole set replaced the copy (in one reply, or with the last of its pages).
    Replaced,
    /// A delta patched the copy.
    Patched,
    /// A page was taken; more follow (ask again at once with the new cursor).
    Partial,
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
        let target = if !reply.delta {
            // A whole set (or its first page) starts a new copy.
            self.building.insert(BTreeMap::new())
        } else {
            let continues = match (self.cursor, reply.cursor) {
                (Some(mine), Some(next)) => {
                    mine.stream == next.stream && next.version >= mine.version
                }
                _ => false,
            };
            if !continues {
                self.cursor = None;
                self.building = None;
                return ViewUpdate::Resync;
            }
            match &mut self.building {
                Some(b) => b,
                None => &mut self.directives,
            }
        };
        for svc in &reply.removed {
            target.remove(svc);
        }
        for d in &reply.directives {
            target.insert(d.service.clone(), d.clone());
        }
        self.cursor = reply.cursor;
        if reply.more {
            return ViewUpdate::Partial;
        }
        match self.building.take() {
            Some(whole) => {
                self.directives = whole;
                ViewUpdate::Replaced
            }
            None => ViewUpdate::Patched,
        }
    }

    /// Whether a paged set is still arriving (the copy in use is the previous one).
    pub fn is_building(&self) -> bool {
        self.building.is_some()
    }

    /// Every directive of the copy in use, by Service.
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

/// An agent's side of report deltas: which reports the controller holds (the last
/// heartbeat it acknowledged), so that a heartbeat carries only what changed since,
/// with every report now and then and whenever the controller holds none.
#[derive(Debug, Clone, Default)]
pub struct ReportDeltas {
    seq: u64,
    /// The reports the controller said it holds, and their number.
    acked: Option<(u64, BTreeMap<ServiceRef, ServiceReport>)>,
    /// The reports of the heartbeat awaiting its reply.
    sent: Option<(u64, BTreeMap<ServiceRef, ServiceReport>)>,
    /// Deltas sent since the last full report.
    deltas: u32,
}

/// Every this many heartbeats the reports go whole even when the controller holds them
/// (about 5 minutes at 5 s): a bound on how long any divergence could last.
pub const FULL_REPORTS_EVERY: u32 = 60;

impl ReportDeltas {
    /// Puts `reports` in `hb`: all of them, or only the changes since the reports the
    /// controller holds (see [`Heartbeat::reports_since`]), and numbers them.
    pub fn prepare(&mut self, hb: &mut Heartbeat, reports: Vec<ServiceReport>) {
        self.seq += 1;
        let current: BTreeMap<ServiceRef, ServiceReport> = reports
            .into_iter()
            .map(|r| (r.service.clone(), r))
            .collect();
        hb.reports_seq = Some(self.seq);
        match &self.acked {
            Some((seq, acked)) if self.deltas < FULL_REPORTS_EVERY => {
                self.deltas += 1;
                hb.reports_since = Some(*seq);
                hb.services = current
                    .values()
                    .filter(|r| r.is_active() || acked.get(&r.service) != Some(*r))
                    .cloned()
                    .collect();
                hb.gone = acked
                    .keys()
                    .filter(|s| !current.contains_key(*s))
                    .cloned()
                    .collect();
            }
            _ => {
                self.deltas = 0;
                hb.reports_since = None;
                hb.services = current.values().cloned().collect();
                hb.gone = Vec::new();
            }
        }
        self.sent = Some((self.seq, current));
    }

    /// Takes the reply to the heartbeat last prepared. True: it was a delta the
    /// controller could not take (it holds other reports): send a heartbeat at once,
    /// which carries every report.
    pub fn acknowledge(&mut self, reply: &HeartbeatReply) -> bool {
        let was_delta = self.deltas > 0;
        match self.sent.take() {
            Some((seq, reports)) if reply.reports_seq == Some(seq) => {
                self.acked = Some((seq, reports));
                false
            }
            _ => {
                self.acked = None;
                self.deltas = 0;
                was_delta && reply.reports_seq.is_none()
            }
        }
    }

    /// The heartbeat last prepared got no reply: the controller may hold its reports or
    /// the acknowledged ones, so the next heartbeat carries every report.
    pub fn failed(&mut self) {
        self.sent = None;
        self.acked = None;
        self.deltas = 0;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WakeRequest {
    pub node: String,
    pub service: ServiceRef,
    /// Connections held for this Service when the wake-up was sent.
    pub held_connections: u32,
    /// The directive epoch this agent had applied for the Service when its wake-up
    /// flight began (every send of the flight carries the same). A controller that woke
    /// the target from zero since (its `Follow` after zero has a higher epoch) knows the
    /// flight's connections are answered, and does not count a late wake-up as new
    /// demand. Absent from agents that predate it and while no directive was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_epoch: Option<u64>,
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

    #[test]
    fn a_wake_up_sends_its_applied_epoch_only_when_set_and_reads_an_old_agents() {
        let old = r#"{"node":"n","service":{"namespace":"ns","name":"web"},"heldConnections":2}"#;
        let req: WakeRequest = serde_json::from_str(old).unwrap();
        assert_eq!(req.applied_epoch, None);
        assert_eq!(serde_json::to_string(&req).unwrap(), old);
        let new = WakeRequest {
            applied_epoch: Some(7),
            ..req
        };
        let text = serde_json::to_string(&new).unwrap();
        assert!(text.contains(r#""appliedEpoch":7"#), "{text}");
        assert_eq!(serde_json::from_str::<WakeRequest>(&text).unwrap(), new);
    }

    fn directive(name: &str, epoch: u64) -> ServiceDirective {
        ServiceDirective {
            service: svc(name),
            directive: Directive::Follow,
            epoch,
            hold_ports: vec![],
            after_zero: false,
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
            more: false,
            reports_seq: None,
        }
    }

    fn names(view: &DirectiveView) -> Vec<(String, u64)> {
        view.directives()
            .map(|d| (d.service.name.clone(), d.epoch))
            .collect()
    }

    #[test]
    fn after_zero_is_false_from_old_controllers_and_sent_only_when_set() {
        let old: ServiceDirective = serde_json::from_str(
            r#"{"service":{"namespace":"ns","name":"a"},"directive":"follow","epoch":3}"#,
        )
        .unwrap();
        assert!(!old.after_zero);
        assert!(!serde_json::to_string(&old).unwrap().contains("afterZero"));
        let woken = ServiceDirective {
            after_zero: true,
            ..old
        };
        let text = serde_json::to_string(&woken).unwrap();
        assert!(text.contains(r#""afterZero":true"#), "{text}");
        assert_eq!(
            serde_json::from_str::<ServiceDirective>(&text).unwrap(),
            woken
        );
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

    fn report(name: &str, connects_total: u64, open: u64) -> ServiceReport {
        ServiceReport {
            service: svc(name),
            mode: AppliedMode::Hold,
            applied_epoch: 0,
            connects_total,
            open_connections: open,
            closed_total: 0,
            held_connections: 0,
            accepted_total: 0,
            accepted_open: 0,
            hold_ports: vec![],
            holds_total: 0,
            holds_refused_total: 0,
            proxy_errors: ProxyErrors::default(),
        }
    }

    fn beat() -> Heartbeat {
        serde_json::from_str(r#"{"node":"n","instance":"i","services":[]}"#).unwrap()
    }

    fn acked(seq: Option<u64>) -> HeartbeatReply {
        HeartbeatReply {
            reports_seq: seq,
            ..reply(true, Some((1, 1)), vec![], vec![])
        }
    }

    fn listed(hb: &Heartbeat) -> Vec<(String, u64)> {
        hb.services
            .iter()
            .map(|r| (r.service.name.clone(), r.connects_total))
            .collect()
    }

    #[test]
    fn reports_go_whole_until_acknowledged_and_then_as_changes_with_the_active_ones() {
        let mut d = ReportDeltas::default();
        let mut hb = beat();
        d.prepare(
            &mut hb,
            vec![report("a", 1, 0), report("b", 1, 0), report("c", 0, 2)],
        );
        assert_eq!((hb.reports_seq, hb.reports_since), (Some(1), None));
        assert_eq!(hb.services.len(), 3);
        assert!(!d.acknowledge(&acked(Some(1))));
        // b changed; c is unchanged but has open connections; a is unchanged.
        let mut hb = beat();
        d.prepare(
            &mut hb,
            vec![report("a", 1, 0), report("b", 5, 0), report("c", 0, 2)],
        );
        assert_eq!((hb.reports_seq, hb.reports_since), (Some(2), Some(1)));
        assert_eq!(listed(&hb), vec![("b".into(), 5), ("c".into(), 0)]);
        assert!(hb.gone.is_empty());
        assert!(!d.acknowledge(&acked(Some(2))));
        let mut hb = beat();
        d.prepare(&mut hb, vec![report("b", 5, 0)]);
        assert_eq!(hb.reports_since, Some(2));
        assert!(hb.services.is_empty());
        assert_eq!(hb.gone, vec![svc("a"), svc("c")]);
        // The controller does not hold them (another leader): all of them at once.
        assert!(d.acknowledge(&acked(None)));
        let mut hb = beat();
        d.prepare(&mut hb, vec![report("b", 5, 0)]);
        assert_eq!((hb.reports_since, hb.services.len()), (None, 1));
        assert!(!d.acknowledge(&acked(Some(4))));
        // A lost reply: all of them again.
        let mut hb = beat();
        d.prepare(&mut hb, vec![report("b", 6, 0)]);
        assert_eq!(hb.reports_since, Some(4));
        d.failed();
        let mut hb = beat();
        d.prepare(&mut hb, vec![report("b", 6, 0)]);
        assert_eq!(hb.reports_since, None);
    }

    #[test]
    fn reports_go_whole_now_and_then_and_always_to_controllers_that_predate_deltas() {
        let mut d = ReportDeltas::default();
        let mut wholes = 0;
        for seq in 1..=(2 * (FULL_REPORTS_EVERY as u64 + 1) + 1) {
            let mut hb = beat();
            d.prepare(&mut hb, vec![report("a", 0, 0)]);
            wholes += usize::from(hb.reports_since.is_none());
            d.acknowledge(&acked(Some(seq)));
        }
        assert_eq!(wholes, 3);
        // An old controller never names the reports: never a delta, never a resend.
        let mut d = ReportDeltas::default();
        for _ in 0..3 {
            let mut hb = beat();
            d.prepare(&mut hb, vec![report("a", 0, 0)]);
            assert_eq!(hb.reports_since, None);
            assert!(!d.acknowledge(&acked(None)));
        }
        // And an old agent's heartbeat reads as whole reports.
        let hb = beat();
        assert_eq!(
            (hb.reports_seq, hb.reports_since, hb.pages),
            (None, None, false)
        );
    }

    #[test]
    fn a_paged_whole_set_replaces_the_copy_only_with_its_last_page() {
        let mut view = DirectiveView::default();
        view.apply(&reply(
            false,
            Some((7, 3)),
            vec![directive("old", 1)],
            vec![],
        ));
        let page = |delta, version, directives, removed, more| HeartbeatReply {
            more,
            ..reply(delta, Some((8, version)), directives, removed)
        };
        assert_eq!(
            view.apply(&page(
                false,
                2,
                vec![directive("a", 1), directive("b", 2)],
                vec![],
                true
            )),
            ViewUpdate::Partial
        );
        assert!(view.is_building());
        assert_eq!(names(&view), vec![("old".into(), 1)]);
        assert_eq!(view.cursor().map(|c| (c.stream, c.version)), Some((8, 2)));
        assert_eq!(
            view.apply(&page(
                true,
                5,
                vec![directive("c", 3)],
                vec![svc("a")],
                true
            )),
            ViewUpdate::Partial
        );
        assert_eq!(
            view.apply(&page(true, 6, vec![directive("d", 6)], vec![], false)),
            ViewUpdate::Replaced
        );
        assert!(!view.is_building());
        assert_eq!(
            names(&view),
            vec![("b".into(), 2), ("c".into(), 3), ("d".into(), 6)]
        );
        // A new whole set mid-run starts the copy over; a resync drops it.
        view.apply(&page(false, 2, vec![directive("x", 1)], vec![], true));
        view.apply(&page(false, 1, vec![directive("y", 1)], vec![], true));
        assert_eq!(
            view.apply(&page(true, 9, vec![directive("z", 2)], vec![], false)),
            ViewUpdate::Replaced
        );
        assert_eq!(names(&view), vec![("y".into(), 1), ("z".into(), 2)]);
        view.apply(&page(false, 1, vec![directive("p", 1)], vec![], true));
        let foreign = HeartbeatReply {
            more: false,
            ..reply(true, Some((9, 9)), vec![], vec![])
        };
        assert_eq!(view.apply(&foreign), ViewUpdate::Resync);
        assert!(!view.is_building());
        assert_eq!(names(&view), vec![("y".into(), 1), ("z".into(), 2)]);
    }
}
