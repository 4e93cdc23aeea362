//! One policy's view of its target: finds the kind through API discovery and checks that
//! it serves `/scale`, watches the object (and, for kinds other than Deployment and
//! StatefulSet, the pods its `/scale` selector picks), and publishes the replicas and
//! ready replicas the actor decides on, or why the target cannot be used. It never
//! scales; the readiness rules are the pure functions at the bottom.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::core::subresource::Scale;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_api};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;
use tokio::sync::{Notify, watch};

use super::status::Blocked;
use super::targets::AppsTargets;
use super::{API_TIMEOUT, AbortOnDrop};
use crate::permissions::{explain, explain_chain};
use crate::policy::WorkloadRef;

/// A target that cannot be used (kind not served, no `/scale`, unreadable) is looked up
/// again this often: installing a CRD or granting a rule needs no restart.
pub const REDISCOVER: Duration = Duration::from_secs(15);
/// A custom target's `/scale` is read again this often beside the object's watch events
/// (its status may be kept by a controller whose writes the watch already shows; this
/// only bounds how stale a missed one can be).
const SCALE_REFRESH: Duration = Duration::from_secs(15);

/// What the actor knows about its target.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// Not listed yet: the actor waits rather than report a target missing.
    Unknown,
    Blocked(Blocked),
    Present(Observed),
}

/// The target's replicas and the ready ones, with where its `/scale` is.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub replicas: u32,
    pub ready: u32,
    pub resource: ApiResource,
    /// The object's `resourceVersion` these replicas were read at: a scale sent on the
    /// strength of them is conditional on it (another writer's change since is a 409,
    /// not a change recorded twice).
    pub version: Option<String>,
    /// The object's `metadata.generation` (raised by every change of its spec, a scale
    /// included): noted with a `Sleep`, so that a leader inheriting it can tell whether
    /// the target was scaled since (see `reconcile::inherited_sleep`).
    pub generation: Option<i64>,
}

/// A running watch of one target; dropping it stops the watch.
pub struct Watch {
    pub target: WorkloadRef,
    rx: watch::Receiver<Seen>,
    _task: AbortOnDrop,
}

impl Watch {
    /// Starts watching `target` in `namespace`; `poke` is notified on every change.
    /// Deployments and StatefulSets are followed through the term's shared watches
    /// (`targets`); other kinds get a watch of their own.
    pub fn start(
        client: Client,
        targets: Arc<AppsTargets>,
        namespace: &str,
        target: WorkloadRef,
        poke: Arc<Notify>,
    ) -> Self {
        let (tx, rx) = watch::channel(Seen::Unknown);
        let task = tokio::spawn(run(
            client,
            targets,
            namespace.to_string(),
            target.clone(),
            Publisher { tx, poke },
        ));
        Self {
            target,
            rx,
            _task: AbortOnDrop(task),
        }
    }

    pub fn seen(&self) -> Seen {
        self.rx.borrow().clone()
    }
}

struct Publisher {
    tx: watch::Sender<Seen>,
    poke: Arc<Notify>,
}

impl Publisher {
    fn publish(&self, seen: Seen) {
        if self.tx.send_if_modified(|s| {
            let changed = *s != seen;
            *s = seen;
            changed
        }) {
            self.poke.notify_one();
        }
    }
}

async fn run(
    client: Client,
    targets: Arc<AppsTargets>,
    namespace: String,
    target: WorkloadRef,
    out: Publisher,
) {
    loop {
        match discover(&client, &target).await {
            Ok(resource) if target.is_apps_kind() => {
                follow_shared(&targets, &namespace, &target, resource, &out).await
            }
            Ok(resource) => follow(&client, &namespace, &target, resource, &out).await,
            Err(b) => {
                tracing::warn!(target = %target, reason = b.reason, message = %b.message, "target not usable; looking again in 15 s");
                out.publish(Seen::Blocked(b));
            }
        }
        tokio::time::sleep(REDISCOVER).await;
    }
}

// === discovery ===

