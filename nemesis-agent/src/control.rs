//! The agent's client of the controller: wake-ups and heartbeats (JSON over HTTP with a
//! bearer token, see `nemesis_common::wire`). Owns the HTTP calls, their timeouts and the
//! heartbeat loop; never decides a mode (it hands directives to a [`DirectiveSink`]).
#![deny(unsafe_code)]

use crate::holdports::HoldListeners;
use crate::metrics::DatapathCounters;
use crate::proxy::backoff::Backoff;
use crate::proxy::{ModeFollower, Proxy, ServiceTable};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nemesis_common::wire::{
    AppliedMode, DirectiveView, Heartbeat, HeartbeatReply, ReportDeltas, ServiceDirective,
    ServiceReport, ViewUpdate, WakeReply, WakeRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

pub const WAKE_PATH: &str = "/v1/agents/wake";
pub const HEARTBEAT_PATH: &str = "/v1/agents/heartbeat";
pub const LOADS_PATH: &str = "/v1/agents/loads";
/// Per call, connect to last body byte: the controller answers from memory, so a call
/// slower than this is a controller in trouble, and the caller retries.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Heartbeat period: the controller's view of open connections is at most this old.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("controller URL {url:?}: {reason}")]
    ParseUrl { url: String, reason: String },
    #[error("encoding the {path} request: {source}")]
    EncodeRequest {
        path: &'static str,
        source: serde_json::Error,
    },
    #[error("building the {path} request: {source}")]
    BuildRequest {
        path: &'static str,
        source: http::Error,
    },
    #[error("POST {path}: {source}")]
    Send {
        path: &'static str,
        source: hyper_util::client::legacy::Error,
    },
    #[error("POST {path}: no complete answer within {after:?}")]
    Timeout { path: &'static str, after: Duration },
    #[error("reading the token file {}: {source}", file.display())]
    ReadToken {
        file: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("reading the controller's CA file {}: {source}", file.display())]
    ReadCa {
        file: std::path::PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("the controller's CA file {} holds no usable certificate", file.display())]
    NoCa { file: std::path::PathBuf },
    #[error("the token file {} is empty", file.display())]
    EmptyToken { file: std::path::PathBuf },
    #[error("POST {path}: reading the answer: {source}")]
    ReadBody {
        path: &'static str,
        source: hyper::Error,
    },
    #[error("POST {path}: controller answered {status}: {body}")]
    Status {
        path: &'static str,
        status: u16,
        body: String,
    },
    #[error("POST {path}: decoding the answer: {source}")]
    DecodeReply {
        path: &'static str,
        source: serde_json::Error,
    },
}

/// HTTP client of the controller's agent API: HTTPS verified against the controller's CA
/// (`https://` URLs), or plain HTTP (`http://`, deprecated: the token crosses the
/// network in clear); the bearer token authenticates the agent.
#[derive(Clone)]
pub struct ControllerClient {
    base: String,
    token: Token,
    timeout: Duration,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for ControllerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("ControllerClient")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Where the bearer token comes from.
#[derive(Clone)]
enum Token {
    Value(String),
    /// A projected ServiceAccount token: the kubelet rewrites the file before the token
    /// expires, so it is read again for every call.
    File(std::path::PathBuf),
}

impl Token {
    fn current(&self) -> Result<String, ControlError> {
        match self {
            Token::Value(v) => Ok(v.clone()),
            Token::File(file) => {
                let text =
                    std::fs::read_to_string(file).map_err(|source| ControlError::ReadToken {
                        file: file.clone(),
                        source,
                    })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(ControlError::EmptyToken { file: file.clone() });
                }
                Ok(token.to_owned())
            }
        }
    }
}

impl ControllerClient {
    /// A client presenting the token in `file`, read again for every call (rotation);
    /// an `https://` URL needs `ca`, the PEM file of the CA the controller's
    /// certificate is checked against.
    pub fn with_token_file(
        base_url: &str,
        file: impl Into<std::path::PathBuf>,
        ca: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        let mut c = Self::build(base_url, String::new(), ca, timeout)?;
        c.token = Token::File(file.into());
        Ok(c)
    }

    /// `base_url` like `http://nemesis-controller.nemesis-system:8080` (plain HTTP).
    pub fn new(
        base_url: &str,
        token: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        Self::build(base_url, token.into(), None, timeout)
    }

    /// `base_url` like `https://nemesis-controller.nemesis-system.svc:9443`, the
    /// controller's certificate checked against the CA certificates in `ca` (PEM).
    pub fn with_ca(
        base_url: &str,
        token: impl Into<String>,
        ca: &std::path::Path,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        Self::build(base_url, token.into(), Some(ca), timeout)
    }

    fn build(
        base_url: &str,
        token: String,
        ca: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        let bad = |reason: &str| ControlError::ParseUrl {
            url: base_url.to_string(),
            reason: reason.to_string(),
        };
        let uri: http::Uri = base_url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        match (uri.scheme_str(), ca) {
            (Some("https"), Some(_)) | (Some("http"), None) => {}
            (Some("https"), None) => {
                return Err(bad(
                    "https:// needs the controller's CA file (--controller-ca-file)",
                ));
            }
            (Some("http"), Some(_)) => {
                return Err(bad(
                    "a CA file is given but the URL is http://: use https:// (the controller's --agent-listen)",
                ));
            }
            _ => return Err(bad("only http:// and https:// URLs are supported")),
        }
        if uri.authority().is_none() {
            return Err(bad("no host"));
        }
        let roots = match ca {
            Some(file) => read_ca(file)?,
            None => rustls::RootCertStore::empty(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        Ok(Self {
            base: base_url.trim_end_matches('/').to_string(),
            token: Token::Value(token),
            timeout,
            http: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    pub async fn wake(&self, request: &WakeRequest) -> Result<WakeReply, ControlError> {
        self.post(WAKE_PATH, request).await
    }

    pub async fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<HeartbeatReply, ControlError> {
        self.post(HEARTBEAT_PATH, heartbeat).await
    }

    /// Balance mode's load exchange: this node's open connections per backend out, the
    /// other nodes' back.
    pub async fn loads(
        &self,
        report: &nemesis_common::wire::LoadReport,
    ) -> Result<nemesis_common::wire::LoadReply, ControlError> {
        self.post(LOADS_PATH, report).await
    }

    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &'static str,
        body: &Req,
    ) -> Result<Resp, ControlError> {
        let json = serde_json::to_vec(body)
            .map_err(|source| ControlError::EncodeRequest { path, source })?;
        let token = self.token.current()?;
        let request = http::Request::post(format!("{}{path}", self.base))
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(json)))
            .map_err(|source| ControlError::BuildRequest { path, source })?;
        let call = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|source| ControlError::Send { path, source })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|source| ControlError::ReadBody { path, source })?
                .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body);
                return Err(ControlError::Status {
                    path,
                    status: status.as_u16(),
                    body: text.chars().take(200).collect(),
                });
            }
            serde_json::from_slice(&body)
                .map_err(|source| ControlError::DecodeReply { path, source })
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| ControlError::Timeout {
                path,
                after: self.timeout,
            })?
    }
}

