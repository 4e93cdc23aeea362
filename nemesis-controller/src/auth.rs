//! Credentials: the bearer token machine clients (agents, Alertmanager) present, checked
//! in constant time, and argon2id hashing of UI login passwords. Owns secrets in memory;
//! must never log, display or serialize one (the types here redact themselves).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use rand::RngCore;
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading the token file {}: {source}", path.display())]
    ReadTokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token {origin} is empty")]
    EmptyToken { origin: String },
    #[error("the token {origin} contains characters that cannot appear in an HTTP header")]
    TokenNotHeaderSafe { origin: String },
    #[error("hashing a password: {0}")]
    HashPassword(argon2::password_hash::Error),
    #[error("the stored password hash is not a valid PHC string: {0}")]
    ParsePasswordHash(argon2::password_hash::Error),
    #[error("the stored password hash uses {found}; only argon2id hashes are accepted")]
    WrongPasswordAlgorithm { found: String },
    #[error("verifying a password: {0}")]
    VerifyPassword(argon2::password_hash::Error),
}

/// A secret string whose `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

// === impl BearerToken ===

/// The shared token clients send as `Authorization: Bearer <token>`. Cheap to clone;
/// [`BearerToken::reload`] swaps the value for every clone (a rotated Secret).
#[derive(Clone, Debug)]
pub struct BearerToken {
    current: Arc<RwLock<Secret>>,
    file: Option<PathBuf>,
}

impl BearerToken {
    /// A token given directly (a flag or a test).
    pub fn from_value(token: impl Into<String>) -> Result<Self, AuthError> {
        let token = validate(token.into(), "given on the command line")?;
        Ok(Self {
            current: Arc::new(RwLock::new(token)),
            file: None,
        })
    }

    /// A token read from a file (a Kubernetes Secret mounted as a volume). Surrounding
    /// whitespace, such as the newline editors add, is not part of the token.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, AuthError> {
        let path = path.as_ref().to_path_buf();
        let token = read_token_file(&path)?;
        Ok(Self {
            current: Arc::new(RwLock::new(token)),
            file: Some(path),
        })
    }

    /// Re-reads the file (no-op for a token given as a value); returns whether the token
    /// changed. On error the old token stays in force.
    pub fn reload(&self) -> Result<bool, AuthError> {
        let Some(path) = &self.file else {
            return Ok(false);
        };
        let fresh = read_token_file(path)?;
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        let changed = *cur != fresh;
        *cur = fresh;
        Ok(changed)
    }

    /// Constant-time comparison of a presented token with the current one (only the
    /// length can leak, which a random token of fixed length does not mind).
    pub fn matches(&self, presented: &[u8]) -> bool {
        let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
        bool::from(cur.0.as_bytes().ct_eq(presented))
    }

    /// Checks an `Authorization` header value that may also be HTTP Basic (RFC 7617)
    /// with the token as the password and any user name: what Alertmanager's
    /// `http_config.basic_auth` (`username`, `password_file`) sends, beside the Bearer
    /// of its `http_config.authorization` (`credentials_file`).
    pub fn check_bearer_or_basic(
        &self,
        authorization: Option<&http::HeaderValue>,
    ) -> Result<(), Unauthorized> {
        use base64::Engine;
        let value = authorization.ok_or(Unauthorized::MissingHeader)?;
        let bytes = value.as_bytes();
        match bytes.get(..6) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"basic ") => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(bytes[6..].trim_ascii())
                    .map_err(|_| Unauthorized::WrongToken)?;
                // user-id ":" password; the user name carries no secret.
                let colon = decoded
                    .iter()
                    .position(|b| *b == b':')
                    .ok_or(Unauthorized::WrongToken)?;
                if self.matches(&decoded[colon + 1..]) {
                    Ok(())
                } else {
                    Err(Unauthorized::WrongToken)
                }
            }
            _ => self.check(Some(value)),
        }
    }

    /// Checks an `Authorization` header value.
    pub fn check(&self, authorization: Option<&http::HeaderValue>) -> Result<(), Unauthorized> {
        let value = authorization.ok_or(Unauthorized::MissingHeader)?;
        let bytes = value.as_bytes();
        // The scheme is case-insensitive (RFC 9110 section 11.1).
        let token = match bytes.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => &bytes[7..],
            _ => return Err(Unauthorized::NotBearer),
        };
        if self.matches(token.trim_ascii()) {
            Ok(())
        } else {
            Err(Unauthorized::WrongToken)
        }
    }
}

fn read_token_file(path: &Path) -> Result<Secret, AuthError> {
    let raw = std::fs::read_to_string(path).map_err(|source| AuthError::ReadTokenFile {
        path: path.to_path_buf(),
        source,
    })?;
    validate(raw, &format!("in {}", path.display()))
}

fn validate(raw: String, origin: &str) -> Result<Secret, AuthError> {
    let token = raw.trim();
    if token.is_empty() {
        return Err(AuthError::EmptyToken {
            origin: origin.to_string(),
        });
    }
    if http::HeaderValue::from_str(token).is_err() {
        return Err(AuthError::TokenNotHeaderSafe {
            origin: origin.to_string(),
        });
    }
    Ok(Secret(token.to_string()))
}

/// Why a request was refused; the message is safe to send back (it never echoes the
/// presented token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unauthorized {
    MissingHeader,
    NotBearer,
    WrongToken,
}

