//! The eBPF maps' names, sizes, keys and values, shared by `nemesis-ebpf` and the agent's
//! loader so the two can never read different bytes. Plain data only: no logic that
//! touches a map, and nothing that needs `std`.
//!
//! Conventions: addresses are 16 bytes, IPv4 as v4-mapped (`::ffff:a.b.c.d`), ports are
//! big-endian byte pairs (as on the wire), every struct is `#[repr(C)]` with its padding
//! spelled out and zeroed, so a key built on either side hashes the same.

// === map names ===
// The `_V1` suffix is the layout version: pinned maps outlive the agent, so a change
// of a key or value layout must get a new name (the loader checks sizes too).

/// `HashMap<ServiceKey, ServiceValue>`: the managed services, by ClusterIP, port, protocol.
pub const SERVICES: &str = "SERVICES_V1";
/// `PerCpuArray<ServiceStats>` indexed by [`ServiceValue::slot`]. V2: the server-side
/// counts (`accepted`, `accepted_closed`) joined the client-side ones.
pub const SERVICE_STATS: &str = "SVC_STATS_V2";
/// `LruHashMap<u64, SockRecord>` keyed by socket cookie: which service a socket dialled.
pub const SOCKETS: &str = "SOCKETS_V1";
/// `LruHashMap<OrigDstKey, OrigDst>`: held client socket (local addr, port) -> what it dialled.
pub const ORIG_DST: &str = "ORIG_DST_V1";
/// `Array<Config>` with one entry: proxy addresses and the dead-man bound.
pub const CONFIG: &str = "CONFIG_V1";
/// `Array<u64>` with one entry: the agent's last heartbeat, CLOCK_MONOTONIC ns
/// (the clock of `bpf_ktime_get_ns`).
pub const HEARTBEAT: &str = "HEARTBEAT_V1";
/// `PerCpuArray<u64>` indexed by the `ERR_*` kinds.
pub const ERRORS: &str = "ERRORS_V1";
/// `HashMap<u32, BackendSet>` keyed by [`ServiceValue::slot`]: a balance-mode service's
/// ready backends as a dense list of backend ids (not preallocated: only balanced
/// services take memory). V3: up to [`MAX_BACKENDS`] (1,024) per Service port; the
/// backends themselves moved to [`BACKEND_TABLE`] under node-wide ids, so a set is a
/// header and 2 bytes per backend (2,112 bytes; V2's 64-entry sets took 2,208).
pub const BACKENDS: &str = "BACKENDS_V3";
/// `Array<Backend>` indexed by backend id: every balance backend of every Service port
/// of the node, [`MAX_BACKEND_IDS`] entries of 32 bytes (2 MiB), preallocated.
pub const BACKEND_TABLE: &str = "BACKEND_TABLE_V1";
/// `Array<u64>` indexed by backend id: open connections this node sent to the backend,
/// changed atomically by sock_ops (one count for all CPUs, as the choice of the
/// least-loaded backend needs the total). V2: by backend id (V1 was by slot and index).
/// [`MAX_BACKEND_IDS`] x 8 bytes (512 KiB).
pub const BACKEND_CONNS: &str = "BACKEND_CONNS_V2";
/// `Array<u64>` indexed by backend id: open connections to the backend from the other
/// nodes, as the controller last reported them; written by the agent only, added to
/// [`BACKEND_CONNS`] by every choice. [`MAX_BACKEND_IDS`] x 8 bytes (512 KiB).
pub const BACKEND_REMOTE: &str = "BACKEND_REMOTE_V1";
/// `LruHashMap<u64, SockBackend>` keyed by socket cookie: which backend a balanced
/// socket was sent to.
/// V2: [`SockBackend::index`] is a backend id (V1: an index in the service's set).
pub const SOCK_BACKEND: &str = "SOCK_BACKEND_V2";
/// `PerCpuArray<u32>` indexed by slot: the service's round-robin position on this CPU
/// (V2: one per service; V1 had a single entry for all).
pub const BALANCE_RR: &str = "BALANCE_RR_V2";
/// `SkStorage<PeerRewrite>`: on each balanced client socket, the Service address it
/// dialled and the backend it was sent to, so `getpeername` reports the former.
pub const SOCK_PEER: &str = "SOCK_PEER_V1";
/// `SkStorage<BalancedSock>`: a balanced client socket's one record, created by
/// connect4/6 and read by sock_ops and `getpeername`: the service slot it counts for,
/// the backend it was sent to, and what `getpeername` reports. It replaces a SOCKETS
/// and a SOCK_BACKEND entry (two LRU inserts, lookups and deletes per connection) and
/// the SOCK_PEER entry; the kernel frees it with the socket. SOCKETS, SOCK_BACKEND and
/// SOCK_PEER stay for held and counted sockets and for sockets an older agent's
/// programs balanced.
pub const SOCK_BALANCED_REC: &str = "SOCK_BALANCED_V1";
/// `HashMap<u64, BalancedSock>` keyed by socket cookie, preallocated: a balanced client
/// socket's one record, as [`SOCK_BALANCED_REC`] was, which only sockets an older
/// agent's programs balanced still carry. A socket-storage element cost most of a
/// balanced connect (two allocations at the connect, two RCU frees with the socket:
/// issue 12's lb_connect_overhead_ratio); a preallocated entry is taken from and given
/// back to a free list. connect4/6 insert it; sock_ops turns on the state callback at
/// the SYN ([`BAL_CONNECTING`]), so every entry that got that far is deleted at the
/// socket's close. An entry without the flag is a connect that failed before its SYN
/// (no route, a fast-open connect never sent): the agent's sweeper deletes those once
/// they have stayed so for a whole sweep period (`ebpf::balanced_sweep`).
pub const SOCK_BAL: &str = "SOCK_BAL_V1";

