//! The UI as people use it: a real controller (UI on, accounts in its Secret, an alert
//! sink) against the test API server with the sandbox kubelet running namespace `shop`,
//! and `ui/tests/roles.mjs` driving Debian's chromium through playwright-core as a
//! viewer, an admin and an operator (see the script for the steps). `shop/api` sits at
//! zero under a ScalingPolicy (the admin applies it in the YAML editor) and an
//! AlertRule on ScaledFromZero; the script asks for
//! its wake as the node agent does when a connection arrives (this test runs no eBPF
//! agent: a test agent heartbeats for the node, and the wake request is the agent's own
//! HTTP call), the sandbox starts the pod for real, and the open pages show it live.
//! Afterwards the cluster shows what the browser did: `kubectl get scalingpolicies`
//! lists the policy the admin created through the guided form, paused as the operator
//! asked; the webhook receiver got the alert signed; the outbox says who acknowledged
//! it; the report's CSV the admin downloaded has the wake and the transitions the
//! controller recorded. Screenshots of every page are kept under `target/ui-e2e/` (or
//! `NEMESIS_UI_SCREENSHOT_DIR`) as the run's artifacts.

mod controller_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use controller_support::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Api;
use kube::api::PostParams;
use nemesis_common::wire::ServiceRef;
use nemesis_controller::notify::rule::AlertRule;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::kubelet::{Sandbox, SandboxOptions};
use nemesis_tests::ui_client;
use nemesis_tests::webhook::{self, Received};
use serde_json::{Value, json};
use tokio::process::Command;

const CHROMIUM: &str = "/usr/bin/chromium";
const ADMIN_PW: &str = "e2e-admin-password";
/// npm ci downloads one package; generous for a slow registry.
const NPM_TIMEOUT: Duration = Duration::from_secs(300);
/// Three browser contexts, a wake and a dozen pages on a busy machine.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(900);
/// The namespace the sandbox kubelet runs pods in: the app that wakes.
const SHOP: &str = "shop";
const POD_SERVER: &str = env!("CARGO_BIN_EXE_nemesis-pod-server");
const POD_PORT: u16 = 8080;
/// The webhook sink's key: the receiver checks every body's signature with it.
const HMAC_KEY: &str = "ui-e2e-webhook-hmac-key-0123456789";
/// Start-ups, rule status and leases on a loaded machine.
const WAIT: Duration = Duration::from_secs(120);

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

/// The app that wakes: the pod server, at zero, with its Service.
fn shop_app() -> Result<(Deployment, Service)> {
    let d = serde_json::from_value(json!({
        "metadata": {"name": "api"},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "api"}},
            "template": {
                "metadata": {"labels": {"app": "api"},
                             "annotations": {"nemesis.test/probe-period-ms": "100"}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "server",
                        "image": "local/nemesis-pod-server",
                        "command": [POD_SERVER],
                        "args": ["--port", POD_PORT.to_string()],
                        "ports": [{"name": "http", "containerPort": POD_PORT}],
                        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}},
                        "readinessProbe": {"httpGet": {"path": "/", "port": "http"},
                                           "periodSeconds": 1},
                    }],
                },
            },
        },
    }))?;
    Ok((d, service("api")))
}

