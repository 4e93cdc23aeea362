//! A standby's pull loop: every poll period it reads the Lease, and unless it leads it
//! asks the holder for the log entries after the highest sequence it holds, page by
//! page, and stores them. A leader it cannot reach changes nothing here: the UI keeps
//! serving what this instance holds and reports itself stale (`ReplicationView`), and
//! `nemesis_controller_history_replication_source_up` drops to 0. Alongside, it copies
//! the leader's directive log into its own registry (`GET /internal/directives`), so
//! that it leads on from it; a leader without that route (an older version) only costs
//! the agents a whole set at the next failover.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::token::ReplicaToken;
use super::{DIRECTIVES_PATH, HISTORY_PATH, MAX_PAGE, Page, ReplicationStatus, Role};
use crate::agents::AgentRegistry;
use crate::agents::directives::ReplicaPage;
use crate::agents::registry::ReplicaApplyError;
use crate::leader::HISTORY_URL_ANNOTATION;
use crate::metrics::{ControllerMetrics, ErrorKind};
use crate::store::{LogEntry, Store, StoreError, unix_ms};

/// How long one page request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A page of [`MAX_PAGE`] entries is far below this; more is a wrong peer.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Pages per pull at most, so a far-behind standby still re-reads the Lease now and
/// then (the leader may change while it catches up).
const MAX_PAGES_PER_PULL: usize = 100;
/// Directive pages of one copied run at most (a run is applied whole): 200,000 changes,
/// twenty times a whole set of 10,000. A leader changing faster is copied at a later
/// pull.
const MAX_DIRECTIVE_PAGES: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("reading Lease {namespace}/{name}: {}", crate::permissions::explain(.source))]
    ReadLease {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading the Lease timed out")]
    LeaseTimeout,
    #[error("the replicas' token has not been read from its Secret yet")]
    NoToken,
    #[error("no instance holds the Lease yet")]
    NoLeader,
    #[error(
        "the leader {holder} wrote no history URL on the Lease (is it older, or started without --replica-token-file?)"
    )]
    NoUrl { holder: String },
    #[error("pulling history from the leader at {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the leader at {url} answered {status}: {body}")]
    Refused {
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("the leader at {url} sent more than {MAX_BODY} bytes for one page")]
    TooLarge { url: String },
    #[error("the leader at {url} sent a page that is not valid: {source}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("storing pulled history: {0}")]
    Store(#[from] StoreError),
    #[error("copying the leader's directives: {0}")]
    Directives(#[from] ReplicaApplyError),
    #[error("the leader's directives changed through {MAX_DIRECTIVE_PAGES} pages of one pull")]
    DirectivesRunTooLong,
    #[error("the store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Where to pull from, as the Lease says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// This instance holds the Lease (it is about to lead): nothing to pull.
    Me,
    Leader {
        holder: String,
        url: String,
    },
}

/// Decides the source from the Lease as read (pure).
pub fn source_of(lease: Option<&Lease>, me: &str) -> Result<Source, FollowError> {
    let lease = lease.ok_or(FollowError::NoLeader)?;
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty())
        .ok_or(FollowError::NoLeader)?;
    if holder == me {
        return Ok(Source::Me);
    }
    let url = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(HISTORY_URL_ANNOTATION))
        .filter(|u| !u.is_empty())
        .cloned()
        .ok_or_else(|| FollowError::NoUrl {
            holder: holder.clone(),
        })?;
    Ok(Source::Leader { holder, url })
}

pub struct Follower {
    leases: Api<Lease>,
    namespace: String,
    lease_name: String,
    identity: String,
    store: Arc<Store>,
    registry: Arc<AgentRegistry>,
    token: ReplicaToken,
    http: reqwest::Client,
    metrics: ControllerMetrics,
    status: ReplicationStatus,
    leading: watch::Receiver<bool>,
    poll: Duration,
    /// The last directive pull failed (warned once per outage).
    directives_failing: AtomicBool,
}

