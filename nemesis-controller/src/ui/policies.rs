//! The UI's view of the ScalingPolicies: a kube-rs reflector cache fed by a cluster-wide
//! watch of its own, so every instance (a standby too) shows specs and statuses without
//! one API call per page. It only reads; the core owns the policies' statuses.

use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_api};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::policy::ScalingPolicy;
use crate::store::PolicyId;

/// The readable side, shared by the handlers.
#[derive(Clone)]
pub struct PolicyCache {
    store: reflector::Store<ScalingPolicy>,
    synced: watch::Receiver<bool>,
}

/// The writing side: fed by [`PolicyFeed::run`] from the API server.
pub struct PolicyFeed {
    writer: reflector::store::Writer<ScalingPolicy>,
    synced: watch::Sender<bool>,
}

impl PolicyCache {
    /// An empty cache and its feed.
    pub fn new() -> (PolicyCache, PolicyFeed) {
        let (store, writer) = reflector::store();
        let (tx, rx) = watch::channel(false);
        (
            PolicyCache { store, synced: rx },
            PolicyFeed { writer, synced: tx },
        )
    }

    /// Every cached policy, by namespace then name.
    pub fn list(&self) -> Vec<Arc<ScalingPolicy>> {
        let mut all = self.store.state();
        all.sort_by_key(|p| id_of(p));
        all
    }

    pub fn get(&self, id: &PolicyId) -> Option<Arc<ScalingPolicy>> {
        self.store
            .get(&ObjectRef::new(&id.name).within(&id.namespace))
    }

    /// Whether the first full list has arrived (before it, an empty list means nothing).
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }
}

pub fn id_of(p: &ScalingPolicy) -> PolicyId {
    PolicyId::new(p.namespace().unwrap_or_default(), p.name_any())
}

impl PolicyFeed {
    /// Applies one watch event.
    pub fn apply(&mut self, ev: &Event<ScalingPolicy>) {
        self.writer.apply_watcher_event(ev);
        if matches!(ev, Event::InitDone) {
            self.synced.send_replace(true);
        }
    }

    /// Puts a policy in the cache as a watch would (and marks the cache synced).
    pub fn upsert(&mut self, p: ScalingPolicy) {
        self.apply(&Event::Apply(p));
        self.synced.send_replace(true);
    }

    /// Watches every ScalingPolicy until `stop`, retrying with kube-rs's default backoff
    /// (a missing CRD or an unreachable API server is logged, never fatal).
    pub async fn run(mut self, client: Client, stop: CancellationToken) {
        let stream = watch_api(
            Api::<ScalingPolicy>::all(client),
            watcher::Config::default(),
        )
        .default_backoff();
        futures::pin_mut!(stream);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => self.apply(&ev),
                    Some(Err(e)) => tracing::warn!(err = %e, "UI: watching ScalingPolicies failed; retrying"),
                    None => return,
                },
            }
        }
    }
}
