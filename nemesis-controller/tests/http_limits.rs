//! The controller's listeners under hostile clients, on real sockets: the API listener
//! (agents, the Alertmanager webhook and the UI, as served without TLS), the admin
//! listener, and the UI's own TLS listener. For each: an oversized body is refused with
//! 413 and a message, a request head or body sent a byte at a time is cut off within the
//! bound, a well-behaved request succeeds meanwhile, and every refusal is counted.
//!
//! The limits are the production ones with short timeouts (1 s head, 2 s request); the
//! clients drip for up to a minute, so only the server ending it can make a test pass.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use axum::Router;
use nemesis_controller::agents::{AgentApi, AgentRegistry, RegistryConfig, WakeGate};
use nemesis_controller::alerts::{AlertApi, AlertBook};
use nemesis_controller::auth::BearerToken;
use nemesis_controller::metrics::ControllerMetrics;
use nemesis_controller::server::{self, LimitedRouter, Limits, Rejection};
use nemesis_controller::store::{Retention, Store};
use nemesis_controller::ui::{
    self, AdminPassword, Directory, PolicyCache, UiConfig, UiSources, UiState,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "agent-token";
/// How long a client keeps dripping: far past any limit, so a pass means the server cut it.
const DRIP_FOR: Duration = Duration::from_secs(60);
const DRIP_EVERY: Duration = Duration::from_millis(200);

fn short(limits: Limits) -> Limits {
    Limits {
        header_read_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        ..limits
    }
}

// === a client that misbehaves on purpose ===

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Target {
    async fn connect(&self) -> anyhow::Result<Pin<Box<dyn Io>>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(match &self.tls {
            None => Box::pin(tcp),
            Some(c) => {
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
                Box::pin(c.connect(name, tcp).await?)
            }
        })
    }
}

/// What came back before the server closed (or `DRIP_FOR` passed): the status line
/// (empty when the server closed without answering) and the whole answer.
struct Ended {
    status: String,
    answer: String,
}

async fn read_to_end(io: &mut Pin<Box<dyn Io>>) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DRIP_FOR, io.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn ended(answer: String) -> Ended {
    Ended {
        status: answer.lines().next().unwrap_or_default().to_string(),
        answer,
    }
}

/// Sends `head` (without the blank line), then drips header lines until the server
/// closes the connection.
async fn slow_head(t: &Target, head: &str) -> anyhow::Result<Ended> {
    let mut io = t.connect().await?;
    io.write_all(head.as_bytes()).await?;
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < DRIP_FOR {
        i += 1;
        if io
            .write_all(format!("x-drip-{i}: a\r\n").as_bytes())
            .await
            .is_err()
            || io.flush().await.is_err()
        {
            break;
        }
        let mut b = [0u8; 512];
        match tokio::time::timeout(DRIP_EVERY, io.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                let mut answer = String::from_utf8_lossy(&b[..n]).into_owned();
                answer.push_str(&read_to_end(&mut io).await);
                return Ok(ended(answer));
            }
            Err(_) => {}
        }
    }
    ensure!(
        start.elapsed() < DRIP_FOR,
        "the server let a header drip on for {DRIP_FOR:?}"
    );
    Ok(ended(String::new()))
}

/// Sends `head` declaring a body of `len` bytes, then drips the body until the server
/// answers or closes.
async fn slow_body(t: &Target, head: &str, len: usize) -> anyhow::Result<Ended> {
    let mut io = t.connect().await?;
    io.write_all(format!("{head}content-length: {len}\r\n\r\n").as_bytes())
        .await?;
    let start = Instant::now();
    for _ in 0..len {
        if start.elapsed() > DRIP_FOR
            || io.write_all(b" ").await.is_err()
            || io.flush().await.is_err()
        {
            break;
        }
        let mut b = [0u8; 512];
        match tokio::time::timeout(DRIP_EVERY, io.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(ended(String::new())),
            Ok(Ok(n)) => {
                let mut answer = String::from_utf8_lossy(&b[..n]).into_owned();
                answer.push_str(&read_to_end(&mut io).await);
                return Ok(ended(answer));
            }
            Err(_) => {}
        }
    }
    bail!("the server let a body drip on for {:?}", start.elapsed())
}

/// Sends `head` + `body` at once and reads the answer to the end.
async fn send(t: &Target, head: &str, body: &[u8]) -> anyhow::Result<Ended> {
    let mut io = t.connect().await?;
    io.write_all(head.as_bytes()).await?;
    io.write_all(b"connection: close\r\n\r\n").await?;
    // The server may answer (and close) before it read the whole body.
    let _ = io.write_all(body).await;
    let _ = io.flush().await;
    Ok(ended(read_to_end(&mut io).await))
}

/// A well-behaved request gets its answer while `slow` is being dripped.
async fn served_meanwhile<F: std::future::Future<Output = anyhow::Result<Ended>>>(
    t: &Target,
    polite: &str,
    slow: F,
) -> anyhow::Result<Ended> {
    let polite = async {
        // Once the slow client is under way.
        tokio::time::sleep(DRIP_EVERY * 2).await;
        send(t, polite, b"").await
    };
    let (slow, polite) = tokio::join!(slow, polite);
    let polite = polite?;
    ensure!(
        polite.status.contains(" 200 "),
        "a well-behaved request during the drip: {}",
        polite.answer
    );
    slow
}

