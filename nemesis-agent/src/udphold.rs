//! The UDP hold relay: one UDP socket per held Service port (its port goes into the
//! datapath's UDP_HOLD, so the eBPF `sendmsg`/`connect` hooks send the Service's
//! datagrams here while it has no ready backend). It keeps the first datagrams of each
//! flow (a flow is a client address), bounded in count and bytes per flow and overall
//! (beyond: dropped and counted, as a full socket buffer would), asks for a wake, and
//! once a backend is ready sends them on and relays the replies back to the client from
//! this socket (whose address the client's `recvmsg` hook shows as the Service's).
//! Flows idle for longer than the idle timeout are forgotten.
//!
//! Owns the socket, the flow table and the relays; the decisions (admit, hold, drop,
//! expire) live in [`Flows`], apart from the I/O.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// How much the relay may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpHoldBounds {
    /// Datagrams held per flow until a backend is ready.
    pub per_flow_datagrams: usize,
    /// Bytes held per flow.
    pub per_flow_bytes: usize,
    /// Datagrams held over all flows.
    pub total_datagrams: usize,
    /// Bytes held over all flows.
    pub total_bytes: usize,
    /// A flow with no datagram from its client for this long is forgotten (a held one's
    /// datagrams are dropped, a forwarded one's relay stops).
    pub idle: Duration,
}

impl Default for UdpHoldBounds {
    /// A DNS exchange or a QUIC handshake's first flight fits; a flood does not.
    fn default() -> Self {
        Self {
            per_flow_datagrams: 8,
            per_flow_bytes: 64 * 1024,
            total_datagrams: 4096,
            total_bytes: 16 * 1024 * 1024,
            idle: Duration::from_secs(30),
        }
    }
}

/// What the relay needs from the rest of the agent: the wake path TCP holds use, and
/// the Service's ready backends.
pub trait UdpWake: Send + Sync + 'static {
    /// Asks for the Service to be woken. Called at a flow's first held datagram and
    /// again while datagrams stay held; the callee makes it single flight.
    fn wake(&self);
    /// A ready backend for a flow now, if there is one.
    fn backend(&self) -> Option<SocketAddr>;
}

/// Counters of a relay since it started, or of every relay sharing them.
#[derive(Debug, Default)]
pub struct UdpHoldStats {
    /// Datagrams taken into hold.
    pub held: AtomicU64,
    /// Datagrams sent to a backend (held ones and later ones of the flow).
    pub forwarded: AtomicU64,
    /// Replies relayed back to clients.
    pub replies: AtomicU64,
    /// Datagrams dropped because a bound was reached.
    pub dropped: AtomicU64,
    /// Flows seen.
    pub flows: AtomicU64,
}

/// What to do with a datagram from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Kept; `first` when it opened a new flow (ask for a wake).
    Held { first: bool },
    /// The flow is forwarding already: send it on.
    Forward,
    /// A bound was reached: dropped.
    Dropped,
}

struct Flow {
    held: Vec<Vec<u8>>,
    held_bytes: usize,
    last: Instant,
    /// The relay of a forwarding flow.
    upstream: Option<(Arc<UdpSocket>, JoinHandle<()>)>,
}

/// The flow table and its bounds: decisions only, no I/O.
pub struct Flows {
    bounds: UdpHoldBounds,
    flows: HashMap<SocketAddr, Flow>,
    total_datagrams: usize,
    total_bytes: usize,
}

impl Flows {
    pub fn new(bounds: UdpHoldBounds) -> Self {
        Self {
            bounds,
            flows: HashMap::new(),
            total_datagrams: 0,
            total_bytes: 0,
        }
    }

    /// Takes a client datagram: held (within the bounds), to be forwarded, or dropped.
    pub fn admit(&mut self, client: SocketAddr, data: &[u8], now: Instant) -> Admit {
        let b = self.bounds;
        let over_total = self.total_datagrams + 1 > b.total_datagrams
            || self.total_bytes + data.len() > b.total_bytes;
        let first = !self.flows.contains_key(&client);
        if first && over_total {
            return Admit::Dropped;
        }
        let flow = self.flows.entry(client).or_insert_with(|| Flow {
            held: Vec::new(),
            held_bytes: 0,
            last: now,
            upstream: None,
        });
        flow.last = now;
        if flow.upstream.is_some() {
            return Admit::Forward;
        }
        if over_total
            || flow.held.len() + 1 > b.per_flow_datagrams
            || flow.held_bytes + data.len() > b.per_flow_bytes
        {
            return Admit::Dropped;
        }
        flow.held.push(data.to_vec());
        flow.held_bytes += data.len();
        self.total_datagrams += 1;
        self.total_bytes += data.len();
        Admit::Held { first }
    }

