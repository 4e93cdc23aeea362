//! History and caches on every replica: while the leader acts, the standby pulls its
//! records and its UI shows them, and keeps its policy and HPA caches listed and
//! watching; when the leader is SIGKILLed the standby keeps serving what it
//! holds and says it is stale, then takes over with the whole history and without
//! relisting, adds its own
//! records after the old leader's, and a replica started later catches up on all of
//! them, each record once.

mod controller_support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use controller_support::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use kube::api::PostParams;
use nemesis_common::wire::ServiceRef;
use nemesis_controller::app::Running;
use nemesis_controller::store::PolicyId;
use nemesis_tests::apiserver::TestApiServer;
use serde_json::{Value, json};

const UI_PW: &str = "replication-test-password";

/// Cluster-wide lists (not watches) of the resources the core caches, so far.
fn cluster_lists(server: &TestApiServer) -> Vec<String> {
    server
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "GET"
                && !r.query.contains("watch=true")
                && (r.path == "/apis/nemesis.dev/v1alpha1/scalingpolicies"
                    || r.path == "/apis/autoscaling/v2/horizontalpodautoscalers")
        })
        .map(|r| format!("{}?{}", r.path, r.query))
        .collect()
}
/// A standby under a loaded machine still pulls within this (it polls every 250 ms).
const PULL_BOUND: Duration = Duration::from_secs(60);

async fn start(server: &TestApiServer, dir: &Path, extra: &[&str]) -> anyhow::Result<Running> {
    let pw = dir.join("ui-password");
    std::fs::write(&pw, UI_PW)?;
    let pw = pw.display().to_string();
    let mut args = vec!["--ui-password-file", pw.as_str()];
    args.extend_from_slice(extra);
    start_controller(server, dir, &args).await
}

/// One request to the UI on the API listener; the status and the JSON body.
async fn ui(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<(u16, Option<String>, Value)> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("origin", format!("http://{addr}"));
    if let Some(c) = cookie {
        b = b.header("cookie", c);
    }
    let body = match body {
        Some(v) => {
            b = b.header("content-type", "application/json");
            Full::new(Bytes::from(serde_json::to_vec(&v)?))
        }
        None => Full::default(),
    };
    let req = b.body(body)?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .context("the UI did not answer within 30 s")??;
    let status = resp.status().as_u16();
    let session = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|c| c.split(';').next().unwrap_or("").to_string())
        .find(|c| c.starts_with("nemesis_session="));
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, session, value))
}

async fn login(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, cookie, v) = ui(
        addr,
        "POST",
        "/login",
        None,
        Some(json!({"username": "admin", "password": UI_PW})),
    )
    .await?;
    anyhow::ensure!(status == 200, "login on {addr}: {status} {v}");
    cookie.context("no session cookie")
}

/// The policy's events as the UI's events API lists them: `(kind, seq, summary)`.
async fn ui_events(
    addr: SocketAddr,
    cookie: &str,
    policy: &str,
) -> anyhow::Result<Vec<(String, u64, String)>> {
    let (status, _, v) = ui(
        addr,
        "GET",
        &format!("/api/v1/events?policy={policy}&window=1d&limit=500&kind=transition,scale"),
        Some(cookie),
        None,
    )
    .await?;
    anyhow::ensure!(status == 200, "events on {addr}: {status} {v}");
    let events = v["events"].as_array().context("no events array")?;
    Ok(events
        .iter()
        .map(|e| {
            let r = &e["record"];
            let summary = match e["kind"].as_str() {
                Some("transition") => format!(
                    "{}->{}",
                    r["from_state"].as_str().unwrap_or("?"),
                    r["to_state"].as_str().unwrap_or("?")
                ),
                _ => format!("{}->{}", r["from_replicas"], r["to_replicas"]),
            };
            (
                e["kind"].as_str().unwrap_or("").to_string(),
                e["seq"].as_u64().unwrap_or(0),
                summary,
            )
        })
        .collect())
}

