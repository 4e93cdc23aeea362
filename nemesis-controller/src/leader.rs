//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it: acquire
//! or renew with resourceVersion-guarded updates (a lost race is a 409, never two
//! holders), judge another holder's expiry by when this instance last saw the record
//! change (immune to clock skew), and publish leadership on a watch channel. A leader
//! that cannot renew within the renew deadline publishes `false` at once, before its
//! lease can expire for anyone else. It never scales anything itself.
//!
//! A holder renews with one round trip: a PUT of the Lease as its own last write
//! returned it (that write's resourceVersion guards it), and only when that PUT meets a
//! `409` does it read the Lease and go the long way (client-go's elector has the same
//! fast path since Kubernetes 1.29). At 10,000 policies the API server answers slowly
//! while it takes the adoption burst, and a GET then a PUT took twice one answer's time.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{ControllerMetrics, ErrorKind};

/// The label the leader puts on its own Pod (see `--pod-name`).
pub const LEADER_LABEL: &str = "nemesis.dev/leader";
/// The annotation the holder puts on the Lease: where the standbys pull its history
/// from (see `crate::replication`).
pub const HISTORY_URL_ANNOTATION: &str = "nemesis.dev/history-url";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    /// Unique per instance.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    /// This instance's history URL for the standbys, written on the Lease while it holds
    /// it ([`HISTORY_URL_ANNOTATION`]).
    pub history_url: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("reading Lease {namespace}/{name}: {}", crate::permissions::explain(.source))]
    GetLease {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("creating Lease {namespace}/{name}: {}", crate::permissions::explain(.source))]
    CreateLease {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("updating Lease {namespace}/{name}: {}", crate::permissions::explain(.source))]
    UpdateLease {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("labelling the leader Pod {namespace}/{name}: {}", crate::permissions::explain(.source))]
    LabelPod {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What one acquire-or-renew attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This instance holds the Lease (acquired or renewed just now).
    Leading,
    /// Someone else holds a Lease that has not expired, or won a race for it.
    Following { holder: Option<String> },
    /// The renewal was refused with a `409` yet the Lease, read again, still names this
    /// instance: nobody took it (the API server's answer was spurious, or our own write
    /// raced an earlier one of ours). Still the leader, not renewed: retry before the
    /// renew deadline.
    StillOurs,
}

/// The Lease record as this instance last saw it, and when it saw it change.
#[derive(Debug, Clone)]
struct Observed {
    resource_version: Option<String>,
    seen_at: Instant,
}

/// One instance's handle on the Lease.
pub struct LeaseLock {
    api: Api<Lease>,
    cfg: LeaderConfig,
    observed: Option<Observed>,
    /// The Lease's `leaseTransitions` when this instance last acquired or renewed it:
    /// the leadership epoch its history records are numbered in.
    epoch: u64,
    /// The Lease as this instance's last successful write (create or update) returned
    /// it, while it names this instance: the next renewal PUTs it at once.
    written: Option<Lease>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

// === impl LeaseLock ===

impl LeaseLock {
    pub fn new(client: Client, cfg: LeaderConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: None,
            epoch: 0,
            written: None,
        }
    }

    /// The Lease's `leaseTransitions` at the last successful acquire or renew.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Puts this instance's history URL on the Lease (or takes a stale one off).
    fn annotate(&self, meta: &mut ObjectMeta) {
        let annotations = meta.annotations.get_or_insert_with(Default::default);
        match &self.cfg.history_url {
            Some(url) => {
                annotations.insert(HISTORY_URL_ANNOTATION.to_string(), url.clone());
            }
            None => {
                annotations.remove(HISTORY_URL_ANNOTATION);
            }
        }
    }

    pub fn config(&self) -> &LeaderConfig {
        &self.cfg
    }

    fn get_error(&self, source: kube::Error) -> LeaderError {
        LeaderError::GetLease {
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.lease_name.clone(),
            source,
        }
    }

    fn update_error(&self, source: kube::Error) -> LeaderError {
        LeaderError::UpdateLease {
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.lease_name.clone(),
            source,
        }
    }

    fn observe(&mut self, resource_version: Option<String>) -> Instant {
        match &self.observed {
            Some(o) if o.resource_version == resource_version => o.seen_at,
            _ => {
                let now = Instant::now();
                self.observed = Some(Observed {
                    resource_version,
                    seen_at: now,
                });
                now
            }
        }
    }

