//! `cargo xtask demo` end to end: the real xtask binary runs the demo (an instance of
//! its own, on the binaries `cargo xtask test` built) in a child process; the test
//! reads its contract lines, uses the sandbox through the printed kubeconfig, wakes the
//! demo app at zero with a request from a process inside the printed cgroup, then sends
//! SIGINT and checks that nothing is left: no process, no cgroup, no bpffs or pins, no
//! pod network.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Api, Client};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Start-up runs no build (`--prebuilt`): a sandbox, a controller and an agent.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Tear-down: pods get 5 s of grace, each component up to 10 s.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The demo in a child process; SIGINT on drop, so a failed test still cleans up.
struct DemoProcess {
    child: Child,
    lines: BTreeMap<String, String>,
    text: Vec<String>,
}

impl Drop for DemoProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGINT,
            );
        }
    }
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_nemesis-sandbox"))
        .parent()
        .expect("binaries live in a directory")
        .to_path_buf()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is one level below the root")
        .to_path_buf()
}

/// The xtask binary, built if `cargo xtask` has not built it (a no-op when it has).
async fn xtask_bin() -> anyhow::Result<PathBuf> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "-p", "xtask"])
        .current_dir(workspace_root())
        .status()
        .await
        .context("running cargo build -p xtask")?;
    ensure!(status.success(), "cargo build -p xtask failed ({status})");
    Ok(bin_dir().join("xtask"))
}

async fn start_demo(instance: &str) -> anyhow::Result<DemoProcess> {
    for bin in ["nemesis-agent", "nemesis-controller"] {
        ensure!(
            bin_dir().join(bin).exists(),
            "{} is not built: run the tests through `cargo xtask test` (it builds every binary)",
            bin_dir().join(bin).display()
        );
    }
    let mut child = Command::new(xtask_bin().await?)
        .arg("demo")
        .arg("--skip-setup")
        .arg("--prebuilt")
        .arg(bin_dir())
        .arg("--instance")
        .arg(instance)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(false)
        .spawn()
        .context("starting xtask demo")?;
    let stdout = child.stdout.take().expect("piped");
    let mut demo = DemoProcess {
        child,
        lines: BTreeMap::new(),
        text: Vec::new(),
    };
    let mut reader = BufReader::new(stdout).lines();
    let read = async {
        // NEMESIS_LOGS comes after every contract line.
        while !demo.lines.contains_key("NEMESIS_LOGS") {
            let Some(line) = reader.next_line().await? else {
                bail!(
                    "the demo ended before it was ready; it printed: {:?}",
                    demo.text
                );
            };
            demo.text.push(line.clone());
            if let Some((k, v)) = line.split_once('=')
                && k.starts_with("NEMESIS_")
            {
                demo.lines.insert(k.to_string(), v.to_string());
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(READY_TIMEOUT, read)
        .await
        .context("the demo was not ready in time")??;
    // Keep draining stdout so the demo never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = reader.next_line().await {} });
    Ok(demo)
}

async fn client_from(kubeconfig: &Path) -> anyhow::Result<Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(Client::try_from(cfg)?)
}

/// The pod subnet index the sandbox claimed, recovered from its ClusterIP block
/// (`nemesis_tests::demo::cluster_ip`).
fn subnet_index_of(cluster_ip: Ipv4Addr) -> u16 {
    let [_, _, c, d] = cluster_ip.octets();
    u16::from(c - 128) * 4 + u16::from((d - 1) / 64)
}

/// Runs `curl url` in a shell that first moves itself into `cgroup`.
async fn curl_from_cgroup(cgroup: &str, url: &str) -> anyhow::Result<std::process::Output> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec curl -sS -m 10 "$1""#)
        .arg(cgroup)
        .arg(url)
        .output()
        .await
        .context("running curl in the demo's cgroup")?;
    Ok(out)
}

/// The status of `POST <ui>login` with these credentials.
async fn ui_login_status(ui: &str, user: &str, password: &str) -> anyhow::Result<u16> {
    let body = serde_json::json!({"username": user, "password": password}).to_string();
    let out = Command::new("curl")
        .args(["-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}"])
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body,
        ])
        .arg(format!("{ui}login"))
        .output()
        .await
        .context("running curl against the UI")?;
    ensure!(
        out.status.success(),
        "curl {ui}login failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Processes whose command line or working directory mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.parse::<u32>().is_err() || name == std::process::id().to_string() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(entry.path().join("cwd"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if cmdline.contains(needle) || cwd.contains(needle) {
            found.push(format!("{name}: {cmdline} (cwd {cwd})"));
        }
    }
    found
}

