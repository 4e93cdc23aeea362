//! `kubectl logs` and `kubectl describe pod` against the sandbox: container output
//! reaches the API server's `pods/log` through the Node's kubelet endpoint (tail, limit,
//! follow, container choice), and the kubelet records the Events a cluster shows
//! (Scheduled, Pulled, Created, Started, Unhealthy on a failing readiness probe, Killing).
//! Through kube-rs and the real kubectl. Root required.

mod kubelet_support;

use std::time::Duration;

use anyhow::{Context as _, ensure};
use futures::{AsyncBufReadExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kubelet_support::{Env, wait_for};
use serde_json::json;

async fn kubectl(env: &Env, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let home = tempfile::tempdir()?;
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(env.server.kubeconfig_path())
            .arg("-n")
            .arg(&env.ns)
            .args(args)
            .env("HOME", home.path())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("kubectl timed out")?
    .context("running kubectl")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A pod bound to the sandbox's node (as a scheduler would have bound it: an unbound
/// pod has no kubelet to read logs from).
fn pod(env: &Env, name: &str, containers: serde_json::Value) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {"nemesis.test/probe-period-ms": "100"}},
        "spec": {"nodeName": env.sandbox.node_name(), "terminationGracePeriodSeconds": 1,
                 "containers": containers},
    }))?)
}

async fn running(env: &Env, name: &str) -> anyhow::Result<()> {
    wait_for(
        &format!("{name} running"),
        Duration::from_secs(30),
        || async {
            let p = env.pods().get(name).await?;
            let phase = p.status.and_then(|s| s.phase);
            Ok((phase.as_deref() == Some("Running")).then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_reads_container_output_through_the_node() -> anyhow::Result<()> {
    let env = Env::start("kubelet-logs").await?;
    let script = "for i in 1 2 3; do echo line $i; done; sleep 1.5; echo late; sleep 60";
    env.pods()
        .create(
            &PostParams::default(),
            &pod(
                &env,
                "talker",
                json!([{"name": "main", "image": "busybox", "command": ["sh", "-c", script]}]),
            )?,
        )
        .await?;
    running(&env, "talker").await?;
    let node: Api<Node> = Api::all(env.client.clone());
    let n = node.get(env.sandbox.node_name()).await?;
    ensure!(
        n.status
            .and_then(|s| s.daemon_endpoints)
            .and_then(|d| d.kubelet_endpoint)
            .is_some(),
        "the sandbox's Node names its kubelet endpoint"
    );

    // Follow from the start: the lines there are, then the one written later.
    let pods = env.pods();
    let stream = pods
        .log_stream(
            "talker",
            &LogParams {
                follow: true,
                ..LogParams::default()
            },
        )
        .await?;
    let mut lines = stream.lines();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.try_next().await? {
            seen.push(line);
            if seen.last().map(String::as_str) == Some("late") {
                break;
            }
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("following the log; saw {seen:?}"))??;
    assert_eq!(seen, ["line 1", "line 2", "line 3", "late"]);

    let (ok, out, err) = kubectl(&env, &["logs", "talker"]).await?;
    ensure!(ok, "{err}");
    assert_eq!(out, "line 1\nline 2\nline 3\nlate\n");
    let (ok, out, err) = kubectl(&env, &["logs", "talker", "--tail=2"]).await?;
    ensure!(ok, "{err}");
    assert_eq!(out, "line 3\nlate\n");
    let tail = pods
        .logs(
            "talker",
            &LogParams {
                limit_bytes: Some(6),
                ..LogParams::default()
            },
        )
        .await?;
    assert_eq!(tail, "line 1");

    // Two containers and no choice: upstream's refusal.
    env.pods()
        .create(
            &PostParams::default(),
            &pod(
                &env,
                "pair",
                json!([{"name": "a", "image": "x", "command": ["sleep", "60"]},
                       {"name": "b", "image": "x", "command": ["sleep", "60"]}]),
            )?,
        )
        .await?;
    running(&env, "pair").await?;
    match pods.logs("pair", &LogParams::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 400);
            assert_eq!(
                s.message,
                "a container name must be specified for pod pair, choose one of: [a b]"
            );
        }
        other => anyhow::bail!("expected a 400, got {other:?}"),
    }
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_describe_pod_lists_the_kubelets_events() -> anyhow::Result<()> {
    let env = Env::start("kubelet-events").await?;
    env.pods()
        .create(
            &PostParams::default(),
            &pod(
                &env,
                "sick",
                json!([{"name": "app", "image": "local/app:1", "command": ["sleep", "60"],
                        "readinessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1}}]),
            )?,
        )
        .await?;
    running(&env, "sick").await?;
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    let reasons = || async {
        let list = events.list(&ListParams::default()).await?.items;
        anyhow::Ok(
            list.into_iter()
                .filter(|e| e.involved_object.name.as_deref() == Some("sick"))
                .map(|e| {
                    (
                        e.reason.unwrap_or_default(),
                        e.message.unwrap_or_default(),
                        e.count,
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    wait_for(
        "Scheduled, Pulled, Created, Started and Unhealthy",
        Duration::from_secs(30),
        || async {
            let got = reasons().await?;
            let has = |r: &str| got.iter().any(|(x, _, _)| x == r);
            Ok(["Scheduled", "Pulled", "Created", "Started", "Unhealthy"]
                .iter()
                .all(|r| has(r))
                .then_some(()))
        },
    )
    .await?;
    // Repeated probe failures are one Event with a count, as the kubelet aggregates.
    wait_for(
        "the Unhealthy Event counted twice",
        Duration::from_secs(30),
        || async {
            let got = reasons().await?;
            Ok(got
                .iter()
                .any(|(r, m, c)| {
                    r == "Unhealthy"
                        && m.starts_with("Readiness probe failed")
                        && c.unwrap_or(0) >= 2
                })
                .then_some(()))
        },
    )
    .await?;
    let (ok, out, err) = kubectl(&env, &["describe", "pod", "sick"]).await?;
    ensure!(ok, "{err}");
    for want in [
        "Successfully assigned",
        "Container image \"local/app:1\" already present on machine",
        "Started container app",
        "Readiness probe failed",
    ] {
        ensure!(out.contains(want), "describe lacks {want:?}:\n{out}");
    }
    env.pods().delete("sick", &DeleteParams::default()).await?;
    wait_for("a Killing Event", Duration::from_secs(30), || async {
        let got = reasons().await?;
        Ok(got
            .iter()
            .any(|(r, m, _)| r == "Killing" && m == "Stopping container app")
            .then_some(()))
    })
    .await?;
    env.shutdown().await
}