/// The target's API resource, if the API serves its kind, namespaced, with `/scale`.
async fn discover(client: &Client, target: &WorkloadRef) -> Result<ApiResource, Blocked> {
    let gvk = GroupVersionKind::gvk(target.group(), target.version(), &target.kind);
    if target.is_apps_kind() {
        // Every cluster serves these two with /scale; no discovery call needed.
        let plural = format!("{}s", target.kind.to_lowercase());
        return Ok(ApiResource::from_gvk_with_plural(&gvk, &plural));
    }
    let listed = if target.group().is_empty() {
        tokio::time::timeout(
            API_TIMEOUT,
            client.list_core_api_resources(&target.api_version),
        )
        .await
    } else {
        tokio::time::timeout(
            API_TIMEOUT,
            client.list_api_group_resources(&target.api_version),
        )
        .await
    };
    let list = match listed {
        Err(_) => {
            return Err(unreadable(
                target,
                format!("its API's discovery did not answer within {API_TIMEOUT:?}"),
            ));
        }
        Ok(Err(kube::Error::Api(s))) if s.code == 404 => {
            return Err(Blocked {
                reason: "TargetKindNotFound",
                message: format!(
                    "the API server does not serve {} (discovery answered 404): is the CRD \
                     or API service for kind {} installed?",
                    target.api_version, target.kind
                ),
            });
        }
        Ok(Err(e)) => return Err(unreadable(target, explain(&e))),
        Ok(Ok(l)) => l,
    };
    plan(target, &list)
}

fn unreadable(target: &WorkloadRef, why: String) -> Blocked {
    Blocked {
        reason: "TargetUnreadable",
        message: format!("cannot read {target} ({}): {why}", target.api_version),
    }
}

/// Picks the target's resource out of its group version's discovery document. Pure.
fn plan(target: &WorkloadRef, list: &APIResourceList) -> Result<ApiResource, Blocked> {
    let Some(res) = list
        .resources
        .iter()
        .find(|r| r.kind == target.kind && !r.name.contains('/'))
    else {
        let kinds: Vec<&str> = list
            .resources
            .iter()
            .filter(|r| !r.name.contains('/'))
            .map(|r| r.kind.as_str())
            .collect();
        return Err(Blocked {
            reason: "TargetKindNotFound",
            message: format!(
                "{} has no kind {} (it serves: {})",
                target.api_version,
                target.kind,
                if kinds.is_empty() {
                    "nothing".to_string()
                } else {
                    kinds.join(", ")
                }
            ),
        });
    };
    let gvk = GroupVersionKind::gvk(target.group(), target.version(), &target.kind);
    let resource = ApiResource::from_gvk_with_plural(&gvk, &res.name);
    if !res.namespaced {
        return Err(Blocked {
            reason: "TargetNotScalable",
            message: format!(
                "{} ({}) is cluster-scoped; a policy scales a resource in its own namespace",
                target.kind, target.api_version
            ),
        });
    }
    let scale = format!("{}/scale", res.name);
    let Some(sub) = list.resources.iter().find(|r| r.name == scale) else {
        return Err(Blocked {
            reason: "TargetNotScalable",
            message: format!(
                "{} ({}) has no /scale subresource; Nemesis scales through /scale (a CRD \
                 declares it under subresources.scale)",
                target.kind, target.api_version
            ),
        });
    };
    if !sub.verbs.iter().any(|v| v == "patch") {
        return Err(Blocked {
            reason: "TargetNotScalable",
            message: format!("{}'s /scale cannot be patched", target.kind),
        });
    }
    Ok(resource)
}

// === watching ===

type BoxStream<T> = Pin<Box<dyn Stream<Item = T> + Send>>;

/// What the watches have seen so far.
#[derive(Default)]
struct Facts {
    listed: bool,
    /// The object as listed so far in a relist (kept apart until the relist ends).
    relisting: Option<Option<DynamicObject>>,
    object: Option<DynamicObject>,
    /// Custom targets: the last `/scale` read, and the object version it was read at.
    scale: Option<(Scale, Option<String>)>,
    /// Custom targets: the pods of the scale's selector (`None` until listed).
    pods: Option<Vec<Pod>>,
    pods_relisting: Vec<Pod>,
    selector: Option<String>,
    /// The object or its `/scale` cannot be read (a refused permission).
    blocked: Option<Blocked>,
    /// Its pods cannot be read (a refused permission).
    pods_blocked: Option<Blocked>,
}

/// Follows an apps target through the shared watch of its kind and namespace (until the
/// term drops the shared watches).
async fn follow_shared(
    targets: &AppsTargets,
    namespace: &str,
    target: &WorkloadRef,
    resource: ApiResource,
    out: &Publisher,
) {
    let mut sub = targets.subscribe(&resource, namespace, &target.name);
    loop {
        let state = sub.state.borrow_and_update().clone();
        let object = sub.object.borrow_and_update().clone();
        let facts = Facts {
            listed: state.listed,
            object: object.map(|o| (*o).clone()),
            blocked: state.refused.map(|why| unreadable(target, why)),
            ..Default::default()
        };
        out.publish(seen(namespace, target, &resource, &facts));
        tokio::select! {
            r = sub.state.changed() => if r.is_err() { return },
            r = sub.object.changed() => if r.is_err() { return },
        }
    }
}

