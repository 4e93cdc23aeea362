//! The controller's two HTTP listeners: the API one (agents' heartbeats and wake-ups, the
//! Alertmanager webhook) and the admin one (`/metrics`, `/healthz`, `/readyz`), kept
//! apart so probes and scrapes never compete with wake-ups. Routing and serving only;
//! the handlers live with what they serve (`agents`, `alerts`).
//!
//! Every instance serves the agents' API and keeps its agent registry (heartbeats are
//! accepted on a standby too, so its registry is warm when it takes over). Only the
//! leader takes wake-ups: a standby answers them `503` with `Retry-After`, and the agent
//! retries (with `--pod-name`, the Service routes agents to the leader anyway).
//!
//! Every listener serves through `nemesis_common::serve`: a body over the listener's
//! limit is refused with 413 before the handler runs (routes set lower limits of their
//! own), a request head must arrive within 10 s, its body and the answer within the
//! listener's request timeout; refusals are counted in
//! `nemesis_controller_http_rejected_total{listener, reason}`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::agents::http::{MAX_HEARTBEAT_BYTES, WAKE_PATH};
use crate::agents::{AgentApi, ApiError, agent_routes};
use crate::alerts::{AlertApi, MAX_WEBHOOK_BYTES, alert_routes};
use crate::metrics::{ControllerMetrics, OPENMETRICS_CONTENT_TYPE};

pub use nemesis_common::serve::{LimitedRouter, Limits, Rejection};

