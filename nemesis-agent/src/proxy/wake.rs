//! The single wake-up flight of one Service: started by the first held connection (see
//! `hold`), it tells the controller, retries with backoff while connections are held,
//! and ends when a backend is ready or nothing is held any more. Never holds a connection.

use super::Shared;
use crate::control::ControllerClient;
use crate::endpoints::ServiceEndpoints;
use crate::metrics::{WakeLabels, WakeResult};
use nemesis_common::wire::{ServiceRef, WakeRequest};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

pub(crate) async fn run_wake(shared: Arc<Shared>, service: ServiceRef) {
    let mut endpoints = shared.endpoints.subscribe(&service);
    let emptied = shared.holds.emptied(&service);
    // What this flight was started against: a controller that has woken the Service
    // since (a higher epoch) does not count the flight's later sends as new demand.
    let applied_epoch = shared
        .applied_epochs
        .get()
        .and_then(|e| e.applied_epoch(&service));
    let mut failures = 0u32;
    let mut send_now = true;
    let mut next_send = Instant::now();
    loop {
        if flight_over(&shared, &service, &mut endpoints) {
            return;
        }
        // Without a controller (a bench, a node without one) the Service wakes by other
        // means; held connections wait for its endpoints as usual.
        if send_now && let Some(controller) = shared.controller.as_ref() {
            match send_wake(&shared, controller, &service, applied_epoch, &mut failures).await {
                Some(after) => next_send = Instant::now() + after,
                None => return,
            }
        }
        // Only the refresh (or retry) deadline sends again. An endpoint update with no
        // ready backend, or a held connection leaving while another arrives, merely
        // re-checks whether the flight is over: the controller has this flight's wake-up.
        send_now = tokio::select! {
            r = endpoints.changed() => {
                if r.is_err() {
                    break;
                }
                false
            }
            _ = emptied.notified() => false,
            _ = tokio::time::sleep_until(next_send), if shared.controller.is_some() => true,
        };
    }
    // The endpoint channel closed (the registry is gone): end the flight all the same.
    shared.holds.end_wake(&service, false);
}

/// Whether the flight is over: a backend is ready, or nothing is held any more (ended
/// under the holds lock, so a connection held after this starts a new flight).
fn flight_over(
    shared: &Shared,
    service: &ServiceRef,
    endpoints: &mut watch::Receiver<Arc<ServiceEndpoints>>,
) -> bool {
    if !endpoints.borrow_and_update().is_empty() {
        shared.holds.end_wake(service, false);
        tracing::debug!(service = %service, "backend ready; wake-up flight over");
        return true;
    }
    if shared.holds.end_wake(service, true) {
        tracing::debug!(service = %service, "nothing held any more; wake-up flight over");
        return true;
    }
    false
}

