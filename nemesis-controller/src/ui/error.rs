//! The UI's errors: [`UiError`] for setting it up, [`HttpError`] for answers. An answer
//! is `{"error": "<message>"}` with a message written for the operator; internal causes
//! (store failures, task panics) are logged here and never sent, and nothing here ever
//! carries a password, a session id or a CSRF token.

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Duration;

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::RETRY_AFTER;

use crate::auth::AuthError;

#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error("reading the UI password file {}: {source}", path.display())]
    ReadPasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the UI password file {} holds a password shorter than {min} characters; use at least {min} (or an argon2id PHC hash)",
        path.display()
    )]
    PasswordTooShort { path: PathBuf, min: usize },
    #[error(
        "the UI password file {} starts like an argon2 hash but is not a valid argon2id PHC hash: {source}",
        path.display()
    )]
    PasswordHash {
        path: PathBuf,
        #[source]
        source: AuthError,
    },
    #[error("hashing the UI password: {0}")]
    HashPassword(#[source] AuthError),
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: StatusCode,
    pub message: Cow<'static, str>,
    pub retry_after: Option<Duration>,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// A failure of ours: the cause goes to the log, the client learns only that it
    /// happened and where to look.
    pub fn internal(doing: &'static str, cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(doing, err = %cause, "UI request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error while {doing}; the controller's log has the cause"),
        )
    }

    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "not logged in (or the session expired); log in at /login",
        )
    }

    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up, at least 1 (RFC 9110 section 10.2.3).
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(RETRY_AFTER, http::HeaderValue::from(secs.max(1)));
        }
        resp
    }
}
