//! The eBPF datapath: loads the programs (or re-adopts what an earlier agent pinned),
//! attaches them to a cgroup, pins links and maps under bpffs, and is the only door to
//! the maps (services and modes, balance backends, counters, original destinations,
//! heartbeat). It never decides policy: callers say which service is in which mode and
//! which backends are ready.
//!
//! Restart model: maps are pinned and reused by name, so counters continue; links are
//! pinned, and a new agent swaps its freshly loaded programs into them atomically
//! (BPF_LINK_UPDATE), so the hooks are never without a program, also on upgrades.
//! `unsafe` lives in `sys` only.

mod balance;
mod balanced_sweep;
pub mod cgroup;
pub mod live;
mod log_forward;
pub mod pins;
pub mod prereq;
mod sockdiag;
mod sys;

use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues},
    programs::{CgroupAttachMode, CgroupSockAddr, Iter, ProgramError, SockOps, links::FdLink},
};
use aya_obj::generated::bpf_attach_type;
use nemesis_common::maps::{
    self as m, Backend, BackendSet, Config, ERROR_KIND_NAMES, ERROR_KINDS, LiveSock, OrigDst,
    OrigDstKey, ServiceKey, ServiceStats, ServiceValue, SlotRef,
};
use tracing::{debug, info, warn};

pub use nemesis_common::policy::{Algorithm, LoadBalancing};
pub use pins::CleanupReport;
pub use prereq::{Missing, MissingPrerequisites};

/// The object built by `cargo xtask build-ebpf`, embedded by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nemesis-ebpf"));

/// Dead-man bound used when none is configured: 15 missed beats at the agent's
/// 1 s heartbeat. Long enough to ride out a slow restart of the agent, short enough
/// that a wedged agent releases held traffic within seconds.
pub const DEFAULT_DEADMAN_MAX_AGE: Duration = Duration::from_secs(15);

/// A service's index into the per-service counters.
pub type Slot = u32;

/// Reads a balanced set's members with one kind of open-connection counts.
type CountsReader = fn(&balance::BalanceTable, Slot) -> Result<Vec<(m::Backend, u64)>, MapError>;

/// What the programs do with a connect to a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Count, and leave the connection alone.
    Passthrough,
    /// Rewrite to the proxy (TCP), until the dead-man switch fires.
    Hold,
    /// Rewrite to the least-loaded ready backend set with [`Datapath::set_backends`]
    /// (TCP); with none, hold (rewrite to the proxy) so the service still wakes.
    Balance,
}

impl Mode {
    fn raw(self) -> u32 {
        match self {
            Mode::Passthrough => m::MODE_PASSTHROUGH,
            Mode::Hold => m::MODE_HOLD,
            Mode::Balance => m::MODE_BALANCE,
        }
    }

    fn from_raw(v: u32) -> Mode {
        match v {
            m::MODE_HOLD => Mode::Hold,
            m::MODE_BALANCE => Mode::Balance,
            _ => Mode::Passthrough,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn raw(self) -> u8 {
        match self {
            Proto::Tcp => m::PROTO_TCP,
            Proto::Udp => m::PROTO_UDP,
        }
    }

    fn from_raw(v: u8) -> Option<Proto> {
        match v {
            m::PROTO_TCP => Some(Proto::Tcp),
            m::PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

/// Where and how the datapath is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Names the pin directory `<bpffs>/nemesis/<instance>`; `[A-Za-z0-9_-]{1,64}`.
    pub instance: String,
    /// The cgroup to attach to; default: the cgroup2 mount's root.
    pub cgroup: Option<PathBuf>,
    /// The bpffs mount; default: found in /proc/mounts.
    pub bpffs: Option<PathBuf>,
    /// The proxy's IPv4 listener, where held IPv4 (and v4-mapped) connects go.
    pub proxy_v4: Option<SocketAddrV4>,
    /// The proxy's IPv6 listener, where held native IPv6 connects go.
    pub proxy_v6: Option<SocketAddrV6>,
    /// Hold-mode redirects stop when the last heartbeat is older than this.
    pub deadman_max_age: Duration,
    /// Entries of the socket-tracking map (SOCKETS); `None`: its built-in size. Only
    /// tests shrink it, to show that counts survive its evictions.
    pub socket_map_entries: Option<u32>,
    /// The socket mark bit balance mode sets on the connects it sends to a backend, for
    /// the kube-proxy skip rule (`kube_proxy_skip`); 0: none (the default).
    pub kube_proxy_skip_mark: u32,
}

impl DatapathConfig {
    pub fn new(instance: impl Into<String>) -> Self {
        Self {
            instance: instance.into(),
            cgroup: None,
            bpffs: None,
            proxy_v4: None,
            proxy_v6: None,
            deadman_max_age: DEFAULT_DEADMAN_MAX_AGE,
            socket_map_entries: None,
            kube_proxy_skip_mark: 0,
        }
    }
}

/// A managed service as the datapath knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub addr: SocketAddr,
    pub proto: Proto,
    pub slot: Slot,
    pub mode: Mode,
}

/// A service's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// connect() calls to the service.
    pub connects: u64,
    /// TCP connections established, in total.
    pub opened: u64,
    /// Established TCP connections closed, in total.
    pub closed: u64,
    /// Established TCP connections open now.
    pub open_now: u64,
    /// Connects rewritten to the proxy.
    pub redirected: u64,
    /// Hold-mode connects let through unchanged (dead-man switch, no proxy, not TCP).
    pub released: u64,
    /// TCP connections the service's backend pods on this node accepted, in total,
    /// whatever path they came by (server side).
    pub accepted: u64,
    /// Accepted connections closed, in total.
    pub accepted_closed: u64,
    /// Accepted connections open now.
    pub accepted_open: u64,
    /// Connections backend pods accepted from the node's own addresses (the kubelet's
    /// probes): not counted as accepted.
    pub from_host: u64,
}

/// What one reconcile of the open counts against the live sockets found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Client-side open counts changed to match the live sockets.
    pub client_corrections: u64,
    /// Server-side (accepted) open counts changed to match the live sockets.
    pub server_corrections: u64,
    /// Slots left for the next reconcile because their counters moved meanwhile.
    pub busy: u64,
}

/// What a held client dialled, recovered by the proxy from the client's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    /// The ClusterIP:port the client dialled.
    pub addr: SocketAddr,
    pub slot: Slot,
}

/// Where a backend runs, seen from this agent's node: balance mode prefers the nearer
/// tiers when the policy asks it to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// On this node.
    Node,
    /// In this node's zone, on another node.
    Zone,
    /// Anywhere else, or unknown.
    Remote,
}

impl Tier {
    fn raw(self) -> u8 {
        match self {
            Tier::Node => m::TIER_NODE,
            Tier::Zone => m::TIER_ZONE,
            Tier::Remote => m::TIER_REMOTE,
        }
    }
}

/// A balance-mode backend and its open connections now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendCounters {
    pub addr: SocketAddr,
    /// Established connections the programs sent to this backend that are still open.
    pub open_now: u64,
}

/// The programs' fail-open counters, by kind, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounters {
    pub counts: [u64; ERROR_KINDS as usize],
}

