//! The settings of `nemesis-controller run`: every flag can also come from the
//! environment as `NEMESIS_CONTROLLER_<SETTING>`, and every default is a named constant
//! with the reason for its value. Parsing only; nothing here opens a file or a socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::policy::duration::parse_duration;
use crate::store::Retention;

/// Agents and Alertmanager call this port; 8080 is the usual plain-HTTP service port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// `/metrics`, `/healthz`, `/readyz` apart from the agents' port, so a scrape or a probe
/// never competes with wake-ups and a NetworkPolicy can treat them differently.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:8081";
/// The UI over TLS (only with --ui-tls-cert-file); 8443 is the usual HTTPS port.
pub const DEFAULT_UI_LISTEN: &str = "0.0.0.0:8443";
/// The agents' API over TLS (only with --agent-tls-secret): 9443, clear of the UI's 8443.
pub const DEFAULT_AGENT_LISTEN: &str = "0.0.0.0:9443";
/// The names agents reach the controller by through the manifests' Service.
pub const DEFAULT_AGENT_TLS_NAMES: &str = "nemesis-controller,nemesis-controller.nemesis-system,nemesis-controller.nemesis-system.svc,nemesis-controller.nemesis-system.svc.cluster.local";
/// The StatefulSet mounts its volume here; redb keeps the history in one file.
pub const DEFAULT_STORE_PATH: &str = "/var/lib/nemesis/history.redb";
pub const DEFAULT_LEASE_NAME: &str = "nemesis-controller";
/// Where the manifests install the controller.
pub const DEFAULT_LEASE_NAMESPACE: &str = "nemesis-system";
/// client-go's defaults (15 s / 10 s / 2 s), which every Kubernetes controller uses: a
/// dead leader is replaced within about 15 s, and a leader cut off from the API server
/// stops acting after 10 s, well before anyone else may take over at 15 s.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// Agent counts arrive every few seconds; a second between evaluations keeps `for`
/// windows accurate to about a second without spending much on idle policies (events,
/// wake-ups and new query results are evaluated at once anyway).
pub const DEFAULT_TICK_INTERVAL: Duration = Duration::from_secs(1);
/// How long every live agent has to acknowledge a hold before a scale to zero; an agent
/// applies a directive on its next heartbeat (a few seconds), so 30 s means several
/// missed heartbeats, after which the sleep is abandoned rather than risked.
pub const DEFAULT_SLEEP_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Metric samples for the history: every 10 s gives 360 points per metric per hour at
/// full resolution, plenty for charts, and one small write per policy per 10 s.
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
/// The latest metric values are refreshed in a policy's status at most this often (state
/// changes are written at once): frequent enough for `kubectl describe`, rare enough not
/// to load the API server with one write per policy per tick.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(15);
/// The shortest tick accepted: below this the controller spins without new information.
pub const MIN_TICK_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `nemesis-controller run`. The Kubernetes client is configured the standard kube-rs
/// way: `KUBECONFIG` (or `~/.kube/config`), else the in-cluster service account.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address for the agents' API and the Alertmanager webhook.
    #[arg(long, env = "NEMESIS_CONTROLLER_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Address for `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "NEMESIS_CONTROLLER_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,

    /// The audience agents' projected ServiceAccount tokens must be issued for. Each
    /// agent's token is checked with a TokenReview and tied to its pod's node.
    #[arg(long, env = "NEMESIS_CONTROLLER_AGENT_TOKEN_AUDIENCE",
          default_value = crate::agents::identity::DEFAULT_AUDIENCE)]
    pub agent_token_audience: String,

    /// The namespace of the agents' ServiceAccount (and pods).
    #[arg(
        long,
        env = "NEMESIS_CONTROLLER_AGENT_NAMESPACE",
        default_value = "nemesis-system"
    )]
    pub agent_namespace: String,

    /// The agents' ServiceAccount: only its tokens may call the agent API.
    #[arg(
        long,
        env = "NEMESIS_CONTROLLER_AGENT_SERVICE_ACCOUNT",
        default_value = "nemesis-agent"
    )]
    pub agent_service_account: String,

    /// Serve the agents' API over TLS on --agent-listen (and no longer on --listen),
    /// with the certificate in this Secret (in --lease-namespace). The controller issues
    /// a CA and a serving certificate into it and rotates the certificate before it
    /// expires (publishing the CA in --agent-ca-configmap for the agents), unless
    /// --agent-tls-provided says the operator provides it.
    #[arg(long, env = "NEMESIS_CONTROLLER_AGENT_TLS_SECRET")]
    pub agent_tls_secret: Option<String>,

    /// --agent-tls-secret is the operator's `kubernetes.io/tls` Secret (tls.crt,
    /// tls.key; for instance cert-manager's): only read, re-read every minute.
    #[arg(
        long,
        env = "NEMESIS_CONTROLLER_AGENT_TLS_PROVIDED",
        requires = "agent_tls_secret"
    )]
    pub agent_tls_provided: bool,

    /// Where the agents' API listens over TLS (with --agent-tls-secret).
    #[arg(long, env = "NEMESIS_CONTROLLER_AGENT_LISTEN", default_value = DEFAULT_AGENT_LISTEN)]
    pub agent_listen: SocketAddr,

    /// The DNS names and IP addresses an issued certificate carries (comma-separated):
    /// the ones agents use in --controller-url.
    #[arg(long, env = "NEMESIS_CONTROLLER_AGENT_TLS_NAMES", value_delimiter = ',',
          default_value = DEFAULT_AGENT_TLS_NAMES)]
    pub agent_tls_names: Vec<String>,

    /// How long an issued serving certificate is valid; it is replaced when a third of
    /// that is left.
    #[arg(long, env = "NEMESIS_CONTROLLER_AGENT_TLS_VALIDITY", value_parser = parse_flag_duration,
          default_value = "30d")]
    pub agent_tls_validity: Duration,

    /// The ConfigMap (in --lease-namespace) where the controller publishes the CA of the
    /// certificates it issues (`ca.crt`), for the agents to mount.
    #[arg(long, env = "NEMESIS_CONTROLLER_AGENT_CA_CONFIGMAP",
          default_value = crate::agents::tls_secret::DEFAULT_CA_CONFIGMAP)]
    pub agent_ca_configmap: String,

    /// File holding the token Alertmanager presents, as a Bearer token (its
    /// `http_config.authorization`) or as the password of HTTP Basic (its
    /// `http_config.basic_auth`, any user name). Without it the webhook is not served and
    /// `alert(...)` conditions never fire.
    #[arg(long, env = "NEMESIS_CONTROLLER_ALERTMANAGER_TOKEN_FILE")]
    pub alertmanager_token_file: Option<PathBuf>,

    /// The Prometheus that PromQL sources query unless they name their own `server`.
    #[arg(long, env = "NEMESIS_CONTROLLER_PROMETHEUS_URL")]
    pub prometheus_url: Option<String>,

    /// With `--prometheus-url`: the PromQL for the CPU cores a Service's pods used on
    /// average over each step of a report (`$namespace`, `$pod` (a regex of the target's
    /// pods) and `$range` (the step, at least a minute) are filled in); reports sum it
    /// into CPU core-hours. Default: cAdvisor's `container_cpu_usage_seconds_total` as
    /// a rate.
    #[arg(long, env = "NEMESIS_CONTROLLER_REPORT_CPU_USAGE_QUERY",
          default_value = crate::reports::usage::DEFAULT_CPU_USAGE_QUERY)]
    pub report_cpu_usage_query: String,

    /// With `--prometheus-url`: the PromQL for the memory bytes a Service's pods used on
    /// average over each step (placeholders as `--report-cpu-usage-query`); reports sum
    /// it into GiB-hours. Default: cAdvisor's `container_memory_working_set_bytes`.
    #[arg(long, env = "NEMESIS_CONTROLLER_REPORT_MEMORY_USAGE_QUERY",
          default_value = crate::reports::usage::DEFAULT_MEMORY_USAGE_QUERY)]
    pub report_memory_usage_query: String,

    /// The redb history file.
    #[arg(long, env = "NEMESIS_CONTROLLER_STORE_PATH", default_value = DEFAULT_STORE_PATH)]
    pub store_path: PathBuf,

    /// Raw metric samples older than this are folded into one-minute buckets.
    #[arg(long, env = "NEMESIS_CONTROLLER_RETENTION_RAW", value_parser = parse_flag_duration,
          default_value = "1h")]
    pub retention_raw: Duration,

    /// Minute buckets older than this are deleted.
    #[arg(long, env = "NEMESIS_CONTROLLER_RETENTION_DOWNSAMPLED", value_parser = parse_flag_duration,
          default_value = "30d")]
    pub retention_downsampled: Duration,

    /// Transitions, scale events and cold starts older than this are deleted.
    #[arg(long, env = "NEMESIS_CONTROLLER_RETENTION_EVENTS", value_parser = parse_flag_duration,
          default_value = "365d")]
    pub retention_events: Duration,

    /// The Lease that elects the one acting instance.
    #[arg(long, env = "NEMESIS_CONTROLLER_LEASE_NAME", default_value = DEFAULT_LEASE_NAME)]
    pub lease_name: String,

    #[arg(long, env = "NEMESIS_CONTROLLER_LEASE_NAMESPACE", default_value = DEFAULT_LEASE_NAMESPACE)]
    pub lease_namespace: String,

    /// This instance's name in the Lease (default: the host name plus a random suffix).
    #[arg(long, env = "NEMESIS_CONTROLLER_IDENTITY")]
    pub identity: Option<String>,

    /// The controller's own Pod (downward API). When set, the leader labels it
    /// `nemesis.dev/leader=true`, so a Service selecting that label routes agents and
    /// Alertmanager to the acting instance only.
    #[arg(long, env = "NEMESIS_CONTROLLER_POD_NAME")]
    pub pod_name: Option<String>,

    /// Replicate the history: every standby pulls the leader's records
    /// (`GET /internal/history` on the API listener), so its UI shows them and a new
    /// leader has the old one's. `false`: each instance keeps only what it recorded
    /// while it led.
    #[arg(long, env = "NEMESIS_CONTROLLER_HISTORY_REPLICATION", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub history_replication: bool,

    /// The Secret (beside the Lease) holding the token the replicas present to each
    /// other; created with a random token when missing, re-read every minute.
    #[arg(long, env = "NEMESIS_CONTROLLER_REPLICA_TOKEN_SECRET",
          default_value = crate::replication::token::DEFAULT_SECRET)]
    pub replica_token_secret: String,

    /// The URL the other replicas reach this instance's API listener at (for instance
    /// `http://$(POD_IP):8080`); the leader writes it on the Lease. Default: the API
    /// listener's address when it is a specific IP (not `0.0.0.0` or `::`).
    #[arg(long, env = "NEMESIS_CONTROLLER_HISTORY_URL")]
    pub history_url: Option<String>,

    /// How long a Lease is valid without renewal; a standby takes over after this.
    #[arg(long, env = "NEMESIS_CONTROLLER_LEASE_DURATION", value_parser = parse_flag_duration,
          default_value = "15s")]
    pub lease_duration: Duration,

    /// The leader stops acting when it could not renew for this long (< lease duration).
    #[arg(long, env = "NEMESIS_CONTROLLER_RENEW_DEADLINE", value_parser = parse_flag_duration,
          default_value = "10s")]
    pub renew_deadline: Duration,

    /// How often the Lease is renewed or an acquisition attempted (< renew deadline).
    #[arg(long, env = "NEMESIS_CONTROLLER_RETRY_PERIOD", value_parser = parse_flag_duration,
          default_value = "2s")]
    pub retry_period: Duration,

    /// How often every policy is evaluated when nothing else triggers it.
    #[arg(long, env = "NEMESIS_CONTROLLER_TICK_INTERVAL", value_parser = parse_flag_duration,
          default_value = "1s")]
    pub tick_interval: Duration,

    /// How long every live agent has to acknowledge a hold before a scale to zero.
    #[arg(long, env = "NEMESIS_CONTROLLER_SLEEP_ACK_TIMEOUT", value_parser = parse_flag_duration,
          default_value = "30s")]
    pub sleep_ack_timeout: Duration,

    /// An agent silent for this long is dead (its acknowledgement is no longer awaited).
    #[arg(long, env = "NEMESIS_CONTROLLER_AGENT_LEASE", value_parser = parse_flag_duration,
          default_value = "15s")]
    pub agent_lease: Duration,

    /// The node ports agents listen on for held Services' connections that arrive
    /// through hold EndpointSlices (Ingress controllers, NodePorts, meshes): one per
    /// managed Service port, the same on every node. Keep it clear of NodePorts
    /// (30000-32767), ephemeral ports and the nodes' own services.
    #[arg(long, env = "NEMESIS_CONTROLLER_HOLD_PORTS", value_parser = parse_port_range,
          default_value = "20000-29999")]
    pub hold_ports: (u16, u16),

    /// How often each policy's metric values are written to the history.
    #[arg(long, env = "NEMESIS_CONTROLLER_SAMPLE_INTERVAL", value_parser = parse_flag_duration,
          default_value = "10s")]
    pub sample_interval: Duration,

    /// How often the latest metric values are refreshed in a policy's status.
    #[arg(long, env = "NEMESIS_CONTROLLER_STATUS_INTERVAL", value_parser = parse_flag_duration,
          default_value = "15s")]
    pub status_interval: Duration,

    #[arg(long, env = "NEMESIS_CONTROLLER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// File holding the web UI's admin password, or its argon2id PHC hash
    /// (`$argon2id$v=19$...`); a mounted Secret. Without it the UI is not served.
    #[arg(long, env = "NEMESIS_CONTROLLER_UI_PASSWORD_FILE")]
    pub ui_password_file: Option<PathBuf>,

    /// File listing the alert sinks (webhook, Slack, Alertmanager, SMTP) with their keys
    /// and passwords: a mounted Secret (see `notify::sinks`). Without it AlertRules
    /// raise alerts the UI shows, but nothing is sent.
    #[arg(long, env = "NEMESIS_CONTROLLER_ALERT_SINKS_FILE")]
    pub alert_sinks_file: Option<PathBuf>,

    /// The Secret (in the Lease's namespace) that keeps the alert outbox, so the next
    /// leader delivers what this one raised.
    #[arg(long, env = "NEMESIS_CONTROLLER_ALERT_OUTBOX_SECRET", default_value = crate::notify::DEFAULT_OUTBOX_SECRET)]
    pub alert_outbox_secret: String,

    /// The user name the UI accepts with that password.
    #[arg(long, env = "NEMESIS_CONTROLLER_UI_USER", default_value = crate::ui::DEFAULT_USER)]
    pub ui_user: String,

    /// A UI session ends this long after login.
    #[arg(long, env = "NEMESIS_CONTROLLER_UI_SESSION_TTL", value_parser = parse_flag_duration,
          default_value = "12h")]
    pub ui_session_ttl: Duration,

    /// Mark the UI's cookies `Secure` (when the UI is reached over HTTPS only, e.g.
    /// behind a TLS-terminating ingress; implied by --ui-tls-cert-file).
    #[arg(long, env = "NEMESIS_CONTROLLER_UI_SECURE_COOKIE")]
    pub ui_secure_cookie: bool,

    /// The Secret (in --lease-namespace, the controller's own) where the UI keeps its
    /// users, API tokens and sessions; every instance watches it, so they survive a
    /// restart and a change of leader. Created on the first login.
    #[arg(long, env = "NEMESIS_CONTROLLER_UI_ACCOUNTS_SECRET",
          default_value = crate::ui::directory::DEFAULT_SECRET)]
    pub ui_accounts_secret: String,

    /// PEM certificate chain for serving the UI over TLS itself (with --ui-tls-key-file);
    /// the UI then listens on --ui-listen only and its cookies are Secure.
    #[arg(
        long,
        env = "NEMESIS_CONTROLLER_UI_TLS_CERT_FILE",
        requires = "ui_tls_key_file"
    )]
    pub ui_tls_cert_file: Option<PathBuf>,

    /// PEM private key of --ui-tls-cert-file.
    #[arg(
        long,
        env = "NEMESIS_CONTROLLER_UI_TLS_KEY_FILE",
        requires = "ui_tls_cert_file"
    )]
    pub ui_tls_key_file: Option<PathBuf>,

    /// Where the UI listens when it serves TLS (8443: the usual HTTPS service port
    /// beside 8080).
    #[arg(long, env = "NEMESIS_CONTROLLER_UI_LISTEN", default_value = DEFAULT_UI_LISTEN)]
    pub ui_listen: SocketAddr,
}

