//! The UI in a real browser: the UI router on a loopback port over a seeded store, and
//! `ui/tests/browser.mjs` driving Debian's chromium through playwright-core (installed
//! with `npm ci` in `ui/` when missing; `cargo xtask setup` does it too). The script logs
//! in, finds the seeded policy, opens its page with the charts, takes a screenshot, logs
//! out and sees a wrong password refused.
//!
//! `NEMESIS_UI_SCREENSHOT_DIR=<dir>` keeps the screenshot there for a look.

mod ui_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nemesis_controller::ui::UiConfig;
use tokio::process::Command;
use ui_support::*;

/// npm ci downloads one package; generous for a slow registry.
const NPM_TIMEOUT: Duration = Duration::from_secs(300);
/// The script needs a few seconds; chromium's first start can take longer on a busy box.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(120);
const CHROMIUM: &str = "/usr/bin/chromium";

fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui")
}

/// The playwright-core version the lock file pins, and the one installed (if any).
fn versions(ui: &Path) -> Result<(String, Option<String>)> {
    let lock: serde_json::Value = serde_json::from_slice(
        &std::fs::read(ui.join("package-lock.json")).context("reading ui/package-lock.json")?,
    )?;
    let locked = lock["packages"]["node_modules/playwright-core"]["version"]
        .as_str()
        .context("ui/package-lock.json pins no playwright-core")?
        .to_string();
    let installed = std::fs::read(ui.join("node_modules/playwright-core/package.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["version"].as_str().map(str::to_string));
    Ok((locked, installed))
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

/// `npm ci` in ui/ unless the locked playwright-core is installed already.
async fn ensure_node_modules(ui: &Path) -> Result<()> {
    let (locked, installed) = versions(ui)?;
    if installed.as_deref() == Some(locked.as_str()) {
        return Ok(());
    }
    let out = run(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(ui),
        "npm ci in ui/",
        NPM_TIMEOUT,
    )
    .await
    .context("node and npm are needed for the browser test (cargo xtask setup checks them)")?;
    ensure!(
        out.status.success(),
        "npm ci in ui/ failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_logs_in_sees_the_policy_and_its_charts_and_a_wrong_password_is_refused()
-> Result<()> {
    ensure!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install Debian's chromium (cargo xtask setup does)"
    );
    let ui = ui_dir();
    ensure_node_modules(&ui).await?;

    let mut f = fixture(UiConfig::default());
    // A second policy that cannot act: its row must say why.
    let mut blocked = policy("shop", "blocked", f.now_ms);
    if let Some(status) = blocked.status.as_mut() {
        status.state = None;
        status.state_since = None;
        status.desired_replicas = None;
        status.last_transition = None;
        let ready = &mut status.conditions[0];
        ready.status = "False".into();
        ready.reason = "TargetNotFound".into();
        ready.message = "Deployment shop/blocked does not exist".into();
    }
    f.feed.upsert(blocked);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = f
        .router
        .clone()
        .into_make_service_with_connect_info::<SocketAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let shots = tempfile::tempdir()?;
    let shot = shots.path().join("policy.png");
    let out = run(
        Command::new("node")
            .arg(ui.join("tests/browser.mjs"))
            .arg(format!("http://{addr}/"))
            .arg(PASSWORD)
            .arg(&shot)
            .current_dir(&ui)
            .env("CHROMIUM", CHROMIUM),
        "node ui/tests/browser.mjs",
        BROWSER_TIMEOUT,
    )
    .await?;
    server.abort();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("browser: {stdout}");
    if !out.status.success() {
        bail!(
            "the browser test failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
    }
    let findings: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("the script printed no findings")?,
    )?;
    ensure!(findings["ok"] == true, "{findings}");
    ensure!(
        findings["wrongPasswordMessage"] == "Wrong user name or password.",
        "{findings}"
    );

    let png = std::fs::read(&shot).context("reading the screenshot")?;
    ensure!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is not a PNG"
    );
    ensure!(
        png.len() > 20_000,
        "the screenshot is suspiciously small ({} bytes): an empty page?",
        png.len()
    );
    if let Some(dir) = std::env::var_os("NEMESIS_UI_SCREENSHOT_DIR") {
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(&shot, Path::new(&dir).join("policy.png"))?;
        std::fs::copy(
            shots.path().join("policy-overview.png"),
            Path::new(&dir).join("overview.png"),
        )?;
    }
    Ok(())
}
