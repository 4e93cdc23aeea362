//! `GET /api/v1/reports/summary?window=24h[&format=csv]`: per policy over the window,
//! its transitions and scale events, cold starts (p50/p99 time to ready), time per state
//! and replica-seconds, with totals; as JSON, or as CSV (one row per policy) with
//! `format=csv` or `Accept: text/csv`. Reads the store; the arithmetic is the store's.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use http::header::{ACCEPT, CONTENT_DISPOSITION, CONTENT_TYPE};
use serde::Serialize;

use super::UiState;
use super::api::{Window, WindowQuery, blocking, now_ms, query_error};
use super::error::HttpError;
use super::policies::id_of;
use crate::reports::render::{csv_field, opt};
use crate::store::reports::cold_start_stats;
use crate::store::{ColdStartStats, PolicyId, Store, StoreError};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySummary {
    pub namespace: String,
    pub name: String,
    /// The state now (the policy's status).
    pub state: Option<String>,
    pub transitions: usize,
    pub scale_events: usize,
    pub cold_starts: ColdStartStats,
    pub time_in_states_seconds: BTreeMap<String, f64>,
    pub replica_seconds: Option<f64>,
    /// Replica-seconds over the window's length.
    pub average_replicas: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub policies: usize,
    pub transitions: usize,
    pub scale_events: usize,
    /// Over every policy's cold starts together.
    pub cold_starts: ColdStartStats,
    pub replica_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub window: Window,
    pub generated_at_ms: u64,
    pub policies: Vec<PolicySummary>,
    pub totals: Totals,
}

/// Builds the summary of `policies` (id, current state) over `window`.
pub fn build(
    store: &Store,
    policies: &[(PolicyId, Option<String>)],
    window: Window,
) -> Result<Summary, StoreError> {
    let range = window.range();
    let mut rows = Vec::with_capacity(policies.len());
    let mut all_colds = Vec::new();
    for (id, state) in policies {
        let transitions = store.transitions(id, range.clone())?.len();
        let scale_events = store.scale_events(id, range.clone())?.len();
        let colds = store.cold_starts(id, range.clone())?;
        let replica_seconds = store.replica_seconds(id, range.clone())?;
        rows.push(PolicySummary {
            namespace: id.namespace.clone(),
            name: id.name.clone(),
            state: state.clone(),
            transitions,
            scale_events,
            cold_starts: cold_start_stats(&colds),
            time_in_states_seconds: store
                .time_in_states(id, range.clone())?
                .into_iter()
                .map(|(s, ms)| (s, ms as f64 / 1000.0))
                .collect(),
            replica_seconds,
            average_replicas: replica_seconds
                .filter(|_| window.seconds > 0)
                .map(|rs| rs / window.seconds as f64),
        });
        all_colds.extend(colds);
    }
    let totals = Totals {
        policies: rows.len(),
        transitions: rows.iter().map(|r| r.transitions).sum(),
        scale_events: rows.iter().map(|r| r.scale_events).sum(),
        cold_starts: cold_start_stats(&all_colds),
        replica_seconds: rows.iter().filter_map(|r| r.replica_seconds).sum(),
    };
    Ok(Summary {
        window,
        generated_at_ms: window.to_ms,
        policies: rows,
        totals,
    })
}

pub const CSV_HEADER: &str = "namespace,name,state,window_seconds,transitions,scale_events,\
cold_starts,cold_starts_ready,cold_start_timeouts,cold_start_failures,cold_start_p50_ms,\
cold_start_p99_ms,cold_start_max_ms,held_connections,replica_seconds,average_replicas,\
time_in_states_seconds";

/// One header line, then one line per policy; time per state as `state=seconds` pairs
/// joined with `;` in the last column.
pub fn to_csv(s: &Summary) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push_str("\r\n");
    for r in &s.policies {
        let states: Vec<String> = r
            .time_in_states_seconds
            .iter()
            .map(|(k, v)| format!("{k}={v:.3}"))
            .collect();
        let c = &r.cold_starts;
        let fields = [
            csv_field(&r.namespace),
            csv_field(&r.name),
            csv_field(r.state.as_deref().unwrap_or("")),
            s.window.seconds.to_string(),
            r.transitions.to_string(),
            r.scale_events.to_string(),
            c.count.to_string(),
            c.ready.to_string(),
            c.timeouts.to_string(),
            c.failures.to_string(),
            opt(c.p50_ms),
            opt(c.p99_ms),
            opt(c.max_ms),
            c.held_connections.to_string(),
            opt(r.replica_seconds.map(|v| format!("{v:.3}"))),
            opt(r.average_replicas.map(|v| format!("{v:.4}"))),
            csv_field(&states.join(";")),
        ];
        let _ = write!(out, "{}\r\n", fields.join(","));
    }
    out
}

fn wants_csv(format: Option<&str>, headers: &HeaderMap) -> Result<bool, HttpError> {
    match format {
        Some("csv") => Ok(true),
        Some("json") => Ok(false),
        Some(other) => Err(HttpError::bad_request(format!(
            "format: {other:?} is not one of json, csv"
        ))),
        None => Ok(headers
            .get(ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/csv"))),
    }
}

pub async fn summary(
    State(ui): State<UiState>,
    headers: HeaderMap,
    query: Result<Query<WindowQuery>, QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(q) = query.map_err(query_error)?;
    let csv = wants_csv(q.format.as_deref(), &headers)?;
    let window = Window::parse(q.window.as_deref(), now_ms())?;
    let policies: Vec<(PolicyId, Option<String>)> = ui
        .sources
        .policies
        .list()
        .iter()
        .map(|p| (id_of(p), p.status.as_ref().and_then(|s| s.state.clone())))
        .collect();
    let store = ui.sources.store.clone();
    let summary = blocking("building the summary report", move || {
        build(&store, &policies, window)
    })
    .await?;
    if csv {
        Ok((
            [
                (CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (
                    CONTENT_DISPOSITION,
                    format!(
                        "attachment; filename=\"nemesis-summary-{}s.csv\"",
                        window.seconds
                    ),
                ),
            ],
            to_csv(&summary),
        )
            .into_response())
    } else {
        Ok(Json(summary).into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("-1,2"), "\"'-1,2\"");
    }

    #[test]
    fn the_format_comes_from_the_query_or_the_accept_header() {
        let mut h = HeaderMap::new();
        assert!(!wants_csv(None, &h).unwrap());
        assert!(wants_csv(Some("csv"), &h).unwrap());
        h.insert(ACCEPT, "text/csv".parse().unwrap());
        assert!(wants_csv(None, &h).unwrap());
        assert!(!wants_csv(Some("json"), &h).unwrap());
        assert!(wants_csv(Some("xml"), &h).is_err());
    }
}
