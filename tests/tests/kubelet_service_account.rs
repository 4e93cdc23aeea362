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

/// A `projected` volume with a `serviceAccountToken` source (as the agent's DaemonSet
/// mounts one): the token is for the audience asked, bound to the pod, and names the
/// pod's node in a TokenReview, beside a ConfigMap key of the same volume (the
/// agent's CA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projected_token_is_for_its_audience_and_names_the_pods_node() -> anyhow::Result<()> {
    let env = Env::start("kubelet-proj").await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.ns);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "robot"}}))?,
        )
        .await?;
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(env.client.clone(), &env.ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "ca"}, "data": {"ca.crt": "the-ca"}}))?,
    )
    .await?;
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "proj"},
        "spec": {
            "nodeName": env.sandbox.node_name(),
            "terminationGracePeriodSeconds": 1,
            "serviceAccountName": "robot",
            "automountServiceAccountToken": false,
            "volumes": [{"name": "tok", "projected": {"sources": [
                {"serviceAccountToken": {"audience": "example-audience", "expirationSeconds": 3600, "path": "token"}},
                {"configMap": {"name": "ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            ]}}],
            "containers": [{"name": "main", "image": "x", "command": ["sleep", "60"],
                            "volumeMounts": [{"name": "tok", "mountPath": "/var/run/secrets/example", "readOnly": true}]}],
        },
    }))?;
    env.pods().create(&PostParams::default(), &p).await?;
    // A container without an image runs on the host (no mounts): the volume's files
    // are read where the kubelet wrote them.
    let pods = env.sandbox.work_dir().join("pods");
    let prefix = format!("{}_proj_", env.ns);
    let vol = wait_for("the projected volume", Duration::from_secs(60), || async {
        let dir = std::fs::read_dir(&pods)
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path().join("volumes/tok"));
        Ok(dir.filter(|d| d.join("token").exists() && d.join("ca.crt").exists()))
    })
    .await?;
    assert_eq!(std::fs::read_to_string(vol.join("ca.crt"))?, "the-ca");
    let token = std::fs::read_to_string(vol.join("token"))?;
    let api: Api<TokenReview> = Api::all(env.client.clone());
    let ask = |aud: &str| -> anyhow::Result<TokenReview> {
        Ok(serde_json::from_value(
            json!({"spec": {"token": token, "audiences": [aud]}}),
        )?)
    };
    let status = api
        .create(&PostParams::default(), &ask("example-audience")?)
        .await?
        .status
        .context("a review status")?;
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.context("a user")?;
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{}:robot", env.ns).as_str())
    );
    let extra = user.extra.unwrap_or_default();
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-name"),
        Some(&vec!["proj".to_string()])
    );
    assert_eq!(
        extra.get("authentication.kubernetes.io/node-name"),
        Some(&vec![env.sandbox.node_name().to_string()])
    );
    let other = api
        .create(
            &PostParams::default(),
            &ask("https://kubernetes.default.svc.cluster.local")?,
        )
        .await?
        .status
        .context("a review status")?;
    assert_ne!(
        other.authenticated,
        Some(true),
        "a token for example-audience only: {other:?}"
    );
    env.pods().delete("proj", &DeleteParams::default()).await?;
    Ok(())
}
