//! CustomResourceDefinitions: creating one serves its kind (discovery included),
//! custom resources get CRUD, schema validation, pruning, defaulting, the status and
//! scale subresources, and deleting the CRD removes them.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::Discovery;
use kube::runtime::wait::{await_condition, conditions};
use kube::{CustomResource, CustomResourceExt};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "example.nemesis.dev",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus",
    shortname = "wd",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas"
    ),
    printcolumn(name = "Size", type_ = "integer", json_path = ".spec.size"),
    selectable = ".spec.color"
)]
#[serde(rename_all = "camelCase")]
pub struct WidgetSpec {
    size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    color: Option<String>,
    #[serde(default)]
    replicas: i32,
    /// kube's derive gives an `Option` of an enum whose variants carry doc comments
    /// `nullable: true` beside an `enum` without null, as ScalingPolicy's `targetType`
    /// once had (without the comments, null is listed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    finish: Option<Finish>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, JsonSchema)]
pub enum Finish {
    /// Dull.
    Matte,
    /// Shiny.
    Gloss,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
pub struct WidgetStatus {
    phase: String,
    #[serde(default)]
    replicas: i32,
}

fn api_err(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn with_crd() -> Result<(TestApiServer, kube::Client)> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let c = s.client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(c.clone());
    crds.create(&PostParams::default(), &Widget::crd()).await?;
    let name = Widget::crd_name();
    tokio::time::timeout(
        Duration::from_secs(10),
        await_condition(crds, name, conditions::is_crd_established()),
    )
    .await??;
    Ok((s, c))
}

#[tokio::test]
async fn custom_resources_are_served_once_the_crd_exists() -> Result<()> {
    let (_s, c) = with_crd().await?;
    let discovery = Discovery::new(c.clone()).run().await?;
    let gvk = GroupVersionKind::gvk("example.nemesis.dev", "v1", "Widget");
    let (ar, caps) = discovery.resolve_gvk(&gvk).expect("Widget is discoverable");
    assert_eq!(ar.plural, "widgets");
    assert!(caps.subresources.iter().any(|(s, _)| s.plural == "status"));
    let api: Api<Widget> = Api::namespaced(c.clone(), "default");
    let w = Widget::new(
        "w1",
        WidgetSpec {
            size: 3,
            color: Some("red".into()),
            replicas: 1,
            finish: Some(Finish::Gloss),
        },
    );
    let created = api.create(&PostParams::default(), &w).await?;
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(api.get("w1").await?.spec.size, 3);
    assert_eq!(api.list(&ListParams::default()).await?.items.len(), 1);
    assert_eq!(
        api.list(&ListParams::default().fields("spec.color=red"))
            .await?
            .items
            .len(),
        1
    );
    assert!(
        api.list(&ListParams::default().fields("spec.color=blue"))
            .await?
            .items
            .is_empty()
    );
    // Dynamic access works the same.
    let dynamic: Api<DynamicObject> = Api::namespaced_with(c, "default", &ar);
    assert_eq!(dynamic.get("w1").await?.data["spec"]["size"], 3);
    Ok(())
}

#[tokio::test]
async fn status_subresource_separates_spec_and_status() -> Result<()> {
    let (_s, c) = with_crd().await?;
    let api: Api<Widget> = Api::namespaced(c, "default");
    let mut w = Widget::new(
        "w1",
        WidgetSpec {
            size: 1,
            color: None,
            replicas: 1,
            finish: None,
        },
    );
    w.status = Some(WidgetStatus {
        phase: "ignored".into(),
        replicas: 0,
    });
    let created = api.create(&PostParams::default(), &w).await?;
    assert!(created.status.is_none(), "status is dropped on create");
    let st = json!({"status": {"phase": "Ready", "replicas": 1}});
    let after = api
        .patch_status("w1", &PatchParams::default(), &Patch::Merge(st))
        .await?;
    assert_eq!(after.status.unwrap().phase, "Ready");
    assert_eq!(after.metadata.generation, Some(1));
    let after = api
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 2}, "status": {"phase": "X"}})),
        )
        .await?;
    assert_eq!(after.metadata.generation, Some(2));
    assert_eq!(
        after.status.unwrap().phase,
        "Ready",
        "status ignored on the main resource"
    );
    // Scale subresource from the CRD's paths.
    let scale = api.get_scale("w1").await?;
    assert_eq!(scale.spec.unwrap().replicas, Some(1));
    assert_eq!(scale.status.unwrap().replicas, 1);
    api.patch_scale(
        "w1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 4}})),
    )
    .await?;
    assert_eq!(api.get("w1").await?.spec.replicas, 4);
    // Strategic merge patch is for built-in kinds only.
    let e = api_err(
        api.patch(
            "w1",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"size": 5}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 415);
    Ok(())
}

