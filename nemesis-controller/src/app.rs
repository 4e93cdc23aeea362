//! The composition root of `nemesis-controller run`: builds every part from the settings
//! (tokens, history store, agent registry, wake gate, alert book, listeners, leader
//! election, the core) and runs them until shutdown. In-process tests start it the same
//! way. It wires; it holds no logic of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agents::registry::DEFAULT_FORGET_AFTER;
use crate::agents::tls::CertSlot;
use crate::agents::tls_secret::{self, TlsSecret};
use crate::agents::wake::{DEFAULT_QUEUE, DEFAULT_REFORWARD_AFTER};
use crate::agents::{
    AgentApi, AgentAuth, AgentRegistry, RegistryConfig, ReviewConfig, TokenReviewer, WakeGate,
};
use crate::alerts::{AlertApi, AlertBook};
use crate::api_client::{ApiClients, LeaseClient};
use crate::auth::{AuthError, BearerToken};
use crate::config::{ConfigError, RunArgs};
use crate::leader::{self, LeaderConfig, LeaseLock};
use crate::metrics::ControllerMetrics;
use crate::notify::{self, Notifier, RuleSource, SecretOutbox};
use crate::prometheus::{DEFAULT_QUERY_TIMEOUT, PromClient, PromError};
use crate::reconcile::{self, Context, EventSink, History, PromPool, Settings};
use crate::server::{self, Health, ServerError};
use crate::store::{Store, StoreError};
use crate::ui::{
    self, AdminPassword, Backing, Directory, PolicyCache, UiConfig, UiError, UiSources, UiState,
};

