//! Who is calling the agent API. Each agent presents its own projected ServiceAccount
//! token (audience-bound, bound to its pod); the controller asks the API server about it
//! with a TokenReview, requires the agents' ServiceAccount, and learns the node the pod
//! runs on, so an agent can only speak for its own node. Verdicts are cached briefly
//! (keyed by a digest of the token, never the token) so a heartbeat every few seconds
//! from a thousand nodes is not a thousand reviews. Every refusal is counted by reason.
//!
//! The decisions (`precheck`, `identity_from_review`) are pure; the reviews and the pod
//! look-up are the I/O around them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::StatusCode;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use tokio::time::Instant;

use crate::auth::BearerToken;
use crate::metrics::{AgentAuthRefusal, ControllerMetrics};

/// The audience agents' projected tokens are issued for (the DaemonSet's
/// `serviceAccountToken.audience`); a token for any other audience is refused.
pub const DEFAULT_AUDIENCE: &str = "nemesis-controller";
/// How long a successful review is trusted (never past the token's own expiry).
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// At most this many verdicts are cached (a few per node while tokens rotate).
pub const CACHE_CAPACITY: usize = 16_384;
/// A verdict this close to its end is renewed by a review in the background while the
/// cached one still answers: an agent beating every 5 s renews it before it runs out,
/// so no heartbeat waits on the API server in steady state (at 1,000 agents one in
/// twelve did, and the slowest of them made the heartbeats' tail).
pub const REFRESH_AHEAD: Duration = Duration::from_secs(20);

/// The user extras a TokenReview of a pod-bound token carries (upstream 1.30+ adds the
/// node's).
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// The authenticated caller: the node it may speak for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub node: String,
}

/// How the agent API authenticates its callers.
#[derive(Clone, Debug)]
pub enum AgentAuth {
    /// Per-agent ServiceAccount tokens checked by TokenReview and tied to a node.
    TokenReview(Arc<TokenReviewer>),
    /// One token every agent shares, which cannot tell agents apart (any agent may speak
    /// for any node). Only for harnesses without an API server's TokenReview.
    Shared(BearerToken),
}

impl From<BearerToken> for AgentAuth {
    fn from(t: BearerToken) -> Self {
        AgentAuth::Shared(t)
    }
}

impl AgentAuth {
    /// Counts a refusal (with `TokenReview`; the shared token counts nothing).
    pub fn refused(&self, reason: AgentAuthRefusal) {
        if let AgentAuth::TokenReview(r) = self {
            r.metrics.agent_auth_refused(reason);
        }
    }
}

/// Whom the controller accepts as an agent.
#[derive(Debug, Clone)]
pub struct ReviewConfig {
    /// The audience tokens must be issued for.
    pub audience: String,
    /// The user name of the agents' ServiceAccount
    /// (`system:serviceaccount:<namespace>:<name>`).
    pub service_account: String,
}

impl ReviewConfig {
    pub fn new(audience: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            audience: audience.to_owned(),
            service_account: format!("system:serviceaccount:{namespace}:{service_account}"),
        }
    }

    fn namespace(&self) -> &str {
        self.service_account
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split(':').next())
            .unwrap_or("")
    }
}

/// Why a caller was refused, and what it is told (never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: AgentAuthRefusal,
    pub message: String,
}

impl Refusal {
    fn new(reason: AgentAuthRefusal, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self.reason {
            AgentAuthRefusal::ReviewUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            AgentAuthRefusal::WrongServiceAccount
            | AgentAuthRefusal::NoNode
            | AgentAuthRefusal::OtherNode => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut r = (
            status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"nemesis-agents\""),
            );
        }
        r
    }
}

