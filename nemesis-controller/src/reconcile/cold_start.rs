//! How many connections a cold start held: the rise of the agents' cumulative hold
//! counters over the wake, from a baseline taken while no agent held, counted once every
//! agent has left hold (so the connections forwarded at readiness are in). Pure: the
//! actor passes in the registry's sums and the time; this never reads the registry.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::agents::ServiceActivity;
use crate::store::ColdStartOutcome;

/// The longest a finished cold start waits for the agents' count. An agent reports at
/// once when it leaves hold, so this bounds only a lost or slow report: two of the
/// agents' default 5 s heartbeat intervals.
pub const COUNT_WAIT: Duration = Duration::from_secs(10);

/// The agents' hold total while none of them held: where the next cold start's count
/// starts. (The wake-up's own count, and the held gauge of the heartbeats, miss the
/// connections held and already forwarded between two heartbeats: a real cluster's
/// ColdStart Event said "1 connection held" for 10.)
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Baseline {
    at_rest: Option<u64>,
}

impl Baseline {
    /// On every evaluation without a wake in progress: keeps the total while nobody
    /// holds (once the Service is held, the total may already include this wake's).
    pub fn observe(&mut self, act: &ServiceActivity) {
        if act.holding_agents == 0 {
            self.at_rest = Some(act.holds_total);
        }
    }

    /// Starts over from `act` (a wake that ended without waking the target: what it
    /// held was refused, not part of the next cold start).
    pub fn reset(&mut self, act: &ServiceActivity) {
        self.at_rest = Some(act.holds_total);
    }

    /// The base of a wake starting now; without a sample at rest (a controller that
    /// started with the Service already held), the total now.
    pub fn for_wake(&self, act: &ServiceActivity) -> u64 {
        self.at_rest.unwrap_or(act.holds_total).min(act.holds_total)
    }
}

/// A cold start whose outcome is known and whose held count may still be coming.
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    pub wake_at: DateTime<Utc>,
    pub outcome: ColdStartOutcome,
    pub time_to_ready_ms: Option<u64>,
    /// The least the count can be: the wake-up's and heartbeats' held gauges.
    pub held_floor: u64,
    pub base: u64,
    /// Count with what there is from here on.
    pub deadline: Instant,
}

impl Ended {
    /// The held count once it is final: every agent reporting the Service has left hold
    /// (the connections held are counted, forwarded at readiness included), the target
    /// did not become ready (nothing to wait for), or the deadline passed; `None` while
    /// it is still coming.
    pub fn held(&self, act: Option<&ServiceActivity>, now: Instant) -> Option<u64> {
        let counted = act.map_or(0, |a| a.holds_total.saturating_sub(self.base));
        let settled = self.outcome != ColdStartOutcome::Ready
            || act.is_none_or(|a| a.holding_agents == 0)
            || now >= self.deadline;
        settled.then_some(counted.max(self.held_floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(holds_total: u64, holding_agents: usize) -> ServiceActivity {
        ServiceActivity {
            holds_total,
            holding_agents,
            ..ServiceActivity::default()
        }
    }

    #[test]
    fn the_baseline_is_the_total_last_seen_while_nobody_held() {
        let mut b = Baseline::default();
        assert_eq!(
            b.for_wake(&act(4, 1)),
            4,
            "no sample at rest: the total now"
        );
        b.observe(&act(7, 0));
        b.observe(&act(9, 1));
        assert_eq!(b.for_wake(&act(12, 1)), 7);
        b.reset(&act(12, 1));
        assert_eq!(b.for_wake(&act(12, 1)), 12);
        // A registry that started over (a new controller term) never gives a negative.
        assert_eq!(b.for_wake(&act(3, 1)), 3);
    }

    #[test]
    fn the_count_waits_for_every_agent_to_leave_hold_or_the_deadline() {
        let t0 = Instant::now();
        let ended = Ended {
            wake_at: Utc::now(),
            outcome: ColdStartOutcome::Ready,
            time_to_ready_ms: Some(200),
            held_floor: 1,
            base: 7,
            deadline: t0 + COUNT_WAIT,
        };
        let cases = [
            // (holds_total, holding agents, at, count)
            (8, 1, t0, None),
            (17, 0, t0, Some(10)),
            (17, 2, t0 + COUNT_WAIT, Some(10)),
            (7, 0, t0, Some(1)),
        ];
        for (total, holding, at, want) in cases {
            assert_eq!(
                ended.held(Some(&act(total, holding)), at),
                want,
                "{total} {holding}"
            );
        }
        assert_eq!(ended.held(None, t0), Some(1), "no Service: the floor");
        let timeout = Ended {
            outcome: ColdStartOutcome::Timeout,
            ..ended
        };
        assert_eq!(timeout.held(Some(&act(9, 1)), t0), Some(2));
    }
}
