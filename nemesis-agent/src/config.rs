//! The agent's command line: subcommands and flags, each flag also read from
//! `NEMESIS_AGENT_<SETTING>`. Parsing only; never reads the machine or starts anything.

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};

use crate::ebpf::DatapathConfig;

/// Instance name when none is given: one agent per node needs no more.
pub const DEFAULT_INSTANCE: &str = "default";
/// The proxy's listener for held IPv4 connects. Loopback serves clients in the host's
/// network namespace only (a pod's 127.0.0.1 is its own): a cluster passes the node IP
/// (`status.hostIP`), which pods reach and which is local to host-network clients too.
pub const DEFAULT_PROXY_V4: &str = "127.0.0.1:15001";
/// Heartbeat period: 15 beats fit in the default dead-man bound, so a slow beat or
/// two never releases held traffic.
pub const DEFAULT_HEARTBEAT_INTERVAL: &str = "1s";
/// See `ebpf::DEFAULT_DEADMAN_MAX_AGE`.
pub const DEFAULT_DEADMAN_MAX_AGE: &str = "15s";
/// The admin listener (`/metrics`, `/healthz`, `/readyz`): on every address, so that
/// Prometheus and the kubelet's probes reach a host-network DaemonSet pod.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9464";
/// Reports to the controller: its view of open connections is at most this old.
pub const DEFAULT_CONTROLLER_HEARTBEAT_INTERVAL: &str = "5s";
/// On shutdown, connections the proxy still has (held or forwarding) get this long to
/// finish before the process exits; a DaemonSet's grace period is 30 s by default.
pub const DEFAULT_SHUTDOWN_GRACE: &str = "10s";
/// kube-proxy's `minSyncPeriod` is 1 s by default: twice that before going direct.
pub const DEFAULT_DIRECT_AFTER_READY: &str = "2s";
/// How often open counts are checked against the live sockets: a missed close (an
/// evicted tracking record) is corrected within this, well inside any idle window
/// (the shortest a policy can ask for is the rate window, 1 minute by default).
pub const DEFAULT_COUNT_RECONCILE_INTERVAL: &str = "10s";

