//! The pod's way to the API server. The test API server listens on the host's loopback,
//! which a pod's network namespace cannot reach; so the kubelet listens on the same
//! address and port inside the pod's namespace and splices each connection to the
//! server (the part of kube-proxy that serves the `kubernetes` Service). TLS goes
//! through untouched, so the server's certificate (for 127.0.0.1) still matches what
//! `KUBERNETES_SERVICE_HOST` says. Only ever listens inside the pod's namespace.

use std::net::SocketAddr;
use std::os::fd::AsFd;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum ApiRouteError {
    #[error("opening network namespace {netns}: {source}")]
    OpenNetns {
        netns: String,
        source: std::io::Error,
    },
    #[error("entering network namespace {netns}: {source}")]
    EnterNetns { netns: String, source: nix::Error },
    #[error("listening on {addr} in network namespace {netns}: {source}")]
    Listen {
        netns: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A listener in the pod's namespace; dropping it stops it.
#[derive(Debug)]
pub struct ApiRoute {
    task: JoinHandle<()>,
}

impl Drop for ApiRoute {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A socket bound in `netns` (a thread enters the namespace, binds, and ends: a socket
/// stays in the namespace it was made in).
fn bind_in(netns: &str, addr: SocketAddr) -> Result<std::net::TcpListener, ApiRouteError> {
    let netns = netns.to_string();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file =
                    std::fs::File::open(format!("/run/netns/{netns}")).map_err(|source| {
                        ApiRouteError::OpenNetns {
                            netns: netns.clone(),
                            source,
                        }
                    })?;
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                    |source| ApiRouteError::EnterNetns {
                        netns: netns.clone(),
                        source,
                    },
                )?;
                let listener =
                    std::net::TcpListener::bind(addr).map_err(|source| ApiRouteError::Listen {
                        netns: netns.clone(),
                        addr,
                        source,
                    })?;
                listener
                    .set_nonblocking(true)
                    .map_err(|source| ApiRouteError::Listen {
                        netns: netns.clone(),
                        addr,
                        source,
                    })?;
                Ok(listener)
            })
            .join()
            .expect("the namespace thread does not panic")
    })
}

/// Serves `api` at the same address inside `netns` until dropped.
pub fn serve(netns: &str, api: SocketAddr) -> Result<ApiRoute, ApiRouteError> {
    let std_listener = bind_in(netns, api)?;
    let listener = TcpListener::from_std(std_listener).map_err(|source| ApiRouteError::Listen {
        netns: netns.to_string(),
        addr: api,
        source,
    })?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(api).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(ApiRoute { task })
}
