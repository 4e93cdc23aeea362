//! One policy's scale history as readers see it, where records of several writers meet:
//! a replica's own store (its records, the leader's records it pulled, and the records a
//! later leader made and it pulled back) or the union of several replicas' stores.
//!
//! A leader killed between its `/scale` call and the commit of the record leaves a change
//! no store holds; the next leader finds the target elsewhere than its history ends and
//! records the change as `recovered` (see `crate::reconcile::resume::unrecorded_scale`).
//! When the killed leader did commit but its standby had not pulled the record yet, the
//! same change is then in two records: the original (in the killed replica's store) and
//! the recovered one. No identity links them (the leader that recovers sees the target
//! as it is, not the write that changed it), but the order does: a recovered record is
//! made before the new leader's first scale, so in a time-ordered history it repeats the
//! change before it exactly when the original is there. Pure; no I/O.

use super::ScaleRecord;

/// Whether `rec` says nothing `before` did not: a recovered record of the change
/// `before` already holds (the target already at `rec`'s replicas).
pub fn is_redundant(before: Option<&ScaleRecord>, rec: &ScaleRecord) -> bool {
    rec.recovered && before.is_some_and(|b| b.to_replicas == rec.to_replicas)
}

/// `records` (oldest first) without the redundant recovered ones; `before` is the record
/// just before the first (a window's reader passes the one before the window).
pub fn without_redundant(
    before: Option<ScaleRecord>,
    records: Vec<ScaleRecord>,
) -> Vec<ScaleRecord> {
    let mut last = before;
    let mut out = Vec::with_capacity(records.len());
    for rec in records {
        if is_redundant(last.as_ref(), &rec) {
            continue;
        }
        last = Some(rec.clone());
        out.push(rec);
    }
    out
}

/// One history from several stores' records of one policy (each store's may overlap: a
/// standby holds copies of the leader's): time-ordered, each record once, redundant
/// recoveries dropped.
pub fn merge(stores: impl IntoIterator<Item = Vec<ScaleRecord>>) -> Vec<ScaleRecord> {
    let mut all: Vec<ScaleRecord> = stores.into_iter().flatten().collect();
    // Recovered after an original at the same millisecond, so the original is kept.
    all.sort_by_key(|r| (r.at_ms, r.recovered));
    // Copies are identical; metrics may hold NaN (never equal), so compare the rest.
    let same = |a: &ScaleRecord, b: &ScaleRecord| {
        (
            a.at_ms,
            &a.policy,
            a.from_replicas,
            a.to_replicas,
            &a.state,
            &a.reason,
            a.recovered,
        ) == (
            b.at_ms,
            &b.policy,
            b.from_replicas,
            b.to_replicas,
            &b.state,
            &b.reason,
            b.recovered,
        )
    };
    let mut unique: Vec<ScaleRecord> = Vec::with_capacity(all.len());
    for rec in all {
        // Copies share `at_ms`: look back over the records of the same millisecond.
        let dup = unique
            .iter()
            .rev()
            .take_while(|u| u.at_ms == rec.at_ms)
            .any(|u| same(u, &rec));
        if !dup {
            unique.push(rec);
        }
    }
    without_redundant(None, unique)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::PolicyId;

    fn sc(at_ms: u64, from: i32, to: i32, recovered: bool) -> ScaleRecord {
        ScaleRecord {
            at_ms,
            policy: PolicyId::new("ns", "p"),
            state: "s".into(),
            from_replicas: from,
            to_replicas: to,
            reason: if recovered {
                "found".into()
            } else {
                "demand".into()
            },
            metrics: BTreeMap::from([("nan".to_string(), f64::NAN)]),
            recovered,
        }
    }

    fn tos(r: &[ScaleRecord]) -> Vec<(i32, i32, bool)> {
        r.iter()
            .map(|r| (r.from_replicas, r.to_replicas, r.recovered))
            .collect()
    }

    #[test]
    fn the_same_change_recorded_by_the_killed_leader_and_recovered_by_the_next_is_kept_once() {
        // Replica a (the killed leader) committed its wake; replica b had not pulled it
        // and recovered it at takeover, then slept; a pulled b's records on its return.
        let a = vec![
            sc(10, 1, 0, false),
            sc(20, 0, 1, false),
            sc(30, 0, 1, true),
            sc(40, 1, 0, false),
        ];
        let b = vec![sc(10, 1, 0, false), sc(30, 0, 1, true), sc(40, 1, 0, false)];
        let merged = merge([a.clone(), b]);
        assert_eq!(
            tos(&merged),
            vec![(1, 0, false), (0, 1, false), (1, 0, false)]
        );
        assert_eq!(merged[1].at_ms, 20, "the original is the one kept");
        // One store alone reads the same way.
        assert_eq!(tos(&without_redundant(None, a)), tos(&merged));
    }

    #[test]
    fn a_change_no_store_recorded_is_kept_as_recovered() {
        let a = vec![sc(10, 1, 0, false)];
        let b = vec![sc(10, 1, 0, false), sc(30, 0, 1, true), sc(40, 1, 0, false)];
        assert_eq!(
            tos(&merge([a, b])),
            vec![(1, 0, false), (0, 1, true), (1, 0, false)]
        );
    }

    #[test]
    fn a_window_starting_after_the_original_still_drops_its_recovery() {
        let rest = vec![sc(30, 0, 1, true), sc(40, 1, 0, false)];
        let kept = without_redundant(Some(sc(20, 0, 1, false)), rest.clone());
        assert_eq!(tos(&kept), vec![(1, 0, false)]);
        // Nothing before it: the recovery is all there is of the change.
        assert_eq!(tos(&without_redundant(None, rest)).len(), 2);
    }

    #[test]
    fn original_records_are_never_dropped() {
        // Two wakes in a row (the sleep between them lost with a killed leader's
        // queue): both were made, both stay.
        let r = vec![sc(10, 0, 1, false), sc(20, 0, 1, false)];
        assert_eq!(without_redundant(None, r).len(), 2);
    }
}
