//! eBPF programs the agent attaches to a cgroup v2: `connect4`/`connect6` count connects
//! to managed services and, in hold mode, rewrite them to the agent's proxy, in balance
//! mode to a ready backend chosen by the Service's algorithm (p2c, least connections,
//! round robin, random; slow start and topology tiers), or the proxy when there is none; `sock_ops`
//! counts opened/closed TCP connections per service and per backend and remembers held
//! connections' original destinations; on the server side it counts the connections
//! that backend pods of managed services accept, whatever path they came by. The
//! `live_sockets` iterator writes out every counted client socket still open in a network
//! namespace, the truth the agent reconciles the counters against (the server side's
//! truth is the kernel's table of sockets on the server ports, read by the agent). `getpeername4`/`6`
//! show a balanced socket the Service address it dialled, not the backend's. UDP (connected
//! and unconnected sockets, `sendmsg`/`recvmsg`) lives in `udp`. Every path fails OPEN: on any error the connect goes on unchanged and an
//! ERRORS counter says so. Nothing here may ever deny a connect.
//!
//! Map layouts and names live in `nemesis_common::maps`; the statics below are named
//! exactly as its `pub const` names (a loader test checks that).
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so `AtomicU64::fetch_add` does not exist;
// the intrinsic lowers to the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod udp;

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, SO_MARK, SOL_SOCKET,
    },
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_getsockopt, bpf_ktime_get_ns,
        bpf_seq_write, bpf_setsockopt, bpf_sk_storage_get, bpf_skc_to_tcp_sock,
    },
    macros::{btf_map, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use nemesis_common::maps::{
    ALG_LEAST_CONNECTIONS, ALG_RANDOM, ALG_ROUND_ROBIN, BAL_BACKEND_COUNTED, BAL_CONNECTING,
    BAL_OPENED, Backend, BackendSet, BalancedSock, CONFIG_PROXY_V4, CONFIG_PROXY_V6, Config,
    ERR_BAD_SLOT, ERR_BALANCE_NOT_TCP, ERR_CB_FLAGS, ERR_DEADMAN_RELEASE, ERR_HOLD_NOT_TCP,
    ERR_LIVE_MARK, ERR_NO_PROXY, ERR_ORIG_DST_INSERT, ERR_SOCK_BACKEND_INSERT, ERR_SOCKETS_INSERT,
    ERROR_KINDS, LC_CANDIDATES, LIVE_CLIENT, LIVE_GONE, LIVE_SERVER, LiveSock, MAX_BACKEND_IDS,
    MAX_BACKENDS, MAX_HOST_ADDRS, MAX_ORIG_DST, MAX_SERVER_PORTS, MAX_SERVICES, MAX_SOCK_BACKENDS,
    MAX_SOCK_BAL, MAX_SOCKETS, MODE_BALANCE, MODE_HOLD, OrigDst, OrigDstKey, PROTO_TCP,
    PeerRewrite, SOCK_BALANCED, SOCK_HELD, SOCK_OPENED, SOCK_SERVER, SOCK_TRACKED, SPILL_FACTOR,
    SPILL_SLACK, ServiceKey, ServiceStats, ServiceValue, SlotRef, SockBackend, SockRecord,
    WEIGHT_FULL, WEIGHT_MIN,
};

/// Verdict of a cgroup sock_addr program that lets the connect() go on.
const ALLOW: i32 = 1;
/// Return value of a sock_ops program (ignored for the callbacks used here).
const SOCK_OPS_OK: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[map]
static SERVICES_V1: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
static SVC_STATS_V2: PerCpuArray<ServiceStats> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
#[map]
static SOCKETS_V1: LruHashMap<u64, SockRecord> = LruHashMap::with_max_entries(MAX_SOCKETS, 0);
#[map]
static ORIG_DST_V1: LruHashMap<OrigDstKey, OrigDst> = LruHashMap::with_max_entries(MAX_ORIG_DST, 0);
#[map]
static CONFIG_V1: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static HEARTBEAT_V1: Array<u64> = Array::with_max_entries(1, 0);
#[map]
static ERRORS_V1: PerCpuArray<u64> = PerCpuArray::with_max_entries(ERROR_KINDS, 0);
#[map]
static BACKENDS_V3: HashMap<u32, BackendSet> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);
#[map]
static BACKEND_TABLE_V1: Array<Backend> = Array::with_max_entries(MAX_BACKEND_IDS, 0);
#[map]
static BACKEND_CONNS_V2: Array<u64> = Array::with_max_entries(MAX_BACKEND_IDS, 0);
#[map]
static BACKEND_REMOTE_V1: Array<u64> = Array::with_max_entries(MAX_BACKEND_IDS, 0);
#[map]
static SOCK_BACKEND_V2: LruHashMap<u64, SockBackend> =
    LruHashMap::with_max_entries(MAX_SOCK_BACKENDS, 0);
#[map]
static BALANCE_RR_V2: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
#[map]
static SLOT_EPOCH_V1: Array<u32> = Array::with_max_entries(MAX_SERVICES, 0);
#[map]
static SERVER_PORTS_V1: HashMap<ServiceKey, SlotRef> =
    HashMap::with_max_entries(MAX_SERVER_PORTS, BPF_F_NO_PREALLOC);
#[map]
static HOST_ADDRS_V1: HashMap<[u8; 16], u32> = HashMap::with_max_entries(MAX_HOST_ADDRS, 0);
#[btf_map]
static SOCK_LIVE_V1: SkStorage<LiveSock> = SkStorage::new();
#[btf_map]
static SOCK_PEER_V1: SkStorage<PeerRewrite> = SkStorage::new();
#[btf_map]
static SOCK_BALANCED_V1: SkStorage<BalancedSock> = SkStorage::new();
#[map]
static SOCK_BAL_V1: HashMap<u64, BalancedSock> = HashMap::with_max_entries(MAX_SOCK_BAL, 0);

// === connect4 / connect6 ===

// One program per family for TCP and UDP alike, branching on the socket's protocol
// first: a connect runs one program, not a TCP one and a UDP one that skips it (every
// balanced TCP connect paid that second run: issue 12's lb_connect_overhead_ratio).
#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    if udp::is_udp(&ctx) {
        udp::connect4_udp(&ctx);
    } else {
        try_connect4(&ctx);
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    if udp::is_udp(&ctx) {
        udp::connect6_udp(&ctx);
    } else {
        try_connect6(&ctx);
    }
    ALLOW
}

/// The address family a connect is made in, as far as the service key goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    /// connect4.
    V4,
    /// connect6 to `::ffff:a.b.c.d`: IPv4 on the wire, from an IPv6 socket.
    V4Mapped,
    /// connect6 to a native IPv6 address.
    V6,
}

/// A rewrite target: address as four network-order words (as in `bpf_sock_addr`;
/// IPv4 in the last word), port as `user_port` holds it.
struct Target {
    words: [u32; 4],
    port: u32,
}

/// Word 2 of a v4-mapped address (`::ffff:0:0`) as it sits in memory.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[inline(always)]
fn addr_bytes(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: [u32; 4] and [u8; 16] have the same size; every byte pattern is valid.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

#[inline(always)]
fn addr_words(bytes: [u8; 16]) -> [u32; 4] {
    // SAFETY: as above.
    unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(bytes) }
}

