//! Every pod's containers find a token of the pod's ServiceAccount, with its namespace
//! and the cluster CA, at `/var/run/secrets/kubernetes.io/serviceaccount` (where client
//! libraries look), as the kubelet projects it: the token authenticates as that
//! ServiceAccount, names the pod, and dies with the pod; `automountServiceAccountToken:
//! false` means no token; the host's own `/run` is untouched. Root required.

mod kubelet_support;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, LogParams, PostParams};
use kubelet_support::{Env, wait_for};
use serde_json::json;

/// Prints what the container finds, then [`END`]: the output is read only once complete
/// (it comes in several writes, and a log read between two of them saw half of it).
const SCRIPT: &str = "d=/var/run/secrets/kubernetes.io/serviceaccount; \
    if test -s $d/token; then echo has-token; cat $d/namespace; echo; head -c 27 $d/ca.crt; echo; \
    else echo no-token; fi; echo end-of-output; sleep 60";
const END: &str = "end-of-output\n";

fn pod(env: &Env, name: &str, extra: serde_json::Value) -> anyhow::Result<Pod> {
    let mut spec = json!({
        "nodeName": env.sandbox.node_name(),
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "main", "image": "x", "command": ["sh", "-c", SCRIPT]}],
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name}, "spec": spec}),
    )?)
}

async fn log_of(env: &Env, name: &str) -> anyhow::Result<String> {
    wait_for(
        &format!("{name}'s output"),
        Duration::from_secs(30),
        || async {
            let text = env
                .pods()
                .logs(name, &LogParams::default())
                .await
                .unwrap_or_default();
            Ok(text.find(END).map(|at| text[..at].to_string()))
        },
    )
    .await
}

async fn review(
    env: &Env,
    token: &str,
) -> anyhow::Result<k8s_openapi::api::authentication::v1::TokenReviewStatus> {
    let api: Api<TokenReview> = Api::all(env.client.clone());
    let r: TokenReview = serde_json::from_value(json!({"spec": {"token": token}}))?;
    api.create(&PostParams::default(), &r)
        .await?
        .status
        .context("a review status")
}

/// The token file the kubelet wrote for pod `name` (under the sandbox's work dir).
fn token_on_host(env: &Env, name: &str) -> anyhow::Result<PathBuf> {
    let pods = env.sandbox.work_dir().join("pods");
    let prefix = format!("{}_{name}_", env.ns);
    let dir = std::fs::read_dir(&pods)?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .with_context(|| format!("no pod directory {prefix}* in {}", pods.display()))?;
    Ok(dir.path().join("serviceaccount").join("token"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_find_a_token_of_their_service_account_bound_to_them() -> anyhow::Result<()> {
    let env = Env::start("kubelet-sa").await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.ns);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "robot"}}))?,
        )
        .await?;
    env.pods()
        .create(
            &PostParams::default(),
            &pod(&env, "with", json!({"serviceAccountName": "robot"}))?,
        )
        .await?;
    env.pods()
        .create(
            &PostParams::default(),
            &pod(
                &env,
                "without",
                json!({"automountServiceAccountToken": false}),
            )?,
        )
        .await?;

    let out = log_of(&env, "with").await?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(
        lines.first() == Some(&"has-token")
            && lines.get(1) == Some(&env.ns.as_str())
            && lines.get(2) == Some(&"-----BEGIN CERTIFICATE-----"),
        "the container saw: {out:?}"
    );
    assert_eq!(log_of(&env, "without").await?.trim(), "no-token");
    ensure!(
        !std::path::Path::new("/run/secrets/kubernetes.io/serviceaccount/token").exists(),
        "the host's /run must stay untouched"
    );

    let token = std::fs::read_to_string(token_on_host(&env, "with")?)?;
    let status = review(&env, &token).await?;
    assert_eq!(status.authenticated, Some(true));
    let user = status.user.context("a user")?;
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{}:robot", env.ns).as_str())
    );
    let extra = user.extra.unwrap_or_default();
    assert_eq!(extra["authentication.kubernetes.io/pod-name"], ["with"]);

    // The token dies with its pod.
    env.pods().delete("with", &DeleteParams::default()).await?;
    wait_for("the pod gone", Duration::from_secs(30), || async {
        Ok(env.pods().get_opt("with").await?.is_none().then_some(()))
    })
    .await?;
    assert_eq!(review(&env, &token).await?.authenticated, None);
    env.shutdown().await
}
