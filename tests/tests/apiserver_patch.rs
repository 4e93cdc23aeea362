//! Patches (merge, JSON, strategic, server-side apply), optimistic concurrency,
//! finalizers and garbage collection, through kube-rs.

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::json;

async fn server() -> Result<(TestApiServer, kube::Client)> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let c = s.client().await?;
    Ok((s, c))
}

fn api_err(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn deployment() -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [
                                  {"name": "app", "image": "demo:1", "env": [{"name": "A", "value": "1"}]},
                                  {"name": "sidecar", "image": "side:1"}]}}}
    })
}

#[tokio::test]
async fn strategic_merge_patch_merges_containers_and_env_by_name() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<Deployment> = Api::namespaced(c, "default");
    api.create(
        &PostParams::default(),
        &serde_json::from_value(deployment())?,
    )
    .await?;
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "app", "image": "demo:2", "env": [{"name": "B", "value": "2"}]}]}}}});
    let d = api
        .patch("web", &PatchParams::default(), &Patch::Strategic(patch))
        .await?;
    let cs = d.spec.template.spec.unwrap().containers;
    assert_eq!(cs.len(), 2, "the sidecar is kept");
    assert_eq!(cs[0].image.as_deref(), Some("demo:2"));
    let env: Vec<String> = cs[0]
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(env, ["A", "B"]);
    // A merge patch replaces the whole list instead.
    let merge =
        json!({"spec": {"template": {"spec": {"containers": [{"name": "only", "image": "x"}]}}}});
    let d = api
        .patch("web", &PatchParams::default(), &Patch::Merge(merge))
        .await?;
    assert_eq!(d.spec.template.spec.unwrap().containers.len(), 1);
    Ok(())
}

#[tokio::test]
async fn json_patch_applies_and_a_failed_test_op_is_422() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<ConfigMap> = Api::namespaced(c, "default");
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "c"}, "data": {"a": "1"}}))?,
    )
    .await?;
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/data/a", "value": "1"},
        {"op": "add", "path": "/data/b", "value": "2"}]))?;
    let cm = api
        .patch("c", &PatchParams::default(), &Patch::<()>::Json(ops))
        .await?;
    assert_eq!(cm.data.unwrap()["b"], "2");
    let bad: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/data/a", "value": "9"}]))?;
    let e = api_err(
        api.patch("c", &PatchParams::default(), &Patch::<()>::Json(bad))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    Ok(())
}

#[tokio::test]
async fn stale_resource_version_in_a_patch_or_update_is_409() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<ConfigMap> = Api::namespaced(c, "default");
    let v1 = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "c"}}))?,
        )
        .await?;
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"x": "1"}})),
    )
    .await?;
    let stale =
        json!({"metadata": {"resourceVersion": v1.metadata.resource_version}, "data": {"x": "2"}});
    let e = api_err(
        api.patch("c", &PatchParams::default(), &Patch::Merge(stale))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(
        e.message.contains("the object has been modified"),
        "{}",
        e.message
    );
    assert_eq!(api.get("c").await?.data.unwrap()["x"], "1");
    Ok(())
}

#[tokio::test]
async fn server_side_apply_creates_updates_conflicts_and_forces() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<Deployment> = Api::namespaced(c, "default");
    let alice = PatchParams::apply("alice");
    let d = api
        .patch("web", &alice, &Patch::Apply(deployment()))
        .await?;
    assert_eq!(d.spec.replicas, Some(1));
    let mf = d.metadata.managed_fields.unwrap();
    assert_eq!(mf[0].manager.as_deref(), Some("alice"));
    assert_eq!(mf[0].operation.as_deref(), Some("Apply"));
    // Bob applies a different replica count: a conflict naming alice's field.
    let bobs = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                      "spec": {"replicas": 3}});
    let e = api_err(
        api.patch("web", &PatchParams::apply("bob"), &Patch::Apply(&bobs))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 409);
    assert!(
        e.message.contains("alice") && e.message.contains(".spec.replicas"),
        "{}",
        e.message
    );
    let forced = api
        .patch(
            "web",
            &PatchParams::apply("bob").force(),
            &Patch::Apply(&bobs),
        )
        .await?;
    assert_eq!(forced.spec.replicas, Some(3));
    // Alice stops applying the env var: it is removed; the sidecar she still applies stays.
    let mut less = deployment();
    less["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("env");
    less["spec"].as_object_mut().unwrap().remove("replicas");
    let d = api.patch("web", &alice, &Patch::Apply(&less)).await?;
    let cs = d.spec.template.spec.unwrap().containers;
    assert!(cs[0].env.is_none(), "{:?}", cs[0].env);
    assert_eq!(cs.len(), 2);
    assert_eq!(d.spec.replicas, Some(3), "bob still owns replicas");
    Ok(())
}

