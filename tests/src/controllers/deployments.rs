//! The Deployment controller, as kube-controller-manager's: a Deployment owns one
//! ReplicaSet per pod template (`<name>-<pod-template-hash>`), which owns the pods (see
//! `replicasets`); it scales the current set to `spec.replicas` and the old ones down as
//! new pods become ready (or first, for `Recreate`), and keeps the status true, with
//! `observedGeneration` written only once a generation was acted on. A rollout lag can be
//! played (`SandboxOptions::rollout_lag`), as a busy controller-manager shows. The plans
//! and the status are pure functions of the Deployment, its sets and its pods;
//! `reconcile` only lists, applies and patches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::core::Selector;
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{RESYNC, api, now, random_suffix, safe_hash};
use crate::kubelet::call::{CallError, call};

/// The label that tells pods of one template from another, as Kubernetes names it.
pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error("deployment {deployment}: selector: {message}")]
    ParseSelector { deployment: String, message: String },
    #[error("listing pods of deployment {deployment}: {source}")]
    ListPods {
        deployment: String,
        source: CallError,
    },
    #[error("listing ReplicaSets of deployment {deployment}: {source}")]
    ListSets {
        deployment: String,
        source: CallError,
    },
    #[error("creating the ReplicaSet of deployment {deployment}: {source}")]
    CreateSet {
        deployment: String,
        source: CallError,
    },
    #[error("scaling ReplicaSet {set} of deployment {deployment}: {source}")]
    ScaleSet {
        deployment: String,
        set: String,
        source: CallError,
    },
    #[error("updating status of deployment {deployment}: {source}")]
    UpdateStatus {
        deployment: String,
        source: CallError,
    },
}

// === the pure part ===

/// What the plan needs to know about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub name: String,
    pub hash: Option<String>,
    pub ready: bool,
    /// When the Ready condition last became true.
    pub ready_since: Option<Timestamp>,
    pub terminating: bool,
    /// Succeeded or Failed: it will never run again.
    pub finished: bool,
    pub created: Option<Timestamp>,
    pub restarts: i32,
}

impl PodFacts {
    pub fn of(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let ready_cond = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
        let ready = ready_cond.is_some_and(|c| c.status == "True");
        Self {
            name: pod.name_any(),
            hash: pod.labels().get(TEMPLATE_HASH_LABEL).cloned(),
            ready,
            ready_since: ready_cond
                .filter(|_| ready)
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            finished: matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
            restarts: status
                .and_then(|s| s.container_statuses.as_ref())
                .map(|cs| cs.iter().map(|c| c.restart_count).sum())
                .unwrap_or(0),
        }
    }

    pub(crate) fn active(&self) -> bool {
        !self.terminating && !self.finished
    }

    pub(crate) fn available(&self, min_ready: Duration, now: Timestamp) -> bool {
        self.ready
            && self.ready_since.is_none_or(|t| {
                now.duration_since(t).unsigned_abs() >= min_ready || min_ready.is_zero()
            })
    }
}

/// What to do to a Deployment's pods.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// How many pods of the current template to create.
    pub create: usize,
    /// Pods to delete, in order.
    pub delete: Vec<String>,
}

/// The order Kubernetes deletes pods in when it has too many: not ready first, then
/// the most recently ready, then the most restarted, then the newest.
fn deletion_order(a: &PodFacts, b: &PodFacts) -> std::cmp::Ordering {
    a.ready
        .cmp(&b.ready)
        .then_with(|| b.ready_since.cmp(&a.ready_since))
        .then_with(|| b.restarts.cmp(&a.restarts))
        .then_with(|| b.created.cmp(&a.created))
        .then_with(|| b.name.cmp(&a.name))
}

pub(crate) fn victims(mut pods: Vec<&PodFacts>, count: usize) -> impl Iterator<Item = String> + '_ {
    pods.sort_by(|a, b| deletion_order(a, b));
    pods.into_iter().take(count).map(|p| p.name.clone())
}

