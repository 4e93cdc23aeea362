//! The ReplicaSet controller, as kube-controller-manager's: each ReplicaSet keeps
//! `spec.replicas` pods of its template (named `<set>-<5 random>`, controlled by it),
//! deletes surplus ones in Kubernetes' order (not ready first, then the most recently
//! ready, the most restarted, the newest), replaces finished ones, and reports its
//! status with `observedGeneration`. The plan and the status are pure functions;
//! `reconcile` only lists, applies and patches. It never touches another owner's pods.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::Selector;
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::deployments::{Plan, PodFacts, controller_ref, new_pod, victims};
use super::{RESYNC, api, now};
use crate::kubelet::call::{CallError, call};

#[derive(Debug, thiserror::Error)]
pub enum ReplicaSetError {
    #[error("replicaset {set}: selector: {message}")]
    ParseSelector { set: String, message: String },
    #[error("listing pods of replicaset {set}: {source}")]
    ListPods { set: String, source: CallError },
    #[error("creating a pod for replicaset {set}: {source}")]
    CreatePod { set: String, source: CallError },
    #[error("deleting pod {pod} of replicaset {set}: {source}")]
    DeletePod {
        set: String,
        pod: String,
        source: CallError,
    },
    #[error("updating status of replicaset {set}: {source}")]
    UpdateStatus { set: String, source: CallError },
}

// === the pure part ===

/// What to do for `replicas` pods: replace finished ones, create the missing, delete
/// the surplus in Kubernetes' order.
pub fn plan(replicas: usize, pods: &[PodFacts]) -> Plan {
    let mut plan = Plan::default();
    plan.delete.extend(
        pods.iter()
            .filter(|p| p.finished && !p.terminating)
            .map(|p| p.name.clone()),
    );
    let active: Vec<&PodFacts> = pods.iter().filter(|p| p.active()).collect();
    plan.create = replicas.saturating_sub(active.len());
    let surplus = active.len().saturating_sub(replicas);
    plan.delete.extend(victims(active, surplus));
    plan
}

/// The status the pods amount to, for generation `generation`.
pub fn status(
    generation: Option<i64>,
    min_ready: Duration,
    pods: &[PodFacts],
    now: &Time,
) -> ReplicaSetStatus {
    let active: Vec<&PodFacts> = pods.iter().filter(|p| p.active()).collect();
    let count = |f: &dyn Fn(&PodFacts) -> bool| active.iter().filter(|p| f(p)).count() as i32;
    let nz = |n: i32| (n != 0).then_some(n);
    ReplicaSetStatus {
        replicas: active.len() as i32,
        fully_labeled_replicas: nz(active.len() as i32),
        ready_replicas: nz(count(&|p| p.ready)),
        available_replicas: nz(count(&|p| p.available(min_ready, now.0))),
        terminating_replicas: nz(pods.iter().filter(|p| p.terminating).count() as i32),
        observed_generation: generation,
        conditions: None,
    }
}

// === the I/O part ===

struct Context {
    client: Client,
    node_name: Option<String>,
}

/// Runs the controller until `cancel` fires. `namespace` limits it to one namespace;
/// `node_name` binds the pods it creates to that node.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    node_name: Option<String>,
    cancel: CancellationToken,
) {
    let sets: Api<ReplicaSet> = api(&client, namespace.as_deref());
    let pods: Api<Pod> = api(&client, namespace.as_deref());
    let ctx = Arc::new(Context { client, node_name });
    super::run_owner(sets, pods, ctx, cancel, reconcile).await;
}

