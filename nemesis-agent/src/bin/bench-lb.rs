//! `bench-lb`: balance mode against what nodes run today, kube-proxy's rules. Prints, for
//! `cargo xtask bench` (issue 12 point 7), ratios each from A B B A blocks in this one run:
//! - `lb_connect_overhead_ratio`: time for connect()+RST to a Service's ClusterIP from a
//!   cgroup with the programs in balance mode (the connect is sent to a pod by the
//!   connect hook) over the same to the pod IP from a sibling cgroup without programs, no
//!   NAT rules loaded (goal <= 1.10);
//! - `lb_connect_rate_ratio_vs_iptables_5000`: connections per second in balance mode
//!   over kube-proxy's own DNAT path (no programs, ClusterIP), both with kube-proxy's
//!   iptables rules for 5,000 Services of 3 endpoints loaded and the measured Service in
//!   the middle of KUBE-SERVICES (goal >= 1.0);
//!   `lb_connect_rate_ratio_vs_iptables_5000_skip`: the same with the agent's opt-in
//!   kube-proxy skip (`nemesis_agent::kube_proxy_skip`, `--kube-proxy-skip-mark`): the
//!   programs mark balanced connects and the agent's rule, ahead of kube-proxy's jump in
//!   nat OUTPUT, returns them before the KUBE-SERVICES walk;
//! - `lb_connect_rate_ratio_vs_nftables_5000`: the same against kube-proxy's nftables
//!   mode (verdict maps) for the 5,000 Services (goal >= 1.2);
//!   `lb_connect_rate_ceiling_vs_nftables_5000`: the same for a connect straight to the
//!   pod IP from the cgroup without programs, through the same rules: what balance mode
//!   would reach if its programs cost nothing (conntrack and the ruleset still see
//!   every connection to a pod), the ceiling of the figure above on this machine;
//! - `lb_warm_throughput_ratio`: request/response round trips per second on one
//!   established connection made through the Service address in balance mode over one
//!   made straight to the pod (goal >= 0.95);
//! - `lb_p99_ratio_vs_random`: p99 request latency through a Service balanced by power
//!   of two choices (balance mode's default) over the same with random choice, three
//!   backends of which one answers five times slower, clients on a mix of short and
//!   long-lived connections (`shared/skewed_load.rs` says how and why); the two p99s are
//!   `lb_p99_ms_p2c` and `lb_p99_ms_random`, pooled over P B B P blocks that switch the
//!   Service's algorithm in place (goal for the ratio <= 0.5).
//!
//! The topology is a node and a pod, each a network namespace of this benchmark's own
//! (nothing can leave the machine): the node namespace (this process, after
//! `unshare`) holds the client and the rules; the pod (a child process of this binary in
//! a namespace of its own, joined by a veth pair) has three pod IPs and a server that
//! only accepts and closes (and, on a second port, echoes), so the server is never the
//! bottleneck. Addresses: node link 198.18.0.0/24, pods 198.18.128.0/17 (the "cluster
//! CIDR"), Services 198.19.0.0/16, all within 198.18.0.0/15, the benchmarking range.
//! Needs root, iptables-restore and nft (Debian's iptables and nftables packages).
//! `bench-lb p99` measures only the p99 figures.
#![deny(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nemesis_agent::{
    ebpf::{
        Algorithm, Datapath, DatapathConfig, LoadBalancing, Mode, Proto, Tier,
        cgroup::{self, ChildCgroup, current_cgroup, move_process},
        pins::ScratchBpffs,
        prereq,
    },
    kube_proxy_skip::SkipRule,
};
use nix::sched::{CloneFlags, unshare};

#[path = "shared/sockets.rs"]
mod sockets;
use sockets::{connect, connect_close, listen};
#[path = "shared/skewed_load.rs"]
mod skewed_load;

