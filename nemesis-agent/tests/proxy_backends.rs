//! Reaching backends: ready before listening, never listening, spreading a burst, port
//! mapping by name, and the datapath mode flip once a backend is ready.

mod proxy_support;

use anyhow::{Result, ensure};
use nemesis_agent::endpoints::ServiceEndpoints;
use nemesis_agent::metrics::Outcome;
use nemesis_agent::proxy::{ManagedPort, ModeFollower, ModeSink, ModeSinkError, ProxyConfig};
use nemesis_common::wire::{AppliedMode, Directive, ServiceDirective, ServiceRef};
use proxy_support::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};

/// A loopback port nobody listens on yet, that `listen_later` can take.
fn free_port() -> Result<(SocketAddr, socket2::Socket)> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let addr = s.local_addr()?.as_socket().expect("inet");
    // Bound, not listening: a connect to it is refused, and no one else can take it.
    Ok((addr, s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_ready_before_it_listens_is_retried_until_it_accepts() -> Result<()> {
    bounded(Duration::from_secs(15), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("web");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(10), 10));
        let (backend, reserved) = free_port()?;
        let client = tokio::spawn({
            let s = h.connect_as(dst).await?;
            async move { http_get(s, "/early").await }
        });
        h.ready(&web, &[backend]); // Ready, but the process is not listening yet.
        tokio::time::sleep(Duration::from_millis(700)).await;
        ensure!(
            !client.is_finished(),
            "the client was answered before the backend listened"
        );
        reserved.listen(128)?;
        reserved.set_nonblocking(true)?;
        let listener = TcpListener::from_std(reserved.into())?;
        http_backend_on(listener).await?;
        let (status, _, body) = parse_response(&client.await??)?;
        ensure!(
            status == "HTTP/1.1 200 OK" && body == "hello /early ",
            "{status} {body}"
        );
        ensure!(h.metrics.outcome_count(Outcome::Forwarded) == 1);
        ensure!(h.metrics.outcome_count(Outcome::BackendFailed) == 0);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_backend_is_skipped_for_a_listening_one() -> Result<()> {
    bounded(Duration::from_secs(10), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("web");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(10), 10));
        let (dead, _reserved) = free_port()?;
        let (live, served) = http_backend().await?;
        h.ready(&web, &[dead, live]);
        for i in 0..6 {
            let (status, _, _) =
                parse_response(&http_get(h.connect_as(dst).await?, &format!("/{i}")).await?)?;
            ensure!(status == "HTTP/1.1 200 OK", "{status}");
        }
        ensure!(served.load(Ordering::SeqCst) == 6);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_that_never_listen_end_the_hold_as_backend_failed() -> Result<()> {
    bounded(Duration::from_secs(10), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("web");
        let dst = h.manage(&web, 1, bounds(Duration::from_millis(800), 10));
        let (dead, _reserved) = free_port()?;
        h.ready(&web, &[dead]);
        let (status, _, body) = parse_response(&http_get(h.connect_as(dst).await?, "/").await?)?;
        ensure!(status == "HTTP/1.1 503 Service Unavailable", "{status}");
        ensure!(body.contains("did not accept"), "{body}");
        ensure!(h.metrics.outcome_count(Outcome::BackendFailed) == 1);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_held_connections_spreads_over_the_ready_backends() -> Result<()> {
    bounded(Duration::from_secs(15), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("web");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(10), 100));
        // Backends that hold each connection open until the client closes, so that
        // least-loaded sees every connection of the burst.
        let mut addrs = Vec::new();
        let mut counts = Vec::new();
        for _ in 0..3 {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(l.local_addr()?);
            let n = Arc::new(AtomicUsize::new(0));
            counts.push(n.clone());
            tokio::spawn(async move {
                let mut conns = Vec::new();
                while let Ok((c, _)) = l.accept().await {
                    n.fetch_add(1, Ordering::SeqCst);
                    conns.push(c);
                }
            });
        }
        let mut clients = Vec::new();
        for _ in 0..30 {
            clients.push(h.connect_as(dst).await?);
        }
        wait_until("30 held", Duration::from_secs(5), || {
            h.proxy.held(&web) == 30
        })
        .await?;
        h.ready(&web, &addrs);
        wait_until("30 forwarded", Duration::from_secs(5), || {
            counts
                .iter()
                .map(|c| c.load(Ordering::SeqCst))
                .sum::<usize>()
                == 30
        })
        .await?;
        let per: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        ensure!(per == vec![10, 10, 10], "spread {per:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_port_reaches_the_endpoint_port_of_the_same_name() -> Result<()> {
    bounded(Duration::from_secs(10), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("web");
        let grpc_dst = SocketAddr::from(([127, 96, 0, 9], 9090));
        h.table.upsert_service(
            &web,
            vec![(
                grpc_dst,
                ManagedPort {
                    service: web.clone(),
                    port_name: "grpc".into(),
                    target_port: None,
                    bounds: bounds(Duration::from_secs(5), 10),
                    balancing: Default::default(),
                },
            )],
        );
        let (http_addr, http_served) = http_backend().await?;
        let (grpc_addr, grpc_served) = http_backend().await?;
        h.endpoints.publish(
            &web,
            ServiceEndpoints::default()
                .with_port("http", [http_addr])
                .with_port("grpc", [grpc_addr]),
        );
        let (status, _, _) = parse_response(&http_get(h.connect_as(grpc_dst).await?, "/").await?)?;
        ensure!(status == "HTTP/1.1 200 OK");
        ensure!(grpc_served.load(Ordering::SeqCst) == 1 && http_served.load(Ordering::SeqCst) == 0);
        Ok(())
    })
    .await
}

/// Records the modes set, as the eBPF service table would apply them.
#[derive(Default)]
struct RecordingSink {
    calls: Mutex<Vec<(ServiceRef, bool)>>,
    fail_next: AtomicUsize,
}

impl ModeSink for RecordingSink {
    fn set_hold(&self, service: &ServiceRef, hold: bool) -> Result<AppliedMode, ModeSinkError> {
        if self.fail_next.load(Ordering::SeqCst) > 0 {
            self.fail_next.fetch_sub(1, Ordering::SeqCst);
            return Err(ModeSinkError("map update failed".into()));
        }
        self.calls.lock().unwrap().push((service.clone(), hold));
        Ok(if hold {
            AppliedMode::Hold
        } else {
            AppliedMode::Balance
        })
    }
}

impl RecordingSink {
    fn last(&self) -> Option<(ServiceRef, bool)> {
        self.calls.lock().unwrap().last().cloned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mode_flips_to_direct_when_ready_while_held_connections_drain_through_the_proxy()
-> Result<()> {
    bounded(Duration::from_secs(15), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("web");
        let sink = Arc::new(RecordingSink::default());
        sink.fail_next.store(1, Ordering::SeqCst);
        let modes = ModeFollower::new(h.table.clone(), h.endpoints.clone(), sink.clone());
        tokio::spawn(modes.clone().run());
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(10), 10));
        // The first attempt fails, the retry holds the Service.
        wait_until("the Service is held", Duration::from_secs(5), || {
            sink.last() == Some((web.clone(), true))
        })
        .await?;
        ensure!(modes.applied(&web) == Some((AppliedMode::Hold, 0)));

        // A long-lived held connection (a raw protocol) that spans the flip.
        let mut held = h.connect_as(dst).await?;
        tokio::io::AsyncWriteExt::write_all(&mut held, b"hello").await?;
        wait_until("1 held", Duration::from_secs(5), || h.proxy.held(&web) == 1).await?;
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let backend = l.local_addr()?;
        h.ready(&web, &[backend]);
        wait_until("the Service goes direct", Duration::from_secs(5), || {
            sink.last() == Some((web.clone(), false))
        })
        .await?;
        let (mut conn, _) = l.accept().await?;
        let mut got = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut conn, &mut got).await?;
        ensure!(&got == b"hello");
        tokio::io::AsyncWriteExt::write_all(&mut conn, b"world").await?;
        let mut back = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut held, &mut back).await?;
        ensure!(
            &back == b"world",
            "the held connection drains through the proxy after the flip"
        );

        // The controller asks to hold for a scale-down: held again though ready.
        modes.apply_directives(&[ServiceDirective {
            service: web.clone(),
            directive: Directive::Sleep,
            epoch: 4,
            hold_ports: vec![],
            after_zero: false,
        }]);
        wait_until("held for sleep", Duration::from_secs(5), || {
            modes.applied(&web) == Some((AppliedMode::Hold, 4))
        })
        .await?;
        // An older epoch changes nothing.
        modes.apply_directives(&[ServiceDirective {
            service: web.clone(),
            directive: Directive::Follow,
            epoch: 3,
            hold_ports: vec![],
            after_zero: false,
        }]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        ensure!(modes.applied(&web) == Some((AppliedMode::Hold, 4)));
        modes.apply_directives(&[ServiceDirective {
            service: web.clone(),
            directive: Directive::Follow,
            epoch: 5,
            hold_ports: vec![],
            after_zero: false,
        }]);
        wait_until("direct again", Duration::from_secs(5), || {
            modes.applied(&web) == Some((AppliedMode::Balance, 5))
        })
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_arriving_through_ipv4_loopback_from_any_local_port_is_recovered() -> Result<()>
{
    // The proxy looks the destination up by the accepted socket's peer address, which is
    // the client's own (address, port) on loopback.
    bounded(Duration::from_secs(10), async {
        let h = Harness::start(ProxyConfig::new("n"), None).await?;
        let web = svc("web");
        let dst = h.manage(&web, 1, bounds(Duration::from_secs(5), 10));
        let (backend, _) = http_backend().await?;
        h.ready(&web, &[backend]);
        let socket = TcpSocket::new_v4()?;
        socket.bind("127.0.0.2:0".parse()?)?;
        let local = socket.local_addr()?;
        h.destinations_insert(local, dst);
        let (status, _, _) = parse_response(&http_get(socket.connect(h.addr).await?, "/").await?)?;
        ensure!(status == "HTTP/1.1 200 OK");
        Ok(())
    })
    .await
}
