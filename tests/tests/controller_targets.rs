//! Targets other than a Deployment, with the real controller against the test API
//! server: a custom resource with a `/scale` subresource (kept by a small operator in
//! the test that runs its pods through a Deployment, as Argo Rollouts does with
//! ReplicaSets) is woken and slept through `/scale`, its readiness read from its
//! selector's ready pods; targets that cannot be used say why (kind not served, no
//! `/scale`, missing, and, as the shipped ServiceAccount, the missing permission); and
//! beside an HPA a policy scales only between zero and the HPA's minimum, leaving the
//! counts above it alone. Root required (the sandbox makes network namespaces).

mod controller_support;

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use controller_support::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, Client};
use nemesis_controller::app::{self, Running};
use nemesis_controller::policy::ScalingPolicy;
use nemesis_controller::store::{PolicyId, SampleValue};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use nemesis_tests::demo::apply::{apply_all, read_manifests};
use nemesis_tests::kubelet::{Sandbox, SandboxOptions};
use serde_json::{Value, json};
use tokio_util::task::AbortOnDropHandle;

const SERVER: &str = env!("CARGO_BIN_EXE_nemesis-pod-server");
const PORT: u16 = 8080;
const GROUP: &str = "ml.nemesis.test";
const SYSTEM_NS: &str = "nemesis-system";

fn model_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, "v1", "Model"), "models")
}

/// A namespaced CRD (schema open) with a status subresource, and with `/scale` when
/// `scale` is set (the paths a kube-apiserver reads: spec, status and selector).
fn crd(
    group: &str,
    kind: &str,
    plural: &str,
    scale: bool,
) -> anyhow::Result<CustomResourceDefinition> {
    let mut subresources = json!({"status": {}});
    if scale {
        subresources["scale"] = json!({
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        });
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(),
                      "listKind": format!("{kind}List")},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                }}},
                "subresources": subresources,
            }],
        },
    }))?)
}

async fn install(
    client: &Client,
    crd: CustomResourceDefinition,
    probe: ApiResource,
) -> anyhow::Result<()> {
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &crd)
        .await
        .context("creating a CRD")?;
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &probe);
    eventually("the CRD's API", Duration::from_secs(10), || async {
        Ok(api.list(&ListParams::default()).await.ok().map(|_| ()))
    })
    .await
}

async fn namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}}))?,
        )
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

/// The pod server with an HTTP readiness probe, as the Deployment `name` at `replicas`.
fn server_deployment(name: &str, replicas: i32) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name},
                             "annotations": {"nemesis.test/probe-period-ms": "100"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "server",
                        "image": "local/nemesis-pod-server",
                        "command": [SERVER],
                        "args": ["--port", PORT.to_string()],
                        "ports": [{"name": "http", "containerPort": PORT}],
                        "readinessProbe": {"httpGet": {"path": "/", "port": "http"},
                                           "periodSeconds": 1},
                    }],
                },
            },
        },
    }))?)
}

/// The Model's operator, as small as it gets: the Model's `spec.replicas` goes to the
/// Deployment of the same name, and the Model's status tells the pods that exist
/// (`status.replicas`), their selector and the generation it acted on.
fn run_model_operator(client: Client, ns: String, name: String) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let models: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &ns, &model_resource());
        let deployments: Api<Deployment> = Api::namespaced(client, &ns);
        loop {
            let step = async {
                let m = models.get(&name).await?;
                let want = m.data["spec"]["replicas"].as_i64().unwrap_or(0);
                let d = deployments.get(&name).await?;
                if d.spec.replicas != Some(want as i32) {
                    deployments
                        .patch(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"spec": {"replicas": want}})),
                        )
                        .await?;
                }
                let pods = d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
                let status = json!({"status": {
                    "replicas": pods,
                    "selector": format!("app={name}"),
                    "observedGeneration": m.metadata.generation,
                }});
                if m.data.get("status") != Some(&status["status"]) {
                    models
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await?;
                }
                anyhow::Ok(())
            };
            if let Err(e) = step.await {
                tracing::debug!(err = %e, "model operator step failed; retrying");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }))
}

