//! Chaos: two controller processes (`nemesis-test-controller`, the controller's `run`)
//! elected on a Lease, the real agent reaching the leader through a forwarder that
//! follows the Lease (as a Service on the leader label would), a client connecting to
//! the Service every 100 ms throughout. Each round sleeps the Service (an Alertmanager
//! alert, as `sleep_through`) and wakes it again (the held clients), and SIGKILLs the
//! leader at a random moment of that cycle; the killed replica comes back as a standby.
//! No client is lost, the Deployment never stays at zero while a client is held for
//! longer than a failover, the agent's next wake-up and a tick allow
//! ([`Budgets::held_at_zero`]), every scale is made once and recorded once, and the
//! failover time (kill to the new leader's first scale) is reported as
//! `failover_ms_p99`, against a goal derived from the Lease settings
//! ([`Budgets::failover_p99_goal`], asserted by the 50-round benchmark).
//! `NEMESIS_CHAOS_SEED` repeats a run; `NEMESIS_CHAOS_ROUNDS` sets the rounds of the
//! default test (10, to stay within CI's budget); the ignored benchmark
//! (`cargo xtask bench`) runs the 50 rounds of the acceptance.

mod wake_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use nemesis_common::stats::percentile;
use nemesis_controller::store::{DEFAULT_RETENTION, PolicyId, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use wake_support::{
    ALERT_TOKEN, APP, NS, Options, POD_PORT, SERVER, Scenario, WakeEnv, eventually, post_alert_to,
};

const CONTROLLER: &str = env!("CARGO_BIN_EXE_nemesis-test-controller");
const ALERT: &str = "NemesisChaosLeaderSleep";
/// The Lease the test controllers elect on (`--lease-namespace default`, the test
/// default, and the controller's Lease name).
const LEASE_NS: &str = "default";
const LEASE_NAME: &str = "nemesis-controller";
/// One step of a round: a take-over (3 s lease) plus a wake on a loaded machine.
const STEP: Duration = Duration::from_secs(60);
/// A sleep, the kill included: a failover, an agent lease before the new leader may
/// believe a hold acknowledged, and ticks, with room for a loaded machine. Below
/// [`DEMAND_WINDOW`](nemesis_controller::engine::observations::DEMAND_WINDOW) on purpose:
/// after a kill at zero the agent's wake-up, retried through the failover, may reach the
/// new leader just after it woke the target (on the held connections its heartbeat
/// reported). Counted as demand, it held the next sleep off for the whole window (seen
/// once in 7 kills at zero); the wake-up now says which directive its flight began under,
/// and a leader that woke the target since does not count it (`reconcile::late_wake`).
/// A run where that regresses fails here.
const SLEEP_STEP: Duration = Duration::from_secs(40);
const _: () = assert!(
    SLEEP_STEP.as_secs()
        < nemesis_controller::engine::observations::DEMAND_WINDOW.num_seconds() as u64
);
/// The kill falls this far at most into a round's cycle (which takes 1 to 3 s here).
const KILL_WITHIN: Duration = Duration::from_millis(2000);
/// From taking the Lease to acting: a new term starts from warm caches (the standby
/// watched them) and lists the target once; 2 s leaves room for that on the loaded
/// 2-core machine. A budget, not a measurement.
const TERM_START: Duration = Duration::from_secs(2);

/// What the test's bounds are made of, from the settings every replica runs with.
#[derive(Debug, Clone, Copy)]
struct Budgets {
    /// Kill to a new leader acting: the Lease runs out (`--lease-duration`), the
    /// standby's next attempt (one `--retry-period`), the term's start ([`TERM_START`]).
    failover: Duration,
    /// The longest the Deployment may stay at zero while a client is held: a failover,
    /// then the agent's next wake-up (its retries back off up to its `wake_backoff`
    /// ceiling while no leader answers), then the policy's next tick
    /// (`--tick-interval`). Without a kill it is a tick or two.
    held_at_zero: Duration,
    /// The goal for `failover_ms_p99`: a failover, then the new leader's first scale,
    /// whichever the kill left to do: a scale to zero waits one agent lease
    /// (`--agent-lease`: agents must report to the new leader before it may believe a
    /// hold acknowledged) and one tick for the acknowledgement; a wake waits for the
    /// agent's next wake-up and a tick, as in `held_at_zero`.
    failover_p99_goal: Duration,
}

impl Budgets {
    fn from_settings() -> anyhow::Result<Self> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: nemesis_controller::config::RunArgs,
        }
        let args = nemesis_tests::controller_flags::argv_with_defaults(&[] as &[&str]);
        let run = <Cli as clap::Parser>::try_parse_from(args)
            .context("parsing the test controllers' flags")?
            .run;
        let wake_retry = nemesis_agent::proxy::ProxyConfig::new("chaos")
            .wake_backoff
            .max;
        let failover = run.lease_duration + run.retry_period + TERM_START;
        let wake = wake_retry + run.tick_interval;
        let sleep = run.agent_lease + run.tick_interval;
        Ok(Self {
            failover,
            held_at_zero: failover + wake,
            failover_p99_goal: failover + wake.max(sleep),
        })
    }
}

