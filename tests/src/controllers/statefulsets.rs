//! The StatefulSet controller, as kube-controller-manager's for what the sandbox needs:
//! pods with stable names (`<set>-<ordinal>`, hostname and subdomain set), created in
//! order with `OrderedReady` (the next only once every lower one is running and ready)
//! or all at once with `Parallel`, removed from the highest ordinal down, replaced when
//! finished, rolled one pod at a time from the highest ordinal on a template change, and
//! a status with `observedGeneration` and revisions. The plan and the status are pure;
//! `reconcile` only lists, applies and patches. Each `volumeClaimTemplates` entry
//! becomes a PersistentVolumeClaim per ordinal (`<template>-<set>-<ordinal>`, made
//! before the pod, kept after it as `Retain` has it) and a volume of the pod that
//! mounts it. Not simulated: ControllerRevision objects (the revision is the
//! template's hash) and claim retention policies other than `Retain`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::deployments::{PodFacts, controller_ref};
use super::{RESYNC, api, now, safe_hash};
use crate::kubelet::call::{CallError, call};

/// The label naming a pod's revision, as Kubernetes names it.
pub const REVISION_LABEL: &str = "controller-revision-hash";
/// The labels Kubernetes puts on every StatefulSet pod.
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

#[derive(Debug, thiserror::Error)]
pub enum StatefulSetError {
    #[error("listing pods of statefulset {set}: {source}")]
    ListPods { set: String, source: CallError },
    #[error("creating pod {pod} of statefulset {set}: {source}")]
    CreatePod {
        set: String,
        pod: String,
        source: CallError,
    },
    #[error("deleting pod {pod} of statefulset {set}: {source}")]
    DeletePod {
        set: String,
        pod: String,
        source: CallError,
    },
    #[error("updating status of statefulset {set}: {source}")]
    UpdateStatus { set: String, source: CallError },
    #[error("creating PersistentVolumeClaim {claim} of statefulset {set}: {source}")]
    CreateClaim {
        set: String,
        claim: String,
        source: CallError,
    },
}

// === the pure part ===

/// One pod of the set, by ordinal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub ordinal: u32,
    pub facts: PodFacts,
    pub revision: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Ordinals to create, lowest first.
    pub create: Vec<u32>,
    /// Pods to delete.
    pub delete: Vec<String>,
}

/// `<set>-<ordinal>` back to the ordinal.
pub fn ordinal_of(set: &str, pod: &str) -> Option<u32> {
    pod.strip_prefix(set)?.strip_prefix('-')?.parse().ok()
}

/// What to do for `replicas` pods at `revision`. `OrderedReady` (`parallel` false)
/// changes one pod at a time and only over healthy lower ordinals; `Parallel` creates
/// and deletes at once. A template change replaces the highest outdated pod once every
/// pod is ready, one at a time, in both modes (as RollingUpdate with partition 0).
pub fn plan(replicas: u32, revision: &str, parallel: bool, members: &[Member]) -> Plan {
    let mut plan = Plan::default();
    let by_ordinal: BTreeMap<u32, &Member> = members.iter().map(|m| (m.ordinal, m)).collect();
    // Finished pods are deleted, then made again at their ordinal.
    for m in members {
        if m.facts.finished && !m.facts.terminating {
            plan.delete.push(m.facts.name.clone());
        }
    }
    if !plan.delete.is_empty() {
        return plan;
    }
    let healthy = |m: &Member| m.facts.active() && m.facts.ready;
    // Scale up: missing ordinals below `replicas`.
    for ordinal in 0..replicas {
        if by_ordinal.contains_key(&ordinal) {
            continue;
        }
        if !parallel {
            let ready_below = (0..ordinal).all(|o| by_ordinal.get(&o).is_some_and(|m| healthy(m)));
            if ready_below && !members.iter().any(|m| m.facts.terminating) {
                plan.create.push(ordinal);
            }
            break;
        }
        plan.create.push(ordinal);
    }
    // Scale down: the highest ordinals at or above `replicas` first.
    let mut surplus: Vec<&Member> = members
        .iter()
        .filter(|m| m.ordinal >= replicas && !m.facts.terminating)
        .collect();
    surplus.sort_by_key(|m| std::cmp::Reverse(m.ordinal));
    if !surplus.is_empty() {
        if parallel {
            plan.delete
                .extend(surplus.iter().map(|m| m.facts.name.clone()));
        } else if !members.iter().any(|m| m.facts.terminating) && plan.create.is_empty() {
            plan.delete.push(surplus[0].facts.name.clone());
        }
        return plan;
    }
    // Roll: once all are here and ready, replace the highest outdated one.
    let all_ready = (0..replicas).all(|o| by_ordinal.get(&o).is_some_and(|m| healthy(m)));
    if all_ready
        && plan.create.is_empty()
        && let Some(m) = members
            .iter()
            .filter(|m| m.revision.as_deref() != Some(revision))
            .max_by_key(|m| m.ordinal)
    {
        plan.delete.push(m.facts.name.clone());
    }
    plan
}

