//! The history store against a real redb file: crash safety with a real `kill -9`,
//! retention and downsampling, and the report queries.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nemesis_controller::store::{
    ColdStartOutcome, ColdStartRecord, EventTable, LogEntry, LogItem, MetricPoint, PolicyId,
    Retention, SampleValue, ScaleRecord, Store, StoreError, TransitionRecord, tables,
};

fn policy(name: &str) -> PolicyId {
    PolicyId::new("shop", name)
}

fn transition(p: &PolicyId, at_ms: u64, from: &str, to: &str, reason: &str) -> TransitionRecord {
    TransitionRecord {
        at_ms,
        policy: p.clone(),
        from_state: from.into(),
        to_state: to.into(),
        from_replicas: if from == "zero" { 0 } else { 2 },
        to_replicas: if to == "zero" { 0 } else { 2 },
        reason: reason.into(),
        metrics: BTreeMap::from([("conns.active".to_string(), 0.0)]),
    }
}

fn scale(p: &PolicyId, at_ms: u64, from: i32, to: i32) -> ScaleRecord {
    ScaleRecord {
        at_ms,
        policy: p.clone(),
        state: "warm".into(),
        from_replicas: from,
        to_replicas: to,
        reason: format!("{from}->{to}"),
        metrics: BTreeMap::new(),
        recovered: false,
    }
}

fn cold_start(p: &PolicyId, wake_at_ms: u64, ready_ms: Option<u64>) -> ColdStartRecord {
    ColdStartRecord {
        wake_at_ms,
        policy: p.clone(),
        time_to_ready_ms: ready_ms,
        held_connections: 3,
        outcome: if ready_ms.is_some() {
            ColdStartOutcome::Ready
        } else {
            ColdStartOutcome::Timeout
        },
    }
}

// === crash safety ===

/// Runs the writer in a child until it has committed at least `min_commits` records
/// after `first_id`, kills it with SIGKILL mid-write, and returns what it had reported
/// committed.
fn write_then_kill_9(
    db: &std::path::Path,
    first_id: u64,
    min_commits: usize,
) -> Result<Vec<(String, u64)>> {
    // src/bin/store-writer.rs: writes policy shop/crash, one line per commit.
    let mut child = Command::new(env!("CARGO_BIN_EXE_store-writer"))
        .arg(db)
        .arg(first_id.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut committed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed.len() < min_commits {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "the writer committed only {} records in 60 s",
                committed.len()
            );
        }
        let Some(line) = lines.next() else {
            bail!("the writer exited early: {:?}", child.wait()?);
        };
        if let Some(rest) = line?.strip_prefix("committed ") {
            let (kind, id) = rest.split_once(' ').context("malformed line")?;
            committed.push((kind.to_string(), id.parse()?));
        }
    }
    // SIGKILL while it keeps writing: no destructor, no flush, no clean close.
    child.kill()?;
    // Lines printed before the kill are still in the pipe; they were committed too.
    for line in lines {
        if let Some(rest) = line?.strip_prefix("committed ") {
            let (kind, id) = rest.split_once(' ').context("malformed line")?;
            committed.push((kind.to_string(), id.parse()?));
        }
    }
    let status = child.wait()?;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the writer must have died from the kill, not exited"
    );
    Ok(committed)
}

#[test]
fn records_committed_before_a_kill_9_survive_the_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("history.redb");
    let p = policy("crash");
    let mut all: Vec<(String, u64)> = Vec::new();
    // Three crash/restart rounds on the same file: recovery must also survive a crash
    // of a process that itself started from a recovered file.
    for round in 0..3u64 {
        let first_id = round * 1_000_000;
        let committed = write_then_kill_9(&db, first_id, 120)?;
        all.extend(committed);

        let store = Store::open(&db, Retention::default())
            .with_context(|| format!("reopening after kill -9 round {round}"))?;
        let everything = 0..u64::MAX;
        let transitions: BTreeSet<u64> = store
            .transitions(&p, everything.clone())?
            .iter()
            .filter_map(|t| t.reason.parse().ok())
            .collect();
        let scales: BTreeSet<u64> = store
            .scale_events(&p, everything.clone())?
            .iter()
            .map(|s| s.at_ms)
            .collect();
        let colds: BTreeSet<u64> = store
            .cold_starts(&p, everything.clone())?
            .iter()
            .map(|c| c.wake_at_ms)
            .collect();
        let samples: BTreeSet<u64> = store
            .samples(&p, "rate", everything.clone())?
            .iter()
            .map(|s| s.at_ms)
            .collect();
        for (kind, id) in &all {
            let found = match kind.as_str() {
                "transition" => transitions.contains(id),
                "scale" => scales.contains(id),
                "cold_start" => colds.contains(id),
                "sample" => samples.contains(id),
                other => bail!("unknown kind {other}"),
            };
            assert!(
                found,
                "round {round}: committed {kind} {id} is missing after kill -9"
            );
        }
        // The file is usable, not just readable.
        store.record_transition(&transition(&p, u64::MAX - 1, "warm", "zero", "after"))?;
    }
    assert!(all.len() >= 360);
    Ok(())
}

