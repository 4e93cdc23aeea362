//! The UI's accounts as one document: users with roles and argon2id password hashes, API
//! tokens, login sessions and trusted browsers. Secrets are kept only as SHA-256 digests
//! (tokens, session ids and browser ids are 256-bit random values, so a fast digest is
//! enough); the document is what the Kubernetes Secret holds (see `directory`). Pure:
//! time and random values are passed in, so an update can be replayed after a conflict.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::role::Role;

/// Sessions kept at once; past it the oldest ends, so logins cannot grow the Secret
/// (about 200 bytes each; a Secret holds 1 MiB) without bound.
pub const MAX_SESSIONS: usize = 1_000;
/// Trusted browsers kept at once (the oldest is forgotten first).
pub const MAX_DEVICES: usize = 1_000;
/// API tokens kept at once.
pub const MAX_TOKENS: usize = 500;
/// A browser that logged in as a user stays trusted for it this long: long enough to
/// outlast any lockout an attacker can keep up, short enough that a lost laptop expires.
pub const DEVICE_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// An expired token is still listed (as expired) this long, so its owner sees why
/// automation stopped, then it is dropped.
pub const EXPIRED_TOKEN_SHOWN: Duration = Duration::from_secs(7 * 24 * 3600);
/// Token ids are `nmt_` + 16 hex digits; the secret part 64 hex digits.
pub const TOKEN_PREFIX: &str = "nmt_";