fn ip_output(args: &[&str]) -> String {
    std::process::Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_its_contract_wakes_its_app_from_its_cgroup_and_leaves_nothing_after_sigint()
-> anyhow::Result<()> {
    let instance = format!("t{}", std::process::id());
    let mut demo = start_demo(&instance).await?;
    let line = |k: &str| {
        demo.lines
            .get(k)
            .cloned()
            .with_context(|| format!("no {k} line in {:?}", demo.text))
    };

    // --- the contract lines ---
    let ui = line("NEMESIS_UI")?;
    let demo_url = line("NEMESIS_DEMO_URL")?;
    let cgroup = line("NEMESIS_DEMO_CGROUP")?;
    let kubeconfig = PathBuf::from(line("NEMESIS_KUBECONFIG")?);
    let logs = PathBuf::from(line("NEMESIS_LOGS")?);
    assert!(ui.starts_with("http://127.0.0.1:"), "{ui}");
    let login = line("NEMESIS_LOGIN")?;
    assert!(
        !demo.text.iter().any(|l| l.starts_with("NOT RUNNING")),
        "every component should run: {:?}",
        demo.text
    );
    let service_addr = demo_url
        .strip_prefix("http://")
        .and_then(|r| r.strip_suffix(":80/"))
        .with_context(|| format!("NEMESIS_DEMO_URL {demo_url} is not http://<ClusterIP>:80/"))?;
    let cluster_ip: Ipv4Addr = service_addr.parse()?;
    assert_eq!(cluster_ip.octets()[..2], [127, 96], "{cluster_ip}");
    assert!(Path::new(&cgroup).join("cgroup.procs").exists(), "{cgroup}");
    assert!(
        cgroup.ends_with(&format!("/nemesis-{instance}")),
        "{cgroup}"
    );
    let pins = logs.join("bpffs/nemesis").join(&instance);
    assert!(
        pins.join("links/connect4").exists(),
        "the agent pinned no connect4 link under {}",
        pins.display()
    );

    // --- the UI takes the printed login, and only that ---
    let (user, password) = login
        .split_once(':')
        .with_context(|| format!("NEMESIS_LOGIN={login} is not user:password"))?;
    assert_eq!(ui_login_status(&ui, user, password).await?, 200);
    assert_eq!(ui_login_status(&ui, user, "not-the-password").await?, 401);

    // --- the kubeconfig works, and the demo app is there at zero ---
    let client = client_from(&kubeconfig).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "demo");
    let hello = deployments.get("hello").await?;
    assert_eq!(hello.spec.replicas, Some(0));
    let services: Api<Service> = Api::namespaced(client.clone(), "demo");
    let svc = services.get("hello").await?;
    assert_eq!(
        svc.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some(service_addr)
    );
    let policies: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "demo",
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "nemesis.dev",
            "v1alpha1",
            "ScalingPolicy",
        )),
    );
    let policy = policies.get("hello").await?;
    assert_eq!(policy.data["spec"]["target"]["deployment"], "hello");

    // --- at zero, a connect from outside the cgroup is refused (no endpoints) ---
    let addr = std::net::SocketAddr::from((cluster_ip, 80));
    let err = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .expect_err("nothing serves the demo app at zero replicas");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    // --- inside the cgroup, the first connection is held and the app woken ---
    let out = curl_from_cgroup(&cgroup, &demo_url).await?;
    assert!(
        out.status.success(),
        "the held request failed: {}; the logs: {}",
        String::from_utf8_lossy(&out.stderr),
        logs.display()
    );
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.starts_with("hello-"), "answered {answer:?}");
    let woken = deployments.get("hello").await?;
    assert!(
        woken.spec.replicas.unwrap_or(0) >= 1,
        "the wake-up did not scale hello: {:?}",
        woken.spec.replicas
    );

    // --- once warm, new connections go direct, from inside and outside the cgroup ---
    let out = curl_from_cgroup(&cgroup, &demo_url).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("hello-"));
    let out = Command::new("curl")
        .args(["-sS", "-m", "10", &demo_url])
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("hello-"));

    // --- SIGINT stops everything ---
    let pid = demo.child.id().context("the demo is running")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    let status = tokio::time::timeout(STOP_TIMEOUT, demo.child.wait())
        .await
        .context("the demo did not stop after SIGINT")??;
    assert!(status.success(), "the demo exited with {status}");

    assert!(!Path::new(&cgroup).exists(), "{cgroup} is left");
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    assert!(
        !mounts.contains(&logs.join("bpffs").display().to_string()),
        "the demo's bpffs is still mounted"
    );
    assert!(!pins.exists(), "{} is left", pins.display());
    let left = processes_mentioning(&logs.display().to_string());
    assert!(left.is_empty(), "processes left: {left:#?}");
    let left = processes_mentioning(&format!("--instance {instance}"));
    assert!(left.is_empty(), "processes left: {left:#?}");
    let index = subnet_index_of(cluster_ip);
    let bridge = format!("nmb{index}");
    assert!(
        !ip_output(&["-o", "link", "show"]).contains(&format!(" {bridge}:")),
        "bridge {bridge} is left"
    );
    let netns_prefix = format!("nm{index}p");
    let netns = ip_output(&["netns", "list"]);
    assert!(
        !netns.lines().any(|l| l.starts_with(&netns_prefix)),
        "pod namespaces left: {netns}"
    );
    let _ = std::fs::remove_dir_all(&logs);
    Ok(())
}