/// zero --alert--> warm (`replicas` replicas) --resolved--> zero, on `target`.
fn alert_policy(target: Value, alert: &str, replicas: i32) -> Value {
    json!({
        "target": target,
        "metrics": {"alerts": [alert]},
        "initialState": "zero",
        "states": [{"name": "zero", "replicas": 0}, {"name": "warm", "replicas": replicas}],
        "transitions": [
            {"from": "zero", "to": "warm", "when": format!("alert({alert})")},
            {"from": "warm", "to": "zero", "when": format!("not alert({alert})")},
        ],
    })
}

async fn model_replicas(models: &Api<DynamicObject>, name: &str, want: i64) -> anyhow::Result<()> {
    eventually(
        &format!("Model {name} at spec.replicas {want}"),
        Duration::from_secs(60),
        || async {
            let m = models.get(name).await?;
            Ok((m.data["spec"]["replicas"].as_i64() == Some(want)).then_some(()))
        },
    )
    .await
}

async fn event_note(client: &Client, ns: &str, reason: &str) -> anyhow::Result<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("a {reason} Event"),
        Duration::from_secs(60),
        || async {
            Ok(events
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason))
                .and_then(|e| e.message))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_resource_with_a_scale_subresource_is_woken_and_slept() -> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    install(
        &client,
        crd(GROUP, "Model", "models", true)?,
        model_resource(),
    )
    .await?;
    let ns = format!("ctl-model-{}", std::process::id());
    namespace(&client, &ns).await?;
    let sandbox = Sandbox::start(client.clone(), SandboxOptions::default()).await?;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .create(&PostParams::default(), &server_deployment("llm", 0)?)
        .await?;
    let models: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &model_resource());
    let model = DynamicObject::new("llm", &model_resource())
        .within(&ns)
        .data(json!({"spec": {"replicas": 0}}));
    models.create(&PostParams::default(), &model).await?;
    let _operator = run_model_operator(client.clone(), ns.clone(), "llm".into());

    let dir = tempfile::tempdir()?;
    let c = start_controller(&server, dir.path(), &[]).await?;
    wait_leading(&c, Duration::from_secs(10)).await?;
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns);
    let target = json!({"kind": "Model", "apiVersion": format!("{GROUP}/v1"), "name": "llm"});
    policies
        .create(
            &PostParams::default(),
            &policy("llm", alert_policy(target, "LlmDemand", 1)),
        )
        .await?;
    let p = wait_state(&policies, "llm", "zero", Duration::from_secs(30)).await?;
    assert_eq!(
        p.status.and_then(|s| s.target).as_deref(),
        Some("Model/llm")
    );

    post_alert(c.api_addr, "LlmDemand", true).await?;
    model_replicas(&models, "llm", 1).await?;
    // Ready only once the selector's pod is: the cold start is reported on it.
    let note = event_note(&client, &ns, "ColdStart").await?;
    assert!(note.starts_with("ready "), "{note}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let ready = pods
        .list(&ListParams::default().labels("app=llm"))
        .await?
        .items
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    assert_eq!(ready, 1, "the cold start ended on a ready pod");
    wait_state(&policies, "llm", "warm", Duration::from_secs(10)).await?;

    post_alert(c.api_addr, "LlmDemand", false).await?;
    model_replicas(&models, "llm", 0).await?;
    wait_state(&policies, "llm", "zero", Duration::from_secs(30)).await?;

    let scale_path = format!("/apis/{GROUP}/v1/namespaces/{ns}/models/llm/scale");
    let patches = server
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == scale_path && r.status == 200)
        .count();
    assert_eq!(patches, 2, "woken and slept through /scale");
    c.shutdown().await;
    sandbox.shutdown().await?;
    Ok(())
}

/// The controller as its ServiceAccount, with exactly `manifests/base/rbac.yaml`.
async fn start_controller_as_installed(
    server: &TestApiServer,
    admin: &Client,
    dir: &Path,
) -> anyhow::Result<Running> {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base");
    let manifests = read_manifests(&[base.join("namespace.yaml"), base.join("rbac.yaml")])?;
    apply_all(admin, &manifests).await?;
    let token = server.service_account_token(SYSTEM_NS, "nemesis-controller")?;
    let client = server.client_with_token(&token).await?;
    let args = run_args(dir, &["--lease-namespace", SYSTEM_NS])?;
    let c = app::start(&args, client).await?;
    register_agent_api(c.api_addr, admin.clone());
    wait_leading(&c, Duration::from_secs(10)).await?;
    Ok(c)
}

