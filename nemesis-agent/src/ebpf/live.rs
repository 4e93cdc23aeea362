//! The kernel's own list of counted sockets that are still open, in every network
//! namespace of the node: client sockets that carry a SOCK_LIVE marker (found by the
//! `live_sockets` iterator) and accepted sockets on a server port (found in the
//! kernel's connection table through sock_diag, by their local address and port), and
//! the reconcile that brings the open-connection counters back to it. The counters are
//! cheap and immediate but can drift (a tracking record evicted before its close was
//! seen, a close while no program was attached, a server port moved while its
//! connections were open); the walk cannot: the kernel frees a socket's storage with
//! the socket, and its table holds exactly the open ones. Owns the walk and the
//! correction arithmetic; never changes a counter itself.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use nix::sched::{CloneFlags, setns};

use nemesis_common::maps::{LIVE_CLIENT, LiveSock};

use super::Slot;
use super::sockdiag::{self, Conn};
use super::sys;

/// What makes an open connection a counted server-side one, as SERVER_PORTS and
/// HOST_ADDRS say now: its local (address, port) is a backend's server port, and its
/// peer is not the node itself (see `on_accepted` in nemesis-ebpf).
#[derive(Debug, Clone, Default)]
pub struct ServerIndex {
    /// (address as 16 bytes, port in host order) -> (slot, epoch).
    pub ports: HashMap<([u8; 16], u16), (Slot, u32)>,
    /// The node's own addresses.
    pub hosts: HashSet<[u8; 16]>,
}

impl ServerIndex {
    /// Adds the server-side connections among `conns` to `out`.
    pub fn count(&self, conns: &[Conn], out: &mut HashMap<(Slot, u32), LiveCount>) {
        for c in conns {
            if let Some(k) = self.ports.get(&(c.local, c.local_port))
                && !self.hosts.contains(&c.remote)
            {
                out.entry(*k).or_default().server += 1;
            }
        }
    }
}

/// Open sockets per slot as the walk found them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveCount {
    pub client: u64,
    pub server: u64,
}

/// The `live_sockets` iterator link: each [`LiveIter::walk`] reads every live marker of
/// every network namespace on the node.
#[derive(Debug)]
pub struct LiveIter {
    link: OwnedFd,
}

impl LiveIter {
    pub fn new(link: OwnedFd) -> Self {
        Self { link }
    }

    /// Every counted socket open now, as counts per (slot, epoch): client sockets by
    /// their live markers, server sockets by `servers`. A TCP socket iterator and a
    /// sock_diag socket both see the namespace of the thread that opens them, so each
    /// namespace is walked from a thread that joined it: clients and backend pods live
    /// in namespaces of their own.
    pub fn walk(&self, servers: &ServerIndex) -> std::io::Result<HashMap<(Slot, u32), LiveCount>> {
        let mut bytes = Vec::new();
        let mut conns = Vec::new();
        let want_conns = !servers.ports.is_empty();
        for ns in network_namespaces() {
            let link = self.link.as_fd();
            let walked = std::thread::scope(|s| {
                s.spawn(move || -> std::io::Result<Option<(Vec<u8>, Vec<Conn>)>> {
                    // This thread only: it ends after the walk. A namespace that went
                    // away meanwhile has no live sockets left.
                    if setns(&ns, CloneFlags::CLONE_NEWNET).is_err() {
                        return Ok(None);
                    }
                    let fd = sys::iter_create(link)?;
                    let mut out = Vec::new();
                    File::from(fd).read_to_end(&mut out)?;
                    let conns = if want_conns {
                        sockdiag::open_connections()?
                    } else {
                        vec![]
                    };
                    Ok(Some((out, conns)))
                })
                .join()
            });
            // Any other failure fails the walk: a namespace read as empty would bring
            // its counts down under live traffic (and a Service to sleep).
            match walked {
                Ok(Ok(Some((b, c)))) => {
                    bytes.extend_from_slice(&b);
                    conns.extend(c);
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(std::io::Error::other("the namespace walker panicked")),
            }
        }
        let mut out = count(&bytes);
        servers.count(&conns, &mut out);
        Ok(out)
    }
}

/// One open file of each network namespace some process on the node is in (found
/// through /proc; needs the host's PID namespace to see the pods).
fn network_namespaces() -> Vec<File> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let own = std::iter::once("self".to_string());
    let pids = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()));
    for pid in own.chain(pids) {
        let Ok(f) = File::open(format!("/proc/{pid}/ns/net")) else {
            continue; // gone, or a kernel thread
        };
        let Ok(meta) = f.metadata() else { continue };
        if seen.insert((meta.dev(), meta.ino())) {
            out.push(f);
        }
    }
    out
}

