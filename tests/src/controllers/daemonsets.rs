//! The DaemonSet controller, as kube-controller-manager's for what the sandbox needs:
//! one pod per Node (bound to it by `spec.nodeName`; no taints or node selectors to
//! weigh: every sandbox node runs every DaemonSet), labelled with the template's
//! revision, replaced on a template change node by node (with `maxSurge` the new pod
//! first, the old one once the new one is ready), replaced when finished, and a status
//! `kubectl rollout status` reads. The plan and the status are pure; `reconcile` only
//! lists, creates, deletes and patches. Not simulated: ControllerRevision objects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::deployments::{PodFacts, controller_ref};
use super::{RESYNC, api, now, random_suffix, safe_hash};
use crate::kubelet::call::{CallError, call};

/// The label naming a pod's revision, as Kubernetes names it.
pub const REVISION_LABEL: &str = "controller-revision-hash";
pub const GENERATION_LABEL: &str = "pod-template-generation";

#[derive(Debug, thiserror::Error)]
pub enum DaemonSetError {
    #[error("listing nodes for daemonset {set}: {source}")]
    ListNodes { set: String, source: CallError },
    #[error("listing pods of daemonset {set}: {source}")]
    ListPods { set: String, source: CallError },
    #[error("creating a pod of daemonset {set} on node {node}: {source}")]
    CreatePod {
        set: String,
        node: String,
        source: CallError,
    },
    #[error("deleting pod {pod} of daemonset {set}: {source}")]
    DeletePod {
        set: String,
        pod: String,
        source: CallError,
    },
    #[error("updating status of daemonset {set}: {source}")]
    UpdateStatus { set: String, source: CallError },
}

// === the pure part ===

/// One pod of the set: where it runs, at which revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node: String,
    pub facts: PodFacts,
    pub revision: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Nodes to create a pod on.
    pub create: Vec<String>,
    /// Pods to delete.
    pub delete: Vec<String>,
}

/// What to do so that each of `nodes` runs one ready pod at `revision`.
pub fn plan(nodes: &[String], revision: &str, surge: bool, members: &[Member]) -> Plan {
    let mut plan = Plan::default();
    let mut by_node: BTreeMap<&str, Vec<&Member>> = BTreeMap::new();
    for m in members {
        // Finished, or on a node that is gone: made anew where it belongs.
        let misplaced = m.facts.finished || !nodes.contains(&m.node);
        if misplaced && !m.facts.terminating {
            plan.delete.push(m.facts.name.clone());
        } else if !m.facts.finished {
            by_node.entry(m.node.as_str()).or_default().push(m);
        }
    }
    for node in nodes {
        let here = by_node.get(node.as_str()).cloned().unwrap_or_default();
        let current: Vec<&&Member> = here
            .iter()
            .filter(|m| m.revision.as_deref() == Some(revision))
            .collect();
        let old: Vec<&&Member> = here
            .iter()
            .filter(|m| m.revision.as_deref() != Some(revision) && !m.facts.terminating)
            .collect();
        let terminating = here.iter().any(|m| m.facts.terminating);
        match (current.is_empty(), old.is_empty()) {
            // Nothing here (or only what is going): a new pod, once the old one is gone
            // unless surging.
            (true, true) if !terminating || surge => plan.create.push(node.clone()),
            (true, true) => {}
            (true, false) if surge => plan.create.push(node.clone()),
            (true, false) => plan.delete.extend(old.iter().map(|m| m.facts.name.clone())),
            (false, false) => {
                if current
                    .iter()
                    .any(|m| m.facts.ready && !m.facts.terminating)
                {
                    plan.delete.extend(old.iter().map(|m| m.facts.name.clone()));
                }
            }
            (false, true) => {
                // More than one current pod on a node: keep the oldest.
                let mut live: Vec<&&&Member> =
                    current.iter().filter(|m| !m.facts.terminating).collect();
                live.sort_by_key(|m| m.facts.created);
                plan.delete
                    .extend(live.iter().skip(1).map(|m| m.facts.name.clone()));
            }
        }
    }
    plan
}

