//! The garbage collector, for the owners the sandbox knows: ReplicaSets whose controlling
//! Deployment is gone, pods whose controlling ReplicaSet, StatefulSet or Deployment is
//! gone and EndpointSlices whose controlling Service is gone are deleted (background
//! propagation, what kubectl and kube-rs ask for by default). It deletes
//! only objects whose controller owner reference names a missing uid.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::api;
use crate::kubelet::call::{CallError, call};

/// How often the whole sweep runs even without a deletion event.
const SWEEP_PERIOD: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("listing {kind} for garbage collection: {source}")]
    List {
        kind: &'static str,
        source: CallError,
    },
    #[error("deleting orphaned {kind} {name}: {source}")]
    DeleteOrphan {
        kind: &'static str,
        name: String,
        source: CallError,
    },
}

/// The uid of `obj`'s controlling owner of `kind`, if it has one.
pub fn controller_uid<'a>(obj: &'a impl ResourceExt, kind: &str) -> Option<&'a str> {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == kind)
        .map(|o| o.uid.as_str())
}

/// Runs until `cancel` fires: a sweep at start, after each owner deletion, and every
/// [`SWEEP_PERIOD`].
pub async fn run(client: Client, namespace: Option<String>, cancel: CancellationToken) {
    let ns = namespace.as_deref();
    let deletions = futures::stream::select(
        futures::stream::select(
            owner_deletions::<Deployment>(api(&client, ns)),
            owner_deletions::<ReplicaSet>(api(&client, ns)),
        ),
        futures::stream::select(
            owner_deletions::<Service>(api(&client, ns)),
            owner_deletions::<DaemonSet>(api(&client, ns)),
        ),
    );
    let mut deletions = std::pin::pin!(deletions);
    loop {
        if let Err(err) = sweep(&client, ns).await {
            tracing::warn!(%err, "garbage collection sweep failed");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_PERIOD) => {}
            Some(()) = deletions.next() => {}
        }
    }
}

fn owner_deletions<K>(api: Api<K>) -> impl futures::Stream<Item = ()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(
            |event| async move { matches!(event, Ok(watcher::Event::Delete(_))).then_some(()) },
        )
}

async fn sweep(client: &Client, ns: Option<&str>) -> Result<(), GcError> {
    // Dependents first, owners second: an owner created after the dependents were
    // listed cannot be missed, so a new pod is never taken for an orphan.
    let pods = list::<Pod>(client, ns, "pods").await?;
    let slices = list::<EndpointSlice>(client, ns, "endpointslices").await?;
    let sets = list::<ReplicaSet>(client, ns, "replicasets").await?;
    let deployments = uids(&list::<Deployment>(client, ns, "deployments").await?);
    let services = uids(&list::<Service>(client, ns, "services").await?);
    let set_uids = uids(&sets);
    let stateful = uids(&list::<StatefulSet>(client, ns, "statefulsets").await?);
    let daemons = uids(&list::<DaemonSet>(client, ns, "daemonsets").await?);
    for pod in &pods {
        let orphan = controller_uid(pod, "Deployment").is_some_and(|u| !deployments.contains(u))
            || controller_uid(pod, "ReplicaSet").is_some_and(|u| !set_uids.contains(u))
            || controller_uid(pod, "StatefulSet").is_some_and(|u| !stateful.contains(u))
            || controller_uid(pod, "DaemonSet").is_some_and(|u| !daemons.contains(u));
        if orphan {
            delete::<Pod>(client, pod, "pod").await?;
        }
    }
    for set in &sets {
        if controller_uid(set, "Deployment").is_some_and(|u| !deployments.contains(u)) {
            delete::<ReplicaSet>(client, set, "replicaset").await?;
        }
    }
    for slice in &slices {
        if controller_uid(slice, "Service").is_some_and(|u| !services.contains(u)) {
            delete::<EndpointSlice>(client, slice, "endpointslice").await?;
        }
    }
    Ok(())
}

fn uids<K: ResourceExt>(objects: &[K]) -> HashSet<String> {
    objects.iter().filter_map(|o| o.uid()).collect()
}

async fn list<K>(client: &Client, ns: Option<&str>, kind: &'static str) -> Result<Vec<K>, GcError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = api(client, ns);
    call(api.list(&ListParams::default()))
        .await
        .map(|l| l.items)
        .map_err(|source| GcError::List { kind, source })
}

async fn delete<K>(client: &Client, obj: &K, kind: &'static str) -> Result<(), GcError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    if obj.meta().deletion_timestamp.is_some() {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let name = obj.name_any();
    tracing::info!(kind, %name, "deleting orphan");
    match call(api.delete(&name, &DeleteParams::default())).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(source) => Err(GcError::DeleteOrphan { kind, name, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    #[test]
    fn only_the_controlling_owner_of_the_right_kind_counts() {
        let mut pod = Pod::default();
        pod.metadata.owner_references = Some(vec![
            OwnerReference {
                kind: "Deployment".into(),
                uid: "not-controller".into(),
                controller: None,
                ..Default::default()
            },
            OwnerReference {
                kind: "Deployment".into(),
                uid: "d1".into(),
                controller: Some(true),
                ..Default::default()
            },
        ]);
        assert_eq!(controller_uid(&pod, "Deployment"), Some("d1"));
        assert_eq!(controller_uid(&pod, "Service"), None);
        assert_eq!(controller_uid(&Pod::default(), "Deployment"), None);
    }
}