#[tokio::test]
async fn apply_without_a_field_manager_is_refused() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<ConfigMap> = Api::namespaced(c, "default");
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
    let e = api_err(
        api.patch("c", &PatchParams::default(), &Patch::Apply(body))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert!(e.message.contains("fieldManager"), "{}", e.message);
    Ok(())
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<ConfigMap> = Api::namespaced(c, "default");
    api.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "c", "finalizers": ["example.com/hold"]}}),
        )?,
    )
    .await?;
    api.delete("c", &DeleteParams::default()).await?;
    let held = api.get("c").await?;
    assert!(held.metadata.deletion_timestamp.is_some());
    // No new finalizers on an object being deleted.
    let add = json!({"metadata": {"finalizers": ["example.com/hold", "example.com/more"]}});
    assert_eq!(
        api_err(
            api.patch("c", &PatchParams::default(), &Patch::Merge(add))
                .await
                .unwrap_err()
        )
        .code,
        422
    );
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    assert_eq!(api_err(api.get("c").await.unwrap_err()).code, 404);
    Ok(())
}

#[tokio::test]
async fn dependents_are_garbage_collected_with_their_owner() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<ConfigMap> = Api::namespaced(c, "default");
    let owner = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}}))?,
        )
        .await?;
    let oref = json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "dep", "ownerReferences": oref}}))?,
    )
    .await?;
    let kept = json!({"metadata": {"name": "kept", "ownerReferences": oref}});
    api.create(&PostParams::default(), &serde_json::from_value(kept)?)
        .await?;
    api.delete("owner", &DeleteParams::default()).await?;
    assert_eq!(api_err(api.get("dep").await.unwrap_err()).code, 404);
    // Orphan propagation keeps dependents and drops their reference.
    let owner2 = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner2"}}))?,
        )
        .await?;
    let oref2 = json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner2", "uid": owner2.metadata.uid}]);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "dep2", "ownerReferences": oref2}}))?,
    )
    .await?;
    api.delete("owner2", &DeleteParams::orphan()).await?;
    assert!(api.get("dep2").await?.metadata.owner_references.is_none());
    Ok(())
}

#[tokio::test]
async fn status_patch_changes_only_status() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<Deployment> = Api::namespaced(c, "default");
    api.create(
        &PostParams::default(),
        &serde_json::from_value(deployment())?,
    )
    .await?;
    let patch =
        json!({"spec": {"replicas": 9}, "status": {"readyReplicas": 1, "observedGeneration": 1}});
    let d = api
        .patch_status("web", &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    assert_eq!(d.spec.replicas, Some(1), "spec is ignored on /status");
    assert_eq!(d.status.unwrap().ready_replicas, Some(1));
    assert_eq!(d.metadata.generation, Some(1));
    // Server-side apply of status by a controller.
    let applied = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                         "status": {"availableReplicas": 1}});
    let d = api
        .patch_status(
            "web",
            &PatchParams::apply("ctrl").force(),
            &Patch::Apply(applied),
        )
        .await?;
    assert_eq!(d.status.unwrap().available_replicas, Some(1));
    Ok(())
}