/// The status the members amount to.
pub fn status(
    generation: Option<i64>,
    revision: &str,
    min_ready: Duration,
    members: &[Member],
    now: &Time,
) -> StatefulSetStatus {
    let active: Vec<&Member> = members.iter().filter(|m| m.facts.active()).collect();
    let count = |f: &dyn Fn(&Member) -> bool| active.iter().filter(|m| f(m)).count() as i32;
    let nz = |n: i32| (n != 0).then_some(n);
    let updated = count(&|m| m.revision.as_deref() == Some(revision));
    StatefulSetStatus {
        observed_generation: generation,
        replicas: active.len() as i32,
        ready_replicas: nz(count(&|m| m.facts.ready)),
        available_replicas: nz(count(&|m| m.facts.available(min_ready, now.0))),
        current_replicas: nz(updated),
        updated_replicas: nz(updated),
        current_revision: Some(revision.to_owned()),
        update_revision: Some(revision.to_owned()),
        collision_count: Some(0),
        conditions: None,
    }
}

/// The revision of `set`'s template: `<set>-<hash>`, as the label on its pods.
pub fn revision(set: &StatefulSet) -> String {
    let bytes = serde_json::to_vec(&set.spec.template).unwrap_or_default();
    format!("{}-{}", set.name_any(), safe_hash(&bytes))
}

/// Pod `ordinal` of `set` at `revision`, bound to `node` when one is given.
pub fn new_pod(set: &StatefulSet, ordinal: u32, revision: &str, node: Option<&str>) -> Pod {
    let name = format!("{}-{ordinal}", set.name_any());
    let template = set.spec.template.clone();
    let meta = template.metadata.unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    labels.insert(REVISION_LABEL.into(), revision.into());
    labels.insert(POD_NAME_LABEL.into(), name.clone());
    labels.insert(POD_INDEX_LABEL.into(), ordinal.to_string());
    let mut spec = template.spec.unwrap_or_default();
    for claim in claims(set, ordinal) {
        let volume = claim
            .labels()
            .get(CLAIM_TEMPLATE_LABEL)
            .cloned()
            .unwrap_or_default();
        let volumes = spec.volumes.get_or_insert_with(Vec::new);
        volumes.retain(|v| v.name != volume);
        volumes.push(Volume {
            name: volume,
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.name_any(),
                read_only: None,
            }),
            ..Default::default()
        });
    }
    spec.hostname = Some(name.clone());
    if !set.spec.service_name.as_deref().unwrap_or("").is_empty() {
        spec.subdomain = set.spec.service_name.clone();
    }
    if let Some(node) = node {
        spec.node_name = Some(node.into());
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: set.namespace(),
            labels: Some(labels),
            annotations: meta.annotations,
            owner_references: Some(vec![controller_ref(
                "apps/v1",
                "StatefulSet",
                &set.metadata,
            )]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// Names the template a claim was made from (the pod's volume name); the sandbox's own
/// bookkeeping, removed from nothing a cluster would show differently.
const CLAIM_TEMPLATE_LABEL: &str = "nemesis.test/volume-claim-template";

/// The claims pod `ordinal` of `set` mounts, one per `volumeClaimTemplates` entry:
/// `<template>-<set>-<ordinal>`, with the template's labels and spec.
pub fn claims(set: &StatefulSet, ordinal: u32) -> Vec<PersistentVolumeClaim> {
    set.spec
        .volume_claim_templates
        .iter()
        .flatten()
        .map(|t| {
            let template = t.metadata.name.clone().unwrap_or_default();
            let mut labels = t.metadata.labels.clone().unwrap_or_default();
            labels.insert(CLAIM_TEMPLATE_LABEL.into(), template.clone());
            PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(format!("{template}-{}-{ordinal}", set.name_any())),
                    namespace: set.namespace(),
                    labels: Some(labels),
                    annotations: t.metadata.annotations.clone(),
                    ..Default::default()
                },
                spec: t.spec.clone(),
                status: None,
            }
        })
        .collect()
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
    let sets: Api<StatefulSet> = api(&client, namespace.as_deref());
    let pods: Api<Pod> = api(&client, namespace.as_deref());
    let ctx = Arc::new(Context { client, node_name });
    super::run_owner(sets, pods, ctx, cancel, reconcile).await;
}

