//! The UI's JSON API over a real, seeded history store: what the overview, the policy
//! page, the agents and alerts pages and the summary report show, with the numbers the
//! seeded history implies, and clear errors for bad input.

mod ui_support;

use axum::body::Body;
use nemesis_common::wire::{AppliedMode, Heartbeat, ServiceRef, ServiceReport};
use nemesis_controller::alerts::WebhookMessage;
use nemesis_controller::ui::UiConfig;
use ui_support::*;

const HOUR_MS: f64 = 3_600_000.0;

#[tokio::test]
async fn the_overview_lists_each_policy_with_state_replicas_and_last_transition() {
    let f = fixture(UiConfig::default());
    let login = login(&f.router).await;
    let (status, v) = get_json(&f.router, "/api/v1/policies", &login).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["synced"], true);
    let p = &v["policies"][0];
    assert_eq!(p["namespace"], NS);
    assert_eq!(p["name"], NAME);
    assert_eq!(p["target"], format!("Deployment/{NAME}"));
    assert_eq!(p["state"], "warm");
    assert_eq!(p["desiredReplicas"], 2);
    assert_eq!(p["replicas"], 2.0, "the latest replica sample");
    assert_eq!(p["readyReplicas"], 2.0);
    assert_eq!(p["ready"], true);
    assert_eq!(p["invalid"], false);
    assert_eq!(p["lastTransition"]["from"], "zero");
    assert_eq!(p["lastTransition"]["to"], "warm");
    assert_eq!(p["lastTransition"]["reason"], "demand");
    assert_eq!(p["conditions"].as_array().unwrap().len(), 2);

    let (status, d) = get_json(&f.router, "/api/v1/policies/shop/checkout", &login).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["state"], "warm");
    assert_eq!(d["spec"]["idleTimeout"], "10m");
}

#[tokio::test]
async fn a_policys_history_carries_its_transitions_cold_starts_and_time_per_state() {
    let f = fixture(UiConfig::default());
    let login = login(&f.router).await;
    let (status, h) = get_json(&f.router, "/api/v1/policies/shop/checkout/history", &login).await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["window"]["seconds"], 86_400, "24 h by default");
    assert_eq!(h["known"], true);
    assert_eq!(h["transitionCount"], 3);
    assert_eq!(h["scaleEventCount"], 3);
    assert_eq!(h["transitions"][2]["to"], "warm");
    assert_eq!(h["stateAtStart"], "zero");
    assert_eq!(h["replicasAtStart"], 0);
    let cs = &h["coldStartStats"];
    assert_eq!(
        (
            cs["count"].as_u64(),
            cs["ready"].as_u64(),
            cs["timeouts"].as_u64()
        ),
        (Some(3), Some(2), Some(1))
    );
    assert_eq!(cs["p50Ms"], 1_800);
    assert_eq!(cs["p99Ms"], 4_200);
    assert_eq!(h["coldStarts"][1]["outcome"], "timeout");
    let zero = h["timeInStatesMs"]["zero"].as_f64().unwrap() / HOUR_MS;
    let warm = h["timeInStatesMs"]["warm"].as_f64().unwrap() / HOUR_MS;
    assert!(
        (zero - 21.0).abs() < 0.01 && (warm - 3.0).abs() < 0.01,
        "zero {zero} h, warm {warm} h"
    );
    // 2 replicas for 2 h and again for the last hour.
    let rs = h["replicaSeconds"].as_f64().unwrap();
    assert!((rs - 21_600.0).abs() < 60.0, "{rs}");
    let replicas = h["series"]["nemesis.replicas"].as_array().unwrap();
    // Six hours of minute samples in 400 buckets over 24 h: a quarter of them.
    assert!((95..=105).contains(&replicas.len()), "{}", replicas.len());
    assert!(
        h["series"]["conns.active"].as_array().is_some(),
        "the policy's own metric"
    );

    // A window inside the last warm hour: no transition, the state and replicas it
    // started with come from the figures.
    let (_, h) = get_json(
        &f.router,
        "/api/v1/policies/shop/checkout/history?window=30m",
        &login,
    )
    .await;
    assert_eq!(h["transitionCount"], 0);
    assert_eq!(h["stateAtStart"], "warm");
    assert_eq!(h["replicasAtStart"], 2);
    let (_, h) = get_json(
        &f.router,
        "/api/v1/policies/shop/checkout/history?window=2h",
        &login,
    )
    .await;
    assert_eq!(h["transitionCount"], 1);
    assert_eq!(h["stateAtStart"], "zero");
}

