//! The front end's files from the repository's `ui/static/`, embedded at build time so
//! the controller binary is the whole UI (no folder to mount, no version skew), and the
//! page routes: the app page needs a session (else it redirects to `/login`). The files
//! hold no data; everything they show comes from the JSON API. The charting library
//! (uPlot, pinned in `ui/package-lock.json`) comes from `ui/node_modules` through
//! `build.rs`, so no page loads anything from outside the controller.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::HeaderMap;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};

use super::UiState;
use super::error::HttpError;
use super::guard::authenticate;

const APP_HTML: &str = include_str!("../../../ui/static/app.html");
const LOGIN_HTML: &str = include_str!("../../../ui/static/login.html");

/// `/assets/{name}`: name, content type, body.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../ui/static/app.js"),
    ),
    (
        "automaton.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../ui/static/automaton.js"),
    ),
    (
        "charts.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../ui/static/charts.js"),
    ),
    (
        "login.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../ui/static/login.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../../ui/static/style.css"),
    ),
    (
        "uplot.js",
        "text/javascript; charset=utf-8",
        include_str!(concat!(env!("OUT_DIR"), "/uPlot.iife.min.js")),
    ),
    (
        "uplot.css",
        "text/css; charset=utf-8",
        include_str!(concat!(env!("OUT_DIR"), "/uPlot.min.css")),
    ),
    (
        "common.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../ui/static/common.js"),
    ),
    (
        "plots.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../ui/static/plots.js"),
    ),
    (
        "reports.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../ui/static/reports.js"),
    ),
    (
        "alerts.js",
        "text/javascript; charset=utf-8",
        include_str!("../../../ui/static/alerts.js"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("../../../ui/static/favicon.svg"),
    ),
];

fn html(body: &'static str) -> Response {
    ([(CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

/// The app's pages (overview, policy, agents, alerts, reports, events, editor, users,
/// tokens): one page that draws what its path names (the API decides what each role
/// may do).
pub async fn app_page(State(ui): State<UiState>, headers: HeaderMap) -> Response {
    if authenticate(&ui, &headers).is_err() {
        return Redirect::to("/login").into_response();
    }
    html(APP_HTML)
}

pub async fn login_page(State(ui): State<UiState>, headers: HeaderMap) -> Response {
    if authenticate(&ui, &headers).is_ok() {
        return Redirect::to("/").into_response();
    }
    html(LOGIN_HTML)
}

pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (
            // Revalidate each time: a new controller version serves new files at once.
            [(CONTENT_TYPE, *content_type), (CACHE_CONTROL, "no-cache")],
            *body,
        )
            .into_response(),
        None => HttpError::not_found(format!("no asset named {name:?}")).into_response(),
    }
}