/// The cells of the CSV row whose first cells are `prefix`, by header name.
fn csv_row(csv: &str, prefix: &[&str]) -> Result<std::collections::BTreeMap<String, String>> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().context("an empty CSV")?.split(',').collect();
    let row = lines
        .find(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            cells.len() >= prefix.len() && cells[..prefix.len()] == *prefix
        })
        .with_context(|| format!("no row {prefix:?} in\n{csv}"))?;
    Ok(header
        .iter()
        .zip(row.split(','))
        .map(|(h, v)| (h.to_string(), v.to_string()))
        .collect())
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
    nemesis_tests::crds::install_alert_rule_crd(&client).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("web", 1))
        .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services
        .create(&PostParams::default(), &service("web"))
        .await?;
    // The app that wakes, in a namespace the sandbox kubelet runs.
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": SHOP}}))?,
        )
        .await?;
    let sandbox = Sandbox::start(
        client.clone(),
        SandboxOptions {
            namespace: Some(SHOP.into()),
            ..SandboxOptions::default()
        },
    )
    .await?;
    let (api_deployment, api_service) = shop_app()?;
    let shop_deployments: Api<Deployment> = Api::namespaced(client.clone(), SHOP);
    shop_deployments
        .create(&PostParams::default(), &api_deployment)
        .await?;
    Api::<Service>::namespaced(client.clone(), SHOP)
        .create(&PostParams::default(), &api_service)
        .await?;

    // Alerts go to a local webhook that checks their signature.
    let hooked = Arc::new(Received::default());
    let hook_url = webhook::serve(HMAC_KEY.to_owned(), hooked.clone()).await?;
    let dir = tempfile::tempdir()?;
    let sinks = dir.path().join("sinks.yaml");
    std::fs::write(
        &sinks,
        format!(
            "sinks:\n- {{name: hook, kind: webhook, url: \"{hook_url}\", hmacKey: \"{HMAC_KEY}\"}}\n"
        ),
    )?;
    let sinks = sinks.display().to_string();
    let pw = dir.path().join("ui-password");
    std::fs::write(&pw, ADMIN_PW)?;
    let pw = pw.display().to_string();
    let c = start_controller(
        &server,
        dir.path(),
        &["--ui-password-file", &pw, "--alert-sinks-file", &sinks],
    )
    .await?;
    wait_leading(&c, Duration::from_secs(60)).await?;
    let addr = c.api_addr;

    // shop/api: at zero until a connection comes; the node's agent heartbeats for it.
    let svc = ServiceRef {
        namespace: SHOP.into(),
        name: "api".into(),
    };
    let _agent = TestAgent::start("node-e2e", vec![svc.clone()], vec![addr]);
    // Its ScalingPolicy is the admin's to apply, in the browser's YAML editor.
    let shop_policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), SHOP);
    // Tell the team when it wakes: an AlertRule on ScaledFromZero, sent to the hook.
    let rules: Api<AlertRule> = Api::namespaced(client.clone(), SHOP);
    let mut rule = AlertRule::new(
        "wakes",
        serde_json::from_value(json!({
            "when": [{"event": "ScaledFromZero"}],
            "groupWait": "1s",
            "resolveAfter": "1h",
            "severity": "warning",
            "sinks": ["hook"],
        }))?,
    );
    rule.metadata.namespace = Some(SHOP.into());
    rules.create(&PostParams::default(), &rule).await?;
    eventually("the AlertRule's Ready condition", WAIT, || async {
        let r = rules.get("wakes").await?;
        Ok(r.status
            .unwrap_or_default()
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready" && c.status == "True")
            .map(|_| ()))
    })
    .await?;

    // The people: a viewer and an operator, added by the admin.
    let admin = ui_client::login(addr, "admin", ADMIN_PW).await?;
    for (name, role) in [("vera", "viewer"), ("otto", "operator")] {
        let (status, v) = admin
            .post(
                "/api/v1/users",
                &json!({"name": name, "role": role, "password": format!("{name}-password-1")}),
            )
            .await?;
        ensure!(status == 201, "adding {name}: {status} {v}");
    }

    let shots = artifacts_dir();
    std::fs::create_dir_all(&shots)?;
    let agent_token = agent_token(addr, "node-e2e").await?;
    let out = run(
        Command::new("node")
            .arg(ui.join("tests/roles.mjs"))
            .arg(format!("http://{addr}/"))
            .arg(ADMIN_PW)
            .arg(&shots)
            .current_dir(&ui)
            .env("CHROMIUM", CHROMIUM)
            // The wake request the node's agent would send for a held connection.
            .env(
                "NEMESIS_E2E_WAKE",
                json!({
                    "path": "/v1/agents/wake",
                    "token": agent_token,
                    "body": {"node": "node-e2e", "service": svc, "heldConnections": 1},
                })
                .to_string(),
            ),
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
        shots_taken.len() >= 19,
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

    // The admin's YAML made it to the cluster, and the wake happened for real: the
    // sandbox runs the pod.
    let api_policy = shop_policies.get("api").await?;
    assert_eq!(api_policy.spec.idle_timeout.as_deref(), Some("1h"));
    let d = shop_deployments.get("api").await?;
    ensure!(d.spec.replicas == Some(1), "api was scaled to 1");
    // The hook got the alert, signed.
    let got = hooked.accepted.lock().unwrap().clone();
    ensure!(
        got.iter()
            .any(|b| b.to_string().contains("NemesisScaledFromZero")),
        "the webhook received the ScaledFromZero alert: {got:?}"
    );
    // The outbox says who acknowledged it.
    let (status, out) = admin.get("/api/alerts").await?;
    ensure!(status == 200, "GET /api/alerts: {status} {out}");
    let acked = out["alerts"]
        .as_array()
        .context("alerts")?
        .iter()
        .find(|a| a["labels"]["alertname"] == "NemesisScaledFromZero")
        .with_context(|| format!("no ScaledFromZero alert in {out}"))?;
    ensure!(acked["acknowledgedBy"] == "otto", "{acked}");
    ensure!(
        acked["deliveries"]["hook"]["state"] == "delivered",
        "{acked}"
    );
    // The CSV the admin downloaded: shop/api's row has the wake and every transition
    // the controller recorded for it (the history API lists them one by one).
    let csv_path = findings["reportCsv"]
        .as_str()
        .context("no CSV downloaded")?;
    let csv = std::fs::read_to_string(csv_path)?;
    let (status, events) = admin
        .get("/api/v1/events?policy=shop/api&kind=transition&window=24h&limit=500")
        .await?;
    ensure!(status == 200, "events: {status} {events}");
    let transitions = events["events"].as_array().context("events")?;
    ensure!(
        transitions
            .iter()
            .any(|e| e["record"]["from_state"] == "zero"),
        "the wake's transition out of zero is recorded: {events}"
    );
    let row = csv_row(&csv, &["service", SHOP, "api"])?;
    ensure!(
        row["transitions"] == transitions.len().to_string(),
        "the CSV counts {} transitions, the history has {}:\n{csv}",
        row["transitions"],
        transitions.len()
    );
    ensure!(
        row["wakes"] == "1" && row["wakes_ready"] == "1",
        "one wake, ready:\n{csv}"
    );
    ensure!(
        row["cold_start_p50_ms"].parse::<u64>().is_ok(),
        "the wake's cold start is timed:\n{csv}"
    );
    ensure!(
        csv.lines().filter(|l| l.starts_with("service,")).count() == 1,
        "the namespace report has one Service:\n{csv}"
    );
    let total = csv_row(&csv, &["total", SHOP])?;
    ensure!(total["transitions"] == row["transitions"], "{csv}");
    c.shutdown().await;
    sandbox.shutdown().await?;
    Ok(())
}