/// Runs the three hostile clients against one listener.
struct Case<'a> {
    target: Target,
    listener: &'static str,
    metrics: &'a ControllerMetrics,
    polite: String,
    /// A request head (without the blank line) whose body the route reads.
    body_route: String,
}

impl Case<'_> {
    fn count(&self, r: Rejection) -> u64 {
        self.metrics.http_rejected().count(self.listener, r)
    }

    async fn oversized(&self, declared: usize) -> anyhow::Result<()> {
        let before = self.count(Rejection::BodyTooLarge);
        let e = send(
            &self.target,
            &format!("{}content-length: {declared}\r\n", self.body_route),
            b"",
        )
        .await?;
        ensure!(e.status.contains(" 413 "), "oversized body: {}", e.answer);
        ensure!(
            e.answer.contains("limit"),
            "a message naming the limit: {}",
            e.answer
        );
        ensure!(self.count(Rejection::BodyTooLarge) == before + 1);
        Ok(())
    }

    async fn slow_header(&self) -> anyhow::Result<()> {
        let before = self.count(Rejection::HeaderTimeout);
        let e = served_meanwhile(
            &self.target,
            &self.polite,
            slow_head(&self.target, "GET /healthz HTTP/1.1\r\nhost: x\r\n"),
        )
        .await?;
        ensure!(
            e.status.is_empty(),
            "closed without an answer: {}",
            e.answer
        );
        ensure!(self.count(Rejection::HeaderTimeout) == before + 1);
        Ok(())
    }

    async fn slow_body(&self) -> anyhow::Result<()> {
        let before = self.count(Rejection::BodyTimeout);
        let e = served_meanwhile(
            &self.target,
            &self.polite,
            slow_body(&self.target, &self.body_route, 10_000),
        )
        .await?;
        ensure!(e.status.contains(" 408 "), "slow body: {}", e.answer);
        ensure!(
            e.answer.contains("did not arrive within 2 s"),
            "{}",
            e.answer
        );
        ensure!(self.count(Rejection::BodyTimeout) == before + 1);
        Ok(())
    }
}

// === the listeners ===

fn agent_api() -> AgentApi {
    let (wakes, _rx) = WakeGate::new(8, Duration::from_secs(60));
    AgentApi {
        registry: Arc::new(AgentRegistry::new(RegistryConfig::default())),
        wakes: Arc::new(wakes),
        auth: BearerToken::from_value(TOKEN).unwrap().into(),
    }
}

fn ui_router(metrics: &ControllerMetrics, dir: &std::path::Path) -> Router {
    let store = Arc::new(Store::open(dir.join("history.redb"), Retention::default()).unwrap());
    let config = UiConfig::default();
    let (policies, _feed) = PolicyCache::new();
    let state = UiState::new(
        config.clone(),
        AdminPassword::from_plaintext("correct-horse-battery-staple").unwrap(),
        Arc::new(Directory::in_memory(&config.user)),
        metrics.clone(),
        UiSources::local(store, policies),
    );
    ui::router(state)
}

