//! A forwarded connection that steps out of the proxy once it may: recognises an
//! HTTP/1.x or prior-knowledge HTTP/2 exchange from the client's first bytes, follows it
//! both ways (`http1`, `http2`), and when the drain signal asks, ends it where its
//! protocol makes that safe, so that the client's next request connects direct. TLS,
//! other protocols and whatever a follower gives up on are spliced untouched (`splice`),
//! as every forwarded connection was before. Never changes a byte of a connection it
//! does not end.

use super::drain::{DrainWatch, Want};
use super::http1::{self, Http1};
use super::http2::{self, Http2, PREFACE};
use super::refuse::close_cleanly;
use super::sniff::{MAX_REQUEST_LINE, Sniff, sniff};
use super::splice::{pump, shutdown_write, splice_bidirectional, write_all, write_all_then_eof};
use crate::metrics::{ProxyMetrics, StepOut};
use prometheus_client::metrics::counter::Counter;
use std::cell::RefCell;
use std::io;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Read per wake-up of a followed direction (the copy phase of `splice` reads as much).
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// The buffer a followed direction reads into, one per thread: the bytes are handed
    /// on before the next await, so no read holds it across one, and a released burst
    /// costs no 16 KiB allocation and free per read.
    static READ_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

/// One non-blocking read of `src` into this thread's buffer; `then` gets what was
/// read (empty: EOF). `WouldBlock` clears the readiness, as `try_read` does.
fn read_then<R>(src: &TcpStream, then: impl FnOnce(&[u8]) -> R) -> io::Result<R> {
    READ_BUFFER.with(|b| {
        let mut buf = b.borrow_mut();
        let n = src.try_read(&mut buf)?;
        Ok(then(&buf[..n]))
    })
}
/// Backend bytes kept while the client's first bytes do not tell the protocol yet (an
/// HTTP/2 server's SETTINGS can come first); a server that says more is not HTTP.
const MAX_EARLY_BACKEND: usize = 16 * 1024;

/// What the followed side of the connection came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Follow,
    /// Not followed (any more): the rest is spliced untouched.
    Plain,
    Done(StepOut),
}

/// The connection's protocol as far as it is known, and its follower.
#[derive(Debug)]
enum Follower {
    /// The client's first bytes do not tell yet; what each side sent so far.
    Detect {
        client: Vec<u8>,
        backend: Vec<u8>,
    },
    Http1(Http1),
    Http2(Http2),
    Plain(&'static str),
}

impl Follower {
    fn new() -> Self {
        Follower::Detect {
            client: Vec::new(),
            backend: Vec::new(),
        }
    }

    fn is_plain(&self) -> bool {
        match self {
            Follower::Plain(_) => true,
            Follower::Http1(h) => h.gave_up().is_some(),
            Follower::Http2(h) => h.gave_up().is_some(),
            Follower::Detect { .. } => false,
        }
    }

    /// Why the connection is spliced untouched, once it is.
    fn plain_because(&self) -> Option<&'static str> {
        match self {
            Follower::Plain(why) => Some(why),
            Follower::Http1(h) => h.gave_up(),
            Follower::Http2(h) => h.gave_up(),
            Follower::Detect { .. } => None,
        }
    }

    /// Client bytes on their way to the backend: appends to `out` what goes on.
    fn client_sent(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        match self {
            Follower::Http1(h) => {
                let n = h.client_sent(bytes);
                out.extend_from_slice(&bytes[..n]);
            }
            Follower::Http2(h) => h.client_sent(bytes, out),
            Follower::Plain(_) => out.extend_from_slice(bytes),
            Follower::Detect { client, backend } => {
                // Forwarded at once: a client waits for nothing before its first line.
                out.extend_from_slice(bytes);
                client.extend_from_slice(bytes);
                let (client, backend) = (std::mem::take(client), std::mem::take(backend));
                *self = Self::detect(client, backend);
            }
        }
    }

