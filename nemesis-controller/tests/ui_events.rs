//! The events API and the live feed through the UI's real router: paging newest first
//! loses no event when many share a millisecond, filters by kind and policy and a text
//! search narrow it, and the feed sends the policy list at once.

mod ui_support;

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Body;
use http_body_util::BodyExt;
use nemesis_controller::store::{PolicyId, TransitionRecord};
use nemesis_controller::ui::UiConfig;
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
