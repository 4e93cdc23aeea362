//! The writer between the actors and the redb history: actors hand records over without
//! waiting (disk I/O never delays a scale), one task commits them on the blocking pool,
//! batching the metric samples of a moment into one transaction, and compacts the store
//! now and then. It decides nothing about what is recorded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::metrics::{ControllerMetrics, ErrorKind};
use crate::notify::NotifyTap;
use crate::notify::evaluate::Signal;
use crate::reconcile::thinning::Thinning;
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
    store: Arc<Store>,
    /// The newest transition handed over per policy, committed or not (a record waiting
    /// in the queue or for the disk still says where the policy is).
    latest: Arc<Mutex<HashMap<PolicyId, TransitionRecord>>>,
    /// The same for scale records.
    latest_scale: Arc<Mutex<HashMap<PolicyId, ScaleRecord>>>,
    /// Which samples reach the disk (alert rules see them all).
    thinning: Arc<Mutex<Thinning>>,
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
        let task = write_all(store.clone(), rx, metrics.clone(), epoch);
        (
            Self {
                tx,
                metrics,
                tap: NotifyTap::default(),
                store,
                latest: Arc::default(),
                latest_scale: Arc::default(),
                thinning: Arc::default(),
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

    /// The newest transition of `policy` this instance knows: the newer of the one this
    /// process recorded and its store's (its own earlier terms', or the records pulled
    /// from the leader since: this process may have led an earlier term, and a later
    /// leader's record must win over its own older one). A new term compares it with the
    /// status, which may not have caught up.
    pub fn latest_transition(&self, policy: &PolicyId) -> Option<TransitionRecord> {
        let mine = self
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(policy)
            .cloned();
        let stored = match self.store.latest_transition(policy) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(%policy, err = %e, "reading the latest transition from the history failed");
                None
            }
        };
        newer(mine, stored, |t| t.at_ms)
    }

    /// The newest scale of `policy` this instance knows (as [`Self::latest_transition`]):
    /// a new term compares it with the target to find a change no record holds.
    /// The newer of the two wins: this process may have led an earlier term, and its
    /// store hold the later leaders' records pulled since.
    pub fn latest_scale(&self, policy: &PolicyId) -> Option<ScaleRecord> {
        let mine = self
            .latest_scale
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(policy)
            .cloned();
        let stored = match self.store.latest_scale(policy) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%policy, err = %e, "reading the latest scale from the history failed");
                None
            }
        };
        newer(mine, stored, |s| s.at_ms)
    }

    pub fn record(&self, item: Item) {
        match &item {
            Item::Transition(t) => {
                let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
                if latest.get(&t.policy).is_none_or(|old| old.at_ms <= t.at_ms) {
                    latest.insert(t.policy.clone(), t.clone());
                }
            }
            Item::Scale(s) => {
                let mut latest = self.latest_scale.lock().unwrap_or_else(|e| e.into_inner());
                if latest.get(&s.policy).is_none_or(|old| old.at_ms <= s.at_ms) {
                    latest.insert(s.policy.clone(), s.clone());
                }
            }
            _ => {}
        }
        if let Some(s) = crate::notify::signal_of(&item) {
            self.tap.send(s);
        }
        let Item::Samples {
            at_ms,
            policy,
            values,
        } = &item
        else {
            return self.enqueue(item);
        };
        let kept = self
            .thinning
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keep(*at_ms, policy, values);
        for (at_ms, policy, values) in kept {
            self.enqueue(Item::Samples {
                at_ms,
                policy,
                values,
            });
        }
    }

    fn enqueue(&self, item: Item) {
        if self.tx.try_send(item).is_err() {
            self.metrics.error(ErrorKind::Store);
            tracing::warn!("history queue full; a record was dropped");
        }
    }
}

/// The later of a record this process holds and one its store holds (ties: this
/// process's, which may not be committed yet).
fn newer<T>(mine: Option<T>, stored: Option<T>, at_ms: impl Fn(&T) -> u64) -> Option<T> {
    match (mine, stored) {
        (Some(m), Some(s)) if at_ms(&s) > at_ms(&m) => Some(s),
        (Some(m), _) => Some(m),
        (None, s) => s,
    }
}

