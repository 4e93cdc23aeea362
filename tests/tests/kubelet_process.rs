//! Container processes on the real kernel, without an API server: started in the pod's
//! network namespace with its environment and log file, held back by a start delay,
//! and stopped with their whole process group. Root required.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nemesis_tests::kubelet::process::{ContainerProcess, Launch, exit_code};
use nemesis_tests::netns::PodNetwork;

const SERVER: &str = env!("CARGO_BIN_EXE_nemesis-pod-server");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "nemesis-kubelet-process-{name}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn launch(netns: &str, argv: &[&str], env: &[(&str, &str)], dir: &std::path::Path) -> Launch {
    Launch {
        netns: netns.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        working_dir: dir.to_path_buf(),
        start_delay: Duration::ZERO,
        log_path: dir.join("container.log"),
        cgroup: None,
        service_account: None,
        host_network: false,
        image: None,
    }
}

fn pids_with_env(entry: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            environ
                .split(|b| *b == 0)
                .any(|v| v == entry.as_bytes())
                .then_some(pid)
        })
        .collect()
}

async fn listening(addr: std::net::SocketAddr) -> bool {
    tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

#[tokio::test]
async fn a_container_runs_in_its_netns_with_its_env_and_logs_and_honours_the_start_delay()
-> anyhow::Result<()> {
    let net = PodNetwork::create().await?;
    let pod = net.attach().await?;
    let dir = scratch("delay");
    let ip = pod.ip().to_string();
    let mut l = launch(
        pod.name(),
        &[SERVER, "--port", "8080"],
        &[("POD_IP", &ip), ("POD_NAME", "delayed-pod")],
        &dir,
    );
    l.start_delay = Duration::from_millis(1200);
    let started = Instant::now();
    let mut process = ContainerProcess::spawn(&l)?;
    let addr = std::net::SocketAddr::from((pod.ip(), 8080));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!listening(addr).await, "listening during the start delay");
    assert!(process.exit_status().is_none());
    while !listening(addr).await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1200));
    // Bound to the pod IP inside the namespace: the root namespace has no such address.
    assert!(std::net::TcpListener::bind(addr).is_err());
    let stopped = process.stop(Duration::from_secs(5)).await;
    assert!(!stopped.killed);
    assert_eq!(exit_code(stopped.status), 0);
    let log = std::fs::read_to_string(dir.join("container.log"))?;
    assert!(
        log.contains(&format!("delayed-pod listening on {ip}:8080")),
        "{log:?}"
    );
    pod.teardown().await?;
    net.shutdown().await?;
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[tokio::test]
async fn stop_takes_the_whole_process_group_and_sigkills_after_the_grace() -> anyhow::Result<()> {
    let net = PodNetwork::create().await?;
    let pod = net.attach().await?;
    let dir = scratch("group");
    let marker = format!("NEMESIS_PROCESS_TEST={}", std::process::id());
    let (key, value) = marker.split_once('=').unwrap();
    // The main process ignores SIGTERM and leaves a child behind in its group.
    let l = launch(
        pod.name(),
        &["sh", "-c", "trap '' TERM; sleep 300 & exec sleep 301"],
        &[(key, value)],
        &dir,
    );
    let mut process = ContainerProcess::spawn(&l)?;
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = pids_with_env(&marker);
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.len(), 2, "main process and its child");
    let asked = Instant::now();
    let grace = Duration::from_millis(800);
    let stopped = process.stop(grace).await;
    assert!(stopped.killed, "SIGTERM was ignored, so SIGKILL was needed");
    assert!(asked.elapsed() >= grace);
    assert_eq!(exit_code(stopped.status), 137);
    // Give the kernel a moment to reap the orphaned child.
    for _ in 0..50 {
        if pids_with_env(&marker).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        pids_with_env(&marker),
        Vec::<u32>::new(),
        "a process of the group survived"
    );
    pod.teardown().await?;
    net.shutdown().await?;
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
