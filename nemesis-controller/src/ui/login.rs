//! `POST /login`, `POST /logout` and `GET /api/v1/session`. A login is rate-limited
//! before any password is checked, answers a wrong user name exactly as a wrong password
//! (same status, message and argon2 work), and replaces any session the browser had.
//! The password is moved into the check and dropped; it is never logged or echoed.

use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http::header::SET_COOKIE;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use super::error::HttpError;
use super::guard::same_origin;
use super::limit::LimitScope;
use super::session::{self, SessionInfo};
use super::{MAX_LOGIN_BODY_BYTES, UiState};

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
    /// Send it back as `X-CSRF-Token` with every change.
    pub csrf_token: String,
    pub expires_in_seconds: u64,
}

impl From<&SessionInfo> for SessionView {
    fn from(s: &SessionInfo) -> Self {
        Self {
            user: s.user.clone(),
            csrf_token: s.csrf.clone(),
            expires_in_seconds: s.expires_in.as_secs(),
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
        Err(e) => e.into_response(),
    }
}

async fn try_login(
    ui: &UiState,
    client: Option<SocketAddr>,
    headers: &HeaderMap,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<Response, HttpError> {
    same_origin(headers)?;
    let ip = client.map(|a| a.ip());
    if let Err(limited) = ui.limiter.attempt(ip, Instant::now()) {
        let secs = limited.retry_after.as_secs_f64().ceil().max(1.0);
        let who = match limited.scope {
            LimitScope::Address => "from your address",
            LimitScope::Everyone => "right now",
        };
        tracing::warn!(client = ?ip, scope = ?limited.scope, "UI login refused: too many attempts");
        return Err(HttpError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many login attempts {who}; try again in {secs} s"),
        )
        .with_retry_after(limited.retry_after));
    }
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
        HttpError::new(status, message)
    })?;
    let user_ok = bool::from(req.username.as_bytes().ct_eq(ui.config.user.as_bytes()));
    // The password is checked even for a wrong user name, so timing tells nothing.
    let password_ok = ui
        .password
        .verify(req.password)
        .await
        .map_err(|e| HttpError::internal("checking the password", &e))?;
    if !(user_ok && password_ok) {
        tracing::warn!(client = ?ip, "UI login failed");
        return Err(HttpError::new(StatusCode::UNAUTHORIZED, WRONG_CREDENTIALS));
    }
    if let Some(old) = session::from_cookies(headers) {
        ui.sessions.revoke(&old);
    }
    let s = ui.sessions.create(&ui.config.user, Instant::now());
    tracing::info!(client = ?ip, user = %s.user, "UI login");
    let cookie = session::set_cookie(&s.id, ui.config.session_ttl, ui.config.secure_cookie);
    let mut resp = Json(SessionView::from(&s)).into_response();
    resp.headers_mut().insert(
        SET_COOKIE,
        HeaderValue::from_str(&cookie)
            .map_err(|e| HttpError::internal("setting the cookie", &e))?,
    );
    Ok(resp)
}

/// Ends the session (the guard checked it and its CSRF token).
pub async fn logout(State(ui): State<UiState>, Extension(s): Extension<SessionInfo>) -> Response {
    ui.sessions.revoke(&s.id);
    tracing::info!(user = %s.user, "UI logout");
    let mut resp = Json(serde_json::json!({ "loggedOut": true })).into_response();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie(ui.config.secure_cookie)) {
        resp.headers_mut().insert(SET_COOKIE, v);
    }
    resp
}

/// The logged-in user and the CSRF token (a page loaded later asks for it here).
pub async fn session_info(Extension(s): Extension<SessionInfo>) -> Json<SessionView> {
    Json(SessionView::from(&s))
}