/// The API listener: the largest body it takes is an agent's full heartbeat or an
/// Alertmanager group (every route sets its own limit, the UI's too when it is served
/// here).
pub const API_LIMITS: Limits = Limits::with_max_body(if MAX_HEARTBEAT_BYTES > MAX_WEBHOOK_BYTES {
    MAX_HEARTBEAT_BYTES
} else {
    MAX_WEBHOOK_BYTES
});
/// The admin listener: no route takes a body, and Prometheus gives up a scrape after
/// 10 s (its default `scrape_timeout`), so an answer later than that is wasted.
pub const ADMIN_LIMITS: Limits = Limits {
    max_body_bytes: 0,
    request_timeout: Duration::from_secs(10),
    ..Limits::with_max_body(0)
};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding the {which} listener on {addr}: {source}")]
    Bind {
        which: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the {which} listener: {source}")]
    Serve {
        which: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The API listener's routes: the agents' endpoints (unless they are served over TLS on
/// a listener of their own, `None`), and the Alertmanager webhook when a token for it is
/// configured. Wake-ups reach only a leading instance.
pub fn api_router(
    agents: Option<AgentApi>,
    alerts: Option<AlertApi>,
    leading: watch::Receiver<bool>,
) -> Router {
    let mut router = agents.map(agent_routes).unwrap_or_default();
    if let Some(alerts) = alerts {
        router = router.merge(alert_routes(alerts));
    }
    router.layer(middleware::from_fn_with_state(
        leading,
        standby_refuses_wakes,
    ))
}

/// The agents' TLS listener's routes: theirs alone, wake-ups for a leading instance only.
pub fn agents_router(agents: AgentApi, leading: watch::Receiver<bool>) -> Router {
    agent_routes(agents).layer(middleware::from_fn_with_state(
        leading,
        standby_refuses_wakes,
    ))
}

async fn standby_refuses_wakes(
    State(leading): State<watch::Receiver<bool>>,
    req: Request,
    next: Next,
) -> Response {
    if req.uri().path() == WAKE_PATH && !*leading.borrow() {
        let mut resp = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this controller instance is on standby (not the leader); retry",
        )
        .into_response();
        resp.headers_mut()
            .insert(RETRY_AFTER, http::HeaderValue::from_static("1"));
        return resp;
    }
    next.run(req).await
}

/// What `/readyz` reports.
#[derive(Clone, Debug)]
pub struct Health {
    pub leading: watch::Receiver<bool>,
    /// The leader's caches (policies, Deployments) are synced.
    pub synced: watch::Receiver<bool>,
}

impl Health {
    /// A standby is ready (it serves heartbeats); a leader once its caches are synced.
    fn readiness(&self) -> (bool, &'static str) {
        match (*self.leading.borrow(), *self.synced.borrow()) {
            (false, _) => (true, "ready (standby)"),
            (true, true) => (true, "ready (leader)"),
            (true, false) => (
                false,
                "leader, waiting for the policy and Deployment caches",
            ),
        }
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: ControllerMetrics,
    health: Health,
}

/// `/metrics` (OpenMetrics), `/healthz` (the process serves), `/readyz`.
pub fn admin_router(metrics: ControllerMetrics, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, health })
}

async fn render_metrics(State(s): State<AdminState>) -> Response {
    (
        [(CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        s.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let (ready, what) = s.health.readiness();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{what}\n")).into_response()
}

/// Binds a listener (port 0 picks a free port; read it back with `local_addr`).
pub async fn bind(which: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            which,
            addr,
            source,
        })
}

/// `router` behind the limits of the listener `which`, counted in `metrics`.
pub fn limited(
    which: &'static str,
    router: Router,
    limits: Limits,
    metrics: &ControllerMetrics,
) -> LimitedRouter {
    LimitedRouter::new(which, router, limits, metrics.http_rejected().clone())
}

/// Serves `router` until `shutdown`, then finishes the requests in flight (each within
/// the listener's request timeout). The peer address is an extension of every request
/// (`ConnectInfo`: the UI limits logins by it).
pub async fn serve(
    which: &'static str,
    listener: TcpListener,
    router: LimitedRouter,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    nemesis_common::serve::serve(listener, router, shutdown.cancelled_owned())
        .await
        .map_err(|source| ServerError::Serve { which, source })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::agents::{AgentRegistry, RegistryConfig, WakeGate};
    use crate::auth::BearerToken;

    fn api(leading: bool) -> (Router, watch::Sender<bool>) {
        let (wakes, _rx) = WakeGate::new(8, std::time::Duration::from_secs(60));
        // Listed: an unmanaged Service is refused, not retried.
        wakes.set_synced(true);
        let agents = AgentApi {
            registry: Arc::new(AgentRegistry::new(RegistryConfig::default())),
            wakes: Arc::new(wakes),
            auth: BearerToken::from_value("t").unwrap().into(),
        };
        let (tx, rx) = watch::channel(leading);
        (api_router(Some(agents), None, rx), tx)
    }

    fn post(path: &str, body: &str) -> Request<Body> {
        Request::post(path)
            .header("authorization", "Bearer t")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    const WAKE: &str =
        r#"{"node":"n","service":{"namespace":"ns","name":"web"},"heldConnections":1}"#;
    const HEARTBEAT: &str = r#"{"node":"n","instance":"i","services":[]}"#;

    #[tokio::test]
    async fn a_standby_refuses_wake_ups_with_retry_after_but_takes_heartbeats() {
        let (app, tx) = api(false);
        let resp = app.clone().oneshot(post(WAKE_PATH, WAKE)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
        let resp = app
            .clone()
            .oneshot(post("/v1/agents/heartbeat", HEARTBEAT))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        tx.send_replace(true);
        let resp = app.oneshot(post(WAKE_PATH, WAKE)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "the leader answers wake-ups");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("no ScalingPolicy manages"));
    }

    #[tokio::test]
    async fn readyz_waits_for_the_leaders_caches_and_metrics_are_openmetrics() {
        let (lt, leading) = watch::channel(true);
        let (st, synced) = watch::channel(false);
        let metrics = ControllerMetrics::new();
        let app = admin_router(metrics, Health { leading, synced });
        let get = |p: &str| Request::get(p).body(Body::empty()).unwrap();
        let r = app.clone().oneshot(get("/readyz")).await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        st.send_replace(true);
        let r = app.clone().oneshot(get("/readyz")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        lt.send_replace(false);
        st.send_replace(false);
        let r = app.clone().oneshot(get("/readyz")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "a standby is ready");
        let r = app.clone().oneshot(get("/healthz")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = app.oneshot(get("/metrics")).await.unwrap();
        assert_eq!(r.headers()[CONTENT_TYPE], OPENMETRICS_CONTENT_TYPE);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("nemesis_controller_reconciles_total"));
    }
}
