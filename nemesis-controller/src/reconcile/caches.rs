//! The cluster-wide caches the core reads (ScalingPolicies and HorizontalPodAutoscalers),
//! listed and watched from boot on every instance, leader or not: a standby's are warm
//! when it takes over, so a new leadership term starts from them at once instead of
//! relisting the cluster. A term subscribes to their events; leadership gates only what
//! is done with them. Owns the watches; decides nothing.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_api};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;

use super::AbortOnDrop;
use crate::policy::ScalingPolicy;

/// Events a term may fall behind by before it resynchronises from the store.
const BACKLOG: usize = 4096;

/// What a subscriber receives: a watch event, or a watch error (shared: not `Clone`).
pub type Change<K> = Result<Event<K>, Arc<watcher::Error>>;

/// One resource's cache: the reflector's store, whether it has listed once, and its
/// events for whoever subscribes.
pub struct Cache<K: Resource + Clone + 'static>
where
    K::DynamicType: Hash + Eq + Clone,
{
    pub reader: Store<K>,
    events: broadcast::Sender<Change<K>>,
    synced: Arc<AtomicBool>,
    /// The last watch error was a refusal for want of a permission.
    forbidden: Arc<AtomicBool>,
    _task: AbortOnDrop,
}

impl<K> Cache<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Hash + Eq + Clone + Default + Send + Sync,
{
    /// Starts listing and watching every `K` of the cluster.
    pub fn start(api: Api<K>) -> Self {
        let (reader, writer) = reflector::store::<K>();
        let (events, _) = broadcast::channel(BACKLOG);
        let synced = Arc::new(AtomicBool::new(false));
        let forbidden = Arc::new(AtomicBool::new(false));
        let stream = reflector::reflector(
            writer,
            watch_api(api, watcher::Config::default()).default_backoff(),
        );
        let (tx, s, f) = (events.clone(), synced.clone(), forbidden.clone());
        let task = tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match &ev {
                    Ok(Event::InitDone) => {
                        s.store(true, Ordering::Release);
                        f.store(false, Ordering::Release);
                    }
                    Ok(_) => f.store(false, Ordering::Release),
                    Err(e) => f.store(is_forbidden(e), Ordering::Release),
                }
                // No subscriber (no term running) is fine: the store is what counts.
                let _ = tx.send(ev.map_err(Arc::new));
            }
        });
        Self {
            reader,
            events,
            synced,
            forbidden,
            _task: AbortOnDrop(task),
        }
    }

    /// The events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change<K>> {
        self.events.subscribe()
    }

    /// Listed at least once: the store holds the cluster's objects.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub fn is_forbidden(&self) -> bool {
        self.forbidden.load(Ordering::Acquire)
    }
}

/// Every cache the core reads.
pub struct Caches {
    pub policies: Cache<ScalingPolicy>,
    pub hpas: Cache<HorizontalPodAutoscaler>,
}

impl Caches {
    pub fn start(client: Client) -> Self {
        Self {
            policies: Cache::start(Api::all(client.clone())),
            hpas: Cache::start(Api::all(client)),
        }
    }
}

/// A watch refused for want of a permission (which retrying will not grant).
pub fn is_forbidden(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            if s.code == 403
    )
}