fn try_connect4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid `bpf_sock_addr`; narrow field loads are what the
    // verifier accepts for this context.
    let (ip, port, proto) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
            read_volatile(addr_of!((*sa).protocol)),
        )
    };
    let words = [0, 0, V4_MAPPED_WORD, ip];
    if let Some(t) = on_connect(ctx, words, port, proto, Family::V4) {
        // SAFETY: user_ip4/user_port are writable in connect4; 4-byte stores.
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip4), t.words[3]);
            write_volatile(addr_of_mut!((*sa).user_port), t.port);
        }
    }
}

fn try_connect6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4; user_ip6 is read one 4-byte word at a time.
    let (words, port, proto) = unsafe {
        (
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ],
            read_volatile(addr_of!((*sa).user_port)),
            read_volatile(addr_of!((*sa).protocol)),
        )
    };
    let family = if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD {
        Family::V4Mapped
    } else {
        Family::V6
    };
    if let Some(t) = on_connect(ctx, words, port, proto, family) {
        // SAFETY: user_ip6 words and user_port are writable in connect6; 4-byte stores.
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), t.words[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), t.words[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), t.words[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), t.words[3]);
            write_volatile(addr_of_mut!((*sa).user_port), t.port);
        }
    }
}

/// Counts a connect if it goes to a managed service and decides whether it is
/// rewritten (`Some`: to the proxy, or to a backend in balance mode) or goes on
/// unchanged (`None`: passthrough, any failure).
#[inline(always)]
fn on_connect(
    ctx: &SockAddrContext,
    words: [u32; 4],
    port: u32,
    proto: u32,
    family: Family,
) -> Option<Target> {
    let key = ServiceKey {
        addr: addr_bytes(words),
        port: (port as u16).to_ne_bytes(),
        proto: proto as u8,
        _pad: 0,
    };
    // SAFETY: a copy is taken at once; a concurrent update at worst gives a stale mode.
    let svc = (unsafe { SERVICES_V1.get(key) }).copied()?; // not managed: not an error
    let Some(stats) = SVC_STATS_V2.get_ptr_mut(svc.slot) else {
        count_error(ERR_BAD_SLOT);
        return None;
    };
    // SAFETY: per-CPU value of this CPU; the program is not migrated while it runs.
    unsafe { (*stats).connects += 1 };

    // Balance mode with no ready backend holds, so a service at zero still wakes.
    let mut holding = svc.mode == MODE_HOLD;
    let mut chosen: Option<Chosen> = None;
    if svc.mode == MODE_BALANCE {
        if key.proto != PROTO_TCP {
            count_error(ERR_BALANCE_NOT_TCP);
        } else {
            chosen = pick_backend(svc.slot, family);
            holding = chosen.is_none();
        }
    }
    let target = match &chosen {
        Some(c) => Some(Target {
            words: c.target.words,
            port: c.target.port,
        }),
        None if holding => hold_target(ctx, key.proto, family, svc.slot),
        None => None,
    };
    let held = holding && target.is_some();
    if key.proto == PROTO_TCP
        && let Some(c) = &chosen
    {
        // A balanced socket's one record (see SOCK_BAL in `nemesis_common::maps`).
        if !remember_balanced(ctx, &key, &svc, c) {
            count_error(ERR_SOCK_BACKEND_INSERT);
            return None;
        }
        mark_for_skip(ctx);
    } else if key.proto == PROTO_TCP {
        let record = SockRecord {
            service: key,
            slot: svc.slot,
            epoch: svc.epoch,
            flags: if held { SOCK_HELD } else { 0 },
        };
        // SAFETY: the helper accepts this program type's context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if SOCKETS_V1.insert(cookie, record, BPF_ANY as u64).is_err() {
            count_error(ERR_SOCKETS_INSERT);
            // Without the record sock_ops cannot remember the original destination (the
            // proxy could not tell where the client was going) nor turn on the close
            // callback (a backend's count would never come down): let it through.
            if holding {
                // SAFETY: as above.
                unsafe { (*stats).released += 1 };
            }
            return None;
        }
    }
    if holding {
        // SAFETY: as above.
        unsafe {
            if held {
                (*stats).redirected += 1;
            } else {
                (*stats).released += 1;
            }
        }
    }
    if held {
        debug!(
            ctx,
            "nemesis: held connect to service slot {} sent to the proxy", svc.slot
        );
    }
    target
}

/// Writes a balanced socket's one record: the service slot it counts for, the backend it
/// was sent to, and what `getpeername` shows. False (the map is full) when it could
/// not: then the connect goes on unchanged, as its backend could not be counted.
///
/// One preallocated hash entry by cookie: neither two LRU entries and a storage element
/// (the older agents' way), nor a socket-storage element (two allocations here and two
/// RCU frees with the socket: most of issue 12's lb_connect_overhead_ratio).
#[inline(always)]
fn remember_balanced(
    ctx: &SockAddrContext,
    service: &ServiceKey,
    svc: &ServiceValue,
    c: &Chosen,
) -> bool {
    let rec = BalancedSock {
        peer: PeerRewrite {
            service_addr: service.addr,
            backend_addr: addr_bytes(c.target.words),
            service_port: service.port,
            backend_port: (c.target.port as u16).to_ne_bytes(),
        },
        slot: svc.slot,
        epoch: svc.epoch,
        backend: c.index,
        generation: c.generation,
        flags: 0,
    };
    // SAFETY: the helper accepts this program type's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // connect() runs the hook only on a closed socket: an entry already there is an
    // earlier connect's that never sent its SYN (it counted nothing): replace it.
    SOCK_BAL_V1.insert(cookie, rec, BPF_ANY as u64).is_ok()
}

/// Puts on a connected UDP socket (see `udp`) what it dialled and where it goes, for
/// `getpeername`. A failure (no memory) only leaves `getpeername` reporting the backend.
/// A balanced TCP socket keeps the same in its [`BalancedSock`] record.
#[inline(always)]
fn remember_peer(ctx: &SockAddrContext, service: &ServiceKey, target: &Target) {
    let mut rw = PeerRewrite {
        service_addr: service.addr,
        backend_addr: addr_bytes(target.words),
        service_port: service.port,
        backend_port: (target.port as u16).to_ne_bytes(),
    };
    // SAFETY: the context's socket; the value is copied in when created.
    let p = unsafe { SOCK_PEER_V1.get_or_insert_ptr_mut(ctx, Some(&mut rw)) };
    if p.is_null() {
        return;
    }
    // SAFETY: a non-null storage value of PeerRewrite's size; a reconnect of the same
    // socket overwrites it.
    unsafe { write_volatile(p, rw) };
}