async fn wait_blocked(
    policies: &Api<ScalingPolicy>,
    name: &str,
    reason: &str,
) -> anyhow::Result<String> {
    eventually(
        &format!("policy {name} not ready with reason {reason}"),
        Duration::from_secs(30),
        || async {
            let p = policies.get(name).await?;
            let ready = p
                .status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready");
            Ok(ready
                .filter(|c| c.status == "False" && c.reason == reason)
                .map(|c| c.message))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_that_cannot_be_scaled_say_why() -> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    install(
        &client,
        crd(GROUP, "Model", "models", true)?,
        model_resource(),
    )
    .await?;
    let dataset = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("data.nemesis.test", "v1", "Dataset"),
        "datasets",
    );
    install(
        &client,
        crd("data.nemesis.test", "Dataset", "datasets", false)?,
        dataset,
    )
    .await?;
    let widget = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("widgets.nemesis.test", "v1", "Widget"),
        "widgets",
    );
    install(
        &client,
        crd("widgets.nemesis.test", "Widget", "widgets", true)?,
        widget.clone(),
    )
    .await?;
    let ns = format!("ctl-unusable-{}", std::process::id());
    namespace(&client, &ns).await?;
    Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &widget)
        .create(
            &PostParams::default(),
            &DynamicObject::new("w", &widget)
                .within(&ns)
                .data(json!({"spec": {"replicas": 0}})),
        )
        .await?;
    // Half of what a Widget target needs: watching it, not its /scale.
    let half = [
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "widget-watcher"},
               "rules": [{"apiGroups": ["widgets.nemesis.test"], "resources": ["widgets"],
                          "verbs": ["list", "watch"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "widget-watcher"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": "widget-watcher"},
               "subjects": [{"kind": "ServiceAccount", "name": "nemesis-controller",
                             "namespace": SYSTEM_NS}]}),
    ];
    let dir = tempfile::tempdir()?;
    let c = start_controller_as_installed(&server, &client, dir.path()).await?;
    for (kind, plural, obj) in [
        ("ClusterRole", "clusterroles", &half[0]),
        ("ClusterRoleBinding", "clusterrolebindings", &half[1]),
    ] {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", kind),
            plural,
        );
        Api::<DynamicObject>::all_with(client.clone(), &ar)
            .create(
                &PostParams::default(),
                &serde_json::from_value(obj.clone())?,
            )
            .await?;
    }

    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns);
    let cases = [
        (
            "unserved",
            json!({"kind": "Model", "apiVersion": "nowhere.nemesis.test/v1", "name": "m"}),
            "TargetKindNotFound",
            "the API server does not serve nowhere.nemesis.test/v1".to_string(),
        ),
        (
            "misspelt",
            json!({"kind": "Modle", "apiVersion": format!("{GROUP}/v1"), "name": "m"}),
            "TargetKindNotFound",
            format!("{GROUP}/v1 has no kind Modle (it serves: Model)"),
        ),
        (
            "unscalable",
            json!({"kind": "Dataset", "apiVersion": "data.nemesis.test/v1", "name": "d"}),
            "TargetNotScalable",
            "Dataset (data.nemesis.test/v1) has no /scale subresource".to_string(),
        ),
        (
            "missing",
            json!({"kind": "StatefulSet", "name": "ghost"}),
            "TargetNotFound",
            format!("StatefulSet {ns}/ghost does not exist"),
        ),
        // The shipped rules grant Deployments and StatefulSets; another kind needs its own.
        (
            "unreadable",
            json!({"kind": "Model", "apiVersion": format!("{GROUP}/v1"), "name": "m"}),
            "TargetUnreadable",
            format!(
                "cannot list resource \"models\" in API group \"{GROUP}\" in the namespace \"{ns}\""
            ),
        ),
        (
            "noscaleget",
            json!({"kind": "Widget", "apiVersion": "widgets.nemesis.test/v1", "name": "w"}),
            "TargetUnreadable",
            format!(
                "cannot get resource \"widgets/scale\" in API group \"widgets.nemesis.test\" in the namespace \"{ns}\""
            ),
        ),
    ];
    for (name, target, _, _) in &cases {
        policies
            .create(
                &PostParams::default(),
                &policy(name, alert_policy(target.clone(), "Never", 1)),
            )
            .await?;
    }
    for (name, _, reason, want) in &cases {
        let message = wait_blocked(&policies, name, reason).await?;
        assert!(message.contains(want.as_str()), "{name}: {message}");
    }
    // Nothing was scaled for any of them.
    assert!(
        !server
            .requests()
            .iter()
            .any(|r| r.method == "PATCH" && r.path.ends_with("/scale")),
        "no /scale was patched"
    );
    c.shutdown().await;
    Ok(())
}