#[tracing::instrument(skip_all, fields(statefulset = %set.name_any()))]
async fn reconcile(set: Arc<StatefulSet>, ctx: Arc<Context>) -> Result<Action, StatefulSetError> {
    let namespace = set.namespace().unwrap_or_default();
    let name = set.name_any();
    let key = format!("{namespace}/{name}");
    if set.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let members: Vec<Member> =
        super::owned_pods(&ctx.client, &namespace, &*set, &ListParams::default())
            .await
            .map_err(|source| StatefulSetError::ListPods {
                set: key.clone(),
                source,
            })?
            .into_iter()
            .filter_map(|p| {
                Some(Member {
                    ordinal: ordinal_of(&name, &p.name_any())?,
                    revision: p.labels().get(REVISION_LABEL).cloned(),
                    facts: PodFacts::of(&p),
                })
            })
            .collect();
    let revision = revision(&set);
    let replicas = set.spec.replicas.unwrap_or(1).max(0) as u32;
    let parallel = set.spec.pod_management_policy.as_deref() == Some("Parallel");
    let plan = plan(replicas, &revision, parallel, &members);
    if plan != Plan::default() {
        tracing::info!(create = ?plan.create, delete = ?plan.delete, "scaling");
    }
    for pod in &plan.delete {
        match call(pods_api.delete(pod, &DeleteParams::default())).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(source) => {
                return Err(StatefulSetError::DeletePod {
                    set: key,
                    pod: pod.clone(),
                    source,
                });
            }
        }
    }
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    for ordinal in &plan.create {
        for claim in claims(&set, *ordinal) {
            match call(claims_api.create(&PostParams::default(), &claim)).await {
                // Kept from an earlier pod at this ordinal: its data stays.
                Ok(_) => {}
                Err(e) if e.is_conflict() => {}
                Err(source) => {
                    return Err(StatefulSetError::CreateClaim {
                        set: key,
                        claim: claim.name_any(),
                        source,
                    });
                }
            }
        }
        let pod = new_pod(&set, *ordinal, &revision, ctx.node_name.as_deref());
        match call(pods_api.create(&PostParams::default(), &pod)).await {
            Ok(_) => {}
            // Its predecessor at this ordinal is still terminating: next round.
            Err(e) if e.is_conflict() => {}
            Err(source) => {
                return Err(StatefulSetError::CreatePod {
                    set: key,
                    pod: pod.name_any(),
                    source,
                });
            }
        }
    }
    let min_ready = Duration::from_secs(set.spec.min_ready_seconds.unwrap_or(0).max(0) as u64);
    let status = status(
        set.metadata.generation,
        &revision,
        min_ready,
        &members,
        &now(),
    );
    if set.status.as_ref() != Some(&status) {
        let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
        let mut value = serde_json::to_value(&status).expect("status serializes");
        let obj = value.as_object_mut().expect("status is an object");
        for field in [
            "readyReplicas",
            "availableReplicas",
            "currentReplicas",
            "updatedReplicas",
        ] {
            obj.entry(field).or_insert(Value::Null);
        }
        call(api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": value })),
        ))
        .await
        .map_err(|source| StatefulSetError::UpdateStatus { set: key, source })?;
    }
    // Ordered steps wait for pods to become ready; look again soon while not settled.
    let settled = plan == Plan::default()
        && status.ready_replicas.unwrap_or(0) as u32 == replicas
        && status.replicas as u32 == replicas;
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

    fn member(ordinal: u32, ready: bool, revision: &str) -> Member {
        Member {
            ordinal,
            facts: PodFacts {
                name: format!("db-{ordinal}"),
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

    #[test]
    fn ordered_ready_creates_one_ordinal_at_a_time_over_ready_predecessors() {
        assert_eq!(plan(3, "r", false, &[]).create, [0]);
        assert_eq!(
            plan(3, "r", false, &[member(0, false, "r")]),
            Plan::default()
        );
        assert_eq!(plan(3, "r", false, &[member(0, true, "r")]).create, [1]);
        assert_eq!(
            plan(3, "r", true, &[member(0, false, "r")]).create,
            [1, 2],
            "parallel"
        );
    }

    #[test]
    fn scale_down_removes_the_highest_ordinal_first() {
        let three = [
            member(0, true, "r"),
            member(1, true, "r"),
            member(2, true, "r"),
        ];
        assert_eq!(plan(1, "r", false, &three).delete, ["db-2"]);
        assert_eq!(plan(1, "r", true, &three).delete, ["db-2", "db-1"]);
        let mut leaving = three.to_vec();
        leaving[2].facts.terminating = true;
        assert_eq!(
            plan(1, "r", false, &leaving),
            Plan::default(),
            "one at a time"
        );
    }

    #[test]
    fn a_template_change_replaces_the_highest_outdated_pod_once_all_are_ready() {
        let pods = [member(0, true, "old"), member(1, true, "old")];
        assert_eq!(plan(2, "new", false, &pods).delete, ["db-1"]);
        let mut rolling = vec![member(0, true, "old"), member(1, false, "new")];
        assert_eq!(plan(2, "new", false, &rolling), Plan::default());
        rolling[1].facts.ready = true;
        assert_eq!(plan(2, "new", false, &rolling).delete, ["db-0"]);
    }

    #[test]
    fn names_and_status_follow_ordinals_and_revisions() {
        assert_eq!(ordinal_of("db", "db-12"), Some(12));
        assert_eq!(ordinal_of("db", "dbx-1"), None);
        assert_eq!(ordinal_of("db", "db-1-x"), None);
        let now = Time(Timestamp::from_second(100).unwrap());
        let s = status(
            Some(3),
            "new",
            Duration::ZERO,
            &[member(0, true, "new"), member(1, false, "old")],
            &now,
        );
        assert_eq!(
            (s.replicas, s.ready_replicas, s.updated_replicas),
            (2, Some(1), Some(1))
        );
        assert_eq!(s.observed_generation, Some(3));
    }
}