async fn replication(addr: SocketAddr, cookie: &str) -> anyhow::Result<Value> {
    let (status, _, v) = ui(addr, "GET", "/api/v1/replication", Some(cookie), None).await?;
    anyhow::ensure!(status == 200, "replication on {addr}: {status} {v}");
    Ok(v)
}

/// `kind summary` of each event, sorted, for comparing sets of events.
fn summaries(events: &[(String, u64, String)]) -> Vec<String> {
    let mut v: Vec<String> = events.iter().map(|(k, _, s)| format!("{k} {s}")).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_holds_the_leaders_history_shows_it_and_leads_on_with_every_record_once()
-> anyhow::Result<()> {
    init_tracing();
    let OneDeployment {
        server,
        client: _,
        deployments,
        policies,
        log,
    } = OneDeployment::start("hist", 1).await?;
    let ns = "default";

    let (dir_a, dir_b, dir_c) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    // A holds its Lease for 15 s without renewal: after A's death B stays a standby that
    // cannot reach its leader long enough to see how it says so.
    let a = start(
        &server,
        dir_a.path(),
        &["--lease-duration", "15s", "--renew-deadline", "10s"],
    )
    .await?;
    wait_leading(&a, Duration::from_secs(30)).await?;
    let b = start(&server, dir_b.path(), &[]).await?;
    assert!(!b.is_leading(), "A leads, B stands by");
    let b_ui = login(b.api_addr).await?;

    let svc = ServiceRef {
        namespace: ns.into(),
        name: "hist".into(),
    };
    let agent = TestAgent::start("node-h", vec![svc.clone()], vec![a.api_addr]);
    policies
        .create(&PostParams::default(), &busy_policy("hist"))
        .await?;
    wait_state(&policies, "hist", "low", Duration::from_secs(30)).await?;

    // A scales 1 -> 3 and records it; B's UI shows A's records while A is alive.
    agent.set(|s| s.open = 10);
    wait_replicas(&deployments, "hist", 3, Duration::from_secs(30)).await?;
    let a_records = vec!["scale 1->3".to_string(), "transition low->high".to_string()];
    let seen_on_b = eventually("A's records in B's UI", PULL_BOUND, || async {
        let ev = ui_events(b.api_addr, &b_ui, "default/hist").await?;
        Ok((summaries(&ev) == a_records).then_some(ev))
    })
    .await?;
    assert!(!b.is_leading());
    assert_eq!(
        scrape(
            &b,
            "nemesis_controller_scale_operations_total{direction=\"up\"}"
        )
        .await
        .unwrap_or(0.0),
        0.0,
        "the standby shows the scale, it did not make it"
    );
    // The same records, under A's sequence numbers.
    let on_a: BTreeSet<u64> = a
        .store
        .log_entries()?
        .iter()
        .filter(|(_, e)| !e.is_samples())
        .map(|(s, _)| *s)
        .collect();
    for (_, seq, _) in &seen_on_b {
        assert!(on_a.contains(seq), "B shows seq {seq}, which A never wrote");
    }
    let view = eventually("B up to date", PULL_BOUND, || async {
        let v = replication(b.api_addr, &b_ui).await?;
        Ok((v["stale"] == json!(false)).then_some(v))
    })
    .await?;
    assert_eq!(view["role"], "standby", "{view}");
    assert_eq!(view["leader"], json!(a.identity), "{view}");
    assert_eq!(
        scrape(&b, "nemesis_controller_history_replication_source_up").await?,
        1.0
    );
    assert_eq!(
        scrape(&b, "nemesis_controller_history_replication_lag_records").await?,
        0.0
    );
    assert!(scrape(&b, "nemesis_controller_history_replicated_records_total").await? >= 2.0);

    let lists_before_kill = cluster_lists(&server);
    // A's and B's caches listed both kinds once each (the filter sees lists).
    assert!(
        lists_before_kill.len() >= 4,
        "expected each instance's lists: {lists_before_kill:?}"
    );
    // SIGKILL A (nothing released). Until A's Lease runs out B cannot reach its leader:
    // it keeps serving A's records and says it is stale.
    a.kill();
    let view = eventually("B saying it is stale", Duration::from_secs(12), || async {
        let v = replication(b.api_addr, &b_ui).await?;
        Ok((v["stale"] == json!(true) && v["error"].is_string()).then_some(v))
    })
    .await?;
    if !b.is_leading() {
        assert_eq!(view["role"], "standby", "{view}");
        assert_eq!(
            scrape(&b, "nemesis_controller_history_replication_source_up").await?,
            0.0
        );
        assert!(scrape(&b, "nemesis_controller_errors_total{kind=\"replication\"}").await? >= 1.0);
        assert_eq!(
            summaries(&ui_events(b.api_addr, &b_ui, "default/hist").await?),
            a_records,
            "a standby cut off from its leader still shows what it holds"
        );
    }

    // B takes over, resumes in `high` and scales back down when the load goes.
    wait_leading(&b, Duration::from_secs(60)).await?;
    *agent.targets.lock().unwrap() = vec![b.api_addr];
    agent.set(|s| s.open = 0);
    wait_replicas(&deployments, "hist", 1, Duration::from_secs(30)).await?;
    wait_state(&policies, "hist", "low", Duration::from_secs(30)).await?;
    assert_eq!(log.seen(), vec![1, 3, 1], "every scale exactly once");
    // B's caches were warm: from A's death to B's first scale nothing was relisted.
    assert_eq!(
        cluster_lists(&server),
        lists_before_kill,
        "the new leader relisted policies or HPAs"
    );

    // B's UI: A's records and B's own, each once, B's after A's.
    let all = vec![
        "scale 1->3".to_string(),
        "scale 3->1".to_string(),
        "transition high->low".to_string(),
        "transition low->high".to_string(),
    ];
    let on_b = eventually("A's and B's records in B's UI", PULL_BOUND, || async {
        let ev = ui_events(b.api_addr, &b_ui, "default/hist").await?;
        Ok((summaries(&ev) == all).then_some(ev))
    })
    .await?;
    let seqs: BTreeSet<u64> = on_b.iter().map(|(_, s, _)| *s).collect();
    assert_eq!(
        seqs.len(),
        4,
        "four records, four sequence numbers: {on_b:?}"
    );
    let max_a = on_a.iter().max().copied().unwrap_or(0);
    for (kind, seq, summary) in &on_b {
        let from_a = a_records.contains(&format!("{kind} {summary}"));
        assert_eq!(from_a, *seq <= max_a, "{kind} {summary} has seq {seq}");
    }
    let view = replication(b.api_addr, &b_ui).await?;
    assert_eq!(view["role"], "leader", "{view}");
    assert_eq!(view["stale"], json!(false), "{view}");
    let p = PolicyId::new(ns, "hist");
    assert_eq!(b.store.scale_events(&p, 0..u64::MAX)?.len(), 2);
    assert_eq!(b.store.transitions(&p, 0..u64::MAX)?.len(), 2);

    // A replica started now, with nothing, catches up on the whole history from B.
    let c = start(&server, dir_c.path(), &[]).await?;
    let c_ui = login(c.api_addr).await?;
    let on_c = eventually("the whole history in C's UI", PULL_BOUND, || async {
        let ev = ui_events(c.api_addr, &c_ui, "default/hist").await?;
        Ok((summaries(&ev) == all).then_some(ev))
    })
    .await?;
    let mut c_seqs: Vec<u64> = on_c.iter().map(|(_, s, _)| *s).collect();
    c_seqs.sort();
    assert_eq!(c_seqs, seqs.into_iter().collect::<Vec<_>>());
    assert!(!c.is_leading());
    c.shutdown().await;
    b.shutdown().await;
    Ok(())
}
