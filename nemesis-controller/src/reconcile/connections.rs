//! The agents' counts of one Service as the engine reads them: open and held connections
//! summed over live agents, and the connect rate averaged over the policy's rate window
//! from the registry's monotonic connect total. Arithmetic over samples only; reading
//! the registry is the actor's job.

use std::collections::VecDeque;

use chrono::{DateTime, TimeDelta, Utc};

use crate::agents::ServiceActivity;
use crate::engine::ConnectionSample;

/// Connect totals seen over the last rate window.
#[derive(Debug, Clone)]
pub struct RateWindow {
    window: TimeDelta,
    points: VecDeque<(DateTime<Utc>, u64)>,
}

impl RateWindow {
    pub fn new(window: TimeDelta) -> Self {
        Self {
            window,
            points: VecDeque::new(),
        }
    }

    pub fn set_window(&mut self, window: TimeDelta) {
        self.window = window;
    }

    /// Adds the total seen at `at`; returns connects per second over the window (over
    /// what is known when less than a window has been seen; 0 from a single point).
    pub fn push(&mut self, at: DateTime<Utc>, total: u64) -> f64 {
        // A total that went back (a new registry) starts the window over.
        if self.points.back().is_some_and(|&(_, t)| t > total) {
            self.points.clear();
        }
        self.points.push_back((at, total));
        // Keep one point at or before the window's start, so the rate spans it all.
        let start = at - self.window;
        while self.points.len() > 2 && self.points[1].0 <= start {
            self.points.pop_front();
        }
        let (t0, c0) = self.points[0];
        let span = (at - t0).max(TimeDelta::zero());
        if span.is_zero() || total <= c0 {
            return 0.0;
        }
        let span = span.min(self.window).max(TimeDelta::milliseconds(1));
        (total - c0) as f64 / (span.num_milliseconds() as f64 / 1000.0)
    }
}

/// The engine's sample from the registry's activity; `None` when no live agent reports
/// the Service (missing data never counts as idle).
pub fn sample(
    activity: &ServiceActivity,
    rates: &mut RateWindow,
    now: DateTime<Utc>,
) -> Option<ConnectionSample> {
    let rate = rates.push(now, activity.connects_total);
    (activity.reporting_agents > 0).then_some(ConnectionSample {
        active: activity.open_connections as f64,
        rate,
        held: activity.held_connections as f64,
        at: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn the_rate_spans_the_window_and_forgets_older_connects() {
        let mut w = RateWindow::new(TimeDelta::seconds(10));
        assert_eq!(w.push(t(0), 100), 0.0);
        assert_eq!(w.push(t(5), 150), 10.0);
        assert_eq!(w.push(t(10), 200), 10.0);
        // 20 s in, no new connects for 10 s: the window sees none.
        w.push(t(15), 200);
        assert_eq!(w.push(t(20), 200), 0.0);
    }

    #[test]
    fn a_total_that_goes_back_restarts_the_window() {
        let mut w = RateWindow::new(TimeDelta::seconds(10));
        w.push(t(0), 100);
        assert_eq!(w.push(t(1), 5), 0.0);
        assert_eq!(w.push(t(2), 15), 10.0);
    }

    #[test]
    fn no_reporting_agent_means_missing_not_idle() {
        let mut w = RateWindow::new(TimeDelta::seconds(10));
        let none = ServiceActivity::default();
        assert_eq!(sample(&none, &mut w, t(0)), None);
        let one = ServiceActivity {
            open_connections: 2,
            held_connections: 1,
            reporting_agents: 1,
            ..ServiceActivity::default()
        };
        let s = sample(&one, &mut w, t(1)).unwrap();
        assert_eq!((s.active, s.held, s.rate), (2.0, 1.0, 0.0));
    }
}
