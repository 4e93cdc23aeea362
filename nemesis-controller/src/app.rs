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
use crate::api_client::ApiClients;
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
/// on `clients.main` (see [`crate::api_client`] for why they differ).
pub async fn start_with(args: &RunArgs, clients: ApiClients) -> Result<Running, StartError> {
    let ApiClients {
        main: client,
        lease: lease_client,
        lease_thread,
    } = clients;
    args.validate()?;
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
    let token_secret = crate::replication::TokenSecret::new(
        client.clone(),
        &args.lease_namespace,
        &args.replica_token_secret,
    );
    // Read in the background (`TokenSecret::follow`): an API server down at start
    // delays replication, not the start.
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
    let store = {
        let path = args.store_path.clone();
        let retention = args.retention();
        tokio::task::spawn_blocking(move || Store::open(path, retention))
            .await
            .map_err(StartError::JoinStore)??
    };
    let store = Arc::new(store);
    let identity = args.identity();
    let metrics = ControllerMetrics::new();
    let registry = Arc::new(AgentRegistry::new(RegistryConfig {
        lease: args.agent_lease,
        forget_after: DEFAULT_FORGET_AFTER,
    }));
    let (wakes, wake_rx) = WakeGate::new(DEFAULT_QUEUE, DEFAULT_REFORWARD_AFTER);
    let wakes = Arc::new(wakes);
    let alerts = Arc::new(AlertBook::new());
    let (lead_tx, leading) = watch::channel(false);
    let (epoch_tx, epoch) = watch::channel(0u64);
    let (synced_tx, synced) = watch::channel(false);

    let api_listener = server::bind("API", args.listen).await?;
    let admin_listener = server::bind("admin", args.admin_listen).await?;
    let local = |l: &tokio::net::TcpListener, which, addr| {
        l.local_addr().map_err(|source| ServerError::Bind {
            which,
            addr,
            source,
        })
    };
    let api_addr = local(&api_listener, "API", args.listen)?;
    let admin_addr = local(&admin_listener, "admin", args.admin_listen)?;
    let ui_listener = match &ui_tls {
        Some(_) => Some(server::bind("UI", args.ui_listen).await?),
        None => None,
    };
    let ui_addr = match &ui_listener {
        Some(l) => Some(local(l, "UI", args.ui_listen)?),
        None => None,
    };
    let agent_tls = match &args.agent_tls_secret {
        Some(name) => {
            let listener = server::bind("agents", args.agent_listen).await?;
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
            Some((listener, secret))
        }
        None => None,
    };
    let agent_addr = match &agent_tls {
        Some((l, _)) => Some(local(l, "agents", args.agent_listen)?),
        None => None,
    };

    let core_stop = CancellationToken::new();
    let leader_stop = CancellationToken::new();
    let serve_stop = CancellationToken::new();
    let mut background = Vec::new();

    let (rules, rule_feed) = RuleSource::watch(client.clone(), serve_stop.clone());
    background.push(tokio::spawn(rule_feed));
    // The policies as the UI and scheduled reports see them (every instance watches).
    let (policies, feed) = PolicyCache::new();
    background.push(tokio::spawn(feed.run(client.clone(), serve_stop.clone())));
    let (notifier, notify_handle, tap) = Notifier::new(
        alert_sinks.sinks,
        Box::new(SecretOutbox::new(
            client.clone(),
            &args.lease_namespace,
            &args.alert_outbox_secret,
        )),
        rules,
        notify::sinks::Sender::new(identity.clone(), format!("http://{api_addr}/alerts")),
        metrics.clone(),
        Some(registry.clone()),
        leading.clone(),
    );
    let notifier = notifier.with_reports(
        alert_sinks.reports,
        Arc::new(ui::reports::ScheduledReports(UiSources {
            store: store.clone(),
            policies: policies.clone(),
            registry: registry.clone(),
            alerts: alerts.clone(),
            alert_webhook: alert_token.is_some(),
            notify: None,
            kube: Some(client.clone()),
            prometheus: report_prometheus.clone(),
        })),
    );
    background.push(tokio::spawn(notifier.run(core_stop.clone())));
    let term = epoch.clone();
    let (history, writer) = History::new(store.clone(), metrics.clone(), epoch);
    let history = history.with_tap(tap);
    background.push(tokio::spawn(writer));
    let (events, publisher) = EventSink::new(client.clone(), identity.clone(), metrics.clone());
    let publisher = tokio::spawn(publisher);

    let agent_api = AgentApi {
        registry: registry.clone(),
        wakes: wakes.clone(),
        // Each agent's own ServiceAccount token, reviewed and tied to its node: the
        // binary has no shared-token mode (AgentAuth::Shared is for in-process tests).
        auth: AgentAuth::TokenReview(Arc::new(TokenReviewer::new(
            client.clone(),
            ReviewConfig::new(
                &args.agent_token_audience,
                &args.agent_namespace,
                &args.agent_service_account,
            ),
            metrics.clone(),
        ))),
    };
    // With TLS the agents' routes leave the plain listener: plain HTTP reaches none.
    let (plain_agent_api, agent_server) = match agent_tls {
        Some((listener, secret)) => {
            let slot = Arc::new(CertSlot::default());
            background.push(tokio::spawn(
                secret.follow(slot.clone(), serve_stop.clone()),
            ));
            let router = server::limited(
                "agents",
                server::agents_router(agent_api, leading.clone()),
                server::API_LIMITS,
                &metrics,
            );
            let serve = crate::ui::tls::serve_tls(
                "agents",
                listener,
                crate::agents::tls::server_config(slot),
                router,
                serve_stop.clone(),
            );
            (None, Some(tokio::spawn(serve)))
        }
        None => (Some(agent_api), None),
    };
    if let Some(s) = agent_server {
        background.push(s);
    }
    let mut api = server::api_router(
        plain_agent_api,
        alert_token.clone().map(|token| AlertApi {
            book: alerts.clone(),
            token,
        }),
        leading.clone(),
    );
    let replication = match &replica_token {
        Some(token) => {
            // Apart from the agents' routes: its own token, its own path.
            api = api.merge(crate::replication::replica_routes(
                store.clone(),
                token.clone(),
                registry.clone(),
            ));
            crate::replication::ReplicationStatus::default()
        }
        None => crate::replication::ReplicationStatus::disabled(),
    };
    let history_url = replica_token
        .as_ref()
        .and_then(|_| history_url(args.history_url.as_deref(), api_addr));
    if replica_token.is_some() && history_url.is_none() {
        tracing::warn!(listen = %api_addr, "no --history-url and the API listener has no specific address: the standbys cannot pull this instance's history while it leads");
    }
    if let Some(token) = &replica_token {
        background.push(tokio::spawn(
            token_secret.follow(token.clone(), serve_stop.clone()),
        ));
    }
    let mut ui_server = None;
    if let Some(password) = ui_password {
        // The UI watches the policies itself (above), so a standby shows them too.
        let directory = Arc::new(
            Directory::open(
                Backing::secret(
                    client.clone(),
                    &args.lease_namespace,
                    &args.ui_accounts_secret,
                ),
                &args.ui_user,
            )
            .await
            .map_err(StartError::UiAccounts)?,
        );
        background.push(tokio::spawn(directory.clone().follow(serve_stop.clone())));
        let state = UiState::new(
            UiConfig {
                user: args.ui_user.clone(),
                session_ttl: args.ui_session_ttl,
                secure_cookie: args.ui_secure_cookie || ui_tls.is_some(),
                ..UiConfig::default()
            },
            password,
            directory,
            metrics.clone(),
            UiSources {
                store: store.clone(),
                policies,
                registry: registry.clone(),
                alerts: alerts.clone(),
                alert_webhook: alert_token.is_some(),
                kube: Some(client.clone()),
                notify: Some(notify_handle),
                prometheus: report_prometheus,
            },
        )
        .with_replication(replication.clone());
        match (ui_tls.clone(), ui_listener, ui_addr) {
            (Some(tls), Some(listener), Some(addr)) => {
                ui_server = Some(tokio::spawn(crate::ui::tls::serve(
                    listener,
                    tls,
                    server::limited("ui", ui::router(state), ui::tls::UI_LIMITS, &metrics),
                    serve_stop.clone(),
                )));
                tracing::info!(ui = %format!("https://{addr}/"), "web UI served over TLS on its own listener");
            }
            _ => {
                api = api.merge(ui::router(state));
                tracing::info!(ui = %format!("http://{api_addr}/"), "web UI served on the API listener");
            }
        }
    }
    if let Some(ui_server) = ui_server {
        background.push(ui_server);
    }
    let admin = server::admin_router(
        metrics.clone(),
        Health {
            leading: leading.clone(),
            synced,
        },
    );
    let api = server::limited("api", api, server::API_LIMITS, &metrics);
    let admin = server::limited("admin", admin, server::ADMIN_LIMITS, &metrics);
    let servers = vec![
        tokio::spawn(server::serve("API", api_listener, api, serve_stop.clone())),
        tokio::spawn(server::serve(
            "admin",
            admin_listener,
            admin,
            serve_stop.clone(),
        )),
    ];

    let ctx = Arc::new(Context {
        client: client.clone(),
        registry: registry.clone(),
        wakes,
        alerts,
        metrics: metrics.clone(),
        history,
        events,
        prom: Arc::new(PromPool::new(args.prometheus_url.clone())),
        hold_slices: Arc::new(crate::holdslice::HoldSlices::new(
            client.clone(),
            registry.clone(),
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
        leading: leading.clone(),
        term,
    });
    let core = tokio::spawn(reconcile::run(ctx, wake_rx, synced_tx, core_stop.clone()));

    let lock = LeaseLock::new(
        lease_client,
        LeaderConfig {
            lease_name: args.lease_name.clone(),
            namespace: args.lease_namespace.clone(),
            identity: identity.clone(),
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
        metrics.clone(),
        leader_stop.clone(),
    );
    // On a runtime of its own when asked: a renewal is then never queued behind policy
    // and agent work (see `ApiClients::lease_thread`).
    let (leader, leader_runtime) = if lease_thread {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nemesis-leader")
            .enable_all()
            .build()
            .map_err(StartError::LeaderRuntime)?;
        (rt.spawn(election), Some(rt))
    } else {
        (tokio::spawn(election), None)
    };

    if let Some(token) = replica_token.clone() {
        let follower = crate::replication::Follower::new(
            client.clone(),
            crate::replication::follow::FollowerConfig {
                namespace: args.lease_namespace.clone(),
                lease_name: args.lease_name.clone(),
                identity: identity.clone(),
                token,
                poll: args.retry_period,
            },
            store.clone(),
            registry.clone(),
            metrics.clone(),
            replication,
            leading.clone(),
        );
        background.push(tokio::spawn(follower.run(serve_stop.clone())));
    }
    background.push(tokio::spawn(maintain(
        registry.clone(),
        metrics.clone(),
        alert_token.into_iter().collect(),
        serve_stop.clone(),
    )));
    if let Some(pod) = args.pod_name.clone() {
        background.push(tokio::spawn(label_leader_pod(
            client,
            args.lease_namespace.clone(),
            pod,
            leading.clone(),
        )));
    }
    // Events outlive the core only as long as the publisher drains its queue.
    background.push(publisher);

    tracing::info!(%api_addr, %admin_addr, agent_tls = ?agent_addr, %identity, "controller started");
    Ok(Running {
        api_addr,
        ui_addr: ui_addr.filter(|_| ui_tls.is_some()),
        admin_addr,
        agent_addr,
        identity,
        metrics,
        registry,
        store,
        leading,
        core_stop,
        leader_stop,
        serve_stop,
        core: Some(core),
        leader: Some(leader),
        leader_runtime,
        servers,
        background,
    })
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
