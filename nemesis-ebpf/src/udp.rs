//! UDP socket-LB, as Cilium does it: `connect4`/`connect6` on a UDP socket (a connected
//! socket: decided once, at connect) and `sendmsg4`/`sendmsg6` (an unconnected socket:
//! each datagram's destination) send a managed Service's datagrams to a ready backend
//! chosen by the Service's algorithm (the same choice as for TCP), or at zero to the
//! agent's UDP hold socket for that Service port; `recvmsg4`/`recvmsg6` rewrite a reply's
//! source back to the Service address through a reverse map keyed by socket cookie and
//! the address the datagrams went to, so `recvfrom` shows the ClusterIP and port.
//!
//! A flow is a socket and the Service it addressed (kept on the socket, SOCK_UDP): its
//! datagrams stay on one backend while that backend stays in the set, and each new flow
//! counts once in the Service's `connects` (UDP has no open or close to count). Every
//! path fails open, as the TCP hooks do.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC},
    btf_maps::SkStorage,
    helpers::generated::bpf_get_socket_cookie,
    macros::{btf_map, cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};
use nemesis_common::maps::{
    ALG_ROUND_ROBIN, ERR_BAD_SLOT, ERR_NO_PROXY, ERR_UDP_FLOW, MAX_BACKENDS, MAX_SERVICES,
    MAX_UDP_REV, MODE_BALANCE, MODE_HOLD, PROTO_UDP, ServiceKey, UDP_FLOW_BACKEND, UDP_FLOW_DIRECT,
    UDP_FLOW_HELD, UdpFlow, UdpHold, UdpRevKey, UdpRevValue,
};

use crate::{
    ALLOW, BACKEND_TABLE_V1, BACKENDS_V3, Chosen, Family, SERVICES_V1, SVC_STATS_V2, Target,
    V4_MAPPED_WORD, addr_bytes, addr_words, count_error, hold_config, order_at, random, rem,
    remember_peer, round_robin,
};

#[btf_map]
static SOCK_UDP_V1: SkStorage<UdpFlow> = SkStorage::new();
#[map]
static UDP_REV_V1: LruHashMap<UdpRevKey, UdpRevValue> =
    LruHashMap::with_max_entries(MAX_UDP_REV, 0);
#[map]
static UDP_HOLD_V1: HashMap<ServiceKey, UdpHold> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

// === connected sockets, decided at connect ===
// Called by connect4/connect6 (in `main`) for a UDP socket: one program per family
// handles both protocols, so a TCP connect does not pay a second program's run.

/// A UDP socket's connect4.
#[inline(always)]
pub(crate) fn connect4_udp(ctx: &SockAddrContext) {
    udp4(ctx, true);
}

/// A UDP socket's connect6.
#[inline(always)]
pub(crate) fn connect6_udp(ctx: &SockAddrContext) {
    udp6(ctx, true);
}

/// Whether the connecting socket is a UDP one.
#[inline(always)]
pub(crate) fn is_udp(ctx: &SockAddrContext) -> bool {
    // SAFETY: the kernel hands a valid `bpf_sock_addr`; a 4-byte load.
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).protocol)) == PROTO_UDP as u32 }
}

// === sendmsg4 / sendmsg6: unconnected sockets, per datagram ===

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    udp4(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    udp6(&ctx, false);
    ALLOW
}

/// A UDP connect4 or sendmsg4: rewrites the destination if it is a managed Service's.
#[inline(always)]
fn udp4(ctx: &SockAddrContext, connected: bool) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid `bpf_sock_addr`; 4-byte loads.
    let (ip, port) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    if let Some(t) = on_udp(ctx, [0, 0, V4_MAPPED_WORD, ip], port, Family::V4, connected) {
        // SAFETY: user_ip4/user_port are writable in connect4 and sendmsg4.
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip4), t.words[3]);
            write_volatile(addr_of_mut!((*sa).user_port), t.port);
        }
    }
}

/// A UDP connect6 or sendmsg6 (native IPv6 or v4-mapped), as [`udp4`].
#[inline(always)]
fn udp6(ctx: &SockAddrContext, connected: bool) {
    let sa = ctx.sock_addr;
    // SAFETY: as in udp4; user_ip6 one 4-byte word at a time.
    let (words, port) = unsafe {
        (
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ],
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    let family = if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD {
        Family::V4Mapped
    } else {
        Family::V6
    };
    if let Some(t) = on_udp(ctx, words, port, family, connected) {
        // SAFETY: user_ip6 words and user_port are writable in connect6 and sendmsg6.
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), t.words[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), t.words[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), t.words[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), t.words[3]);
            write_volatile(addr_of_mut!((*sa).user_port), t.port);
        }
    }
}

