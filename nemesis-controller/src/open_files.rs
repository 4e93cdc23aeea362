//! The process's open-file limit (`RLIMIT_NOFILE`): raised to its hard ceiling at start,
//! logged, and compared with what the connected agents need. Each agent keeps one
//! connection to the controller open, so a cluster of N nodes needs N descriptors plus
//! the controller's own; a container gets its runtime's limit (often a soft 1,024), and a
//! controller out of descriptors can neither accept agents nor open a connection to the
//! API server (`EMFILE`), so it loses its Lease. Owns no connection; never lowers a limit.

use std::io;

/// Descriptors the controller uses besides its agents' connections: the API client's
/// pool (at most `api_client::MAX_CONCURRENT_REQUESTS`, 48) and watches (about ten),
/// the Lease client, four listeners, the history store, Prometheus and Alertmanager
/// clients, UI and metrics scrapers, the standbys pulling history. 256 leaves room.
pub const RESERVE: u64 = 256;

/// The soft and hard `RLIMIT_NOFILE` of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub soft: u64,
    pub hard: u64,
}

/// What [`raise`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub before: Limit,
    pub now: Limit,
}

/// The current limit.
pub fn current() -> io::Result<Limit> {
    use nix::sys::resource::{Resource, getrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    Ok(Limit { soft, hard })
}

/// Raises the soft limit to the hard one (what a process may do without privileges).
pub fn raise() -> io::Result<Raised> {
    use nix::sys::resource::{Resource, setrlimit};
    let before = current()?;
    if before.soft < before.hard {
        setrlimit(Resource::RLIMIT_NOFILE, before.hard, before.hard).map_err(io::Error::from)?;
    }
    Ok(Raised {
        before,
        now: current()?,
    })
}

/// Descriptors `agents` connected agents need, with the controller's own.
pub fn needed(agents: usize) -> u64 {
    u64::try_from(agents)
        .unwrap_or(u64::MAX)
        .saturating_add(RESERVE)
}

/// How many descriptors `agents` agents would lack under a soft limit of `soft`
/// (`None`: enough).
pub fn shortfall(soft: u64, agents: usize) -> Option<u64> {
    let need = needed(agents);
    (need > soft).then(|| need - soft)
}

/// Raises the limit and logs it; a failure to read or raise it is logged, not fatal (the
/// controller still runs, with whatever limit it has).
pub fn raise_and_log() -> Option<Limit> {
    match raise() {
        Ok(r) => {
            if r.before.soft < r.now.soft {
                tracing::info!(
                    from = r.before.soft,
                    to = r.now.soft,
                    hard = r.now.hard,
                    "raised the open-file limit to its hard ceiling"
                );
            } else {
                tracing::info!(
                    soft = r.now.soft,
                    hard = r.now.hard,
                    agents = r.now.soft.saturating_sub(RESERVE),
                    "open-file limit (room for about this many agents)"
                );
            }
            Some(r.now)
        }
        Err(err) => {
            tracing::warn!(%err, "could not read or raise the open-file limit");
            current().ok()
        }
    }
}

/// Warns once each time the live agents outgrow the limit (and again only after they
/// fit again and outgrow it anew), so a log shows why accepts start failing.
#[derive(Debug, Default)]
pub struct ShortfallWarning {
    warned: bool,
}

impl ShortfallWarning {
    /// Checks `agents` against `limit`; true when it warned now.
    pub fn check(&mut self, limit: Option<Limit>, agents: usize) -> bool {
        let Some(limit) = limit else {
            return false;
        };
        match shortfall(limit.soft, agents) {
            Some(missing) if !self.warned => {
                self.warned = true;
                tracing::warn!(
                    soft = limit.soft,
                    hard = limit.hard,
                    agents,
                    missing,
                    "the open-file limit is below what the live agents need (one connection each, plus {RESERVE}): raise the container's nofile limit or agents and API requests will fail with EMFILE"
                );
                true
            }
            Some(_) => false,
            None => {
                self.warned = false;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_raised_to_the_hard_ceiling_and_never_lowered() {
        let r = raise().expect("raising RLIMIT_NOFILE");
        assert_eq!(r.now.soft, r.now.hard);
        assert!(r.now.soft >= r.before.soft);
        assert_eq!(r.now.hard, r.before.hard);
    }

    #[test]
    fn agents_past_the_limit_less_the_reserve_are_a_shortfall() {
        assert_eq!(shortfall(1024, 0), None);
        assert_eq!(shortfall(1024, 768), None);
        assert_eq!(shortfall(1024, 769), Some(1));
        assert_eq!(shortfall(1024, 1000), Some(232));
        assert_eq!(needed(1000), 1256);
    }

    #[test]
    fn a_shortfall_is_warned_once_until_the_agents_fit_again() {
        let limit = Some(Limit {
            soft: 1024,
            hard: 4096,
        });
        let mut w = ShortfallWarning::default();
        assert!(!w.check(limit, 100));
        assert!(w.check(limit, 1000));
        assert!(!w.check(limit, 1001), "warned already");
        assert!(!w.check(limit, 500));
        assert!(w.check(limit, 900), "outgrown anew");
        assert!(!w.check(None, 5000), "an unknown limit is not judged");
    }
}
