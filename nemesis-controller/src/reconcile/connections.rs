//! The agents' counts of one Service as the engine reads them: open and held connections
//! summed over live agents, and the connect rate averaged over the policy's rate window
//! from the registry's monotonic totals. Arithmetic over samples only; reading the
//! registry is the actor's job.
//!
//! Two sides see a Service's connections: the client side (connects to its ClusterIP
//! from processes on agent nodes) and the server side (what its backend pods on agent
//! nodes accept, whatever path the connection took: an Ingress dialling pod IPs, a
//! NodePort, a mesh). A connection from an agent node's process to a pod on an agent
//! node is seen by both, one from an Ingress only by the server side, one to a pod on a
//! node without an agent only by the client side. `conns.active` and `conns.rate` read
//! the larger of the two sides, so a connection seen by both counts once, and traffic
//! seen by either keeps the Service awake.

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

/// The rate windows of both sides of one Service.
#[derive(Debug, Clone)]
pub struct SideRates {
    client: RateWindow,
    server: RateWindow,
}

impl SideRates {
    pub fn new(window: TimeDelta) -> Self {
        Self {
            client: RateWindow::new(window),
            server: RateWindow::new(window),
        }
    }

    pub fn set_window(&mut self, window: TimeDelta) {
        self.client.set_window(window);
        self.server.set_window(window);
    }
}

/// The engine's sample from the registry's activity; `None` when no live agent reports
/// the Service (missing data never counts as idle). Each figure is the larger side's.
pub fn sample(
    activity: &ServiceActivity,
    rates: &mut SideRates,
    now: DateTime<Utc>,
) -> Option<ConnectionSample> {
    let client = rates.client.push(now, activity.connects_total);
    let server = rates.server.push(now, activity.accepted_total);
    (activity.reporting_agents > 0).then_some(ConnectionSample {
        active: activity.open_connections.max(activity.accepted_open) as f64,
        rate: client.max(server),
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
    fn each_figure_is_the_larger_side_so_a_connection_seen_by_both_counts_once() {
        let mut r = SideRates::new(TimeDelta::seconds(10));
        let at = |connects, accepted, open, accepted_open| ServiceActivity {
            connects_total: connects,
            accepted_total: accepted,
            open_connections: open,
            accepted_open,
            reporting_agents: 2,
            ..ServiceActivity::default()
        };
        sample(&at(0, 0, 0, 0), &mut r, t(0));
        // 3 connections through the ClusterIP from an agent node to pods on agent nodes
        // (both sides see them) and 2 from an Ingress straight to pod IPs (server only).
        let s = sample(&at(30, 50, 3, 5), &mut r, t(10)).unwrap();
        assert_eq!((s.active, s.rate), (5.0, 5.0));
        // Only Ingress traffic: the client side sees nothing, the Service is still busy.
        let s = sample(&at(30, 70, 0, 2), &mut r, t(20)).unwrap();
        assert_eq!((s.active, s.rate), (2.0, 2.0));
        // Only a client whose pods are on a node without an agent.
        let s = sample(&at(50, 70, 1, 0), &mut r, t(30)).unwrap();
        assert_eq!((s.active, s.rate), (1.0, 2.0));
    }

    #[test]
    fn no_reporting_agent_means_missing_not_idle() {
        let mut w = SideRates::new(TimeDelta::seconds(10));
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
