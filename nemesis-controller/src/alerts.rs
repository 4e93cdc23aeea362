//! The Alertmanager webhook receiver (`POST /v1/alerts/alertmanager`, payload version 4)
//! and the set of firing alerts by name it maintains for `alert(name)` conditions. It
//! publishes state; it never decides what an alert means for a policy.
//!
//! Alertmanager configuration for it:
//! ```yaml
//! receivers:
//! - name: nemesis
//!   webhook_configs:
//!   - url: http://nemesis-controller.nemesis-system:8080/v1/alerts/alertmanager
//!     send_resolved: true
//!     http_config:
//!       authorization: { type: Bearer, credentials_file: /etc/nemesis/alert-token }
//! ```
//! The set lives in memory: after a controller restart it refills as Alertmanager
//! re-sends (every `repeat_interval`, or on any change of the group).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::{Json, Router, middleware};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::agents::ApiError;
use crate::auth::{BearerToken, require_bearer_or_basic};

pub const ALERTMANAGER_PATH: &str = "/v1/alerts/alertmanager";

/// A webhook carries a whole group; Alertmanager's `max_alerts` defaults to unlimited,
/// and an alert with its labels and annotations is well under 2 KiB: room for 2,000.
pub const MAX_WEBHOOK_BYTES: usize = 4 << 20;

/// How long a resolved alert is remembered, to recognise a late retry of its old firing
/// notification (Alertmanager retries failed deliveries for a while).
const TOMBSTONE_TTL_MINUTES: i64 = 60;

// === the webhook payload (version 4) ===

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Firing,
    Resolved,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookMessage {
    pub version: String,
    #[serde(default)]
    pub group_key: String,
    pub status: AlertStatus,
    #[serde(default)]
    pub receiver: String,
    pub alerts: Vec<WebhookAlert>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAlert {
    pub status: AlertStatus,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub starts_at: DateTime<Utc>,
    /// `0001-01-01T00:00:00Z` while firing.
    pub ends_at: DateTime<Utc>,
    /// Identifies the alert instance (its label set); derived from the labels if absent.
    #[serde(default)]
    pub fingerprint: String,
}

impl WebhookAlert {
    fn fingerprint(&self) -> String {
        if !self.fingerprint.is_empty() {
            return self.fingerprint.clone();
        }
        // BTreeMap order makes this canonical.
        self.labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

// === the set of firing alerts ===

/// An alert name with at least one firing instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FiringAlert {
    pub name: String,
    /// The earliest `startsAt` of its firing instances.
    pub since: DateTime<Utc>,
    pub instances: usize,
}

/// Firing alerts by `alertname`.
pub type FiringAlerts = BTreeMap<String, FiringAlert>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ApplySummary {
    pub firing: usize,
    pub resolved: usize,
    /// Alerts without an `alertname` label, and late retries of already resolved ones.
    pub ignored: usize,
}

#[derive(Debug, Default)]
struct Book {
    /// alertname -> fingerprint -> startsAt
    firing: BTreeMap<String, BTreeMap<String, DateTime<Utc>>>,
    /// fingerprint -> endsAt of its last resolution
    resolved: BTreeMap<String, DateTime<Utc>>,
}

impl Book {
    fn apply(&mut self, msg: &WebhookMessage, now: DateTime<Utc>) -> ApplySummary {
        let mut sum = ApplySummary::default();
        self.resolved
            .retain(|_, ends| now - *ends < ChronoDuration::minutes(TOMBSTONE_TTL_MINUTES));
        for a in &msg.alerts {
            let Some(name) = a.labels.get("alertname").filter(|n| !n.is_empty()) else {
                sum.ignored += 1;
                continue;
            };
            let fp = a.fingerprint();
            match a.status {
                AlertStatus::Firing => {
                    if self
                        .resolved
                        .get(&fp)
                        .is_some_and(|ends| a.starts_at <= *ends)
                    {
                        sum.ignored += 1;
                        continue;
                    }
                    self.firing
                        .entry(name.clone())
                        .or_default()
                        .insert(fp, a.starts_at);
                    sum.firing += 1;
                }
                AlertStatus::Resolved => {
                    if let Some(instances) = self.firing.get_mut(name) {
                        instances.remove(&fp);
                        if instances.is_empty() {
                            self.firing.remove(name);
                        }
                    }
                    self.resolved.insert(fp, a.ends_at);
                    sum.resolved += 1;
                }
            }
        }
        sum
    }

    fn snapshot(&self) -> FiringAlerts {
        self.firing
            .iter()
            .filter_map(|(name, instances)| {
                let since = *instances.values().min()?;
                Some((
                    name.clone(),
                    FiringAlert {
                        name: name.clone(),
                        since,
                        instances: instances.len(),
                    },
                ))
            })
            .collect()
    }
}

/// The firing alerts, updated by webhooks, watched by the core.
#[derive(Debug)]
pub struct AlertBook {
    book: Mutex<Book>,
    tx: watch::Sender<FiringAlerts>,
}

impl Default for AlertBook {
    fn default() -> Self {
        Self::new()
    }
}

impl AlertBook {
    pub fn new() -> Self {
        Self {
            book: Mutex::new(Book::default()),
            tx: watch::channel(FiringAlerts::new()).0,
        }
    }

    /// A receiver that sees every change of the firing set (`changed().await`).
    pub fn subscribe(&self) -> watch::Receiver<FiringAlerts> {
        self.tx.subscribe()
    }

    pub fn firing(&self) -> FiringAlerts {
        self.tx.borrow().clone()
    }

    /// Applies one webhook message; publishes the new set when it changed.
    pub fn apply(&self, msg: &WebhookMessage, now: DateTime<Utc>) -> ApplySummary {
        let (sum, snapshot) = {
            let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
            let sum = book.apply(msg, now);
            (sum, book.snapshot())
        };
        self.tx.send_if_modified(|cur| {
            if *cur == snapshot {
                return false;
            }
            for (name, a) in &snapshot {
                if !cur.contains_key(name) {
                    tracing::info!(alert = %name, since = %a.since, "alert firing");
                }
            }
            for name in cur.keys().filter(|n| !snapshot.contains_key(*n)) {
                tracing::info!(alert = %name, "alert resolved");
            }
            *cur = snapshot;
            true
        });
        sum
    }
}

// === the endpoint ===

#[derive(Clone, Debug)]
pub struct AlertApi {
    pub book: Arc<AlertBook>,
    pub token: BearerToken,
}

/// `POST /v1/alerts/alertmanager`, authenticated with `api.token`: as a Bearer token
/// (Alertmanager's `http_config.authorization`) or as the password of HTTP Basic
/// (`http_config.basic_auth`).
pub fn alert_routes(api: AlertApi) -> Router {
    let token = api.token.clone();
    Router::new()
        .route(
            ALERTMANAGER_PATH,
            post(receive).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BYTES)),
        )
        .route_layer(middleware::from_fn_with_state(
            token,
            require_bearer_or_basic,
        ))
        .with_state(api)
}

