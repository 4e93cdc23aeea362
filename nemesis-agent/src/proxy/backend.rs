//! Choosing and dialling a ready backend for a held connection: least-loaded by the
//! proxy's own open connections per backend, ties broken round robin, a backend that just
//! refused avoided when there is another. Never retries by itself (the hold loop does,
//! within the hold budget).

use socket2::{Domain, Protocol, Socket, Type};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

/// Pure choice: the least-loaded backend, not `avoid` unless it is the only one; among
/// equals the `tiebreak`-th, so that a burst spreads round robin.
pub(crate) fn choose(
    backends: &[SocketAddr],
    load: &HashMap<SocketAddr, usize>,
    avoid: Option<SocketAddr>,
    tiebreak: usize,
) -> Option<SocketAddr> {
    let candidates: Vec<SocketAddr> = if backends.len() > 1 && avoid.is_some() {
        backends
            .iter()
            .copied()
            .filter(|b| Some(*b) != avoid)
            .collect()
    } else {
        backends.to_vec()
    };
    let least = candidates
        .iter()
        .map(|b| load.get(b).copied().unwrap_or(0))
        .min()?;
    let best: Vec<SocketAddr> = candidates
        .into_iter()
        .filter(|b| load.get(b).copied().unwrap_or(0) == least)
        .collect();
    Some(best[tiebreak % best.len()])
}

/// A non-blocking connect to `addr` with Nagle off (small writes, a request or a
/// handshake, go out at once), then `first` sent if the connection is already up:
/// `Some(bytes sent)` when it is (for an empty `first`, when the peer is known), `None`
/// while the handshake is in flight. A refusal already known fails here.
fn start_connect(addr: SocketAddr, first: &[u8]) -> io::Result<(TcpStream, Option<usize>)> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let sent = if first.is_empty() {
        socket.peer_addr().ok().map(|_| 0)
    } else {
        // A socket still in SYN-SENT refuses a non-blocking send with EAGAIN; one the
        // peer refused reports the refusal.
        match socket.send(first) {
            Ok(n) => Some(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => return Err(e),
        }
    };
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    Ok((stream, sent))
}

/// Open proxied connections per backend.
#[derive(Debug, Default)]
pub(crate) struct BackendLoad {
    active: Mutex<HashMap<SocketAddr, usize>>,
    turn: AtomicUsize,
}

/// A connection counted against a backend until dropped.
#[derive(Debug)]
pub(crate) struct BackendLease {
    load: Arc<BackendLoad>,
    pub(crate) addr: SocketAddr,
}

impl Drop for BackendLease {
    fn drop(&mut self) {
        let mut active = self.load.active.lock().expect("backend load lock");
        if let Some(n) = active.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                active.remove(&self.addr);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("no ready backend")]
    NoBackend,
    #[error("connecting to backend {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("connecting to backend {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl ConnectError {
    pub(crate) fn addr(&self) -> Option<SocketAddr> {
        match self {
            ConnectError::NoBackend => None,
            ConnectError::Timeout { addr, .. } | ConnectError::Connect { addr, .. } => Some(*addr),
        }
    }
}

impl BackendLoad {
    /// Reserve the best backend now (so concurrent pickers see it loaded).
    fn lease(
        self: &Arc<Self>,
        backends: &[SocketAddr],
        avoid: Option<SocketAddr>,
    ) -> Option<BackendLease> {
        let mut active = self.active.lock().expect("backend load lock");
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let addr = choose(backends, &active, avoid, turn)?;
        *active.entry(addr).or_default() += 1;
        Some(BackendLease {
            load: self.clone(),
            addr,
        })
    }

