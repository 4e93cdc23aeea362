//! The kubelet's log endpoint and its Node: `GET /containerLogs/<ns>/<pod>/<container>`
//! on a loopback port serves a container's log file (`tailLines`, `limitBytes`,
//! `follow`), as the real kubelet's read-only server does for `kubectl logs`; the Node
//! object names that port (`status.daemonEndpoints.kubeletEndpoint`) and address, so
//! the API server's `pods/log` finds it as it finds a real kubelet. It only reads log
//! files under the sandbox's work directory; it never writes anything but its Node.
//!
//! Unauthenticated and read-only, bound to 127.0.0.1: the sandbox runs nowhere else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::call::{CallError, call};

/// How often a followed log is checked for new bytes.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug, thiserror::Error)]
pub enum LogServerError {
    #[error("binding the kubelet log endpoint: {0}")]
    Bind(#[source] std::io::Error),
    #[error("registering Node {node}: {source}")]
    RegisterNode { node: String, source: CallError },
}

/// What a log request asks for, from its query.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogQuery {
    pub follow: bool,
    pub tail_lines: Option<usize>,
    pub limit_bytes: Option<usize>,
}

impl LogQuery {
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut q = LogQuery::default();
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let number = |what: &str| -> Result<usize, String> {
                v.parse().map_err(|_| {
                    format!("{what}: Invalid value: \"{v}\": must be a non-negative integer")
                })
            };
            match k.as_ref() {
                "follow" => q.follow = v == "true" || v == "1",
                "tailLines" => q.tail_lines = Some(number("tailLines")?),
                "limitBytes" => q.limit_bytes = Some(number("limitBytes")?),
                "previous" if v == "true" => {
                    return Err(
                        "previous terminated container logs are not kept by the sandbox kubelet"
                            .into(),
                    );
                }
                "timestamps" if v == "true" => {
                    return Err(
                        "the sandbox kubelet records no timestamps in container logs".into(),
                    );
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// The part of `text` a query shows (before following): the last `tail_lines` lines,
/// then at most `limit_bytes`.
pub fn select(text: &[u8], q: &LogQuery) -> Vec<u8> {
    let mut start = 0;
    if let Some(n) = q.tail_lines {
        let body = text.strip_suffix(b"\n").unwrap_or(text);
        start = if n == 0 {
            text.len()
        } else {
            body.iter()
                .enumerate()
                .rev()
                .filter(|(_, b)| **b == b'\n')
                .nth(n - 1)
                .map_or(0, |(i, _)| i + 1)
        };
    }
    let mut out = text[start..].to_vec();
    if let Some(limit) = q.limit_bytes {
        out.truncate(limit);
    }
    out
}

fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg)).boxed());
    *r.status_mut() = status;
    r
}

/// Serves one request against the logs under `dir` (`<ns>_<pod>_<container>.log`).
async fn serve_one(dir: PathBuf, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let segs: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
    let ["containerLogs", ns, pod, container] = segs.as_slice() else {
        return text(StatusCode::NOT_FOUND, "not found".into());
    };
    // Object names: lower-case letters, digits, `-` and `.`; never a path.
    let safe = |s: &str| {
        !s.is_empty()
            && !s.contains("..")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    if ![ns, pod, container].iter().all(|s| safe(s)) {
        return text(StatusCode::BAD_REQUEST, "bad name".into());
    }
    let q = match LogQuery::parse(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let path = dir.join(format!("{ns}_{pod}_{container}.log"));
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => {
            return text(
                StatusCode::NOT_FOUND,
                format!("container \"{container}\" in pod \"{pod}\" has no log yet"),
            );
        }
    };
    let mut all = Vec::new();
    if let Err(e) = file.read_to_end(&mut all).await {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the log: {e}"),
        );
    }
    let first = select(&all, &q);
    if !q.follow {
        return text(StatusCode::OK, String::from_utf8_lossy(&first).into_owned());
    }
    // Follow: what there is, then what is appended, until the client goes away.
    let mut budget = q.limit_bytes.map(|l| l.saturating_sub(first.len()));
    let stream = futures::stream::unfold(
        (Some(first), file, all.len() as u64),
        move |(pending, mut file, mut pos)| async move {
            if let Some(p) = pending.filter(|p| !p.is_empty()) {
                return Some((Ok(Frame::data(Bytes::from(p))), (None, file, pos)));
            }
            loop {
                tokio::time::sleep(FOLLOW_POLL).await;
                let len = file.metadata().await.ok()?.len();
                if len > pos {
                    file.seek(std::io::SeekFrom::Start(pos)).await.ok()?;
                    let mut buf = vec![0; (len - pos) as usize];
                    file.read_exact(&mut buf).await.ok()?;
                    pos = len;
                    return Some((
                        Ok::<_, Infallible>(Frame::data(Bytes::from(buf))),
                        (None, file, pos),
                    ));
                }
            }
        },
    );
    let stream = futures::StreamExt::take_while(stream, move |f| {
        let keep = match (&mut budget, f) {
            (Some(left), Ok(frame)) => {
                let n = frame.data_ref().map_or(0, Bytes::len);
                let ok = *left > 0;
                *left = left.saturating_sub(n);
                ok
            }
            _ => true,
        };
        std::future::ready(keep)
    });
    Response::new(StreamBody::new(stream).boxed())
}

