//! The project's Kubernetes API server for tests and the demo: HTTPS with a generated CA
//! and a bearer token, the real wire protocol (discovery, OpenAPI v3, CRUD, watch,
//! patches, server-side apply, subresources, CRDs), driven by kube-rs and kubectl
//! exactly as a cluster would be; ServiceAccount tokens and RBAC as a cluster enforces
//! them (the kubeconfig's admin token is a `system:masters` member). What it does not
//! implement it refuses with a `Status` error. It never runs in a real cluster, and it
//! binds only to loopback.

mod access;
mod convert;
mod defaults;
mod discovery;
pub mod faults;
mod fields;
mod handlers;
mod http;
mod kubeconfig;
mod lifecycle;
mod logs;
mod meta;
mod openapi;
mod paging;
mod patch;
mod protobuf;
mod rbac;
mod registry;
mod reviews;
mod routes;
mod scale;
mod schemas;
mod selector;
mod status;
mod store;
mod structural;
mod table;
mod tls;
mod tokens;
mod validate;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use self::http::{RequestCounts, RequestRecord};
pub use self::lifecycle::{SERVICE_CIDR, SERVICE_CIDR_V6, in_service_range};

/// Events kept for watch resumption by default (older resourceVersions get `410`).
const DEFAULT_WATCH_HISTORY: usize = 10_000;
/// Bookmarks often enough that a resumed watcher rarely falls outside the history.
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(5);
/// Upstream's minimum request timeout for watches without `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating the server's temporary directory: {0}")]
    CreateTempDir(#[source] std::io::Error),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("writing the kubeconfig {path}: {source}")]
    WriteKubeconfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the kubeconfig {path}: {source}")]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("building a kube client from the kubeconfig: {0}")]
    BuildClient(#[source] kube::Error),
    #[error("issuing a token for ServiceAccount {namespace}/{name}: {source}")]
    IssueToken {
        namespace: String,
        name: String,
        #[source]
        source: Box<status::ApiError>,
    },
}

/// How to start a server. `Default` is right for tests.
#[derive(Debug, Clone)]
pub struct ApiServerOptions {
    /// Where to listen; loopback only. Port 0 picks a free port.
    pub addr: SocketAddr,
    /// Directory for the kubeconfig; `None`: a fresh temporary directory, removed on drop.
    pub dir: Option<PathBuf>,
    /// Watch events kept for resuming from a resourceVersion.
    pub watch_history: usize,
    pub bookmark_interval: Duration,
    pub default_watch_timeout: Duration,
    /// The bearer token; `None`: a random one.
    pub token: Option<String>,
    /// Faults to inject from the start (see [`TestApiServer::inject_faults`]).
    pub faults: Option<faults::FaultPlan>,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        ApiServerOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir: None,
            watch_history: DEFAULT_WATCH_HISTORY,
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            default_watch_timeout: DEFAULT_WATCH_TIMEOUT,
            token: None,
            faults: None,
        }
    }
}

/// A running test API server. Dropping it stops it (and removes its temporary directory).
pub struct TestApiServer {
    shared: Arc<http::Shared>,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    ca_pem: String,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    _tempdir: Option<tempfile::TempDir>,
}