#[derive(Debug, Parser)]
#[command(name = "nemesis-agent", version, about = "K8s Nemesis node agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start-up; boxing buys nothing"
)]
pub enum Command {
    /// Load (or re-adopt) the eBPF datapath and run the agent.
    Run(RunArgs),
    /// Detach the programs and remove every pin of an instance.
    Cleanup(CleanupArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub datapath: DatapathArgs,
    /// How often the dead-man heartbeat is refreshed (e.g. `500ms`, `1s`).
    #[arg(long, env = "NEMESIS_AGENT_HEARTBEAT_INTERVAL", default_value = DEFAULT_HEARTBEAT_INTERVAL, value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Detach and unpin everything on exit (for demos; a DaemonSet keeps the datapath
    /// across restarts instead).
    #[arg(long, env = "NEMESIS_AGENT_DETACH_ON_EXIT")]
    pub detach_on_exit: bool,
    /// The admin listener: `/metrics`, `/healthz`, `/readyz` (port 0: any free port).
    #[arg(long, env = "NEMESIS_AGENT_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,
    /// The controller's agent API, e.g.
    /// `https://nemesis-controller.nemesis-system.svc:9443` (with --controller-ca-file),
    /// or plain `http://...:8080` for a controller without --agent-tls-secret.
    /// Without it no wake-ups are sent: held connections wait for endpoints that come
    /// by other means, and no heartbeats are reported.
    #[arg(long, env = "NEMESIS_AGENT_CONTROLLER_URL")]
    pub controller_url: Option<String>,
    /// The CA (PEM) the controller's certificate is checked against, with an
    /// `https://` --controller-url: the `ca.crt` of the ConfigMap the controller
    /// publishes (`nemesis-agent-ca`), or the operator's CA.
    #[arg(
        long,
        env = "NEMESIS_AGENT_CONTROLLER_CA_FILE",
        requires = "controller_url"
    )]
    pub controller_ca_file: Option<PathBuf>,
    /// File holding the bearer token presented to the controller: the agent's projected
    /// ServiceAccount token (audience `nemesis-controller`), read again for every call so
    /// a rotated token is used at once. Required with `--controller-url`.
    #[arg(
        long,
        visible_alias = "token-file",
        env = "NEMESIS_AGENT_TOKEN_FILE",
        requires = "controller_url"
    )]
    pub agent_token_file: Option<PathBuf>,
    /// This node's name, sent with wake-ups and heartbeats (default: the host name).
    #[arg(long, env = "NEMESIS_AGENT_NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's zone, for balance mode's `preferSameZone`. Default: the
    /// `topology.kubernetes.io/zone` label of this agent's Node, read once at start
    /// (needs get on nodes); without either only same-node preference applies.
    #[arg(long, env = "NEMESIS_AGENT_ZONE")]
    pub zone: Option<String>,
    /// How often the agent reports to the controller (sooner after a mode change).
    #[arg(long, env = "NEMESIS_AGENT_CONTROLLER_HEARTBEAT_INTERVAL", default_value = DEFAULT_CONTROLLER_HEARTBEAT_INTERVAL, value_parser = parse_duration)]
    pub controller_heartbeat_interval: Duration,
    /// Connections held at once by this agent, over all Services.
    #[arg(long, env = "NEMESIS_AGENT_MAX_HELD_TOTAL", default_value_t = crate::proxy::DEFAULT_MAX_HELD_TOTAL)]
    pub max_held_total: usize,
    /// How long connections still in the proxy's hands may finish at shutdown.
    #[arg(long, env = "NEMESIS_AGENT_SHUTDOWN_GRACE", default_value = DEFAULT_SHUTDOWN_GRACE, value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// A woken Service's connects keep going through the proxy this long after its
    /// backends became ready, so the node's Service proxy (kube-proxy, Cilium) has
    /// programmed them before connects go direct. Raise it where kube-proxy syncs slowly
    /// (large clusters, iptables mode).
    #[arg(long, env = "NEMESIS_AGENT_DIRECT_AFTER_READY", default_value = DEFAULT_DIRECT_AFTER_READY, value_parser = parse_duration)]
    pub direct_after_ready: Duration,
    /// How connects to a Service that is not held go: `balance` (the default) sends each
    /// to a ready backend from the eBPF hook itself, chosen as the policy's
    /// `loadBalancing` says, so a woken Service goes direct at once
    /// (`--direct-after-ready` is not waited); `passthrough` leaves them to the node's
    /// Service proxy (kube-proxy, Cilium).
    #[arg(long, env = "NEMESIS_AGENT_DIRECT_MODE", value_enum, default_value_t = DirectMode::Balance)]
    pub direct_mode: DirectMode,
    /// How often the open-connection counts are reconciled against the kernel's live
    /// sockets (every correction is counted in
    /// `nemesis_agent_open_count_corrections_total`).
    #[arg(long, env = "NEMESIS_AGENT_COUNT_RECONCILE_INTERVAL", default_value = DEFAULT_COUNT_RECONCILE_INTERVAL, value_parser = parse_duration)]
    pub count_reconcile_interval: Duration,
    /// The node addresses (comma-separated) the hold listeners bind, which hold
    /// EndpointSlices list for callers that never dial a ClusterIP (Ingress
    /// controllers, NodePorts, meshes). Default: `--node-addresses`, else the IP of
    /// `--proxy-v4` (and of `--proxy-v6`) unless it is a loopback or unspecified
    /// address; none: this agent serves no hold listener.
    #[arg(long, env = "NEMESIS_AGENT_HOLD_ADDRESSES", value_delimiter = ',')]
    pub hold_addresses: Vec<IpAddr>,
    /// The node's addresses, one per family (comma-separated, as the downward API's
    /// `status.hostIPs` gives them). They make IPv6 and dual-stack Services held and
    /// counted by default: the hold listeners bind them, and without `--proxy-v6` the
    /// node's IPv6 address gets the IPv6 proxy listener (at `--proxy-v4`'s port).
    #[arg(long, env = "NEMESIS_AGENT_NODE_ADDRESSES", value_delimiter = ',')]
    pub node_addresses: Vec<IpAddr>,
    /// Opt-in: a socket mark bit (exactly one, e.g. `0x2000`; pick one no other
    /// component of the node uses) that balance mode sets on the connects it sends to a
    /// pod, and an iptables rule at the head of the nat OUTPUT chain (kept there, removed
    /// when the agent stops) that lets exactly those connects skip kube-proxy's
    /// KUBE-SERVICES walk. See "kube-proxy skip rule" in manifests/README.md.
    #[arg(long, env = "NEMESIS_AGENT_KUBE_PROXY_SKIP_MARK", value_parser = parse_mark)]
    pub kube_proxy_skip_mark: Option<u32>,
    #[command(flatten)]
    pub kube_proxy_skip: SkipCommandArgs,
}

