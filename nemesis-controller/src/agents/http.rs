//! The HTTP endpoints agents call (`POST /v1/agents/heartbeat`, `POST /v1/agents/wake`):
//! authentication before any body is read (see `identity`), each agent only for its
//! own node, bounded bodies, and JSON errors that say
//! what was wrong. Handlers only translate; the registry and the wake gate decide.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router, middleware};
use http::StatusCode;
use nemesis_common::wire::{
    Heartbeat, HeartbeatReply, LoadReply, LoadReport, MAX_HEARTBEAT_REPORTS, ServiceRef, WakeReply,
    WakeRequest,
};
use tokio::time::Instant;

use super::identity::{AgentAuth, AgentIdentity, check_node, require_agent};
use super::registry::AgentRegistry;
use super::wake::{WakeGate, WakeOutcome};

pub const HEARTBEAT_PATH: &str = "/v1/agents/heartbeat";
pub const WAKE_PATH: &str = "/v1/agents/wake";
pub const LOADS_PATH: &str = "/v1/agents/loads";

/// A full heartbeat carries one report per Service the agent knows (about 250 bytes
/// each; later ones only the changed and active reports): 8 MiB is room for the
/// [`MAX_HEARTBEAT_REPORTS`] bound.
pub const MAX_HEARTBEAT_BYTES: usize = 8 << 20;
/// A load report lists open connections per backend (about 50 bytes each): 4 MiB is
/// room for about 80,000 backends of balanced Services per node.
pub const MAX_LOADS_BYTES: usize = 4 << 20;
/// A wake-up names one Service.
pub const MAX_WAKE_BYTES: usize = 16 << 10;

/// What the agent endpoints share.
#[derive(Clone, Debug)]
pub struct AgentApi {
    pub registry: Arc<AgentRegistry>,
    pub wakes: Arc<WakeGate>,
    pub auth: AgentAuth,
}

/// The agent endpoints, authenticated by `api.auth`; with per-agent tokens a caller
/// speaks only for its own node (heartbeats, and the acknowledgements they carry, and
/// wake-ups).
pub fn agent_routes(api: AgentApi) -> Router {
    let auth = api.auth.clone();
    Router::new()
        .route(
            HEARTBEAT_PATH,
            post(heartbeat).layer(DefaultBodyLimit::max(MAX_HEARTBEAT_BYTES)),
        )
        .route(
            WAKE_PATH,
            post(wake).layer(DefaultBodyLimit::max(MAX_WAKE_BYTES)),
        )
        .route(
            LOADS_PATH,
            post(loads).layer(DefaultBodyLimit::max(MAX_LOADS_BYTES)),
        )
        .route_layer(middleware::from_fn_with_state(auth, require_agent))
        .with_state(api)
}

/// An error answer: the status and `{"error": "<message>"}`. The message is written for
/// the client and never carries internals such as file paths or secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// Turns axum's JSON extraction failure into a clear answer: 400 for malformed JSON,
    /// 422 for JSON of the wrong shape, 413 for a body over the limit, 415 for a missing
    /// JSON content type.
    pub fn from_json_rejection(what: &str, limit: usize, r: JsonRejection) -> Self {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the {what} body is larger than the limit of {limit} bytes")
        } else {
            format!("invalid {what} body: {}", r.body_text())
        };
        Self { status, message }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

fn check_service(what: &str, svc: &ServiceRef) -> Result<(), ApiError> {
    if svc.namespace.is_empty() || svc.name.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{what}: service namespace and name must not be empty"),
        ));
    }
    Ok(())
}

/// What a decoded heartbeat must hold before the registry sees it. Pure (the fuzz
/// target `agent_api` calls it as the handler does).
pub fn check_heartbeat(hb: &Heartbeat) -> Result<(), ApiError> {
    if hb.node.is_empty() || hb.instance.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "heartbeat: `node` and `instance` must not be empty",
        ));
    }
    let listed = hb.services.len() + hb.gone.len();
    if listed > MAX_HEARTBEAT_REPORTS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("heartbeat: {listed} services and gone, at most {MAX_HEARTBEAT_REPORTS}"),
        ));
    }
    if !hb.gone.is_empty() && hb.reports_since.is_none() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "heartbeat: `gone` is only meaningful with `reportsSince`",
        ));
    }
    for (i, r) in hb.services.iter().enumerate() {
        check_service(&format!("heartbeat: services[{i}]"), &r.service)?;
    }
    for (i, svc) in hb.gone.iter().enumerate() {
        check_service(&format!("heartbeat: gone[{i}]"), svc)?;
    }
    Ok(())
}

