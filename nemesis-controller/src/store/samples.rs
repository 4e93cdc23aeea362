//! Retention settings and the pure arithmetic of downsampling: which samples are old
//! enough to fold, and how raw samples and buckets merge into one-minute buckets. No I/O;
//! `Store::compact` reads, calls these and writes.

use std::time::Duration;

use super::records::SampleValue;

/// Width of a downsampled bucket.
pub const BUCKET_MS: u64 = 60_000;

/// How long each kind of history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Raw samples older than this are folded into one-minute buckets.
    pub raw: Duration,
    /// Buckets (and any raw sample) older than this are deleted.
    pub downsampled: Duration,
    /// Transitions, scale events and cold starts older than this are deleted.
    pub events: Duration,
}

/// An hour of raw samples covers every `for` window a policy is likely to use and the
/// UI's "last hour" chart at full resolution; a month of minute buckets is about 43k
/// points per metric, enough for weekly patterns; a year of events keeps reports
/// comparable across seasons while staying small (events are rare).
pub const DEFAULT_RETENTION: Retention = Retention {
    raw: Duration::from_secs(3600),
    downsampled: Duration::from_secs(30 * 24 * 3600),
    events: Duration::from_secs(365 * 24 * 3600),
};

impl Default for Retention {
    fn default() -> Self {
        DEFAULT_RETENTION
    }
}

/// Start of the one-minute bucket holding `at_ms`.
pub fn bucket_start(at_ms: u64) -> u64 {
    at_ms - at_ms % BUCKET_MS
}

/// Cut-offs for a compaction at `now_ms`: raw samples before `fold_before_ms` are folded
/// (aligned down to a bucket boundary, so a bucket is only built from whole minutes),
/// anything before `expire_samples_before_ms` / `expire_events_before_ms` is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizons {
    pub fold_before_ms: u64,
    pub expire_samples_before_ms: u64,
    pub expire_events_before_ms: u64,
}

impl Retention {
    pub fn horizons(&self, now_ms: u64) -> Horizons {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Horizons {
            fold_before_ms: bucket_start(now_ms.saturating_sub(ms(self.raw))),
            expire_samples_before_ms: now_ms.saturating_sub(ms(self.downsampled)),
            expire_events_before_ms: now_ms.saturating_sub(ms(self.events)),
        }
    }
}

/// Merges raw samples and buckets into one bucket. NaN samples carry no information for
/// min/max/avg and are skipped; `None` when nothing is left.
pub fn fold(values: impl IntoIterator<Item = SampleValue>) -> Option<SampleValue> {
    let mut min = f64::INFINITY;
    let mut max = f64::NEG_INFINITY;
    let mut sum = 0.0;
    let mut count: u64 = 0;
    for v in values {
        let (vmin, vmax, vsum, vcount) = match v {
            SampleValue::Raw { value } if value.is_nan() => continue,
            SampleValue::Raw { value } => (value, value, value, 1),
            SampleValue::Minute { count: 0, .. } => continue,
            SampleValue::Minute { avg, .. } if avg.is_nan() => continue,
            SampleValue::Minute {
                min,
                max,
                avg,
                count,
            } => (min, max, avg * f64::from(count), u64::from(count)),
        };
        min = min.min(vmin);
        max = max.max(vmax);
        sum += vsum;
        count += vcount;
    }
    if count == 0 {
        return None;
    }
    Some(SampleValue::Minute {
        min,
        max,
        avg: sum / count as f64,
        count: u32::try_from(count).unwrap_or(u32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_samples_fold_into_min_max_avg() {
        let b = fold([1.0, 5.0, 3.0].map(|value| SampleValue::Raw { value })).unwrap();
        assert_eq!(
            b,
            SampleValue::Minute {
                min: 1.0,
                max: 5.0,
                avg: 3.0,
                count: 3
            }
        );
    }

    #[test]
    fn a_bucket_merges_with_late_raw_samples_weighted_by_count() {
        let b = fold([
            SampleValue::Minute {
                min: 0.0,
                max: 4.0,
                avg: 2.0,
                count: 3,
            },
            SampleValue::Raw { value: 10.0 },
        ])
        .unwrap();
        assert_eq!(
            b,
            SampleValue::Minute {
                min: 0.0,
                max: 10.0,
                avg: 4.0,
                count: 4
            }
        );
    }

    #[test]
    fn nan_samples_are_skipped_and_an_all_nan_minute_gives_no_bucket() {
        assert_eq!(fold([SampleValue::Raw { value: f64::NAN }]), None);
        let b = fold([
            SampleValue::Raw { value: f64::NAN },
            SampleValue::Raw { value: 2.0 },
        ])
        .unwrap();
        assert_eq!(b.mean(), 2.0);
    }

    #[test]
    fn fold_horizon_is_aligned_to_whole_minutes() {
        let r = Retention {
            raw: Duration::from_secs(3600),
            downsampled: Duration::from_secs(7200),
            events: Duration::from_secs(10_000),
        };
        let now = 10 * 3_600_000 + 90_500;
        let h = r.horizons(now);
        assert_eq!(h.fold_before_ms, 9 * 3_600_000 + 60_000);
        assert_eq!(h.expire_samples_before_ms, now - 7_200_000);
        assert_eq!(h.expire_events_before_ms, now - 10_000_000);
        assert_eq!(Retention::default().horizons(5).fold_before_ms, 0);
    }
}
