//! Balance mode's cluster-wide load: every half second, this node's open connections per
//! backend go to the controller and the other nodes' sums come back into the
//! datapath, where each choice adds them to the node's own counts (read at once in
//! the kernel). It owns only the exchange; the kernel decides where connections go.

use std::sync::Arc;
use std::time::Duration;

use nemesis_common::wire::{BackendLoad, LoadReport, ServiceLoads};

use crate::control::ControllerClient;
use crate::metrics::{LoadExchangeResult, ProxyMetrics};
use crate::services::{self, DatapathServices};

/// How often loads are exchanged. A node's change reaches the controller within one
/// interval (its next report) and another node within one more (that node's next
/// exchange), so the other nodes' counts a choice uses are at most two intervals (plus
/// two calls) old: half a second each keeps that within the second the load-balancing
/// issue asks for.
pub const LOAD_REPORT_INTERVAL: Duration = Duration::from_millis(500);
const _: () = assert!(
    LOAD_REPORT_INTERVAL.as_millis() * 2 <= 1000,
    "two exchanges must fit in the second the issue allows"
);

/// Remote loads older than this are dropped when the controller cannot be reached:
/// as the controller's own bound, a stale picture must not steer choices for long.
pub const REMOTE_LOAD_MAX_AGE: Duration = Duration::from_secs(3);

/// The exchange loop of one agent.
pub struct LoadExchange {
    pub client: ControllerClient,
    pub node: String,
    pub services: Arc<DatapathServices>,
    pub every: Duration,
    /// Where each exchange is counted (`nemesis_agent_load_exchanges_total`).
    pub metrics: ProxyMetrics,
}

impl LoadExchange {
    /// Never ends. A failed call leaves the last remote loads in place for up to
    /// [`REMOTE_LOAD_MAX_AGE`], then clears them (choices use this node's counts only).
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut fresh_at: Option<tokio::time::Instant> = None;
        loop {
            tick.tick().await;
            let report = match self.report() {
                Ok(r) => r,
                Err(error) => {
                    tracing::debug!(%error, "no load report this round");
                    continue;
                }
            };
            match self.client.loads(&report).await {
                Ok(reply) => {
                    failing = false;
                    fresh_at = Some(tokio::time::Instant::now());
                    if let Err(err) = self.services.set_remote_loads(&reply.services) {
                        tracing::warn!(error = %services::error_chain(&err), "other nodes' load not written to the datapath");
                    }
                    // Counted once the datapath has the reply: a count seen means its
                    // loads are what choices use.
                    self.metrics.load_exchange(LoadExchangeResult::Ok);
                }
                Err(err) => {
                    self.metrics.load_exchange(LoadExchangeResult::Failed);
                    if !failing {
                        failing = true;
                        tracing::warn!(%err, "load exchange with the controller failed; choices use this node's counts and, for a few seconds, the last remote ones");
                    }
                    if fresh_at.is_some_and(|t| t.elapsed() > REMOTE_LOAD_MAX_AGE) {
                        fresh_at = None;
                        if let Err(err) = self.services.set_remote_loads(&[]) {
                            tracing::warn!(error = %services::error_chain(&err), "stale remote load not cleared");
                        }
                    }
                }
            }
        }
    }

    fn report(&self) -> Result<LoadReport, String> {
        let counters = self
            .services
            .backend_counters()
            .map_err(|e| services::error_chain(&e))?;
        Ok(LoadReport {
            node: self.node.clone(),
            services: counters
                .into_iter()
                .map(|(service, list)| ServiceLoads {
                    service,
                    backends: list
                        .into_iter()
                        .filter(|(_, open)| *open > 0)
                        .map(|(addr, open)| BackendLoad { addr, open })
                        .collect(),
                })
                .collect(),
        })
    }
}