/// The plan for `replicas` pods of template `hash`. Rolling update: pods of the new
/// template are created right away, and an old pod is deleted only once a new one is
/// ready to take its place. `Recreate`: old pods go first, new ones come once they
/// are gone. Finished pods are deleted so that they are replaced.
pub fn plan(replicas: usize, hash: &str, recreate: bool, pods: &[PodFacts]) -> Plan {
    let mut plan = Plan::default();
    plan.delete.extend(
        pods.iter()
            .filter(|p| p.finished && !p.terminating)
            .map(|p| p.name.clone()),
    );
    let is_new = |p: &&PodFacts| p.hash.as_deref() == Some(hash);
    let new: Vec<&PodFacts> = pods.iter().filter(|p| p.active()).filter(is_new).collect();
    let old: Vec<&PodFacts> = pods
        .iter()
        .filter(|p| p.active())
        .filter(|p| !is_new(p))
        .collect();
    if recreate {
        let old_terminating = pods.iter().any(|p| p.terminating && !is_new(&p));
        if !old.is_empty() || old_terminating {
            plan.delete.extend(old.iter().map(|p| p.name.clone()));
            return plan;
        }
    }
    plan.create = replicas.saturating_sub(new.len());
    let surplus = new.len().saturating_sub(replicas);
    plan.delete.extend(victims(new.clone(), surplus));
    let new_ready = new.iter().filter(|p| p.ready).count().min(replicas);
    let keep_old = replicas.saturating_sub(new_ready);
    plan.delete
        .extend(victims(old.clone(), old.len().saturating_sub(keep_old)));
    plan
}

/// `maxUnavailable` of a rolling update resolved against `replicas` (25% by default,
/// rounded down as Kubernetes does); 0 for `Recreate`.
pub fn max_unavailable(deployment: &Deployment, replicas: i32) -> i32 {
    let spec = Some(&deployment.spec);
    let strategy = spec.and_then(|s| s.strategy.as_ref());
    if strategy.and_then(|s| s.type_.as_deref()) == Some("Recreate") {
        return 0;
    }
    let value = strategy
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.clone())
        .unwrap_or(IntOrString::String("25%".into()));
    let resolved = match value {
        IntOrString::Int(n) => n,
        IntOrString::String(s) => s
            .strip_suffix('%')
            .and_then(|p| p.parse::<i64>().ok())
            .map(|p| (i64::from(replicas) * p / 100) as i32)
            .unwrap_or(0),
    };
    resolved.clamp(0, replicas.max(0))
}

/// The Deployment status the pods amount to, keeping condition times from `previous`
/// while a condition holds.
pub fn status(
    deployment: &Deployment,
    hash: &str,
    pods: &[PodFacts],
    now: &Time,
) -> DeploymentStatus {
    let spec = Some(&deployment.spec);
    let desired = spec.and_then(|s| s.replicas).unwrap_or(1).max(0);
    let min_ready =
        Duration::from_secs(spec.and_then(|s| s.min_ready_seconds).unwrap_or(0).max(0) as u64);
    let active: Vec<&PodFacts> = pods.iter().filter(|p| p.active()).collect();
    let count = |f: &dyn Fn(&PodFacts) -> bool| active.iter().filter(|p| f(p)).count() as i32;
    let replicas = active.len() as i32;
    let updated = count(&|p| p.hash.as_deref() == Some(hash));
    let ready = count(&|p| p.ready);
    let available = count(&|p| p.available(min_ready, now.0));
    let terminating = pods.iter().filter(|p| p.terminating).count() as i32;
    let previous = deployment.status.as_ref();
    let prev_cond = |t: &str| {
        previous
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_.as_deref() == Some(t)))
    };
    let name = deployment.name_any();
    let is_available = available >= desired - max_unavailable(deployment, desired);
    let available_cond = condition(
        prev_cond("Available"),
        "Available",
        is_available,
        if is_available {
            "MinimumReplicasAvailable"
        } else {
            "MinimumReplicasUnavailable"
        },
        if is_available {
            "Deployment has minimum availability.".to_string()
        } else {
            "Deployment does not have minimum availability.".to_string()
        },
        now,
        false,
    );
    let complete = updated == desired && replicas == desired && available == desired;
    let progressed = previous.is_none_or(|s| {
        (
            s.replicas,
            s.updated_replicas,
            s.ready_replicas,
            s.available_replicas,
        ) != (nz(replicas), nz(updated), nz(ready), nz(available))
    });
    let deadline = Duration::from_secs(
        spec.and_then(|s| s.progress_deadline_seconds)
            .unwrap_or(600)
            .max(1) as u64,
    );
    let last_progress = prev_cond("Progressing").and_then(|c| c.last_update_time.as_ref());
    let stalled = !complete
        && !progressed
        && last_progress.is_some_and(|t| now.0.duration_since(t.0).unsigned_abs() > deadline);
    let set = format!("{name}-{hash}");
    let (ok, reason, message) = if complete {
        (
            true,
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{set}\" has successfully progressed."),
        )
    } else if stalled {
        (
            false,
            "ProgressDeadlineExceeded",
            format!("ReplicaSet \"{set}\" has timed out progressing."),
        )
    } else {
        (
            true,
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{set}\" is progressing."),
        )
    };
    let progressing_cond = condition(
        prev_cond("Progressing"),
        "Progressing",
        ok,
        reason,
        message,
        now,
        progressed,
    );
    DeploymentStatus {
        observed_generation: deployment.metadata.generation,
        replicas: nz(replicas),
        updated_replicas: nz(updated),
        ready_replicas: nz(ready),
        available_replicas: nz(available),
        unavailable_replicas: nz((desired - available).max(0)),
        terminating_replicas: nz(terminating),
        collision_count: previous.and_then(|s| s.collision_count),
        conditions: Some(vec![available_cond, progressing_cond]),
    }
}