    /// Takes the Lease if it is free, expired or ours, and renews it if ours. Every write
    /// carries the resourceVersion read (or, renewing, the one of this instance's own
    /// last write), so of two racing instances exactly one wins.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, LeaderError> {
        if let Some(attempt) = self.renew_from_own_write().await? {
            return Ok(attempt);
        }
        self.read_then_write().await
    }

    /// The fast path: PUT this instance's last written Lease with a new renew time.
    /// `None`: nothing to renew from, or the Lease changed since (a `409`); the caller
    /// reads it and decides. Any other error fails the attempt, as a failed GET would.
    async fn renew_from_own_write(&mut self) -> Result<Option<Attempt>, LeaderError> {
        let Some(mut lease) = self.written.take() else {
            return Ok(None);
        };
        let spec = lease.spec.take().unwrap_or_default();
        lease.spec = Some(LeaseSpec {
            lease_duration_seconds: Some(seconds(self.cfg.lease_duration)),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..spec
        });
        self.annotate(&mut lease.metadata);
        match self
            .api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.wrote(updated);
                Ok(Some(Attempt::Leading))
            }
            Err(e) if is_conflict(&e) => {
                tracing::debug!("the Lease changed since this instance wrote it; reading it");
                Ok(None)
            }
            Err(e) => Err(self.update_error(e)),
        }
    }

    /// Records a successful update: the record seen, the epoch, and the Lease to renew
    /// from next time (only while it names this instance).
    fn wrote(&mut self, updated: Lease) {
        self.observe(updated.metadata.resource_version.clone());
        let spec = updated.spec.as_ref();
        self.epoch = spec
            .and_then(|s| s.lease_transitions)
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(0);
        let ours =
            spec.and_then(|s| s.holder_identity.as_deref()) == Some(self.cfg.identity.as_str());
        self.written = ours.then_some(updated);
    }

    /// The long way, as client-go's elector goes it: read the Lease, then write it.
    async fn read_then_write(&mut self) -> Result<Attempt, LeaderError> {
        let now = MicroTime(Timestamp::now());
        let existing = self
            .api
            .get_opt(&self.cfg.lease_name)
            .await
            .map_err(|e| self.get_error(e))?;
        let Some(mut lease) = existing else {
            let mut metadata = ObjectMeta {
                name: Some(self.cfg.lease_name.clone()),
                namespace: Some(self.cfg.namespace.clone()),
                ..ObjectMeta::default()
            };
            self.annotate(&mut metadata);
            let lease = Lease {
                metadata,
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(seconds(self.cfg.lease_duration)),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(created.metadata.resource_version.clone());
                    self.epoch = 0;
                    self.written = Some(created);
                    Ok(Attempt::Leading)
                }
                // Another instance created it first.
                Err(e) if is_conflict(&e) => Ok(Attempt::Following { holder: None }),
                Err(source) => Err(LeaderError::CreateLease {
                    namespace: self.cfg.namespace.clone(),
                    name: self.cfg.lease_name.clone(),
                    source,
                }),
            };
        };

        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let seen_at = self.observe(lease.metadata.resource_version.clone());
        let ours = holder.as_deref() == Some(self.cfg.identity.as_str());
        if !ours && let Some(holder) = holder.clone() {
            let duration = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(0).max(1)).unwrap_or(1),
            );
            if Instant::now() < seen_at + duration {
                return Ok(Attempt::Following {
                    holder: Some(holder),
                });
            }
            tracing::info!(previous = %holder, "the Lease expired; taking it over");
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(seconds(self.cfg.lease_duration)),
            acquire_time: if ours {
                spec.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            // Every change of holder counts, a hand-over after a release (no holder)
            // too, as client-go's elector counts it.
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!ours)),
            ..spec
        });
        self.annotate(&mut lease.metadata);
        match self
            .api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.wrote(updated);
                Ok(Attempt::Leading)
            }
            Err(e) if is_conflict(&e) && ours => self.after_conflict().await,
            Err(e) if is_conflict(&e) => Ok(Attempt::Following { holder }),
            Err(e) => Err(self.update_error(e)),
        }
    }

    /// A renewal got `409`: whoever holds the Lease now decides. Stepping down while it
    /// still names us would stop every policy for nothing (and restart them from what
    /// the API server last recorded).
    async fn after_conflict(&mut self) -> Result<Attempt, LeaderError> {
        let lease = self
            .api
            .get_opt(&self.cfg.lease_name)
            .await
            .map_err(|e| self.get_error(e))?;
        let holder = lease
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty());
        if holder.as_deref() == Some(self.cfg.identity.as_str()) {
            tracing::info!("renewing the Lease met a conflict, but it is still ours");
            return Ok(Attempt::StillOurs);
        }
        if let Some(l) = lease {
            self.observe(l.metadata.resource_version);
        }
        Ok(Attempt::Following { holder })
    }

    /// Gives the Lease up (holder cleared, one-second duration) so a standby takes over
    /// at its next attempt instead of after the lease duration. `false`: not ours.
    pub async fn release(&mut self) -> Result<bool, LeaderError> {
        self.written = None;
        let Some(mut lease) = self
            .api
            .get_opt(&self.cfg.lease_name)
            .await
            .map_err(|e| self.get_error(e))?
        else {
            return Ok(false);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(false);
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..spec
        });
        match self
            .api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(self.update_error(e)),
        }
    }
}

