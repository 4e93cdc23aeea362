//! The accounts document held in memory and kept in a Kubernetes Secret that every
//! controller instance watches, so users, tokens and sessions survive a restart and a
//! change of leader (any instance serves the UI, so any instance may write). Writes are
//! optimistic: the Secret is replaced at the resourceVersion read, and on a conflict the
//! update is replayed on the fresh document. It never logs a secret: the document holds
//! only digests and password hashes, and its `Debug` shows counts.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_api};
use kube::{Api, Client};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::accounts::Accounts;
use super::error::HttpError;
use crate::store::unix_ms;

/// The key of the Secret's data that holds the document (JSON).
pub const STATE_KEY: &str = "accounts.json";
/// The Secret's name unless `--ui-state-secret` names another.
pub const DEFAULT_SECRET: &str = "nemesis-ui-accounts";
/// Conflicting writers (several instances logging people in at once) settle in a few
/// rounds; past this the request fails rather than spin.
const MAX_WRITE_ATTEMPTS: usize = 8;

/// Wall-clock milliseconds that follow tokio's clock, so tests with paused time move
/// session expiry too.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_ms: u64,
    at: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            wall_ms: unix_ms(SystemTime::now()),
            at: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.wall_ms
            + Instant::now()
                .saturating_duration_since(self.at)
                .as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the document is kept.
#[derive(Clone)]
pub enum Backing {
    /// In this process only (tests, and a UI without a cluster).
    Memory,
    /// In `data["accounts.json"]` of this Secret.
    Secret { api: Box<Api<Secret>>, name: String },
}

impl Backing {
    pub fn secret(client: Client, namespace: &str, name: &str) -> Self {
        Backing::Secret {
            api: Box::new(Api::namespaced(client, namespace)),
            name: name.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("reading the UI accounts Secret {name}: {source}")]
    Read {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("the UI accounts Secret {name} holds no valid {STATE_KEY}: {source}")]
    Parse {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing the UI accounts Secret {name}: {source}")]
    Write {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("the UI accounts Secret {name} kept changing under {MAX_WRITE_ATTEMPTS} attempts")]
    Contended { name: String },
}

struct Snapshot {
    accounts: Accounts,
    /// The Secret's resourceVersion the document was read at (`None`: not created yet).
    version: Option<String>,
}

pub struct Directory {
    backing: Backing,
    /// The name of the built-in admin (from the password file; never in the document).
    builtin: String,
    snapshot: RwLock<Snapshot>,
    writer: tokio::sync::Mutex<()>,
    /// When each session (by digest) was last used on this instance: idle expiry is
    /// per instance, as writing the Secret on every request would cost too much.
    last_seen: Mutex<HashMap<String, u64>>,
    pub clock: Clock,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("builtin", &self.builtin)
            .finish_non_exhaustive()
    }
}

fn decode(name: &str, secret: &Secret) -> Result<Accounts, DirectoryError> {
    match secret.data.as_ref().and_then(|d| d.get(STATE_KEY)) {
        None => Ok(Accounts::default()),
        Some(bytes) => serde_json::from_slice(&bytes.0).map_err(|source| DirectoryError::Parse {
            name: name.to_string(),
            source,
        }),
    }
}

impl Directory {
    /// A directory over `backing`, loaded once (a missing Secret is an empty document;
    /// it is created on the first write).
    pub async fn open(backing: Backing, builtin: &str) -> Result<Self, DirectoryError> {
        let snapshot = match &backing {
            Backing::Memory => Snapshot {
                accounts: Accounts::default(),
                version: None,
            },
            Backing::Secret { api, name } => match api.get_opt(name).await {
                Ok(Some(s)) => Snapshot {
                    accounts: decode(name, &s)?,
                    version: s.metadata.resource_version.clone(),
                },
                Ok(None) => Snapshot {
                    accounts: Accounts::default(),
                    version: None,
                },
                Err(source) => {
                    return Err(DirectoryError::Read {
                        name: name.clone(),
                        source,
                    });
                }
            },
        };
        Ok(Self {
            backing,
            builtin: builtin.to_string(),
            snapshot: RwLock::new(snapshot),
            writer: tokio::sync::Mutex::new(()),
            last_seen: Mutex::new(HashMap::new()),
            clock: Clock::new(),
        })
    }

