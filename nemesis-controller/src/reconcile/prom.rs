//! PromQL sources polled in the background, one task per source at its own interval, so
//! an evaluation (and a wake-up above all) never waits for Prometheus. A failed query
//! leaves the sample missing at once (the engine then applies the source's fallback,
//! or holds), is counted by reason, and a source that starts or stops failing is
//! signalled to the alert rules. Polling only; what a value means is the engine's
//! business.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

use super::history::History;
use crate::engine::Sample;
use crate::metrics::ControllerMetrics;
use crate::notify::evaluate::Signal;
use crate::policy::CompiledSource;
use crate::prometheus::{PromClient, PromError, PromFailure};
use crate::store::PolicyId;

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(
        "no Prometheus to ask: set `server` on the source or start the controller with --prometheus-url"
    )]
    NoServer,
    #[error(transparent)]
    Query(#[from] PromError),
}

/// PromQL clients by (base URL, timeout), shared by every policy.
#[derive(Debug)]
pub struct PromPool {
    default_url: Option<String>,
    clients: Mutex<HashMap<(String, Duration), PromClient>>,
}

impl PromPool {
    pub fn new(default_url: Option<String>) -> Self {
        Self {
            default_url,
            clients: Mutex::default(),
        }
    }

    /// The client for a source: its own `server`, else the controller's default.
    pub fn client(&self, server: Option<&str>, timeout: Duration) -> Result<PromClient, PollError> {
        let url = server
            .or(self.default_url.as_deref())
            .ok_or(PollError::NoServer)?;
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let key = (url.to_string(), timeout);
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let c = PromClient::new(url, timeout)?;
        clients.insert(key, c.clone());
        Ok(c)
    }
}

/// Why a source's latest query failed, as the status and alerts tell it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceError {
    pub failure: PromFailure,
    pub message: String,
}

impl PollError {
    pub fn failure(&self) -> PromFailure {
        match self {
            PollError::NoServer => PromFailure::Config,
            PollError::Query(e) => e.failure(),
        }
    }
}

#[derive(Debug, Default)]
struct Slots {
    samples: Vec<Option<Sample>>,
    errors: Vec<Option<SourceError>>,
    /// Whether each source has had a result yet (its first one is always signalled, so
    /// an alert a previous leader left firing is resolved).
    answered: Vec<bool>,
    /// The poller was dropped: its sources no longer count as failing anywhere.
    closed: bool,
}

/// What a poller's tasks share besides the slots.
#[derive(Clone)]
struct Shared {
    policy: PolicyId,
    pool: Arc<PromPool>,
    slots: Arc<Mutex<Slots>>,
    changed: Arc<Notify>,
    metrics: ControllerMetrics,
    history: History,
}

