//! A PromQL instant-query client: one query in, one `f64` out, or an error that says
//! what went wrong in words a policy author can act on. It does not fall back (a policy's
//! declared fallback is the engine's business) and retries only a request that died on a
//! stale keep-alive connection.

use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Long enough for a heavy query on a busy Prometheus, short enough that a dead one does
/// not hold up a policy tick for long (the tick then uses the policy's fallback).
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Bodies of instant queries that reduce to one number are tiny; a bigger body means the
/// query returns far too many series, which is refused anyway.
const MAX_RESPONSE_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error("invalid Prometheus URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("building the HTTP client for Prometheus: {0}")]
    BuildClient(#[source] reqwest::Error),
    #[error(
        "Prometheus at {url} unreachable: connection refused (is it running, on that port?): {reason}"
    )]
    Refused { url: String, reason: String },
    #[error("Prometheus at {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Prometheus at {url} did not answer within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("Prometheus at {url} rejected the query `{query}`: {error_type}: {message}")]
    Rejected {
        url: String,
        query: String,
        error_type: String,
        message: String,
    },
    #[error("Prometheus at {url} answered HTTP {status} for `{query}`: {body}")]
    HttpStatus {
        url: String,
        query: String,
        status: u16,
        body: String,
    },
    #[error("reading the answer of Prometheus at {url}: {reason}")]
    ReadResponse { url: String, reason: String },
    #[error("the answer of Prometheus at {url} is larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error(
        "the answer of Prometheus at {url} is not the query API's JSON, not JSON at all (is it Prometheus?): {reason}; it began {body:?}"
    )]
    NotJson {
        url: String,
        reason: String,
        body: String,
    },
    #[error("the answer of Prometheus at {url} is not the query API's JSON: {reason}")]
    DecodeResponse { url: String, reason: String },
    #[error(
        "the query `{query}` returned no series (is the metric scraped? wrap it in e.g. `sum(...) or vector(0)` to default to 0)"
    )]
    EmptyResult { query: String },
    #[error(
        "the query `{query}` returned {count} series; a policy needs one number: aggregate it, e.g. `sum(...)` or `max(...)`"
    )]
    MultipleSeries { query: String, count: usize },
    #[error(
        "the query `{query}` returned a {result_type}; a policy needs a scalar or a one-element instant vector"
    )]
    NotScalar { query: String, result_type: String },
    #[error("the query `{query}` returned {value:?}, which is not a number")]
    NotANumber { query: String, value: String },
}

/// What kind of failure a [`PromError`] is: the `reason` label of
/// `nemesis_controller_prometheus_errors_total` and the reason of a policy's
/// `PrometheusQueries` condition. Few and fixed, so the label stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromFailure {
    /// Nothing listens there: Prometheus is down, or the URL's port is wrong.
    Refused,
    /// Other transport failures: DNS, reset, a connection closed mid-answer.
    Unreachable,
    /// No complete answer within the source's timeout (or Prometheus' own query timeout).
    Timeout,
    /// An HTTP error status with a body that is not the query API's (a proxy's 502 page).
    HttpStatus,
    /// A body that is not JSON at all.
    NotJson,
    /// JSON, but not the query API's shape, or a body over the size limit.
    WrongShape,
    /// The query API's own error: a bad query, an execution error.
    Rejected,
    /// The query returned no series.
    NoData,
    /// Several series, a range vector, a string, or NaN: not one number.
    NotOneNumber,
    /// No Prometheus configured, or an invalid URL.
    Config,
}

