//! The agent endpoints: auth, body limits and error answers through `oneshot`, and the
//! heartbeat/acknowledge and single-flight wake paths through a real loopback socket.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use axum::Router;
use axum::body::Body;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use nemesis_common::wire::{
    AppliedMode, Directive, Heartbeat, HeartbeatReply, ServiceRef, ServiceReport, WakeReply,
    WakeRequest,
};
use nemesis_controller::agents::http::{HEARTBEAT_PATH, MAX_HEARTBEAT_BYTES, WAKE_PATH};
use nemesis_controller::agents::{
    AgentApi, AgentRegistry, RegistryConfig, WakeGate, WakeUp, agent_routes,
};
use nemesis_controller::auth::BearerToken;
use tokio::sync::mpsc;
use tower::ServiceExt;

const TOKEN: &str = "agent-token-for-tests";

struct Fixture {
    api: AgentApi,
    wakes_rx: mpsc::Receiver<WakeUp>,
}

fn fixture() -> Fixture {
    let (gate, wakes_rx) = WakeGate::new(16, Duration::from_secs(300));
    // A leader that has listed its policies: an unmanaged Service is really unmanaged.
    gate.set_synced(true);
    Fixture {
        api: AgentApi {
            registry: Arc::new(AgentRegistry::new(RegistryConfig::default())),
            wakes: Arc::new(gate),
            auth: BearerToken::from_value(TOKEN).unwrap().into(),
        },
        wakes_rx,
    }
}

fn svc(name: &str) -> ServiceRef {
    ServiceRef {
        namespace: "shop".into(),
        name: name.into(),
    }
}

fn heartbeat(node: &str, applied_epoch: u64) -> Heartbeat {
    Heartbeat {
        node: node.into(),
        instance: format!("{node}-1"),
        services: vec![ServiceReport {
            service: svc("web"),
            mode: AppliedMode::Hold,
            applied_epoch,
            connects_total: 0,
            open_connections: 0,
            closed_total: 0,
            held_connections: 0,
            accepted_total: 0,
            accepted_open: 0,
            hold_ports: vec![],
            holds_total: 0,
            holds_refused_total: 0,
            proxy_errors: Default::default(),
        }],
        addresses: vec![],
        ready: true,
        directives_cursor: None,
        pages: false,
        reports_seq: None,
        reports_since: None,
        gone: vec![],
    }
}

fn post(path: &str, token: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(body.into()).unwrap()
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap()
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "answer is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, v)
}

fn error_text(v: &serde_json::Value) -> &str {
    v["error"].as_str().expect("an `error` field")
}

// === oneshot: auth and bad input ===