/// Why the settings cannot work together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--renew-deadline ({renew:?}) must be shorter than --lease-duration ({lease:?}): a leader must stop acting before anyone else may take over"
    )]
    RenewDeadlineNotBelowLease { renew: Duration, lease: Duration },
    #[error("--retry-period ({retry:?}) must be shorter than --renew-deadline ({renew:?})")]
    RetryPeriodNotBelowRenewDeadline { retry: Duration, renew: Duration },
    #[error("--tick-interval ({tick:?}) must be at least {MIN_TICK_INTERVAL:?}")]
    TickTooShort { tick: Duration },
    #[error("--{flag} must be above zero")]
    Zero { flag: &'static str },
    #[error(
        "--lease-duration must be a whole number of seconds (a Lease counts in seconds), is {0:?}"
    )]
    LeaseNotWholeSeconds(Duration),
}

impl RunArgs {
    /// Checks the settings that depend on each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (flag, d) in [
            ("lease-duration", self.lease_duration),
            ("renew-deadline", self.renew_deadline),
            ("retry-period", self.retry_period),
            ("sleep-ack-timeout", self.sleep_ack_timeout),
            ("agent-lease", self.agent_lease),
            ("sample-interval", self.sample_interval),
            ("status-interval", self.status_interval),
            ("ui-session-ttl", self.ui_session_ttl),
            ("agent-tls-validity", self.agent_tls_validity),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero { flag });
            }
        }
        if self.lease_duration.subsec_nanos() != 0 {
            return Err(ConfigError::LeaseNotWholeSeconds(self.lease_duration));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(ConfigError::RenewDeadlineNotBelowLease {
                renew: self.renew_deadline,
                lease: self.lease_duration,
            });
        }
        if self.retry_period >= self.renew_deadline {
            return Err(ConfigError::RetryPeriodNotBelowRenewDeadline {
                retry: self.retry_period,
                renew: self.renew_deadline,
            });
        }
        if self.tick_interval < MIN_TICK_INTERVAL {
            return Err(ConfigError::TickTooShort {
                tick: self.tick_interval,
            });
        }
        Ok(())
    }

    pub fn retention(&self) -> Retention {
        Retention {
            raw: self.retention_raw,
            downsampled: self.retention_downsampled,
            events: self.retention_events,
        }
    }

    /// The Lease identity: the flag, else `<host name>-<random>` (unique even for two
    /// instances on one host, as in tests).
    pub fn identity(&self) -> String {
        if let Some(id) = &self.identity {
            return id.clone();
        }
        // The kernel's name for this host (a Pod's name in Kubernetes).
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "nemesis-controller".to_string());
        format!("{host}-{:08x}", rand::random::<u32>())
    }
}