/// Sums the client records the iterator wrote. Server-side markers (older agents'
/// programs wrote them) are not counted: those sockets are found by their server port
/// like every other accepted one. A trailing partial record (none is ever written) is
/// ignored.
pub fn count(bytes: &[u8]) -> HashMap<(Slot, u32), LiveCount> {
    let size = std::mem::size_of::<LiveSock>();
    let mut out: HashMap<(Slot, u32), LiveCount> = HashMap::new();
    for rec in bytes.chunks_exact(size) {
        let word = |i: usize| u32::from_ne_bytes([rec[i], rec[i + 1], rec[i + 2], rec[i + 3]]);
        let (slot, epoch, side) = (word(0), word(4), word(8));
        if side == LIVE_CLIENT {
            out.entry((slot, epoch)).or_default().client += 1;
        }
    }
    out
}

/// One side's open count: monotonic opened/closed totals plus the correction the
/// reconcile keeps for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SideCount {
    pub opened: u64,
    pub closed: u64,
}

impl SideCount {
    /// Open now by the counters alone (may be off by a missed close).
    pub fn raw_open(&self) -> i64 {
        self.opened as i64 - self.closed as i64
    }
}

/// The offset that makes `raw + offset == truth` for one side of one slot, if a
/// correction is due: the counters did not move while the two walks ran (so neither a
/// walk nor the counters caught a connection half-way) and both walks agree. `None`:
/// nothing to change, or not safe to tell this time (the next reconcile looks again).
pub fn correction(
    before: SideCount,
    after: SideCount,
    first_walk: u64,
    second_walk: u64,
    offset: i64,
) -> Option<i64> {
    if before != after || first_walk != second_walk {
        return None;
    }
    let wanted = second_walk as i64 - after.raw_open();
    (wanted != offset).then_some(wanted)
}

/// Open now: the counters plus their correction, never below zero.
pub fn corrected_open(side: SideCount, offset: i64) -> u64 {
    (side.raw_open() + offset).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use nemesis_common::maps::LIVE_SERVER;

    fn side(opened: u64, closed: u64) -> SideCount {
        SideCount { opened, closed }
    }

    #[test]
    fn client_records_are_summed_per_slot_epoch_and_server_markers_left_to_the_table() {
        let mut bytes = vec![];
        for (slot, epoch, side) in [
            (1, 7, LIVE_CLIENT),
            (1, 7, LIVE_SERVER),
            (1, 7, LIVE_SERVER),
            (2, 9, LIVE_CLIENT),
        ] {
            for w in [slot, epoch, side, 0u32] {
                bytes.extend_from_slice(&w.to_ne_bytes());
            }
        }
        bytes.extend_from_slice(&[1, 2, 3]); // a partial record is ignored
        let c = count(&bytes);
        assert_eq!(
            c[&(1, 7)],
            LiveCount {
                client: 1,
                server: 0
            }
        );
        assert_eq!(
            c[&(2, 9)],
            LiveCount {
                client: 1,
                server: 0
            }
        );
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn server_connections_count_by_their_port_unless_the_node_itself_called() {
        let ip = |last: u8| {
            let mut a = [0u8; 16];
            a[10] = 0xff;
            a[11] = 0xff;
            a[12..].copy_from_slice(&[198, 18, 0, last]);
            a
        };
        let mut idx = ServerIndex::default();
        idx.ports.insert((ip(5), 80), (3, 11));
        idx.ports.insert((ip(6), 80), (4, 12));
        idx.hosts.insert(ip(1));
        let conn = |local, local_port, remote| Conn {
            local: ip(local),
            local_port,
            remote: ip(remote),
        };
        let conns = [
            conn(5, 80, 9),
            conn(5, 80, 10),
            conn(5, 80, 1),    // the kubelet's probe
            conn(5, 8080, 9),  // another port of the pod
            conn(9, 41000, 5), // the client's end of a connection to it
            conn(6, 80, 9),
        ];
        let mut out = count(&[]);
        out.insert(
            (3, 11),
            LiveCount {
                client: 7,
                server: 0,
            },
        );
        idx.count(&conns, &mut out);
        assert_eq!(
            out[&(3, 11)],
            LiveCount {
                client: 7,
                server: 2
            }
        );
        assert_eq!(
            out[&(4, 12)],
            LiveCount {
                client: 0,
                server: 1
            }
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn a_missed_close_is_corrected_once_and_only_when_quiet() {
        // 10 opened, 4 closes seen, but only 1 socket is really open: 5 closes missed.
        let s = side(10, 4);
        assert_eq!(correction(s, s, 1, 1, 0), Some(-5));
        assert_eq!(corrected_open(s, -5), 1);
        // Already corrected: nothing to do.
        assert_eq!(correction(s, s, 1, 1, -5), None);
        // Counters moved during the walks, or the walks disagree: not this time.
        assert_eq!(correction(s, side(11, 4), 1, 1, 0), None);
        assert_eq!(correction(s, s, 1, 2, 0), None);
    }

    #[test]
    fn a_correction_follows_the_truth_both_ways_and_never_goes_negative() {
        let s = side(3, 3);
        // A socket the counters never saw open (its open raced a program swap).
        assert_eq!(correction(s, s, 2, 2, 0), Some(2));
        assert_eq!(corrected_open(s, 2), 2);
        assert_eq!(corrected_open(side(0, 5), 0), 0);
    }
}
