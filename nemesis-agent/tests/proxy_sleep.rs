//! Connections held while the controller puts their Service to sleep (the `Sleep`
//! directive: every agent holds, then the scale to zero): they never go to the
//! backends the scale is about to stop; they go to the same backends once the sleep is
//! given up, or to the woken ones after the scale to zero (asking for the wake once the
//! backends are gone, not before: the controller sees them held in the agent's report).

mod proxy_support;

use anyhow::{Result, ensure};
use nemesis_agent::proxy::{ModeFollower, ModeSink, ModeSinkError, ProxyConfig};
use nemesis_common::wire::{AppliedMode, Directive, ServiceDirective, ServiceRef};
use proxy_support::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The datapath of these tests: nothing to program (the clients dial the proxy).
struct NoDatapath;

impl ModeSink for NoDatapath {
    fn set_hold(&self, _: &ServiceRef, hold: bool) -> Result<AppliedMode, ModeSinkError> {
        Ok(if hold {
            AppliedMode::Hold
        } else {
            AppliedMode::Passthrough
        })
    }
}

fn directive(service: &ServiceRef, directive: Directive, epoch: u64) -> ServiceDirective {
    ServiceDirective {
        service: service.clone(),
        directive,
        epoch,
        hold_ports: Vec::new(),
        after_zero: false,
    }
}

/// A warm Service with one backend (its served count), the mode follower running, and
/// the controller's `Sleep` applied.
struct Sleeping {
    h: Harness,
    controller: TestController,
    modes: Arc<ModeFollower>,
    web: ServiceRef,
    dst: std::net::SocketAddr,
    old_served: Arc<std::sync::atomic::AtomicUsize>,
    follow: tokio::task::JoinHandle<()>,
}

impl Drop for Sleeping {
    fn drop(&mut self) {
        self.follow.abort();
    }
}

async fn sleeping(name: &str) -> Result<Sleeping> {
    let controller = TestController::start(0).await?;
    let h = Harness::start(ProxyConfig::new("node-a"), Some(controller.client())).await?;
    let web = svc(name);
    let dst = h.manage(&web, 1, bounds(Duration::from_secs(30), 100));
    let (old, old_served) = http_backend().await?;
    h.ready(&web, &[old]);
    let modes = ModeFollower::with_direct_after(
        h.table.clone(),
        h.endpoints.clone(),
        Arc::new(NoDatapath),
        Duration::ZERO,
    );
    let follow = tokio::spawn(modes.clone().run());
    modes.apply_directives(&[directive(&web, Directive::Sleep, 10)]);
    wait_until("the Sleep is applied", Duration::from_secs(10), || {
        modes.applied(&web) == Some((AppliedMode::Hold, 10))
    })
    .await?;
    Ok(Sleeping {
        h,
        controller,
        modes,
        web,
        dst,
        old_served,
        follow,
    })
}