/// Maps of earlier layouts that this agent no longer uses: removed from the pin
/// directory at start (a new agent must not adopt an old layout under a new meaning).
pub const RETIRED_MAPS: [&str; 5] = [
    "BACKENDS_V1",
    "BALANCE_RR_V1",
    "BACKENDS_V2",
    "BACKEND_CONNS_V1",
    "SOCK_BACKEND_V1",
];

/// `Array<u32>` indexed by slot: the epoch of the service that has the slot now (0: the
/// slot is free). A socket counts its close only while its slot still has the epoch it
/// recorded, whichever side (client or server) it was counted on.
pub const SLOT_EPOCH: &str = "SLOT_EPOCH_V1";
/// `HashMap<ServiceKey, SlotRef>`: backend pods' (address, port, protocol) on this node
/// -> the service they serve. The server-side hook counts the connections these accept.
pub const SERVER_PORTS: &str = "SERVER_PORTS_V1";
/// `HashMap<[u8; 16], u32>`: the node's own addresses (its host network namespace's).
/// A connection a backend pod accepts from one of them is the node itself calling:
/// the kubelet's probes above all (Cilium calls this identity `reserved:host`). It is
/// not traffic, and counting it would keep every Service awake forever.
pub const HOST_ADDRS: &str = "HOST_ADDRS_V1";
/// `SkStorage<LiveSock>`: one entry on each counted client socket that is still open,
/// freed by the kernel with the socket. It can neither fill up nor evict: the TCP
/// sockets that carry it are the truth the client counters are reconciled against.
/// Accepted (server-side) sockets carry none (its allocation was most of an accept's
/// cost): their truth is the kernel's table of sockets on the SERVER_PORTS, and their
/// close finds its service there again. Only older agents' programs marked them.
/// A balanced client socket has none either: its SOCK_BAL entry (with
/// [`BAL_OPENED`]) is its marker, and `live_sockets` reports it the same way.
pub const SOCK_LIVE: &str = "SOCK_LIVE_V1";

/// Every map the agent pins and re-adopts across restarts.
pub const PINNED_MAPS: [&str; 20] = [
    SERVICES,
    SERVICE_STATS,
    SOCKETS,
    ORIG_DST,
    CONFIG,
    HEARTBEAT,
    ERRORS,
    BACKENDS,
    BACKEND_TABLE,
    BACKEND_CONNS,
    BACKEND_REMOTE,
    SOCK_BACKEND,
    BALANCE_RR,
    SLOT_EPOCH,
    SERVER_PORTS,
    SOCK_LIVE,
    HOST_ADDRS,
    SOCK_PEER,
    SOCK_BALANCED_REC,
    SOCK_BAL,
];

// === program names (the eBPF function names) ===

pub const PROG_CONNECT4: &str = "connect4";
pub const PROG_CONNECT6: &str = "connect6";
pub const PROG_SOCK_OPS: &str = "sock_ops";
/// `getpeername` on a balanced IPv4 socket reports the Service address it dialled.
pub const PROG_GETPEERNAME4: &str = "getpeername4";
/// `getpeername` on a balanced IPv6 (or v4-mapped) socket, as above.
pub const PROG_GETPEERNAME6: &str = "getpeername6";
/// The `iter/tcp` program that writes the [`LiveSock`] of every TCP socket of a network
/// namespace that has one.
pub const PROG_LIVE_SOCKETS: &str = "live_sockets";

