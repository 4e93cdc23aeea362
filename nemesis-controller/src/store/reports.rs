//! Report arithmetic over stored records: cold-start statistics, time spent per state,
//! replica-seconds. Pure functions of the records and a window; the store fetches the
//! records (including the last one before the window, which says where it started).

use std::collections::BTreeMap;
use std::ops::Range;

use nemesis_common::stats::percentile;
use serde::Serialize;

use super::records::{ColdStartOutcome, ColdStartRecord, ScaleRecord, TransitionRecord};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ColdStartStats {
    pub count: usize,
    pub ready: usize,
    pub timeouts: usize,
    pub failures: usize,
    /// Percentiles of time to ready over the cold starts that became ready
    /// (nearest-rank); `None` without any.
    pub p50_ms: Option<u64>,
    pub p95_ms: Option<u64>,
    pub p99_ms: Option<u64>,
    pub max_ms: Option<u64>,
    /// Connections held across all cold starts in the window.
    pub held_connections: u64,
}

pub fn cold_start_stats(records: &[ColdStartRecord]) -> ColdStartStats {
    let mut stats = ColdStartStats {
        count: records.len(),
        ..ColdStartStats::default()
    };
    let mut ready_ms = Vec::new();
    for r in records {
        stats.held_connections += r.held_connections;
        match r.outcome {
            ColdStartOutcome::Ready => {
                stats.ready += 1;
                ready_ms.extend(r.time_to_ready_ms);
            }
            ColdStartOutcome::Timeout => stats.timeouts += 1,
            ColdStartOutcome::Failed { .. } => stats.failures += 1,
        }
    }
    ready_ms.sort_unstable();
    stats.p50_ms = percentile(&ready_ms, 50.0);
    stats.p95_ms = percentile(&ready_ms, 95.0);
    stats.p99_ms = percentile(&ready_ms, 99.0);
    stats.max_ms = ready_ms.last().copied();
    stats
}

/// Milliseconds spent in each state during `window`. `before` is the last transition
/// before the window (the state the window starts in); without it the first transition's
/// `from_state` is used. Empty when no transition tells the state at all.
pub fn time_in_states(
    before: Option<&TransitionRecord>,
    in_window: &[TransitionRecord],
    window: Range<u64>,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Some(mut state) = before
        .map(|t| t.to_state.as_str())
        .or_else(|| in_window.first().map(|t| t.from_state.as_str()))
    else {
        return out;
    };
    let mut cursor = window.start;
    for t in in_window {
        let at = t.at_ms.clamp(cursor, window.end);
        *out.entry(state.to_string()).or_insert(0) += at - cursor;
        state = &t.to_state;
        cursor = at;
    }
    *out.entry(state.to_string()).or_insert(0) += window.end.saturating_sub(cursor);
    out.retain(|_, ms| *ms > 0);
    out
}

/// Integral of the replica count over `window`, in replica-seconds (a cost proxy).
/// `before` is the last scale before the window; `None` when no scale says how many
/// replicas there were.
pub fn replica_seconds(
    before: Option<&ScaleRecord>,
    in_window: &[ScaleRecord],
    window: Range<u64>,
) -> Option<f64> {
    let mut replicas = before
        .map(|s| s.to_replicas)
        .or_else(|| in_window.first().map(|s| s.from_replicas))?;
    let mut cursor = window.start;
    let mut replica_ms = 0.0;
    for s in in_window {
        let at = s.at_ms.clamp(cursor, window.end);
        replica_ms += f64::from(replicas.max(0)) * (at - cursor) as f64;
        replicas = s.to_replicas;
        cursor = at;
    }
    replica_ms += f64::from(replicas.max(0)) * window.end.saturating_sub(cursor) as f64;
    Some(replica_ms / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::PolicyId;

    fn tr(at_ms: u64, from: &str, to: &str) -> TransitionRecord {
        TransitionRecord {
            at_ms,
            policy: PolicyId::new("ns", "p"),
            from_state: from.into(),
            to_state: to.into(),
            from_replicas: 0,
            to_replicas: 0,
            reason: String::new(),
            metrics: BTreeMap::new(),
        }
    }

    fn sc(at_ms: u64, from: i32, to: i32) -> ScaleRecord {
        ScaleRecord {
            at_ms,
            policy: PolicyId::new("ns", "p"),
            state: String::new(),
            from_replicas: from,
            to_replicas: to,
            reason: String::new(),
            metrics: BTreeMap::new(),
            recovered: false,
        }
    }

    fn cs(ms: Option<u64>, outcome: ColdStartOutcome) -> ColdStartRecord {
        ColdStartRecord {
            wake_at_ms: 0,
            policy: PolicyId::new("ns", "p"),
            time_to_ready_ms: ms,
            held_connections: 2,
            outcome,
        }
    }

    #[test]
    fn cold_start_stats_count_outcomes_and_rank_only_ready_ones() {
        let s = cold_start_stats(&[
            cs(Some(300), ColdStartOutcome::Ready),
            cs(Some(100), ColdStartOutcome::Ready),
            cs(Some(200), ColdStartOutcome::Ready),
            cs(None, ColdStartOutcome::Timeout),
            cs(
                None,
                ColdStartOutcome::Failed {
                    message: "x".into(),
                },
            ),
        ]);
        assert_eq!((s.count, s.ready, s.timeouts, s.failures), (5, 3, 1, 1));
        assert_eq!(
            (s.p50_ms, s.p99_ms, s.max_ms),
            (Some(200), Some(300), Some(300))
        );
        assert_eq!(s.held_connections, 10);
    }

    #[test]
    fn time_in_states_starts_from_the_transition_before_the_window() {
        let before = tr(0, "warm", "zero");
        let m = time_in_states(
            Some(&before),
            &[tr(1_000, "zero", "warm"), tr(4_000, "warm", "zero")],
            500..10_000,
        );
        assert_eq!(m["zero"], 500 + 6_000);
        assert_eq!(m["warm"], 3_000);
        assert_eq!(m.values().sum::<u64>(), 9_500);
    }

    #[test]
    fn time_in_states_without_history_before_uses_the_first_from_state() {
        let m = time_in_states(None, &[tr(2_000, "zero", "warm")], 0..3_000);
        assert_eq!(m["zero"], 2_000);
        assert_eq!(m["warm"], 1_000);
        assert!(time_in_states(None, &[], 0..3_000).is_empty());
    }

    #[test]
    fn replica_seconds_integrates_the_replica_count() {
        let rs = replica_seconds(
            Some(&sc(0, 0, 2)),
            &[sc(10_000, 2, 4), sc(20_000, 4, 0)],
            5_000..30_000,
        );
        // 2 replicas for 5 s, 4 for 10 s, 0 for 10 s.
        assert_eq!(rs, Some(50.0));
        assert_eq!(replica_seconds(None, &[], 0..1_000), None);
        assert_eq!(replica_seconds(None, &[sc(500, 1, 0)], 0..1_000), Some(0.5));
    }
}
