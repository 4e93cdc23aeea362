//! Users, roles and API tokens through the UI's real router (axum `oneshot`, accounts in
//! memory): each role reads everything and changes only what it may, the server refuses
//! the rest (403) whatever the page shows; tokens are shown once, kept as digests and
//! expire; role changes and deletions apply at once; every refusal is counted.

mod ui_support;

use std::time::Duration;

use axum::body::Body;
use nemesis_controller::metrics::UiRefusal;
use nemesis_controller::ui::UiConfig;
use ui_support::*;

const VIEWER_PW: &str = "viewer-password-1";
const OPERATOR_PW: &str = "operator-password-1";

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// A change as the UI's page sends it: the session cookie, its CSRF token, same origin.
async fn change(
    f: &Fixture,
    method: &str,
    path: &str,
    login: &Login,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let (resp, text) = send(
        &f.router,
        request(method, path, CLIENT)
            .header("cookie", &login.cookie)
            .header("x-csrf-token", &login.csrf)
            .header("origin", format!("http://{HOST}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
    .await;
    let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (resp.status().as_u16(), v)
}

/// A request with an API token (no cookie, no CSRF token, as a script sends it).
async fn with_token(
    f: &Fixture,
    method: &str,
    path: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut b = request(method, path, CLIENT).header("authorization", format!("Bearer {token}"));
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let (resp, text) = send(
        &f.router,
        b.body(body.map_or_else(Body::empty, |v| Body::from(v.to_string())))
            .unwrap(),
    )
    .await;
    let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (resp.status().as_u16(), v)
}

async fn add_user(f: &Fixture, admin: &Login, name: &str, role: &str, password: &str) {
    let (status, v) = change(
        f,
        "POST",
        "/api/v1/users",
        admin,
        serde_json::json!({ "name": name, "role": role, "password": password }),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["role"], role);
}

/// The admin, a viewer and an operator, each logged in from its own address.
async fn three_roles(f: &Fixture) -> (Login, Login, Login) {
    let admin = login(&f.router).await;
    add_user(f, &admin, "vera", "viewer", VIEWER_PW).await;
    add_user(f, &admin, "otto", "operator", OPERATOR_PW).await;
    let viewer = login_as(&f.router, "vera", VIEWER_PW, "127.0.0.21:4000").await;
    let operator = login_as(&f.router, "otto", OPERATOR_PW, "127.0.0.22:4000").await;
    (admin, viewer, operator)
}

const PAUSE: &str = "/api/v1/policies/shop/checkout/pause";
const VALIDATE: &str = "/api/v1/policy-drafts/validate";

fn draft() -> serde_json::Value {
    serde_json::json!({ "form": {
        "namespace": "shop", "name": "cart", "deployment": "cart", "service": "cart",
        "idleTimeout": "10m"
    }})
}

#[tokio::test]
async fn each_role_reads_everything_and_changes_only_what_it_may() {
    let f = fixture(UiConfig::default());
    let (admin, viewer, operator) = three_roles(&f).await;
    for (who, l) in [
        ("admin", &admin),
        ("viewer", &viewer),
        ("operator", &operator),
    ] {
        let (status, v) = get_json(&f.router, "/api/v1/policies", l).await;
        assert_eq!(status, 200, "{who}: {v}");
        let (status, v) = get_json(&f.router, "/api/v1/session", l).await;
        assert_eq!(status, 200, "{who}: {v}");
    }
    assert_eq!(
        get_json(&f.router, "/api/v1/session", &viewer).await.1["role"],
        "viewer"
    );
    assert_eq!(
        get_json(&f.router, "/api/v1/session", &operator).await.1["role"],
        "operator"
    );
    assert_eq!(
        get_json(&f.router, "/api/v1/session", &admin).await.1["role"],
        "admin"
    );

    // Pause: operator and admin pass the role checks (this UI has no cluster to patch,
    // so the answer is 503 from the handler); the viewer is refused before it.
    let (status, v) = change(&f, "POST", PAUSE, &viewer, serde_json::json!({})).await;
    assert_eq!(status, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("read-only"), "{v}");
    for l in [&operator, &admin] {
        let (status, v) = change(&f, "POST", PAUSE, l, serde_json::json!({})).await;
        assert_eq!(status, 503, "{v}");
        assert!(v["error"].as_str().unwrap().contains("Kubernetes"), "{v}");
    }

    // Editing policies and managing users: admin only.
    let (status, v) = change(&f, "POST", VALIDATE, &operator, draft()).await;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("needs the admin role"),
        "{v}"
    );
    let (status, v) = change(&f, "POST", VALIDATE, &admin, draft()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["valid"], true, "{v}");
    for l in [&viewer, &operator] {
        assert_eq!(get_json(&f.router, "/api/v1/users", l).await.0, 403);
        assert_eq!(get_json(&f.router, "/api/v1/tokens", l).await.0, 403);
        let (status, _) = change(
            &f,
            "POST",
            "/api/v1/users",
            l,
            serde_json::json!({"name": "eve", "role": "admin", "password": "eve-password-1"}),
        )
        .await;
        assert_eq!(status, 403);
    }
    let (status, v) = get_json(&f.router, "/api/v1/users", &admin).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "otto", "vera"]);
    assert_eq!(v["users"][0]["builtIn"], true);
    assert!(
        !v.to_string().contains("argon2"),
        "no hash is ever sent: {v}"
    );

    // Every viewer may still log out.
    let (status, v) = change(&f, "POST", "/logout", &viewer, serde_json::json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(get_json(&f.router, "/api/v1/session", &viewer).await.0, 401);
}

#[tokio::test]
async fn tokens_are_shown_once_kept_as_digests_carry_their_role_and_expire() {
    let f = fixture(UiConfig::default());
    let admin = login(&f.router).await;
    let (status, v) = change(
        &f,
        "POST",
        "/api/v1/tokens",
        &admin,
        serde_json::json!({"name": "ci", "role": "operator", "expiresIn": "30d"}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let token = v["secret"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    assert!(token.starts_with(&format!("nmt_{id}.")), "{token}");
    let (_, listed) = get_json(&f.router, "/api/v1/tokens", &admin).await;
    assert_eq!(listed["tokens"][0]["id"], id.as_str());
    assert_eq!(listed["tokens"][0]["role"], "operator");
    let secret = token.split('.').nth(1).unwrap();
    assert!(!listed.to_string().contains(secret), "shown once: {listed}");
    let doc = f.directory.read(|a| serde_json::to_string(a).unwrap());
    assert!(!doc.contains(secret), "only the digest is kept");

    // The token reads, and changes without CSRF (nothing ambient), within its role.
    let (status, v) = with_token(&f, "GET", "/api/v1/session", &token, None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["role"], "operator");
    assert!(v.get("csrfToken").is_none());
    assert_eq!(with_token(&f, "POST", PAUSE, &token, None).await.0, 503);
    assert_eq!(
        with_token(&f, "POST", VALIDATE, &token, Some(draft()))
            .await
            .0,
        403,
        "an operator token cannot edit"
    );
    // A wrong secret for the same id, or garbage, is 401.
    let forged = format!("nmt_{id}.{}", "0".repeat(64));
    let (status, v) = with_token(&f, "GET", "/api/v1/session", &forged, None).await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(
        with_token(&f, "GET", "/api/v1/session", "nope", None)
            .await
            .0,
        401
    );

    // A short-lived viewer token expires.
    let (status, v) = change(
        &f,
        "POST",
        "/api/v1/tokens",
        &admin,
        serde_json::json!({"name": "brief", "role": "viewer", "expiresIn": "1s"}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let brief = v["secret"].as_str().unwrap().to_string();
    assert_eq!(
        with_token(&f, "GET", "/api/v1/policies", &brief, None)
            .await
            .0,
        200
    );
    assert_eq!(with_token(&f, "POST", PAUSE, &brief, None).await.0, 403);
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let (status, v) = with_token(&f, "GET", "/api/v1/policies", &brief, None).await;
    assert_eq!(status, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("expired"), "{v}");
    assert!(f.metrics.ui_refusals(UiRefusal::ExpiredToken) >= 1);

    // Revoked: gone at once.
    let (status, _) = change(
        &f,
        "DELETE",
        &format!("/api/v1/tokens/{id}"),
        &admin,
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(
        with_token(&f, "GET", "/api/v1/session", &token, None)
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn a_role_change_applies_at_once_and_a_deleted_user_is_logged_out() {
    let f = fixture(UiConfig::default());
    let (admin, viewer, _) = three_roles(&f).await;
    assert_eq!(
        change(&f, "POST", PAUSE, &viewer, serde_json::json!({}))
            .await
            .0,
        403
    );
    let (status, v) = change(
        &f,
        "PUT",
        "/api/v1/users/vera",
        &admin,
        serde_json::json!({"role": "operator"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        change(&f, "POST", PAUSE, &viewer, serde_json::json!({}))
            .await
            .0,
        503,
        "the same session now has the operator role"
    );
    // A new password ends the user's sessions.
    let (status, _) = change(
        &f,
        "PUT",
        "/api/v1/users/vera",
        &admin,
        serde_json::json!({"password": "a-new-password-2"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(get_json(&f.router, "/api/v1/session", &viewer).await.0, 401);
    let again = login_as(&f.router, "vera", "a-new-password-2", "127.0.0.21:4000").await;
    let (status, _) = change(
        &f,
        "DELETE",
        "/api/v1/users/vera",
        &admin,
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(get_json(&f.router, "/api/v1/session", &again).await.0, 401);
    let (resp, _) = send(
        &f.router,
        login_request("vera", "a-new-password-2", "127.0.0.21:4000"),
    )
    .await;
    assert_eq!(resp.status(), 401);
    // The built-in admin cannot be changed or deleted here.
    for (m, body) in [
        ("PUT", serde_json::json!({"role": "viewer"})),
        ("DELETE", serde_json::json!({})),
    ] {
        let (status, v) = change(&f, m, "/api/v1/users/admin", &admin, body).await;
        assert_eq!(status, 409, "{m}: {v}");
    }
}

#[tokio::test]
async fn bad_user_and_token_input_gets_a_clear_error() {
    let f = fixture(UiConfig::default());
    let admin = login(&f.router).await;
    let cases = [
        (
            "/api/v1/users",
            serde_json::json!({"name": "bob", "role": "viewer", "password": "short"}),
            400,
            "at least 8",
        ),
        (
            "/api/v1/users",
            serde_json::json!({"name": "<b>", "role": "viewer", "password": "long-enough-1"}),
            400,
            "letters, digits",
        ),
        (
            "/api/v1/users",
            serde_json::json!({"name": "bob", "role": "root", "password": "long-enough-1"}),
            422,
            "viewer|operator|admin",
        ),
        (
            "/api/v1/users",
            serde_json::json!({"name": "admin", "role": "viewer", "password": "long-enough-1"}),
            409,
            "built-in",
        ),
        (
            "/api/v1/tokens",
            serde_json::json!({"name": "ci", "role": "viewer", "expiresIn": "forever"}),
            400,
            "expiresIn",
        ),
        (
            "/api/v1/tokens",
            serde_json::json!({"name": "ci", "role": "viewer", "expiresIn": "400d"}),
            400,
            "at most",
        ),
    ];
    for (path, body, want, says) in cases {
        let (status, v) = change(&f, "POST", path, &admin, body.clone()).await;
        assert_eq!(status, want, "{body}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{body}: {msg}");
        assert!(!msg.contains("long-enough-1"), "never echoes a password");
    }
    add_user(&f, &admin, "bob", "viewer", "long-enough-1").await;
    let (status, v) = change(
        &f,
        "POST",
        "/api/v1/users",
        &admin,
        serde_json::json!({"name": "bob", "role": "viewer", "password": "long-enough-1"}),
    )
    .await;
    assert_eq!(status, 409, "{v}");
}

#[tokio::test]
async fn the_editor_checks_drafts_with_the_controllers_validator() {
    let f = fixture(UiConfig::default());
    let admin = login(&f.router).await;
    let mut bad = draft();
    bad["form"]["idleTimeout"] = "10x".into();
    let (status, v) = change(&f, "POST", VALIDATE, &admin, bad.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["valid"], false);
    let p = &v["problems"][0];
    assert_eq!(p["field"], "spec.idleTimeout", "{v}");
    assert_eq!(p["column"], 3, "{v}");
    // Applying an invalid draft is refused before anything reaches the cluster.
    let (status, v) = change(&f, "POST", "/api/v1/policy-drafts/apply", &admin, bad).await;
    assert_eq!(status, 422, "{v}");
    // YAML: a type error names its line and column.
    let yaml = "apiVersion: nemesis.dev/v1alpha1\nkind: ScalingPolicy\nmetadata:\n  name: cart\n  namespace: shop\nspec:\n  target:\n    deployment: cart\n  maxReplicas: many\n";
    let (status, v) = change(
        &f,
        "POST",
        VALIDATE,
        &admin,
        serde_json::json!({ "yaml": yaml }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["valid"], false);
    assert_eq!(v["problems"][0]["line"], 9, "{v}");
    // A valid one comes back as the manifest that would be applied.
    let (_, v) = change(&f, "POST", VALIDATE, &admin, draft()).await;
    assert!(
        v["manifest"].as_str().unwrap().contains("idleTimeout: 10m"),
        "{v}"
    );
}

#[tokio::test]
async fn every_refusal_is_counted_by_reason() {
    let f = fixture(UiConfig::default());
    let (admin, viewer, operator) = three_roles(&f).await;
    let before = |r| f.metrics.ui_refusals(r);
    let start: Vec<u64> = UiRefusal::ALL.iter().map(|r| before(*r)).collect();

    // unauthenticated
    let (resp, _) = send(
        &f.router,
        request("GET", "/api/v1/policies", CLIENT)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 401);
    // csrf
    let (resp, _) = send(
        &f.router,
        request("POST", PAUSE, CLIENT)
            .header("cookie", &operator.cookie)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 403);
    // cross origin
    let (resp, _) = send(
        &f.router,
        request("POST", PAUSE, CLIENT)
            .header("cookie", &operator.cookie)
            .header("x-csrf-token", &operator.csrf)
            .header("origin", "http://evil.example")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 403);
    // role (the viewer's change, and the operator on an admin route)
    assert_eq!(
        change(&f, "POST", PAUSE, &viewer, serde_json::json!({}))
            .await
            .0,
        403
    );
    assert_eq!(get_json(&f.router, "/api/v1/users", &operator).await.0, 403);
    // wrong credentials, invalid token
    let (resp, _) = send(&f.router, login_request("otto", "not-his-password", CLIENT)).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        with_token(&f, "GET", "/api/v1/policies", "nmt_x", None)
            .await
            .0,
        401
    );

    let grew = |r: UiRefusal| {
        let i = UiRefusal::ALL.iter().position(|x| *x == r).unwrap();
        f.metrics.ui_refusals(r) - start[i]
    };
    assert_eq!(grew(UiRefusal::Unauthenticated), 1);
    assert_eq!(grew(UiRefusal::Csrf), 1);
    assert_eq!(grew(UiRefusal::CrossOrigin), 1);
    assert_eq!(grew(UiRefusal::Role), 2);
    assert_eq!(grew(UiRefusal::WrongCredentials), 1);
    assert_eq!(grew(UiRefusal::InvalidToken), 1);
    let text = f.metrics.render();
    assert!(
        text.contains("nemesis_controller_ui_refusals_total{reason=\"role\"} 2"),
        "{text}"
    );
    drop(admin);
}

#[tokio::test]
async fn a_locked_user_name_locks_no_one_else_and_unknown_names_look_the_same() {
    let f = fixture(UiConfig::default());
    let admin = login(&f.router).await;
    add_user(&f, &admin, "bob", "viewer", "bobs-password-1").await;
    let mut answers = Vec::new();
    for user in ["bob", "nobody"] {
        for i in 0..5 {
            // A new address each time: only the user name's count can stop these.
            let client = format!("127.0.3.{}:5000", i + if user == "bob" { 0 } else { 10 });
            let (resp, _) = send(&f.router, login_request(user, "wrong-guess-1", &client)).await;
            assert_eq!(resp.status(), 401, "{user} attempt {i}");
        }
        let (resp, body) = send(
            &f.router,
            login_request(user, "bobs-password-1", "127.0.3.99:5000"),
        )
        .await;
        assert_eq!(resp.status(), 429, "{user}: {body}");
        answers.push(
            json(&body)["error"]
                .as_str()
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(
        answers[0], answers[1],
        "a locked unknown name reads as a locked user"
    );
    assert!(f.metrics.ui_refusals(UiRefusal::LockedOut) >= 2);
    // The admin is not affected.
    login_as(&f.router, "admin", PASSWORD, "127.0.3.50:5000").await;
}