/// What a decoded load report must hold before the board keeps it. Pure.
pub fn check_loads(report: &LoadReport) -> Result<(), ApiError> {
    use super::loads::{MAX_REPORT_BACKENDS, MAX_REPORT_SERVICES};
    if report.node.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "loads: `node` must not be empty",
        ));
    }
    if report.services.len() > MAX_REPORT_SERVICES {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "loads: {} services, at most {MAX_REPORT_SERVICES}",
                report.services.len()
            ),
        ));
    }
    for (i, s) in report.services.iter().enumerate() {
        check_service(&format!("loads: services[{i}]"), &s.service)?;
        if s.backends.len() > MAX_REPORT_BACKENDS {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "loads: services[{i}] has {} backends, at most {MAX_REPORT_BACKENDS}",
                    s.backends.len()
                ),
            ));
        }
    }
    Ok(())
}

/// What a decoded wake-up must hold before the wake gate sees it. Pure.
pub fn check_wake(req: &WakeRequest) -> Result<(), ApiError> {
    if req.node.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "wake: `node` must not be empty",
        ));
    }
    check_service("wake", &req.service)
}

impl From<super::identity::Refusal> for ApiError {
    fn from(r: super::identity::Refusal) -> Self {
        ApiError::new(r.status(), r.message)
    }
}

async fn heartbeat(
    State(api): State<AgentApi>,
    identity: Option<Extension<AgentIdentity>>,
    body: Result<Json<Heartbeat>, JsonRejection>,
) -> Result<Json<HeartbeatReply>, ApiError> {
    let Json(hb) =
        body.map_err(|r| ApiError::from_json_rejection("heartbeat", MAX_HEARTBEAT_BYTES, r))?;
    check_heartbeat(&hb)?;
    check_node(&api.auth, identity.as_deref(), "heartbeat", &hb.node)?;
    tracing::debug!(node = %hb.node, services = hb.services.len(), "heartbeat");
    Ok(Json(api.registry.heartbeat(hb, Instant::now())))
}

async fn loads(
    State(api): State<AgentApi>,
    identity: Option<Extension<AgentIdentity>>,
    body: Result<Json<LoadReport>, JsonRejection>,
) -> Result<Json<LoadReply>, ApiError> {
    let Json(report) =
        body.map_err(|r| ApiError::from_json_rejection("loads", MAX_LOADS_BYTES, r))?;
    check_loads(&report)?;
    // An agent reports only its own node's load: another node's would steer every
    // node's choices.
    check_node(&api.auth, identity.as_deref(), "loads", &report.node)?;
    Ok(Json(api.registry.loads().report(report, Instant::now())))
}

async fn wake(
    State(api): State<AgentApi>,
    identity: Option<Extension<AgentIdentity>>,
    body: Result<Json<WakeRequest>, JsonRejection>,
) -> Result<Json<WakeReply>, ApiError> {
    let Json(req) = body.map_err(|r| ApiError::from_json_rejection("wake", MAX_WAKE_BYTES, r))?;
    check_wake(&req)?;
    check_node(&api.auth, identity.as_deref(), "wake-up", &req.node)?;
    let outcome = api.wakes.wake(&req, Instant::now());
    tracing::info!(service = %req.service, node = %req.node, held = req.held_connections, ?outcome, "wake-up");
    let (accepted, message) = match outcome {
        WakeOutcome::Forwarded => (true, format!("waking {}", req.service)),
        WakeOutcome::AlreadyWaking => (true, format!("{} is already waking", req.service)),
        WakeOutcome::NotManaged => (false, format!("no ScalingPolicy manages {}", req.service)),
        WakeOutcome::CoreUnavailable => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the controller cannot take wake-ups right now; retry",
            ));
        }
        WakeOutcome::NotSynced => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the controller is still listing its policies after taking the lead; retry",
            ));
        }
    };
    Ok(Json(WakeReply { accepted, message }))
}
