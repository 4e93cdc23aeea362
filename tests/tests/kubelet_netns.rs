//! Pod networking against the real kernel: namespaces, veths and the bridge of a
//! sandbox carry traffic from the root namespace and between pods, and vanish on
//! teardown. Root required.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use nemesis_tests::netns::PodNetwork;

fn netns_exists(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .unwrap()
        .status
        .success()
}

/// Connects to `addr` until it answers or `deadline` passes (ARP may take a moment).
fn connect_until(addr: SocketAddr, within: Duration) -> anyhow::Result<TcpStream> {
    let start = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > within => anyhow::bail!("connect {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[tokio::test]
async fn pods_are_reachable_from_the_root_namespace_and_each_other_then_vanish()
-> anyhow::Result<()> {
    let net = PodNetwork::create().await?;
    let a = net.attach().await?;
    let b = net.attach().await?;
    assert_ne!(a.ip(), b.ip());
    assert!(netns_exists(a.name()) && netns_exists(b.name()));

    // A one-shot echo server inside pod a, bound to its pod IP only.
    let server = Command::new("ip")
        .args(["netns", "exec", a.name(), "python3", "-c"])
        .arg(format!(
            "import socket\ns=socket.socket(); s.bind(('{}', 7000)); s.listen()\n\
             for _ in range(2):\n  c,_=s.accept(); c.sendall(c.recv(64)); c.close()",
            a.ip()
        ))
        .spawn()?;

    // From the root namespace through the bridge.
    let mut s = connect_until(SocketAddr::from((a.ip(), 7000)), Duration::from_secs(10))?;
    s.write_all(b"root")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    assert_eq!(buf, "root");

    // From pod b: its default route via the bridge reaches pod a.
    let out = Command::new("ip")
        .args(["netns", "exec", b.name(), "python3", "-c"])
        .arg(format!(
            "import socket\ns=socket.create_connection(('{}', 7000), 5); s.sendall(b'pod'); print(s.recv(64).decode(), end='')",
            a.ip()
        ))
        .output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pod", "{out:?}");
    let mut server = server;
    server.wait()?;

    let (a_name, bridge) = (a.name().to_string(), net.bridge().to_string());
    a.teardown().await?;
    assert!(!netns_exists(&a_name));
    b.teardown().await?;
    net.shutdown().await?;
    assert!(!link_exists(&bridge));
    Ok(())
}

#[tokio::test]
async fn parallel_sandboxes_get_distinct_subnets_and_drop_cleans_up() -> anyhow::Result<()> {
    let one = PodNetwork::create().await?;
    let two = PodNetwork::create().await?;
    assert_ne!(one.subnet(), two.subnet());
    assert_ne!(one.bridge(), two.bridge());
    let pod = one.attach().await?;
    let (ns, bridge) = (pod.name().to_string(), one.bridge().to_string());
    drop(pod);
    drop(one);
    assert!(!netns_exists(&ns), "netns {ns} left after drop");
    assert!(!link_exists(&bridge), "bridge {bridge} left after drop");
    two.shutdown().await?;
    Ok(())
}

/// Takes a subnet no sandbox holds and builds, by hand, what a sandbox killed with
/// SIGKILL leaves behind: bridge, pod namespace with a process inside, veth.
fn abandon_a_subnet(marker: &str) -> (u16, std::process::Child) {
    use nemesis_tests::netns::{LOCK_DIR, SUBNETS, bridge_name, netns_name, veth_name};
    use nix::fcntl::{Flock, FlockArg};
    std::fs::create_dir_all(LOCK_DIR).unwrap();
    for index in (0..SUBNETS).rev() {
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(format!("{LOCK_DIR}/subnet-{index}.lock"))
            .unwrap();
        let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        if link_exists(&bridge_name(index)) {
            continue;
        }
        let (ns, veth, bridge) = (
            netns_name(index, 9),
            veth_name(index, 9),
            bridge_name(index),
        );
        for args in [
            vec!["link", "add", &bridge, "type", "bridge"],
            vec!["netns", "add", &ns],
            vec![
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
            vec!["link", "set", &veth, "master", &bridge],
        ] {
            assert!(
                Command::new("ip").args(&args).status().unwrap().success(),
                "{args:?}"
            );
        }
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "sleep", "300"])
            .env("NEMESIS_ABANDONED", marker)
            .spawn()
            .unwrap();
        // The lock goes with this scope, as it would with the dead process.
        drop(lock);
        return (index, child);
    }
    panic!("no free subnet to abandon");
}

fn marked_processes(marker: &str) -> usize {
    let entry = format!("NEMESIS_ABANDONED={marker}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == entry.as_bytes()))
        })
        .count()
}

#[tokio::test]
async fn a_new_sandbox_removes_what_a_killed_one_left_behind() -> anyhow::Result<()> {
    let marker = format!("{}", std::process::id());
    let (index, mut abandoned) = abandon_a_subnet(&marker);
    let start = Instant::now();
    while marked_processes(&marker) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the abandoned process never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let net = PodNetwork::create().await?;
    assert!(!netns_exists(&nemesis_tests::netns::netns_name(index, 9)));
    assert!(!link_exists(&nemesis_tests::netns::veth_name(index, 9)));
    assert!(!link_exists(&nemesis_tests::netns::bridge_name(index)));
    let start = Instant::now();
    while abandoned.try_wait()?.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the abandoned process survived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(marked_processes(&marker), 0);
    net.shutdown().await?;
    Ok(())
}

/// Addresses are reused lowest first; when the bridge keeps its MAC (another pod's veth
/// holds it), the node still maps a freed address to the previous pod's MAC for 15-45 s
/// (a REACHABLE neighbour entry), and a new pod with that address is unreachable until
/// it expires: a woken app once stayed unready past its request's timeout. The stale
/// entry is set by hand here, as the kernel would have kept it.
#[tokio::test]
async fn a_reused_pod_address_does_not_keep_the_previous_pods_mac() -> anyhow::Result<()> {
    let net = PodNetwork::create().await?;
    let _other = net.attach().await?;
    let first = net.attach().await?;
    let ip = first.ip();
    first.teardown().await?;
    let stale = "02:00:5e:10:20:30";
    let status = Command::new("ip")
        .args(["neigh", "replace", &ip.to_string(), "lladdr", stale])
        .args(["dev", net.bridge(), "nud", "reachable"])
        .status()?;
    assert!(status.success(), "ip neigh replace: {status}");

    let reused = net.attach().await?;
    assert_eq!(reused.ip(), ip, "the freed address is reused first");
    let neigh = Command::new("ip")
        .args(["neigh", "show", "to", &ip.to_string(), "dev", net.bridge()])
        .output()?;
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(
        !neigh.contains(stale),
        "the node still maps {ip} to the previous pod's MAC: {neigh}"
    );

    // And the new pod answers (ARP resolves its own MAC).
    let server = Command::new("ip")
        .args(["netns", "exec", reused.name(), "python3", "-c"])
        .arg(format!(
            "import socket\ns=socket.socket(); s.bind(('{ip}', 7000)); s.listen()\n\
             c,_=s.accept(); c.sendall(c.recv(64)); c.close()"
        ))
        .spawn()?;
    let mut s = connect_until(SocketAddr::from((ip, 7000)), Duration::from_secs(60))?;
    s.write_all(b"again")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    assert_eq!(buf, "again");
    let mut server = server;
    server.wait()?;
    Ok(())
}
