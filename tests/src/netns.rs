//! Pod networking for the sandbox: one bridge per sandbox in the root namespace and one
//! network namespace per pod, joined to it by a veth pair, dual-stack: an IPv4 address
//! from 198.18.0.0/15 (DESIGN.md "Addresses in tests and the demo") and an IPv6 one from
//! the unique local range fd6e:6d00::/32 (never routable). It never touches an address
//! outside those ranges, nor an interface or namespace it did not name itself.
//!
//! The /15 holds 512 /24 subnets; subnet `X` also owns the IPv6 /64
//! `fd6e:6d00:0:X::/64` (bridge `::1`, pod host `N` at `::N`). A sandbox claims one
//! (`X`) with an exclusive `flock`
//! on a file under [`LOCK_DIR`], so parallel test processes never share a bridge, and
//! what a killed sandbox left behind (its lock died with it) is removed, processes
//! included, by the next sandbox that starts.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

/// The range every pod address comes from: reserved for benchmarks (RFC 2544), so it
/// can never be somebody's real network.
pub const POD_RANGE: &str = "198.18.0.0/15";
/// The IPv6 range of every pod and Service address: unique local (RFC 4193), so it can
/// never be somebody's real network; an `unreachable` route keeps it on this machine.
pub const POD_RANGE_V6: &str = "fd6e:6d00::/32";
/// Number of /24 subnets in [`POD_RANGE`], one per live sandbox.
pub const SUBNETS: u16 = 512;
/// First and last host number of a pod in its /24 (`.1` is the bridge, `.255` broadcast).
pub const FIRST_POD_HOST: u8 = 2;
pub const LAST_POD_HOST: u8 = 254;
/// Where the per-subnet lock files live: tmpfs, so a reboot forgets stale claims.
pub const LOCK_DIR: &str = "/run/nemesis-sandbox";
/// An `ip` invocation is a netlink round trip; seconds mean the machine is wedged.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

// === pure address and name allocation ===

/// The bridge (gateway) address of subnet `index`: 198.18.0.1 .. 198.19.255.1.
pub fn gateway_address(index: u16) -> Ipv4Addr {
    pod_address(index, 1)
}

/// Host `host` of subnet `index` (0..[`SUBNETS`]).
pub fn pod_address(index: u16, host: u8) -> Ipv4Addr {
    assert!(
        index < SUBNETS,
        "subnet index {index} outside 198.18.0.0/15"
    );
    Ipv4Addr::new(198, 18 + (index / 256) as u8, (index % 256) as u8, host)
}

/// Host `host` of subnet `index`'s IPv6 /64: `fd6e:6d00:0:<index>::<host>`.
pub fn pod_address_v6(index: u16, host: u8) -> Ipv6Addr {
    assert!(
        index < SUBNETS,
        "subnet index {index} outside fd6e:6d00:0::/55"
    );
    Ipv6Addr::new(0xfd6e, 0x6d00, 0, index, 0, 0, 0, u16::from(host))
}

/// The bridge's IPv6 address of subnet `index` (the node's IPv6 address as pods see it).
pub fn gateway_address_v6(index: u16) -> Ipv6Addr {
    pod_address_v6(index, 1)
}

/// The /24 of subnet `index` in CIDR notation.
pub fn subnet_cidr(index: u16) -> String {
    let a = pod_address(index, 0);
    format!("{a}/24")
}

/// The lowest pod host number not in `used`, or `None` when the /24 is full.
pub fn next_free_host(used: &BTreeSet<u8>) -> Option<u8> {
    (FIRST_POD_HOST..=LAST_POD_HOST).find(|h| !used.contains(h))
}

/// The order in which a sandbox tries subnets: every subnet once, starting at a point
/// picked from `seed`, so parallel sandboxes rarely contend for the same lock.
pub fn subnet_claim_order(seed: u32) -> impl Iterator<Item = u16> {
    let start = (seed % u32::from(SUBNETS)) as u16;
    (0..SUBNETS).map(move |i| (start + i) % SUBNETS)
}

/// Bridge name of subnet `index` (at most 6 of the 15 characters Linux allows).
pub fn bridge_name(index: u16) -> String {
    format!("nmb{index}")
}

/// Network namespace of the pod at `host` in subnet `index`.
pub fn netns_name(index: u16, host: u8) -> String {
    format!("{}{host}", netns_prefix(index))
}

fn netns_prefix(index: u16) -> String {
    format!("nm{index}p")
}

/// Root-namespace end of the pod's veth pair (the pod's end is `eth0`).
pub fn veth_name(index: u16, host: u8) -> String {
    format!("{}{host}", veth_prefix(index))
}

