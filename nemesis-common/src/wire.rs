//! Messages between agents and the controller (JSON over HTTP, bearer token from a
//! Secret). The agent calls the controller; the controller never dials agents, so an
//! agent behind any network path works and a restarted controller needs no agent list.
//!
//! - `POST /v1/agents/heartbeat` with [`Heartbeat`] -> [`HeartbeatReply`]: registers the
//!   agent, reports what it applied and its per-Service counters, and fetches the
//!   desired directives. Sent every few seconds, and at once after a change.
//! - `POST /v1/agents/wake` with [`WakeRequest`] -> [`WakeReply`]: the first held
//!   connection of a Service (single flight per Service on the agent).

use serde::{Deserialize, Serialize};

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// The node the agent runs on (unique per agent).
    pub node: String,
    /// Random per agent process, so the controller sees a restart.
    pub instance: String,
    pub services: Vec<ServiceReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatReply {
    pub directives: Vec<ServiceDirective>,
    /// How long until the controller considers this agent dead without a heartbeat.
    pub lease_seconds: u32,
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
