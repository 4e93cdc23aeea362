//! Balance mode's cluster-wide load with two agents on the sandbox and the real
//! controller: node A's agent (the sandbox's own) and node B's (a second agent with its
//! own cgroup, pins, node name and token bound to a pod of node B), both in balance
//! mode, both exchanging per-backend load through the real controller's agent API
//! (`POST /v1/agents/loads`, each agent authenticated as its own node). Connections
//! held open from node A make node B's kernel send its new connections to the other
//! backend, which B's own counts alone would never do (they are zero on both); and B's
//! picture of A's load is fresh within one exchange of each node after A's change (the
//! agent's half-second interval makes that at most about a second).

mod wake_support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams};
use nemesis_agent::ebpf::cgroup::ChildCgroup;
use nemesis_agent::ebpf::pins::ScratchBpffs;
use nemesis_agent::ebpf::{Datapath, Mode, Proto, prereq};
use nemesis_agent::services::scaling_policy_resource;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use wake_support::{
    APP, CLIENT, Metrics, NS, Options, POD_PORT, Scenario, WakeEnv, eventually, http_get,
    slow_server,
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

/// The ScalingPolicy keeping exactly `replicas` warm (the real controller scales the
/// Deployment to it, and back if anyone else scales it).
fn policy(replicas: i32) -> serde_json::Value {
    json!({
        "target": {"deployment": APP, "service": APP},
        "minReplicas": replicas,
        "maxReplicas": replicas,
    })
}

/// Has the real controller keep `replicas` warm.
async fn scale(env: &WakeEnv, replicas: i32) -> anyhow::Result<()> {
    Api::<DynamicObject>::namespaced_with(env.client.clone(), NS, &scaling_policy_resource())
        .patch(
            APP,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": policy(replicas) })),
        )
        .await
        .context("patching the ScalingPolicy")?;
    eventually(
        &format!("the Deployment at {replicas} replicas"),
        Duration::from_secs(60),
        || async { Ok((env.replicas().await? == replicas).then_some(())) },
    )
    .await
}

/// Load exchanges the agent serving admin requests at `admin` completed with the
/// controller (`nemesis_agent_load_exchanges_total{result="ok"}`).
async fn exchanges(admin: SocketAddr) -> anyhow::Result<u64> {
    let (status, text) = http_get(admin, "/metrics").await?;
    anyhow::ensure!(status == 200, "{admin}/metrics answered {status}");
    Ok(Metrics::parse(&text).sum("nemesis_agent_load_exchanges_total", &[("result", "ok")]) as u64)
}

/// Waits until the agent at `admin` has completed two more load exchanges than `from`:
/// the second of them started after the first ended, so after this call began.
async fn two_more_exchanges(admin: SocketAddr, from: u64, who: &str) -> anyhow::Result<()> {
    eventually(
        &format!("two more load exchanges of {who} with the controller"),
        Duration::from_secs(60),
        || async { Ok((exchanges(admin).await? >= from + 2).then_some(())) },
    )
    .await
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
            policy: json!({}),
            scale_on_wake: false,
        },
        Options {
            policy_spec: Some(policy(1)),
            real_controller: Some(vec![]),
            // The policy keeps a replica warm from the start: the Service is never held.
            skip_ready_wait: true,
            ..Options::default()
        },
        &[("--direct-mode", "balance".to_string())],
    )
    .await?;
    let svc = env.service_addr;
    eventually(
        "node A's agent to be ready",
        Duration::from_secs(60),
        || async { Ok((env.http_get_admin("/readyz").await?.0 == 200).then_some(())) },
    )
    .await?;

    // Node B: its own cgroup, pins, node name and identity (a token bound to a pod of
    // node B, which the real controller reviews), the same API server and controller.
    let unique = format!("lb-node-b-{}", std::process::id());
    let node_b = "node-b";
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let root = prereq::cgroup2_mount(&mounts).context("a cgroup2 mount (run as root)")?;
    let cg_b = ChildCgroup::create(&root, &format!("nemesis-wake-{unique}"))?;
    let bpffs_b = ScratchBpffs::mount(&format!("nemesis-wake-{unique}"))?;
    let dir_b = tempfile::tempdir()?;
    let token_b = dir_b.path().join("agent-token");
    std::fs::write(
        &token_b,
        nemesis_tests::agent_token::mint_agent_token(&env.client, node_b).await? + "\n",
    )?;
    let agent_b = env
        .start_second_agent(&[
            ("--instance", format!("w-{unique}")),
            ("--cgroup", cg_b.path().display().to_string()),
            ("--bpffs", bpffs_b.path().display().to_string()),
            ("--node-name", node_b.to_string()),
            ("--agent-token-file", token_b.display().to_string()),
        ])
        .await?;
    eventually(
        "node B's agent to be ready",
        Duration::from_secs(60),
        || async { Ok((http_get(agent_b.admin_addr(), "/readyz").await?.0 == 200).then_some(())) },
    )
    .await?;
    let (dp_a, dp_b) = (env.agent().datapath(), agent_b.datapath());

    // One backend: six long connections from node A all go to it.
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
    let opened = std::time::Instant::now();
    assert_eq!(pod_1.port(), POD_PORT);

    // How fresh node B's picture is, counted in exchanges rather than seconds (the
    // machine may be slow): once node A has made one exchange that started after its
    // connections opened, and node B one that started after that, B's remote loads
    // show them. Each exchange is half a second apart, so that is at most about a
    // second on an idle machine.
    let (admin_a, admin_b) = (env.agent().admin_addr(), agent_b.admin_addr());
    let rounds = async {
        two_more_exchanges(admin_a, exchanges(admin_a).await?, "node A").await?;
        two_more_exchanges(admin_b, exchanges(admin_b).await?, "node B").await
    };
    // Beside it, when the load actually showed up at node B (for the log).
    let seen = async {
        eventually(
            "node A's load at node B",
            Duration::from_secs(60),
            || async {
                Ok(counts(dp_b, svc, true)?
                    .contains(&(pod_1, 6))
                    .then(|| opened.elapsed()))
            },
        )
        .await
    };
    let ((), seen_after) = tokio::try_join!(rounds, seen)?;
    assert_eq!(
        counts(dp_b, svc, true)?,
        vec![(pod_1, 6)],
        "node B's picture of node A's load, one exchange of each after the change"
    );
    eprintln!(
        "node A's six connections showed in node B's picture {seen_after:?} after they opened"
    );

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
