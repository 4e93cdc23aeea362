//! The alerts Nemesis sends, as the UI sees them (session required, see `guard`):
//!
//! - `GET /api/alerts`: every alert in the outbox (newest first) with its rule,
//!   severity, summary, labels, firing/resolved, acknowledgement and per-sink delivery
//!   state (attempts, last error, next retry);
//! - `POST /api/alerts/{id}/ack`: acknowledges one (CSRF token required, as every change);
//! - `GET /api/sinks`: the configured sinks (name, kind, target, counters), never their
//!   keys, passwords or secret URLs.
//!
//! It reads the notifier's handle; it never sends anything itself.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use http::StatusCode;
use serde::Serialize;

use super::UiState;
use super::error::HttpError;
use super::role::Principal;
use crate::notify::outbox::Alert;
use crate::notify::{AckError, NotifyHandle, SinkView};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertsView {
    /// Whether this instance leads (a standby shows the outbox as last written).
    pub leading: bool,
    pub sinks_configured: usize,
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinksView {
    pub sinks: Vec<SinkView>,
}

fn handle(ui: &UiState) -> Result<&NotifyHandle, HttpError> {
    ui.sources.notify.as_ref().ok_or_else(|| {
        HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "alerts are not available on this instance (no notifier runs)",
        )
    })
}

pub async fn alerts(State(ui): State<UiState>) -> Result<Json<AlertsView>, HttpError> {
    let h = handle(&ui)?;
    Ok(Json(AlertsView {
        leading: h.is_leading(),
        sinks_configured: h.sinks().len(),
        alerts: h.alerts(),
    }))
}

pub async fn sinks(State(ui): State<UiState>) -> Result<Json<SinksView>, HttpError> {
    Ok(Json(SinksView {
        sinks: handle(&ui)?.sinks(),
    }))
}

pub async fn acknowledge(
    State(ui): State<UiState>,
    Extension(by): Extension<Principal>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Alert>, HttpError> {
    let Path(id) = path.map_err(|e| HttpError::bad_request(e.body_text()))?;
    match handle(&ui)?.acknowledge(&id, &by.user) {
        Ok(a) => {
            tracing::info!(alert = %id, user = %by.user, "alert acknowledged");
            Ok(Json(a))
        }
        Err(AckError::NotFound) => Err(HttpError::not_found(format!("no alert {id:?}"))),
        Err(AckError::NotLeader) => Err(HttpError::new(
            StatusCode::CONFLICT,
            "this instance is a standby: acknowledge on the leader (the API Service selects it)",
        )),
    }
}