/// The bearer token of an `Authorization` header.
pub fn bearer(authorization: Option<&http::HeaderValue>) -> Result<&str, Refusal> {
    let value = authorization.ok_or_else(|| {
        Refusal::new(
            AgentAuthRefusal::Missing,
            "missing Authorization: Bearer <ServiceAccount token>",
        )
    })?;
    let bytes = value.as_bytes();
    let token = match bytes.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => &bytes[7..],
        _ => {
            return Err(Refusal::new(
                AgentAuthRefusal::Missing,
                "the Authorization header is not a Bearer token",
            ));
        }
    };
    std::str::from_utf8(token.trim_ascii())
        .map_err(|_| Refusal::new(AgentAuthRefusal::InvalidToken, "the token is not a JWT"))
}

/// What the token says of itself, read without checking its signature: only to refuse
/// at once what the API server would refuse anyway (not a JWT, expired, another
/// audience) and to bound how long a verdict is cached. Trust comes from the review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unverified {
    pub exp: Option<i64>,
}

/// Refuses without a review what cannot pass one. `now` in Unix seconds.
pub fn precheck(token: &str, audience: &str, now: i64) -> Result<Unverified, Refusal> {
    let invalid = || Refusal::new(AgentAuthRefusal::InvalidToken, "the token is not a JWT");
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| invalid())?;
    let claims: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| invalid())?;
    let exp = claims["exp"].as_i64();
    if exp.is_some_and(|e| e <= now) {
        return Err(Refusal::new(
            AgentAuthRefusal::ExpiredToken,
            "the token has expired",
        ));
    }
    let audiences: Vec<&str> = match &claims["aud"] {
        serde_json::Value::String(a) => vec![a.as_str()],
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str()).collect(),
        _ => Vec::new(),
    };
    if !audiences.contains(&audience) {
        return Err(Refusal::new(
            AgentAuthRefusal::WrongAudience,
            format!("the token is not for the audience {audience:?}"),
        ));
    }
    Ok(Unverified { exp })
}

/// Where the node of a reviewed caller comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeSource {
    /// The review names it (API servers from 1.30).
    Node(String),
    /// The review names only the pod: its `spec.nodeName` decides.
    Pod { name: String, uid: String },
}

/// Judges a TokenReview's answer: authenticated, for our audience, as the agents'
/// ServiceAccount, bound to a pod.
pub fn identity_from_review(
    status: &TokenReviewStatus,
    config: &ReviewConfig,
) -> Result<NodeSource, Refusal> {
    if status.authenticated != Some(true) {
        return Err(Refusal::new(
            AgentAuthRefusal::InvalidToken,
            "the API server did not authenticate the token",
        ));
    }
    if let Some(auds) = &status.audiences
        && !auds.contains(&config.audience)
    {
        return Err(Refusal::new(
            AgentAuthRefusal::WrongAudience,
            format!("the token is not for the audience {:?}", config.audience),
        ));
    }
    let user = status.user.clone().unwrap_or_default();
    if user.username.as_deref() != Some(config.service_account.as_str()) {
        return Err(Refusal::new(
            AgentAuthRefusal::WrongServiceAccount,
            format!("only {} may call the agent API", config.service_account),
        ));
    }
    let extra = user.extra.unwrap_or_default();
    let first = |k: &str| {
        extra
            .get(k)
            .and_then(|v| v.first())
            .filter(|s| !s.is_empty())
            .cloned()
    };
    if let Some(node) = first(EXTRA_NODE_NAME) {
        return Ok(NodeSource::Node(node));
    }
    match (first(EXTRA_POD_NAME), first(EXTRA_POD_UID)) {
        (Some(name), Some(uid)) => Ok(NodeSource::Pod { name, uid }),
        _ => Err(Refusal::new(
            AgentAuthRefusal::NoNode,
            "the token is not bound to a pod (use a projected serviceAccountToken volume)",
        )),
    }
}

// === impl TokenReviewer ===

