//! The UI's authentication through its real router (axum `oneshot`, no socket): login
//! and logout, answers that leak nothing, rate limits, CSRF, body limits, expiry, and
//! that no password ever reaches the log (every test's tracing output is captured).

mod ui_support;

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use nemesis_controller::ui::{LimitConfig, UiConfig};
use ui_support::*;

// === log capture ===

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every event of every crate, at every level, into [`LOG`] (once per test process).
fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| Capture)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
}

fn logs() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

// === login and logout ===

#[tokio::test]
async fn a_login_sets_an_http_only_strict_cookie_and_opens_the_api() {
    capture_logs();
    let f = fixture(UiConfig::default());
    let (resp, body) = send(&f.router, login_request("admin", PASSWORD, CLIENT)).await;
    assert_eq!(resp.status(), 200, "{body}");
    let cookie = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.starts_with("nemesis_session="), "{cookie}");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(cookie.contains(attr), "{attr} missing: {cookie}");
    }
    let id = cookie
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("nemesis_session=");
    assert_eq!(id.len(), 64, "a 256-bit id in hex");
    let v = json(&body);
    assert_eq!(v["user"], "admin");
    let csrf = v["csrfToken"].as_str().unwrap();
    assert_eq!(csrf.len(), 64);
    assert!(!body.contains(id), "the session id is only in the cookie");

    let login = Login {
        cookie: format!("nemesis_session={id}"),
        csrf: csrf.to_string(),
        device: String::new(),
    };
    let (status, v) = get_json(&f.router, "/api/v1/session", &login).await;
    assert_eq!(status, 200);
    assert_eq!(v["csrfToken"], csrf);
    let (status, v) = get_json(&f.router, "/api/v1/policies", &login).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["policies"][0]["name"], NAME);
}

#[tokio::test]
async fn a_wrong_password_or_user_name_is_401_with_one_message_and_no_cookie() {
    capture_logs();
    let f = fixture(UiConfig::default());
    let mut bodies = Vec::new();
    for (user, pw) in [("admin", "wrong-guess-Zq9xK"), ("root", PASSWORD), ("", "")] {
        let (resp, body) = send(&f.router, login_request(user, pw, CLIENT)).await;
        assert_eq!(resp.status(), 401, "{user}: {body}");
        assert!(resp.headers().get("set-cookie").is_none());
        assert_eq!(
            json(&body),
            serde_json::json!({"error": "wrong user name or password"})
        );
        bodies.push(body);
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "the same answer whatever was wrong"
    );
}

#[tokio::test]
async fn a_login_that_is_not_json_is_refused_with_415() {
    capture_logs();
    let f = fixture(UiConfig::default());
    let (resp, body) = send(
        &f.router,
        request("POST", "/login", CLIENT)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(format!("username=admin&password={PASSWORD}")))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 415, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("application/json")
    );
    assert!(!body.contains(PASSWORD));
}