/// Watches the target until a watch ends (it never does with its backoff; the loop
/// around rediscovers if it did).
async fn follow(
    client: &Client,
    namespace: &str,
    target: &WorkloadRef,
    resource: ApiResource,
    out: &Publisher,
) {
    let objects: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut object_events: BoxStream<watcher::Result<Event<DynamicObject>>> = watch_api(
        objects.clone(),
        watcher::Config::default().fields(&format!("metadata.name={}", target.name)),
    )
    .default_backoff()
    .boxed();
    let mut pod_events: Option<BoxStream<watcher::Result<Event<Pod>>>> = None;
    let mut refresh = tokio::time::interval(SCALE_REFRESH);
    let mut facts = Facts::default();
    let custom = !target.is_apps_kind();
    loop {
        // Custom targets: `Some(force)` reads the /scale (force: even at a version
        // already read).
        let mut read_scale: Option<bool> = None;
        tokio::select! {
            ev = object_events.next() => match ev {
                None => return,
                Some(Ok(ev)) => {
                    facts.blocked = None;
                    on_object(&mut facts, ev);
                    read_scale = custom.then_some(false);
                }
                Some(Err(e)) => {
                    let why = explain_chain(&e);
                    tracing::warn!(target = %target, err = %why, "watching the target failed; retrying");
                    // A refusal stops the policy until a rule is granted; anything else
                    // (a dropped connection) is retried on what was seen last.
                    if refused(&e) {
                        facts.blocked = Some(unreadable(target, why));
                    }
                }
            },
            ev = next_or_pending(&mut pod_events) => match ev {
                Some(Ok(ev)) => {
                    facts.pods_blocked = None;
                    on_pod(&mut facts, ev);
                }
                Some(Err(e)) => {
                    let why = explain_chain(&e);
                    tracing::warn!(target = %target, err = %why, "watching the target's pods failed; retrying");
                    if refused(&e) {
                        facts.pods_blocked = Some(Blocked {
                            reason: "TargetUnreadable",
                            message: format!("cannot read the pods of {target} (its readiness): {why}"),
                        });
                    }
                }
                None => pod_events = None,
            },
            _ = refresh.tick(), if custom => read_scale = Some(true),
        }
        if let Some(force) = read_scale
            && facts.listed
        {
            read_scale_of(&objects, target, &mut facts, force).await;
            let selector = facts
                .scale
                .as_ref()
                .and_then(|(s, _)| s.status.as_ref())
                .map(|s| s.selector.clone().unwrap_or_default())
                .filter(|s| !s.is_empty());
            if selector != facts.selector {
                facts.selector = selector.clone();
                facts.pods = None;
                facts.pods_relisting.clear();
                pod_events = selector.map(|sel| {
                    watch_api(pods_api.clone(), watcher::Config::default().labels(&sel))
                        .default_backoff()
                        .boxed()
                });
            }
        }
        out.publish(seen(namespace, target, &resource, &facts));
    }
}

/// The API server refused the watch (401/403): retrying will not help until a rule is
/// granted or the token renewed.
pub(super) fn refused(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s))
            if s.code == 403 || s.code == 401
    )
}

async fn next_or_pending<T>(s: &mut Option<BoxStream<T>>) -> Option<T> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

fn on_object(f: &mut Facts, ev: Event<DynamicObject>) {
    match ev {
        Event::Init => f.relisting = Some(None),
        Event::InitApply(o) => f.relisting = Some(Some(o)),
        Event::InitDone => {
            f.object = f.relisting.take().flatten();
            f.listed = true;
        }
        Event::Apply(o) => f.object = Some(o),
        Event::Delete(_) => f.object = None,
    }
    if f.object.is_none() {
        f.scale = None;
    }
}

fn on_pod(f: &mut Facts, ev: Event<Pod>) {
    match ev {
        Event::Init => f.pods_relisting.clear(),
        Event::InitApply(p) => f.pods_relisting.push(p),
        Event::InitDone => f.pods = Some(std::mem::take(&mut f.pods_relisting)),
        Event::Apply(p) => {
            let pods = f.pods.get_or_insert_with(Vec::new);
            match pods.iter_mut().find(|q| q.metadata.uid == p.metadata.uid) {
                Some(q) => *q = p,
                None => pods.push(p),
            }
        }
        Event::Delete(p) => {
            if let Some(pods) = &mut f.pods {
                pods.retain(|q| q.metadata.uid != p.metadata.uid);
            }
        }
    }
}