    /// Dial the best backend once, within `timeout`, and send it `first` (what the
    /// client sent while held) right behind the connect; returns how much of `first` went.
    ///
    /// When the handshake completes inside connect(2), as it does for a backend on this
    /// node (loopback, a pod's veth: the kernel runs the peer's side in the same call),
    /// the bytes go out at once: the release of a burst of held connections then needs
    /// no driver turn to learn each socket is writable and no timer per dial. Otherwise
    /// the socket is awaited writable within `timeout` and nothing is sent yet.
    pub(crate) async fn connect(
        self: &Arc<Self>,
        backends: &[SocketAddr],
        avoid: Option<SocketAddr>,
        timeout: Duration,
        first: &[u8],
    ) -> Result<(TcpStream, BackendLease, usize), ConnectError> {
        let lease = self.lease(backends, avoid).ok_or(ConnectError::NoBackend)?;
        let addr = lease.addr;
        let failed = |source: io::Error| ConnectError::Connect { addr, source };
        let (stream, sent) = start_connect(addr, first).map_err(failed)?;
        if let Some(sent) = sent {
            return Ok((stream, lease, sent));
        }
        match tokio::time::timeout(timeout, stream.writable()).await {
            Err(_) => Err(ConnectError::Timeout {
                addr,
                after: timeout,
            }),
            Ok(Err(source)) => Err(failed(source)),
            Ok(Ok(())) => match stream.take_error() {
                Ok(None) => Ok((stream, lease, 0)),
                Ok(Some(source)) | Err(source) => Err(failed(source)),
            },
        }
    }

    #[cfg(test)]
    fn active(&self, addr: SocketAddr) -> usize {
        self.active.lock().unwrap().get(&addr).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 5], port))
    }

    #[test]
    fn least_loaded_wins_and_ties_rotate() {
        let backends = [a(1), a(2), a(3)];
        let load = HashMap::from([(a(1), 2), (a(2), 1), (a(3), 1)]);
        assert_eq!(choose(&backends, &load, None, 0), Some(a(2)));
        assert_eq!(choose(&backends, &load, None, 1), Some(a(3)));
        assert_eq!(choose(&backends, &load, None, 2), Some(a(2)));
    }

    #[test]
    fn a_refusing_backend_is_avoided_unless_it_is_the_only_one() {
        let load = HashMap::new();
        assert_eq!(choose(&[a(1), a(2)], &load, Some(a(1)), 0), Some(a(2)));
        assert_eq!(choose(&[a(1)], &load, Some(a(1)), 0), Some(a(1)));
        assert_eq!(choose(&[], &load, None, 0), None);
    }

    #[test]
    fn a_burst_spreads_evenly_and_leases_release_on_drop() {
        let load = Arc::new(BackendLoad::default());
        let backends = [a(1), a(2)];
        let leases: Vec<_> = (0..10)
            .map(|_| load.lease(&backends, None).unwrap())
            .collect();
        assert_eq!((load.active(a(1)), load.active(a(2))), (5, 5));
        drop(leases);
        assert_eq!((load.active(a(1)), load.active(a(2))), (0, 0));
    }

    #[tokio::test]
    async fn held_bytes_go_out_with_a_connect_that_completes_at_once() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let load = Arc::new(BackendLoad::default());
        let (mut stream, lease, sent) = load
            .connect(
                &[addr],
                None,
                Duration::from_secs(2),
                b"GET / HTTP/1.1\r\n\r\n",
            )
            .await
            .unwrap();
        // A loopback handshake completes inside connect(2): the bytes went with it.
        assert_eq!(sent, 18);
        assert_eq!((lease.addr, load.active(addr)), (addr, 1));
        let (mut peer, _) = listener.accept().await.unwrap();
        let mut got = [0u8; 18];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");
        // The stream goes on like any other.
        peer.write_all(b"ok").await.unwrap();
        let mut reply = [0u8; 2];
        stream.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"ok");
        drop(lease);
        assert_eq!(load.active(addr), 0);
    }

    #[tokio::test]
    async fn a_dial_without_held_bytes_sends_nothing() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let load = Arc::new(BackendLoad::default());
        let (stream, _lease, sent) = load
            .connect(&[addr], None, Duration::from_secs(2), b"")
            .await
            .unwrap();
        assert_eq!(sent, 0);
        let (mut peer, _) = listener.accept().await.unwrap();
        drop(stream);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "the backend got {got:?}");
    }

    #[tokio::test]
    async fn a_refusing_backend_fails_the_dial_and_frees_its_lease() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let load = Arc::new(BackendLoad::default());
        for first in [&b"hello"[..], b""] {
            match load
                .connect(&[addr], None, Duration::from_secs(2), first)
                .await
            {
                Err(ConnectError::Connect { addr: a, source }) => {
                    assert_eq!(a, addr);
                    assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
                }
                Err(other) => panic!("unexpected error: {other}"),
                Ok(_) => panic!("a closed port accepted the dial"),
            }
            assert_eq!(load.active(addr), 0);
        }
    }
}