async fn receive(
    State(api): State<AlertApi>,
    body: Result<Json<WebhookMessage>, JsonRejection>,
) -> Result<Json<ApplySummary>, ApiError> {
    let Json(msg) = body
        .map_err(|r| ApiError::from_json_rejection("Alertmanager webhook", MAX_WEBHOOK_BYTES, r))?;
    let sum = accept(&api.book, &msg, Utc::now())?;
    tracing::debug!(group = %msg.group_key, receiver = %msg.receiver, ?sum, "alertmanager webhook");
    Ok(Json(sum))
}

/// Checks a decoded webhook message and applies it to `book`. Pure but for the book's
/// lock (the fuzz target `alertmanager` calls it as the handler does).
pub fn accept(
    book: &AlertBook,
    msg: &WebhookMessage,
    now: DateTime<Utc>,
) -> Result<ApplySummary, ApiError> {
    if msg.version != "4" {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "Alertmanager webhook payload version {:?} is not supported; expected \"4\"",
                msg.version
            ),
        ));
    }
    Ok(book.apply(msg, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn alert(name: &str, fp: &str, status: AlertStatus, starts: &str, ends: &str) -> WebhookAlert {
        WebhookAlert {
            status,
            labels: BTreeMap::from([("alertname".to_string(), name.to_string())]),
            starts_at: t(starts),
            ends_at: t(ends),
            fingerprint: fp.into(),
        }
    }

    fn msg(alerts: Vec<WebhookAlert>) -> WebhookMessage {
        WebhookMessage {
            version: "4".into(),
            group_key: String::new(),
            status: AlertStatus::Firing,
            receiver: String::new(),
            alerts,
        }
    }

    const ZERO: &str = "0001-01-01T00:00:00Z";

    #[test]
    fn an_alert_name_fires_while_any_instance_fires() {
        let book = AlertBook::new();
        let now = t("2030-01-01T00:10:00Z");
        let s = book.apply(
            &msg(vec![
                alert(
                    "GPU",
                    "a",
                    AlertStatus::Firing,
                    "2030-01-01T00:05:00Z",
                    ZERO,
                ),
                alert(
                    "GPU",
                    "b",
                    AlertStatus::Firing,
                    "2030-01-01T00:01:00Z",
                    ZERO,
                ),
            ]),
            now,
        );
        assert_eq!(s.firing, 2);
        let f = book.firing();
        assert_eq!(f["GPU"].instances, 2);
        assert_eq!(f["GPU"].since, t("2030-01-01T00:01:00Z"));
        book.apply(
            &msg(vec![alert(
                "GPU",
                "b",
                AlertStatus::Resolved,
                "2030-01-01T00:01:00Z",
                "2030-01-01T00:09:00Z",
            )]),
            now,
        );
        assert_eq!(book.firing()["GPU"].since, t("2030-01-01T00:05:00Z"));
        book.apply(
            &msg(vec![alert(
                "GPU",
                "a",
                AlertStatus::Resolved,
                "2030-01-01T00:05:00Z",
                "2030-01-01T00:09:30Z",
            )]),
            now,
        );
        assert!(book.firing().is_empty());
    }

    #[test]
    fn a_late_retry_of_a_resolved_alert_does_not_fire_it_again_but_a_new_firing_does() {
        let book = AlertBook::new();
        let now = t("2030-01-01T00:10:00Z");
        book.apply(
            &msg(vec![alert(
                "X",
                "a",
                AlertStatus::Resolved,
                "2030-01-01T00:01:00Z",
                "2030-01-01T00:02:00Z",
            )]),
            now,
        );
        let s = book.apply(
            &msg(vec![alert(
                "X",
                "a",
                AlertStatus::Firing,
                "2030-01-01T00:01:00Z",
                ZERO,
            )]),
            now,
        );
        assert_eq!(s.ignored, 1);
        assert!(book.firing().is_empty());
        book.apply(
            &msg(vec![alert(
                "X",
                "a",
                AlertStatus::Firing,
                "2030-01-01T00:03:00Z",
                ZERO,
            )]),
            now,
        );
        assert!(book.firing().contains_key("X"));
    }

    #[test]
    fn alerts_without_a_name_are_ignored_and_fingerprints_default_to_labels() {
        let book = AlertBook::new();
        let mut a = alert("", "", AlertStatus::Firing, "2030-01-01T00:00:00Z", ZERO);
        a.labels.clear();
        let mut b = alert("Y", "", AlertStatus::Firing, "2030-01-01T00:00:00Z", ZERO);
        b.labels.insert("instance".into(), "1".into());
        let mut c = b.clone();
        c.labels.insert("instance".into(), "2".into());
        let s = book.apply(&msg(vec![a, b, c]), t("2030-01-01T00:00:01Z"));
        assert_eq!((s.firing, s.ignored), (2, 1));
        assert_eq!(book.firing()["Y"].instances, 2);
    }

    #[test]
    fn a_real_alertmanager_payload_parses() {
        let json = r#"{"receiver":"nemesis","status":"firing","alerts":[{"status":"firing",
          "labels":{"alertname":"GPUPressure","severity":"warning"},"annotations":{},
          "startsAt":"2030-01-01T00:00:00.123456789Z","endsAt":"0001-01-01T00:00:00Z",
          "generatorURL":"","fingerprint":"8f5c3a1b2c3d4e5f"}],"groupLabels":{},
          "commonLabels":{},"commonAnnotations":{},"externalURL":"http://x","version":"4",
          "groupKey":"{}:{}","truncatedAlerts":0}"#;
        let m: WebhookMessage = serde_json::from_str(json).unwrap();
        assert_eq!(m.alerts[0].labels["alertname"], "GPUPressure");
        assert_eq!(m.alerts[0].status, AlertStatus::Firing);
    }
}
