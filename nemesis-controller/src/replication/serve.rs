//! `GET /internal/history?after=<seq>&limit=<n>`: a page of this instance's replication
//! log for a standby. Authenticated with the replicas' token (never the agents'); any
//! instance answers with what it holds (a standby only ever asks the Lease holder).

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
use crate::store::Store;

pub const HISTORY_PATH: &str = "/internal/history";

#[derive(Clone)]
struct Replicas {
    store: Arc<Store>,
    token: ReplicaToken,
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

/// The replicas' routes, for the API listener.
pub fn replica_routes(store: Arc<Store>, token: ReplicaToken) -> Router {
    Router::new()
        .route(HISTORY_PATH, get(page))
        .with_state(Replicas { store, token })
}

async fn page(
    State(r): State<Replicas>,
    headers: HeaderMap,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if !r.token.accepts(headers.get(AUTHORIZATION)) {
        return (
            StatusCode::UNAUTHORIZED,
            [(http::header::WWW_AUTHENTICATE, "Bearer")],
            "the replicas' bearer token is required",
        )
            .into_response();
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
