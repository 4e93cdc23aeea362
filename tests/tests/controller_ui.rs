//! The UI's accounts on a cluster: real controllers against the test API server keep
//! users, API tokens and sessions in a Secret every instance watches, so a session made
//! on the leader works on the standby, after the leader is killed, and on a controller
//! started afresh; the Secret holds digests, never a token or a session id. And the UI
//! served over the controller's own TLS: Secure cookies, and the plain port no longer
//! serves it.

mod controller_support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use controller_support::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::{Value, json};

const ADMIN_PW: &str = "cluster-admin-password";
/// Long enough for a watch to carry a Secret change on a loaded machine.
const SPREAD: Duration = Duration::from_secs(60);

/// One HTTP/1.1 request over `io`; returns status, the `Set-Cookie` values and the body.
async fn exchange<T>(
    io: T,
    req: http::Request<Full<Bytes>>,
) -> anyhow::Result<(u16, Vec<String>, Value)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .context("the UI did not answer within 30 s")??;
    let status = resp.status().as_u16();
    let cookies = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, cookies, value))
}

/// A browser's request: JSON body, same origin, the given cookie and CSRF token.
fn ui_request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    cookie: Option<&str>,
    csrf: Option<&str>,
    bearer: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<http::Request<Full<Bytes>>> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("origin", format!("http://{addr}"));
    if let Some(c) = cookie {
        b = b.header("cookie", c);
    }
    if let Some(t) = csrf {
        b = b.header("x-csrf-token", t);
    }
    if let Some(t) = bearer {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(v) => {
            b = b.header("content-type", "application/json");
            Full::new(Bytes::from(serde_json::to_vec(&v)?))
        }
        None => Full::default(),
    };
    Ok(b.body(body)?)
}

async fn plain(
    addr: SocketAddr,
    req: http::Request<Full<Bytes>>,
) -> anyhow::Result<(u16, Vec<String>, Value)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    exchange(tcp, req).await
}

fn pair(cookies: &[String], name: &str) -> Option<String> {
    cookies
        .iter()
        .map(|c| c.split(';').next().unwrap().to_string())
        .find(|p| p.starts_with(&format!("{name}=")))
}

struct Session {
    cookie: String,
    csrf: String,
}

async fn login(addr: SocketAddr, user: &str, password: &str) -> anyhow::Result<Session> {
    let (status, cookies, v) = plain(
        addr,
        ui_request(
            "POST",
            addr,
            "/login",
            None,
            None,
            None,
            Some(json!({"username": user, "password": password})),
        )?,
    )
    .await?;
    anyhow::ensure!(status == 200, "login as {user} on {addr}: {status} {v}");
    Ok(Session {
        cookie: pair(&cookies, "nemesis_session").context("no session cookie")?,
        csrf: v["csrfToken"]
            .as_str()
            .context("no CSRF token")?
            .to_string(),
    })
}

