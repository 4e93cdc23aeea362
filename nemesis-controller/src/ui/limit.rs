//! Login attempt limits: a token bucket per client address (IPv6 by /64, which one
//! client easily owns) and one for everybody, so neither a single guesser nor a botnet
//! gets many password guesses, and argon2's memory-hard cost cannot be turned against the
//! controller. Pure state with time passed in; it never sees a password.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitConfig {
    /// Attempts one address may make in a burst.
    pub per_address_burst: u32,
    /// One more attempt per address every this long.
    pub per_address_every: Duration,
    /// Attempts everybody together may make in a burst.
    pub global_burst: u32,
    pub global_every: Duration,
    /// Addresses tracked at most (full buckets are forgotten first).
    pub max_addresses: usize,
}

/// 5 attempts, then one every 12 s (5 a minute) per address: a person mistyping is
/// never slowed, a guesser gets 7,200 guesses a day. 30, then one every 2 s, for all
/// addresses: bounds argon2 work to about one verification every 2 s on average.
pub const DEFAULT_LIMITS: LimitConfig = LimitConfig {
    per_address_burst: 5,
    per_address_every: Duration::from_secs(12),
    global_burst: 30,
    global_every: Duration::from_secs(2),
    max_addresses: 10_000,
};

impl Default for LimitConfig {
    fn default() -> Self {
        DEFAULT_LIMITS
    }
}

/// Whose bucket was empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    Address,
    Everyone,
}

/// A refused attempt: who hit the limit and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub scope: LimitScope,
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            at: now,
        }
    }

    fn refill(&mut self, burst: u32, every: Duration, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let rate = 1.0 / every.as_secs_f64().max(1e-9);
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst));
        self.at = now;
    }

    /// Time until one token is there (zero when it is).
    fn wait(&self, every: Duration) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            every.mul_f64(1.0 - self.tokens)
        }
    }
}

#[derive(Debug)]
struct Inner {
    addresses: HashMap<IpAddr, Bucket>,
    global: Bucket,
}

#[derive(Debug)]
pub struct LoginLimiter {
    config: LimitConfig,
    inner: Mutex<Inner>,
}

/// The key an address is limited by: IPv4 as is, IPv6 by its /64 (IPv4-mapped IPv6 as
/// the IPv4 address).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl LoginLimiter {
    pub fn new(config: LimitConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner {
                addresses: HashMap::new(),
                global: Bucket::full(config.global_burst, Instant::now()),
            }),
        }
    }

    /// Takes one attempt for `client` (unknown: only the global limit applies), or says
    /// why not. Nothing is taken from either bucket when one of them is empty.
    pub fn attempt(&self, client: Option<IpAddr>, now: Instant) -> Result<(), Limited> {
        let c = self.config;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.global.refill(c.global_burst, c.global_every, now);
        let key = client.map(address_key);
        if let Some(key) = key {
            if !inner.addresses.contains_key(&key) && inner.addresses.len() >= c.max_addresses {
                // Forget addresses whose bucket has refilled: they lose nothing.
                inner.addresses.retain(|_, b| {
                    b.refill(c.per_address_burst, c.per_address_every, now);
                    b.tokens < f64::from(c.per_address_burst)
                });
                if inner.addresses.len() >= c.max_addresses {
                    // Still full: a flood of addresses. Only the global bucket protects now.
                    return Self::take_global(&mut inner, c);
                }
            }
            let b = inner
                .addresses
                .entry(key)
                .or_insert_with(|| Bucket::full(c.per_address_burst, now));
            b.refill(c.per_address_burst, c.per_address_every, now);
            if b.tokens < 1.0 {
                return Err(Limited {
                    scope: LimitScope::Address,
                    retry_after: b.wait(c.per_address_every),
                });
            }
        }
        Self::take_global(&mut inner, c)?;
        if let Some(b) = key.and_then(|k| inner.addresses.get_mut(&k)) {
            b.tokens -= 1.0;
        }
        Ok(())
    }

    fn take_global(inner: &mut Inner, c: LimitConfig) -> Result<(), Limited> {
        if inner.global.tokens < 1.0 {
            return Err(Limited {
                scope: LimitScope::Everyone,
                retry_after: inner.global.wait(c.global_every),
            });
        }
        inner.global.tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
    }

    fn small() -> LimitConfig {
        LimitConfig {
            per_address_burst: 3,
            per_address_every: Duration::from_secs(10),
            global_burst: 5,
            global_every: Duration::from_secs(1),
            max_addresses: 100,
        }
    }

    #[test]
    fn an_address_gets_its_burst_then_waits_for_the_refill() {
        let l = LoginLimiter::new(small());
        let t0 = Instant::now();
        for _ in 0..3 {
            l.attempt(ip(1), t0).unwrap();
        }
        let e = l.attempt(ip(1), t0).unwrap_err();
        assert_eq!(e.scope, LimitScope::Address);
        assert_eq!(e.retry_after.as_secs_f64().round(), 10.0);
        assert!(
            l.attempt(ip(2), t0).is_ok(),
            "another address is not affected"
        );
        let e = l.attempt(ip(1), t0 + Duration::from_secs(4)).unwrap_err();
        assert_eq!(e.retry_after.as_secs_f64().round(), 6.0);
        assert!(l.attempt(ip(1), t0 + Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn everyone_together_hits_the_global_limit_and_a_refusal_costs_nothing() {
        let l = LoginLimiter::new(small());
        let t0 = Instant::now();
        for i in 0..5 {
            l.attempt(ip(10 + i), t0).unwrap();
        }
        let e = l.attempt(ip(20), t0).unwrap_err();
        assert_eq!(e.scope, LimitScope::Everyone);
        assert_eq!(e.retry_after.as_secs_f64().round(), 1.0);
        assert_eq!(l.attempt(None, t0).unwrap_err().scope, LimitScope::Everyone);
        // ip(20) was refused globally, so its own bucket is still full.
        let t1 = t0 + Duration::from_secs(3);
        for _ in 0..3 {
            l.attempt(ip(20), t1).unwrap();
        }
        assert_eq!(
            l.attempt(ip(20), t1).unwrap_err().scope,
            LimitScope::Address
        );
    }

    #[test]
    fn ipv6_clients_are_limited_by_their_64_prefix() {
        let a: IpAddr = "::1".parse().unwrap();
        assert_eq!(address_key(a), IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        let x: IpAddr = "fd00:1:2:3:aaaa::1".parse().unwrap();
        let y: IpAddr = "fd00:1:2:3:bbbb::2".parse().unwrap();
        assert_eq!(address_key(x), address_key(y));
        let mapped: IpAddr = "::ffff:127.0.0.9".parse().unwrap();
        assert_eq!(address_key(mapped), ip(9).unwrap());
    }

    #[test]
    fn a_flood_of_addresses_does_not_grow_the_table_without_bound() {
        let mut c = small();
        c.max_addresses = 4;
        c.global_burst = 1000;
        let l = LoginLimiter::new(c);
        let t0 = Instant::now();
        for i in 0..50 {
            l.attempt(ip(i), t0).unwrap();
        }
        let len = l.inner.lock().unwrap().addresses.len();
        assert!(len <= 4, "{len}");
    }
}
