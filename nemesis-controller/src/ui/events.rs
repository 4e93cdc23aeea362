//! The events page's API: `GET /api/v1/events` pages through transitions, scale events
//! and cold starts of every policy (or one), newest first, with filters by policy and
//! kind and a text search, and `GET /api/v1/stream`, the live feed (Server-Sent Events)
//! that tells open pages when the policies or the alerts Nemesis sends changed.
//! Read-only.
//!
//! Paging uses the store's `(at_ms, seq)` key as the cursor (`before=<at_ms>.<seq>`):
//! the sequence is global, so a page that ends inside a millisecond continues with that
//! millisecond's other events instead of skipping them.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::{Deserialize, Serialize};

use super::UiState;
use super::api::{self, Window, blocking, now_ms, query_error};
use super::error::HttpError;
use super::policies::id_of;
use crate::store::{EventTable, PolicyId};

/// A page holds at most this many events; 50 by default.
pub const MAX_PAGE: usize = 500;
const DEFAULT_PAGE: usize = 50;
/// With a search that matches little, a request reads at most this many events before
/// it answers with what it found and a cursor to go on from.
const MAX_SCANNED: usize = 20_000;

#[derive(Debug, Deserialize, Default)]
pub struct EventsQuery {
    /// `namespace/name`.
    pub policy: Option<String>,
    /// Comma-separated: `transition`, `scale`, `coldStart`.
    pub kind: Option<String>,
    /// Case-insensitive text searched in the event's fields.
    pub q: Option<String>,
    pub window: Option<String>,
    /// The cursor a previous page returned as `nextBefore`.
    pub before: Option<String>,
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    pub kind: &'static str,
    pub at_ms: u64,
    pub seq: u64,
    pub namespace: String,
    pub name: String,
    /// The record as the store keeps it.
    pub record: serde_json::Value,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// Pass as `before` for the next (older) page; absent when there is none.
    pub next_before: Option<String>,
    pub window: Window,
}

fn parse_cursor(text: &str) -> Result<(u64, u64), HttpError> {
    text.split_once('.')
        .and_then(|(a, s)| Some((a.parse().ok()?, s.parse().ok()?)))
        .ok_or_else(|| {
            HttpError::bad_request(format!(
                "before: {text:?} is not a cursor (<at_ms>.<seq>, as nextBefore gives it)"
            ))
        })
}

fn parse_kinds(text: Option<&str>) -> Result<Vec<EventTable>, HttpError> {
    let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
        return Ok(EventTable::ALL.to_vec());
    };
    text.split(',')
        .map(|k| {
            EventTable::ALL
                .into_iter()
                .find(|t| t.as_str() == k.trim())
                .ok_or_else(|| {
                    HttpError::bad_request(format!(
                        "kind: {k:?} is not one of transition, scale, coldStart"
                    ))
                })
        })
        .collect()
}

fn matches(q: &str, v: &serde_json::Value) -> bool {
    q.is_empty() || v.to_string().to_lowercase().contains(q)
}

