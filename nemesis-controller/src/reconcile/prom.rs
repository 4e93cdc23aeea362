//! PromQL sources polled in the background, one task per source at its own interval, so
//! an evaluation (and a wake-up above all) never waits for Prometheus. A failed query
//! leaves the sample missing at once (the engine then applies the source's fallback,
//! or holds). Polling only; what a value means is the engine's business.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

use crate::engine::Sample;
use crate::metrics::{ControllerMetrics, ErrorKind};
use crate::policy::CompiledSource;
use crate::prometheus::{PromClient, PromError};

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

#[derive(Debug, Default)]
struct Slots {
    samples: Vec<Option<Sample>>,
    errors: Vec<Option<String>>,
}

/// The latest sample of each source of one policy; dropping it stops the polling.
#[derive(Debug)]
pub struct Poller {
    slots: Arc<Mutex<Slots>>,
    _tasks: Vec<AbortOnDropHandle<()>>,
}

impl Poller {
    /// Starts one task per source; `changed` is notified whenever a value changes.
    pub fn start(
        pool: Arc<PromPool>,
        sources: &[CompiledSource],
        changed: Arc<Notify>,
        metrics: ControllerMetrics,
    ) -> Self {
        let slots = Arc::new(Mutex::new(Slots {
            samples: vec![None; sources.len()],
            errors: vec![None; sources.len()],
        }));
        let tasks = sources
            .iter()
            .enumerate()
            .map(|(i, src)| {
                let fut = poll_source(
                    i,
                    src.clone(),
                    pool.clone(),
                    slots.clone(),
                    changed.clone(),
                    metrics.clone(),
                );
                AbortOnDropHandle::new(tokio::spawn(fut))
            })
            .collect();
        Self {
            slots,
            _tasks: tasks,
        }
    }

    /// One entry per source, in the policy's order (`Observations::sources`).
    pub fn samples(&self) -> Vec<Option<Sample>> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .samples
            .clone()
    }

    /// The latest error of each failing source, by source index.
    pub fn errors(&self) -> Vec<(usize, String)> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .errors
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.clone().map(|e| (i, e)))
            .collect()
    }
}

async fn poll_source(
    i: usize,
    src: CompiledSource,
    pool: Arc<PromPool>,
    slots: Arc<Mutex<Slots>>,
    changed: Arc<Notify>,
    metrics: ControllerMetrics,
) {
    let interval = src.interval.max(Duration::from_millis(100));
    loop {
        let result = match pool.client(src.server.as_deref(), src.timeout) {
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
                metrics.error(ErrorKind::PrometheusQuery);
                (None, Some(e.to_string()))
            }
        };
        let differs = {
            let mut s = slots.lock().unwrap_or_else(|e| e.into_inner());
            let old_value = s.samples[i].map(|x| x.value);
            let new_value = sample.map(|x| x.value);
            if s.errors[i] != error {
                match &error {
                    Some(e) => {
                        tracing::warn!(source = %src.name, err = %e, "PromQL source failing")
                    }
                    None => tracing::info!(source = %src.name, "PromQL source answering again"),
                }
            }
            s.samples[i] = sample;
            s.errors[i] = error;
            old_value != new_value
        };
        if differs {
            changed.notify_one();
        }
        tokio::time::sleep(interval).await;
    }
}
