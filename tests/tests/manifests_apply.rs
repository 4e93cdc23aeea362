//! `manifests/` renders with the real `kubectl kustomize`, every rendered object (and
//! the Secret placeholders and the uninstall DaemonSet) decodes strictly as its
//! Kubernetes type (an unknown or misspelled field fails), and what the project's test
//! API server serves is applied to it by server-side apply with strict field validation:
//! the Namespace, the CRD, the Services, the dashboard ConfigMap, the Secrets, and the
//! Pods the DaemonSet and StatefulSet would create from their templates. Kinds it does
//! not serve (apps/v1 workloads, RBAC, PDB, monitoring.coreos.com) are covered by the
//! strict decoding; the test fails if a kind is neither served nor decoded.

mod manifests_support;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::{Discovery, Scope};
use kube::runtime::wait::{await_condition, conditions};
use manifests_support::monitoring::{PodMonitor, PrometheusRule, ServiceMonitor};
use manifests_support::{NAMESPACE, decode_strict, id, kind, kustomize, name, yaml_file};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::{Value, json};

/// Kinds that have no namespace.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
];

/// Everything the manifests hold: the install, the monitoring, the Secret
/// placeholders and the uninstall step.
fn all_objects() -> Result<Vec<Value>> {
    let mut objs = kustomize("")?;
    objs.extend(kustomize("monitoring")?);
    objs.extend(yaml_file("base/secrets.example.yaml")?);
    objs.extend(yaml_file("uninstall/agent-cleanup.yaml")?);
    Ok(objs)
}

/// Decodes `obj` strictly as the type of its apiVersion and kind.
fn decode_as_its_type(obj: &Value) -> Result<()> {
    let api_version = obj["apiVersion"].as_str().unwrap_or("");
    match (api_version, kind(obj)) {
        ("v1", "Namespace") => decode_strict::<Namespace>(obj).map(drop),
        ("v1", "ServiceAccount") => decode_strict::<ServiceAccount>(obj).map(drop),
        ("v1", "Service") => decode_strict::<Service>(obj).map(drop),
        ("v1", "Secret") => decode_strict::<Secret>(obj).map(drop),
        ("v1", "ConfigMap") => decode_strict::<ConfigMap>(obj).map(drop),
        ("apps/v1", "DaemonSet") => decode_strict::<DaemonSet>(obj).map(drop),
        ("apps/v1", "StatefulSet") => decode_strict::<StatefulSet>(obj).map(drop),
        ("policy/v1", "PodDisruptionBudget") => decode_strict::<PodDisruptionBudget>(obj).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            decode_strict::<ClusterRole>(obj).map(drop)
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            decode_strict::<ClusterRoleBinding>(obj).map(drop)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => decode_strict::<Role>(obj).map(drop),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            decode_strict::<RoleBinding>(obj).map(drop)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            decode_strict::<CustomResourceDefinition>(obj).map(drop)
        }
        ("monitoring.coreos.com/v1", "PodMonitor") => decode_strict::<PodMonitor>(obj).map(drop),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => {
            decode_strict::<ServiceMonitor>(obj).map(drop)
        }
        ("monitoring.coreos.com/v1", "PrometheusRule") => {
            decode_strict::<PrometheusRule>(obj).map(drop)
        }
        (v, k) => bail!("{v} {k}: add its type to this test"),
    }
}