impl ErrorCounters {
    /// (metric label, count) of every kind.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ERROR_KIND_NAMES
            .iter()
            .copied()
            .zip(self.counts.iter().copied())
    }

    /// The count of one `nemesis_common::maps::ERR_*` kind.
    pub fn get(&self, kind: u32) -> u64 {
        self.counts.get(kind as usize).copied().unwrap_or(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid instance name {name:?}: use 1-64 characters of A-Z a-z 0-9 - _")]
    InvalidInstance { name: String },
    #[error(transparent)]
    Prerequisites(#[from] MissingPrerequisites),
    #[error("creating the pin directory {path}")]
    CreatePinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pinned map {path} has key/value size {found:?}, this agent expects {expected:?}: \
         it was pinned by an incompatible version; run `nemesis-agent cleanup` for this \
         instance first (interception stops until the agent starts again)"
    )]
    PinnedMapLayout {
        path: PathBuf,
        found: (u32, u32),
        expected: (u32, u32),
    },
    #[error("reading pinned map {path}")]
    ReadPinnedMap {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("loading the eBPF object (its maps pinned under {pin_dir})")]
    LoadObject {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no {kind} named {name}: agent and object are out of step")]
    MissingInObject { kind: &'static str, name: String },
    #[error("loading program {name} into the kernel (verifier)")]
    LoadProgram {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("opening cgroup {path}")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching program {name} to cgroup {cgroup}")]
    AttachProgram {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("pinning the link of {name} at {path}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("adopting the pinned link {path}")]
    AdoptLink {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the pinned link {path} is attached to another cgroup (id {found}) than {cgroup} \
         (id {expected}): run `nemesis-agent cleanup` for this instance, or pass the same --cgroup"
    )]
    PinnedLinkElsewhere {
        path: PathBuf,
        cgroup: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("opening map {name} of the loaded object")]
    OpenMap {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("reading the pinned services table")]
    ReadServices(#[source] MapError),
    #[error(
        "loading the live-socket iterator {name} (needs kernel BTF and TCP socket \
         iterators with socket storage, Linux 5.10 or newer)"
    )]
    LoadIterator {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("linking the live-socket iterator {name}")]
    LinkIterator {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the eBPF log forwarder")]
    StartLogForwarder(#[source] aya_log::Error),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("removing the pins under {path}")]
    RemovePins {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("writing service {addr}/{proto:?} to the services map")]
    UpdateService {
        addr: SocketAddr,
        proto: Proto,
        #[source]
        source: MapError,
    },
    #[error("removing service {addr}/{proto:?} from the services map")]
    RemoveService {
        addr: SocketAddr,
        proto: Proto,
        #[source]
        source: MapError,
    },
    #[error("service {addr}/{proto:?} is not in the services table")]
    ServiceNotFound { addr: SocketAddr, proto: Proto },
    #[error("the services table is full ({max} services)")]
    TableFull { max: u32 },
    #[error("service {addr}/{proto:?}: only TCP services can be held")]
    HoldNeedsTcp { addr: SocketAddr, proto: Proto },
    #[error("service {addr}/{proto:?}: only TCP services can be balanced")]
    BalanceNeedsTcp { addr: SocketAddr, proto: Proto },
    #[error(
        "service {addr}/{proto:?} has {count} ready backends; balance mode takes at most {max}"
    )]
    TooManyBackends {
        addr: SocketAddr,
        proto: Proto,
        count: usize,
        max: u32,
    },
    #[error("writing the backends of service {addr}/{proto:?}")]
    WriteBackends {
        addr: SocketAddr,
        proto: Proto,
        #[source]
        source: MapError,
    },
    #[error(
        "service {addr}/{proto:?}: {needed} new balance backends but only {free} backend ids free on this node (of {max})",
        max = m::MAX_BACKEND_IDS
    )]
    BackendIdsExhausted {
        addr: SocketAddr,
        proto: Proto,
        needed: usize,
        free: usize,
    },
    #[error("refreshing the least-connections candidates")]
    RefreshCandidates(#[source] MapError),
    #[error("reading the backend counters of service {addr}/{proto:?}")]
    ReadBackends {
        addr: SocketAddr,
        proto: Proto,
        #[source]
        source: MapError,
    },
    #[error("slot {slot} holds no service")]
    UnknownSlot { slot: Slot },
    #[error("resetting the counters of slot {slot}")]
    ResetStats {
        slot: Slot,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the counters of slot {slot}")]
    ReadStats {
        slot: Slot,
        #[source]
        source: MapError,
    },
    #[error("writing the heartbeat")]
    WriteHeartbeat(#[source] MapError),
    #[error("writing the datapath config")]
    WriteConfig(#[source] MapError),
    #[error("reading the error counters")]
    ReadErrors(#[source] MapError),
    #[error("writing the server-side ports of service {addr}/{proto:?}")]
    WriteServerPorts {
        addr: SocketAddr,
        proto: Proto,
        #[source]
        source: MapError,
    },
    #[error("writing the node's own addresses")]
    WriteHostAddresses(#[source] MapError),
    #[error("walking the live sockets")]
    WalkLiveSockets(#[source] std::io::Error),
}

/// The loaded (or adopted) datapath. Cheap to share behind an `Arc`: every method takes
/// `&self`. Dropping it leaves programs attached and maps pinned (an agent restart);
/// [`Datapath::detach`] or [`Datapath::cleanup`] removes them.
pub struct Datapath {
    layout: pins::PinLayout,
    cgroup: PathBuf,
    link_ids: Vec<u32>,
    program_ids: Vec<u32>,
    table: Mutex<ServiceTable>,
    /// Locked after `table` when both are needed.
    balance: Mutex<balance::BalanceTable>,
    orig_dst: BpfHashMap<MapData, OrigDstKey, OrigDst>,
    errors: PerCpuArray<MapData, u64>,
    heartbeat: Mutex<Array<MapData, u64>>,
    config: Mutex<(Array<MapData, Config>, Config)>,
    /// Locked after `table` when both are needed.
    server_ports: Mutex<ServerPorts>,
    host_addrs: Mutex<HostAddrs>,
    live: live::LiveIter,
    /// UDP_HOLD: each UDP Service port's hold socket ports.
    udp_hold: Mutex<BpfHashMap<MapData, ServiceKey, m::UdpHold>>,
    /// SOCK_BAL and what its sweeper remembers between sweeps.
    sock_bal: Mutex<(
        BpfHashMap<MapData, u64, m::BalancedSock>,
        balanced_sweep::Sweeper,
    )>,
    corrections: [AtomicU64; 2],
    _log: Option<log_forward::LogForwarder>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.layout.dir())
            .field("cgroup", &self.cgroup)
            .field("link_ids", &self.link_ids)
            .finish_non_exhaustive()
    }
}

/// The services map, its stats, the slots' epochs, and a mirror of them kept in step
/// under one lock; with the reconcile's corrections of the open counts.
struct ServiceTable {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    stats: PerCpuArray<MapData, ServiceStats>,
    slot_epochs: Array<MapData, u32>,
    entries: HashMap<ServiceKey, ServiceValue>,
    free_slots: BTreeSet<Slot>,
    next_epoch: u32,
    /// (client, server) offsets the reconcile added to the counters' open counts.
    offsets: HashMap<Slot, (i64, i64)>,
}

/// HOST_ADDRS and a mirror of its keys.
type HostAddrs = (BpfHashMap<MapData, [u8; 16], u32>, BTreeSet<[u8; 16]>);

/// SERVER_PORTS and which slot wrote each of its entries.
struct ServerPorts {
    map: BpfHashMap<MapData, ServiceKey, SlotRef>,
    by_slot: HashMap<Slot, BTreeSet<ServiceKey>>,
    owner: HashMap<ServiceKey, Slot>,
}

// === impl Datapath ===

impl Datapath {
    /// Checks the prerequisites, loads the programs, reuses pinned maps and links of
    /// `cfg.instance` if an earlier agent left them (swapping the new programs in), or
    /// attaches and pins fresh ones. Writes the config and a first heartbeat.
    pub fn load_or_adopt(cfg: &DatapathConfig) -> Result<Datapath, LoadError> {
        if !pins::valid_instance(&cfg.instance) {
            return Err(LoadError::InvalidInstance {
                name: cfg.instance.clone(),
            });
        }
        let env = prereq::check(cfg.cgroup.as_deref(), cfg.bpffs.as_deref())?;
        let layout = pins::PinLayout::new(&env.bpffs, &cfg.instance);
        layout
            .create_dirs()
            .map_err(|source| LoadError::CreatePinDir {
                path: layout.dir().to_path_buf(),
                source,
            })?;
        check_pinned_maps(&layout)?;
        remove_retired_maps(&layout)?;

        let mut loader = EbpfLoader::new();
        let btf = aya::Btf::from_sys_fs().ok();
        loader.btf(btf.as_ref());
        let map_paths: Vec<(&'static str, PathBuf)> = m::PINNED_MAPS
            .iter()
            .chain(m::UDP_PINNED_MAPS.iter())
            .map(|n| (*n, layout.map(n)))
            .collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        if let Some(n) = cfg.socket_map_entries {
            loader.map_max_entries(m::SOCKETS, n);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| LoadError::LoadObject {
            pin_dir: layout.dir().to_path_buf(),
            source: Box::new(e),
        })?;

        let cgroup_file = File::open(&env.cgroup).map_err(|source| LoadError::OpenCgroup {
            path: env.cgroup.clone(),
            source,
        })?;
        let cgroup_id = cgroup_file
            .metadata()
            .map_err(|source| LoadError::OpenCgroup {
                path: env.cgroup.clone(),
                source,
            })?
            .ino();
        let target = LinkTarget {
            cgroup: &env.cgroup,
            cgroup_file: &cgroup_file,
            cgroup_id,
        };
        let mut link_ids = vec![];
        let mut program_ids = vec![];
        for (name, attach_type) in [
            (m::PROG_CONNECT4, bpf_attach_type::BPF_CGROUP_INET4_CONNECT),
            (m::PROG_CONNECT6, bpf_attach_type::BPF_CGROUP_INET6_CONNECT),
            (m::PROG_SOCK_OPS, bpf_attach_type::BPF_CGROUP_SOCK_OPS),
            (
                m::PROG_GETPEERNAME4,
                bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
            ),
            (
                m::PROG_GETPEERNAME6,
                bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME,
            ),
        ] {
            let (prog_id, link_id) = load_and_link(&mut ebpf, name, attach_type, &layout, &target)?;
            program_ids.push(prog_id);
            link_ids.push(link_id);
        }
        // UDP socket-LB: unconnected sends and the replies' source (a connected socket's
        // connect is connect4's and connect6's).
        for (name, attach_type) in [
            (m::PROG_SENDMSG4, bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG),
            (m::PROG_SENDMSG6, bpf_attach_type::BPF_CGROUP_UDP6_SENDMSG),
            (m::PROG_RECVMSG4, bpf_attach_type::BPF_CGROUP_UDP4_RECVMSG),
            (m::PROG_RECVMSG6, bpf_attach_type::BPF_CGROUP_UDP6_RECVMSG),
        ] {
            let (prog_id, link_id) = load_and_link(&mut ebpf, name, attach_type, &layout, &target)?;
            program_ids.push(prog_id);
            link_ids.push(link_id);
        }
        // Only now that connect4/connect6 handle UDP sockets: an older agent's separate
        // UDP connect programs go (until here they kept balancing; the two never both
        // rewrite a connect, as the second sees a backend, not a Service).
        remove_retired_links(&layout)?;

        let log = match log_forward::LogForwarder::start(program_ids[0]) {
            Ok(l) => Some(l),
            // Diagnostics are not worth failing the datapath for.
            Err(e) => {
                warn!(error = %e, "eBPF log forwarding is off");
                None
            }
        };

        let services: BpfHashMap<_, ServiceKey, ServiceValue> = take_map(&mut ebpf, m::SERVICES)?;
        let stats: PerCpuArray<_, ServiceStats> = take_map(&mut ebpf, m::SERVICE_STATS)?;
        let orig_dst = take_map(&mut ebpf, m::ORIG_DST)?;
        let errors = take_map(&mut ebpf, m::ERRORS)?;
        let heartbeat = take_map(&mut ebpf, m::HEARTBEAT)?;
        let config_map = take_map(&mut ebpf, m::CONFIG)?;
        let sets: BpfHashMap<_, u32, BackendSet> = take_map(&mut ebpf, m::BACKENDS)?;
        let backend_table = take_map(&mut ebpf, m::BACKEND_TABLE)?;
        let conns = take_map(&mut ebpf, m::BACKEND_CONNS)?;
        let remote = take_map(&mut ebpf, m::BACKEND_REMOTE)?;
        let mut slot_epochs: Array<_, u32> = take_map(&mut ebpf, m::SLOT_EPOCH)?;
        let ports_map: BpfHashMap<_, ServiceKey, SlotRef> = take_map(&mut ebpf, m::SERVER_PORTS)?;
        let host_map: BpfHashMap<_, [u8; 16], u32> = take_map(&mut ebpf, m::HOST_ADDRS)?;
        let udp_hold = take_map(&mut ebpf, m::UDP_HOLD)?;
        let sock_bal = take_map(&mut ebpf, m::SOCK_BAL)?;
        let live = load_live_iter(&mut ebpf, btf.as_ref())?;
        // The links hold the programs; the loader's handles are no longer needed.
        drop(ebpf);

        let mut entries = HashMap::new();
        for kv in services.iter() {
            let (k, v) = kv.map_err(LoadError::ReadServices)?;
            entries.insert(k, v);
        }
        let used: BTreeSet<Slot> = entries.values().map(|v| v.slot).collect();
        let free_slots = (0..m::MAX_SERVICES).filter(|s| !used.contains(s)).collect();
        let adopted = entries.len();
        // Slot epochs as the adopted services have them (an agent from before SLOT_EPOCH
        // left none), and 0 for free slots, so no old socket counts on them.
        let epoch_of: HashMap<Slot, u32> = entries.values().map(|v| (v.slot, v.epoch)).collect();
        let found: Vec<u32> = slot_epochs
            .iter()
            .collect::<Result<_, _>>()
            .map_err(LoadError::ReadServices)?;
        for (slot, have) in found.into_iter().enumerate() {
            let slot = slot as Slot;
            let want = epoch_of.get(&slot).copied().unwrap_or(0);
            if have != want {
                slot_epochs.set(slot, want, 0).map_err(|source| {
                    LoadError::Datapath(DatapathError::ReadStats { slot, source })
                })?;
            }
        }
        // Server-side ports of adopted services carry on; the others' are dropped.
        let mut server_ports = ServerPorts {
            map: ports_map,
            by_slot: HashMap::new(),
            owner: HashMap::new(),
        };
        let mut stale_ports = vec![];
        for kv in server_ports.map.iter() {
            let (k, v) = kv.map_err(LoadError::ReadServices)?;
            if epoch_of.get(&v.slot) == Some(&v.epoch) {
                server_ports.by_slot.entry(v.slot).or_default().insert(k);
                server_ports.owner.insert(k, v.slot);
            } else {
                stale_ports.push(k);
            }
        }
        for k in stale_ports {
            let _ = server_ports.map.remove(&k);
        }
        // Sets of services still in the table carry on (their ids and generations
        // match what sockets recorded); a set whose service is gone is dropped.
        let balance = balance::BalanceTable::adopt(sets, backend_table, conns, remote, &used)
            .map_err(LoadError::ReadServices)?;
        let dp = Datapath {
            layout,
            cgroup: env.cgroup.clone(),
            link_ids,
            program_ids,
            table: Mutex::new(ServiceTable {
                services,
                stats,
                slot_epochs,
                entries,
                free_slots,
                next_epoch: sys::monotonic_ns() as u32,
                offsets: HashMap::new(),
            }),
            balance: Mutex::new(balance),
            orig_dst,
            errors,
            heartbeat: Mutex::new(heartbeat),
            config: Mutex::new((config_map, Config::default())),
            server_ports: Mutex::new(server_ports),
            host_addrs: Mutex::new({
                let have = host_map.keys().filter_map(Result::ok).collect();
                (host_map, have)
            }),
            live,
            udp_hold: Mutex::new(udp_hold),
            sock_bal: Mutex::new((sock_bal, balanced_sweep::Sweeper::default())),
            corrections: [AtomicU64::new(0), AtomicU64::new(0)],
            _log: log,
        };
        dp.set_config(cfg.proxy_v4, cfg.proxy_v6, cfg.deadman_max_age)?;
        dp.set_kube_proxy_skip_mark(cfg.kube_proxy_skip_mark)?;
        dp.heartbeat()?;
        info!(
            pin_dir = %dp.layout.dir().display(),
            cgroup = %dp.cgroup.display(),
            services = adopted,
            "eBPF datapath ready"
        );
        Ok(dp)
    }

    /// Removes every link and pin of `cfg.instance` (detaching its programs), whether or
    /// not an agent is running. Idempotent.
    pub fn cleanup(cfg: &DatapathConfig) -> Result<CleanupReport, LoadError> {
        if !pins::valid_instance(&cfg.instance) {
            return Err(LoadError::InvalidInstance {
                name: cfg.instance.clone(),
            });
        }
        let bpffs = match &cfg.bpffs {
            Some(b) => b.clone(),
            None => {
                let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
                match prereq::bpffs_mount(&mounts) {
                    Some(b) => b,
                    // Without a bpffs nothing can be pinned, so nothing is attached
                    // either: there is nothing to clean.
                    None => {
                        info!("no bpffs mounted: nothing pinned, nothing to clean up");
                        return Ok(CleanupReport {
                            dir_removed: true,
                            ..CleanupReport::default()
                        });
                    }
                }
            }
        };
        let layout = pins::PinLayout::new(&bpffs, &cfg.instance);
        let report = layout
            .remove_all()
            .map_err(|source| LoadError::RemovePins {
                path: layout.dir().to_path_buf(),
                source,
            })?;
        info!(
            pin_dir = %layout.dir().display(),
            links = report.links_removed.len(),
            maps = report.maps_removed.len(),
            "eBPF datapath cleaned up"
        );
        Ok(report)
    }

    /// Detaches the programs and removes every pin of this instance.
    pub fn detach(self) -> Result<CleanupReport, LoadError> {
        let layout = self.layout.clone();
        drop(self);
        layout.remove_all().map_err(|source| LoadError::RemovePins {
            path: layout.dir().to_path_buf(),
            source,
        })
    }

    /// Adds a service, or changes its mode if it is there; returns its slot. A new
    /// service starts with zeroed counters.
    pub fn upsert_service(
        &self,
        addr: SocketAddr,
        proto: Proto,
        mode: Mode,
    ) -> Result<Slot, DatapathError> {
        // UDP holds and balances as TCP does (see `set_udp_hold` for where its held
        // datagrams go).
        let key = service_key(addr, proto);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = t.entries.get(&key).copied() {
            if v.mode != mode.raw() {
                let nv = ServiceValue {
                    mode: mode.raw(),
                    ..v
                };
                t.services
                    .insert(key, nv, 0)
                    .map_err(|source| DatapathError::UpdateService {
                        addr,
                        proto,
                        source,
                    })?;
                t.entries.insert(key, nv);
                debug!(%addr, ?proto, ?mode, slot = v.slot, "service mode changed");
            }
            return Ok(v.slot);
        }
        let slot = t.free_slots.pop_first().ok_or(DatapathError::TableFull {
            max: m::MAX_SERVICES,
        })?;
        let result = t.insert_new(key, slot, mode, addr, proto);
        if result.is_err() {
            t.free_slots.insert(slot);
        }
        result?;
        debug!(%addr, ?proto, ?mode, slot, "service added");
        Ok(slot)
    }

    /// Changes the mode of a service that is in the table. Applies to the next connect.
    pub fn set_mode(
        &self,
        addr: SocketAddr,
        proto: Proto,
        mode: Mode,
    ) -> Result<Slot, DatapathError> {
        let known = {
            let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            t.entries.contains_key(&service_key(addr, proto))
        };
        if !known {
            return Err(DatapathError::ServiceNotFound { addr, proto });
        }
        self.upsert_service(addr, proto, mode)
    }

    /// Removes a service; its connects are no longer counted or held. Returns whether it
    /// was there.
    pub fn remove_service(&self, addr: SocketAddr, proto: Proto) -> Result<bool, DatapathError> {
        let key = service_key(addr, proto);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Some(v) = t.entries.get(&key).copied() else {
            return Ok(false);
        };
        match t.services.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(DatapathError::RemoveService {
                    addr,
                    proto,
                    source,
                });
            }
        }
        t.entries.remove(&key);
        if proto == Proto::Udp {
            let mut h = self.udp_hold.lock().unwrap_or_else(|p| p.into_inner());
            match h.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(error) => warn!(%addr, %error, "removing a UDP hold entry failed"),
            }
        }
        // No socket of the old service counts on the slot any more.
        if let Err(error) = t.slot_epochs.set(v.slot, 0, 0) {
            warn!(slot = v.slot, %error, "clearing a slot's epoch failed");
        }
        t.offsets.remove(&v.slot);
        self.balance
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear(v.slot);
        self.server_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear(v.slot);
        t.free_slots.insert(v.slot);
        debug!(%addr, ?proto, slot = v.slot, "service removed");
        Ok(true)
    }

    /// Where a UDP Service's held datagrams go: the agent's hold socket of each family
    /// (bound on the configured proxy address of that family; `None`: that family's
    /// datagrams are let through, counted as released). Both `None` removes the entry.
    pub fn set_udp_hold(
        &self,
        addr: SocketAddr,
        v4_port: Option<u16>,
        v6_port: Option<u16>,
    ) -> Result<(), DatapathError> {
        let key = service_key(addr, Proto::Udp);
        let mut h = self.udp_hold.lock().unwrap_or_else(|p| p.into_inner());
        let result = if v4_port.is_none() && v6_port.is_none() {
            match h.remove(&key) {
                Err(MapError::KeyNotFound) => Ok(()),
                r => r,
            }
        } else {
            let value = m::UdpHold {
                v4_port: v4_port.unwrap_or(0).to_be_bytes(),
                v6_port: v6_port.unwrap_or(0).to_be_bytes(),
            };
            h.insert(key, value, 0)
        };
        result.map_err(|source| DatapathError::UpdateService {
            addr,
            proto: Proto::Udp,
            source,
        })
    }

    /// Sets the ready backends a balance-mode service's connects go to (the set is kept
    /// whatever the mode, so a switch to balance takes effect at once), all in one
    /// tier and with the default algorithm. See [`Datapath::set_balance`].
    pub fn set_backends(
        &self,
        addr: SocketAddr,
        proto: Proto,
        backends: &[SocketAddr],
    ) -> Result<(), DatapathError> {
        let tiered: Vec<(SocketAddr, Tier)> = backends.iter().map(|a| (*a, Tier::Remote)).collect();
        self.set_balance(addr, proto, &tiered, LoadBalancing::default())
    }

    /// Sets the ready backends of a balance-mode service, each with its topology tier,
    /// and how they are chosen. A backend that stays keeps its index, its count and its
    /// ready time; one that goes gets no new connects, while its open connections carry
    /// on; one that comes is ready from now (its slow start begins), unless the set is
    /// new to this agent (then nobody knows since when, and all count as warm). An
    /// empty list makes balance mode hold.
    pub fn set_balance(
        &self,
        addr: SocketAddr,
        proto: Proto,
        backends: &[(SocketAddr, Tier)],
        balancing: LoadBalancing,
    ) -> Result<(), DatapathError> {
        let mut wanted: Vec<(SocketAddr, Tier)> = backends.to_vec();
        wanted.sort();
        wanted.dedup_by_key(|(a, _)| *a);
        if wanted.len() > m::MAX_BACKENDS as usize {
            return Err(DatapathError::TooManyBackends {
                addr,
                proto,
                count: wanted.len(),
                max: m::MAX_BACKENDS,
            });
        }
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let key = service_key(addr, proto);
        let slot = t
            .entries
            .get(&key)
            .ok_or(DatapathError::ServiceNotFound { addr, proto })?
            .slot;
        let wanted: Vec<Backend> = wanted
            .iter()
            .map(|(a, tier)| Backend {
                tier: tier.raw(),
                ..backend_entry(*a, 0)
            })
            .collect();
        let count = self
            .balance
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(slot, &wanted, balancing)
            .map_err(|e| match e {
                balance::BalanceError::Map(source) => DatapathError::WriteBackends {
                    addr,
                    proto,
                    source,
                },
                balance::BalanceError::IdsExhausted { needed, free } => {
                    DatapathError::BackendIdsExhausted {
                        addr,
                        proto,
                        needed,
                        free,
                    }
                }
            })?;
        debug!(%addr, ?proto, slot, backends = count, algorithm = balancing.algorithm.name(), "balance backends set");
        Ok(())
    }

    /// Least connections over sets of more than `LC_CANDIDATES` backends compares the
    /// candidates the agent lists per set: this refreshes them from the counts now.
    /// Call it every `LC_REFRESH_MS`. Returns how many sets changed.
    pub fn refresh_least_loaded(&self) -> Result<usize, DatapathError> {
        self.balance
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refresh_candidates()
            .map_err(DatapathError::RefreshCandidates)
    }

    /// Sets the other nodes' open connections to a balanced service's backends (0 for
    /// a backend `remote` does not name): every choice adds them to this node's own
    /// counts. Returns how many backends have a non-zero remote load.
    pub fn set_remote_loads(
        &self,
        addr: SocketAddr,
        proto: Proto,
        remote: &[(SocketAddr, u64)],
    ) -> Result<usize, DatapathError> {
        let slot = {
            let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            t.entries
                .get(&service_key(addr, proto))
                .ok_or(DatapathError::ServiceNotFound { addr, proto })?
                .slot
        };
        let remote: Vec<(Backend, u64)> = remote
            .iter()
            .map(|(a, n)| (backend_entry(*a, 0), *n))
            .collect();
        self.balance
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_remote(slot, &remote)
            .map_err(|source| DatapathError::WriteBackends {
                addr,
                proto,
                source,
            })
    }

    /// The other nodes' open connections to each backend of a balanced service, as last
    /// written by [`Datapath::set_remote_loads`].
    pub fn remote_loads(
        &self,
        addr: SocketAddr,
        proto: Proto,
    ) -> Result<Vec<BackendCounters>, DatapathError> {
        self.backend_counts(addr, proto, balance::BalanceTable::remote_counts)
    }

    /// Backend ids free for new balance backends on this node (of `MAX_BACKEND_IDS`).
    pub fn free_backend_ids(&self) -> usize {
        self.balance
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free_ids()
    }

    /// The backends set for a service, each with its open connections now.
    pub fn backends(
        &self,
        addr: SocketAddr,
        proto: Proto,
    ) -> Result<Vec<BackendCounters>, DatapathError> {
        self.backend_counts(addr, proto, balance::BalanceTable::local_counts)
    }

    /// The members of a balanced service's set with the counts `read` gives for them
    /// (this node's or the other nodes'), in address order.
    fn backend_counts(
        &self,
        addr: SocketAddr,
        proto: Proto,
        read: CountsReader,
    ) -> Result<Vec<BackendCounters>, DatapathError> {
        let slot = {
            let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            t.entries
                .get(&service_key(addr, proto))
                .ok_or(DatapathError::ServiceNotFound { addr, proto })?
                .slot
        };
        let listed = read(
            &self.balance.lock().unwrap_or_else(|p| p.into_inner()),
            slot,
        )
        .map_err(|source| DatapathError::ReadBackends {
            addr,
            proto,
            source,
        })?;
        let mut out: Vec<BackendCounters> = listed
            .iter()
            .map(|(e, open_now)| BackendCounters {
                addr: socket_addr(&e.addr, u16::from_be_bytes(e.port)),
                open_now: *open_now,
            })
            .collect();
        out.sort_by_key(|c| c.addr);
        Ok(out)
    }

    /// The service at `addr`/`proto`, if managed.
    pub fn service(&self, addr: SocketAddr, proto: Proto) -> Option<ServiceEntry> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let key = service_key(addr, proto);
        t.entries.get(&key).and_then(|v| entry(&key, v))
    }

    /// Every managed service.
    pub fn services(&self) -> Vec<ServiceEntry> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.entries.iter().filter_map(|(k, v)| entry(k, v)).collect()
    }

    /// The counters of the service in `slot`, summed over CPUs.
    pub fn stats(&self, slot: Slot) -> Result<ServiceCounters, DatapathError> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if slot >= m::MAX_SERVICES || t.free_slots.contains(&slot) {
            return Err(DatapathError::UnknownSlot { slot });
        }
        let per_cpu = t
            .stats
            .get(&slot, 0)
            .map_err(|source| DatapathError::ReadStats { slot, source })?;
        let mut c = ServiceCounters::default();
        for s in per_cpu.iter() {
            c.connects += s.connects;
            c.opened += s.opened;
            c.closed += s.closed;
            c.redirected += s.redirected;
            c.released += s.released;
            c.accepted += s.accepted;
            c.accepted_closed += s.accepted_closed;
            c.from_host += s.from_host;
        }
        // Opens and closes of one connection may land on different CPUs; only the sum
        // is meaningful. The reconcile's offsets make up for closes the counters missed.
        let (client, server) = t.offsets.get(&slot).copied().unwrap_or((0, 0));
        c.open_now = live::corrected_open(c.client_side(), client);
        c.accepted_open = live::corrected_open(c.server_side(), server);
        Ok(c)
    }

    /// The backend pods' (address, port) pairs of a service whose accepted connections
    /// count for it (server side). Replaces the earlier list. An address already counted
    /// for another service stays with that one (two Services selecting the same pods
    /// and port cannot both count the same accept).
    pub fn set_server_ports(
        &self,
        addr: SocketAddr,
        proto: Proto,
        backends: &[SocketAddr],
    ) -> Result<(), DatapathError> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let key = service_key(addr, proto);
        let v = *t
            .entries
            .get(&key)
            .ok_or(DatapathError::ServiceNotFound { addr, proto })?;
        let mut ports = self.server_ports.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: BTreeSet<ServiceKey> =
            backends.iter().map(|b| service_key(*b, proto)).collect();
        let have = ports.by_slot.get(&v.slot).cloned().unwrap_or_default();
        let write_err = |source| DatapathError::WriteServerPorts {
            addr,
            proto,
            source,
        };
        for k in have.difference(&wanted) {
            match ports.map.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(write_err(source)),
            }
            ports.owner.remove(k);
            if let Some(s) = ports.by_slot.get_mut(&v.slot) {
                s.remove(k);
            }
        }
        for k in wanted.difference(&have) {
            if ports.owner.get(k).is_some_and(|s| *s != v.slot) {
                continue;
            }
            let value = SlotRef {
                slot: v.slot,
                epoch: v.epoch,
            };
            ports.map.insert(*k, value, 0).map_err(write_err)?;
            ports.owner.insert(*k, v.slot);
            ports.by_slot.entry(v.slot).or_default().insert(*k);
        }
        Ok(())
    }

    /// The node's own addresses: connections backend pods accept from these (the
    /// kubelet's probes) are not counted. Replaces the earlier set.
    pub fn set_host_addresses(&self, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        let wanted: BTreeSet<[u8; 16]> = addrs.iter().map(|a| ip16(*a)).collect();
        let mut guard = self.host_addrs.lock().unwrap_or_else(|p| p.into_inner());
        let (map, have) = &mut *guard;
        for k in have.difference(&wanted) {
            match map.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(DatapathError::WriteHostAddresses(source)),
            }
        }
        for k in wanted.difference(have) {
            map.insert(*k, 1, 0)
                .map_err(DatapathError::WriteHostAddresses)?;
        }
        *have = wanted;
        Ok(())
    }

    /// The server-side ports a service counts on now.
    pub fn server_ports(&self, addr: SocketAddr, proto: Proto) -> Vec<SocketAddr> {
        let Some(slot) = self.service(addr, proto).map(|e| e.slot) else {
            return vec![];
        };
        let ports = self.server_ports.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<SocketAddr> = ports
            .by_slot
            .get(&slot)
            .into_iter()
            .flatten()
            .map(|k| socket_addr(&k.addr, k.port()))
            .collect();
        out.sort();
        out
    }

    /// Brings every service's open counts (client and server side) back to the live
    /// sockets the kernel holds, where the counters drifted: the counters are read, the
    /// live sockets walked twice, the counters read again, and a slot is corrected only
    /// if nothing moved meanwhile and both walks agree (else the next call looks again).
    /// Every correction is counted ([`Datapath::corrections`]).
    pub fn reconcile_open_counts(&self) -> Result<ReconcileReport, DatapathError> {
        let read_all =
            |t: &ServiceTable| -> Result<HashMap<Slot, (u32, ServiceCounters)>, DatapathError> {
                let mut out = HashMap::new();
                for v in t.entries.values() {
                    out.insert(v.slot, (v.epoch, t.raw_counters(v.slot)?));
                }
                Ok(out)
            };
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let servers = self.server_index();
        let before = read_all(&t)?;
        let first = self
            .live
            .walk(&servers)
            .map_err(DatapathError::WalkLiveSockets)?;
        let second = self
            .live
            .walk(&servers)
            .map_err(DatapathError::WalkLiveSockets)?;
        let after = read_all(&t)?;
        let mut report = ReconcileReport::default();
        for (slot, (epoch, b)) in &before {
            let Some((epoch_after, a)) = after.get(slot) else {
                continue;
            };
            if epoch_after != epoch {
                continue;
            }
            let w1 = first.get(&(*slot, *epoch)).copied().unwrap_or_default();
            let w2 = second.get(&(*slot, *epoch)).copied().unwrap_or_default();
            let offsets = t.offsets.get(slot).copied().unwrap_or((0, 0));
            let mut next = offsets;
            let client = live::correction(
                b.client_side(),
                a.client_side(),
                w1.client,
                w2.client,
                offsets.0,
            );
            let server = live::correction(
                b.server_side(),
                a.server_side(),
                w1.server,
                w2.server,
                offsets.1,
            );
            if b.client_side() != a.client_side() || b.server_side() != a.server_side() {
                report.busy += 1;
            }
            if let Some(o) = client {
                debug!(
                    slot,
                    from = offsets.0,
                    to = o,
                    live = w2.client,
                    "client-side open count corrected"
                );
                next.0 = o;
                report.client_corrections += 1;
            }
            if let Some(o) = server {
                debug!(
                    slot,
                    from = offsets.1,
                    to = o,
                    live = w2.server,
                    "server-side open count corrected"
                );
                next.1 = o;
                report.server_corrections += 1;
            }
            if next != offsets {
                t.offsets.insert(*slot, next);
            }
        }
        self.corrections[0].fetch_add(report.client_corrections, Ordering::Relaxed);
        self.corrections[1].fetch_add(report.server_corrections, Ordering::Relaxed);
        Ok(report)
    }

    /// Records of balanced sockets (SOCK_BAL entries) now: open and connecting ones, and
    /// connects that failed before their SYN until [`Datapath::sweep_balanced`] deletes
    /// them.
    pub fn balanced_records(&self) -> usize {
        let guard = self.sock_bal.lock().unwrap_or_else(|p| p.into_inner());
        guard.0.keys().map_while(Result::ok).count()
    }

    /// Deletes the SOCK_BAL entries of balanced connects that failed before their SYN
    /// (see `balanced_sweep`); returns how many. Call it at an interval: an entry goes
    /// at the second call that finds it unflagged and unchanged.
    pub fn sweep_balanced(&self) -> usize {
        let mut guard = self.sock_bal.lock().unwrap_or_else(|p| p.into_inner());
        let (map, sweeper) = &mut *guard;
        // Entries deleted while the walk runs end it early or are skipped: what is
        // missed now is found at the next sweep.
        let entries: Vec<(u64, m::BalancedSock)> = map.iter().map_while(Result::ok).collect();
        let mut deleted = 0;
        for (cookie, was) in sweeper.sweep(entries) {
            // Only if it is still as it was read (a new connect of the socket stays).
            if map.get(&cookie, 0).ok() == Some(was) && map.remove(&cookie).is_ok() {
                deleted += 1;
            }
        }
        deleted
    }

    /// What the server side counts now (SERVER_PORTS as the kernel has it, and the
    /// node's addresses), for the walk to find the same connections the programs count.
    fn server_index(&self) -> live::ServerIndex {
        let mut idx = live::ServerIndex::default();
        {
            let ports = self.server_ports.lock().unwrap_or_else(|p| p.into_inner());
            for (k, v) in ports.map.iter().flatten() {
                if k.proto == m::PROTO_TCP {
                    idx.ports.insert((k.addr, k.port()), (v.slot, v.epoch));
                }
            }
        }
        let hosts = self.host_addrs.lock().unwrap_or_else(|p| p.into_inner());
        idx.hosts = hosts.1.iter().copied().collect();
        idx
    }

    /// Open-count corrections made since this datapath was loaded: (client, server).
    pub fn corrections(&self) -> (u64, u64) {
        (
            self.corrections[0].load(Ordering::Relaxed),
            self.corrections[1].load(Ordering::Relaxed),
        )
    }

    /// Every managed service with its counters (one map read per service), for the
    /// metrics loop.
    pub fn all_stats(&self) -> Result<Vec<(ServiceEntry, ServiceCounters)>, DatapathError> {
        self.services()
            .into_iter()
            .map(|e| Ok((e, self.stats(e.slot)?)))
            .collect()
    }

    /// Refreshes the dead-man heartbeat. Call it from an interval well inside
    /// `deadman_max_age`.
    pub fn heartbeat(&self) -> Result<(), DatapathError> {
        let mut hb = self.heartbeat.lock().unwrap_or_else(|p| p.into_inner());
        hb.set(0, sys::monotonic_ns(), 0)
            .map_err(DatapathError::WriteHeartbeat)
    }

    /// Sets where held connects go and the dead-man bound.
    pub fn set_config(
        &self,
        proxy_v4: Option<SocketAddrV4>,
        proxy_v6: Option<SocketAddrV6>,
        deadman_max_age: Duration,
    ) -> Result<(), DatapathError> {
        let mut c = Config {
            deadman_max_age_ns: u64::try_from(deadman_max_age.as_nanos()).unwrap_or(u64::MAX),
            ..Config::default()
        };
        if let Some(a) = proxy_v4 {
            c.proxy_v4_addr = a.ip().octets();
            c.proxy_v4_port = a.port().to_be_bytes();
            c.flags |= m::CONFIG_PROXY_V4;
        }
        if let Some(a) = proxy_v6 {
            c.proxy_v6_addr = a.ip().octets();
            c.proxy_v6_port = a.port().to_be_bytes();
            c.flags |= m::CONFIG_PROXY_V6;
        }
        let mut guard = self.config.lock().unwrap_or_else(|p| p.into_inner());
        c.skip_mark = guard.1.skip_mark;
        guard.0.set(0, c, 0).map_err(DatapathError::WriteConfig)?;
        guard.1 = c;
        Ok(())
    }

    /// Sets the socket mark bit balance mode puts on the connects it sends to a backend
    /// (0: none), which the kube-proxy skip rule matches (see `kube_proxy_skip`).
    pub fn set_kube_proxy_skip_mark(&self, mark: u32) -> Result<(), DatapathError> {
        let mut guard = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let mut c = guard.1;
        c.skip_mark = mark;
        guard.0.set(0, c, 0).map_err(DatapathError::WriteConfig)?;
        guard.1 = c;
        Ok(())
    }

    /// For a connection the proxy accepted from `peer`: the ClusterIP:port the client
    /// dialled, if the connection was redirected by hold mode. `None` otherwise (or if
    /// the client has already gone).
    pub fn original_destination(&self, peer: SocketAddr) -> Option<OriginalDst> {
        let key = OrigDstKey::new(ip16(peer.ip()), peer.port());
        match self.orig_dst.get(&key, 0) {
            Ok(v) => Some(OriginalDst {
                addr: socket_addr(&v.service.addr, v.service.port()),
                slot: v.slot,
            }),
            Err(MapError::KeyNotFound) => None,
            Err(error) => {
                warn!(%peer, %error, "reading the original destination failed");
                None
            }
        }
    }

    /// The programs' fail-open counters.
    pub fn error_counters(&self) -> Result<ErrorCounters, DatapathError> {
        let mut out = ErrorCounters::default();
        for kind in 0..ERROR_KINDS {
            let v = match self.errors.get(&kind, 0) {
                Ok(v) => v,
                // An ERRORS map pinned by an older agent has fewer kinds: the newer
                // ones read as zero until the map is made anew.
                Err(MapError::OutOfBounds { .. }) => continue,
                Err(e) => return Err(DatapathError::ReadErrors(e)),
            };
            out.counts[kind as usize] = v.iter().sum();
        }
        Ok(out)
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// `<bpffs>/nemesis/<instance>`.
    pub fn pin_dir(&self) -> &Path {
        self.layout.dir()
    }

    /// Kernel ids of the links (connect4, connect6, sock_ops, getpeername4,
    /// getpeername6, and UDP's sendmsg4, sendmsg6, recvmsg4, recvmsg6).
    pub fn link_ids(&self) -> &[u32] {
        &self.link_ids
    }

    /// Kernel ids of the programs now running in the links.
    pub fn program_ids(&self) -> &[u32] {
        &self.program_ids
    }
}

