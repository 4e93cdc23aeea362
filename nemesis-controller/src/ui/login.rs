//! `POST /login`, `POST /logout` and `GET /api/v1/session`. A login is limited before any
//! password is checked (per address, for everybody, and per user name after wrong
//! passwords), answers a wrong user name exactly as a wrong password (same status,
//! message and argon2 work), stores the session in the accounts document (so it outlives
//! this instance), and replaces any session the browser had. A browser that once logged
//! in as a user carries a trusted-browser cookie that lets it past those limits for that
//! user, so an attacker can never lock the owner out from everywhere. The password is
//! moved into the check and dropped; it is never logged or echoed.

use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http::header::SET_COOKIE;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use super::accounts::{DEVICE_TTL, SessionRecord};
use super::error::HttpError;
use super::guard::same_origin;
use super::limit::LimitScope;
use super::role::{Principal, Role, Via};
use super::session;
use super::{MAX_LOGIN_BODY_BYTES, UiState};
use crate::metrics::UiRefusal;

#[derive(Deserialize)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What the page needs to know about its session.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub user: String,
    pub role: Role,
    /// Send it back as `X-CSRF-Token` with every change (absent for an API token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csrf_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
}

impl From<&Principal> for SessionView {
    fn from(p: &Principal) -> Self {
        let (csrf_token, expires_in_seconds) = match &p.via {
            Via::Session {
                csrf, expires_in, ..
            } => (Some(csrf.clone()), Some(expires_in.as_secs())),
            Via::Token { .. } => (None, None),
        };
        Self {
            user: p.user.clone(),
            role: p.role,
            csrf_token,
            expires_in_seconds,
        }
    }
}

const WRONG_CREDENTIALS: &str = "wrong user name or password";

