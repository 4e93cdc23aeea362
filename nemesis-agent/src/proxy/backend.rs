//! Choosing and dialling a ready backend for a held connection: least-loaded by the
//! proxy's own open connections per backend, ties broken round robin, a backend that just
//! refused avoided when there is another. Never retries by itself (the hold loop does,
//! within the hold budget).

use std::collections::HashMap;
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

    /// Dial the best backend once, within `timeout`.
    pub(crate) async fn connect(
        self: &Arc<Self>,
        backends: &[SocketAddr],
        avoid: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<(TcpStream, BackendLease), ConnectError> {
        let lease = self.lease(backends, avoid).ok_or(ConnectError::NoBackend)?;
        let addr = lease.addr;
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => Err(ConnectError::Timeout {
                addr,
                after: timeout,
            }),
            Ok(Err(source)) => Err(ConnectError::Connect { addr, source }),
            Ok(Ok(stream)) => Ok((stream, lease)),
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
}