/// The CA certificates the controller's certificate must chain to.
fn read_ca(file: &std::path::Path) -> Result<rustls::RootCertStore, ControlError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let read = |source| ControlError::ReadCa {
        file: file.to_path_buf(),
        source,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(file).map_err(read)? {
        // A certificate rustls cannot use as a root is skipped; none at all is an error.
        let _ = roots.add(cert.map_err(read)?);
    }
    if roots.is_empty() {
        return Err(ControlError::NoCa {
            file: file.to_path_buf(),
        });
    }
    Ok(roots)
}

// === heartbeats ===

/// What the agent reports per Service in each heartbeat.
pub trait ReportSource: Send + Sync + 'static {
    fn reports(&self) -> Vec<ServiceReport>;
}

/// Where the controller's directives go.
pub trait DirectiveSink: Send + Sync + 'static {
    fn apply(&self, directives: &[ServiceDirective]);
}

/// The agent's reports: the managed Services of the table, each with its applied mode
/// and epoch, its eBPF counters and what the proxy holds.
pub struct AgentReports {
    pub table: Arc<ServiceTable>,
    pub modes: Arc<ModeFollower>,
    pub proxy: Proxy,
    pub datapath: Arc<DatapathCounters>,
    pub holds: Arc<HoldListeners>,
}

impl ReportSource for AgentReports {
    fn reports(&self) -> Vec<ServiceReport> {
        self.table
            .services()
            .into_iter()
            .map(|service| {
                let (mode, applied_epoch) = self
                    .modes
                    .applied(&service)
                    .unwrap_or((AppliedMode::Passthrough, 0));
                let counters = self.datapath.get(&service).unwrap_or_default();
                ServiceReport {
                    mode,
                    applied_epoch,
                    connects_total: counters.connects_total,
                    open_connections: counters.open_connections,
                    closed_total: counters.closed_total,
                    accepted_total: counters.accepted_total,
                    accepted_open: counters.accepted_open,
                    held_connections: self.proxy.held(&service) as u64,
                    hold_ports: self.holds.listening(&service),
                    holds_total: self.proxy.holds_total(&service),
                    holds_refused_total: self.proxy.holds_refused_total(&service),
                    proxy_errors: self.proxy.errors_total(&service),
                    service,
                }
            })
            .collect()
    }
}

impl DirectiveSink for ModeFollower {
    fn apply(&self, directives: &[ServiceDirective]) {
        self.apply_directives(directives);
    }
}

/// The agent's directives: the modes, then the hold listeners.
pub struct AgentDirectives {
    pub modes: Arc<ModeFollower>,
    pub holds: Arc<HoldListeners>,
}