/// Counts are omitted when zero, as the API's `omitempty` has them.
fn nz(n: i32) -> Option<i32> {
    (n != 0).then_some(n)
}

fn condition(
    previous: Option<&DeploymentCondition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    now: &Time,
    touched: bool,
) -> DeploymentCondition {
    let status = if ok { "True" } else { "False" };
    let same_status = previous.filter(|c| c.status.as_deref() == Some(status));
    let same_all = same_status
        .filter(|c| c.reason.as_deref() == Some(reason) && c.message.as_deref() == Some(&message));
    DeploymentCondition {
        type_: Some(type_.into()),
        status: Some(status.into()),
        reason: Some(reason.into()),
        message: Some(message),
        last_transition_time: Some(
            same_status
                .and_then(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone()),
        ),
        last_update_time: Some(
            same_all
                .filter(|_| !touched)
                .and_then(|c| c.last_update_time.clone())
                .unwrap_or_else(|| now.clone()),
        ),
    }
}

/// The template hash of a Deployment: FNV-1a of its pod template (and collision
/// count), spelled as Kubernetes spells it.
pub fn template_hash(deployment: &Deployment) -> String {
    let template = &deployment.spec.template;
    let mut bytes = serde_json::to_vec(&template).unwrap_or_default();
    if let Some(c) = deployment.status.as_ref().and_then(|s| s.collision_count) {
        bytes.extend_from_slice(c.to_string().as_bytes());
    }
    safe_hash(&bytes)
}

