//! `cargo xtask demo`: the sandbox cluster (test API server + simulated node), Nemesis
//! installed in it from its images by `kubectl apply -k` of the manifests ([`install`];
//! with `--processes`, the agent and the controller as host processes instead), and the
//! demo app at zero replicas; the contract lines of DESIGN.md once all is ready; on
//! Ctrl-C or SIGTERM everything torn down in reverse. Owns the demo's processes, cgroup
//! and pin directory, all named after `--instance`; never touches another instance's,
//! nor the cgroup2 root.

/// `eprintln!` that never panics: a closed stderr (a pipe whose reader went away) must
/// not stop the tear-down half-way and leave the cgroup or the bpffs behind.
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

mod install;

use anyhow::{Context, Result, anyhow, bail};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::util::{cargo, describe, is_root, root, sh};

/// The sandbox applies manifests, reads its images and builds pod networks: seconds;
/// two minutes (on a loaded machine) means stuck.
const SANDBOX_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Loading eBPF, syncing caches and winning a fresh Lease take seconds.
const COMPONENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// SIGTERM first; SIGKILL when a child has not exited after this.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The sandbox stops its loops within 15 s and kills every pod process before it exits.
const SANDBOX_STOP_GRACE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(200);
/// One readiness probe; the components answer from memory.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The demo app's Service, as `manifests/demo/` defines it.
const DEMO_SERVICE: &str = "demo/hello:http";
const UI_USER: &str = "admin";
/// The simulated node's name (`nemesis-sandbox --node-name` default); the agent runs on it.
const SANDBOX_NODE: &str = "nemesis-sandbox";

/// Flags of `cargo xtask demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Names this demo's cgroup (`<cgroup2>/nemesis-<instance>`), pin directory
    /// (`<bpffs>/nemesis/<instance>`) and log directory, so demos (and the demo's test)
    /// can run side by side. Letters, digits and `-`, at most 40.
    #[arg(long, env = "NEMESIS_DEMO_INSTANCE", default_value = "demo")]
    pub instance: String,
    /// Skip the set-up steps (already done, e.g. by `cargo xtask test`).
    #[arg(long)]
    pub skip_setup: bool,
    /// Build and run optimized release binaries instead of the debug ones (a first build
    /// several times longer; the eBPF programs are optimized either way, and the warm
    /// path never crosses the userspace proxy).
    #[arg(long)]
    pub release: bool,
    /// Build nothing (not even the eBPF programs): run the binaries already in this
    /// directory, e.g. `target/debug` after `cargo xtask test` (what the demo's test
    /// does). A component whose binary is missing there is reported as not available.
    #[arg(long, value_name = "DIR", conflicts_with = "release")]
    pub prebuilt: Option<PathBuf>,
    /// Run the agent and the controller as host processes with flags of the demo's
    /// own, instead of installing them from their images with `kubectl apply -k` (for
    /// debugging the binaries: their logs are files, a rebuild needs no image).
    #[arg(long)]
    pub processes: bool,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    check_instance(&args.instance)?;
    if !is_root() {
        bail!(
            "the demo loads eBPF programs, creates network namespaces and a cgroup: run it as root"
        );
    }
    signals::install()?;
    if !args.skip_setup {
        crate::setup::run_setup_steps()?;
    }
    signals::check()?;
    let layout = Layout::new(&args.instance, args.release, args.prebuilt.clone())?;
    layout.prepare()?;
    let (agent_bin, controller_bin) = match &args.prebuilt {
        None => build_all(&layout)?,
        Some(_) => {
            let sandbox = layout.bin("nemesis-sandbox");
            if !sandbox.exists() || !layout.bin("nemesis-pod-server").exists() {
                bail!(
                    "--prebuilt {}: nemesis-sandbox or nemesis-pod-server is missing there",
                    layout.bin_dir.display()
                );
            }
            (
                prebuilt(&layout, "nemesis-agent"),
                prebuilt(&layout, "nemesis-controller"),
            )
        }
    };

    let mut demo = Demo {
        layout,
        installed: !args.processes,
        sandbox: None,
        controller: None,
        agent: None,
        cgroup: None,
        bpffs_mounted: false,
        agent_bin: agent_bin.as_ref().ok().cloned(),
    };
    let started = if args.processes {
        demo.start(agent_bin, controller_bin)
    } else {
        match (agent_bin, controller_bin) {
            (Ok(agent), Ok(controller)) => demo.start_installed(&agent, &controller),
            (Err(e), _) | (_, Err(e)) => Err(anyhow!(
                "the install needs both images: {e} (`--processes` runs what there is)"
            )),
        }
    };
    let outcome = match started {
        Ok(()) => demo.wait_for_stop(),
        Err(e) => Err(e),
    };
    if let Err(e) = &outcome {
        note!("demo: {e:#}");
    }
    note!("demo: stopping everything");
    let leftovers = demo.teardown();
    if leftovers.is_empty() {
        note!("demo: stopped; nothing left behind");
    } else {
        for l in &leftovers {
            note!("demo: cleanup: {l}");
        }
    }
    match (outcome, leftovers.is_empty()) {
        (Ok(()), true) => Ok(()),
        (Ok(()), false) => bail!("the demo stopped but left things behind (above)"),
        (Err(e), _) => Err(e),
    }
}

