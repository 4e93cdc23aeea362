//! The agents' channel is TLS: with `--agent-tls-secret` the controller issues a CA and a
//! serving certificate into a Secret through the API server (so a second replica presents
//! one of the same CA), publishes the CA in a ConfigMap without any key, serves the
//! agents' API on its TLS listener only, and rotates the certificate before it expires
//! while the agents (the real `ControllerClient`) keep heartbeating with the CA they
//! started with. A wrong CA is refused by the agent; plain HTTP is refused by the
//! controller, on the TLS port (a 400 saying so, counted) and on the plain port (no agent
//! routes).
//! An operator's own certificate Secret is presented as it is.

mod controller_support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use controller_support::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::PostParams;
use nemesis_agent::control::{ControlError, ControllerClient};
use nemesis_common::wire::Heartbeat;
use nemesis_controller::agents::tls;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

const SECRET: &str = "nemesis-agent-tls";
const CA_CONFIGMAP: &str = "nemesis-agent-ca";
/// The test controllers' namespace (`--lease-namespace`).
const NAMESPACE: &str = "default";
const WITHIN: Duration = Duration::from_secs(90);

fn heartbeat(node: &str) -> Heartbeat {
    Heartbeat {
        node: node.into(),
        instance: format!("{node}-1"),
        services: vec![],
        addresses: vec![],
        ready: true,
        directives_cursor: None,
        pages: false,
        reports_seq: None,
        reports_since: None,
        gone: vec![],
    }
}

fn tls_flags(validity: &str) -> Vec<String> {
    [
        "--agent-tls-secret",
        SECRET,
        "--agent-tls-names",
        "localhost,127.0.0.1",
        "--agent-tls-validity",
        validity,
    ]
    .map(String::from)
    .to_vec()
}

async fn start(
    server: &TestApiServer,
    dir: &Path,
    flags: &[String],
) -> anyhow::Result<nemesis_controller::app::Running> {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    start_controller(server, dir, &flags).await
}

/// The CA the controller published, once it has, written to `dir/ca.crt`.
async fn published_ca(client: &kube::Client, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let pem = eventually("the CA ConfigMap", WITHIN, || async {
        Ok(cms
            .get_opt(CA_CONFIGMAP)
            .await?
            .and_then(|c| c.data)
            .and_then(|mut d| d.remove("ca.crt")))
    })
    .await?;
    assert!(
        !pem.contains("PRIVATE KEY"),
        "the ConfigMap every agent reads holds no key"
    );
    let file = dir.join("ca.crt");
    std::fs::write(&file, &pem)?;
    Ok(file)
}

fn https(addr: SocketAddr) -> String {
    format!("https://127.0.0.1:{}", addr.port())
}

/// Heartbeats until one passes (the listener presents nothing until the controller has
/// read its Secret).
async fn heartbeat_passes(agent: &ControllerClient, node: &str) -> anyhow::Result<()> {
    eventually("a heartbeat over TLS", WITHIN, || async {
        match agent.heartbeat(&heartbeat(node)).await {
            Ok(_) => Ok(Some(())),
            Err(e) => {
                tracing::info!(err = %chain(&e), "heartbeat not yet through");
                Ok(None)
            }
        }
    })
    .await
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The leaf certificate the listener at `addr` presents, checked against `ca`.
async fn presented(addr: SocketAddr, ca: &Path) -> anyhow::Result<CertificateDer<'static>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp),
    )
    .await
    .context("TLS handshake timed out")??;
    let (_, conn) = tls.get_ref();
    Ok(conn
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate presented")?
        .clone()
        .into_owned())
}

