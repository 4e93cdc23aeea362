//! Readiness probes of the simulated kubelet: a TCP connect or an HTTP GET from the root
//! namespace to the pod IP through the bridge (as a kubelet dials from its node), or a
//! command run in the pod's namespace. It never keeps a connection open, never follows a
//! redirect, and refuses probe kinds it cannot run instead of calling them passed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::container::{ConfigError, annotation_ms};

/// Probe period in milliseconds, overriding `periodSeconds` (whose minimum is 1 s) so
/// tests can watch readiness change in a fraction of a second.
pub const PERIOD_ANNOTATION: &str = "nemesis.test/probe-period-ms";
/// Initial delay in milliseconds, overriding `initialDelaySeconds`.
pub const INITIAL_DELAY_ANNOTATION: &str = "nemesis.test/probe-initial-delay-ms";
/// Most of a response head we read to find the status line.
const MAX_RESPONSE_HEAD: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    Tcp {
        addr: SocketAddr,
    },
    Http {
        addr: SocketAddr,
        path: String,
        headers: Vec<(String, String)>,
    },
    Exec {
        argv: Vec<String>,
    },
}

/// A probe resolved against the pod: what to run and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbePlan {
    pub action: ProbeAction,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeConfigError {
    #[error("container {container}: readiness probe has no handler (tcpSocket, httpGet or exec)")]
    NoHandler { container: String },
    #[error(
        "container {container}: gRPC readiness probes are not supported by the sandbox kubelet"
    )]
    Grpc { container: String },
    #[error("container {container}: readiness probe scheme {scheme} is not supported (HTTP only)")]
    Scheme { container: String, scheme: String },
    #[error("container {container}: readiness probe port {port:?} names no container port")]
    Port { container: String, port: String },
    #[error(
        "container {container}: readiness probe host {host} is not an IP address in the pod range or loopback"
    )]
    Host { container: String, host: String },
    #[error(transparent)]
    Annotation(#[from] ConfigError),
}

/// Resolves `probe` of `container` for a pod at `pod_ip`.
pub fn plan(
    probe: &Probe,
    pod: &Pod,
    container: &Container,
    pod_ip: Ipv4Addr,
) -> Result<ProbePlan, ProbeConfigError> {
    let cname = || container.name.clone();
    let host = |host: &Option<String>| -> Result<IpAddr, ProbeConfigError> {
        match host.as_deref().filter(|h| !h.is_empty()) {
            None => Ok(IpAddr::V4(pod_ip)),
            Some(h) => h
                .parse::<IpAddr>()
                .ok()
                .filter(allowed_probe_host)
                .ok_or_else(|| ProbeConfigError::Host {
                    container: cname(),
                    host: h.to_string(),
                }),
        }
    };
    let action = if let Some(tcp) = &probe.tcp_socket {
        ProbeAction::Tcp {
            addr: SocketAddr::new(host(&tcp.host)?, resolve_port(&tcp.port, container)?),
        }
    } else if let Some(http) = &probe.http_get {
        let scheme = http.scheme.as_deref().unwrap_or("HTTP");
        if !scheme.eq_ignore_ascii_case("HTTP") {
            return Err(ProbeConfigError::Scheme {
                container: cname(),
                scheme: scheme.to_string(),
            });
        }
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        ProbeAction::Http {
            addr: SocketAddr::new(host(&http.host)?, resolve_port(&http.port, container)?),
            path: if path.starts_with('/') {
                path
            } else {
                format!("/{path}")
            },
            headers: http
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
        }
    } else if let Some(exec) = &probe.exec {
        ProbeAction::Exec {
            argv: exec.command.clone().unwrap_or_default(),
        }
    } else if probe.grpc.is_some() {
        return Err(ProbeConfigError::Grpc { container: cname() });
    } else {
        return Err(ProbeConfigError::NoHandler { container: cname() });
    };
    let secs = |v: Option<i32>, default: i32, min: i32| {
        Duration::from_secs(v.unwrap_or(default).max(min) as u64)
    };
    Ok(ProbePlan {
        action,
        initial_delay: annotation_ms(pod, INITIAL_DELAY_ANNOTATION)?.unwrap_or(secs(
            probe.initial_delay_seconds,
            0,
            0,
        )),
        period: annotation_ms(pod, PERIOD_ANNOTATION)?
            .unwrap_or(secs(probe.period_seconds, 10, 1))
            .max(Duration::from_millis(1)),
        timeout: secs(probe.timeout_seconds, 1, 1),
        success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
    })
}