fn backend_entry(addr: SocketAddr, generation: u32) -> Backend {
    Backend {
        addr: ip16(addr.ip()),
        port: addr.port().to_be_bytes(),
        tier: m::TIER_REMOTE,
        _pad: 0,
        generation,
        ready_ns: 0,
    }
}

impl ServiceCounters {
    fn client_side(&self) -> live::SideCount {
        live::SideCount {
            opened: self.opened,
            closed: self.closed,
        }
    }

    fn server_side(&self) -> live::SideCount {
        live::SideCount {
            opened: self.accepted,
            closed: self.accepted_closed,
        }
    }
}

impl ServerPorts {
    /// Forgets every server-side port of a slot (its service is gone).
    fn clear(&mut self, slot: Slot) {
        for k in self.by_slot.remove(&slot).unwrap_or_default() {
            self.owner.remove(&k);
            match self.map.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(error) => warn!(slot, %error, "removing a server-side port failed"),
            }
        }
    }
}

impl ServiceTable {
    /// The slot's counters summed over CPUs, without the reconcile's offsets.
    fn raw_counters(&self, slot: Slot) -> Result<ServiceCounters, DatapathError> {
        let per_cpu = self
            .stats
            .get(&slot, 0)
            .map_err(|source| DatapathError::ReadStats { slot, source })?;
        let mut c = ServiceCounters::default();
        for s in per_cpu.iter() {
            c.opened += s.opened;
            c.closed += s.closed;
            c.accepted += s.accepted;
            c.accepted_closed += s.accepted_closed;
        }
        Ok(c)
    }

