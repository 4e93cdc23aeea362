//! The replication log: every event and sample batch under its sequence number, so the
//! standbys can pull the leader's history in order (`after=<seq>`) and a new leader has
//! the old one's. Sequence numbers are `(epoch << EPOCH_SHIFT) | counter`: a leader
//! starts a new epoch (the Lease's `leaseTransitions`, and above every epoch it holds)
//! when it takes over, so two leaders' records never collide, and a standby applying a
//! record it already holds writes the same key again (idempotent). Storage only: who
//! pulls from whom is `crate::replication`.

use std::collections::BTreeMap;

use redb::{ReadableTable, Table, TableHandle, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::records::f64_map;
use super::tables::{
    COLD_STARTS, EventKey, LOG, META, META_NEXT_SEQ, METRIC_SAMPLES, SCALE_EVENTS, TRANSITIONS,
};
use super::{
    ColdStartRecord, PolicyId, SampleValue, ScaleRecord, Store, StoreError, TransitionRecord,
    access_error, decode, encode, open_table,
};

/// The counter of one epoch has 40 bits (10^12 records), the epoch the other 24.
pub const EPOCH_SHIFT: u32 = 40;
const MAX_EPOCH: u64 = (1 << (64 - EPOCH_SHIFT)) - 1;

/// The epoch a sequence number was written in.
pub fn epoch_of(seq: u64) -> u64 {
    seq >> EPOCH_SHIFT
}

/// The first sequence number of `epoch`.
pub fn first_seq_of(epoch: u64) -> u64 {
    epoch.min(MAX_EPOCH) << EPOCH_SHIFT
}

/// One replicated record: what was recorded and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    pub at_ms: u64,
    pub item: LogItem,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum LogItem {
    Transition {
        record: TransitionRecord,
    },
    Scale {
        record: ScaleRecord,
    },
    ColdStart {
        record: ColdStartRecord,
    },
    /// The raw samples of one policy at one moment.
    Samples {
        policy: PolicyId,
        #[serde(with = "f64_map")]
        values: BTreeMap<String, f64>,
    },
}

impl LogItem {
    fn is_samples(&self) -> bool {
        matches!(self, LogItem::Samples { .. })
    }
}

/// A page of the log as [`Store::log_after`] reads it: the entries' raw JSON (served as
/// is, never decoded and encoded again) and how many follow the page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogPage {
    pub entries: Vec<(u64, Vec<u8>)>,
    pub remaining: u64,
}

/// Only what retention needs of an entry.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EntryHead {
    at_ms: u64,
    item: KindOnly,
}

#[derive(Deserialize)]
struct KindOnly {
    kind: String,
}

pub(crate) fn next_seq(meta: &mut Table<&str, u64>) -> Result<u64, StoreError> {
    let seq = meta
        .get(META_NEXT_SEQ)
        .map_err(access_error(META))?
        .map(|g| g.value())
        .unwrap_or(1);
    meta.insert(META_NEXT_SEQ, seq + 1)
        .map_err(access_error(META))?;
    Ok(seq)
}

pub(crate) fn append(
    log: &mut Table<u64, &[u8]>,
    seq: u64,
    entry: &LogEntry,
) -> Result<(), StoreError> {
    let bytes = encode(LOG, entry)?;
    log.insert(seq, bytes.as_slice())
        .map_err(access_error(LOG))?;
    Ok(())
}

/// Upgrade 1 -> 2: the events already recorded enter the log under their own sequence
/// (epoch 0), so a standby pulls them too. Samples recorded before stay local.
pub(crate) fn backfill_log(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut log = open_table(txn, LOG)?;
    for def in [TRANSITIONS, SCALE_EVENTS, COLD_STARTS] {
        let table = open_table(txn, def)?;
        for e in table.iter().map_err(access_error(def))? {
            let (k, v) = e.map_err(access_error(def))?;
            let key: EventKey = k.value();
            let (_, at_ms, seq) = key;
            let item = if def.name() == TRANSITIONS.name() {
                LogItem::Transition {
                    record: decode(def, &key, v.value())?,
                }
            } else if def.name() == SCALE_EVENTS.name() {
                LogItem::Scale {
                    record: decode(def, &key, v.value())?,
                }
            } else {
                LogItem::ColdStart {
                    record: decode(def, &key, v.value())?,
                }
            };
            append(&mut log, seq, &LogEntry { at_ms, item })?;
        }
    }
    Ok(())
}

impl Store {
    /// Up to `limit` log entries with a sequence above `after`, in sequence order.
    pub fn log_after(&self, after: u64, limit: usize) -> Result<LogPage, StoreError> {
        let txn = self.begin_read()?;
        let log = txn
            .open_table(LOG)
            .map_err(|source| StoreError::OpenTable {
                table: LOG.name().to_string(),
                source,
            })?;
        let mut page = LogPage::default();
        let Some(start) = after.checked_add(1) else {
            return Ok(page);
        };
        for e in log.range(start..).map_err(access_error(LOG))? {
            let (k, v) = e.map_err(access_error(LOG))?;
            if page.entries.len() < limit {
                page.entries.push((k.value(), v.value().to_vec()));
            } else {
                page.remaining += 1;
            }
        }
        Ok(page)
    }