type Built = std::result::Result<PathBuf, String>;

/// The eBPF programs and every binary; the sandbox is required, the components are
/// reported as not available when they do not build.
fn build_all(layout: &Layout) -> Result<(Built, Built)> {
    let ebpf =
        crate::ebpf::build().map_err(|e| format!("building the eBPF programs failed: {e:#}"));
    signals::check()?;
    // One cargo call for everything the demo runs: shared dependencies are built once
    // and both cores stay busy; only when it fails are the parts built one by one, to
    // tell which component is not available.
    let mut all = vec![
        (
            "nemesis-tests",
            &["nemesis-sandbox", "nemesis-pod-server"][..],
        ),
        ("nemesis-controller", &["nemesis-controller"][..]),
    ];
    if ebpf.is_ok() {
        all.push(("nemesis-agent", &["nemesis-agent"][..]));
    }
    if build_together(layout, &all).is_ok() {
        signals::check()?;
        let agent = ebpf.map(|()| layout.bin("nemesis-agent"));
        return Ok((agent, Ok(layout.bin("nemesis-controller"))));
    }
    signals::check()?;
    build(
        layout,
        "nemesis-tests",
        &["nemesis-sandbox", "nemesis-pod-server"],
    )
    .context("building the sandbox")?;
    signals::check()?;
    let agent = ebpf.and_then(|()| {
        build(layout, "nemesis-agent", &["nemesis-agent"]).map_err(|e| format!("{e:#}"))
    });
    signals::check()?;
    let controller =
        build(layout, "nemesis-controller", &["nemesis-controller"]).map_err(|e| format!("{e:#}"));
    signals::check()?;
    Ok((agent, controller))
}

fn prebuilt(layout: &Layout, name: &str) -> Built {
    let bin = layout.bin(name);
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!("{} is not built", bin.display()))
    }
}

fn check_instance(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-');
    if !ok {
        bail!(
            "--instance {name:?}: use 1-40 letters, digits and `-` (it names a cgroup and a pin directory)"
        );
    }
    Ok(())
}

// === where things go ===

struct Layout {
    instance: String,
    /// Where the binaries were built.
    bin_dir: PathBuf,
    /// `target/nemesis-demo/<instance>`: logs, the kubeconfig, the agent token, history.
    dir: PathBuf,
    /// The target directory (`CARGO_TARGET_DIR` or `<root>/target`).
    target: PathBuf,
    release: bool,
}

impl Layout {
    fn new(instance: &str, release: bool, prebuilt: Option<PathBuf>) -> Result<Self> {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target"));
        let bin_dir = match prebuilt {
            Some(dir) => std::path::absolute(&dir)
                .with_context(|| format!("--prebuilt {}", dir.display()))?,
            None => target.join(if release { "release" } else { "debug" }),
        };
        Ok(Self {
            instance: instance.to_string(),
            bin_dir,
            dir: target.join("nemesis-demo").join(instance),
            target,
            release,
        })
    }

    /// A fresh directory: a new sandbox means old history and logs describe nothing.
    fn prepare(&self) -> Result<()> {
        bpffs::unmount(&self.bpffs()).context("unmounting the previous run's bpffs")?;
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir)
                .with_context(|| format!("removing the previous run's {}", self.dir.display()))?;
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    fn cgroup_name(&self) -> String {
        format!("nemesis-{}", self.instance)
    }

