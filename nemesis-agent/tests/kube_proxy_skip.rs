//! The opt-in kube-proxy skip on the real kernel, in a network namespace of the test's
//! own (so its nat rules touch nothing else): kube-proxy-shaped rules (OUTPUT ->
//! KUBE-SERVICES -> DNAT of a ClusterIP) are loaded, the agent's rule goes in ahead of
//! them, balanced connects from the intercepted cgroup carry the mark, skip the
//! KUBE-SERVICES walk and still reach the pod; a connect the programs did not balance
//! (from outside the cgroup) is still DNAT-ed by kube-proxy's rules; and the rule is
//! gone after the removal the agent does when it stops.
//!
//! Needs root and iptables. The connecting process is a child (this binary re-run as
//! `child_connect_entry`) that moves itself into the test's cgroup: membership is per
//! process.

use std::{
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use nemesis_agent::{
    ebpf::{
        Datapath, DatapathConfig, Mode, Proto,
        cgroup::{ChildCgroup, move_process},
        pins::ScratchBpffs,
        prereq,
    },
    kube_proxy_skip::{COMMENT, Plan, SkipRule},
};

const CHILD_ENV: &str = "NEMESIS_TEST_SKIP_CHILD";
const MARK: u32 = 0x2000;
/// The pod and the Service, on the namespace's own loopback (nothing else sees them).
const POD_IP: &str = "127.98.0.1";
const CLUSTER_IP: &str = "127.96.0.1";
const WAIT: Duration = Duration::from_secs(60);

/// Entry point of the connecting child; a no-op when run as a normal test. Connects
/// `n` times to `addr` from the cgroup and prints `connected <k>`.
#[test]
fn child_connect_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split('|');
    let (cgroup, addr, n) = (
        parts.next().unwrap(),
        parts.next().unwrap().parse::<SocketAddr>().unwrap(),
        parts.next().unwrap().parse::<usize>().unwrap(),
    );
    move_process(Path::new(cgroup), std::process::id()).expect("joining the test cgroup");
    let ok = (0..n)
        .filter(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(10)).is_ok())
        .count();
    println!("connected {ok}");
}

/// Connects `n` times to `addr` from a child in `cgroup` (spawned from the calling
/// thread, so in its network namespace); how many succeeded.
fn connect_from(cgroup: &Path, addr: SocketAddr, n: usize) -> usize {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_connect_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{}|{addr}|{n}", cgroup.display()))
        .output()
        .expect("running the connecting child");
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(i) = text.find("connected ") else {
        panic!(
            "the child said {text:?} / {:?}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    text[i + "connected ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Packets counted on the first nat OUTPUT rule whose line contains `needle`.
fn packets(needle: &str) -> Option<u64> {
    let text = sh(
        "iptables",
        &["-w", "5", "-t", "nat", "-L", "OUTPUT", "-v", "-x", "-n"],
    );
    let line = text.lines().find(|l| l.contains(needle))?;
    line.split_whitespace().next()?.parse().ok()
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A pod server that only counts what it accepts.
fn serve(addr: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind(addr).expect("binding the pod server");
    let bound = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut sink = [0u8; 64];
                while let Ok(n) = s.read(&mut sink)
                    && n > 0
                {}
            });
        }
    });
    (bound, accepted)
}

#[test]
fn balanced_connects_skip_kube_proxys_rules_and_still_reach_the_pod_until_the_rule_is_removed() {
    // A thread of its own: it alone enters the new network namespace, and the namespace
    // (with every rule in it) goes when the thread and its children are gone.
    std::thread::spawn(run_in_own_netns)
        .join()
        .expect("the test thread panicked");
}

