//! The controller's history in redb: transitions, scale events, cold starts and
//! downsampled metric samples per policy, and the report queries over them. It records
//! what the controller decided; it never decides anything, and never talks to Kubernetes.
//!
//! Every `record_*` call is one write transaction committed with redb's default
//! `Durability::Immediate`: once it returns `Ok`, the record survives a `kill -9` or a
//! power cut. All calls block on disk I/O: call them from `spawn_blocking` (the `Store`
//! is `Send + Sync`; share it in an `Arc`).

pub mod log;
pub mod records;
pub mod reports;
pub mod samples;
pub mod scales;
pub mod schema;
pub mod tables;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use redb::{
    AccessGuard, Database, Key, ReadableDatabase, ReadableTable, StorageError, Table,
    TableDefinition, TableHandle, WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use records::{
    ColdStartOutcome, ColdStartRecord, MetricPoint, PolicyId, SampleValue, ScaleRecord,
    TransitionRecord, from_unix_ms, unix_ms,
};
pub use reports::ColdStartStats;
pub use samples::{DEFAULT_RETENTION, Retention};
pub use schema::{Migration, SCHEMA_VERSION};

pub use log::{LogEntry, LogItem, LogPage};
use tables::{
    COLD_STARTS, EventKey, LOG, META, META_NEXT_SEQ, METRIC_SAMPLES, SCALE_EVENTS, SampleKey,
    TRANSITIONS,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the history database at {}: {source}", path.display())]
    OpenDatabase {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("starting a transaction on the history database: {0}")]
    BeginTransaction(#[from] redb::TransactionError),
    #[error("opening history table {table}: {source}")]
    OpenTable {
        table: String,
        #[source]
        source: redb::TableError,
    },
    #[error("reading or writing history table {table}: {source}")]
    AccessTable {
        table: String,
        #[source]
        source: StorageError,
    },
    #[error("committing to the history database: {0}")]
    Commit(#[from] redb::CommitError),
    #[error("encoding a record for history table {table}: {source}")]
    EncodeRecord {
        table: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("decoding the record at {key} in history table {table}: {source}")]
    DecodeRecord {
        table: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the history database has schema version {found}, newer than the {supported} this \
         controller understands; refusing to touch it (was the controller downgraded?)"
    )]
    SchemaTooNew { found: u64, supported: u64 },
    #[error(
        "the history database at {} is closed after a disk error; reopening it is retried",
        path.display()
    )]
    Closed { path: PathBuf },
    #[error("no upgrade step from history schema version {from} to {}", from + 1)]
    MissingUpgradeStep { from: u64 },
}

pub(crate) fn open_table<'txn, K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &'txn WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<Table<'txn, K, V>, StoreError> {
    txn.open_table(def).map_err(|source| StoreError::OpenTable {
        table: def.name().to_string(),
        source,
    })
}

pub(crate) fn access_error(def: impl TableHandle) -> impl FnOnce(StorageError) -> StoreError {
    let table = def.name().to_string();
    move |source| StoreError::AccessTable { table, source }
}

/// What a [`Store::compact`] run changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Raw samples folded into one-minute buckets.
    pub samples_folded: u64,
    /// Buckets written (new or merged).
    pub buckets_written: u64,
    /// Samples and buckets deleted for age.
    pub samples_expired: u64,
    /// Transitions, scale events and cold starts deleted for age.
    pub events_expired: u64,
    /// Replication log entries deleted for age.
    pub log_expired: u64,
}

pub struct Store {
    /// Behind a lock so that [`Store::reopen`] can replace it after an I/O error (redb
    /// refuses every later transaction with `PreviousIo` until the file is reopened).
    db: std::sync::RwLock<Option<Database>>,
    path: PathBuf,
    retention: Retention,
    migration: Migration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

// === impl Store ===

/// An event's `(at_ms, seq)` key and its record as JSON.
pub type KeyedEvent = ((u64, u64), serde_json::Value);

/// The event tables a page of events reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventTable {
    Transitions,
    ScaleEvents,
    ColdStarts,
}

impl EventTable {
    pub const ALL: [EventTable; 3] = [
        EventTable::Transitions,
        EventTable::ScaleEvents,
        EventTable::ColdStarts,
    ];

