//! The web UI and its JSON API: users with roles (viewer, operator, admin) who log in
//! with a password, API tokens for automation, the pages (served from the repository's
//! `ui/` folder, embedded at build time), analytics over the history store, the policy
//! cache, the agent registry and the alert book, and the few changes people make
//! (pause, resume, apply a policy; users and tokens), each behind its least role. It
//! never scales or decides anything: policy changes go through the Kubernetes API.
//!
//! Routes (on the controller's API listener beside the agents' `/v1/...`, or on a TLS
//! listener of their own, see [`tls`]): pages `/`, `/policies/{namespace}/{name}`,
//! `/agents`, `/alerts`, `/reports`, `/login`, ...; assets under `/assets/`; `POST /login`,
//! `POST /logout`; JSON under `/api/v1/` (see [`api`], [`users`], [`edit`]).

pub mod accounts;
pub mod api;
pub mod assets;
pub mod directory;
pub mod edit;
pub mod error;
pub mod events;
pub mod guard;
pub mod limit;
pub mod lockout;
pub mod login;
pub mod outbox;
pub mod password;
pub mod policies;
pub mod report;
pub mod reports;
pub mod role;
pub mod session;
pub mod tls;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{delete, get, post, put};

use crate::agents::{AgentRegistry, RegistryConfig};
use crate::alerts::AlertBook;
use crate::metrics::ControllerMetrics;
use crate::store::Store;

pub use directory::{Backing, Directory};
pub use error::UiError;
pub use limit::LimitConfig;
pub use lockout::LockoutConfig;
pub use password::AdminPassword;
pub use policies::{PolicyCache, PolicyFeed};
pub use role::Role;

/// The user name the demo and the manifests log in with.
pub const DEFAULT_USER: &str = "admin";
/// A working day: an operator logs in once in the morning; a stolen cookie is worth at
/// most this long.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// A session nobody used for an hour ends (a laptop left open elsewhere).
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(3600);
/// A login body is two short strings; anything bigger is not a login.
pub const MAX_LOGIN_BODY_BYTES: usize = 8 << 10;
/// The largest body any UI request has: a policy's YAML (the biggest real ones are a
/// few KiB; an object in etcd is at most 1.5 MiB, but a policy that size is a mistake).
pub const MAX_BODY_BYTES: usize = 256 << 10;

/// How the UI authenticates.
#[derive(Debug, Clone)]
pub struct UiConfig {
    /// The built-in admin's user name (its password is the controller's password file;
    /// other users live in the accounts Secret).
    pub user: String,
    /// A session ends this long after login, used or not.
    pub session_ttl: Duration,
    /// A session ends after this long without a request.
    pub session_idle: Duration,
    /// Mark the cookies `Secure` (always when the controller serves the UI over TLS;
    /// set it too behind a TLS-terminating ingress; a browser drops `Secure` cookies
    /// over HTTP).
    pub secure_cookie: bool,
    pub login_limit: LimitConfig,
    pub lockout: LockoutConfig,
}

impl Default for UiConfig {
    fn default() -> Self {
        Self {
            user: DEFAULT_USER.to_string(),
            session_ttl: DEFAULT_SESSION_TTL,
            session_idle: DEFAULT_SESSION_IDLE,
            secure_cookie: false,
            login_limit: LimitConfig::default(),
            lockout: LockoutConfig::default(),
        }
    }
}

/// What the UI reads: the same objects the core writes.
#[derive(Clone)]
pub struct UiSources {
    pub store: Arc<Store>,
    pub policies: PolicyCache,
    pub registry: Arc<AgentRegistry>,
    pub alerts: Arc<AlertBook>,
    /// Whether the Alertmanager webhook is served (else no alert can ever fire).
    pub alert_webhook: bool,
    /// How policy changes are made and Deployments' pod requests read for reports
    /// (`None`: the UI cannot change policies; reports count resources per replica only).
    pub kube: Option<kube::Client>,
    /// Alerts out (the outbox and the sinks); `None` where no notifier runs.
    pub notify: Option<crate::notify::NotifyHandle>,
    /// The Prometheus reports read measured usage and the policies' `spec.reports`
    /// series from (`None`: no `--prometheus-url`).
    pub prometheus: Option<reports::ReportPrometheus>,
}

impl UiSources {
    /// A UI over this history and these policies alone, as benchmarks and tests run it:
    /// no Kubernetes client, notifier or Prometheus; no agents and no alerts yet; the
    /// Alertmanager webhook served.
    pub fn local(store: Arc<Store>, policies: PolicyCache) -> Self {
        Self {
            store,
            policies,
            registry: Arc::new(AgentRegistry::new(RegistryConfig::default())),
            alerts: Arc::new(AlertBook::new()),
            alert_webhook: true,
            kube: None,
            notify: None,
            prometheus: None,
        }
    }
}