/// Events whose write failed wait here for the disk (a full volume) and are written
/// first once it takes writes again; beyond this many the oldest are dropped.
const RETRY_CAP: usize = 4096;
/// With records waiting, the disk is tried again this often even if nothing new comes.
const RETRY_EVERY: Duration = Duration::from_secs(1);

async fn write_all(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Item>,
    metrics: ControllerMetrics,
    mut epoch: watch::Receiver<u64>,
) {
    let mut compact = tokio::time::interval(COMPACT_EVERY);
    compact.tick().await;
    // A new term's epoch the store has not taken yet (the disk refused it): nothing is
    // written before it is, so no record is numbered in a previous leader's epoch.
    let mut pending_epoch: Option<u64> = None;
    let mut waiting: std::collections::VecDeque<Item> = Default::default();
    // Failed writes since the last that went through.
    let mut failing: u64 = 0;
    let mut closed = false;
    loop {
        if closed {
            if !waiting.is_empty() {
                tracing::warn!(
                    records = waiting.len(),
                    "shutting down with history records the disk did not take"
                );
            }
            return;
        }
        let first = tokio::select! {
            item = rx.recv(), if !closed => match item {
                Some(i) => Some(i),
                None if waiting.is_empty() => return,
                // One last try for what waits, then stop.
                None => {
                    closed = true;
                    None
                }
            },
            _ = tokio::time::sleep(RETRY_EVERY), if !waiting.is_empty() => None,
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
        let mut batch: Vec<Item> = waiting.drain(..).collect();
        batch.extend(first);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(i) => batch.push(i),
                Err(_) => break,
            }
        }
        // A new term's records are numbered after every record of the previous leaders
        // (the sender publishes the epoch before leadership, so before any record).
        if let Ok(true) = epoch.has_changed() {
            pending_epoch = Some(*epoch.borrow_and_update());
        }
        let store2 = store.clone();
        let epoch_now = pending_epoch;
        let result = tokio::task::spawn_blocking(move || -> (bool, Failed) {
            if let Some(e) = epoch_now {
                match store2.begin_epoch(e) {
                    Ok(next) => tracing::info!(
                        epoch = e,
                        next_seq = next,
                        "history records of this term start here"
                    ),
                    Err(err) => {
                        // The batch waits with the epoch, counted as one failed write.
                        let mut items = batch.into_iter();
                        return match items.next() {
                            Some(first) => (false, (vec![(first, err)], items.collect())),
                            None => (false, (Vec::new(), Vec::new())),
                        };
                    }
                }
            }
            (true, write_batch(&store2, batch))
        })
        .await;
        let failed = match result {
            Ok((epoch_taken, failed)) => {
                if epoch_taken {
                    pending_epoch = None;
                }
                failed
            }
            Err(e) => {
                tracing::error!(err = %e, "the history write task failed");
                continue;
            }
        };
        let (failed, skipped) = failed;
        let mut reopen = false;
        for (item, e) in failed {
            metrics.history_write_failed();
            reopen |= Store::needs_reopen(&e);
            // The first failure of a streak, then one in a hundred: a full disk fails
            // every write until someone frees room.
            if failing.is_multiple_of(100) {
                tracing::warn!(err = %e, path = %store.path().display(), failures = failing + 1, "writing to the history failed; records wait for the disk");
            }
            failing += 1;
            keep(&mut waiting, item);
        }
        for item in skipped {
            keep(&mut waiting, item);
        }
        if !reopen && failing > 0 && waiting.is_empty() {
            tracing::info!(failures = failing, "history writes resumed");
            failing = 0;
        }
        if reopen {
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.reopen()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(err = %e, "reopening the history failed; retrying"),
                Err(e) => tracing::error!(err = %e, "the reopening task failed"),
            }
        }
    }
}