#[tokio::test]
async fn a_new_policys_history_starts_when_it_was_created_not_a_window_earlier() {
    let mut f = fixture(UiConfig::default());
    let login = login(&f.router).await;
    let now = f.now_ms;
    let created = now - 30 * 60_000;
    let mut p = policy("shop", "fresh", now);
    p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_millisecond(created as i64).unwrap(),
    ));
    f.feed.upsert(p);
    let id = nemesis_controller::store::PolicyId::new("shop", "fresh");
    f.store
        .record_transition(&nemesis_controller::store::TransitionRecord {
            at_ms: now - 10 * 60_000,
            policy: id,
            from_state: "zero".into(),
            to_state: "warm".into(),
            from_replicas: 0,
            to_replicas: 1,
            reason: "demand".into(),
            metrics: Default::default(),
        })
        .unwrap();
    let (status, h) = get_json(&f.router, "/api/v1/policies/shop/fresh/history", &login).await;
    // The window ends at the server's clock when it answered, somewhere between the
    // fixture's `now` and this moment: on a loaded machine that is seconds, not 0.
    let answered = now_ms();
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["window"]["fromMs"], created);
    let seconds = h["window"]["seconds"].as_u64().unwrap();
    let (earliest, latest) = ((now - created) / 1000, (answered - created) / 1000);
    assert!(
        (earliest.saturating_sub(1)..=latest + 1).contains(&seconds),
        "{seconds} s, not in {earliest}..={latest} s"
    );
    let late_min = (answered - now) as f64 / 60_000.0;
    let zero = h["timeInStatesMs"]["zero"].as_f64().unwrap() / 60_000.0;
    let warm = h["timeInStatesMs"]["warm"].as_f64().unwrap() / 60_000.0;
    assert!(
        (zero - 20.0).abs() < 0.1 && warm > 10.0 - 0.1 && warm < 10.0 + late_min + 0.1,
        "zero {zero} min, warm {warm} min (a 24 h window would count 23 h 50 min at zero)"
    );
}

#[tokio::test]
async fn the_summary_report_comes_as_json_and_as_csv() {
    let f = fixture(UiConfig::default());
    let login = login(&f.router).await;
    let (status, r) = get_json(&f.router, "/api/v1/reports/summary?window=24h", &login).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["window"]["seconds"], 86_400);
    assert_eq!(r["totals"]["policies"], 1);
    assert_eq!(r["totals"]["transitions"], 3);
    assert_eq!(r["totals"]["coldStarts"]["p99Ms"], 4_200);
    let p = &r["policies"][0];
    assert_eq!(p["state"], "warm");
    let avg = p["averageReplicas"].as_f64().unwrap();
    assert!((avg - 0.25).abs() < 0.01, "{avg}");

    for (path, accept) in [
        ("/api/v1/reports/summary?window=24h&format=csv", "*/*"),
        ("/api/v1/reports/summary?window=24h", "text/csv"),
    ] {
        let (resp, body) = send(
            &f.router,
            request("GET", path, CLIENT)
                .header("cookie", &login.cookie)
                .header("accept", accept)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/csv")
        );
        assert!(
            resp.headers()["content-disposition"]
                .to_str()
                .unwrap()
                .contains("attachment")
        );
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines.len(), 2, "{body}");
        assert!(lines[0].starts_with("namespace,name,state,window_seconds,transitions"));
        let row: Vec<&str> = lines[1].split(',').collect();
        assert_eq!(
            &row[..14],
            &[
                "shop", "checkout", "warm", "86400", "3", "3", "3", "2", "1", "0", "1800", "4200",
                "4200", "9"
            ]
        );
        assert!(
            row[16].contains("warm=") && row[16].contains("zero="),
            "{}",
            row[16]
        );
    }
}