    /// Decides the protocol from what the client sent first, replaying it (and what
    /// the backend sent meanwhile) into the follower chosen.
    fn detect(client: Vec<u8>, backend: Vec<u8>) -> Follower {
        let n = client.len().min(PREFACE.len());
        if client[..n] == PREFACE[..n] {
            if client.len() < PREFACE.len() {
                return Follower::Detect { client, backend };
            }
            // Both already forwarded: only the frame boundaries matter here.
            let mut h = Http2::default();
            h.client_replayed(&client);
            h.backend_sent(&backend, Want::Stay, &mut Vec::new());
            return Follower::Http2(h);
        }
        match sniff(&client) {
            Sniff::NeedMore if client.len() < MAX_REQUEST_LINE => {
                Follower::Detect { client, backend }
            }
            Sniff::Http1 if backend.is_empty() => {
                let mut h = Http1::default();
                h.client_sent(&client);
                Follower::Http1(h)
            }
            Sniff::Http1 => Follower::Plain("the backend spoke before the request"),
            _ => Follower::Plain("not HTTP/1.x nor prior-knowledge HTTP/2"),
        }
    }

    /// Backend bytes on their way to the client: appends what to send to `out`.
    fn backend_sent(&mut self, bytes: &[u8], want: Want, out: &mut Vec<u8>) -> Step {
        match self {
            Follower::Http1(h) => http1_step(h.backend_sent(bytes, want, out)),
            Follower::Http2(h) => http2_step(h.backend_sent(bytes, want, out)),
            Follower::Plain(_) => {
                out.extend_from_slice(bytes);
                Step::Plain
            }
            Follower::Detect { backend, .. } => {
                out.extend_from_slice(bytes);
                backend.extend_from_slice(bytes);
                if backend.len() > MAX_EARLY_BACKEND {
                    *self = Follower::Plain("the backend spoke before the request");
                    return Step::Plain;
                }
                Step::Follow
            }
        }
    }

    /// Nothing new from the backend, but the signal or the client side changed; the
    /// connection has been `quiet` that long.
    fn poll(&mut self, want: Want, quiet: Duration, out: &mut Vec<u8>) -> Step {
        match self {
            Follower::Http1(h) => http1_step(h.poll(want, quiet, out)),
            Follower::Http2(h) => http2_step(h.poll(want, out)),
            Follower::Plain(_) => Step::Plain,
            Follower::Detect { .. } => Step::Follow,
        }
    }

    /// The backend closed: whatever was held back goes out as it is.
    fn backend_closed(&mut self, out: &mut Vec<u8>) {
        if let Follower::Http1(h) = self {
            h.give_up("the backend closed the connection");
            h.poll(Want::Stay, Duration::ZERO, out);
        }
    }
}

/// The protocol follower of a forwarded connection driven by hand, byte slices in and
/// out: what the fuzz target `proxy_sniff` (`fuzz/`) calls. [`relay`] drives the same
/// follower from the sockets.
#[derive(Debug)]
pub struct ProtocolFollower(Follower);

impl Default for ProtocolFollower {
    fn default() -> Self {
        Self(Follower::new())
    }
}

impl ProtocolFollower {
    /// Client bytes: what goes on to the backend.
    pub fn client_sent(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.0.client_sent(bytes, &mut out);
        out
    }

    /// Backend bytes: what goes on to the client, and what the connection came to.
    pub fn backend_sent(&mut self, bytes: &[u8], want: Want) -> (Vec<u8>, Step) {
        let mut out = Vec::new();
        let step = self.0.backend_sent(bytes, want, &mut out);
        (out, step)
    }

    /// Nothing new from the backend for `quiet`.
    pub fn poll(&mut self, want: Want, quiet: Duration) -> (Vec<u8>, Step) {
        let mut out = Vec::new();
        let step = self.0.poll(want, quiet, &mut out);
        (out, step)
    }

