//! The workload of `bench-lb`'s `lb_p99_ratio_vs_random`: backends of which one answers
//! five times slower than the others, and closed-loop clients on a mix of short and
//! long-lived connections that time each request. The backend half runs in the pod
//! process, the client half in the node's; neither knows which balancer sits between.
//!
//! Each backend serves one request at a time, first come first served, and takes
//! [`SERVICE_TIME`] per request ([`SLOW_FACTOR`] times that on the slow one): a backend
//! that answers slower is one with less capacity (an older node, a noisy neighbour, a
//! throttled CPU), so callers sent to it queue. The service is a sleep on a virtual
//! clock (each request finishes `SERVICE_TIME` after the later of its arrival and the
//! previous request's finish), so a backend's capacity is exact whatever the load of
//! the machine, and the benchmark spends no CPU pretending to work.
//!
//! Why a queue and not a fixed delay: with a fixed delay and unlimited concurrency no
//! balancer that counts open connections can move the p99. Equal open counts mean the
//! slow backend still gets 1/11 of the requests (its connections last five times
//! longer), far more than the 1% a p99 ignores, so both p99s would be the slow delay.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nemesis_common::stats::percentile_or_nan;

/// A fast backend's time per request: well above the wake-up jitter of a loaded
/// two-core machine (a few ms would swamp 0.1 ms), short enough for thousands of
/// requests in a few seconds.
pub const SERVICE_TIME: Duration = Duration::from_millis(2);
/// The slow backend takes this many times longer (issue 12: "one answers 5x slower").
pub const SLOW_FACTOR: u32 = 5;

/// The clients: how many of each kind and how they pace themselves.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    /// Clients that open a connection per request (connect, ask, close).
    pub short: usize,
    /// Clients that keep a connection for `long_requests` requests, then open another.
    pub long: usize,
    pub long_requests: usize,
    /// Mean pause between a client's requests (exponentially distributed, as
    /// independent users are): the backends are not saturated all the time.
    pub think: Duration,
}

/// Twelve short and six long-lived clients, each asking every 10 ms on average (5
/// fast service times): together about half of what the three backends can serve
/// when spread by their speed, more than the slow one can serve when each gets a third.
pub const MIX: Mix = Mix {
    short: 12,
    long: 6,
    long_requests: 50,
    think: Duration::from_millis(10),
};

/// A read or write that takes this long has met a stuck backend, not a slow one.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

// === the backends (pod side) ===

/// Serves `listener` for the backends at `addrs` (the pod's addresses, told apart by
/// each connection's local address); `addrs[slow]` is the slow one. Each request is
/// one byte; the answer is one byte, the index of the backend that served it. Returns
/// at once; the serving threads live as long as the process.
pub fn serve(listener: TcpListener, addrs: &[Ipv4Addr], slow: usize) {
    let queues: Vec<mpsc::Sender<Job>> = (0..addrs.len())
        .map(|i| {
            let per_request = if i == slow {
                SERVICE_TIME * SLOW_FACTOR
            } else {
                SERVICE_TIME
            };
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || worker(rx, per_request));
            tx
        })
        .collect();
    let addrs = addrs.to_vec();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let local = match s.local_addr() {
                Ok(SocketAddr::V4(a)) => *a.ip(),
                _ => continue,
            };
            let Some(index) = addrs.iter().position(|a| *a == local) else {
                continue;
            };
            let queue = queues[index].clone();
            std::thread::spawn(move || answer(s, index as u8, queue));
        }
    });
}

/// A request: when it arrived, and where to say it is done.
type Job = (Instant, mpsc::SyncSender<()>);

/// One backend's single server: requests in arrival order, each done `per_request`
/// after the later of its arrival and the previous one's end.
fn worker(jobs: mpsc::Receiver<Job>, per_request: Duration) {
    let mut free_at = Instant::now();
    for (arrived, done) in jobs {
        free_at = free_at.max(arrived) + per_request;
        if let Some(wait) = free_at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let _ = done.send(());
    }
}