impl PromFailure {
    pub const ALL: [PromFailure; 10] = [
        PromFailure::Refused,
        PromFailure::Unreachable,
        PromFailure::Timeout,
        PromFailure::HttpStatus,
        PromFailure::NotJson,
        PromFailure::WrongShape,
        PromFailure::Rejected,
        PromFailure::NoData,
        PromFailure::NotOneNumber,
        PromFailure::Config,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PromFailure::Refused => "refused",
            PromFailure::Unreachable => "unreachable",
            PromFailure::Timeout => "timeout",
            PromFailure::HttpStatus => "http_status",
            PromFailure::NotJson => "not_json",
            PromFailure::WrongShape => "wrong_shape",
            PromFailure::Rejected => "rejected",
            PromFailure::NoData => "no_data",
            PromFailure::NotOneNumber => "not_one_number",
            PromFailure::Config => "config",
        }
    }

    /// The reason of a Kubernetes condition (CamelCase).
    pub fn condition_reason(self) -> &'static str {
        match self {
            PromFailure::Refused => "ConnectionRefused",
            PromFailure::Unreachable => "Unreachable",
            PromFailure::Timeout => "Timeout",
            PromFailure::HttpStatus => "HTTPError",
            PromFailure::NotJson => "NotJSON",
            PromFailure::WrongShape => "WrongShape",
            PromFailure::Rejected => "QueryRejected",
            PromFailure::NoData => "NoData",
            PromFailure::NotOneNumber => "NotOneNumber",
            PromFailure::Config => "NotConfigured",
        }
    }
}

