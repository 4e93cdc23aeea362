//! The web UI and its JSON API: password login with session cookies, the pages (served
//! from the repository's `ui/` folder, embedded at build time), and read-only analytics
//! over the history store, the policy cache, the agent registry and the alert book.
//! It only reads what the core keeps; it never scales, patches or decides anything.
//!
//! Routes (all on the controller's API listener, beside the agents' `/v1/...`):
//! pages `/`, `/policies/{namespace}/{name}`, `/agents`, `/alerts`, `/login`; assets under
//! `/assets/`; `POST /login`, `POST /logout`; JSON under `/api/v1/` (see [`api`]).

pub mod api;
pub mod assets;
pub mod error;
pub mod guard;
pub mod limit;
pub mod login;
pub mod outbox;
pub mod password;
pub mod policies;
pub mod report;
pub mod reports;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};

use crate::agents::AgentRegistry;
use crate::alerts::AlertBook;
use crate::store::Store;

pub use error::UiError;
pub use limit::LimitConfig;
pub use password::AdminPassword;
pub use policies::{PolicyCache, PolicyFeed};

/// The user name the demo and the manifests log in with.
pub const DEFAULT_USER: &str = "admin";
/// A working day: an operator logs in once in the morning; a stolen cookie is worth at
/// most this long.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// A session nobody used for an hour ends (a laptop left open elsewhere).
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(3600);
/// Sessions kept at once; a few operators need a handful each. Past it the least
/// recently used one ends, so logins cannot grow memory without bound.
pub const DEFAULT_MAX_SESSIONS: usize = 256;
/// A login body is two short strings; anything bigger is not a login.
pub const MAX_LOGIN_BODY_BYTES: usize = 8 << 10;

/// How the UI authenticates.
#[derive(Debug, Clone)]
pub struct UiConfig {
    /// The one user name accepted (with the admin password).
    pub user: String,
    /// A session ends this long after login, used or not.
    pub session_ttl: Duration,
    /// A session ends after this long without a request.
    pub session_idle: Duration,
    pub max_sessions: usize,
    /// Mark the session cookie `Secure` (set it when the UI is reached over HTTPS only,
    /// e.g. behind a TLS-terminating ingress; a browser drops `Secure` cookies over HTTP).
    pub secure_cookie: bool,
    pub login_limit: LimitConfig,
}

impl Default for UiConfig {
    fn default() -> Self {
        Self {
            user: DEFAULT_USER.to_string(),
            session_ttl: DEFAULT_SESSION_TTL,
            session_idle: DEFAULT_SESSION_IDLE,
            max_sessions: DEFAULT_MAX_SESSIONS,
            secure_cookie: false,
            login_limit: LimitConfig::default(),
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
    /// Alerts out (the outbox and the sinks); `None` where no notifier runs.
    pub notify: Option<crate::notify::NotifyHandle>,
    /// Reads Deployments' pod requests for reports; `None`: resources counted per replica only.
    pub client: Option<kube::Client>,
}

/// Everything the handlers share; cheap to clone.
#[derive(Clone)]
pub struct UiState {
    pub(crate) config: Arc<UiConfig>,
    pub(crate) password: Arc<AdminPassword>,
    pub(crate) sessions: Arc<session::SessionBook>,
    pub(crate) limiter: Arc<limit::LoginLimiter>,
    pub(crate) sources: UiSources,
}

impl UiState {
    pub fn new(config: UiConfig, password: AdminPassword, sources: UiSources) -> Self {
        Self {
            sessions: Arc::new(session::SessionBook::new(
                config.session_ttl,
                config.session_idle,
                config.max_sessions,
            )),
            limiter: Arc::new(limit::LoginLimiter::new(config.login_limit)),
            password: Arc::new(password),
            config: Arc::new(config),
            sources,
        }
    }
}

/// The UI's routes. Serve the router with `into_make_service_with_connect_info::<SocketAddr>`
/// so logins are rate-limited per client address (without it, only the global limit holds).
pub fn router(state: UiState) -> Router {
    let api = Router::new()
        .route("/api/v1/session", get(login::session_info))
        .route("/api/v1/policies", get(api::policies))
        .route("/api/v1/policies/{namespace}/{name}", get(api::policy))
        .route(
            "/api/v1/policies/{namespace}/{name}/history",
            get(api::history),
        )
        .route("/api/v1/agents", get(api::agents))
        .route("/api/v1/alerts", get(api::alerts))
        .route("/api/v1/reports/summary", get(report::summary))
        // Alerts out (issue 11): the paths the UI pages and the role checks rely on.
        .route("/api/alerts", get(outbox::alerts))
        .route("/api/alerts/{id}/ack", post(outbox::acknowledge))
        .route("/api/sinks", get(outbox::sinks))
        .route("/api/reports", get(reports::report))
        .route("/logout", post(login::logout))
        // No route here takes a body; one that starts to must raise this on purpose.
        .layer(DefaultBodyLimit::max(0))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            guard::require_session,
        ));
    let pages = Router::new()
        .route("/", get(assets::app_page))
        .route("/policies/{namespace}/{name}", get(assets::app_page))
        .route("/agents", get(assets::app_page))
        .route("/alerts", get(assets::app_page))
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
