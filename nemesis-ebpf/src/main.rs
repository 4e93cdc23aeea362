//! eBPF programs the agent attaches to a cgroup v2: `connect4`/`connect6` count connects
//! to managed services and, in hold mode, rewrite them to the agent's proxy; `sock_ops`
//! counts opened/closed TCP connections and remembers held connections' original
//! destinations. Every path fails OPEN: on any error the connect goes on unchanged and an
//! ERRORS counter says so. Nothing here may ever deny a connect.
//!
//! Map layouts and names live in `nemesis_common::maps`; the statics below are named
//! exactly as its `pub const` names (a loader test checks that).
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use nemesis_common::maps::{
    CONFIG_PROXY_V4, CONFIG_PROXY_V6, Config, ERR_BAD_SLOT, ERR_CB_FLAGS, ERR_DEADMAN_RELEASE,
    ERR_HOLD_NOT_TCP, ERR_NO_PROXY, ERR_ORIG_DST_INSERT, ERR_SOCKETS_INSERT, ERROR_KINDS,
    MAX_ORIG_DST, MAX_SERVICES, MAX_SOCKETS, MODE_HOLD, OrigDst, OrigDstKey, PROTO_TCP, SOCK_HELD,
    SOCK_OPENED, SOCK_TRACKED, ServiceKey, ServiceStats, ServiceValue, SockRecord,
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
static SVC_STATS_V1: PerCpuArray<ServiceStats> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
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

// === connect4 / connect6 ===

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx);
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
/// rewritten (`Some`) or goes on unchanged (`None`: passthrough, balance for now, any
/// failure).
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
    let Some(stats) = SVC_STATS_V1.get_ptr_mut(svc.slot) else {
        count_error(ERR_BAD_SLOT);
        return None;
    };
    // SAFETY: per-CPU value of this CPU; the program is not migrated while it runs.
    unsafe { (*stats).connects += 1 };

    let target = if svc.mode == MODE_HOLD {
        hold_target(ctx, key.proto, family, svc.slot)
    } else {
        None
    };
    if key.proto == PROTO_TCP {
        let record = SockRecord {
            service: key,
            slot: svc.slot,
            epoch: svc.epoch,
            flags: if target.is_some() { SOCK_HELD } else { 0 },
        };
        // SAFETY: the helper accepts this program type's context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if SOCKETS_V1.insert(cookie, record, BPF_ANY as u64).is_err() {
            count_error(ERR_SOCKETS_INSERT);
            // Without the record sock_ops cannot remember the original destination and
            // the proxy could not tell where the client was going: let it through.
            if svc.mode == MODE_HOLD {
                // SAFETY: as above.
                unsafe { (*stats).released += 1 };
            }
            return None;
        }
    }
    if svc.mode == MODE_HOLD {
        // SAFETY: as above.
        unsafe {
            if target.is_some() {
                (*stats).redirected += 1;
            } else {
                (*stats).released += 1;
            }
        }
    }
    if target.is_some() {
        debug!(
            ctx,
            "nemesis: held connect to service slot {} sent to the proxy", svc.slot
        );
    }
    target
}

/// The proxy address for a hold-mode connect, or `None` when it must go through: not
/// TCP, no proxy configured for the family, or a stale heartbeat (dead-man switch).
#[inline(always)]
fn hold_target(ctx: &SockAddrContext, proto: u8, family: Family, slot: u32) -> Option<Target> {
    if proto != PROTO_TCP {
        count_error(ERR_HOLD_NOT_TCP);
        return None;
    }
    let Some(cfg) = CONFIG_V1.get(0) else {
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

// === sock_ops ===

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_tcp_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
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

/// The handshake completed: one more open connection, if its close will be seen.
fn on_established(ctx: &SockOpsContext) {
    // SAFETY: the helper accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(rec) = SOCKETS_V1.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: the LRU entry stays valid while this program runs.
    let r = unsafe { *rec };
    if r.flags & SOCK_TRACKED == 0 || r.flags & SOCK_OPENED != 0 {
        return;
    }
    if let Some(stats) = current_stats(&r) {
        // SAFETY: per-CPU value of this CPU; the LRU entry as above.
        unsafe {
            (*stats).opened += 1;
            (*rec).flags |= SOCK_OPENED;
        }
    }
}

/// The socket reached TCP_CLOSE: count the close and forget the socket.
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: the helper accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
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
        unsafe { (*stats).closed += 1 };
    }
    let _ = SOCKETS_V1.remove(cookie);
}

/// The stats of the socket's service, if the service still has the slot and epoch it
/// had at connect (a removed or replaced service must not count an old socket).
#[inline(always)]
fn current_stats(r: &SockRecord) -> Option<*mut ServiceStats> {
    // SAFETY: a copy is taken at once.
    let svc = (unsafe { SERVICES_V1.get(r.service) }).copied()?;
    if svc.slot != r.slot || svc.epoch != r.epoch {
        return None;
    }
    let stats = SVC_STATS_V1.get_ptr_mut(r.slot);
    if stats.is_none() {
        count_error(ERR_BAD_SLOT);
    }
    stats
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