impl Sleeping {
    /// A client whose request reaches the proxy during the sleep; waits until it is held.
    async fn held_client(&self) -> Result<tokio::task::JoinHandle<Result<String>>> {
        let s = self.h.connect_as(self.dst).await?;
        let client = tokio::spawn(async move { http_get(s, "/during-sleep").await });
        let web = self.web.clone();
        wait_until("the connection is held", Duration::from_secs(10), || {
            self.h.proxy.held(&web) == 1
        })
        .await?;
        Ok(client)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_held_during_a_sleep_goes_to_the_backends_once_the_sleep_is_given_up()
-> Result<()> {
    bounded(Duration::from_secs(40), async {
        let s = sleeping("sleep-given-up").await?;
        let client = s.held_client().await?;
        // Its backend is still ready, and it stays held: the scale may stop it any time.
        tokio::time::sleep(Duration::from_millis(300)).await;
        ensure!(s.h.proxy.held(&s.web) == 1, "still held");
        ensure!(
            s.old_served.load(Ordering::SeqCst) == 0,
            "nothing sent to a backend that is going away"
        );
        ensure!(
            s.controller.requests.load(Ordering::SeqCst) == 0,
            "no wake-up while its backends are listed"
        );
        // The controller gives the sleep up (the client's wake-up): the backend stays.
        s.modes
            .apply_directives(&[directive(&s.web, Directive::Follow, 11)]);
        let (status, _, body) =
            parse_response(&bounded(Duration::from_secs(10), async { client.await? }).await?)?;
        ensure!(status == "HTTP/1.1 200 OK", "{status}");
        ensure!(body == "hello /during-sleep ", "{body:?}");
        ensure!(s.old_served.load(Ordering::SeqCst) == 1);
        Ok(())
    })
    .await
}

/// The policy is deleted mid-sleep: the controller's next whole set no longer lists the
/// Service. Its `Sleep` goes with it (back to following the endpoints), so the held
/// connection goes to the backend that stays, and new ones are not held for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_whose_directive_leaves_the_set_is_given_up() -> Result<()> {
    bounded(Duration::from_secs(40), async {
        let s = sleeping("sleep-dropped").await?;
        let client = s.held_client().await?;
        ensure!(s.old_served.load(Ordering::SeqCst) == 0, "held, not sent");
        s.modes.apply_directives(&[]);
        let (status, _, body) =
            parse_response(&bounded(Duration::from_secs(10), async { client.await? }).await?)?;
        ensure!(status == "HTTP/1.1 200 OK", "{status}");
        ensure!(body == "hello /during-sleep ", "{body:?}");
        wait_until(
            "the Service follows its endpoints again",
            Duration::from_secs(10),
            || s.modes.applied(&s.web).map(|(mode, _)| mode) == Some(AppliedMode::Passthrough),
        )
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_held_during_a_sleep_goes_to_the_woken_backend_after_the_scale_to_zero()
-> Result<()> {
    bounded(Duration::from_secs(40), async {
        let s = sleeping("sleep-made").await?;
        let client = s.held_client().await?;
        // The scale to zero takes the backend away (its pod is stopped); the Sleep
        // directive stays until the controller wakes the Service again.
        s.h.ready(&s.web, &[]);
        wait_until(
            "the held connection asks for the wake",
            Duration::from_secs(10),
            || s.controller.accepted.load(Ordering::SeqCst) == 1,
        )
        .await?;
        let wake = s.controller.last_wake.lock().unwrap().clone();
        ensure!(
            wake.is_some_and(|w| w.service == s.web && w.held_connections == 1),
            "the wake-up names the Service and its held connection"
        );
        let (woken, woken_served) = http_backend().await?;
        wait_until(
            "the gate sees the Service at zero",
            Duration::from_secs(10),
            || !s.h.table.sleep_gates().is_closed(&s.web),
        )
        .await?;
        s.h.ready(&s.web, &[woken]);
        let (status, _, body) =
            parse_response(&bounded(Duration::from_secs(10), async { client.await? }).await?)?;
        ensure!(status == "HTTP/1.1 200 OK", "{status}");
        ensure!(body == "hello /during-sleep ", "{body:?}");
        ensure!(woken_served.load(Ordering::SeqCst) == 1);
        ensure!(
            s.old_served.load(Ordering::SeqCst) == 0,
            "nothing sent to the backend that went away"
        );
        // A connection arriving now, the Sleep still in force, goes to the woken backend
        // at once: the gate stays open for the backends ready after the zero.
        let (status, _, _) =
            parse_response(&http_get(s.h.connect_as(s.dst).await?, "/woken").await?)?;
        ensure!(status == "HTTP/1.1 200 OK", "{status}");
        ensure!(woken_served.load(Ordering::SeqCst) == 2);
        Ok(())
    })
    .await
}

/// The sleep completed (the scale to zero was made) and the controller wakes the
/// Service: its `Follow` says so (`after_zero`). This agent's view of the endpoints
/// lags and still lists the backend the scale stopped: the held connection waits, the
/// datapath stays held, and both go to the woken backend once the view shows it, even
/// when the view never shows the Service empty (it caught up in one change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_after_the_scale_to_zero_sends_nothing_to_the_stopped_backend_still_listed()
-> Result<()> {
    bounded(Duration::from_secs(40), async {
        let s = sleeping("sleep-woken-lagging").await?;
        let client = s.held_client().await?;
        s.modes.apply_directives(&[ServiceDirective {
            after_zero: true,
            ..directive(&s.web, Directive::Follow, 11)
        }]);
        wait_until("the Follow is applied", Duration::from_secs(10), || {
            s.modes.applied(&s.web) == Some((AppliedMode::Hold, 11))
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        ensure!(s.h.proxy.held(&s.web) == 1, "still held");
        ensure!(
            s.old_served.load(Ordering::SeqCst) == 0,
            "nothing sent to the backend the scale to zero stopped"
        );
        ensure!(
            s.modes.applied(&s.web) == Some((AppliedMode::Hold, 11)),
            "new connects are held, not sent direct to it"
        );
        let (woken, woken_served) = http_backend().await?;
        s.h.ready(&s.web, &[woken]);
        let (status, _, body) =
            parse_response(&bounded(Duration::from_secs(10), async { client.await? }).await?)?;
        ensure!(status == "HTTP/1.1 200 OK", "{status}");
        ensure!(body == "hello /during-sleep ", "{body:?}");
        ensure!(woken_served.load(Ordering::SeqCst) == 1);
        ensure!(s.old_served.load(Ordering::SeqCst) == 0);
        wait_until(
            "the Service follows its endpoints again",
            Duration::from_secs(10),
            || s.modes.applied(&s.web).map(|(mode, _)| mode) == Some(AppliedMode::Passthrough),
        )
        .await?;
        Ok(())
    })
    .await
}
