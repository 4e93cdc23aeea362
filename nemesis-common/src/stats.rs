//! Percentiles of measured samples, for the reports and every benchmark: one convention
//! (nearest rank, `p` in percent) so figures from different binaries compare.

/// Nearest-rank percentile of `sorted` (ascending): the smallest value with at least
/// `p`% of the values at or below it. `None` for no samples; `p` is clamped to 0..=100,
/// so `0.0` gives the smallest value and `100.0` the largest.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// [`percentile`] of a benchmark's floating-point samples, NaN when there are none (a
/// figure that prints as NaN says "nothing measured" rather than a made-up zero).
pub fn percentile_or_nan(sorted: &[f64], p: f64) -> f64 {
    percentile(sorted, p).unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 99.5), Some(100));
        assert_eq!(percentile(&[7u64], 99.0), Some(7));
        assert_eq!(percentile::<u64>(&[], 50.0), None);
        assert_eq!(percentile(&[1u64, 2], 0.0), Some(1));
        assert_eq!(percentile(&[1u64, 2], 250.0), Some(2));
    }

    #[test]
    fn no_samples_is_nan_for_floats() {
        assert!(percentile_or_nan(&[], 99.0).is_nan());
        assert_eq!(percentile_or_nan(&[0.5, 1.5, 2.5], 50.0), 1.5);
    }
}
