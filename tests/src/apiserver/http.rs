//! The HTTPS front: accepting TLS connections (HTTP/1.1 and h2), bearer-token
//! authentication, body limits, content negotiation (JSON, YAML, Table,
//! PartialObjectMetadata), routing to discovery/OpenAPI/resource handlers, and the
//! request log tests can read. It holds no API rules of its own.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::rbac::User;
use super::routes::{self, Route};
use super::status::ApiError;
use super::store::State;
use super::tokens::Signer;
use super::{access, discovery, handlers, openapi};

pub type Body = BoxBody<Bytes, Infallible>;

/// Request bodies larger than this are refused, as upstream's 3 MiB limit.
const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// How many requests the log keeps.
const REQUEST_LOG_CAPACITY: usize = 2000;

/// One request as the server saw it (for tests asserting what a client did).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    pub user_agent: String,
    pub content_type: String,
    /// Who the server took the requester for (after impersonation); empty when the
    /// token was refused.
    pub user: String,
}

pub struct Settings {
    pub bookmark_interval: Duration,
    pub default_watch_timeout: Duration,
}

/// Everything the handlers share: the state behind one lock, the token, and the
/// switches tests use to cut or hold watches.
pub struct Shared {
    pub state: Mutex<State>,
    /// The admin token (a `system:masters` member), the kubeconfig's.
    pub token: String,
    /// Signs and checks ServiceAccount tokens.
    pub signer: Signer,
    pub settings: Settings,
    pub address: String,
    pub shutdown: CancellationToken,
    /// Cancelled (and replaced) to end every running watch.
    pub watch_epoch: Mutex<CancellationToken>,
    /// While true, new watch requests wait.
    pub watch_gate: tokio::sync::watch::Sender<bool>,
    /// While set, the watches it covers hold their events back.
    pub watch_hold: tokio::sync::watch::Sender<Option<super::watch::EventHold>>,
    pub log: Mutex<VecDeque<RequestRecord>>,
    /// Injected faults (chaos tests); off unless a plan is set.
    pub faults: super::faults::Injector,
    /// Every request served, counted by verb (the log above keeps only the latest).
    pub counts: Mutex<RequestCounts>,
}

/// Requests served since start, by HTTP method (`GET` includes watches), so a test or
/// a benchmark can difference two snapshots however many requests were served between.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub by_method: std::collections::BTreeMap<String, u64>,
    /// POSTs of reviews (TokenReview, SubjectAccessReview and the like): creates that
    /// persist nothing, asked to authenticate or authorize a caller.
    pub reviews: u64,
}

impl RequestCounts {
    /// Requests that may change state: POST, PUT, PATCH and DELETE (reviews included).
    pub fn writes(&self) -> u64 {
        ["POST", "PUT", "PATCH", "DELETE"]
            .iter()
            .map(|m| self.by_method.get(*m).copied().unwrap_or(0))
            .sum()
    }

    /// [`RequestCounts::writes`] without the reviews: the requests that store something.
    pub fn state_writes(&self) -> u64 {
        self.writes() - self.reviews
    }
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving what is there.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How the client wants the response.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    Json,
    Yaml,
    Table(String),
    PartialMeta(String),
}

fn media_params(range: &str) -> (String, Vec<(String, String)>) {
    let mut it = range.split(';');
    let ty = it.next().unwrap_or("").trim().to_lowercase();
    let params = it
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    (ty, params)
}

/// Pick the first acceptable media range of an Accept header.
pub fn negotiate(accept: Option<&str>) -> Result<Format, ApiError> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Format::Json);
    };
    for range in accept.split(',') {
        let (ty, params) = media_params(range);
        let p = |k: &str| {
            params
                .iter()
                .find(|(pk, _)| pk == k)
                .map(|(_, v)| v.as_str())
        };
        match ty.as_str() {
            "application/json" => match (p("as"), p("g"), p("v")) {
                (None, _, _) => return Ok(Format::Json),
                (Some("Table"), Some("meta.k8s.io"), Some(v @ ("v1" | "v1beta1"))) => {
                    return Ok(Format::Table(format!("meta.k8s.io/{v}")));
                }
                (
                    Some("PartialObjectMetadata" | "PartialObjectMetadataList"),
                    Some("meta.k8s.io"),
                    Some(v @ ("v1" | "v1beta1")),
                ) => {
                    return Ok(Format::PartialMeta(format!("meta.k8s.io/{v}")));
                }
                _ => continue,
            },
            "application/yaml" => return Ok(Format::Yaml),
            "*/*" | "application/*" => return Ok(Format::Json),
            _ => continue,
        }
    }
    Err(ApiError::not_acceptable(accept))
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

