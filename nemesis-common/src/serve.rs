//! Serving an axum `Router` with the limits every Nemesis HTTP listener has: a bound on
//! the request body (413), on the time to send a request head (the connection is
//! closed), and on the time to send the body and get the answer (408, or 503 when the
//! handler is what was slow); every refusal is counted by listener and reason. Owns the
//! accept loop and the per-connection limits; what is served is the router's business,
//! and a route that streams (server-sent events) must return its response head at once:
//! the request timeout ends at the head, never cuts a streaming body.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// A client on the pod network sends a request head in milliseconds; ten seconds is
/// room for a congested node, and what a slow-loris client may hold a connection
/// without a complete head. Also how long an idle keep-alive connection stays open
/// (hyper's clock runs from the end of the previous answer): the agents' heartbeats (every 5 s)
/// keep theirs; Prometheus reconnects between scrapes, which costs nothing.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Body received and answer sent within this: the largest body (an Alertmanager group of
/// 4 MiB) takes well under a second on any network Nemesis runs on, and the slowest
/// handler (applying a policy through the API server) answers in a few seconds.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The limits of one listener. Routes lower the body limit for themselves with
/// `DefaultBodyLimit` (axum's extractors apply the innermost one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From accepting the connection (or the end of the previous answer) to a complete
    /// request head; past it the connection is closed.
    pub header_read_timeout: Duration,
    /// From a complete request head to the answer's head.
    pub request_timeout: Duration,
    /// The largest body any route of the listener takes: a declared `Content-Length`
    /// above it is refused before the handler runs, and every extractor reads at most
    /// this much unless its route says less.
    pub max_body_bytes: usize,
}

impl Limits {
    /// The default timeouts with `max_body_bytes`.
    pub const fn with_max_body(max_body_bytes: usize) -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_body_bytes,
        }
    }
}

/// Why a request or connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// 413: a body over the listener's or the route's limit.
    BodyTooLarge,
    /// The connection closed: no complete request head within `header_read_timeout`.
    HeaderTimeout,
    /// 408: the body did not arrive within `request_timeout`.
    BodyTimeout,
    /// 503: the body arrived but the handler did not answer within `request_timeout`.
    AnswerTimeout,
    /// 400: plain HTTP (or anything not TLS) on a TLS listener.
    PlainHttpOnTls,
    /// The TLS handshake failed (a client trusting another CA, a protocol mismatch).
    TlsHandshake,
}

impl Rejection {
    /// The metric's `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::HeaderTimeout => "header_timeout",
            Rejection::BodyTimeout => "body_timeout",
            Rejection::AnswerTimeout => "answer_timeout",
            Rejection::PlainHttpOnTls => "plain_http_on_tls",
            Rejection::TlsHandshake => "tls_handshake_failed",
        }
    }

    pub const ALL: [Rejection; 6] = [
        Rejection::BodyTooLarge,
        Rejection::HeaderTimeout,
        Rejection::BodyTimeout,
        Rejection::AnswerTimeout,
        Rejection::PlainHttpOnTls,
        Rejection::TlsHandshake,
    ];
}

impl EncodeLabelValue for Rejection {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RejectedLabels {
    listener: String,
    reason: Rejection,
}

/// Requests and connections refused by the limits, by listener and reason; one family
/// for every listener of a process.
#[derive(Debug, Clone, Default)]
pub struct RejectionCounter(Family<RejectedLabels, Counter>);

impl RejectionCounter {
    /// Registers the family as `name` (the registry adds `_total`).
    pub fn register(&self, registry: &mut Registry, name: &str) {
        registry.register(
            name,
            "HTTP requests and connections refused by a listener's limits (body size, header and request time) or its TLS (plain HTTP, failed handshakes), by listener and reason",
            self.0.clone(),
        );
    }

    /// Creates the series of `listener` at zero, so a rate() sees 0 rather than nothing.
    pub fn declare(&self, listener: &str) {
        for reason in Rejection::ALL {
            let _ = self.0.get_or_create(&labels(listener, reason));
        }
    }

    pub fn count(&self, listener: &str, reason: Rejection) -> u64 {
        self.0.get_or_create(&labels(listener, reason)).get()
    }

