//! `GET /api/reports` over a real history store seeded with six hours of one policy's
//! life (see `ui_support::seed`): the scaling, resource and performance figures per
//! Service, namespace and cluster; JSON, CSV, and the printable HTML page printed to PDF
//! by Debian's Chromium; the refusals of bad queries.

mod ui_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use axum::body::Body;
use chrono::{SecondsFormat, TimeZone, Utc};
use ui_support::{CLIENT, Fixture, fixture, get_json, login, policy, request, send};

use nemesis_controller::ui::UiConfig;

const CHROMIUM: &str = "/usr/bin/chromium";
const H: u64 = 3_600_000;

/// The seeded policy with a maximum of 4 replicas, plus a second one in another namespace.
fn seeded() -> Fixture {
    let mut f = fixture(UiConfig::default());
    let mut p = policy(ui_support::NS, ui_support::NAME, f.now_ms);
    p.spec.max_replicas = Some(4);
    f.feed.upsert(p);
    f.feed.upsert(policy("other", "api", f.now_ms));
    f
}

fn close(a: &serde_json::Value, want: f64, tol: f64) {
    let v = a.as_f64().unwrap_or(f64::NAN);
    assert!((v - want).abs() <= tol, "{v} is not {want} ± {tol}");
}

#[tokio::test]
async fn a_service_report_has_scaling_resources_and_performance() {
    let f = seeded();
    let login = login(&f.router).await;
    let (status, v) = get_json(
        &f.router,
        "/api/reports?scope=service&namespace=shop&name=checkout&window=6h&priceReplicaHour=0.5",
        &login,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["scope"], "service");
    let s = &v["services"][0];
    assert_eq!(v["services"].as_array().unwrap().len(), 1);
    assert_eq!(s["deployment"], "checkout");
    // Scaling: three transitions with their reasons, two ready wakes and one timed out.
    let sc = &s["scaling"];
    assert_eq!(sc["transitions"], 3);
    assert_eq!(
        sc["transitionsListed"][1]["reason"],
        "conns.active == 0 for 10m"
    );
    let w = &sc["wakes"];
    assert_eq!(w["count"], 3);
    assert_eq!(w["ready"], 2);
    assert_eq!(w["holdsTimedOut"], 1);
    assert_eq!(w["p50Ms"], 1800);
    assert_eq!(w["p95Ms"], 4200);
    assert_eq!(w["maxMs"], 4200);
    assert_eq!(w["heldConnections"], 9);
    // Zero from the window's start to the first wake, and between 3 h and 1 h ago.
    close(&sc["timeInStatesSeconds"]["zero"], 3.0 * 3600.0, 60.0);
    close(&sc["timeInStatesSeconds"]["warm"], 3.0 * 3600.0, 60.0);
    // Resources: 2 replicas for 2 h and for the last hour, against 4 for 6 h.
    let r = &s["resources"];
    assert_eq!(r["maxReplicas"], 4);
    assert_eq!(r["known"], true);
    close(&r["used"]["replicaHours"], 6.0, 0.05);
    close(&r["atMax"]["replicaHours"], 24.0, 0.05);
    close(&r["saved"]["replicaHours"], 18.0, 0.1);
    close(&r["saved"]["cost"], 9.0, 0.05);
    // Performance: the connection series over time.
    let conns = &s["performance"]["conns.active"];
    assert_eq!(conns["max"], 7.0);
    assert!(conns["points"].as_array().unwrap().len() > 100);
    close(&v["totals"]["saved"]["replicaHours"], 18.0, 0.1);
}

#[tokio::test]
async fn from_and_to_choose_the_window_and_scopes_choose_the_services() {
    let f = seeded();
    let login = login(&f.router).await;
    let from = Utc
        .timestamp_millis_opt((f.now_ms - 2 * H) as i64)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Secs, true);
    let (status, v) = get_json(
        &f.router,
        &format!("/api/reports?namespace=shop&name=checkout&from={from}"),
        &login,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // The wake that timed out 2 h ago (on the boundary, which belongs to the window)
    // and the one 1 h ago; only the transition 1 h ago.
    assert_eq!(v["services"][0]["scaling"]["transitions"], 1);
    assert_eq!(v["services"][0]["scaling"]["wakes"]["count"], 2);
    assert_eq!(v["services"][0]["scaling"]["wakes"]["holdsTimedOut"], 1);

    let (_, v) = get_json(
        &f.router,
        "/api/reports?scope=namespace&namespace=shop",
        &login,
    )
    .await;
    assert_eq!(v["totals"]["services"], 1);
    let (_, v) = get_json(&f.router, "/api/reports?scope=cluster", &login).await;
    assert_eq!(v["totals"]["services"], 2);
    let names: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["api", "checkout"]);
}