fn veth_prefix(index: u16) -> String {
    format!("nm{index}v")
}

/// Whether `ip -o -4 addr show` output holds an address inside subnet `index` on an
/// interface other than our own bridge: then somebody else uses that /24 and we skip it.
pub fn subnet_used_by_others(ip_addr_output: &str, index: u16) -> bool {
    let ours = bridge_name(index);
    let base = pod_address(index, 0).octets();
    ip_addr_output.lines().any(|line| {
        let mut words = line.split_whitespace();
        let Some(ifname) = words.nth(1) else {
            return false;
        };
        let Some(addr) = words
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
        else {
            return false;
        };
        addr.octets()[..3] == base[..3] && ifname.trim_end_matches(':') != ours
    })
}

// === errors ===

/// A failed `ip` invocation: what ran and what it said.
#[derive(Debug, thiserror::Error)]
pub enum IpError {
    #[error("`ip {args}` could not start: {source}")]
    Spawn {
        args: String,
        source: std::io::Error,
    },
    #[error("`ip {args}` did not finish within {IP_TIMEOUT:?}")]
    Timeout { args: String },
    #[error("`ip {args}` failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("installing the safety route `unreachable {POD_RANGE}`: {0}")]
    RouteUnreachable(#[source] IpError),
    #[error("creating the lock directory {LOCK_DIR}: {0}")]
    CreateLockDir(#[source] std::io::Error),
    #[error("opening subnet lock file {path}: {source}")]
    OpenSubnetLock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("listing root-namespace addresses: {0}")]
    ListAddresses(#[source] IpError),
    #[error("no free pod subnet: all {SUBNETS} /24s of {POD_RANGE} are claimed or in use")]
    ClaimSubnet,
    #[error("creating bridge {bridge}: {source}")]
    CreateBridge { bridge: String, source: IpError },
    #[error("no free pod address in {subnet}: every host from .2 to .254 is attached")]
    AllocateAddress { subnet: String },
    #[error("creating pod network namespace {netns}: {source}")]
    CreatePodNetns { netns: String, source: IpError },
    #[error("deleting pod network namespace {netns}: {source}")]
    DeletePodNetns { netns: String, source: IpError },
    #[error("deleting bridge {bridge}: {source}")]
    DeleteBridge { bridge: String, source: IpError },
}

// === running `ip` ===

async fn ip(args: &[&str]) -> Result<String, IpError> {
    let joined = args.join(" ");
    let child = tokio::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(IP_TIMEOUT, child).await {
        Err(_) => return Err(IpError::Timeout { args: joined }),
        Ok(Err(source)) => {
            return Err(IpError::Spawn {
                args: joined,
                source,
            });
        }
        Ok(Ok(out)) => out,
    };
    if !out.status.success() {
        return Err(IpError::Failed {
            args: joined,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Blocking twin of [`ip`] for `Drop`, where no runtime may be left; errors are ignored
/// by the callers because the object is already gone or will be reclaimed next claim.
fn ip_blocking(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// SIGKILL every process still inside `netns` (blocking; used for stale and Drop cleanup).
fn kill_netns_processes_blocking(netns: &str) {
    let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "pids", netns])
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

// === the per-sandbox network ===

/// One sandbox's bridge and subnet. Cheap to share (`Arc`); dropping the last handle
/// removes every namespace, veth and the bridge it created (best effort).
#[derive(Debug)]
pub struct PodNetwork {
    index: u16,
    bridge: String,
    used: Mutex<BTreeSet<u8>>,
    torn_down: AtomicBool,
    // Held for the sandbox's lifetime; the kernel releases it if the process dies.
    _lock: Flock<File>,
}

/// A pod's network namespace with its address. Call [`PodNetns::teardown`]; dropping it
/// without does the same synchronously, as a fallback.
#[derive(Debug)]
pub struct PodNetns {
    network: Arc<PodNetwork>,
    host: u8,
    name: String,
    veth: String,
    ip: Ipv4Addr,
    ip_v6: Ipv6Addr,
    torn_down: bool,
}

static CLAIMS_IN_PROCESS: AtomicU32 = AtomicU32::new(0);

impl PodNetwork {
    /// Installs the safety route, claims a free /24 and creates its bridge.
    pub async fn create() -> Result<Arc<Self>, NetnsError> {
        ip(&["route", "replace", "unreachable", POD_RANGE])
            .await
            .map_err(NetnsError::RouteUnreachable)?;
        ip(&["-6", "route", "replace", "unreachable", POD_RANGE_V6])
            .await
            .map_err(NetnsError::RouteUnreachable)?;
        std::fs::create_dir_all(LOCK_DIR).map_err(NetnsError::CreateLockDir)?;
        let _ = tokio::task::spawn_blocking(reap_abandoned_blocking).await;
        let addrs = ip(&["-o", "-4", "addr", "show"])
            .await
            .map_err(NetnsError::ListAddresses)?;
        let seed = std::process::id()
            .wrapping_mul(7)
            .wrapping_add(CLAIMS_IN_PROCESS.fetch_add(1, Ordering::Relaxed));
        for index in subnet_claim_order(seed) {
            if subnet_used_by_others(&addrs, index) {
                continue;
            }
            let path = Path::new(LOCK_DIR).join(format!("subnet-{index}.lock"));
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| NetnsError::OpenSubnetLock {
                    path: path.clone(),
                    source,
                })?;
            let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                continue;
            };
            remove_stale(index).await;
            let bridge = bridge_name(index);
            let gw = format!("{}/24", gateway_address(index));
            let gw6 = format!("{}/64", gateway_address_v6(index));
            let created = async {
                ip(&["link", "add", &bridge, "type", "bridge"]).await?;
                ip(&["addr", "add", &gw, "dev", &bridge]).await?;
                // nodad: usable at once (duplicate detection would keep it tentative,
                // unbindable, for a second or two; the /64 is ours alone).
                ip(&["addr", "add", &gw6, "dev", &bridge, "nodad"]).await?;
                ip(&["link", "set", &bridge, "up"]).await
            }
            .await;
            if let Err(source) = created {
                ip_blocking(&["link", "del", &bridge]);
                return Err(NetnsError::CreateBridge { bridge, source });
            }
            tracing::info!(%bridge, subnet = %subnet_cidr(index), "pod network created");
            return Ok(Arc::new(Self {
                index,
                bridge,
                used: Mutex::new(BTreeSet::new()),
                torn_down: AtomicBool::new(false),
                _lock: lock,
            }));
        }
        Err(NetnsError::ClaimSubnet)
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The subnet index this network claimed (0..[`SUBNETS`]).
    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn gateway(&self) -> Ipv4Addr {
        gateway_address(self.index)
    }

    /// The bridge's IPv6 address.
    pub fn gateway_v6(&self) -> Ipv6Addr {
        gateway_address_v6(self.index)
    }

    pub fn subnet(&self) -> String {
        subnet_cidr(self.index)
    }

    /// Creates a namespace for one pod, with `eth0` at the next free address, a default
    /// route via the bridge and `lo` up.
    pub async fn attach(self: &Arc<Self>) -> Result<PodNetns, NetnsError> {
        let host = {
            let mut used = self.used.lock().expect("pod address set poisoned");
            let host = next_free_host(&used).ok_or_else(|| NetnsError::AllocateAddress {
                subnet: self.subnet(),
            })?;
            used.insert(host);
            host
        };
        let name = netns_name(self.index, host);
        let veth = veth_name(self.index, host);
        let ip_addr = pod_address(self.index, host);
        let mut pod = PodNetns {
            network: Arc::clone(self),
            host,
            name,
            veth,
            ip: ip_addr,
            ip_v6: pod_address_v6(self.index, host),
            torn_down: false,
        };
        if let Err(source) = pod.create().await {
            let netns = pod.name.clone();
            pod.teardown_blocking();
            return Err(NetnsError::CreatePodNetns { netns, source });
        }
        tracing::debug!(netns = %pod.name, ip = %pod.ip, "pod netns attached");
        Ok(pod)
    }

    fn release(&self, host: u8) {
        self.used
            .lock()
            .expect("pod address set poisoned")
            .remove(&host);
    }

    /// Deletes the bridge; pods still attached lose their link. Idempotent.
    pub async fn shutdown(&self) -> Result<(), NetnsError> {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        remove_stale(self.index).await;
        ip(&["link", "del", &self.bridge])
            .await
            .map_err(|source| NetnsError::DeleteBridge {
                bridge: self.bridge.clone(),
                source,
            })?;
        tracing::info!(bridge = %self.bridge, "pod network removed");
        Ok(())
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if !*self.torn_down.get_mut() {
            remove_stale_blocking(self.index);
            ip_blocking(&["link", "del", &self.bridge]);
        }
    }
}

/// Removes whatever namespaces and veths of subnet `index` exist: leftovers of a
/// sandbox that died without cleaning up (we hold the subnet's lock, so none is live).
async fn remove_stale(index: u16) {
    // Blocking work is a handful of `ip` calls; keep it off the async workers.
    let _ = tokio::task::spawn_blocking(move || remove_stale_blocking(index)).await;
}

fn remove_stale_blocking(index: u16) {
    let ns_prefix = netns_prefix(index);
    if let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    {
        for ns in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|ns| owned_name(ns, &ns_prefix))
        {
            kill_netns_processes_blocking(ns);
            ip_blocking(&["netns", "del", ns]);
        }
    }
    let veth_prefix = veth_prefix(index);
    if let Ok(out) = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
    {
        for link in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .map(|n| n.trim_end_matches(':').split('@').next().unwrap_or(""))
            })
        {
            if owned_name(link, &veth_prefix) {
                ip_blocking(&["link", "del", link]);
            }
        }
    }
}

/// The subnet indices that own objects among `names` (namespaces and links): bridges
/// `nmb<X>`, pod namespaces `nm<X>p<N>` and veths `nm<X>v<N>`.
pub fn indices_with_objects<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<u16> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    names
        .into_iter()
        .filter_map(|name| {
            let index = if let Some(x) = name.strip_prefix("nmb") {
                x
            } else {
                let rest = name.strip_prefix("nm")?;
                let (x, host) = rest.split_once(['p', 'v'])?;
                if !digits(host) {
                    return None;
                }
                x
            };
            if !digits(index) {
                return None;
            }
            index.parse::<u16>().ok().filter(|i| *i < SUBNETS)
        })
        .collect()
}

/// Removes the objects of every subnet no live sandbox holds: what sandboxes killed
/// without a chance to clean up (a test timed out, a SIGKILL) left behind, processes
/// in their pod namespaces included.
fn reap_abandoned_blocking() {
    let mut names = Vec::new();
    for args in [&["netns", "list"][..], &["-o", "link", "show"][..]] {
        if let Ok(out) = std::process::Command::new("ip").args(args).output() {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            names.extend(text.lines().filter_map(|l| {
                let word = if args[0] == "netns" {
                    l.split_whitespace().next()
                } else {
                    l.split_whitespace().nth(1)
                }?;
                Some(word.trim_end_matches(':').split('@').next()?.to_string())
            }));
        }
    }
    for index in indices_with_objects(names.iter().map(String::as_str)) {
        let path = Path::new(LOCK_DIR).join(format!("subnet-{index}.lock"));
        let Ok(file) = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        // Held by a live sandbox: its objects are in use.
        let Ok(_lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        tracing::info!(subnet = %subnet_cidr(index), "removing an abandoned sandbox's pod network");
        remove_stale_blocking(index);
        ip_blocking(&["link", "del", &bridge_name(index)]);
    }
}

/// `name` is `prefix` followed by a host number only (so `nm1p` never matches `nm12p3`).
fn owned_name(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

impl PodNetns {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.network.gateway()
    }

    /// The pod's IPv6 address.
    pub fn ip_v6(&self) -> Ipv6Addr {
        self.ip_v6
    }

    pub fn gateway_v6(&self) -> Ipv6Addr {
        self.network.gateway_v6()
    }

    async fn create(&self) -> Result<(), IpError> {
        let (ns, veth) = (self.name.as_str(), self.veth.as_str());
        let addr = format!("{}/24", self.ip);
        let gw = self.network.gateway().to_string();
        ip(&["netns", "add", ns]).await?;
        ip(&[
            "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])
        .await?;
        ip(&["link", "set", veth, "master", &self.network.bridge, "up"]).await?;
        ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"]).await?;
        ip(&["-n", ns, "link", "set", "eth0", "up"]).await?;
        ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
        ip(&["-n", ns, "route", "add", "default", "via", &gw]).await?;
        let addr6 = format!("{}/64", self.ip_v6);
        let gw6 = self.network.gateway_v6().to_string();
        ip(&["-n", ns, "addr", "add", &addr6, "dev", "eth0", "nodad"]).await?;
        ip(&["-n", ns, "-6", "route", "add", "default", "via", &gw6]).await?;
        // Addresses are reused lowest first: the node may still map this one to the
        // MAC of the pod that had it last (a REACHABLE neighbour entry lives 15-45 s).
        // Frames to that MAC reach nobody, and the new pod's probes and connections
        // time out until the entry expires: a woken app stayed unready for over 10 s.
        let bridge = self.network.bridge.as_str();
        ip(&["neigh", "flush", "to", &self.ip.to_string(), "dev", bridge]).await?;
        ip(&[
            "-6",
            "neigh",
            "flush",
            "to",
            &self.ip_v6.to_string(),
            "dev",
            bridge,
        ])
        .await?;
        Ok(())
    }

    /// Deletes the veth pair and the namespace. Processes still inside are killed first:
    /// the kubelet should have stopped them, and a namespace must not outlive its pod.
    pub async fn teardown(mut self) -> Result<(), NetnsError> {
        self.torn_down = true;
        let ns = self.name.clone();
        let _ = tokio::task::spawn_blocking(move || kill_netns_processes_blocking(&ns)).await;
        // Deleting one end of a veth deletes both; absence is fine (already gone).
        let _ = ip(&["link", "del", &self.veth]).await;
        let res = ip(&["netns", "del", &self.name]).await;
        self.network.release(self.host);
        res.map_err(|source| NetnsError::DeletePodNetns {
            netns: self.name.clone(),
            source,
        })?;
        tracing::debug!(netns = %self.name, "pod netns removed");
        Ok(())
    }

    fn teardown_blocking(&mut self) {
        if std::mem::replace(&mut self.torn_down, true) {
            return;
        }
        kill_netns_processes_blocking(&self.name);
        ip_blocking(&["link", "del", &self.veth]);
        ip_blocking(&["netns", "del", &self.name]);
        self.network.release(self.host);
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        self.teardown_blocking();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_cover_exactly_198_18_0_0_slash_15() {
        assert_eq!(pod_address(0, 2), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(gateway_address(255), Ipv4Addr::new(198, 18, 255, 1));
        assert_eq!(gateway_address(256), Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(pod_address(511, 254), Ipv4Addr::new(198, 19, 255, 254));
        assert_eq!(subnet_cidr(257), "198.19.1.0/24");
    }

    #[test]
    fn ipv6_addresses_are_unique_local_one_slash_64_per_subnet() {
        assert_eq!(
            pod_address_v6(3, 2),
            "fd6e:6d00:0:3::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            gateway_address_v6(511),
            "fd6e:6d00:0:1ff::1".parse::<Ipv6Addr>().unwrap()
        );
        assert!(pod_address_v6(0, 2).segments()[..2] == [0xfd6e, 0x6d00]);
    }

    #[test]
    #[should_panic(expected = "outside 198.18.0.0/15")]
    fn subnet_index_past_the_range_is_refused() {
        pod_address(SUBNETS, 2);
    }

    #[test]
    fn hosts_are_allocated_lowest_first_and_reused_after_release() {
        let mut used = BTreeSet::new();
        assert_eq!(next_free_host(&used), Some(2));
        used.extend([2, 3, 5]);
        assert_eq!(next_free_host(&used), Some(4));
        let full: BTreeSet<u8> = (FIRST_POD_HOST..=LAST_POD_HOST).collect();
        assert_eq!(next_free_host(&full), None);
    }

    #[test]
    fn claim_order_visits_every_subnet_once_from_the_seed() {
        let order: Vec<u16> = subnet_claim_order(1000).collect();
        assert_eq!(order.len(), usize::from(SUBNETS));
        assert_eq!(order[0], 1000 % 512);
        let distinct: BTreeSet<u16> = order.iter().copied().collect();
        assert_eq!(distinct.len(), usize::from(SUBNETS));
    }

    #[test]
    fn interface_names_fit_the_kernel_limit() {
        for name in [bridge_name(511), netns_name(511, 254), veth_name(511, 254)] {
            assert!(name.len() <= 15, "{name} too long");
        }
    }

    #[test]
    fn objects_are_traced_to_their_subnet_and_foreign_names_ignored() {
        let names = [
            "nmb7",
            "nm7p2",
            "nm12v3",
            "nm300p254",
            "nmbr0",
            "nm5",
            "nm5p",
            "nm5px",
            "eth0",
            "nm999p2",
            "lo",
        ];
        let found: Vec<u16> = indices_with_objects(names).into_iter().collect();
        assert_eq!(found, [7, 12, 300]);
    }

    #[test]
    fn owned_names_match_only_their_own_subnet() {
        assert!(owned_name("nm1p3", "nm1p"));
        assert!(!owned_name("nm12p3", "nm1p"));
        assert!(!owned_name("nm1p", "nm1p"));
        assert!(!owned_name("nm1pod", "nm1p"));
    }

    #[test]
    fn a_subnet_on_a_foreign_interface_is_in_use_but_our_own_bridge_is_not() {
        let out = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                   7: nmbr0    inet 198.18.0.1/24 scope global nmbr0\\ valid_lft forever\n\
                   9: nmb5    inet 198.18.5.1/24 scope global nmb5\\ valid_lft forever\n";
        assert!(subnet_used_by_others(out, 0));
        assert!(!subnet_used_by_others(out, 5));
        assert!(!subnet_used_by_others(out, 6));
    }
}
