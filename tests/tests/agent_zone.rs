//! The agent learns its zone (for balance mode's `preferSameZone`) from its own Node's
//! `topology.kubernetes.io/zone` label, read with exactly the rights the install's
//! `nemesis-agent` ClusterRole grants: one DaemonSet template serves every node, so no
//! per-node `--zone` is needed. Without the right, or without the label, it starts
//! with no zone instead of failing or waiting.

use std::path::Path;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::PostParams;
use nemesis_agent::zone::{ZONE_LABEL, resolve};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::demo::apply::{Manifest, apply_all, read_manifests};
use serde_json::json;

/// The install's namespace and RBAC applied by the admin (optionally without the
/// agent's rule for nodes); returns a client of the agent's ServiceAccount.
async fn agent_client(
    server: &TestApiServer,
    with_nodes_rule: bool,
) -> anyhow::Result<kube::Client> {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base");
    let mut manifests = read_manifests(&[base.join("namespace.yaml"), base.join("rbac.yaml")])?;
    let role: &mut Manifest = manifests
        .iter_mut()
        .find(|m| {
            m.kind() == "ClusterRole" && m.object.metadata.name.as_deref() == Some("nemesis-agent")
        })
        .context("the nemesis-agent ClusterRole in manifests/base/rbac.yaml")?;
    let rules = role.object.data["rules"].as_array_mut().context("rules")?;
    let before = rules.len();
    rules.retain(|r| {
        with_nodes_rule
            || !r["resources"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "nodes"))
    });
    anyhow::ensure!(
        with_nodes_rule || rules.len() == before - 1,
        "the agent's ClusterRole has one rule for nodes"
    );
    apply_all(&server.client().await?, &manifests)
        .await
        .context("applying the install's RBAC")?;
    Ok(server
        .client_with_token(&server.service_account_token("nemesis-system", "nemesis-agent")?)
        .await?)
}

async fn create_node(
    server: &TestApiServer,
    name: &str,
    labels: serde_json::Value,
) -> anyhow::Result<()> {
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
    }))?;
    Api::<Node>::all(server.client().await?)
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating Node {name}"))?;
    Ok(())
}

#[tokio::test]
async fn the_agent_reads_its_zone_from_its_node_with_the_installs_rights() -> anyhow::Result<()> {
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    create_node(
        &server,
        "zone-a-1",
        json!({ZONE_LABEL: "zone-a", "kubernetes.io/hostname": "zone-a-1"}),
    )
    .await?;
    create_node(
        &server,
        "no-zone-1",
        json!({"kubernetes.io/hostname": "no-zone-1"}),
    )
    .await?;
    let agent = agent_client(&server, true).await?;

    assert_eq!(
        resolve(None, &agent, "zone-a-1").await.as_deref(),
        Some("zone-a")
    );
    // The flag wins without a lookup; an empty one counts as unset.
    assert_eq!(
        resolve(Some("zone-x"), &agent, "zone-a-1").await.as_deref(),
        Some("zone-x")
    );
    assert_eq!(
        resolve(Some(" "), &agent, "zone-a-1").await.as_deref(),
        Some("zone-a")
    );
    // A node without the label, or one the API server does not know: no zone.
    assert_eq!(resolve(None, &agent, "no-zone-1").await, None);
    assert_eq!(resolve(None, &agent, "not-a-node").await, None);
    Ok(())
}

#[tokio::test]
async fn without_the_right_to_read_nodes_the_agent_starts_with_no_zone() -> anyhow::Result<()> {
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    create_node(&server, "zone-b-1", json!({ZONE_LABEL: "zone-b"})).await?;
    let agent = agent_client(&server, false).await?;
    assert_eq!(
        resolve(None, &agent, "zone-b-1").await,
        None,
        "a forbidden read yields no zone"
    );
    match Api::<Node>::all(agent.clone()).get("zone-b-1").await {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => anyhow::bail!("the agent without the nodes rule should be refused, got {other:?}"),
    }
    // The admin can read it: the refusal was RBAC, not a missing node.
    let n = Api::<Node>::all(server.client().await?)
        .get("zone-b-1")
        .await?;
    assert_eq!(nemesis_agent::zone::zone_of(&n).as_deref(), Some("zone-b"));
    Ok(())
}
