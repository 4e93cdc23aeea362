//! The life of one accepted connection: recover its Service, admit it against the
//! bounds, hold it (buffering what the client sends, in order, up to a bound), then
//! forward it to a ready backend or refuse it with a counted outcome. Never drops client
//! bytes: past the bound it stops reading, and TCP pushes back on the client.

use super::Shared;
use super::backend::{BackendLease, ConnectError};
use super::drain::DrainWatch;
use super::hold::{Admission, HeldGuard};
use super::refuse::{Reason, close_cleanly, refuse};
use super::relay::relay;
use super::sleep_gate::GateWatch;
use super::sniff::{Sniff, sniff};
use super::splice::shutdown_write;
use super::table::ManagedPort;
use crate::endpoints::ServiceEndpoints;
use crate::metrics::{Direction, DirectionLabels, Outcome, OutcomeLabels, ProxyErrorKind};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

/// Read per wake-up of a held socket; the buffer grows only as bytes arrive, so an idle
/// held connection costs no buffer at all.
const READ_CHUNK: usize = 4096;

/// What the client sent while held.
struct HoldBuffer {
    data: Vec<u8>,
    limit: usize,
    /// The client half-closed after sending `data`.
    eof: bool,
}

enum ReadEvent {
    Data,
    Eof,
}

impl HoldBuffer {
    fn new(limit: usize) -> Self {
        Self {
            data: Vec::new(),
            limit,
            eof: false,
        }
    }

    fn wants_read(&self) -> bool {
        !self.eof && self.data.len() < self.limit
    }

