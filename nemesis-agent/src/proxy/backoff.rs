//! Retry delays (exponential with jitter) for backend connects, wake-ups and heartbeats.
//! Pure: computes delays, never sleeps.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The delay before retry number `attempt` (1 for the first retry): `initial`
    /// doubled per attempt up to `max`, then drawn from its upper half so that many
    /// connections retrying together spread out.
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        let ceiling = self
            .initial
            .saturating_mul(1u32 << doublings)
            .min(self.max)
            .max(Duration::from_micros(1));
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(nanos / 2 + rand::random_range(0..=nanos / 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_up_to_the_ceiling_and_stays_in_its_upper_half() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        for (attempt, ceiling) in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (40, 100)] {
            for _ in 0..50 {
                let d = b.delay(attempt);
                let c = Duration::from_millis(ceiling);
                assert!(d <= c && d >= c / 2, "attempt {attempt}: {d:?} vs {c:?}");
            }
        }
    }
}