    fn inc(&self, listener: &str, reason: Rejection) {
        self.0.get_or_create(&labels(listener, reason)).inc();
    }
}

fn labels(listener: &str, reason: Rejection) -> RejectedLabels {
    RejectedLabels {
        listener: listener.to_string(),
        reason,
    }
}

/// A router with a listener's limits, ready to serve connections; cheap to clone.
#[derive(Clone)]
pub struct LimitedRouter {
    name: &'static str,
    limits: Limits,
    rejected: RejectionCounter,
    router: Router,
}

#[derive(Clone)]
struct Guard {
    name: &'static str,
    limits: Limits,
    rejected: RejectionCounter,
}

impl LimitedRouter {
    /// `router` behind the limits of the listener `name` (a metric label: keep it fixed).
    pub fn new(
        name: &'static str,
        router: Router,
        limits: Limits,
        rejected: RejectionCounter,
    ) -> Self {
        rejected.declare(name);
        let guard = Guard {
            name,
            limits,
            rejected: rejected.clone(),
        };
        let router = router
            .layer(DefaultBodyLimit::max(limits.max_body_bytes))
            .layer(middleware::from_fn_with_state(guard, limit_request));
        Self {
            name,
            limits,
            rejected,
            router,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Counts a refusal the caller made itself (a TLS handshake not done in time).
    pub fn count_rejection(&self, reason: Rejection) {
        self.rejected.inc(self.name, reason);
    }

    /// Serves one accepted connection (plain TCP, or TLS after its handshake) until it
    /// ends, the client breaks a limit, or `stop` turns true (then the request in flight
    /// finishes, within `request_timeout`). Requests carry `ConnectInfo(peer)`.
    pub async fn serve_connection<I>(
        &self,
        io: I,
        peer: SocketAddr,
        mut stop: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let traffic = Arc::new(Traffic::default());
        let returned = Arc::new(std::sync::Mutex::new(None));
        let io = Watched {
            inner: Some(io),
            traffic: traffic.clone(),
            returned: returned.clone(),
        };
        self.drive(io, peer, &traffic, &mut stop).await;
        // hyper dropped the connection: close it without an RST, so that a client still
        // sending (the rest of a refused body) reads the answer before the close.
        let io = returned.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(io) = io {
            close_cleanly(io).await;
        }
    }

    async fn drive<I>(
        &self,
        io: Watched<I>,
        peer: SocketAddr,
        traffic: &Traffic,
        stop: &mut watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let router = self.router.clone();
        let seen = io.traffic.clone();
        let service =
            hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                seen.request.store(true, Ordering::Relaxed);
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                router.clone().oneshot(req)
            });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout);
        builder.http2().timer(TokioTimer::new());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        // hyper's header timeout starts once it knows the protocol; a client that sends
        // nothing (or half an HTTP/2 preface) is bounded here.
        let first_head = tokio::time::sleep(self.limits.header_read_timeout);
        tokio::pin!(first_head);
        let mut stopping = false;
        let mut awaiting_first_head = true;
        let result = loop {
            tokio::select! {
                r = conn.as_mut() => break r,
                _ = first_head.as_mut(), if awaiting_first_head => {
                    // The condition above was read when this select started.
                    if traffic.request.load(Ordering::Relaxed) {
                        awaiting_first_head = false;
                        continue;
                    }
                    self.rejected.inc(self.name, Rejection::HeaderTimeout);
                    tracing::debug!(listener = self.name, %peer, "no request head in time; closing");
                    return;
                }
                _ = stop.wait_for(|s| *s), if !stopping => {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = tokio::time::sleep(self.limits.request_timeout), if stopping => return,
            }
        };
        if let Err(err) = result {
            let timed_out = err
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout);
            // Bytes since our last write, or no answer yet: a head was under way. Else an
            // idle keep-alive connection ended, as it should.
            let head_under_way = traffic.read_since_write.load(Ordering::Relaxed)
                || !traffic.wrote.load(Ordering::Relaxed);
            if timed_out && head_under_way {
                self.rejected.inc(self.name, Rejection::HeaderTimeout);
                tracing::debug!(listener = self.name, %peer, "request head not complete in time; closed");
            } else if !timed_out {
                tracing::debug!(listener = self.name, %peer, %err, "connection ended with an error");
            }
        }
    }
}

/// How long a closed connection is read (and discarded) for the client to see the close.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Sends the close, then reads and discards until the client closes too (at most
/// [`CLOSE_LINGER`]): closing a socket with unread bytes sends an RST, which can destroy
/// the answer in the client's receive queue before the client reads it.
async fn close_cleanly<I: AsyncRead + AsyncWrite + Unpin>(mut io: I) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let linger = async {
        // hyper may have shut the stream down already; a second shutdown is harmless.
        let _ = io.shutdown().await;
        let mut sink = [0u8; 1024];
        while let Ok(n) = io.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, linger).await;
}

