//! ServiceAccount tokens as the real server issues them: JWTs (ES256, the signing key
//! made at start) with upstream's claims (`iss`, `sub`, `aud`, `exp`, `nbf`, `iat`,
//! `jti` and the `kubernetes.io` claim naming the namespace, the ServiceAccount and the
//! Pod a token is bound to). It signs and checks signatures, times and audiences; whether
//! the ServiceAccount and Pod still exist is `authn`'s question. Never logs a token.
//!
//! ES256 rather than upstream's default RS256: `ring` (already the TLS provider here)
//! signs with P-256 keys it generates, and clients treat tokens as opaque anyway.

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};

/// The issuer and the API server's own audience, as a kubeadm cluster's.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Upstream's default `expirationSeconds` of a TokenRequest, and its minimum.
pub const DEFAULT_EXPIRATION_SECS: i64 = 3600;
pub const MIN_EXPIRATION_SECS: i64 = 600;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ref {
    pub name: String,
    pub uid: String,
}

/// The private `kubernetes.io` claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KubeClaim {
    pub namespace: String,
    pub serviceaccount: Ref,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Ref>,
    /// The node the bound pod was scheduled to when the token was issued (upstream's
    /// `ServiceAccountTokenPodNodeInfo`, on by default since 1.30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Ref>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kube: KubeClaim,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenError {
    #[error("not a JWT")]
    Malformed,
    #[error("invalid signature")]
    Signature,
    #[error("token has invalid claims: token is expired")]
    Expired,
    #[error("token has invalid claims: token is not valid yet")]
    NotYetValid,
    #[error("token audiences {got:?} is invalid for the target audiences {want:?}")]
    Audience { got: Vec<String>, want: Vec<String> },
    #[error("token issuer {0:?} is not {ISSUER:?}")]
    Issuer(String),
    /// What the token names (its ServiceAccount, its Pod) is gone or was replaced.
    #[error("{0}")]
    Gone(String),
}

/// The server's signing key.
pub struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("kid", &self.kid).finish()
    }
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

impl Signer {
    pub fn generate() -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("P-256 key generation");
        let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("a key just made");
        // Upstream's key id: a hash of the public key.
        let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref());
        let kid = b64(digest.as_ref());
        Signer { key, rng, kid }
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let header = serde_json::json!({"alg": "ES256", "kid": self.kid});
        let body = serde_json::to_vec(claims).expect("claims serialize");
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(&body));
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .expect("ECDSA signing");
        format!("{input}.{}", b64(sig.as_ref()))
    }

    /// The claims of `token` when this server signed it, it is within its validity
    /// window at `now` (unix seconds), and one of its audiences is in `audiences`.
    pub fn verify(
        &self,
        token: &str,
        audiences: &[String],
        now: i64,
    ) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let dec = |x: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(x)
                .map_err(|_| TokenError::Malformed)
        };
        let header: serde_json::Value =
            serde_json::from_slice(&dec(h)?).map_err(|_| TokenError::Malformed)?;
        if header["alg"] != "ES256" {
            return Err(TokenError::Signature);
        }
        let public = signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.key.public_key().as_ref(),
        );
        public
            .verify(format!("{h}.{p}").as_bytes(), &dec(s)?)
            .map_err(|_| TokenError::Signature)?;
        let claims: Claims = serde_json::from_slice(&dec(p)?).map_err(|_| TokenError::Malformed)?;
        if claims.iss != ISSUER {
            return Err(TokenError::Issuer(claims.iss));
        }
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        if now < claims.nbf {
            return Err(TokenError::NotYetValid);
        }
        if !claims.aud.iter().any(|a| audiences.contains(a)) {
            return Err(TokenError::Audience {
                got: claims.aud.clone(),
                want: audiences.to_vec(),
            });
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(aud: &str, now: i64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: "system:serviceaccount:ns:sa".into(),
            aud: vec![aud.into()],
            exp: now + 600,
            nbf: now,
            iat: now,
            jti: "j".into(),
            kube: KubeClaim {
                namespace: "ns".into(),
                serviceaccount: Ref {
                    name: "sa".into(),
                    uid: "u".into(),
                },
                pod: None,
                node: None,
            },
        }
    }

    #[test]
    fn a_signed_token_verifies_within_its_window_and_audience() {
        let s = Signer::generate();
        let c = claims(ISSUER, 1000);
        let t = s.sign(&c);
        assert_eq!(s.verify(&t, &[ISSUER.into()], 1000).unwrap(), c);
        assert_eq!(
            s.verify(&t, &[ISSUER.into()], 1600).unwrap_err(),
            TokenError::Expired
        );
        assert_eq!(
            s.verify(&t, &[ISSUER.into()], 999).unwrap_err(),
            TokenError::NotYetValid
        );
        assert!(matches!(
            s.verify(&t, &["vault".into()], 1000).unwrap_err(),
            TokenError::Audience { .. }
        ));
    }

    #[test]
    fn another_servers_or_a_tampered_token_is_refused() {
        let s = Signer::generate();
        let t = Signer::generate().sign(&claims(ISSUER, 1000));
        assert_eq!(
            s.verify(&t, &[ISSUER.into()], 1000).unwrap_err(),
            TokenError::Signature
        );
        let good = s.sign(&claims(ISSUER, 1000));
        let (head, _) = good.rsplit_once('.').unwrap();
        let mut c = claims(ISSUER, 1000);
        c.sub = "system:serviceaccount:kube-system:admin".into();
        let forged = format!(
            "{}.{}.{}",
            head.split('.').next().unwrap(),
            b64(&serde_json::to_vec(&c).unwrap()),
            good.rsplit('.').next().unwrap()
        );
        assert_eq!(
            s.verify(&forged, &[ISSUER.into()], 1000).unwrap_err(),
            TokenError::Signature
        );
        assert_eq!(
            s.verify("opaque", &[ISSUER.into()], 1000).unwrap_err(),
            TokenError::Malformed
        );
    }
}