/// Sets CONFIG's skip mark bit on a socket balance mode just sent to a backend, keeping
/// the bits the application set: the agent's kube-proxy skip rule lets exactly such
/// connects bypass kube-proxy's Service chains (they already go to a pod; kube-proxy
/// would walk its whole list and match nothing). Off (no helper call) while the mark
/// is 0. A failure only leaves the connect to walk kube-proxy's rules as before, which
/// is correct, only slower; it has no error kind of its own (a new one would change
/// ERRORS' size, which pinned maps of a running agent must keep).
#[inline(always)]
fn mark_for_skip(ctx: &SockAddrContext) {
    let Some(mark) = CONFIG_V1.get(0).map(|c| c.skip_mark) else {
        return;
    };
    if mark == 0 {
        return;
    }
    let mut current: u32 = 0;
    // SAFETY: the context's socket (locked by connect()); a 4-byte stack buffer.
    let got = unsafe {
        bpf_getsockopt(
            ctx.as_ptr(),
            SOL_SOCKET as i32,
            SO_MARK as i32,
            addr_of_mut!(current).cast(),
            4,
        )
    };
    if got != 0 || current & mark == mark {
        return;
    }
    let mut marked = current | mark;
    // SAFETY: as above.
    let _ = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_SOCKET as i32,
            SO_MARK as i32,
            addr_of_mut!(marked).cast(),
            4,
        )
    };
}

// === getpeername4 / getpeername6 ===

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, true);
    ALLOW
}

/// A balanced socket's peer is the backend the connect was sent to; the application
/// dialled the Service and is shown the Service (as kube-proxy's DNAT would). Only
/// while the peer is still that backend: a socket connected again elsewhere is left be.
#[inline(always)]
fn try_getpeername(ctx: &SockAddrContext, v6: bool) {
    // SAFETY: the helper accepts this program type's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the entry's peer is copied at once (only connect4/6 ever write it).
    let rw = if let Some(r) = unsafe { SOCK_BAL_V1.get(cookie) } {
        r.peer
    } else if let Some(p) = peer_of_older(ctx) {
        p
    } else {
        return;
    };
    rewrite_peer(ctx, v6, &rw);
}

/// What `getpeername` shows a socket an older agent's programs balanced (a SOCK_BALANCED
/// element, or before that a SOCK_PEER one).
#[inline(always)]
fn peer_of_older(ctx: &SockAddrContext) -> Option<PeerRewrite> {
    // SAFETY: the context's socket; without the create flag nothing is written.
    let b = unsafe { SOCK_BALANCED_V1.get_ptr_mut(ctx) };
    Some(if b.is_null() {
        // A socket an older agent's programs balanced keeps its SOCK_PEER entry.
        // SAFETY: as above.
        let p = unsafe { SOCK_PEER_V1.get_ptr_mut(ctx) };
        if p.is_null() {
            return None;
        }
        // SAFETY: a non-null storage value of PeerRewrite's size.
        unsafe { read_volatile(p) }
    } else {
        // SAFETY: a non-null storage value of BalancedSock's size.
        unsafe { read_volatile(addr_of!((*b).peer)) }
    })
}

/// Shows the Service `rw` says the socket dialled, if its peer is still the backend.
#[inline(always)]
fn rewrite_peer(ctx: &SockAddrContext, v6: bool, rw: &PeerRewrite) {
    let sa = ctx.sock_addr;
    let backend = addr_words(rw.backend_addr);
    let service = addr_words(rw.service_addr);
    // SAFETY: user_ip4/user_ip6/user_port are readable and writable in getpeername
    // programs; 4-byte loads and stores.
    unsafe {
        let port = read_volatile(addr_of!((*sa).user_port));
        if (port as u16).to_ne_bytes() != rw.backend_port {
            return;
        }
        let new_port = u16::from_ne_bytes(rw.service_port) as u32;
        if v6 {
            let now = [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ];
            if now != backend {
                return;
            }
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), service[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), service[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), service[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), service[3]);
        } else {
            if read_volatile(addr_of!((*sa).user_ip4)) != backend[3] {
                return;
            }
            write_volatile(addr_of_mut!((*sa).user_ip4), service[3]);
        }
        write_volatile(addr_of_mut!((*sa).user_port), new_port);
    }
}

/// `i & (len - 1)` for a power-of-two `len`, with the mask kept even where LLVM proves
/// it redundant (after `% n`): the verifier does not track bounds through `%` and needs
/// the mask to bound the offset into the set.
#[inline(always)]
fn masked(i: u32, len: u32) -> u32 {
    let mask = len - 1;
    // SAFETY: a volatile read of a local, only so LLVM cannot drop the `&`.
    i & unsafe { read_volatile(&mask) }
}

/// The backend id at position `pos` of the set's dense order.
///
/// # Safety
/// `set` points to a live map value.
#[inline(always)]
unsafe fn order_at(set: *const BackendSet, pos: u32) -> u32 {
    let pos = masked(pos, MAX_BACKENDS);
    // SAFETY: pos < MAX_BACKENDS by the mask; the order array has that many entries.
    (unsafe { read_volatile(addr_of!((*set).order).cast::<u16>().add(pos as usize)) }) as u32
}

/// Least-connections candidate `i` of the set: a position in its order.
///
/// # Safety
/// `set` points to a live map value.
#[inline(always)]
unsafe fn candidate_at(set: *const BackendSet, i: u32) -> u32 {
    let i = masked(i, LC_CANDIDATES);
    // SAFETY: i < LC_CANDIDATES by the mask; the array has that many entries.
    (unsafe { read_volatile(addr_of!((*set).candidates).cast::<u16>().add(i as usize)) }) as u32
}

/// A balance-mode choice: where the connect goes and which backend id it counts on.
struct Chosen {
    target: Target,
    index: u32,
    generation: u32,
}

/// A counter of BACKEND_CONNS or BACKEND_REMOTE. A plain aligned load of a counter
/// others add to atomically; a close racing an id's reuse may have taken it below
/// zero (huge): count it as 0.
#[inline(always)]
fn counter(p: Option<*const u64>) -> u64 {
    match p {
        // SAFETY: an aligned u64 inside an array map value.
        Some(p) => {
            let v = unsafe { read_volatile(p) };
            if v > (1u64 << 40) { 0 } else { v }
        }
        None => 0,
    }
}

/// A candidate's load as the algorithms compare it: open connections from every node
/// (this node's counted at once, the others' as the agent last wrote them) divided by
/// its slow-start weight, in thousandths of a connection. Idle backends tie at zero
/// (the random first pick wins, and a warming one is then taken with a probability of
/// its weight); loaded ones settle where a warming backend carries its weight's share.
#[inline(always)]
fn weighted_load(id: u32, now: u64, window: u64) -> u64 {
    let conns = counter(BACKEND_CONNS_V2.get_ptr(id)) + counter(BACKEND_REMOTE_V1.get_ptr(id));
    let w = weight(id, now, window);
    // A full weight (no slow start, or past it: the common case) divides exactly:
    // spare the division.
    if w == WEIGHT_FULL {
        return conns * WEIGHT_FULL;
    }
    div(conns * WEIGHT_FULL * WEIGHT_FULL, w)
}

/// The slow-start weight of backend `id` now, in thousandths ([`WEIGHT_MIN`] just
/// ready, [`WEIGHT_FULL`] once its window has passed).
#[inline(always)]
fn weight(id: u32, now: u64, window: u64) -> u64 {
    if window == 0 {
        return WEIGHT_FULL;
    }
    let Some(b) = BACKEND_TABLE_V1.get_ptr(id) else {
        return WEIGHT_FULL;
    };
    // SAFETY: an array map value, valid while the program runs.
    let ready = unsafe { read_volatile(addr_of!((*b).ready_ns)) };
    if ready == 0 || now <= ready {
        return if ready == 0 { WEIGHT_FULL } else { WEIGHT_MIN };
    }
    let age = now - ready;
    if age >= window {
        return WEIGHT_FULL;
    }
    let w = div(age * WEIGHT_FULL, window);
    if w < WEIGHT_MIN { WEIGHT_MIN } else { w }
}