    /// The demo's own bpffs: pins never mix with a node agent's, and unmounting it
    /// at the end leaves nothing, whether or not the machine mounts /sys/fs/bpf.
    fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    fn pins(&self) -> PathBuf {
        self.bpffs().join("nemesis").join(&self.instance)
    }

    /// Where the images of `bin_dir`'s binaries go: `target/images/<profile>` for the
    /// target's own binaries (what `cargo xtask image` and the tests use, so an image
    /// built by either is reused), a directory per path for any other `--prebuilt`.
    fn images_dir(&self) -> PathBuf {
        let images = self.target.join("images");
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        for profile in ["debug", "release"] {
            if canonical(&self.bin_dir) == canonical(&self.target.join(profile)) {
                return images.join(profile);
            }
        }
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.bin_dir.hash(&mut h);
        images.join(format!("prebuilt-{:016x}", h.finish()))
    }
}

fn build(layout: &Layout, package: &str, bins: &[&str]) -> Result<PathBuf> {
    build_together(layout, &[(package, bins)])?;
    Ok(layout.bin(bins[0]))
}

/// Builds `bins` of each package in one cargo call.
fn build_together(layout: &Layout, parts: &[(&str, &[&str])]) -> Result<()> {
    let mut cmd = cargo();
    cmd.arg("build");
    if layout.release {
        cmd.arg("--release");
    }
    for (package, _) in parts {
        cmd.args(["-p", package]);
    }
    for b in parts.iter().flat_map(|(_, bins)| bins.iter()) {
        cmd.args(["--bin", b]);
    }
    sh(&mut cmd)
}

// === the running demo ===

struct Running {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

struct Demo {
    layout: Layout,
    /// Nemesis runs as pods of the sandbox (the default), not as the processes below.
    installed: bool,
    sandbox: Option<Running>,
    controller: Option<Running>,
    agent: Option<Running>,
    cgroup: Option<PathBuf>,
    bpffs_mounted: bool,
    /// Kept for `nemesis-agent cleanup` even when the agent never started.
    agent_bin: Option<PathBuf>,
}

/// What the sandbox printed.
struct SandboxInfo {
    kubeconfig: PathBuf,
    demo_url: String,
    /// The first ClusterIP of the sandbox's own block that nothing took yet.
    free_cluster_ip: Option<std::net::Ipv4Addr>,
}

/// What the contract lines say about the UI: its address and `user:password`, or why
/// there is none.
type UiLines = std::result::Result<(String, String), String>;

/// The controller as the demo runs it.
struct ControllerInfo {
    api: SocketAddr,
    /// `user:password` for the web UI.
    login: String,
}

impl Demo {
    fn start(
        &mut self,
        agent_bin: std::result::Result<PathBuf, String>,
        controller_bin: std::result::Result<PathBuf, String>,
    ) -> Result<()> {
        // A previous run killed before its clean-up left its cgroup (its pins went with
        // its bpffs, unmounted by `prepare`).
        let cgroup = cgroup::path(&self.layout.cgroup_name())?;
        if cgroup.exists() {
            cgroup::remove(&cgroup).context("removing the previous run's cgroup")?;
        }

        let root = root();
        let sandbox = self.start_sandbox(
            &[
                root.join("manifests/crd"),
                root.join("manifests/base/namespace.yaml"),
                root.join("manifests/demo"),
            ],
            &[],
        )?;
        bpffs::mount(&self.layout.bpffs())?;
        self.bpffs_mounted = true;
        cgroup::create(&cgroup)?;
        self.cgroup = Some(cgroup.clone());
        // The agent's own token, as its projected volume would hold it: the controller
        // reviews it (no shared token).
        let token_file = self.layout.dir.join("agent-token");
        let kubectl = install::Kubectl {
            kubeconfig: sandbox.kubeconfig.clone(),
            scratch: self.layout.dir.clone(),
        };
        write_secret(
            &token_file,
            &install::agent_token(&kubectl, &self.layout.dir, SANDBOX_NODE)
                .context("the agent's token")?,
        )?;

        let mut notes = Vec::new();
        let controller = match controller_bin {
            Ok(bin) => match self.start_controller(&bin, &sandbox) {
                Ok(c) => Some(c),
                Err(e) => {
                    notes.push(format!("the controller is not running: {e:#}"));
                    None
                }
            },
            Err(e) => {
                notes.push(format!("the controller is not available: {e}"));
                None
            }
        };
        signals::check()?;
        match agent_bin {
            Ok(bin) => {
                if let Err(e) =
                    self.start_agent(&bin, &sandbox, &cgroup, controller.as_ref(), &token_file)
                {
                    notes.push(format!("the agent is not running: {e:#}"));
                }
            }
            Err(e) => notes.push(format!("the agent is not available: {e}")),
        }
        signals::check()?;
        let ui = match &controller {
            Some(c) => Ok((format!("http://{}/", c.api), c.login.clone())),
            None => Err("the controller is not running".to_string()),
        };
        let logs = format!("Logs: {}.", self.layout.dir.display());
        self.print_contract(&sandbox, &cgroup, ui, &notes, &logs)
    }

