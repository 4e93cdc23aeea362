//! Where the agents' listener gets its certificate: a Secret beside the Lease, so every
//! replica (standbys, restarts) presents one signed by the same CA. Issued mode: the
//! first replica to find the Secret missing, unusable or due for rotation issues a
//! certificate (and, the first time, the CA) and writes it with the Secret's
//! `resourceVersion`, so of two replicas rotating at once one wins and the other loads
//! the winner's; the CA goes to a ConfigMap the agents mount (never its key). Provided
//! mode: the operator's `kubernetes.io/tls` Secret (cert-manager or by hand) is only
//! read, and re-read so a renewal is presented without a restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::tls::{self, Ca, CertSlot, Serving};

pub const DEFAULT_SECRET: &str = "nemesis-agent-tls";
pub const DEFAULT_CA_CONFIGMAP: &str = "nemesis-agent-ca";
pub const CERT_KEY: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";
pub const CA_CERT_KEY: &str = "ca.crt";
/// Only in an issued Secret: what signs the next certificate.
pub const CA_KEY_KEY: &str = "ca.key";
/// When the serving certificate and the CA expire (Unix seconds), so a replica decides
/// on rotation without parsing X.509.
pub const NOT_AFTER_ANNOTATION: &str = "nemesis.dev/not-after";
pub const CA_NOT_AFTER_ANNOTATION: &str = "nemesis.dev/ca-not-after";
/// How soon a failed read or write is tried again.
const RETRY: Duration = Duration::from_secs(2);

/// Where the certificate comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// The controller issues and rotates it.
    Issued {
        names: Vec<String>,
        validity: Duration,
        ca_configmap: String,
    },
    /// The operator's; never written.
    Provided,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{verb} {kind} {namespace}/{name}: {}", crate::permissions::explain(.source))]
    Api {
        verb: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "Secret {namespace}/{name} does not exist (with --agent-tls-provided the operator creates it)"
    )]
    Missing { namespace: String, name: String },
    #[error("Secret {namespace}/{name}: {problem}")]
    Unusable {
        namespace: String,
        name: String,
        problem: String,
    },
    #[error(transparent)]
    Issue(#[from] tls::IssueError),
    #[error("reading or writing the agents' TLS Secret timed out")]
    Timeout,
}

/// Keeps a [`CertSlot`] loaded from the Secret.
pub struct TlsSecret {
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    namespace: String,
    name: String,
    source: Source,
}

/// What an issued Secret holds.
struct Contents {
    ca: Ca,
    serving: Serving,
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|s| !s.trim().is_empty())
}

fn unix(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string()
}

