//! Watches against the test API server: event types and order, resuming from a
//! resourceVersion, `410 Expired` after compaction, selector-aware events, bookmarks,
//! timeouts, and kube-runtime's watcher recovering from a `410` and streaming lists.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use serde_json::json;

const STEP: Duration = Duration::from_secs(10);

fn cm(name: &str, labels: serde_json::Value) -> Result<ConfigMap> {
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"v": "0"}}),
    )?)
}

async fn next<S, T>(s: &mut S) -> Result<T>
where
    S: futures::Stream<Item = kube::Result<T>> + Unpin,
{
    Ok(tokio::time::timeout(STEP, s.next())
        .await
        .context("no watch event within 10s")?
        .context("the watch ended")??)
}

fn describe(e: &WatchEvent<ConfigMap>) -> String {
    match e {
        WatchEvent::Added(o) => format!("ADDED {}", o.metadata.name.clone().unwrap_or_default()),
        WatchEvent::Modified(o) => {
            format!("MODIFIED {}", o.metadata.name.clone().unwrap_or_default())
        }
        WatchEvent::Deleted(o) => {
            format!("DELETED {}", o.metadata.name.clone().unwrap_or_default())
        }
        WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
        WatchEvent::Error(e) => format!("ERROR {}", e.code),
    }
}

#[tokio::test]
async fn watch_streams_added_modified_deleted_in_order() -> Result<()> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await?, "default");
    let rv = api
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap();
    let mut w = api.watch(&WatchParams::default(), &rv).await?.boxed();
    api.create(&PostParams::default(), &cm("a", json!({}))?)
        .await?;
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "1"}})),
    )
    .await?;
    api.delete("a", &DeleteParams::default()).await?;
    let mut got = vec![];
    for _ in 0..3 {
        got.push(describe(&next(&mut w).await?));
    }
    assert_eq!(got, ["ADDED a", "MODIFIED a", "DELETED a"]);
    Ok(())
}

#[tokio::test]
async fn watch_resumes_from_an_older_resource_version() -> Result<()> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await?, "default");
    let first = api
        .create(&PostParams::default(), &cm("a", json!({}))?)
        .await?;
    api.create(&PostParams::default(), &cm("b", json!({}))?)
        .await?;
    api.delete("a", &DeleteParams::default()).await?;
    // Everything after `a` was created, replayed from history.
    let mut w = api
        .watch(
            &WatchParams::default(),
            first.metadata.resource_version.as_deref().unwrap(),
        )
        .await?
        .boxed();
    assert_eq!(describe(&next(&mut w).await?), "ADDED b");
    assert_eq!(describe(&next(&mut w).await?), "DELETED a");
    Ok(())
}

#[tokio::test]
async fn watch_from_a_compacted_resource_version_is_410_expired() -> Result<()> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await?, "default");
    let old = api
        .create(&PostParams::default(), &cm("a", json!({}))?)
        .await?;
    api.create(&PostParams::default(), &cm("b", json!({}))?)
        .await?;
    s.compact_watch_history();
    let mut w = api
        .watch(
            &WatchParams::default(),
            old.metadata.resource_version.as_deref().unwrap(),
        )
        .await?
        .boxed();
    match next(&mut w).await? {
        WatchEvent::Error(e) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
            assert!(
                e.message.contains("too old resource version"),
                "{}",
                e.message
            );
        }
        other => panic!("expected a 410 ERROR event, got {}", describe(&other)),
    }
    Ok(())
}

#[tokio::test]
async fn watch_history_is_bounded() -> Result<()> {
    let opts = ApiServerOptions {
        watch_history: 3,
        ..Default::default()
    };
    let s = TestApiServer::start(opts).await?;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await?, "default");
    let old = api
        .create(&PostParams::default(), &cm("a", json!({}))?)
        .await?;
    for i in 0..5 {
        api.create(&PostParams::default(), &cm(&format!("n{i}"), json!({}))?)
            .await?;
    }
    let mut w = api
        .watch(
            &WatchParams::default(),
            old.metadata.resource_version.as_deref().unwrap(),
        )
        .await?
        .boxed();
    assert_eq!(describe(&next(&mut w).await?), "ERROR 410");
    Ok(())
}

