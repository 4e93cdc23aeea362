//! `cargo xtask demo` end to end: the real xtask binary runs the demo (an instance of
//! its own, on the binaries `cargo xtask test` built) in a child process; the test reads
//! its contract lines and drives the whole scale-to-zero cycle as a user would, with the
//! real `kubectl` on the printed kubeconfig. By default the demo installs Nemesis from
//! its images with `kubectl apply -k` (the agent DaemonSet and the controller
//! StatefulSet run as the sandbox's pods): the app at zero, held (its hold
//! EndpointSlice), woken by a request from a process inside the printed cgroup, back to
//! zero after its idle window (shortened with `kubectl patch`), the history in the UI's
//! JSON API, and woken again from zero; then it sends SIGINT and checks that nothing is
//! left: no process, no cgroup, no bpffs or pins, no mount, no pod network. A shorter
//! test runs `--processes` (the agent and the controller as host processes): ready, a
//! wake from the cgroup, nothing left after SIGINT.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Api, Client};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Start-up runs no cargo build (`--prebuilt`), but may build the two images (podman,
/// when the binaries are newer than the archives), then a sandbox that unpacks them and
/// two rollouts: a minute when idle, several on a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// Tear-down: the sandbox stops its pods (up to 30 s), each component up to 10 s.
const STOP_TIMEOUT: Duration = Duration::from_secs(90);
/// Every kubectl and curl call ends within this.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The idle window the test sets with `kubectl patch` (the demo's own is a minute), and
/// the window the connect rate is averaged over (the idle window is the longer of the
/// two): the app sleeps this long after its last connection.
const TEST_IDLE: &str = "10s";
const TEST_IDLE_SECS: u64 = 10;
/// The idle window, the sleep handshake (agents acknowledge on a 1 s heartbeat) and the
/// pod's 5 s of grace, with room for a loaded machine.
const SLEEP_TIMEOUT: Duration = Duration::from_secs(75);
/// A status write or a cache update after a scale: well under a second when idle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// The policy's columns as `kubectl get` prints them (issue 5: target, state, replicas, age).
const POLICY_COLUMNS: [&str; 6] = ["NAME", "TARGET", "STATE", "REPLICAS", "READY", "AGE"];

/// The demo in a child process; SIGINT on drop, so a failed test still cleans up.
struct DemoProcess {
    child: Child,
    /// The demo's stderr: a file, not the test's pipe, which closes when a failed test
    /// ends (the demo, still tearing down, then failed to write its log and left its
    /// cgroup and bpffs behind).
    stderr: tempfile::NamedTempFile,
    lines: BTreeMap<String, String>,
    /// Everything printed on stdout so far (a task keeps reading after start-up).
    text: Arc<Mutex<Vec<String>>>,
}

impl DemoProcess {
    fn text(&self) -> Vec<String> {
        self.text.lock().expect("not poisoned").clone()
    }
}

impl Drop for DemoProcess {
    /// SIGINT, then waits for the demo's tear-down (so a failed test leaves nothing
    /// either), and shows what the demo logged.
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let log = std::fs::read_to_string(self.stderr.path()).unwrap_or_default();
        eprintln!("--- the demo's stderr:\n{log}");
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

/// `xtask demo --skip-setup --prebuilt <these binaries> --instance <instance> <extra>`.
async fn start_demo(instance: &str, extra: &[&str]) -> anyhow::Result<DemoProcess> {
    for bin in ["nemesis-agent", "nemesis-controller"] {
        ensure!(
            bin_dir().join(bin).exists(),
            "{} is not built: run the tests through `cargo xtask test` (it builds every binary)",
            bin_dir().join(bin).display()
        );
    }
    let stderr = tempfile::NamedTempFile::new()?;
    let mut child = Command::new(xtask_bin().await?)
        .arg("demo")
        .arg("--skip-setup")
        .arg("--prebuilt")
        .arg(bin_dir())
        .arg("--instance")
        .arg(instance)
        .args(extra)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr.reopen()?))
        .kill_on_drop(false)
        .spawn()
        .context("starting xtask demo")?;
    let stdout = child.stdout.take().expect("piped");
    let mut demo = DemoProcess {
        child,
        stderr,
        lines: BTreeMap::new(),
        text: Arc::new(Mutex::new(Vec::new())),
    };
    let mut reader = BufReader::new(stdout).lines();
    let read = async {
        // NEMESIS_LOGS comes after every contract line.
        while !demo.lines.contains_key("NEMESIS_LOGS") {
            let Some(line) = reader.next_line().await? else {
                bail!(
                    "the demo ended before it was ready; it printed: {:?}",
                    demo.text()
                );
            };
            demo.text.lock().expect("not poisoned").push(line.clone());
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
    // Keep reading stdout (the demo's hints follow), so it never blocks on a full pipe.
    let text = demo.text.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = reader.next_line().await {
            text.lock().expect("not poisoned").push(line);
        }
    });
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