/// `a % b`, 0 when `b` is 0: a plain `%` carries a panic path the verifier refuses.
#[inline(always)]
fn rem(a: u32, b: u32) -> u32 {
    a.checked_rem(b).unwrap_or(0)
}

/// `a / b`, 0 when `b` is 0 (as [`rem`]).
#[inline(always)]
fn div(a: u64, b: u64) -> u64 {
    a.checked_div(b).unwrap_or(0)
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: no arguments, always available.
    unsafe { bpf_get_prandom_u32() }
}

/// Two random positions in `order[..n]`, distinct when `n > 1`; the one whose backend
/// has the lower weighted load (ties: the first, which is random already). O(1)
/// whatever `n`.
#[inline(always)]
fn two_choices(set: *const BackendSet, n: u32, now: u64, window: u64) -> (u32, u64) {
    let a = rem(random(), n);
    if n < 2 {
        // SAFETY: as in pick_backend.
        let ia = unsafe { order_at(set, a) };
        return (a, weighted_load(ia, now, window));
    }
    let mut b = rem(random(), n - 1);
    if b >= a {
        b += 1;
    }
    // SAFETY: as in pick_backend.
    let (ia, ib) = unsafe { (order_at(set, a), order_at(set, b)) };
    let la = weighted_load(ia, now, window);
    let lb = weighted_load(ib, now, window);
    if lb < la { (b, lb) } else { (a, la) }
}

/// The position in `order[..n]` of the least loaded of the set's least-connections
/// candidates (every backend of a set of up to [`LC_CANDIDATES`], else the agent's
/// least loaded per tier, refreshed every few hundred ms), by the loads of this
/// moment: at most [`LC_CANDIDATES`] compared, whatever the set's size. The scan starts
/// at a random candidate, so equally loaded backends share the connects. Two choices
/// when no candidate is within `n` (a tier bound the agent's list does not reach yet).
#[inline(always)]
fn least_loaded(set: *const BackendSet, n: u32, now: u64, window: u64) -> u32 {
    // SAFETY: as in pick_backend.
    let cc = unsafe { (*set).candidate_count };
    let cc = if cc > LC_CANDIDATES {
        LC_CANDIDATES
    } else {
        cc
    };
    let start = rem(random(), cc);
    let mut best = u32::MAX;
    let mut best_load = u64::MAX;
    let mut i = 0;
    while i < LC_CANDIDATES {
        if i >= cc {
            break;
        }
        // SAFETY: as in pick_backend.
        let pos = unsafe { candidate_at(set, rem(start + i, cc)) };
        i += 1;
        if pos >= n {
            continue;
        }
        // SAFETY: as in pick_backend.
        let id = unsafe { order_at(set, pos) };
        let load = weighted_load(id, now, window);
        if load < best_load {
            best_load = load;
            best = pos;
        }
    }
    if best == u32::MAX {
        return two_choices(set, n, now, window).0;
    }
    best
}

/// The next round-robin position of `slot` on this CPU, in `[0, n)`.
#[inline(always)]
fn round_robin(slot: u32, n: u32) -> u32 {
    match BALANCE_RR_V2.get_ptr_mut(slot) {
        // SAFETY: per-CPU value of this CPU.
        Some(p) => unsafe {
            let v = *p;
            *p = v.wrapping_add(1);
            rem(v, n)
        },
        None => rem(random(), n),
    }
}

/// One pick by the set's algorithm among `order[..n]`.
#[inline(always)]
fn choose(set: *const BackendSet, algorithm: u32, slot: u32, n: u32, now: u64, window: u64) -> u32 {
    match algorithm {
        ALG_LEAST_CONNECTIONS => least_loaded(set, n, now, window),
        ALG_ROUND_ROBIN => round_robin(slot, n),
        ALG_RANDOM => rem(random(), n),
        _ => two_choices(set, n, now, window).0,
    }
}

/// A pick after a warming backend was passed over: as [`choose`], but least
/// connections picks by two choices here, so its scan runs once per connect (the
/// verifier walks every copy of the loop).
#[inline(always)]
fn choose_again(
    set: *const BackendSet,
    algorithm: u32,
    slot: u32,
    n: u32,
    now: u64,
    window: u64,
) -> u32 {
    match algorithm {
        ALG_ROUND_ROBIN => round_robin(slot, n),
        ALG_RANDOM => rem(random(), n),
        _ => two_choices(set, n, now, window).0,
    }
}

/// How many of the set's backends (a prefix of `order`) this connect may use: the
/// preferred tier (same node, then same zone) unless it is loaded well beyond the
/// whole set (two random picks each, O(1)), then everyone.
#[inline(always)]
fn usable(set: *const BackendSet, count: u32, now: u64, window: u64) -> u32 {
    // SAFETY: as in pick_backend.
    let tiers = unsafe { [(*set).tiers[0], (*set).tiers[1]] };
    let mut t = 0;
    while t < 2 {
        let n = tiers[t];
        t += 1;
        if n == 0 || n >= count {
            continue;
        }
        let (_, local) = two_choices(set, n, now, window);
        let (_, all) = two_choices(set, count, now, window);
        if local <= SPILL_FACTOR * all + SPILL_SLACK * WEIGHT_FULL {
            return n;
        }
    }
    count
}