/// The iptables commands the kube-proxy skip rule is written (and removed) with.
#[derive(Debug, Clone, Args)]
pub struct SkipCommandArgs {
    /// One command per address family (comma-separated), the same iptables flavour
    /// kube-proxy uses (`iptables-legacy,ip6tables-legacy` on legacy nodes).
    #[arg(long, env = "NEMESIS_AGENT_KUBE_PROXY_SKIP_COMMANDS", value_delimiter = ',', default_values_t = crate::kube_proxy_skip::DEFAULT_COMMANDS.iter().map(|c| c.to_string()))]
    pub kube_proxy_skip_commands: Vec<String>,
}

/// A socket mark: decimal or `0x` hexadecimal, exactly one bit.
pub fn parse_mark(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .map_err(|e| format!("{s:?}: not a 32-bit mark ({e})"))?;
    if v.count_ones() != 1 {
        return Err(format!(
            "{s:?}: the mark must be exactly one bit (e.g. 0x2000), so the rest of the socket's mark stays the application's"
        ));
    }
    Ok(v)
}

impl RunArgs {
    /// The hold listeners' addresses: `--hold-addresses`, else `--node-addresses`, else
    /// the proxy addresses' IPs that other hosts can reach.
    pub fn hold_addresses(&self) -> Vec<IpAddr> {
        let chosen = if !self.hold_addresses.is_empty() {
            self.hold_addresses.clone()
        } else if !self.node_addresses.is_empty() {
            self.node_addresses.clone()
        } else {
            let v4 = IpAddr::V4(*self.datapath.proxy_v4.ip());
            let v6 = self.proxy_v6().map(|a| IpAddr::V6(*a.ip()));
            std::iter::once(v4)
                .chain(v6)
                .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
                .collect()
        };
        let mut out = Vec::new();
        for ip in chosen {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        out
    }

    /// The IPv6 proxy listener: `--proxy-v6`, else the node's IPv6 address (from
    /// `--node-addresses`) at `--proxy-v4`'s port, else none (IPv6 connects pass
    /// unchanged).
    pub fn proxy_v6(&self) -> Option<SocketAddrV6> {
        self.datapath.proxy_v6.or_else(|| {
            self.node_addresses.iter().find_map(|ip| match ip {
                IpAddr::V6(v6) => Some(SocketAddrV6::new(*v6, self.datapath.proxy_v4.port(), 0, 0)),
                IpAddr::V4(_) => None,
            })
        })
    }
}

/// What "direct" (not held) means for a managed Service's connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DirectMode {
    /// Count, and leave the connect to the node's Service proxy.
    Passthrough,
    /// Rewrite the connect to a ready backend chosen by the policy's `loadBalancing`
    /// (socket-level balancing); hold when there is none.
    Balance,
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Also removes any kube-proxy skip rule an agent left behind.
    #[command(flatten)]
    pub kube_proxy_skip: SkipCommandArgs,
}

#[derive(Debug, Clone, Args)]
pub struct InstanceArgs {
    /// Names the pin directory `<bpffs>/nemesis/<instance>`.
    #[arg(long, env = "NEMESIS_AGENT_INSTANCE", default_value = DEFAULT_INSTANCE)]
    pub instance: String,
    /// The bpffs mount (default: found in /proc/mounts).
    #[arg(long, env = "NEMESIS_AGENT_BPFFS")]
    pub bpffs: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct DatapathArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// The cgroup v2 directory to attach to (default: the cgroup2 mount's root, i.e.
    /// every process of the node).
    #[arg(long, env = "NEMESIS_AGENT_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Where held IPv4 connects are sent: the proxy listens here (port 0: any free
    /// port, which the datapath is then told). The hook rewrites the connect in the
    /// CLIENT's network namespace, so this must be an address every client on the node
    /// reaches: in a cluster the node IP (e.g. `$(NODE_IP):15001` from `status.hostIP`,
    /// the agent on the host network); loopback only serves host-network clients. No
    /// second loopback listener is needed: the node IP is a local address for those too.
    #[arg(long, env = "NEMESIS_AGENT_PROXY_V4", default_value = DEFAULT_PROXY_V4)]
    pub proxy_v4: SocketAddrV4,
    /// Where held native IPv6 connects are sent, and a second proxy listener (none:
    /// they go through unchanged).
    #[arg(long, env = "NEMESIS_AGENT_PROXY_V6")]
    pub proxy_v6: Option<SocketAddrV6>,
    /// Hold-mode redirects stop when the heartbeat is older than this.
    #[arg(long, env = "NEMESIS_AGENT_DEADMAN_MAX_AGE", default_value = DEFAULT_DEADMAN_MAX_AGE, value_parser = parse_duration)]
    pub deadman_max_age: Duration,
    /// Entries of the socket-tracking map (default: its built-in 65,536). Tests shrink
    /// it to show that open counts survive its evictions.
    #[arg(long, hide = true, env = "NEMESIS_AGENT_SOCKET_MAP_ENTRIES")]
    pub socket_map_entries: Option<u32>,
}

