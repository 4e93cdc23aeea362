//! The cookies: the login session's and the trusted browser's, their wording and how
//! they are read back, and the random values they carry. Sessions themselves live in the
//! accounts document (see `accounts`, `directory`). Never logs an id or a token.

use std::time::Duration;

use rand::RngCore;

/// The session cookie's name.
pub const COOKIE: &str = "nemesis_session";
/// The trusted-browser cookie's name: set at a successful login, it lets this browser
/// past the lockout of its user and the address limits (see `login`).
pub const DEVICE_COOKIE: &str = "nemesis_device";

/// A random 256-bit value as 64 lowercase hex digits.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // ThreadRng is a CSPRNG (ChaCha, reseeded from the OS).
    rand::rng().fill_bytes(&mut bytes);
    super::accounts::hex(&bytes)
}

/// A random 64-bit value as 16 lowercase hex digits (a token's public id).
pub fn random_id() -> String {
    let mut bytes = [0u8; 8];
    rand::rng().fill_bytes(&mut bytes);
    super::accounts::hex(&bytes)
}

pub fn looks_like_token(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.trim_matches('"').to_string())
        .filter(|v| looks_like_token(v))
}

/// The session id from a request's `Cookie` headers, if it carries a well-formed one.
pub fn from_cookies(headers: &http::HeaderMap) -> Option<String> {
    cookie(headers, COOKIE)
}

fn set(name: &str, value: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// `Set-Cookie` for a new session: HttpOnly (no script reads it), SameSite=Strict (no
/// other site's page sends it), Path=/, Max-Age as the session's absolute expiry, and
/// Secure whenever the UI is served over TLS.
pub fn set_cookie(id: &str, max_age: Duration, secure: bool) -> String {
    set(COOKIE, id, max_age, secure)
}

/// `Set-Cookie` that makes the browser forget the session.
pub fn clear_cookie(secure: bool) -> String {
    set(COOKIE, "", Duration::ZERO, secure)
}

/// `Set-Cookie` for the trusted-browser id, with the same attributes.
pub fn set_device_cookie(id: &str, max_age: Duration, secure: bool) -> String {
    set(DEVICE_COOKIE, id, max_age, secure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_http_only_strict_and_parsed_back() {
        let c = set_cookie("abc", Duration::from_secs(60), false);
        assert_eq!(
            c,
            "nemesis_session=abc; Path=/; HttpOnly; SameSite=Strict; Max-Age=60"
        );
        assert!(set_cookie("abc", Duration::from_secs(60), true).ends_with("; Secure"));
        let id = random_token();
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            format!("theme=dark; nemesis_session={id}").parse().unwrap(),
        );
        assert_eq!(from_cookies(&h).as_deref(), Some(id.as_str()));
        assert!(cookie(&h, DEVICE_COOKIE).is_none());
        assert!(from_cookies(&http::HeaderMap::new()).is_none());
        assert!(clear_cookie(false).contains("Max-Age=0"));
        let mut bad = http::HeaderMap::new();
        bad.append(http::header::COOKIE, "nemesis_session=xyz".parse().unwrap());
        assert!(
            from_cookies(&bad).is_none(),
            "only well-formed ids are read"
        );
    }

    #[test]
    fn random_values_are_distinct_hex() {
        let a = random_token();
        assert!(looks_like_token(&a));
        assert_ne!(a, random_token());
        assert_eq!(random_id().len(), 16);
    }
}