/// Ready as soon as it listens (probed every 100 ms) and draining after SIGTERM as a
/// well-behaved app does (see `sleep_through`).
fn quick_server() -> Value {
    json!({
        "annotations": {"nemesis.test/probe-period-ms": "100"},
        "container": {
            "name": "server",
            "image": "local/nemesis-pod-server",
            "command": [SERVER],
            "args": ["--port", POD_PORT.to_string(), "--ignore-sigterm"],
            "ports": [{"name": "http", "containerPort": POD_PORT}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        }
    })
}

fn policy() -> Value {
    json!({
        "target": {"deployment": APP, "service": APP},
        "metrics": {"alerts": [ALERT]},
        "initialState": "zero",
        "states": [{"name": "zero", "replicas": 0}, {"name": "warm", "replicas": 1}],
        "transitions": [
            {"from": "zero", "to": "warm", "when": "demand"},
            {"from": "warm", "to": "zero", "when": format!("alert({ALERT})")},
        ],
        "holdTimeoutSeconds": 60,
    })
}

// === controller processes ===

/// One controller process; its slot keeps its store across restarts.
struct Replica {
    identity: String,
    api: SocketAddr,
    child: tokio::process::Child,
}

async fn spawn_replica(
    kubeconfig: &Path,
    slot_dir: &Path,
    identity: &str,
) -> anyhow::Result<Replica> {
    std::fs::create_dir_all(slot_dir)?;
    let alert_token = slot_dir.join("alert-token");
    std::fs::write(&alert_token, ALERT_TOKEN)?;
    let mut args = nemesis_tests::controller_flags::argv_with_defaults(&[] as &[&str]);
    args.remove(0);
    for (flag, value) in [
        (
            "--alertmanager-token-file",
            alert_token.display().to_string(),
        ),
        (
            "--store-path",
            slot_dir.join("history.redb").display().to_string(),
        ),
        ("--identity", identity.to_string()),
    ] {
        args.extend([flag.to_string(), value]);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(slot_dir.join("controller.log"))?;
    let mut child = tokio::process::Command::new(CONTROLLER)
        .args(&args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "nemesis_controller=info")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("spawning nemesis-test-controller")?;
    let stdout = child.stdout.take().context("the controller's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(STEP, lines.next_line())
        .await
        .with_context(|| format!("{identity} did not start within {STEP:?}"))??
        .with_context(|| format!("{identity} exited before it started"))?;
    let api = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("api="))
        .with_context(|| format!("no api= in {line:?}"))?
        .parse()?;
    Ok(Replica {
        identity: identity.to_string(),
        api,
        child,
    })
}

// === the Service in front of the leader ===

/// Forwards each connection to the current leader's API (none: the connection is
/// dropped, as a Service without ready endpoints).
struct Forwarder {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl Forwarder {
    async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let t = target.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let Some(to) = *t.lock().unwrap() else {
                    continue;
                };
                tokio::spawn(async move {
                    let connect = TcpStream::connect(to);
                    if let Ok(Ok(mut up)) =
                        tokio::time::timeout(Duration::from_secs(2), connect).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            target,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        })
    }
}

// === what happened ===

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Replicas(i32),
    Kill(String),
    Leader(String),
}

type Journal = Arc<Mutex<Vec<(Instant, Step)>>>;

fn note(j: &Journal, s: Step) {
    j.lock().unwrap().push((Instant::now(), s));
}

fn watch_replicas(api: Api<Deployment>, j: Journal) -> tokio_util::task::AbortOnDropHandle<()> {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={APP}"));
    let task = tokio::spawn(async move {
        let stream = watcher::watcher(api, cfg).default_backoff();
        futures::pin_mut!(stream);
        let mut last = None;
        while let Some(ev) = stream.next().await {
            let (Ok(Event::Apply(d)) | Ok(Event::InitApply(d))) = ev else {
                continue;
            };
            let r = d.spec.replicas.unwrap_or(1);
            if last != Some(r) {
                last = Some(r);
                note(&j, Step::Replicas(r));
            }
        }
    });
    tokio_util::task::AbortOnDropHandle::new(task)
}

// === the world ===

struct World {
    /// The admin's client (no faults here; it reads the Lease).
    client: kube::Client,
    kubeconfig: PathBuf,
    dir: PathBuf,
    replicas: Mutex<BTreeMap<char, Replica>>,
    restarts: Mutex<u32>,
    forwarder: Forwarder,
    journal: Journal,
    /// The alert as Alertmanager holds it; re-sent to every new leader (as its
    /// repeat_interval would).
    firing: Mutex<bool>,
    /// The leader has not been told the alert's state yet.
    alert_unsent: Mutex<bool>,
    leader: Mutex<Option<String>>,
}

impl World {
    fn slot_dir(&self, slot: char) -> PathBuf {
        self.dir.join(format!("replica-{slot}"))
    }

    async fn spawn(&self, slot: char) -> anyhow::Result<()> {
        let n = {
            let mut r = self.restarts.lock().unwrap();
            *r += 1;
            *r
        };
        let identity = format!("ctl-{slot}-{n}");
        let r = spawn_replica(&self.kubeconfig, &self.slot_dir(slot), &identity).await?;
        self.replicas.lock().unwrap().insert(slot, r);
        Ok(())
    }

    /// Follows the Lease: points the forwarder at the holder (a live replica) and, when
    /// the leader changed, notes it and marks the alert to be told again.
    async fn follow_leader(&self) -> anyhow::Result<()> {
        let lease = Api::<Lease>::namespaced(self.client.clone(), LEASE_NS)
            .get_opt(LEASE_NAME)
            .await?;
        let holder = lease
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty());
        let api = holder.as_ref().and_then(|h| {
            self.replicas
                .lock()
                .unwrap()
                .values()
                .find(|r| &r.identity == h)
                .map(|r| r.api)
        });
        *self.forwarder.target.lock().unwrap() = api;
        let mut l = self.leader.lock().unwrap();
        if api.is_some() && *l != holder {
            l.clone_from(&holder);
            if let Some(h) = holder {
                note(&self.journal, Step::Leader(h));
            }
            *self.alert_unsent.lock().unwrap() = true;
        }
        Ok(())
    }

    /// Posts the alert's state to the leader if it has not had it yet; whether it has.
    async fn tell_alert(&self) -> bool {
        if !*self.alert_unsent.lock().unwrap() {
            return true;
        }
        let firing = *self.firing.lock().unwrap();
        let told = post_alert_to(self.forwarder.addr, ALERT, firing)
            .await
            .is_ok();
        if told {
            *self.alert_unsent.lock().unwrap() = false;
        }
        told
    }

    async fn set_alert(&self, firing: bool) -> anyhow::Result<()> {
        *self.firing.lock().unwrap() = firing;
        *self.alert_unsent.lock().unwrap() = true;
        eventually("the alert posted to the leader", STEP, || async {
            self.follow_leader().await?;
            Ok(self.tell_alert().await.then_some(()))
        })
        .await
    }

    fn replicas_now(&self) -> Option<i32> {
        self.journal
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|(_, s)| match s {
                Step::Replicas(r) => Some(*r),
                _ => None,
            })
    }

    /// Where the journal ends now: [`World::reached_since`] looks after it.
    fn journal_mark(&self) -> usize {
        self.journal.lock().unwrap().len()
    }

    /// Whether the Deployment went to `want` after `mark`, however briefly: a stretch
    /// at zero with clients waiting lasts some 50 ms, and a poll of the latest count
    /// missed it on a loaded machine (the kill then waited for a zero that had passed).
    fn reached_since(&self, mark: usize, want: i32) -> bool {
        self.journal.lock().unwrap()[mark..]
            .iter()
            .any(|(_, s)| *s == Step::Replicas(want))
    }

    async fn wait_replicas(&self, want: i32) -> anyhow::Result<()> {
        self.wait_replicas_within(want, STEP).await
    }

    async fn wait_replicas_within(&self, want: i32, within: Duration) -> anyhow::Result<()> {
        eventually(&format!("the Deployment at {want}"), within, || async {
            self.follow_leader().await?;
            self.tell_alert().await;
            Ok((self.replicas_now() == Some(want)).then_some(()))
        })
        .await
    }

    /// As [`World::wait_replicas_within`], for a count reached after `mark` even if
    /// already left (see [`World::reached_since`]).
    async fn wait_reached_within(
        &self,
        mark: usize,
        want: i32,
        within: Duration,
    ) -> anyhow::Result<()> {
        eventually(&format!("the Deployment at {want}"), within, || async {
            self.follow_leader().await?;
            self.tell_alert().await;
            Ok(self.reached_since(mark, want).then_some(()))
        })
        .await
    }

    /// SIGKILLs the leader (as the Lease names it) and starts its slot again.
    async fn kill_leader(&self) -> anyhow::Result<()> {
        let holder = self.leader.lock().unwrap().clone();
        let slot = {
            let reps = self.replicas.lock().unwrap();
            reps.iter()
                .find(|(_, r)| Some(&r.identity) == holder.as_ref())
                .map(|(s, _)| *s)
        };
        let Some(slot) = slot else {
            bail!("no live replica leads (the Lease names {holder:?})");
        };
        let mut r = self
            .replicas
            .lock()
            .unwrap()
            .remove(&slot)
            .context("the slot")?;
        r.child.start_kill()?;
        note(&self.journal, Step::Kill(r.identity.clone()));
        *self.forwarder.target.lock().unwrap() = None;
        r.child.wait().await?;
        self.spawn(slot).await
    }
}