    /// An in-memory directory (tests).
    pub fn in_memory(builtin: &str) -> Self {
        Self {
            backing: Backing::Memory,
            builtin: builtin.to_string(),
            snapshot: RwLock::new(Snapshot {
                accounts: Accounts::default(),
                version: None,
            }),
            writer: tokio::sync::Mutex::new(()),
            last_seen: Mutex::new(HashMap::new()),
            clock: Clock::new(),
        }
    }

    pub fn builtin(&self) -> &str {
        &self.builtin
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Reads the current document.
    pub fn read<T>(&self, f: impl FnOnce(&Accounts) -> T) -> T {
        let s = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
        f(&s.accounts)
    }

    /// Marks a session (by digest) used at `now_ms` and says whether it was idle longer
    /// than `idle` before (a session this instance has not seen yet counts as fresh: it
    /// was just made elsewhere, or this instance just started).
    pub fn touch(&self, key: &str, idle: Duration, now_ms: u64) -> bool {
        let mut seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 4 * super::accounts::MAX_SESSIONS {
            seen.clear();
        }
        let last = seen.insert(key.to_string(), now_ms);
        matches!(last, Some(l) if now_ms.saturating_sub(l) >= idle.as_millis() as u64)
    }

    /// Applies `change` to the document and stores it; on a write conflict the fresh
    /// document is read and `change` runs again (so it must not draw random values).
    /// Expired entries are pruned on the way.
    pub async fn update<T>(
        &self,
        mut change: impl FnMut(&mut Accounts) -> Result<T, HttpError>,
    ) -> Result<T, HttpError> {
        let _one_writer = self.writer.lock().await;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let (mut accounts, version) = {
                let s = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
                (s.accounts.clone(), s.version.clone())
            };
            accounts.prune(&self.builtin, self.now_ms());
            let out = change(&mut accounts)?;
            match self.store(&accounts, version).await {
                Ok(version) => {
                    let mut s = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
                    *s = Snapshot { accounts, version };
                    return Ok(out);
                }
                Err(Stored::Conflict) => {
                    if let Err(e) = self.reload().await {
                        return Err(HttpError::internal("reading the accounts Secret", &e));
                    }
                }
                Err(Stored::Failed(e)) => {
                    return Err(HttpError::internal("writing the accounts Secret", &e));
                }
            }
        }
        let name = match &self.backing {
            Backing::Secret { name, .. } => name.clone(),
            Backing::Memory => String::new(),
        };
        Err(HttpError::internal(
            "writing the accounts Secret",
            &DirectoryError::Contended { name },
        ))
    }

