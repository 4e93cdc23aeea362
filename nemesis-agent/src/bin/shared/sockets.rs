//! The socket loops the connect benchmarks share (`bench-connect`, `bench-lb`): the same
//! listener and the same connect-and-reset loop, so their figures measure the same thing.
// Each benchmark compiles this module on its own and uses a part of it.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::socket::{setsockopt, sockopt::Linger};

/// Deep enough that a busy machine never fills the accept queue: with the default (128)
/// SYNs are dropped and a connect waits a whole 1 s retransmission.
const LISTEN_BACKLOG: i32 = 4096;
/// A connect that takes longer has met a dropped SYN or a broken rule, not a slow path.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A listener on `addr` (address reuse on, so a rerun can bind at once) with a deep
/// accept queue.
pub fn listen(addr: SocketAddr) -> Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    s.listen(LISTEN_BACKLOG)?;
    Ok(s.into())
}

/// Connects to `addr`, failing after [`CONNECT_TIMEOUT`].
pub fn connect(addr: SocketAddr) -> Result<TcpStream> {
    TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).with_context(|| format!("connect to {addr}"))
}

/// `n` times: connect, then close with RST (no TIME_WAIT, so the ephemeral ports last).
/// Returns the elapsed time.
pub fn connect_close(addr: SocketAddr, n: usize) -> Result<Duration> {
    let rst = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let start = Instant::now();
    for i in 0..n {
        let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .with_context(|| format!("connect {i} of {n} to {addr}"))?;
        setsockopt(&s, Linger, &rst).context("setting SO_LINGER {on, 0}")?;
        drop(s);
    }
    Ok(start.elapsed())
}
