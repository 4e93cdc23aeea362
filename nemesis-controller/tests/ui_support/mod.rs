//! Shared set-up of the UI tests: a real history store in a temp dir seeded with a few
//! hours of one policy's life, the policy in the UI's cache (as the watch would put it),
//! a real agent registry and alert book, and request helpers.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use chrono::{TimeZone, Utc};
use http::{Request, Response};
use http_body_util::BodyExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use nemesis_controller::agents::{AgentRegistry, RegistryConfig};
use nemesis_controller::alerts::AlertBook;
use nemesis_controller::metrics::ControllerMetrics;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_controller::policy::crd::{
    MetricValue, ScalingPolicySpec, ScalingPolicyStatus, TargetRef,
    TransitionRecord as StatusTransition,
};
use nemesis_controller::store::{
    ColdStartOutcome, ColdStartRecord, PolicyId, Retention, ScaleRecord, Store, TransitionRecord,
    unix_ms,
};
use nemesis_controller::ui::{
    self, AdminPassword, Directory, PolicyCache, PolicyFeed, UiConfig, UiSources, UiState,
};
use tower::ServiceExt;

pub const PASSWORD: &str = "correct-horse-battery-staple";
pub const NS: &str = "shop";
pub const NAME: &str = "checkout";

pub struct Fixture {
    pub router: Router,
    pub store: Arc<Store>,
    pub feed: PolicyFeed,
    pub registry: Arc<AgentRegistry>,
    pub alerts: Arc<AlertBook>,
    pub metrics: ControllerMetrics,
    pub directory: Arc<Directory>,
    pub now_ms: u64,
    _dir: tempfile::TempDir,
}

pub fn id() -> PolicyId {
    PolicyId::new(NS, NAME)
}

const H: u64 = 3_600_000;

/// Seeds `id`'s history relative to `now`: zero until 5 h ago, warm (2 replicas) for two
/// hours, zero again, warm since 1 h ago; two ready cold starts (1.8 s and 4.2 s) and one
/// that timed out; replica and connection samples every minute over the last 6 h.
pub fn seed(store: &Store, id: &PolicyId, now: u64) {
    let t = |at_ms: u64, from: &str, to: &str, fr: i32, tr: i32, reason: &str| TransitionRecord {
        at_ms,
        policy: id.clone(),
        from_state: from.into(),
        to_state: to.into(),
        from_replicas: fr,
        to_replicas: tr,
        reason: reason.into(),
        metrics: BTreeMap::from([("conns.active".to_string(), 1.0)]),
    };
    let s = |at_ms: u64, state: &str, from: i32, to: i32| ScaleRecord {
        at_ms,
        policy: id.clone(),
        state: state.into(),
        from_replicas: from,
        to_replicas: to,
        reason: format!("{from} -> {to}"),
        metrics: BTreeMap::new(),
        recovered: false,
    };
    store
        .record_transition(&t(now - 5 * H, "zero", "warm", 0, 2, "demand"))
        .unwrap();
    store.record_scale(&s(now - 5 * H, "warm", 0, 2)).unwrap();
    store
        .record_transition(&t(
            now - 3 * H,
            "warm",
            "zero",
            2,
            0,
            "conns.active == 0 for 10m",
        ))
        .unwrap();
    store.record_scale(&s(now - 3 * H, "zero", 2, 0)).unwrap();
    store
        .record_transition(&t(now - H, "zero", "warm", 0, 2, "demand"))
        .unwrap();
    store.record_scale(&s(now - H, "warm", 0, 2)).unwrap();
    for (at, ready, outcome) in [
        (now - 5 * H, Some(1_800), ColdStartOutcome::Ready),
        (now - 2 * H, None, ColdStartOutcome::Timeout),
        (now - H, Some(4_200), ColdStartOutcome::Ready),
    ] {
        store
            .record_cold_start(&ColdStartRecord {
                wake_at_ms: at,
                policy: id.clone(),
                time_to_ready_ms: ready,
                held_connections: 3,
                outcome,
            })
            .unwrap();
    }
    let mut at = now - 6 * H;
    while at < now {
        let warm = (now - 5 * H..now - 3 * H).contains(&at) || at >= now - H;
        let replicas = if warm { 2.0 } else { 0.0 };
        let conns = if warm {
            3.0 + ((at / 60_000) % 5) as f64
        } else {
            0.0
        };
        store
            .record_samples(
                at,
                [
                    (id, "nemesis.replicas", replicas),
                    (id, "nemesis.replicas.ready", replicas),
                    (id, "nemesis.replicas.desired", replicas),
                    (id, "conns.active", conns),
                ],
            )
            .unwrap();
        at += 60_000;
    }
}

