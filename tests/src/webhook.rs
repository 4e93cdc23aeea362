//! A generic-webhook alert receiver for end-to-end tests: a real HTTP server on loopback
//! that checks every request's HMAC-SHA256 signature (as a team's receiver would) and
//! keeps the bodies it accepted. Unsigned or wrongly signed requests get 401; while
//! `refuse` is set, signed ones get 503 (a receiver that is down).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nemesis_controller::notify::sinks::{SIGNATURE_HEADER, TIMESTAMP_HEADER};

#[derive(Debug, Default)]
pub struct Received {
    /// Bodies of correctly signed requests.
    pub accepted: Mutex<Vec<serde_json::Value>>,
    /// Requests refused for their signature.
    pub bad_signatures: Mutex<usize>,
    /// Answer 503 to signed requests while set.
    pub refuse: AtomicBool,
    /// Signed requests answered 503 because `refuse` was set.
    pub refused: Mutex<usize>,
}

/// Whether `signature` (`sha256=<hex>`) signs `timestamp.body` with `key`.
pub fn verify(key: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let tag: Option<Vec<u8>> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    let Some(tag) = tag else { return false };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let signed = [timestamp.as_bytes(), b".", body].concat();
    ring::hmac::verify(&key, &signed, &tag).is_ok()
}

/// Serves on an ephemeral loopback port; returns the URL to give the sink.
pub async fn serve(key: String, received: Arc<Received>) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (key, received) = (key.clone(), received.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    let (key, received) = (key.clone(), received.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let h = |n: &str| {
                            parts
                                .headers
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string()
                        };
                        let status =
                            if !verify(&key, &h(TIMESTAMP_HEADER), &body, &h(SIGNATURE_HEADER)) {
                                *received.bad_signatures.lock().unwrap() += 1;
                                401
                            } else if received.refuse.load(Ordering::SeqCst) {
                                *received.refused.lock().unwrap() += 1;
                                503
                            } else {
                                received
                                    .accepted
                                    .lock()
                                    .unwrap()
                                    .push(serde_json::from_slice(&body).unwrap_or_default());
                                200
                            };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(url)
}
