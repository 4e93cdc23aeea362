//! The agent's admin HTTP server, on a listener of its own apart from the proxy:
//! `/metrics` (Prometheus text), `/healthz` (the process serves) and `/readyz` (every
//! readiness condition holds). Owns these routes; never any user traffic. Served with
//! [`ADMIN_LIMITS`] (`nemesis_common::serve`), refusals counted in
//! `nemesis_agent_http_rejected_total{listener="admin", reason}`.
#![deny(unsafe_code)]

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use nemesis_common::serve::{LimitedRouter, Limits, RejectionCounter};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// No admin route takes a body; Prometheus gives up a scrape after 10 s (its default
/// `scrape_timeout`), so an answer later than that is wasted.
pub const ADMIN_LIMITS: Limits = Limits {
    max_body_bytes: 0,
    request_timeout: Duration::from_secs(10),
    ..Limits::with_max_body(0)
};

/// Named conditions that must all hold for the agent to be ready (e.g. "datapath",
/// "proxy", "endpoints"). Ready needs at least one condition, so an agent that has not
/// registered any is not ready.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Each condition, and why it does not hold when something said so.
    conditions: Mutex<BTreeMap<String, (bool, Option<String>)>>,
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set(&self, condition: &str, ok: bool) {
        let mut conditions = self.conditions.lock().expect("readiness lock");
        let why = conditions.remove(condition).and_then(|(_, why)| why);
        conditions.insert(condition.to_string(), (ok, if ok { None } else { why }));
    }

    /// Why `condition` does not hold (shown by `/readyz` while it does not); cleared
    /// when it next holds.
    pub fn explain(&self, condition: &str, why: String) {
        let mut conditions = self.conditions.lock().expect("readiness lock");
        let entry = conditions
            .entry(condition.to_string())
            .or_insert((false, None));
        entry.1 = Some(why);
    }

    /// Ready, or the conditions that do not hold.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let conditions = self.conditions.lock().expect("readiness lock");
        if conditions.is_empty() {
            return Err(vec!["no readiness condition registered yet".into()]);
        }
        let failing: Vec<String> = conditions
            .iter()
            .filter(|(_, (ok, _))| !*ok)
            .map(|(name, (_, why))| match why {
                Some(why) => format!("{name} ({why})"),
                None => name.clone(),
            })
            .collect();
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing)
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub readiness: Arc<Readiness>,
    /// Where the listener counts what its limits refused (registered in `registry`).
    pub http_rejected: RejectionCounter,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("serving the admin endpoints: {0}")]
    Serve(std::io::Error),
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match crate::metrics::encode_text(&state.registry) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(?err, "encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match state.readiness.check() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(failing) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", failing.join(", ")),
        )
            .into_response(),
    }
}

/// Serve the admin routes on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    serve_with(listener, state, ADMIN_LIMITS, shutdown).await
}

/// [`serve`] with other limits (tests shorten the timeouts).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: AdminState,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let rejected = state.http_rejected.clone();
    let routes = LimitedRouter::new("admin", router(state), limits, rejected);
    nemesis_common::serve::serve(listener, routes, shutdown)
        .await
        .map_err(AdminError::Serve)
}