/// Where a datagram (or a connected UDP socket) to `words`:`port` goes: `Some` a
/// backend or the hold socket, `None` unchanged (not managed, passthrough, any failure).
#[inline(always)]
fn on_udp(
    ctx: &SockAddrContext,
    words: [u32; 4],
    port: u32,
    family: Family,
    connected: bool,
) -> Option<Target> {
    let key = ServiceKey {
        addr: addr_bytes(words),
        port: (port as u16).to_ne_bytes(),
        proto: PROTO_UDP,
        _pad: 0,
    };
    // SAFETY: a copy is taken at once.
    let svc = (unsafe { SERVICES_V1.get(key) }).copied()?;
    let Some(stats) = SVC_STATS_V2.get_ptr_mut(svc.slot) else {
        count_error(ERR_BAD_SLOT);
        return None;
    };
    // SAFETY: the context's socket; created zeroed if absent.
    let fp = unsafe { SOCK_UDP_V1.get_or_insert_ptr_mut(ctx, None) };
    if fp.is_null() {
        count_error(ERR_UDP_FLOW);
        return None;
    }
    // SAFETY: a non-null storage value of UdpFlow's size, owned by this socket.
    let flow = unsafe { read_volatile(fp) };
    let same =
        flow.state != 0 && flow.service == key && flow.slot == svc.slot && flow.epoch == svc.epoch;
    if !same {
        // SAFETY: per-CPU value of this CPU.
        unsafe { (*stats).connects += 1 };
    }
    // The common case, kept cheap: a flow on a backend that is still in the set.
    if same
        && !connected
        && flow.state == UDP_FLOW_BACKEND
        && svc.mode == MODE_BALANCE
        && still_in_set(svc.slot, flow.index, flow.generation)
    {
        return Some(Target {
            words: addr_words(flow.target_addr),
            port: u16::from_ne_bytes(flow.target_port) as u32,
        });
    }

    let mut next = UdpFlow {
        service: key,
        slot: svc.slot,
        epoch: svc.epoch,
        index: 0,
        generation: 0,
        target_addr: [0; 16],
        target_port: [0; 2],
        state: UDP_FLOW_DIRECT,
        _pad: 0,
    };
    let chosen = if svc.mode == MODE_BALANCE {
        pick_flow_backend(svc.slot, family)
    } else {
        None
    };
    let target = match chosen {
        Some(c) => {
            next.state = UDP_FLOW_BACKEND;
            next.index = c.index;
            next.generation = c.generation;
            Some(c.target)
        }
        None if svc.mode == MODE_HOLD || svc.mode == MODE_BALANCE => {
            let t = hold_target(ctx, &key, family, svc.slot);
            if t.is_some() {
                next.state = UDP_FLOW_HELD;
            }
            // Counted once per flow that enters (or is let out of) hold.
            if !same || flow.state != next.state {
                // SAFETY: per-CPU value of this CPU.
                unsafe {
                    if t.is_some() {
                        (*stats).redirected += 1;
                    } else {
                        (*stats).released += 1;
                    }
                }
            }
            t
        }
        None => None,
    };
    if let Some(t) = &target {
        next.target_addr = addr_bytes(t.words);
        next.target_port = (t.port as u16).to_ne_bytes();
        let moved =
            !same || flow.target_addr != next.target_addr || flow.target_port != next.target_port;
        if moved || connected {
            remember_reverse(ctx, &key, &next);
        }
        if connected {
            remember_peer(ctx, &key, t);
        }
    }
    // SAFETY: as above; the socket's own storage.
    unsafe { write_volatile(fp, next) };
    target
}

/// The backend a new UDP flow of `slot` goes to, or `None` when there is none. UDP has
/// no open connections to weigh, so the load-based algorithms (p2c, least connections)
/// and slow start have nothing to go on: a flow takes the next backend under round
/// robin, else a uniformly random one, among the preferred tier (same node, else same
/// zone) when the set has one. The set, its order and its tiers are TCP's. The
/// choice's `index` is the backend's position in the order (high 16 bits) and its id
/// (low 16 bits): [`still_in_set`] checks both.
#[inline(always)]
fn pick_flow_backend(slot: u32, family: Family) -> Option<Chosen> {
    let set = BACKENDS_V3.get_ptr(slot)?;
    // SAFETY: a live map value (RCU); fields read one at a time.
    let (count, algorithm, near, zone) = unsafe {
        (
            (*set).count,
            (*set).algorithm,
            (*set).tiers[0],
            (*set).tiers[1],
        )
    };
    if count == 0 {
        return None;
    }
    let count = if count > MAX_BACKENDS {
        MAX_BACKENDS
    } else {
        count
    };
    let n = if near != 0 && near < count {
        near
    } else if zone != 0 && zone < count {
        zone
    } else {
        count
    };
    let pos = if algorithm == ALG_ROUND_ROBIN {
        round_robin(slot, n)
    } else {
        rem(random(), n)
    };
    // SAFETY: as above; order_at masks the position.
    let id = unsafe { order_at(set, pos) };
    let b = BACKEND_TABLE_V1.get_ptr(id)?;
    // SAFETY: an array map value; the agent never rewrites an id's entry while a set
    // lists it (see pick_backend).
    let (generation, bytes, port) = unsafe { ((*b).generation, (*b).addr, (*b).port) };
    if generation == 0 {
        return None;
    }
    let words = addr_words(bytes);
    let is_v4 = words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD;
    if is_v4 != (family != Family::V6) {
        return None; // each family's backends are on its own row (see pick_backend)
    }
    Some(Chosen {
        target: Target {
            words,
            port: u16::from_ne_bytes(port) as u32,
        },
        index: (pos << 16) | (id & 0xffff),
        generation,
    })
}