#[tokio::test]
async fn logout_ends_the_session_and_clears_the_cookie() {
    capture_logs();
    let f = fixture(UiConfig::default());
    let login = login(&f.router).await;
    let (resp, body) = send(
        &f.router,
        request("POST", "/logout", CLIENT)
            .header("cookie", &login.cookie)
            .header("x-csrf-token", &login.csrf)
            .header("origin", format!("http://{HOST}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200, "{body}");
    let cleared = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cleared.starts_with("nemesis_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    let (status, _) = get_json(&f.router, "/api/v1/session", &login).await;
    assert_eq!(status, 401, "the old cookie no longer works");
}

#[tokio::test]
async fn a_new_login_replaces_the_session_the_browser_had() {
    capture_logs();
    let f = fixture(UiConfig::default());
    let first = login(&f.router).await;
    let (resp, body) = send(&f.router, {
        let mut r = login_request("admin", PASSWORD, CLIENT);
        r.headers_mut()
            .insert("cookie", first.cookie.parse().unwrap());
        r
    })
    .await;
    assert_eq!(resp.status(), 200, "{body}");
    let second = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(
        !second.starts_with(&first.cookie),
        "a fresh id on every login"
    );
    let (status, _) = get_json(&f.router, "/api/v1/session", &first).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn an_idle_session_expires() {
    capture_logs();
    let f = fixture(UiConfig {
        session_idle: Duration::from_millis(300),
        ..UiConfig::default()
    });
    let login = login(&f.router).await;
    assert_eq!(get_json(&f.router, "/api/v1/session", &login).await.0, 200);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let (status, v) = get_json(&f.router, "/api/v1/session", &login).await;
    assert_eq!(status, 401);
    assert!(v["error"].as_str().unwrap().contains("log in"), "{v}");
}

// === refusals ===

#[tokio::test]
async fn logins_are_rate_limited_per_address_with_a_clear_429() {
    capture_logs();
    let f = fixture(UiConfig::default());
    // The admin's own browser logged in once before the attack.
    let admins_browser = login(&f.router).await;
    let guesser = "127.0.0.7:51000";
    for i in 0..5 {
        let (resp, _) = send(
            &f.router,
            login_request("admin", "wrong-guess-Zq9xK", guesser),
        )
        .await;
        assert_eq!(resp.status(), 401, "attempt {i}");
    }
    for pw in ["wrong-guess-Zq9xK", PASSWORD] {
        let (resp, body) = send(&f.router, login_request("admin", pw, guesser)).await;
        assert_eq!(resp.status(), 429, "{body}");
        let retry: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=12).contains(&retry), "{retry}");
        let msg = json(&body)["error"].as_str().unwrap().to_string();
        assert!(
            msg.starts_with("too many login attempts from your address; try again in"),
            "{msg}"
        );
    }
    // Another address is not limited by the guesser's bucket, but five wrong passwords
    // locked the user name itself, from every address a browser has never logged in
    // from...
    let (resp, body) = send(
        &f.router,
        login_request("admin", PASSWORD, "127.0.0.8:51000"),
    )
    .await;
    assert_eq!(resp.status(), 429, "{body}");
    assert!(body.contains("locked"), "{body}");
    // ...but not from the admin's own browser, even from the guesser's address.
    let mut req = login_request("admin", PASSWORD, guesser);
    req.headers_mut()
        .insert("cookie", admins_browser.device.parse().unwrap());
    let (resp, body) = send(&f.router, req).await;
    assert_eq!(resp.status(), 200, "{body}");
}

#[tokio::test]
async fn many_addresses_together_hit_the_global_login_limit() {
    capture_logs();
    let f = fixture(UiConfig {
        login_limit: LimitConfig {
            global_burst: 3,
            global_every: Duration::from_secs(60),
            ..LimitConfig::default()
        },
        ..UiConfig::default()
    });
    for i in 0..3 {
        let (resp, _) = send(
            &f.router,
            login_request("admin", "wrong-guess-Zq9xK", &format!("127.0.1.{i}:5000")),
        )
        .await;
        assert_eq!(resp.status(), 401);
    }
    let (resp, body) = send(
        &f.router,
        login_request("admin", PASSWORD, "127.0.2.1:5000"),
    )
    .await;
    assert_eq!(resp.status(), 429, "{body}");
    assert!(body.contains("too many login attempts right now"), "{body}");
    assert!(resp.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn the_api_and_the_pages_need_a_session() {
    capture_logs();
    let f = fixture(UiConfig::default());
    let bogus = Login {
        cookie: format!("nemesis_session={}", "a".repeat(64)),
        csrf: String::new(),
        device: String::new(),
    };
    for path in [
        "/api/v1/session",
        "/api/v1/policies",
        "/api/v1/policies/shop/checkout",
        "/api/v1/policies/shop/checkout/history?window=1h",
        "/api/v1/agents",
        "/api/v1/alerts",
        "/api/v1/reports/summary?window=24h",
        "/api/v1/reports/summary?format=csv",
    ] {
        let (resp, body) = send(
            &f.router,
            request("GET", path, CLIENT).body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(resp.status(), 401, "{path}: {body}");
        assert!(
            json(&body)["error"]
                .as_str()
                .unwrap()
                .contains("not logged in")
        );
        assert!(!body.contains(NAME), "{path} leaked data: {body}");
        assert_eq!(
            get_json(&f.router, path, &bogus).await.0,
            401,
            "{path} with a made-up id"
        );
    }
    for page in ["/", "/policies/shop/checkout", "/agents", "/alerts"] {
        let (resp, _) = send(
            &f.router,
            request("GET", page, CLIENT).body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(resp.status(), 303, "{page}");
        assert_eq!(resp.headers()["location"], "/login");
    }
    let (resp, body) = send(
        &f.router,
        request("GET", "/login", CLIENT)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(body.contains("id=\"login-form\""));
    let csp = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
    let (resp, _) = send(
        &f.router,
        request("GET", "/assets/app.js", CLIENT)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
}

#[tokio::test]
async fn changes_without_the_sessions_csrf_token_are_refused_with_403() {
    capture_logs();
    let f = fixture(UiConfig::default());
    let login = login(&f.router).await;
    let other = {
        // A second session's token is not this session's.
        let (resp, body) = send(&f.router, login_request("admin", PASSWORD, "127.0.0.9:1")).await;
        assert_eq!(resp.status(), 200);
        json(&body)["csrfToken"].as_str().unwrap().to_string()
    };
    let logout = |token: Option<&str>, origin: &str| {
        let mut b = request("POST", "/logout", CLIENT)
            .header("cookie", &login.cookie)
            .header("origin", origin);
        if let Some(t) = token {
            b = b.header("x-csrf-token", t);
        }
        b.body(Body::empty()).unwrap()
    };
    let same = format!("http://{HOST}");
    for (token, origin, want) in [
        (None, same.as_str(), "missing X-CSRF-Token"),
        (Some(other.as_str()), same.as_str(), "does not match"),
        (Some("x"), same.as_str(), "does not match"),
        (
            Some(login.csrf.as_str()),
            "http://evil.example",
            "cross-origin",
        ),
    ] {
        let (resp, body) = send(&f.router, logout(token, origin)).await;
        assert_eq!(resp.status(), 403, "{token:?} {origin}: {body}");
        assert!(
            json(&body)["error"].as_str().unwrap().contains(want),
            "{body}"
        );
        assert!(!body.contains(&login.csrf), "the token is never echoed");
    }
    assert_eq!(
        get_json(&f.router, "/api/v1/session", &login).await.0,
        200,
        "refused changes changed nothing"
    );
    let (resp, _) = send(&f.router, logout(Some(&login.csrf), &same)).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413_before_they_are_read() {
    capture_logs();
    let f = fixture(UiConfig::default());
    let big = format!(
        r#"{{"username":"admin","password":"{}"}}"#,
        "x".repeat(100 * 1024)
    );
    // Declared too large: refused on the header.
    let (resp, body) = send(
        &f.router,
        request("POST", "/login", CLIENT)
            .header("content-type", "application/json")
            .header("content-length", big.len().to_string())
            .body(Body::from(big.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 413, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("larger than"),
        "{body}"
    );
    // Not declared: refused while reading, at the limit.
    let (resp, body) = send(
        &f.router,
        request("POST", "/login", CLIENT)
            .header("content-type", "application/json")
            .body(Body::from(big))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 413, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("larger than the limit"),
        "{body}"
    );
}

// === the log ===

#[tokio::test]
async fn no_password_ever_reaches_the_log() {
    capture_logs();
    let f = fixture(UiConfig::default());
    let login = login(&f.router).await;
    let (resp, _) = send(
        &f.router,
        login_request("admin", "wrong-guess-Zq9xK", CLIENT),
    )
    .await;
    assert_eq!(resp.status(), 401);
    let _ = get_json(&f.router, "/api/v1/policies", &login).await;
    let log = logs();
    assert!(log.contains("UI login failed"), "the capture works: {log}");
    assert!(log.contains("UI login"), "{log}");
    for secret in [PASSWORD, "wrong-guess-Zq9xK", login.csrf.as_str()] {
        assert!(!log.contains(secret), "{secret:?} is in the log:\n{log}");
    }
    let id = login.cookie.trim_start_matches("nemesis_session=");
    assert!(!log.contains(id), "the session id is in the log");
}
