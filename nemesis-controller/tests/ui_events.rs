//! The events API and the live feed through the UI's real router: paging newest first
//! loses no event when many share a millisecond, filters by kind and policy and a text
//! search narrow it, and the feed sends the policy list at once, and the alerts Nemesis
//! sends at once and again when one is raised or acknowledged.

mod ui_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::body::Body;
use http_body_util::BodyExt;
use nemesis_controller::metrics::ControllerMetrics;
use nemesis_controller::notify::evaluate::Signal;
use nemesis_controller::notify::outbox::Outbox;
use nemesis_controller::notify::rule::{AlertRule, compile};
use nemesis_controller::notify::sinks::{Sender, parse_sinks};
use nemesis_controller::notify::{Notifier, OutboxStore, RuleSource};
use nemesis_controller::store::{PolicyId, TransitionRecord};
use nemesis_controller::ui::UiConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use ui_support::*;

#[tokio::test]
async fn paging_through_events_of_one_millisecond_loses_and_repeats_none() {
    let f = fixture(UiConfig::default());
    let at = f.now_ms - 60_000;
    for i in 0..7 {
        f.store
            .record_transition(&TransitionRecord {
                at_ms: at,
                policy: id(),
                from_state: format!("s{i}"),
                to_state: format!("s{}", i + 1),
                from_replicas: 0,
                to_replicas: 1,
                reason: format!("burst {i}"),
                metrics: BTreeMap::new(),
            })
            .unwrap();
    }
    let login = login(&f.router).await;
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    for _page in 0..20 {
        let mut path = "/api/v1/events?kind=transition&q=burst&limit=3&window=1h".to_string();
        if let Some(b) = &before {
            path.push_str(&format!("&before={b}"));
        }
        let (status, v) = get_json(&f.router, &path, &login).await;
        assert_eq!(status, 200, "{v}");
        let events = v["events"].as_array().unwrap();
        assert!(events.len() <= 3);
        for e in events {
            assert_eq!(e["kind"], "transition");
            assert_eq!(e["atMs"], at);
            seen.push(e["record"]["reason"].as_str().unwrap().to_string());
        }
        match v["nextBefore"].as_str() {
            Some(b) => before = Some(b.to_string()),
            None => break,
        }
    }
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert_eq!(distinct.len(), 7, "no repeats: {seen:?}");
    // Newest first: within the millisecond, the last recorded comes first.
    assert_eq!(seen[0], "burst 6");
    assert_eq!(seen[6], "burst 0");
}

#[tokio::test]
async fn events_filter_by_kind_policy_and_text_and_refuse_bad_input() {
    let f = fixture(UiConfig::default());
    let login = login(&f.router).await;
    // The seeded history: 3 transitions, 3 scale events, 3 cold starts in 6 h.
    let (_, v) = get_json(&f.router, "/api/v1/events?window=24h&limit=100", &login).await;
    let kinds: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.len(), 9, "{v}");
    let ats: Vec<u64> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["atMs"].as_u64().unwrap())
        .collect();
    assert!(
        ats.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {ats:?}"
    );
    let (_, v) = get_json(
        &f.router,
        "/api/v1/events?kind=coldStart&window=24h",
        &login,
    )
    .await;
    assert_eq!(v["events"].as_array().unwrap().len(), 3, "{v}");
    let (_, v) = get_json(
        &f.router,
        "/api/v1/events?q=Timeout&window=24h&policy=shop/checkout",
        &login,
    )
    .await;
    assert_eq!(v["events"].as_array().unwrap().len(), 1, "{v}");
    let (_, v) = get_json(
        &f.router,
        "/api/v1/events?policy=shop/other&window=24h",
        &login,
    )
    .await;
    assert_eq!(v["events"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["nextBefore"], serde_json::Value::Null);
    for (q, says) in [
        ("kind=wake", "kind"),
        ("before=yesterday", "cursor"),
        ("policy=checkout", "namespace/name"),
    ] {
        let (status, v) = get_json(&f.router, &format!("/api/v1/events?{q}"), &login).await;
        assert_eq!(status, 400, "{q}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{q}: {v}");
    }
    let _ = PolicyId::new("a", "b");
}