/// Runs `curl url` in a shell that first moves itself into `cgroup`; up to 60 s (a
/// cold start on a loaded machine).
async fn curl_from_cgroup(cgroup: &str, url: &str) -> anyhow::Result<std::process::Output> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec curl -sS -m 60 "$1""#)
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

/// The ids of the programs attached to `cgroup` (`bpftool cgroup show`).
fn attached_programs(cgroup: &str) -> anyhow::Result<Vec<u64>> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show", cgroup])
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool cgroup show {cgroup}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect())
}

/// Whether the kernel still has the program `id`.
fn program_exists(id: u64) -> bool {
    std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ip_output(args: &[&str]) -> String {
    std::process::Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The real kubectl on the demo's kubeconfig, with a cache and HOME of its own.
struct Kubectl {
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl Kubectl {
    fn new(kubeconfig: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            kubeconfig: kubeconfig.to_path_buf(),
            dir: tempfile::tempdir()?,
        })
    }

    /// Runs `kubectl args`; its stdout, or an error with both outputs.
    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let out = Command::new(&bin)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(CALL_TIMEOUT, out)
            .await
            .with_context(|| format!("kubectl {args:?} did not finish within {CALL_TIMEOUT:?}"))?
            .with_context(|| format!("running {bin} (is kubectl installed? set KUBECTL)"))?;
        ensure!(
            out.status.success(),
            "kubectl {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether the controller's hold EndpointSlice for `hello` exists.
    async fn hold_slice(&self) -> anyhow::Result<bool> {
        let out = self
            .run(&[
                "get",
                "endpointslices",
                "-n",
                "demo",
                "-l",
                "endpointslice.kubernetes.io/managed-by=controller.nemesis.dev,kubernetes.io/service-name=hello",
                "-o",
                "name",
            ])
            .await?;
        Ok(!out.trim().is_empty())
    }

    /// `kubectl get scalingpolicies -n demo`: checks the header and returns the columns
    /// of the `hello` row.
    async fn policy_row(&self) -> anyhow::Result<Vec<String>> {
        let out = self.run(&["get", "scalingpolicies", "-n", "demo"]).await?;
        let mut lines = out.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        ensure!(
            header == POLICY_COLUMNS,
            "kubectl get scalingpolicies printed the columns {header:?}:\n{out}"
        );
        let row = lines
            .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
            .find(|cols| cols.first().map(String::as_str) == Some("hello"))
            .with_context(|| format!("no policy `hello` in:\n{out}"))?;
        ensure!(
            row.len() == POLICY_COLUMNS.len(),
            "a column is empty: {row:?}\n{out}"
        );
        Ok(row)
    }

    /// The `hello` row once its state is `state` (the status is written by the
    /// controller's next evaluation after a change).
    async fn policy_row_in(&self, state: &str) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let row = self.policy_row().await?;
            if row[2] == state {
                return Ok(row);
            }
            ensure!(
                Instant::now() < deadline,
                "kubectl get scalingpolicies still shows {row:?} after {SETTLE_TIMEOUT:?}, not state {state}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A logged-in session of the controller's web UI (curl with a cookie jar).
struct UiSession {
    ui: String,
    jar: PathBuf,
}

impl UiSession {
    async fn login(ui: &str, user: &str, password: &str, dir: &Path) -> anyhow::Result<Self> {
        let session = Self {
            ui: ui.to_string(),
            jar: dir.join("ui-cookies"),
        };
        let body = serde_json::json!({"username": user, "password": password}).to_string();
        let out = session
            .curl(&[
                "-c",
                &session.jar.display().to_string(),
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
                &format!("{ui}login"),
            ])
            .await?;
        ensure!(out.contains("csrfToken"), "the login answered {out}");
        Ok(session)
    }

    /// `GET <ui><path>` in the session, as JSON.
    async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.ui);
        let out = self
            .curl(&["-b", &self.jar.display().to_string(), &url])
            .await?;
        serde_json::from_str(&out).with_context(|| format!("GET {url} answered {out}"))
    }

    async fn curl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "-m", "10"])
            .args(args)
            .output()
            .await
            .context("running curl against the UI")?;
        ensure!(
            out.status.success(),
            "curl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Polls `check` until it returns `Some`, for at most `timeout`; the error says what
/// was awaited and what `last` saw.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Option<T>, String)>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let (found, seen) = check().await?;
        if let Some(v) = found {
            return Ok(v);
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; last seen: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `(from, to)` of every transition in a history answer, in order.
fn transitions(history: &serde_json::Value) -> Vec<(String, String)> {
    history["transitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["from"].as_str().unwrap_or_default().to_string(),
                t["to"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// `(fromReplicas, toReplicas)` of every scale event in a history answer, in order.
fn scale_events(history: &serde_json::Value) -> Vec<(i64, i64)> {
    history["scaleEvents"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["fromReplicas"].as_i64().unwrap_or(-1),
                e["toReplicas"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_app_wakes_from_its_cgroup_sleeps_after_its_idle_window_wakes_again_and_nothing_is_left_after_sigint()
-> anyhow::Result<()> {
    let instance = format!("t{}", std::process::id());
    let mut demo = start_demo(&instance, &[]).await?;
    let line = |k: &str| {
        demo.lines
            .get(k)
            .cloned()
            .with_context(|| format!("no {k} line in {:?}", demo.text()))
    };

    // --- the contract lines ---
    let ui = line("NEMESIS_UI")?;
    let demo_url = line("NEMESIS_DEMO_URL")?;
    let cgroup = line("NEMESIS_DEMO_CGROUP")?;
    let kubeconfig = PathBuf::from(line("NEMESIS_KUBECONFIG")?);
    let logs = PathBuf::from(line("NEMESIS_LOGS")?);
    let login = line("NEMESIS_LOGIN")?;
    let service_addr = demo_url
        .strip_prefix("http://")
        .and_then(|r| r.strip_suffix(":80/"))
        .with_context(|| format!("NEMESIS_DEMO_URL {demo_url} is not http://<ClusterIP>:80/"))?;
    let cluster_ip: Ipv4Addr = service_addr.parse()?;
    assert_eq!(cluster_ip.octets()[..2], [127, 96], "{cluster_ip}");
    // The UI is the controller's Service, on a ClusterIP of the sandbox's own block
    // that the sandbox serves on the host, as kube-proxy would.
    let ui_ip: Ipv4Addr = ui
        .strip_prefix("http://")
        .and_then(|r| r.strip_suffix(":8080/"))
        .with_context(|| format!("NEMESIS_UI {ui} is not http://<ClusterIP>:8080/"))?
        .parse()?;
    assert_eq!(
        subnet_index_of(ui_ip),
        subnet_index_of(cluster_ip),
        "the UI's ClusterIP {ui_ip} is not of the sandbox's block ({cluster_ip})"
    );
    assert!(Path::new(&cgroup).join("cgroup.procs").exists(), "{cgroup}");
    assert!(
        cgroup.ends_with(&format!("/nemesis-{instance}")),
        "{cgroup}"
    );
    let pins = logs.join("bpffs/nemesis").join(&instance);
    assert!(
        pins.join("links/connect4").exists(),
        "the agent pinned no connect4 link under {}; the pods' logs: {}",
        pins.display(),
        pod_logs(&logs)
    );

    // --- after them, the hints: what to watch, with the printed kubeconfig ---
    let watch = format!(
        "kubectl --kubeconfig {} get scalingpolicies -n demo -w",
        kubeconfig.display()
    );
    wait_for(
        "the demo's hint to watch the policy",
        SETTLE_TIMEOUT,
        || {
            let text = demo.text();
            let found = text.iter().any(|l| l.trim() == watch).then_some(());
            async move { Ok((found, format!("{text:#?}"))) }
        },
    )
    .await?;
    let text = demo.text();
    assert!(
        !text.iter().any(|l| l.starts_with("NOT RUNNING")),
        "every component should run: {text:#?}"
    );

    // --- the UI takes the printed login, and only that ---
    let (user, password) = login
        .split_once(':')
        .with_context(|| format!("NEMESIS_LOGIN={login} is not user:password"))?;
    assert_eq!(ui_login_status(&ui, user, password).await?, 200);
    assert_eq!(ui_login_status(&ui, user, "not-the-password").await?, 401);
    let scratch = tempfile::tempdir()?;
    let session = UiSession::login(&ui, user, password, scratch.path()).await?;

    // --- the kubeconfig works, and the demo app is there at zero ---
    let kubectl = Kubectl::new(&kubeconfig)?;
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
    // Nemesis runs installed: the DaemonSet's and the StatefulSet's pods, from the
    // images the demo loaded into the node.
    let pods = kubectl
        .run(&[
            "get",
            "pods",
            "-n",
            "nemesis-system",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.spec.containers[0].image}{\"\\n\"}{end}",
        ])
        .await?;
    for (prefix, image) in [
        ("nemesis-agent-", "localhost/nemesis-agent:"),
        ("nemesis-controller-0", "localhost/nemesis-controller:"),
    ] {
        assert!(
            pods.lines()
                .any(|l| l.starts_with(prefix) && l.contains(" Running ") && l.contains(image)),
            "no running {prefix}* from {image}*:\n{pods}"
        );
    }
    // kubectl shows the policy with its printer columns: target, state, replicas,
    // ready (the demo's policy is valid, so it can act), age.
    let row = kubectl.policy_row_in("zero").await?;
    assert_eq!(row[1], "Deployment/hello", "target (Kind/name): {row:?}");
    assert_eq!(row[3], "0", "replicas: {row:?}");
    assert_eq!(row[4], "True", "ready: {row:?}");
    assert!(
        row[5].ends_with('s') || row[5].ends_with('m'),
        "age: {row:?}"
    );

    // --- at zero, the app is held: its hold EndpointSlice sends callers that the
    // cgroup's programs do not see (outside the cgroup, other nodes) to the agent ---
    let held = || kubectl.hold_slice();
    ensure!(held().await?, "no hold EndpointSlice for hello at zero");

    // --- inside the cgroup, the first connection is held and the app woken ---
    let served = |what: &'static str| {
        let cgroup = cgroup.clone();
        let demo_url = demo_url.clone();
        let logs = logs.clone();
        async move {
            let out = curl_from_cgroup(&cgroup, &demo_url).await?;
            ensure!(
                out.status.success(),
                "{what}: the request from the cgroup failed: {}; the logs: {}",
                String::from_utf8_lossy(&out.stderr),
                logs.display()
            );
            let answer = String::from_utf8_lossy(&out.stdout).into_owned();
            ensure!(answer.starts_with("hello-"), "{what}: answered {answer:?}");
            anyhow::Ok(())
        }
    };
    served("the first request at zero").await?;
    let woken = deployments.get("hello").await?;
    assert!(
        woken.spec.replicas.unwrap_or(0) >= 1,
        "the wake-up did not scale hello: {:?}",
        woken.spec.replicas
    );
    let row = kubectl.policy_row_in("warm").await?;
    assert!(
        row[3].parse::<u32>().is_ok_and(|n| n >= 1),
        "replicas once warm: {row:?}"
    );

    // --- once warm, new connections go direct, from inside and outside the cgroup ---
    served("a request while warm").await?;
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

    let last_request = Instant::now();

    // --- a shorter idle window, set as a user would ---
    // Only idleTimeout: shorter than the default rate window (1m), it sets the window
    // too (a 20s policy once slept 65 s after its last connection).
    let patch = serde_json::json!({"spec": {"idleTimeout": TEST_IDLE}}).to_string();
    let out = kubectl
        .run(&[
            "patch",
            "scalingpolicy",
            "hello",
            "-n",
            "demo",
            "--type",
            "merge",
            "-p",
            &patch,
        ])
        .await?;
    assert!(
        out.contains("scalingpolicy.nemesis.dev/hello patched"),
        "{out}"
    );
    let spec = kubectl
        .run(&[
            "get",
            "scalingpolicy",
            "hello",
            "-n",
            "demo",
            "-o",
            "jsonpath={.spec.idleTimeout} {.status.conditions[?(@.type==\"Invalid\")].status}",
        ])
        .await?;
    assert_eq!(spec.split_whitespace().next(), Some(TEST_IDLE), "{spec}");

    // --- after the idle window, back to zero: replicas 0, pods gone, state zero ---
    let asleep = Instant::now();
    wait_for("hello scaled to zero", SLEEP_TIMEOUT, || {
        let deployments = deployments.clone();
        async move {
            let replicas = deployments.get("hello").await?.spec.replicas;
            Ok((
                (replicas == Some(0)).then_some(()),
                format!("replicas {replicas:?}"),
            ))
        }
    })
    .await?;
    let slept_after = asleep.elapsed();
    assert!(
        last_request.elapsed() >= Duration::from_secs(TEST_IDLE_SECS),
        "asleep {:?} after the last request, before the idle window of {TEST_IDLE}",
        last_request.elapsed()
    );
    wait_for("hello's pods gone", SETTLE_TIMEOUT, || {
        let kubectl = &kubectl;
        async move {
            let pods = kubectl
                .run(&["get", "pods", "-n", "demo", "-l", "app=hello", "-o", "name"])
                .await?;
            Ok((pods.trim().is_empty().then_some(()), pods))
        }
    })
    .await?;
    let row = kubectl.policy_row_in("zero").await?;
    assert_eq!(row[3], "0", "replicas at zero: {row:?}");
    // Held again: the hold EndpointSlice is back.
    wait_for("hello held again", SETTLE_TIMEOUT, || async {
        Ok((held().await?.then_some(()), "no hold EndpointSlice".into()))
    })
    .await?;

    // --- the controller's history (the UI's JSON API) records the cycle ---
    let history_path = "api/v1/policies/demo/hello/history?window=1h";
    let history = session.get(history_path).await?;
    let zero_warm = ("zero".to_string(), "warm".to_string());
    let warm_zero = ("warm".to_string(), "zero".to_string());
    assert_eq!(
        transitions(&history),
        [zero_warm.clone(), warm_zero.clone()],
        "{history:#}"
    );
    assert_eq!(scale_events(&history), [(0, 1), (1, 0)], "{history:#}");
    let sleep_reason = history["transitions"][1]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(
        sleep_reason.contains(&format!("for {TEST_IDLE}")),
        "the sleep should name the patched idle window: {sleep_reason:?}"
    );
    assert_eq!(history["coldStarts"][0]["outcome"], "ready", "{history:#}");
    assert!(
        history["coldStarts"][0]["heldConnections"].as_u64() >= Some(1),
        "{history:#}"
    );

    // --- at zero again, a request from the cgroup is held and served: the sleep left
    // the datapath holding ---
    served("the first request after the sleep").await?;
    let row = kubectl.policy_row_in("warm").await?;
    assert!(
        row[3].parse::<u32>().is_ok_and(|n| n >= 1),
        "replicas once warm again: {row:?}"
    );
    let history = wait_for(
        "the second cold start in the history",
        SETTLE_TIMEOUT,
        || {
            let session = &session;
            async move {
                let h = session.get(history_path).await?;
                let done = h["coldStarts"].as_array().is_some_and(|c| c.len() == 2)
                    && h["coldStarts"][1]["outcome"] != serde_json::Value::Null;
                Ok((done.then(|| h.clone()), format!("{h:#}")))
            }
        },
    )
    .await?;
    assert_eq!(
        transitions(&history),
        [zero_warm.clone(), warm_zero, zero_warm],
        "{history:#}"
    );
    assert_eq!(
        scale_events(&history),
        [(0, 1), (1, 0), (0, 1)],
        "{history:#}"
    );
    assert_eq!(history["coldStarts"][1]["outcome"], "ready", "{history:#}");
    assert!(
        history["coldStarts"][1]["heldConnections"].as_u64() >= Some(1),
        "the request after the sleep was not held: {history:#}"
    );
    eprintln!("demo_lifecycle: asleep {slept_after:?} after the idle window was set");

    stop_and_check_nothing_is_left(&mut demo, &instance).await
}

/// The tails of the sandbox's container logs (the installed agent's and controller's).
fn pod_logs(logs: &Path) -> String {
    let dir = logs.join("sandbox/pods/logs");
    let mut out = format!("{}:\n", dir.display());
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        out.push_str(&format!("--- {}\n", entry.path().display()));
        for line in tail.into_iter().rev() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// SIGINT to the demo; then nothing of it is left: no process, no cgroup, no bpffs or
/// pins, no program it attached, no mount under its directory, no pod network.
async fn stop_and_check_nothing_is_left(
    demo: &mut DemoProcess,
    instance: &str,
) -> anyhow::Result<()> {
    let line = |k: &str| {
        demo.lines
            .get(k)
            .cloned()
            .with_context(|| format!("no {k} line in {:?}", demo.text()))
    };
    let cgroup = line("NEMESIS_DEMO_CGROUP")?;
    let logs = PathBuf::from(line("NEMESIS_LOGS")?);
    let demo_url = line("NEMESIS_DEMO_URL")?;
    let cluster_ip: Ipv4Addr = demo_url
        .trim_start_matches("http://")
        .trim_end_matches(":80/")
        .parse()?;
    let pins = logs.join("bpffs/nemesis").join(instance);
    let programs = attached_programs(&cgroup)?;
    ensure!(
        !programs.is_empty(),
        "no program attached to {cgroup} before the stop"
    );
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
    let left: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&logs.display().to_string()))
        .collect();
    assert!(
        left.is_empty(),
        "mounts left under the demo's directory (its bpffs, an image's root): {left:#?}"
    );
    assert!(!pins.exists(), "{} is left", pins.display());
    // Nothing holds the programs any more (no link, pin or process): the kernel frees
    // them, a moment after the last reference goes.
    wait_for("the demo's programs freed", SETTLE_TIMEOUT, || {
        let left: Vec<u64> = programs
            .iter()
            .copied()
            .filter(|id| program_exists(*id))
            .collect();
        async move { Ok((left.is_empty().then_some(()), format!("{left:?}"))) }
    })
    .await?;
    let left = processes_mentioning(&logs.display().to_string());
    assert!(left.is_empty(), "processes left: {left:#?}");
    let left = processes_mentioning(&format!("--instance {instance} "));
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

/// `--processes`: the agent and the controller as host processes (for debugging the
/// binaries). Ready with every contract line, the UI on loopback, the app refused
/// outside the cgroup at zero (no hold EndpointSlice: the agent reports no node
/// address), woken from the cgroup; nothing left after SIGINT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_processes_wakes_from_its_cgroup_and_nothing_is_left_after_sigint()
-> anyhow::Result<()> {
    let instance = format!("p{}", std::process::id());
    let mut demo = start_demo(&instance, &["--processes"]).await?;
    let line = |k: &str| {
        demo.lines
            .get(k)
            .cloned()
            .with_context(|| format!("no {k} line in {:?}", demo.text()))
    };
    let ui = line("NEMESIS_UI")?;
    let demo_url = line("NEMESIS_DEMO_URL")?;
    let cgroup = line("NEMESIS_DEMO_CGROUP")?;
    let kubeconfig = PathBuf::from(line("NEMESIS_KUBECONFIG")?);
    let logs = PathBuf::from(line("NEMESIS_LOGS")?);
    let login = line("NEMESIS_LOGIN")?;
    assert!(ui.starts_with("http://127.0.0.1:"), "{ui}");
    let (user, password) = login
        .split_once(':')
        .with_context(|| format!("NEMESIS_LOGIN={login} is not user:password"))?;
    assert_eq!(ui_login_status(&ui, user, password).await?, 200);
    let pins = logs.join("bpffs/nemesis").join(&instance);
    assert!(
        pins.join("links/connect4").exists(),
        "the agent pinned no connect4 link under {}; its log: {:?}",
        pins.display(),
        std::fs::read_to_string(logs.join("agent.log")).unwrap_or_default(),
    );
    let text = demo.text();
    assert!(
        !text.iter().any(|l| l.starts_with("NOT RUNNING")),
        "every component should run: {text:#?}"
    );

    let kubectl = Kubectl::new(&kubeconfig)?;
    kubectl.policy_row_in("zero").await?;
    let cluster_ip: Ipv4Addr = demo_url
        .trim_start_matches("http://")
        .trim_end_matches(":80/")
        .parse()?;
    let err = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from((cluster_ip, 80)),
        Duration::from_secs(2),
    )
    .expect_err("nothing serves the demo app at zero replicas outside the cgroup");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    let out = curl_from_cgroup(&cgroup, &demo_url).await?;
    ensure!(
        out.status.success(),
        "the request from the cgroup failed: {}; the logs: {}",
        String::from_utf8_lossy(&out.stderr),
        logs.display()
    );
    let answer = String::from_utf8_lossy(&out.stdout);
    ensure!(answer.starts_with("hello-"), "answered {answer:?}");
    kubectl.policy_row_in("warm").await?;

    stop_and_check_nothing_is_left(&mut demo, &instance).await
}