// === sizes ===

/// Services per node. Kubernetes' tested limit is 10,000 Services per cluster; the
/// stats array is per CPU and preallocated (40 bytes x this x CPUs), so not more.
pub const MAX_SERVICES: u32 = 16_384;
/// Tracked sockets to managed services at once. LRU: a socket whose close was never
/// seen (its connect failed before TCP started) cannot leak a slot forever.
pub const MAX_SOCKETS: u32 = 65_536;
/// Held connections whose original destination is remembered at once (LRU, as above).
pub const MAX_ORIG_DST: u32 = 65_536;
/// Ready backends per balanced service port. A power of two: the programs wrap
/// positions with a mask. Every algorithm stays O(1) in it: p2c, random and round robin
/// index the dense order directly, and least connections scans at most
/// [`LC_CANDIDATES`] backends the agent keeps as the least loaded (see
/// [`BackendSet::candidates`]). Services with more ready backends than this are
/// balanced over the first ones.
pub const MAX_BACKENDS: u32 = 1024;
/// Backend ids per node: entries of BACKEND_TABLE, BACKEND_CONNS and BACKEND_REMOTE
/// (48 bytes per id in all, 3 MiB preallocated). The sum of the ready backends over
/// every balanced Service port of the node must fit (a node sees every Service of the
/// cluster: 10,000 Services of 6 backends, or 64 of 1,024). A u16 id in the sets.
pub const MAX_BACKEND_IDS: u32 = 65_536;
/// How many backends least connections compares per connect once a set has more than
/// this: the agent lists the least loaded of each tier, refreshed from the counts
/// every [`LC_REFRESH_MS`]; the kernel takes the least loaded of them by the counts
/// of the moment. A set of at most this many is scanned whole (exact). Not more: the
/// verifier walks every iteration of the scan, and 64 of them (three map lookups
/// each) ran past its budget of a million instructions.
pub const LC_CANDIDATES: u32 = 16;
/// How often the agent refreshes least-connections candidates, in milliseconds.
pub const LC_REFRESH_MS: u64 = 100;
// Balance-mode memory of one datapath, in all: BACKEND_TABLE + BACKEND_CONNS +
// BACKEND_REMOTE, 3 MiB preallocated; BACKENDS, 2,112 bytes (+ the hash element's
// ~64) per balanced Service port, allocated on use, at most MAX_SERVICES of them
// (about 35 MiB if all 16,384 Service ports were balanced); BALANCE_RR 4 bytes x
// MAX_SERVICES per CPU (64 KiB per CPU); SOCK_BACKEND 65,536 x 16 bytes (LRU, 1 MiB
// plus elements). The V2 layout (64 backends) took 8 MiB for BACKEND_CONNS alone.
/// Balanced sockets whose backend is remembered at once (LRU, as SOCKETS).
pub const MAX_SOCK_BACKENDS: u32 = MAX_SOCKETS;
/// Balanced client sockets open (or connecting) at once on a node ([`SOCK_BAL`], about
/// 7 MiB preallocated). When it is full a balanced connect goes on unchanged (counted in
/// ERR_SOCK_BACKEND_INSERT), as any failure.
pub const MAX_SOCK_BAL: u32 = 65_536;
/// Backend (address, port) pairs of local pods the server-side hook recognises: a node
/// runs at most a few hundred pods, each with a handful of ports.
pub const MAX_SERVER_PORTS: u32 = 65_536;
/// Addresses of the node's host network namespace (interfaces, IPv4 and IPv6).
pub const MAX_HOST_ADDRS: u32 = 1024;

// === protocols and modes ===

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Count and leave the connection alone.
pub const MODE_PASSTHROUGH: u32 = 0;
/// Rewrite the destination to the agent's proxy (TCP; UDP datagrams go to the
/// Service port's UDP hold socket, see [`UDP_HOLD`]), unless the dead-man switch has
/// fired.
pub const MODE_HOLD: u32 = 1;
/// Rewrite the destination to a ready backend in BACKENDS chosen by the set's
/// algorithm (TCP connections; UDP flows, see [`SOCK_UDP`]); with no ready backend,
/// behave as [`MODE_HOLD`] so the service still wakes.
pub const MODE_BALANCE: u32 = 2;