/// What the follower needs to find and reach the leader.
pub struct FollowerConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub token: ReplicaToken,
    /// How often it pulls (and re-reads the Lease).
    pub poll: Duration,
}

impl Follower {
    pub fn new(
        client: Client,
        cfg: FollowerConfig,
        store: Arc<Store>,
        registry: Arc<AgentRegistry>,
        metrics: ControllerMetrics,
        status: ReplicationStatus,
        leading: watch::Receiver<bool>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            leases: Api::namespaced(client, &cfg.namespace),
            namespace: cfg.namespace,
            lease_name: cfg.lease_name,
            identity: cfg.identity,
            store,
            registry,
            token: cfg.token,
            http,
            metrics,
            status,
            leading,
            poll: cfg.poll,
            directives_failing: AtomicBool::new(false),
        }
    }

    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if *self.leading.borrow() {
                self.metrics.set_replication(0, true);
                self.status.update(|v| {
                    v.role = Role::Leader;
                    v.error = None;
                    v.behind = Some(0);
                });
                failing = false;
                continue;
            }
            match self.pull().await {
                Ok(()) => {
                    if failing {
                        tracing::info!("pulling the leader's history works again");
                    }
                    failing = false;
                }
                // Just started: the token is being read (its reader logs failures).
                Err(e @ FollowError::NoToken) => {
                    let message = e.to_string();
                    self.status.update(|v| {
                        v.role = Role::Standby;
                        v.error = Some(message);
                    });
                }
                Err(e) => {
                    self.metrics.error(ErrorKind::Replication);
                    let behind = self.status.view().behind.unwrap_or(0);
                    self.metrics.set_replication(behind, false);
                    // Once per outage at warn: the loop retries every poll period.
                    if failing {
                        tracing::debug!(err = %e, "pulling the leader's history failed");
                    } else {
                        tracing::warn!(err = %e, "pulling the leader's history failed; serving what this instance holds");
                    }
                    failing = true;
                    let message = e.to_string();
                    self.status.update(|v| {
                        v.role = Role::Standby;
                        v.error = Some(message);
                    });
                }
            }
        }
    }

    async fn pull(&self) -> Result<(), FollowError> {
        if !self.token.is_ready() {
            return Err(FollowError::NoToken);
        }
        let lease = tokio::time::timeout(
            crate::reconcile::API_TIMEOUT,
            self.leases.get_opt(&self.lease_name),
        )
        .await
        .map_err(|_| FollowError::LeaseTimeout)?
        .map_err(|source| FollowError::ReadLease {
            namespace: self.namespace.clone(),
            name: self.lease_name.clone(),
            source,
        })?;
        let (holder, base) = match source_of(lease.as_ref(), &self.identity)? {
            Source::Me => return Ok(()),
            Source::Leader { holder, url } => (holder, url),
        };
        self.status.update(|v| {
            v.role = Role::Standby;
            v.leader = Some(holder.clone());
        });
        // The directives first: they are small when nothing changed, and a history
        // that fails to store must not keep the agents' cursors from carrying over.
        match self.pull_directives(&base).await {
            Ok(_) | Err(FollowError::Directives(ReplicaApplyError::Leading)) => {
                if self.directives_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("copying the leader's directives works again");
                }
            }
            // A leader of an older version (a rolling upgrade): not an error.
            Err(FollowError::Refused { status, .. })
                if status == reqwest::StatusCode::NOT_FOUND =>
            {
                if !self.directives_failing.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "the leader does not serve its directives (an older version); should this instance lead, agents get every directive again"
                    );
                }
            }
            Err(e) => {
                self.metrics.error(ErrorKind::Replication);
                if self.directives_failing.swap(true, Ordering::Relaxed) {
                    tracing::debug!(err = %e, "copying the leader's directives failed");
                } else {
                    tracing::warn!(err = %e, "copying the leader's directives failed; should this instance lead, agents get every directive again");
                }
            }
        }
        let url = format!("{}{HISTORY_PATH}", base.trim_end_matches('/'));
        for _ in 0..MAX_PAGES_PER_PULL {
            let store = self.store.clone();
            let head = tokio::task::spawn_blocking(move || store.log_head()).await??;
            let page = self.fetch(&url, head).await?;
            let entries: Vec<(u64, LogEntry)> =
                page.entries.into_iter().map(|e| (e.seq, e.entry)).collect();
            let got = entries.len();
            let store = self.store.clone();
            let new =
                tokio::task::spawn_blocking(move || store.apply_replicated(&entries)).await??;
            let head = match got {
                0 => head,
                _ => {
                    let store = self.store.clone();
                    tokio::task::spawn_blocking(move || store.log_head()).await??
                }
            };
            self.metrics.replicated(new as u64);
            self.metrics.set_replication(page.remaining, true);
            let now = unix_ms(SystemTime::now());
            self.status.update(|v| {
                v.head = head;
                v.behind = Some(page.remaining);
                v.last_pull_ms = Some(now);
                v.error = None;
            });
            if page.remaining == 0 || got == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Copies the leader's directive log into the registry: pages from this copy's
    /// cursor until one ends the run, applied at once. Returns the changes taken.
    async fn pull_directives(&self, base: &str) -> Result<usize, FollowError> {
        let url = format!("{}{DIRECTIVES_PATH}", base.trim_end_matches('/'));
        let from = self.registry.directives_cursor();
        let mut at = from;
        let mut pages: Vec<ReplicaPage> = Vec::new();
        loop {
            let query = [
                ("stream", at.stream),
                ("version", at.version),
                ("limit", nemesis_common::wire::MAX_PAGE_DIRECTIVES as u64),
            ];
            let page: ReplicaPage = self.fetch_json(&url, &query).await?;
            at = page.cursor();
            let more = page.more;
            pages.push(page);
            if !more {
                break;
            }
            if pages.len() >= MAX_DIRECTIVE_PAGES {
                return Err(FollowError::DirectivesRunTooLong);
            }
        }
        Ok(self.registry.apply_replica(from, &pages)?)
    }

    async fn fetch(&self, url: &str, after: u64) -> Result<Page, FollowError> {
        self.fetch_json(url, &[("after", after), ("limit", MAX_PAGE as u64)])
            .await
    }

    async fn fetch_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        query: &[(&str, u64)],
    ) -> Result<T, FollowError> {
        let request_error = |source| FollowError::Request {
            url: url.to_string(),
            source,
        };
        let mut resp = self
            .http
            .get(url)
            .query(query)
            .header(http::header::AUTHORIZATION, self.token.authorization())
            .send()
            .await
            .map_err(request_error)?;
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(request_error)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(FollowError::TooLarge {
                    url: url.to_string(),
                });
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(FollowError::Refused {
                url: url.to_string(),
                status,
                body: text.chars().take(200).collect(),
            });
        }
        serde_json::from_slice(&body).map_err(|source| FollowError::Decode {
            url: url.to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn lease(holder: Option<&str>, url: Option<&str>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                annotations: url.map(|u| {
                    [(HISTORY_URL_ANNOTATION.to_string(), u.to_string())]
                        .into_iter()
                        .collect()
                }),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn the_source_is_the_holder_at_the_url_it_wrote() {
        assert_eq!(
            source_of(Some(&lease(Some("a"), Some("http://x:1"))), "b").unwrap(),
            Source::Leader {
                holder: "a".into(),
                url: "http://x:1".into()
            }
        );
        assert_eq!(
            source_of(Some(&lease(Some("b"), Some("http://x:1"))), "b").unwrap(),
            Source::Me
        );
        assert!(matches!(
            source_of(Some(&lease(None, Some("http://x:1"))), "b"),
            Err(FollowError::NoLeader)
        ));
        assert!(matches!(source_of(None, "b"), Err(FollowError::NoLeader)));
        assert!(matches!(
            source_of(Some(&lease(Some("a"), None)), "b"),
            Err(FollowError::NoUrl { holder }) if holder == "a"
        ));
    }
}
