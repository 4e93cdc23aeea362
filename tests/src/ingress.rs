//! A real nginx (Debian's package) playing an Ingress controller the way ingress-nginx
//! does: its upstream is the ready endpoints of a Service's EndpointSlices, kept by a
//! watcher that rewrites the upstream file and reloads nginx (SIGHUP) whenever they
//! change. It runs in a network namespace of its own (as an Ingress controller's pod
//! does) and dials pod IPs, never the ClusterIP, so the connect() hooks never see it.
//! Owns nginx's configuration and process; it never touches the Service or its slices.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, ResourceExt as _};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::watch;

/// An endpoint is ready when its `ready` condition is unset or true, as the API says.
fn ready_endpoints(slices: &BTreeMap<String, EndpointSlice>, port_name: &str) -> Vec<SocketAddr> {
    let mut out = BTreeSet::new();
    for slice in slices.values() {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for a in &ep.addresses {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    out.insert(SocketAddr::new(ip, port));
                }
            }
        }
    }
    out.into_iter().collect()
}

/// nginx's `upstream` block for `endpoints`; with none, a server that is down, so nginx
/// answers 502 at once as an Ingress without endpoints does.
pub fn upstream_block(endpoints: &[SocketAddr]) -> String {
    let mut s = String::from("upstream app {\n");
    if endpoints.is_empty() {
        s.push_str("    server 127.0.0.1:9 down;\n");
    }
    for e in endpoints {
        s.push_str(&format!("    server {e};\n"));
    }
    s.push_str("}\n");
    s
}

fn main_config(dir: &Path, listen: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20   access_log {d}/access.log;\n\
         \x20   client_body_temp_path {d}/body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   include {d}/upstream.conf;\n\
         \x20   server {{\n\
         \x20       listen {listen};\n\
         \x20       location / {{\n\
         \x20           proxy_pass http://app;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n\
         \x20           proxy_connect_timeout 5s;\n\
         \x20           proxy_read_timeout 60s;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n"
    )
}

/// A running nginx and its EndpointSlice watcher.
pub struct IngressNginx {
    child: tokio::process::Child,
    watcher: tokio::task::JoinHandle<()>,
    upstream: watch::Receiver<Vec<SocketAddr>>,
    reloads: Arc<Mutex<usize>>,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    dir: PathBuf,
}

impl IngressNginx {
    /// Starts nginx in `netns`, listening on `listen`, for the Service port named
    /// `port_name` of Service `namespace/service`; returns once nginx answers with the
    /// slices listed so far as its upstream.
    pub async fn start(
        client: Client,
        netns: &str,
        listen: SocketAddr,
        namespace: &str,
        service: &str,
        port_name: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("nginx's directory")?;
        let path = dir.path().to_path_buf();
        std::fs::write(path.join("nginx.conf"), main_config(&path, listen))?;
        let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
        let cfg =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
        let (tx, upstream) = watch::channel(Vec::new());
        let (listed_tx, mut listed) = watch::channel(false);
        let port_name = port_name.to_string();
        let watcher = tokio::spawn(async move {
            let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
            let mut stream = std::pin::pin!(watcher(api, cfg).default_backoff());
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                        slices.insert(s.name_any(), s);
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        slices.remove(&s.name_any());
                    }
                    Ok(watcher::Event::Init) => slices.clear(),
                    Ok(watcher::Event::InitDone) => {
                        // The listing's upstream first, then "listed": the starter
                        // reads it the moment it sees "listed".
                        let eps = ready_endpoints(&slices, &port_name);
                        tx.send_replace(eps);
                        listed_tx.send_replace(true);
                        continue;
                    }
                    Err(_) => continue,
                }
                if *listed_tx.borrow() {
                    let eps = ready_endpoints(&slices, &port_name);
                    tx.send_if_modified(|old| std::mem::replace(old, eps.clone()) != eps);
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), listed.wait_for(|l| *l))
            .await
            .context("listing the Service's EndpointSlices")??;
        let first = upstream.borrow().clone();
        std::fs::write(path.join("upstream.conf"), upstream_block(&first))?;
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", netns, "nginx", "-c"])
            .arg(path.join("nginx.conf"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting nginx (apt-get install nginx-light: cargo xtask setup)")?;
        let mut me = IngressNginx {
            child,
            watcher,
            upstream,
            reloads: Arc::new(Mutex::new(0)),
            addr: listen,
            dir: path,
            _dir: dir,
        };
        me.wait_listening().await?;
        me.follow_upstream();
        Ok(me)
    }

    async fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "nginx exited with {status}: {}",
                    std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
                );
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("nginx does not listen on {} after 10 s", self.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Rewrites the upstream and reloads nginx on every change, as ingress-nginx does.
    fn follow_upstream(&mut self) {
        let mut rx = self.upstream.clone();
        let path = self.dir.join("upstream.conf");
        let pid = self.child.id().map(|p| Pid::from_raw(p as i32));
        let reloads = self.reloads.clone();
        let old = std::mem::replace(&mut self.watcher, tokio::spawn(async {}));
        self.watcher = tokio::spawn(async move {
            let _watch = AbortOnDrop(old);
            while rx.changed().await.is_ok() {
                let eps = rx.borrow_and_update().clone();
                if std::fs::write(&path, upstream_block(&eps)).is_err() {
                    continue;
                }
                if let Some(pid) = pid
                    && kill(pid, Signal::SIGHUP).is_ok()
                {
                    *reloads.lock().expect("reloads") += 1;
                }
            }
        });
    }

    /// Where clients reach nginx.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream nginx has now (what it was last reloaded with).
    pub fn upstream(&self) -> Vec<SocketAddr> {
        self.upstream.borrow().clone()
    }

    /// How many times nginx was reloaded.
    pub fn reloads(&self) -> usize {
        *self.reloads.lock().expect("reloads")
    }

    /// nginx's own log, for a failure message.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    pub async fn shutdown(mut self) {
        self.watcher.abort();
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drop for IngressNginx {
    fn drop(&mut self) {
        self.watcher.abort();
        let _ = self.child.start_kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_upstream_is_a_down_server_and_endpoints_are_listed() {
        assert!(upstream_block(&[]).contains("server 127.0.0.1:9 down;"));
        let b = upstream_block(&["198.18.0.5:8080".parse().unwrap()]);
        assert!(b.contains("server 198.18.0.5:8080;") && !b.contains("down"));
    }

    #[test]
    fn ready_endpoints_of_the_named_port_from_every_slice() {
        let slice = |name: &str, port: i32, ready: Option<bool>, ip: &str| -> EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": port}],
                "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}],
            }))
            .unwrap()
        };
        let mut m = BTreeMap::new();
        m.insert("a".into(), slice("a", 8080, Some(true), "198.18.0.5"));
        m.insert("b".into(), slice("b", 20000, None, "198.18.0.1"));
        m.insert("c".into(), slice("c", 8080, Some(false), "198.18.0.6"));
        let eps: Vec<String> = ready_endpoints(&m, "http")
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(eps, ["198.18.0.1:20000", "198.18.0.5:8080"]);
        assert!(ready_endpoints(&m, "grpc").is_empty());
    }
}
