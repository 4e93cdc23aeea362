//! StatefulSets through the sandbox, driven by kube-rs and the real kubectl: pods with
//! stable names created one ordinal at a time over ready predecessors, scaled through
//! the `/scale` subresource (its status carries the selector), removed from the highest
//! ordinal down, and `kubectl get`/`scale` reading and writing them. Root required.

mod kubelet_support;

use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use kubelet_support::{Env, server_deployment, wait_for};

fn stateful_set(name: &str) -> anyhow::Result<StatefulSet> {
    let mut v = serde_json::to_value(server_deployment(name, 0, &[], serde_json::json!({}), 1))?;
    v["spec"]["serviceName"] = serde_json::json!(name);
    v["kind"] = serde_json::json!("StatefulSet");
    v["spec"]
        .as_object_mut()
        .context("a spec")?
        .remove("strategy");
    Ok(serde_json::from_value(v)?)
}

async fn kubectl(env: &Env, args: &[&str]) -> anyhow::Result<String> {
    let home = tempfile::tempdir()?;
    let out = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(env.server.kubeconfig_path())
        .arg("-n")
        .arg(&env.ns)
        .args(args)
        .env("HOME", home.path())
        .kill_on_drop(true)
        .output()
        .await
        .context("running kubectl")?;
    ensure!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateful_pods_keep_their_names_and_come_and_go_in_order() -> anyhow::Result<()> {
    let env = Env::start("kubelet-sts").await?;
    let sets: Api<StatefulSet> = Api::namespaced(env.client.clone(), &env.ns);
    sets.create(&PostParams::default(), &stateful_set("db")?)
        .await?;
    let scale = sets
        .patch_scale(
            "db",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 3}})),
        )
        .await?;
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));

    // Ordinals appear one at a time: never a higher one before every lower one is ready.
    let seen_out_of_order = std::sync::Mutex::new(Vec::new());
    wait_for("three ready pods db-0..2", Duration::from_secs(60), || {
        let env = &env;
        let seen = &seen_out_of_order;
        async move {
            let pods = env.pods().list(&ListParams::default()).await?.items;
            let ready = |n: &str| {
                pods.iter()
                    .any(|p| p.name_any() == n && kubelet_support::pod_ready(p))
            };
            for (i, higher) in ["db-1", "db-2"].iter().enumerate() {
                let lower = format!("db-{i}");
                if pods.iter().any(|p| p.name_any() == *higher) && !ready(&lower) {
                    seen.lock()
                        .unwrap()
                        .push(format!("{higher} while {lower} not ready"));
                }
            }
            Ok((ready("db-0") && ready("db-1") && ready("db-2")).then_some(()))
        }
    })
    .await?;
    let seen = seen_out_of_order.into_inner().unwrap();
    ensure!(seen.is_empty(), "{seen:?}");
    let s = wait_for("the status", Duration::from_secs(30), || async {
        let s = sets.get("db").await?;
        let st = s.status.clone().unwrap_or_default();
        Ok(
            (st.ready_replicas == Some(3) && st.observed_generation == s.metadata.generation)
                .then_some(st),
        )
    })
    .await?;
    assert_eq!(s.replicas, 3);
    let pod = env.pods().get("db-1").await?;
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.hostname.as_deref()),
        Some("db-1")
    );
    assert_eq!(pod.labels()["statefulset.kubernetes.io/pod-name"], "db-1");
    assert_eq!(pod.owner_references()[0].kind, "StatefulSet");
    let scale = sets.get_scale("db").await?;
    let st = scale.status.context("a scale status")?;
    assert_eq!((st.replicas, st.selector.as_deref()), (3, Some("app=db")));
    let table = kubectl(&env, &["get", "statefulset", "db"]).await?;
    ensure!(table.contains("3/3"), "{table}");

    // Down from the highest ordinal, with kubectl this time.
    kubectl(&env, &["scale", "statefulset/db", "--replicas=1"]).await?;
    wait_for("only db-0 left", Duration::from_secs(60), || async {
        let names: Vec<String> = env
            .pods()
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|p| p.name_any())
            .collect();
        Ok((names == ["db-0"]).then_some(()))
    })
    .await?;
    env.shutdown().await
}