    fn table(self) -> TableDefinition<'static, EventKey<'static>, &'static [u8]> {
        match self {
            EventTable::Transitions => TRANSITIONS,
            EventTable::ScaleEvents => SCALE_EVENTS,
            EventTable::ColdStarts => COLD_STARTS,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventTable::Transitions => "transition",
            EventTable::ScaleEvents => "scale",
            EventTable::ColdStarts => "coldStart",
        }
    }
}

/// redb's page cache. Its default (1 GiB) is filled by every page written or read, and
/// the history is mostly written once and rarely read: at 10,000 policies the cache held
/// most of the controller's memory. The OS page cache still keeps the file's hot pages.
pub const CACHE_BYTES: usize = 32 * 1024 * 1024;

fn create(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(CACHE_BYTES).create(path)
}

impl Store {
    /// Opens (or creates) the history file, creates missing tables and runs schema
    /// upgrades. After an unclean shutdown redb repairs the file here first.
    pub fn open(path: impl AsRef<Path>, retention: Retention) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = create(&path).map_err(|source| StoreError::OpenDatabase {
            path: path.clone(),
            source,
        })?;
        let txn = db.begin_write()?;
        let migration = schema::migrate(&txn, SCHEMA_VERSION, schema::UPGRADES)?;
        // Create every table now, so read transactions never meet a missing one.
        open_table(&txn, TRANSITIONS)?;
        open_table(&txn, SCALE_EVENTS)?;
        open_table(&txn, COLD_STARTS)?;
        open_table(&txn, METRIC_SAMPLES)?;
        open_table(&txn, LOG)?;
        txn.commit()?;
        tracing::info!(path = %path.display(), ?migration, "history store open");
        Ok(Self {
            db: std::sync::RwLock::new(Some(db)),
            path,
            retention,
            migration,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        // A panic while reopening leaves whatever handle there was: still worth a try.
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = db.as_ref().ok_or_else(|| StoreError::Closed {
            path: self.path.clone(),
        })?;
        Ok(db.begin_write()?)
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = db.as_ref().ok_or_else(|| StoreError::Closed {
            path: self.path.clone(),
        })?;
        Ok(db.begin_read()?)
    }

    /// Closes and opens the file again, as redb asks after a write failed on I/O (a full
    /// volume): until then every transaction fails with `PreviousIo`. Committed records
    /// are on disk and stay; redb repairs the file on opening if it must. While the
    /// file cannot be opened the store is closed (every call fails with
    /// [`StoreError::Closed`]) and the next `reopen` tries again.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        // The file lock goes with the old handle: drop it before opening again.
        drop(db.take());
        let fresh = create(&self.path).map_err(|source| StoreError::OpenDatabase {
            path: self.path.clone(),
            source,
        })?;
        *db = Some(fresh);
        tracing::debug!(path = %self.path.display(), "history store reopened");
        Ok(())
    }

    /// Whether a write failed because of the disk (full, or another I/O error), so that
    /// the file must be reopened before the next one.
    pub fn needs_reopen(e: &StoreError) -> bool {
        match e {
            StoreError::Closed { .. } => true,
            StoreError::AccessTable { source, .. } => {
                matches!(source, StorageError::Io(_) | StorageError::PreviousIo)
            }
            StoreError::OpenTable {
                source: redb::TableError::Storage(StorageError::Io(_) | StorageError::PreviousIo),
                ..
            } => true,
            StoreError::Commit(redb::CommitError::Storage(
                StorageError::Io(_) | StorageError::PreviousIo,
            ))
            | StoreError::BeginTransaction(redb::TransactionError::Storage(
                StorageError::Io(_) | StorageError::PreviousIo,
            )) => true,
            _ => false,
        }
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// What opening did to the schema.
    pub fn migration(&self) -> Migration {
        self.migration
    }

    // --- recording ---

    /// Records a transition; returns its sequence number (unique, increasing).
    pub fn record_transition(&self, rec: &TransitionRecord) -> Result<u64, StoreError> {
        let item = LogItem::Transition {
            record: rec.clone(),
        };
        self.insert_event(TRANSITIONS, &rec.policy, rec.at_ms, rec, item)
    }

    pub fn record_scale(&self, rec: &ScaleRecord) -> Result<u64, StoreError> {
        let item = LogItem::Scale {
            record: rec.clone(),
        };
        self.insert_event(SCALE_EVENTS, &rec.policy, rec.at_ms, rec, item)
    }

    pub fn record_cold_start(&self, rec: &ColdStartRecord) -> Result<u64, StoreError> {
        let item = LogItem::ColdStart {
            record: rec.clone(),
        };
        self.insert_event(COLD_STARTS, &rec.policy, rec.wake_at_ms, rec, item)
    }

    /// Records one raw sample per `(policy, metric, value)` at `at_ms`, all in one
    /// transaction (one commit per controller tick, not one per value).
    pub fn record_samples<'a>(
        &self,
        at_ms: u64,
        samples: impl IntoIterator<Item = (&'a PolicyId, &'a str, f64)>,
    ) -> Result<(), StoreError> {
        self.record_sample_batch(
            samples
                .into_iter()
                .map(|(policy, metric, value)| (at_ms, policy, metric, value)),
        )
    }

