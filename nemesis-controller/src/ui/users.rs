//! Managing who may use the UI (admin only, see the router): users with roles and
//! passwords, and API tokens for automation. A token is shown once, at creation; only
//! its digest is kept, with an expiry it cannot outlive. Deleting a user or changing its
//! password ends its sessions, trusted browsers and the tokens it created.
//!
//! - `GET /api/v1/users`, `POST /api/v1/users` `{name, role, password}`,
//!   `PUT /api/v1/users/{name}` `{role?, password?}`, `DELETE /api/v1/users/{name}`;
//! - `GET /api/v1/tokens`, `POST /api/v1/tokens` `{name, role, expiresIn}`,
//!   `DELETE /api/v1/tokens/{id}`.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::UiState;
use super::accounts::{TOKEN_PREFIX, TokenRecord, UserRecord, digest};
use super::error::HttpError;
use super::password::MIN_PASSWORD_CHARS;
use super::role::{Principal, Role};
use super::session::{random_id, random_token};
use crate::policy::duration::parse_duration;

/// A token lives this long unless its creator says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// No token lives longer: a forgotten one in a CI system expires within the year.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// User and token names: short, printable, no markup.
const MAX_NAME_CHARS: usize = 64;

fn json_error(r: JsonRejection, shape: &'static str) -> HttpError {
    // Generic wording: serde's messages can quote values, a password included.
    HttpError::new(r.status(), format!("the body must be JSON: {shape}"))
}

fn check_name(what: &str, name: &str) -> Result<(), HttpError> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(HttpError::bad_request(format!(
            "{what}: 1 to {MAX_NAME_CHARS} letters, digits, '-', '_', '.' or '@'"
        )))
    }
}

