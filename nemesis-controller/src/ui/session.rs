//! Login sessions: random 256-bit ids held in memory with an absolute and an idle
//! expiry, each with its own CSRF token, and the session cookie's wording. Time is passed
//! in. It never sees a password, and never logs an id or a token.
//!
//! Sessions live in this process only: a controller restart or a leader change asks the
//! operator to log in again, which is the safe side for an admin UI.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::RngCore;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

/// The cookie's name.
pub const COOKIE: &str = "nemesis_session";

/// A random 256-bit value as 64 lowercase hex digits.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // ThreadRng is a CSPRNG (ChaCha, reseeded from the OS).
    rand::rng().fill_bytes(&mut bytes);
    let mut out = String::with_capacity(64);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn looks_like_token(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[derive(Clone)]
struct Session {
    user: String,
    csrf: String,
    created: Instant,
    last_seen: Instant,
}

/// A live session as a request sees it.
#[derive(Clone)]
pub struct SessionInfo {
    pub id: String,
    pub user: String,
    pub csrf: String,
    /// Until the absolute expiry.
    pub expires_in: Duration,
}

impl std::fmt::Debug for SessionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionInfo")
            .field("user", &self.user)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

impl SessionInfo {
    /// Constant-time check of a presented CSRF token.
    pub fn csrf_matches(&self, presented: &str) -> bool {
        bool::from(self.csrf.as_bytes().ct_eq(presented.as_bytes()))
    }
}

pub struct SessionBook {
    ttl: Duration,
    idle: Duration,
    max: usize,
    sessions: Mutex<HashMap<String, Session>>,
}

impl SessionBook {
    pub fn new(ttl: Duration, idle: Duration, max: usize) -> Self {
        Self {
            ttl,
            idle,
            max: max.max(1),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn alive(&self, s: &Session, now: Instant) -> bool {
        now.saturating_duration_since(s.created) < self.ttl
            && now.saturating_duration_since(s.last_seen) < self.idle
    }

    fn info(&self, id: &str, s: &Session, now: Instant) -> SessionInfo {
        SessionInfo {
            id: id.to_string(),
            user: s.user.clone(),
            csrf: s.csrf.clone(),
            expires_in: self
                .ttl
                .saturating_sub(now.saturating_duration_since(s.created)),
        }
    }

    /// Starts a session with a fresh id and CSRF token. Expired sessions are dropped;
    /// when the book is still full, the least recently used session ends.
    pub fn create(&self, user: &str, now: Instant) -> SessionInfo {
        let mut map = self.lock();
        map.retain(|_, s| self.alive(s, now));
        while map.len() >= self.max {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        let id = random_token();
        let s = Session {
            user: user.to_string(),
            csrf: random_token(),
            created: now,
            last_seen: now,
        };
        let info = self.info(&id, &s, now);
        map.insert(id, s);
        info
    }

    /// The live session with this id (and marks it used), or `None`; an expired one is
    /// removed on the way.
    pub fn get(&self, id: &str, now: Instant) -> Option<SessionInfo> {
        if !looks_like_token(id) {
            return None;
        }
        let mut map = self.lock();
        let s = map.get_mut(id)?;
        if !self.alive(s, now) {
            map.remove(id);
            return None;
        }
        s.last_seen = now;
        let s = s.clone();
        Some(self.info(id, &s, now))
    }

    /// Ends a session; returns whether it existed.
    pub fn revoke(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session id from a request's `Cookie` headers, if it carries one.
pub fn from_cookies(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim_matches('"').to_string())
}

/// `Set-Cookie` for a new session: HttpOnly (no script reads it), SameSite=Strict (no
/// other site's page sends it), Path=/ and Max-Age as the session's absolute expiry.
pub fn set_cookie(id: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// `Set-Cookie` that makes the browser forget the session.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book() -> SessionBook {
        SessionBook::new(Duration::from_secs(100), Duration::from_secs(10), 3)
    }

    #[test]
    fn ids_and_csrf_tokens_are_256_bit_and_distinct() {
        let b = book();
        let now = Instant::now();
        let a = b.create("admin", now);
        let c = b.create("admin", now);
        assert!(looks_like_token(&a.id) && looks_like_token(&a.csrf));
        assert_ne!(a.id, c.id);
        assert_ne!(a.id, a.csrf);
        assert_ne!(a.csrf, c.csrf);
    }

    #[test]
    fn a_session_ends_when_idle_or_too_old_even_if_used() {
        let b = book();
        let t0 = Instant::now();
        let s = b.create("admin", t0);
        assert!(b.get(&s.id, t0 + Duration::from_secs(9)).is_some());
        // Used at 9 s, so still alive at 18 s.
        assert!(b.get(&s.id, t0 + Duration::from_secs(18)).is_some());
        assert!(b.get(&s.id, t0 + Duration::from_secs(29)).is_none());
        assert!(b.is_empty(), "expired sessions are removed");

        let s = b.create("admin", t0);
        let mut t = t0;
        for _ in 0..12 {
            t += Duration::from_secs(9);
            if t0 + Duration::from_secs(100) <= t {
                assert!(b.get(&s.id, t).is_none(), "past the absolute expiry");
                return;
            }
            let info = b.get(&s.id, t).unwrap();
            assert_eq!(info.expires_in, Duration::from_secs(100) - (t - t0));
        }
        panic!("the absolute expiry never hit");
    }

    #[test]
    fn a_full_book_drops_the_least_recently_used_session() {
        let b = book();
        let t0 = Instant::now();
        let s1 = b.create("admin", t0);
        let s2 = b.create("admin", t0 + Duration::from_secs(1));
        let s3 = b.create("admin", t0 + Duration::from_secs(2));
        b.get(&s1.id, t0 + Duration::from_secs(3)).unwrap();
        let _s4 = b.create("admin", t0 + Duration::from_secs(4));
        assert_eq!(b.len(), 3);
        let now = t0 + Duration::from_secs(5);
        assert!(
            b.get(&s2.id, now).is_none(),
            "s2 was the least recently used"
        );
        assert!(b.get(&s1.id, now).is_some());
        assert!(b.get(&s3.id, now).is_some());
    }

    #[test]
    fn revoked_and_malformed_ids_find_nothing() {
        let b = book();
        let now = Instant::now();
        let s = b.create("admin", now);
        assert!(b.revoke(&s.id));
        assert!(b.get(&s.id, now).is_none());
        assert!(b.get("", now).is_none());
        assert!(b.get(&"g".repeat(64), now).is_none());
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_parsed_back() {
        let c = set_cookie("abc", Duration::from_secs(60), false);
        assert_eq!(
            c,
            "nemesis_session=abc; Path=/; HttpOnly; SameSite=Strict; Max-Age=60"
        );
        assert!(set_cookie("abc", Duration::from_secs(60), true).ends_with("; Secure"));
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            "theme=dark; nemesis_session=xyz".parse().unwrap(),
        );
        assert_eq!(from_cookies(&h).as_deref(), Some("xyz"));
        assert!(from_cookies(&http::HeaderMap::new()).is_none());
        assert!(clear_cookie(false).contains("Max-Age=0"));
    }

    #[test]
    fn debug_output_never_shows_the_id_or_the_token() {
        let b = book();
        let s = b.create("admin", Instant::now());
        let d = format!("{s:?}");
        assert!(!d.contains(&s.id) && !d.contains(&s.csrf), "{d}");
    }
}
