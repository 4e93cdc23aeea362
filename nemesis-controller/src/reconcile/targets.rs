//! Shared watches of the apps targets (Deployments, StatefulSets): one watch per kind and
//! namespace for the whole leadership term, however many policies target objects there,
//! instead of one watch per policy. At 10,000 policies a watch each meant 10,000 open
//! connections to the API server (the Lease renewal starved behind them); now it is one
//! per namespace. A namespace-wide watch needs `list`/`watch` there, which the
//! controller's role grants already.
//!
//! Only what the readiness rules read is kept of each object (`spec.replicas`,
//! `status.readyReplicas`, `status.observedGeneration` and the metadata), so the cache
//! costs a few hundred bytes per object whatever its pod template holds.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, ObjectMeta};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_api};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::AbortOnDrop;
use crate::permissions::explain_chain;

/// How a shared watch stands: listed once (objects can be told missing), or refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchState {
    pub listed: bool,
    /// The API server refused the watch (401/403), with why.
    pub refused: Option<String>,
}

type Key = (String, String);

/// One kind in one namespace: the watch task (stopped when dropped) and what it keeps.
struct Shared {
    cache: Arc<Cache>,
    _task: AbortOnDrop,
}

struct Cache {
    objects: Mutex<HashMap<String, watch::Sender<Option<Arc<DynamicObject>>>>>,
    state: watch::Sender<WatchState>,
}

impl Cache {
    fn slot(&self, name: &str) -> watch::Sender<Option<Arc<DynamicObject>>> {
        self.objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }
}

/// What a policy's workload watch follows: its object (`None`: not there) and the
/// shared watch's state. Both change-notify.
pub struct Subscription {
    pub object: watch::Receiver<Option<Arc<DynamicObject>>>,
    pub state: watch::Receiver<WatchState>,
}

/// The term's shared watches, started on first use.
pub struct AppsTargets {
    client: Client,
    watches: Mutex<HashMap<Key, Arc<Shared>>>,
}

impl std::fmt::Debug for AppsTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppsTargets").finish_non_exhaustive()
    }
}

impl AppsTargets {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            watches: Mutex::new(HashMap::new()),
        }
    }

    /// Follows `namespace/name` of `resource` (a Deployment or StatefulSet resource).
    pub fn subscribe(&self, resource: &ApiResource, namespace: &str, name: &str) -> Subscription {
        let key = (resource.plural.clone(), namespace.to_string());
        let shared = self
            .watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert_with(|| self.start(resource, namespace))
            .clone();
        Subscription {
            object: shared.cache.slot(name).subscribe(),
            state: shared.cache.state.subscribe(),
        }
    }

    /// How many shared watches run (one per kind and namespace in use).
    pub fn watches(&self) -> usize {
        self.watches.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn start(&self, resource: &ApiResource, namespace: &str) -> Arc<Shared> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, resource);
        let cache = Arc::new(Cache {
            objects: Mutex::new(HashMap::new()),
            state: watch::channel(WatchState::default()).0,
        });
        let what = format!("{} in {namespace}", resource.plural);
        let task = tokio::spawn({
            let cache = cache.clone();
            async move {
                let mut events = watch_api(api, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                let mut relisting: Option<HashSet<String>> = None;
                while let Some(ev) = events.next().await {
                    match ev {
                        Ok(ev) => {
                            cache.state.send_if_modified(|s| s.refused.take().is_some());
                            on_event(&cache, &mut relisting, ev);
                        }
                        Err(e) => {
                            let why = explain_chain(&e);
                            tracing::warn!(watch = %what, err = %why, "watching targets failed; retrying");
                            if super::workload::refused(&e) {
                                cache.state.send_modify(|s| s.refused = Some(why));
                            }
                        }
                    }
                }
            }
        });
        Arc::new(Shared {
            cache,
            _task: AbortOnDrop(task),
        })
    }
}

fn on_event(shared: &Cache, relisting: &mut Option<HashSet<String>>, ev: Event<DynamicObject>) {
    match ev {
        Event::Init => *relisting = Some(HashSet::new()),
        Event::InitApply(o) | Event::Apply(o) => {
            let name = o.name_any();
            if let Some(seen) = relisting {
                seen.insert(name.clone());
            }
            let trimmed = Arc::new(trim(o));
            shared.slot(&name).send_if_modified(|cur| {
                let changed = cur.as_deref() != Some(&*trimmed);
                *cur = Some(trimmed);
                changed
            });
        }
        Event::Delete(o) => gone(shared, &o.name_any()),
        Event::InitDone => {
            let seen = relisting.take().unwrap_or_default();
            let missing: Vec<String> = shared
                .objects
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .filter(|k| !seen.contains(*k))
                .cloned()
                .collect();
            for name in missing {
                gone(shared, &name);
            }
            shared
                .state
                .send_if_modified(|s| !std::mem::replace(&mut s.listed, true));
        }
    }
}

/// The object is not there: followers see `None`; nobody following, the slot goes.
fn gone(shared: &Cache, name: &str) {
    let mut objects = shared.objects.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(tx) = objects.get(name) {
        if tx.receiver_count() == 0 {
            objects.remove(name);
        } else {
            tx.send_if_modified(|cur| cur.take().is_some());
        }
    }
}

/// What the readiness rules read of an apps object, nothing else. Pure.
pub fn trim(o: DynamicObject) -> DynamicObject {
    let pick = |p: &str| o.data.pointer(p).cloned().unwrap_or(Value::Null);
    let mut data = json!({
        "spec": {"replicas": pick("/spec/replicas")},
        "status": {
            "readyReplicas": pick("/status/readyReplicas"),
            "observedGeneration": pick("/status/observedGeneration"),
        },
    });
    // Absent stays absent (`spec.replicas` absent means 1 to the readiness rules).
    for (section, field) in [
        ("spec", "replicas"),
        ("status", "readyReplicas"),
        ("status", "observedGeneration"),
    ] {
        if data[section][field].is_null()
            && let Some(m) = data[section].as_object_mut()
        {
            m.remove(field);
        }
    }
    DynamicObject {
        types: o.types,
        metadata: ObjectMeta {
            name: o.metadata.name,
            namespace: o.metadata.namespace,
            uid: o.metadata.uid,
            generation: o.metadata.generation,
            resource_version: o.metadata.resource_version,
            ..Default::default()
        },
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::workload::apps_replicas;

    #[test]
    fn trimming_keeps_what_the_readiness_rules_read() {
        let full: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "ns", "generation": 4,
                         "labels": {"a": "b"}, "annotations": {"big": "x".repeat(4096)}},
            "spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "c"}]}}},
            "status": {"readyReplicas": 2, "observedGeneration": 4, "replicas": 3},
        }))
        .unwrap();
        let before = apps_replicas(&full.data, full.metadata.generation);
        let t = trim(full);
        assert_eq!(apps_replicas(&t.data, t.metadata.generation), before);
        assert_eq!(before, (3, 2));
        assert!(t.metadata.annotations.is_none());
        assert!(t.data.pointer("/spec/template").is_none());
        // No spec.replicas stays absent (it means 1).
        let bare: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "generation": 1}, "spec": {}, "status": {},
        }))
        .unwrap();
        let t = trim(bare);
        assert_eq!(apps_replicas(&t.data, t.metadata.generation), (1, 0));
    }
}