pub fn respond(status: u16, v: &Value, format: &Format, warnings: &[String]) -> Response<Body> {
    let (ct, bytes) = match format {
        Format::Yaml => (
            "application/yaml",
            serde_norway::to_string(v).unwrap_or_default().into_bytes(),
        ),
        Format::Table(av) if v["kind"] == "Table" => {
            let ver = av.rsplit('/').next().unwrap_or("v1");
            return with_headers(
                status,
                &format!("application/json;as=Table;v={ver};g=meta.k8s.io"),
                v.to_string().into_bytes(),
                warnings,
            );
        }
        _ => ("application/json", v.to_string().into_bytes()),
    };
    with_headers(status, ct, bytes, warnings)
}

fn with_headers(status: u16, ct: &str, bytes: Vec<u8>, warnings: &[String]) -> Response<Body> {
    let mut r = Response::new(full(bytes));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_str(ct).unwrap_or(HeaderValue::from_static("application/json")),
    );
    for w in warnings {
        let text = format!("299 - \"{}\"", w.replace('"', "\\\""));
        if let Ok(v) = HeaderValue::from_str(&text) {
            r.headers_mut().append("warning", v);
        }
    }
    r
}

pub fn error(e: &ApiError) -> Response<Body> {
    let mut r = respond(e.code, &e.to_status(), &Format::Json, &[]);
    if let Some(s) = e.retry_after
        && let Ok(v) = HeaderValue::from_str(&s.to_string())
    {
        r.headers_mut().insert(http::header::RETRY_AFTER, v);
    }
    r
}

/// The requester (impersonation applied), once authenticated and allowed `route`.
fn admit(
    shared: &Shared,
    headers: &HeaderMap,
    method: &Method,
    route: &Route,
    path: &str,
    query: &str,
) -> Result<User, ApiError> {
    let st = shared.lock();
    let user = access::authenticate(&st, &shared.signer, &shared.token, headers)?;
    let user = access::impersonate(&st, user, headers)?;
    let q = routes::query(Some(query));
    access::authorize(&st, &user, &access::attributes(route, method, path, &q))?;
    Ok(user)
}

async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let mut err = ApiError::bad_request(format!(
                "the request body is larger than {MAX_BODY_BYTES} bytes"
            ));
            err.code = 413;
            err.reason = "RequestEntityTooLarge";
            Err(err)
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

/// A Lease request that takes longer than this to serve is logged (see [`handle`]).
const SLOW_LEASE_REQUEST: Duration = Duration::from_millis(250);
/// Any other request served slower than this is logged: what holds the Lease's back.
const SLOW_REQUEST: Duration = Duration::from_secs(1);