fn run_in_own_netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("a network namespace of the test's own (are you root?)");
    sh("ip", &["link", "set", "lo", "up"]);

    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let root = prereq::cgroup2_mount(&mounts).expect("a cgroup2 mount (run as root on Linux)");
    let name = format!("nemesis-t-skip-{}", std::process::id());
    let cgroup = ChildCgroup::create(&root, &name).expect("creating the test cgroup");
    let bpffs = ScratchBpffs::mount(&name).expect("mounting a scratch bpffs");
    let mut cfg = DatapathConfig::new("t-skip");
    cfg.cgroup = Some(cgroup.path().to_path_buf());
    cfg.bpffs = Some(bpffs.path().to_path_buf());
    cfg.kube_proxy_skip_mark = MARK;
    let dp = Datapath::load_or_adopt(&cfg).expect("loading the datapath");

    let (pod, accepted) = serve(&format!("{POD_IP}:0"));
    let service: SocketAddr = format!("{CLUSTER_IP}:80").parse().unwrap();
    dp.upsert_service(service, Proto::Tcp, Mode::Balance)
        .unwrap();
    dp.set_backends(service, Proto::Tcp, &[pod]).unwrap();

    // kube-proxy's shape: every locally made connection walks KUBE-SERVICES, where the
    // ClusterIP is DNAT-ed to the pod.
    sh("iptables", &["-w", "5", "-t", "nat", "-N", "KUBE-SERVICES"]);
    sh(
        "iptables",
        &[
            "-w",
            "5",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ],
    );
    let to = pod.to_string();
    sh(
        "iptables",
        &[
            "-w",
            "5",
            "-t",
            "nat",
            "-A",
            "KUBE-SERVICES",
            "-d",
            CLUSTER_IP,
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ],
    );

    let skip = SkipRule::new(MARK, &["iptables".to_string()]).unwrap();
    let first = skip.ensure();
    assert_eq!(first.len(), 1);
    assert!(first[0].1.as_ref().unwrap().insert, "{first:?}");
    // Idempotent: a second pass finds the rule in place and writes nothing.
    let again = skip.ensure();
    assert_eq!(again[0].1.as_ref().unwrap(), &Plan::default());
    let listing = sh("iptables", &["-w", "5", "-t", "nat", "-S", "OUTPUT"]);
    let ours = listing.lines().position(|l| l.contains(COMMENT));
    let kube = listing.lines().position(|l| l.contains("-j KUBE-SERVICES"));
    assert!(
        matches!((ours, kube), (Some(o), Some(k)) if o < k),
        "the skip rule must come before kube-proxy's jump:\n{listing}"
    );

    // Balanced connects: marked, so they skip the walk, and reach the pod.
    const N: usize = 20;
    assert_eq!(connect_from(cgroup.path(), service, N), N);
    assert!(
        wait_until(|| accepted.load(Ordering::SeqCst) == N),
        "the pod accepted {} of {N}",
        accepted.load(Ordering::SeqCst)
    );
    assert_eq!(
        packets(COMMENT),
        Some(N as u64),
        "every balanced connect's SYN matched the skip rule"
    );
    assert_eq!(
        packets("kubernetes service portals"),
        Some(0),
        "no balanced connect walked KUBE-SERVICES"
    );

    // A connect the programs do not see (this thread is outside the cgroup) is not
    // marked: kube-proxy's DNAT still takes it to the pod.
    let direct = TcpStream::connect_timeout(&service, Duration::from_secs(10))
        .expect("kube-proxy's DNAT path still works");
    assert_eq!(direct.peer_addr().unwrap(), service);
    assert!(wait_until(|| accepted.load(Ordering::SeqCst) == N + 1));
    assert_eq!(
        packets(COMMENT),
        Some(N as u64),
        "the unmarked connect was not skipped"
    );
    assert_eq!(packets("kubernetes service portals"), Some(1));

    // What the agent does when it stops: the rule is gone, and balanced connects still
    // reach the pod (walking kube-proxy's rules again, matching nothing).
    let removed = skip.remove();
    assert_eq!(
        removed[0].1.as_ref().unwrap().delete.len(),
        1,
        "{removed:?}"
    );
    let listing = sh("iptables", &["-w", "5", "-t", "nat", "-S", "OUTPUT"]);
    assert!(!listing.contains(COMMENT), "left behind:\n{listing}");
    assert!(
        listing.contains("-j KUBE-SERVICES"),
        "kube-proxy's jump must stay:\n{listing}"
    );
    // A refresh racing the shutdown puts nothing back.
    assert_eq!(skip.ensure()[0].1.as_ref().unwrap(), &Plan::default());
    assert!(!sh("iptables", &["-w", "5", "-t", "nat", "-S", "OUTPUT"]).contains(COMMENT));
    assert_eq!(connect_from(cgroup.path(), service, 3), 3);
    assert!(wait_until(|| accepted.load(Ordering::SeqCst) == N + 4));
    assert_eq!(packets("kubernetes service portals"), Some(4));

    drop(direct);
    dp.detach().expect("detaching");
    let deadline = Instant::now() + WAIT;
    while !cgroup.processes().unwrap_or_default().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    cgroup.remove().expect("removing the test cgroup");
    drop(bpffs);
}