    /// Whether any flow still waits for a backend.
    pub fn holding(&self) -> bool {
        self.flows.values().any(|f| f.upstream.is_none())
    }

    /// The held flows' clients and datagrams, taken out of hold (the caller starts
    /// their relays with [`Flows::forwarding`]).
    fn take_held(&mut self) -> Vec<(SocketAddr, Vec<Vec<u8>>)> {
        let mut out = vec![];
        for (client, f) in self.flows.iter_mut() {
            if f.upstream.is_none() {
                self.total_datagrams -= f.held.len();
                self.total_bytes -= f.held_bytes;
                f.held_bytes = 0;
                out.push((*client, std::mem::take(&mut f.held)));
            }
        }
        out
    }

    fn forwarding(&mut self, client: SocketAddr, upstream: Arc<UdpSocket>, relay: JoinHandle<()>) {
        if let Some(f) = self.flows.get_mut(&client) {
            f.upstream = Some((upstream, relay));
        } else {
            relay.abort();
        }
    }

    fn upstream(&self, client: &SocketAddr) -> Option<Arc<UdpSocket>> {
        self.flows
            .get(client)
            .and_then(|f| f.upstream.as_ref().map(|(u, _)| u.clone()))
    }

    /// Forgets flows idle since before `now - idle`; returns the held datagrams dropped.
    pub fn expire(&mut self, now: Instant) -> usize {
        let idle = self.bounds.idle;
        let mut dropped = 0;
        let (mut dg, mut by) = (0, 0);
        self.flows.retain(|_, f| {
            if now.duration_since(f.last) <= idle {
                return true;
            }
            dropped += f.held.len();
            dg += f.held.len();
            by += f.held_bytes;
            if let Some((_, relay)) = &f.upstream {
                relay.abort();
            }
            false
        });
        self.total_datagrams -= dg;
        self.total_bytes -= by;
        dropped
    }

    /// Flows known now.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

impl Drop for Flows {
    fn drop(&mut self) {
        for f in self.flows.values() {
            if let Some((_, relay)) = &f.upstream {
                relay.abort();
            }
        }
    }
}

/// One Service port's UDP hold socket and its relays. Dropping it stops everything.
pub struct UdpHoldRelay {
    local: SocketAddr,
    stats: Arc<UdpHoldStats>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for UdpHoldRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpHoldRelay")
            .field("local", &self.local)
            .finish()
    }
}

impl Drop for UdpHoldRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often held flows look for a ready backend, and how often a wake is asked again
/// while datagrams stay held.
const POLL: Duration = Duration::from_millis(50);
const WAKE_AGAIN: Duration = Duration::from_secs(2);

impl UdpHoldRelay {
    /// Binds `addr` (port 0: any) and serves it on the current tokio runtime.
    pub async fn bind(
        addr: SocketAddr,
        wake: Arc<dyn UdpWake>,
        bounds: UdpHoldBounds,
    ) -> io::Result<Self> {
        let socket = Arc::new(UdpSocket::bind(addr).await?);
        let local = socket.local_addr()?;
        let stats = Arc::new(UdpHoldStats::default());
        let task = tokio::spawn(serve(socket, wake, bounds, stats.clone()));
        Ok(Self { local, stats, task })
    }

    /// As [`UdpHoldRelay::bind`], from synchronous code running on a tokio runtime
    /// (the agent's Service watch binds relays as it writes the datapath rows),
    /// counting into `stats`, which relays may share (the agent's node-wide totals:
    /// a relay goes with its Service row, its counts must not).
    pub fn bind_now(
        addr: SocketAddr,
        wake: Arc<dyn UdpWake>,
        bounds: UdpHoldBounds,
        stats: Arc<UdpHoldStats>,
    ) -> io::Result<Self> {
        let std_socket = std::net::UdpSocket::bind(addr)?;
        std_socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(std_socket)?);
        let local = socket.local_addr()?;
        let task = tokio::spawn(serve(socket, wake, bounds, stats.clone()));
        Ok(Self { local, stats, task })
    }

    /// Where the relay listens (its port goes into UDP_HOLD).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Its counters (shared with other relays when bound with shared ones).
    pub fn stats(&self) -> &UdpHoldStats {
        &self.stats
    }
}