#[tracing::instrument(skip_all, fields(replicaset = %rs.name_any()))]
async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Context>) -> Result<Action, ReplicaSetError> {
    let namespace = rs.namespace().unwrap_or_default();
    let key = format!("{namespace}/{}", rs.name_any());
    if rs.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = rs.spec.clone();
    let selector =
        Selector::try_from(spec.selector.clone()).map_err(|e| ReplicaSetError::ParseSelector {
            set: key.clone(),
            message: e.to_string(),
        })?;
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pods: Vec<Pod> = super::owned_pods(
        &ctx.client,
        &namespace,
        &*rs,
        &ListParams::default().labels_from(&selector),
    )
    .await
    .map_err(|source| ReplicaSetError::ListPods {
        set: key.clone(),
        source,
    })?;
    let facts: Vec<PodFacts> = pods.iter().map(PodFacts::of).collect();
    let replicas = spec.replicas.unwrap_or(1).max(0) as usize;
    let plan = plan(replicas, &facts);
    if plan != Plan::default() {
        tracing::info!(create = plan.create, delete = ?plan.delete, "scaling");
    }
    for name in &plan.delete {
        match call(pods_api.delete(name, &DeleteParams::default())).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(source) => {
                return Err(ReplicaSetError::DeletePod {
                    set: key,
                    pod: name.clone(),
                    source,
                });
            }
        }
    }
    let template = spec.template.clone().unwrap_or_default();
    let owner = controller_ref("apps/v1", "ReplicaSet", &rs.metadata);
    for _ in 0..plan.create {
        let pod = new_pod(
            &template,
            owner.clone(),
            rs.namespace(),
            &rs.name_any(),
            ctx.node_name.as_deref(),
        );
        call(pods_api.create(&PostParams::default(), &pod))
            .await
            .map_err(|source| ReplicaSetError::CreatePod {
                set: key.clone(),
                source,
            })?;
    }
    let min_ready = Duration::from_secs(spec.min_ready_seconds.unwrap_or(0).max(0) as u64);
    let status = status(rs.metadata.generation, min_ready, &facts, &now());
    if rs.status.as_ref() != Some(&status) {
        let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &namespace);
        let mut value = serde_json::to_value(&status).expect("status serializes");
        let obj = value.as_object_mut().expect("status is an object");
        // Counts that went to zero are removed, not left at their old value.
        for field in [
            "fullyLabeledReplicas",
            "readyReplicas",
            "availableReplicas",
            "terminatingReplicas",
        ] {
            obj.entry(field).or_insert(serde_json::Value::Null);
        }
        call(api.patch_status(
            &rs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": value })),
        ))
        .await
        .map_err(|source| ReplicaSetError::UpdateStatus { set: key, source })?;
    }
    if !min_ready.is_zero() && status.ready_replicas != status.available_replicas {
        return Ok(Action::requeue(min_ready.min(RESYNC)));
    }
    Ok(Action::requeue(RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn pod(name: &str, ready: bool, created: i64) -> PodFacts {
        PodFacts {
            name: name.into(),
            hash: None,
            ready,
            ready_since: ready.then(|| Timestamp::from_second(created + 5).unwrap()),
            terminating: false,
            finished: false,
            created: Some(Timestamp::from_second(created).unwrap()),
            restarts: 0,
        }
    }

    #[test]
    fn a_set_creates_the_missing_and_deletes_not_ready_then_newest() {
        assert_eq!(plan(3, &[pod("a", true, 1)]).create, 2);
        let pods = [
            pod("old", true, 1),
            pod("new", true, 50),
            pod("slow", false, 2),
        ];
        assert_eq!(plan(1, &pods).delete, ["slow", "new"]);
        let mut done = pod("done", false, 1);
        done.finished = true;
        assert_eq!(
            plan(1, &[done]),
            Plan {
                create: 1,
                delete: vec!["done".into()]
            }
        );
        let mut leaving = pod("leaving", true, 1);
        leaving.terminating = true;
        assert_eq!(
            plan(1, &[leaving]).create,
            1,
            "a terminating pod is not counted"
        );
    }

    #[test]
    fn status_counts_active_pods_for_the_generation_seen() {
        let now = Time(Timestamp::from_second(100).unwrap());
        let s = status(
            Some(4),
            Duration::ZERO,
            &[pod("a", true, 1), pod("b", false, 2)],
            &now,
        );
        assert_eq!(
            (s.replicas, s.ready_replicas, s.available_replicas),
            (2, Some(1), Some(1))
        );
        assert_eq!(s.observed_generation, Some(4));
        let s = status(
            Some(4),
            Duration::from_secs(600),
            &[pod("a", true, 90)],
            &now,
        );
        assert_eq!(
            s.available_replicas, None,
            "not ready for minReadySeconds yet"
        );
    }
}