/// Checks agents' tokens with the API server, caching verdicts.
pub struct TokenReviewer {
    client: kube::Client,
    config: ReviewConfig,
    metrics: ControllerMetrics,
    cache: Mutex<HashMap<[u8; 32], Verdict>>,
    /// The review of each token under way, which every caller presenting that token
    /// meanwhile waits for instead of asking one of its own: an agent's concurrent calls
    /// (heartbeat, wake-up, load report), its calls while its renewal is under way past
    /// the verdict's end, and all of them after a controller start, cost one review.
    in_flight: Mutex<HashMap<[u8; 32], Arc<ReviewOnce>>>,
}

/// One review's outcome, shared by every caller that waited for it.
type ReviewOnce = tokio::sync::OnceCell<Result<AgentIdentity, Refusal>>;

/// A cached review's outcome.
#[derive(Debug, Clone)]
struct Verdict {
    identity: AgentIdentity,
    until: Instant,
    /// A background review of the token is under way (one at a time per token).
    renewing: bool,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TokenReviewer {
    pub fn new(client: kube::Client, config: ReviewConfig, metrics: ControllerMetrics) -> Self {
        Self {
            client,
            config,
            metrics,
            cache: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Who presented `token`, or why not (the refusal is counted here). A cached verdict
    /// near its end answers while a review renews it in the background.
    pub async fn authenticate(self: &Arc<Self>, token: &str) -> Result<AgentIdentity, Refusal> {
        let r = self.authenticate_uncounted(token).await;
        if let Err(refusal) = &r {
            self.metrics.agent_auth_refused(refusal.reason);
        }
        r
    }

    async fn authenticate_uncounted(
        self: &Arc<Self>,
        token: &str,
    ) -> Result<AgentIdentity, Refusal> {
        let now_unix = chrono::Utc::now().timestamp();
        let claims = precheck(token, &self.config.audience, now_unix)?;
        let key = digest(token);
        let now = Instant::now();
        let cached = {
            let mut cache = self.cache();
            match cache.get_mut(&key) {
                Some(v) if v.until > now => {
                    let renew =
                        !v.renewing && v.until.saturating_duration_since(now) < REFRESH_AHEAD;
                    v.renewing |= renew;
                    Some((v.identity.clone(), renew))
                }
                _ => None,
            }
        };
        if let Some((identity, renew)) = cached {
            if renew {
                let this = Arc::clone(self);
                let token = token.to_owned();
                tokio::spawn(async move { this.renew(key, &token).await });
            }
            return Ok(identity);
        }
        self.review_once(key, token, claims.exp).await
    }

    /// Reviews `token` and caches the verdict, or waits for the review of it already
    /// under way (see [`TokenReviewer::in_flight`]).
    async fn review_once(
        &self,
        key: [u8; 32],
        token: &str,
        exp: Option<i64>,
    ) -> Result<AgentIdentity, Refusal> {
        let (once, mine) = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            match in_flight.get(&key) {
                Some(once) => (Arc::clone(once), false),
                None => {
                    // A review that ended between the caller's look at the cache and
                    // here left its verdict there.
                    let now = Instant::now();
                    if let Some(v) = self.cache().get(&key).filter(|v| v.until > now)
                        && !v.renewing
                        && v.until.saturating_duration_since(now) >= REFRESH_AHEAD
                    {
                        return Ok(v.identity.clone());
                    }
                    let once = Arc::new(ReviewOnce::new());
                    in_flight.insert(key, Arc::clone(&once));
                    (once, true)
                }
            }
        };
        // Whoever started the review ends its entry, however the review ends (a caller
        // that went away drops its future: the guard still runs).
        let _done = mine.then(|| InFlightEntry {
            map: &self.in_flight,
            key,
        });
        once.get_or_init(|| self.review_and_cache(key, token, exp))
            .await
            .clone()
    }

    /// Renews a cached verdict: a refused token loses it at once (counted when the
    /// agent next calls); an API server that does not answer leaves it to run out.
    async fn renew(&self, key: [u8; 32], token: &str) {
        let exp = precheck(token, &self.config.audience, chrono::Utc::now().timestamp())
            .ok()
            .and_then(|c| c.exp);
        match self.review_once(key, token, exp).await {
            Ok(_) => {}
            Err(r) if r.reason == AgentAuthRefusal::ReviewUnavailable => {
                if let Some(v) = self.cache().get_mut(&key) {
                    v.renewing = false;
                }
            }
            Err(_) => {
                self.cache().remove(&key);
            }
        }
    }

    /// Reviews `token` and caches the verdict (for a minute, never past `exp`).
    async fn review_and_cache(
        &self,
        key: [u8; 32],
        token: &str,
        exp: Option<i64>,
    ) -> Result<AgentIdentity, Refusal> {
        let status = self.review(token).await?;
        let identity = match identity_from_review(&status, &self.config)? {
            NodeSource::Node(node) => AgentIdentity { node },
            NodeSource::Pod { name, uid } => self.node_of_pod(&name, &uid).await?,
        };
        let now_unix = chrono::Utc::now().timestamp();
        let now = Instant::now();
        // Trusted for a minute, and never past the token's own expiry.
        let ttl = exp
            .map(|e| Duration::from_secs((e - now_unix).max(0) as u64))
            .map_or(CACHE_TTL, |left| left.min(CACHE_TTL));
        let mut cache = self.cache();
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, v| v.until > now);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(
            key,
            Verdict {
                identity: identity.clone(),
                until: now + ttl,
                renewing: false,
            },
        );
        Ok(identity)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Verdict>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn review(&self, token: &str) -> Result<TokenReviewStatus, Refusal> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.config.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "TokenReview of an agent's token failed");
                Refusal::new(
                    AgentAuthRefusal::ReviewUnavailable,
                    "the controller cannot review tokens right now; retry",
                )
            })?;
        Ok(answer.status.unwrap_or_default())
    }

    /// The node of the agent's pod, for API servers whose reviews do not name it.
    async fn node_of_pod(&self, name: &str, uid: &str) -> Result<AgentIdentity, Refusal> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), self.config.namespace());
        // A list by name rather than a get: the controller may list Pods already.
        let pod = pods
            .list(&ListParams::default().fields(&format!("metadata.name={name}")))
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, pod = name, "reading an agent's pod failed");
                Refusal::new(
                    AgentAuthRefusal::ReviewUnavailable,
                    "the controller cannot read the agent's pod right now; retry",
                )
            })?
            .items
            .into_iter()
            .next();
        let node = pod
            .filter(|p| p.metadata.uid.as_deref() == Some(uid))
            .and_then(|p| p.spec.and_then(|s| s.node_name))
            .filter(|n| !n.is_empty());
        match node {
            Some(node) => Ok(AgentIdentity { node }),
            None => Err(Refusal::new(
                AgentAuthRefusal::NoNode,
                "the token's pod is gone or not scheduled to a node",
            )),
        }
    }
}