// === balance algorithms ([`BackendSet::algorithm`]) ===

/// Power of two choices: two random backends, the one with fewer open connections
/// (weighted by slow start). O(1), and within a constant of least-connections.
pub const ALG_P2C: u32 = 0;
/// The backend with the fewest open connections (weighted), over the whole set.
pub const ALG_LEAST_CONNECTIONS: u32 = 1;
/// Each backend in turn (a per-CPU position per service).
pub const ALG_ROUND_ROBIN: u32 = 2;
/// A uniformly random backend.
pub const ALG_RANDOM: u32 = 3;

/// [`Backend::tier`]: the backend runs on this agent's node.
pub const TIER_NODE: u8 = 0;
/// [`Backend::tier`]: the backend runs in this agent's zone, on another node.
pub const TIER_ZONE: u8 = 1;
/// [`Backend::tier`]: anywhere else (or unknown).
pub const TIER_REMOTE: u8 = 2;

/// Slow-start weights are in thousandths; a backend just ready weighs this much, so it
/// still takes the odd connection (its caches warm) rather than none.
pub const WEIGHT_FULL: u64 = 1000;
pub const WEIGHT_MIN: u64 = 20;
/// Spill-over: the preferred tier is given up for a connect when its best candidate's
/// weighted load is above this many times the whole set's best plus [`SPILL_SLACK`]
/// connections (so a few connections never push traffic off the node).
pub const SPILL_FACTOR: u64 = 2;
pub const SPILL_SLACK: u64 = 4;

// === error kinds (indexes into ERRORS) ===
// None of these stops a connection: each counts a case where the programs failed open.

/// Inserting into SOCKETS failed: the socket's open/close is not counted.
pub const ERR_SOCKETS_INSERT: u32 = 0;
/// Inserting into ORIG_DST failed: the proxy cannot recover where the client went.
pub const ERR_ORIG_DST_INSERT: u32 = 1;
/// `bpf_sock_ops_cb_flags_set` failed: the close would be unseen, so the open is not counted.
pub const ERR_CB_FLAGS: u32 = 2;
/// A service's slot is outside SERVICE_STATS: nothing counted for it.
pub const ERR_BAD_SLOT: u32 = 3;
/// Hold mode, but the dead-man switch fired (no fresh heartbeat): connection let through.
pub const ERR_DEADMAN_RELEASE: u32 = 4;
/// Hold mode, but no proxy address of the family is configured: connection let through.
pub const ERR_NO_PROXY: u32 = 5;
/// Hold mode on a non-TCP socket: only TCP can be held, so it was let through.
pub const ERR_HOLD_NOT_TCP: u32 = 6;
/// Balance mode, but remembering the socket's backend failed: connection let through
/// unchanged (its backend could not be counted).
pub const ERR_SOCK_BACKEND_INSERT: u32 = 7;
/// Balance mode on a non-TCP socket: its connections cannot be counted, so it was let
/// through unchanged.
pub const ERR_BALANCE_NOT_TCP: u32 = 8;
/// Putting the live marker on a counted socket failed (no memory): the reconcile sees
/// the socket as closed until it is.
pub const ERR_LIVE_MARK: u32 = 9;
/// A UDP socket's flow record could not be created (no memory): its datagrams to a
/// managed Service went on unchanged.
pub const ERR_UDP_FLOW: u32 = 10;
/// Number of error kinds (the length of ERRORS).
pub const ERROR_KINDS: u32 = 11;
/// Metric label of each error kind, by index.
pub const ERROR_KIND_NAMES: [&str; ERROR_KINDS as usize] = [
    "sockets_insert",
    "orig_dst_insert",
    "cb_flags",
    "bad_slot",
    "deadman_release",
    "no_proxy",
    "hold_not_tcp",
    "sock_backend_insert",
    "balance_not_tcp",
    "live_mark",
    "udp_flow",
];

// === CONFIG flags ===

pub const CONFIG_PROXY_V4: u32 = 1;
pub const CONFIG_PROXY_V6: u32 = 2;

// === SockRecord flags ===

