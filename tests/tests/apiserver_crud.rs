//! kube-rs CRUD against the test API server, one test per kind, plus auth and errors.

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::json;

async fn server() -> Result<(TestApiServer, kube::Client)> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let c = s.client().await?;
    Ok((s, c))
}

fn err_code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn configmap_create_get_list_replace_delete() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<ConfigMap> = Api::namespaced(c, "default");
    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "cfg", "labels": {"app": "x"}}, "data": {"a": "1"}}),
    )?;
    let created = api.create(&PostParams::default(), &cm).await?;
    let uid = created.metadata.uid.clone().expect("uid set");
    assert!(created.metadata.creation_timestamp.is_some());
    let got = api.get("cfg").await?;
    assert_eq!(got.metadata.uid.as_deref(), Some(uid.as_str()));
    assert_eq!(got.data.clone().unwrap()["a"], "1");
    let list = api.list(&ListParams::default().labels("app=x")).await?;
    assert_eq!(list.items.len(), 1);
    assert!(
        api.list(&ListParams::default().labels("app=y"))
            .await?
            .items
            .is_empty()
    );
    let mut upd = got.clone();
    upd.data = Some([("a".to_string(), "2".to_string())].into());
    let replaced = api.replace("cfg", &PostParams::default(), &upd).await?;
    let rv1: u64 = got.metadata.resource_version.unwrap().parse()?;
    let rv2: u64 = replaced
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()?;
    assert!(rv2 > rv1, "resourceVersion must increase");
    // Replacing with the stale resourceVersion is a conflict.
    assert_eq!(
        err_code(
            api.replace("cfg", &PostParams::default(), &upd)
                .await
                .unwrap_err()
        ),
        409
    );
    api.delete("cfg", &DeleteParams::default()).await?;
    assert_eq!(err_code(api.get("cfg").await.unwrap_err()), 404);
    Ok(())
}

#[tokio::test]
async fn create_twice_is_already_exists_and_bad_names_are_invalid() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "dup"}}))?;
    api.create(&PostParams::default(), &cm).await?;
    let e = api.create(&PostParams::default(), &cm).await.unwrap_err();
    match e {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
        }
        other => panic!("{other:?}"),
    }
    let bad: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "Not_Valid"}}))?;
    match api.create(&PostParams::default(), &bad).await.unwrap_err() {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
            assert!(
                s.message
                    .contains("metadata.name: Invalid value: \"Not_Valid\""),
                "{}",
                s.message
            );
        }
        other => panic!("{other:?}"),
    }
    // A namespace that does not exist.
    let other: Api<ConfigMap> = Api::namespaced(c, "nope");
    assert_eq!(
        err_code(other.create(&PostParams::default(), &cm).await.unwrap_err()),
        404
    );
    Ok(())
}

#[tokio::test]
async fn generate_name_gives_a_unique_name() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<Secret> = Api::namespaced(c, "default");
    let s: Secret = serde_json::from_value(
        json!({"metadata": {"generateName": "tok-"}, "stringData": {"k": "v"}}),
    )?;
    let a = api.create(&PostParams::default(), &s).await?;
    let b = api.create(&PostParams::default(), &s).await?;
    let (an, bn) = (a.metadata.name.unwrap(), b.metadata.name.unwrap());
    assert!(an.starts_with("tok-") && an.len() == 9, "{an}");
    assert_ne!(an, bn);
    assert_eq!(a.type_.as_deref(), Some("Opaque"));
    assert_eq!(a.data.unwrap()["k"].0, b"v");
    Ok(())
}

#[tokio::test]
async fn namespaces_are_created_and_terminate_with_their_content() -> Result<()> {
    let (_s, c) = server().await?;
    let nss: Api<Namespace> = Api::all(c.clone());
    let names: Vec<String> = nss
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(names.contains(&"default".to_string()) && names.contains(&"kube-system".to_string()));
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "team-a"}}))?,
    )
    .await?;
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "team-a");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "x"}}))?,
    )
    .await?;
    nss.delete("team-a", &DeleteParams::default()).await?;
    assert_eq!(err_code(cms.get("x").await.unwrap_err()), 404);
    assert_eq!(err_code(nss.get("team-a").await.unwrap_err()), 404);
    // Labels must be DNS-1123 labels for namespaces.
    let bad: Namespace = serde_json::from_value(json!({"metadata": {"name": "a.b"}}))?;
    assert_eq!(
        err_code(nss.create(&PostParams::default(), &bad).await.unwrap_err()),
        422
    );
    Ok(())
}