/// Removes a token's in-flight review when the caller that started it is done.
struct InFlightEntry<'a> {
    map: &'a Mutex<HashMap<[u8; 32], Arc<ReviewOnce>>>,
    key: [u8; 32],
}

impl Drop for InFlightEntry<'_> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// Middleware: authenticates the caller before any body is read and hands handlers the
/// [`AgentIdentity`] (absent with a shared token).
pub async fn require_agent(
    State(auth): State<AgentAuth>,
    mut req: Request,
    next: Next,
) -> Response {
    match &auth {
        AgentAuth::Shared(token) => {
            if let Err(e) = token.check(req.headers().get(AUTHORIZATION)) {
                return e.into_response();
            }
        }
        AgentAuth::TokenReview(reviewer) => {
            let token = match bearer(req.headers().get(AUTHORIZATION)) {
                Ok(t) => t.to_owned(),
                Err(refusal) => {
                    reviewer.metrics.agent_auth_refused(refusal.reason);
                    return refusal.into_response();
                }
            };
            match reviewer.authenticate(&token).await {
                Ok(id) => {
                    req.extensions_mut().insert(id);
                }
                Err(refusal) => return refusal.into_response(),
            }
        }
    }
    next.run(req).await
}

/// Refuses a message about `node` from a caller bound to another node (counted).
pub fn check_node(
    auth: &AgentAuth,
    identity: Option<&AgentIdentity>,
    what: &str,
    node: &str,
) -> Result<(), Refusal> {
    match (auth, identity) {
        (AgentAuth::Shared(_), _) => Ok(()),
        (AgentAuth::TokenReview(_), Some(id)) if id.node == node => Ok(()),
        (AgentAuth::TokenReview(r), Some(id)) => {
            r.metrics.agent_auth_refused(AgentAuthRefusal::OtherNode);
            Err(Refusal::new(
                AgentAuthRefusal::OtherNode,
                format!(
                    "{what} for node {node:?} refused: this token belongs to the agent of node {:?}",
                    id.node
                ),
            ))
        }
        (AgentAuth::TokenReview(r), None) => {
            r.metrics.agent_auth_refused(AgentAuthRefusal::NoNode);
            Err(Refusal::new(
                AgentAuthRefusal::NoNode,
                "no authenticated node",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn jwt(claims: serde_json::Value) -> String {
        let e = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            e(br#"{"alg":"ES256"}"#),
            e(claims.to_string().as_bytes()),
            e(b"sig")
        )
    }

    #[test]
    fn precheck_refuses_what_no_review_would_pass() {
        let aud = DEFAULT_AUDIENCE;
        let ok = jwt(serde_json::json!({"aud": [aud], "exp": 2000}));
        assert_eq!(precheck(&ok, aud, 1000).unwrap().exp, Some(2000));
        let r = |t: &str| precheck(t, aud, 1000).unwrap_err().reason;
        assert_eq!(r("not-a-jwt"), AgentAuthRefusal::InvalidToken);
        assert_eq!(r("a.b!.c"), AgentAuthRefusal::InvalidToken);
        assert_eq!(
            r(&jwt(serde_json::json!({"aud": [aud], "exp": 1000}))),
            AgentAuthRefusal::ExpiredToken
        );
        assert_eq!(
            r(&jwt(
                serde_json::json!({"aud": ["https://kubernetes.default.svc"], "exp": 2000})
            )),
            AgentAuthRefusal::WrongAudience
        );
    }

    fn status(user: &str, extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![DEFAULT_AUDIENCE.into()]),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn a_review_names_the_node_or_the_pod_of_the_agents_account_only() {
        let cfg = ReviewConfig::new(DEFAULT_AUDIENCE, "nemesis-system", "nemesis-agent");
        let agent = "system:serviceaccount:nemesis-system:nemesis-agent";
        assert_eq!(
            identity_from_review(&status(agent, &[(EXTRA_NODE_NAME, "n1")]), &cfg),
            Ok(NodeSource::Node("n1".into()))
        );
        assert_eq!(
            identity_from_review(
                &status(agent, &[(EXTRA_POD_NAME, "p"), (EXTRA_POD_UID, "u")]),
                &cfg
            ),
            Ok(NodeSource::Pod {
                name: "p".into(),
                uid: "u".into()
            })
        );
        let reason = |s: TokenReviewStatus| identity_from_review(&s, &cfg).unwrap_err().reason;
        assert_eq!(reason(status(agent, &[])), AgentAuthRefusal::NoNode);
        assert_eq!(
            reason(status(
                "system:serviceaccount:default:default",
                &[(EXTRA_NODE_NAME, "n1")]
            )),
            AgentAuthRefusal::WrongServiceAccount
        );
        let mut s = status(agent, &[(EXTRA_NODE_NAME, "n1")]);
        s.authenticated = Some(false);
        assert_eq!(reason(s), AgentAuthRefusal::InvalidToken);
        assert_eq!(cfg.namespace(), "nemesis-system");
    }
}