#[test]
fn install_and_monitoring_render_with_kubectl_kustomize_into_one_namespace() -> Result<()> {
    let install = kustomize("")?;
    let present: BTreeSet<String> = install.iter().map(id).collect();
    for want in [
        "Namespace/nemesis-system",
        "CustomResourceDefinition/scalingpolicies.nemesis.dev",
        "ServiceAccount/nemesis-agent",
        "ServiceAccount/nemesis-controller",
        "ClusterRole/nemesis-agent",
        "ClusterRole/nemesis-controller",
        "ClusterRoleBinding/nemesis-agent",
        "ClusterRoleBinding/nemesis-controller",
        "Role/nemesis-controller-leader",
        "RoleBinding/nemesis-controller-leader",
        "DaemonSet/nemesis-agent",
        "StatefulSet/nemesis-controller",
        "Service/nemesis-controller",
        "Service/nemesis-controller-admin",
        "PodDisruptionBudget/nemesis-controller",
    ] {
        ensure!(
            present.contains(want),
            "{want} is not rendered; got {present:?}"
        );
    }
    // A Secret in the kustomization would be overwritten by every `kubectl apply -k`.
    ensure!(
        !install.iter().any(|o| kind(o) == "Secret"),
        "Secrets are created by hand, never rendered"
    );
    let monitoring = kustomize("monitoring")?;
    let present: BTreeSet<String> = monitoring.iter().map(id).collect();
    for want in [
        "PodMonitor/nemesis-agent",
        "ServiceMonitor/nemesis-controller",
        "PrometheusRule/nemesis",
        "ConfigMap/nemesis-grafana-dashboard",
    ] {
        ensure!(
            present.contains(want),
            "{want} is not rendered; got {present:?}"
        );
    }
    for o in install.iter().chain(&monitoring) {
        let ns = o["metadata"]["namespace"].as_str();
        if CLUSTER_SCOPED.contains(&kind(o)) {
            ensure!(
                ns.is_none(),
                "{} is cluster-scoped but names a namespace",
                id(o)
            );
        } else {
            ensure!(ns == Some(NAMESPACE), "{} is not in {NAMESPACE}", id(o));
        }
        ensure!(
            o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nemesis"
                || kind(o) == "CustomResourceDefinition",
            "{} lacks app.kubernetes.io/part-of=nemesis (uninstall by label relies on it)",
            id(o)
        );
    }
    Ok(())
}