fn deployment(name: &str, replicas: i32) -> Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "app", "image": "demo:1", "ports": [{"containerPort": 8080}]}]}}}
    }))?)
}

#[tokio::test]
async fn deployment_crud_generation_and_status_subresource() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<Deployment> = Api::namespaced(c, "default");
    let mut d = deployment("web", 1)?;
    d.status = Some(serde_json::from_value(json!({"replicas": 99}))?);
    let created = api.create(&PostParams::default(), &d).await?;
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.status.is_none_or(|s| s.replicas.is_none()),
        "status is dropped on create"
    );
    let spec = created.spec.clone();
    assert_eq!(
        spec.strategy.unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    // A status write does not bump the generation; a spec write does.
    let mut st = api.get_status("web").await?;
    st.status = Some(serde_json::from_value(
        json!({"replicas": 1, "observedGeneration": 1}),
    )?);
    let after_status = api
        .replace_status("web", &PostParams::default(), &st)
        .await?;
    assert_eq!(after_status.metadata.generation, Some(1));
    assert_eq!(after_status.status.unwrap().replicas, Some(1));
    let mut upd = api.get("web").await?;
    upd.spec.replicas = Some(3);
    upd.status = None;
    let after_spec = api.replace("web", &PostParams::default(), &upd).await?;
    assert_eq!(after_spec.metadata.generation, Some(2));
    assert_eq!(
        after_spec.status.unwrap().replicas,
        Some(1),
        "status is kept by a main-resource update"
    );
    // Selector must match the template labels.
    let mut bad = deployment("bad", 1)?;
    bad.spec.template.metadata.as_mut().unwrap().labels =
        Some([("app".into(), "other".into())].into());
    assert_eq!(
        err_code(api.create(&PostParams::default(), &bad).await.unwrap_err()),
        422
    );
    Ok(())
}

#[tokio::test]
async fn deployment_scale_subresource() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<Deployment> = Api::namespaced(c, "default");
    api.create(&PostParams::default(), &deployment("web", 2)?)
        .await?;
    let scale = api.get_scale("web").await?;
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=web"));
    let patch = kube::api::Patch::Merge(json!({"spec": {"replicas": 0}}));
    let s = api
        .patch_scale("web", &kube::api::PatchParams::default(), &patch)
        .await?;
    assert_eq!(s.spec.unwrap().replicas, Some(0));
    assert_eq!(api.get("web").await?.spec.replicas, Some(0));
    Ok(())
}

#[tokio::test]
async fn pods_start_pending_and_bind_to_a_node() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<Pod> = Api::namespaced(c, "default");
    let p: Pod = serde_json::from_value(
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}),
    )?;
    let created = api.create(&PostParams::default(), &p).await?;
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Pending"));
    // An unbound pod is deleted at once.
    api.delete("p", &DeleteParams::default()).await?;
    assert_eq!(err_code(api.get("p").await.unwrap_err()), 404);
    Ok(())
}

#[tokio::test]
async fn bound_pods_terminate_gracefully_until_deleted_with_grace_zero() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<Pod> = Api::namespaced(c, "default");
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "p"},
        "spec": {"nodeName": "node-a", "terminationGracePeriodSeconds": 5, "containers": [{"name": "c", "image": "x"}]}}))?;
    api.create(&PostParams::default(), &p).await?;
    api.delete("p", &DeleteParams::default()).await?;
    let terminating = api.get("p").await?;
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(5));
    api.delete(
        "p",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(err_code(api.get("p").await.unwrap_err()), 404);
    Ok(())
}

#[tokio::test]
async fn services_get_cluster_ips_from_the_loopback_range() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<Service> = Api::namespaced(c, "default");
    let svc: Service = serde_json::from_value(
        json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}),
    )?;
    let a = api.create(&PostParams::default(), &svc).await?;
    let ip: std::net::Ipv4Addr = a
        .spec
        .as_ref()
        .unwrap()
        .cluster_ip
        .as_deref()
        .unwrap()
        .parse()?;
    assert_eq!(ip.octets()[..2], [127, 96], "{ip}");
    let mut svc2 = svc.clone();
    svc2.metadata.name = Some("web2".into());
    let b = api.create(&PostParams::default(), &svc2).await?;
    assert_ne!(
        a.spec.unwrap().cluster_ip,
        b.spec.as_ref().unwrap().cluster_ip
    );
    // Asking for an address outside the range, or one in use, is invalid.
    let mut outside = svc.clone();
    outside.metadata.name = Some("outside".into());
    outside.spec.as_mut().unwrap().cluster_ip = Some("192.0.2.10".into());
    assert_eq!(
        err_code(
            api.create(&PostParams::default(), &outside)
                .await
                .unwrap_err()
        ),
        422
    );
    let mut taken = svc.clone();
    taken.metadata.name = Some("taken".into());
    taken.spec.as_mut().unwrap().cluster_ip = b.spec.unwrap().cluster_ip;
    assert_eq!(
        err_code(
            api.create(&PostParams::default(), &taken)
                .await
                .unwrap_err()
        ),
        422
    );
    // Deleting frees the address.
    api.delete("web2", &DeleteParams::default()).await?;
    api.create(&PostParams::default(), &taken).await?;
    Ok(())
}