impl PromError {
    pub fn failure(&self) -> PromFailure {
        match self {
            PromError::InvalidUrl { .. } | PromError::BuildClient(_) => PromFailure::Config,
            PromError::Refused { .. } => PromFailure::Refused,
            PromError::Unreachable { .. } | PromError::ReadResponse { .. } => {
                PromFailure::Unreachable
            }
            PromError::Timeout { .. } => PromFailure::Timeout,
            // Prometheus' own deadline (the `timeout` parameter we pass) ran out.
            PromError::Rejected { error_type, .. } if error_type == "timeout" => {
                PromFailure::Timeout
            }
            PromError::Rejected { .. } => PromFailure::Rejected,
            PromError::HttpStatus { .. } => PromFailure::HttpStatus,
            PromError::NotJson { .. } => PromFailure::NotJson,
            PromError::DecodeResponse { .. } | PromError::TooLarge { .. } => {
                PromFailure::WrongShape
            }
            PromError::EmptyResult { .. } => PromFailure::NoData,
            PromError::MultipleSeries { .. }
            | PromError::NotScalar { .. }
            | PromError::NotANumber { .. } => PromFailure::NotOneNumber,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PromClient {
    base: Url,
    query_url: Url,
    range_url: Url,
    http: reqwest::Client,
    timeout: Duration,
}

impl PromClient {
    /// `base_url` is where Prometheus serves its UI (`http://prometheus:9090`, or with a
    /// path prefix such as `http://host/prometheus/`).
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, PromError> {
        let invalid = |reason: &str| PromError::InvalidUrl {
            url: base_url.to_string(),
            reason: reason.to_string(),
        };
        let mut base = Url::parse(base_url).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid("a query string or fragment is not allowed"));
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let query_url = base
            .join("api/v1/query")
            .map_err(|e| invalid(&e.to_string()))?;
        let range_url = base
            .join("api/v1/query_range")
            .map_err(|e| invalid(&e.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(PromError::BuildClient)?;
        Ok(Self {
            base,
            query_url,
            range_url,
            http,
            timeout,
        })
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// Evaluates `promql` now; the result must be a scalar or an instant vector of
    /// exactly one series.
    pub async fn query(&self, promql: &str) -> Result<f64, PromError> {
        // Ask Prometheus to give up too, so an abandoned query stops costing it.
        let server_timeout = format!("{}ms", self.timeout.as_millis().max(1));
        let form = [("query", promql), ("timeout", server_timeout.as_str())];
        let data = self.ask(&self.query_url, promql, &form).await?;
        single_value(promql, data)
    }

    /// Evaluates `promql` from `start` to `end` (Unix seconds) every `step` seconds
    /// (reports' series). The result must be at most one series (none: no data, an
    /// empty list); its points come back as `(unix seconds, value)`, NaNs left out.
    pub async fn query_range(
        &self,
        promql: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Vec<(f64, f64)>, PromError> {
        let server_timeout = format!("{}ms", self.timeout.as_millis().max(1));
        let (start, end, step) = (
            format!("{start:.3}"),
            format!("{end:.3}"),
            format!("{step:.3}"),
        );
        let form = [
            ("query", promql),
            ("start", start.as_str()),
            ("end", end.as_str()),
            ("step", step.as_str()),
            ("timeout", server_timeout.as_str()),
        ];
        let data = self.ask(&self.range_url, promql, &form).await?;
        range_points(promql, data)
    }

    /// POSTs `form` to `endpoint` and decodes the API's answer: its `data` on success,
    /// else an error naming the server, the query and what went wrong (refused, timed
    /// out, rejected, not JSON, an HTTP error page).
    async fn ask<D: DeserializeOwned>(
        &self,
        endpoint: &Url,
        promql: &str,
        form: &[(&str, &str)],
    ) -> Result<D, PromError> {
        let url = self.base.as_str().trim_end_matches('/').to_string();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let first = self.http.post(endpoint.clone()).form(form).send().await;
        let sent = match first {
            // A pooled keep-alive connection the server closed (it restarted, or its idle
            // timeout hit first) fails without a connect error; queries are read-only,
            // so one retry on a fresh connection within the same budget is safe, and
            // gives the real answer ("connection refused", or a result).
            Err(e) if !e.is_timeout() && !e.is_connect() => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    Err(e)
                } else {
                    tracing::debug!(err = %error_chain(&e), "retrying a PromQL query once");
                    self.http
                        .post(endpoint.clone())
                        .form(form)
                        .timeout(left)
                        .send()
                        .await
                }
            }
            other => other,
        };
        let resp = match sent {
            Ok(r) => r,
            Err(e) => return Err(self.transport_error(&url, &e)),
        };
        let status = resp.status();
        let body = read_limited(resp)
            .await
            .map_err(|e| self.body_error(&url, &e))?;
        match serde_json::from_slice::<ApiResponse<D>>(&body) {
            Ok(ApiResponse::Error {
                error_type, error, ..
            }) => Err(PromError::Rejected {
                url,
                query: promql.to_string(),
                error_type,
                message: error,
            }),
            Ok(ApiResponse::Success { data }) => Ok(data),
            // A success status: the body should have been the API's JSON. Whether it is
            // JSON at all tells a wrong server (an HTML page) from a wrong shape.
            Err(e) if status.is_success() => {
                match serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
                    Err(_) => Err(PromError::NotJson {
                        url,
                        reason: e.to_string(),
                        body: snippet(&body),
                    }),
                    Ok(_) => Err(PromError::DecodeResponse {
                        url,
                        reason: e.to_string(),
                    }),
                }
            }
            Err(_) => Err(PromError::HttpStatus {
                url,
                query: promql.to_string(),
                status: status.as_u16(),
                body: snippet(&body),
            }),
        }
    }

    fn transport_error(&self, url: &str, e: &reqwest::Error) -> PromError {
        if e.is_timeout() {
            PromError::Timeout {
                url: url.to_string(),
                after: self.timeout,
            }
        } else if refused(e) {
            PromError::Refused {
                url: url.to_string(),
                reason: error_chain(e),
            }
        } else {
            PromError::Unreachable {
                url: url.to_string(),
                reason: error_chain(e),
            }
        }
    }

    fn body_error(&self, url: &str, e: &BodyError) -> PromError {
        match e {
            BodyError::Transport(e) if e.is_timeout() => PromError::Timeout {
                url: url.to_string(),
                after: self.timeout,
            },
            BodyError::Transport(e) => PromError::ReadResponse {
                url: url.to_string(),
                reason: error_chain(e),
            },
            BodyError::TooLarge => PromError::TooLarge {
                url: url.to_string(),
                limit: MAX_RESPONSE_BYTES,
            },
        }
    }
}

enum BodyError {
    Transport(reqwest::Error),
    TooLarge,
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Whether the connection was refused (nothing listens), from the I/O error down the
/// chain: reqwest words it differently across versions, the error kind is stable.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        // A boxed cause hides its type from `downcast_ref`; its text is the OS's.
        if err.to_string().contains("Connection refused") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// reqwest's Display stops at "error sending request"; the cause ("Connection refused")
/// is further down the chain.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

// === the query API's JSON ===

/// The envelope of every query API answer; `D` is an instant or a range result.
#[derive(Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
enum ApiResponse<D> {
    Success {
        data: D,
    },
    Error {
        #[serde(rename = "errorType", default)]
        error_type: String,
        #[serde(default)]
        error: String,
    },
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum QueryData {
    Scalar(SamplePair),
    Vector(Vec<VectorSample>),
    Matrix(serde::de::IgnoredAny),
    String(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct VectorSample {
    value: SamplePair,
}

/// `[<unix seconds>, "<value>"]`: Prometheus sends values as strings so NaN and
/// infinities survive JSON.
#[derive(Deserialize)]
struct SamplePair(f64, String);

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum RangeData {
    Matrix(Vec<MatrixSeries>),
    Vector(serde::de::IgnoredAny),
    Scalar(serde::de::IgnoredAny),
    String(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct MatrixSeries {
    values: Vec<SamplePair>,
}

/// The points of a range query's one series (none: no data).
fn range_points(query: &str, data: RangeData) -> Result<Vec<(f64, f64)>, PromError> {
    let mut series = match data {
        RangeData::Matrix(m) => m,
        _ => {
            return Err(PromError::NotScalar {
                query: query.to_string(),
                result_type: "not a range result (matrix)".into(),
            });
        }
    };
    match series.len() {
        0 => Ok(Vec::new()),
        1 => {
            let mut out = Vec::new();
            for SamplePair(t, v) in series.remove(0).values {
                let v = match v.as_str() {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    s => s.parse::<f64>().map_err(|_| PromError::NotANumber {
                        query: query.to_string(),
                        value: v.clone(),
                    })?,
                };
                if !v.is_nan() {
                    out.push((t, v));
                }
            }
            Ok(out)
        }
        count => Err(PromError::MultipleSeries {
            query: query.to_string(),
            count,
        }),
    }
}

/// The decision part: which answers count as one number. Pure, so it is tested
/// without a server.
fn single_value(query: &str, data: QueryData) -> Result<f64, PromError> {
    let raw = match data {
        QueryData::Scalar(SamplePair(_, v)) => v,
        QueryData::Vector(mut v) => match v.len() {
            0 => {
                return Err(PromError::EmptyResult {
                    query: query.to_string(),
                });
            }
            1 => v.remove(0).value.1,
            count => {
                return Err(PromError::MultipleSeries {
                    query: query.to_string(),
                    count,
                });
            }
        },
        QueryData::Matrix(_) => {
            return Err(PromError::NotScalar {
                query: query.to_string(),
                result_type: "range vector (matrix)".into(),
            });
        }
        QueryData::String(_) => {
            return Err(PromError::NotScalar {
                query: query.to_string(),
                result_type: "string".into(),
            });
        }
    };
    let not_a_number = || PromError::NotANumber {
        query: query.to_string(),
        value: raw.clone(),
    };
    let v = match raw.as_str() {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        s => s.parse::<f64>().map_err(|_| not_a_number())?,
    };
    // NaN (e.g. 0/0) compares false with everything: a condition over it would silently
    // never fire, so it is an error and the policy's fallback applies.
    if v.is_nan() {
        return Err(not_a_number());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<f64, PromError> {
        match serde_json::from_str::<ApiResponse<QueryData>>(json).unwrap() {
            ApiResponse::Success { data } => single_value("q", data),
            ApiResponse::Error { .. } => panic!("error response"),
        }
    }

    #[test]
    fn scalar_and_single_series_vectors_give_their_value() {
        assert_eq!(
            parse(r#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"42"]}}"#)
                .unwrap(),
            42.0
        );
        assert_eq!(
            parse(
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"b"},"value":[1.5,"2.5"]}]}}"#
            )
            .unwrap(),
            2.5
        );
        assert_eq!(
            parse(r#"{"status":"success","data":{"resultType":"scalar","result":[1,"+Inf"]}}"#)
                .unwrap(),
            f64::INFINITY
        );
    }

    #[test]
    fn empty_multi_series_matrix_and_nan_results_are_explicit_errors() {
        let e = parse(r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#);
        assert!(matches!(e, Err(PromError::EmptyResult { .. })));
        let e = parse(
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"1"]},{"metric":{},"value":[1,"2"]}]}}"#,
        );
        assert!(matches!(e, Err(PromError::MultipleSeries { count: 2, .. })));
        let e = parse(
            r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"1"]]}]}}"#,
        );
        assert!(matches!(e, Err(PromError::NotScalar { .. })));
        let e = parse(r#"{"status":"success","data":{"resultType":"scalar","result":[1,"NaN"]}}"#);
        assert!(matches!(e, Err(PromError::NotANumber { .. })));
    }

    fn parse_range(json: &str) -> Result<Vec<(f64, f64)>, PromError> {
        match serde_json::from_str::<ApiResponse<RangeData>>(json).unwrap() {
            ApiResponse::Success { data } => range_points("q", data),
            ApiResponse::Error { .. } => panic!("error response"),
        }
    }

    #[test]
    fn a_range_answer_is_one_series_of_points_or_none() {
        let pts = parse_range(
            r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[10,"1.5"],[20,"NaN"],[30,"2"]]}]}}"#,
        )
        .unwrap();
        assert_eq!(pts, vec![(10.0, 1.5), (30.0, 2.0)]);
        let none =
            parse_range(r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#);
        assert_eq!(none.unwrap(), vec![]);
        let two = parse_range(
            r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[]},{"metric":{},"values":[]}]}}"#,
        );
        assert!(matches!(
            two,
            Err(PromError::MultipleSeries { count: 2, .. })
        ));
        let bad = parse_range(
            r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"x"]]}]}}"#,
        );
        assert!(matches!(bad, Err(PromError::NotANumber { .. })));
    }

    /// Answers every connection with `response` (a whole HTTP/1.1 answer), once read.
    async fn answering(response: &'static str) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut got = 0;
                    // The head, then the form body (small): wait for its last bytes.
                    while !String::from_utf8_lossy(&buf[..got]).contains("timeout=") {
                        match s.read(&mut buf[got..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got += n,
                        }
                    }
                    let _ = s.write_all(response.as_bytes()).await;
                });
            }
        });
        addr
    }

    async fn failure_of(addr: std::net::SocketAddr, timeout: Duration) -> (PromFailure, String) {
        let c = PromClient::new(&format!("http://{addr}"), timeout).unwrap();
        let e = c.query("up").await.unwrap_err();
        (e.failure(), e.to_string())
    }

    #[tokio::test]
    async fn each_kind_of_failure_is_told_apart() {
        let t = Duration::from_secs(30);
        // Nothing listens on a port just released.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (f, m) = failure_of(closed, t).await;
        assert_eq!(f, PromFailure::Refused, "{m}");
        assert!(m.contains("connection refused"), "{m}");
        let html = answering(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\nConnection: close\r\n\r\n<html></html>",
        )
        .await;
        let (f, m) = failure_of(html, t).await;
        assert_eq!(f, PromFailure::NotJson, "{m}");
        assert!(m.contains("not JSON at all") && m.contains("<html>"), "{m}");
        let shape = answering(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\nConnection: close\r\n\r\n[1,2,3]",
        )
        .await;
        let (f, m) = failure_of(shape, t).await;
        assert_eq!(f, PromFailure::WrongShape, "{m}");
        let bad_gateway = answering(
            "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope",
        )
        .await;
        let (f, m) = failure_of(bad_gateway, t).await;
        assert_eq!(f, PromFailure::HttpStatus, "{m}");
        assert!(m.contains("answered HTTP 502"), "{m}");
        let rejected = answering(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 56\r\nConnection: close\r\n\r\n{\"status\":\"error\",\"errorType\":\"bad_data\",\"error\":\"oops\"}",
        )
        .await;
        let (f, m) = failure_of(rejected, t).await;
        assert_eq!(f, PromFailure::Rejected, "{m}");
        // Accepts, never answers: past the client's deadline.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = l.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let (f, m) = failure_of(silent, Duration::from_millis(200)).await;
        assert_eq!(f, PromFailure::Timeout, "{m}");
        assert!(m.contains("did not answer within 200ms"), "{m}");
    }

    #[test]
    fn base_urls_are_validated_and_keep_their_path_prefix() {
        let c = PromClient::new("http://127.0.0.1:9090/prom", DEFAULT_QUERY_TIMEOUT).unwrap();
        assert_eq!(
            c.query_url.as_str(),
            "http://127.0.0.1:9090/prom/api/v1/query"
        );
        let e = PromClient::new("ftp://x", DEFAULT_QUERY_TIMEOUT).unwrap_err();
        assert!(e.to_string().contains("http or https"), "{e}");
        assert!(PromClient::new("not a url", DEFAULT_QUERY_TIMEOUT).is_err());
    }
}
