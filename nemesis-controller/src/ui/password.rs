//! The admin password: read once at start from a file holding either an argon2id PHC
//! hash or the password itself (then hashed at once, so only the hash stays in memory),
//! and checked with argon2id on the blocking pool, a few at a time. It never logs,
//! displays or returns the password or the hash.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::UiError;
use crate::auth::{AuthError, hash_password, verify_password};

/// A password file shorter than this is refused: the UI is reachable over the network.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// argon2id takes about 19 MiB and 20 ms per check: two at a time bound the memory and
/// leave the other core to the controller.
const CONCURRENT_CHECKS: usize = 2;

pub struct AdminPassword {
    phc: String,
    checks: Arc<Semaphore>,
}

impl std::fmt::Debug for AdminPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminPassword(<redacted>)")
    }
}

impl AdminPassword {
    /// Reads a password file (a mounted Secret). A value starting with `$argon2` is a PHC
    /// hash (`$argon2id$v=19$...`, as `hash_password` writes; other argon2 variants are
    /// refused); anything else is the password itself. A trailing newline is not part of
    /// either.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, UiError> {
        let path = path.as_ref();
        let raw = std::fs::read_to_string(path).map_err(|source| UiError::ReadPasswordFile {
            path: path.to_path_buf(),
            source,
        })?;
        let value = raw.trim_end_matches(['\n', '\r']);
        if value.starts_with("$argon2") {
            Self::from_phc(value.trim()).map_err(|source| UiError::PasswordHash {
                path: path.to_path_buf(),
                source,
            })
        } else if value.chars().count() < MIN_PASSWORD_CHARS {
            Err(UiError::PasswordTooShort {
                path: path.to_path_buf(),
                min: MIN_PASSWORD_CHARS,
            })
        } else {
            Self::from_plaintext(value).map_err(UiError::HashPassword)
        }
    }

    /// Hashes a password given in the clear (for tests and the file form).
    pub fn from_plaintext(password: &str) -> Result<Self, AuthError> {
        Self::from_phc(&hash_password(password)?)
    }

    /// Takes a stored argon2id PHC string, checking that it parses.
    pub fn from_phc(phc: &str) -> Result<Self, AuthError> {
        let parsed =
            argon2::password_hash::PasswordHash::new(phc).map_err(AuthError::ParsePasswordHash)?;
        if parsed.salt.is_none() || parsed.hash.is_none() {
            return Err(AuthError::ParsePasswordHash(
                argon2::password_hash::Error::PhcStringField,
            ));
        }
        // Checks the algorithm and the parameters (a wrong password is `Ok(false)`).
        verify_password("", phc)?;
        Ok(Self {
            phc: phc.to_string(),
            checks: Arc::new(Semaphore::new(CONCURRENT_CHECKS)),
        })
    }

    /// Checks a presented password against the admin's hash on the blocking pool
    /// (argon2 is CPU- and memory-hard), at most [`CONCURRENT_CHECKS`] at once.
    pub async fn verify(&self, presented: String) -> Result<bool, AuthError> {
        self.verify_against(presented, self.phc.clone()).await
    }

    /// Checks a presented password against another user's stored hash, sharing the same
    /// bound on concurrent checks.
    pub async fn verify_against(&self, presented: String, phc: String) -> Result<bool, AuthError> {
        let _permit = self
            .checks
            .acquire()
            .await
            .expect("the semaphore is never closed");
        match tokio::task::spawn_blocking(move || verify_password(&presented, &phc)).await {
            Ok(r) => r,
            // The check panicked: treat it as a failed login, never as a success.
            Err(_) => Ok(false),
        }
    }

    /// Hashes a new password (a user created or changed) on the blocking pool.
    pub async fn hash(&self, password: String) -> Result<String, AuthError> {
        let _permit = self
            .checks
            .acquire()
            .await
            .expect("the semaphore is never closed");
        tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .unwrap_or(Err(AuthError::HashPassword(
                argon2::password_hash::Error::Crypto,
            )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_plaintext_file_is_hashed_and_a_phc_file_is_used_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "correct horse battery\n").unwrap();
        let p = AdminPassword::from_file(&plain).unwrap();
        assert!(p.verify("correct horse battery".into()).await.unwrap());
        assert!(!p.verify("correct horse battery\n".into()).await.unwrap());
        assert!(!p.phc.contains("correct"), "only the hash is kept");

        let hashed = dir.path().join("hashed");
        std::fs::write(
            &hashed,
            format!("{}\n", hash_password("s3cret-pass").unwrap()),
        )
        .unwrap();
        let p = AdminPassword::from_file(&hashed).unwrap();
        assert!(p.verify("s3cret-pass".into()).await.unwrap());
        assert!(!p.verify("nope".into()).await.unwrap());
    }

    #[test]
    fn bad_password_files_are_clear_errors_that_never_quote_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc123\n").unwrap();
        let e = AdminPassword::from_file(&short).unwrap_err().to_string();
        assert!(e.contains("at least 8") && e.contains("short"), "{e}");
        assert!(!e.contains("abc123"), "{e}");

        let broken = dir.path().join("broken");
        std::fs::write(&broken, "$argon2id$v=19$garbage").unwrap();
        let e = AdminPassword::from_file(&broken).unwrap_err().to_string();
        assert!(e.contains("not a valid argon2id PHC hash"), "{e}");
        assert!(!e.contains("garbage"), "{e}");

        let e = AdminPassword::from_file(dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("reading the UI password file"), "{e}");
    }

    #[tokio::test]
    async fn a_hash_made_by_debians_argon2_tool_is_accepted_with_its_own_parameters() {
        // `printf %s cli-made-password-1 | argon2 <salt> -id -m 15 -t 2 -p 1 -e`, the
        // recipe in manifests/base/secrets.example.yaml (m = 32 MiB, not our default).
        let p = AdminPassword::from_phc("$argon2id$v=19$m=32768,t=2,p=1$N1hUVWxtcTA5TDFKZENna21pb1pkZz09$5YAtVCWx3fj/5Lxka2+4q83usDaPQzmb9+7HcYWgAyg").unwrap();
        assert!(p.verify("cli-made-password-1".into()).await.unwrap());
        assert!(!p.verify("cli-made-password-2".into()).await.unwrap());
    }

    #[test]
    fn debug_output_is_redacted() {
        let p = AdminPassword::from_plaintext("hunter22hunter22").unwrap();
        assert_eq!(format!("{p:?}"), "AdminPassword(<redacted>)");
    }
}