// === schema ===

#[test]
fn a_history_file_from_a_newer_controller_is_refused_with_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("h.redb");
    drop(Store::open(&path, Retention::default())?);
    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        txn.open_table(tables::META)?
            .insert(tables::META_SCHEMA_VERSION, 99)?;
        txn.commit()?;
    }
    let err = Store::open(&path, Retention::default()).unwrap_err();
    assert!(matches!(
        err,
        StoreError::SchemaTooNew {
            found: 99,
            supported: nemesis_controller::store::SCHEMA_VERSION
        }
    ));
    assert!(err.to_string().contains("newer"), "{err}");
    Ok(())
}

/// A version-1 file (before the replication log) gets its events into the log when a
/// version-2 controller opens it, under their own sequence numbers.
#[test]
fn upgrading_a_version_1_file_puts_its_events_in_the_replication_log() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("h.redb");
    let p = policy("old");
    {
        let store = Store::open(&path, Retention::default())?;
        store.record_transition(&transition(&p, 1_000, "zero", "warm", "demand"))?;
        store.record_scale(&scale(&p, 1_001, 0, 2))?;
    }
    {
        // Back to what a version-1 controller left: no log table, version 1.
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        txn.delete_table(tables::LOG)?;
        txn.open_table(tables::META)?
            .insert(tables::META_SCHEMA_VERSION, 1)?;
        txn.commit()?;
    }
    let store = Store::open(&path, Retention::default())?;
    assert_eq!(
        store.migration(),
        nemesis_controller::store::Migration::Upgraded { from: 1 }
    );
    let log = store.log_entries()?;
    let kinds: Vec<(u64, &str)> = log
        .iter()
        .map(|(seq, e)| {
            let kind = match &e.item {
                LogItem::Transition { .. } => "transition",
                LogItem::Scale { .. } => "scale",
                LogItem::ColdStart { .. } => "coldStart",
                LogItem::Samples { .. } => "samples",
            };
            (*seq, kind)
        })
        .collect();
    assert_eq!(kinds, vec![(1, "transition"), (2, "scale")]);
    Ok(())
}

// === replication ===