#[test]
fn every_object_decodes_strictly_as_its_kubernetes_type() -> Result<()> {
    let objs = all_objects()?;
    let mut failures = vec![];
    for o in &objs {
        if let Err(e) = decode_as_its_type(o) {
            failures.push(format!("{e:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn strict_decoding_reports_a_misspelled_field_with_its_path() -> Result<()> {
    // The check above must be able to fail: a typo deep in a pod template.
    let objs = kustomize("")?;
    let mut ds = manifests_support::find(&objs, "DaemonSet", "nemesis-agent")?.clone();
    let spec = ds["spec"]["template"]["spec"]
        .as_object_mut()
        .context("a pod spec")?;
    let host_network = spec.remove("hostNetwork").context("hostNetwork")?;
    spec.insert("hostNetwrok".into(), host_network);
    let err = format!("{:#}", decode_as_its_type(&ds).unwrap_err());
    assert!(err.contains("spec.template.spec.hostNetwrok"), "{err}");
    let mut pm =
        manifests_support::find(&kustomize("monitoring")?, "PodMonitor", "nemesis-agent")?.clone();
    pm["spec"]["podMetricsEndpoints"][0]["honourLabels"] = json!(true);
    let err = format!("{:#}", decode_as_its_type(&pm).unwrap_err());
    assert!(err.contains("honourLabels"), "{err}");
    Ok(())
}

/// The Pod a workload's controller would create from its template (the first replica),
/// with the volumes a StatefulSet adds for its claim templates.
fn pod_of(workload: &Value) -> Result<Value> {
    let template = &workload["spec"]["template"];
    let pod_name = match kind(workload) {
        "StatefulSet" => format!("{}-0", name(workload)),
        _ => format!("{}-x7k2p", name(workload)),
    };
    let mut spec = template["spec"].clone();
    if kind(workload) == "StatefulSet" {
        let volumes = spec
            .as_object_mut()
            .context("a pod spec")?
            .entry("volumes")
            .or_insert_with(|| json!([]));
        for claim in workload["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let claim_name = claim["metadata"]["name"].as_str().context("a claim name")?;
            volumes.as_array_mut().context("volumes")?.push(json!({
                "name": claim_name,
                "persistentVolumeClaim": {"claimName": format!("{claim_name}-{pod_name}")}
            }));
        }
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": workload["metadata"]["namespace"],
            "labels": template["metadata"]["labels"],
        },
        "spec": spec,
    }))
}

/// Orders objects as `kubectl apply` must: Namespaces, then CRDs, then the rest.
fn apply_order(o: &Value) -> u8 {
    match kind(o) {
        "Namespace" => 0,
        "CustomResourceDefinition" => 1,
        _ => 2,
    }
}

#[tokio::test]
async fn served_objects_and_workload_pods_are_accepted_by_the_test_api_server() -> Result<()> {
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    let mut objs = all_objects()?;
    let pods: Vec<Value> = objs
        .iter()
        .filter(|o| matches!(kind(o), "DaemonSet" | "StatefulSet"))
        .map(pod_of)
        .collect::<Result<_>>()?;
    objs.extend(pods);
    // The uninstall step comes after the install; both are applied here.
    objs.sort_by_key(apply_order);

    let params = PatchParams::apply("nemesis-manifests-test").validation_strict();
    let mut discovery = Discovery::new(client.clone()).run().await?;
    let mut applied = BTreeSet::new();
    let mut unserved = BTreeSet::new();
    for o in &objs {
        let (group, version) = match o["apiVersion"].as_str().context("apiVersion")? {
            gv if gv.contains('/') => gv.split_once('/').context("group/version")?,
            v => ("", v),
        };
        let gvk = GroupVersionKind::gvk(group, version, kind(o));
        let Some((ar, caps)) = discovery.resolve_gvk(&gvk) else {
            unserved.insert(kind(o).to_string());
            continue;
        };
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => Api::namespaced_with(
                client.clone(),
                o["metadata"]["namespace"].as_str().context("a namespace")?,
                &ar,
            ),
            Scope::Cluster => Api::all_with(client.clone(), &ar),
        };
        let back = api
            .patch(name(o), &params, &Patch::Apply(o))
            .await
            .with_context(|| format!("the test API server refused {}", id(o)))?;
        // What was stored is what was sent (nothing pruned as unknown).
        if let Some(labels) = o["metadata"]["labels"].as_object() {
            for (k, v) in labels {
                ensure!(
                    back.metadata.labels.as_ref().and_then(|l| l.get(k))
                        == v.as_str().map(String::from).as_ref(),
                    "{}: label {k} was not stored",
                    id(o)
                );
            }
        }
        if kind(o) == "CustomResourceDefinition" {
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            tokio::time::timeout(
                Duration::from_secs(10),
                await_condition(crds, name(o), conditions::is_crd_established()),
            )
            .await
            .context("the CRD is established within 10 s")??;
            discovery = Discovery::new(client.clone()).run().await?;
        }
        applied.insert(id(o));
    }
    for want in [
        "Namespace/nemesis-system",
        "CustomResourceDefinition/scalingpolicies.nemesis.dev",
        "Service/nemesis-controller",
        "Service/nemesis-controller-admin",
        "ConfigMap/nemesis-grafana-dashboard",
        "Secret/nemesis-ui-admin",
        "Pod/nemesis-agent-x7k2p",
        "Pod/nemesis-agent-cleanup-x7k2p",
        "Pod/nemesis-controller-0",
    ] {
        ensure!(
            applied.contains(want),
            "{want} was not applied; applied {applied:?}"
        );
    }
    // Whatever the server does not serve is decoded strictly by the test above.
    for k in &unserved {
        let sample = objs.iter().find(|o| kind(o) == k).context("an object")?;
        decode_as_its_type(sample)
            .with_context(|| format!("{k} is neither served nor decoded strictly"))?;
    }

    // The headless admin Service stays headless; the API Service gets a ClusterIP.
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let admin = services.get("nemesis-controller-admin").await?;
    assert_eq!(
        admin.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("None")
    );
    let api = services.get("nemesis-controller").await?;
    let ip = api.spec.and_then(|s| s.cluster_ip).context("a ClusterIP")?;
    assert_ne!(ip, "None");
    server.shutdown().await;
    Ok(())
}