/// The policy as the API server would hold it after the controller wrote its status.
pub fn policy(ns: &str, name: &str, now: u64) -> ScalingPolicy {
    let mut p = ScalingPolicy::new(
        name,
        ScalingPolicySpec {
            target: TargetRef {
                deployment: Some(name.into()),
                service: Some(name.into()),
                ..Default::default()
            },
            idle_timeout: Some("10m".into()),
            ..Default::default()
        },
    );
    p.metadata.namespace = Some(ns.into());
    p.metadata.generation = Some(1);
    let at = Utc.timestamp_millis_opt((now - H) as i64).unwrap();
    let time = Time(k8s_openapi::jiff::Timestamp::from_millisecond((now - H) as i64).unwrap());
    p.status = Some(ScalingPolicyStatus {
        observed_generation: Some(1),
        state: Some("warm".into()),
        state_since: Some(at),
        desired_replicas: Some(2),
        last_transition: Some(StatusTransition {
            from: "zero".into(),
            to: "warm".into(),
            at,
            reason: "demand".into(),
        }),
        metrics: vec![MetricValue {
            name: "conns.active".into(),
            value: Some(4.0),
            at: Some(Utc::now()),
        }],
        target: Some(format!("Deployment/{name}")),
        horizontal_pod_autoscaler: None,
        windows: vec![],
        conditions: vec![
            Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Valid".into(),
                message: "the policy is valid and running".into(),
                observed_generation: Some(1),
                last_transition_time: time.clone(),
            },
            Condition {
                type_: "Invalid".into(),
                status: "False".into(),
                reason: "Valid".into(),
                message: "no problems found".into(),
                observed_generation: Some(1),
                last_transition_time: time,
            },
        ],
    });
    p
}

pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// A UI over a fresh store seeded for [`id`], with the policy in its cache.
pub fn fixture(config: UiConfig) -> Fixture {
    fixture_with(config, None)
}

/// The same, with the alerts-out notifier's handle behind `/api/alerts` and `/api/sinks`.
pub fn fixture_with(
    config: UiConfig,
    notify: Option<nemesis_controller::notify::NotifyHandle>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(Store::open(dir.path().join("history.redb"), Retention::default()).unwrap());
    let now = now_ms();
    seed(&store, &id(), now);
    let (cache, mut feed) = PolicyCache::new();
    feed.upsert(policy(NS, NAME, now));
    let registry = Arc::new(AgentRegistry::new(RegistryConfig::default()));
    let alerts = Arc::new(AlertBook::new());
    let metrics = ControllerMetrics::new();
    let directory = Arc::new(Directory::in_memory(&config.user));
    let state = UiState::new(
        config,
        AdminPassword::from_plaintext(PASSWORD).unwrap(),
        directory.clone(),
        metrics.clone(),
        UiSources {
            store: store.clone(),
            policies: cache,
            registry: registry.clone(),
            alerts: alerts.clone(),
            alert_webhook: true,
            kube: None,
            notify,
            prometheus: None,
        },
    );
    Fixture {
        router: ui::router(state),
        store,
        feed,
        registry,
        alerts,
        metrics,
        directory,
        now_ms: now,
        _dir: dir,
    }
}

pub const CLIENT: &str = "127.0.0.1:40000";
pub const HOST: &str = "127.0.0.1:8080";

/// A request as a browser on `client` would send it (Host set, peer address known).
pub fn request(method: &str, path: &str, client: &str) -> http::request::Builder {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", HOST);
    let addr: SocketAddr = client.parse().unwrap();
    b.extensions_mut().unwrap().insert(ConnectInfo(addr));
    b
}

pub fn login_request(user: &str, password: &str, client: &str) -> Request<Body> {
    request("POST", "/login", client)
        .header("content-type", "application/json")
        .header("origin", format!("http://{HOST}"))
        .body(Body::from(
            serde_json::json!({ "username": user, "password": password }).to_string(),
        ))
        .unwrap()
}

pub async fn send(router: &Router, req: Request<Body>) -> (Response<()>, String) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        Response::from_parts(parts, ()),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// A logged-in session: the cookie pair to send and the CSRF token, and the browser's
/// trusted-browser cookie pair.
pub struct Login {
    pub cookie: String,
    pub csrf: String,
    pub device: String,
}

/// The `name=value` pair of the `Set-Cookie` header for cookie `name`.
pub fn set_cookie_pair(resp: &Response<()>, name: &str) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap().to_string())
        .find(|pair| pair.starts_with(&format!("{name}=")))
}

pub async fn login(router: &Router) -> Login {
    login_as(router, "admin", PASSWORD, CLIENT).await
}

pub async fn login_as(router: &Router, user: &str, password: &str, client: &str) -> Login {
    let (resp, body) = send(router, login_request(user, password, client)).await;
    assert_eq!(resp.status(), 200, "{user}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    Login {
        cookie: set_cookie_pair(&resp, "nemesis_session").unwrap(),
        device: set_cookie_pair(&resp, "nemesis_device").unwrap(),
        csrf: v["csrfToken"].as_str().unwrap().to_string(),
    }
}

pub async fn get_json(router: &Router, path: &str, login: &Login) -> (u16, serde_json::Value) {
    let (resp, body) = send(
        router,
        request("GET", path, CLIENT)
            .header("cookie", &login.cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let v = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    (resp.status().as_u16(), v)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