fn from_unix(s: &str) -> Option<SystemTime> {
    s.parse::<u64>()
        .ok()
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// An issued Secret's contents, `None` when something is missing (then it is issued
/// anew).
fn contents(secret: &Secret) -> Option<Contents> {
    let data = secret.data.as_ref()?;
    let annotations = secret.metadata.annotations.as_ref()?;
    Some(Contents {
        ca: Ca {
            cert_pem: text(data, CA_CERT_KEY)?,
            key_pem: text(data, CA_KEY_KEY)?,
            not_after: from_unix(annotations.get(CA_NOT_AFTER_ANNOTATION)?)?,
        },
        serving: Serving {
            cert_pem: text(data, CERT_KEY)?,
            key_pem: text(data, KEY_KEY)?,
            not_after: from_unix(annotations.get(NOT_AFTER_ANNOTATION)?)?,
        },
    })
}

impl TlsSecret {
    pub fn new(client: Client, namespace: &str, name: &str, source: Source) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        }
    }

    fn api_error(
        &self,
        verb: &'static str,
        kind: &'static str,
        name: &str,
    ) -> impl FnOnce(kube::Error) -> SyncError {
        let namespace = self.namespace.clone();
        let name = name.to_owned();
        move |source| SyncError::Api {
            verb,
            kind,
            namespace,
            name,
            source: Box::new(source),
        }
    }

    /// Reads the Secret (issuing or rotating first when due, in issued mode) and loads
    /// its certificate into `slot`.
    pub async fn sync(&self, slot: &CertSlot) -> Result<(), SyncError> {
        let (cert, key) = match &self.source {
            Source::Provided => self.read_provided().await?,
            Source::Issued {
                names,
                validity,
                ca_configmap,
            } => {
                let c = self.read_or_issue(names, *validity).await?;
                self.publish_ca(ca_configmap, &c.ca.cert_pem).await?;
                (c.serving.cert_pem, c.serving.key_pem)
            }
        };
        match slot.set(&cert, &key) {
            Ok(true) => {
                tracing::info!(secret = %self.name, "the agents' listener presents a new certificate")
            }
            Ok(false) => {}
            Err(e) => {
                return Err(SyncError::Unusable {
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                    problem: e.to_string(),
                });
            }
        }
        Ok(())
    }

    async fn read_provided(&self) -> Result<(String, String), SyncError> {
        let secret = self
            .secrets
            .get_opt(&self.name)
            .await
            .map_err(self.api_error("reading", "Secret", &self.name))?
            .ok_or_else(|| SyncError::Missing {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
            })?;
        let data = secret.data.unwrap_or_default();
        let get = |key: &str| {
            text(&data, key).ok_or_else(|| SyncError::Unusable {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                problem: format!("no data.{key}"),
            })
        };
        Ok((get(CERT_KEY)?, get(KEY_KEY)?))
    }

    async fn read_or_issue(
        &self,
        names: &[String],
        validity: Duration,
    ) -> Result<Contents, SyncError> {
        // A conflict means another replica wrote first; the next read normally finds
        // its certificate current.
        for _ in 0..3 {
            let existing = self
                .secrets
                .get_opt(&self.name)
                .await
                .map_err(self.api_error("reading", "Secret", &self.name))?;
            let now = SystemTime::now();
            let current = existing.as_ref().and_then(contents);
            if let Some(c) = &current
                && !tls::due(c.serving.not_after, validity, now)
            {
                return Ok(current.expect("checked"));
            }
            // The CA is kept while it outlives the new certificate by a wide margin;
            // otherwise (first start, or ten years on) a new one is issued.
            let ca = match current.map(|c| c.ca) {
                Some(ca) if !tls::due(ca.not_after, tls::CA_VALIDITY, now) => ca,
                _ => tls::issue_ca(now)?,
            };
            let serving = tls::issue_serving(&ca, names, now, validity)?;
            let secret = self.issued_secret(existing.as_ref(), &ca, &serving);
            let written = match &existing {
                Some(_) => {
                    self.secrets
                        .replace(&self.name, &PostParams::default(), &secret)
                        .await
                }
                None => self.secrets.create(&PostParams::default(), &secret).await,
            };
            match written {
                Ok(_) => {
                    tracing::info!(secret = %self.name, not_after = %unix(serving.not_after), "issued the agents' listener a certificate");
                    return Ok(Contents { ca, serving });
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => {
                    let verb = if existing.is_some() {
                        "replacing"
                    } else {
                        "creating"
                    };
                    return Err(self.api_error(verb, "Secret", &self.name)(e));
                }
            }
        }
        Err(SyncError::Unusable {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            problem: "changed by someone else on every attempt to rotate it".into(),
        })
    }

    fn issued_secret(&self, existing: Option<&Secret>, ca: &Ca, serving: &Serving) -> Secret {
        let mut meta = existing
            .map(|s| s.metadata.clone())
            .unwrap_or_else(|| ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".to_string(),
                    "nemesis".to_string(),
                )])),
                ..ObjectMeta::default()
            });
        meta.managed_fields = None;
        let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
        annotations.insert(NOT_AFTER_ANNOTATION.into(), unix(serving.not_after));
        annotations.insert(CA_NOT_AFTER_ANNOTATION.into(), unix(ca.not_after));
        let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
        Secret {
            metadata: meta,
            data: Some(BTreeMap::from([
                (CERT_KEY.to_string(), bytes(&serving.cert_pem)),
                (KEY_KEY.to_string(), bytes(&serving.key_pem)),
                (CA_CERT_KEY.to_string(), bytes(&ca.cert_pem)),
                (CA_KEY_KEY.to_string(), bytes(&ca.key_pem)),
            ])),
            type_: Some("kubernetes.io/tls".to_string()),
            ..Secret::default()
        }
    }

    /// Writes the CA certificate where agents read it, when it is not there yet.
    async fn publish_ca(&self, name: &str, ca_pem: &str) -> Result<(), SyncError> {
        let existing = self
            .config_maps
            .get_opt(name)
            .await
            .map_err(self.api_error("reading", "ConfigMap", name))?;
        let current = existing
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get(CA_CERT_KEY));
        if current.map(String::as_str) == Some(ca_pem) {
            return Ok(());
        }
        let mut meta = existing
            .as_ref()
            .map(|c| c.metadata.clone())
            .unwrap_or_else(|| ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".to_string(),
                    "nemesis".to_string(),
                )])),
                ..ObjectMeta::default()
            });
        meta.managed_fields = None;
        let cm = ConfigMap {
            metadata: meta,
            data: Some(BTreeMap::from([(
                CA_CERT_KEY.to_string(),
                ca_pem.to_owned(),
            )])),
            ..ConfigMap::default()
        };
        let written = match existing {
            Some(_) => {
                self.config_maps
                    .replace(name, &PostParams::default(), &cm)
                    .await
            }
            None => self.config_maps.create(&PostParams::default(), &cm).await,
        };
        match written {
            Ok(_) => {
                tracing::info!(configmap = %name, "published the agents' CA");
                Ok(())
            }
            // Another replica published at the same moment; the next check compares.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(self.api_error("writing", "ConfigMap", name)(e)),
        }
    }

    /// Syncs at once, then every [`tls::check_every`] of the validity (every minute in
    /// provided mode), retrying a failure every few seconds until `stop`. The listener
    /// refuses handshakes until the first sync has loaded a certificate.
    pub async fn follow(self, slot: Arc<CertSlot>, stop: CancellationToken) {
        let every = match &self.source {
            Source::Issued { validity, .. } => tls::check_every(*validity),
            Source::Provided => tls::check_every(tls::DEFAULT_VALIDITY),
        };
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let synced = tokio::time::timeout(crate::reconcile::API_TIMEOUT, self.sync(&slot))
                .await
                .unwrap_or(Err(SyncError::Timeout));
            wait = match synced {
                Ok(()) => every,
                Err(e) if slot.is_loaded() => {
                    tracing::warn!(err = %e, "refreshing the agents' TLS certificate failed; presenting the current one");
                    every.min(RETRY)
                }
                Err(e) => {
                    tracing::warn!(err = %e, "loading the agents' TLS certificate failed; agents cannot connect until it succeeds");
                    RETRY
                }
            };
        }
    }
}
