//! `kubectl apply -k` installs Nemesis in the sandbox as on a cluster (issue 10, point
//! 2): the agent DaemonSet and the controller StatefulSet come up from the images of
//! `cargo xtask image`, with the manifests' own args, env, volumes, ServiceAccounts and
//! RBAC; then a wake and a sleep go through the installed Nemesis. Root required (eBPF,
//! network namespaces, chroot).

mod install_support;
mod wake_support;

use std::time::Duration;

use anyhow::{Context as _, ensure};
use install_support::{APP, APP_NS, Installed, SYSTEM_NS};

/// The policy's idle window: long enough that the woken app is seen at one replica.
const IDLE: &str = "15s";
/// A cold start through the installed agent and controller, on a loaded machine.
const WAKE_TIMEOUT: Duration = Duration::from_secs(90);
/// The idle window, the agents' acknowledgement of the hold, the pod's grace.
const SLEEP_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_k_installs_from_images_and_the_installed_nemesis_wakes_and_sleeps()
-> anyhow::Result<()> {
    let env = Installed::install("applyk").await?;
    // What runs is what the manifests say: the images' binaries as the ServiceAccounts.
    let pods = env
        .kubectl(&["-n", SYSTEM_NS, "get", "pods", "-o", "wide"])
        .await?;
    ensure!(
        pods.lines().filter(|l| l.contains("Running")).count() == 3,
        "one agent and two controllers running:\n{pods}"
    );
    env.app(IDLE).await?;
    env.wait_held(Duration::from_secs(60))
        .await
        .with_context(|| env.diagnostics())?;

    // The wake: a client held by the installed agent, the installed controller scales.
    let result = env.request(WAKE_TIMEOUT).await?;
    let response = result.http().with_context(|| env.diagnostics())?;
    ensure!(
        response.status == 200,
        "the woken app answered {response:?}"
    );
    env.wait_replicas(1, Duration::from_secs(30)).await?;

    // The sleep: after the idle window the controller holds the Service again and
    // scales the app to zero.
    env.wait_replicas(0, SLEEP_TIMEOUT)
        .await
        .with_context(|| env.diagnostics())?;
    env.wait_held(Duration::from_secs(30)).await?;
    let policy = env
        .kubectl(&[
            "-n",
            APP_NS,
            "get",
            "scalingpolicy",
            APP,
            "-o",
            "jsonpath={.status.state}",
        ])
        .await?;
    ensure!(
        policy == "zero",
        "the policy's state after the sleep: {policy:?}"
    );

    // Both components spoke to the API as their ServiceAccounts, refused nothing.
    let requests = env.server.as_ref().context("the API server")?.requests();
    for user in [
        "system:serviceaccount:nemesis-system:nemesis-controller",
        "system:serviceaccount:nemesis-system:nemesis-agent",
    ] {
        ensure!(
            requests.iter().any(|r| r.user == user),
            "no request from {user}"
        );
    }
    let refused: Vec<_> = requests
        .iter()
        .filter(|r| r.status == 403 || r.status == 401)
        .map(|r| format!("{} {} {} -> {}", r.user, r.method, r.path, r.status))
        .collect();
    ensure!(refused.is_empty(), "refused: {refused:#?}");
    env.shutdown().await
}