    fn insert_new(
        &mut self,
        key: ServiceKey,
        slot: Slot,
        mode: Mode,
        addr: SocketAddr,
        proto: Proto,
    ) -> Result<(), DatapathError> {
        // Counters of a reused slot start from zero; the epoch keeps sockets of the
        // slot's previous service from touching them.
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, source)| DatapathError::ResetStats { slot, source })?;
        let zeros = PerCpuValues::try_from(vec![ServiceStats::default(); cpus])
            .map_err(|source| DatapathError::ResetStats { slot, source })?;
        self.stats
            .set(slot, zeros, 0)
            .map_err(|source| DatapathError::ReadStats { slot, source })?;
        self.next_epoch = match self.next_epoch.wrapping_add(1) {
            0 => 1, // 0 marks a free slot
            e => e,
        };
        self.offsets.remove(&slot);
        let v = ServiceValue {
            slot,
            mode: mode.raw(),
            epoch: self.next_epoch,
            _pad: 0,
        };
        // The epoch first: a socket that connects once the service is visible must find
        // its slot current when it is established.
        self.slot_epochs
            .set(slot, v.epoch, 0)
            .map_err(|source| DatapathError::ReadStats { slot, source })?;
        self.services
            .insert(key, v, 0)
            .map_err(|source| DatapathError::UpdateService {
                addr,
                proto,
                source,
            })?;
        self.entries.insert(key, v);
        Ok(())
    }
}

