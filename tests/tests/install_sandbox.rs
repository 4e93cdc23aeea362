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
    ensure!(response.status == 200, "the woken app answered {response:?}");
    env.wait_replicas(1, Duration::from_secs(30)).await?;

    // The sleep: after the idle window the controller holds the Service again and
    // scales the app to zero.
    env.wait_replicas(0, SLEEP_TIMEOUT)
        .await
        .with_context(|| env.diagnostics())?;
    env.wait_held(Duration::from_secs(30)).await?;
    let policy = env
        .kubectl(&["-n", APP_NS, "get", "scalingpolicy", APP, "-o", "jsonpath={.status.state}"])
        .await?;
    ensure!(policy == "zero", "the policy's state after the sleep: {policy:?}");

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