fn allowed_probe_host(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback() || (v4.octets()[0] == 198 && v4.octets()[1] & 0xfe == 18)
        }
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

/// A probe or Service port: a number, or the name of one of the container's ports.
pub fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, ProbeConfigError> {
    let err = || ProbeConfigError::Port {
        container: container.name.clone(),
        port: match port {
            IntOrString::Int(n) => n.to_string(),
            IntOrString::String(s) => s.clone(),
        },
    };
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p > 0).ok_or_else(err),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(err)
        }
    }
}

/// The result of one probe run; the reason is kept for the container status message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure(String),
}

/// Runs `action` once within `timeout`. `netns` is where an exec probe runs.
pub async fn check(action: &ProbeAction, netns: &str, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, run(action, netns)).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Failure(format!("probe timed out after {timeout:?}")),
    }
}

async fn run(action: &ProbeAction, netns: &str) -> Outcome {
    match action {
        ProbeAction::Tcp { addr } => match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => Outcome::Success,
            Err(e) => Outcome::Failure(format!("dial tcp {addr}: {e}")),
        },
        ProbeAction::Http {
            addr,
            path,
            headers,
        } => http_get(*addr, path, headers).await,
        ProbeAction::Exec { argv } => {
            let out = tokio::process::Command::new("ip")
                .args(["netns", "exec", netns])
                .args(argv)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await;
            match out {
                Ok(s) if s.success() => Outcome::Success,
                Ok(s) => Outcome::Failure(format!("command {argv:?} exited with {s}")),
                Err(e) => Outcome::Failure(format!("command {argv:?} could not start: {e}")),
            }
        }
    }
}

async fn http_get(addr: SocketAddr, path: &str, headers: &[(String, String)]) -> Outcome {
    let mut stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Outcome::Failure(format!("Get http://{addr}{path}: {e}")),
    };
    let mut request = format!("GET {path} HTTP/1.1\r\n");
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    if !has("host") {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    if !has("user-agent") {
        request.push_str("User-Agent: kube-probe/1.36\r\n");
    }
    if !has("accept") {
        request.push_str("Accept: */*\r\n");
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return Outcome::Failure(format!("Get http://{addr}{path}: write: {e}"));
    }
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < MAX_RESPONSE_HEAD {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Outcome::Failure(format!("Get http://{addr}{path}: read: {e}")),
        }
    }
    match status_code(&head) {
        Some(code) if (200..400).contains(&code) => Outcome::Success,
        Some(code) => Outcome::Failure(format!("HTTP probe failed with statuscode: {code}")),
        None => Outcome::Failure(format!("Get http://{addr}{path}: malformed HTTP response")),
    }
}

/// The status code of an HTTP/1.x response head.
fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

/// Kubernetes' readiness bookkeeping: not ready at start, ready after
/// `success_threshold` consecutive successes, not ready after `failure_threshold`
/// consecutive failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    ready: bool,
    successes: u32,
    failures: u32,
    success_threshold: u32,
    failure_threshold: u32,
}

