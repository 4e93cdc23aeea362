//! A client of the controller's web UI API for end-to-end tests: logs in with a password
//! (session cookie and CSRF token, as a browser) and reads JSON. Owns nothing else; the
//! UI's own tests check the API's rules.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// A logged-in session.
#[derive(Debug, Clone)]
pub struct Session {
    pub addr: SocketAddr,
    pub cookie: String,
    pub csrf: String,
}

async fn exchange(
    addr: SocketAddr,
    req: http::Request<Full<Bytes>>,
) -> anyhow::Result<(u16, Vec<String>, Bytes)> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the UI at {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let resp = tokio::time::timeout(Duration::from_secs(60), sender.send_request(req))
        .await
        .context("the UI did not answer within 60 s")??;
    let status = resp.status().as_u16();
    let cookies = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    Ok((
        status,
        cookies,
        resp.into_body().collect().await?.to_bytes(),
    ))
}

/// Logs in as `user` on the UI served at `addr`.
pub async fn login(addr: SocketAddr, user: &str, password: &str) -> anyhow::Result<Session> {
    let body = serde_json::to_vec(&json!({"username": user, "password": password}))?;
    let req = http::Request::builder()
        .method("POST")
        .uri("/login")
        .header("host", addr.to_string())
        .header("origin", format!("http://{addr}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let (status, cookies, body) = exchange(addr, req).await?;
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    anyhow::ensure!(status == 200, "login as {user} on {addr}: {status} {v}");
    let cookie = cookies
        .iter()
        .map(|c| c.split(';').next().unwrap_or_default().to_string())
        .find(|p| p.starts_with("nemesis_session="))
        .context("no session cookie")?;
    Ok(Session {
        addr,
        cookie,
        csrf: v["csrfToken"].as_str().unwrap_or_default().to_string(),
    })
}

impl Session {
    /// `GET path`: the status and the body (JSON when it parses, else a string).
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let req = http::Request::builder()
            .method("GET")
            .uri(path)
            .header("host", self.addr.to_string())
            .header("cookie", &self.cookie)
            .body(Full::default())?;
        let (status, _, body) = exchange(self.addr, req).await?;
        Ok((status, json_or_text(&body)))
    }

    /// `POST path` with a JSON body, the session's cookie and CSRF token, as the page
    /// sends it: the status and the body (JSON when it parses, else a string).
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let req = http::Request::builder()
            .method("POST")
            .uri(path)
            .header("host", self.addr.to_string())
            .header("origin", format!("http://{}", self.addr))
            .header("content-type", "application/json")
            .header("cookie", &self.cookie)
            .header("x-csrf-token", &self.csrf)
            .body(Full::new(Bytes::from(body.to_string())))?;
        let (status, _, body) = exchange(self.addr, req).await?;
        Ok((status, json_or_text(&body)))
    }
}

fn json_or_text(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}