/// The connect was rewritten to the proxy.
pub const SOCK_HELD: u32 = 1;
/// The state callback is on: the close will be seen.
pub const SOCK_TRACKED: u32 = 2;
/// The connection was counted as opened (so its close is counted too).
pub const SOCK_OPENED: u32 = 4;
/// Balance mode sent the connect to a backend: SOCK_BACKEND has its entry (sock_ops
/// looks there only for such sockets).
pub const SOCK_BALANCED: u32 = 8;
/// The socket is a backend pod's side of a connection (accepted), counted in
/// [`ServiceStats::accepted`]. Only in SOCKETS entries written by older agents'
/// programs: an accepted socket's one record is now its SOCK_LIVE marker.
pub const SOCK_SERVER: u32 = 16;

// === LiveSock sides ===

/// A closed socket's marker (overwritten rather than deleted at the close; the kernel
/// frees it with the socket): neither side, skipped by the reconcile.
pub const LIVE_GONE: u32 = 0;

/// A client's socket to a managed service, counted in `opened`.
pub const LIVE_CLIENT: u32 = 1;
/// A backend pod's accepted socket, counted in `accepted`: written by older agents'
/// programs only (accepted sockets are no longer marked); its close is still counted
/// through it, and the reconcile does not count it (it finds the socket by its port).
pub const LIVE_SERVER: u32 = 2;

/// Key of SERVICES: what a client dials.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// IPv6 address, or IPv4 as v4-mapped.
    pub addr: [u8; 16],
    /// Big-endian port bytes.
    pub port: [u8; 2],
    /// IP protocol number ([`PROTO_TCP`], [`PROTO_UDP`]).
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey {
    pub const fn new(addr: [u8; 16], port: u16, proto: u8) -> Self {
        Self {
            addr,
            port: port.to_be_bytes(),
            proto,
            _pad: 0,
        }
    }

    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// Value of SERVICES.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index into SERVICE_STATS.
    pub slot: u32,
    /// One of the `MODE_*` values.
    pub mode: u32,
    /// Chosen anew each time a service is inserted: a socket's close is counted only if
    /// its service still has the slot and epoch it had at connect, so a removed and
    /// re-added service (or a reused slot) never counts an old socket's close.
    pub epoch: u32,
    pub _pad: u32,
}

/// Value of SERVICE_STATS (per CPU; the agent sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// connect() calls to the service (TCP); new UDP flows (a socket's first
    /// datagram or connect to the service, see [`SOCK_UDP`]).
    pub connects: u64,
    /// TCP connections established (open now = opened - closed, summed over CPUs).
    pub opened: u64,
    /// Established TCP connections closed.
    pub closed: u64,
    /// connect() calls rewritten to the proxy (hold mode); UDP flows sent to the hold
    /// relay.
    pub redirected: u64,
    /// Hold-mode connects let through unchanged (dead-man switch, no proxy, not TCP).
    pub released: u64,
    /// TCP connections a backend pod on this node accepted (server side), whatever
    /// path they came by: ClusterIP, pod IP (Ingress, mesh), NodePort.
    pub accepted: u64,
    /// Accepted connections closed.
    pub accepted_closed: u64,
    /// Connections a backend pod accepted from the node's own addresses (probes), not
    /// counted as accepted.
    pub from_host: u64,
}

/// Value of SOCKETS: written by connect4/6, read by sock_ops.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRecord {
    /// What the client dialled (before any rewrite).
    pub service: ServiceKey,
    pub slot: u32,
    pub epoch: u32,
    /// `SOCK_*` bits.
    pub flags: u32,
}

/// Value of SERVER_PORTS: the service slot a backend (address, port) counts for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotRef {
    pub slot: u32,
    /// The slot's epoch when written (see [`SLOT_EPOCH`]).
    pub epoch: u32,
}

/// Value of SOCK_LIVE: which slot an open counted socket counts for, and on which side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveSock {
    pub slot: u32,
    pub epoch: u32,
    /// [`LIVE_CLIENT`], [`LIVE_SERVER`], or [`LIVE_GONE`] once closed.
    pub side: u32,
    pub _pad: u32,
}

/// Key of ORIG_DST: the held client socket's local address as the proxy sees it (peer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigDstKey {
    /// IPv6 address, or IPv4 as v4-mapped.
    pub addr: [u8; 16],
    /// Big-endian port bytes.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

impl OrigDstKey {
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port: port.to_be_bytes(),
            _pad: [0; 2],
        }
    }
}

/// Value of ORIG_DST.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// The service the client dialled.
    pub service: ServiceKey,
    /// Its stats slot.
    pub slot: u32,
}

