//! `bench-connect`: what the datapath costs a connect(). Prints, for `cargo xtask bench`,
//! `connect_overhead_ratio=<x>` (time for connect()+close() to a loopback listener from
//! a cgroup with the programs attached and the service in passthrough, divided by the
//! same from a sibling cgroup without programs) and
//! `connect_overhead_ratio_10k_services=<x>` (the same with 10,000 more services in the
//! table). Goal for both: <= 1.10. And `accept_overhead_ratio` (goal <= 1.05): what
//! the server-side count costs a backend's accepts, as connect()+RST from outside both
//! cgroups to a backend whose sockets were made in the cgroup with the programs and
//! whose address is a registered server port of the service, divided by the same to a
//! backend made in the sibling cgroup without programs; the programs' accept count
//! must then equal exactly the connections made to the first.
//!
//! Method (see notes/toolchain.md, "Measuring connection rates"): connections are closed
//! with RST (SO_LINGER {on, 0}) so neither ephemeral ports nor TIME_WAIT pile up; each
//! run is bounded; the two sides alternate A B A B in one process (this process moves
//! itself between the two cgroups), and the figure is the median of the pair ratios, so
//! noise from other work on the machine hits both sides alike. Needs root.
#![deny(unsafe_code)]

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nemesis_agent::ebpf::{
    Datapath, DatapathConfig, Mode, Proto,
    cgroup::{self, ChildCgroup, current_cgroup, move_process},
    pins::ScratchBpffs,
    prereq,
};

/// Connections per timed run: short runs, alternated often, so bursts of other work on
/// a shared machine land on both sides alike; bounded far below the ~28k ephemeral
/// ports one destination has.
#[path = "shared/sockets.rs"]
mod sockets;
use sockets::{connect_close, listen};

const CONNS_PER_RUN: usize = 5_000;
/// A B pairs per figure; the median of their ratios is reported.
const PAIRS: usize = 25;
/// Untimed connections per side before measuring (caches, branch predictors, slabs).
const WARMUP: usize = 2_000;
/// Extra services for the table-size variant.
const EXTRA_SERVICES: usize = 10_000;
/// The measured service: a loopback "ClusterIP" outside the ranges the tests use.
const SERVICE_IP: &str = "127.96.255.1";
/// The backends of the accept figure ("pod IPs": loopback here, as nothing leaves).
const BACKEND_IP: &str = "127.96.255.2";
/// Connections per timed accept run, and A B pairs (taken as 125 A B B A blocks): many
/// short runs, so that the median of the blocks' ratios is steady on a shared machine.
const ACCEPT_CONNS_PER_RUN: usize = 500;
const ACCEPT_PAIRS: usize = 251;

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // A private mount namespace (while this process still has one thread): the
    // scratch bpffs vanishes with the process, even if it is interrupted.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("unsharing the mount namespace (are you root?)")?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let Some(root) = prereq::cgroup2_mount(&mounts) else {
        bail!("no cgroup2 mount in /proc/mounts: bench-connect needs cgroup v2 (and root)");
    };
    let pid = std::process::id();
    let home = current_cgroup(&root).context("finding this process's cgroup")?;
    // A run killed before its clean-up left its cgroups behind: remove them first.
    for gone in cgroup::remove_orphans(&root, "nemesis-bench-").unwrap_or_default() {
        eprintln!(
            "removed {}, left by a run that did not finish",
            gone.display()
        );
    }
    let on = ChildCgroup::create(&root, &format!("nemesis-bench-{pid}-on"))
        .context("creating a child cgroup (are you root?)")?;
    let off = ChildCgroup::create(&root, &format!("nemesis-bench-{pid}-off"))?;
    let bpffs = ScratchBpffs::mount(&format!("bench-{pid}"))?;

    // Created here, before this process moves: sockets keep the cgroup they were made
    // in, so the listener and its accepted sockets stay outside both sides.
    let listener = listen(format!("{SERVICE_IP}:0").parse()?)?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });

    let mut cfg = DatapathConfig::new(format!("bench-{pid}"));
    cfg.cgroup = Some(on.path().to_path_buf());
    cfg.bpffs = Some(bpffs.path().to_path_buf());
    let dp = Datapath::load_or_adopt(&cfg)?;
    dp.upsert_service(addr, Proto::Tcp, Mode::Passthrough)?;

    // The accept figure's two backends: sockets keep the cgroup they were made in, and
    // accepted sockets their listener's; the client stays at home, outside both.
    move_process(on.path(), pid)?;
    let backend_on = listen(format!("{BACKEND_IP}:0").parse()?)?;
    move_process(off.path(), pid)?;
    let backend_off = listen(format!("{BACKEND_IP}:0").parse()?)?;
    move_process(&home, pid)?;
    let (on_addr, off_addr) = (backend_on.local_addr()?, backend_off.local_addr()?);
    for l in [backend_on, backend_off] {
        std::thread::spawn(move || {
            for s in l.incoming() {
                drop(s);
            }
        });
    }

    let result = (|| -> Result<(f64, f64, f64)> {
        dp.set_server_ports(addr, Proto::Tcp, &[on_addr])?;
        let accept = measure_accept(&dp, addr, &home, on_addr, off_addr)?;
        let plain = measure(on.path(), off.path(), addr)?;
        for i in 0..EXTRA_SERVICES {
            let extra: SocketAddr = format!("127.96.{}.{}:8080", 100 + i / 256, i % 256).parse()?;
            dp.upsert_service(extra, Proto::Tcp, Mode::Passthrough)?;
        }
        let big = measure(on.path(), off.path(), addr)?;
        let slot = dp.service(addr, Proto::Tcp).map(|s| s.slot).unwrap_or(0);
        let counted = dp.stats(slot)?.connects;
        let expected = 2 * ((PAIRS * CONNS_PER_RUN + WARMUP) as u64);
        if counted != expected {
            bail!("the programs counted {counted} connects on the 'on' side, expected {expected}");
        }
        Ok((plain, big, accept))
    })();

    // Back home before the cgroups go; then detach and unpin.
    move_process(&home, pid).context("moving back to the original cgroup")?;
    dp.detach()?;
    on.remove()?;
    off.remove()?;
    drop(bpffs);

    let (plain, big, accept) = result?;
    println!("accept_overhead_ratio={accept:.4}");
    println!("connect_overhead_ratio={plain:.4}");
    println!("connect_overhead_ratio_10k_services={big:.4}");
    Ok(())
}