#[tokio::test]
async fn bad_paths_and_windows_get_clear_json_errors() {
    let f = fixture(UiConfig::default());
    let login = login(&f.router).await;
    for (path, status, words) in [
        (
            "/api/v1/policies/shop/nope",
            404,
            "no ScalingPolicy shop/nope",
        ),
        (
            "/api/v1/policies/Shop/checkout",
            400,
            "not a Kubernetes name",
        ),
        (
            "/api/v1/policies/shop/checkout/history?window=soon",
            400,
            "not a duration",
        ),
        (
            "/api/v1/policies/shop/checkout/history?window=900d",
            400,
            "between 1m and 400d",
        ),
        (
            "/api/v1/reports/summary?format=xml",
            400,
            "not one of json, csv",
        ),
    ] {
        let (got, v) = get_json(&f.router, path, &login).await;
        assert_eq!(got, status, "{path}: {v}");
        let msg = v["error"].as_str().unwrap_or_else(|| panic!("{path}: {v}"));
        assert!(msg.contains(words), "{path}: {msg}");
    }
    // A deleted policy's history is still there.
    let (got, h) = get_json(&f.router, "/api/v1/policies/shop/gone/history", &login).await;
    assert_eq!(got, 200);
    assert_eq!(h["known"], false);
    assert_eq!(h["transitionCount"], 0);
}

#[tokio::test]
async fn agents_and_alerts_show_what_the_registry_and_the_alert_book_hold() {
    let mut f = fixture(UiConfig::default());
    f.registry.heartbeat(
        Heartbeat {
            node: "node-a".into(),
            instance: "inst-1".into(),
            services: vec![ServiceReport {
                service: ServiceRef {
                    namespace: NS.into(),
                    name: NAME.into(),
                },
                mode: AppliedMode::Passthrough,
                applied_epoch: 0,
                connects_total: 12,
                open_connections: 3,
                closed_total: 9,
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
        },
        tokio::time::Instant::now(),
    );
    let mut gpu = policy(NS, "gpu", f.now_ms);
    gpu.spec.metrics.alerts = vec!["GPUPressure".into(), "Maintenance".into()];
    f.feed.upsert(gpu);
    let msg: WebhookMessage = serde_json::from_value(serde_json::json!({
        "version": "4",
        "status": "firing",
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "GPUPressure", "node": "n1"},
            "startsAt": "2030-01-01T00:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z"
        }]
    }))
    .unwrap();
    f.alerts.apply(&msg, chrono::Utc::now());

    let login = login(&f.router).await;
    let (status, a) = get_json(&f.router, "/api/v1/agents", &login).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["live"], 1);
    let agent = &a["agents"][0];
    assert_eq!(agent["node"], "node-a");
    assert_eq!(agent["live"], true);
    assert_eq!(agent["services"][0]["mode"], "passthrough");
    assert_eq!(agent["services"][0]["openConnections"], 3);

    let (status, al) = get_json(&f.router, "/api/v1/alerts", &login).await;
    assert_eq!(status, 200, "{al}");
    assert_eq!(al["webhookConfigured"], true);
    let alerts = al["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 2, "{al}");
    assert_eq!(alerts[0]["name"], "GPUPressure");
    assert_eq!(alerts[0]["firing"], true);
    assert_eq!(alerts[0]["instances"], 1);
    assert_eq!(alerts[0]["policies"], serde_json::json!(["shop/gpu"]));
    assert_eq!(alerts[1]["name"], "Maintenance");
    assert_eq!(alerts[1]["firing"], false);

    let (_, list) = get_json(&f.router, "/api/v1/policies", &login).await;
    let names: Vec<&str> = list["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["checkout", "gpu"], "sorted by namespace and name");
}