#[tokio::test]
async fn label_selector_watch_sees_objects_leave_and_enter() -> Result<()> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await?, "default");
    api.create(&PostParams::default(), &cm("a", json!({"team": "x"}))?)
        .await?;
    let rv = api
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap();
    let mut w = api
        .watch(&WatchParams::default().labels("team=x"), &rv)
        .await?
        .boxed();
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"team": "y"}}})),
    )
    .await?;
    api.create(&PostParams::default(), &cm("other", json!({"team": "y"}))?)
        .await?;
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"team": "x"}}})),
    )
    .await?;
    assert_eq!(describe(&next(&mut w).await?), "DELETED a");
    assert_eq!(describe(&next(&mut w).await?), "ADDED a");
    Ok(())
}

#[tokio::test]
async fn watch_without_a_version_starts_with_the_current_objects() -> Result<()> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await?, "default");
    api.create(&PostParams::default(), &cm("a", json!({}))?)
        .await?;
    let mut w = api
        .watch(&WatchParams::default().fields("metadata.name=a"), "0")
        .await?
        .boxed();
    assert_eq!(describe(&next(&mut w).await?), "ADDED a");
    Ok(())
}

#[tokio::test]
async fn bookmarks_carry_the_latest_resource_version_and_timeouts_end_watches() -> Result<()> {
    let opts = ApiServerOptions {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let s = TestApiServer::start(opts).await?;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await?, "default");
    let rv = api
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap();
    let wp = WatchParams::default().timeout(2);
    let mut w = api.watch(&wp, &rv).await?.boxed();
    // A write elsewhere moves the resourceVersion on; the bookmark reports it.
    let other: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(s.client().await?, "default");
    other
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "s"}}))?,
        )
        .await?;
    let now = s.resource_version();
    let mut saw = None;
    while let Ok(Some(ev)) = tokio::time::timeout(STEP, w.next()).await {
        if let WatchEvent::Bookmark(b) = ev? {
            saw = Some(b.metadata.resource_version);
            break;
        }
    }
    assert_eq!(saw, Some(now.to_string()));
    // timeoutSeconds=2: the stream ends by itself.
    let ended = tokio::time::timeout(STEP, async {
        while let Some(ev) = w.next().await {
            ev?;
        }
        anyhow::Ok(())
    })
    .await;
    assert!(ended.is_ok(), "the watch did not end after its timeout");
    Ok(())
}

#[tokio::test]
async fn kube_runtime_watcher_relists_after_410_and_converges() -> Result<()> {
    let opts = ApiServerOptions {
        watch_history: 4,
        ..Default::default()
    };
    let s = TestApiServer::start(opts).await?;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await?, "default");
    api.create(&PostParams::default(), &cm("before", json!({}))?)
        .await?;
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = reflector(writer, watcher(api.clone(), watcher::Config::default()))
        .default_backoff()
        .applied_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // Errors (the 410 among them) are reported and the watcher goes on.
        while stream.next().await.is_some() {}
    });
    reader.wait_until_ready().await?;
    // Wait for the watch that follows the initial list, so the partition cuts it.
    let deadline = tokio::time::Instant::now() + STEP;
    while !s.requests().iter().any(|r| r.query.contains("watch=true")) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the watcher never started watching"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lists_before = s
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.query.contains("watch="))
        .count();
    // Partition: the watch is cut, and more changes happen than the history keeps.
    s.interrupt_watches();
    api.delete("before", &DeleteParams::default()).await?;
    for i in 0..10 {
        api.create(&PostParams::default(), &cm(&format!("n{i}"), json!({}))?)
            .await?;
    }
    s.resume_watches();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut names: Vec<String> = reader
            .state()
            .iter()
            .filter_map(|o| o.metadata.name.clone())
            .collect();
        names.sort();
        if names == (0..10).map(|i| format!("n{i}")).collect::<Vec<_>>() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the reflector did not converge: {names:?}; requests: {:#?}",
            s.requests()
                .iter()
                .map(|r| format!("{} {}?{} {}", r.method, r.path, r.query, r.status))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lists_after = s
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.query.contains("watch="))
        .count();
    assert!(
        lists_after > lists_before,
        "the watcher converged without relisting, so it never saw the 410"
    );
    task.abort();
    Ok(())
}