impl Readiness {
    pub fn new(success_threshold: u32, failure_threshold: u32) -> Self {
        Self {
            ready: false,
            successes: 0,
            failures: 0,
            success_threshold: success_threshold.max(1),
            failure_threshold: failure_threshold.max(1),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Records one probe result; returns whether readiness changed.
    pub fn observe(&mut self, success: bool) -> bool {
        let before = self.ready;
        if success {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= self.success_threshold {
                self.ready = true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.failure_threshold {
                self.ready = false;
            }
        }
        before != self.ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, GRPCAction, HTTPGetAction, TCPSocketAction};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const IP: Ipv4Addr = Ipv4Addr::new(198, 18, 4, 2);

    fn container() -> Container {
        Container {
            name: "web".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    fn pod(annotations: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn named_probe_port_resolves_to_the_container_port_and_defaults_apply() {
        let probe = Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("http".into()),
                path: Some("healthz".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let plan = plan(&probe, &pod(&[]), &container(), IP).unwrap();
        assert_eq!(
            plan.action,
            ProbeAction::Http {
                addr: SocketAddr::from((IP, 8080)),
                path: "/healthz".into(),
                headers: vec![]
            }
        );
        assert_eq!(plan.period, Duration::from_secs(10));
        assert_eq!(plan.timeout, Duration::from_secs(1));
        assert_eq!((plan.success_threshold, plan.failure_threshold), (1, 3));
    }

    #[test]
    fn annotations_allow_sub_second_periods() {
        let probe = Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(9000),
                host: None,
            }),
            period_seconds: Some(5),
            initial_delay_seconds: Some(3),
            ..Default::default()
        };
        let pod = pod(&[(PERIOD_ANNOTATION, "100"), (INITIAL_DELAY_ANNOTATION, "0")]);
        let plan = plan(&probe, &pod, &container(), IP).unwrap();
        assert_eq!(plan.period, Duration::from_millis(100));
        assert_eq!(plan.initial_delay, Duration::ZERO);
        assert_eq!(
            plan.action,
            ProbeAction::Tcp {
                addr: SocketAddr::from((IP, 9000))
            }
        );
    }

    #[test]
    fn unknown_port_names_grpc_and_foreign_hosts_are_refused() {
        let tcp = |port: IntOrString, host: Option<&str>| Probe {
            tcp_socket: Some(TCPSocketAction {
                port,
                host: host.map(String::from),
            }),
            ..Default::default()
        };
        let c = container();
        assert!(matches!(
            plan(
                &tcp(IntOrString::String("grpc".into()), None),
                &pod(&[]),
                &c,
                IP
            ),
            Err(ProbeConfigError::Port { .. })
        ));
        assert!(matches!(
            plan(
                &tcp(IntOrString::Int(80), Some("93.184.216.34")),
                &pod(&[]),
                &c,
                IP
            ),
            Err(ProbeConfigError::Host { .. })
        ));
        let grpc = Probe {
            grpc: Some(GRPCAction {
                port: 9000,
                service: None,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            plan(&grpc, &pod(&[]), &c, IP),
            Err(ProbeConfigError::Grpc { .. })
        ));
    }

    #[test]
    fn readiness_needs_consecutive_successes_and_failures_to_flip() {
        let mut r = Readiness::new(2, 3);
        assert!(!r.observe(true));
        assert!(!r.observe(false));
        assert!(!r.observe(true));
        assert!(r.observe(true), "two in a row make it ready");
        assert!(r.is_ready());
        assert!(!r.observe(false));
        assert!(!r.observe(false));
        assert!(r.observe(false), "three failures in a row make it unready");
        assert!(!r.is_ready());
    }

    #[test]
    fn status_line_is_parsed_from_the_response_head() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(
            status_code(b"HTTP/1.0 503 Service Unavailable\r\n\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
    }

    #[tokio::test]
    async fn tcp_and_http_checks_tell_listening_from_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ");
                let reply: &[u8] = if ok {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n"
                };
                let _ = s.write_all(reply).await;
            }
        });
        let t = Duration::from_secs(2);
        assert_eq!(
            check(&ProbeAction::Tcp { addr }, "", t).await,
            Outcome::Success
        );
        let http = |path: &str| ProbeAction::Http {
            addr,
            path: path.into(),
            headers: vec![],
        };
        assert_eq!(check(&http("/ok"), "", t).await, Outcome::Success);
        assert!(
            matches!(check(&http("/bad"), "", t).await, Outcome::Failure(m) if m.contains("500"))
        );
        // A port nobody listens on: bind, read the port, close.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(
            check(&ProbeAction::Tcp { addr: closed }, "", t).await,
            Outcome::Failure(_)
        ));
    }
}