fn ui_args(dir: &Path, extra: &[&str]) -> anyhow::Result<Vec<String>> {
    let pw = dir.join("ui-password");
    std::fs::write(&pw, ADMIN_PW)?;
    let mut args = vec!["--ui-password-file".to_string(), pw.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    Ok(args)
}

async fn start_ui_controller(
    server: &TestApiServer,
    dir: &Path,
    extra: &[&str],
) -> anyhow::Result<nemesis_controller::app::Running> {
    let args = ui_args(dir, extra)?;
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    start_controller(server, dir, &refs).await
}

/// `GET /api/v1/session` with the session's cookie or a token, until it answers 200.
async fn session_works(
    addr: SocketAddr,
    cookie: Option<&str>,
    bearer: Option<&str>,
    what: &str,
) -> anyhow::Result<Value> {
    eventually(what, SPREAD, || async {
        let (status, _, v) = plain(
            addr,
            ui_request("GET", addr, "/api/v1/session", cookie, None, bearer, None)?,
        )
        .await?;
        Ok((status == 200).then_some(v))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_users_and_tokens_survive_a_leader_crash_and_a_restart() -> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let (dir_a, dir_b, dir_c) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let a = start_ui_controller(&server, dir_a.path(), &[]).await?;
    wait_leading(&a, Duration::from_secs(60)).await?;
    let b = start_ui_controller(&server, dir_b.path(), &[]).await?;

    // On the leader: the admin logs in, adds an operator and issues a viewer token.
    let admin = login(a.api_addr, "admin", ADMIN_PW).await?;
    let (status, _, v) = plain(
        a.api_addr,
        ui_request(
            "POST",
            a.api_addr,
            "/api/v1/users",
            Some(&admin.cookie),
            Some(&admin.csrf),
            None,
            Some(json!({"name": "otto", "role": "operator", "password": "otto-password-1"})),
        )?,
    )
    .await?;
    assert_eq!(status, 201, "{v}");
    let (status, _, v) = plain(
        a.api_addr,
        ui_request(
            "POST",
            a.api_addr,
            "/api/v1/tokens",
            Some(&admin.cookie),
            Some(&admin.csrf),
            None,
            Some(json!({"name": "dashboards", "role": "viewer", "expiresIn": "7d"})),
        )?,
    )
    .await?;
    assert_eq!(status, 201, "{v}");
    let token = v["secret"].as_str().context("no token")?.to_string();
    let otto = login(a.api_addr, "otto", "otto-password-1").await?;

    // The standby sees all of it through its watch of the Secret.
    let v = session_works(
        b.api_addr,
        Some(&admin.cookie),
        None,
        "the admin's session on the standby",
    )
    .await?;
    assert_eq!(v["role"], "admin");
    let v = session_works(
        b.api_addr,
        Some(&otto.cookie),
        None,
        "the operator's session on the standby",
    )
    .await?;
    assert_eq!(v["role"], "operator");
    let v = session_works(b.api_addr, None, Some(&token), "the token on the standby").await?;
    assert_eq!(v["role"], "viewer");

    // The Secret holds digests: no token secret, no session id.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let s = secrets
        .get(nemesis_controller::ui::directory::DEFAULT_SECRET)
        .await?;
    let doc = String::from_utf8(
        s.data.unwrap()[nemesis_controller::ui::directory::STATE_KEY]
            .0
            .clone(),
    )?;
    assert!(doc.contains("otto"), "{doc}");
    let token_secret = token.split('.').nth(1).unwrap();
    let session_id = admin.cookie.trim_start_matches("nemesis_session=");
    assert!(!doc.contains(token_secret) && !doc.contains(session_id));
    assert!(!doc.contains("otto-password-1"));

    // The leader dies without a word; the standby takes over and keeps serving them.
    a.kill();
    wait_leading(&b, Duration::from_secs(60)).await?;
    session_works(
        b.api_addr,
        Some(&admin.cookie),
        None,
        "the admin's session after the crash",
    )
    .await?;
    // A change made on the new leader with the old session.
    let (status, _, v) = plain(
        b.api_addr,
        ui_request(
            "POST",
            b.api_addr,
            "/api/v1/users",
            Some(&admin.cookie),
            Some(&admin.csrf),
            None,
            Some(json!({"name": "vera", "role": "viewer", "password": "vera-password-1"})),
        )?,
    )
    .await?;
    assert_eq!(status, 201, "{v}");

    // A controller started afresh (a restart) loads everything from the Secret.
    b.shutdown().await;
    let c = start_ui_controller(&server, dir_c.path(), &[]).await?;
    let v = session_works(
        c.api_addr,
        Some(&otto.cookie),
        None,
        "the operator's session after a restart",
    )
    .await?;
    assert_eq!(v["user"], "otto");
    session_works(c.api_addr, None, Some(&token), "the token after a restart").await?;
    login(c.api_addr, "vera", "vera-password-1").await?;
    c.shutdown().await;
    Ok(())
}

/// A CA and a server certificate for 127.0.0.1, as PEM files in `dir`; returns the CA.
fn certificates(dir: &Path) -> anyhow::Result<rustls::pki_types::CertificateDer<'static>> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    std::fs::write(dir.join("tls.crt"), leaf_cert.pem())?;
    std::fs::write(dir.join("tls.key"), leaf_key.serialize_pem())?;
    Ok(ca.der().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_over_its_own_tls_sets_secure_cookies_and_leaves_the_plain_port()
-> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let dir = tempfile::tempdir()?;
    let ca = certificates(dir.path())?;
    let cert = dir.path().join("tls.crt").display().to_string();
    let key = dir.path().join("tls.key").display().to_string();
    let c = start_ui_controller(
        &server,
        dir.path(),
        &["--ui-tls-cert-file", &cert, "--ui-tls-key-file", &key],
    )
    .await?;
    let ui = c.ui_addr.context("the UI has its own listener")?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(ui).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned(),
            tcp,
        )
        .await
        .context("TLS handshake with the UI")?;
    let mut req = ui_request(
        "POST",
        ui,
        "/login",
        None,
        None,
        None,
        Some(json!({"username": "admin", "password": ADMIN_PW})),
    )?;
    req.headers_mut()
        .insert("origin", format!("https://{ui}").parse()?);
    let (status, cookies, v) = exchange(tls, req).await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    for c in &cookies {
        for attr in ["; Secure", "; HttpOnly", "; SameSite=Strict"] {
            assert!(c.contains(attr), "{attr} missing: {c}");
        }
    }

    // Plain HTTP to the TLS port is no UI, and the plain API port no longer serves it.
    let (status, _, _) = plain(
        c.api_addr,
        ui_request("GET", c.api_addr, "/login", None, None, None, None)?,
    )
    .await?;
    assert_eq!(status, 404);
    let (status, _, _) = plain(
        c.api_addr,
        ui_request(
            "POST",
            c.api_addr,
            "/login",
            None,
            None,
            None,
            Some(json!({"username": "admin", "password": ADMIN_PW})),
        )?,
    )
    .await?;
    assert!(status == 404 || status == 405, "{status}");
    assert!(
        plain(ui, ui_request("GET", ui, "/login", None, None, None, None)?)
            .await
            .map(|(s, _, _)| s != 200)
            .unwrap_or(true),
        "no plain HTTP on the TLS port"
    );
    c.shutdown().await;
    Ok(())
}