    /// DESIGN.md's contract lines (each alone on a line), then how to try the demo.
    fn print_contract(
        &self,
        sandbox: &SandboxInfo,
        cgroup: &Path,
        ui: UiLines,
        notes: &[String],
        logs: &str,
    ) -> Result<()> {
        let mut out = std::io::stdout().lock();
        if let Ok((url, _)) = &ui {
            writeln!(out, "NEMESIS_UI={url}")?;
        }
        writeln!(out, "NEMESIS_DEMO_URL={}", sandbox.demo_url)?;
        writeln!(out, "NEMESIS_DEMO_CGROUP={}", cgroup.display())?;
        writeln!(out, "NEMESIS_KUBECONFIG={}", sandbox.kubeconfig.display())?;
        match &ui {
            Ok((_, login)) => writeln!(out, "NEMESIS_LOGIN={login}")?,
            Err(why) => writeln!(out, "The web UI is not available: {why}.")?,
        }
        writeln!(out, "NEMESIS_LOGS={}", self.layout.dir.display())?;
        for note in notes {
            writeln!(out, "NOT RUNNING: {note}")?;
        }
        writeln!(
            out,
            "\nTry it: put a shell into the demo's cgroup, so the agent sees its connections,\n\
             and call the app (at zero replicas, the first call wakes it):\n\
             \n    echo $$ > {cg}/cgroup.procs; curl {url}\n\
             \nWatch the policy go from zero to warm on that call, and back to zero once the\n\
             app has had no connections for its idle window (idleTimeout in\n\
             manifests/demo/20-policy.yaml); the next call wakes it again:\n\
             \n    kubectl --kubeconfig {kc} get scalingpolicies -n demo -w\n\
             \n    kubectl --kubeconfig {kc} -n demo get deploy,pods,endpointslices,scalingpolicies\n\
             \n{logs} Ctrl-C stops everything.",
            cg = cgroup.display(),
            url = sandbox.demo_url,
            kc = sandbox.kubeconfig.display(),
        )?;
        out.flush()?;
        Ok(())
    }