/// The single entry of CONFIG.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Hold-mode redirects stop when the heartbeat is older than this (0: never hold).
    pub deadman_max_age_ns: u64,
    /// The proxy's IPv6 listener address (valid with [`CONFIG_PROXY_V6`]).
    pub proxy_v6_addr: [u8; 16],
    /// The proxy's IPv4 listener address, network order (valid with [`CONFIG_PROXY_V4`]).
    pub proxy_v4_addr: [u8; 4],
    /// Big-endian port bytes.
    pub proxy_v4_port: [u8; 2],
    /// Big-endian port bytes.
    pub proxy_v6_port: [u8; 2],
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// The socket mark bit connect4/connect6 set on a connect balance mode sent to a
    /// backend (0: none), so that the agent's kube-proxy skip rule lets it bypass
    /// kube-proxy's Service chains (see `kube_proxy_skip` in the agent). Was padding:
    /// an older agent's pinned CONFIG reads as 0 here, which is off.
    pub skip_mark: u32,
}

/// One ready backend of a balanced service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// IPv6 address, or IPv4 as v4-mapped.
    pub addr: [u8; 16],
    /// Big-endian port bytes.
    pub port: [u8; 2],
    /// `TIER_*`: where the backend runs as seen from this node.
    pub tier: u8,
    pub _pad: u8,
    /// 0: this id is free. Otherwise unique for the agent's life per backend given this
    /// id, so a socket counts its close only against the backend it was sent to, never
    /// against a later one under the same id.
    pub generation: u32,
    /// CLOCK_MONOTONIC ns when the backend became ready (0: warm since before anyone
    /// looked); its slow-start weight ramps from here.
    pub ready_ns: u64,
}

/// Value of BACKENDS: one Service port's ready backends, by id into BACKEND_TABLE.
/// The agent keeps a backend at the same id while it stays ready (its count in
/// BACKEND_CONNS is per id); `order` lists the ids densely, preferred tiers first, so
/// every pick is an O(1) index into it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSet {
    /// Number of valid `order` entries (0: hold).
    pub count: u32,
    /// `ALG_*`.
    pub algorithm: u32,
    /// `order[..tiers[0]]` are the preferred same-node backends, `order[..tiers[1]]`
    /// the preferred same-node and same-zone ones (0: no preference at that level).
    pub tiers: [u32; 2],
    /// The slow-start window in ns (0: none): a backend's weight ramps linearly from
    /// [`WEIGHT_MIN`] to [`WEIGHT_FULL`] over this long after its `ready_ns`.
    pub slow_start_ns: u64,
    /// Number of valid `candidates` entries.
    pub candidate_count: u32,
    pub _pad: u32,
    /// Least connections: positions in `order` it compares (ascending; a connect
    /// confined to a tier takes those below the tier's bound). Every position when
    /// `count <= LC_CANDIDATES`; else the least loaded of each tier as the agent last
    /// saw them. Unused by the other algorithms.
    pub candidates: [u16; LC_CANDIDATES as usize],
    /// Backend ids (indexes into BACKEND_TABLE), `count` of them.
    pub order: [u16; MAX_BACKENDS as usize],
}

impl Default for BackendSet {
    fn default() -> Self {
        Self {
            count: 0,
            algorithm: ALG_P2C,
            tiers: [0; 2],
            slow_start_ns: 0,
            candidate_count: 0,
            _pad: 0,
            candidates: [0; LC_CANDIDATES as usize],
            order: [0; MAX_BACKENDS as usize],
        }
    }
}

/// Value of SOCK_PEER: what a balanced socket dialled and where it was sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerRewrite {
    /// The Service address (as dialled, v4-mapped for IPv4).
    pub service_addr: [u8; 16],
    /// The backend it was rewritten to.
    pub backend_addr: [u8; 16],
    /// Big-endian port bytes of each.
    pub service_port: [u8; 2],
    pub backend_port: [u8; 2],
}

/// Value of SOCK_BAL (and of the older SOCK_BALANCED): one balanced client socket (see
/// [`SOCK_BAL`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalancedSock {
    /// What the socket dialled and where it was sent (for `getpeername`; sock_ops also
    /// checks the socket's peer against the backend, so a record left from an earlier
    /// connect of the same socket is never taken for the current one).
    pub peer: PeerRewrite,
    /// The service's stats slot and its epoch at the connect (see [`SLOT_EPOCH`]).
    pub slot: u32,
    pub epoch: u32,
    /// The backend's id (index into BACKEND_TABLE) and its generation at the choice.
    pub backend: u32,
    pub generation: u32,
    /// `BAL_*` bits.
    pub flags: u32,
}