const SERVICES: usize = 5_000;
const ENDPOINTS: usize = 3;
/// The measured Service: the middle of the list.
const MEASURED: usize = SERVICES / 2;
const POD_PORT: u16 = 8080;
const ECHO_PORT: u16 = 8081;
/// The skewed backends of the p99 figure: the pod's three addresses on this port,
/// `POD_IPS[SLOW_BACKEND]` the slow one.
const WORK_PORT: u16 = 8082;
const SLOW_BACKEND: usize = 2;
const SERVICE_PORT: u16 = 80;
const NODE_ADDR: &str = "198.18.0.1";
const POD_LINK_ADDR: &str = "198.18.0.2";
const POD_CIDR: &str = "198.18.128.0/17";
/// The pod's three addresses: the measured Service's endpoints.
const POD_IPS: [Ipv4Addr; ENDPOINTS] = [
    Ipv4Addr::new(198, 18, 255, 1),
    Ipv4Addr::new(198, 18, 255, 2),
    Ipv4Addr::new(198, 18, 255, 3),
];
/// The Service the echo (throughput) figure dials.
const ECHO_SERVICE: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
/// The Service the p99 figure's clients dial.
const WORK_SERVICE: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 2);
/// P B B P groups of the p99 figure (P: p2c, B: random), each block this long, the
/// first part of it untimed while the backends' queues form.
const P99_GROUPS: usize = 3;
const P99_BLOCK: Duration = Duration::from_secs(3);
const P99_WARMUP: Duration = Duration::from_millis(500);
const CONNS_PER_RUN: usize = 500;
const BLOCKS: usize = 60;
const WARMUP: usize = 1_000;
const ROUND_TRIPS_PER_RUN: usize = 5_000;
const THROUGHPUT_BLOCKS: usize = 15;
/// The skip mark bit of the `_skip` figure (the agent's `--kube-proxy-skip-mark`): not
/// one of kube-proxy's own (0x4000 masquerade, 0x8000 drop).
const SKIP_MARK: u32 = 0x2000;

/// The ClusterIP of Service `i` (198.19.0.1 upwards).
fn cluster_ip(i: usize) -> Ipv4Addr {
    let n = i + 1;
    Ipv4Addr::new(198, 19, (n / 256) as u8, (n % 256) as u8)
}

/// The endpoints of Service `i`: the pod's three addresses for the measured one, other
/// pod-CIDR addresses (never dialled) for the rest.
fn endpoints(i: usize) -> [Ipv4Addr; ENDPOINTS] {
    if i == MEASURED {
        return POD_IPS;
    }
    let e = |k: usize| {
        let n = i * ENDPOINTS + k;
        Ipv4Addr::new(198, 18, 128 + (n / 256) as u8, (n % 256) as u8)
    };
    [e(0), e(1), e(2)]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let part = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--pod"] => return serve_pod(),
        [] => Part::All,
        ["p99"] => Part::P99,
        ["overhead"] => Part::Overhead(1),
        ["overhead", n] => Part::Overhead(
            n.parse()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("`bench-lb overhead {n}`: a count of runs >= 1"))?,
        ),
        _ => bail!(
            "unknown arguments {args:?}: `bench-lb` runs every part, `bench-lb p99` only the \
             p99 figures, `bench-lb overhead [RUNS]` only lb_connect_overhead_ratio (RUNS \
             times, each printed)"
        ),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // Private mount and network namespaces while this process still has one thread: the
    // scratch bpffs and every rule and address vanish with the process.
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET)
        .context("unsharing the mount and network namespaces (are you root?)")?;
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
        bail!("no cgroup2 mount in /proc/mounts: bench-lb needs cgroup v2 (and root)");
    };
    let mut pod = Pod::start()?;
    let pid = std::process::id();
    let home = current_cgroup(&root).context("finding this process's cgroup")?;
    // A run killed before its clean-up left its cgroups behind: remove them first.
    for gone in cgroup::remove_orphans(&root, "nemesis-bench-lb-").unwrap_or_default() {
        eprintln!(
            "removed {}, left by a run that did not finish",
            gone.display()
        );
    }
    let on = ChildCgroup::create(&root, &format!("nemesis-bench-lb-{pid}-on"))
        .context("creating a child cgroup (are you root?)")?;
    let off = ChildCgroup::create(&root, &format!("nemesis-bench-lb-{pid}-off"))?;
    let bpffs = ScratchBpffs::mount(&format!("bench-lb-{pid}"))?;
    let mut cfg = DatapathConfig::new(format!("bench-lb-{pid}"));
    cfg.cgroup = Some(on.path().to_path_buf());
    cfg.bpffs = Some(bpffs.path().to_path_buf());
    let dp = Datapath::load_or_adopt(&cfg)?;

    let result = run(&dp, on.path(), off.path(), part);

    move_process(&home, pid).context("moving back to the original cgroup")?;
    dp.detach()?;
    on.remove()?;
    off.remove()?;
    drop(bpffs);
    pod.stop();
    let figures = result?;
    for (name, value) in figures {
        println!("{name}={value:.4}");
    }
    Ok(())
}