/// The ready backend of `slot` the set's algorithm picks for this connect, or `None`
/// when there is none. A warming backend (slow start) is taken with a probability of
/// its weight, else the algorithm picks again (a few times, then it is kept).
#[inline(always)]
fn pick_backend(slot: u32, family: Family) -> Option<Chosen> {
    let set = BACKENDS_V3.get_ptr(slot)?;
    // SAFETY: the map value stays valid while this program runs (a concurrent update
    // replaces the element, RCU); fields are read one at a time, never copied whole
    // (the set is larger than the stack).
    let (count, algorithm, window) =
        unsafe { ((*set).count, (*set).algorithm, (*set).slow_start_ns) };
    if count == 0 {
        return None;
    }
    let count = if count > MAX_BACKENDS {
        MAX_BACKENDS
    } else {
        count
    };
    // Only slow start weighs by age: without it the clock is never read (a helper call
    // on every balanced connect).
    let now = if window != 0 {
        // SAFETY: no arguments, always available.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let n = usable(set, count, now, window);
    let mut pos = choose(set, algorithm, slot, n, now, window);
    if window != 0 {
        let mut tries = 0;
        while tries < 3 {
            tries += 1;
            // SAFETY: as above.
            let id = unsafe { order_at(set, pos) };
            let w = weight(id, now, window);
            if w >= WEIGHT_FULL || rem(random(), WEIGHT_FULL as u32) < w as u32 {
                break;
            }
            pos = choose_again(set, algorithm, slot, n, now, window);
        }
    }
    // SAFETY: as above.
    let id = unsafe { order_at(set, pos) };
    let b = BACKEND_TABLE_V1.get_ptr(id)?;
    // SAFETY: an array map value, valid while the program runs. The agent never
    // rewrites an id's entry while a set lists it (a freed id waits in a FIFO behind
    // every other free id before reuse), so these fields belong together.
    let (generation, bytes, port) = unsafe { ((*b).generation, (*b).addr, (*b).port) };
    if generation == 0 {
        return None;
    }
    let words = addr_words(bytes);
    let is_v4 = words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD;
    if is_v4 != (family != Family::V6) {
        // The agent writes each family's backends on that family's row, so this cannot
        // happen; were it to, the proxy (hold) still gets the connection there.
        return None;
    }
    Some(Chosen {
        target: Target {
            words,
            port: u16::from_ne_bytes(port) as u32,
        },
        index: id,
        generation,
    })
}

/// The proxy address for a hold-mode connect, or `None` when it must go through: not
/// TCP, no proxy configured for the family, or a stale heartbeat (dead-man switch).
#[inline(always)]
fn hold_target(ctx: &SockAddrContext, proto: u8, family: Family, slot: u32) -> Option<Target> {
    if proto != PROTO_TCP {
        count_error(ERR_HOLD_NOT_TCP);
        return None;
    }
    let cfg = hold_config(ctx, family, slot)?;
    let port = u16::from_ne_bytes(cfg.proxy_v4_port) as u32;
    let v4 = u32::from_ne_bytes(cfg.proxy_v4_addr);
    Some(match family {
        Family::V4 | Family::V4Mapped => Target {
            words: [0, 0, V4_MAPPED_WORD, v4],
            port,
        },
        Family::V6 => Target {
            words: addr_words(cfg.proxy_v6_addr),
            port: u16::from_ne_bytes(cfg.proxy_v6_port) as u32,
        },
    })
}

/// The config when a hold may redirect to the agent for `family`: `None` (counted)
/// when no proxy address of the family is configured or the heartbeat is stale (the
/// dead-man switch). TCP and UDP holds alike.
#[inline(always)]
fn hold_config(ctx: &SockAddrContext, family: Family, slot: u32) -> Option<Config> {
    let Some(cfg) = CONFIG_V1.get(0).copied() else {
        count_error(ERR_NO_PROXY);
        return None;
    };
    let flag = if family == Family::V6 {
        CONFIG_PROXY_V6
    } else {
        CONFIG_PROXY_V4
    };
    if cfg.flags & flag == 0 {
        count_error(ERR_NO_PROXY);
        return None;
    }
    let beat = HEARTBEAT_V1.get(0).copied().unwrap_or(0);
    // SAFETY: no arguments, always available.
    let now = unsafe { bpf_ktime_get_ns() };
    let max_age = cfg.deadman_max_age_ns;
    if max_age == 0 || beat == 0 || now.saturating_sub(beat) > max_age {
        count_error(ERR_DEADMAN_RELEASE);
        debug!(
            ctx,
            "nemesis: dead-man switch released a held connect to slot {}", slot
        );
        return None;
    }
    Some(cfg)
}

// === sock_ops ===

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_tcp_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_accepted(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    SOCK_OPS_OK
}

/// SYN about to go out: the local port is known. Turns on the state callback (to see
/// the close) and records a held socket's original destination under its local address,
/// before the proxy can possibly accept it.
fn on_tcp_connect(ctx: &SockOpsContext) {
    // SAFETY: the helper accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(b) = SOCK_BAL_V1.get_ptr_mut(cookie)
        && balanced_connecting(ctx, cookie, b)
    {
        return; // a balanced socket has no SOCKETS entry
    }
    let Some(rec) = SOCKETS_V1.get_ptr_mut(cookie) else {
        return; // not a managed service's socket
    };
    if ctx
        .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_err()
    {
        count_error(ERR_CB_FLAGS);
    } else {
        // SAFETY: the LRU entry stays valid while this program runs.
        unsafe { (*rec).flags |= SOCK_TRACKED };
    }
    // SAFETY: as above.
    let rec = unsafe { *rec };
    if rec.flags & SOCK_HELD != 0 {
        let Some(key) = local_key(ctx) else { return };
        let dst = OrigDst {
            service: rec.service,
            slot: rec.slot,
        };
        if ORIG_DST_V1.insert(key, dst, BPF_ANY as u64).is_err() {
            count_error(ERR_ORIG_DST_INSERT);
        }
    }
}

/// A balanced socket's SYN is about to go out: turns on the state callback, so that its
/// close, whether or not the handshake completes, deletes its SOCK_BAL entry, and flags
/// the entry as such for the agent's sweeper (which deletes only the entries of
/// connects that failed before their SYN). False when the entry is not this connect's
/// (an earlier connect of the socket to a Service failed before its SYN, and this one
/// dialled something else): it is deleted, and the caller looks in SOCKETS.
#[inline(always)]
fn balanced_connecting(ctx: &SockOpsContext, cookie: u64, b: *mut BalancedSock) -> bool {
    // SAFETY: a hash value, valid while the program runs; only connect4/6 write `peer`.
    if !is_peer(ctx, unsafe { &*addr_of!((*b).peer) }) {
        let _ = SOCK_BAL_V1.remove(cookie);
        return false;
    }
    if ctx
        .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_err()
    {
        // The close would go unseen: count nothing, keep nothing (getpeername then
        // shows the backend).
        count_error(ERR_CB_FLAGS);
        let _ = SOCK_BAL_V1.remove(cookie);
        return true;
    }
    // SAFETY: as above; nothing else writes the flags before the SYN.
    unsafe { (*b).flags = BAL_CONNECTING };
    true
}

/// The handshake of a socket with a SOCK_BAL entry completed: one more open connection
/// on the service and on the backend (its close will be seen: see balanced_connecting).
#[inline(always)]
fn bal_established(b: *mut BalancedSock) {
    // SAFETY: a hash value, valid while the program runs.
    let r = unsafe { read_volatile(b) };
    if r.flags != BAL_CONNECTING {
        return; // its SYN was not seen (the close would not be), or already counted
    }
    let mut flags = BAL_CONNECTING;
    if let Some(conns) = backend_conns_of(r.backend, r.generation) {
        // SAFETY: as in backend_opened.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(conns, 1) };
        flags |= BAL_BACKEND_COUNTED;
    }
    if let Some(stats) = stats_of(r.slot, r.epoch) {
        // SAFETY: per-CPU value of this CPU.
        unsafe { (*stats).opened += 1 };
        // The entry is the socket's live marker too (see live_sockets).
        flags |= BAL_OPENED;
    }
    // SAFETY: as above.
    unsafe { (*b).flags = flags };
}

/// The handshake completed: one more open connection, if its close will be seen.
fn on_established(ctx: &SockOpsContext) {
    // SAFETY: the helper accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(b) = SOCK_BAL_V1.get_ptr_mut(cookie) {
        bal_established(b);
        return;
    }
    // A socket an older agent's programs balanced, mid-handshake at the upgrade.
    if let Some(b) = balanced_of(ctx)
        && balanced_established(ctx, b)
    {
        return;
    }
    let Some(rec) = SOCKETS_V1.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: the LRU entry stays valid while this program runs.
    let r = unsafe { *rec };
    if r.flags & SOCK_TRACKED == 0 {
        return;
    }
    // Only balanced sockets have a backend entry: the others skip the lookup.
    // Only sockets an older agent's programs balanced have a backend entry.
    if r.flags & SOCK_BALANCED != 0 {
        backend_opened(cookie);
    }
    if r.flags & SOCK_OPENED != 0 {
        return;
    }
    if let Some(stats) = current_stats(&r) {
        // SAFETY: per-CPU value of this CPU; the LRU entry as above.
        unsafe {
            (*stats).opened += 1;
            (*rec).flags |= SOCK_OPENED;
        }
        let _ = mark_live(ctx, r.slot, r.epoch, LIVE_CLIENT);
    }
}