async fn serve_plain(router: LimitedRouter) -> anyhow::Result<(SocketAddr, CancellationToken)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    tokio::spawn(server::serve("test", listener, router, stop.clone()));
    Ok((addr, stop))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_listener_refuses_oversized_bodies_and_cuts_slow_clients() -> anyhow::Result<()> {
    let metrics = ControllerMetrics::new();
    let dir = tempfile::tempdir()?;
    let (_lead, leading) = watch::channel(true);
    let api = server::api_router(
        Some(agent_api()),
        Some(AlertApi {
            book: Arc::new(AlertBook::new()),
            token: BearerToken::from_value(TOKEN).unwrap(),
        }),
        leading,
    )
    .merge(ui_router(&metrics, dir.path()));
    let limits = short(server::API_LIMITS);
    let (addr, stop) = serve_plain(server::limited("api", api, limits, &metrics)).await?;
    let case = Case {
        target: Target { addr, tls: None },
        listener: "api",
        metrics: &metrics,
        // The login page: served without a session.
        polite: "GET /login HTTP/1.1\r\nhost: x\r\n".into(),
        body_route: format!(
            "POST /v1/agents/heartbeat HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\n"
        ),
    };
    // Over the listener's limit (a full heartbeat's 8 MiB): refused before anything is
    // read.
    case.oversized(limits.max_body_bytes + 1).await?;
    // Over the wake-up's own limit (16 KiB), under the listener's: found while reading.
    let big = vec![b' '; nemesis_controller::agents::http::MAX_WAKE_BYTES + 1];
    let e = send(
        &case.target,
        &format!(
            "POST /v1/agents/wake HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            big.len()
        ),
        &big,
    )
    .await?;
    ensure!(e.status.contains(" 413 "), "{}", e.answer);
    ensure!(
        e.answer.contains("wake body is larger than the limit"),
        "{}",
        e.answer
    );
    ensure!(case.count(Rejection::BodyTooLarge) == 2);
    // The UI's login body (8 KiB) on the same listener.
    let login = vec![b' '; ui::MAX_LOGIN_BODY_BYTES + 1];
    let e = send(
        &case.target,
        &format!(
            "POST /login HTTP/1.1\r\nhost: x\r\norigin: http://x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            login.len()
        ),
        &login,
    )
    .await?;
    ensure!(e.status.contains(" 413 "), "{}", e.answer);
    ensure!(
        e.answer.contains("login body is larger than the limit"),
        "{}",
        e.answer
    );
    case.slow_header().await?;
    case.slow_body().await?;
    // The webhook too.
    let e = slow_body(
        &case.target,
        &format!(
            "POST /v1/alerts/alertmanager HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\n"
        ),
        10_000,
    )
    .await?;
    ensure!(e.status.contains(" 408 "), "{}", e.answer);
    // A client that connects and sends nothing at all is closed too.
    let before = case.count(Rejection::HeaderTimeout);
    let mut io = case.target.connect().await?;
    ensure!(read_to_end(&mut io).await.is_empty());
    ensure!(case.count(Rejection::HeaderTimeout) == before + 1);
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_takes_no_body_and_cuts_slow_clients() -> anyhow::Result<()> {
    let metrics = ControllerMetrics::new();
    let (_l, leading) = watch::channel(false);
    let (_s, synced) = watch::channel(false);
    let admin = server::admin_router(metrics.clone(), server::Health { leading, synced });
    let limits = short(server::ADMIN_LIMITS);
    let (addr, stop) = serve_plain(server::limited("admin", admin, limits, &metrics)).await?;
    let case = Case {
        target: Target { addr, tls: None },
        listener: "admin",
        metrics: &metrics,
        polite: "GET /metrics HTTP/1.1\r\nhost: x\r\n".into(),
        body_route: "POST /metrics HTTP/1.1\r\nhost: x\r\n".into(),
    };
    case.oversized(1).await?;
    case.slow_header().await?;
    // No route reads a body: a dripped one is refused at once, by its declared length or,
    // chunked, for being a body at all.
    let e = slow_body(&case.target, &case.body_route, 10_000).await?;
    ensure!(e.status.contains(" 413 "), "{}", e.answer);
    let e = send(
        &case.target,
        "POST /metrics HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n",
        b"5\r\nhello\r\n",
    )
    .await?;
    ensure!(e.status.contains(" 413 "), "{}", e.answer);
    ensure!(e.answer.contains("takes no request body"), "{}", e.answer);
    let e = send(&case.target, &case.polite, b"").await?;
    ensure!(
        e.answer.contains(
            "nemesis_controller_http_rejected_total{listener=\"admin\",reason=\"body_too_large\"} 3"
        ),
        "the refusals are exported: {}",
        e.answer
    );
    stop.cancel();
    Ok(())
}

/// A CA and a server certificate for 127.0.0.1 as PEM files in `dir`; returns the CA.
fn certificates(
    dir: &std::path::Path,
) -> anyhow::Result<rustls::pki_types::CertificateDer<'static>> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    std::fs::write(dir.join("tls.crt"), leaf_cert.pem())?;
    std::fs::write(dir.join("tls.key"), leaf_key.serialize_pem())?;
    Ok(ca.der().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_tls_listener_refuses_oversized_bodies_and_cuts_slow_clients() -> anyhow::Result<()>
{
    let metrics = ControllerMetrics::new();
    let dir = tempfile::tempdir()?;
    let ca = certificates(dir.path())?;
    let config = ui::tls::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key"))?;
    let limits = short(ui::tls::UI_LIMITS);
    let router = server::limited("ui", ui_router(&metrics, dir.path()), limits, &metrics);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    tokio::spawn(ui::tls::serve(listener, config, router, stop.clone()));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let case = Case {
        target: Target {
            addr,
            tls: Some(tokio_rustls::TlsConnector::from(Arc::new(client))),
        },
        listener: "ui",
        metrics: &metrics,
        polite: "GET /login HTTP/1.1\r\nhost: x\r\n".into(),
        body_route: "POST /login HTTP/1.1\r\nhost: x\r\norigin: https://x\r\ncontent-type: application/json\r\n".into(),
    };
    case.oversized(limits.max_body_bytes + 1).await?;
    case.slow_header().await?;
    case.slow_body().await?;
    // A handshake that never completes ends too (after the handshake timeout, 10 s).
    let before = case.count(Rejection::HeaderTimeout);
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(&[0x16, 0x03, 0x01]).await?;
    let mut rest = Vec::new();
    tokio::time::timeout(DRIP_FOR, tcp.read_to_end(&mut rest))
        .await
        .context("the server kept a half handshake open")??;
    ensure!(case.count(Rejection::HeaderTimeout) == before + 1);
    stop.cancel();
    Ok(())
}
