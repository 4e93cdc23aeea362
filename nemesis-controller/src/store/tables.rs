//! Every redb table of the history store, with its key layout. A schema change is a new
//! table name (`_v2`) plus an upgrade step in `store::schema`; a table definition here is
//! never edited in place, or old files would be read with the wrong types.

use redb::TableDefinition;

/// Event keys: `(policy "namespace/name", unix milliseconds, sequence)`. Ordered by policy
/// then time, so one policy's events in a time window are one contiguous range. The
/// sequence (global, from [`META`]'s `next_seq`) keeps two events of the same millisecond
/// apart and preserves their order.
pub type EventKey<'a> = (&'a str, u64, u64);

/// Sample keys: `(policy "namespace/name", metric name, unix milliseconds)`. One metric of
/// one policy over a window is one range; a second raw sample in the same millisecond
/// replaces the first.
pub type SampleKey<'a> = (&'a str, &'a str, u64);

/// Values are serde_json bytes of the record types in `store::records`: JSON tolerates
/// added optional fields, so a record may grow without a new table.
pub const TRANSITIONS: TableDefinition<EventKey, &[u8]> = TableDefinition::new("transitions_v1");
pub const SCALE_EVENTS: TableDefinition<EventKey, &[u8]> = TableDefinition::new("scale_events_v1");
pub const COLD_STARTS: TableDefinition<EventKey, &[u8]> = TableDefinition::new("cold_starts_v1");
pub const METRIC_SAMPLES: TableDefinition<SampleKey, &[u8]> =
    TableDefinition::new("metric_samples_v1");

/// The replication log: every event and sample batch this file holds, by sequence
/// number, as serde_json bytes of a `store::log::LogEntry`. The leader serves it to the
/// standbys in sequence order (`GET /internal/history?after=`); a standby stores what it
/// pulls here under the leader's sequence, so its highest key is where it resumes. A
/// sequence is `(leadership epoch << 40) | counter` (see `store::log::EPOCH_SHIFT`), so
/// two leaders' records never share one.
pub const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("replication_log_v1");

/// Small named counters: [`META_SCHEMA_VERSION`] and [`META_NEXT_SEQ`].
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta_v1");

/// The schema version the file was last written with.
pub const META_SCHEMA_VERSION: &str = "schema_version";
/// The next event sequence number.
pub const META_NEXT_SEQ: &str = "next_seq";
