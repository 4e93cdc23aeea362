//! Chunked lists through kube-rs and the real kubectl: `limit` and `continue` page a
//! list, every page shows the first page's snapshot even while objects change, an
//! expired continue token gets upstream's `410 Expired` with a token that continues at
//! the latest state, and `kubectl get --chunk-size` reads every page.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::json;

const NS: &str = "pages";

async fn server_with_config_maps(names: &[&str]) -> Result<(TestApiServer, Api<ConfigMap>)> {
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
        )
        .await?;
    let cms: Api<ConfigMap> = Api::namespaced(client, NS);
    for n in names {
        cms.create(&PostParams::default(), &config_map(n, "1")?)
            .await?;
    }
    Ok((server, cms))
}

fn config_map(name: &str, v: &str) -> Result<ConfigMap> {
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name}, "data": {"v": v}}),
    )?)
}

fn names(list: &kube::core::ObjectList<ConfigMap>) -> Vec<String> {
    list.items
        .iter()
        .map(|c| c.metadata.name.clone().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn pages_show_one_snapshot_while_objects_change() -> Result<()> {
    let (server, cms) = server_with_config_maps(&["a", "b", "c", "d", "e"]).await?;
    let first = cms.list(&ListParams::default().limit(2)).await?;
    assert_eq!(names(&first), ["a", "b"]);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let token = first
        .metadata
        .continue_
        .clone()
        .context("a continue token")?;
    let snapshot_rv = first.metadata.resource_version.clone();

    // Between pages: one added, one removed, one changed.
    cms.create(&PostParams::default(), &config_map("bb", "1")?)
        .await?;
    cms.delete("c", &DeleteParams::default()).await?;
    cms.patch(
        "d",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await?;

    let second = cms
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await?;
    assert_eq!(names(&second), ["c", "d"], "the first page's snapshot");
    assert_eq!(
        second.items[1].data.as_ref().map(|d| d["v"].as_str()),
        Some("1"),
        "d as it was at the first page"
    );
    assert_eq!(second.metadata.resource_version, snapshot_rv);
    let token = second.metadata.continue_.clone().context("a third page")?;
    let third = cms
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await?;
    assert_eq!(names(&third), ["e"]);
    assert_eq!(third.metadata.continue_, None);

    // A fresh list sees the changes.
    let now = cms.list(&ListParams::default()).await?;
    assert_eq!(names(&now), ["a", "b", "bb", "d", "e"]);
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_expired_continue_token_is_410_with_a_way_on() -> Result<()> {
    let (server, cms) = server_with_config_maps(&["a", "b", "c"]).await?;
    let first = cms.list(&ListParams::default().limit(1)).await?;
    let token = first
        .metadata
        .continue_
        .clone()
        .context("a continue token")?;
    cms.create(&PostParams::default(), &config_map("aa", "1")?)
        .await?;
    server.compact_watch_history();

    // Through kube-rs: the error names the reason and upstream's message.
    let err = cms
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .unwrap_err();
    match &err {
        kube::Error::Api(e) => {
            ensure!(e.code == 410 && e.reason == "Expired", "{e:?}");
            ensure!(
                e.message.starts_with(
                    "The provided continue parameter is too old to display a consistent list result."
                ),
                "{}",
                e.message
            );
        }
        other => anyhow::bail!("expected 410 Expired, got {other:?}"),
    }
    // The raw Status (kube-rs keeps no metadata of an error): it carries a way on.
    let client = server.client().await?;
    let req = http::Request::get(format!(
        "/api/v1/namespaces/{NS}/configmaps?limit=1&continue={token}"
    ))
    .body(kube::client::Body::empty())?;
    let resp = client.send(req).await?;
    assert_eq!(resp.status().as_u16(), 410);
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await?
        .to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&bytes)?;
    assert_eq!(status["code"], 410);
    let way_on = status["metadata"]["continue"]
        .as_str()
        .context("the 410 carries a continue token")?;
    // It continues at the latest state, after the last key already returned.
    let rest = cms
        .list(&ListParams::default().continue_token(way_on))
        .await?;
    assert_eq!(names(&rest), ["aa", "b", "c"]);

    // A token that is not one is a 400.
    let bad = cms
        .list(&ListParams::default().continue_token("not-a-token"))
        .await
        .unwrap_err();
    match bad {
        kube::Error::Api(e) => {
            assert_eq!(e.code, 400);
            assert!(e.message.starts_with("invalid continue token"), "{e:?}");
        }
        other => anyhow::bail!("expected 400, got {other:?}"),
    }
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn kubectl_get_reads_every_chunk() -> Result<()> {
    let names: Vec<String> = (0..7).map(|i| format!("cm-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (server, _cms) = server_with_config_maps(&refs).await?;
    let out = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(server.kubeconfig_path())
        .args([
            "get",
            "configmaps",
            "-n",
            NS,
            "--chunk-size=3",
            "-o",
            "name",
        ])
        .output()
        .await
        .context("running kubectl")?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_start_matches("configmap/").to_owned())
        .collect();
    assert_eq!(got, names);
    let pages: BTreeMap<usize, String> = server
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == format!("/api/v1/namespaces/{NS}/configmaps"))
        .map(|r| r.query.clone())
        .enumerate()
        .collect();
    assert_eq!(pages.len(), 3, "7 objects in chunks of 3: {pages:?}");
    assert!(pages.values().all(|q| q.contains("limit=3")), "{pages:?}");
    assert_eq!(
        pages.values().filter(|q| q.contains("continue=")).count(),
        2,
        "{pages:?}"
    );
    server.shutdown().await;
    Ok(())
}