    /// The backend closed: what was held back goes to the client.
    pub fn backend_closed(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.0.backend_closed(&mut out);
        out
    }

    /// Why the connection is spliced untouched, once it is.
    pub fn plain_because(&self) -> Option<&'static str> {
        self.0.plain_because()
    }
}

fn http1_step(step: http1::Step) -> Step {
    match step {
        http1::Step::Follow => Step::Follow,
        http1::Step::GaveUp(_) => Step::Plain,
        http1::Step::Done(http1::Ending::ConnectionClose) => Step::Done(StepOut::ConnectionClose),
        http1::Step::Done(http1::Ending::IdleClose) => Step::Done(StepOut::IdleClose),
    }
}

fn http2_step(step: http2::Step) -> Step {
    match step {
        http2::Step::Follow => Step::Follow,
        http2::Step::GaveUp(_) => Step::Plain,
        http2::Step::Done => Step::Done(StepOut::Goaway),
    }
}

/// The follower, and when either side last sent a byte.
struct State {
    follower: Follower,
    active_at: Instant,
    /// The backend -> client direction ended at the backend's EOF (passed on to the
    /// client): once the client's EOF comes too, `relay` closes both sockets.
    backend_ended: bool,
}

/// What the two directions share.
struct Shared<'a> {
    state: Mutex<State>,
    /// Wakes the backend -> client direction when the client side changed something it
    /// may act on (a stream ended, the follower gave up).
    kick: Notify,
    client: &'a TcpStream,
    backend: &'a TcpStream,
}

impl Shared<'_> {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("relay state lock")
    }
}

/// Both directions of a forwarded connection until each side closes, or until it steps
/// out. `held` is what the client sent before the backend was dialled (already
/// delivered); with `client_done` the client half-closed after it.
#[allow(
    clippy::too_many_arguments,
    reason = "the parts of one forwarded connection"
)]
pub(crate) async fn relay(
    client: TcpStream,
    backend: TcpStream,
    held: &[u8],
    client_done: bool,
    drain: DrainWatch,
    metrics: &ProxyMetrics,
    counters: (&Counter, &Counter),
    linger: Duration,
) -> io::Result<()> {
    let (up_bytes, down_bytes) = counters;
    let mut follower = Follower::new();
    if !held.is_empty() {
        // Already delivered (the dial and `forward` sent it): followed only.
        follower.client_sent(held, &mut Vec::new());
    }
    if let Some(why) = follower.plain_because() {
        // Known from the held bytes alone (TLS, a binary protocol): nothing to follow.
        tracing::debug!(why, "forwarded connection spliced untouched");
        return splice_bidirectional(&client, &backend, client_done, up_bytes, down_bytes).await;
    }
    let shared = Shared {
        state: Mutex::new(State {
            follower,
            active_at: Instant::now(),
            backend_ended: false,
        }),
        kick: Notify::new(),
        client: &client,
        backend: &backend,
    };
    let ended = {
        let up = async {
            if client_done {
                Ok(())
            } else {
                upstream(&shared, &drain, up_bytes).await
            }
        };
        let down = downstream(&shared, drain.clone(), down_bytes);
        tokio::pin!(up, down);
        let mut up_over = false;
        loop {
            tokio::select! {
                r = &mut up, if !up_over => {
                    r?;
                    up_over = true;
                }
                r = &mut down => {
                    match r? {
                        Some(how) => break Some(how),
                        None if up_over => break None,
                        None => {
                            (&mut up).await?;
                            break None;
                        }
                    }
                }
            }
        }
    };
    let ended = {
        let state = shared.state();
        let f = &state.follower;
        if let Some(why) = f.plain_because() {
            tracing::debug!(why, "forwarded connection spliced untouched");
        }
        // An HTTP/2 client told to go usually closes by itself, before the final GOAWAY.
        match f {
            Follower::Http2(h) if ended.is_none() && h.announced() => {
                metrics.stepped_out(StepOut::Goaway);
                tracing::debug!("the HTTP/2 client left after the announced shutdown");
                None
            }
            _ => ended,
        }
    };
    drop(shared);
    if let Some(how) = ended {
        metrics.stepped_out(how);
        tracing::debug!(
            how = how.as_str(),
            "forwarded connection stepped out of the proxy"
        );
        // Both ends see a FIN; what either still sends is read and dropped (a closed
        // socket with unread bytes would answer with a reset).
        tokio::join!(
            close_cleanly(client, linger),
            close_cleanly(backend, linger)
        );
    }
    Ok(())
}