/// A backend pod accepted a connection: if its (address, port) serves a managed service,
/// one more accepted connection, and its close will be counted.
///
/// The socket gets no record at all: its state callback is the mark that it was
/// counted, and its close finds the service again by its local (address, port) in
/// SERVER_PORTS (see [`server_closed`]). Both earlier records cost most of an accept
/// (issue 9's accept_overhead_ratio): a SOCKETS entry (an LRU insert, then a lookup and
/// delete at the close) and then a SOCK_LIVE marker (two allocations at the accept,
/// two RCU frees with the socket). The open count's truth is the kernel's socket
/// table, which the agent reads by the same (address, port) (`ebpf::live`).
fn on_accepted(ctx: &SockOpsContext) {
    let Some(local) = local_key(ctx) else { return };
    let key = ServiceKey {
        addr: local.addr,
        port: local.port,
        proto: PROTO_TCP,
        _pad: 0,
    };
    // SAFETY: a copy is taken at once.
    let Some(port) = (unsafe { SERVER_PORTS_V1.get(key) }).copied() else {
        return; // not a managed service's backend: not an error
    };
    let Some(stats) = stats_of(port.slot, port.epoch) else {
        return; // the entry is stale (its service left the slot)
    };
    if let Some(peer) = remote_addr(ctx)
        // SAFETY: only whether the key is there is used.
        && unsafe { HOST_ADDRS_V1.get(peer) }.is_some()
    {
        // SAFETY: per-CPU value of this CPU.
        unsafe { (*stats).from_host += 1 };
        return;
    }
    // Without the state callback the close would go unseen: then do not count the open.
    if ctx
        .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_err()
    {
        count_error(ERR_CB_FLAGS);
        return;
    }
    // SAFETY: per-CPU value of this CPU.
    unsafe { (*stats).accepted += 1 };
}

/// The close of a socket without a live marker: if it is a backend pod's accepted
/// socket (its local (address, port) is a server port whose service still has the
/// epoch), one more accepted connection closed; true if so. Only sockets whose state
/// callback is on get here, and on_accepted turns it on only for the accepts it
/// counted. A server port moved meanwhile (taken out, given to another service) makes
/// this close count there or nowhere: the reconcile brings the count back.
#[inline(always)]
fn server_closed(ctx: &SockOpsContext) -> bool {
    let Some(local) = local_key(ctx) else {
        return false;
    };
    let key = ServiceKey {
        addr: local.addr,
        port: local.port,
        proto: PROTO_TCP,
        _pad: 0,
    };
    // SAFETY: a copy is taken at once.
    let Some(port) = (unsafe { SERVER_PORTS_V1.get(key) }).copied() else {
        return false;
    };
    if let Some(stats) = stats_of(port.slot, port.epoch) {
        // SAFETY: per-CPU value of this CPU.
        unsafe { (*stats).accepted_closed += 1 };
    }
    true
}

/// The kernel socket behind a sock_ops context, or null.
#[inline(always)]
fn sock_of(ctx: &SockOpsContext) -> *mut core::ffi::c_void {
    // SAFETY: valid context; `sk` is a plain pointer field of `bpf_sock_ops`.
    unsafe { read_volatile(addr_of!((*ctx.ops).__bindgen_anon_2.sk)) }.cast()
}

/// Puts the live marker on a counted socket (see SOCK_LIVE in `nemesis_common::maps`);
/// false (and an error counted) when it could not. A failure only makes the reconcile
/// see one socket fewer, as if it had closed. Client sockets only: accepted ones are
/// found in the kernel's socket table by their server port instead (see on_accepted).
#[inline(always)]
fn mark_live(ctx: &SockOpsContext, slot: u32, epoch: u32, side: u32) -> bool {
    let sk = sock_of(ctx);
    if sk.is_null() {
        count_error(ERR_LIVE_MARK);
        return false;
    }
    let mut live = LiveSock {
        slot,
        epoch,
        side,
        _pad: 0,
    };
    // SAFETY: `sk` is the context's non-null socket; the value is copied in.
    let p = unsafe {
        bpf_sk_storage_get(
            sock_live_map(),
            sk,
            addr_of_mut!(live).cast(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    };
    if p.is_null() {
        count_error(ERR_LIVE_MARK);
        return false;
    }
    true
}

/// SOCK_LIVE as the helpers want it: the address of its definition, which the loader
/// relocates to the map (aya's own accessor is crate-private, and its SkStorage methods
/// take only a sock_addr context).
#[inline(always)]
fn sock_live_map() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&SOCK_LIVE_V1).cast_mut().cast()
}

/// Takes the live marker off a closing socket and returns what it said (None on sockets
/// never counted). The marker is overwritten as gone rather than deleted: a write into
/// the socket's own storage is cheaper than a delete (a lock and an RCU free), and the
/// kernel frees the storage with the socket anyway; the reconcile skips gone markers.
#[inline(always)]
fn unmark_live(ctx: &SockOpsContext) -> Option<LiveSock> {
    let sk = sock_of(ctx);
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is the context's non-null socket; without the create flag nothing is
    // allocated.
    let live = unsafe { bpf_sk_storage_get(sock_live_map(), sk, core::ptr::null_mut(), 0) }
        .cast::<LiveSock>();
    if live.is_null() {
        return None;
    }
    // SAFETY: a non-null storage value of LiveSock's size, owned by this socket.
    unsafe {
        let rec = read_volatile(live);
        if rec.side == LIVE_GONE {
            return None;
        }
        (*live).side = LIVE_GONE;
        Some(rec)
    }
}

/// The socket reached TCP_CLOSE: count the close and forget the socket.
fn on_close(ctx: &SockOpsContext) {
    // A balanced socket's own record first, before anything else: the commonest close
    // here, and one lookup by cookie is all it needs. Such a socket carries no live
    // marker (on_established marks only sockets without a SOCK_BAL entry, and a socket
    // counted by an earlier connect had its marker taken off at that connection's
    // close), so looking for one first only cost every balanced close a storage lookup
    // that never matched.
    // SAFETY: the helper accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied at once.
    if let Some(r) = (unsafe { SOCK_BAL_V1.get(cookie) }).copied() {
        bal_closed(&r);
        let _ = SOCK_BAL_V1.remove(cookie);
        return;
    }
    // Then, whether or not the SOCKETS record below is still there (the LRU may have
    // evicted it): the marker is what the reconcile trusts.
    let live = unmark_live(ctx);
    // Accepted by an older agent's program, which marked server sockets too.
    if let Some(l) = live
        && l.side == LIVE_SERVER
    {
        if let Some(stats) = stats_of(l.slot, l.epoch) {
            // SAFETY: per-CPU value of this CPU.
            unsafe { (*stats).accepted_closed += 1 };
        }
        return;
    }
    // A backend pod's socket has no record at all (see on_accepted): its server port,
    // before the storage lookup of the sockets an older agent balanced (a client
    // socket's local port is no backend's, and those sockets only last out an upgrade).
    if live.is_none() && server_closed(ctx) {
        return;
    }
    // A socket an older agent's programs balanced.
    if let Some(b) = balanced_of(ctx)
        && balanced_closed(b)
    {
        return;
    }
    // SAFETY: copied at once.
    let Some(r) = (unsafe { SOCKETS_V1.get(cookie) }).copied() else {
        return;
    };
    if r.flags & SOCK_HELD != 0
        && let Some(key) = local_key(ctx)
    {
        let _ = ORIG_DST_V1.remove(key); // absent if its insert failed: nothing to undo
    }
    if r.flags & SOCK_OPENED != 0
        && let Some(stats) = current_stats(&r)
    {
        // SAFETY: per-CPU value of this CPU.
        unsafe {
            if r.flags & SOCK_SERVER != 0 {
                // Accepted by an older agent's program, which kept a SOCKETS entry.
                (*stats).accepted_closed += 1;
            } else {
                (*stats).closed += 1;
            }
        }
    }
    if r.flags & SOCK_BALANCED != 0 {
        backend_closed(cookie);
    }
    let _ = SOCKETS_V1.remove(cookie);
}

