//! Agent identities for harnesses that run agents outside pods: the token an agent of a
//! node would have from its projected volume (the agents' ServiceAccount, the
//! controller's audience, bound to a pod scheduled to that node), asked of the test API
//! server with a real TokenRequest, so the controller's TokenReview accepts it for that
//! node only.

use anyhow::Context as _;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

/// The namespace and ServiceAccount controllers accept agents of (their defaults, and
/// the manifests').
pub const AGENT_NAMESPACE: &str = "nemesis-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "nemesis-agent";

/// Creates (if missing) the agents' namespace, ServiceAccount and a pod of `node`
/// (`nemesis-agent-<node>`), and asks for a token bound to that pod for the controller's
/// audience (an hour of life).
pub async fn mint_agent_token(client: &Client, node: &str) -> anyhow::Result<String> {
    async fn ensure<K>(api: &Api<K>, obj: &K) -> anyhow::Result<()>
    where
        K: kube::Resource
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        match api.create(&PostParams::default(), obj).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    let ns: Api<Namespace> = Api::all(client.clone());
    ensure(
        &ns,
        &serde_json::from_value(json!({"metadata": {"name": AGENT_NAMESPACE}}))?,
    )
    .await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    ensure(
        &sas,
        &serde_json::from_value(json!({"metadata": {"name": AGENT_SERVICE_ACCOUNT}}))?,
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let pod_name = format!("nemesis-agent-{node}");
    ensure(
        &pods,
        &serde_json::from_value(json!({
            "metadata": {"name": pod_name},
            "spec": {
                "nodeName": node,
                "serviceAccountName": AGENT_SERVICE_ACCOUNT,
                // A sandbox kubelet of `node` runs it: something harmless and quick to stop.
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "agent", "image": "local/nemesis-agent",
                                "command": ["sleep", "86400"]}],
            },
        }))?,
    )
    .await?;
    let pod = pods.get(&pod_name).await?;
    let req: TokenRequest = serde_json::from_value(json!({"spec": {
        "audiences": [nemesis_controller::agents::identity::DEFAULT_AUDIENCE],
        "expirationSeconds": 3600,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod_name,
                           "uid": pod.metadata.uid},
    }}))?;
    let answer = sas
        .create_token_request(AGENT_SERVICE_ACCOUNT, &PostParams::default(), &req)
        .await
        .context("TokenRequest for the agent")?;
    answer
        .status
        .and_then(|s| s.token)
        .context("the TokenRequest answer has no token")
}