impl DatapathArgs {
    pub fn to_config(&self) -> DatapathConfig {
        DatapathConfig {
            instance: self.instance.instance.clone(),
            cgroup: self.cgroup.clone(),
            bpffs: self.instance.bpffs.clone(),
            proxy_v4: Some(self.proxy_v4),
            proxy_v6: self.proxy_v6,
            deadman_max_age: self.deadman_max_age,
            socket_map_entries: self.socket_map_entries,
            kube_proxy_skip_mark: 0,
        }
    }
}

impl InstanceArgs {
    pub fn to_config(&self) -> DatapathConfig {
        DatapathConfig {
            bpffs: self.bpffs.clone(),
            ..DatapathConfig::new(self.instance.clone())
        }
    }
}

/// `250ms`, `2s`, `5m`, `1h30m`: the grammar of the ScalingPolicy's durations
/// (`nemesis_common::duration`), so one spelling works in flags and policies alike.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    nemesis_common::duration::parse(s.trim()).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_defaults_name_the_default_instance_and_loopback_proxy() {
        let cli = Cli::try_parse_from(["nemesis-agent", "run"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        let cfg = run.datapath.to_config();
        assert_eq!(cfg.instance, "default");
        assert_eq!(cfg.proxy_v4, Some("127.0.0.1:15001".parse().unwrap()));
        assert_eq!(cfg.deadman_max_age, Duration::from_secs(15));
        assert_eq!(run.heartbeat_interval, Duration::from_secs(1));
        assert!(cfg.cgroup.is_none());
    }

    #[test]
    fn the_kube_proxy_skip_is_off_by_default_and_takes_one_bit() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["nemesis-agent", "run"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).map(|cli| match cli.command {
                Command::Run(run) => run,
                Command::Cleanup(_) => panic!("expected run"),
            })
        };
        let run = parse(&[]).unwrap();
        assert_eq!(run.kube_proxy_skip_mark, None);
        assert_eq!(
            run.kube_proxy_skip.kube_proxy_skip_commands,
            ["iptables", "ip6tables"]
        );
        let run = parse(&[
            "--kube-proxy-skip-mark",
            "0x2000",
            "--kube-proxy-skip-commands",
            "iptables-legacy",
        ])
        .unwrap();
        assert_eq!(run.kube_proxy_skip_mark, Some(0x2000));
        assert_eq!(
            run.kube_proxy_skip.kube_proxy_skip_commands,
            ["iptables-legacy"]
        );
        assert_eq!(
            parse(&["--kube-proxy-skip-mark", "8192"])
                .unwrap()
                .kube_proxy_skip_mark,
            Some(0x2000)
        );
        for bad in ["0x3000", "0", "x"] {
            let err = parse(&["--kube-proxy-skip-mark", bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--kube-proxy-skip-mark"), "{err}");
        }
    }

    #[test]
    fn flags_override_defaults() {
        let cli = Cli::try_parse_from([
            "nemesis-agent",
            "run",
            "--instance",
            "t1",
            "--cgroup",
            "/sys/fs/cgroup/unified/x",
            "--proxy-v6",
            "[::1]:15002",
            "--deadman-max-age",
            "300ms",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        let cfg = run.datapath.to_config();
        assert_eq!(cfg.instance, "t1");
        assert_eq!(cfg.cgroup, Some(PathBuf::from("/sys/fs/cgroup/unified/x")));
        assert_eq!(cfg.proxy_v6, Some("[::1]:15002".parse().unwrap()));
        assert_eq!(cfg.deadman_max_age, Duration::from_millis(300));
    }

    #[test]
    fn agent_flags_parse_and_the_token_file_needs_a_controller() {
        let cli = Cli::try_parse_from([
            "nemesis-agent",
            "run",
            "--admin-listen",
            "127.0.0.1:0",
            "--controller-url",
            "http://127.0.0.1:8080",
            "--agent-token-file",
            "/run/token",
            "--node-name",
            "node-a",
            "--controller-heartbeat-interval",
            "250ms",
            "--max-held-total",
            "10",
            "--shutdown-grace",
            "1s",
            "--direct-after-ready",
            "5s",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(run.admin_listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(run.controller_url.as_deref(), Some("http://127.0.0.1:8080"));
        assert_eq!(run.agent_token_file, Some(PathBuf::from("/run/token")));
        assert_eq!(run.node_name.as_deref(), Some("node-a"));
        assert_eq!(
            run.controller_heartbeat_interval,
            Duration::from_millis(250)
        );
        assert_eq!(run.max_held_total, 10);
        assert_eq!(run.shutdown_grace, Duration::from_secs(1));
        assert_eq!(run.direct_after_ready, Duration::from_secs(5));

        let err = Cli::try_parse_from(["nemesis-agent", "run", "--token-file", "/t"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--controller-url"), "{err}");
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let mut argv = vec!["nemesis-agent", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(run) => run,
            Command::Cleanup(_) => panic!("expected run"),
        }
    }

    #[test]
    fn node_addresses_give_the_hold_listeners_and_the_ipv6_proxy_by_default() {
        let run = run_args(&[
            "--proxy-v4",
            "198.18.0.1:15001",
            "--node-addresses",
            "198.18.0.1,fd6e:6d00:0:0::1",
        ]);
        assert_eq!(
            run.hold_addresses(),
            [
                "198.18.0.1".parse::<IpAddr>().unwrap(),
                "fd6e:6d00::1".parse().unwrap()
            ]
        );
        assert_eq!(
            run.proxy_v6(),
            Some("[fd6e:6d00::1]:15001".parse().unwrap())
        );

        // Given explicitly, the flags win.
        let run = run_args(&[
            "--node-addresses",
            "198.18.0.1,fd6e:6d00::1",
            "--hold-addresses",
            "198.18.0.9",
            "--proxy-v6",
            "[::1]:15002",
        ]);
        assert_eq!(
            run.hold_addresses(),
            ["198.18.0.9".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(run.proxy_v6(), Some("[::1]:15002".parse().unwrap()));

        // Without node addresses: IPv4 only, and loopback holds nothing.
        let run = run_args(&[]);
        assert_eq!(run.proxy_v6(), None);
        assert!(run.hold_addresses().is_empty());
        let err = Cli::try_parse_from(["nemesis-agent", "run", "--node-addresses", "node-a"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--node-addresses"), "{err}");
    }

    #[test]
    fn direct_mode_defaults_to_balance_and_keeps_passthrough() {
        let run = |args: &[&str]| {
            let mut argv = vec!["nemesis-agent", "run"];
            argv.extend_from_slice(args);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Run(run)) => Ok(run.direct_mode),
                Ok(_) => panic!("expected run"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(run(&[]), Ok(DirectMode::Balance));
        assert_eq!(run(&["--direct-mode", "balance"]), Ok(DirectMode::Balance));
        assert_eq!(
            run(&["--direct-mode", "passthrough"]),
            Ok(DirectMode::Passthrough)
        );
        let err = run(&["--direct-mode", "roundrobin"]).unwrap_err();
        assert!(
            err.contains("passthrough") && err.contains("balance"),
            "{err}"
        );
    }

    #[test]
    fn the_proxy_can_listen_on_the_node_ip_as_the_daemonset_passes_it() {
        // What the DaemonSet's `$(NODE_IP):15001` expands to.
        let cli = Cli::try_parse_from(["nemesis-agent", "run", "--proxy-v4", "198.18.7.1:15001"])
            .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(
            run.datapath.to_config().proxy_v4,
            Some("198.18.7.1:15001".parse().unwrap())
        );
        let err = Cli::try_parse_from(["nemesis-agent", "run", "--proxy-v4", ":15001"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--proxy-v4"), "{err}");
    }

    #[test]
    fn cleanup_takes_the_instance() {
        let cli = Cli::try_parse_from(["nemesis-agent", "cleanup", "--instance", "x"]).unwrap();
        let Command::Cleanup(c) = cli.command else {
            panic!("expected cleanup")
        };
        assert_eq!(c.instance.to_config().instance, "x");
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("2 weeks").unwrap_err(),
            "\"2 weeks\": column 2: `2` needs a unit: ms, s, m, h or d (for example `2s`)"
        );
        assert!(
            parse_duration("2weeks")
                .unwrap_err()
                .contains("unknown unit `weeks`")
        );
        assert!(
            parse_duration("ms")
                .unwrap_err()
                .contains("expected a duration such as `30s`")
        );
        // A bare number was seconds here and is refused in a policy: one grammar now.
        assert!(parse_duration("10").unwrap_err().contains("needs a unit"));
    }
}