    async fn read_from(&mut self, client: &TcpStream) -> io::Result<ReadEvent> {
        loop {
            client.readable().await?;
            let old = self.data.len();
            let room = (self.limit - old).min(READ_CHUNK);
            self.data.resize(old + room, 0);
            let res = client.try_read(&mut self.data[old..]);
            let n = *res.as_ref().unwrap_or(&0);
            self.data.truncate(old + n);
            match res {
                Ok(0) => return Ok(ReadEvent::Eof),
                Ok(_) => return Ok(ReadEvent::Data),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Readiness can be spurious (a fresh socket reports it once): give the
                    // chunk back, or every idle held connection would keep 4 KiB.
                    if old == 0 {
                        self.data = Vec::new();
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Counts the connection as open in the proxy's hands for as long as it lives.
struct OpenGuard(prometheus_client::metrics::gauge::Gauge);

impl OpenGuard {
    fn new(g: &prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub(crate) async fn handle(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr) {
    let destination = shared.destinations.lookup(peer);
    handle_to(shared, client, peer, destination).await
}

/// As [`handle`], with the destination the client dialled already known (`None`:
/// unknown, the connection is closed and counted).
pub(crate) async fn handle_to(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    destination: Option<SocketAddr>,
) {
    let _open = OpenGuard::new(&shared.metrics.open);
    let accepted = Instant::now();
    let Some(port) = destination.and_then(|d| shared.table.lookup(d)) else {
        tracing::debug!(%peer, ?destination, "no managed Service for this connection; closing");
        shared.metrics.outcome(Outcome::UnknownDestination);
        Box::pin(close_cleanly(client, shared.config.close_linger)).await;
        return;
    };
    // Small writes (a request, a handshake) go out at once; the proxy adds no Nagle delay.
    let _ = client.set_nodelay(true);
    let endpoints = shared.endpoints.subscribe(&port.service);
    // No wake-up for a Service being put to sleep (its gate closed) while its backends
    // are still listed: the controller sees the held connection in the agent's report
    // and gives the sleep up, or scales to zero, and the connection asks for the wake
    // once the backends are gone. A wake-up before that could make the controller wake
    // the Service at once and tell the agents to follow endpoints that still list the
    // pods it is stopping.
    let gate = shared.table.sleep_gates().watch(&port.service);
    let needs_wake = endpoints.borrow().is_empty();
    match shared
        .holds
        .admit(&port.service, port.bounds.max_held, needs_wake)
    {
        Admission::Refused(scope) => {
            tracing::info!(service = %port.service, %peer, ?scope, "held-connection bound reached; refusing");
            shared.metrics.outcome(Outcome::Overflow);
            shared
                .metrics
                .holds_refused
                .get_or_create(&(&port.service).into())
                .inc();
            Box::pin(refuse(
                client,
                Vec::new(),
                Reason::Overflow,
                port.bounds.retry_after,
                shared.config.sniff_timeout,
                shared.config.close_linger,
            ))
            .await;
        }
        Admission::Held {
            guard,
            start_wake,
            released,
        } => {
            if start_wake {
                tokio::spawn(super::wake::run_wake(shared.clone(), port.service.clone()));
            }
            let held = Held {
                guard,
                released,
                accepted,
                gate,
            };
            hold(shared, client, peer, port, endpoints, held).await;
        }
    }
}

/// A connection counted as held, with what it needs to know about its Service.
struct Held {
    guard: HeldGuard,
    /// Notified when the controller says no policy manages the Service.
    released: Arc<tokio::sync::Notify>,
    accepted: Instant,
    /// Closed while the controller puts the Service to sleep: its ready backends are
    /// the ones going away.
    gate: GateWatch,
}

async fn hold(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    port: Arc<ManagedPort>,
    mut endpoints: watch::Receiver<Arc<ServiceEndpoints>>,
    held: Held,
) {
    let Held {
        guard,
        released,
        accepted,
        mut gate,
    } = held;
    let deadline = accepted + port.bounds.hold_timeout;
    let mut buf = HoldBuffer::new(port.bounds.buffer_bytes);
    let mut failures = 0u32;
    let mut last_failed: Option<SocketAddr> = None;
    // `None`: dial as soon as there is a ready backend; `Some(t)`: backing off until t.
    let mut retry_at: Option<Instant> = None;
    let mut endpoints_open = true;
    // The Service's endpoints were empty at some point while this connection was held:
    // whatever is ready after that was woken, not left over from before a sleep.
    let mut seen_empty = false;
    loop {
        // While the Service is being put to sleep its ready backends are about to be
        // stopped: a connection sent there could be cut before it is answered. It waits
        // for the sleep to be given up or for the scale to zero (then for the wake).
        let closed = gate.closed();
        let empty = if closed && !seen_empty {
            // Marked seen while waiting: only a change can end the wait, and the backoff
            // below means nothing then.
            endpoints.borrow_and_update().is_empty()
        } else {
            endpoints.borrow().is_empty()
        };
        seen_empty |= empty;
        let gated = closed && !seen_empty;
        if !gated && retry_at.is_none_or(|t| Instant::now() >= t) {
            retry_at = None;
            let backends = endpoints
                .borrow_and_update()
                .backends(&port.port_name, port.target_port);
            if !backends.is_empty() {
                let budget = deadline
                    .saturating_duration_since(Instant::now())
                    .min(shared.config.connect_timeout);
                // Boxed, like the forwarding below: only the dialling connection pays.
                // What the client sent while held goes out with the connect.
                let dial = Box::pin(shared.backends.connect(
                    &backends,
                    last_failed,
                    budget,
                    &buf.data,
                ));
                match dial.await {
                    Ok((backend, lease, sent)) => {
                        // Boxed: the splice state is not carried by every held connection.
                        let drain = shared.table.drain().watch(&port.service);
                        Box::pin(forward(
                            &shared,
                            &port.service,
                            client,
                            Dialled {
                                backend,
                                lease,
                                sent,
                            },
                            buf,
                            Released {
                                guard,
                                accepted,
                                drain,
                            },
                        ))
                        .await;
                        return;
                    }
                    Err(err) => {
                        failures += 1;
                        last_failed = err.addr();
                        match &err {
                            ConnectError::NoBackend => {}
                            ConnectError::Timeout { .. } => shared
                                .metrics
                                .error(&port.service, ProxyErrorKind::ConnectTimeout),
                            ConnectError::Connect { .. } => shared
                                .metrics
                                .error(&port.service, ProxyErrorKind::ConnectFailed),
                        }
                        tracing::debug!(service = %port.service, %err, failures, "backend not accepting; retrying");
                        retry_at =
                            Some(Instant::now() + shared.config.connect_backoff.delay(failures));
                    }
                }
            }
        }
        // Held while the Service had backends (no flight then), and now it has none: the
        // Service is going to zero under this connection, which must wake it again
        // rather than wait for the controller to see the held count in a heartbeat.
        if endpoints.borrow().is_empty() && shared.holds.claim_wake(&port.service) {
            tokio::spawn(super::wake::run_wake(shared.clone(), port.service.clone()));
        }
        let wake_at = retry_at.map_or(deadline, |t| t.min(deadline));
        tokio::select! {
            () = gate.changed() => {
                // The sleep given up: the backends are staying, dial at once.
                retry_at = None;
            }
            changed = endpoints.changed(), if endpoints_open => {
                if changed.is_ok() {
                    // New backends: dial at once, whatever the backoff said.
                    retry_at = None;
                } else {
                    // The registry is gone: no more changes will come (and a closed
                    // channel must not be polled again in a loop).
                    endpoints_open = false;
                }
            }
            read = buf.read_from(&client), if buf.wants_read() => match read {
                Ok(ReadEvent::Data) => {}
                Ok(ReadEvent::Eof) => {
                    // Nothing sent, or an HTTP/1 request (whose clients never half-close
                    // to wait for an answer): the client gave up. Otherwise a half-close
                    // after a complete message: keep holding, deliver, propagate the EOF.
                    if buf.data.is_empty() || sniff(&buf.data) == Sniff::Http1 {
                        end_held(&shared, Outcome::ClientGone, accepted);
                        tracing::debug!(service = %port.service, %peer, "client gave up while held");
                        return;
                    }
                    buf.eof = true;
                }
                Err(err) => {
                    end_held(&shared, Outcome::ClientGone, accepted);
                    tracing::debug!(service = %port.service, %peer, %err, "client failed while held");
                    return;
                }
            },
            _ = released.notified() => {
                end_held(&shared, Outcome::UnknownDestination, accepted);
                drop(guard);
                tracing::info!(service = %port.service, %peer, "no policy manages the Service; refusing");
                Box::pin(refuse(
                    client,
                    buf.data,
                    Reason::NotManaged,
                    port.bounds.retry_after,
                    shared.config.sniff_timeout,
                    shared.config.close_linger,
                ))
                .await;
                return;
            }
            _ = tokio::time::sleep_until(wake_at) => {
                if Instant::now() >= deadline {
                    let (outcome, reason) = if failures > 0 {
                        (Outcome::BackendFailed, Reason::BackendFailed)
                    } else {
                        (Outcome::Timeout, Reason::Timeout)
                    };
                    end_held(&shared, outcome, accepted);
                    drop(guard);
                    tracing::info!(service = %port.service, %peer, outcome = outcome.as_str(), "hold budget spent; refusing");
                    Box::pin(refuse(client, buf.data, reason, port.bounds.retry_after, Duration::ZERO, shared.config.close_linger)).await;
                    return;
                }
            }
        }
    }
}

fn end_held(shared: &Shared, outcome: Outcome, accepted: Instant) {
    shared.metrics.outcome(outcome);
    shared
        .metrics
        .hold_duration
        .get_or_create(&OutcomeLabels { outcome })
        .observe(accepted.elapsed().as_secs_f64());
}

/// A backend connection, with how much of the held bytes went out with its connect.
struct Dialled {
    backend: TcpStream,
    lease: BackendLease,
    sent: usize,
}

/// What a held connection hands over once it is forwarded.
struct Released {
    guard: HeldGuard,
    accepted: Instant,
    /// When the forwarded connection should step out of the proxy.
    drain: DrainWatch,
}

async fn forward(
    shared: &Shared,
    service: &nemesis_common::wire::ServiceRef,
    client: TcpStream,
    dialled: Dialled,
    buf: HoldBuffer,
    released: Released,
) {
    let Dialled {
        mut backend,
        lease,
        sent,
    } = dialled;
    let Released {
        guard,
        accepted,
        drain,
    } = released;
    end_held(shared, Outcome::Forwarded, accepted);
    drop(guard);
    let up = shared
        .metrics
        .bytes
        .get_or_create(&DirectionLabels {
            direction: Direction::ClientToBackend,
        })
        .clone();
    let down = shared
        .metrics
        .bytes
        .get_or_create(&DirectionLabels {
            direction: Direction::BackendToClient,
        })
        .clone();
    // What the client sent while held goes first, in order (the connect sent `sent`).
    if sent < buf.data.len()
        && let Err(err) = backend.write_all(&buf.data[sent..]).await
    {
        tracing::debug!(backend = %lease.addr, %err, "delivering the held bytes failed");
        shared.metrics.error(service, ProxyErrorKind::of_io(&err));
        return;
    }
    up.inc_by(buf.data.len() as u64);
    let client_done = buf.eof;
    if client_done && let Err(err) = shutdown_write(&backend) {
        tracing::debug!(backend = %lease.addr, %err, "propagating the client's half-close failed");
        shared.metrics.error(service, ProxyErrorKind::of_io(&err));
        return;
    }
    let backend_addr = lease.addr;
    if let Err(err) = relay(
        client,
        backend,
        &buf.data,
        client_done,
        drain,
        &shared.metrics,
        (&up, &down),
        shared.config.close_linger,
    )
    .await
    {
        tracing::debug!(backend = %backend_addr, %err, "forwarded connection ended with an error");
        shared.metrics.error(service, ProxyErrorKind::of_io(&err));
    }
    drop(lease);
}