/// Reads a custom target's `/scale` unless it was read at the object's current version
/// within the refresh interval (the interval tick always reads).
async fn read_scale_of(
    objects: &Api<DynamicObject>,
    target: &WorkloadRef,
    f: &mut Facts,
    force: bool,
) {
    let Some(obj) = &f.object else {
        f.scale = None;
        return;
    };
    let version = obj.resource_version();
    if !force && f.scale.as_ref().is_some_and(|(_, v)| *v == version) && f.blocked.is_none() {
        return;
    }
    match tokio::time::timeout(API_TIMEOUT, objects.get_scale(&target.name)).await {
        Ok(Ok(s)) => f.scale = Some((s, version)),
        Ok(Err(kube::Error::Api(s))) if s.code == 404 => f.scale = None,
        Ok(Err(e)) => {
            let why = explain(&e);
            tracing::warn!(target = %target, err = %why, "reading the target's /scale failed");
            if matches!(&e, kube::Error::Api(s) if s.code == 403 || s.code == 401) {
                f.blocked = Some(unreadable(target, format!("reading its /scale: {why}")));
            }
        }
        Err(_) => {
            tracing::warn!(target = %target, "reading the target's /scale timed out");
        }
    }
}

fn seen(namespace: &str, target: &WorkloadRef, resource: &ApiResource, f: &Facts) -> Seen {
    if let Some(b) = f.blocked.as_ref().or(f.pods_blocked.as_ref()) {
        return Seen::Blocked(b.clone());
    }
    if !f.listed {
        return Seen::Unknown;
    }
    let Some(obj) = &f.object else {
        return Seen::Blocked(Blocked {
            reason: "TargetNotFound",
            message: format!("{} {namespace}/{} does not exist", target.kind, target.name),
        });
    };
    let (replicas, ready) = if target.is_apps_kind() {
        apps_replicas(&obj.data, obj.metadata.generation)
    } else {
        let Some((scale, _)) = &f.scale else {
            return Seen::Unknown;
        };
        let spec = scale
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(0)
            .max(0) as u32;
        let status = scale
            .status
            .as_ref()
            .map_or(0, |s| s.replicas.max(0) as u32);
        let ready_pods = f
            .pods
            .as_ref()
            .map(|p| p.iter().filter(|p| pod_ready(p)).count() as u32);
        let ready = custom_ready(
            status,
            caught_up(obj.metadata.generation, observed_generation(&obj.data)),
            f.selector.is_some(),
            ready_pods,
        );
        (spec, ready)
    };
    Seen::Present(Observed {
        replicas,
        ready,
        resource: resource.clone(),
        version: obj.metadata.resource_version.clone(),
        generation: obj.metadata.generation,
    })
}

// === readiness rules (pure) ===

/// Whether a status speaks for the current spec: its controller has seen the latest
/// generation. No generation (not from an API server) or no `observedGeneration` on a
/// custom resource that never writes one: nothing to wait for.
fn caught_up(generation: Option<i64>, observed: Option<i64>) -> bool {
    match (generation, observed) {
        (Some(generation), Some(observed)) => observed >= generation,
        (None, _) => true,
        (Some(_), None) => false,
    }
}

fn observed_generation(data: &Value) -> Option<i64> {
    data.pointer("/status/observedGeneration")
        .and_then(Value::as_i64)
}

/// A Deployment's or StatefulSet's `spec.replicas` and the ready replicas its status
/// vouches for. The status speaks for the spec only once its controller has caught up
/// with it (`status.observedGeneration >= metadata.generation`): before that its ready
/// count is the previous spec's (a scale to zero not yet acted on still shows the old
/// pods ready), so it counts as none and a scale is never taken as done on it.
pub fn apps_replicas(data: &Value, generation: Option<i64>) -> (u32, u32) {
    let replicas = data
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0) as u32;
    let caught_up = match (generation, observed_generation(data)) {
        (None, _) => true,
        (g, o) => caught_up(g, o),
    };
    let ready = data
        .pointer("/status/readyReplicas")
        .and_then(Value::as_i64)
        .filter(|_| caught_up)
        .unwrap_or(0)
        .max(0) as u32;
    (replicas, ready)
}

/// A custom target's ready replicas: its selector's ready pods, at most the replicas its
/// `/scale` status counts, and none while its controller has not caught up with the
/// spec. Without a selector (a CRD without `labelSelectorPath`) the status count is all
/// there is to go on. Pods not listed yet: none ready.
fn custom_ready(
    status_replicas: u32,
    caught_up: bool,
    has_selector: bool,
    ready_pods: Option<u32>,
) -> u32 {
    if !caught_up {
        return 0;
    }
    if !has_selector {
        return status_replicas;
    }
    ready_pods.unwrap_or(0).min(status_replicas)
}