    async fn store(
        &self,
        accounts: &Accounts,
        version: Option<String>,
    ) -> Result<Option<String>, Stored> {
        let (api, name) = match &self.backing {
            Backing::Memory => return Ok(None),
            Backing::Secret { api, name } => (api, name),
        };
        let json = serde_json::to_vec(accounts).expect("the document always serializes");
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                resource_version: version.clone(),
                labels: Some(
                    [(
                        "app.kubernetes.io/part-of".to_string(),
                        "nemesis".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some([(STATE_KEY.to_string(), ByteString(json))].into()),
            ..Default::default()
        };
        let written = match version {
            None => api.create(&PostParams::default(), &secret).await,
            Some(_) => api.replace(name, &PostParams::default(), &secret).await,
        };
        match written {
            Ok(s) => Ok(s.metadata.resource_version),
            // 409: someone wrote since we read (or created it first).
            Err(kube::Error::Api(s)) if s.code == 409 => Err(Stored::Conflict),
            Err(source) => Err(Stored::Failed(DirectoryError::Write {
                name: name.clone(),
                source,
            })),
        }
    }

    async fn reload(&self) -> Result<(), DirectoryError> {
        let Backing::Secret { api, name } = &self.backing else {
            return Ok(());
        };
        let fresh = api
            .get_opt(name)
            .await
            .map_err(|source| DirectoryError::Read {
                name: name.clone(),
                source,
            })?;
        self.install(fresh.as_ref())
    }

    /// Whether `version` is older than the one held. resourceVersions are opaque to
    /// clients, but every API server in use writes increasing integers; anything else is
    /// taken as newer (the optimistic write still catches a stale document).
    fn is_older(&self, version: Option<&str>) -> bool {
        let s = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
        let held = s.version.as_deref().and_then(|v| v.parse::<u64>().ok());
        let seen = version.and_then(|v| v.parse::<u64>().ok());
        matches!((seen, held), (Some(a), Some(b)) if a < b)
    }

    /// Takes the Secret as the API server holds it (from a read or the watch).
    fn install(&self, secret: Option<&Secret>) -> Result<(), DirectoryError> {
        let name = match &self.backing {
            Backing::Secret { name, .. } => name.as_str(),
            Backing::Memory => return Ok(()),
        };
        let snapshot = match secret {
            None => Snapshot {
                accounts: Accounts::default(),
                version: None,
            },
            Some(s) => Snapshot {
                accounts: decode(name, s)?,
                version: s.metadata.resource_version.clone(),
            },
        };
        let mut cur = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        *cur = snapshot;
        Ok(())
    }

    /// Follows the Secret (what other instances write) until `stop`. A broken watch is
    /// retried with kube-rs's backoff; a Secret edited into nonsense is logged and
    /// ignored (the last good document stays).
    pub async fn follow(self: std::sync::Arc<Self>, stop: CancellationToken) {
        let Backing::Secret { api, name } = self.backing.clone() else {
            return;
        };
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let stream = watch_api(*api, config).default_backoff();
        futures::pin_mut!(stream);
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => return,
                ev = stream.next() => ev,
            };
            let result = match ev {
                Some(Ok(Event::Apply(s) | Event::InitApply(s))) => {
                    // Our own writes come back too, possibly after a newer one of ours:
                    // an older version must not replace what a login just wrote.
                    let _w = self.writer.lock().await;
                    if self.is_older(s.metadata.resource_version.as_deref()) {
                        Ok(())
                    } else {
                        self.install(Some(&s))
                    }
                }
                Some(Ok(Event::Delete(_))) => {
                    let _w = self.writer.lock().await;
                    self.install(None)
                }
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) => {
                    tracing::warn!(err = %e, secret = %name, "UI: watching the accounts Secret failed; retrying");
                    Ok(())
                }
                None => return,
            };
            if let Err(e) = result {
                tracing::warn!(err = %e, "UI: ignoring an unreadable accounts Secret");
            }
        }
    }
}

enum Stored {
    Conflict,
    Failed(DirectoryError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ui::accounts::SessionRecord;

    #[tokio::test(start_paused = true)]
    async fn the_clock_follows_tokio_time_and_idle_is_per_session() {
        let d = Directory::in_memory("admin");
        let t0 = d.now_ms();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(d.now_ms() - t0, 5_000);
        assert!(!d.touch("s", Duration::from_secs(3), t0));
        assert!(!d.touch("s", Duration::from_secs(3), t0 + 2_000));
        assert!(d.touch("s", Duration::from_secs(3), t0 + 5_000));
    }

    #[tokio::test]
    async fn updates_apply_in_memory() {
        let d = Directory::in_memory("admin");
        let now = d.now_ms();
        d.update(|a| {
            a.add_session(
                "x",
                SessionRecord {
                    user: "admin".into(),
                    csrf: "c".into(),
                    created_ms: now,
                    expires_ms: now + 1_000,
                },
            );
            Ok(())
        })
        .await
        .unwrap();
        assert!(d.read(|a| a.session("x", now).is_some()));
    }
}