fn check_password(password: &str) -> Result<(), HttpError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(HttpError::bad_request(format!(
            "password: use at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    Ok(())
}

// === users ===

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    pub name: String,
    pub role: Role,
    /// The admin of the password file: it cannot be changed or deleted here.
    pub built_in: bool,
    pub created_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct UserList {
    pub users: Vec<UserView>,
}

pub async fn list_users(State(ui): State<UiState>) -> Json<UserList> {
    let mut users = vec![UserView {
        name: ui.config.user.clone(),
        role: Role::Admin,
        built_in: true,
        created_ms: None,
    }];
    ui.directory.read(|a| {
        users.extend(a.users.iter().map(|(name, u)| UserView {
            name: name.clone(),
            role: u.role,
            built_in: false,
            created_ms: Some(u.created_ms),
        }))
    });
    Json(UserList { users })
}

#[derive(Deserialize)]
pub struct NewUser {
    pub name: String,
    pub role: Role,
    pub password: String,
}

pub async fn create_user(
    State(ui): State<UiState>,
    Extension(by): Extension<Principal>,
    body: Result<Json<NewUser>, JsonRejection>,
) -> Result<(StatusCode, Json<UserView>), HttpError> {
    let Json(new) = body.map_err(|r| {
        json_error(
            r,
            r#"{"name": "...", "role": "viewer|operator|admin", "password": "..."}"#,
        )
    })?;
    check_name("name", &new.name)?;
    check_password(&new.password)?;
    if new.name == ui.config.user {
        return Err(HttpError::new(
            StatusCode::CONFLICT,
            format!("{:?} is the built-in admin's name", new.name),
        ));
    }
    let hash = ui
        .password
        .hash(new.password)
        .await
        .map_err(|e| HttpError::internal("hashing the password", &e))?;
    let now = ui.directory.now_ms();
    ui.directory
        .update(|a| {
            if a.users.contains_key(&new.name) {
                return Err(HttpError::new(
                    StatusCode::CONFLICT,
                    format!("a user named {:?} exists already", new.name),
                ));
            }
            a.users.insert(
                new.name.clone(),
                UserRecord {
                    role: new.role,
                    password_hash: hash.clone(),
                    created_ms: now,
                },
            );
            Ok(())
        })
        .await?;
    tracing::info!(user = %new.name, role = new.role.as_str(), by = %by.user, "UI user created");
    Ok((
        StatusCode::CREATED,
        Json(UserView {
            name: new.name,
            role: new.role,
            built_in: false,
            created_ms: Some(now),
        }),
    ))
}

#[derive(Deserialize)]
pub struct UserChange {
    pub role: Option<Role>,
    pub password: Option<String>,
}

fn not_builtin(ui: &UiState, name: &str) -> Result<(), HttpError> {
    if name == ui.config.user {
        return Err(HttpError::new(
            StatusCode::CONFLICT,
            "the built-in admin is set by the controller's password file, not here",
        ));
    }
    Ok(())
}

pub async fn change_user(
    State(ui): State<UiState>,
    Extension(by): Extension<Principal>,
    Path(name): Path<String>,
    body: Result<Json<UserChange>, JsonRejection>,
) -> Result<Json<UserView>, HttpError> {
    let Json(change) = body.map_err(|r| {
        json_error(
            r,
            r#"{"role": "viewer|operator|admin"} and/or {"password": "..."}"#,
        )
    })?;
    not_builtin(&ui, &name)?;
    let hash = match change.password {
        Some(p) => {
            check_password(&p)?;
            Some(
                ui.password
                    .hash(p)
                    .await
                    .map_err(|e| HttpError::internal("hashing the password", &e))?,
            )
        }
        None => None,
    };
    let view = ui
        .directory
        .update(|a| {
            let u = a
                .users
                .get_mut(&name)
                .ok_or_else(|| HttpError::not_found(format!("no user named {name:?}")))?;
            if let Some(role) = change.role {
                u.role = role;
            }
            let view = UserView {
                name: name.clone(),
                role: u.role,
                built_in: false,
                created_ms: Some(u.created_ms),
            };
            if let Some(h) = &hash {
                u.password_hash = h.clone();
                a.forget_credentials_of(&name);
            }
            Ok(view)
        })
        .await?;
    tracing::info!(user = %name, role = view.role.as_str(), password_changed = hash.is_some(), by = %by.user, "UI user changed");
    Ok(Json(view))
}

pub async fn delete_user(
    State(ui): State<UiState>,
    Extension(by): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<StatusCode, HttpError> {
    not_builtin(&ui, &name)?;
    ui.directory
        .update(|a| {
            a.users
                .remove(&name)
                .ok_or_else(|| HttpError::not_found(format!("no user named {name:?}")))?;
            a.forget_credentials_of(&name);
            Ok(())
        })
        .await?;
    tracing::info!(user = %name, by = %by.user, "UI user deleted");
    Ok(StatusCode::NO_CONTENT)
}

// === tokens ===

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_by: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub expired: bool,
}

fn view(id: &str, t: &TokenRecord, now_ms: u64) -> TokenView {
    TokenView {
        id: id.to_string(),
        name: t.name.clone(),
        role: t.role,
        created_by: t.created_by.clone(),
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        expired: t.expires_ms <= now_ms,
    }
}

#[derive(Debug, Serialize)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

pub async fn list_tokens(State(ui): State<UiState>) -> Json<TokenList> {
    let now = ui.directory.now_ms();
    let tokens = ui.directory.read(|a| {
        a.tokens
            .iter()
            .map(|(id, t)| view(id, t, now))
            .collect::<Vec<_>>()
    });
    Json(TokenList { tokens })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewToken {
    pub name: String,
    pub role: Role,
    /// A duration such as `30d` or `12h`; [`DEFAULT_TOKEN_TTL`] when absent.
    pub expires_in: Option<String>,
}

/// The new token, with its secret: the only time it is shown.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedToken {
    #[serde(flatten)]
    pub token: TokenView,
    /// Send as `Authorization: Bearer <token>`. Not shown again.
    pub secret: String,
}

pub async fn create_token(
    State(ui): State<UiState>,
    Extension(by): Extension<Principal>,
    body: Result<Json<NewToken>, JsonRejection>,
) -> Result<(StatusCode, Json<IssuedToken>), HttpError> {
    let Json(new) = body.map_err(|r| {
        json_error(
            r,
            r#"{"name": "...", "role": "viewer|operator|admin", "expiresIn": "30d"}"#,
        )
    })?;
    check_name("name", &new.name)?;
    if !by.role.allows(new.role) {
        return Err(HttpError::new(
            StatusCode::FORBIDDEN,
            "a token cannot have a role above its creator's",
        ));
    }
    let ttl = match &new.expires_in {
        None => DEFAULT_TOKEN_TTL,
        Some(s) => parse_duration(s)
            .ok()
            .and_then(|d| d.to_std().ok())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                HttpError::bad_request(format!(
                    "expiresIn: {s:?} is not a duration such as 30d, 12h or 90m"
                ))
            })?,
    };
    if ttl > MAX_TOKEN_TTL {
        return Err(HttpError::bad_request(format!(
            "expiresIn: at most {} days",
            MAX_TOKEN_TTL.as_secs() / 86_400
        )));
    }
    let id = random_id();
    let secret = random_token();
    let now = ui.directory.now_ms();
    let record = TokenRecord {
        name: new.name.clone(),
        role: new.role,
        secret_digest: digest(&secret),
        created_by: by.user.clone(),
        created_ms: now,
        expires_ms: now + ttl.as_millis() as u64,
    };
    ui.directory
        .update(|a| {
            a.tokens.insert(id.clone(), record.clone());
            Ok(())
        })
        .await?;
    tracing::info!(token = %id, name = %new.name, role = new.role.as_str(), by = %by.user, "UI API token issued");
    Ok((
        StatusCode::CREATED,
        Json(IssuedToken {
            token: view(&id, &record, now),
            secret: format!("{TOKEN_PREFIX}{id}.{secret}"),
        }),
    ))
}

pub async fn delete_token(
    State(ui): State<UiState>,
    Extension(by): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, HttpError> {
    ui.directory
        .update(|a| {
            a.tokens
                .remove(&id)
                .map(|_| ())
                .ok_or_else(|| HttpError::not_found(format!("no token with id {id:?}")))
        })
        .await?;
    tracing::info!(token = %id, by = %by.user, "UI API token revoked");
    Ok(StatusCode::NO_CONTENT)
}
