//! The parts of kube-controller-manager the sandbox needs, talking to the API only
//! through kube-rs as the real ones do: Deployments own ReplicaSets ([`deployments`]),
//! which keep their pods ([`replicasets`]), StatefulSets keep pods with stable names
//! ([`statefulsets`]), DaemonSets keep one pod per node ([`daemonsets`]), Services get
//! EndpointSlices
//! ([`endpointslices`]), and dependents of deleted owners are removed ([`gc`]). No decision here reads local state: each
//! reconcile starts from what the API server says.

pub mod daemonsets;
pub mod deployments;
pub mod endpointslices;
pub mod gc;
pub mod replicasets;
pub mod statefulsets;

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// A missed watch event must never leave an object wrong for long.
const RESYNC: Duration = Duration::from_secs(30);
/// Retry after a failed reconcile.
const RETRY: Duration = Duration::from_secs(1);

/// `Api::namespaced` when a namespace is given, else every namespace.
fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The pods in `namespace` (matching `params`) that `owner` controls, by the owner
/// reference's uid as Kubernetes' controllers adopt them (labels alone could match
/// another owner's pods).
async fn owned_pods<K: Resource>(
    client: &Client,
    namespace: &str,
    owner: &K,
    params: &kube::api::ListParams,
) -> Result<Vec<k8s_openapi::api::core::v1::Pod>, crate::kubelet::call::CallError> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let uid = owner.uid();
    Ok(crate::kubelet::call::call(pods.list(params))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
        })
        .collect())
}

/// Runs `reconcile` for every `owners` object, again whenever one of its `owned`
/// objects changes, until `cancel` fires: the loop every controller here shares.
/// Failed reconciles are logged and retried after [`RETRY`].
async fn run_owner<K, O, C, E, F, Fut>(
    owners: Api<K>,
    owned: Api<O>,
    ctx: Arc<C>,
    cancel: CancellationToken,
    reconcile: F,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    O: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    C: Send + Sync + 'static,
    E: std::error::Error + Send + 'static,
    F: FnMut(Arc<K>, Arc<C>) -> Fut,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
{
    let kind = K::kind(&()).to_string();
    let error_policy = |obj: Arc<K>, err: &E, _: Arc<C>| {
        tracing::warn!(kind = %K::kind(&()), name = %obj.name_any(), %err, "reconcile failed");
        Action::requeue(RETRY)
    };
    Controller::new(owners, watcher::Config::default())
        .owns(owned, watcher::Config::default())
        .graceful_shutdown_on(cancel.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|res| {
            if let Err(err) = res {
                tracing::debug!(%err, "{kind} controller");
            }
            futures::future::ready(())
        })
        .await;
}

/// Time now, to the second: what the API stores, so statuses compare equal after a
/// round trip.
fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    let secs = k8s_openapi::jiff::Timestamp::now().as_second();
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(secs).expect("now is a valid timestamp"),
    )
}

/// Kubernetes' `rand.SafeEncodeString` alphabet: no vowels, no look-alikes.
const SAFE_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// FNV-1a, 32 bits: what Kubernetes hashes pod templates with.
fn fnv32a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// A short stable name fragment for `data`, spelled as Kubernetes spells hashes.
fn safe_hash(data: &[u8]) -> String {
    fnv32a(data)
        .to_string()
        .bytes()
        .map(|b| SAFE_ALPHABET[usize::from(b) % SAFE_ALPHABET.len()] as char)
        .collect()
}

/// `n` random characters of the safe alphabet, for generated names.
fn random_suffix(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..n)
        .map(|_| SAFE_ALPHABET[rng.random_range(0..SAFE_ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv32a_matches_the_reference_vectors() {
        assert_eq!(fnv32a(b""), 0x811c_9dc5);
        assert_eq!(fnv32a(b"a"), 0xe40c_292c);
        assert_eq!(fnv32a(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn safe_hashes_are_stable_and_use_the_safe_alphabet() {
        let h = safe_hash(b"template");
        assert_eq!(h, safe_hash(b"template"));
        assert_ne!(h, safe_hash(b"template2"));
        assert!(h.bytes().all(|b| SAFE_ALPHABET.contains(&b)), "{h}");
        let r = random_suffix(5);
        assert_eq!(r.len(), 5);
        assert!(r.bytes().all(|b| SAFE_ALPHABET.contains(&b)));
    }
}