impl DirectiveSink for AgentDirectives {
    fn apply(&self, directives: &[ServiceDirective]) {
        self.modes.apply_directives(directives);
        self.holds.apply(directives);
    }
}

/// Whether the agent is ready, as `/readyz` answers.
pub trait ReadySource: Send + Sync + 'static {
    fn is_ready(&self) -> bool;
}

impl ReadySource for crate::admin::Readiness {
    fn is_ready(&self) -> bool {
        self.check().is_ok()
    }
}

/// The heartbeat loop: every `interval` (sooner when `kick` is notified, e.g. after a
/// mode change), send the reports and hand the reply's directives to the sink. Failed
/// calls are retried with backoff; the loop never ends.
pub struct Heartbeats {
    pub client: ControllerClient,
    pub node: String,
    /// Random per agent process, so that the controller sees a restart.
    pub instance: String,
    pub interval: Duration,
    pub backoff: Backoff,
    pub reports: Arc<dyn ReportSource>,
    pub directives: Arc<dyn DirectiveSink>,
    pub kick: Arc<Notify>,
    /// Where this agent's hold listeners are reachable.
    pub addresses: Vec<std::net::IpAddr>,
    pub ready: Arc<dyn ReadySource>,
}

impl Heartbeats {
    pub async fn run(self) {
        let mut failures = 0u32;
        // The controller sends only what changed since the cursor we send back, in pages;
        // the sink still gets the whole set in use every time (hold listeners that failed
        // to bind are retried on each call).
        let mut view = DirectiveView::default();
        // And we send only the reports that changed since those it holds.
        let mut reports = ReportDeltas::default();
        let mut last_ok = None;
        loop {
            let mut heartbeat = Heartbeat {
                node: self.node.clone(),
                instance: self.instance.clone(),
                services: Vec::new(),
                addresses: self.addresses.clone(),
                ready: self.ready.is_ready(),
                directives_cursor: view.cursor(),
                pages: true,
                reports_seq: None,
                reports_since: None,
                gone: Vec::new(),
            };
            reports.prepare(&mut heartbeat, self.reports.reports());
            let sent = tokio::time::Instant::now();
            let wait = match self.client.heartbeat(&heartbeat).await {
                Ok(reply) => {
                    failures = 0;
                    let took = sent.elapsed();
                    let lease = Duration::from_secs(u64::from(reply.lease_seconds.max(1)));
                    let gap = last_ok.map(|t: tokio::time::Instant| sent.duration_since(t));
                    if took > lease / 2 || gap.is_some_and(|g| g > lease) {
                        tracing::warn!(
                            took_ms = took.as_millis() as u64,
                            since_last_ms = gap.map(|g| g.as_millis() as u64),
                            lease_ms = lease.as_millis() as u64,
                            "heartbeat late: the controller may count this agent as gone"
                        );
                    }
                    last_ok = Some(sent);
                    // At once again: the controller wants every report, or has more
                    // directives for us.
                    let mut again = reports.acknowledge(&reply);
                    match view.apply(&reply) {
                        ViewUpdate::Resync => {
                            tracing::info!(
                                "the controller's directives do not continue ours: asking for all of them"
                            );
                            again = true;
                        }
                        ViewUpdate::Partial => again = true,
                        ViewUpdate::Replaced | ViewUpdate::Patched => {}
                    }
                    let all: Vec<ServiceDirective> = view.directives().cloned().collect();
                    self.directives.apply(&all);
                    if again {
                        Duration::ZERO
                    } else {
                        // Beat at least three times per lease, so one lost beat is not death.
                        let lease = Duration::from_secs(u64::from(reply.lease_seconds.max(1)));
                        self.interval.min(lease / 3)
                    }
                }
                Err(err) => {
                    reports.failed();
                    failures += 1;
                    tracing::warn!(%err, failures, "heartbeat to the controller failed");
                    self.backoff.delay(failures)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.kick.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_needs_a_ca_and_a_ca_needs_https() {
        let t = Duration::from_secs(1);
        assert!(ControllerClient::new("http://127.0.0.1:8080/", "t", t).is_ok());
        let err = ControllerClient::new("https://c:9443", "t", t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--controller-ca-file"), "{err}");
        let err = ControllerClient::new("ftp://c:21", "t", t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("only http:// and https://"), "{err}");
        assert!(ControllerClient::new("not a url", "t", t).is_err());
        let dir = std::env::temp_dir().join(format!("nemesis-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.crt");
        std::fs::write(&empty, "").unwrap();
        let err = ControllerClient::with_ca("https://c:9443", "t", &empty, t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no usable certificate"), "{err}");
        let err = ControllerClient::with_ca("http://c:9443", "t", &empty, t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("use https://"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let c =
            ControllerClient::new("http://127.0.0.1:1", "s3cret", Duration::from_secs(1)).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