/// A new pod from `template`, controlled by `owner`, named `<prefix>-<5 random>`, bound
/// to `node` when one is given.
pub fn new_pod(
    template: &PodTemplateSpec,
    owner: OwnerReference,
    namespace: Option<String>,
    prefix: &str,
    node: Option<&str>,
) -> Pod {
    let template = template.clone();
    let meta = template.metadata.unwrap_or_default();
    // Pod names are DNS subdomains: at most 253 characters.
    let prefix: String = prefix.chars().take(253 - 6).collect();
    let mut spec = template.spec.unwrap_or_default();
    if let Some(node) = node {
        spec.node_name = Some(node.into());
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{prefix}-{}", random_suffix(5))),
            namespace,
            labels: meta.labels,
            annotations: meta.annotations,
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The controller reference an object puts on what it owns.
pub fn controller_ref(api_version: &str, kind: &str, meta: &ObjectMeta) -> OwnerReference {
    OwnerReference {
        api_version: api_version.into(),
        kind: kind.into(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// What the Deployment plan needs to know about one of its ReplicaSets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetFacts {
    pub name: String,
    pub hash: Option<String>,
    pub replicas: i32,
    pub created: Option<Timestamp>,
}

impl SetFacts {
    pub fn of(rs: &ReplicaSet) -> Self {
        Self {
            name: rs.name_any(),
            hash: rs.labels().get(TEMPLATE_HASH_LABEL).cloned(),
            replicas: rs.spec.replicas.unwrap_or(1),
            created: rs.metadata.creation_timestamp.as_ref().map(|t| t.0),
        }
    }
}

/// The replicas each of a Deployment's ReplicaSets should have, for `replicas` pods of
/// template `hash` (the ReplicaSet of that hash, which exists). Rolling update: the new
/// set is scaled to `replicas` at once, and old sets give up a pod only once a new one is
/// ready to take its place (newest old sets keep theirs longest). `Recreate`: old sets go
/// to zero first; the new one is scaled once no old pod is left.
pub fn scale_plan(
    replicas: i32,
    hash: &str,
    recreate: bool,
    sets: &[SetFacts],
    pods: &[PodFacts],
) -> BTreeMap<String, i32> {
    let mut want = BTreeMap::new();
    let is_new = |h: Option<&str>| h == Some(hash);
    let mut old: Vec<&SetFacts> = sets.iter().filter(|s| !is_new(s.hash.as_deref())).collect();
    old.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.name.cmp(&b.name)));
    let new = sets.iter().find(|s| is_new(s.hash.as_deref()));
    if recreate {
        for s in &old {
            want.insert(s.name.clone(), 0);
        }
        let old_pods_left = pods
            .iter()
            .any(|p| !is_new(p.hash.as_deref()) && !p.finished);
        if let Some(n) = new {
            want.insert(n.name.clone(), if old_pods_left { 0 } else { replicas });
        }
        return want;
    }
    if let Some(n) = new {
        want.insert(n.name.clone(), replicas);
    }
    let new_ready = pods
        .iter()
        .filter(|p| is_new(p.hash.as_deref()) && p.active() && p.ready)
        .count() as i32;
    let mut keep = (replicas - new_ready.min(replicas)).max(0);
    for s in old {
        let n = s.replicas.min(keep).max(0);
        keep -= n;
        want.insert(s.name.clone(), n);
    }
    want
}

// === the I/O part ===

struct Context {
    client: Client,
    lag: Duration,
}

/// Runs the controller until `cancel` fires. `namespace` limits it to one namespace;
/// `lag` is how long it waits before acting on a new generation.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    lag: Duration,
    cancel: CancellationToken,
) {
    let deployments: Api<Deployment> = api(&client, namespace.as_deref());
    let sets: Api<ReplicaSet> = api(&client, namespace.as_deref());
    let ctx = Arc::new(Context { client, lag });
    super::run_owner(deployments, sets, ctx, cancel, reconcile).await;
}

/// The ReplicaSet of `deployment`'s current template (hash `hash`), at `revision`.
fn new_set(deployment: &Deployment, hash: &str, revision: u64) -> ReplicaSet {
    let name = deployment.name_any();
    let mut template = deployment.spec.template.clone();
    let tmeta = template.metadata.get_or_insert_with(Default::default);
    tmeta
        .labels
        .get_or_insert_with(Default::default)
        .insert(TEMPLATE_HASH_LABEL.into(), hash.into());
    let mut selector = deployment.spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(Default::default)
        .insert(TEMPLATE_HASH_LABEL.into(), hash.into());
    let replicas = deployment.spec.replicas.unwrap_or(1);
    // ReplicaSet names are DNS subdomains; pods append 6 more characters.
    let prefix: String = name.chars().take(253 - 6 - hash.len() - 1).collect();
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{prefix}-{hash}")),
            namespace: deployment.namespace(),
            labels: tmeta.labels.clone(),
            annotations: Some(BTreeMap::from([
                (REVISION_ANNOTATION.to_string(), revision.to_string()),
                (
                    "deployment.kubernetes.io/desired-replicas".to_string(),
                    replicas.to_string(),
                ),
            ])),
            owner_references: Some(vec![controller_ref(
                "apps/v1",
                "Deployment",
                &deployment.metadata,
            )]),
            ..Default::default()
        },
        spec: ReplicaSetSpec {
            replicas: Some(0),
            min_ready_seconds: deployment.spec.min_ready_seconds,
            selector,
            template: Some(template),
        },
        status: None,
    }
}