/// Everything the handlers share; cheap to clone.
#[derive(Clone)]
pub struct UiState {
    pub(crate) config: Arc<UiConfig>,
    pub(crate) password: Arc<AdminPassword>,
    pub(crate) directory: Arc<Directory>,
    pub(crate) limiter: Arc<limit::LoginLimiter>,
    pub(crate) lockout: Arc<lockout::UserLockout>,
    pub(crate) metrics: ControllerMetrics,
    pub(crate) sources: UiSources,
    /// How current this instance's history is (a standby pulls the leader's).
    pub(crate) replication: crate::replication::ReplicationStatus,
}

impl UiState {
    /// The UI's state over `directory` (whose built-in admin must be `config.user`).
    pub fn new(
        config: UiConfig,
        password: AdminPassword,
        directory: Arc<Directory>,
        metrics: ControllerMetrics,
        sources: UiSources,
    ) -> Self {
        Self {
            limiter: Arc::new(limit::LoginLimiter::new(config.login_limit)),
            lockout: Arc::new(lockout::UserLockout::new(config.lockout)),
            password: Arc::new(password),
            config: Arc::new(config),
            directory,
            metrics,
            sources,
            replication: crate::replication::ReplicationStatus::disabled(),
        }
    }

    /// Shows `status` at `GET /api/v1/replication` (default: replication disabled).
    pub fn with_replication(mut self, status: crate::replication::ReplicationStatus) -> Self {
        self.replication = status;
        self
    }

    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }
}

/// A route layer that lets through only principals with at least `role`.
fn least(state: &UiState, role: Role) -> guard::Need {
    guard::Need {
        ui: state.clone(),
        role,
    }
}

/// The UI's routes. Serve the router with `into_make_service_with_connect_info::<SocketAddr>`
/// so logins are rate-limited per client address (without it, only the global limit holds).
pub fn router(state: UiState) -> Router {
    // Changes an operator may make.
    let operator = Router::new()
        .route("/api/alerts/{id}/ack", post(outbox::acknowledge))
        .route(
            "/api/v1/policies/{namespace}/{name}/pause",
            post(edit::pause),
        )
        .route(
            "/api/v1/policies/{namespace}/{name}/resume",
            post(edit::resume),
        )
        .route_layer(middleware::from_fn_with_state(
            least(&state, Role::Operator),
            guard::require_role,
        ));
    // Policy editing and who may use the UI: admins only (reading users and tokens too:
    // the list says who holds which role).
    let admin = Router::new()
        .route("/api/v1/policy-drafts/validate", post(edit::validate))
        .route("/api/v1/policy-drafts/apply", post(edit::apply))
        .route(
            "/api/v1/users",
            get(users::list_users).post(users::create_user),
        )
        .route(
            "/api/v1/users/{name}",
            put(users::change_user).delete(users::delete_user),
        )
        .route(
            "/api/v1/tokens",
            get(users::list_tokens).post(users::create_token),
        )
        .route("/api/v1/tokens/{id}", delete(users::delete_token))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .route_layer(middleware::from_fn_with_state(
            least(&state, Role::Admin),
            guard::require_role,
        ));
    let api = Router::new()
        .route("/api/v1/session", get(login::session_info))
        .route("/api/v1/policies", get(api::policies))
        .route("/api/v1/policies/{namespace}/{name}", get(api::policy))
        .route(
            "/api/v1/policies/{namespace}/{name}/history",
            get(api::history),
        )
        .route("/api/v1/agents", get(api::agents))
        .route("/api/v1/replication", get(api::replication))
        .route("/api/v1/alerts", get(api::alerts))
        .route("/api/v1/events", get(events::events))
        .route("/api/v1/stream", get(events::stream))
        .route("/api/v1/reports/summary", get(report::summary))
        // Alerts out (issue 11): the paths the UI pages and the role checks rely on.
        .route("/api/alerts", get(outbox::alerts))
        .route("/api/sinks", get(outbox::sinks))
        .route("/api/reports", get(reports::report))
        .route("/logout", post(login::logout))
        // No route here takes a body; one that starts to must raise this on purpose.
        .layer(DefaultBodyLimit::max(0))
        .merge(operator)
        .merge(admin)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            guard::require_session,
        ));
    let pages = Router::new()
        .route("/", get(assets::app_page))
        .route("/policies/{namespace}/{name}", get(assets::app_page))
        .route("/agents", get(assets::app_page))
        .route("/alerts", get(assets::app_page))
        .route("/reports", get(assets::app_page))
        .route("/events", get(assets::app_page))
        .route("/edit", get(assets::app_page))
        .route("/users", get(assets::app_page))
        .route("/tokens", get(assets::app_page))
        .route(
            "/login",
            get(assets::login_page)
                .post(login::login)
                .layer(DefaultBodyLimit::max(MAX_LOGIN_BODY_BYTES)),
        )
        .route("/assets/{file}", get(assets::asset));
    api.merge(pages)
        .layer(middleware::from_fn(guard::security_headers))
        .with_state(state)
}