/// A standby that applies the leader's log pages holds every record once, with the
/// leader's sequence numbers; applying a page again changes nothing; and the standby's
/// own records as the next leader sort after the old leader's and never collide.
#[test]
fn a_standby_applying_the_leaders_log_holds_every_record_once_and_leads_on_after_it() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let leader = Store::open(dir.path().join("a.redb"), Retention::default())?;
    let standby = Store::open(dir.path().join("b.redb"), Retention::default())?;
    let p = policy("web");
    leader.begin_epoch(0)?;
    for i in 0..5u64 {
        leader.record_transition(&transition(&p, 1_000 + i, "low", "high", "load"))?;
        leader.record_scale(&scale(&p, 1_000 + i, 1, 3))?;
    }
    leader.record_samples(2_000, [(&p, "conns.active", 7.0), (&p, "rps", f64::NAN)])?;

    // Pull in pages of three, as a standby does (`after` = the highest it holds).
    let mut pulls = 0;
    loop {
        let page = leader.log_after(standby.log_head()?, 3)?;
        if page.entries.is_empty() {
            break;
        }
        let entries: Vec<(u64, LogEntry)> = page
            .entries
            .iter()
            .map(|(seq, bytes)| Ok((*seq, serde_json::from_slice(bytes)?)))
            .collect::<Result<_>>()?;
        assert!(entries.len() <= 3);
        standby.apply_replicated(&entries)?;
        // Applying the same page again is harmless.
        assert_eq!(standby.apply_replicated(&entries)?, 0);
        pulls += 1;
        assert!(pulls < 10, "the pull does not end");
    }
    assert_eq!(pulls, 4, "11 entries in pages of 3");
    // (As JSON: a NaN sample is not equal to itself.)
    let json = |s: &Store| -> Result<String> { Ok(serde_json::to_string(&s.log_entries()?)?) };
    assert_eq!(json(&standby)?, json(&leader)?);
    assert_eq!(standby.log_entries()?.len(), 11);
    assert_eq!(
        standby.transitions(&p, 0..u64::MAX)?,
        leader.transitions(&p, 0..u64::MAX)?
    );
    assert_eq!(standby.scale_events(&p, 0..u64::MAX)?.len(), 5);
    let samples = standby.samples(&p, "rps", 0..u64::MAX)?;
    assert_eq!(samples.len(), 1);
    assert!(samples[0].value.mean().is_nan());

    // The standby leads (the Lease's transitions went to 1): its records come after.
    let first = standby.begin_epoch(1)?;
    assert_eq!(first, 1 << nemesis_controller::store::log::EPOCH_SHIFT);
    assert_eq!(
        leader.log_head()? >> nemesis_controller::store::log::EPOCH_SHIFT,
        0
    );
    let own = standby.record_scale(&scale(&p, 3_000, 3, 1))?;
    assert_eq!(own, first);
    let old_head = leader.log_head()?;
    assert!(own > old_head);
    // A leader that comes back in a later term (here without ever pulling) collides
    // with neither.
    let again = leader.begin_epoch(2)?;
    assert!(again > own);
    // What the old leader pulls from the new one starts after what it holds.
    let page = standby.log_after(old_head, 100)?;
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].0, own);
    assert_eq!(page.remaining, 0);
    Ok(())
}

/// A leader killed after its wake's record was committed, before its standby pulled
/// it: the standby, leading, recovers the same change from the target. Where the two
/// records meet (the old leader pulling the new one's log, or a union of both stores)
/// the change is read once, as the original; where only the recovery is, it stays.
#[test]
fn a_change_recorded_by_the_killed_leader_and_recovered_by_the_next_is_read_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = Store::open(dir.path().join("a.redb"), Retention::default())?;
    let b = Store::open(dir.path().join("b.redb"), Retention::default())?;
    let p = policy("web");
    a.begin_epoch(0)?;
    a.record_scale(&scale(&p, 1_000, 1, 0))?;
    let pull = |from: &Store, to: &Store| -> Result<()> {
        let page = from.log_after(to.log_head()?, 100)?;
        let entries: Vec<(u64, LogEntry)> = page
            .entries
            .iter()
            .map(|(seq, bytes)| Ok((*seq, serde_json::from_slice(bytes)?)))
            .collect::<Result<_>>()?;
        to.apply_replicated(&entries)?;
        Ok(())
    };
    pull(&a, &b)?;
    // The wake a committed and b never pulled; then a is killed.
    a.record_scale(&scale(&p, 2_000, 0, 1))?;
    // b leads, finds the target at 1 and its history at 0, and records the change.
    b.begin_epoch(1)?;
    let mut found = scale(&p, 3_000, 0, 1);
    found.recovered = true;
    found.reason = "found at takeover".into();
    b.record_scale(&found)?;
    b.record_scale(&scale(&p, 4_000, 1, 0))?;
    let tos = |r: &[ScaleRecord]| -> Vec<(u64, i32, i32, bool)> {
        r.iter()
            .map(|r| (r.at_ms, r.from_replicas, r.to_replicas, r.recovered))
            .collect()
    };
    // b alone: the recovery is the only record of the wake.
    assert_eq!(
        tos(&b.scale_events(&p, 0..u64::MAX)?),
        vec![
            (1_000, 1, 0, false),
            (3_000, 0, 1, true),
            (4_000, 1, 0, false)
        ]
    );
    // a back as a standby pulls b's records: it holds both, reads the original.
    pull(&b, &a)?;
    let once = vec![
        (1_000, 1, 0, false),
        (2_000, 0, 1, false),
        (4_000, 1, 0, false),
    ];
    assert_eq!(tos(&a.scale_events(&p, 0..u64::MAX)?), once);
    // The event list (UI) reads it so too, newest first...
    let listed: Vec<u64> = a
        .events_before(EventTable::ScaleEvents, &p, 0, (u64::MAX, 0), 10)?
        .into_iter()
        .map(|((at, _), _)| at)
        .collect();
    assert_eq!(listed, vec![4_000, 2_000, 1_000]);
    // ...and a window starting after the original as well.
    assert_eq!(
        tos(&a.scale_events(&p, 2_500..u64::MAX)?),
        vec![(4_000, 1, 0, false)]
    );
    // The union of both stores (what the chaos test checks).
    let union = nemesis_controller::store::scales::merge([
        a.scale_events(&p, 0..u64::MAX)?,
        b.scale_events(&p, 0..u64::MAX)?,
    ]);
    assert_eq!(tos(&union), once);
    // A record written before the field existed reads as made by its writer.
    let old: ScaleRecord = serde_json::from_str(
        r#"{"at_ms":1,"policy":{"namespace":"shop","name":"web"},"state":"warm","from_replicas":0,"to_replicas":1,"reason":"demand","metrics":{}}"#,
    )?;
    assert!(!old.recovered);
    assert!(!serde_json::to_string(&scale(&p, 1, 0, 1))?.contains("recovered"));
    Ok(())
}

