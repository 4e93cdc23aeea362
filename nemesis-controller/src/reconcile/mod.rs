//! The core: runs every valid ScalingPolicy while this instance leads. Per policy an
//! actor gathers observations (agents' counts, PromQL samples, alerts, wake-ups, the
//! Deployment), calls the pure engine, and applies the decision (the `/scale`
//! subresource, the agents' sleep handshake, status, history, Events). It never decides
//! anything the engine decides, and it always looks again: every policy is evaluated at
//! least every tick, so a missed watch event never strands a Deployment at zero.
//!
//! Leadership: the whole core runs inside a leadership term; losing the Lease drops the
//! term, which aborts every actor at its next await. The cluster-wide caches (policies,
//! HPAs) are kept on every instance from boot (`caches`), so a new term starts from
//! them without relisting; each actor reads its policy's status and watches its own
//! target afresh, and the agents' heartbeats reach every instance.

pub mod actor;
pub mod caches;
pub mod cold_start;
pub mod connections;
pub mod events;
pub mod history;
pub mod hpa;
pub mod inherited_sleep;
pub mod late_wake;
pub mod prom;
pub mod resume;
pub mod status;
pub mod supervisor;
pub mod targets;
pub mod thinning;
pub mod workload;

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::agents::{AgentRegistry, WakeGate, WakeUp};
use crate::alerts::AlertBook;
use crate::holdslice::HoldSlices;
use crate::metrics::ControllerMetrics;

pub use events::EventSink;
pub use history::History;
pub use prom::PromPool;

/// Every API call the core makes gives up after this: a stuck call must not hold a
/// policy's actor (it retries at its next tick).
pub const API_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between retries of a failing policy (API errors back off
/// exponentially from the tick interval up to this).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("scaling {kind} {namespace}/{name} to {replicas}: {}", crate::permissions::explain(.source))]
    ScaleTarget {
        kind: String,
        namespace: String,
        name: String,
        replicas: u32,
        #[source]
        source: kube::Error,
    },
    /// Listing the target by name, to read its generation (see `inherited_sleep`).
    #[error("reading {kind} {namespace}/{name}: {}", crate::permissions::explain(.source))]
    ReadTarget {
        kind: String,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("updating the status of ScalingPolicy {namespace}/{name}: {}", crate::permissions::explain(.source))]
    PatchStatus {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what} did not answer within {after:?}")]
    Timeout { what: String, after: Duration },
}

/// Timing settings of the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub tick: Duration,
    pub sleep_ack_timeout: Duration,
    pub sample_interval: Duration,
    pub status_interval: Duration,
}

/// What every actor shares, for the life of the process.
pub struct Context {
    pub client: Client,
    pub registry: Arc<AgentRegistry>,
    pub wakes: Arc<WakeGate>,
    pub alerts: Arc<AlertBook>,
    pub metrics: ControllerMetrics,
    pub history: History,
    pub events: EventSink,
    pub prom: Arc<PromPool>,
    pub hold_slices: Arc<HoldSlices>,
    pub settings: Settings,
    /// Values-only status writes of every policy share this budget.
    pub status_budget: status::WriteBudget,
    /// True while this instance holds the Lease; checked again right before every scale.
    pub leading: watch::Receiver<bool>,
    /// The Lease's `leaseTransitions` of the term this instance leads (set before
    /// `leading` turns true): the agents' directives are versioned by it.
    pub term: watch::Receiver<u64>,
}

impl Context {
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }
}

/// Runs the core until `shutdown`: a leadership term each time this instance leads.
/// `synced` is `true` while a term's caches are synced (for `/readyz`).
pub async fn run(
    ctx: Arc<Context>,
    mut wake_rx: mpsc::Receiver<WakeUp>,
    synced: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut leading = ctx.leading.clone();
    // Listed and watched from boot, leader or not: a term starts from warm caches.
    let caches = caches::Caches::start(ctx.client.clone());
    loop {
        tokio::select! {
            r = leading.wait_for(|l| *l) => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
        tracing::info!("leading: starting the policy actors");
        // Before any actor writes a directive: the term's versions go on from the copy.
        ctx.registry.begin_term(*ctx.term.borrow());
        {
            let term = supervisor::run_term(ctx.clone(), &caches, &mut wake_rx, &synced);
            tokio::select! {
                _ = term => tracing::error!("a leadership term ended by itself"),
                _ = leading.wait_for(|l| !*l) => tracing::warn!("lost the lead: stopping every policy actor"),
                _ = shutdown.cancelled() => tracing::info!("shutting down: stopping every policy actor"),
            }
            // The term (and with it every actor) is dropped here.
        }
        ctx.wakes.unmanage_all();
        ctx.registry.end_term();
        synced.send_replace(false);
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// Aborts its task when dropped (with the term, or with a policy's actor).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `tick * 2^failures`, capped at [`MAX_BACKOFF`].
pub fn backoff(tick: Duration, failures: u32) -> Duration {
    tick.saturating_mul(1u32 << failures.min(16))
        .min(MAX_BACKOFF)
}
