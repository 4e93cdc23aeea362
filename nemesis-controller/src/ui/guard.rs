//! The checks in front of the UI's handlers: a live session for the API, and for every
//! request that changes something (any method but GET/HEAD) a same-origin request with
//! the session's CSRF token in `X-CSRF-Token`; body size before anything is buffered; the
//! security headers on every answer. It decides who may pass, never what they see.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{
    CACHE_CONTROL, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, HOST, ORIGIN, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::time::Instant;

use super::error::HttpError;
use super::session::{self, SessionInfo};
use super::{MAX_LOGIN_BODY_BYTES, UiState};

/// Where the page sends the CSRF token it got from `GET /api/v1/session` or the login.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Scripts, styles and data come from this origin only; no inline script can run, and no
/// other site can frame the UI.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The session the request's cookie names, if it is live.
pub fn current_session(ui: &UiState, headers: &HeaderMap) -> Option<SessionInfo> {
    let id = session::from_cookies(headers)?;
    ui.sessions.get(&id, Instant::now())
}

fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// A browser names the page a request comes from in `Origin` (and `Sec-Fetch-Site`);
/// a request another site's page makes is refused whatever else it carries. Clients
/// that send neither (curl) are left to the CSRF token and SameSite.
pub fn same_origin(headers: &HeaderMap) -> Result<(), HttpError> {
    let refuse = || {
        HttpError::new(
            StatusCode::FORBIDDEN,
            "cross-origin request refused: changes are accepted only from the UI's own pages",
        )
    };
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return Err(refuse());
    }
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(HOST).and_then(|h| h.to_str().ok());
    let authority = origin
        .to_str()
        .ok()
        .and_then(|o| o.parse::<http::Uri>().ok())
        .and_then(|u| u.authority().map(|a| a.as_str().to_ascii_lowercase()));
    match (authority, host) {
        (Some(a), Some(h)) if a == h.to_ascii_lowercase() => Ok(()),
        _ => Err(refuse()),
    }
}

/// API middleware: a live session, plus origin and CSRF token checks on changes. The
/// session goes into the request's extensions for the handler.
pub async fn require_session(State(ui): State<UiState>, mut req: Request, next: Next) -> Response {
    let Some(session) = current_session(&ui, req.headers()) else {
        return HttpError::unauthenticated().into_response();
    };
    if !is_safe(req.method()) {
        if let Err(e) = same_origin(req.headers()) {
            tracing::warn!(path = %req.uri().path(), "cross-origin change refused");
            return e.into_response();
        }
        let presented = req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        let refusal = match presented {
            Some(t) if session.csrf_matches(t) => None,
            Some(_) => Some("the X-CSRF-Token header does not match this session's token"),
            None => Some(
                "missing X-CSRF-Token header: every change needs the token that the login and GET /api/v1/session return",
            ),
        };
        if let Some(why) = refusal {
            tracing::warn!(path = %req.uri().path(), "change without a valid CSRF token refused");
            return HttpError::new(StatusCode::FORBIDDEN, why).into_response();
        }
    }
    req.extensions_mut().insert(session);
    next.run(req).await
}

/// Outer middleware of every UI route: refuses a body declared larger than any UI
/// request needs before it is read, and adds the security headers to the answer.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut resp = match declared {
        Some(n) if n > MAX_LOGIN_BODY_BYTES as u64 => HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body ({n} bytes) is larger than the UI's limit of {MAX_LOGIN_BODY_BYTES} bytes"),
        )
        .into_response(),
        _ => next.run(req).await,
    };
    let h = resp.headers_mut();
    // A page that sets its own (the printable report, which runs no script) keeps it.
    if !h.contains_key(CONTENT_SECURITY_POLICY) {
        h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    }
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if !h.contains_key(CACHE_CONTROL) {
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn same_origin_compares_the_origin_with_the_host() {
        assert!(same_origin(&headers(&[("host", "127.0.0.1:8080")])).is_ok());
        assert!(
            same_origin(&headers(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://127.0.0.1:8080")
            ]))
            .is_ok()
        );
        for bad in ["http://127.0.0.1:9090", "http://evil.example", "null"] {
            let e =
                same_origin(&headers(&[("host", "127.0.0.1:8080"), ("origin", bad)])).unwrap_err();
            assert_eq!(e.status, StatusCode::FORBIDDEN, "{bad}");
        }
        assert!(
            same_origin(&headers(&[
                ("host", "127.0.0.1:8080"),
                ("sec-fetch-site", "cross-site")
            ]))
            .is_err()
        );
    }
}