fn leaf(secret: &Secret) -> anyhow::Result<CertificateDer<'static>> {
    let pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .context("no tls.crt")?;
    Ok(CertificateDer::pem_slice_iter(&pem.0)
        .next()
        .context("tls.crt holds no certificate")??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_speak_tls_with_the_issued_ca_and_plain_http_is_refused() -> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let dir = tempfile::tempdir()?;
    let c = start(&server, dir.path(), &tls_flags("1h")).await?;
    let agent_addr = c
        .agent_addr
        .context("the controller has an agents' TLS listener")?;
    let ca = published_ca(&client, dir.path()).await?;
    let token = agent_token(c.api_addr, "node-a").await?;

    // The agent with the published CA: its heartbeats pass.
    let agent =
        ControllerClient::with_ca(&https(agent_addr), &token, &ca, Duration::from_secs(10))?;
    heartbeat_passes(&agent, "node-a").await?;

    // The Secret holds the CA's key for the replicas; the agents' ConfigMap does not.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let secret = secrets.get(SECRET).await?;
    let data = secret.data.clone().unwrap_or_default();
    for key in ["tls.crt", "tls.key", "ca.crt", "ca.key"] {
        assert!(data.contains_key(key), "the Secret has {key}");
    }
    assert_eq!(leaf(&secret)?, presented(agent_addr, &ca).await?);

    // An agent trusting another CA refuses the controller's certificate.
    let other = tls::issue_ca(SystemTime::now())?;
    let other_ca = dir.path().join("other-ca.crt");
    std::fs::write(&other_ca, &other.cert_pem)?;
    // (A generous timeout: on a loaded machine the refusal must not turn into a timeout.)
    let stranger = ControllerClient::with_ca(
        &https(agent_addr),
        &token,
        &other_ca,
        Duration::from_secs(60),
    )?;
    let err = stranger
        .heartbeat(&heartbeat("node-a"))
        .await
        .expect_err("a certificate of another CA is refused");
    let text = chain(&err);
    assert!(
        matches!(err, ControlError::Send { .. }) && text.contains("certificate"),
        "refused in the handshake, for the certificate: {text}"
    );
    assert!(presented(agent_addr, &other_ca).await.is_err());

    // Plain HTTP on the TLS port: a 400 that says to use TLS, nothing served.
    let plain = ControllerClient::new(
        &format!("http://127.0.0.1:{}", agent_addr.port()),
        &token,
        Duration::from_secs(60),
    )?;
    match plain.heartbeat(&heartbeat("node-a")).await {
        Err(ControlError::Status { status, body, .. }) => {
            assert_eq!(status, 400, "{body}");
            assert!(body.contains("TLS"), "the refusal says why: {body}");
        }
        other => panic!("plain HTTP on the TLS port must be refused, got {other:?}"),
    }
    // ...and on the plain API listener the agents' routes are gone.
    let http = Http::default();
    let (code, _) = http
        .post(
            c.api_addr,
            "/v1/agents/heartbeat",
            &token,
            &serde_json::to_value(heartbeat("node-a"))?,
        )
        .await?;
    assert_eq!(code, 404, "no agent route on the plain listener");
    // Both refusals on the TLS port are counted: the plain request and the handshakes
    // of the client trusting another CA.
    for reason in ["plain_http_on_tls", "tls_handshake_failed"] {
        let series = format!(
            "nemesis_controller_http_rejected_total{{listener=\"agents\",reason=\"{reason}\"}}"
        );
        let counted = scrape(&c, &series).await?;
        assert!(counted >= 1.0, "{series} counts the refusal, got {counted}");
    }

    // A second replica (a standby) reads the same Secret: same CA, no new one issued.
    let dir2 = tempfile::tempdir()?;
    let c2 = start(&server, dir2.path(), &tls_flags("1h")).await?;
    let addr2 = c2.agent_addr.context("the second replica's TLS listener")?;
    let agent2 = ControllerClient::with_ca(&https(addr2), &token, &ca, Duration::from_secs(10))?;
    heartbeat_passes(&agent2, "node-a").await?;
    assert_eq!(
        presented(addr2, &ca).await?,
        presented(agent_addr, &ca).await?,
        "both replicas present the Secret's certificate"
    );
    c2.shutdown().await;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_agents_connected() -> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let dir = tempfile::tempdir()?;
    // Valid 60 s: rotated at about 40 s (20 s before expiry, room for a slow machine),
    // checked every 6 s.
    let c = start(&server, dir.path(), &tls_flags("60s")).await?;
    let agent_addr = c.agent_addr.context("the agents' TLS listener")?;
    let ca = published_ca(&client, dir.path()).await?;
    let token = agent_token(c.api_addr, "node-r").await?;
    // One client for the whole test, as an agent keeps it: same CA file, pooled
    // connections.
    let agent =
        ControllerClient::with_ca(&https(agent_addr), &token, &ca, Duration::from_secs(10))?;
    heartbeat_passes(&agent, "node-r").await?;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let mut seen = vec![presented(agent_addr, &ca).await?];
    let mut refused = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    // Two rotations: each certificate the Secret holds is presented and the agent's
    // heartbeats keep passing with the CA it started with.
    while seen.len() < 3 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "saw {} certificates in 300 s, expected 3 (two rotations)",
            seen.len()
        );
        if let Err(e) = agent.heartbeat(&heartbeat("node-r")).await {
            let text = chain(&e);
            // A loaded machine may time a call out; a certificate refusal is a failure.
            if text.contains("certificate") || text.contains("handshake") {
                refused.push(text);
            }
        }
        let current = leaf(&secrets.get(SECRET).await?)?;
        if Some(&current) != seen.last() {
            // The listener presents the new certificate once it has read the Secret.
            let presented_now = eventually("the rotated certificate presented", WITHIN, || {
                let current = current.clone();
                let ca = ca.clone();
                async move {
                    let p = presented(agent_addr, &ca).await?;
                    Ok((p == current).then_some(p))
                }
            })
            .await?;
            seen.push(presented_now);
            // The same client, the same CA file: its heartbeats pass on the new one.
            heartbeat_passes(&agent, "node-r").await?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(refused.is_empty(), "refused during rotation: {refused:?}");
    // The CA stayed: the agents' ConfigMap still holds the one they started with.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let published = cms.get(CA_CONFIGMAP).await?.data.unwrap_or_default();
    assert_eq!(
        published.get("ca.crt").map(String::as_str),
        Some(std::fs::read_to_string(&ca)?.as_str())
    );
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_certificate_is_presented_as_it_is() -> anyhow::Result<()> {
    init_tracing();
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let dir = tempfile::tempdir()?;
    // The operator's CA and certificate (as cert-manager would make them).
    let now = SystemTime::now();
    let ca = tls::issue_ca(now)?;
    let serving = tls::issue_serving(
        &ca,
        &["127.0.0.1".to_string()],
        now,
        Duration::from_secs(3600),
    )?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "operator-tls"},
        "type": "kubernetes.io/tls",
    }))?;
    let secret = Secret {
        data: Some(
            [
                ("tls.crt", &serving.cert_pem),
                ("tls.key", &serving.key_pem),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect(),
        ),
        ..secret
    };
    secrets.create(&PostParams::default(), &secret).await?;
    let before = secrets.get("operator-tls").await?.metadata.resource_version;

    let flags = ["--agent-tls-secret", "operator-tls", "--agent-tls-provided"].map(String::from);
    let c = start(&server, dir.path(), &flags).await?;
    let agent_addr = c.agent_addr.context("the agents' TLS listener")?;
    let ca_file = dir.path().join("operator-ca.crt");
    std::fs::write(&ca_file, &ca.cert_pem)?;
    let token = agent_token(c.api_addr, "node-o").await?;
    let agent = ControllerClient::with_ca(
        &https(agent_addr),
        &token,
        &ca_file,
        Duration::from_secs(10),
    )?;
    heartbeat_passes(&agent, "node-o").await?;
    let expected = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
        .next()
        .context("a certificate")??;
    assert_eq!(presented(agent_addr, &ca_file).await?, expected);
    // Never written, and no CA published for it.
    assert_eq!(
        secrets.get("operator-tls").await?.metadata.resource_version,
        before
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    assert!(cms.get_opt(CA_CONFIGMAP).await?.is_none());
    c.shutdown().await;
    Ok(())
}
