//! The UI as people use it: a real controller (UI on, accounts in its Secret) against the
//! test API server, and `ui/tests/roles.mjs` driving Debian's chromium through
//! playwright-core as a viewer, an admin and an operator (see the script for the
//! steps). Afterwards the cluster shows what the browser did: `kubectl get
//! scalingpolicies` lists the policy the admin created through the guided form, and it
//! is paused as the operator asked. Screenshots of every page are kept under
//! `target/ui-e2e/` (or `NEMESIS_UI_SCREENSHOT_DIR`) as the run's artifacts.

mod controller_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use controller_support::*;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::{Value, json};
use tokio::process::Command;

const CHROMIUM: &str = "/usr/bin/chromium";
const ADMIN_PW: &str = "e2e-admin-password";
/// npm ci downloads one package; generous for a slow registry.
const NPM_TIMEOUT: Duration = Duration::from_secs(300);
/// Three browser contexts and a dozen pages on a busy machine.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(600);

fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui")
}

async fn run(cmd: &mut Command, what: &str, limit: Duration) -> Result<std::process::Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| format!("{what} did not finish within {limit:?}"))?
        .with_context(|| format!("waiting for {what}"))
}

/// `npm ci` in ui/ unless playwright-core is installed already.
async fn ensure_node_modules(ui: &Path) -> Result<()> {
    if ui
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return Ok(());
    }
    let out = run(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(ui),
        "npm ci in ui/",
        NPM_TIMEOUT,
    )
    .await?;
    ensure!(
        out.status.success(),
        "npm ci in ui/ failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The admin's API call (plain HTTP/1.1, as the page would send it).
async fn admin_post(
    addr: std::net::SocketAddr,
    path: &str,
    cookie: Option<&str>,
    csrf: Option<&str>,
    body: Value,
) -> Result<(u16, Vec<String>, Value)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut b = http::Request::post(path)
        .header("host", addr.to_string())
        .header("origin", format!("http://{addr}"))
        .header("content-type", "application/json");
    if let Some(c) = cookie {
        b = b.header("cookie", c);
    }
    if let Some(t) = csrf {
        b = b.header("x-csrf-token", t);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        sender.send_request(b.body(Full::new(Bytes::from(body.to_string())))?),
    )
    .await??;
    let status = resp.status().as_u16();
    let cookies = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| {
            v.to_str()
                .ok()
                .map(|c| c.split(';').next().unwrap().to_string())
        })
        .collect();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((
        status,
        cookies,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

fn artifacts_dir() -> PathBuf {
    match std::env::var_os("NEMESIS_UI_SCREENSHOT_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ui-e2e"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_in_each_role_use_the_ui_and_the_cluster_shows_what_they_did() -> Result<()> {
    init_tracing();
    ensure!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install Debian's chromium (cargo xtask setup does)"
    );
    let ui = ui_dir();
    ensure_node_modules(&ui).await?;

    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("web", 1))
        .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services
        .create(&PostParams::default(), &service("web"))
        .await?;

    let dir = tempfile::tempdir()?;
    let pw = dir.path().join("ui-password");
    std::fs::write(&pw, ADMIN_PW)?;
    let pw = pw.display().to_string();
    let c = start_controller(&server, dir.path(), &["--ui-password-file", &pw]).await?;
    wait_leading(&c, Duration::from_secs(60)).await?;
    let addr = c.api_addr;

    // The people: a viewer and an operator, added by the admin.
    let (status, cookies, v) = admin_post(
        addr,
        "/login",
        None,
        None,
        json!({"username": "admin", "password": ADMIN_PW}),
    )
    .await?;
    ensure!(status == 200, "admin login: {status} {v}");
    let cookie = cookies
        .iter()
        .find(|c| c.starts_with("nemesis_session="))
        .context("no session cookie")?
        .clone();
    let csrf = v["csrfToken"]
        .as_str()
        .context("no CSRF token")?
        .to_string();
    for (name, role) in [("vera", "viewer"), ("otto", "operator")] {
        let (status, _, v) = admin_post(
            addr,
            "/api/v1/users",
            Some(&cookie),
            Some(&csrf),
            json!({"name": name, "role": role, "password": format!("{name}-password-1")}),
        )
        .await?;
        ensure!(status == 201, "adding {name}: {status} {v}");
    }

    let shots = artifacts_dir();
    std::fs::create_dir_all(&shots)?;
    let out = run(
        Command::new("node")
            .arg(ui.join("tests/roles.mjs"))
            .arg(format!("http://{addr}/"))
            .arg(ADMIN_PW)
            .arg(&shots)
            .current_dir(&ui)
            .env("CHROMIUM", CHROMIUM),
        "node ui/tests/roles.mjs",
        BROWSER_TIMEOUT,
    )
    .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("browser: {stdout}");
    if !out.status.success() {
        bail!(
            "the browser run failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
    }
    let findings: Value = serde_json::from_str(
        stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("the script printed no findings")?,
    )?;
    ensure!(findings["ok"] == true, "{findings}");
    ensure!(findings["viewerApplyStatus"] == 403, "{findings}");
    let shots_taken = findings["screenshots"]
        .as_array()
        .context("no screenshots")?;
    ensure!(
        shots_taken.len() >= 12,
        "a screenshot of every page: {findings}"
    );
    for s in shots_taken {
        let png = std::fs::read(s.as_str().unwrap())?;
        ensure!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
            "{s}: not a real screenshot"
        );
    }

    // The cluster shows what the browser did.
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let out = run(
        Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(server.kubeconfig_path())
            .args(["get", "scalingpolicies", "-n", "default"]),
        "kubectl get scalingpolicies",
        Duration::from_secs(60),
    )
    .await?;
    let listed = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some("web")),
        "kubectl get scalingpolicies lists web:\n{listed}"
    );
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), "default");
    let web = policies.get("web").await?;
    assert_eq!(web.spec.idle_timeout.as_deref(), Some("10m"));
    assert_eq!(web.spec.target.service.as_deref(), Some("web"));
    assert!(web.spec.paused, "the operator paused it");
    c.shutdown().await;
    Ok(())
}