#[tokio::test]
async fn endpoint_slices_refuse_loopback_addresses() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<EndpointSlice> = Api::namespaced(c, "default");
    let bad: EndpointSlice = serde_json::from_value(
        json!({"metadata": {"name": "web-1"}, "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}], "ports": [{"port": 8080}]}),
    )?;
    match api.create(&PostParams::default(), &bad).await.unwrap_err() {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422);
            assert!(
                s.message
                    .contains("may not be in the loopback range (127.0.0.0/8, ::1/128)"),
                "{}",
                s.message
            );
        }
        other => panic!("{other:?}"),
    }
    let good: EndpointSlice = serde_json::from_value(
        json!({"metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["198.18.0.5"], "conditions": {"ready": true}}], "ports": [{"port": 8080}]}),
    )?;
    let created = api.create(&PostParams::default(), &good).await?;
    assert_eq!(created.ports.unwrap()[0].protocol.as_deref(), Some("TCP"));
    let l = api
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await?;
    assert_eq!(l.items.len(), 1);
    Ok(())
}

#[tokio::test]
async fn leases_round_trip_micro_times() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<Lease> = Api::namespaced(c, "default");
    let l: Lease = serde_json::from_value(json!({"metadata": {"name": "leader"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15, "renewTime": "2025-01-01T00:00:00.123456Z"}}))?;
    api.create(&PostParams::default(), &l).await?;
    let got = api.get("leader").await?;
    assert_eq!(
        got.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some("a")
    );
    assert!(got.spec.unwrap().renew_time.is_some());
    Ok(())
}

#[tokio::test]
async fn requests_without_the_token_are_unauthorized() -> Result<()> {
    let (s, _c) = server().await?;
    let mut cfg = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(s.kubeconfig_path())?,
        &Default::default(),
    )
    .await?;
    cfg.auth_info.token = Some("wrong".to_string().into());
    let c = kube::Client::try_from(cfg)?;
    let api: Api<ConfigMap> = Api::namespaced(c, "default");
    match api.list(&ListParams::default()).await.unwrap_err() {
        kube::Error::Api(st) => assert_eq!((st.code, st.reason.as_str()), (401, "Unauthorized")),
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn dry_run_validates_but_stores_nothing() -> Result<()> {
    let (_s, c) = server().await?;
    let api: Api<Service> = Api::namespaced(c, "default");
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let svc: Service = serde_json::from_value(
        json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}),
    )?;
    let out = api.create(&dry, &svc).await?;
    assert!(out.spec.unwrap().cluster_ip.is_some());
    assert_eq!(err_code(api.get("web").await.unwrap_err()), 404);
    let bad: Service =
        serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {"ports": []}}))?;
    assert_eq!(err_code(api.create(&dry, &bad).await.unwrap_err()), 422);
    Ok(())
}

#[tokio::test]
async fn unknown_paths_and_methods_get_status_errors() -> Result<()> {
    let (_s, c) = server().await?;
    let get = |p: &str| http::Request::get(p.to_string()).body(Vec::new());
    for (req, code) in [
        (get("/apis/nothing.example.com/v1/widgets")?, 404),
        (get("/api/v1/namespaces/default/nothings")?, 404),
        (get("/api/v1/namespaces/default/pods/p/log")?, 404),
        (
            http::Request::post("/apis/apps/v1/deployments").body(b"{}".to_vec())?,
            405,
        ),
        (
            http::Request::put("/api/v1/namespaces/default/configmaps").body(b"{}".to_vec())?,
            405,
        ),
    ] {
        let what = format!("{} {}", req.method(), req.uri());
        match c.request::<serde_json::Value>(req).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, code, "{what}"),
            other => panic!("{what}: expected a {code} Status, got {other:?}"),
        }
    }
    Ok(())
}