fn rounds_from_env(default: usize) -> anyhow::Result<usize> {
    match std::env::var("NEMESIS_CHAOS_ROUNDS") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("NEMESIS_CHAOS_ROUNDS={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// Whether `failover_ms_p99` must meet [`Budgets::failover_p99_goal`] (the benchmark's
/// 50 rounds: a p99 of 10 kills is their maximum, reported but not held to it).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Goal {
    Assert,
    Report,
}

async fn leader_chaos(rounds: usize, goal: Goal) -> anyhow::Result<()> {
    let seed = nemesis_tests::chaos::seed("chaos_leader");
    let budgets = Budgets::from_settings()?;
    println!("budgets: {budgets:?}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut env = WakeEnv::start_with(
        Scenario {
            name: "chaoslead",
            pod: quick_server(),
            policy: json!({}),
            scale_on_wake: false,
        },
        Options {
            policy_spec: Some(policy()),
            ..Options::default()
        },
    )
    .await?;
    nemesis_tests::crds::install_alert_rule_crd(&env.client).await?;
    let server = env.server.as_ref().context("the API server")?;
    let dir = tempfile::tempdir()?;
    let journal: Journal = Arc::default();
    let world = World {
        client: env.client.clone(),
        kubeconfig: server.kubeconfig_path().to_path_buf(),
        dir: dir.path().to_path_buf(),
        replicas: Mutex::default(),
        restarts: Mutex::new(0),
        forwarder: Forwarder::start().await?,
        journal: journal.clone(),
        firing: Mutex::new(false),
        alert_unsent: Mutex::new(false),
        leader: Mutex::default(),
    };
    let result = run_rounds(&world, &mut env, &mut rng, rounds, seed).await;
    // Stop the replicas in order (their history writers commit), whatever happened.
    let reps: Vec<Replica> = std::mem::take(&mut *world.replicas.lock().unwrap())
        .into_values()
        .collect();
    for mut r in reps {
        if let Some(pid) = r.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), r.child.wait()).await;
    }
    if let Err(e) = result {
        for slot in ['a', 'b'] {
            let log = std::fs::read_to_string(world.slot_dir(slot).join("controller.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- replica {slot}, last lines ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        return Err(e.context(format!("seed {seed}")));
    }
    let (clients, failovers, go_at) = result?;
    // The failover figure is measured whether or not the checks below pass.
    let mut ms: Vec<u128> = failovers.iter().map(|d| d.as_millis()).collect();
    ms.sort_unstable();
    let p99 = percentile(&ms, 99.0).unwrap_or(0);
    println!(
        "seed {seed}: failover ms p50 {} max {} over {} kills: {ms:?}",
        percentile(&ms, 50.0).unwrap_or(0),
        ms.last().copied().unwrap_or(0),
        ms.len()
    );
    println!("failover_ms_p99={p99}");
    println!(
        "failover_ms_p99_goal={} (a failover of {} ms: lease + one retry period + term \
         start; then the longer of an agent lease and a wake-up retry, + a tick)",
        budgets.failover_p99_goal.as_millis(),
        budgets.failover.as_millis()
    );

    // No Deployment left at zero while a client is held, past the bound.
    let journal_now = journal.lock().unwrap().clone();
    let stretches = held_at_zero(&journal_now, &clients, go_at);
    let worst = stretches.iter().map(|(d, _)| *d).max().unwrap_or_default();
    let over: Vec<_> = stretches
        .iter()
        .filter(|(d, _)| *d > budgets.held_at_zero)
        .collect();
    println!(
        "seed {seed}: held at zero: {} stretches, longest {} ms (bound {} ms), with a kill: {:?} ms",
        stretches.len(),
        worst.as_millis(),
        budgets.held_at_zero.as_millis(),
        stretches
            .iter()
            .filter(|(_, k)| *k)
            .map(|(d, _)| d.as_millis())
            .collect::<Vec<_>>()
    );
    println!("held_at_zero_ms_max={}", worst.as_millis());
    anyhow::ensure!(
        over.is_empty(),
        "seed {seed}: the Deployment stayed at zero while clients were held longer than {:?}: {over:?}",
        budgets.held_at_zero
    );
    anyhow::ensure!(
        stretches.len() >= rounds,
        "seed {seed}: {} stretches at zero with a held client in {rounds} rounds: the check saw too few",
        stretches.len()
    );

    // No client lost: every connection of the run was answered by the app.
    let lost: Vec<_> = clients
        .iter()
        .filter(|c| c.http().map(|h| h.status).ok() != Some(200))
        .collect();
    anyhow::ensure!(
        lost.is_empty(),
        "seed {seed}: {} of {} connections not served: {:?}",
        lost.len(),
        clients.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );

    // Every scale once, in the history once. The union of the replicas' stores: each
    // replica records what it scaled while it led, and standbys copy the leader's
    // records, so a record may be in both (the same record: deduplicated). The final
    // leader alone may lack what a killed leader wrote after its standby's last pull
    // (at most one pull period); the killed replica's volume still holds it. A leader
    // killed between its scale and the record's commit leaves the change to the next
    // leader, which records it as recovered when its term starts; if the killed one did
    // commit, `merge` keeps the original only.
    let changes: Vec<i32> = journal
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, s)| match s {
            Step::Replicas(r) => Some(*r),
            _ => None,
        })
        .skip(1)
        .collect();
    let mut stores = Vec::new();
    for slot in ['a', 'b'] {
        let path = world.slot_dir(slot).join("history.redb");
        let store = Store::open(&path, DEFAULT_RETENTION)
            .with_context(|| format!("opening {}", path.display()))?;
        stores.push(store.scale_events(&PolicyId::new(NS, APP), 0..u64::MAX)?);
    }
    let records = nemesis_controller::store::scales::merge(stores);
    let recovered = records.iter().filter(|r| r.recovered).count();
    let recorded: Vec<i32> = records.iter().map(|r| r.to_replicas).collect();
    anyhow::ensure!(
        recorded == changes,
        "seed {seed}: the Deployment changed {changes:?} but the replicas' histories hold {recorded:?}"
    );

    println!(
        "seed {seed}: {rounds} rounds, {} connections served, {} scales ({recovered} recorded by the next leader)",
        clients.len(),
        changes.len(),
    );
    if goal == Goal::Assert {
        anyhow::ensure!(
            p99 <= budgets.failover_p99_goal.as_millis(),
            "seed {seed}: failover_ms_p99 {p99} above its goal {:?}",
            budgets.failover_p99_goal
        );
    }
    env.shutdown().await
}