/// [`BalancedSock::flags`]: counted in the service's `opened` (its close is counted);
/// also what makes the record the socket's live marker (see [`SOCK_LIVE`]).
pub const BAL_OPENED: u32 = 1;
/// [`BalancedSock::flags`]: counted in BACKEND_CONNS (its close is subtracted).
pub const BAL_BACKEND_COUNTED: u32 = 2;
/// [`BalancedSock::flags`] in [`SOCK_BAL`]: the SYN went out and the state callback is
/// on, so the socket's close deletes the entry. Entries without it for a whole sweep
/// period are connects that failed before their SYN: the agent deletes them.
pub const BAL_CONNECTING: u32 = 4;

/// Value of SOCK_BACKEND: written by connect4/6, read by sock_ops.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockBackend {
    pub slot: u32,
    /// The backend's id (index into BACKEND_TABLE).
    pub index: u32,
    /// [`Backend::generation`] at the choice.
    pub generation: u32,
    /// 1 once counted in BACKEND_CONNS (so its close is subtracted).
    pub opened: u32,
}

// === UDP socket-LB (connect4/6 on UDP sockets, sendmsg4/6, recvmsg4/6) ===
// Kept apart from the TCP maps above (their own pinned-map list and layouts), so the
// two evolve without touching each other's lines.

/// `SkStorage<UdpFlow>`: on each UDP socket that sent to (or connected to) a managed
/// Service, the flow it is in: the Service it last addressed and where its datagrams go
/// (a backend, or the agent's UDP hold socket at zero). A flow is socket x Service; its
/// datagrams stay on one backend while that backend stays in the set.
pub const SOCK_UDP: &str = "SOCK_UDP_V1";
/// `LruHashMap<UdpRevKey, UdpRevValue>`: (socket cookie, address a datagram of the
/// socket was sent to instead of the Service) -> the Service address. `recvmsg4`/`6`
/// rewrite a reply's source with it, so `recvfrom` shows the ClusterIP and port.
pub const UDP_REV: &str = "UDP_REV_V1";
/// `HashMap<ServiceKey, UdpHold>`: a UDP Service port's hold sockets on the agent's
/// proxy addresses (one port per family). At zero, datagrams go there.
pub const UDP_HOLD: &str = "UDP_HOLD_V1";

/// The UDP maps the agent pins and re-adopts across restarts (besides [`PINNED_MAPS`]).
pub const UDP_PINNED_MAPS: [&str; 3] = [SOCK_UDP, UDP_REV, UDP_HOLD];

/// Retired: the link an older agent pinned for `connect` of UDP sockets, beside
/// [`PROG_CONNECT4`]. [`PROG_CONNECT4`] handles UDP sockets itself now (one program
/// run per connect, not two); an agent removes this pin when it finds it.
pub const PROG_CONNECT4_UDP: &str = "connect4_udp";
/// Retired: as [`PROG_CONNECT4_UDP`], beside [`PROG_CONNECT6`].
pub const PROG_CONNECT6_UDP: &str = "connect6_udp";
/// `sendmsg` (unconnected UDP) to a managed IPv4 Service: its destination is rewritten.
pub const PROG_SENDMSG4: &str = "sendmsg4";
/// `sendmsg` to a managed IPv6 (or v4-mapped) Service.
pub const PROG_SENDMSG6: &str = "sendmsg6";
/// `recvmsg` on a socket whose datagrams were sent elsewhere: the source is rewritten
/// back to the Service address.
pub const PROG_RECVMSG4: &str = "recvmsg4";
pub const PROG_RECVMSG6: &str = "recvmsg6";

/// Reverse entries at once (LRU: a flow whose entry was evicted sees its replies come
/// from the backend's address, as without the rewrite; nothing is refused).
pub const MAX_UDP_REV: u32 = 65_536;

/// [`UdpFlow::state`]: the flow's datagrams go to a balanced backend.
pub const UDP_FLOW_BACKEND: u8 = 1;
/// [`UdpFlow::state`]: the flow is held (its datagrams go to the agent's hold socket).
pub const UDP_FLOW_HELD: u8 = 2;
/// [`UdpFlow::state`]: the flow goes on unchanged (passthrough, or a hold let through).
pub const UDP_FLOW_DIRECT: u8 = 3;