/// The latest sample of each source of one policy; dropping it stops the polling.
pub struct Poller {
    shared: Shared,
    sources: Vec<String>,
    _tasks: Vec<AbortOnDropHandle<()>>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller")
            .field("policy", &self.shared.policy)
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

impl Poller {
    /// Starts one task per source; `changed` is notified whenever a value or a source's
    /// failure changes. A source that starts failing (or answering again) is signalled
    /// to the alert rules (`PrometheusFailing`) through `history`.
    pub fn start(
        policy: PolicyId,
        pool: Arc<PromPool>,
        sources: &[CompiledSource],
        changed: Arc<Notify>,
        metrics: ControllerMetrics,
        history: History,
    ) -> Self {
        let shared = Shared {
            policy,
            pool,
            slots: Arc::new(Mutex::new(Slots {
                samples: vec![None; sources.len()],
                errors: vec![None; sources.len()],
                answered: vec![false; sources.len()],
                closed: false,
            })),
            changed,
            metrics,
            history,
        };
        let tasks = sources
            .iter()
            .enumerate()
            .map(|(i, src)| {
                AbortOnDropHandle::new(tokio::spawn(poll_source(i, src.clone(), shared.clone())))
            })
            .collect();
        Self {
            shared,
            sources: sources.iter().map(|s| s.name.clone()).collect(),
            _tasks: tasks,
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.shared.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One entry per source, in the policy's order (`Observations::sources`).
    pub fn samples(&self) -> Vec<Option<Sample>> {
        self.slots().samples.clone()
    }

    /// The latest error of each failing source, by source index.
    pub fn errors(&self) -> Vec<(usize, SourceError)> {
        self.slots()
            .errors
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.clone().map(|e| (i, e)))
            .collect()
    }
}

impl Drop for Poller {
    /// The policy was deleted or edited, or this instance stopped leading: its failing
    /// sources stop counting, and their alerts resolve (an edited policy that still
    /// fails raises them again at its first query).
    fn drop(&mut self) {
        let failing: Vec<String> = {
            let mut s = self.slots();
            s.closed = true;
            s.errors
                .iter()
                .zip(&self.sources)
                .filter(|(e, _)| e.is_some())
                .map(|(_, n)| n.clone())
                .collect()
        };
        self.shared
            .metrics
            .prometheus_failing_sources_add(-(failing.len() as i64));
        for source in failing {
            self.shared.history.signal(Signal::PrometheusAnswering {
                policy: self.shared.policy.clone(),
                source,
            });
        }
    }
}

async fn poll_source(i: usize, src: CompiledSource, sh: Shared) {
    let interval = src.interval.max(Duration::from_millis(100));
    loop {
        let result = match sh.pool.client(src.server.as_deref(), src.timeout) {
            Ok(c) => c.query(&src.query).await.map_err(PollError::from),
            Err(e) => Err(e),
        };
        let (sample, error) = match result {
            Ok(value) => (
                Some(Sample {
                    value,
                    at: Utc::now(),
                }),
                None,
            ),
            Err(e) => {
                sh.metrics.prometheus_failed(e.failure());
                let error = SourceError {
                    failure: e.failure(),
                    message: e.to_string(),
                };
                (None, Some(error))
            }
        };
        let (differs, signal) = {
            let mut s = sh.slots.lock().unwrap_or_else(|e| e.into_inner());
            if s.closed {
                return;
            }
            let old_value = s.samples[i].map(|x| x.value);
            let new_value = sample.map(|x| x.value);
            let was_failing = s.errors[i].is_some();
            let first = !s.answered[i];
            s.answered[i] = true;
            // A new kind of failure (refused, then timing out) is news for the status
            // and the alert's summary.
            let failure_changed =
                s.errors[i].as_ref().map(|e| e.failure) != error.as_ref().map(|e| e.failure);
            let mut signal = None;
            if failure_changed || first {
                match &error {
                    Some(e) => {
                        tracing::warn!(policy = %sh.policy, source = %src.name, reason = e.failure.as_str(), err = %e.message, fallback = ?src.fallback, "PromQL source failing")
                    }
                    None if !first => {
                        tracing::info!(policy = %sh.policy, source = %src.name, "PromQL source answering again")
                    }
                    None => {}
                }
                // Under the lock, so a concurrent drop never counts a source twice.
                match (was_failing, error.is_some()) {
                    (false, true) => sh.metrics.prometheus_failing_sources_add(1),
                    (true, false) => sh.metrics.prometheus_failing_sources_add(-1),
                    _ => {}
                }
                signal = Some(match &error {
                    Some(e) => Signal::PrometheusFailing {
                        policy: sh.policy.clone(),
                        source: src.name.clone(),
                        message: e.message.clone(),
                        fallback: src.fallback,
                    },
                    None => Signal::PrometheusAnswering {
                        policy: sh.policy.clone(),
                        source: src.name.clone(),
                    },
                });
            }
            s.samples[i] = sample;
            s.errors[i] = error;
            (old_value != new_value || failure_changed, signal)
        };
        if let Some(sig) = signal {
            sh.history.signal(sig);
        }
        if differs {
            sh.changed.notify_one();
        }
        tokio::time::sleep(interval).await;
    }
}