impl Unauthorized {
    pub fn message(self) -> &'static str {
        match self {
            Unauthorized::MissingHeader => {
                "missing Authorization header; send `Authorization: Bearer <token>`"
            }
            Unauthorized::NotBearer => {
                "the Authorization header is not a bearer token; send `Authorization: Bearer <token>`"
            }
            Unauthorized::WrongToken => "the bearer token is not valid",
        }
    }
}

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        let mut resp = (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({ "error": self.message() })),
        )
            .into_response();
        resp.headers_mut().insert(
            WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"nemesis\""),
        );
        resp
    }
}

/// axum middleware: refuses requests without the right bearer token before any body is
/// read. Use with `axum::middleware::from_fn_with_state(token, require_bearer)`.
pub async fn require_bearer(
    State(token): State<BearerToken>,
    req: Request,
    next: Next,
) -> Response {
    match token.check(req.headers().get(AUTHORIZATION)) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            tracing::warn!(path = %req.uri().path(), reason = why.message(), "request refused");
            why.into_response()
        }
    }
}

/// axum middleware: as [`require_bearer`], also taking HTTP Basic with the token as the
/// password (see [`BearerToken::check_bearer_or_basic`]).
pub async fn require_bearer_or_basic(
    State(token): State<BearerToken>,
    req: Request,
    next: Next,
) -> Response {
    match token.check_bearer_or_basic(req.headers().get(AUTHORIZATION)) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            tracing::warn!(path = %req.uri().path(), reason = why.message(), "request refused");
            why.into_response()
        }
    }
}

// === passwords ===

fn argon2id() -> Argon2<'static> {
    // argon2id v19, m = 19 MiB, t = 2, p = 1: the OWASP recommended minimum, about 20 ms
    // on the machines this runs on (a login is rare; a brute force must not be cheap).
    Argon2::new(
        Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::default(),
    )
}

/// Hashes a password with argon2id and a fresh random salt; returns the PHC string
/// (`$argon2id$v=19$m=...`) to store.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(AuthError::HashPassword)?;
    let hash = argon2id()
        .hash_password(password.as_bytes(), &salt)
        .map_err(AuthError::HashPassword)?;
    Ok(hash.to_string())
}

/// Checks a password against a stored PHC string: `Ok(false)` for a wrong password, an
/// error for a malformed or non-argon2id hash (a configuration problem, not a bad login).
pub fn verify_password(password: &str, phc: &str) -> Result<bool, AuthError> {
    let parsed = PasswordHash::new(phc).map_err(AuthError::ParsePasswordHash)?;
    if parsed.algorithm != Algorithm::Argon2id.ident() {
        return Err(AuthError::WrongPasswordAlgorithm {
            found: parsed.algorithm.to_string(),
        });
    }
    match argon2id().verify_password(password.as_bytes(), &parsed) {
        Ok(()) => Ok(true),
        Err(argon2::password_hash::Error::Password) => Ok(false),
        Err(e) => Err(AuthError::VerifyPassword(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn bearer_check_accepts_only_the_exact_token() {
        let t = BearerToken::from_value("s3cret-token").unwrap();
        assert_eq!(t.check(Some(&hv("Bearer s3cret-token"))), Ok(()));
        assert_eq!(t.check(Some(&hv("bearer s3cret-token"))), Ok(()));
        assert_eq!(
            t.check(Some(&hv("Bearer s3cret-toke"))),
            Err(Unauthorized::WrongToken)
        );
        assert_eq!(
            t.check(Some(&hv("Bearer s3cret-token2"))),
            Err(Unauthorized::WrongToken)
        );
        assert_eq!(
            t.check(Some(&hv("Basic s3cret-token"))),
            Err(Unauthorized::NotBearer)
        );
        assert_eq!(t.check(None), Err(Unauthorized::MissingHeader));
    }

    #[test]
    fn token_file_is_trimmed_and_reload_picks_up_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let t = BearerToken::from_file(&path).unwrap();
        assert!(t.matches(b"first"));
        std::fs::write(&path, "second\n").unwrap();
        assert!(t.clone().reload().unwrap());
        assert!(!t.matches(b"first"));
        assert!(t.matches(b"second"));
        assert!(!t.reload().unwrap());
    }

    #[test]
    fn empty_or_missing_token_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, " \n").unwrap();
        let err = BearerToken::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("is empty") && err.contains("token"), "{err}");
        let err = BearerToken::from_file(dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("reading the token file"), "{err}");
    }

    #[test]
    fn debug_output_never_contains_the_token() {
        let t = BearerToken::from_value("do-not-print-me").unwrap();
        assert!(!format!("{t:?}").contains("do-not-print-me"));
    }

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$"), "{h}");
        assert!(verify_password("correct horse", &h).unwrap());
        assert!(!verify_password("wrong horse", &h).unwrap());
        // Fresh salt every time.
        assert_ne!(h, hash_password("correct horse").unwrap());
    }

    #[test]
    fn malformed_or_foreign_hashes_are_errors_not_failed_logins() {
        assert!(matches!(
            verify_password("x", "not a hash"),
            Err(AuthError::ParsePasswordHash(_))
        ));
        let argon2i = Argon2::new(
            Algorithm::Argon2i,
            argon2::Version::V0x13,
            argon2::Params::default(),
        )
        .hash_password(b"x", &SaltString::encode_b64(&[7u8; 16]).unwrap())
        .unwrap()
        .to_string();
        assert!(matches!(
            verify_password("x", &argon2i),
            Err(AuthError::WrongPasswordAlgorithm { .. })
        ));
    }
}