/// Value of SOCK_UDP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpFlow {
    /// What the socket addressed.
    pub service: ServiceKey,
    pub slot: u32,
    pub epoch: u32,
    /// The backend's position in [`BackendSet::order`] (high 16 bits) and its id (low
    /// 16 bits), and its [`Backend::generation`] (state [`UDP_FLOW_BACKEND`] only): the
    /// flow stays there while the set lists it at that position.
    pub index: u32,
    pub generation: u32,
    /// Where the datagrams go (v4-mapped for IPv4), and the port, big-endian.
    pub target_addr: [u8; 16],
    pub target_port: [u8; 2],
    /// `UDP_FLOW_*`.
    pub state: u8,
    pub _pad: u8,
}

/// Key of UDP_REV.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpRevKey {
    /// The client socket's cookie.
    pub cookie: u64,
    /// The address its datagrams were sent to (backend or hold socket), v4-mapped for IPv4.
    pub addr: [u8; 16],
    /// Big-endian port bytes.
    pub port: [u8; 2],
    pub _pad: [u8; 6],
}

/// Value of UDP_REV: the Service address the client addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpRevValue {
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Value of UDP_HOLD: the hold sockets' ports (big-endian; 0: none for the family).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpHold {
    pub v4_port: [u8; 2],
    pub v6_port: [u8; 2],
}

/// `::ffff:a.b.c.d` for an IPv4 address.
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// The IPv4 address inside a v4-mapped one, if it is one.
pub const fn as_v4(addr: &[u8; 16]) -> Option<[u8; 4]> {
    if addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
    {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

// The layouts are part of the pinned-map contract: a padding hole would leave bytes
// that differ between two equal keys. These fail the build if a field change adds one.
const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 16);
    assert!(core::mem::size_of::<ServiceStats>() == 64);
    assert!(core::mem::size_of::<SlotRef>() == 8);
    assert!(core::mem::size_of::<LiveSock>() == 16);
    assert!(core::mem::size_of::<SockRecord>() == 32);
    assert!(core::mem::size_of::<OrigDstKey>() == 20);
    assert!(core::mem::size_of::<OrigDst>() == 24);
    assert!(core::mem::size_of::<Config>() == 40);
    assert!(core::mem::size_of::<Backend>() == 32);
    assert!(
        core::mem::size_of::<BackendSet>()
            == 32 + 2 * LC_CANDIDATES as usize + 2 * MAX_BACKENDS as usize
    );
    assert!(core::mem::size_of::<PeerRewrite>() == 36);
    assert!(core::mem::size_of::<SockBackend>() == 16);
    assert!(core::mem::size_of::<BalancedSock>() == 56);
    assert!(MAX_BACKENDS.is_power_of_two());
    assert!(LC_CANDIDATES.is_power_of_two());
    // Ids are u16 in the sets.
    assert!(MAX_BACKEND_IDS <= 1 << 16);
    assert!(core::mem::size_of::<UdpFlow>() == 56);
    assert!(core::mem::size_of::<UdpRevKey>() == 32);
    assert!(core::mem::size_of::<UdpRevValue>() == 20);
    assert!(core::mem::size_of::<UdpHold>() == 4);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `#[repr(C)]`, `Copy`, made of integers and byte arrays only,
    // with no padding holes (checked by the size asserts above), so any byte pattern is
    // a valid value.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::ServiceStats {}
    unsafe impl aya::Pod for super::SockRecord {}
    unsafe impl aya::Pod for super::OrigDstKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::BackendSet {}
    unsafe impl aya::Pod for super::SockBackend {}
    unsafe impl aya::Pod for super::SlotRef {}
    unsafe impl aya::Pod for super::LiveSock {}
    unsafe impl aya::Pod for super::PeerRewrite {}
    unsafe impl aya::Pod for super::BalancedSock {}
    unsafe impl aya::Pod for super::UdpFlow {}
    unsafe impl aya::Pod for super::UdpRevKey {}
    unsafe impl aya::Pod for super::UdpRevValue {}
    unsafe impl aya::Pod for super::UdpHold {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_round_trips_and_rejects_native_v6() {
        let m = v4_mapped([127, 96, 0, 7]);
        assert_eq!(as_v4(&m), Some([127, 96, 0, 7]));
        let mut v6 = [0u8; 16];
        v6[15] = 1; // ::1
        assert_eq!(as_v4(&v6), None);
    }

    #[test]
    fn service_key_port_is_big_endian_bytes() {
        let k = ServiceKey::new(v4_mapped([127, 96, 0, 1]), 8080, PROTO_TCP);
        assert_eq!(k.port, [0x1f, 0x90]);
        assert_eq!(k.port(), 8080);
    }
}