/// Runs the election until `shutdown`: publishes `true` on `leading` when this instance
/// acquires the Lease and `false` the moment it loses it (another holder, or no renewal
/// within the renew deadline). On shutdown it stops leading first, then releases.
/// `epoch` gets the Lease's `leaseTransitions` before each `true`.
pub async fn run(
    mut lock: LeaseLock,
    leading: watch::Sender<bool>,
    epoch: watch::Sender<u64>,
    metrics: ControllerMetrics,
    shutdown: CancellationToken,
) {
    let cfg = lock.config().clone();
    let attempt_timeout = cfg.retry_period;
    loop {
        // --- following: try to acquire every retry period (with jitter, as client-go) ---
        let mut renewed_at;
        loop {
            let sent = Instant::now();
            match tokio::time::timeout(attempt_timeout, lock.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Leading)) => {
                    renewed_at = sent;
                    break;
                }
                Ok(Ok(Attempt::Following { holder })) => {
                    tracing::debug!(?holder, "following");
                }
                // Only a renewal says so; a follower keeps trying.
                Ok(Ok(Attempt::StillOurs)) => {}
                Ok(Err(e)) => {
                    metrics.error(ErrorKind::LeaderElection);
                    tracing::warn!(err = %e, "leader election attempt failed");
                }
                Err(_) => {
                    metrics.error(ErrorKind::LeaderElection);
                    tracing::warn!(after = ?attempt_timeout, "leader election attempt timed out");
                }
            }
            let jitter = cfg.retry_period.mul_f64(rand::random::<f64>() * 0.2);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(cfg.retry_period + jitter) => {}
            }
        }
        tracing::info!(identity = %cfg.identity, lease = %cfg.lease_name, epoch = lock.epoch(), "became the leader");
        epoch.send_replace(lock.epoch());
        metrics.set_leader(true);
        leading.send_replace(true);

        // --- leading: renew every retry period; stop at the renew deadline ---
        let mut failed = false;
        loop {
            let deadline = renewed_at + cfg.renew_deadline;
            // A failed renewal is retried sooner: the deadline leaves room for several.
            let pause = if failed {
                cfg.retry_period / 4
            } else {
                cfg.retry_period
            };
            let next = (Instant::now() + pause).min(deadline);
            tokio::select! {
                _ = shutdown.cancelled() => {
                    leading.send_replace(false);
                    metrics.set_leader(false);
                    match tokio::time::timeout(attempt_timeout, lock.release()).await {
                        Ok(Ok(true)) => tracing::info!("released the Lease"),
                        Ok(Ok(false)) => {}
                        Ok(Err(e)) => tracing::warn!(err = %e, "releasing the Lease failed"),
                        Err(_) => tracing::warn!("releasing the Lease timed out"),
                    }
                    return;
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            if Instant::now() >= deadline {
                metrics.error(ErrorKind::LeaderElection);
                tracing::error!(deadline = ?cfg.renew_deadline, "could not renew the Lease in time; stepping down");
                break;
            }
            let sent = Instant::now();
            // One answer held back (a slow API server, a lost response) must not use up
            // the whole renew deadline: the attempt gives up after a retry period and
            // the next one goes out, as long as the deadline allows.
            let give_up = (sent + attempt_timeout).min(deadline);
            failed = true;
            let answer = tokio::time::timeout_at(give_up, lock.try_acquire_or_renew()).await;
            // Where the renew deadline goes: a renewal answered after half a retry period
            // says so (the deadline allows a few of those, not many).
            let took = sent.elapsed();
            if took > cfg.retry_period / 2 {
                tracing::warn!(?took, left = ?deadline.saturating_duration_since(Instant::now()), "renewing the Lease was slow");
            }
            match answer {
                Ok(Ok(Attempt::Leading)) => {
                    renewed_at = sent;
                    failed = false;
                }
                Ok(Ok(Attempt::StillOurs)) => {
                    metrics.error(ErrorKind::LeaderElection);
                }
                Ok(Ok(Attempt::Following { holder })) => {
                    tracing::error!(?holder, "lost the Lease; stepping down");
                    break;
                }
                Ok(Err(e)) => {
                    metrics.error(ErrorKind::LeaderElection);
                    tracing::warn!(err = %e, "renewing the Lease failed; retrying until the renew deadline");
                }
                Err(_) => {
                    metrics.error(ErrorKind::LeaderElection);
                    tracing::warn!(after = ?(give_up - sent), "renewing the Lease timed out; retrying until the renew deadline");
                }
            }
        }
        leading.send_replace(false);
        metrics.set_leader(false);
        metrics.leadership_lost();
    }
}

/// Puts (or removes) [`LEADER_LABEL`] on the controller's own Pod, so a Service that
/// selects it sends agents and Alertmanager to the acting instance only.
pub async fn label_pod(
    client: Client,
    namespace: &str,
    pod: &str,
    leading: bool,
) -> Result<(), LeaderError> {
    let api: Api<Pod> = Api::namespaced(client, namespace);
    let value = if leading {
        serde_json::Value::from("true")
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
    api.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|source| LeaderError::LabelPod {
            namespace: namespace.to_string(),
            name: pod.to_string(),
            source,
        })
}