/// Durations as policies write them (`500ms`, `15s`, `1h30m`), for flags.
/// `FIRST-LAST`, both ports, FIRST <= LAST.
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{text:?} is not a port range: write FIRST-LAST, e.g. 20000-29999");
    let (a, b) = text.trim().split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || a > b {
        return Err(format!(
            "{text:?}: the first port must be at least 1 and not above the last"
        ));
    }
    Ok((a, b))
}

pub fn parse_flag_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text.trim()).map_err(|e| {
        format!(
            "{:?} is not a duration (e.g. 500ms, 15s, 10m, 1h): {}",
            text, e.message
        )
    })?;
    d.to_std()
        .map_err(|_| format!("{text:?} must not be negative"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::store::DEFAULT_RETENTION;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut all = vec!["nemesis-controller"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|c| c.run)
    }

    #[test]
    fn defaults_match_their_named_constants() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(a.admin_listen, DEFAULT_ADMIN_LISTEN.parse().unwrap());
        assert_eq!(a.store_path, PathBuf::from(DEFAULT_STORE_PATH));
        assert_eq!(a.lease_duration, DEFAULT_LEASE_DURATION);
        assert_eq!(a.renew_deadline, DEFAULT_RENEW_DEADLINE);
        assert_eq!(a.retry_period, DEFAULT_RETRY_PERIOD);
        assert_eq!(a.tick_interval, DEFAULT_TICK_INTERVAL);
        assert_eq!(a.sleep_ack_timeout, DEFAULT_SLEEP_ACK_TIMEOUT);
        assert_eq!(a.agent_lease, crate::agents::registry::DEFAULT_LEASE);
        assert_eq!(a.sample_interval, DEFAULT_SAMPLE_INTERVAL);
        assert_eq!(a.status_interval, DEFAULT_STATUS_INTERVAL);
        assert_eq!(a.retention(), DEFAULT_RETENTION);
        assert!(a.validate().is_ok());
    }

    #[test]
    fn durations_use_the_policy_spelling_and_bad_ones_say_what_is_wrong() {
        let a = parse(&["--tick-interval", "250ms", "--lease-duration", "1m"]).unwrap();
        assert_eq!(a.tick_interval, Duration::from_millis(250));
        assert_eq!(a.lease_duration, Duration::from_secs(60));
        let e = parse(&["--tick-interval", "5"]).unwrap_err().to_string();
        assert!(
            e.contains("--tick-interval") && e.contains("not a duration"),
            "{e}"
        );
    }

    #[test]
    fn a_renew_deadline_at_or_above_the_lease_duration_is_refused() {
        let a = parse(&["--lease-duration", "10s", "--renew-deadline", "10s"]).unwrap();
        assert!(matches!(
            a.validate(),
            Err(ConfigError::RenewDeadlineNotBelowLease { .. })
        ));
        let a = parse(&["--retry-period", "10s"]).unwrap();
        assert!(matches!(
            a.validate(),
            Err(ConfigError::RetryPeriodNotBelowRenewDeadline { .. })
        ));
        let a = parse(&["--tick-interval", "10ms"]).unwrap();
        assert!(matches!(
            a.validate(),
            Err(ConfigError::TickTooShort { .. })
        ));
        let a = parse(&[
            "--lease-duration",
            "1500ms",
            "--renew-deadline",
            "1s",
            "--retry-period",
            "200ms",
        ])
        .unwrap();
        assert!(matches!(
            a.validate(),
            Err(ConfigError::LeaseNotWholeSeconds(_))
        ));
    }

    #[test]
    fn the_ui_is_off_without_a_password_file_and_its_flags_parse() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.ui_password_file, None);
        assert_eq!(a.ui_user, crate::ui::DEFAULT_USER);
        assert_eq!(a.ui_session_ttl, crate::ui::DEFAULT_SESSION_TTL);
        assert!(!a.ui_secure_cookie);
        let a = parse(&[
            "--ui-password-file",
            "/p",
            "--ui-user",
            "ops",
            "--ui-session-ttl",
            "1h",
            "--ui-secure-cookie",
        ])
        .unwrap();
        assert_eq!(a.ui_password_file, Some(PathBuf::from("/p")));
        assert_eq!(a.ui_user, "ops");
        assert_eq!(a.ui_session_ttl, Duration::from_secs(3600));
        assert!(a.ui_secure_cookie);
        let a = parse(&["--ui-session-ttl", "0s"]).unwrap();
        assert_eq!(
            a.validate(),
            Err(ConfigError::Zero {
                flag: "ui-session-ttl"
            })
        );
    }

    #[test]
    fn agents_authenticate_with_their_service_account_by_default() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.agent_token_audience, "nemesis-controller");
        assert_eq!(a.agent_namespace, "nemesis-system");
        assert_eq!(a.agent_service_account, "nemesis-agent");
    }
}