/// The status the members amount to on `nodes`.
pub fn status(
    generation: Option<i64>,
    nodes: &[String],
    revision: &str,
    min_ready: Duration,
    members: &[Member],
    now: &Time,
) -> DaemonSetStatus {
    let active: Vec<&Member> = members
        .iter()
        .filter(|m| m.facts.active() && nodes.contains(&m.node))
        .collect();
    let nodes_with = |f: &dyn Fn(&Member) -> bool| {
        nodes
            .iter()
            .filter(|n| active.iter().any(|m| &m.node == *n && f(m)))
            .count() as i32
    };
    let desired = nodes.len() as i32;
    let available = nodes_with(&|m| m.facts.available(min_ready, now.0));
    let nz = |n: i32| (n != 0).then_some(n);
    DaemonSetStatus {
        observed_generation: generation,
        desired_number_scheduled: desired,
        current_number_scheduled: nodes_with(&|_| true),
        number_misscheduled: 0,
        number_ready: nodes_with(&|m| m.facts.ready),
        updated_number_scheduled: nz(nodes_with(&|m| m.revision.as_deref() == Some(revision))),
        number_available: nz(available),
        number_unavailable: nz(desired - available),
        collision_count: None,
        conditions: None,
    }
}

/// The revision of `set`'s template: the template's hash, as the label on its pods.
pub fn revision(set: &DaemonSet) -> String {
    let bytes = serde_json::to_vec(&set.spec.template).unwrap_or_default();
    safe_hash(&bytes)
}