/// Which figures a run measures.
#[derive(Clone, Copy)]
enum Part {
    All,
    P99,
    /// lb_connect_overhead_ratio alone, this many times over: the quick A/B of a datapath
    /// change (run it for the old and the new binary in turn).
    Overhead(usize),
}

fn run(dp: &Datapath, on: &Path, off: &Path, part: Part) -> Result<Vec<(&'static str, f64)>> {
    if let Part::P99 = part {
        return p99_figures(dp, on);
    }
    let service = SocketAddr::from((cluster_ip(MEASURED), SERVICE_PORT));
    let pods: Vec<SocketAddr> = POD_IPS
        .iter()
        .map(|ip| SocketAddr::from((*ip, POD_PORT)))
        .collect();
    dp.upsert_service(service, Proto::Tcp, Mode::Balance)?;
    dp.set_backends(service, Proto::Tcp, &pods)?;
    let echo_service = SocketAddr::from((ECHO_SERVICE, SERVICE_PORT));
    let echo_pod = SocketAddr::from((POD_IPS[0], ECHO_PORT));
    dp.upsert_service(echo_service, Proto::Tcp, Mode::Balance)?;
    dp.set_backends(echo_service, Proto::Tcp, &[echo_pod])?;

    let mut out = vec![];
    if let Part::Overhead(runs) = part {
        for _ in 0..runs {
            out.push((
                "lb_connect_overhead_ratio",
                time_ratio("balance vs pod IP, no rules", (on, service), (off, pods[0]))?,
            ));
        }
        return Ok(out);
    }
    // No rules: the programs' own cost.
    out.push((
        "lb_connect_overhead_ratio",
        time_ratio("balance vs pod IP, no rules", (on, service), (off, pods[0]))?,
    ));
    out.push((
        "lb_warm_throughput_ratio",
        throughput_ratio(on, echo_service, off, echo_pod)?,
    ));
    out.extend(p99_figures(dp, on)?);

    load_iptables()?;
    // Both sides now walk the rules: balance mode's connect (to a pod IP) matches
    // nothing; kube-proxy's (to the ClusterIP) is DNAT-ed halfway down.
    let t = time_ratio(
        "balance vs kube-proxy iptables",
        (on, service),
        (off, service),
    )?;
    out.push(("lb_connect_rate_ratio_vs_iptables_5000", 1.0 / t));
    // The agent's own skip: the programs' mark and the agent's rule, as `--kube-proxy-
    // skip-mark` installs them.
    let skip = SkipRule::new(SKIP_MARK, &["iptables".to_string()])?;
    dp.set_kube_proxy_skip_mark(SKIP_MARK)?;
    for (command, result) in skip.ensure() {
        let plan = result?;
        ensure!(plan.insert, "{command}: the skip rule was not inserted");
    }
    let t = time_ratio(
        "balance (+the agent's kube-proxy skip rule) vs kube-proxy iptables",
        (on, service),
        (off, service),
    )?;
    out.push(("lb_connect_rate_ratio_vs_iptables_5000_skip", 1.0 / t));
    ensure!(
        skip_rule_packets()? > 0,
        "the skip rule matched no connect: the programs did not mark balanced connects"
    );
    for (_, result) in skip.remove() {
        result?;
    }
    dp.set_kube_proxy_skip_mark(0)?;
    flush_iptables()?;

    load_nftables()?;
    let t = time_ratio(
        "balance vs kube-proxy nftables",
        (on, service),
        (off, service),
    )?;
    out.push(("lb_connect_rate_ratio_vs_nftables_5000", 1.0 / t));
    // The most any connect hook could reach here: the pod IP with no programs at all,
    // through the same rules (conntrack and nftables still see every connection to a
    // pod), over kube-proxy's DNAT. What balance mode lacks of it is its programs' cost.
    let t = time_ratio(
        "pod IP without programs (the ceiling) vs kube-proxy nftables",
        (off, pods[0]),
        (off, service),
    )?;
    out.push(("lb_connect_rate_ceiling_vs_nftables_5000", 1.0 / t));
    sh(
        Command::new("nft").args(["delete", "table", "ip", "kube-proxy"]),
        None,
    )?;
    Ok(out)
}