/// One wake-up call. Returns when to send the next (refresh, or retry after a failure),
/// or `None` when the controller rejected it: the held connections are released then.
async fn send_wake(
    shared: &Shared,
    controller: &ControllerClient,
    service: &ServiceRef,
    applied_epoch: Option<u64>,
    failures: &mut u32,
) -> Option<Duration> {
    let request = WakeRequest {
        node: shared.config.node.clone(),
        service: service.clone(),
        held_connections: u32::try_from(shared.holds.held(service)).unwrap_or(u32::MAX),
        applied_epoch,
    };
    let (result, next) = match controller.wake(&request).await {
        Ok(reply) if reply.accepted => {
            *failures = 0;
            tracing::info!(service = %service, held = request.held_connections, "wake-up accepted");
            (WakeResult::Accepted, Some(shared.config.wake_refresh))
        }
        Ok(reply) => {
            // No policy manages the Service: its held connections are refused now
            // rather than at their timeout; a later connection asks again.
            tracing::warn!(service = %service, message = %reply.message, "wake-up rejected; refusing held connections");
            shared.holds.release_held(service);
            (WakeResult::Rejected, None)
        }
        Err(err) => {
            *failures += 1;
            tracing::warn!(service = %service, %err, failures = *failures, "wake-up failed; retrying");
            (
                WakeResult::Failed,
                Some(shared.config.wake_backoff.delay(*failures)),
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
    next
}

#[cfg(test)]
mod tests {
    use super::super::hold::{Admission, HeldGuard};
    use super::super::{AppliedEpochs, FixedDestination, Proxy, ProxyConfig, ServiceTable};
    use crate::control::{ControllerClient, WAKE_PATH};
    use crate::endpoints::{EndpointRegistry, ServiceEndpoints};
    use crate::metrics::Metrics;
    use axum::{Json, Router, routing::post};
    use nemesis_common::wire::{ServiceRef, WakeReply, WakeRequest};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Longer than any test here: a second wake-up inside it is a duplicate, not a refresh.
    const REFRESH: Duration = Duration::from_secs(30);

    fn web() -> ServiceRef {
        ServiceRef {
            namespace: "shop".into(),
            name: "web".into(),
        }
    }

    /// A controller on 127.0.0.1 that accepts every wake-up, counts them, and answers the
    /// first one after `first_delay`.
    async fn controller(first_delay: Duration) -> (ControllerClient, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        let app = Router::new().route(
            WAKE_PATH,
            post(move || {
                let seen = seen.clone();
                async move {
                    if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                        tokio::time::sleep(first_delay).await;
                    }
                    Json(WakeReply {
                        accepted: true,
                        message: String::new(),
                    })
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client =
            ControllerClient::new(&format!("http://{addr}"), "token", Duration::from_secs(5))
                .unwrap();
        (client, count)
    }

    fn proxy(controller: ControllerClient, endpoints: Arc<EndpointRegistry>) -> Proxy {
        proxy_refreshing(controller, endpoints, REFRESH)
    }

    fn proxy_refreshing(
        controller: ControllerClient,
        endpoints: Arc<EndpointRegistry>,
        refresh: Duration,
    ) -> Proxy {
        let mut config = ProxyConfig::new("node-a");
        config.wake_refresh = refresh;
        Proxy::new(
            config,
            ServiceTable::new(),
            endpoints,
            Arc::new(FixedDestination("127.96.0.1:80".parse().unwrap())),
            Some(controller),
            Metrics::new().proxy,
        )
    }

    async fn wait_for(what: &str, cond: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
    }

    /// Holds one connection for `web` and starts its flight, as `conn` does.
    fn hold_one(p: &Proxy) -> HeldGuard {
        match p.shared.holds.admit(&web(), 10, true) {
            Admission::Held {
                guard, start_wake, ..
            } => {
                assert!(start_wake, "the first held connection starts the flight");
                tokio::spawn(super::run_wake(p.shared.clone(), web()));
                guard
            }
            Admission::Refused(o) => panic!("refused: {o:?}"),
        }
    }

    /// A controller that accepts every wake-up and keeps each request.
    async fn recording_controller() -> (ControllerClient, Arc<Mutex<Vec<WakeRequest>>>) {
        let seen: Arc<Mutex<Vec<WakeRequest>>> = Arc::default();
        let s = seen.clone();
        let app = Router::new().route(
            WAKE_PATH,
            post(move |Json(req): Json<WakeRequest>| {
                let s = s.clone();
                async move {
                    s.lock().unwrap().push(req);
                    Json(WakeReply {
                        accepted: true,
                        message: String::new(),
                    })
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client =
            ControllerClient::new(&format!("http://{addr}"), "token", Duration::from_secs(5))
                .unwrap();
        (client, seen)
    }

    /// The directive epoch applied per Service, as the test sets it.
    #[derive(Default)]
    struct Epochs(Mutex<Option<u64>>);

    impl AppliedEpochs for Epochs {
        fn applied_epoch(&self, _: &ServiceRef) -> Option<u64> {
            *self.0.lock().unwrap()
        }
    }

    #[tokio::test]
    async fn every_send_of_a_flight_carries_the_epoch_applied_when_it_began() {
        let refresh = Duration::from_millis(200);
        let (client, seen) = recording_controller().await;
        let p = proxy_refreshing(client, EndpointRegistry::new(), refresh);
        let epochs = Arc::new(Epochs::default());
        p.report_applied_epochs(epochs.clone());
        *epochs.0.lock().unwrap() = Some(100);
        let held = hold_one(&p);
        wait_for("the first wake-up", || !seen.lock().unwrap().is_empty()).await;
        // The wake's directive reaches the agent while the flight goes on: its refresh
        // still says what the flight began under.
        *epochs.0.lock().unwrap() = Some(200);
        wait_for("the refresh", || seen.lock().unwrap().len() >= 2).await;
        let epochs_sent: Vec<_> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.applied_epoch)
            .collect();
        assert!(
            epochs_sent.iter().all(|e| *e == Some(100)),
            "{epochs_sent:?}"
        );
        drop(held);
        // The next flight begins under the new epoch.
        endpoints_idle().await;
        let n = seen.lock().unwrap().len();
        let _held = hold_one(&p);
        wait_for("the next flight's wake-up", || {
            seen.lock().unwrap().len() > n
        })
        .await;
        assert_eq!(
            seen.lock().unwrap().last().unwrap().applied_epoch,
            Some(200)
        );
    }

    /// Long enough for a flight with nothing held to notice and end.
    async fn endpoints_idle() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    #[tokio::test]
    async fn endpoint_updates_without_a_ready_backend_send_no_second_wake_up() {
        let endpoints = EndpointRegistry::new();
        let (client, wakes) = controller(Duration::ZERO).await;
        let p = proxy(client, endpoints.clone());
        let _held = hold_one(&p);
        wait_for("the first wake-up arrived", || {
            wakes.load(Ordering::SeqCst) == 1
        })
        .await;

        // Changes of the published value that still carry no ready backend: a named
        // port with no address, then nothing again. (The slice watch publishes every
        // empty Service as the same value; the flight must not rely on it.)
        for _ in 0..3 {
            endpoints.publish(&web(), ServiceEndpoints::default().with_port("http", []));
            tokio::time::sleep(Duration::from_millis(50)).await;
            endpoints.publish(&web(), ServiceEndpoints::default());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(wakes.load(Ordering::SeqCst), 1, "one wake-up per flight");
        assert_eq!(p.held(&web()), 1);

        // A ready backend still ends the flight at once.
        endpoints.publish(
            &web(),
            ServiceEndpoints::default().with_port("http", ["198.18.0.5:80".parse().unwrap()]),
        );
        wait_for("the flight ended", || {
            matches!(
                p.shared.holds.admit(&web(), 10, true),
                Admission::Held {
                    start_wake: true,
                    ..
                }
            )
        })
        .await;
    }

    #[tokio::test]
    async fn a_held_connection_replaced_while_the_wake_up_is_in_flight_sends_no_second_one() {
        let endpoints = EndpointRegistry::new();
        let (client, wakes) = controller(Duration::from_millis(300)).await;
        let p = proxy(client, endpoints.clone());
        let first = hold_one(&p);
        wait_for("the first wake-up reached the controller", || {
            wakes.load(Ordering::SeqCst) == 1
        })
        .await;
        // While the controller has not answered: the only held client leaves (the count
        // drops to zero) and another is held in the same flight.
        drop(first);
        let second = match p.shared.holds.admit(&web(), 10, true) {
            Admission::Held {
                guard, start_wake, ..
            } => {
                assert!(!start_wake, "the flight is still on");
                guard
            }
            Admission::Refused(o) => panic!("refused: {o:?}"),
        };
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(wakes.load(Ordering::SeqCst), 1, "one wake-up per flight");
        drop(second);
    }

    #[tokio::test]
    async fn an_accepted_wake_up_is_sent_again_after_the_refresh_while_connections_are_held() {
        let refresh = Duration::from_millis(200);
        let (client, wakes) = controller(Duration::ZERO).await;
        let p = proxy_refreshing(client, EndpointRegistry::new(), refresh);
        let started = tokio::time::Instant::now();
        let held = hold_one(&p);
        wait_for("the refresh was sent", || wakes.load(Ordering::SeqCst) == 2).await;
        assert!(started.elapsed() >= refresh, "{:?}", started.elapsed());
        // Nothing held: the flight ends instead of refreshing.
        let sent = wakes.load(Ordering::SeqCst);
        drop(held);
        tokio::time::sleep(refresh * 2).await;
        assert_eq!(wakes.load(Ordering::SeqCst), sent);
    }
}
