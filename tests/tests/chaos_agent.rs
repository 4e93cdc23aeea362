//! Chaos: the agent as a process of its own (`nemesis-test-agent`, the agent's `run`)
//! SIGKILLed while a client connects to a Service at zero every 30 ms. Its programs stay
//! attached and its maps pinned: connects go on being counted and redirected to the
//! proxy port; while no agent listens there they are refused, and those are counted and
//! reported. The agent started again re-adopts the maps (one row, counters going on).
//! Then the same with a standby agent on the same port (SO_REUSEPORT, the hand-over of
//! `wake_handover`): the kill leaves the standby to accept, and no connect is refused.
//! Extends `wake_restart` (a graceful stop) to a kill. `NEMESIS_CHAOS_SEED` repeats the
//! kill moments.

mod wake_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use nemesis_agent::ebpf::Mode;
use nemesis_agent::ebpf::pins::{self, PinLayout};
use nemesis_common::maps::{PINNED_MAPS, UDP_PINNED_MAPS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::time::Instant;
use wake_support::{ClientResult, Metrics, Scenario, WakeEnv, eventually, http_get, slow_server};

const AGENT: &str = env!("CARGO_BIN_EXE_nemesis-test-agent");
const STEP: Duration = Duration::from_secs(60);

/// An agent process; killed (SIGKILL) and reaped when dropped.
struct AgentProcess {
    admin: SocketAddr,
    child: tokio::process::Child,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn spawn_agent(
    env: &WakeEnv,
    kubeconfig: &Path,
    proxy_port: u16,
    log: &Path,
) -> anyhow::Result<AgentProcess> {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut argv = env.agent_command_line(&[
        ("--proxy-v4", format!("127.0.0.1:{proxy_port}")),
        ("--admin-listen", admin.to_string()),
    ]);
    argv.remove(0);
    // A killed agent leaves its datapath attached; the last one standing detaches it
    // when the test ends (the WakeEnv's cleanup removes the cgroup and bpffs).
    argv.retain(|a| a != "--detach-on-exit");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let child = tokio::process::Command::new(AGENT)
        .args(&argv)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "nemesis_agent=info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("spawning nemesis-test-agent")?;
    let mut p = AgentProcess { admin, child };
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(status) = p.child.try_wait()? {
            anyhow::bail!("the agent process exited: {status}");
        }
        if let Ok((200, _)) = http_get(admin, "/readyz").await {
            return Ok(p);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agent process was not ready within {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl AgentProcess {
    async fn kill(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    async fn metrics(&self) -> anyhow::Result<Metrics> {
        let (status, text) = http_get(self.admin, "/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(Metrics::parse(&text))
    }
}

/// The datapath as the kernel has it, read with `bpftool` as an operator would: each
/// pinned link's id and the program it runs, each pinned map's id, and every program
/// attached to the cgroup by attach type.
#[derive(Debug, Clone, PartialEq)]
struct KernelDatapath {
    links: BTreeMap<String, (u64, u64)>,
    maps: BTreeMap<String, u64>,
    attached: BTreeMap<String, Vec<u64>>,
}

impl KernelDatapath {
    /// From the agent's own command line (its `--instance`, `--cgroup` and `--bpffs`).
    fn read(argv: &[String]) -> anyhow::Result<Self> {
        let flag = |name: &str| -> anyhow::Result<&str> {
            argv.iter()
                .position(|a| a == name)
                .and_then(|i| argv.get(i + 1))
                .map(String::as_str)
                .with_context(|| format!("no {name} in the agent's command line {argv:?}"))
        };
        let layout = PinLayout::new(Path::new(flag("--bpffs")?), flag("--instance")?);
        let mut links = BTreeMap::new();
        for prog in pins::PROGRAMS.iter().chain(pins::UDP_PROGRAMS.iter()) {
            let v = bpftool(&[
                "link",
                "show",
                "pinned",
                &layout.link(prog).display().to_string(),
            ])?;
            let id = |k: &str| {
                v[k].as_u64()
                    .with_context(|| format!("link {prog}: no {k} in {v}"))
            };
            links.insert(prog.to_string(), (id("id")?, id("prog_id")?));
        }
        let mut maps = BTreeMap::new();
        for name in PINNED_MAPS.iter().chain(UDP_PINNED_MAPS.iter()) {
            let v = bpftool(&[
                "map",
                "show",
                "pinned",
                &layout.map(name).display().to_string(),
            ])?;
            let id = v["id"]
                .as_u64()
                .with_context(|| format!("map {name}: no id in {v}"))?;
            maps.insert(name.to_string(), id);
        }
        let mut attached: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let cg = bpftool(&["cgroup", "show", flag("--cgroup")?])?;
        for p in cg.as_array().context("bpftool cgroup show: not a list")? {
            let t = p["attach_type"].as_str().unwrap_or_default().to_string();
            let id = p["id"]
                .as_u64()
                .with_context(|| format!("an attached program without an id: {p}"))?;
            attached.entry(t).or_default().push(id);
        }
        Ok(Self {
            links,
            maps,
            attached,
        })
    }

    /// One program per hook on the cgroup, each the one its pinned link runs: nothing
    /// attached twice, nothing left behind by a killed agent.
    fn one_program_per_hook(&self) -> anyhow::Result<()> {
        let mut running: Vec<u64> = self.links.values().map(|(_, prog)| *prog).collect();
        running.sort_unstable();
        let mut attached: Vec<u64> = self.attached.values().flatten().copied().collect();
        attached.sort_unstable();
        anyhow::ensure!(
            self.attached.values().all(|ids| ids.len() == 1) && running == attached,
            "the cgroup runs {:?}, the pinned links {:?}",
            self.attached,
            self.links
        );
        Ok(())
    }

    /// `later` re-adopted this datapath: the same links and maps (kernel ids), with the
    /// later agent's programs swapped into the links.
    fn adopted_by(&self, later: &Self, who: &str) -> anyhow::Result<()> {
        let ids = |d: &Self| -> BTreeMap<String, u64> {
            d.links
                .iter()
                .map(|(k, (id, _))| (k.clone(), *id))
                .collect()
        };
        anyhow::ensure!(
            ids(self) == ids(later),
            "{who} did not keep the pinned links: {:?} then {:?}",
            self.links,
            later.links
        );
        anyhow::ensure!(
            self.maps == later.maps,
            "{who} did not keep the pinned maps: {:?} then {:?}",
            self.maps,
            later.maps
        );
        anyhow::ensure!(
            self.links
                .values()
                .zip(later.links.values())
                .all(|(a, b)| a.1 != b.1),
            "{who} did not swap its own programs into the links: {:?} then {:?}",
            self.links,
            later.links
        );
        later.one_program_per_hook()
    }
}

fn bpftool(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool (cargo xtask setup installs it)")?;
    anyhow::ensure!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool {args:?}: not JSON"))
}

fn refused(r: &ClientResult) -> bool {
    r.result == "error" && r.error_kind == "ConnectionRefused"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_agent_leaves_its_programs_counting_and_a_standby_leaves_no_connect_refused()
-> anyhow::Result<()> {
    let seed = nemesis_tests::chaos::seed("chaos_agent");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut env = WakeEnv::start(Scenario {
        name: "chaosagt",
        pod: slow_server(),
        // Held connections get the proxy's answer soon: the Service stays at zero (the
        // stand-in controller never scales), so every connect is redirected and held.
        policy: json!({"holdTimeoutSeconds": 2}),
        scale_on_wake: false,
    })
    .await?;
    env.wait_mode(Mode::Hold).await?;
    let port = env.agent().proxy_v4().port();
    let kubeconfig = env
        .server
        .as_ref()
        .context("the API server")?
        .kubeconfig_path()
        .to_path_buf();
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("agents.log");
    let connects_at_start = env.metrics().await?.ebpf_connects();
    // The in-process agent hands its datapath over to agent processes on its port.
    env.stop_agent_keeping_datapath().await?;
    let a = spawn_agent(&env, &kubeconfig, port, &log).await?;
    let argv = env.agent_command_line(&[]);
    let first = KernelDatapath::read(&argv)?;
    first.one_program_per_hook()?;

    let clients = env
        .repeating_clients(&[
            "--http",
            "--every-ms",
            "30",
            "--max-connections",
            "2000",
            "--for-ms",
            "120000",
            "--timeout-ms",
            "20000",
        ])
        .await?;
    let go = Instant::now();
    let ms = |t: Instant| t.duration_since(go).as_millis() as u64;

    // 1. No standby: SIGKILL, dead for a moment, started again.
    tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
    let killed = Instant::now();
    a.kill().await?;
    tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
    let a2 = spawn_agent(&env, &kubeconfig, port, &log).await?;
    let back = Instant::now();
    // The agent's metrics lag its counters by up to half a second.
    eventually("the re-adopted counters going on", STEP, || async {
        let m = a2.metrics().await?;
        Ok((m.ebpf_connects() > connects_at_start).then_some(()))
    })
    .await?;
    // And it is the same datapath, not a new one beside the old: the kernel's ids.
    let second = KernelDatapath::read(&argv)?;
    first.adopted_by(&second, "the agent started again after the SIGKILL")?;
    println!(
        "re-adopted after the SIGKILL: links {:?}, maps {:?}",
        second.links, second.maps
    );

    // 2. A standby on the same port, then SIGKILL the active one.
    tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
    let b = spawn_agent(&env, &kubeconfig, port, &log).await?;
    tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
    let killed_with_standby = Instant::now();
    a2.kill().await?;
    // The standby has the datapath (and so its counters) once it took over.
    eventually("the standby to take over", STEP, || async {
        let m = b.metrics().await?;
        Ok((m.ebpf_connects() > 0.0).then_some(()))
    })
    .await?;
    second.adopted_by(&KernelDatapath::read(&argv)?, "the standby")?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let results = clients.stop(STEP).await?;
    let total = results.len() as f64;
    let counted = eventually("every connect counted", Duration::from_secs(10), || async {
        let m = b.metrics().await?;
        Ok((m.ebpf_connects() - connects_at_start >= total).then_some(m))
    })
    .await;
    let m = match counted {
        Ok(m) => m,
        // The check below says what is missing.
        Err(_) => b.metrics().await?,
    };

    let in_window = |r: &ClientResult, from: Instant, to: Option<Instant>| {
        r.started_ms >= ms(from) && to.is_none_or(|t| r.started_ms < ms(t))
    };
    let refused_no_standby = results
        .iter()
        .filter(|r| refused(r) && in_window(r, killed, Some(back)))
        .count();
    let refused_with_standby = results
        .iter()
        .filter(|r| refused(r) && in_window(r, killed_with_standby, None))
        .count();
    let refused_elsewhere = results
        .iter()
        .filter(|r| {
            refused(r)
                && !in_window(r, killed, Some(back))
                && !in_window(r, killed_with_standby, None)
        })
        .count();
    let other_errors: Vec<&ClientResult> = results
        .iter()
        .filter(|r| r.result != "response" && !refused(r))
        .collect();
    println!(
        "seed {seed}: {} connects; no agent for {} ms: {refused_no_standby} refused; \
         killed with a standby: {refused_with_standby} refused; other errors {} \
         (connections the killed agent held)",
        results.len(),
        back.duration_since(killed).as_millis(),
        other_errors.len(),
    );
    println!("agent_sigkill_refused_connections_no_standby={refused_no_standby}");
    println!("agent_sigkill_refused_connections_with_standby={refused_with_standby}");
    anyhow::ensure!(
        refused_elsewhere == 0,
        "{refused_elsewhere} connects refused while an agent listened"
    );
    anyhow::ensure!(
        refused_with_standby == 0,
        "{refused_with_standby} connects refused though a standby listened"
    );
    // The pinned programs counted every connect, through both kills, and redirected
    // them: every one reached a proxy or was refused at the proxy port.
    anyhow::ensure!(
        m.ebpf_connects() - connects_at_start >= results.len() as f64,
        "the programs counted {} of {} connects",
        m.ebpf_connects() - connects_at_start,
        results.len()
    );
    b.kill().await?;
    // The WakeEnv's own agent runs again to detach and clean up as usual.
    env.start_agent_again().await?;
    env.shutdown().await
}
