//! Which metric samples are worth a history write. Every policy samples every few
//! seconds, but at steady state nothing changes: writing 10,000 policies' unchanged
//! samples cost the disk 0.6 MiB/s and the standbys as much replication. A sample is
//! written when its value differs from the last one written for its series, when its
//! series counts events and it is not zero (every event counts), or when the last write
//! of its series is [`REFRESH`] old (so a chart and the overview's "current replicas"
//! always have a recent point). When a value changes after unwritten repeats, the last
//! repeat is written first, at its own time, so a chart steps at the change instead of
//! ramping over the quiet stretch. Pure: no clock, no I/O.

use std::collections::HashMap;
use std::time::Duration;

use crate::reports::COUNT_SERIES;
use crate::store::PolicyId;

/// How long a series goes without a written sample while its value holds.
pub const REFRESH: Duration = Duration::from_secs(300);

/// Samples to write: `(at_ms, policy, [(metric, value)])`.
pub type Batch = (u64, PolicyId, Vec<(String, f64)>);

#[derive(Debug, Clone, Copy)]
struct Series {
    /// The last sample written.
    written: (u64, f64),
    /// The last sample not written (newer than `written`), if any.
    skipped: Option<(u64, f64)>,
}

/// The last written and skipped sample of every series.
#[derive(Debug, Default)]
pub struct Thinning {
    series: HashMap<PolicyId, HashMap<String, Series>>,
    /// When quiet series were last forgotten.
    swept_ms: u64,
}