#[tokio::test]
async fn schema_validation_pruning_and_strict_fields() -> Result<()> {
    let (_s, c) = with_crd().await?;
    let ar = kube::core::ApiResource::erase::<Widget>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(c, "default", &ar);
    let bad_type: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "example.nemesis.dev/v1", "kind": "Widget",
        "metadata": {"name": "bad"}, "spec": {"size": "big"}}),
    )?;
    let e = api_err(
        api.create(&PostParams::default(), &bad_type)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert!(e.message.contains("spec.size"), "{}", e.message);
    let missing: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "example.nemesis.dev/v1", "kind": "Widget",
        "metadata": {"name": "missing"}, "spec": {}}),
    )?;
    let e = api_err(
        api.create(&PostParams::default(), &missing)
            .await
            .unwrap_err(),
    );
    assert!(
        e.message.contains("spec.size: Required value"),
        "{}",
        e.message
    );
    // Unknown fields are pruned (a warning), or refused under strict validation.
    let extra: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "example.nemesis.dev/v1", "kind": "Widget",
        "metadata": {"name": "extra"}, "spec": {"size": 1, "bogus": true}}),
    )?;
    let strict = PatchParams::apply("t").validation_strict();
    let e = api_err(
        api.patch("extra", &strict, &Patch::Apply(&extra))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400);
    assert!(
        e.message.contains("unknown field \"spec.bogus\""),
        "{}",
        e.message
    );
    let created = api.create(&PostParams::default(), &extra).await?;
    assert!(created.data["spec"].get("bogus").is_none());
    assert_eq!(
        created.data["spec"]["replicas"],
        json!(0),
        "schema default applied"
    );
    Ok(())
}

/// A kube-apiserver v1.36 refused `targetType: null` in a ScalingPolicy: `nullable`
/// skips the type check but not the `enum`. Where the field is not nullable, a null is
/// pruned as unset.
#[tokio::test]
async fn null_in_a_nullable_enum_without_null_is_refused_as_upstream() -> Result<()> {
    let (_s, c) = with_crd().await?;
    let ar = kube::core::ApiResource::erase::<Widget>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(c, "default", &ar);
    let null_finish: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "example.nemesis.dev/v1", "kind": "Widget",
        "metadata": {"name": "w"}, "spec": {"size": 1, "finish": null}}),
    )?;
    let e = api_err(
        api.create(&PostParams::default(), &null_finish)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert!(
        e.message.contains(
            "spec.finish: Unsupported value: null: supported values: \"Matte\", \"Gloss\""
        ),
        "{}",
        e.message
    );
    Ok(())
}

#[tokio::test]
async fn scaling_policy_target_type_null_is_pruned_as_unset() -> Result<()> {
    use nemesis_controller::policy::ScalingPolicy;
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let c = s.client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(c.clone());
    crds.create(&PostParams::default(), &ScalingPolicy::crd())
        .await?;
    tokio::time::timeout(
        Duration::from_secs(10),
        await_condition(
            crds,
            ScalingPolicy::crd_name(),
            conditions::is_crd_established(),
        ),
    )
    .await??;
    let ar = kube::core::ApiResource::erase::<ScalingPolicy>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(c, "default", &ar);
    let policy: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "nemesis.dev/v1alpha1", "kind": "ScalingPolicy",
        "metadata": {"name": "p"},
        "spec": {"target": {"deployment": "web"}, "initialState": "busy",
            "states": [{"name": "busy", "range": {"min": 1, "max": 4, "metric": "queue",
                "target": 10.0, "targetType": null}}]}}))?;
    let created = api.create(&PostParams::default(), &policy).await?;
    let range = &created.data["spec"]["states"][0]["range"];
    assert_eq!(range["min"], 1, "{range}");
    assert!(range.get("targetType").is_none(), "{range}");
    Ok(())
}

#[tokio::test]
async fn deleting_the_crd_removes_its_resources_and_discovery() -> Result<()> {
    let (_s, c) = with_crd().await?;
    let api: Api<Widget> = Api::namespaced(c.clone(), "default");
    api.create(
        &PostParams::default(),
        &Widget::new(
            "w1",
            WidgetSpec {
                size: 1,
                color: None,
                replicas: 0,
                finish: None,
            },
        ),
    )
    .await?;
    let crds: Api<CustomResourceDefinition> = Api::all(c.clone());
    crds.delete(Widget::crd_name(), &DeleteParams::default())
        .await?;
    assert_eq!(api_err(api.get("w1").await.unwrap_err()).code, 404);
    let discovery = Discovery::new(c.clone()).run().await?;
    assert!(
        discovery
            .resolve_gvk(&GroupVersionKind::gvk(
                "example.nemesis.dev",
                "v1",
                "Widget"
            ))
            .is_none()
    );
    // Recreated, it starts empty.
    crds.create(&PostParams::default(), &Widget::crd()).await?;
    assert!(api.list(&ListParams::default()).await?.items.is_empty());
    Ok(())
}

#[tokio::test]
async fn crd_names_must_match_plural_and_group() -> Result<()> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let crds: Api<CustomResourceDefinition> = Api::all(s.client().await?);
    let mut crd = Widget::crd();
    crd.metadata.name = Some("wrong.example.nemesis.dev".into());
    let e = api_err(crds.create(&PostParams::default(), &crd).await.unwrap_err());
    assert_eq!(e.code, 422);
    assert!(
        e.message
            .contains("must be spec.names.plural+\".\"+spec.group"),
        "{}",
        e.message
    );
    Ok(())
}