// === retention and downsampling ===

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;

#[test]
fn old_raw_samples_fold_into_minute_buckets_and_expire_after_retention() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let retention = Retention {
        raw: Duration::from_secs(3600),
        downsampled: Duration::from_secs(3 * 3600),
        events: Duration::from_secs(2 * 3600),
    };
    let store = Store::open(dir.path().join("h.redb"), retention)?;
    let p = policy("web");
    let other = policy("api");
    let now = 100 * HOUR;
    // One sample every 10 s for the last 4 hours: 0..6 within each minute.
    let mut t = now - 4 * HOUR;
    let mut i = 0u64;
    while t < now {
        let v = (i % 6) as f64; // min 0, max 5, avg 2.5 in every minute
        store.record_samples(t, [(&p, "queue", v), (&other, "queue", 100.0)])?;
        t += 10_000;
        i += 1;
    }
    let all = 0..u64::MAX;
    assert_eq!(store.samples(&p, "queue", all.clone())?.len(), 4 * 360);

    let report = store.compact(now)?;
    let points = store.samples(&p, "queue", all.clone())?;
    // Older than 3 h: gone. 3 h..1 h ago: one bucket per minute. Last hour: raw.
    assert!(points.iter().all(|pt| pt.at_ms >= now - 3 * HOUR));
    let (buckets, raws): (Vec<&MetricPoint>, Vec<&MetricPoint>) = points
        .iter()
        .partition(|pt| matches!(pt.value, SampleValue::Minute { .. }));
    assert_eq!(buckets.len(), 120);
    assert_eq!(raws.len(), 360);
    assert!(raws.iter().all(|pt| pt.at_ms >= now - HOUR));
    for b in &buckets {
        assert_eq!(b.at_ms % MIN, 0, "buckets sit at minute starts");
        assert_eq!(
            b.value,
            SampleValue::Minute {
                min: 0.0,
                max: 5.0,
                avg: 2.5,
                count: 6
            }
        );
    }
    assert_eq!(report.samples_folded, 2 * 120 * 6);
    assert_eq!(report.buckets_written, 2 * 120);
    assert_eq!(report.samples_expired, 2 * 360);
    // The other policy was compacted the same way and kept apart.
    let o = store.samples(&other, "queue", all.clone())?;
    assert_eq!(o.len(), 120 + 360);
    assert!(o.iter().all(|pt| pt.value.mean() == 100.0));

    // Compacting again changes nothing.
    let again = store.compact(now)?;
    assert_eq!((again.samples_folded, again.samples_expired), (0, 0));
    assert_eq!(store.samples(&p, "queue", all.clone())?, points);

    // A late raw sample in an already folded minute merges into its bucket.
    let late_at = now - 2 * HOUR + 30_000;
    store.record_samples(late_at, [(&p, "queue", 11.0)])?;
    store.compact(now)?;
    let merged = store.samples(&p, "queue", (now - 2 * HOUR)..(now - 2 * HOUR + MIN))?;
    assert_eq!(merged.len(), 1);
    assert_eq!(
        merged[0].value,
        SampleValue::Minute {
            min: 0.0,
            max: 11.0,
            avg: (15.0 + 11.0) / 7.0,
            count: 7
        }
    );

    // An hour later the oldest hour of buckets expires.
    store.compact(now + HOUR)?;
    let points = store.samples(&p, "queue", all)?;
    assert!(points.iter().all(|pt| pt.at_ms >= now - 2 * HOUR));
    Ok(())
}

