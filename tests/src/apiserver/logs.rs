//! `pods/<name>/log`: found through the pod's Node (its InternalIP and
//! `daemonEndpoints.kubeletEndpoint.Port`) and streamed from that kubelet's
//! `/containerLogs`, as the real API server proxies `kubectl logs` (`container`,
//! `follow`, `tailLines`, `limitBytes`), with upstream's refusals for a pod with several
//! containers and no choice, a container not yet started, or a pod on no node. It reads
//! the state only to find the kubelet; it never writes.

use std::convert::Infallible;

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Empty, StreamBody};
use serde_json::Value;

use super::http::Body;
use super::routes::ResourcePath;
use super::status::ApiError;
use super::store::State;

/// The kubelet URL serving the log `p` asks for, with the query passed on.
pub fn kubelet_url(
    st: &State,
    p: &ResourcePath,
    q: &std::collections::HashMap<String, String>,
) -> Result<String, ApiError> {
    let ns = p.namespace.clone().unwrap_or_default();
    let name = p.name.clone().unwrap_or_default();
    let pod = st
        .get(&(String::new(), "pods".into()), &ns, &name)
        .ok_or_else(|| ApiError::not_found("pods", "", &name))?;
    let containers: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    // Init containers are named only explicitly, as upstream has it.
    let inits: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let container = match q
        .get("container")
        .map(String::as_str)
        .filter(|c| !c.is_empty())
    {
        Some(c) if containers.contains(&c) || inits.contains(&c) => c.to_owned(),
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )));
        }
        None if containers.len() == 1 => containers[0].to_owned(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            )));
        }
    };
    let statuses = if inits.contains(&container.as_str()) {
        &pod["status"]["initContainerStatuses"]
    } else {
        &pod["status"]["containerStatuses"]
    };
    let waiting = statuses
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == container.as_str())
        .map(|s| s["state"]["waiting"].clone())
        .unwrap_or(Value::Null);
    let not_started = statuses.is_null() || waiting.is_object();
    if not_started {
        let reason = waiting["reason"].as_str().unwrap_or("ContainerCreating");
        return Err(ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: {reason}"
        )));
    }
    let node = pod["spec"]["nodeName"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(format!("pod {name} does not have a host assigned"))
        })?;
    let node_obj = st
        .get(&(String::new(), "nodes".into()), "", node)
        .ok_or_else(|| ApiError::not_found("nodes", "", node))?;
    let address = node_obj["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str());
    let port = node_obj["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"].as_u64();
    let (Some(address), Some(port)) = (address, port) else {
        return Err(ApiError::internal(format!(
            "node {node} publishes no kubelet address and port"
        )));
    };
    let pass: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(q.iter().filter(|(k, _)| {
            matches!(
                k.as_str(),
                "follow" | "tailLines" | "limitBytes" | "previous" | "timestamps" | "sinceSeconds"
            )
        }))
        .finish();
    Ok(format!(
        "http://{address}:{port}/containerLogs/{ns}/{name}/{container}?{pass}"
    ))
}

/// Streams the kubelet's answer back; a kubelet refusal keeps its code and words.
pub async fn proxy(url: &str) -> Result<Response<Body>, ApiError> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let uri: http::Uri = url
        .parse()
        .map_err(|e| ApiError::internal(format!("kubelet URL {url}: {e}")))?;
    let resp = client
        .get(uri)
        .await
        .map_err(|e| ApiError::internal(format!("Get \"{url}\": {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp
            .into_body()
            .collect()
            .await
            .map(|c| String::from_utf8_lossy(&c.to_bytes()).into_owned())
            .unwrap_or_default();
        let mut e = ApiError::bad_request(text);
        if status.as_u16() == 404 {
            e.code = 404;
            e.reason = "NotFound";
        }
        return Err(e);
    }
    // A kubelet that goes away mid-stream ends the log, as a closed follow does.
    let stream = futures::stream::unfold(resp.into_body(), |mut body| async move {
        match body.frame().await {
            Some(Ok(frame)) => Some((Ok::<_, Infallible>(frame), body)),
            _ => None,
        }
    });
    let mut out = Response::new(StreamBody::new(stream).boxed());
    out.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(out)
}