// === loading ===

struct LinkTarget<'a> {
    cgroup: &'a Path,
    cgroup_file: &'a File,
    cgroup_id: u64,
}

/// Loads program `name` and puts it in its pinned link: swapped into the existing link
/// if an earlier agent pinned one for this cgroup, else attached and pinned anew.
/// Returns (program id, link id).
fn load_and_link(
    ebpf: &mut Ebpf,
    name: &'static str,
    attach_type: bpf_attach_type,
    layout: &pins::PinLayout,
    target: &LinkTarget<'_>,
) -> Result<(u32, u32), LoadError> {
    let missing = || LoadError::MissingInObject {
        kind: "program",
        name: name.to_string(),
    };
    let program = ebpf.program_mut(name).ok_or_else(missing)?;
    let load_err = |source| LoadError::LoadProgram { name, source };
    let is_sock_ops = attach_type == bpf_attach_type::BPF_CGROUP_SOCK_OPS;
    if is_sock_ops {
        let p: &mut SockOps = program.try_into().map_err(load_err)?;
        p.load().map_err(load_err)?;
    } else {
        let p: &mut CgroupSockAddr = program.try_into().map_err(load_err)?;
        p.load().map_err(load_err)?;
    }
    let prog_id = program.info().map_err(load_err)?.id();
    let prog_fd = program.fd().map_err(load_err)?;

    let path = layout.link(name);
    if let Some(link_id) = adopt_link(&path, prog_fd.as_fd(), attach_type, target)? {
        info!(
            program = name,
            link_id, prog_id, "adopted pinned link, new program swapped in"
        );
        return Ok((prog_id, link_id));
    }

    let attach_err = |source| LoadError::AttachProgram {
        name,
        cgroup: target.cgroup.to_path_buf(),
        source,
    };
    // Links on cgroups (kernel >= 5.7, which the prerequisites demand) always run
    // alongside other programs (a CNI, another agent instance), and the kernel rejects
    // any attach flag on them; `Single` is aya's "no flags".
    let mode = CgroupAttachMode::Single;
    let fd_link: FdLink = if is_sock_ops {
        let p: &mut SockOps = program.try_into().map_err(load_err)?;
        let id = p.attach(target.cgroup_file, mode).map_err(attach_err)?;
        let link = p.take_link(id).map_err(attach_err)?;
        link.try_into()
            .map_err(|e: aya::programs::links::LinkError| LoadError::PinLink {
                name,
                path: path.clone(),
                source: Box::new(e),
            })?
    } else {
        let p: &mut CgroupSockAddr = program.try_into().map_err(load_err)?;
        let id = p.attach(target.cgroup_file, mode).map_err(attach_err)?;
        let link = p.take_link(id).map_err(attach_err)?;
        link.try_into()
            .map_err(|e: aya::programs::links::LinkError| LoadError::PinLink {
                name,
                path: path.clone(),
                source: Box::new(e),
            })?
    };
    let link_id = fd_link
        .info()
        .map(|i| i.id())
        .map_err(|e| LoadError::PinLink {
            name,
            path: path.clone(),
            source: Box::new(e),
        })?;
    // The pin keeps the link (and so the program) attached after this process exits.
    fd_link.pin(&path).map_err(|e| LoadError::PinLink {
        name,
        path: path.clone(),
        source: Box::new(e),
    })?;
    info!(program = name, link_id, prog_id, "attached and pinned link");
    Ok((prog_id, link_id))
}