#[test]
fn events_older_than_their_retention_are_deleted_by_compaction() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let retention = Retention {
        events: Duration::from_secs(3600),
        ..Retention::default()
    };
    let store = Store::open(dir.path().join("h.redb"), retention)?;
    let p = policy("web");
    let now = 10 * HOUR;
    store.record_transition(&transition(&p, now - 2 * HOUR, "zero", "warm", "old"))?;
    store.record_transition(&transition(&p, now - MIN, "warm", "zero", "new"))?;
    store.record_scale(&scale(&p, now - 2 * HOUR, 0, 2))?;
    store.record_cold_start(&cold_start(&p, now - 2 * HOUR, Some(5)))?;
    store.record_cold_start(&cold_start(&p, now - MIN, Some(5)))?;
    let report = store.compact(now)?;
    assert_eq!(report.events_expired, 3);
    let left = store.transitions(&p, 0..u64::MAX)?;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].reason, "new");
    assert!(store.scale_events(&p, 0..u64::MAX)?.is_empty());
    assert_eq!(store.cold_starts(&p, 0..u64::MAX)?.len(), 1);
    Ok(())
}

// === queries ===

#[test]
fn window_queries_return_one_policys_events_in_order_and_nothing_else() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("h.redb"), Retention::default())?;
    let web = policy("web");
    let web2 = policy("web2"); // a name that extends another must not leak into it
    for (i, at) in [5_000u64, 1_000, 3_000, 3_000, 9_000].iter().enumerate() {
        store.record_transition(&transition(&web, *at, "a", "b", &format!("w{i}")))?;
        store.record_transition(&transition(&web2, *at, "a", "b", "other"))?;
    }
    let got: Vec<String> = store
        .transitions(&web, 1_000..9_000)?
        .into_iter()
        .map(|t| t.reason)
        .collect();
    // Sorted by time; two records of the same millisecond keep their write order; the
    // window is half-open.
    assert_eq!(got, ["w1", "w2", "w3", "w0"]);
    assert!(store.transitions(&web, 9_001..20_000)?.is_empty());
    assert_eq!(store.transitions(&policy("nobody"), 0..u64::MAX)?.len(), 0);
    assert_eq!(store.transitions(&web2, 0..u64::MAX)?.len(), 5);
    let t = &store.transitions(&web, 9_000..9_001)?[0];
    assert_eq!(t.metrics["conns.active"], 0.0);
    assert_eq!((t.from_state.as_str(), t.to_state.as_str()), ("a", "b"));
    Ok(())
}

#[test]
fn reports_give_time_per_state_replica_seconds_and_cold_start_percentiles() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("h.redb"), Retention::default())?;
    let p = policy("web");
    // zero until 10 s, warm until 40 s, zero after.
    store.record_transition(&transition(&p, 0, "warm", "zero", "idle"))?;
    store.record_transition(&transition(&p, 10_000, "zero", "warm", "demand"))?;
    store.record_transition(&transition(&p, 40_000, "warm", "zero", "idle"))?;
    store.record_scale(&scale(&p, 10_000, 0, 2))?;
    store.record_scale(&scale(&p, 20_000, 2, 3))?;
    store.record_scale(&scale(&p, 40_000, 3, 0))?;
    for (i, ms) in (1..=100u64).enumerate() {
        store.record_cold_start(&cold_start(&p, 1_000 + i as u64, Some(ms * 10)))?;
    }
    store.record_cold_start(&cold_start(&p, 2_000, None))?;

    let states = store.time_in_states(&p, 5_000..60_000)?;
    assert_eq!(states["zero"], 5_000 + 20_000);
    assert_eq!(states["warm"], 30_000);

    // 2 replicas for 10 s + 3 for 20 s.
    assert_eq!(store.replica_seconds(&p, 0..60_000)?, Some(80.0));
    assert_eq!(store.replica_seconds(&p, 30_000..35_000)?, Some(15.0));
    assert_eq!(store.replica_seconds(&policy("none"), 0..60_000)?, None);

    let cs = store.cold_start_stats(&p, 0..u64::MAX)?;
    assert_eq!((cs.count, cs.ready, cs.timeouts), (101, 100, 1));
    assert_eq!(
        (cs.p50_ms, cs.p99_ms, cs.max_ms),
        (Some(500), Some(990), Some(1000))
    );
    assert_eq!(cs.held_connections, 303);
    Ok(())
}
