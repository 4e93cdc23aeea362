//! The agents' channel over TLS: a CA and a serving certificate the controller issues
//! (rcgen, ECDSA P-256), when each is due for rotation, and the certificate the listener
//! presents, swapped in place so a rotation needs no restart and drops no connection.
//! Pure apart from the key generation; reading and writing the Secret that shares them
//! between the replicas is `tls_secret`'s business.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The CA lives long: agents trust it from a mounted ConfigMap, and replacing it means
/// every agent must see the new one before the controller presents a certificate it
/// signed.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Serving certificates are short-lived and rotated at two thirds of their life.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Issued certificates start this far in the past, so a node whose clock is a little
/// behind the controller's accepts them at once.
const BACKDATE: Duration = Duration::from_secs(300);
const CA_NAME: &str = "nemesis-controller agent CA";

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("generating a key: {0}")]
    Key(#[source] rcgen::Error),
    #[error("the CA key is unusable: {0}")]
    CaKey(#[source] rcgen::Error),
    #[error("the certificate names {names:?}: {source}")]
    Names {
        names: Vec<String>,
        #[source]
        source: rcgen::Error,
    },
    #[error("signing the certificate: {0}")]
    Sign(#[source] rcgen::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("tls.crt: {0}")]
    Certificate(#[source] rustls::pki_types::pem::Error),
    #[error("tls.crt holds no certificate")]
    NoCertificate,
    #[error("tls.key: {0}")]
    Key(#[source] rustls::pki_types::pem::Error),
    #[error("tls.key is not a key rustls can sign with: {0}")]
    Unsupported(#[source] rustls::Error),
}

/// A CA as the Secret keeps it (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
}

/// A serving certificate (PEM) signed by a [`Ca`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serving {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
}

fn ca_params(not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = not_before.into();
    p.not_after = not_after.into();
    p
}

/// A new CA valid from (a little before) `now` for [`CA_VALIDITY`].
pub fn issue_ca(now: SystemTime) -> Result<Ca, IssueError> {
    let key = KeyPair::generate().map_err(IssueError::Key)?;
    let not_after = now + CA_VALIDITY;
    let cert = ca_params(now - BACKDATE, not_after)
        .self_signed(&key)
        .map_err(IssueError::Sign)?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// A serving certificate for `names` (DNS names or IP addresses) signed by `ca`, valid
/// for `validity` from `now`.
pub fn issue_serving(
    ca: &Ca,
    names: &[String],
    now: SystemTime,
    validity: Duration,
) -> Result<Serving, IssueError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(IssueError::CaKey)?;
    // The issuer is named by its distinguished name and key identifier, both of which
    // the same parameters and key reproduce; the CA's validity does not enter.
    let issuer = Issuer::new(ca_params(now, now), ca_key);
    let mut p = CertificateParams::new(names.to_vec()).map_err(|source| IssueError::Names {
        names: names.to_vec(),
        source,
    })?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names
            .first()
            .map(String::as_str)
            .unwrap_or("nemesis-controller"),
    );
    p.distinguished_name = dn;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = (now - BACKDATE).into();
    let not_after = now + validity;
    p.not_after = not_after.into();
    let key = KeyPair::generate().map_err(IssueError::Key)?;
    let cert = p.signed_by(&key, &issuer).map_err(IssueError::Sign)?;
    Ok(Serving {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// Whether a certificate valid for `validity` and expiring at `not_after` is to be
/// replaced at `now`: once less than a third of its life is left, so a replica that
/// misses a few checks still rotates long before agents would refuse it.
pub fn due(not_after: SystemTime, validity: Duration, now: SystemTime) -> bool {
    match not_after.duration_since(now) {
        Ok(left) => left < validity / 3,
        Err(_) => true,
    }
}

/// How often the Secret is checked: often enough that a rotation at two thirds of the
/// life is seen well before expiry, at most every minute (an operator's renewed
/// certificate is picked up within that), at least every second.
pub fn check_every(validity: Duration) -> Duration {
    (validity / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Turns a PEM chain and key into what rustls presents.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, LoadError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(LoadError::Certificate)?;
    if chain.is_empty() {
        return Err(LoadError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(LoadError::Key)?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(LoadError::Unsupported)?;
    Ok(CertifiedKey::new(chain, signer))
}

/// The certificate the agents' listener presents; replaced in place on rotation (new
/// handshakes get the new one, established connections keep theirs). Empty until the
/// Secret was first read: handshakes fail until then.
#[derive(Debug, Default)]
pub struct CertSlot {
    current: RwLock<Option<(String, Arc<CertifiedKey>)>>,
}

impl CertSlot {
    /// Presents `cert_pem`/`key_pem` from now on; `Ok(false)` when they are already the
    /// ones presented.
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> Result<bool, LoadError> {
        if self
            .current
            .read()
            .expect("cert slot lock")
            .as_ref()
            .is_some_and(|(pem, _)| pem == cert_pem)
        {
            return Ok(false);
        }
        let key = Arc::new(certified_key(cert_pem, key_pem)?);
        *self.current.write().expect("cert slot lock") = Some((cert_pem.to_owned(), key));
        Ok(true)
    }

    pub fn is_loaded(&self) -> bool {
        self.current.read().expect("cert slot lock").is_some()
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .expect("cert slot lock")
            .as_ref()
            .map(|(_, k)| k.clone())
    }
}

/// The listener's TLS settings: whatever `slot` holds, HTTP/1.1 and HTTP/2 by ALPN.
pub fn server_config(slot: Arc<CertSlot>) -> Arc<ServerConfig> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(slot);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn rotation_is_due_at_two_thirds_of_the_life() {
        let v = Duration::from_secs(30);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(!due(now + Duration::from_secs(11), v, now));
        assert!(due(now + Duration::from_secs(9), v, now));
        assert!(due(now - Duration::from_secs(1), v, now), "expired");
        assert_eq!(check_every(v), Duration::from_secs(3));
        assert_eq!(check_every(DEFAULT_VALIDITY), Duration::from_secs(60));
        assert_eq!(check_every(Duration::from_secs(2)), Duration::from_secs(1));
    }

    #[test]
    fn an_issued_certificate_chains_to_its_ca_and_names_the_hosts() {
        let now = SystemTime::now();
        let ca = issue_ca(now).unwrap();
        let names = vec![
            "nemesis-controller.nemesis-system.svc".into(),
            "127.0.0.1".into(),
        ];
        let s = issue_serving(&ca, &names, now, Duration::from_secs(3600)).unwrap();
        let slot = CertSlot::default();
        assert!(slot.set(&s.cert_pem, &s.key_pem).unwrap());
        assert!(
            !slot.set(&s.cert_pem, &s.key_pem).unwrap(),
            "same certificate"
        );

        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let leaf = CertificateDer::pem_slice_iter(s.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        for name in ["nemesis-controller.nemesis-system.svc", "127.0.0.1"] {
            verifier
                .verify_server_cert(
                    &leaf,
                    &[],
                    &rustls::pki_types::ServerName::try_from(name).unwrap(),
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = rustls::pki_types::ServerName::try_from("elsewhere.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(&leaf, &[], &other, &[], rustls::pki_types::UnixTime::now())
                .is_err(),
            "a name the certificate does not carry"
        );
    }
}
