//! The replicas' shared token: kept in a Secret beside the Lease that the first instance
//! to need it creates (random, 256 bits) and every instance reads, so replicas
//! authenticate to each other with no manual step, as the UI's accounts Secret does.
//! Both sides re-read it every [`REFRESH`], so a rotated value (edit or delete the
//! Secret) is in force within that. Owns the secret in memory: never logs it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rand::RngCore;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

/// The Secret's name unless `--replica-token-secret` names another.
pub const DEFAULT_SECRET: &str = "nemesis-replica-token";
/// The key of the Secret's data that holds the token.
pub const TOKEN_KEY: &str = "token";
/// How often every instance re-reads the Secret.
pub const REFRESH: Duration = Duration::from_secs(60);
/// How soon a failed first read is tried again.
pub const RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading Secret {namespace}/{name}: {}", crate::permissions::explain(.source))]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("creating Secret {namespace}/{name}: {}", crate::permissions::explain(.source))]
    Create {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading or creating the replicas' token Secret timed out")]
    Timeout,
    #[error(
        "Secret {namespace}/{name} has no usable data.{TOKEN_KEY} (empty, or not a header-safe string); delete it and the controller creates a new one"
    )]
    Unusable { namespace: String, name: String },
}

/// The current token; cheap to clone, every clone sees a refresh.
#[derive(Clone)]
pub struct ReplicaToken {
    current: Arc<RwLock<String>>,
}

impl std::fmt::Debug for ReplicaToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaToken(<redacted>)")
    }
}

impl ReplicaToken {
    /// A token given directly (tests).
    pub fn from_value(token: impl Into<String>) -> Self {
        Self {
            current: Arc::new(RwLock::new(token.into())),
        }
    }

    /// No token yet: every request is refused and nothing is pulled until
    /// [`TokenSecret::follow`] has read the Secret.
    pub fn pending() -> Self {
        Self::from_value(String::new())
    }

    /// Whether a token has been read.
    pub fn is_ready(&self) -> bool {
        !self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    fn set(&self, token: String) -> bool {
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        let changed = *cur != token;
        *cur = token;
        changed
    }

    /// Whether an `Authorization` header presents the token (constant time).
    pub fn accepts(&self, authorization: Option<&http::HeaderValue>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let bytes = value.as_bytes();
        let presented = match bytes.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => bytes[7..].trim_ascii(),
            _ => return false,
        };
        let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
        !cur.is_empty() && bool::from(cur.as_bytes().ct_eq(presented))
    }

    /// The header that presents the token (marked sensitive, so clients never log it).
    pub fn authorization(&self) -> http::HeaderValue {
        let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
        let mut v = http::HeaderValue::from_str(&format!("Bearer {cur}"))
            .unwrap_or_else(|_| http::HeaderValue::from_static("Bearer -"));
        v.set_sensitive(true);
        v
    }
}

/// The Secret holding the token.
#[derive(Clone)]
pub struct TokenSecret {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

impl TokenSecret {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// Reads the token, creating the Secret with a fresh one if there is none (of two
    /// instances creating it at once, the loser reads the winner's).
    pub async fn read_or_create(&self) -> Result<String, TokenError> {
        if let Some(t) = self.read().await? {
            return Ok(t);
        }
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".to_string(),
                    "nemesis".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                TOKEN_KEY.to_string(),
                ByteString(token.clone().into_bytes()),
            )])),
            type_: Some("Opaque".to_string()),
            ..Secret::default()
        };
        match self.api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = %self.name, "created the replicas' token");
                Ok(token)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.read().await?.ok_or_else(|| self.unusable())
            }
            Err(source) => Err(TokenError::Create {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                source,
            }),
        }
    }

    fn unusable(&self) -> TokenError {
        TokenError::Unusable {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The token in the Secret; `None` when there is no Secret.
    async fn read(&self) -> Result<Option<String>, TokenError> {
        let secret = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| TokenError::Read {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                source,
            })?;
        let Some(secret) = secret else {
            return Ok(None);
        };
        let token = secret
            .data
            .and_then(|mut d| d.remove(TOKEN_KEY))
            .and_then(|b| String::from_utf8(b.0).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty() && http::HeaderValue::from_str(t).is_ok())
            .ok_or_else(|| self.unusable())?;
        Ok(Some(token))
    }

    /// Reads the Secret into `token` (creating it when missing), retrying every
    /// [`RETRY`] until it succeeds, then re-reads it every [`REFRESH`]. The controller
    /// starts without it: an API server down at start delays replication, nothing else.
    pub async fn follow(self, token: ReplicaToken, stop: CancellationToken) {
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let read = tokio::time::timeout(crate::reconcile::API_TIMEOUT, self.read_or_create())
                .await
                .unwrap_or(Err(TokenError::Timeout));
            match read {
                Ok(t) => {
                    let first = !token.is_ready();
                    if token.set(t) && !first {
                        tracing::info!(secret = %self.name, "the replicas' token changed");
                    }
                    wait = REFRESH;
                }
                Err(e) if token.is_ready() => {
                    tracing::warn!(err = %e, "re-reading the replicas' token failed; keeping the old one");
                    wait = REFRESH;
                }
                Err(e) => {
                    tracing::warn!(err = %e, "reading the replicas' token failed; history is not replicated until it succeeds");
                    wait = RETRY;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bearer_token_itself_is_accepted() {
        let t = ReplicaToken::from_value("abc123");
        let h = |s: &'static str| http::HeaderValue::from_static(s);
        assert!(t.accepts(Some(&h("Bearer abc123"))));
        assert!(t.accepts(Some(&h("bearer abc123"))));
        assert!(!t.accepts(Some(&h("Bearer abc124"))));
        assert!(!t.accepts(Some(&h("Basic abc123"))));
        assert!(!t.accepts(Some(&h("Bearer "))));
        assert!(!t.accepts(None));
        assert!(t.accepts(Some(&t.authorization())));
        assert!(t.authorization().is_sensitive());
        let none = ReplicaToken::pending();
        assert!(!none.is_ready());
        assert!(!none.accepts(Some(&h("Bearer "))));
        assert!(!none.accepts(Some(&h("Bearer  "))));
    }
}