async fn run_rounds(
    world: &World,
    env: &mut WakeEnv,
    rng: &mut StdRng,
    rounds: usize,
    seed: u64,
) -> anyhow::Result<(Vec<wake_support::ClientResult>, Vec<Duration>, Instant)> {
    let _watch = watch_replicas(
        Api::namespaced(env.client.clone(), NS),
        world.journal.clone(),
    );
    world.spawn('a').await?;
    eventually("a first leader", STEP, || async {
        world.follow_leader().await?;
        Ok(world.leader.lock().unwrap().clone())
    })
    .await?;
    world.spawn('b').await?;
    // The agent reaches the controller through the forwarder from now on (a restart
    // keeps its datapath).
    // The real controllers review the agent's own token (bound to a pod of its node),
    // as in a cluster: no shared token.
    let node = env
        .sandbox
        .as_ref()
        .context("the sandbox")?
        .node_name()
        .to_owned();
    let agent_token = world.dir.join("agent-token");
    std::fs::write(
        &agent_token,
        nemesis_tests::agent_token::mint_agent_token(&env.client, &node).await?,
    )?;
    env.restart_agent_with(&[
        (
            "--controller-url",
            format!("http://{}", world.forwarder.addr),
        ),
        ("--agent-token-file", agent_token.display().to_string()),
    ])
    .await?;
    world.wait_replicas(0).await?;
    let policies: Api<nemesis_controller::policy::ScalingPolicy> =
        Api::namespaced(env.client.clone(), NS);
    eventually("the leader to run the policy", STEP, || async {
        let p = policies.get(APP).await?;
        Ok((p.status.and_then(|s| s.state).as_deref() == Some("zero")).then_some(()))
    })
    .await?;
    env.wait_mode(nemesis_agent::ebpf::Mode::Hold).await?;

    let go_at = Instant::now();
    let clients = env
        .repeating_clients(&[
            "--http",
            "--every-ms",
            "100",
            "--max-connections",
            "50000",
            "--for-ms",
            "3600000",
            "--timeout-ms",
            "90000",
        ])
        .await?;
    // The first clients wake it.
    world.wait_replicas(1).await?;

    for round in 0..rounds {
        let kill_after = Duration::from_millis(rng.random_range(0..KILL_WITHIN.as_millis() as u64));
        // Every other round, on average, the kill falls as the Deployment reaches zero:
        // the clients held there wait through the failover, which is what
        // `Budgets::held_at_zero` bounds (a stretch at zero lasts some 50 ms otherwise,
        // and a kill at a random moment almost never falls in one).
        let at_zero = rng.random_bool(0.5);
        if at_zero {
            println!("round {round}: kill the leader once the Deployment is at zero (seed {seed})");
        } else {
            println!("round {round}: kill the leader {kill_after:?} into the cycle (seed {seed})");
        }
        let mark = world.journal_mark();
        let killer = async {
            if at_zero {
                // As long as the cycle waits for it: see `SLEEP_STEP`.
                eventually("the Deployment at zero, to kill", SLEEP_STEP, || async {
                    Ok(world.reached_since(mark, 0).then_some(()))
                })
                .await?;
            } else {
                tokio::time::sleep(kill_after).await;
            }
            world.kill_leader().await
        };
        let cycle = async {
            world.set_alert(true).await?;
            world.wait_reached_within(mark, 0, SLEEP_STEP).await?;
            world.set_alert(false).await?;
            // Held clients wake it: it must not stay at zero while they wait.
            world.wait_replicas(1).await
        };
        let (k, c) = tokio::join!(killer, cycle);
        k.with_context(|| format!("round {round}: killing the leader"))?;
        c.with_context(|| format!("round {round}: the cycle"))?;
        // A scale by the new leader before the next round: the failover is measured to it.
        eventually("a leader after the kill", STEP, || async {
            world.follow_leader().await?;
            let leader = world.leader.lock().unwrap().clone();
            let alive = world
                .replicas
                .lock()
                .unwrap()
                .values()
                .any(|r| Some(&r.identity) == leader.as_ref());
            Ok(alive.then_some(()))
        })
        .await?;
    }
    // One more cycle, so the last kill is followed by a scale of the new leader.
    let mark = world.journal_mark();
    world.set_alert(true).await?;
    world.wait_reached_within(mark, 0, SLEEP_STEP).await?;
    world.set_alert(false).await?;
    world.wait_replicas(1).await?;
    let results = clients.stop(STEP).await?;

    let journal = world.journal.lock().unwrap().clone();
    let mut failovers = Vec::new();
    for (i, (at, s)) in journal.iter().enumerate() {
        if let Step::Kill(_) = s {
            let next = journal[i..]
                .iter()
                .find(|(_, s)| matches!(s, Step::Replicas(_)))
                .map(|(t, _)| t.duration_since(*at))
                .context("a kill with no scale after it")?;
            failovers.push(next);
        }
    }
    Ok((results, failovers, go_at))
}