    /// The highest sequence in the log (0: empty): where a standby resumes pulling.
    pub fn log_head(&self) -> Result<u64, StoreError> {
        let txn = self.begin_read()?;
        let log = txn
            .open_table(LOG)
            .map_err(|source| StoreError::OpenTable {
                table: LOG.name().to_string(),
                source,
            })?;
        Ok(log
            .last()
            .map_err(access_error(LOG))?
            .map(|(k, _)| k.value())
            .unwrap_or(0))
    }

    /// Stores entries pulled from the leader under the leader's sequence numbers, all in
    /// one transaction; an entry already held is written again unchanged. Returns how
    /// many were new.
    pub fn apply_replicated(&self, entries: &[(u64, LogEntry)]) -> Result<usize, StoreError> {
        let txn = self.begin_write()?;
        let mut new = 0;
        {
            let mut log = open_table(&txn, LOG)?;
            let mut meta = open_table(&txn, META)?;
            let mut max_seq = 0;
            for (seq, entry) in entries {
                let seq = *seq;
                max_seq = max_seq.max(seq);
                let had = log.get(seq).map_err(access_error(LOG))?.is_some();
                new += usize::from(!had);
                append(&mut log, seq, entry)?;
                let at_ms = entry.at_ms;
                match &entry.item {
                    LogItem::Transition { record } => {
                        put_event(&txn, TRANSITIONS, &record.policy, at_ms, seq, record)?
                    }
                    LogItem::Scale { record } => {
                        put_event(&txn, SCALE_EVENTS, &record.policy, at_ms, seq, record)?
                    }
                    LogItem::ColdStart { record } => {
                        put_event(&txn, COLD_STARTS, &record.policy, at_ms, seq, record)?
                    }
                    LogItem::Samples { policy, values } => {
                        let mut table = open_table(&txn, METRIC_SAMPLES)?;
                        let key = policy.key();
                        for (metric, value) in values {
                            let bytes =
                                encode(METRIC_SAMPLES, &SampleValue::Raw { value: *value })?;
                            table
                                .insert((key.as_str(), metric.as_str(), at_ms), bytes.as_slice())
                                .map_err(access_error(METRIC_SAMPLES))?;
                        }
                    }
                }
            }
            // Records of this instance's own (should it lead later) come after these.
            let next = meta
                .get(META_NEXT_SEQ)
                .map_err(access_error(META))?
                .map(|g| g.value())
                .unwrap_or(1);
            if max_seq >= next {
                meta.insert(META_NEXT_SEQ, max_seq + 1)
                    .map_err(access_error(META))?;
            }
        }
        txn.commit()?;
        Ok(new)
    }

    /// Starts this instance's records of a leadership term: its next sequence is the
    /// first of `epoch`, or of the epoch after the highest it holds, whichever is later
    /// (never lower than it already is). Returns that next sequence.
    pub fn begin_epoch(&self, epoch: u64) -> Result<u64, StoreError> {
        let held = self.log_head()?;
        let txn = self.begin_write()?;
        let next = {
            let mut meta = open_table(&txn, META)?;
            let current = meta
                .get(META_NEXT_SEQ)
                .map_err(access_error(META))?
                .map(|g| g.value())
                .unwrap_or(1);
            let held_max = held.max(current.saturating_sub(1));
            // An empty file can start in `epoch` itself; otherwise past what it holds.
            let after_held = if held_max == 0 {
                0
            } else {
                epoch_of(held_max) + 1
            };
            let next = current.max(first_seq_of(epoch.max(after_held)));
            meta.insert(META_NEXT_SEQ, next)
                .map_err(access_error(META))?;
            next
        };
        txn.commit()?;
        Ok(next)
    }

    /// Every log entry, decoded (tests and diagnostics; the log may be large).
    pub fn log_entries(&self) -> Result<Vec<(u64, LogEntry)>, StoreError> {
        self.log_after(0, usize::MAX)?
            .entries
            .into_iter()
            .map(|(seq, bytes)| Ok((seq, decode(LOG, &seq, &bytes)?)))
            .collect()
    }
}

/// Removes log entries past their retention (events: the event retention; samples: the
/// raw retention, after which the samples are folded here and a standby's raw copy would
/// be folded in its own compaction). Returns how many were removed.
pub(crate) fn expire_log(
    txn: &WriteTransaction,
    events_before_ms: u64,
    samples_before_ms: u64,
) -> Result<u64, StoreError> {
    let mut log = open_table(txn, LOG)?;
    let mut expired = Vec::new();
    for e in log.iter().map_err(access_error(LOG))? {
        let (k, v) = e.map_err(access_error(LOG))?;
        let head: EntryHead = decode(LOG, &k.value(), v.value())?;
        let horizon = if head.item.kind == "samples" {
            samples_before_ms
        } else {
            events_before_ms
        };
        if head.at_ms < horizon {
            expired.push(k.value());
        }
    }
    for seq in &expired {
        log.remove(*seq).map_err(access_error(LOG))?;
    }
    Ok(expired.len() as u64)
}

fn put_event<T: Serialize>(
    txn: &WriteTransaction,
    def: redb::TableDefinition<EventKey, &[u8]>,
    policy: &PolicyId,
    at_ms: u64,
    seq: u64,
    rec: &T,
) -> Result<(), StoreError> {
    let bytes = encode(def, rec)?;
    let mut table = open_table(txn, def)?;
    table
        .insert((policy.key().as_str(), at_ms, seq), bytes.as_slice())
        .map_err(access_error(def))?;
    Ok(())
}

impl LogEntry {
    pub fn is_samples(&self) -> bool {
        self.item.is_samples()
    }
}
