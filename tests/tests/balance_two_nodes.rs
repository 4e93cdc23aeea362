//! Balance mode's cluster-wide load with two agents on the sandbox: node A's agent (the
//! sandbox's own) and node B's (a second agent with its own cgroup, pins and node
//! name), both in balance mode, both exchanging per-backend load through the
//! controller's load board. Connections held open from node A make node B's kernel
//! send its new connections to the other backend, which B's own counts alone would
//! never do (they are zero on both).

mod wake_support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use nemesis_agent::ebpf::cgroup::ChildCgroup;
use nemesis_agent::ebpf::pins::ScratchBpffs;
use nemesis_agent::ebpf::{Datapath, Mode, Proto, prereq};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use wake_support::{
    APP, CLIENT, NS, Options, POD_PORT, Scenario, WakeEnv, eventually, http_get, slow_server,
};

/// Open connections per backend as `dp` counts them (this node's, or the others').
fn counts(dp: &Datapath, svc: SocketAddr, remote: bool) -> anyhow::Result<Vec<(SocketAddr, u64)>> {
    let list = if remote {
        dp.remote_loads(svc, Proto::Tcp)?
    } else {
        dp.backends(svc, Proto::Tcp)?
    };
    Ok(list.iter().map(|b| (b.addr, b.open_now)).collect())
}

async fn scale(env: &WakeEnv, replicas: i32) -> anyhow::Result<()> {
    Api::<Deployment>::namespaced(env.client.clone(), NS)
        .patch_scale(
            APP,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .context("scaling the Deployment")?;
    Ok(())
}

/// Waits until `dp` balances the Service over `n` ready backends.
async fn wait_backends(dp: &Datapath, svc: SocketAddr, n: usize, who: &str) -> anyhow::Result<()> {
    eventually(
        &format!("{who}: {n} backends in balance mode"),
        Duration::from_secs(60),
        || async {
            let balanced = dp.service(svc, Proto::Tcp).map(|e| e.mode) == Some(Mode::Balance);
            Ok((balanced && dp.backends(svc, Proto::Tcp)?.len() == n).then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_held_from_one_node_steer_the_other_nodes_choices() -> anyhow::Result<()> {
    let env = WakeEnv::start_with_agent_flags(
        Scenario {
            name: "lb-two-nodes",
            pod: slow_server(),
            policy: json!({"maxReplicas": 2}),
            scale_on_wake: false,
        },
        Options::default(),
        &[("--direct-mode", "balance".to_string())],
    )
    .await?;
    let svc = env.service_addr;

    // Node B: its own cgroup, pins and node name, the same API server and controller.
    let unique = format!("lb-node-b-{}", std::process::id());
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let root = prereq::cgroup2_mount(&mounts).context("a cgroup2 mount (run as root)")?;
    let cg_b = ChildCgroup::create(&root, &format!("nemesis-wake-{unique}"))?;
    let bpffs_b = ScratchBpffs::mount(&format!("nemesis-wake-{unique}"))?;
    let agent_b = env
        .start_second_agent(&[
            ("--instance", format!("w-{unique}")),
            ("--cgroup", cg_b.path().display().to_string()),
            ("--bpffs", bpffs_b.path().display().to_string()),
            ("--node-name", "node-b".to_string()),
        ])
        .await?;
    eventually(
        "node B's agent to be ready",
        Duration::from_secs(30),
        || async { Ok((http_get(agent_b.admin_addr(), "/readyz").await?.0 == 200).then_some(())) },
    )
    .await?;
    let (dp_a, dp_b) = (env.agent().datapath(), agent_b.datapath());

    // One backend: six long connections from node A all go to it.
    scale(&env, 1).await?;
    wait_backends(dp_a, svc, 1, "node A").await?;
    wait_backends(dp_b, svc, 1, "node B").await?;
    let from_a = env
        .clients(&["--clients", "6", "--give-up-after", "120000"])
        .await?;
    let pod_1 = eventually(
        "node A's six connections",
        Duration::from_secs(30),
        || async {
            Ok(counts(dp_a, svc, false)?
                .into_iter()
                .find(|(_, n)| *n == 6)
                .map(|(a, _)| a))
        },
    )
    .await?;
    assert_eq!(pod_1.port(), POD_PORT);

    // A second backend: node B learns node A's load on the first one...
    scale(&env, 2).await?;
    wait_backends(dp_a, svc, 2, "node A").await?;
    wait_backends(dp_b, svc, 2, "node B").await?;
    let pod_2 = counts(dp_b, svc, false)?
        .into_iter()
        .map(|(a, _)| a)
        .find(|a| *a != pod_1)
        .context("a second backend")?;
    eventually(
        "node A's load at node B",
        Duration::from_secs(30),
        || async {
            let remote = counts(dp_b, svc, true)?;
            Ok((remote.contains(&(pod_1, 6)) && remote.contains(&(pod_2, 0))).then_some(()))
        },
    )
    .await?;
    assert_eq!(
        counts(dp_b, svc, false)?,
        {
            let mut zero = vec![(pod_1, 0), (pod_2, 0)];
            zero.sort();
            zero
        },
        "node B itself has no connection yet"
    );

    // ...so its four new long connections all go to the second one (its own counts
    // alone are equal, and two choices would split them two and two).
    let mut cmd = tokio::process::Command::new(CLIENT);
    cmd.args(["--clients", "4", "--give-up-after", "120000"])
        .arg("--connect")
        .arg(svc.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut from_b = cmd.spawn().context("spawning the node B client")?;
    cg_b.add_process(from_b.id().context("the client's pid")?)?;
    let mut go = from_b.stdin.take().context("client stdin")?;
    go.write_all(b"go\n").await?;
    drop(go);
    eventually(
        "node B's four connections",
        Duration::from_secs(30),
        || async {
            let local = counts(dp_b, svc, false)?;
            Ok((local.iter().map(|(_, n)| n).sum::<u64>() == 4).then_some(local))
        },
    )
    .await?;
    let local_b = counts(dp_b, svc, false)?;
    assert!(
        local_b.contains(&(pod_2, 4)) && local_b.contains(&(pod_1, 0)),
        "node B ignored node A's load: {local_b:?}"
    );
    // And node A hears of node B's in turn.
    eventually(
        "node B's load at node A",
        Duration::from_secs(30),
        || async {
            let remote = counts(dp_a, svc, true)?;
            Ok((remote.contains(&(pod_2, 4)) && remote.contains(&(pod_1, 0))).then_some(()))
        },
    )
    .await?;

    drop(from_a);
    let _ = from_b.kill().await;
    let _ = from_b.wait().await;
    agent_b
        .shutdown()
        .await
        .context("stopping node B's agent")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cg_b.processes().unwrap_or_default().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cg_b.remove().context("removing node B's cgroup")?;
    drop(bpffs_b);
    env.shutdown().await
}