/// A socket with a SOCK_BAL entry closed: its service's close and one fewer open
/// connection on its backend, for what its open counted.
#[inline(always)]
fn bal_closed(r: &BalancedSock) {
    if r.flags & BAL_OPENED != 0
        && let Some(stats) = stats_of(r.slot, r.epoch)
    {
        // SAFETY: per-CPU value of this CPU.
        unsafe { (*stats).closed += 1 };
    }
    if r.flags & BAL_BACKEND_COUNTED != 0
        && let Some(conns) = backend_conns_of(r.backend, r.generation)
    {
        // SAFETY: as in backend_closed.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(conns, u64::MAX) };
    }
}

/// The SOCK_BALANCED element an older agent's programs put on the context's socket.
#[inline(always)]
fn balanced_of(ctx: &SockOpsContext) -> Option<*mut BalancedSock> {
    let sk = sock_of(ctx);
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is the context's non-null socket; without the create flag nothing
    // is allocated.
    let p = unsafe { bpf_sk_storage_get(sock_balanced_map(), sk, core::ptr::null_mut(), 0) }
        .cast::<BalancedSock>();
    if p.is_null() { None } else { Some(p) }
}

/// SOCK_BALANCED as the helpers want it (see [`sock_live_map`]).
#[inline(always)]
fn sock_balanced_map() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&SOCK_BALANCED_V1).cast_mut().cast()
}

/// A balanced socket's handshake completed: turns on the state callback (only now: a
/// connect that never completes counted nothing, and its record goes with the socket,
/// so there is nothing to undo; this also spares the callback on the move to
/// ESTABLISHED), then one more open connection on the service and on the backend.
/// False when the record is not this connection's (a socket connected again elsewhere
/// after an earlier balanced connect): the caller then looks in SOCKETS as for any
/// other socket.
#[inline(always)]
fn balanced_established(ctx: &SockOpsContext, b: *mut BalancedSock) -> bool {
    // SAFETY: a storage value owned by this socket, valid while the program runs.
    let r = unsafe { read_volatile(b) };
    if !is_peer(ctx, &r.peer) {
        return false;
    }
    if r.flags != 0 {
        return true; // already counted
    }
    // Without the state callback the close would go unseen: then count nothing.
    if ctx
        .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_err()
    {
        count_error(ERR_CB_FLAGS);
        return true;
    }
    let mut flags = 0;
    if let Some(conns) = backend_conns_of(r.backend, r.generation) {
        // SAFETY: as in backend_opened.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(conns, 1) };
        flags |= BAL_BACKEND_COUNTED;
    }
    if let Some(stats) = stats_of(r.slot, r.epoch) {
        // SAFETY: per-CPU value of this CPU.
        unsafe { (*stats).opened += 1 };
        // The record is the socket's live marker too: `live_sockets` reports it while
        // this flag is on (no SOCK_LIVE element to create and free).
        flags |= BAL_OPENED;
    }
    // SAFETY: as above.
    unsafe { (*b).flags = flags };
    true
}

/// A balanced socket closed: its service's close and one fewer open connection on its
/// backend, for what its open counted. False when the record counted nothing (not this
/// connection's, see [`balanced_established`]): the caller then looks in SOCKETS.
#[inline(always)]
fn balanced_closed(b: *mut BalancedSock) -> bool {
    // SAFETY: a storage value owned by this socket, valid while the program runs.
    let r = unsafe { read_volatile(b) };
    if r.flags == 0 {
        return false;
    }
    if r.flags & BAL_OPENED != 0
        && let Some(stats) = stats_of(r.slot, r.epoch)
    {
        // SAFETY: per-CPU value of this CPU.
        unsafe { (*stats).closed += 1 };
    }
    if r.flags & BAL_BACKEND_COUNTED != 0
        && let Some(conns) = backend_conns_of(r.backend, r.generation)
    {
        // SAFETY: as in backend_closed.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(conns, u64::MAX) };
    }
    // Counted once: a later connect of the same socket writes a new record.
    // SAFETY: as above.
    unsafe { (*b).flags = 0 };
    true
}

/// Whether the socket's peer is the backend `peer` says it was sent to.
#[inline(always)]
fn is_peer(ctx: &SockOpsContext, peer: &PeerRewrite) -> bool {
    let Some(addr) = remote_addr(ctx) else {
        return false;
    };
    // sock_ops' remote_port holds the network-order port in its upper half on
    // little-endian kernels (the lower half on big-endian ones): either half matches,
    // the other is 0, never a valid port.
    let rp = ctx.remote_port();
    let want = u16::from_ne_bytes(peer.backend_port) as u32;
    addr == peer.backend_addr && (rp >> 16 == want || rp & 0xffff == want)
}

/// A balanced socket is established: one more open connection on its backend, if the
/// backend is still the one it was sent to.
#[inline(always)]
fn backend_opened(cookie: u64) {
    let Some(sb) = SOCK_BACKEND_V2.get_ptr_mut(cookie) else {
        return; // not balanced
    };
    // SAFETY: the LRU entry stays valid while this program runs.
    let b = unsafe { *sb };
    if b.opened != 0 {
        return;
    }
    if let Some(conns) = current_backend_conns(&b) {
        // SAFETY: an aligned u64 in an array map value; other CPUs change it atomically
        // too. The result is unused, so this is a plain atomic add.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(conns, 1);
            (*sb).opened = 1;
        }
    }
}

/// A balanced socket closed: one fewer open connection on its backend (if it was
/// counted and the backend is still the same), and forget the socket.
#[inline(always)]
fn backend_closed(cookie: u64) {
    // SAFETY: copied at once.
    let Some(b) = (unsafe { SOCK_BACKEND_V2.get(cookie) }).copied() else {
        return;
    };
    if b.opened != 0
        && let Some(conns) = current_backend_conns(&b)
    {
        // SAFETY: as in backend_opened; adding u64::MAX subtracts one.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(conns, u64::MAX) };
    }
    let _ = SOCK_BACKEND_V2.remove(cookie);
}