#[tokio::test]
async fn the_csv_has_one_row_per_service_and_a_total() {
    let f = seeded();
    let login = login(&f.router).await;
    let (resp, body) = send(
        &f.router,
        request(
            "GET",
            "/api/reports?scope=cluster&window=6h&format=csv",
            CLIENT,
        )
        .header("cookie", &login.cookie)
        .body(Body::empty())
        .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200, "{body}");
    assert_eq!(resp.headers()["content-type"], "text/csv; charset=utf-8");
    assert!(
        resp.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("nemesis-report-cluster.csv")
    );
    let rows: Vec<Vec<&str>> = body.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 4, "{body}");
    let header = &rows[0];
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    assert_eq!(rows[1][col("namespace")], "other");
    let shop = &rows[2];
    assert_eq!(shop[col("scope")], "service");
    assert_eq!(shop[col("name")], "checkout");
    assert_eq!(shop[col("transitions")], "3");
    assert_eq!(shop[col("holds_timed_out")], "1");
    assert_eq!(shop[col("cold_start_p50_ms")], "1800");
    let saved: f64 = shop[col("replica_hours_saved")].parse().unwrap();
    assert!((saved - 18.0).abs() < 0.1, "{saved}");
    assert_eq!(rows[3][col("scope")], "total");
    assert_eq!(rows[3][col("transitions")], "3");
}

#[tokio::test]
async fn the_printable_page_prints_to_pdf_through_chromium() {
    let f = seeded();
    let login = login(&f.router).await;
    let (resp, html) = send(
        &f.router,
        request(
            "GET",
            "/api/reports?namespace=shop&name=checkout&window=6h&format=html",
            CLIENT,
        )
        .header("cookie", &login.cookie)
        .body(Body::empty())
        .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200, "{html}");
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    let csp = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'none'") && !csp.contains("script"),
        "{csp}"
    );
    assert!(html.contains("Nemesis report: shop/checkout"));
    assert!(html.contains("<svg") && html.contains("<polyline"));
    assert!(html.contains("conns.active == 0 for 10m"));

    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    let pdf = dir.path().join("report.pdf");
    std::fs::write(&page, &html).unwrap();
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-pdf-header-footer",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg(format!("--print-to-pdf={}", pdf.display()))
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("Debian's chromium (cargo xtask setup installs it)");
    // Chromium's first start on a busy machine can take a while.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not print within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "chromium: {status}");
    let bytes = std::fs::read(&pdf).unwrap();
    assert!(bytes.starts_with(b"%PDF-"), "not a PDF");
    let text = String::from_utf8_lossy(&bytes);
    let pages = text.matches("/Type /Page\n").count()
        + text.matches("/Type /Page/").count()
        + text.matches("/Type /Page ").count()
        + text.matches("/Type/Page").count();
    assert!(pages >= 1, "no page in the PDF ({} bytes)", bytes.len());
    assert!(
        bytes.len() > 5_000,
        "a nearly empty PDF: {} bytes",
        bytes.len()
    );
}

#[tokio::test]
async fn bad_queries_are_refused_saying_what_is_wrong() {
    let f = seeded();
    let login = login(&f.router).await;
    for (query, status, says) in [
        ("scope=service&namespace=shop", 400, "namespace and name"),
        ("scope=namespace", 400, "needs namespace"),
        ("scope=galaxy", 400, "scope"),
        ("namespace=shop&name=nope", 404, "shop/nope"),
        ("format=xml", 400, "format"),
        ("from=yesterday", 400, "RFC 3339"),
        ("from=2030-01-01T00:00:00Z", 400, "from must be before to"),
        ("window=1s", 400, "window"),
        ("window=1h&from=2026-01-01T00:00:00Z", 400, "not both"),
        ("priceGpuHour=-1", 400, "priceGpuHour"),
    ] {
        let (got, v) = get_json(&f.router, &format!("/api/reports?{query}"), &login).await;
        assert_eq!(got, status, "{query}: {v}");
        assert!(v.to_string().contains(says), "{query}: {v}");
    }
    let anon = request("GET", "/api/reports", CLIENT)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&f.router, anon).await.0.status(), 401);
}
