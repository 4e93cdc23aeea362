//! Installing the project's CustomResourceDefinitions on a test API server, as
//! `kubectl apply` of the manifests would, and waiting until the API serves them.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use nemesis_controller::notify::rule::AlertRule;

use crate::wait::eventually_every;

/// Creates the AlertRule CRD and waits (up to 30 s, a loaded machine) until AlertRules
/// can be listed.
pub async fn install_alert_rule_crd(client: &Client) -> anyhow::Result<()> {
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &AlertRule::crd())
        .await
        .context("creating the AlertRule CRD")?;
    let rules: Api<AlertRule> = Api::all(client.clone());
    eventually_every(
        Duration::from_millis(50),
        "the AlertRule API",
        Duration::from_secs(30),
        || async { Ok(rules.list(&ListParams::default()).await.ok().map(|_| ())) },
    )
    .await
}
