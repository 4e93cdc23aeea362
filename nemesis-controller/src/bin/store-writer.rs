//! `store-writer <history.redb> <first id>`: exists only for the crash-safety test
//! `records_committed_before_a_kill_9_survive_the_restart` (tests/store_history.rs),
//! which runs it as a child and kills it with SIGKILL mid-write. It opens the history
//! store and writes records (transition, scale, cold start, sample in turn, ids counting
//! up from `<first id>`) until killed, printing `committed <kind> <id>` after each
//! commit returned. Not part of the controller's install; never run it on a real history.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use nemesis_controller::store::{
    ColdStartOutcome, ColdStartRecord, PolicyId, Retention, ScaleRecord, Store, TransitionRecord,
};

/// The policy every record belongs to; the test reads its history back.
const NAMESPACE: &str = "shop";
const POLICY: &str = "crash";
/// The sample metric the test reads back.
const METRIC: &str = "rate";

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(path), Some(first), None) = (args.next(), args.next(), args.next()) else {
        bail!("usage: store-writer <history.redb> <first id>");
    };
    let path = PathBuf::from(path);
    let first: u64 = first
        .to_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("<first id> {first:?} is not a whole number"))?;
    let store = Store::open(&path, Retention::default())
        .with_context(|| format!("opening {}", path.display()))?;
    let p = PolicyId::new(NAMESPACE, POLICY);
    let mut out = std::io::stdout().lock();
    for id in first.. {
        let kind = match id % 4 {
            0 => {
                store.record_transition(&TransitionRecord {
                    at_ms: id,
                    policy: p.clone(),
                    from_state: "zero".into(),
                    to_state: "warm".into(),
                    from_replicas: 0,
                    to_replicas: 2,
                    // The test identifies a transition by its reason.
                    reason: id.to_string(),
                    metrics: BTreeMap::from([("conns.active".to_string(), 0.0)]),
                })?;
                "transition"
            }
            1 => {
                store.record_scale(&ScaleRecord {
                    at_ms: id,
                    policy: p.clone(),
                    state: "warm".into(),
                    from_replicas: 0,
                    to_replicas: 1,
                    reason: "0->1".into(),
                    metrics: BTreeMap::new(),
                    recovered: false,
                })?;
                "scale"
            }
            2 => {
                store.record_cold_start(&ColdStartRecord {
                    wake_at_ms: id,
                    policy: p.clone(),
                    time_to_ready_ms: Some(id),
                    held_connections: 3,
                    outcome: ColdStartOutcome::Ready,
                })?;
                "cold_start"
            }
            _ => {
                store.record_samples(id, [(&p, METRIC, id as f64)])?;
                "sample"
            }
        };
        // Flushed before the next write starts: a line the test reads was committed.
        writeln!(out, "committed {kind} {id}")?;
        out.flush()?;
    }
    Ok(())
}