/// The revision annotation Kubernetes numbers a Deployment's ReplicaSets with.
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";

fn owned_by(refs: &[OwnerReference], uid: Option<&String>) -> bool {
    refs.iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == uid)
}

#[tracing::instrument(skip_all, fields(deployment = %deployment.name_any()))]
async fn reconcile(
    deployment: Arc<Deployment>,
    ctx: Arc<Context>,
) -> Result<Action, DeploymentError> {
    let namespace = deployment.namespace().unwrap_or_default();
    let key = format!("{namespace}/{}", deployment.name_any());
    if deployment.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let observed = deployment
        .status
        .as_ref()
        .and_then(|s| s.observed_generation);
    let deployment = if !ctx.lag.is_zero() && observed != deployment.metadata.generation {
        // A busy controller-manager acts on a change a while after it: play that, then
        // act on the Deployment as it is by then.
        tokio::time::sleep(ctx.lag).await;
        match call(api.get_opt(&deployment.name_any())).await {
            Ok(Some(d)) => Arc::new(d),
            Ok(None) => return Ok(Action::await_change()),
            Err(source) => {
                return Err(DeploymentError::ListPods {
                    deployment: key,
                    source,
                });
            }
        }
    } else {
        deployment
    };
    let spec = &deployment.spec;
    let selector =
        Selector::try_from(spec.selector.clone()).map_err(|e| DeploymentError::ParseSelector {
            deployment: key.clone(),
            message: e.to_string(),
        })?;
    let uid = deployment.uid();
    let sets_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut sets: Vec<ReplicaSet> =
        call(sets_api.list(&ListParams::default().labels_from(&selector)))
            .await
            .map_err(|source| DeploymentError::ListSets {
                deployment: key.clone(),
                source,
            })?
            .items
            .into_iter()
            .filter(|s| owned_by(s.owner_references(), uid.as_ref()))
            .collect();
    let hash = template_hash(&deployment);
    if !sets
        .iter()
        .any(|s| s.labels().get(TEMPLATE_HASH_LABEL) == Some(&hash))
    {
        let revision = sets
            .iter()
            .filter_map(|s| {
                s.annotations()
                    .get(REVISION_ANNOTATION)?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0)
            + 1;
        let created = call(sets_api.create(
            &PostParams::default(),
            &new_set(&deployment, &hash, revision),
        ))
        .await
        .map_err(|source| DeploymentError::CreateSet {
            deployment: key.clone(),
            source,
        })?;
        sets.push(created);
    }
    let set_uids: Vec<String> = sets.iter().filter_map(|s| s.uid()).collect();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pods: Vec<Pod> = call(pods_api.list(&ListParams::default().labels_from(&selector)))
        .await
        .map_err(|source| DeploymentError::ListPods {
            deployment: key.clone(),
            source,
        })?
        .items
        .into_iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && set_uids.contains(&o.uid))
        })
        .collect();
    let facts: Vec<PodFacts> = pods.iter().map(PodFacts::of).collect();
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    if spec.paused != Some(true) {
        let set_facts: Vec<SetFacts> = sets.iter().map(SetFacts::of).collect();
        for (name, want) in scale_plan(replicas, &hash, recreate, &set_facts, &facts) {
            if set_facts
                .iter()
                .any(|s| s.name == name && s.replicas != want)
            {
                tracing::info!(set = %name, replicas = want, "scaling ReplicaSet");
                call(sets_api.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"replicas": want}})),
                ))
                .await
                .map_err(|source| DeploymentError::ScaleSet {
                    deployment: key.clone(),
                    set: name.clone(),
                    source,
                })?;
            }
        }
    }
    let now = now();
    let status = status(&deployment, &hash, &facts, &now);
    if deployment.status.as_ref() != Some(&status) {
        call(api.patch_status(
            &deployment.name_any(),
            &PatchParams::default(),
            &Patch::Merge(status_patch(&status)),
        ))
        .await
        .map_err(|source| DeploymentError::UpdateStatus {
            deployment: key,
            source,
        })?;
    }
    // Pods ready but not yet available for minReadySeconds need a look when they are.
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    if min_ready > 0 && status.ready_replicas != status.available_replicas {
        return Ok(Action::requeue(
            Duration::from_secs(min_ready as u64).min(RESYNC),
        ));
    }
    Ok(Action::requeue(RESYNC))
}