    /// Records many transitions in one transaction (importing history, benchmarks):
    /// sequence numbers as [`Store::record_transition`] would give them, in order.
    pub fn record_transitions(&self, recs: &[TransitionRecord]) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut meta = open_table(&txn, META)?;
            let mut seq = meta
                .get(META_NEXT_SEQ)
                .map_err(access_error(META))?
                .map(|g| g.value())
                .unwrap_or(1);
            let mut table = open_table(&txn, TRANSITIONS)?;
            let mut log = open_table(&txn, LOG)?;
            for rec in recs {
                let bytes = encode(TRANSITIONS, rec)?;
                table
                    .insert(
                        (rec.policy.key().as_str(), rec.at_ms, seq),
                        bytes.as_slice(),
                    )
                    .map_err(access_error(TRANSITIONS))?;
                let entry = LogEntry {
                    at_ms: rec.at_ms,
                    item: LogItem::Transition {
                        record: rec.clone(),
                    },
                };
                log::append(&mut log, seq, &entry)?;
                seq += 1;
            }
            meta.insert(META_NEXT_SEQ, seq)
                .map_err(access_error(META))?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Records raw samples of many moments in one transaction: an import, or a backlog
    /// of ticks (one commit, so one disk sync, for all of them).
    pub fn record_sample_batch<'a>(
        &self,
        samples: impl IntoIterator<Item = (u64, &'a PolicyId, &'a str, f64)>,
    ) -> Result<(), StoreError> {
        // One log entry per policy and moment, so a standby gets them as recorded.
        let mut moments: BTreeMap<(u64, &PolicyId), BTreeMap<String, f64>> = BTreeMap::new();
        let txn = self.begin_write()?;
        {
            let mut table = open_table(&txn, METRIC_SAMPLES)?;
            for (at_ms, policy, metric, value) in samples {
                let bytes = encode(METRIC_SAMPLES, &SampleValue::Raw { value })?;
                table
                    .insert((policy.key().as_str(), metric, at_ms), bytes.as_slice())
                    .map_err(access_error(METRIC_SAMPLES))?;
                moments
                    .entry((at_ms, policy))
                    .or_default()
                    .insert(metric.to_string(), value);
            }
            let mut meta = open_table(&txn, META)?;
            let mut log = open_table(&txn, LOG)?;
            for ((at_ms, policy), values) in moments {
                let seq = log::next_seq(&mut meta)?;
                let entry = LogEntry {
                    at_ms,
                    item: LogItem::Samples {
                        policy: policy.clone(),
                        values,
                    },
                };
                log::append(&mut log, seq, &entry)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn insert_event<T: Serialize>(
        &self,
        def: TableDefinition<EventKey, &[u8]>,
        policy: &PolicyId,
        at_ms: u64,
        rec: &T,
        item: LogItem,
    ) -> Result<u64, StoreError> {
        let bytes = encode(def, rec)?;
        let txn = self.begin_write()?;
        let seq = {
            let mut meta = open_table(&txn, META)?;
            let seq = log::next_seq(&mut meta)?;
            let mut table = open_table(&txn, def)?;
            table
                .insert((policy.key().as_str(), at_ms, seq), bytes.as_slice())
                .map_err(access_error(def))?;
            let mut log = open_table(&txn, LOG)?;
            log::append(&mut log, seq, &LogEntry { at_ms, item })?;
            seq
        };
        txn.commit()?;
        Ok(seq)
    }

    // --- queries ---

    /// Transitions of `policy` with `window.start <= at_ms < window.end`, oldest first.
    pub fn transitions(
        &self,
        policy: &PolicyId,
        window: Range<u64>,
    ) -> Result<Vec<TransitionRecord>, StoreError> {
        self.events_in(TRANSITIONS, policy, window)
    }

    /// The newest transition of `policy`, if any.
    pub fn latest_transition(
        &self,
        policy: &PolicyId,
    ) -> Result<Option<TransitionRecord>, StoreError> {
        self.last_event_before(TRANSITIONS, policy, u64::MAX)
    }

    /// Scale events of `policy` in `window`, oldest first, without the recovered records
    /// that repeat a change this store also holds as made (see [`scales`]).
    pub fn scale_events(
        &self,
        policy: &PolicyId,
        window: Range<u64>,
    ) -> Result<Vec<ScaleRecord>, StoreError> {
        let records: Vec<ScaleRecord> = self.events_in(SCALE_EVENTS, policy, window.clone())?;
        let before = match records.first() {
            Some(first) if first.recovered => {
                self.last_event_before(SCALE_EVENTS, policy, window.start)?
            }
            _ => None,
        };
        Ok(scales::without_redundant(before, records))
    }

    /// The newest scale event of `policy`, if any.
    pub fn latest_scale(&self, policy: &PolicyId) -> Result<Option<ScaleRecord>, StoreError> {
        self.last_event_before(SCALE_EVENTS, policy, u64::MAX)
    }

    /// Cold starts whose wake-up falls in `window`.
    pub fn cold_starts(
        &self,
        policy: &PolicyId,
        window: Range<u64>,
    ) -> Result<Vec<ColdStartRecord>, StoreError> {
        self.events_in(COLD_STARTS, policy, window)
    }

    /// Raw samples and buckets of one metric in `window`, oldest first.
    pub fn samples(
        &self,
        policy: &PolicyId,
        metric: &str,
        window: Range<u64>,
    ) -> Result<Vec<MetricPoint>, StoreError> {
        let key = policy.key();
        self.read_range(
            METRIC_SAMPLES,
            (key.as_str(), metric, window.start)..(key.as_str(), metric, window.end),
        )?
        .map(|entry| {
            let (k, value) = decode_entry(METRIC_SAMPLES, entry)?;
            let (_, _, at_ms) = k.value();
            Ok(MetricPoint { at_ms, value })
        })
        .collect()
    }

    /// The latest sample of each `(policy, metric)` in `window` (`None` where there is
    /// none), all read in one read transaction: the overview asks this for every policy
    /// on every refresh, and a transaction per policy cost more than the reads.
    pub fn latest_samples(
        &self,
        keys: &[(&PolicyId, &str)],
        window: Range<u64>,
    ) -> Result<Vec<Option<MetricPoint>>, StoreError> {
        let txn = self.begin_read()?;
        let table = txn
            .open_table(METRIC_SAMPLES)
            .map_err(|source| StoreError::OpenTable {
                table: METRIC_SAMPLES.name().to_string(),
                source,
            })?;
        keys.iter()
            .map(|(policy, metric)| {
                let key = policy.key();
                let last = table
                    .range(
                        (key.as_str(), *metric, window.start)..(key.as_str(), *metric, window.end),
                    )
                    .map_err(access_error(METRIC_SAMPLES))?
                    .next_back();
                last.map(|entry| {
                    let (k, value) = decode_entry(METRIC_SAMPLES, entry)?;
                    let (_, _, at_ms) = k.value();
                    Ok(MetricPoint { at_ms, value })
                })
                .transpose()
            })
            .collect()
    }

    pub fn cold_start_stats(
        &self,
        policy: &PolicyId,
        window: Range<u64>,
    ) -> Result<ColdStartStats, StoreError> {
        Ok(reports::cold_start_stats(
            &self.cold_starts(policy, window)?,
        ))
    }

    /// Milliseconds spent in each state in `window` (pass `window.end <= now`).
    pub fn time_in_states(
        &self,
        policy: &PolicyId,
        window: Range<u64>,
    ) -> Result<BTreeMap<String, u64>, StoreError> {
        let before: Option<TransitionRecord> =
            self.last_event_before(TRANSITIONS, policy, window.start)?;
        let in_window = self.transitions(policy, window.clone())?;
        Ok(reports::time_in_states(before.as_ref(), &in_window, window))
    }

    /// Replica-seconds in `window` (pass `window.end <= now`); `None` when no scale
    /// event tells how many replicas there were.
    pub fn replica_seconds(
        &self,
        policy: &PolicyId,
        window: Range<u64>,
    ) -> Result<Option<f64>, StoreError> {
        let before: Option<ScaleRecord> =
            self.last_event_before(SCALE_EVENTS, policy, window.start)?;
        let in_window = self.scale_events(policy, window.clone())?;
        Ok(reports::replica_seconds(
            before.as_ref(),
            &in_window,
            window,
        ))
    }

    fn events_in<T: DeserializeOwned>(
        &self,
        def: TableDefinition<EventKey, &[u8]>,
        policy: &PolicyId,
        window: Range<u64>,
    ) -> Result<Vec<T>, StoreError> {
        let key = policy.key();
        self.read_range(
            def,
            (key.as_str(), window.start, 0)..(key.as_str(), window.end, 0),
        )?
        .map(|entry| Ok(decode_entry(def, entry)?.1))
        .collect()
    }

    /// Up to `limit` events of `policy` from table `kind` with `since_ms <= at_ms` and
    /// `(at_ms, seq) < before`, newest first, each with its `(at_ms, seq)` key. The
    /// sequence is global, so `(at_ms, seq)` orders every event of every table and policy
    /// totally: a page that ends inside a millisecond loses none of its other events.
    pub fn events_before(
        &self,
        kind: EventTable,
        policy: &PolicyId,
        since_ms: u64,
        before: (u64, u64),
        limit: usize,
    ) -> Result<Vec<KeyedEvent>, StoreError> {
        let def = kind.table();
        let key = policy.key();
        let (at, seq) = before;
        if since_ms > at || limit == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for entry in self
            .read_range(def, (key.as_str(), since_ms, 0)..(key.as_str(), at, seq))?
            .rev()
        {
            if out.len() == limit {
                break;
            }
            let (k, v): (_, serde_json::Value) = decode_entry(def, entry)?;
            let (_, at_ms, seq) = k.value();
            // A recovered scale that repeats the one before it is not shown, as
            // `scale_events` does not return it (rare: the record before is read apart).
            if kind == EventTable::ScaleEvents
                && v.get("recovered") == Some(&serde_json::Value::Bool(true))
                && let Ok(rec) = serde_json::from_value::<ScaleRecord>(v.clone())
            {
                let before: Option<ScaleRecord> = self
                    .read_range(def, (key.as_str(), 0, 0)..(key.as_str(), at_ms, seq))?
                    .next_back()
                    .map(|e| Ok::<_, StoreError>(decode_entry(def, e)?.1))
                    .transpose()?;
                if scales::is_redundant(before.as_ref(), &rec) {
                    continue;
                }
            }
            out.push(((at_ms, seq), v));
        }
        Ok(out)
    }

    fn last_event_before<T: DeserializeOwned>(
        &self,
        def: TableDefinition<EventKey, &[u8]>,
        policy: &PolicyId,
        at_ms: u64,
    ) -> Result<Option<T>, StoreError> {
        let key = policy.key();
        self.read_range(def, (key.as_str(), 0, 0)..(key.as_str(), at_ms, 0))?
            .next_back()
            .map(|entry| Ok(decode_entry(def, entry)?.1))
            .transpose()
    }

    /// The entries of `def` with keys in `range`, in key order, from a read transaction of
    /// their own (the range keeps it alive): one query sees one state of the file.
    fn read_range<'k, K: Key + 'static>(
        &self,
        def: TableDefinition<K, &'static [u8]>,
        range: Range<K::SelfType<'k>>,
    ) -> Result<redb::Range<'static, K, &'static [u8]>, StoreError> {
        let txn = self.begin_read()?;
        let table = txn
            .open_table(def)
            .map_err(|source| StoreError::OpenTable {
                table: def.name().to_string(),
                source,
            })?;
        table.range(range).map_err(access_error(def))
    }

    // --- retention ---

    /// Folds raw samples older than the raw retention into one-minute buckets and deletes
    /// everything older than its retention, in one transaction. Call it every few
    /// minutes; it scans the sample table, so not on every tick.
    pub fn compact(&self, now_ms: u64) -> Result<CompactionReport, StoreError> {
        let h = self.retention.horizons(now_ms);
        let mut report = CompactionReport::default();
        let txn = self.begin_write()?;
        {
            let mut table = open_table(&txn, METRIC_SAMPLES)?;
            type Owned = (String, String, u64);
            let mut expired: Vec<Owned> = Vec::new();
            let mut groups: BTreeMap<Owned, Vec<(u64, SampleValue)>> = BTreeMap::new();
            for entry in table.iter().map_err(access_error(METRIC_SAMPLES))? {
                let (k, v) = entry.map_err(access_error(METRIC_SAMPLES))?;
                let (policy, metric, at_ms) = k.value();
                if at_ms < h.expire_samples_before_ms {
                    expired.push((policy.to_string(), metric.to_string(), at_ms));
                    continue;
                }
                if at_ms >= h.fold_before_ms {
                    continue;
                }
                let value: SampleValue = decode(METRIC_SAMPLES, &k.value(), v.value())?;
                if let SampleValue::Raw { .. } = value {
                    groups
                        .entry((
                            policy.to_string(),
                            metric.to_string(),
                            samples::bucket_start(at_ms),
                        ))
                        .or_default()
                        .push((at_ms, value));
                }
            }
            for (p, m, t) in &expired {
                table
                    .remove((p.as_str(), m.as_str(), *t))
                    .map_err(access_error(METRIC_SAMPLES))?;
            }
            report.samples_expired = expired.len() as u64;
            for ((p, m, bucket), raws) in groups {
                for (t, _) in &raws {
                    table
                        .remove((p.as_str(), m.as_str(), *t))
                        .map_err(access_error(METRIC_SAMPLES))?;
                }
                report.samples_folded += raws.len() as u64;
                let key: SampleKey = (p.as_str(), m.as_str(), bucket);
                // A bucket already at this key (an earlier run, then late raw samples).
                let existing = match table.get(key).map_err(access_error(METRIC_SAMPLES))? {
                    Some(g) => Some(decode::<SampleValue>(METRIC_SAMPLES, &key, g.value())?),
                    None => None,
                };
                let folded =
                    samples::fold(existing.into_iter().chain(raws.into_iter().map(|(_, v)| v)));
                if let Some(bucket_value) = folded {
                    let bytes = encode(METRIC_SAMPLES, &bucket_value)?;
                    table
                        .insert(key, bytes.as_slice())
                        .map_err(access_error(METRIC_SAMPLES))?;
                    report.buckets_written += 1;
                }
            }
        }
        for def in [TRANSITIONS, SCALE_EVENTS, COLD_STARTS] {
            let mut table = open_table(&txn, def)?;
            let mut removed = 0;
            table
                .retain(|(_, at_ms, _), _| {
                    let keep = at_ms >= h.expire_events_before_ms;
                    removed += u64::from(!keep);
                    keep
                })
                .map_err(access_error(def))?;
            report.events_expired += removed;
        }
        report.log_expired = log::expire_log(&txn, h.expire_events_before_ms, h.fold_before_ms)?;
        txn.commit()?;
        tracing::debug!(?report, "history compacted");
        Ok(report)
    }
}

fn encode<T: Serialize>(def: impl TableHandle, rec: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(rec).map_err(|source| StoreError::EncodeRecord {
        table: def.name().to_string(),
        source,
    })
}

/// One entry of a [`Store::read_range`]: its key and its decoded value.
fn decode_entry<K, T>(
    def: TableDefinition<K, &'static [u8]>,
    entry: Result<RangeEntry<K>, StorageError>,
) -> Result<(AccessGuard<'static, K>, T), StoreError>
where
    K: Key + 'static,
    for<'a> K::SelfType<'a>: std::fmt::Debug,
    T: DeserializeOwned,
{
    let (k, v) = entry.map_err(access_error(def))?;
    let value = decode(def, &k.value(), v.value())?;
    Ok((k, value))
}

/// What a range over a table of encoded records yields.
type RangeEntry<K> = (AccessGuard<'static, K>, AccessGuard<'static, &'static [u8]>);

fn decode<T: DeserializeOwned>(
    def: impl TableHandle,
    key: &impl std::fmt::Debug,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::DecodeRecord {
        table: def.name().to_string(),
        key: format!("{key:?}"),
        source,
    })
}