/// Loads the `live_sockets` iterator (a `tcp` socket iterator) and links it. Not
/// pinned: each agent makes its own link, which keeps the program loaded for the
/// agent's life.
fn load_live_iter(ebpf: &mut Ebpf, btf: Option<&aya::Btf>) -> Result<live::LiveIter, LoadError> {
    let name = m::PROG_LIVE_SOCKETS;
    let load_err = |source| LoadError::LoadIterator { name, source };
    let btf = match btf {
        Some(b) => b,
        None => return Err(load_err(ProgramError::UnexpectedProgramType)),
    };
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| LoadError::MissingInObject {
            kind: "program",
            name: name.to_string(),
        })?;
    let p: &mut Iter = program.try_into().map_err(load_err)?;
    p.load("tcp", btf).map_err(load_err)?;
    let prog_fd = p.fd().map_err(load_err)?;
    let link = sys::iter_link(prog_fd.as_fd())
        .map_err(|source| LoadError::LinkIterator { name, source })?;
    Ok(live::LiveIter::new(link))
}

/// Swaps `prog` into the link pinned at `path`, if there is one attached to the
/// target cgroup. A link whose cgroup is gone is unpinned so a fresh one is made.
fn adopt_link(
    path: &Path,
    prog: std::os::fd::BorrowedFd<'_>,
    attach_type: bpf_attach_type,
    target: &LinkTarget<'_>,
) -> Result<Option<u32>, LoadError> {
    let adopt_err = |source| LoadError::AdoptLink {
        path: path.to_path_buf(),
        source,
    };
    let fd = match sys::obj_get(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(adopt_err(e)),
    };
    let info = sys::cgroup_link_info(fd.as_fd()).map_err(adopt_err)?;
    let stale = match info {
        Some(i) if i.cgroup_id == 0 => true,
        Some(i) if i.attach_type != attach_type as u32 => true,
        Some(i) if i.cgroup_id != target.cgroup_id => {
            return Err(LoadError::PinnedLinkElsewhere {
                path: path.to_path_buf(),
                cgroup: target.cgroup.to_path_buf(),
                expected: target.cgroup_id,
                found: i.cgroup_id,
            });
        }
        Some(_) => false,
        None => true,
    };
    if stale {
        warn!(path = %path.display(), "pinned link is defunct or foreign; replacing it");
        drop(fd);
        std::fs::remove_file(path).map_err(adopt_err)?;
        return Ok(None);
    }
    sys::link_update(fd.as_fd(), prog).map_err(adopt_err)?;
    Ok(info.map(|i| i.link_id))
}