async fn serve(
    socket: Arc<UdpSocket>,
    wake: Arc<dyn UdpWake>,
    bounds: UdpHoldBounds,
    stats: Arc<UdpHoldStats>,
) {
    let flows = Arc::new(Mutex::new(Flows::new(bounds)));
    let mut buf = vec![0u8; 65_536];
    let mut tick = tokio::time::interval(POLL);
    let mut last_wake: Option<Instant> = None;
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let Ok((n, client)) = r else { continue };
                let data = &buf[..n];
                let admit = lock(&flows).admit(client, data, Instant::now());
                match admit {
                    Admit::Held { first } => {
                        stats.held.fetch_add(1, Ordering::Relaxed);
                        if first {
                            stats.flows.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%client, "UDP flow held");
                            wake.wake();
                            last_wake = Some(Instant::now());
                        }
                    }
                    Admit::Forward => {
                        let up = lock(&flows).upstream(&client);
                        if let Some(up) = up && up.send(data).await.is_ok() {
                            stats.forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Admit::Dropped => {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let expired = lock(&flows).expire(now);
                stats.dropped.fetch_add(expired as u64, Ordering::Relaxed);
                if !lock(&flows).holding() {
                    continue;
                }
                let Some(backend) = wake.backend() else {
                    if last_wake.is_none_or(|t| now.duration_since(t) >= WAKE_AGAIN) {
                        wake.wake();
                        last_wake = Some(now);
                    }
                    continue;
                };
                let held = lock(&flows).take_held();
                for (client, datagrams) in held {
                    match open_upstream(backend).await {
                        Ok(up) => {
                            for d in &datagrams {
                                if up.send(d).await.is_ok() {
                                    stats.forwarded.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            let relay = tokio::spawn(relay_replies(
                                up.clone(),
                                socket.clone(),
                                client,
                                bounds.idle,
                                stats.clone(),
                            ));
                            lock(&flows).forwarding(client, up, relay);
                        }
                        Err(error) => {
                            tracing::warn!(%backend, %error, "UDP hold: opening a socket to the backend failed");
                            stats.dropped.fetch_add(datagrams.len() as u64, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}

fn lock(f: &Mutex<Flows>) -> std::sync::MutexGuard<'_, Flows> {
    f.lock().unwrap_or_else(|e| e.into_inner())
}

/// A socket connected to `backend`, of its family.
async fn open_upstream(backend: SocketAddr) -> io::Result<Arc<UdpSocket>> {
    let bind: SocketAddr = if backend.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let up = UdpSocket::bind(bind).await?;
    up.connect(backend).await?;
    Ok(Arc::new(up))
}

/// Backend replies to the client, from the hold socket; ends after `idle` without one.
async fn relay_replies(
    up: Arc<UdpSocket>,
    hold: Arc<UdpSocket>,
    client: SocketAddr,
    idle: Duration,
    stats: Arc<UdpHoldStats>,
) {
    let mut buf = vec![0u8; 65_536];
    while let Ok(Ok(n)) = tokio::time::timeout(idle, up.recv(&mut buf)).await {
        if hold.send_to(&buf[..n], client).await.is_ok() {
            stats.replies.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn bounds() -> UdpHoldBounds {
        UdpHoldBounds {
            per_flow_datagrams: 2,
            per_flow_bytes: 100,
            total_datagrams: 3,
            total_bytes: 1000,
            idle: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_flow_holds_up_to_its_count_and_bytes_then_drops() {
        let mut f = Flows::new(bounds());
        let now = Instant::now();
        assert_eq!(f.admit(client(1), b"a", now), Admit::Held { first: true });
        assert_eq!(f.admit(client(1), b"b", now), Admit::Held { first: false });
        assert_eq!(f.admit(client(1), b"c", now), Admit::Dropped, "count bound");
        assert_eq!(
            f.admit(client(2), &[0; 101], now),
            Admit::Dropped,
            "bytes bound"
        );
        assert!(f.holding());
    }

    #[test]
    fn the_total_bounds_hold_over_all_flows_and_are_released_with_the_flows() {
        let mut f = Flows::new(bounds());
        let now = Instant::now();
        for p in 1..=3 {
            assert!(matches!(f.admit(client(p), b"x", now), Admit::Held { .. }));
        }
        assert_eq!(f.admit(client(4), b"x", now), Admit::Dropped, "total bound");
        let held = f.take_held();
        assert_eq!(held.len(), 3);
        assert!(matches!(f.admit(client(5), b"x", now), Admit::Held { .. }));
        // Idle flows go, and their held datagrams are counted as dropped.
        assert_eq!(f.expire(now + Duration::from_secs(11)), 1);
        assert!(f.is_empty());
        assert_eq!((f.total_datagrams, f.total_bytes), (0, 0));
    }
}
