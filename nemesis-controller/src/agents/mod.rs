//! Everything about the node agents, seen from the controller: who is alive, what each
//! must do with every Service (directives with epochs) and what each has applied, the
//! wake-ups they send, and the HTTP endpoints they call. The controller never dials an
//! agent; scaling decisions belong to the core, not here.

pub mod directives;
pub mod http;
pub mod identity;
pub mod loads;
pub mod registry;
pub mod tls;
pub mod tls_secret;
pub mod wake;

pub use http::{AgentApi, ApiError, agent_routes};
pub use identity::{AgentAuth, AgentIdentity, ReviewConfig, TokenReviewer};
pub use loads::LoadBoard;
pub use registry::{
    AckError, AgentRegistry, AgentStatus, InheritedSleep, RegistryConfig, ServiceActivity,
};
pub use wake::{WakeGate, WakeOutcome, WakeUp};