/// Whether the flow's backend (`index` from [`pick_flow_backend`]: its position and
/// id) is still at that position of `slot`'s set with the same generation. A removed
/// backend's id stays in the table until reused, so the id alone would keep a flow on
/// a backend that left; the position check moves it, and at worst a reordered set
/// moves a flow that could have stayed (UDP has no connection to break).
#[inline(always)]
fn still_in_set(slot: u32, index: u32, generation: u32) -> bool {
    let Some(set) = BACKENDS_V3.get_ptr(slot) else {
        return false;
    };
    let (pos, id) = (index >> 16, index & 0xffff);
    // SAFETY: a live map value (RCU); order_at masks the position.
    let (count, at) = unsafe { ((*set).count, order_at(set, pos)) };
    if pos >= count || at != id {
        return false;
    }
    match BACKEND_TABLE_V1.get_ptr(id) {
        // SAFETY: an array map value, valid while the program runs.
        Some(b) => unsafe { read_volatile(addr_of!((*b).generation)) == generation },
        None => false,
    }
}

/// The UDP hold socket of the Service port for `family`, or `None` (counted) when there
/// is none or the dead-man switch has fired: then the datagram goes on unchanged.
#[inline(always)]
fn hold_target(
    ctx: &SockAddrContext,
    key: &ServiceKey,
    family: Family,
    slot: u32,
) -> Option<Target> {
    // SAFETY: a copy is taken at once.
    let Some(hold) = (unsafe { UDP_HOLD_V1.get(key) }).copied() else {
        count_error(ERR_NO_PROXY);
        return None;
    };
    let cfg = hold_config(ctx, family, slot)?;
    let (words, port) = match family {
        Family::V4 | Family::V4Mapped => (
            [0, 0, V4_MAPPED_WORD, u32::from_ne_bytes(cfg.proxy_v4_addr)],
            hold.v4_port,
        ),
        Family::V6 => (addr_words(cfg.proxy_v6_addr), hold.v6_port),
    };
    if port == [0, 0] {
        count_error(ERR_NO_PROXY);
        return None;
    }
    Some(Target {
        words,
        port: u16::from_ne_bytes(port) as u32,
    })
}

/// Remembers that this socket's datagrams to `service` go to the flow's target, for
/// `recvmsg`. A failure only leaves replies showing the target's address.
#[inline(always)]
fn remember_reverse(ctx: &SockAddrContext, service: &ServiceKey, flow: &UdpFlow) {
    // SAFETY: the helper accepts this program type's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = UdpRevKey {
        cookie,
        addr: flow.target_addr,
        port: flow.target_port,
        _pad: [0; 6],
    };
    let value = UdpRevValue {
        addr: service.addr,
        port: service.port,
        _pad: [0; 2],
    };
    let _ = UDP_REV_V1.insert(key, value, BPF_ANY as u64);
}

// === recvmsg4 / recvmsg6: replies show the Service address ===

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    rewrite_source(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    rewrite_source(&ctx, true);
    ALLOW
}

/// A datagram from where this socket's datagrams to a Service went reports the Service
/// as its source.
#[inline(always)]
fn rewrite_source(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_ip6/user_port are readable and writable in recvmsg
    // programs; 4-byte loads and stores.
    unsafe {
        let port = read_volatile(addr_of!((*sa).user_port));
        let words = if v6 {
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ]
        } else {
            [
                0,
                0,
                V4_MAPPED_WORD,
                read_volatile(addr_of!((*sa).user_ip4)),
            ]
        };
        let key = UdpRevKey {
            cookie: bpf_get_socket_cookie(ctx.as_ptr()),
            addr: addr_bytes(words),
            port: (port as u16).to_ne_bytes(),
            _pad: [0; 6],
        };
        let Some(v) = UDP_REV_V1.get(key).copied() else {
            return;
        };
        let service = addr_words(v.addr);
        if v6 {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), service[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), service[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), service[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), service[3]);
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip4), service[3]);
        }
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u16::from_ne_bytes(v.port) as u32,
        );
    }
}