fn install_crypto_provider() {
    // kube's rustls client config uses the process default provider; make it ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TestApiServer {
    pub async fn start(opts: ApiServerOptions) -> Result<Self, Error> {
        install_crypto_provider();
        let (dir, tempdir) = match &opts.dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("nemesis-apiserver-")
                    .tempdir()
                    .map_err(Error::CreateTempDir)?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let pki = tls::generate()?;
        let listener = TcpListener::bind(opts.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: opts.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: opts.addr,
            source,
        })?;
        let url = format!("https://{addr}");
        let token = opts.token.clone().unwrap_or_else(|| {
            let b: [u8; 24] = rand::random();
            b.iter().map(|x| format!("{x:02x}")).collect()
        });
        let kubeconfig = dir.join("kubeconfig");
        kubeconfig::write(&kubeconfig, &url, &pki.ca_pem, &token).map_err(|source| {
            Error::WriteKubeconfig {
                path: kubeconfig.clone(),
                source,
            }
        })?;
        let mut state = store::State::new(opts.watch_history);
        lifecycle::bootstrap(&mut state);
        let cancel = CancellationToken::new();
        let shared = Arc::new(http::Shared {
            state: Mutex::new(state),
            token,
            signer: tokens::Signer::generate(),
            settings: http::Settings {
                bookmark_interval: opts.bookmark_interval,
                default_watch_timeout: opts.default_watch_timeout,
            },
            address: addr.to_string(),
            shutdown: cancel.clone(),
            watch_epoch: Mutex::new(cancel.child_token()),
            watch_gate: tokio::sync::watch::channel(false).0,
            watch_hold: tokio::sync::watch::channel(None).0,
            log: Mutex::new(Default::default()),
            faults: Default::default(),
            counts: Mutex::new(Default::default()),
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config.clone());
        let task = tokio::spawn(http::serve(
            listener,
            acceptor,
            shared.clone(),
            cancel.clone(),
        ));
        tracing::info!(%url, kubeconfig = %kubeconfig.display(), "test API server started");
        let server = TestApiServer {
            shared,
            addr,
            kubeconfig,
            ca_pem: pki.ca_pem,
            cancel,
            task: Some(task),
            _tempdir: tempdir,
        };
        if let Some(plan) = opts.faults {
            server.inject_faults(plan);
        }
        Ok(server)
    }

    /// `https://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// The CA certificate (PEM) the server's certificate chains to.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kube client configured from this server's kubeconfig (default namespace `default`).
    pub async fn client(&self) -> Result<kube::Client, Error> {
        kube::Client::try_from(self.config().await?).map_err(Error::BuildClient)
    }

    /// The kube config of this server's kubeconfig, for a caller that builds its
    /// clients itself (the controller's `ApiClients::from_config`).
    pub async fn config(&self) -> Result<kube::Config, Error> {
        install_crypto_provider();
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).map_err(|source| {
            Error::ReadKubeconfig {
                path: self.kubeconfig.clone(),
                source,
            }
        })?;
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|source| Error::ReadKubeconfig {
                path: self.kubeconfig.clone(),
                source,
            })
    }

    /// A token for ServiceAccount `namespace/name`, as a TokenRequest with no
    /// audiences and the default hour of life would give (the ServiceAccount must exist).
    pub fn service_account_token(&self, namespace: &str, name: &str) -> Result<String, Error> {
        let st = self.shared.lock();
        let answer = reviews::token_request(
            &st,
            &self.shared.signer,
            namespace,
            name,
            &serde_json::json!({}),
        )
        .map_err(|source| Error::IssueToken {
            namespace: namespace.into(),
            name: name.into(),
            source: Box::new(source),
        })?;
        Ok(answer["status"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The token a TokenRequest `body` (`spec.audiences`, `spec.boundObjectRef`,
    /// `spec.expirationSeconds`) for ServiceAccount `namespace/name` would have given at
    /// `issued_at` (Unix seconds): in the past, an already expired token signed by this
    /// server's key, which no TokenRequest can return.
    pub fn service_account_token_issued_at(
        &self,
        namespace: &str,
        name: &str,
        body: &serde_json::Value,
        issued_at: i64,
    ) -> Result<String, Error> {
        let st = self.shared.lock();
        let answer =
            reviews::token_request_at(&st, &self.shared.signer, namespace, name, body, issued_at)
                .map_err(|source| Error::IssueToken {
                namespace: namespace.into(),
                name: name.into(),
                source: Box::new(source),
            })?;
        Ok(answer["status"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Writes a kubeconfig for this server that authenticates with `token` (for kubectl
    /// or a client acting as that user).
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<(), Error> {
        kubeconfig::write(path, &self.url(), &self.ca_pem, token).map_err(|source| {
            Error::WriteKubeconfig {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// A kube client that authenticates with `token` (default namespace `default`).
    pub async fn client_with_token(&self, token: &str) -> Result<kube::Client, Error> {
        install_crypto_provider();
        let yaml = kubeconfig::render(&self.url(), &self.ca_pem, token, "default");
        let kc =
            kube::config::Kubeconfig::from_yaml(&yaml).map_err(|source| Error::ReadKubeconfig {
                path: PathBuf::from("<in memory>"),
                source,
            })?;
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| Error::ReadKubeconfig {
                    path: PathBuf::from("<in memory>"),
                    source,
                })?;
        kube::Client::try_from(cfg).map_err(Error::BuildClient)
    }

    /// The requests served so far (the most recent few thousand), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Every request served since start, counted by method (unlike
    /// [`requests`](Self::requests), never truncated).
    pub fn request_counts(&self) -> RequestCounts {
        self.shared
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv()
    }

    /// Fault injection: end every running watch and hold new ones until
    /// [`resume_watches`](Self::resume_watches), as a network partition would.
    pub fn interrupt_watches(&self) {
        self.shared.watch_gate.send_replace(true);
        let mut epoch = self
            .shared
            .watch_epoch
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        epoch.cancel();
        *epoch = self.cancel.child_token();
    }

    pub fn resume_watches(&self) {
        self.shared.watch_gate.send_replace(false);
    }

    /// Fault injection: the watches of `group`/`plural` by `users` (all users when
    /// empty) deliver no event from now on (a lagging watch: the client decides on an
    /// old world while others write); their events queue, in order, until
    /// [`release_watch_events`](Self::release_watch_events). Replaces any hold in force.
    pub fn hold_watch_events(&self, group: &str, plural: &str, users: &[&str]) {
        tracing::info!(group, plural, ?users, "holding watch events back");
        self.shared.watch_hold.send_replace(Some(watch::EventHold {
            key: (group.to_owned(), plural.to_owned()),
            users: users.iter().map(|u| u.to_string()).collect(),
        }));
    }

    /// Ends [`hold_watch_events`](Self::hold_watch_events): the queued events go out.
    pub fn release_watch_events(&self) {
        tracing::info!("releasing held watch events");
        self.shared.watch_hold.send_replace(None);
    }

    /// Forget the watch history (as an etcd compaction): watches resuming from an older
    /// resourceVersion get `410 Expired`.
    pub fn compact_watch_history(&self) {
        let mut st = self.shared.lock();
        let rv = st.rv();
        st.log.compact(rv);
    }

    /// Fault injection: from now on, follow `plan` (replacing any plan running): its
    /// phases' faults hit the requests of its users, and cut-watches phases end every
    /// running watch now and then (new ones are not held). Ends by itself with the plan,
    /// or at [`stop_faults`](Self::stop_faults).
    pub fn inject_faults(&self, plan: faults::FaultPlan) {
        tracing::info!(
            seed = plan.seed,
            phases = plan.phases.len(),
            "injecting API faults"
        );
        self.shared.faults.start(plan);
        let shared = self.shared.clone();
        let stop = self.cancel.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(faults::CUT_TICK);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if !shared.faults.running() {
                    return;
                }
                if shared.faults.cut_watches_now() {
                    let mut epoch = shared.watch_epoch.lock().unwrap_or_else(|p| p.into_inner());
                    epoch.cancel();
                    *epoch = shared.shutdown.child_token();
                }
            }
        });
    }

    /// Ends fault injection; returns what was injected (all plans so far).
    pub fn stop_faults(&self) -> faults::FaultCounts {
        self.shared.faults.stop();
        self.shared.faults.counts()
    }

    /// What was injected so far (all plans).
    pub fn fault_counts(&self) -> faults::FaultCounts {
        self.shared.faults.counts()
    }

    /// Stop serving and wait for the accept loop to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