/// A pod of `set` at `revision` on `node`.
pub fn new_pod(set: &DaemonSet, node: &str, revision: &str) -> Pod {
    let template = set.spec.template.clone();
    let meta = template.metadata.unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    labels.insert(REVISION_LABEL.into(), revision.into());
    labels.insert(
        GENERATION_LABEL.into(),
        set.metadata.generation.unwrap_or(1).to_string(),
    );
    let mut spec = template.spec.unwrap_or_default();
    spec.node_name = Some(node.into());
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{}-{}", set.name_any(), random_suffix(5))),
            namespace: set.namespace(),
            labels: Some(labels),
            annotations: meta.annotations,
            owner_references: Some(vec![controller_ref("apps/v1", "DaemonSet", &set.metadata)]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

fn surges(set: &DaemonSet) -> bool {
    let rolling = set
        .spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref());
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match rolling.and_then(|r| r.max_surge.as_ref()) {
        Some(IntOrString::Int(n)) => *n > 0,
        Some(IntOrString::String(s)) => s.trim_end_matches('%').parse::<u32>().unwrap_or(0) > 0,
        None => false,
    }
}

// === the I/O part ===

struct Context {
    client: Client,
}

/// Runs the controller until `cancel` fires; `namespace` limits it to one namespace.
pub async fn run(client: Client, namespace: Option<String>, cancel: CancellationToken) {
    let sets: Api<DaemonSet> = api(&client, namespace.as_deref());
    let pods: Api<Pod> = api(&client, namespace.as_deref());
    let ctx = Arc::new(Context { client });
    super::run_owner(sets, pods, ctx, cancel, reconcile).await;
}

#[tracing::instrument(skip_all, fields(daemonset = %set.name_any()))]
async fn reconcile(set: Arc<DaemonSet>, ctx: Arc<Context>) -> Result<Action, DaemonSetError> {
    let namespace = set.namespace().unwrap_or_default();
    let name = set.name_any();
    let key = format!("{namespace}/{name}");
    if set.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let nodes: Vec<String> =
        call(Api::<Node>::all(ctx.client.clone()).list(&ListParams::default()))
            .await
            .map_err(|source| DaemonSetError::ListNodes {
                set: key.clone(),
                source,
            })?
            .items
            .iter()
            .map(|n| n.name_any())
            .collect();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let members: Vec<Member> =
        super::owned_pods(&ctx.client, &namespace, &*set, &ListParams::default())
            .await
            .map_err(|source| DaemonSetError::ListPods {
                set: key.clone(),
                source,
            })?
            .into_iter()
            .map(|p| Member {
                node: p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
                revision: p.labels().get(REVISION_LABEL).cloned(),
                facts: PodFacts::of(&p),
            })
            .collect();
    let revision = revision(&set);
    let plan = plan(&nodes, &revision, surges(&set), &members);
    if plan != Plan::default() {
        tracing::info!(create = ?plan.create, delete = ?plan.delete, "daemonset pods");
    }
    for pod in &plan.delete {
        match call(pods_api.delete(pod, &DeleteParams::default())).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(source) => {
                return Err(DaemonSetError::DeletePod {
                    set: key,
                    pod: pod.clone(),
                    source,
                });
            }
        }
    }
    for node in &plan.create {
        let pod = new_pod(&set, node, &revision);
        call(pods_api.create(&PostParams::default(), &pod))
            .await
            .map_err(|source| DaemonSetError::CreatePod {
                set: key.clone(),
                node: node.clone(),
                source,
            })?;
    }
    let min_ready = Duration::from_secs(set.spec.min_ready_seconds.unwrap_or(0).max(0) as u64);
    let status = status(
        set.metadata.generation,
        &nodes,
        &revision,
        min_ready,
        &members,
        &now(),
    );
    if set.status.as_ref() != Some(&status) {
        let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &namespace);
        let mut value = serde_json::to_value(&status).expect("status serializes");
        let obj = value.as_object_mut().expect("status is an object");
        for field in [
            "updatedNumberScheduled",
            "numberAvailable",
            "numberUnavailable",
        ] {
            obj.entry(field).or_insert(serde_json::Value::Null);
        }
        call(api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": value })),
        ))
        .await
        .map_err(|source| DaemonSetError::UpdateStatus { set: key, source })?;
    }
    let settled = plan == Plan::default()
        && status.number_ready == status.desired_number_scheduled
        && status.updated_number_scheduled.unwrap_or(0) == status.desired_number_scheduled;
    Ok(Action::requeue(if settled {
        RESYNC
    } else {
        Duration::from_millis(500)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn member(name: &str, node: &str, ready: bool, revision: &str) -> Member {
        Member {
            node: node.into(),
            facts: PodFacts {
                name: name.into(),
                hash: None,
                ready,
                ready_since: ready.then(|| Timestamp::from_second(5).unwrap()),
                terminating: false,
                finished: false,
                created: Some(Timestamp::from_second(1).unwrap()),
                restarts: 0,
            },
            revision: Some(revision.into()),
        }
    }

    fn nodes(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_node_gets_one_pod_and_pods_of_gone_nodes_go() {
        let p = plan(
            &nodes(&["a", "b"]),
            "r",
            false,
            &[member("x", "a", true, "r")],
        );
        assert_eq!(p.create, ["b"]);
        let p = plan(
            &nodes(&["a"]),
            "r",
            false,
            &[member("y", "gone", true, "r")],
        );
        assert_eq!(p.delete, ["y"]);
        assert_eq!(p.create, ["a"]);
        assert_eq!(
            plan(&nodes(&["a"]), "r", false, &[member("x", "a", false, "r")]),
            Plan::default()
        );
    }

    #[test]
    fn an_update_surges_then_removes_the_old_pod_once_the_new_one_is_ready() {
        let old = member("old", "a", true, "r1");
        let p = plan(&nodes(&["a"]), "r2", true, std::slice::from_ref(&old));
        assert_eq!(p.create, ["a"]);
        assert!(p.delete.is_empty());
        let new = member("new", "a", false, "r2");
        assert_eq!(
            plan(&nodes(&["a"]), "r2", true, &[old.clone(), new.clone()]),
            Plan::default()
        );
        let ready = member("new", "a", true, "r2");
        assert_eq!(
            plan(&nodes(&["a"]), "r2", true, &[old.clone(), ready]).delete,
            ["old"]
        );
        // Without surge the old pod goes first.
        assert_eq!(plan(&nodes(&["a"]), "r2", false, &[old]).delete, ["old"]);
    }

    #[test]
    fn status_counts_nodes_as_rollout_status_reads_them() {
        let now = Time(Timestamp::from_second(100).unwrap());
        let s = status(
            Some(2),
            &nodes(&["a", "b"]),
            "r",
            Duration::ZERO,
            &[member("x", "a", true, "r"), member("y", "b", false, "old")],
            &now,
        );
        assert_eq!(s.desired_number_scheduled, 2);
        assert_eq!(s.current_number_scheduled, 2);
        assert_eq!(s.number_ready, 1);
        assert_eq!(s.updated_number_scheduled, Some(1));
        assert_eq!(s.number_available, Some(1));
        assert_eq!(s.number_unavailable, Some(1));
        assert_eq!(s.observed_generation, Some(2));
    }
}
