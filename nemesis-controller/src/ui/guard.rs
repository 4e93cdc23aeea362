//! The checks in front of the UI's handlers: who the request is (an API token or a live
//! session), for every request that changes something (any method but GET/HEAD) a
//! same-origin request with the session's CSRF token in `X-CSRF-Token` and a role above
//! viewer, the least role each route names; body size before anything is buffered; the
//! security headers on every answer. Every refusal is counted. It decides who may pass,
//! never what they see.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::time::Duration;

use http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, HOST, ORIGIN,
    REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use subtle::ConstantTimeEq;

use super::accounts::{self, Accounts, TokenRefusal};
use super::error::HttpError;
use super::role::{Principal, Role, Via};
use super::session;
use super::{MAX_BODY_BYTES, UiState};
use crate::metrics::UiRefusal;

/// Where the page sends the CSRF token it got from `GET /api/v1/session` or the login.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Scripts, styles and data come from this origin only; no inline script can run, and no
/// other site can frame the UI.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// Who the request is: an API token in `Authorization: Bearer nmt_...`, else the live
/// session its cookie names; the refusal (and its reason for the metrics) otherwise.
pub fn authenticate(ui: &UiState, headers: &HeaderMap) -> Result<Principal, Refused> {
    let now = ui.directory.now_ms();
    if let Some(auth) = headers.get(AUTHORIZATION) {
        let bytes = auth.as_bytes();
        let token = match bytes.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => {
                std::str::from_utf8(&bytes[7..]).unwrap_or("").trim()
            }
            _ => "",
        };
        return ui.directory.read(|a| match a.check_token(token, now) {
            Ok((id, rec)) => Ok(Principal {
                user: rec.created_by.clone(),
                role: rec.role,
                via: Via::Token { id: id.to_string() },
            }),
            Err(TokenRefusal::Expired) => Err(Refused::new(
                StatusCode::UNAUTHORIZED,
                "the API token has expired; an admin can issue a new one under Tokens",
                UiRefusal::ExpiredToken,
            )),
            Err(TokenRefusal::Invalid) => Err(Refused::new(
                StatusCode::UNAUTHORIZED,
                "the Authorization header does not hold a valid API token (Bearer nmt_<id>.<secret>)",
                UiRefusal::InvalidToken,
            )),
        });
    }
    let unauthenticated = || Refused {
        error: HttpError::unauthenticated(),
        reason: UiRefusal::Unauthenticated,
    };
    let id = session::from_cookies(headers).ok_or_else(unauthenticated)?;
    let found = ui.directory.read(|a| {
        let s = a.session(&id, now)?;
        let role = role_of(ui, a, &s.user)?;
        Some((s.user.clone(), s.csrf.clone(), s.expires_ms, role))
    });
    let (user, csrf, expires_ms, role) = found.ok_or_else(unauthenticated)?;
    if ui
        .directory
        .touch(&accounts::digest(&id), ui.config.session_idle, now)
    {
        // Idle too long: the session ends here (the next write prunes nothing for it,
        // so it is removed now).
        let dir = ui.directory.clone();
        let gone = id.clone();
        tokio::spawn(async move {
            let _ = dir.update(|a| Ok(a.remove_session(&gone))).await;
        });
        return Err(unauthenticated());
    }
    Ok(Principal {
        user,
        role,
        via: Via::Session {
            id,
            csrf,
            expires_in: Duration::from_millis(expires_ms.saturating_sub(now)),
        },
    })
}

/// The role `user` has now: the built-in admin's, or the one in the document (`None` for
/// a user deleted since).
pub fn role_of(ui: &UiState, a: &Accounts, user: &str) -> Option<Role> {
    if user == ui.directory.builtin() {
        Some(Role::Admin)
    } else {
        a.users.get(user).map(|u| u.role)
    }
}

/// A refusal and its reason.
pub struct Refused {
    pub error: HttpError,
    pub reason: UiRefusal,
}

impl Refused {
    fn new(status: StatusCode, message: &'static str, reason: UiRefusal) -> Self {
        Self {
            error: HttpError::new(status, message),
            reason,
        }
    }

    /// Counts the refusal and answers it.
    pub fn answer(self, ui: &UiState, path: &str) -> Response {
        ui.metrics.ui_refused(self.reason);
        tracing::warn!(%path, reason = self.reason.as_str(), "UI request refused");
        self.error.into_response()
    }
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

/// The checks a change (any method but GET/HEAD/OPTIONS) passes: a browser session's
/// change comes from the UI's own origin with the session's CSRF token (an API token is
/// nothing a browser sends by itself, so it needs neither); a viewer changes nothing but
/// its own login, whatever route it is.
fn check_change(principal: &Principal, headers: &HeaderMap, path: &str) -> Result<(), Refused> {
    if let Via::Session { csrf, .. } = &principal.via {
        same_origin(headers).map_err(|error| Refused {
            error,
            reason: UiRefusal::CrossOrigin,
        })?;
        let presented = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        let refusal = match presented {
            Some(t) if bool::from(csrf.as_bytes().ct_eq(t.as_bytes())) => None,
            Some(_) => Some("the X-CSRF-Token header does not match this session's token"),
            None => Some(
                "missing X-CSRF-Token header: every change needs the token that the login and GET /api/v1/session return",
            ),
        };
        if let Some(why) = refusal {
            return Err(Refused::new(StatusCode::FORBIDDEN, why, UiRefusal::Csrf));
        }
    }
    // Ending one's own session changes nothing anyone else sees.
    if principal.role == Role::Viewer && path != "/logout" {
        return Err(Refused::new(
            StatusCode::FORBIDDEN,
            "the viewer role is read-only; ask an admin for the operator or admin role",
            UiRefusal::Role,
        ));
    }
    Ok(())
}

/// API middleware: a principal (token or live session), plus origin, CSRF and read-only
/// checks on changes. The principal goes into the request's extensions for the routes'
/// role checks and the handler.
pub async fn require_session(State(ui): State<UiState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let principal = match authenticate(&ui, req.headers()) {
        Ok(p) => p,
        Err(r) => return r.answer(&ui, &path),
    };
    if !is_safe(req.method())
        && let Err(r) = check_change(&principal, req.headers(), &path)
    {
        return r.answer(&ui, &path);
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// What a route needs: the UI (for counting refusals) and the least role.
#[derive(Clone)]
pub struct Need {
    pub ui: UiState,
    pub role: Role,
}

/// Route middleware: the principal's role is at least `need.role`. Runs after
/// [`require_session`], which put the principal in the extensions.
pub async fn require_role(State(need): State<Need>, req: Request, next: Next) -> Response {
    let Need { ui, role: needed } = need;
    let role = req.extensions().get::<Principal>().map(|p| p.role);
    match role {
        Some(r) if r.allows(needed) => next.run(req).await,
        Some(r) => Refused {
            error: HttpError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "this needs the {} role; you have {}",
                    needed.as_str(),
                    r.as_str()
                ),
            ),
            reason: UiRefusal::Role,
        }
        .answer(&ui, req.uri().path()),
        None => Refused {
            error: HttpError::unauthenticated(),
            reason: UiRefusal::Unauthenticated,
        }
        .answer(&ui, req.uri().path()),
    }
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
        Some(n) if n > MAX_BODY_BYTES as u64 => HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body ({n} bytes) is larger than the UI's limit of {MAX_BODY_BYTES} bytes"),
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