// === the pod ===

/// The pod: this binary with `--pod`, in a network namespace of its own.
struct Pod {
    child: Child,
}

impl Pod {
    fn start() -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("--pod")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the pod process")?;
        let mut lines = BufReader::new(child.stdout.take().context("pod stdout")?).lines();
        let mut expect = |what: &str| -> Result<()> {
            match lines.next() {
                Some(Ok(l)) if l == what => Ok(()),
                other => bail!("the pod process said {other:?}, expected {what}"),
            }
        };
        expect("netns")?;
        let pid = child.id().to_string();
        // The node's side of the link; the pod's side goes into its namespace.
        ip(&["link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", "nbl0", "type", "veth", "peer", "name", "nbl1", "netns", &pid,
        ])?;
        ip(&["addr", "add", &format!("{NODE_ADDR}/24"), "dev", "nbl0"])?;
        ip(&["link", "set", "nbl0", "up"])?;
        ip(&["route", "add", POD_CIDR, "dev", "nbl0"])?;
        // ClusterIPs are virtual: routed towards the pods, rewritten before they leave.
        ip(&["route", "add", "198.19.0.0/16", "dev", "nbl0"])?;
        let stdin = child.stdin.as_mut().context("pod stdin")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        expect("listening")?;
        Ok(Self { child })
    }

    fn stop(&mut self) {
        drop(self.child.stdin.take()); // EOF: the pod exits
        let _ = self.child.wait();
    }
}

fn serve_pod() -> Result<()> {
    unshare(CloneFlags::CLONE_NEWNET).context("unsharing the pod's network namespace")?;
    println!("netns");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    ensure!(line.trim() == "go", "the node said {line:?}");
    ip(&["link", "set", "lo", "up"])?;
    ip(&["addr", "add", &format!("{POD_LINK_ADDR}/24"), "dev", "nbl1"])?;
    for a in POD_IPS {
        ip(&["addr", "add", &format!("{a}/32"), "dev", "nbl1"])?;
    }
    ip(&["link", "set", "nbl1", "up"])?;
    let accept = listen(SocketAddr::from(([0, 0, 0, 0], POD_PORT)))?;
    let echo = listen(SocketAddr::from(([0, 0, 0, 0], ECHO_PORT)))?;
    let work = listen(SocketAddr::from(([0, 0, 0, 0], WORK_PORT)))?;
    skewed_load::serve(work, &POD_IPS, SLOW_BACKEND);
    std::thread::spawn(move || {
        for s in accept.incoming() {
            drop(s);
        }
    });
    std::thread::spawn(move || {
        for s in echo.incoming().flatten() {
            std::thread::spawn(move || echo_loop(s));
        }
    });
    println!("listening");
    std::io::stdout().flush()?;
    // Until the node closes stdin.
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    Ok(())
}

fn echo_loop(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 64];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            return;
        }
    }
}

// === kube-proxy's rules ===