/// The open-connection count of a balanced socket's backend, if its id still holds
/// that backend (same generation): a removed backend's id may be reused, and its old
/// sockets must not count against the new one.
#[inline(always)]
fn current_backend_conns(b: &SockBackend) -> Option<*mut u64> {
    backend_conns_of(b.index, b.generation)
}

/// The open-connection count of backend id `index` if it still has `generation`.
#[inline(always)]
fn backend_conns_of(index: u32, generation: u32) -> Option<*mut u64> {
    let entry = BACKEND_TABLE_V1.get_ptr(index)?;
    // SAFETY: an array map value, valid while the program runs.
    let current = unsafe { read_volatile(addr_of!((*entry).generation)) };
    if current != generation {
        return None;
    }
    BACKEND_CONNS_V2.get_ptr_mut(index)
}

/// The stats of the socket's service, if its slot still has the epoch the socket
/// recorded (a removed or replaced service must not count an old socket).
#[inline(always)]
fn current_stats(r: &SockRecord) -> Option<*mut ServiceStats> {
    stats_of(r.slot, r.epoch)
}

/// The stats of `slot` if it still has `epoch`.
#[inline(always)]
fn stats_of(slot: u32, epoch: u32) -> Option<*mut ServiceStats> {
    let current = SLOT_EPOCH_V1.get(slot).copied()?;
    if current == 0 || current != epoch {
        return None;
    }
    let stats = SVC_STATS_V2.get_ptr_mut(slot);
    if stats.is_none() {
        count_error(ERR_BAD_SLOT);
    }
    stats
}

/// The socket's remote address (the peer of an accepted connection).
#[inline(always)]
fn remote_addr(ctx: &SockOpsContext) -> Option<[u8; 16]> {
    let words = match ctx.family() {
        AF_INET => [0, 0, V4_MAPPED_WORD, ctx.remote_ip4()],
        AF_INET6 => {
            let ops = ctx.ops;
            // SAFETY: valid context; one 4-byte load per word, as the verifier wants.
            unsafe {
                [
                    read_volatile(addr_of!((*ops).remote_ip6[0])),
                    read_volatile(addr_of!((*ops).remote_ip6[1])),
                    read_volatile(addr_of!((*ops).remote_ip6[2])),
                    read_volatile(addr_of!((*ops).remote_ip6[3])),
                ]
            }
        }
        _ => return None,
    };
    Some(addr_bytes(words))
}

/// The socket's local address and port: the peer address the proxy sees.
#[inline(always)]
fn local_key(ctx: &SockOpsContext) -> Option<OrigDstKey> {
    let port = ctx.local_port() as u16; // host order in sock_ops
    let words = match ctx.family() {
        AF_INET => [0, 0, V4_MAPPED_WORD, ctx.local_ip4()],
        AF_INET6 => {
            let ops = ctx.ops;
            // SAFETY: valid context; one 4-byte load per word, as the verifier wants.
            unsafe {
                [
                    read_volatile(addr_of!((*ops).local_ip6[0])),
                    read_volatile(addr_of!((*ops).local_ip6[1])),
                    read_volatile(addr_of!((*ops).local_ip6[2])),
                    read_volatile(addr_of!((*ops).local_ip6[3])),
                ]
            }
        }
        _ => return None,
    };
    Some(OrigDstKey::new(addr_bytes(words), port))
}

// === live_sockets (iter/tcp) ===

/// The context of a `tcp` iterator program, as the kernel lays it out.
#[repr(C)]
pub struct TcpIterCtx {
    meta: *mut IterMeta,
    sk_common: *mut core::ffi::c_void,
    uid: u32,
}

/// `struct bpf_iter_meta`: only its first field is read.
#[repr(C)]
pub struct IterMeta {
    seq: *mut core::ffi::c_void,
}

/// Writes the SOCK_LIVE entry of every TCP socket of the walked network namespace that
/// has one (a counted socket still open), or the same made from a counted balanced
/// socket's SOCK_BAL entry (or an older agent's SOCK_BALANCED record), one
/// [`LiveSock`] after another. The agent walks each namespace in turn: the kernel's own socket table, so a socket whose
/// close the counters missed is simply not there.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn live_sockets(ctx: *mut TcpIterCtx) -> i32 {
    // SAFETY: the kernel passes the iterator context; each field is read once.
    let (meta, skc) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    if skc.is_null() {
        return 0; // the end of the walk
    }
    // Full TCP sockets only: time-wait and request sockets never carry the marker.
    // SAFETY: a socket pointer the kernel handed over; the helper checks its type.
    let tp = unsafe { bpf_skc_to_tcp_sock(skc) };
    if tp.is_null() {
        return 0;
    }
    // SAFETY: `tp` is a full socket; without the create flag nothing is written.
    let live = unsafe { bpf_sk_storage_get(sock_live_map(), tp.cast(), core::ptr::null_mut(), 0) }
        .cast::<LiveSock>();
    let marker = if live.is_null() {
        None
    } else {
        // SAFETY: a non-null storage value of LiveSock's size; copied to the stack so
        // the helper reads verified memory.
        Some(unsafe { core::ptr::read_volatile(live) })
    };
    let mut rec = match marker {
        Some(m) if m.side != LIVE_GONE => m,
        // No marker, or a closed one's (its storage not yet freed with the socket): a
        // balanced socket's record is its marker (see bal_established).
        _ => {
            // SAFETY: a full socket, as above.
            let cookie = unsafe { bpf_get_socket_cookie(tp.cast()) };
            // SAFETY: copied at once.
            let flags = (unsafe { SOCK_BAL_V1.get(cookie) }).map(|r| (r.flags, r.slot, r.epoch));
            if let Some((flags, slot, epoch)) = flags {
                if flags & BAL_OPENED == 0 {
                    return 0; // not counted
                }
                let mut rec = LiveSock {
                    slot,
                    epoch,
                    side: LIVE_CLIENT,
                    _pad: 0,
                };
                write_live(meta, &mut rec);
                return 0;
            }
            // A socket an older agent's programs balanced.
            // SAFETY: as above.
            let b = unsafe {
                bpf_sk_storage_get(sock_balanced_map(), tp.cast(), core::ptr::null_mut(), 0)
            }
            .cast::<BalancedSock>();
            if b.is_null() {
                return 0;
            }
            // SAFETY: a non-null storage value of BalancedSock's size.
            let r = unsafe { core::ptr::read_volatile(b) };
            if r.flags & BAL_OPENED == 0 {
                return 0; // not counted, or closed
            }
            LiveSock {
                slot: r.slot,
                epoch: r.epoch,
                side: LIVE_CLIENT,
                _pad: 0,
            }
        }
    };
    write_live(meta, &mut rec);
    0
}

/// Writes one [`LiveSock`] to the iterator's output.
#[inline(always)]
fn write_live(meta: *mut IterMeta, rec: &mut LiveSock) {
    // SAFETY: `meta` is the iterator's metadata; `seq` its output.
    let seq = unsafe { (*meta).seq };
    // SAFETY: `rec` is a live stack value of the size passed.
    unsafe {
        bpf_seq_write(
            seq.cast(),
            core::ptr::from_mut(rec).cast(),
            core::mem::size_of::<LiveSock>() as u32,
        )
    };
}

#[inline(always)]
fn count_error(kind: u32) {
    if let Some(c) = ERRORS_V1.get_ptr_mut(kind) {
        // SAFETY: per-CPU value of this CPU.
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