/// (name, key size, value size) of every pinned map, as this agent lays them out.
fn expected_layouts() -> [(&'static str, u32, u32); 20] {
    use std::mem::size_of;
    let sz = |n: usize| n as u32;
    [
        (
            m::SERVICES,
            sz(size_of::<ServiceKey>()),
            sz(size_of::<ServiceValue>()),
        ),
        (m::SERVICE_STATS, 4, sz(size_of::<ServiceStats>())),
        (m::SOCKETS, 8, sz(size_of::<m::SockRecord>())),
        (
            m::ORIG_DST,
            sz(size_of::<OrigDstKey>()),
            sz(size_of::<OrigDst>()),
        ),
        (m::CONFIG, 4, sz(size_of::<Config>())),
        (m::HEARTBEAT, 4, 8),
        (m::ERRORS, 4, 8),
        (m::BACKENDS, 4, sz(size_of::<BackendSet>())),
        (m::BACKEND_TABLE, 4, sz(size_of::<Backend>())),
        (m::BACKEND_CONNS, 4, 8),
        (m::BACKEND_REMOTE, 4, 8),
        (m::SOCK_BACKEND, 8, sz(size_of::<m::SockBackend>())),
        (m::BALANCE_RR, 4, 4),
        (m::SLOT_EPOCH, 4, 4),
        (
            m::SERVER_PORTS,
            sz(size_of::<ServiceKey>()),
            sz(size_of::<SlotRef>()),
        ),
        (m::SOCK_LIVE, 4, sz(size_of::<LiveSock>())),
        (m::HOST_ADDRS, 16, 4),
        (m::SOCK_PEER, 4, sz(size_of::<m::PeerRewrite>())),
        (m::SOCK_BALANCED_REC, 4, sz(size_of::<m::BalancedSock>())),
        (m::SOCK_BAL, 8, sz(size_of::<m::BalancedSock>())),
    ]
}

/// (name, key size, value size) of the UDP maps (kept apart from the TCP ones).
fn udp_layouts() -> [(&'static str, u32, u32); 3] {
    use std::mem::size_of;
    let sz = |n: usize| n as u32;
    [
        (m::SOCK_UDP, 4, sz(size_of::<m::UdpFlow>())),
        (
            m::UDP_REV,
            sz(size_of::<m::UdpRevKey>()),
            sz(size_of::<m::UdpRevValue>()),
        ),
        (
            m::UDP_HOLD,
            sz(size_of::<ServiceKey>()),
            sz(size_of::<m::UdpHold>()),
        ),
    ]
}

/// Unpins maps of earlier layouts this agent no longer uses (their sockets' counts die
/// with them; the new maps start empty, and the agent writes its sets anew).
/// Unpins the links of [`pins::RETIRED_PROGRAMS`] an older agent left, which detaches
/// their programs (no one else holds them).
fn remove_retired_links(layout: &pins::PinLayout) -> Result<(), LoadError> {
    for name in pins::RETIRED_PROGRAMS {
        let path = layout.link(name);
        match std::fs::remove_file(&path) {
            Ok(()) => info!(path = %path.display(), "removed a retired pinned link"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(LoadError::RemovePins { path, source }),
        }
    }
    Ok(())
}

fn remove_retired_maps(layout: &pins::PinLayout) -> Result<(), LoadError> {
    for name in m::RETIRED_MAPS {
        let path = layout.map(name);
        match std::fs::remove_file(&path) {
            Ok(()) => info!(path = %path.display(), "removed a retired pinned map"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(LoadError::RemovePins { path, source }),
        }
    }
    Ok(())
}

/// Refuses pinned maps whose layout differs from this agent's (an incompatible
/// earlier version): programs would read their bytes wrongly.
fn check_pinned_maps(layout: &pins::PinLayout) -> Result<(), LoadError> {
    for (name, key, value) in expected_layouts().into_iter().chain(udp_layouts()) {
        let path = layout.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| LoadError::ReadPinnedMap {
            path: path.clone(),
            source,
        })?;
        let found = (info.key_size(), info.value_size());
        if found != (key, value) {
            return Err(LoadError::PinnedMapLayout {
                path,
                found,
                expected: (key, value),
            });
        }
    }
    Ok(())
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| LoadError::MissingInObject {
            kind: "map",
            name: name.to_string(),
        })?;
    T::try_from(map).map_err(|source| LoadError::OpenMap { name, source })
}

// === addresses ===

fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => m::v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

fn socket_addr(addr: &[u8; 16], port: u16) -> SocketAddr {
    match m::as_v4(addr) {
        Some(v4) => SocketAddr::from((Ipv4Addr::from(v4), port)),
        None => SocketAddr::from((Ipv6Addr::from(*addr), port)),
    }
}

fn service_key(addr: SocketAddr, proto: Proto) -> ServiceKey {
    ServiceKey::new(ip16(addr.ip()), addr.port(), proto.raw())
}

fn entry(k: &ServiceKey, v: &ServiceValue) -> Option<ServiceEntry> {
    Some(ServiceEntry {
        addr: socket_addr(&k.addr, k.port()),
        proto: Proto::from_raw(k.proto)?,
        slot: v.slot,
        mode: Mode::from_raw(v.mode),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_object_has_every_map_with_the_shared_layout() {
        let obj = aya_obj::Object::parse(OBJECT).expect("the embedded eBPF object parses");
        for (name, key, value) in expected_layouts().into_iter().chain(udp_layouts()) {
            let map = obj
                .maps
                .get(name)
                .unwrap_or_else(|| panic!("map {name} is missing from nemesis-ebpf"));
            assert_eq!(
                (map.key_size(), map.value_size()),
                (key, value),
                "map {name}"
            );
        }
        for p in pins::PROGRAMS.iter().chain(pins::UDP_PROGRAMS.iter()) {
            assert!(
                obj.programs.contains_key(*p),
                "program {p} is missing from nemesis-ebpf"
            );
        }
    }

    #[test]
    fn datapath_can_be_shared_across_tasks() {
        fn shared<T: Send + Sync>() {}
        shared::<Datapath>();
    }

    #[test]
    fn v4_and_v4_mapped_addresses_share_one_service_key() {
        let v4: SocketAddr = "127.96.0.9:80".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.96.0.9]:80".parse().unwrap();
        assert_eq!(service_key(v4, Proto::Tcp), service_key(mapped, Proto::Tcp));
        assert_ne!(service_key(v4, Proto::Tcp), service_key(v4, Proto::Udp));
        let k = service_key(v4, Proto::Tcp);
        assert_eq!(socket_addr(&k.addr, k.port()), v4);
        let v6: SocketAddr = "[::1]:443".parse().unwrap();
        let k = service_key(v6, Proto::Tcp);
        assert_eq!(socket_addr(&k.addr, k.port()), v6);
    }
}