#[tokio::test]
async fn requests_without_the_right_bearer_token_get_401_with_a_json_reason() {
    let f = fixture();
    let app = agent_routes(f.api.clone());
    let body = json(&heartbeat("n1", 0));

    let resp = app
        .clone()
        .oneshot(post(HEARTBEAT_PATH, None, body.clone()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().contains_key(header::WWW_AUTHENTICATE));

    let (status, v) = call(&app, post(HEARTBEAT_PATH, Some("wrong"), body.clone())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error_text(&v).contains("not valid"), "{v}");
    assert!(
        !v.to_string().contains("wrong"),
        "the presented token is never echoed"
    );

    let (status, v) = call(&app, post(WAKE_PATH, None, "{}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error_text(&v).contains("Authorization"), "{v}");

    // Refused before the registry saw anything.
    assert_eq!(f.api.registry.agents(tokio::time::Instant::now()).len(), 0);
}

#[tokio::test]
async fn garbled_json_is_400_and_wrong_shapes_are_422_with_the_reason() {
    let app = agent_routes(fixture().api);
    let (status, v) = call(&app, post(HEARTBEAT_PATH, Some(TOKEN), "{\"node\": ")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_text(&v).starts_with("invalid heartbeat body"), "{v}");

    let (status, v) = call(
        &app,
        post(HEARTBEAT_PATH, Some(TOKEN), "{\"node\": \"n1\"}"),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error_text(&v).contains("missing field `instance`"), "{v}");

    let (status, v) = call(
        &app,
        post(
            WAKE_PATH,
            Some(TOKEN),
            r#"{"node":"n1","service":{"namespace":"shop","name":"web"},"heldConnections":-1}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error_text(&v).contains("heldConnections"), "{v}");

    let mut empty = heartbeat("", 0);
    empty.instance = "x".into();
    let (status, v) = call(&app, post(HEARTBEAT_PATH, Some(TOKEN), json(&empty))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error_text(&v).contains("`node`"), "{v}");

    let req = Request::post(HEARTBEAT_PATH)
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::from(json(&heartbeat("n1", 0))))
        .unwrap();
    let (status, v) = call(&app, req).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(error_text(&v).contains("Content-Type"), "{v}");
}

#[tokio::test]
async fn an_oversized_body_is_413() {
    let app = agent_routes(fixture().api);
    let mut hb = heartbeat("n1", 0);
    let report = hb.services[0].clone();
    hb.services = vec![report; MAX_HEARTBEAT_BYTES / 100];
    let body = json(&hb);
    assert!(body.len() > MAX_HEARTBEAT_BYTES);
    let (status, v) = call(&app, post(HEARTBEAT_PATH, Some(TOKEN), body)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error_text(&v).contains("larger than the limit"), "{v}");

    let big_wake = format!(
        r#"{{"node":"{}","service":{{"namespace":"a","name":"b"}},"heldConnections":1}}"#,
        "n".repeat(64 << 10)
    );
    let (status, _) = call(&app, post(WAKE_PATH, Some(TOKEN), big_wake)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn heartbeats_carry_directives_down_and_acknowledgements_up() {
    let f = fixture();
    let app = agent_routes(f.api.clone());
    let reg = &f.api.registry;
    let now = tokio::time::Instant::now;

    let (status, v) = call(
        &app,
        post(HEARTBEAT_PATH, Some(TOKEN), json(&heartbeat("n1", 0))),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let reply: HeartbeatReply = serde_json::from_value(v).unwrap();
    assert!(reply.directives.is_empty());
    assert_eq!(reply.lease_seconds, 15);
    assert_eq!(reg.live_count(now()), 1);

    let epoch = reg.request_sleep(&svc("web"), None);
    assert!(!reg.all_live_acknowledged(&svc("web"), epoch, now()));
    let (_, v) = call(
        &app,
        post(HEARTBEAT_PATH, Some(TOKEN), json(&heartbeat("n1", 0))),
    )
    .await;
    let reply: HeartbeatReply = serde_json::from_value(v).unwrap();
    assert_eq!(reply.directives.len(), 1);
    assert_eq!(reply.directives[0].directive, Directive::Sleep);
    assert_eq!(reply.directives[0].epoch, epoch);

    call(
        &app,
        post(HEARTBEAT_PATH, Some(TOKEN), json(&heartbeat("n1", epoch))),
    )
    .await;
    assert!(reg.all_live_acknowledged(&svc("web"), epoch, now()));
    let agents = reg.agents(now());
    assert_eq!(agents[0].services[0].applied_epoch, epoch);
}

#[tokio::test]
async fn a_wake_for_a_service_already_waking_is_acknowledged_but_not_forwarded() {
    let mut f = fixture();
    let app = agent_routes(f.api.clone());
    let wake = |node: &str| {
        json(&WakeRequest {
            node: node.into(),
            service: svc("web"),
            held_connections: 2,
            applied_epoch: None,
        })
    };

    let (status, v) = call(&app, post(WAKE_PATH, Some(TOKEN), wake("n1"))).await;
    assert_eq!(status, StatusCode::OK);
    let reply: WakeReply = serde_json::from_value(v).unwrap();
    assert!(!reply.accepted);
    assert!(reply.message.contains("no ScalingPolicy manages shop/web"));

    f.api.wakes.set_managed(&svc("web"), true);
    let (_, v) = call(&app, post(WAKE_PATH, Some(TOKEN), wake("n1"))).await;
    assert!(serde_json::from_value::<WakeReply>(v).unwrap().accepted);
    let (_, v) = call(&app, post(WAKE_PATH, Some(TOKEN), wake("n2"))).await;
    let reply: WakeReply = serde_json::from_value(v).unwrap();
    assert!(reply.accepted);
    assert!(reply.message.contains("already waking"));

    let first = f.wakes_rx.try_recv().unwrap();
    assert_eq!((first.node.as_str(), first.held_connections), ("n1", 2));
    assert!(
        f.wakes_rx.try_recv().is_err(),
        "the second wake was forwarded"
    );
}

// === a real socket ===

async fn serve(app: Router) -> Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Ok((format!("http://{addr}"), task))
}

#[tokio::test]
async fn over_a_socket_concurrent_wakes_forward_once_and_a_sleep_waits_for_every_agent()
-> Result<()> {
    let mut f = fixture();
    f.api.wakes.set_managed(&svc("web"), true);
    let (base, server) = serve(agent_routes(f.api.clone())).await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;

    // Twenty agents wake the same Service at the same moment.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (client, base) = (client.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let body = serde_json::to_vec(&WakeRequest {
                node: format!("n{i}"),
                service: svc("web"),
                held_connections: 1,
                applied_epoch: None,
            })
            .unwrap();
            let resp = client
                .post(format!("{base}{WAKE_PATH}"))
                .bearer_auth(TOKEN)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            serde_json::from_slice::<WakeReply>(&resp.bytes().await.unwrap()).unwrap()
        }));
    }
    for t in tasks {
        assert!(t.await?.accepted);
    }
    assert!(f.wakes_rx.recv().await.is_some());
    assert!(
        f.wakes_rx.try_recv().is_err(),
        "more than one wake-up forwarded"
    );

    // Two agents registered; a sleep request waits until both applied it.
    let send_hb = |node: &'static str, epoch: u64| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let resp = client
                .post(format!("{base}{HEARTBEAT_PATH}"))
                .bearer_auth(TOKEN)
                .header(header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(&heartbeat(node, epoch)).unwrap())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            serde_json::from_slice::<HeartbeatReply>(&resp.bytes().await.unwrap()).unwrap()
        }
    };
    send_hb("a", 0).await;
    send_hb("b", 0).await;
    let reg = f.api.registry.clone();
    let epoch = reg.request_sleep(&svc("web"), None);
    let waiter = {
        let reg = reg.clone();
        tokio::spawn(async move {
            reg.wait_acknowledged(&svc("web"), epoch, Duration::from_secs(10))
                .await
        })
    };
    let reply = send_hb("a", 0).await;
    assert_eq!(reply.directives[0].directive, Directive::Sleep);
    send_hb("a", epoch).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "finished before agent b acknowledged"
    );
    send_hb("b", epoch).await;
    tokio::time::timeout(Duration::from_secs(5), waiter).await???;

    // Unauthenticated over the socket: 401 with a JSON reason.
    let resp = client
        .post(format!("{base}{HEARTBEAT_PATH}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body("{}")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)?;
    assert!(v["error"].as_str().is_some());

    server.abort();
    Ok(())
}

// === balance mode's load exchange ===

#[tokio::test]
async fn load_reports_need_the_token_and_answer_the_other_nodes_sums() {
    use nemesis_common::wire::{BackendLoad, LoadReply, LoadReport, ServiceLoads};
    use nemesis_controller::agents::http::LOADS_PATH;
    let f = fixture();
    let app = agent_routes(f.api.clone());
    let backend: std::net::SocketAddr = "198.18.0.5:8080".parse().unwrap();
    let report = |node: &str, open: u64| LoadReport {
        node: node.into(),
        services: vec![ServiceLoads {
            service: svc("web"),
            backends: vec![BackendLoad {
                addr: backend,
                open,
            }],
        }],
    };

    // Refused before the board sees it: node x's 100 never counts below.
    let (status, _) = call(&app, post(LOADS_PATH, None, json(&report("x", 100)))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, v) = call(&app, post(LOADS_PATH, Some(TOKEN), json(&report("a", 3)))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let first: LoadReply = serde_json::from_value(v).unwrap();
    assert!(first.services.is_empty(), "nobody else reported");
    let (status, v) = call(&app, post(LOADS_PATH, Some(TOKEN), json(&report("b", 1)))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let reply: LoadReply = serde_json::from_value(v).unwrap();
    assert_eq!(
        reply.services,
        vec![ServiceLoads {
            service: svc("web"),
            backends: vec![BackendLoad {
                addr: backend,
                open: 3
            }],
        }],
        "node a's load, not b's own (nor x's refused one)"
    );

    // Bad input: named.
    let (status, v) = call(&app, post(LOADS_PATH, Some(TOKEN), json(&report("", 1)))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error_text(&v).contains("node"), "{v}");
    let mut wide = report("c", 1);
    wide.services[0].backends = vec![
        BackendLoad {
            addr: backend,
            open: 1
        };
        1025
    ];
    let (status, v) = call(&app, post(LOADS_PATH, Some(TOKEN), json(&wide))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        error_text(&v).contains("services[0] has 1025 backends"),
        "{v}"
    );
}

/// Report deltas and pages through the endpoint, in the JSON an agent sends: a delta
/// against the reports the controller holds is taken, one against others is answered
/// without `reportsSeq`; a whole set of more than a page comes in bounded pages.
#[tokio::test]
async fn report_deltas_and_directive_pages_through_the_endpoint() {
    use nemesis_common::wire::{DirectiveView, MAX_PAGE_DIRECTIVES, ViewUpdate};
    let f = fixture();
    let app = agent_routes(f.api.clone());
    let n = MAX_PAGE_DIRECTIVES + 10;
    for i in 0..n {
        f.api.registry.follow(&svc(&format!("s{i}")));
    }
    let beat = |body: serde_json::Value| post(HEARTBEAT_PATH, Some(TOKEN), body.to_string());
    let mut full = serde_json::to_value(heartbeat("n1", 0)).unwrap();
    full["reportsSeq"] = 1.into();
    full["pages"] = true.into();
    let (status, v) = call(&app, beat(full.clone())).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let first: HeartbeatReply = serde_json::from_value(v).unwrap();
    assert_eq!(first.reports_seq, Some(1));
    assert!(first.more && first.directives.len() == MAX_PAGE_DIRECTIVES);
    let mut view = DirectiveView::default();
    assert_eq!(view.apply(&first), ViewUpdate::Partial);
    // The next page, with the report delta: nothing changed, one Service gone.
    let mut delta = full.clone();
    delta["reportsSeq"] = 2.into();
    delta["reportsSince"] = 1.into();
    delta["services"] = serde_json::json!([]);
    delta["gone"] = serde_json::json!([{"namespace": "shop", "name": "web"}]);
    delta["directivesCursor"] = serde_json::to_value(view.cursor()).unwrap();
    let (status, v) = call(&app, beat(delta.clone())).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let second: HeartbeatReply = serde_json::from_value(v).unwrap();
    assert_eq!(second.reports_seq, Some(2));
    assert_eq!(view.apply(&second), ViewUpdate::Replaced);
    assert_eq!(view.len(), n);
    let now = tokio::time::Instant::now();
    assert!(f.api.registry.agents(now)[0].services.is_empty());
    // The same delta again: the controller holds reports 2, not 1.
    delta["reportsSeq"] = 3.into();
    let (status, v) = call(&app, beat(delta.clone())).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v.get("reportsSeq").is_none(), "{v}");
    // `gone` without `reportsSince` is refused, naming the field.
    let mut bad = full.clone();
    bad["gone"] = serde_json::json!([{"namespace": "shop", "name": "web"}]);
    let (status, v) = call(&app, beat(bad)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error_text(&v).contains("reportsSince"), "{v}");
}
