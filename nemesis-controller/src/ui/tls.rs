//! The UI served over TLS by the controller itself: a certificate and key from PEM files
//! (a mounted `kubernetes.io/tls` Secret), rustls with the ring provider, HTTP/1.1 and
//! HTTP/2 by ALPN. The UI then has a listener of its own and its cookies are `Secure`;
//! the agents' plain API listener no longer serves it. Owns the handshake and the accept
//! loop; what is served is the router's business.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nemesis_common::serve::{LimitedRouter, Limits, Rejection};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A client that connects and never finishes the handshake holds a task this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the UI's TLS certificate file {}: {source}", path.display())]
    ReadCertificate {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the UI's TLS certificate file {} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("reading the UI's TLS key file {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the UI's TLS certificate and key do not work together: {0}")]
    Config(#[source] rustls::Error),
}

/// Reads a PEM certificate chain (leaf first) and its private key.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read_cert = |source| TlsError::ReadCertificate {
        path: cert.to_path_buf(),
        source,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(read_cert)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_cert)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::ReadKey {
        path: key.to_path_buf(),
        source,
    })?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The UI's own listener: its largest body is a policy's YAML.
pub const UI_LIMITS: Limits = Limits::with_max_body(super::MAX_BODY_BYTES);

/// Serves `router` over TLS on `listener` until `stop`, with its limits (a handshake not
/// done within [`HANDSHAKE_TIMEOUT`] is counted as a header timeout). Each request carries
/// the peer address as `ConnectInfo` (logins are limited by it), as on the plain listener.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    router: LimitedRouter,
    stop: CancellationToken,
) {
    serve_tls("UI", listener, config, router, stop).await
}

/// The answer to a plain-HTTP request on a TLS port, so whoever configured `http://`
/// reads why rather than seeing a reset.
const PLAIN_HTTP_REFUSAL: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: 46\r\n\r\nthis port speaks TLS only: use https:// here\r\n";
/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Why a connection on a TLS listener never reached the router.
enum Refused {
    /// It closed before sending anything (a TCP probe): nothing to count.
    Closed,
    /// Its first byte was not a TLS handshake record.
    PlainHttp,
    /// The handshake (or reading its first byte) failed.
    Handshake(std::io::Error),
}

/// [`serve`] for any TLS listener, `which` naming it in logs. A connection whose first
/// byte is not a TLS handshake (plain HTTP) gets a 400 saying the port speaks TLS and is
/// closed; both it and a failed handshake are counted in the listener's rejections
/// (`plain_http_on_tls`, `tls_handshake_failed`).
pub async fn serve_tls(
    which: &'static str,
    listener: TcpListener,
    config: Arc<ServerConfig>,
    router: LimitedRouter,
    stop: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(config);
    let (stopped_tx, stopped) = watch::channel(false);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: wait a moment rather than spin.
                tracing::warn!(which, err = %e, "TLS listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let stopped = stopped.clone();
        tokio::spawn(async move {
            let handshake = async {
                let mut first = [0u8; 1];
                let n = tcp.peek(&mut first).await.map_err(Refused::Handshake)?;
                if n == 0 {
                    return Err(Refused::Closed);
                }
                if first[0] != TLS_HANDSHAKE_RECORD {
                    let mut tcp = tcp;
                    use tokio::io::AsyncWriteExt;
                    // The refusal is counted whether or not the client stays to read it.
                    let _ = tcp.write_all(PLAIN_HTTP_REFUSAL).await;
                    let _ = tcp.shutdown().await;
                    return Err(Refused::PlainHttp);
                }
                acceptor.accept(tcp).await.map_err(Refused::Handshake)
            };
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(Refused::Closed)) => return,
                Ok(Err(Refused::PlainHttp)) => {
                    tracing::debug!(which, %peer, "plain HTTP on a TLS port: refused");
                    router.count_rejection(Rejection::PlainHttpOnTls);
                    return;
                }
                Ok(Err(Refused::Handshake(e))) => {
                    tracing::debug!(which, %peer, err = %e, "TLS handshake failed");
                    router.count_rejection(Rejection::TlsHandshake);
                    return;
                }
                Err(_) => {
                    router.count_rejection(Rejection::HeaderTimeout);
                    return;
                }
            };
            router.serve_connection(tls, peer, stopped).await;
        });
    }
    // Connections finish the request in flight (within the request timeout) and close.
    stopped_tx.send_replace(true);
}
