//! The writer between the actors and the redb history: actors hand records over without
//! waiting (disk I/O never delays a scale), one task commits them on the blocking pool,
//! batching the metric samples of a moment into one transaction, and compacts the store
//! now and then. It decides nothing about what is recorded.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::metrics::{ControllerMetrics, ErrorKind};
use crate::notify::NotifyTap;
use crate::notify::evaluate::Signal;
use crate::store::{
    ColdStartRecord, PolicyId, ScaleRecord, Store, StoreError, TransitionRecord, unix_ms,
};

/// Room for a burst (every policy's samples of one interval plus events) while a commit
/// is in flight; more than that means the disk cannot keep up, and dropping samples
/// beats growing without bound.
const QUEUE: usize = 16 * 1024;
/// Folding raw samples scans the sample table: every ten minutes keeps the raw
/// retention accurate to ten minutes at a negligible cost.
pub const COMPACT_EVERY: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub enum Item {
    Transition(TransitionRecord),
    Scale(ScaleRecord),
    ColdStart(ColdStartRecord),
    Samples {
        at_ms: u64,
        policy: PolicyId,
        values: Vec<(String, f64)>,
    },
}

/// The actors' handle: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct History {
    tx: mpsc::Sender<Item>,
    metrics: ControllerMetrics,
    /// Alert rules see every record too.
    tap: NotifyTap,
}

impl History {
    /// The handle and the writer task (run it until shutdown). `epoch` is the
    /// leadership epoch (`leader::run` sends it each time this instance starts leading):
    /// the writer starts numbering its records in it before it writes the term's first.
    pub fn new(
        store: Arc<Store>,
        metrics: ControllerMetrics,
        epoch: watch::Receiver<u64>,
    ) -> (Self, impl std::future::Future<Output = ()> + Send) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = write_all(store, rx, metrics.clone(), epoch);
        (
            Self {
                tx,
                metrics,
                tap: NotifyTap::default(),
            },
            task,
        )
    }

    /// Hands every record to the alert rules as well.
    pub fn with_tap(mut self, tap: NotifyTap) -> Self {
        self.tap = tap;
        self
    }

    /// Reports something alert rules watch that is not a history record.
    pub fn signal(&self, s: Signal) {
        self.tap.send(s);
    }

    pub fn record(&self, item: Item) {
        if let Some(s) = crate::notify::signal_of(&item) {
            self.tap.send(s);
        }
        if self.tx.try_send(item).is_err() {
            self.metrics.error(ErrorKind::Store);
            tracing::warn!("history queue full; a record was dropped");
        }
    }
}

async fn write_all(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Item>,
    metrics: ControllerMetrics,
    mut epoch: watch::Receiver<u64>,
) {
    let mut compact = tokio::time::interval(COMPACT_EVERY);
    compact.tick().await;
    loop {
        let first = tokio::select! {
            item = rx.recv() => match item {
                Some(i) => i,
                None => return,
            },
            _ = compact.tick() => {
                let store = store.clone();
                let now = unix_ms(SystemTime::now());
                match tokio::task::spawn_blocking(move || store.compact(now)).await {
                    Ok(Ok(report)) => tracing::debug!(?report, "history compacted"),
                    Ok(Err(e)) => {
                        metrics.error(ErrorKind::Store);
                        tracing::warn!(err = %e, "compacting the history failed");
                    }
                    Err(e) => tracing::error!(err = %e, "the compaction task failed"),
                }
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(i) => batch.push(i),
                Err(_) => break,
            }
        }
        // A new term's records are numbered after every record of the previous leaders
        // (the sender publishes the epoch before leadership, so before any record).
        let new_epoch = match epoch.has_changed() {
            Ok(true) => Some(*epoch.borrow_and_update()),
            _ => None,
        };
        let store = store.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut errors = Vec::new();
            if let Some(e) = new_epoch {
                match store.begin_epoch(e) {
                    Ok(next) => tracing::info!(
                        epoch = e,
                        next_seq = next,
                        "history records of this term start here"
                    ),
                    Err(err) => errors.push(err),
                }
            }
            errors.extend(write_batch(&store, batch));
            errors
        })
        .await;
        match result {
            Ok(errors) => {
                for e in errors {
                    metrics.error(ErrorKind::Store);
                    tracing::warn!(err = %e, "writing to the history failed");
                }
            }
            Err(e) => tracing::error!(err = %e, "the history write task failed"),
        }
    }
}

/// Commits a batch: every event on its own, samples of one moment in one transaction.
fn write_batch(store: &Store, batch: Vec<Item>) -> Vec<StoreError> {
    let mut errors = Vec::new();
    let mut samples: std::collections::BTreeMap<u64, Vec<(PolicyId, String, f64)>> =
        Default::default();
    for item in batch {
        let r = match item {
            Item::Transition(t) => store.record_transition(&t).map(drop),
            Item::Scale(s) => store.record_scale(&s).map(drop),
            Item::ColdStart(c) => store.record_cold_start(&c).map(drop),
            Item::Samples {
                at_ms,
                policy,
                values,
            } => {
                let at = samples.entry(at_ms).or_default();
                at.extend(values.into_iter().map(|(m, v)| (policy.clone(), m, v)));
                Ok(())
            }
        };
        if let Err(e) = r {
            errors.push(e);
        }
    }
    for (at_ms, values) in samples {
        let r = store.record_samples(at_ms, values.iter().map(|(p, m, v)| (p, m.as_str(), *v)));
        if let Err(e) = r {
            errors.push(e);
        }
    }
    errors
}