/// Lowercase hex SHA-256 of a secret.
pub fn digest(secret: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    hex(d.as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Accounts {
    #[serde(default)]
    pub users: BTreeMap<String, UserRecord>,
    /// By token id.
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenRecord>,
    /// By digest of the session id.
    #[serde(default)]
    pub sessions: BTreeMap<String, SessionRecord>,
    /// By digest of the browser's id.
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceRecord>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field("tokens", &self.tokens.len())
            .field("sessions", &self.sessions.len())
            .field("devices", &self.devices.len())
            .finish()
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserRecord {
    pub role: Role,
    /// argon2id PHC string.
    pub password_hash: String,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    /// What the token is for, as its creator named it.
    pub name: String,
    pub role: Role,
    pub secret_digest: String,
    pub created_by: String,
    pub created_ms: u64,
    pub expires_ms: u64,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionRecord {
    pub user: String,
    pub csrf: String,
    pub created_ms: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRecord {
    pub user: String,
    pub last_login_ms: u64,
}

/// Why a presented API token does not authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Not of the `nmt_<id>.<secret>` shape, unknown, or the wrong secret.
    Invalid,
    Expired,
}

/// A token split into its id and secret, if it has the shape.
pub fn split_token(presented: &str) -> Option<(&str, &str)> {
    let rest = presented.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('.')?;
    (id.len() == 16 && secret.len() == 64).then_some((id, secret))
}

impl Accounts {
    /// Drops expired sessions, devices past [`DEVICE_TTL`], tokens expired longer than
    /// [`EXPIRED_TOKEN_SHOWN`], and anything of a user that no longer exists (the
    /// built-in admin is not in `users`, so its name is passed in).
    pub fn prune(&mut self, builtin: &str, now_ms: u64) {
        let known = |u: &str| u == builtin || self.users.contains_key(u);
        let sessions = std::mem::take(&mut self.sessions);
        self.sessions = sessions
            .into_iter()
            .filter(|(_, s)| s.expires_ms > now_ms && known(&s.user))
            .collect();
        let devices = std::mem::take(&mut self.devices);
        self.devices = devices
            .into_iter()
            .filter(|(_, d)| {
                d.last_login_ms + DEVICE_TTL.as_millis() as u64 > now_ms && known(&d.user)
            })
            .collect();
        self.tokens
            .retain(|_, t| t.expires_ms + EXPIRED_TOKEN_SHOWN.as_millis() as u64 > now_ms);
        keep_newest(&mut self.sessions, MAX_SESSIONS, |s| s.created_ms);
        keep_newest(&mut self.devices, MAX_DEVICES, |d| d.last_login_ms);
        keep_newest(&mut self.tokens, MAX_TOKENS, |t| t.created_ms);
    }

    /// The live session whose id is `id`.
    pub fn session(&self, id: &str, now_ms: u64) -> Option<&SessionRecord> {
        self.sessions
            .get(&digest(id))
            .filter(|s| s.expires_ms > now_ms)
    }

    /// Records a session under the digest of `id` (a fresh random value).
    pub fn add_session(&mut self, id: &str, record: SessionRecord) {
        self.sessions.insert(digest(id), record);
    }

    pub fn remove_session(&mut self, id: &str) -> bool {
        self.sessions.remove(&digest(id)).is_some()
    }

    /// The user a browser id is trusted for.
    pub fn device_user(&self, device: &str) -> Option<&str> {
        self.devices.get(&digest(device)).map(|d| d.user.as_str())
    }

    pub fn trust_device(&mut self, device: &str, user: &str, now_ms: u64) {
        self.devices.insert(
            digest(device),
            DeviceRecord {
                user: user.to_string(),
                last_login_ms: now_ms,
            },
        );
    }

    /// Ends every session, token and trusted browser of `user` (deleted, or its password
    /// changed by an admin).
    pub fn forget_credentials_of(&mut self, user: &str) {
        self.sessions.retain(|_, s| s.user != user);
        self.devices.retain(|_, d| d.user != user);
        self.tokens.retain(|_, t| t.created_by != user);
    }

    /// Checks a presented API token: its id names a record whose digest matches the
    /// secret (compared in constant time) and that has not expired.
    pub fn check_token(
        &self,
        presented: &str,
        now_ms: u64,
    ) -> Result<(&str, &TokenRecord), TokenRefusal> {
        let (id, secret) = split_token(presented).ok_or(TokenRefusal::Invalid)?;
        let (id, rec) = self.tokens.get_key_value(id).ok_or(TokenRefusal::Invalid)?;
        if !bool::from(
            rec.secret_digest
                .as_bytes()
                .ct_eq(digest(secret).as_bytes()),
        ) {
            return Err(TokenRefusal::Invalid);
        }
        if rec.expires_ms <= now_ms {
            return Err(TokenRefusal::Expired);
        }
        Ok((id.as_str(), rec))
    }
}

fn keep_newest<V>(map: &mut BTreeMap<String, V>, max: usize, at: impl Fn(&V) -> u64) {
    if map.len() <= max {
        return;
    }
    let mut by_age: Vec<(u64, String)> = map.iter().map(|(k, v)| (at(v), k.clone())).collect();
    by_age.sort();
    for (_, k) in by_age.into_iter().take(map.len() - max) {
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(expires_ms: u64, secret: &str) -> TokenRecord {
        TokenRecord {
            name: "ci".into(),
            role: Role::Operator,
            secret_digest: digest(secret),
            created_by: "alice".into(),
            created_ms: 0,
            expires_ms,
        }
    }

    #[test]
    fn tokens_check_their_secret_and_expiry() {
        let mut a = Accounts::default();
        let secret = "a".repeat(64);
        a.tokens
            .insert("0123456789abcdef".into(), token(1_000, &secret));
        let good = format!("nmt_0123456789abcdef.{secret}");
        assert_eq!(a.check_token(&good, 999).unwrap().1.role, Role::Operator);
        assert_eq!(a.check_token(&good, 1_000), Err(TokenRefusal::Expired));
        let wrong = format!("nmt_0123456789abcdef.{}", "b".repeat(64));
        assert_eq!(a.check_token(&wrong, 0), Err(TokenRefusal::Invalid));
        assert_eq!(a.check_token("nmt_short.x", 0), Err(TokenRefusal::Invalid));
        assert_eq!(a.check_token(&secret, 0), Err(TokenRefusal::Invalid));
    }

    #[test]
    fn session_ids_are_stored_only_as_digests_and_expire() {
        let mut a = Accounts::default();
        let id = "f".repeat(64);
        a.add_session(
            &id,
            SessionRecord {
                user: "admin".into(),
                csrf: "c".into(),
                created_ms: 0,
                expires_ms: 100,
            },
        );
        let json = serde_json::to_string(&a).unwrap();
        assert!(!json.contains(&id), "{json}");
        assert!(a.session(&id, 99).is_some());
        assert!(a.session(&id, 100).is_none());
        a.prune("admin", 100);
        assert!(a.sessions.is_empty());
    }

    #[test]
    fn pruning_drops_what_belongs_to_deleted_users_and_bounds_the_document() {
        let mut a = Accounts::default();
        for i in 0..(MAX_SESSIONS + 5) {
            a.add_session(
                &format!("{i:064}"),
                SessionRecord {
                    user: if i % 2 == 0 { "admin" } else { "gone" }.into(),
                    csrf: String::new(),
                    created_ms: i as u64,
                    expires_ms: u64::MAX,
                },
            );
        }
        a.trust_device("d1", "gone", 0);
        a.trust_device("d2", "admin", 0);
        a.prune("admin", 1);
        assert!(a.sessions.values().all(|s| s.user == "admin"));
        assert_eq!(a.device_user("d1"), None);
        assert_eq!(a.device_user("d2"), Some("admin"));
        a.prune("admin", DEVICE_TTL.as_millis() as u64 + 1);
        assert_eq!(a.device_user("d2"), None, "a browser's trust expires");
    }

    #[test]
    fn debug_output_names_no_secret() {
        let mut a = Accounts::default();
        a.users.insert(
            "bob".into(),
            UserRecord {
                role: Role::Viewer,
                password_hash: "$argon2id$secret-hash".into(),
                created_ms: 0,
            },
        );
        let d = format!("{a:?}");
        assert!(d.contains("bob") && !d.contains("secret-hash"), "{d}");
    }
}
