//! The single wake-up flight of one Service: started by the first held connection (see
//! `hold`), it tells the controller, retries with backoff while connections are held,
//! and ends when a backend is ready or nothing is held any more. Never holds a connection.

use super::Shared;
use crate::metrics::{WakeLabels, WakeResult};
use nemesis_common::wire::{ServiceRef, WakeRequest};
use std::sync::Arc;

pub(crate) async fn run_wake(shared: Arc<Shared>, service: ServiceRef) {
    let mut endpoints = shared.endpoints.subscribe(&service);
    let emptied = shared.holds.emptied(&service);
    let mut failures = 0u32;
    loop {
        if !endpoints.borrow_and_update().is_empty() {
            shared.holds.end_wake(&service, false);
            tracing::debug!(service = %service, "backend ready; wake-up flight over");
            return;
        }
        if shared.holds.end_wake(&service, true) {
            tracing::debug!(service = %service, "nothing held any more; wake-up flight over");
            return;
        }
        let Some(controller) = shared.controller.as_ref() else {
            // No controller configured (a bench or a node without one): the Service wakes
            // by other means; held connections wait for its endpoints as usual.
            tokio::select! {
                r = endpoints.changed() => if r.is_err() { break },
                _ = emptied.notified() => {}
            }
            continue;
        };
        let request = WakeRequest {
            node: shared.config.node.clone(),
            service: service.clone(),
            held_connections: u32::try_from(shared.holds.held(&service)).unwrap_or(u32::MAX),
        };
        let (result, next) = match controller.wake(&request).await {
            Ok(reply) if reply.accepted => {
                failures = 0;
                tracing::info!(service = %service, held = request.held_connections, "wake-up accepted");
                (WakeResult::Accepted, shared.config.wake_refresh)
            }
            Ok(reply) => {
                // No policy manages the Service: its held connections are refused now
                // rather than at their timeout; a later connection asks again.
                tracing::warn!(service = %service, message = %reply.message, "wake-up rejected; refusing held connections");
                shared
                    .metrics
                    .wakeups
                    .get_or_create(&WakeLabels {
                        namespace: service.namespace.clone(),
                        service: service.name.clone(),
                        result: WakeResult::Rejected,
                    })
                    .inc();
                shared.holds.release_held(&service);
                return;
            }
            Err(err) => {
                failures += 1;
                tracing::warn!(service = %service, %err, failures, "wake-up failed; retrying");
                (
                    WakeResult::Failed,
                    shared.config.wake_backoff.delay(failures),
                )
            }
        };
        shared
            .metrics
            .wakeups
            .get_or_create(&WakeLabels {
                namespace: service.namespace.clone(),
                service: service.name.clone(),
                result,
            })
            .inc();
        tokio::select! {
            r = endpoints.changed() => if r.is_err() { break },
            _ = emptied.notified() => {}
            _ = tokio::time::sleep(next) => {}
        }
    }
    // The endpoint channel closed (the registry is gone): end the flight all the same.
    shared.holds.end_wake(&service, false);
}