/// A mounted Secret is updated in place by the kubelet (within about a minute); checking
/// every 30 s picks a rotated token up soon after.
const TOKEN_RELOAD_EVERY: Duration = Duration::from_secs(30);
/// Graceful shutdown gives each stage this long before it is cut off.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    #[error("the Alertmanager token: {0}")]
    ReadAlertmanagerToken(#[source] AuthError),
    #[error("the web UI: {0}")]
    ReadUiPassword(#[source] UiError),
    #[error("the web UI: {0}")]
    UiTls(#[source] crate::ui::tls::TlsError),
    #[error("the web UI: {0}")]
    UiAccounts(#[source] crate::ui::directory::DirectoryError),
    #[error("--prometheus-url: {0}")]
    PrometheusUrl(#[source] PromError),
    #[error("--alert-sinks-file: {0}")]
    AlertSinks(#[source] crate::notify::sinks::SinksError),
    #[error(transparent)]
    OpenStore(#[from] StoreError),
    #[error("starting the leader election's runtime: {0}")]
    LeaderRuntime(#[source] std::io::Error),
    #[error("building the leader election's Kubernetes client: {0}")]
    LeaseClient(#[source] kube::Error),
    #[error("opening the history store: the blocking task failed: {0}")]
    JoinStore(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Listen(#[from] ServerError),
}

/// A running controller. Drop or [`Running::kill`] it to stop it at once (as `kill -9`
/// would: the Lease is not released); [`Running::shutdown`] stops it in order.
pub struct Running {
    pub api_addr: SocketAddr,
    /// Where the UI is served over TLS (`None`: on the API listener, or not at all).
    pub ui_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// Where the agents' API is served over TLS (`None`: on the API listener, plain).
    pub agent_addr: Option<SocketAddr>,
    pub identity: String,
    pub metrics: ControllerMetrics,
    pub registry: Arc<AgentRegistry>,
    pub store: Arc<Store>,
    leading: watch::Receiver<bool>,
    core_stop: CancellationToken,
    leader_stop: CancellationToken,
    serve_stop: CancellationToken,
    core: Option<JoinHandle<()>>,
    leader: Option<JoinHandle<()>>,
    /// The leader election's own runtime, if it has one (shut down in the background:
    /// dropping a runtime from async code would panic).
    leader_runtime: Option<tokio::runtime::Runtime>,
    servers: Vec<JoinHandle<Result<(), ServerError>>>,
    background: Vec<JoinHandle<()>>,
}

impl Running {
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Leadership as it changes.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Stops acting first, then releases the Lease (a standby takes over at once), then
    /// stops serving, and lets the history writer commit what it holds.
    pub async fn shutdown(mut self) {
        self.core_stop.cancel();
        if let Some(core) = self.core.take() {
            let _ = tokio::time::timeout(STOP_TIMEOUT, core).await;
        }
        self.leader_stop.cancel();
        if let Some(leader) = self.leader.take() {
            let _ = tokio::time::timeout(STOP_TIMEOUT, leader).await;
        }
        if let Some(rt) = self.leader_runtime.take() {
            rt.shutdown_background();
        }
        self.serve_stop.cancel();
        for s in std::mem::take(&mut self.servers) {
            let _ = tokio::time::timeout(STOP_TIMEOUT, s).await;
        }
        // The history writer ends once every handle to it is gone (the core's are).
        for b in std::mem::take(&mut self.background) {
            if tokio::time::timeout(STOP_TIMEOUT, b).await.is_err() {
                break;
            }
        }
    }

    /// Stops everything at once, like a crash: nothing is released.
    pub fn kill(self) {
        drop(self);
    }

    /// Resolves when a listener stopped serving by itself (a fatal error).
    pub async fn failed(&mut self) -> ServerError {
        loop {
            if self.servers.is_empty() {
                std::future::pending::<()>().await;
            }
            let (result, i, _) = futures::future::select_all(self.servers.iter_mut()).await;
            self.servers.remove(i);
            match result {
                Ok(Err(e)) => return e,
                Ok(Ok(())) => continue,
                Err(join) => {
                    return ServerError::Serve {
                        which: "http",
                        source: std::io::Error::other(join.to_string()),
                    };
                }
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for h in self
            .core
            .iter()
            .chain(self.leader.iter())
            .chain(&self.background)
        {
            h.abort();
        }
        for s in &self.servers {
            s.abort();
        }
        if let Some(rt) = self.leader_runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Starts a controller with `args` against the API server of `client` (one client for
/// every role, as in-process tests use it).
pub async fn start(args: &RunArgs, client: kube::Client) -> Result<Running, StartError> {
    start_with(args, ApiClients::shared(client)).await
}

/// Starts a controller with `args`: leader election on `clients.lease`, everything else
/// on `clients.main` (see [`crate::api_client`] for why they differ). Each step is a
/// function below, in this order: read what the flags name (a bad file fails the start
/// before anything runs), open the history, bind every listener (a busy port fails it
/// too), start the feeds and the notifier, serve the agents, the API, the UI and the
/// admin endpoints, then the core, the election and the standby's follower.
pub async fn start_with(args: &RunArgs, clients: ApiClients) -> Result<Running, StartError> {
    let ApiClients {
        main: client,
        lease: lease_client,
    } = clients;
    args.validate()?;
    let mut files = StartFiles::read(args)?;
    let store = open_store(args).await?;
    let (wakes, wake_rx) = WakeGate::new(DEFAULT_QUEUE, DEFAULT_REFORWARD_AFTER);
    let (lead_tx, leading) = watch::channel(false);
    let (epoch_tx, epoch) = watch::channel(0u64);
    let (synced_tx, synced) = watch::channel(false);
    let shared = Shared {
        client,
        identity: args.identity(),
        store,
        metrics: ControllerMetrics::new(),
        registry: Arc::new(AgentRegistry::new(RegistryConfig {
            lease: args.agent_lease,
            forget_after: DEFAULT_FORGET_AFTER,
        })),
        wakes: Arc::new(wakes),
        alerts: Arc::new(AlertBook::new()),
        leading,
    };
    let listeners = Listeners::bind(args, files.ui_tls.is_some(), &shared.client).await?;
    let mut tasks = Tasks::default();

    let feeds = shared.start_feeds(
        args,
        &mut files,
        listeners.api_addr,
        epoch.clone(),
        &mut tasks,
    );
    let plain_agent_api = shared.serve_agents(args, listeners.agents, &mut tasks);
    let (mut api, replication) = shared.api_router(plain_agent_api, &files);
    let history_url = files
        .replica_token
        .as_ref()
        .and_then(|_| history_url(args.history_url.as_deref(), listeners.api_addr));
    if files.replica_token.is_some() && history_url.is_none() {
        tracing::warn!(listen = %listeners.api_addr, "no --history-url and the API listener has no specific address: the standbys cannot pull this instance's history while it leads");
    }
    if let Some(token) = &files.replica_token {
        let secret = crate::replication::TokenSecret::new(
            shared.client.clone(),
            &args.lease_namespace,
            &args.replica_token_secret,
        );
        // Read in the background: an API server down at start delays replication, not
        // the start.
        tasks.spawn(secret.follow(token.clone(), tasks.serve_stop.clone()));
    }
    let ui_addr = shared
        .serve_ui(
            args,
            &mut files,
            UiParts {
                policies: feeds.policies,
                notify: feeds.notify,
                listener: listeners.ui,
                replication: replication.clone(),
                api_addr: listeners.api_addr,
            },
            &mut api,
            &mut tasks,
        )
        .await?;
    let servers = shared.serve_api_and_admin(
        api,
        (listeners.api, listeners.admin),
        synced,
        &tasks.serve_stop,
    );
    let core = shared.start_core(
        args,
        feeds.history,
        feeds.events,
        wake_rx,
        synced_tx,
        epoch,
        &tasks,
    );
    let (leader, leader_runtime) =
        shared.start_election(args, lease_client, history_url, (lead_tx, epoch_tx), &tasks)?;
    if let Some(token) = files.replica_token.clone() {
        shared.start_follower(args, token, replication, &mut tasks);
    }
    tasks.spawn(maintain(
        shared.registry.clone(),
        shared.metrics.clone(),
        files.alert_token.into_iter().collect(),
        tasks.serve_stop.clone(),
    ));
    if let Some(pod) = args.pod_name.clone() {
        tasks.spawn(label_leader_pod(
            shared.client.clone(),
            args.lease_namespace.clone(),
            pod,
            shared.leading.clone(),
        ));
    }
    // Events outlive the core only as long as the publisher drains its queue.
    tasks.background.push(feeds.publisher);

    let (api_addr, admin_addr, agent_addr) = (
        listeners.api_addr,
        listeners.admin_addr,
        listeners.agent_addr,
    );
    let identity = shared.identity;
    tracing::info!(%api_addr, %admin_addr, agent_tls = ?agent_addr, %identity, "controller started");
    Ok(Running {
        api_addr,
        ui_addr,
        admin_addr,
        agent_addr,
        identity,
        metrics: shared.metrics,
        registry: shared.registry,
        store: shared.store,
        leading: shared.leading,
        core_stop: tasks.core_stop,
        leader_stop: tasks.leader_stop,
        serve_stop: tasks.serve_stop,
        core: Some(core),
        leader: Some(leader),
        leader_runtime,
        servers,
        background: tasks.background,
    })
}

/// What the flags name, read (and checked) before anything starts.
struct StartFiles {
    alert_token: Option<BearerToken>,
    /// The replicas' bearer token, filled in the background from its Secret (`None`:
    /// `--history-replication=false`).
    replica_token: Option<crate::replication::ReplicaToken>,
    report_prometheus: Option<ui::reports::ReportPrometheus>,
    ui_password: Option<AdminPassword>,
    /// The UI's own TLS listener's certificate, when there is a UI to serve over it.
    ui_tls: Option<Arc<rustls::ServerConfig>>,
    alert_sinks: notify::sinks::SinksConfig,
}

impl StartFiles {
    fn read(args: &RunArgs) -> Result<Self, StartError> {
        let alert_token = args
            .alertmanager_token_file
            .as_ref()
            .map(BearerToken::from_file)
            .transpose()
            .map_err(StartError::ReadAlertmanagerToken)?;
        if alert_token.is_none() {
            tracing::warn!(
                "no --alertmanager-token-file: the Alertmanager webhook is not served and alert(...) conditions never fire"
            );
        }
        let replica_token = if args.history_replication {
            Some(crate::replication::ReplicaToken::pending())
        } else {
            tracing::warn!(
                "--history-replication=false: a new leader starts without the old one's records"
            );
            None
        };
        let report_prometheus = match &args.prometheus_url {
            Some(url) => Some(ui::reports::ReportPrometheus {
                client: PromClient::new(url, DEFAULT_QUERY_TIMEOUT)
                    .map_err(StartError::PrometheusUrl)?,
                usage: crate::reports::usage::UsageQueries {
                    cpu: args.report_cpu_usage_query.clone(),
                    memory: args.report_memory_usage_query.clone(),
                },
            }),
            None => None,
        };
        let ui_password = args
            .ui_password_file
            .as_ref()
            .map(AdminPassword::from_file)
            .transpose()
            .map_err(StartError::ReadUiPassword)?;
        if ui_password.is_none() {
            tracing::warn!("no --ui-password-file: the web UI is not served");
        }
        let ui_tls = match (&args.ui_tls_cert_file, &args.ui_tls_key_file) {
            (Some(cert), Some(key)) if ui_password.is_some() => {
                Some(crate::ui::tls::load(cert, key).map_err(StartError::UiTls)?)
            }
            _ => None,
        };
        let alert_sinks = args
            .alert_sinks_file
            .as_deref()
            .map(notify::sinks::read_sinks)
            .transpose()
            .map_err(StartError::AlertSinks)?
            .unwrap_or_default();
        if args.alert_sinks_file.is_none() {
            tracing::warn!("no --alert-sinks-file: alerts are raised and shown, but sent nowhere");
        }
        Ok(Self {
            alert_token,
            replica_token,
            report_prometheus,
            ui_password,
            ui_tls,
            alert_sinks,
        })
    }
}

async fn open_store(args: &RunArgs) -> Result<Arc<Store>, StartError> {
    let path = args.store_path.clone();
    let retention = args.retention();
    let store = tokio::task::spawn_blocking(move || Store::open(path, retention))
        .await
        .map_err(StartError::JoinStore)??;
    Ok(Arc::new(store))
}

/// Every listener, bound before anything is served.
struct Listeners {
    api: tokio::net::TcpListener,
    api_addr: SocketAddr,
    admin: tokio::net::TcpListener,
    admin_addr: SocketAddr,
    /// The UI's own TLS listener (`None`: the UI, if any, is on the API listener).
    ui: Option<(tokio::net::TcpListener, SocketAddr)>,
    /// The agents' TLS listener and the Secret its certificate comes from.
    agents: Option<(tokio::net::TcpListener, TlsSecret)>,
    agent_addr: Option<SocketAddr>,
}

impl Listeners {
    async fn bind(args: &RunArgs, ui_tls: bool, client: &kube::Client) -> Result<Self, StartError> {
        let local = |l: &tokio::net::TcpListener, which, addr| {
            l.local_addr().map_err(|source| ServerError::Bind {
                which,
                addr,
                source,
            })
        };
        let api = server::bind("API", args.listen).await?;
        let admin = server::bind("admin", args.admin_listen).await?;
        let api_addr = local(&api, "API", args.listen)?;
        let admin_addr = local(&admin, "admin", args.admin_listen)?;
        let ui = match ui_tls {
            true => {
                let l = server::bind("UI", args.ui_listen).await?;
                let addr = local(&l, "UI", args.ui_listen)?;
                Some((l, addr))
            }
            false => None,
        };
        let (agents, agent_addr) = match &args.agent_tls_secret {
            Some(name) => {
                let listener = server::bind("agents", args.agent_listen).await?;
                let addr = local(&listener, "agents", args.agent_listen)?;
                let source = if args.agent_tls_provided {
                    tls_secret::Source::Provided
                } else {
                    tls_secret::Source::Issued {
                        names: args.agent_tls_names.clone(),
                        validity: args.agent_tls_validity,
                        ca_configmap: args.agent_ca_configmap.clone(),
                    }
                };
                let secret = TlsSecret::new(client.clone(), &args.lease_namespace, name, source);
                (Some((listener, secret)), Some(addr))
            }
            None => (None, None),
        };
        Ok(Self {
            api,
            api_addr,
            admin,
            admin_addr,
            ui,
            agents,
            agent_addr,
        })
    }
}

/// The tokens that stop a controller's stages (in shutdown order: the core, the
/// election, the servers and feeds) and the background tasks it spawned.
#[derive(Default)]
struct Tasks {
    core_stop: CancellationToken,
    leader_stop: CancellationToken,
    serve_stop: CancellationToken,
    background: Vec<JoinHandle<()>>,
}

impl Tasks {
    fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.background.push(tokio::spawn(task));
    }
}

/// What every part of a controller shares, built once at start.
struct Shared {
    client: kube::Client,
    identity: String,
    store: Arc<Store>,
    metrics: ControllerMetrics,
    registry: Arc<AgentRegistry>,
    wakes: Arc<WakeGate>,
    alerts: Arc<AlertBook>,
    leading: watch::Receiver<bool>,
}

/// The feeds the rest is built on.
struct Feeds {
    /// The policies as the UI and scheduled reports see them (every instance watches).
    policies: PolicyCache,
    notify: notify::NotifyHandle,
    history: History,
    events: EventSink,
    /// The event publisher, joined last (see [`start_with`]).
    publisher: JoinHandle<()>,
}

/// What the UI is built from beyond [`Shared`].
struct UiParts {
    policies: PolicyCache,
    notify: notify::NotifyHandle,
    listener: Option<(tokio::net::TcpListener, SocketAddr)>,
    replication: crate::replication::ReplicationStatus,
    /// Where the UI is served when it has no listener of its own.
    api_addr: SocketAddr,
}

impl Shared {
    /// The alert rules and policies watched, the notifier (with scheduled reports), the
    /// history writer and the event publisher.
    fn start_feeds(
        &self,
        args: &RunArgs,
        files: &mut StartFiles,
        api_addr: SocketAddr,
        epoch: watch::Receiver<u64>,
        tasks: &mut Tasks,
    ) -> Feeds {
        let (rules, rule_feed) = RuleSource::watch(self.client.clone(), tasks.serve_stop.clone());
        tasks.spawn(rule_feed);
        let (policies, feed) = PolicyCache::new();
        tasks.spawn(feed.run(self.client.clone(), tasks.serve_stop.clone()));
        let (notifier, notify, tap) = Notifier::new(
            std::mem::take(&mut files.alert_sinks.sinks),
            Box::new(SecretOutbox::new(
                self.client.clone(),
                &args.lease_namespace,
                &args.alert_outbox_secret,
            )),
            rules,
            notify::sinks::Sender::new(self.identity.clone(), format!("http://{api_addr}/alerts")),
            self.metrics.clone(),
            Some(self.registry.clone()),
            self.leading.clone(),
        );
        let notifier = notifier.with_reports(
            std::mem::take(&mut files.alert_sinks.reports),
            Arc::new(ui::reports::ScheduledReports(UiSources {
                store: self.store.clone(),
                policies: policies.clone(),
                registry: self.registry.clone(),
                alerts: self.alerts.clone(),
                alert_webhook: files.alert_token.is_some(),
                notify: None,
                kube: Some(self.client.clone()),
                prometheus: files.report_prometheus.clone(),
            })),
        );
        tasks.spawn(notifier.run(tasks.core_stop.clone()));
        let (history, writer) = History::new(self.store.clone(), self.metrics.clone(), epoch);
        tasks.spawn(writer);
        let (events, publisher) = EventSink::new(
            self.client.clone(),
            self.identity.clone(),
            self.metrics.clone(),
        );
        Feeds {
            policies,
            notify,
            history: history.with_tap(tap),
            events,
            publisher: tokio::spawn(publisher),
        }
    }

    /// The agents' API: on its own TLS listener when there is one (plain HTTP then
    /// reaches none of its routes), else returned to be served on the API listener.
    fn serve_agents(
        &self,
        args: &RunArgs,
        tls: Option<(tokio::net::TcpListener, TlsSecret)>,
        tasks: &mut Tasks,
    ) -> Option<AgentApi> {
        let agent_api = AgentApi {
            registry: self.registry.clone(),
            wakes: self.wakes.clone(),
            // Each agent's own ServiceAccount token, reviewed and tied to its node: the
            // binary has no shared-token mode (AgentAuth::Shared is for in-process tests).
            auth: AgentAuth::TokenReview(Arc::new(TokenReviewer::new(
                self.client.clone(),
                ReviewConfig::new(
                    &args.agent_token_audience,
                    &args.agent_namespace,
                    &args.agent_service_account,
                ),
                self.metrics.clone(),
            ))),
        };
        let (listener, secret) = match tls {
            Some(tls) => tls,
            None => return Some(agent_api),
        };
        let slot = Arc::new(CertSlot::default());
        tasks.spawn(secret.follow(slot.clone(), tasks.serve_stop.clone()));
        let router = server::limited(
            "agents",
            server::agents_router(agent_api, self.leading.clone()),
            server::API_LIMITS,
            &self.metrics,
        );
        let serve = crate::ui::tls::serve_tls(
            "agents",
            listener,
            crate::agents::tls::server_config(slot),
            router,
            tasks.serve_stop.clone(),
        );
        tasks.spawn(serve);
        None
    }

    /// The API listener's routes: the plain agents' API if it is served there, the
    /// Alertmanager webhook, and the replicas' routes (their own token, their own path).
    fn api_router(
        &self,
        plain_agent_api: Option<AgentApi>,
        files: &StartFiles,
    ) -> (axum::Router, crate::replication::ReplicationStatus) {
        let api = server::api_router(
            plain_agent_api,
            files.alert_token.clone().map(|token| AlertApi {
                book: self.alerts.clone(),
                token,
            }),
            self.leading.clone(),
        );
        match &files.replica_token {
            Some(token) => (
                api.merge(crate::replication::replica_routes(
                    self.store.clone(),
                    token.clone(),
                    self.registry.clone(),
                )),
                crate::replication::ReplicationStatus::default(),
            ),
            None => (api, crate::replication::ReplicationStatus::disabled()),
        }
    }

    /// The web UI, when a password is set: on its own TLS listener, or merged into the
    /// API's routes. Returns the TLS listener's address.
    async fn serve_ui(
        &self,
        args: &RunArgs,
        files: &mut StartFiles,
        parts: UiParts,
        api: &mut axum::Router,
        tasks: &mut Tasks,
    ) -> Result<Option<SocketAddr>, StartError> {
        let Some(password) = files.ui_password.take() else {
            return Ok(None);
        };
        // The UI watches the policies itself (`Feeds::policies`), so a standby shows them.
        let directory = Arc::new(
            Directory::open(
                Backing::secret(
                    self.client.clone(),
                    &args.lease_namespace,
                    &args.ui_accounts_secret,
                ),
                &args.ui_user,
            )
            .await
            .map_err(StartError::UiAccounts)?,
        );
        tasks.spawn(directory.clone().follow(tasks.serve_stop.clone()));
        let state = UiState::new(
            UiConfig {
                user: args.ui_user.clone(),
                session_ttl: args.ui_session_ttl,
                secure_cookie: args.ui_secure_cookie || files.ui_tls.is_some(),
                ..UiConfig::default()
            },
            password,
            directory,
            self.metrics.clone(),
            UiSources {
                store: self.store.clone(),
                policies: parts.policies,
                registry: self.registry.clone(),
                alerts: self.alerts.clone(),
                alert_webhook: files.alert_token.is_some(),
                kube: Some(self.client.clone()),
                notify: Some(parts.notify),
                prometheus: files.report_prometheus.clone(),
            },
        )
        .with_replication(parts.replication);
        match (files.ui_tls.clone(), parts.listener) {
            (Some(tls), Some((listener, addr))) => {
                tasks.spawn(crate::ui::tls::serve(
                    listener,
                    tls,
                    server::limited("ui", ui::router(state), ui::tls::UI_LIMITS, &self.metrics),
                    tasks.serve_stop.clone(),
                ));
                tracing::info!(ui = %format!("https://{addr}/"), "web UI served over TLS on its own listener");
                Ok(Some(addr))
            }
            _ => {
                *api = std::mem::take(api).merge(ui::router(state));
                let api_addr = parts.api_addr;
                tracing::info!(ui = %format!("http://{api_addr}/"), "web UI served on the API listener");
                Ok(None)
            }
        }
    }

    fn serve_api_and_admin(
        &self,
        api: axum::Router,
        (api_listener, admin_listener): (tokio::net::TcpListener, tokio::net::TcpListener),
        synced: watch::Receiver<bool>,
        stop: &CancellationToken,
    ) -> Vec<JoinHandle<Result<(), ServerError>>> {
        let admin = server::admin_router(
            self.metrics.clone(),
            Health {
                leading: self.leading.clone(),
                synced,
            },
        );
        let api = server::limited("api", api, server::API_LIMITS, &self.metrics);
        let admin = server::limited("admin", admin, server::ADMIN_LIMITS, &self.metrics);
        vec![
            tokio::spawn(server::serve("API", api_listener, api, stop.clone())),
            tokio::spawn(server::serve("admin", admin_listener, admin, stop.clone())),
        ]
    }

    /// The reconcile core: it acts only while this instance leads.
    #[allow(clippy::too_many_arguments)]
    fn start_core(
        &self,
        args: &RunArgs,
        history: History,
        events: EventSink,
        wake_rx: tokio::sync::mpsc::Receiver<crate::agents::wake::WakeUp>,
        synced_tx: watch::Sender<bool>,
        term: watch::Receiver<u64>,
        tasks: &Tasks,
    ) -> JoinHandle<()> {
        let ctx = Arc::new(Context {
            client: self.client.clone(),
            registry: self.registry.clone(),
            wakes: self.wakes.clone(),
            alerts: self.alerts.clone(),
            metrics: self.metrics.clone(),
            history,
            events,
            prom: Arc::new(PromPool::new(args.prometheus_url.clone())),
            hold_slices: Arc::new(crate::holdslice::HoldSlices::new(
                self.client.clone(),
                self.registry.clone(),
                args.hold_ports,
            )),
            settings: Settings {
                tick: args.tick_interval,
                sleep_ack_timeout: args.sleep_ack_timeout,
                sample_interval: args.sample_interval,
                status_interval: args.status_interval,
            },
            status_budget: reconcile::status::WriteBudget::new(
                reconcile::status::VALUE_WRITES_PER_SECOND,
            ),
            leading: self.leading.clone(),
            term,
        });
        tokio::spawn(reconcile::run(
            ctx,
            wake_rx,
            synced_tx,
            tasks.core_stop.clone(),
        ))
    }

    /// Leader election on the Lease client, on a runtime of its own when the client is
    /// to be built there: a renewal is then never queued behind policy and agent work
    /// (see [`LeaseClient`]).
    fn start_election(
        &self,
        args: &RunArgs,
        lease_client: LeaseClient,
        history_url: Option<String>,
        (lead_tx, epoch_tx): (watch::Sender<bool>, watch::Sender<u64>),
        tasks: &Tasks,
    ) -> Result<(JoinHandle<()>, Option<tokio::runtime::Runtime>), StartError> {
        let rt = match &lease_client {
            LeaseClient::Shared(_) => None,
            LeaseClient::OwnRuntime(_) => Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("nemesis-leader")
                    .enable_all()
                    .build()
                    .map_err(StartError::LeaderRuntime)?,
            ),
        };
        // Built inside the runtime it will run on, so its request queue runs there.
        let client = {
            let _on = rt.as_ref().map(|rt| rt.enter());
            lease_client.build().map_err(StartError::LeaseClient)?
        };
        let lock = LeaseLock::new(
            client,
            LeaderConfig {
                lease_name: args.lease_name.clone(),
                namespace: args.lease_namespace.clone(),
                identity: self.identity.clone(),
                lease_duration: args.lease_duration,
                renew_deadline: args.renew_deadline,
                retry_period: args.retry_period,
                history_url,
            },
        );
        let election = leader::run(
            lock,
            lead_tx,
            epoch_tx,
            self.metrics.clone(),
            tasks.leader_stop.clone(),
        );
        match rt {
            None => Ok((tokio::spawn(election), None)),
            Some(rt) => Ok((rt.spawn(election), Some(rt))),
        }
    }

    /// A standby's copy of the leader's history and directives.
    fn start_follower(
        &self,
        args: &RunArgs,
        token: crate::replication::ReplicaToken,
        replication: crate::replication::ReplicationStatus,
        tasks: &mut Tasks,
    ) {
        let follower = crate::replication::Follower::new(
            self.client.clone(),
            crate::replication::follow::FollowerConfig {
                namespace: args.lease_namespace.clone(),
                lease_name: args.lease_name.clone(),
                identity: self.identity.clone(),
                token,
                poll: args.retry_period,
            },
            self.store.clone(),
            self.registry.clone(),
            self.metrics.clone(),
            replication,
            self.leading.clone(),
        );
        tasks.spawn(follower.run(tasks.serve_stop.clone()));
    }
}

/// Where the standbys reach this instance: the flag, else the API listener's own address
/// when it is a specific one.
fn history_url(flag: Option<&str>, api_addr: SocketAddr) -> Option<String> {
    match flag {
        Some(url) => Some(url.trim_end_matches('/').to_string()),
        None if api_addr.ip().is_unspecified() => None,
        None => Some(format!("http://{api_addr}")),
    }
}

/// Keeps the live-agents gauge current (warning when they outgrow the open-file limit)
/// and re-reads rotated token files.
async fn maintain(
    registry: Arc<AgentRegistry>,
    metrics: ControllerMetrics,
    tokens: Vec<BearerToken>,
    stop: CancellationToken,
) {
    let mut gauge = tokio::time::interval(Duration::from_secs(1));
    let mut reload = tokio::time::interval(TOKEN_RELOAD_EVERY);
    let limit = crate::open_files::current().ok();
    let mut files = crate::open_files::ShortfallWarning::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = gauge.tick() => {
                let live = registry.live_count(Instant::now());
                metrics.set_live_agents(live);
                files.check(limit, live);
            }
            _ = reload.tick() => {
                for t in &tokens {
                    match t.reload() {
                        Ok(true) => tracing::info!("a rotated token was loaded"),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(err = %e, "re-reading a token file failed; keeping the old token"),
                    }
                }
            }
        }
    }
}

/// Mirrors leadership onto the Pod's leader label (retrying until it sticks).
async fn label_leader_pod(
    client: kube::Client,
    namespace: String,
    pod: String,
    mut leading: watch::Receiver<bool>,
) {
    let mut labelled: Option<bool> = None;
    loop {
        let want = *leading.borrow_and_update();
        if labelled != Some(want) {
            match tokio::time::timeout(
                reconcile::API_TIMEOUT,
                leader::label_pod(client.clone(), &namespace, &pod, want),
            )
            .await
            {
                Ok(Ok(())) => labelled = Some(want),
                Ok(Err(e)) => tracing::warn!(err = %e, "labelling the controller Pod failed"),
                Err(_) => tracing::warn!("labelling the controller Pod timed out"),
            }
        }
        if labelled == Some(want) {
            if leading.changed().await.is_err() {
                return;
            }
        } else {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
