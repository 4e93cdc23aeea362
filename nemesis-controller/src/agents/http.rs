//! The HTTP endpoints agents call (`POST /v1/agents/heartbeat`, `POST /v1/agents/wake`):
//! bearer-token auth before any body is read, bounded bodies, and JSON errors that say
//! what was wrong. Handlers only translate; the registry and the wake gate decide.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router, middleware};
use http::StatusCode;
use nemesis_common::wire::{Heartbeat, HeartbeatReply, ServiceRef, WakeReply, WakeRequest};
use tokio::time::Instant;

use super::registry::AgentRegistry;
use super::wake::{WakeGate, WakeOutcome};
use crate::auth::{BearerToken, require_bearer};

pub const HEARTBEAT_PATH: &str = "/v1/agents/heartbeat";
pub const WAKE_PATH: &str = "/v1/agents/wake";

/// A heartbeat carries one report per Service the agent knows (about 250 bytes each):
/// 1 MiB is room for about 4,000 Services per node.
pub const MAX_HEARTBEAT_BYTES: usize = 1 << 20;
/// A wake-up names one Service.
pub const MAX_WAKE_BYTES: usize = 16 << 10;

/// What the agent endpoints share.
#[derive(Clone, Debug)]
pub struct AgentApi {
    pub registry: Arc<AgentRegistry>,
    pub wakes: Arc<WakeGate>,
    pub token: BearerToken,
}

/// The agent endpoints, authenticated with `api.token`.
pub fn agent_routes(api: AgentApi) -> Router {
    let token = api.token.clone();
    Router::new()
        .route(
            HEARTBEAT_PATH,
            post(heartbeat).layer(DefaultBodyLimit::max(MAX_HEARTBEAT_BYTES)),
        )
        .route(
            WAKE_PATH,
            post(wake).layer(DefaultBodyLimit::max(MAX_WAKE_BYTES)),
        )
        .route_layer(middleware::from_fn_with_state(token, require_bearer))
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
    for (i, r) in hb.services.iter().enumerate() {
        check_service(&format!("heartbeat: services[{i}]"), &r.service)?;
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

async fn heartbeat(
    State(api): State<AgentApi>,
    body: Result<Json<Heartbeat>, JsonRejection>,
) -> Result<Json<HeartbeatReply>, ApiError> {
    let Json(hb) =
        body.map_err(|r| ApiError::from_json_rejection("heartbeat", MAX_HEARTBEAT_BYTES, r))?;
    check_heartbeat(&hb)?;
    tracing::debug!(node = %hb.node, services = hb.services.len(), "heartbeat");
    Ok(Json(api.registry.heartbeat(hb, Instant::now())))
}

async fn wake(
    State(api): State<AgentApi>,
    body: Result<Json<WakeRequest>, JsonRejection>,
) -> Result<Json<WakeReply>, ApiError> {
    let Json(req) = body.map_err(|r| ApiError::from_json_rejection("wake", MAX_WAKE_BYTES, r))?;
    check_wake(&req)?;
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