/// Serve one request.
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let ua = parts
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let ct = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let route = routes::route(&path);
    let started = std::time::Instant::now();
    let admitted = admit(
        &shared,
        &parts.headers,
        &parts.method,
        &route,
        &path,
        &query,
    );
    let user_name = admitted
        .as_ref()
        .map(|u| u.name.clone())
        .unwrap_or_default();
    let admitted_after = started.elapsed();
    let resp = match admitted {
        Err(e) => error(&e),
        Ok(user) => match read_body(body).await {
            Err(e) => error(&e),
            Ok(bytes) => {
                let req = Admitted {
                    method: &parts.method,
                    headers: &parts.headers,
                    query: &query,
                    user_agent: &ua,
                    user: &user,
                };
                dispatch(&shared, &req, route, bytes).await
            }
        },
    };
    tracing::debug!(method = %parts.method, %path, %query, status = resp.status().as_u16(), "request");
    // A Lease request served slowly says where its time went (admission takes the state
    // lock once, the handler again): a leader steps down when its renewals are late.
    let took = started.elapsed();
    if path.contains("/leases/") && took > SLOW_LEASE_REQUEST {
        tracing::warn!(method = %parts.method, %path, ?took, admitted_after = ?admitted_after, "a Lease request was served slowly");
    } else if took > SLOW_REQUEST {
        tracing::warn!(method = %parts.method, %path, %query, ?took, admitted_after = ?admitted_after, "a request was served slowly");
    }
    {
        let mut counts = shared.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts
            .by_method
            .entry(parts.method.to_string())
            .or_default() += 1;
        if parts.method == http::Method::POST && path.ends_with("reviews") {
            counts.reviews += 1;
        }
    }
    let mut log = shared.log.lock().unwrap_or_else(|p| p.into_inner());
    if log.len() == REQUEST_LOG_CAPACITY {
        log.pop_front();
    }
    log.push_back(RequestRecord {
        method: parts.method.to_string(),
        path,
        query,
        status: resp.status().as_u16(),
        user_agent: ua,
        content_type: ct,
        user: user_name,
    });
    resp
}

/// What dispatch needs to know about an admitted request.
struct Admitted<'a> {
    method: &'a Method,
    headers: &'a HeaderMap,
    query: &'a str,
    user_agent: &'a str,
    user: &'a User,
}

async fn dispatch(
    shared: &Arc<Shared>,
    req: &Admitted<'_>,
    route: Route,
    body: Bytes,
) -> Response<Body> {
    let method = req.method;
    let accept = req
        .headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = match negotiate(accept) {
        Ok(f) => f,
        Err(e) => return error(&e),
    };
    let read_only = |v: Option<Value>| -> Response<Body> {
        if method != Method::GET {
            return error(&ApiError::method_not_allowed(method.as_str()));
        }
        match v {
            Some(v) => respond(200, &v, &Format::Json, &[]),
            None => error(&ApiError::path_not_found()),
        }
    };
    match route {
        Route::Health => {
            let mut r = Response::new(full("ok"));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        Route::Version => read_only(Some(discovery::version_info())),
        Route::Api => read_only(Some(discovery::api_versions(&shared.address))),
        Route::Apis => read_only(Some(discovery::api_group_list(&shared.lock().registry))),
        Route::Group(g) => read_only(discovery::api_group(&shared.lock().registry, &g)),
        Route::GroupVersion(g, v) => {
            read_only(discovery::resource_list(&shared.lock().registry, &g, &v))
        }
        Route::OpenApiV3Index => read_only(Some(openapi::index(&shared.lock().registry))),
        Route::OpenApiV3(g, v) => {
            read_only(openapi::group_version_doc(&shared.lock().registry, &g, &v))
        }
        Route::NotFound => error(&ApiError::path_not_found()),
        Route::Resource(p) => {
            let q = routes::query(Some(req.query));
            let ctx = handlers::Ctx {
                shared,
                method,
                headers: req.headers,
                q: &q,
                body: &body,
                format: &format,
                user_agent: req.user_agent,
                user: req.user,
            };
            handlers::resource(ctx, p).await
        }
    }
}

/// Accept connections until `cancel`; each runs until it closes or `cancel`.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let tls = tls.clone();
        let shared = shared.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), tls.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended with an error") },
                _ = cancel.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_prefers_the_first_acceptable_range() {
        let kubectl_get = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(
            negotiate(Some(kubectl_get)).unwrap(),
            Format::Table("meta.k8s.io/v1".into())
        );
        let discovery =
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json";
        assert_eq!(negotiate(Some(discovery)).unwrap(), Format::Json);
        assert_eq!(
            negotiate(Some("application/vnd.kubernetes.protobuf, */*")).unwrap(),
            Format::Json
        );
        assert_eq!(negotiate(None).unwrap(), Format::Json);
        assert_eq!(
            negotiate(Some("application/vnd.kubernetes.protobuf"))
                .unwrap_err()
                .code,
            406
        );
    }
}