pub async fn login(
    State(ui): State<UiState>,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Response {
    match try_login(
        &ui,
        client.map(|Extension(ConnectInfo(a))| a),
        &headers,
        body,
    )
    .await
    {
        Ok(resp) => resp,
        Err((e, reason)) => {
            if let Some(reason) = reason {
                ui.metrics.ui_refused(reason);
            }
            e.into_response()
        }
    }
}

type LoginError = (HttpError, Option<UiRefusal>);

async fn try_login(
    ui: &UiState,
    client: Option<SocketAddr>,
    headers: &HeaderMap,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<Response, LoginError> {
    same_origin(headers).map_err(|e| (e, Some(UiRefusal::CrossOrigin)))?;
    let Json(req) = body.map_err(|r| {
        // Generic wording: serde's messages can quote the values, the password included.
        let status = r.status();
        let message = match status {
            StatusCode::PAYLOAD_TOO_LARGE => {
                format!("the login body is larger than the limit of {MAX_LOGIN_BODY_BYTES} bytes")
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                "a login must be sent as Content-Type: application/json".to_string()
            }
            _ => {
                r#"the login body must be JSON: {"username": "...", "password": "..."}"#.to_string()
            }
        };
        (HttpError::new(status, message), None)
    })?;
    let ip = client.map(|a| a.ip());
    let now = ui.directory.now_ms();
    let device = session::cookie(headers, session::DEVICE_COOKIE);
    let trusted = device.as_deref().is_some_and(|d| {
        ui.directory
            .read(|a| a.device_user(d) == Some(req.username.as_str()))
    });
    if !trusted {
        if let Err(limited) = ui.limiter.attempt(ip, tokio::time::Instant::now()) {
            let secs = limited.retry_after.as_secs_f64().ceil().max(1.0);
            let who = match limited.scope {
                LimitScope::Address => "from your address",
                LimitScope::Everyone => "right now",
            };
            tracing::warn!(client = ?ip, scope = ?limited.scope, "UI login refused: too many attempts");
            return Err((
                HttpError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("too many login attempts {who}; try again in {secs} s"),
                )
                .with_retry_after(limited.retry_after),
                Some(UiRefusal::RateLimited),
            ));
        }
        if let Err(after) = ui.lockout.check(&req.username, now) {
            let secs = after.as_secs_f64().ceil().max(1.0);
            tracing::warn!(client = ?ip, user = %req.username, "UI login refused: user locked after wrong passwords");
            return Err((
                HttpError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "this user name is locked after too many wrong passwords; try again in {secs} s, or from a browser that has logged in as this user before"
                    ),
                )
                .with_retry_after(after),
                Some(UiRefusal::LockedOut),
            ));
        }
    }
    // The stored hash of the named user; for an unknown name the admin's, so the check
    // costs the same and the answer is the same.
    let builtin = req.username == ui.config.user;
    let stored = if builtin {
        None
    } else {
        ui.directory
            .read(|a| a.users.get(&req.username).map(|u| u.password_hash.clone()))
    };
    let known = builtin || stored.is_some();
    let checked = match stored {
        Some(phc) => ui.password.verify_against(req.password, phc).await,
        None => ui.password.verify(req.password).await,
    };
    let password_ok =
        checked.map_err(|e| (HttpError::internal("checking the password", &e), None))?;
    if !(known && password_ok) {
        if ui.lockout.failed(&req.username, now).is_some() {
            tracing::warn!(user = %req.username, "UI user name locked after wrong passwords");
        }
        tracing::warn!(client = ?ip, "UI login failed");
        return Err((
            HttpError::new(StatusCode::UNAUTHORIZED, WRONG_CREDENTIALS),
            Some(UiRefusal::WrongCredentials),
        ));
    }
    ui.lockout.succeeded(&req.username);
    let old = session::from_cookies(headers);
    let id = session::random_token();
    let csrf = session::random_token();
    // A browser trusted for another user gets a new id; one trusted for this user keeps
    // its id (its trust is renewed).
    let device = match device {
        Some(d) if trusted => d,
        _ => session::random_token(),
    };
    let ttl_ms = ui.config.session_ttl.as_millis() as u64;
    let user = req.username.clone();
    ui.directory
        .update(|a| {
            if let Some(old) = &old {
                a.remove_session(old);
            }
            a.add_session(
                &id,
                SessionRecord {
                    user: user.clone(),
                    csrf: csrf.clone(),
                    created_ms: now,
                    expires_ms: now + ttl_ms,
                },
            );
            a.trust_device(&device, &user, now);
            Ok(())
        })
        .await
        .map_err(|e| (e, None))?;
    let role = ui
        .directory
        .read(|a| super::guard::role_of(ui, a, &user))
        .unwrap_or(Role::Viewer);
    tracing::info!(client = ?ip, %user, role = role.as_str(), "UI login");
    let secure = ui.config.secure_cookie;
    let principal = Principal {
        user,
        role,
        via: Via::Session {
            id: id.clone(),
            csrf,
            expires_in: ui.config.session_ttl,
        },
    };
    let mut resp = Json(SessionView::from(&principal)).into_response();
    for cookie in [
        session::set_cookie(&id, ui.config.session_ttl, secure),
        session::set_device_cookie(&device, DEVICE_TTL, secure),
    ] {
        let v = HeaderValue::from_str(&cookie)
            .map_err(|e| (HttpError::internal("setting the cookie", &e), None))?;
        resp.headers_mut().append(SET_COOKIE, v);
    }
    Ok(resp)
}

/// Ends the session (the guard checked it and its CSRF token). The trusted-browser
/// cookie stays: logging out does not make this browser a stranger.
pub async fn logout(State(ui): State<UiState>, Extension(p): Extension<Principal>) -> Response {
    if let Via::Session { id, .. } = &p.via {
        let id = id.clone();
        if let Err(e) = ui.directory.update(|a| Ok(a.remove_session(&id))).await {
            return e.into_response();
        }
    }
    tracing::info!(user = %p.user, "UI logout");
    let mut resp = Json(serde_json::json!({ "loggedOut": true })).into_response();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie(ui.config.secure_cookie)) {
        resp.headers_mut().insert(SET_COOKIE, v);
    }
    resp
}

/// The logged-in user, its role and the CSRF token (a page loaded later asks here).
pub async fn session_info(Extension(p): Extension<Principal>) -> Json<SessionView> {
    Json(SessionView::from(&p))
}