/// Binds the log endpoint on loopback and serves it until `cancel`; returns its address.
pub async fn serve(dir: PathBuf, cancel: CancellationToken) -> Result<SocketAddr, LogServerError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(LogServerError::Bind)?;
    let addr = listener.local_addr().map_err(LogServerError::Bind)?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                },
            };
            let dir = dir.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let dir = dir.clone();
                    async move { Ok::<_, Infallible>(serve_one(dir, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = cancel.cancelled() => {}
                }
            });
        }
    });
    Ok(addr)
}

/// Creates or updates the Node `name`: Ready, at 127.0.0.1, its kubelet port `port`,
/// labelled with its `zone` (`topology.kubernetes.io/zone`) when it has one.
pub async fn register_node(
    client: &kube::Client,
    name: &str,
    zone: Option<&str>,
    port: u16,
) -> Result<(), LogServerError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let err = |source| LogServerError::RegisterNode {
        node: name.into(),
        source,
    };
    let mut labels = json!({"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"});
    if let Some(zone) = zone {
        labels[crate::controllers::endpointslices::ZONE_LABEL] = json!(zone);
    }
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
    });
    let pp = PatchParams::apply("nemesis-sandbox-kubelet").force();
    call(nodes.patch(name, &pp, &Patch::Apply(&node)))
        .await
        .map_err(err)?;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "the sandbox kubelet is posting ready status",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "nodeInfo": {"kubeletVersion": "v1.32.0-nemesis-sandbox", "operatingSystem": "linux",
                         "architecture": std::env::consts::ARCH, "containerRuntimeVersion": "nemesis://processes",
                         "kernelVersion": "", "osImage": "", "kubeProxyVersion": "", "machineID": "",
                         "systemUUID": "", "bootID": ""},
        },
    });
    call(nodes.patch_status(name, &pp, &Patch::Apply(&status)))
        .await
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_and_limit_select_the_end_of_the_log() {
        let log = b"a\nb\nc\n";
        let q = |tail, limit| LogQuery {
            follow: false,
            tail_lines: tail,
            limit_bytes: limit,
        };
        assert_eq!(select(log, &q(None, None)), log);
        assert_eq!(select(log, &q(Some(2), None)), b"b\nc\n");
        assert_eq!(select(log, &q(Some(9), None)), log);
        assert_eq!(select(log, &q(Some(0), None)), b"");
        assert_eq!(select(log, &q(Some(2), Some(3))), b"b\nc");
        assert_eq!(select(b"a\nb", &q(Some(1), None)), b"b");
    }

    #[test]
    fn queries_parse_or_say_what_is_not_kept() {
        let q = LogQuery::parse(Some("follow=true&tailLines=5&container=x")).unwrap();
        assert_eq!((q.follow, q.tail_lines), (true, Some(5)));
        assert!(
            LogQuery::parse(Some("previous=true"))
                .unwrap_err()
                .contains("previous")
        );
        assert!(LogQuery::parse(Some("tailLines=-1")).is_err());
    }
}