/// One connection: each request byte queued at the backend, answered when served.
fn answer(mut s: TcpStream, index: u8, queue: mpsc::Sender<Job>) {
    let _ = s.set_nodelay(true);
    let mut request = [0u8; 1];
    while s.read_exact(&mut request).is_ok() {
        let (done, wait) = mpsc::sync_channel(1);
        if queue.send((Instant::now(), done)).is_err() || wait.recv().is_err() {
            return;
        }
        if s.write_all(&[index]).is_err() {
            return;
        }
    }
}

// === the clients (node side) ===

/// What the clients saw in one timed block.
#[derive(Debug, Default)]
pub struct Block {
    /// Request latencies in ms, from the connect (short) or the write (long) to the
    /// answer, past the block's warm-up.
    pub latencies_ms: Vec<f64>,
    /// Requests each backend answered, and connections that reached each, all block.
    pub requests: Vec<u64>,
    pub connections: Vec<u64>,
}

impl Block {
    /// Adds `other`'s requests to these.
    pub fn merge(&mut self, other: Block) {
        self.latencies_ms.extend(other.latencies_ms);
        for (into, from) in [
            (&mut self.requests, other.requests),
            (&mut self.connections, other.connections),
        ] {
            into.resize(into.len().max(from.len()), 0);
            for (i, n) in from.into_iter().enumerate() {
                into[i] += n;
            }
        }
    }

    /// Sorts the latencies, as [`Block::p99`] wants them.
    pub fn sort(&mut self) {
        self.latencies_ms.sort_by(f64::total_cmp);
    }

    /// The p99 latency in ms, of sorted latencies.
    pub fn p99(&self) -> f64 {
        percentile_or_nan(&self.latencies_ms, 99.0)
    }
}

/// Runs `mix` against `service` for `length`, timing requests after `warmup` (the
/// queues fill first). Every connection is closed with RST by the end, so the
/// balancer's open counts are back to zero.
pub fn run(service: SocketAddr, mix: Mix, length: Duration, warmup: Duration) -> Result<Block> {
    let start = Instant::now();
    let (timed, end) = (start + warmup, start + length);
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..mix.short + mix.long)
            .map(|i| {
                let per_connection = if i < mix.short { 1 } else { mix.long_requests };
                scope.spawn(move || client(service, per_connection, mix.think, timed, end))
            })
            .collect();
        let mut all = Block::default();
        for c in clients {
            match c.join() {
                Ok(block) => all.merge(block?),
                Err(_) => bail!("a client thread panicked"),
            }
        }
        Ok(all)
    })
}

/// One closed-loop client: connections of `per_connection` requests until `end`.
fn client(
    service: SocketAddr,
    per_connection: usize,
    think: Duration,
    timed: Instant,
    end: Instant,
) -> Result<Block> {
    let mut got = Block::default();
    while Instant::now() < end {
        pause(think);
        let connecting = Instant::now();
        let mut s = TcpStream::connect_timeout(&service, IO_TIMEOUT)
            .with_context(|| format!("connect to {service}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut first = true;
        for _ in 0..per_connection {
            let asked = if first {
                connecting
            } else {
                pause(think);
                if Instant::now() >= end {
                    break;
                }
                Instant::now()
            };
            s.write_all(&[1]).context("sending a request")?;
            let mut index = [0u8; 1];
            s.read_exact(&mut index).context("reading an answer")?;
            let ms = asked.elapsed().as_secs_f64() * 1000.0;
            if asked >= timed {
                got.latencies_ms.push(ms);
            }
            tally(&mut got.requests, index[0]);
            if first {
                tally(&mut got.connections, index[0]);
                first = false;
            }
        }
        reset(&s)?;
    }
    Ok(got)
}

/// One more for backend `i`.
fn tally(per_backend: &mut Vec<u64>, i: u8) {
    let i = usize::from(i);
    if per_backend.len() <= i {
        per_backend.resize(i + 1, 0);
    }
    per_backend[i] += 1;
}

/// An exponentially distributed pause of mean `mean`.
fn pause(mean: Duration) {
    let u: f64 = rand::random_range(f64::EPSILON..1.0);
    std::thread::sleep(mean.mul_f64(-u.ln()));
}

/// Closes with RST when dropped (no TIME_WAIT: the ephemeral ports last).
fn reset(s: &TcpStream) -> Result<()> {
    let rst = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &rst)
        .context("setting SO_LINGER {on, 0}")
}