/// Client -> backend, followed until the follower is plain, then spliced.
async fn upstream(shared: &Shared<'_>, drain: &DrainWatch, bytes: &Counter) -> io::Result<()> {
    loop {
        if shared.state().follower.is_plain() {
            return pump(shared.client, shared.backend, bytes).await;
        }
        shared.client.readable().await?;
        let mut forward = Vec::new();
        let read = read_then(shared.client, |buf| {
            if buf.is_empty() {
                return None;
            }
            let mut state = shared.state();
            state.active_at = Instant::now();
            state.follower.client_sent(buf, &mut forward);
            Some(state.follower.is_plain() || drain.now() != Want::Stay)
        });
        let poke = match read {
            Ok(Some(poke)) => poke,
            Ok(None) if shared.state().backend_ended => {
                // Both directions are over and `relay` closes the backend socket next,
                // with nothing unread in it (its EOF was read): that close sends the
                // same FIN a shutdown would, so the shutdown is left out (one system
                // call less per exchange that ends this way: every released request
                // answered with `Connection: close`).
                return Ok(());
            }
            Ok(None) => return shutdown_write(shared.backend),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if poke {
            shared.kick.notify_one();
        }
        write_all(shared.backend, &forward).await?;
        bytes.inc_by(forward.len() as u64);
    }
}

/// Backend -> client, followed until the follower is plain (then spliced) or the
/// connection may step out (returns how).
async fn downstream(
    shared: &Shared<'_>,
    mut drain: DrainWatch,
    bytes: &Counter,
) -> io::Result<Option<StepOut>> {
    let mut out = Vec::new();
    loop {
        // Stopping, an idle HTTP/1 connection is closed once it has been quiet a while.
        let idle_close_at = {
            let state = shared.state();
            match &state.follower {
                Follower::Http1(h) if drain.now() == Want::Shutdown && h.idle() => {
                    Some(state.active_at + http1::IDLE_CLOSE_QUIET)
                }
                _ => None,
            }
        };
        let ready = tokio::select! {
            r = shared.backend.ready(Interest::READABLE) => Some(r?),
            () = drain.changed() => None,
            () = shared.kick.notified() => None,
            () = sleep_until(idle_close_at), if idle_close_at.is_some() => None,
        };
        let want = drain.now();
        // The backend's FIN came with what is read now (as when it answers and closes):
        // the client gets it on the last segment of these bytes.
        let mut eof_follows = false;
        // ... and this read took all there was before it: the next read would only say
        // EOF. The close is handled now, without another wake-up and read(2) per
        // connection (a released burst ends thousands of exchanges this way).
        let mut eof_now = false;
        let step = if let Some(ready) = ready {
            let read = read_then(shared.backend, |buf| {
                if buf.is_empty() {
                    return None;
                }
                let mut state = shared.state();
                state.active_at = Instant::now();
                let step = state.follower.backend_sent(buf, want, &mut out);
                if step == Step::Follow && ready.is_read_closed() && buf.len() < READ_CHUNK {
                    // The FIN arrived before this read (read-closed readiness is never
                    // stale), so every byte before it was queued and has been read.
                    state.follower.backend_closed(&mut out);
                    eof_now = true;
                }
                Some(step)
            });
            match read {
                Ok(None) => {
                    shared.state().follower.backend_closed(&mut out);
                    write_all(shared.client, &out).await?;
                    bytes.inc_by(out.len() as u64);
                    shutdown_write(shared.client)?;
                    shared.state().backend_ended = true;
                    return Ok(None);
                }
                Ok(Some(step)) => {
                    eof_follows = ready.is_read_closed();
                    step
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        } else {
            let mut state = shared.state();
            let quiet = state.active_at.elapsed();
            state.follower.poll(want, quiet, &mut out)
        };
        if eof_now {
            write_all_then_eof(shared.client, &out).await?;
            bytes.inc_by(out.len() as u64);
            shutdown_write(shared.client)?;
            shared.state().backend_ended = true;
            return Ok(None);
        }
        if eof_follows {
            // Every way on from here writes, shuts down or closes the client next.
            write_all_then_eof(shared.client, &out).await?;
        } else {
            write_all(shared.client, &out).await?;
        }
        bytes.inc_by(out.len() as u64);
        out.clear();
        match step {
            Step::Follow => {}
            Step::Plain => {
                pump(shared.backend, shared.client, bytes).await?;
                return Ok(None);
            }
            Step::Done(how) => return Ok(Some(how)),
        }
    }
}

/// Sleeps until `at`, or forever without one (a disabled `select!` branch is still built).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_is_told_from_the_clients_first_bytes() {
        let mut f = Follower::new();
        f.client_sent(b"GET / HT", &mut Vec::new());
        assert!(matches!(f, Follower::Detect { .. }));
        f.client_sent(b"TP/1.1\r\n\r\n", &mut Vec::new());
        assert!(matches!(f, Follower::Http1(_)));

        let mut f = Follower::new();
        f.client_sent(&PREFACE[..10], &mut Vec::new());
        assert!(matches!(f, Follower::Detect { .. }));
        f.client_sent(&PREFACE[10..], &mut Vec::new());
        assert!(matches!(f, Follower::Http2(_)));

        for other in [
            &[0x16u8, 0x03, 0x01, 0x02, 0x00][..],
            b"PING\r\n",
            b"\0\0\0\x08",
        ] {
            let mut f = Follower::new();
            f.client_sent(other, &mut Vec::new());
            assert!(f.is_plain(), "{other:?}");
        }
    }

    #[test]
    fn a_server_that_speaks_first_is_not_followed_as_http1() {
        let mut f = Follower::new();
        let mut out = Vec::new();
        assert_eq!(
            f.backend_sent(b"220 smtp ready\r\n", Want::StepOut, &mut out),
            Step::Follow
        );
        assert_eq!(out, b"220 smtp ready\r\n", "passed on at once");
        f.client_sent(b"GET / HTTP/1.1\r\n\r\n", &mut Vec::new());
        assert_eq!(
            f.plain_because(),
            Some("the backend spoke before the request")
        );
    }

    #[test]
    fn an_h2_servers_settings_before_the_preface_are_replayed_into_the_follower() {
        let settings = [0u8, 0, 0, 0x4, 0, 0, 0, 0, 0];
        let mut f = Follower::new();
        let mut out = Vec::new();
        assert_eq!(
            f.backend_sent(&settings, Want::StepOut, &mut out),
            Step::Follow
        );
        let mut up = Vec::new();
        f.client_sent(PREFACE, &mut up);
        f.client_sent(&settings, &mut up);
        assert_eq!(up, [PREFACE, &settings].concat(), "forwarded once");
        let mut out = Vec::new();
        // No stream ever opened, the backend's SETTINGS seen: the shutdown starts.
        assert_eq!(
            f.poll(Want::StepOut, Duration::ZERO, &mut out),
            Step::Follow
        );
        assert_eq!(&out[..17], &http2::goaway(0x7fff_ffff));
    }
}