#[tokio::test]
async fn kube_runtime_streaming_list_watcher_sees_existing_and_new_objects() -> Result<()> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await?, "default");
    api.create(&PostParams::default(), &cm("old", json!({}))?)
        .await?;
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = reflector(
        writer,
        watcher(api.clone(), watcher::Config::default().streaming_lists()),
    )
    .applied_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // Errors (the 410 among them) are reported and the watcher goes on.
        while stream.next().await.is_some() {}
    });
    tokio::time::timeout(STEP, reader.wait_until_ready()).await??;
    assert_eq!(reader.state().len(), 1);
    api.create(&PostParams::default(), &cm("new", json!({}))?)
        .await?;
    let deadline = tokio::time::Instant::now() + STEP;
    while reader.state().len() != 2 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "new object not seen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        s.requests()
            .iter()
            .any(|r| r.query.contains("sendInitialEvents=true"))
    );
    task.abort();
    Ok(())
}

#[tokio::test]
async fn metadata_lists_and_watches_return_partial_object_metadata() -> Result<()> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await?, "default");
    api.create(&PostParams::default(), &cm("a", json!({"k": "v"}))?)
        .await?;
    let list = api
        .list_metadata(&ListParams::default().labels("k=v"))
        .await?;
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].metadata.name.as_deref(), Some("a"));
    let rv = list.metadata.resource_version.unwrap();
    let mut w = api
        .watch_metadata(&WatchParams::default(), &rv)
        .await?
        .boxed();
    api.delete("a", &DeleteParams::default()).await?;
    match tokio::time::timeout(STEP, w.next())
        .await?
        .context("ended")??
    {
        WatchEvent::Deleted(m) => assert_eq!(m.metadata.name.as_deref(), Some("a")),
        other => panic!("expected DELETED, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn legacy_single_object_watch_on_the_object_path() -> Result<()> {
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let c = s.client().await?;
    let api: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    api.create(&PostParams::default(), &cm("a", json!({}))?)
        .await?;
    api.create(&PostParams::default(), &cm("b", json!({}))?)
        .await?;
    let req =
        http::Request::get("/api/v1/namespaces/default/configmaps/b?watch=true&timeoutSeconds=1")
            .body(vec![])?;
    let mut lines = c.request_events::<ConfigMap>(req).await?.boxed();
    assert_eq!(describe(&next(&mut lines).await?), "ADDED b");
    Ok(())
}

#[tokio::test]
async fn concurrent_writers_are_seen_once_each_in_resource_version_order() -> Result<()> {
    const N: usize = 200;
    let s = TestApiServer::start(ApiServerOptions::default()).await?;
    let api: Api<ConfigMap> = Api::namespaced(s.client().await?, "default");
    let rv = api
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap();
    let mut w = api.watch(&WatchParams::default(), &rv).await?.boxed();
    let writes = futures::stream::iter(0..N)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &cm(&format!("c{i}"), json!({}))?)
                    .await
                    .map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>();
    let results = tokio::time::timeout(Duration::from_secs(60), writes).await?;
    assert!(results.iter().all(Result::is_ok), "every create succeeds");
    let mut last = 0u64;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < N {
        match next(&mut w).await? {
            WatchEvent::Added(o) => {
                let rv: u64 = o
                    .metadata
                    .resource_version
                    .as_deref()
                    .unwrap_or("0")
                    .parse()?;
                assert!(rv > last, "resourceVersions must increase along the watch");
                last = rv;
                assert!(
                    seen.insert(o.metadata.name.unwrap()),
                    "an object was seen twice"
                );
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {}", describe(&other)),
        }
    }
    Ok(())
}