/// kube-proxy's iptables mode, nat table, as its proxier writes it (KUBE-SERVICES ->
/// KUBE-SVC-* with the statistic match -> KUBE-SEP-* DNAT, masquerade marks, the
/// nodeports jump last).
fn iptables_rules() -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        chains.push_str(&format!(":{c} - [0:0]\n"));
    }
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    for i in 0..SERVICES {
        let svc = format!("KUBE-SVC-{i:016X}");
        let ip = cluster_ip(i);
        let name = format!("bench/svc-{i}:http");
        chains.push_str(&format!(":{svc} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}\n"
        ));
        rules.push_str(&format!(
            "-A {svc} ! -s {POD_CIDR} -d {ip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {SERVICE_PORT} -j KUBE-MARK-MASQ\n"
        ));
        for (k, ep) in endpoints(i).iter().enumerate() {
            let sep = format!("KUBE-SEP-{:016X}", i * ENDPOINTS + k);
            chains.push_str(&format!(":{sep} - [0:0]\n"));
            let left = ENDPOINTS - k;
            let pick = if left > 1 {
                format!(
                    "-m statistic --mode random --probability {:.11} ",
                    1.0 / left as f64
                )
            } else {
                String::new()
            };
            rules.push_str(&format!(
                "-A {svc} -m comment --comment \"{name} -> {ep}:{POD_PORT}\" {pick}-j {sep}\n"
            ));
            rules.push_str(&format!(
                "-A {sep} -s {ep}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n"
            ));
            rules.push_str(&format!(
                "-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {ep}:{POD_PORT}\n"
            ));
        }
    }
    rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    format!("*nat\n{chains}{rules}COMMIT\n")
}

fn load_iptables() -> Result<()> {
    // A fresh nat table (the restore replaces the whole table).
    sh(
        &mut Command::new("iptables-restore"),
        Some(&iptables_rules()),
    )
}

/// Packets the agent's skip rule matched (its counter in `iptables -L -v -x`).
fn skip_rule_packets() -> Result<u64> {
    let out = Command::new("iptables")
        .args(["-w", "5", "-t", "nat", "-L", "OUTPUT", "-v", "-x", "-n"])
        .output()
        .context("running iptables -L")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(nemesis_agent::kube_proxy_skip::COMMENT))
        .context("the skip rule is not in nat OUTPUT")?;
    line.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no packet count in {line:?}"))
}

fn flush_iptables() -> Result<()> {
    sh(
        &mut Command::new("iptables-restore"),
        Some(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n",
        ),
    )
}

/// kube-proxy's nftables mode, as its proxier lays it out: a `services` chain that
/// looks the destination up in the `service-ips` verdict map, one chain per Service
/// choosing an endpoint with `numgen random`, one chain per endpoint with the DNAT, the
/// masquerade mark, and the filter-side checks for new connections.
fn nftables_rules() -> String {
    let mut s = String::from(
        "table ip kube-proxy {\n\
         \tmap service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n\
         \tmap service-nodeports { type inet_proto . inet_service : verdict; }\n\
         \tmap no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict; }\n\
         \tmap firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n\
         \tchain mark-for-masquerade { meta mark set meta mark | 0x4000; }\n\
         \tchain masquerading { meta mark & 0x4000 == 0 return; meta mark set meta mark ^ 0x4000; masquerade fully-random; }\n\
         \tchain services { ip daddr . meta l4proto . th dport vmap @service-ips; fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports; }\n\
         \tchain service-endpoints-check { ip daddr . meta l4proto . th dport vmap @no-endpoint-services; }\n\
         \tchain firewall-check { ip daddr . meta l4proto . th dport vmap @firewall-ips; }\n\
         \tchain filter-output { type filter hook output priority -110; ct state new jump service-endpoints-check; ct state new jump firewall-check; }\n\
         \tchain nat-output { type nat hook output priority -100; jump services; }\n\
         \tchain nat-prerouting { type nat hook prerouting priority -100; jump services; }\n\
         \tchain nat-postrouting { type nat hook postrouting priority 100; jump masquerading; }\n",
    );
    let mut elements = Vec::with_capacity(SERVICES);
    for i in 0..SERVICES {
        let ip = cluster_ip(i);
        let eps = endpoints(i);
        let mut pick = Vec::new();
        for (k, ep) in eps.iter().enumerate() {
            s.push_str(&format!(
                "\tchain endpoint-{i}-{k} {{ ip saddr {ep} jump mark-for-masquerade; meta l4proto tcp dnat to {ep}:{POD_PORT}; }}\n"
            ));
            pick.push(format!("{k} : goto endpoint-{i}-{k}"));
        }
        s.push_str(&format!(
            "\tchain service-{i} {{ ip daddr {ip} tcp dport {SERVICE_PORT} ip saddr != {POD_CIDR} jump mark-for-masquerade; numgen random mod {ENDPOINTS} vmap {{ {} }}; }}\n",
            pick.join(", ")
        ));
        elements.push(format!("{ip} . tcp . {SERVICE_PORT} : goto service-{i}"));
    }
    s.push_str("}\n");
    s.push_str(&format!(
        "add element ip kube-proxy service-ips {{ {} }}\n",
        elements.join(", ")
    ));
    s
}