    /// Starts `nemesis-sandbox` with the manifests in `apply` and `extra` flags, and
    /// waits for its lines.
    fn start_sandbox(
        &mut self,
        apply: &[PathBuf],
        extra: &[std::ffi::OsString],
    ) -> Result<SandboxInfo> {
        let bin = self.layout.bin("nemesis-sandbox");
        let log = self.layout.log("sandbox");
        let mut cmd = Command::new(&bin);
        cmd.arg("--dir")
            .arg(self.layout.dir.join("sandbox"))
            .arg("--service-proxy")
            .args(extra);
        for m in apply {
            cmd.arg("--apply").arg(m);
        }
        let log_file = open_log(&log)?;
        cmd.stdout(Stdio::piped()).stderr(log_file);
        let mut child = spawn_child(&mut cmd)?;
        // Stdout carries the sandbox's `KEY=value` lines; a thread copies them into the
        // log and hands them over, so the pipe never fills.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        let mut copy = open_log(&log)?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                let _ = writeln!(copy, "{line}");
                let _ = tx.send(line);
            }
        });
        note!("demo: sandbox starting (log: {})", log.display());
        self.sandbox = Some(Running {
            name: "sandbox",
            child,
            log: log.clone(),
        });
        let mut kubeconfig = None;
        let mut demo_addr = None;
        let mut free_cluster_ip = None;
        let deadline = Instant::now() + SANDBOX_READY_TIMEOUT;
        while kubeconfig.is_none() {
            signals::check()?;
            if let Some(why) = self.exited("sandbox") {
                bail!(
                    "the sandbox {why} before it was ready; its log: {}",
                    log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the sandbox was not ready within {SANDBOX_READY_TIMEOUT:?}; its log: {}",
                    log.display()
                );
            }
            let Ok(line) = rx.recv_timeout(POLL) else {
                continue;
            };
            if let Some(v) = line.strip_prefix("NEMESIS_KUBECONFIG=") {
                kubeconfig = Some(PathBuf::from(v));
            } else if let Some(v) = line.strip_prefix("NEMESIS_SANDBOX_FREE_CLUSTER_IPS=") {
                free_cluster_ip = first_of_range(v);
            } else if let Some(addr) = line
                .strip_prefix("NEMESIS_SANDBOX_SERVICE=")
                .and_then(|v| v.strip_prefix(DEMO_SERVICE))
                .and_then(|r| r.strip_prefix('='))
            {
                demo_addr = Some(addr.to_string());
            }
        }
        let demo_addr = demo_addr.ok_or_else(|| {
            anyhow!(
                "the sandbox applied manifests/demo but reported no Service {DEMO_SERVICE}; its log: {}",
                log.display()
            )
        })?;
        note!("demo: sandbox ready");
        Ok(SandboxInfo {
            kubeconfig: kubeconfig.expect("loop ends with it"),
            demo_url: format!("http://{demo_addr}/"),
            free_cluster_ip,
        })
    }

    fn start_controller(&mut self, bin: &Path, sandbox: &SandboxInfo) -> Result<ControllerInfo> {
        let api = free_loopback_port()?;
        let admin = free_loopback_port()?;
        let log = self.layout.log("controller");
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--listen")
            .arg(api.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .arg("--store-path")
            .arg(self.layout.dir.join("history.redb"))
            .arg("--identity")
            .arg(format!("demo-{}", self.layout.instance))
            .env("KUBECONFIG", &sandbox.kubeconfig);
        // The controller hashes the password at start; the file is the demo's Secret.
        let password = random_hex(12);
        let password_file = self.layout.dir.join("ui-password");
        write_secret(&password_file, &password)?;
        cmd.arg("--ui-password-file")
            .arg(&password_file)
            .arg("--ui-user")
            .arg(UI_USER);
        let log_file = open_log(&log)?;
        cmd.stdout(log_file.try_clone()?).stderr(log_file);
        note!("demo: controller starting (log: {})", log.display());
        self.controller = Some(Running {
            name: "controller",
            child: spawn_child(&mut cmd)?,
            log: log.clone(),
        });
        self.wait_ready("controller", &log, || {
            let (status, body) = http_get(admin, "/readyz")?;
            // A standby answers 200 too; the demo needs the instance that acts.
            Ok(status == 200 && !body.contains("standby"))
        })?;
        note!("demo: controller ready");
        Ok(ControllerInfo {
            api,
            login: format!("{UI_USER}:{password}"),
        })
    }

    fn start_agent(
        &mut self,
        bin: &Path,
        sandbox: &SandboxInfo,
        cgroup: &Path,
        controller: Option<&ControllerInfo>,
        token_file: &Path,
    ) -> Result<()> {
        let log = self.layout.log("agent");
        let proxy = free_loopback_port()?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--instance")
            .arg(&self.layout.instance)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--bpffs")
            .arg(self.layout.bpffs())
            .arg("--proxy-v4")
            .arg(proxy.to_string())
            .arg("--detach-on-exit")
            .env("KUBECONFIG", &sandbox.kubeconfig);
        let admin = free_loopback_port()?;
        cmd.arg("--admin-listen")
            .arg(admin.to_string())
            .arg("--node-name")
            .arg(SANDBOX_NODE)
            // Well inside STOP_GRACE, so the agent detaches before any SIGKILL.
            .arg("--shutdown-grace")
            .arg("2s");
        if let Some(c) = controller {
            cmd.arg("--controller-url")
                .arg(format!("http://{}", c.api))
                .arg("--agent-token-file")
                .arg(token_file)
                // Sleeping waits for every agent's acknowledgement on its heartbeat.
                .arg("--controller-heartbeat-interval")
                .arg("1s");
        }
        let log_file = open_log(&log)?;
        cmd.stdout(log_file.try_clone()?).stderr(log_file);
        note!("demo: agent starting (log: {})", log.display());
        self.agent = Some(Running {
            name: "agent",
            child: spawn_child(&mut cmd)?,
            log: log.clone(),
        });
        // Ready, and its programs attached: the contract lines promise an intercepted
        // cgroup. (A `/readyz` answer alone was seen before the load had pinned anything,
        // when the machine was busy.)
        let attached = self.layout.pins().join("links/connect4");
        self.wait_ready("agent", &log, || {
            Ok(http_get(admin, "/readyz")?.0 == 200 && attached.exists())
        })?;
        note!("demo: agent ready (admin {admin}, proxy {proxy})");
        Ok(())
    }

    /// Polls `ready` until it says yes, the child exits, a signal comes or time runs out.
    fn wait_ready(
        &mut self,
        name: &'static str,
        log: &Path,
        mut ready: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + COMPONENT_READY_TIMEOUT;
        let mut last_error;
        loop {
            signals::check()?;
            if let Some(why) = self.exited(name) {
                bail!(
                    "the {name} {why} before it was ready; its log: {}",
                    log.display()
                );
            }
            match ready() {
                Ok(true) => return Ok(()),
                Ok(false) => last_error = None,
                Err(e) => last_error = Some(e),
            }
            if Instant::now() > deadline {
                let detail = last_error
                    .map(|e| format!(" (last probe: {e:#})"))
                    .unwrap_or_default();
                bail!(
                    "the {name} was not ready within {COMPONENT_READY_TIMEOUT:?}{detail}; its log: {}",
                    log.display()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn running(&mut self, name: &str) -> Option<&mut Running> {
        [&mut self.sandbox, &mut self.controller, &mut self.agent]
            .into_iter()
            .flatten()
            .find(|r| r.name == name)
    }

    /// How the named child ended, if it has.
    fn exited(&mut self, name: &str) -> Option<String> {
        let r = self.running(name)?;
        match r.child.try_wait() {
            Ok(Some(status)) => Some(format!("exited ({status})")),
            Ok(None) => None,
            Err(e) => Some(format!("could not be waited for ({e})")),
        }
    }

    /// Runs until a signal; says so when a component stops on its own meanwhile.
    fn wait_for_stop(&mut self) -> Result<()> {
        let mut reported = Vec::new();
        loop {
            if let Some(sig) = signals::received() {
                note!("demo: {sig} received");
                return Ok(());
            }
            for name in ["sandbox", "controller", "agent"] {
                if reported.contains(&name) {
                    continue;
                }
                if let Some(why) = self.exited(name) {
                    let log = self
                        .running(name)
                        .map(|r| r.log.clone())
                        .unwrap_or_default();
                    reported.push(name);
                    if name == "sandbox" {
                        bail!("the sandbox {why}; its log: {}", log.display());
                    }
                    note!("demo: the {name} {why}; its log: {}", log.display());
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops everything in reverse order of starting; returns what could not be undone.
    fn teardown(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        for slot in [&mut self.agent, &mut self.controller] {
            if let Some(r) = slot.take() {
                stop(r, STOP_GRACE, &mut left);
            }
        }
        // Installed, the agent and the controller are the sandbox's pods: its shutdown
        // kills them (and every other pod) before their datapath is cleaned up.
        if self.installed
            && let Some(r) = self.sandbox.take()
        {
            stop(r, SANDBOX_STOP_GRACE, &mut left);
        }
        left.extend(self.cleanup_agent_pins());
        if std::mem::take(&mut self.bpffs_mounted)
            && let Err(e) = bpffs::unmount(&self.layout.bpffs())
        {
            left.push(format!("{e:#}"));
        }
        if let Some(cg) = self.cgroup.take()
            && let Err(e) = cgroup::remove(&cg)
        {
            left.push(format!("cgroup {}: {e:#}", cg.display()));
        }
        if let Some(r) = self.sandbox.take() {
            stop(r, SANDBOX_STOP_GRACE, &mut left);
        }
        left
    }

    /// `nemesis-agent cleanup` for this instance: detaches and unpins whatever an agent
    /// of this instance left attached. Returns what is still there afterwards.
    fn cleanup_agent_pins(&self) -> Option<String> {
        let pins = self.layout.pins();
        if !pins.exists() {
            return None;
        }
        let Some(bin) = &self.agent_bin else {
            return Some(format!(
                "{} is left (no agent binary to run `nemesis-agent cleanup` with)",
                pins.display()
            ));
        };
        let mut cmd = Command::new(bin);
        cmd.args(["cleanup", "--instance", &self.layout.instance])
            .arg("--bpffs")
            .arg(self.layout.bpffs());
        let line = describe(&cmd);
        match cmd.output() {
            Ok(out) if out.status.success() => {
                note!("demo: {}", String::from_utf8_lossy(&out.stdout).trim());
            }
            Ok(out) => {
                return Some(format!(
                    "`{line}` failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Err(e) => return Some(format!("`{line}` could not start: {e}")),
        }
        pins.exists()
            .then(|| format!("{} is still there after `{line}`", pins.display()))
    }
}

impl Drop for Demo {
    /// A panic or an early return must not leave processes, pins or the cgroup behind.
    fn drop(&mut self) {
        for l in self.teardown() {
            note!("demo: cleanup: {l}");
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`.
fn stop(mut r: Running, grace: Duration, left: &mut Vec<String>) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if let Ok(Some(_)) = r.child.try_wait() {
        return;
    }
    let pid = Pid::from_raw(r.child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = r.child.try_wait() {
            note!("demo: {} stopped ({status})", r.name);
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = r.child.kill();
    let _ = r.child.wait();
    left.push(format!(
        "the {} did not stop within {grace:?} of SIGTERM and was killed; its log: {}",
        r.name,
        r.log.display()
    ));
}

/// Starts `cmd` in a process group of its own (a Ctrl-C at the terminal reaches only
/// xtask, which stops the children in order) that gets SIGTERM if xtask dies.
fn spawn_child(cmd: &mut Command) -> Result<Child> {
    cmd.stdin(Stdio::null()).process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes the prctl syscall,
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting `{}`", describe(cmd)))
}

fn open_log(path: &Path) -> Result<File> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the log {}", path.display()))
}

/// The first address of `<first>-<last>`.
fn first_of_range(range: &str) -> Option<std::net::Ipv4Addr> {
    range.split('-').next()?.trim().parse().ok()
}

/// A loopback port free right now (the component binds it a moment later).
fn free_loopback_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?)
}

/// `GET path` over HTTP/1.0: the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.set_write_timeout(Some(PROBE_TIMEOUT))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("GET http://{addr}{path}: no HTTP status in the answer"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("/dev/urandom is readable");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a secret readable by root only.
fn write_secret(path: &Path, secret: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = File::options()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(secret.as_bytes())?;
    Ok(())
}

/// The mount point of the first filesystem of type `fstype` in /proc/mounts.
fn mount_of(fstype: &str) -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mount_in(&mounts, fstype).ok_or_else(|| anyhow!("no {fstype} filesystem is mounted"))
}

fn mount_in(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
        // /proc/mounts escapes spaces and friends as octal (`\040`).
        (ty == fstype).then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

// === the demo's bpffs ===

mod bpffs {
    use anyhow::{Context, Result};
    use nix::mount::{MntFlags, MsFlags, mount as sys_mount, umount2};
    use std::path::Path;

    pub fn mount(dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        sys_mount(
            Some("bpf"),
            dir,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting a bpffs at {}", dir.display()))
    }

    /// Unmounts `dir` if a filesystem is mounted there, and removes the directory.
    pub fn unmount(dir: &Path) -> Result<()> {
        let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
        let here = dir.to_string_lossy().replace(' ', "\\040");
        if mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(here.as_str()))
        {
            umount2(dir, MntFlags::empty())
                .with_context(|| format!("unmounting the bpffs at {}", dir.display()))?;
        }
        match std::fs::remove_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", dir.display()))
            }
            _ => Ok(()),
        }
    }
}

// === the demo's cgroup ===

mod cgroup {
    use anyhow::{Context, Result, bail};
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    /// `<cgroup2 mount>/<name>`; never the root itself.
    pub fn path(name: &str) -> Result<PathBuf> {
        Ok(super::mount_of("cgroup2")
            .context("the demo needs cgroup v2")?
            .join(name))
    }

    pub fn create(path: &Path) -> Result<()> {
        std::fs::create_dir(path).with_context(|| format!("creating the cgroup {}", path.display()))
    }

    /// Moves what still runs in it to its parent, then removes it.
    pub fn remove(path: &Path) -> Result<()> {
        let parent = path.parent().context("a cgroup has a parent")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace() {
                // A process may exit meanwhile; what stays is seen on the next round.
                let _ = std::fs::write(parent.join("cgroup.procs"), pid);
            }
            match std::fs::remove_dir(path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "removing {}: {e} (processes: {})",
                        path.display(),
                        procs.trim()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

// === signals ===

/// SIGINT and SIGTERM set a flag that the demo's loops check; nothing else runs in the
/// handler.
mod signals {
    use anyhow::{Result, bail};
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    use std::sync::atomic::{AtomicI32, Ordering};

    static RECEIVED: AtomicI32 = AtomicI32::new(0);

    extern "C" fn on_signal(sig: nix::libc::c_int) {
        RECEIVED.store(sig, Ordering::SeqCst);
    }

    pub fn install() -> Result<()> {
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for sig in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
            unsafe { sigaction(sig, &action) }?;
        }
        Ok(())
    }

    pub fn received() -> Option<&'static str> {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            s if s == Signal::SIGINT as i32 => Some("SIGINT"),
            _ => Some("SIGTERM"),
        }
    }

    /// An error once a signal came, so start-up stops where it is.
    pub fn check() -> Result<()> {
        if let Some(sig) = received() {
            bail!("{sig} received during start-up");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_must_be_usable_as_cgroup_and_pin_names() {
        assert!(check_instance("demo").is_ok());
        assert!(check_instance("demo-test-42").is_ok());
        for bad in ["", "-x", "a/b", "a b", "..", &"x".repeat(41)] {
            assert!(check_instance(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoArgs,
    }

    fn parse(args: &[&str]) -> Result<DemoArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("demo").chain(args.iter().copied())).map(|c| c.demo)
    }

    #[test]
    fn the_install_is_the_default_and_processes_a_flag_that_takes_prebuilt_binaries() {
        let a = parse(&["--instance", "x1"]).unwrap();
        assert!(!a.processes, "installing from images is the default");
        assert_eq!(a.instance, "x1");
        let a = parse(&["--processes", "--prebuilt", "target/debug", "--skip-setup"]).unwrap();
        assert!(a.processes && a.skip_setup);
        assert_eq!(a.prebuilt, Some(PathBuf::from("target/debug")));
        assert!(parse(&["--prebuilt", "d", "--release"]).is_err());
    }

    #[test]
    fn the_first_free_cluster_ip_is_taken_from_the_sandboxs_range() {
        assert_eq!(
            first_of_range("127.96.128.2-127.96.128.62"),
            Some(std::net::Ipv4Addr::new(127, 96, 128, 2))
        );
        assert_eq!(first_of_range("nonsense"), None);
    }

    #[test]
    fn mounts_are_found_by_type_not_by_path() {
        let mounts = "\
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0
bpf /sys/fs/bpf bpf rw 0 0
";
        assert_eq!(
            mount_in(mounts, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_in(mounts, "bpf"), Some(PathBuf::from("/sys/fs/bpf")));
        assert_eq!(mount_in(mounts, "tracefs"), None);
    }

    #[test]
    fn http_get_reads_the_status_and_body() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // TCP is a stream: the request can arrive in several reads (`write!` sends
            // each piece of its format on its own), so read up to the end of the head.
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 512];
            while !head.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "closed before the end of the request head: {head:?}");
                head.extend_from_slice(&buf[..n]);
            }
            assert!(String::from_utf8_lossy(&head).starts_with("GET /readyz HTTP/1.0\r\n"));
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 8\r\n\r\nwaiting\n")
                .unwrap();
        });
        let (status, body) = http_get(addr, "/readyz").unwrap();
        server.join().unwrap();
        assert_eq!(status, 503);
        assert_eq!(body, "waiting\n");
    }
}