#[tokio::test]
async fn the_live_feed_sends_the_policies_at_once() {
    let f = fixture(UiConfig::default());
    let login = login(&f.router).await;
    let resp = f
        .router
        .clone()
        .oneshot(
            request("GET", "/api/v1/stream", CLIENT)
                .header("cookie", &login.cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = resp.into_body();
    let frame = tokio::time::timeout(std::time::Duration::from_secs(30), body.frame())
        .await
        .expect("a first event within 30 s")
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(frame.data_ref().unwrap()).into_owned();
    assert!(text.starts_with("event: policies\n"), "{text}");
    assert!(text.contains("\"name\":\"checkout\""), "{text}");
    // Without a session there is no feed.
    let (resp, _) = send(
        &f.router,
        request("GET", "/api/v1/stream", CLIENT)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 401);
}

/// An outbox kept nowhere (this test restarts nothing).
struct NoStore;

impl OutboxStore for NoStore {
    fn load(&self) -> futures::future::BoxFuture<'_, Result<Option<Outbox>, String>> {
        Box::pin(async { Ok(None) })
    }
    fn save<'a>(&'a self, _: &'a [u8]) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// Reads the feed until an `event: alerts` whose data satisfies `want` (30 s at most).
async fn next_alerts(
    body: &mut Body,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| {
                panic!("no matching alerts event within 30 s; the feed said:\n{text}")
            })
            .expect("the feed goes on")
            .expect("a frame");
        if let Some(d) = frame.data_ref() {
            text.push_str(&String::from_utf8_lossy(d));
        }
        // Events end with a blank line; look at each complete one.
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            if let Some(data) = event.strip_prefix("event: alerts\ndata: ") {
                let v: serde_json::Value = serde_json::from_str(data.trim_end()).unwrap();
                if want(&v) {
                    return v;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_feed_sends_the_alerts_at_once_and_when_one_is_raised_or_acknowledged() {
    // A sink nobody listens on: the alert stays pending, which the feed shows too.
    let sinks = parse_sinks(
        "test sinks",
        "sinks:\n- {name: hook, kind: webhook, url: 'http://127.0.0.1:1/hook', hmacKey: 0123456789abcdef}\n",
    )
    .unwrap();
    let mut rule = AlertRule::new(
        "to-zero",
        serde_json::from_value(
            serde_json::json!({"when": [{"event": "ScaledToZero"}], "groupWait": "1s"}),
        )
        .unwrap(),
    );
    rule.metadata.namespace = Some(NS.into());
    let (_lead, leading) = watch::channel(true);
    let (notifier, handle, tap) = Notifier::new(
        sinks,
        Box::new(NoStore),
        RuleSource::Fixed(vec![compile(&rule).unwrap()]),
        Sender::new("test-instance".into(), "http://127.0.0.1:1/alerts".into()),
        ControllerMetrics::new(),
        None,
        leading,
    );
    let stop = CancellationToken::new();
    tokio::spawn(notifier.run(stop.clone()));
    let f = fixture_with(UiConfig::default(), Some(handle.clone()));
    let login = login(&f.router).await;
    let resp = f
        .router
        .clone()
        .oneshot(
            request("GET", "/api/v1/stream", CLIENT)
                .header("cookie", &login.cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = next_alerts(&mut body, |_| true).await;
    assert_eq!(first["alerts"], serde_json::json!([]), "{first}");
    assert_eq!(first["sinksConfigured"], 1, "{first}");

    tap.send(Signal::Scaled {
        policy: PolicyId::new(NS, NAME),
        from: 2,
        to: 0,
        reason: "conns.active == 0 for 5m".into(),
    });
    let raised = next_alerts(&mut body, |v| {
        v["alerts"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    let a = &raised["alerts"][0];
    assert_eq!(a["labels"]["alertname"], "NemesisScaledToZero", "{raised}");
    assert_eq!(a["state"], "firing", "{raised}");
    assert!(a["deliveries"]["hook"].is_object(), "{raised}");

    let id = a["id"].as_str().unwrap().to_string();
    handle.acknowledge(&id, "otto").unwrap();
    let acked = next_alerts(&mut body, |v| v["alerts"][0]["acknowledgedBy"] == "otto").await;
    assert_eq!(acked["alerts"][0]["id"], id.as_str());
    stop.cancel();
}