pub async fn events(
    State(ui): State<UiState>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<EventPage>, HttpError> {
    let Query(q) = query.map_err(query_error)?;
    let window = Window::parse(q.window.as_deref(), now_ms())?;
    let kinds = parse_kinds(q.kind.as_deref())?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let before = match q.before.as_deref() {
        Some(c) => parse_cursor(c)?,
        None => (window.to_ms + 1, 0),
    };
    let policies: Vec<PolicyId> = match q.policy.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => {
            let (ns, name) = p.split_once('/').ok_or_else(|| {
                HttpError::bad_request(format!("policy: {p:?} is not namespace/name"))
            })?;
            vec![PolicyId::new(ns, name)]
        }
        None => ui
            .sources
            .policies
            .list()
            .iter()
            .map(|p| id_of(p))
            .collect(),
    };
    let search = q.q.unwrap_or_default().trim().to_lowercase();
    let store = ui.sources.store.clone();
    let since = window.from_ms;
    let (events, next_before) = blocking("reading events", move || {
        let mut found = Vec::new();
        let mut cursor = before;
        let mut scanned = 0;
        loop {
            // The newest `limit` of each source before the cursor, merged newest first.
            let mut batch = Vec::new();
            let mut more = false;
            for id in &policies {
                for kind in &kinds {
                    let got = store.events_before(*kind, id, since, cursor, limit)?;
                    more |= got.len() == limit;
                    batch.extend(got.into_iter().map(|(key, v)| (key, *kind, id.clone(), v)));
                }
            }
            batch.sort_by_key(|b| std::cmp::Reverse(b.0));
            // Only the first `limit` of the merge are sure to be the newest overall.
            batch.truncate(limit);
            let exhausted = batch.len() < limit && !more;
            for (key, kind, id, v) in batch {
                cursor = key;
                scanned += 1;
                if matches(&search, &v) {
                    found.push(EventView {
                        kind: kind.as_str(),
                        at_ms: key.0,
                        seq: key.1,
                        namespace: id.namespace.clone(),
                        name: id.name.clone(),
                        record: v,
                    });
                    if found.len() == limit {
                        let next = format!("{}.{}", key.0, key.1);
                        return Ok((found, Some(next)));
                    }
                }
            }
            if exhausted {
                return Ok((found, None));
            }
            if scanned >= MAX_SCANNED {
                return Ok((found, Some(format!("{}.{}", cursor.0, cursor.1))));
            }
        }
    })
    .await?;
    Ok(Json(EventPage {
        events,
        next_before,
        window,
    }))
}

/// How often the live feed looks for a change; a page sees a wake within about this.
const STREAM_POLL: Duration = Duration::from_millis(500);
/// A feed ends after this long and the browser's EventSource reconnects (so a session
/// that ended stops receiving, as the reconnect is authenticated anew).
const STREAM_LIFETIME: Duration = Duration::from_secs(600);

/// The feed's state between two events: what each kind last said, and what is due.
struct Feed {
    ui: UiState,
    policies: String,
    alerts: String,
    due: std::collections::VecDeque<Event>,
    first: bool,
}

/// The outbox as `GET /api/alerts` shows it, when this instance has a notifier.
fn alerts_text(ui: &UiState) -> Option<String> {
    let h = ui.sources.notify.as_ref()?;
    let view = super::outbox::AlertsView {
        leading: h.is_leading(),
        sinks_configured: h.sinks().len(),
        alerts: h.alerts(),
    };
    serde_json::to_string(&view).ok()
}

/// `GET /api/v1/stream`: an `event: policies` with the policy list (as
/// `GET /api/v1/policies` answers) and an `event: alerts` with the alerts Nemesis sends
/// (as `GET /api/alerts` answers; absent where no notifier runs), each at once and
/// whenever it changes.
pub async fn stream(
    State(ui): State<UiState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let deadline = tokio::time::Instant::now() + STREAM_LIFETIME;
    let start = Feed {
        ui,
        policies: String::new(),
        alerts: String::new(),
        due: Default::default(),
        first: true,
    };
    let feed = futures::stream::unfold(start, move |mut f| async move {
        loop {
            if let Some(ev) = f.due.pop_front() {
                return Some((Ok(ev), f));
            }
            if !f.first {
                tokio::time::sleep(STREAM_POLL).await;
            }
            f.first = false;
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            if let Ok(Json(list)) = api::policies(State(f.ui.clone())).await {
                let text = serde_json::to_string(&list).unwrap_or_default();
                if text != f.policies {
                    f.due
                        .push_back(Event::default().event("policies").data(text.clone()));
                    f.policies = text;
                }
            }
            if let Some(text) = alerts_text(&f.ui)
                && text != f.alerts
            {
                f.due
                    .push_back(Event::default().event("alerts").data(text.clone()));
                f.alerts = text;
            }
        }
    });
    Sse::new(feed).keep_alive(KeepAlive::default())
}
