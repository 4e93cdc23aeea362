//! Scale from zero through the proxy: held clients, one wake-up, nothing lost.

mod proxy_support;

use anyhow::{Result, ensure};
use nemesis_agent::metrics::Outcome;
use nemesis_agent::proxy::ProxyConfig;
use proxy_support::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_held_clients_get_complete_responses_after_a_2s_cold_start_with_one_wake_up()
-> Result<()> {
    bounded(Duration::from_secs(30), async {
        let controller = TestController::start(0).await?;
        let h = Harness::start(ProxyConfig::new("node-a"), Some(controller.client())).await?;
        let web = svc("web");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(20), 1000));
        h.default_destination(dst);
        let started = Instant::now();

        let clients: Vec<_> = (0..200)
            .map(|i| {
                let addr = h.addr;
                tokio::spawn(async move {
                    let stream = tokio::net::TcpStream::connect(addr).await?;
                    http_get(stream, &format!("/client/{i}")).await
                })
            })
            .collect();
        wait_until("200 connections are held", Duration::from_secs(10), || {
            h.proxy.held(&web) == 200
        })
        .await?;
        ensure!(h.metrics.held_count(&web) == 200, "held gauge says {}", h.metrics.held_count(&web));

        // The backend starts listening and becomes ready 2 s after the first connect.
        tokio::time::sleep(Duration::from_secs(2).saturating_sub(started.elapsed())).await;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let backend = listener.local_addr()?;
        let served = http_backend_on(listener).await?;
        h.ready(&web, &[backend]);

        for (i, c) in clients.into_iter().enumerate() {
            let resp = c.await??;
            let (status, headers, body) = parse_response(&resp)?;
            ensure!(status == "HTTP/1.1 200 OK", "client {i}: {status}");
            ensure!(body == format!("hello /client/{i} "), "client {i}: body {body:?} ({headers})");
        }
        ensure!(served.load(Ordering::SeqCst) == 200, "backend served {}", served.load(Ordering::SeqCst));
        ensure!(controller.accepted.load(Ordering::SeqCst) == 1, "wake-ups: {}", controller.accepted.load(Ordering::SeqCst));
        ensure!(controller.requests.load(Ordering::SeqCst) == 1, "requests to the controller: {}", controller.requests.load(Ordering::SeqCst));
        let wake = controller.last_wake.lock().unwrap().clone().expect("a wake-up");
        ensure!(wake.service == web && wake.node == "node-a" && wake.held_connections >= 1, "{wake:?}");
        ensure!(h.metrics.outcome_count(Outcome::Forwarded) == 200);
        for o in [Outcome::Timeout, Outcome::Overflow, Outcome::ClientGone, Outcome::BackendFailed] {
            ensure!(h.metrics.outcome_count(o) == 0, "{o:?}: {}", h.metrics.outcome_count(o));
        }
        ensure!(h.metrics.held_count(&web) == 0);
        wait_until("every proxied connection is closed", Duration::from_secs(5), || {
            h.proxy.open_connections() == 0
        })
        .await?;
        let text = h.metrics_text();
        ensure!(
            text.contains(r#"nemesis_agent_proxy_wakeups_total{namespace="shop",service="web",result="accepted"} 1"#),
            "{text}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_controller_is_retried_with_backoff_while_connections_are_held() -> Result<()> {
    bounded(Duration::from_secs(20), async {
        let controller = TestController::start(2).await?;
        let h = Harness::start(ProxyConfig::new("node-a"), Some(controller.client())).await?;
        let web = svc("web");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(15), 100));
        let mut clients = Vec::new();
        for i in 0..5 {
            let stream = h.connect_as(dst).await?;
            clients.push(tokio::spawn(async move { http_get(stream, &format!("/{i}")).await }));
        }
        wait_until("the third wake-up call is accepted", Duration::from_secs(10), || {
            controller.accepted.load(Ordering::SeqCst) == 1
        })
        .await?;
        ensure!(controller.requests.load(Ordering::SeqCst) == 3, "{}", controller.requests.load(Ordering::SeqCst));
        ensure!(controller.unauthorised.load(Ordering::SeqCst) == 0);
        let (backend, _) = http_backend().await?;
        h.ready(&web, &[backend]);
        for c in clients {
            let (status, _, _) = parse_response(&c.await??)?;
            ensure!(status == "HTTP/1.1 200 OK", "{status}");
        }
        let text = h.metrics_text();
        ensure!(text.contains(r#"nemesis_agent_proxy_wakeups_total{namespace="shop",service="web",result="failed"} 2"#), "{text}");
        // Nothing held any more: no further wake-up is sent.
        tokio::time::sleep(Duration::from_millis(300)).await;
        ensure!(controller.requests.load(Ordering::SeqCst) == 3);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cold_start_after_the_service_went_back_to_zero_sends_a_new_wake_up() -> Result<()> {
    bounded(Duration::from_secs(20), async {
        let controller = TestController::start(0).await?;
        let h = Harness::start(ProxyConfig::new("node-a"), Some(controller.client())).await?;
        let web = svc("web");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(10), 100));
        let (backend, _) = http_backend().await?;
        for round in 1..=2 {
            let client = tokio::spawn({
                let s = h.connect_as(dst).await?;
                async move { http_get(s, "/").await }
            });
            wait_until("the wake-up arrives", Duration::from_secs(5), || {
                controller.accepted.load(Ordering::SeqCst) == round
            })
            .await?;
            h.ready(&web, &[backend]);
            let (status, _, _) = parse_response(&client.await??)?;
            ensure!(status == "HTTP/1.1 200 OK");
            h.ready(&web, &[]); // scaled back to zero
        }
        ensure!(controller.accepted.load(Ordering::SeqCst) == 2);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_ready_backends_is_forwarded_at_once_without_a_wake_up() -> Result<()> {
    bounded(Duration::from_secs(10), async {
        let controller = TestController::start(0).await?;
        let h = Harness::start(ProxyConfig::new("node-a"), Some(controller.client())).await?;
        let web = svc("web");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(5), 100));
        let (backend, _) = http_backend().await?;
        h.ready(&web, &[backend]);
        let (status, _, body) =
            parse_response(&http_get(h.connect_as(dst).await?, "/warm").await?)?;
        ensure!(
            status == "HTTP/1.1 200 OK" && body == "hello /warm ",
            "{status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        ensure!(controller.requests.load(Ordering::SeqCst) == 0);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_the_controller_rejects_refuses_the_held_connections_at_once() -> Result<()> {
    bounded(Duration::from_secs(10), async {
        let controller = TestController::start(0).await?;
        controller.reject.store(true, Ordering::SeqCst);
        let h = Harness::start(ProxyConfig::new("node-a"), Some(controller.client())).await?;
        let web = svc("unmanaged");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(300), 100));
        let started = Instant::now();
        let http = tokio::spawn({
            let s = h.connect_as(dst).await?;
            async move { http_get(s, "/").await }
        });
        let mut raw = h.connect_as(dst).await?;
        tokio::io::AsyncWriteExt::write_all(&mut raw, b"\x00\x01binary").await?;
        let (status, _, body) = parse_response(&http.await??)?;
        ensure!(status == "HTTP/1.1 503 Service Unavailable", "{status}");
        ensure!(body.contains("no scaling policy"), "{body}");
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut rest).await?;
        ensure!(rest.is_empty());
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "refused only after {:?}",
            started.elapsed()
        );
        ensure!(h.metrics.outcome_count(Outcome::UnknownDestination) == 2);
        ensure!(h.proxy.held(&web) == 0);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_held_while_backends_were_ready_wakes_the_service_when_they_go_away()
-> Result<()> {
    bounded(Duration::from_secs(20), async {
        let controller = TestController::start(0).await?;
        let h = Harness::start(ProxyConfig::new("node-a"), Some(controller.client())).await?;
        let web = svc("going-to-zero");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(15), 100));
        // A backend still listed as ready but already gone (its pod is stopping): the
        // connection is held without a wake-up, dialling it and backing off.
        let gone = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
        h.ready(&web, &[gone]);
        let client = tokio::spawn({
            let s = h.connect_as(dst).await?;
            async move { http_get(s, "/").await }
        });
        wait_until("the connection is held", Duration::from_secs(5), || {
            h.proxy.held(&web) == 1
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        ensure!(
            controller.requests.load(Ordering::SeqCst) == 0,
            "no wake-up while the Service still lists a ready backend"
        );
        // The scale to zero removes the endpoint: the held connection must ask for the
        // Service again itself, not wait for a heartbeat to carry its count.
        h.ready(&web, &[]);
        wait_until("a wake-up arrives", Duration::from_secs(5), || {
            controller.accepted.load(Ordering::SeqCst) == 1
        })
        .await?;
        let (backend, _) = http_backend().await?;
        h.ready(&web, &[backend]);
        let (status, _, _) = parse_response(&client.await??)?;
        ensure!(status == "HTTP/1.1 200 OK", "{status}");
        ensure!(controller.accepted.load(Ordering::SeqCst) == 1);
        Ok(())
    })
    .await
}