/// Every stretch at zero while a client was held, as `(how long, whether a kill fell
/// in it)`: from when the Deployment reached zero, or a client started held there if
/// later, to the scale that woke it. A client is held from its start until its answer;
/// `go_at` is when the clients started counting (their `started_ms`).
fn held_at_zero(
    journal: &[(Instant, Step)],
    clients: &[wake_support::ClientResult],
    go_at: Instant,
) -> Vec<(Duration, bool)> {
    let mut out = Vec::new();
    let mut zero_since: Option<(Instant, bool)> = None;
    for (at, s) in journal {
        match s {
            Step::Replicas(0) => zero_since = Some((*at, false)),
            Step::Kill(_) => {
                if let Some((_, killed)) = &mut zero_since {
                    *killed = true;
                }
            }
            Step::Replicas(_) => {
                if let Some((z0, killed)) = zero_since.take() {
                    let held_since = clients
                        .iter()
                        .map(|c| {
                            let start = go_at + Duration::from_millis(c.started_ms);
                            (start, start + Duration::from_millis(c.ms))
                        })
                        .filter(|(start, end)| *start < *at && *end > z0)
                        .map(|(start, _)| start.max(z0))
                        .min();
                    if let Some(since) = held_since {
                        out.push((at.duration_since(since), killed));
                    }
                }
            }
            Step::Leader(_) => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_sigkilled_at_random_moments_of_wake_and_sleep_loses_no_connection_and_no_scale()
-> anyhow::Result<()> {
    leader_chaos(rounds_from_env(10)?, Goal::Report).await
}

/// The acceptance's 50 rounds, for `cargo xtask bench` (prints `failover_ms_p99=`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: cargo xtask bench runs it"]
async fn bench_failover_over_50_rounds() -> anyhow::Result<()> {
    leader_chaos(rounds_from_env(50)?, Goal::Assert).await
}
