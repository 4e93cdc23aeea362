//! What both the controller and the agents take from a `ScalingPolicy`: the defaults of
//! the fields each side reads on its own, and how the hold timeout follows from them, in
//! one place so that the two sides cannot drift. Never parses or validates a policy
//! (the controller's `compile` and the agent's `services` do, each for its own fields).

use std::time::Duration;

/// Slow starters (ML images, GPU nodes) routinely take several minutes to become ready;
/// ten minutes covers a node scale-up plus a model load before the policy reports it.
pub const DEFAULT_READINESS_BUDGET: Duration = Duration::from_secs(10 * 60);

/// Bounds the memory an agent spends on one sleeping Service's held connections.
pub const DEFAULT_MAX_HELD_CONNECTIONS: u32 = 1024;

/// How long an agent holds a connection while the target wakes: `holdTimeoutSeconds`
/// when the policy sets it, else the whole readiness budget. A caller held for less
/// than the start-up the policy allows would get a `503` from a wake-up that is going
/// as planned (a model that loads in five minutes, callers refused after one).
pub fn hold_timeout(hold_timeout_seconds: Option<u32>, readiness_budget: Duration) -> Duration {
    hold_timeout_seconds.map_or(readiness_budget, |s| Duration::from_secs(u64::from(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_follows_the_readiness_budget_unless_set() {
        let budget = Duration::from_secs(900);
        assert_eq!(hold_timeout(None, budget), budget);
        assert_eq!(hold_timeout(Some(30), budget), Duration::from_secs(30));
        assert_eq!(
            hold_timeout(None, DEFAULT_READINESS_BUDGET),
            Duration::from_secs(600)
        );
    }
}