fn load_nftables() -> Result<()> {
    sh(
        Command::new("nft").args(["-f", "-"]),
        Some(&nftables_rules()),
    )
}

// === measuring ===

/// Median over A B B A blocks of (time of `a` / time of `b`), each side connecting
/// from its cgroup to its address and closing with RST.
fn time_ratio(what: &str, a: (&Path, SocketAddr), b: (&Path, SocketAddr)) -> Result<f64> {
    let pid = std::process::id();
    let side = |(cg, addr): (&Path, SocketAddr), n: usize| -> Result<Duration> {
        move_process(cg, pid)?;
        connect_close(addr, n)
    };
    side(b, WARMUP)?;
    side(a, WARMUP)?;
    let mut ratios = Vec::with_capacity(BLOCKS);
    for _ in 0..BLOCKS {
        let b1 = side(b, CONNS_PER_RUN)?;
        let a1 = side(a, CONNS_PER_RUN)?;
        let a2 = side(a, CONNS_PER_RUN)?;
        let b2 = side(b, CONNS_PER_RUN)?;
        ratios.push((a1 + a2).as_secs_f64() / (b1 + b2).as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    eprintln!(
        "{what}: time ratio median {median:.4} over {BLOCKS} A B B A blocks (quartiles {:.4} .. {:.4})",
        ratios[ratios.len() / 4],
        ratios[ratios.len() * 3 / 4]
    );
    Ok(median)
}

/// Median over A B B A blocks of (round trips per second on a connection made through
/// the Service address with the programs / on one made to the pod without).
fn throughput_ratio(on: &Path, service: SocketAddr, off: &Path, pod: SocketAddr) -> Result<f64> {
    let pid = std::process::id();
    // Sockets keep the cgroup they were made in: each connection is made on its side.
    move_process(on, pid)?;
    let mut through = connect(service)?;
    move_process(off, pid)?;
    let mut direct = connect(pod)?;
    for s in [&through, &direct] {
        s.set_nodelay(true)?;
    }
    // What the application sees is the Service address (the getpeername hook), though
    // the connection went to the pod: the pod-side echo answers, nothing serves the
    // ClusterIP itself.
    ensure!(
        through.peer_addr()? == service,
        "getpeername of a balanced connection said {}, not the Service address {service}",
        through.peer_addr()?
    );
    round_trips(&mut direct, ROUND_TRIPS_PER_RUN)?;
    round_trips(&mut through, ROUND_TRIPS_PER_RUN)?;
    let mut ratios = Vec::with_capacity(THROUGHPUT_BLOCKS);
    for _ in 0..THROUGHPUT_BLOCKS {
        let b1 = round_trips(&mut direct, ROUND_TRIPS_PER_RUN)?;
        let a1 = round_trips(&mut through, ROUND_TRIPS_PER_RUN)?;
        let a2 = round_trips(&mut through, ROUND_TRIPS_PER_RUN)?;
        let b2 = round_trips(&mut direct, ROUND_TRIPS_PER_RUN)?;
        // Throughput ratio: the inverse of the time ratio.
        ratios.push((b1 + b2).as_secs_f64() / (a1 + a2).as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    eprintln!(
        "round trips through the Service address vs to the pod: median ratio {median:.4} (quartiles {:.4} .. {:.4})",
        ratios[ratios.len() / 4],
        ratios[ratios.len() * 3 / 4]
    );
    Ok(median)
}

/// `lb_p99_ratio_vs_random` and its two p99s, through a Service of its own over the
/// pod's skewed backends.
fn p99_figures(dp: &Datapath, on: &Path) -> Result<Vec<(&'static str, f64)>> {
    let service = SocketAddr::from((WORK_SERVICE, SERVICE_PORT));
    dp.upsert_service(service, Proto::Tcp, Mode::Balance)?;
    let p99 = p99_by_algorithm(dp, on, service)?;
    Ok(vec![
        ("lb_p99_ratio_vs_random", p99.p2c / p99.random),
        ("lb_p99_ms_p2c", p99.p2c),
        ("lb_p99_ms_random", p99.random),
    ])
}

/// The p99 request latency of each algorithm, each pooled over its blocks.
struct P99 {
    p2c: f64,
    random: f64,
}

/// The skewed workload through `service` (balance mode, the pod's three skewed
/// backends) in P B B P blocks: the Service's algorithm is switched in place between
/// blocks, each block starting with every connection of the last one closed. On
/// stderr: each group's ratio (the noise), and where the requests went.
fn p99_by_algorithm(dp: &Datapath, on: &Path, service: SocketAddr) -> Result<P99> {
    let backends: Vec<(SocketAddr, Tier)> = POD_IPS
        .iter()
        .map(|ip| (SocketAddr::from((*ip, WORK_PORT)), Tier::Remote))
        .collect();
    move_process(on, std::process::id())?;
    let (mut p2c, mut random) = (skewed_load::Block::default(), skewed_load::Block::default());
    let mut group_ratios = Vec::with_capacity(P99_GROUPS);
    for _ in 0..P99_GROUPS {
        let (mut gp, mut gr) = (skewed_load::Block::default(), skewed_load::Block::default());
        for algorithm in [
            Algorithm::P2c,
            Algorithm::Random,
            Algorithm::Random,
            Algorithm::P2c,
        ] {
            let balancing = LoadBalancing {
                algorithm,
                ..LoadBalancing::default()
            };
            dp.set_balance(service, Proto::Tcp, &backends, balancing)?;
            wait_no_open(dp, service)?;
            let block = skewed_load::run(service, skewed_load::MIX, P99_BLOCK, P99_WARMUP)?;
            match algorithm {
                Algorithm::P2c => gp.merge(block),
                _ => gr.merge(block),
            }
        }
        gp.sort();
        gr.sort();
        group_ratios.push(gp.p99() / gr.p99());
        p2c.merge(gp);
        random.merge(gr);
    }
    p2c.sort();
    random.sort();
    for (name, b) in [("p2c", &p2c), ("random", &random)] {
        eprintln!(
            "skewed load, {name}: {} requests timed, p50 {:.2} ms, p99 {:.2} ms; the slow backend answered {:.1}% of the requests and got {:.1}% of the new connections",
            b.latencies_ms.len(),
            nemesis_common::stats::percentile_or_nan(&b.latencies_ms, 50.0),
            b.p99(),
            share(&b.requests, SLOW_BACKEND),
            share(&b.connections, SLOW_BACKEND),
        );
    }
    group_ratios.sort_by(f64::total_cmp);
    eprintln!(
        "skewed load: p99 ratio p2c/random per P B B P group {:.3?} (pooled {:.3})",
        group_ratios,
        p2c.p99() / random.p99()
    );
    Ok(P99 {
        p2c: p2c.p99(),
        random: random.p99(),
    })
}

/// Percent of `per_backend` that is backend `i`'s.
fn share(per_backend: &[u64], i: usize) -> f64 {
    let all: u64 = per_backend.iter().sum();
    100.0 * per_backend.get(i).copied().unwrap_or(0) as f64 / all.max(1) as f64
}

/// Waits until the balancer counts no open connection on any of the Service's backends
/// (the last block's closes are in), so that no block inherits another's load.
fn wait_no_open(dp: &Datapath, service: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = dp.backends(service, Proto::Tcp)?;
        if counts.iter().all(|c| c.open_now == 0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("connections of the last block still counted open after 30 s: {counts:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn round_trips(s: &mut TcpStream, n: usize) -> Result<Duration> {
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let start = Instant::now();
    for _ in 0..n {
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
    }
    Ok(start.elapsed())
}

// === commands ===

fn ip(args: &[&str]) -> Result<()> {
    sh(Command::new("ip").args(args), None)
}

/// Runs `cmd` (with `input` on stdin) and fails with its stderr.
fn sh(cmd: &mut Command, input: Option<&str>) -> Result<()> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {what} (is it installed? `cargo xtask setup`)"))?;
    if let Some(text) = input {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