/// Median over [`PAIRS`] of (time with programs / time without).
fn measure(on: &Path, off: &Path, addr: SocketAddr) -> Result<f64> {
    let pid = std::process::id();
    move_process(off, pid)?;
    connect_close(addr, WARMUP)?;
    move_process(on, pid)?;
    connect_close(addr, WARMUP)?;
    let mut ratios = vec![];
    for _ in 0..PAIRS {
        move_process(off, pid)?;
        let without = connect_close(addr, CONNS_PER_RUN)?;
        move_process(on, pid)?;
        let with = connect_close(addr, CONNS_PER_RUN)?;
        let r = with.as_secs_f64() / without.as_secs_f64();
        eprintln!(
            "without programs {:.0} conn/s, with {:.0} conn/s, ratio {r:.4}",
            CONNS_PER_RUN as f64 / without.as_secs_f64(),
            CONNS_PER_RUN as f64 / with.as_secs_f64(),
        );
        ratios.push(r);
    }
    ratios.sort_by(f64::total_cmp);
    Ok(ratios[ratios.len() / 2])
}

/// Median over the A B B A blocks of (time to connect to the backend whose accepts the
/// programs count / time to the one they do not see), from `home`; then checks that the
/// programs counted exactly the connections the first one accepted.
fn measure_accept(
    dp: &Datapath,
    service: SocketAddr,
    home: &Path,
    on: SocketAddr,
    off: SocketAddr,
) -> Result<f64> {
    move_process(home, std::process::id())?;
    let slot = dp.service(service, Proto::Tcp).map(|s| s.slot).unwrap_or(0);
    let before = dp.stats(slot)?.accepted;
    connect_close(off, WARMUP)?;
    connect_close(on, WARMUP)?;
    let mut ratios = vec![];
    // A B B A blocks: whichever side runs second in a pair runs while the first one's
    // accept thread still frees its sockets (measured here: the second of a pair ran
    // 20-30 % faster on a loaded machine), so each block has both orders and its
    // ratio is its total time with programs over its total time without.
    for _ in 0..ACCEPT_PAIRS / 2 {
        let without_a = connect_close(off, ACCEPT_CONNS_PER_RUN)?;
        let with_a = connect_close(on, ACCEPT_CONNS_PER_RUN)?;
        let with_b = connect_close(on, ACCEPT_CONNS_PER_RUN)?;
        let without_b = connect_close(off, ACCEPT_CONNS_PER_RUN)?;
        ratios.push((with_a + with_b).as_secs_f64() / (without_a + without_b).as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    eprintln!(
        "accepts: median ratio {median:.4} over {} A B B A blocks (quartiles {:.4} .. {:.4})",
        ratios.len(),
        ratios[ratios.len() / 4],
        ratios[ratios.len() * 3 / 4]
    );
    // The server side counts at the handshake's end, which on loopback is done before
    // connect() returns; a moment's grace all the same, then exactly.
    let expected = (WARMUP + ACCEPT_PAIRS / 2 * 2 * ACCEPT_CONNS_PER_RUN) as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counted = dp.stats(slot)?.accepted - before;
        if counted == expected {
            return Ok(median);
        }
        if counted > expected || Instant::now() > deadline {
            bail!(
                "the programs counted {counted} accepts on the backend with programs, expected {expected}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
