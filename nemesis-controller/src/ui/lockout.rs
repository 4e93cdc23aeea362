//! Lockout per user name: after a run of wrong passwords for one name, logins as that
//! name are refused for a while, doubling with each further run, from any address (so a
//! botnet cannot spread its guesses). It cannot lock the owner out: a browser that has
//! logged in as that user before (see `login`) is exempt. Pure state, time passed in; it
//! never sees a password.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LockoutConfig {
    /// Wrong passwords in a row before the name is locked.
    pub threshold: u32,
    /// The first lock's length; each further run of `threshold` failures doubles it.
    pub first_lock: Duration,
    pub max_lock: Duration,
    /// Names tracked at most (unknown names count too, so answers tell nothing).
    pub max_names: usize,
}

/// 5 wrong passwords lock a name for a minute, then 2, 4, ... up to an hour: a person
/// who forgot a password waits a minute, a guesser gets about 120 guesses a day per name.
pub const DEFAULT_LOCKOUT: LockoutConfig = LockoutConfig {
    threshold: 5,
    first_lock: Duration::from_secs(60),
    max_lock: Duration::from_secs(3600),
    max_names: 10_000,
};

impl Default for LockoutConfig {
    fn default() -> Self {
        DEFAULT_LOCKOUT
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Record {
    failures: u32,
    locked_until_ms: u64,
}

#[derive(Debug)]
pub struct UserLockout {
    config: LockoutConfig,
    names: Mutex<HashMap<String, Record>>,
}

impl UserLockout {
    pub fn new(config: LockoutConfig) -> Self {
        Self {
            config,
            names: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` while `user` is locked.
    pub fn check(&self, user: &str, now_ms: u64) -> Result<(), Duration> {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        match names.get(user) {
            Some(r) if r.locked_until_ms > now_ms => {
                Err(Duration::from_millis(r.locked_until_ms - now_ms))
            }
            _ => Ok(()),
        }
    }

    /// Counts a wrong password for `user`; returns the lock it started, if any.
    pub fn failed(&self, user: &str, now_ms: u64) -> Option<Duration> {
        let c = self.config;
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if !names.contains_key(user) && names.len() >= c.max_names {
            // Forget names that are not locked; they lose only their partial count.
            names.retain(|_, r| r.locked_until_ms > now_ms);
            if names.len() >= c.max_names {
                return None;
            }
        }
        let r = names.entry(user.to_string()).or_default();
        r.failures += 1;
        if !r.failures.is_multiple_of(c.threshold.max(1)) {
            return None;
        }
        let runs = r.failures / c.threshold.max(1);
        let lock = c
            .first_lock
            .saturating_mul(1u32 << (runs - 1).min(20))
            .min(c.max_lock);
        r.locked_until_ms = now_ms + lock.as_millis() as u64;
        Some(lock)
    }

    /// A right password: the name's count starts again.
    pub fn succeeded(&self, user: &str) {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> LockoutConfig {
        LockoutConfig {
            threshold: 3,
            first_lock: Duration::from_secs(10),
            max_lock: Duration::from_secs(25),
            max_names: 2,
        }
    }

    #[test]
    fn a_run_of_failures_locks_the_name_for_longer_each_time() {
        let l = UserLockout::new(small());
        assert_eq!(l.failed("bob", 0), None);
        assert_eq!(l.failed("bob", 0), None);
        assert_eq!(l.failed("bob", 0), Some(Duration::from_secs(10)));
        assert_eq!(l.check("bob", 9_000), Err(Duration::from_secs(1)));
        assert_eq!(l.check("alice", 9_000), Ok(()), "other names are free");
        assert_eq!(l.check("bob", 10_000), Ok(()));
        l.failed("bob", 10_000);
        l.failed("bob", 10_000);
        assert_eq!(l.failed("bob", 10_000), Some(Duration::from_secs(20)));
        l.failed("bob", 30_000);
        l.failed("bob", 30_000);
        assert_eq!(
            l.failed("bob", 30_000),
            Some(Duration::from_secs(25)),
            "capped"
        );
        l.succeeded("bob");
        assert_eq!(l.check("bob", 30_001), Ok(()));
    }

    #[test]
    fn the_table_is_bounded() {
        let l = UserLockout::new(small());
        for n in 0..10 {
            l.failed(&format!("u{n}"), 0);
        }
        assert!(l.names.lock().unwrap().len() <= 2);
    }
}