/// Running, Ready and not on its way out.
fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ready_replicas_count_only_once_the_controller_caught_up() {
        let d = |replicas: i64, observed: Option<i64>, ready: i64| {
            json!({"spec": {"replicas": replicas},
                   "status": {"observedGeneration": observed, "readyReplicas": ready}})
        };
        // Scaled 1 -> 0 -> 1 faster than the controller acts: the old pod shows ready.
        assert_eq!(apps_replicas(&d(1, Some(2), 1), Some(4)), (1, 0));
        assert_eq!(apps_replicas(&d(1, Some(4), 1), Some(4)), (1, 1));
        assert_eq!(apps_replicas(&d(3, Some(5), 2), Some(4)), (3, 2));
        assert_eq!(apps_replicas(&d(1, None, 0), Some(1)), (1, 0));
        // Not from an API server: nothing to wait for.
        assert_eq!(apps_replicas(&d(2, None, 2), None), (2, 2));
        // No replicas field: Kubernetes' default of one.
        assert_eq!(apps_replicas(&json!({"spec": {}}), None), (1, 0));
    }

    #[test]
    fn a_custom_targets_readiness_is_its_ready_pods_within_its_scale_status() {
        // (status replicas, caught up, selector, ready pods) -> ready
        let table = [
            ((2, true, true, Some(2)), 2),
            ((2, true, true, Some(1)), 1),
            // Old pods still ready while the status says they are gone.
            ((0, true, true, Some(1)), 0),
            ((3, false, true, Some(3)), 0),
            ((2, true, true, None), 0),
            ((2, true, false, None), 2),
        ];
        for ((status, up, sel, pods), want) in table {
            assert_eq!(
                custom_ready(status, up, sel, pods),
                want,
                "{status} {up} {sel} {pods:?}"
            );
        }
        assert!(caught_up(Some(3), Some(3)));
        assert!(!caught_up(Some(3), Some(2)));
        assert!(!caught_up(Some(3), None));
    }

    #[test]
    fn pods_count_as_ready_only_when_ready_and_not_terminating() {
        let pod = |ready: &str, deleting: bool| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "p", "deletionTimestamp": deleting.then_some("2030-01-01T00:00:00Z")},
                "status": {"conditions": [{"type": "Ready", "status": ready}]},
            }))
            .unwrap()
        };
        assert!(pod_ready(&pod("True", false)));
        assert!(!pod_ready(&pod("False", false)));
        assert!(!pod_ready(&pod("True", true)));
    }

    fn list(resources: serde_json::Value) -> APIResourceList {
        serde_json::from_value(json!({"groupVersion": "ml.example.com/v1", "resources": resources}))
            .unwrap()
    }

    fn model() -> WorkloadRef {
        WorkloadRef {
            api_version: "ml.example.com/v1".into(),
            kind: "Model".into(),
            name: "m".into(),
        }
    }

    #[test]
    fn discovery_names_what_makes_a_kind_unusable() {
        let res = |name: &str, kind: &str, namespaced: bool, verbs: &[&str]| {
            json!({"name": name, "kind": kind, "namespaced": namespaced, "singularName": "",
                   "verbs": verbs})
        };
        let ok = list(json!([
            res("models", "Model", true, &["get", "list", "watch", "patch"]),
            res("models/scale", "Scale", true, &["get", "patch", "update"]),
        ]));
        let r = plan(&model(), &ok).unwrap();
        assert_eq!(
            (r.plural.as_str(), r.group.as_str(), r.version.as_str()),
            ("models", "ml.example.com", "v1")
        );

        let no_scale = list(json!([
            res("models", "Model", true, &["get"]),
            res("models/status", "Model", true, &["get"])
        ]));
        let b = plan(&model(), &no_scale).unwrap_err();
        assert_eq!(b.reason, "TargetNotScalable");
        assert!(
            b.message
                .starts_with("Model (ml.example.com/v1) has no /scale subresource"),
            "{}",
            b.message
        );

        let other = list(json!([res("datasets", "Dataset", true, &["get"])]));
        let b = plan(&model(), &other).unwrap_err();
        assert_eq!(b.reason, "TargetKindNotFound");
        assert_eq!(
            b.message,
            "ml.example.com/v1 has no kind Model (it serves: Dataset)"
        );

        let cluster = list(json!([
            res("models", "Model", false, &["get"]),
            res("models/scale", "Scale", false, &["patch"])
        ]));
        assert_eq!(
            plan(&model(), &cluster).unwrap_err().reason,
            "TargetNotScalable"
        );
    }
}
