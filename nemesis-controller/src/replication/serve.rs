//! `GET /internal/history?after=<seq>&limit=<n>`: a page of this instance's replication
//! log for a standby; `GET /internal/directives?stream=<s>&version=<v>&limit=<n>`: a
//! page of its agents' directive log after that cursor (see
//! `agents::directives::ReplicaPage`). Authenticated with the replicas' token (never
//! the agents'); any instance answers with what it holds (a standby only ever asks the
//! Lease holder).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use super::MAX_PAGE;
use super::token::ReplicaToken;
use crate::agents::AgentRegistry;
use crate::store::Store;
use nemesis_common::wire::{DirectivesCursor, MAX_PAGE_DIRECTIVES};

pub const HISTORY_PATH: &str = "/internal/history";
pub const DIRECTIVES_PATH: &str = "/internal/directives";

#[derive(Clone)]
struct Replicas {
    store: Arc<Store>,
    token: ReplicaToken,
    registry: Arc<AgentRegistry>,
}

#[derive(Debug, Deserialize)]
struct DirectivesQuery {
    stream: Option<u64>,
    version: Option<u64>,
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

/// The replicas' routes, for the API listener.
pub fn replica_routes(
    store: Arc<Store>,
    token: ReplicaToken,
    registry: Arc<AgentRegistry>,
) -> Router {
    Router::new()
        .route(HISTORY_PATH, get(page))
        .route(DIRECTIVES_PATH, get(directives))
        .with_state(Replicas {
            store,
            token,
            registry,
        })
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(http::header::WWW_AUTHENTICATE, "Bearer")],
        "the replicas' bearer token is required",
    )
        .into_response()
}

async fn directives(
    State(r): State<Replicas>,
    headers: HeaderMap,
    query: Result<Query<DirectivesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if !r.token.accepts(headers.get(AUTHORIZATION)) {
        return unauthorized();
    }
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("{DIRECTIVES_PATH}: stream, version and limit are unsigned integers: {e}"),
            )
                .into_response();
        }
    };
    let since = match (q.stream, q.version) {
        (Some(stream), Some(version)) => Some(DirectivesCursor { stream, version }),
        (None, None) => None,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                format!("{DIRECTIVES_PATH}: give stream and version together, or neither"),
            )
                .into_response();
        }
    };
    let limit = q
        .limit
        .unwrap_or(MAX_PAGE_DIRECTIVES)
        .clamp(1, MAX_PAGE_DIRECTIVES);
    axum::Json(r.registry.replica_page(since, limit)).into_response()
}

async fn page(
    State(r): State<Replicas>,
    headers: HeaderMap,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if !r.token.accepts(headers.get(AUTHORIZATION)) {
        return unauthorized();
    }
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("{HISTORY_PATH}: after and limit are unsigned integers: {e}"),
            )
                .into_response();
        }
    };
    let limit = q.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let store = r.store.clone();
    let read = tokio::task::spawn_blocking(move || store.log_after(q.after, limit)).await;
    let page = match read {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            tracing::warn!(err = %e, "reading the replication log failed");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the history: {e}"),
            )
                .into_response();
        }
        Err(e) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
        }
    };
    // The entries are stored as JSON already: written out as they are, not decoded and
    // encoded again.
    let mut body = Vec::with_capacity(
        64 + page
            .entries
            .iter()
            .map(|(_, b)| b.len() + 32)
            .sum::<usize>(),
    );
    body.extend_from_slice(b"{\"entries\":[");
    for (i, (seq, bytes)) in page.entries.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(format!("{{\"seq\":{seq},\"entry\":").as_bytes());
        body.extend_from_slice(bytes);
        body.push(b'}');
    }
    body.extend_from_slice(format!("],\"remaining\":{}}}", page.remaining).as_bytes());
    ([(CONTENT_TYPE, "application/json")], body).into_response()
}