/// Keeps an event whose write failed for the next attempt (samples are many, and a
/// minute of them is no loss); beyond [`RETRY_CAP`] the oldest goes.
fn keep(waiting: &mut std::collections::VecDeque<Item>, item: Item) {
    if matches!(item, Item::Samples { .. }) {
        return;
    }
    if waiting.len() == RETRY_CAP {
        waiting.pop_front();
        tracing::warn!("too many history records waiting for the disk; the oldest was dropped");
    }
    waiting.push_back(item);
}

/// What a batch left: the writes that failed with why, and those not tried after the
/// disk failed (the store must be reopened first).
type Failed = (Vec<(Item, StoreError)>, Vec<Item>);

/// Commits a batch: every event on its own, samples of one moment in one transaction.
fn write_batch(store: &Store, batch: Vec<Item>) -> Failed {
    let mut failed = Vec::new();
    let mut skipped = Vec::new();
    let mut disk_failed = false;
    let mut samples: std::collections::BTreeMap<u64, Vec<(PolicyId, String, f64)>> =
        Default::default();
    for item in batch {
        if disk_failed {
            skipped.push(item);
            continue;
        }
        let r = match &item {
            Item::Transition(t) => store.record_transition(t).map(drop),
            Item::Scale(s) => store.record_scale(s).map(drop),
            Item::ColdStart(c) => store.record_cold_start(c).map(drop),
            Item::Samples {
                at_ms,
                policy,
                values,
            } => {
                let at = samples.entry(*at_ms).or_default();
                at.extend(values.iter().map(|(m, v)| (policy.clone(), m.clone(), *v)));
                Ok(())
            }
        };
        if let Err(e) = r {
            disk_failed = Store::needs_reopen(&e);
            failed.push((item, e));
        }
    }
    if disk_failed {
        return (failed, skipped);
    }
    for (at_ms, values) in samples {
        let r = store.record_samples(at_ms, values.iter().map(|(p, m, v)| (p, m.as_str(), *v)));
        if let Err(e) = r {
            let item = Item::Samples {
                at_ms,
                policy: values
                    .first()
                    .map(|(p, _, _)| p.clone())
                    .unwrap_or_else(|| PolicyId::new("", "")),
                values: vec![],
            };
            failed.push((item, e));
        }
    }
    (failed, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Retention;

    fn transition(policy: &PolicyId, at_ms: u64, to_state: &str) -> TransitionRecord {
        TransitionRecord {
            at_ms,
            policy: policy.clone(),
            from_state: "warm".into(),
            to_state: to_state.into(),
            from_replicas: 1,
            to_replicas: 0,
            reason: "idle".into(),
            metrics: Default::default(),
        }
    }

    /// A process that led an earlier term and leads again: what a later leader recorded
    /// (pulled into its store since) is newer than what it holds in memory, and wins.
    #[test]
    fn a_later_leaders_pulled_transition_wins_over_this_processs_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path().join("h.redb"), Retention::default()).unwrap());
        let (_epoch_tx, epoch) = watch::channel(1);
        let (history, _writer) = History::new(store.clone(), ControllerMetrics::new(), epoch);
        let policy = PolicyId::new("default", "app");
        // Recorded in this process's first term (the writer task is not run: the record
        // stays in memory only, as one waiting for the disk would).
        history.record(Item::Transition(transition(&policy, 1_000, "zero")));
        assert_eq!(history.latest_transition(&policy).unwrap().to_state, "zero");
        // A later leader's transition, pulled into this store.
        store
            .record_transition(&transition(&policy, 2_000, "warm"))
            .unwrap();
        let latest = history.latest_transition(&policy).unwrap();
        assert_eq!((latest.at_ms, latest.to_state.as_str()), (2_000, "warm"));
        // An older stored record does not hide this process's newer one.
        history.record(Item::Transition(transition(&policy, 3_000, "draining")));
        assert_eq!(
            history.latest_transition(&policy).unwrap().to_state,
            "draining"
        );
    }
}
