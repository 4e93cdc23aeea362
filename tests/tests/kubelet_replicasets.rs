//! Deployments own ReplicaSets that own Pods, as in a cluster, driven through kube-rs
//! and the real kubectl: one set per template with its revision, pods controlled by the
//! set, `kubectl rollout status` and `rollout history` reading them, a template change
//! moving the replicas to a new set; and a rollout lag during which `observedGeneration`
//! trails `generation`. Root required.

mod kubelet_support;

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::ReplicaSet;
use kube::Api;
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kubelet_support::{Env, server_deployment, wait_for};
use nemesis_tests::kubelet::SandboxOptions;
use serde_json::json;

async fn kubectl(env: &Env, args: &[&str]) -> anyhow::Result<String> {
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
    ensure!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sets(env: &Env) -> Api<ReplicaSet> {
    Api::namespaced(env.client.clone(), &env.ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_own_replica_sets_that_own_pods_and_roll_by_revision() -> anyhow::Result<()> {
    let env = Env::start("kubelet-rs").await?;
    env.deployments()
        .create(
            &PostParams::default(),
            &server_deployment("web", 2, &[], json!({}), 5),
        )
        .await?;
    kubectl(
        &env,
        &["rollout", "status", "deployment/web", "--timeout=60s"],
    )
    .await?;
    let deployment = env.deployments().get("web").await?;
    let first = sets(&env).list(&ListParams::default()).await?.items;
    ensure!(first.len() == 1, "one ReplicaSet: {first:?}");
    let rs = &first[0];
    let owner = &rs.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Deployment", deployment.uid().unwrap().as_str())
    );
    let hash = rs.labels()["pod-template-hash"].clone();
    assert_eq!(rs.name_any(), format!("web-{hash}"));
    assert_eq!(rs.annotations()["deployment.kubernetes.io/revision"], "1");
    let st = rs.status.clone().context("a ReplicaSet status")?;
    assert_eq!((st.replicas, st.ready_replicas), (2, Some(2)));
    assert_eq!(st.observed_generation, rs.metadata.generation);
    for pod in env.running_pods().await? {
        let o = &pod.owner_references()[0];
        assert_eq!(
            (o.kind.as_str(), o.name.as_str()),
            ("ReplicaSet", rs.name_any().as_str())
        );
        assert!(pod.name_any().starts_with(&format!("web-{hash}-")));
    }

    // A new template: a second set at revision 2 takes the replicas; the first is
    // scaled to zero and kept, as Kubernetes keeps history.
    env.deployments()
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"template": {"metadata": {"annotations": {"rev": "2"}}}}}),
            ),
        )
        .await?;
    kubectl(
        &env,
        &["rollout", "status", "deployment/web", "--timeout=60s"],
    )
    .await?;
    let all = wait_for("the old set at zero", Duration::from_secs(30), || async {
        let all = sets(&env).list(&ListParams::default()).await?.items;
        let settled = all.len() == 2
            && all.iter().all(|s| {
                let want = if s.name_any() == rs.name_any() { 0 } else { 2 };
                s.spec.replicas == Some(want)
                    && s.status.as_ref().is_some_and(|st| st.replicas == want)
            });
        Ok(settled.then_some(all))
    })
    .await?;
    let new = all.iter().find(|s| s.name_any() != rs.name_any()).unwrap();
    assert_eq!(new.annotations()["deployment.kubernetes.io/revision"], "2");
    let history = kubectl(&env, &["rollout", "history", "deployment/web"]).await?;
    ensure!(
        history.lines().any(|l| l.trim_start().starts_with('1'))
            && history.lines().any(|l| l.trim_start().starts_with('2')),
        "{history}"
    );
    let listed = kubectl(&env, &["get", "replicasets", "-o", "name"]).await?;
    ensure!(listed.lines().count() == 2, "{listed}");

    // Deleting the Deployment takes its sets and their pods with it.
    env.deployments().delete("web", &Default::default()).await?;
    wait_for(
        "no set and no pod left",
        Duration::from_secs(30),
        || async {
            let sets = sets(&env).list(&ListParams::default()).await?.items;
            let pods = env.pods().list(&ListParams::default()).await?.items;
            Ok((sets.is_empty() && pods.is_empty()).then_some(()))
        },
    )
    .await?;
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_controller_leaves_observed_generation_behind_until_it_acts() -> anyhow::Result<()>
{
    let lag = Duration::from_millis(1500);
    let env = Env::start_with(
        "kubelet-lag",
        SandboxOptions {
            rollout_lag: lag,
            ..SandboxOptions::default()
        },
    )
    .await?;
    env.deployments()
        .create(
            &PostParams::default(),
            &server_deployment("web", 0, &[], json!({}), 5),
        )
        .await?;
    wait_for(
        "the first generation observed",
        Duration::from_secs(30),
        || async {
            let d = env.deployments().get("web").await?;
            let observed = d.status.and_then(|s| s.observed_generation);
            Ok((observed.is_some() && observed == d.metadata.generation).then_some(()))
        },
    )
    .await?;
    let scaled_at = Instant::now();
    env.scale("web", 1).await?;
    let d = env.deployments().get("web").await?;
    let generation = d.metadata.generation.context("a generation")?;
    let observed = d.status.and_then(|s| s.observed_generation).unwrap_or(0);
    ensure!(
        observed < generation,
        "observed {observed} at once for generation {generation}"
    );
    wait_for(
        "the scale observed and a ready replica",
        Duration::from_secs(30),
        || async {
            let d = env.deployments().get("web").await?;
            let s = d.status.unwrap_or_default();
            Ok(
                (s.observed_generation == Some(generation) && s.ready_replicas == Some(1))
                    .then_some(()),
            )
        },
    )
    .await?;
    let took = scaled_at.elapsed();
    ensure!(
        took >= lag,
        "caught up after {took:?}, before the {lag:?} lag"
    );
    env.shutdown().await
}
