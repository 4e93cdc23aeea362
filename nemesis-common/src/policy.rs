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

/// `spec.loadBalancing.algorithm`: how balance mode picks a backend for a new
/// connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Power of two choices on open connections: near least-connections at O(1), and
    /// never herds every agent onto the same backend as a global minimum would.
    #[default]
    P2c,
    LeastConnections,
    RoundRobin,
    Random,
}

impl Algorithm {
    /// Every spelling the field takes, in the order the error message lists them.
    pub const NAMES: [&'static str; 4] = ["p2c", "leastConnections", "roundRobin", "random"];

    pub fn parse(text: &str) -> Result<Algorithm, String> {
        match text {
            "p2c" => Ok(Algorithm::P2c),
            "leastConnections" => Ok(Algorithm::LeastConnections),
            "roundRobin" => Ok(Algorithm::RoundRobin),
            "random" => Ok(Algorithm::Random),
            other => Err(format!(
                "unknown algorithm `{other}`; use one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::P2c => Self::NAMES[0],
            Algorithm::LeastConnections => Self::NAMES[1],
            Algorithm::RoundRobin => Self::NAMES[2],
            Algorithm::Random => Self::NAMES[3],
        }
    }
}

/// The longest slow-start window a policy may ask for: a backend warming for longer
/// than an hour is better kept unready.
pub const MAX_SLOW_START: Duration = Duration::from_secs(3600);

/// `spec.loadBalancing` as both sides read it (the controller validates it, each agent
/// applies it to the Service's backends in the kernel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LoadBalancing {
    pub algorithm: Algorithm,
    /// A newly ready backend's weight ramps linearly over this long (zero: at once).
    pub slow_start: Duration,
    /// Prefer backends on the caller's node, spilling over when they are loaded.
    pub prefer_same_node: bool,
    /// Prefer backends in the caller's zone, as above.
    pub prefer_same_zone: bool,
}

/// A problem with one field of `spec.loadBalancing`: its path, and the 1-based column in
/// the field's text where it starts (durations), and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadBalancingError {
    pub field: &'static str,
    pub column: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for LoadBalancingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.column {
            Some(c) => write!(f, "{}: column {c}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

impl LoadBalancing {
    /// Reads the fields as they come from the object (each optional); every problem is
    /// returned, not only the first.
    pub fn parse(
        algorithm: Option<&str>,
        slow_start: Option<&str>,
        prefer_same_node: Option<bool>,
        prefer_same_zone: Option<bool>,
    ) -> Result<LoadBalancing, Vec<LoadBalancingError>> {
        let mut errors = vec![];
        let mut lb = LoadBalancing {
            prefer_same_node: prefer_same_node.unwrap_or(false),
            prefer_same_zone: prefer_same_zone.unwrap_or(false),
            ..LoadBalancing::default()
        };
        if let Some(text) = algorithm {
            match Algorithm::parse(text) {
                Ok(a) => lb.algorithm = a,
                Err(message) => errors.push(LoadBalancingError {
                    field: "spec.loadBalancing.algorithm",
                    column: None,
                    message,
                }),
            }
        }
        if let Some(text) = slow_start {
            let field = "spec.loadBalancing.slowStart";
            match crate::duration::parse(text) {
                Ok(d) if d > MAX_SLOW_START => errors.push(LoadBalancingError {
                    field,
                    column: None,
                    message: "must be at most 1h".into(),
                }),
                Ok(d) => lb.slow_start = d,
                Err(e) => errors.push(LoadBalancingError {
                    field,
                    column: Some(text.get(..e.offset).map_or(e.offset, |s| s.chars().count()) + 1),
                    message: e.message.clone(),
                }),
            }
        }
        if errors.is_empty() {
            Ok(lb)
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_balancing_defaults_to_p2c_without_slow_start_or_preference() {
        assert_eq!(
            LoadBalancing::parse(None, None, None, None),
            Ok(LoadBalancing::default())
        );
        assert_eq!(LoadBalancing::default().algorithm, Algorithm::P2c);
        for name in Algorithm::NAMES {
            assert_eq!(Algorithm::parse(name).unwrap().name(), name);
        }
        let lb = LoadBalancing::parse(Some("roundRobin"), Some("30s"), Some(true), None).unwrap();
        assert_eq!(lb.algorithm, Algorithm::RoundRobin);
        assert_eq!(lb.slow_start, Duration::from_secs(30));
        assert!(lb.prefer_same_node && !lb.prefer_same_zone);
    }

    #[test]
    fn bad_load_balancing_fields_are_each_named_with_the_column() {
        let errs =
            LoadBalancing::parse(Some("fastest"), Some("30 parsecs"), None, None).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].field, "spec.loadBalancing.algorithm");
        assert!(
            errs[0]
                .message
                .contains("p2c, leastConnections, roundRobin, random")
        );
        assert_eq!(errs[1].field, "spec.loadBalancing.slowStart");
        assert!(errs[1].column.is_some(), "{:?}", errs[1]);
        let too_long = LoadBalancing::parse(None, Some("2h"), None, None).unwrap_err();
        assert_eq!(too_long[0].message, "must be at most 1h");
    }

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