/// A merge patch that sets every status field, with `null` for an absent one so that
/// a count going to zero is removed rather than left at its old value.
fn status_patch(status: &DeploymentStatus) -> Value {
    let mut value = serde_json::to_value(status).expect("status serializes");
    let obj = value.as_object_mut().expect("status is an object");
    for field in [
        "observedGeneration",
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
        "unavailableReplicas",
        "terminatingReplicas",
    ] {
        obj.entry(field).or_insert(Value::Null);
    }
    json!({ "status": value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};

    fn pod(name: &str, hash: &str, ready: bool, created: i64) -> PodFacts {
        PodFacts {
            name: name.into(),
            hash: Some(hash.into()),
            ready,
            ready_since: ready.then(|| Timestamp::from_second(created + 5).unwrap()),
            terminating: false,
            finished: false,
            created: Some(Timestamp::from_second(created).unwrap()),
            restarts: 0,
        }
    }

    fn deployment(replicas: i32, image: &str) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("demo".into()),
                uid: Some("d-uid".into()),
                generation: Some(3),
                ..Default::default()
            },
            spec: DeploymentSpec {
                replicas: Some(replicas),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some([("app".to_string(), "web".to_string())].into()),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "app".into(),
                            image: Some(image.into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                },
                ..Default::default()
            },
            status: None,
        }
    }

    #[test]
    fn scale_up_creates_the_missing_pods() {
        let pods = [pod("a", "h", true, 1)];
        assert_eq!(
            plan(3, "h", false, &pods),
            Plan {
                create: 2,
                delete: vec![]
            }
        );
    }

    #[test]
    fn scale_down_deletes_not_ready_then_newest_first() {
        let pods = [
            pod("old-ready", "h", true, 1),
            pod("new-ready", "h", true, 50),
            pod("not-ready", "h", false, 2),
        ];
        assert_eq!(
            plan(1, "h", false, &pods).delete,
            ["not-ready", "new-ready"]
        );
        assert_eq!(plan(0, "h", false, &pods).delete.len(), 3);
    }

    #[test]
    fn terminating_pods_are_neither_counted_nor_deleted_again() {
        let mut gone = pod("gone", "h", true, 1);
        gone.terminating = true;
        let pods = [gone, pod("b", "h", true, 2)];
        assert_eq!(
            plan(2, "h", false, &pods),
            Plan {
                create: 1,
                delete: vec![]
            }
        );
    }

    #[test]
    fn rolling_update_keeps_old_pods_until_new_ones_are_ready() {
        let old = [pod("o1", "old", true, 1), pod("o2", "old", true, 2)];
        assert_eq!(
            plan(2, "new", false, &old),
            Plan {
                create: 2,
                delete: vec![]
            }
        );
        let mut pods = old.to_vec();
        pods.push(pod("n1", "new", true, 10));
        pods.push(pod("n2", "new", false, 11));
        assert_eq!(
            plan(2, "new", false, &pods),
            Plan {
                create: 0,
                delete: vec!["o2".into()]
            }
        );
        pods[3].ready = true;
        assert_eq!(plan(2, "new", false, &pods).delete, ["o2", "o1"]);
    }

    #[test]
    fn recreate_removes_old_pods_before_creating_new_ones() {
        let old = [pod("o1", "old", true, 1)];
        assert_eq!(
            plan(1, "new", true, &old),
            Plan {
                create: 0,
                delete: vec!["o1".into()]
            }
        );
        let mut leaving = pod("o1", "old", true, 1);
        leaving.terminating = true;
        assert_eq!(plan(1, "new", true, &[leaving]), Plan::default());
        assert_eq!(plan(1, "new", true, &[]).create, 1);
    }

    #[test]
    fn finished_pods_are_replaced() {
        let mut done = pod("done", "h", false, 1);
        done.finished = true;
        assert_eq!(
            plan(1, "h", false, &[done]),
            Plan {
                create: 1,
                delete: vec!["done".into()]
            }
        );
    }

    #[test]
    fn status_counts_pods_and_reports_availability() {
        let d = deployment(2, "v1");
        let hash = template_hash(&d);
        let now = Time(Timestamp::from_second(1000).unwrap());
        let half = status(
            &d,
            &hash,
            &[pod("a", &hash, true, 1), pod("b", &hash, false, 2)],
            &now,
        );
        assert_eq!(half.replicas, Some(2));
        assert_eq!(half.updated_replicas, Some(2));
        assert_eq!(half.ready_replicas, Some(1));
        assert_eq!(half.available_replicas, Some(1));
        assert_eq!(half.unavailable_replicas, Some(1));
        assert_eq!(half.observed_generation, Some(3));
        let cond = |s: &DeploymentStatus, t: &str| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_.as_deref() == Some(t))
                .cloned()
                .unwrap()
        };
        // 25% of 2 rounds down to 0 unavailable allowed.
        assert_eq!(cond(&half, "Available").status.as_deref(), Some("False"));
        assert_eq!(
            cond(&half, "Progressing").reason.as_deref(),
            Some("ReplicaSetUpdated")
        );
        let full = status(
            &d,
            &hash,
            &[pod("a", &hash, true, 1), pod("b", &hash, true, 2)],
            &now,
        );
        assert_eq!(cond(&full, "Available").status.as_deref(), Some("True"));
        assert_eq!(
            cond(&full, "Progressing").reason.as_deref(),
            Some("NewReplicaSetAvailable")
        );
        let zero = status(&deployment(0, "v1"), &hash, &[], &now);
        assert_eq!(zero.replicas, None);
        assert_eq!(zero.unavailable_replicas, None);
        assert_eq!(cond(&zero, "Available").status.as_deref(), Some("True"));
    }

    #[test]
    fn condition_times_hold_while_nothing_changes() {
        let mut d = deployment(1, "v1");
        let hash = template_hash(&d);
        let pods = [pod("a", &hash, true, 1)];
        let first = status(
            &d,
            &hash,
            &pods,
            &Time(Timestamp::from_second(100).unwrap()),
        );
        d.status = Some(first.clone());
        let again = status(
            &d,
            &hash,
            &pods,
            &Time(Timestamp::from_second(200).unwrap()),
        );
        assert_eq!(first, again);
    }

    #[test]
    fn template_hash_changes_with_the_template_only() {
        assert_eq!(
            template_hash(&deployment(1, "v1")),
            template_hash(&deployment(5, "v1"))
        );
        assert_ne!(
            template_hash(&deployment(1, "v1")),
            template_hash(&deployment(1, "v2"))
        );
    }

    #[test]
    fn max_unavailable_rounds_percentages_down_and_is_zero_for_recreate() {
        let mut d = deployment(10, "v1");
        assert_eq!(max_unavailable(&d, 10), 2);
        d.spec.strategy = Some(DeploymentStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDeployment {
                max_unavailable: Some(IntOrString::Int(3)),
                max_surge: None,
            }),
        });
        assert_eq!(max_unavailable(&d, 10), 3);
        d.spec.strategy = Some(DeploymentStrategy {
            type_: Some("Recreate".into()),
            rolling_update: None,
        });
        assert_eq!(max_unavailable(&d, 10), 0);
    }

    #[test]
    fn the_new_set_carries_the_hash_revision_owner_and_a_narrowed_selector() {
        let d = deployment(2, "v1");
        let rs = new_set(&d, "abc", 3);
        assert_eq!(rs.metadata.name.as_deref(), Some("web-abc"));
        assert_eq!(rs.labels()[TEMPLATE_HASH_LABEL], "abc");
        assert_eq!(rs.annotations()[REVISION_ANNOTATION], "3");
        let owner = &rs.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Deployment", "d-uid")
        );
        let spec = rs.spec;
        assert_eq!(spec.replicas, Some(0), "scaled by the plan, not at birth");
        let sel = spec.selector.match_labels.unwrap();
        assert_eq!(sel[TEMPLATE_HASH_LABEL], "abc");
        let tl = spec.template.unwrap().metadata.unwrap().labels.unwrap();
        assert_eq!(tl[TEMPLATE_HASH_LABEL], "abc");
    }

    #[test]
    fn new_pods_carry_template_labels_owner_and_node() {
        let d = deployment(1, "v1");
        let owner = controller_ref(
            "apps/v1",
            "ReplicaSet",
            &ObjectMeta {
                name: Some("web-abc".into()),
                uid: Some("rs-uid".into()),
                ..Default::default()
            },
        );
        let pod = new_pod(
            &d.spec.template,
            owner,
            Some("demo".into()),
            "web-abc",
            Some("node-1"),
        );
        assert_eq!(pod.metadata.labels.unwrap()["app"], "web");
        assert!(pod.metadata.name.unwrap().starts_with("web-abc-"));
        let owner = &pod.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ReplicaSet", "rs-uid")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("node-1"));
    }

    fn set(name: &str, hash: &str, replicas: i32, created: i64) -> SetFacts {
        SetFacts {
            name: name.into(),
            hash: Some(hash.into()),
            replicas,
            created: Some(Timestamp::from_second(created).unwrap()),
        }
    }

    #[test]
    fn a_rolling_update_moves_replicas_to_the_new_set_as_its_pods_become_ready() {
        let sets = [set("web-old", "old", 2, 1), set("web-new", "new", 0, 5)];
        let want = |pods: &[PodFacts]| scale_plan(2, "new", false, &sets, pods);
        let none = want(&[]);
        assert_eq!(
            (none["web-new"], none["web-old"]),
            (2, 2),
            "old pods stay until new ones are ready"
        );
        let one = want(&[pod("n1", "new", true, 10), pod("n2", "new", false, 11)]);
        assert_eq!((one["web-new"], one["web-old"]), (2, 1));
        let all = want(&[pod("n1", "new", true, 10), pod("n2", "new", true, 11)]);
        assert_eq!((all["web-new"], all["web-old"]), (2, 0));
        // Scaling a settled Deployment is the new set's alone.
        let settled = scale_plan(0, "new", false, &[set("web-new", "new", 2, 5)], &[]);
        assert_eq!(settled["web-new"], 0);
    }

    #[test]
    fn older_sets_give_up_their_pods_first() {
        let sets = [
            set("web-a", "a", 1, 1),
            set("web-b", "b", 1, 2),
            set("web-c", "c", 0, 3),
        ];
        let want = scale_plan(2, "c", false, &sets, &[pod("c1", "c", true, 10)]);
        assert_eq!((want["web-a"], want["web-b"], want["web-c"]), (0, 1, 2));
    }

    #[test]
    fn recreate_empties_old_sets_before_scaling_the_new_one() {
        let sets = [set("web-old", "old", 1, 1), set("web-new", "new", 0, 5)];
        let leaving = {
            let mut p = pod("o1", "old", true, 1);
            p.terminating = true;
            p
        };
        let want = scale_plan(1, "new", true, &sets, &[leaving]);
        assert_eq!((want["web-old"], want["web-new"]), (0, 0));
        let want = scale_plan(1, "new", true, &sets, &[]);
        assert_eq!((want["web-old"], want["web-new"]), (0, 1));
    }

    #[test]
    fn status_patch_clears_counts_that_went_to_zero() {
        let patch = status_patch(&DeploymentStatus {
            replicas: Some(1),
            ..Default::default()
        });
        assert_eq!(patch["status"]["replicas"], 1);
        assert!(patch["status"]["readyReplicas"].is_null());
        assert!(
            patch["status"]
                .as_object()
                .unwrap()
                .contains_key("readyReplicas")
        );
    }
}