fn hpa(name: &str, target: &str, min: i32, max: i32) -> anyhow::Result<HorizontalPodAutoscaler> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": min,
            "maxReplicas": max,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                         "target": {"type": "Utilization", "averageUtilization": 70}}}],
        },
    }))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_an_hpa_the_policy_wakes_to_its_minimum_and_leaves_the_range_above_alone()
-> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let ns = format!("ctl-hpa-{}", std::process::id());
    namespace(&client, &ns).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    // Real pods: a policy never sleeps a target whose pods did not become ready.
    let sandbox = Sandbox::start(client.clone(), SandboxOptions::default()).await?;
    deployments
        .create(&PostParams::default(), &server_deployment("api", 0)?)
        .await?;
    Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &hpa("api", "api", 2, 5)?)
        .await?;
    let dir = tempfile::tempdir()?;
    let c = start_controller(&server, dir.path(), &[]).await?;
    wait_leading(&c, Duration::from_secs(10)).await?;
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns);
    policies
        .create(
            &PostParams::default(),
            &policy(
                "api",
                alert_policy(json!({"deployment": "api"}), "ApiDemand", 1),
            ),
        )
        .await?;
    let p = wait_state(&policies, "api", "zero", Duration::from_secs(30)).await?;
    let status = p.status.context("a status")?;
    assert_eq!(status.horizontal_pod_autoscaler.as_deref(), Some("api"));
    let cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == "HorizontalPodAutoscaler")
        .context("the HorizontalPodAutoscaler condition")?;
    assert_eq!(cond.status, "True");
    assert!(cond.message.contains("between 0 and 2"), "{}", cond.message);

    // The wake goes to the HPA's minimum, not the state's single replica.
    let log = ReplicaLog::start(deployments.clone(), "api");
    post_alert(c.api_addr, "ApiDemand", true).await?;
    wait_replicas(&deployments, "api", 2, Duration::from_secs(30)).await?;
    wait_state(&policies, "api", "warm", Duration::from_secs(10)).await?;

    // The HPA scales up (played by the test): the policy leaves it there. A sample at 3
    // replicas proves it saw the count (samples are written when they change), and
    // three more evaluations that changed nothing prove it looked again and let it be.
    deployments
        .patch_scale(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await?;
    let id = PolicyId::new(&ns, "api");
    eventually(
        "a sample of the target at 3 replicas",
        Duration::from_secs(30),
        || async {
            let at_three = c
                .store
                .samples(&id, "nemesis.replicas", 0..u64::MAX)?
                .iter()
                .any(|p| matches!(p.value, SampleValue::Raw { value } if value == 3.0));
            Ok(at_three.then_some(()))
        },
    )
    .await?;
    const UNCHANGED: &str = "nemesis_controller_decisions_total{outcome=\"unchanged\"}";
    let before = scrape(&c, UNCHANGED).await.unwrap_or(0.0);
    eventually(
        "three more evaluations that left the target as it was",
        Duration::from_secs(30),
        || async { Ok((scrape(&c, UNCHANGED).await.unwrap_or(0.0) >= before + 3.0).then_some(())) },
    )
    .await?;
    assert_eq!(
        replicas(&deployments, "api").await?,
        3,
        "the HPA's count stays"
    );
    let p = policies.get("api").await?;
    assert_eq!(p.status.and_then(|s| s.desired_replicas), Some(3));

    // Sleeping takes it to zero, whatever the HPA had.
    post_alert(c.api_addr, "ApiDemand", false).await?;
    wait_replicas(&deployments, "api", 0, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(log.seen(), vec![0, 2, 3, 0]);
    c.shutdown().await;
    sandbox.shutdown().await?;
    Ok(())
}