/// Serves `router` on `listener` until `shutdown`, then lets the requests in flight
/// finish (each within the request timeout).
pub async fn serve(
    listener: TcpListener,
    router: LimitedRouter,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let (stop_tx, stop) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = shutdown.as_mut() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                // Out of descriptors and the like: wait a moment rather than spin.
                tracing::warn!(listener = router.name, %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let stop = stop.clone();
        conns.spawn(async move { router.serve_connection(tcp, peer, stop).await });
    }
    drop(listener);
    stop_tx.send_replace(true);
    // Every connection ends within the request timeout once stopped; the margin covers
    // the answer's last bytes.
    let bound = router.limits.request_timeout + Duration::from_secs(1);
    let _ = tokio::time::timeout(bound, async { while conns.join_next().await.is_some() {} }).await;
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

// === the per-request limits ===

async fn limit_request(State(guard): State<Guard>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > guard.limits.max_body_bytes as u64) {
        guard.rejected.inc(guard.name, Rejection::BodyTooLarge);
        return refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body of {n} bytes is larger than this listener's limit of {} bytes",
                guard.limits.max_body_bytes
            ),
        );
    }
    if guard.limits.max_body_bytes == 0 && !http_body::Body::is_end_stream(req.body()) {
        // A chunked body to a listener that takes none: its size is unknown until read.
        guard.rejected.inc(guard.name, Rejection::BodyTooLarge);
        return refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            "this listener takes no request body".to_string(),
        );
    }
    let body_done = Arc::new(AtomicBool::new(false));
    let req = {
        let done = body_done.clone();
        req.map(|inner| {
            done.store(http_body::Body::is_end_stream(&inner), Ordering::Relaxed);
            Body::new(TrackedBody { inner, done })
        })
    };
    let timeout = guard.limits.request_timeout;
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(resp) => {
            if resp.status() == StatusCode::PAYLOAD_TOO_LARGE {
                // A route's own (lower) limit, found while reading.
                guard.rejected.inc(guard.name, Rejection::BodyTooLarge);
            }
            resp
        }
        Err(_) if !body_done.load(Ordering::Relaxed) => {
            guard.rejected.inc(guard.name, Rejection::BodyTimeout);
            refusal(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs_f64()
                ),
            )
        }
        Err(_) => {
            guard.rejected.inc(guard.name, Rejection::AnswerTimeout);
            tracing::warn!(
                listener = guard.name,
                ?timeout,
                "a handler did not answer in time"
            );
            refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no answer within {} s; retry later", timeout.as_secs_f64()),
            )
        }
    }
}

/// A plain-text refusal that closes the connection: the rest of the body is never read.
fn refusal(status: StatusCode, message: String) -> Response {
    let mut resp = (status, format!("{message}\n")).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// A request body that says when it has been read to its end.
struct TrackedBody {
    inner: Body,
    done: Arc<AtomicBool>,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.done.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

// === the connection's traffic, to tell a slow head from an idle connection ===

#[derive(Debug, Default)]
struct Traffic {
    /// A request head was complete at least once.
    request: AtomicBool,
    /// The client sent bytes since our last write.
    read_since_write: AtomicBool,
    /// We wrote at least once.
    wrote: AtomicBool,
}

impl Traffic {
    fn wrote_now(&self) {
        self.read_since_write.store(false, Ordering::Relaxed);
        self.wrote.store(true, Ordering::Relaxed);
    }
}

/// The connection's stream as hyper sees it: notes the traffic, and gives the stream back
/// through `returned` when hyper drops it (for a clean close).
struct Watched<I> {
    inner: Option<I>,
    traffic: Arc<Traffic>,
    returned: Arc<std::sync::Mutex<Option<I>>>,
}

impl<I> Watched<I> {
    fn io(&mut self) -> Pin<&mut I>
    where
        I: Unpin,
    {
        Pin::new(
            self.inner
                .as_mut()
                .expect("the stream is only taken on drop"),
        )
    }
}

impl<I> Drop for Watched<I> {
    fn drop(&mut self) {
        if let Some(io) = self.inner.take() {
            *self.returned.lock().unwrap_or_else(|e| e.into_inner()) = Some(io);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.io().poll_read(cx, buf);
        if buf.filled().len() > before {
            self.traffic.read_since_write.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = self.io().poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.traffic.wrote_now();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = self.io().poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.traffic.wrote_now();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}