/// Issue 10, point 6: install, wake, sleep, then uninstall exactly as
/// manifests/README.md says (policies, the agent DaemonSet, the per-node cleanup from
/// manifests/uninstall/, then `kubectl delete -k`), and list what is left: no pins, no
/// program attached (bpftool), no hold EndpointSlice, no CRD or policy, no namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installed_nemesis_uninstalls_as_the_readme_says_and_leaves_nothing_behind()
-> anyhow::Result<()> {
    let env = Installed::install("uninst").await?;
    env.app(IDLE).await?;
    env.wait_held(Duration::from_secs(60))
        .await
        .with_context(|| env.diagnostics())?;
    let response = env.request(WAKE_TIMEOUT).await?.http()?;
    ensure!(
        response.status == 200,
        "the woken app answered {response:?}"
    );
    env.wait_replicas(1, Duration::from_secs(30)).await?;
    env.wait_replicas(0, SLEEP_TIMEOUT).await?;
    env.wait_held(Duration::from_secs(30)).await?;
    // Installed: programs attached to the node's (the run's) cgroup, pins on its bpffs.
    ensure!(
        !env.attached_programs().await?.is_empty(),
        "the installed agent attached its programs"
    );
    ensure!(
        env.pins().exists(),
        "the agent pinned under {}",
        env.pins().display()
    );

    // The uninstall, step by step as manifests/README.md has it.
    env.kubectl(&["delete", "scalingpolicies", "--all", "-A"])
        .await?;
    env.kubectl_within(
        Duration::from_secs(90),
        &[
            "-n",
            SYSTEM_NS,
            "delete",
            "daemonset",
            "nemesis-agent",
            "--wait",
        ],
    )
    .await?;
    wake_support::eventually("the agent's pod gone", Duration::from_secs(90), || async {
        let out = env
            .kubectl(&[
                "-n",
                SYSTEM_NS,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=nemesis-agent",
                "-o",
                "name",
            ])
            .await?;
        Ok(out.trim().is_empty().then_some(()))
    })
    .await?;
    // A stopping agent leaves its datapath for its successor: the cleanup removes it.
    ensure!(
        !env.attached_programs().await?.is_empty(),
        "the stopped agent left its programs (as a restart needs)"
    );
    let cleanup = env.write_cleanup_kustomization()?;
    let cleanup = cleanup.display().to_string();
    env.kubectl(&["apply", "-k", &cleanup]).await?;
    env.kubectl_within(
        install_support::ROLLOUT_TIMEOUT + Duration::from_secs(10),
        &[
            "-n",
            SYSTEM_NS,
            "rollout",
            "status",
            "daemonset/nemesis-agent-cleanup",
            &format!("--timeout={}s", install_support::ROLLOUT_TIMEOUT.as_secs()),
        ],
    )
    .await
    .with_context(|| env.diagnostics())?;
    let logs = env
        .kubectl(&[
            "-n",
            SYSTEM_NS,
            "logs",
            "-l",
            "app.kubernetes.io/name=nemesis-agent-cleanup",
            "-c",
            "cleanup",
        ])
        .await?;
    ensure!(!logs.trim().is_empty(), "the cleanup says what it did");
    env.kubectl_within(Duration::from_secs(90), &["delete", "-k", &cleanup])
        .await?;
    let install = env.install_dir().display().to_string();
    env.kubectl_within(
        Duration::from_secs(120),
        &["delete", "-k", &install, "--ignore-not-found"],
    )
    .await?;

    // What is left.
    ensure!(
        env.attached_programs().await?.is_empty(),
        "programs still attached: {:?}",
        env.attached_programs().await?
    );
    ensure!(
        !env.pins().exists() || std::fs::read_dir(env.pins())?.next().is_none(),
        "pins left under {}",
        env.pins().display()
    );
    let slices = env
        .kubectl(&[
            "-n",
            APP_NS,
            "get",
            "endpointslices",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.labels.endpointslice\\.kubernetes\\.io/managed-by}{\"\\n\"}{end}",
        ])
        .await?;
    ensure!(
        !slices.contains("nemesis"),
        "hold EndpointSlices left:\n{slices}"
    );
    for (what, args) in [
        ("the CRD", vec!["get", "crd", "-o", "name"]),
        ("the namespace", vec!["get", "namespaces", "-o", "name"]),
        (
            "the cluster roles",
            vec!["get", "clusterroles", "-o", "name"],
        ),
    ] {
        wake_support::eventually(&format!("{what} gone"), Duration::from_secs(60), || async {
            let out = env.kubectl(&args).await?;
            Ok((!out.contains("nemesis")).then_some(()))
        })
        .await?;
    }
    // The app stays, at zero, as the README warns.
    env.wait_replicas(0, Duration::from_secs(5)).await?;
    env.shutdown().await
}