/// Values equal for thinning: bit-identical, or both NaN.
fn same(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

impl Thinning {
    /// What of `values` sampled at `at_ms` to write: at most two batches (the skipped
    /// repeats written before a change, then the samples of `at_ms`), in time order.
    pub fn keep(&mut self, at_ms: u64, policy: &PolicyId, values: &[(String, f64)]) -> Vec<Batch> {
        let refresh = u64::try_from(REFRESH.as_millis()).unwrap_or(u64::MAX);
        if at_ms.saturating_sub(self.swept_ms) >= 2 * refresh {
            self.forget_older(at_ms - 2 * refresh);
            self.swept_ms = at_ms;
        }
        let known = match self.series.get_mut(policy) {
            Some(k) => k,
            None => self.series.entry(policy.clone()).or_default(),
        };
        // Skipped repeats to write before the change, grouped by their time.
        let mut before: Vec<(u64, String, f64)> = Vec::new();
        let mut now: Vec<(String, f64)> = Vec::new();
        for (metric, value) in values {
            let (metric, value) = (metric.as_str(), *value);
            let counts = COUNT_SERIES.contains(&metric);
            let Some(s) = known.get_mut(metric) else {
                known.insert(
                    metric.to_string(),
                    Series {
                        written: (at_ms, value),
                        skipped: None,
                    },
                );
                now.push((metric.to_string(), value));
                continue;
            };
            let changed = !same(s.written.1, value);
            let due = at_ms.saturating_sub(s.written.0) >= refresh;
            if changed || due || (counts && value != 0.0) {
                if changed && let Some((t, v)) = s.skipped.filter(|(t, _)| *t < at_ms) {
                    before.push((t, metric.to_string(), v));
                }
                s.written = (at_ms, value);
                s.skipped = None;
                now.push((metric.to_string(), value));
            } else {
                s.skipped = Some((at_ms, value));
            }
        }
        let mut out: Vec<Batch> = Vec::new();
        before.sort_by_key(|(t, _, _)| *t);
        for (t, metric, v) in before {
            match out.last_mut() {
                Some((at, _, vals)) if *at == t => vals.push((metric, v)),
                _ => out.push((t, policy.clone(), vec![(metric, v)])),
            }
        }
        if !now.is_empty() {
            out.push((at_ms, policy.clone(), now));
        }
        out
    }

    /// Forgets the series of policies that sampled nothing since `before_ms` (deleted
    /// policies, or ones another leader runs now): their next sample is written as new.
    pub fn forget_older(&mut self, before_ms: u64) {
        self.series.retain(|_, series| {
            series.retain(|_, s| s.skipped.map_or(s.written.0, |(t, _)| t) >= before_ms);
            !series.is_empty()
        });
    }

    /// Series tracked (for tests and metrics).
    pub fn len(&self) -> usize {
        self.series.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> PolicyId {
        PolicyId::new("ns", "web")
    }

    fn v(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(m, v)| (m.to_string(), *v)).collect()
    }

    const R: u64 = REFRESH.as_millis() as u64;

    #[test]
    fn unchanged_samples_are_written_once_per_refresh() {
        let mut t = Thinning::default();
        assert_eq!(t.keep(0, &p(), &v(&[("nemesis.replicas", 0.0)])).len(), 1);
        for at in (10_000..R).step_by(10_000) {
            assert!(
                t.keep(at, &p(), &v(&[("nemesis.replicas", 0.0)]))
                    .is_empty()
            );
        }
        let due = t.keep(R, &p(), &v(&[("nemesis.replicas", 0.0)]));
        assert_eq!(due, vec![(R, p(), v(&[("nemesis.replicas", 0.0)]))]);
    }

    #[test]
    fn a_change_writes_the_last_repeat_at_its_time_then_the_new_value() {
        let mut t = Thinning::default();
        t.keep(
            0,
            &p(),
            &v(&[("nemesis.replicas", 0.0), ("conns.rate", 1.0)]),
        );
        t.keep(
            10_000,
            &p(),
            &v(&[("nemesis.replicas", 0.0), ("conns.rate", 1.0)]),
        );
        t.keep(
            20_000,
            &p(),
            &v(&[("nemesis.replicas", 0.0), ("conns.rate", 1.0)]),
        );
        let out = t.keep(
            30_000,
            &p(),
            &v(&[("nemesis.replicas", 2.0), ("conns.rate", 1.0)]),
        );
        assert_eq!(
            out,
            vec![
                (20_000, p(), v(&[("nemesis.replicas", 0.0)])),
                (30_000, p(), v(&[("nemesis.replicas", 2.0)])),
            ]
        );
        // Right after a write there is no repeat to write before the next change.
        let out = t.keep(40_000, &p(), &v(&[("nemesis.replicas", 1.0)]));
        assert_eq!(out, vec![(40_000, p(), v(&[("nemesis.replicas", 1.0)]))]);
    }

    #[test]
    fn every_nonzero_event_count_is_written_and_zeros_are_thinned() {
        let mut t = Thinning::default();
        let s = crate::reports::HOLDS_REFUSED_SERIES;
        assert_eq!(t.keep(0, &p(), &v(&[(s, 0.0)])).len(), 1);
        assert!(t.keep(10_000, &p(), &v(&[(s, 0.0)])).is_empty());
        assert_eq!(t.keep(20_000, &p(), &v(&[(s, 3.0)])).len(), 2);
        assert_eq!(
            t.keep(30_000, &p(), &v(&[(s, 3.0)])),
            vec![(30_000, p(), v(&[(s, 3.0)]))]
        );
        assert_eq!(t.keep(40_000, &p(), &v(&[(s, 0.0)])).len(), 1);
        assert!(t.keep(50_000, &p(), &v(&[(s, 0.0)])).is_empty());
    }

    #[test]
    fn nan_repeats_are_thinned_and_policies_are_apart() {
        let mut t = Thinning::default();
        let q = PolicyId::new("ns", "api");
        t.keep(0, &p(), &v(&[("conns.rate", f64::NAN)]));
        assert!(
            t.keep(10_000, &p(), &v(&[("conns.rate", f64::NAN)]))
                .is_empty()
        );
        assert_eq!(t.keep(10_000, &q, &v(&[("conns.rate", f64::NAN)])).len(), 1);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn quiet_policies_are_forgotten() {
        let mut t = Thinning::default();
        t.keep(0, &p(), &v(&[("conns.rate", 1.0)]));
        t.keep(
            5_000,
            &PolicyId::new("ns", "api"),
            &v(&[("conns.rate", 1.0)]),
        );
        t.forget_older(1_000);
        assert_eq!(t.len(), 1);
        // A forgotten series' next sample is written.
        assert_eq!(t.keep(6_000, &p(), &v(&[("conns.rate", 1.0)])).len(), 1);
    }
}
