//! The sinks an administrator configures (a YAML file, mounted from a Secret since it
//! holds keys and passwords) and how one notification is sent to each kind: a generic
//! webhook (JSON, HMAC-SHA256 signature), a Slack-compatible incoming webhook,
//! Alertmanager's v2 API, e-mail over SMTP. Secrets are never logged, never shown by the
//! API and never part of an error message.
//!
//! ```yaml
//! sinks:
//! - name: ops-hook
//!   kind: webhook
//!   url: https://ops.example/hooks/nemesis
//!   hmacKey: "at least 16 characters"
//! - {name: chat, kind: slack, url: "https://hooks.slack.com/services/..."}
//! - {name: am, kind: alertmanager, url: "http://alertmanager.monitoring:9093"}
//! - name: mail
//!   kind: smtp
//!   host: smtp.example
//!   port: 25
//!   from: nemesis@example
//!   to: [oncall@example]
//!   rateLimitPerMinute: 6
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::outbox::{Alert, AlertState};
use super::smtp;
use crate::store::from_unix_ms;

/// One notification; a sink slower than this is a failed attempt, retried later.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(15);
/// Chat and mail are read by people: more than this a minute is noise.
pub const DEFAULT_RATE_LIMIT_PER_MINUTE: u32 = 30;
/// Alertmanager drops an alert not re-sent within its resolve timeout (5 m by default);
/// Prometheus re-sends every minute, and so does Nemesis.
pub const ALERTMANAGER_RESEND_MS: u64 = 60_000;
/// The `endsAt` of a firing alert sent to Alertmanager: four re-send intervals, as
/// Prometheus does, so one lost re-send does not resolve it.
const ALERTMANAGER_ENDS_AFTER_MS: u64 = 4 * ALERTMANAGER_RESEND_MS;
/// A signing key shorter than this is guessable.
const MIN_HMAC_KEY: usize = 16;
/// The header carrying `sha256=<hex>` of HMAC-SHA256(key, "<timestamp>.<body>").
pub const SIGNATURE_HEADER: &str = "x-nemesis-signature";
/// Unix seconds when the request was signed; a receiver refuses old ones (replays).
pub const TIMESTAMP_HEADER: &str = "x-nemesis-timestamp";

/// A string that never prints.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SinksFile {
    #[serde(default)]
    pub sinks: Vec<SinkSpec>,
    /// Reports sent on a schedule through the sinks (e.g. weekly by e-mail).
    #[serde(default)]
    pub reports: Vec<ReportSchedule>,
}

/// A report sent on a schedule: `schedule` is a cron pattern in `timeZone` (default
/// UTC); each time it fires, the report over the `window` before it (default `7d`) goes
/// to `sinks` (webhook: the JSON report; Slack and e-mail: a text summary, the mail with
/// the CSV too). Alertmanager takes alerts only.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReportSchedule {
    pub name: String,
    pub schedule: String,
    #[serde(default)]
    pub time_zone: Option<String>,
    #[serde(default)]
    pub window: Option<String>,
    /// Absent: the cluster; with `policy` too: one Service's policy.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub policy: Option<String>,
    pub sinks: Vec<String>,
}

/// The default window of a scheduled report: the week before it.
pub const DEFAULT_REPORT_WINDOW: &str = "7d";

/// A validated sinks file.
#[derive(Debug, Clone, Default)]
pub struct SinksConfig {
    pub sinks: Vec<SinkSpec>,
    /// With their parsed schedules and windows (ms).
    pub reports: Vec<(ReportSchedule, crate::policy::schedule::Schedule, u64)>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SinkSpec {
    pub name: String,
    #[serde(flatten)]
    pub kind: SinkKind,
    #[serde(default)]
    pub rate_limit_per_minute: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(
    tag = "kind",
    rename_all = "lowercase",
    rename_all_fields = "camelCase"
)]
pub enum SinkKind {
    Webhook {
        url: String,
        hmac_key: SecretString,
    },
    Slack {
        /// The incoming-webhook URL is itself the secret.
        url: SecretString,
    },
    Alertmanager {
        url: String,
    },
    Smtp {
        host: String,
        #[serde(default = "default_smtp_port")]
        port: u16,
        from: String,
        to: Vec<String>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<SecretString>,
    },
}

fn default_smtp_port() -> u16 {
    25
}

impl SinkKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            SinkKind::Webhook { .. } => "webhook",
            SinkKind::Slack { .. } => "slack",
            SinkKind::Alertmanager { .. } => "alertmanager",
            SinkKind::Smtp { .. } => "smtp",
        }
    }
}

impl SinkSpec {
    pub fn rate_limit(&self) -> u32 {
        self.rate_limit_per_minute
            .unwrap_or(DEFAULT_RATE_LIMIT_PER_MINUTE)
    }

    /// How often firing alerts are sent again (Alertmanager only).
    pub fn resend_ms(&self) -> Option<u64> {
        matches!(self.kind, SinkKind::Alertmanager { .. }).then_some(ALERTMANAGER_RESEND_MS)
    }

    /// Where it sends, without secrets (for the UI).
    pub fn target(&self) -> String {
        match &self.kind {
            SinkKind::Webhook { url, .. } | SinkKind::Alertmanager { url } => url.clone(),
            SinkKind::Slack { .. } => "(incoming-webhook URL, kept secret)".into(),
            SinkKind::Smtp { host, port, to, .. } => {
                format!("smtp://{host}:{port} to {}", to.join(", "))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinksError {
    #[error("reading the sinks file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the sinks file {path}: {message}")]
    Invalid { path: String, message: String },
}

fn check_url(field: &str, url: &str) -> Result<(), String> {
    let u: http::Uri = url
        .parse()
        .map_err(|e| format!("{field}: {url:?} is not a URL: {e}"))?;
    match u.scheme_str() {
        Some("http" | "https") if u.host().is_some() => Ok(()),
        _ => Err(format!(
            "{field}: {url:?} must be an http:// or https:// URL with a host"
        )),
    }
}

/// Parses and checks a sinks file's text; `path` names it in errors.
pub fn parse_sinks(path: &str, text: &str) -> Result<Vec<SinkSpec>, SinksError> {
    parse_config(path, text).map(|c| c.sinks)
}

/// The sinks and the scheduled reports of a sinks file.
pub fn parse_config(path: &str, text: &str) -> Result<SinksConfig, SinksError> {
    let invalid = |message: String| SinksError::Invalid {
        path: path.to_string(),
        message,
    };
    let file: SinksFile = serde_norway::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in file.sinks.iter().enumerate() {
        let at = format!("sinks[{i}]");
        let name_ok = !s.name.is_empty()
            && s.name.len() <= 63
            && s.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok {
            return Err(invalid(format!(
                "{at}.name: {:?} must be 1-63 lowercase letters, digits or '-'",
                s.name
            )));
        }
        if !seen.insert(s.name.clone()) {
            return Err(invalid(format!("{at}.name: {:?} is used twice", s.name)));
        }
        if s.rate_limit_per_minute == Some(0) {
            return Err(invalid(format!(
                "{at}.rateLimitPerMinute: must be at least 1"
            )));
        }
        let r = match &s.kind {
            SinkKind::Webhook { url, hmac_key } => {
                check_url(&format!("{at}.url"), url).and_then(|()| {
                    if hmac_key.expose().len() < MIN_HMAC_KEY {
                        Err(format!(
                            "{at}.hmacKey: must be at least {MIN_HMAC_KEY} bytes"
                        ))
                    } else {
                        Ok(())
                    }
                })
            }
            SinkKind::Slack { url } => check_url(&format!("{at}.url"), url.expose())
                .map_err(|_| format!("{at}.url: must be an http:// or https:// URL with a host")),
            SinkKind::Alertmanager { url } => check_url(&format!("{at}.url"), url),
            SinkKind::Smtp {
                host,
                to,
                from,
                username,
                password,
                ..
            } => {
                if host.is_empty() {
                    Err(format!("{at}.host: empty"))
                } else if to.is_empty() {
                    Err(format!("{at}.to: name at least one recipient"))
                } else if let Some(bad) = to.iter().chain([from]).find(|a| !smtp::is_address(a)) {
                    Err(format!("{at}: {bad:?} is not an e-mail address"))
                } else if username.is_some() != password.is_some() {
                    Err(format!("{at}: set both username and password, or neither"))
                } else {
                    Ok(())
                }
            }
        };
        r.map_err(invalid)?;
    }
    let mut reports = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, r) in file.reports.iter().enumerate() {
        let at = format!("reports[{i}]");
        if r.name.is_empty() || !names.insert(r.name.clone()) {
            return Err(invalid(format!("{at}.name: empty or used twice")));
        }
        let window_text = r.window.as_deref().unwrap_or(DEFAULT_REPORT_WINDOW);
        let window = crate::policy::duration::parse_duration(window_text)
            .ok()
            .filter(|d| d.num_minutes() >= 1 && d.num_days() <= 400)
            .ok_or_else(|| {
                invalid(format!(
                    "{at}.window: {window_text:?} is not a duration from 1m to 400d"
                ))
            })?;
        let schedule = crate::policy::schedule::Schedule::new(
            &r.schedule,
            r.time_zone.as_deref(),
            chrono::TimeDelta::zero(),
        )
        .map_err(|e| invalid(format!("{at}.schedule: {e:?}")))?;
        if r.policy.is_some() && r.namespace.is_none() {
            return Err(invalid(format!("{at}.policy: needs namespace too")));
        }
        if r.sinks.is_empty() {
            return Err(invalid(format!("{at}.sinks: name at least one sink")));
        }
        for (j, name) in r.sinks.iter().enumerate() {
            match file.sinks.iter().find(|s| &s.name == name) {
                None => {
                    return Err(invalid(format!("{at}.sinks[{j}]: no sink named {name:?}")));
                }
                Some(SinkSpec {
                    kind: SinkKind::Alertmanager { .. },
                    ..
                }) => {
                    return Err(invalid(format!(
                        "{at}.sinks[{j}]: {name:?} is an Alertmanager, which takes alerts, not reports"
                    )));
                }
                Some(_) => {}
            }
        }
        reports.push((r.clone(), schedule, window.num_milliseconds() as u64));
    }
    Ok(SinksConfig {
        sinks: file.sinks,
        reports,
    })
}

pub fn read_sinks(path: &Path) -> Result<SinksConfig, SinksError> {
    let text = std::fs::read_to_string(path).map_err(|source| SinksError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_config(&path.display().to_string(), &text)
}

// === the messages ===

fn rfc3339(ms: u64) -> String {
    DateTime::<Utc>::from(from_unix_ms(ms)).to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookAlert<'a> {
    id: &'a str,
    status: &'static str,
    labels: &'a BTreeMap<String, String>,
    annotations: BTreeMap<&'static str, &'a str>,
    starts_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ends_at: Option<String>,
    count: u64,
}

/// The generic webhook's body (also what the tests' receivers read).
pub fn webhook_body(sender: &str, rule: &str, alerts: &[Alert]) -> Vec<u8> {
    let status = if alerts.iter().any(|a| a.state == AlertState::Firing) {
        "firing"
    } else {
        "resolved"
    };
    let list: Vec<WebhookAlert<'_>> = alerts
        .iter()
        .map(|a| WebhookAlert {
            id: &a.id,
            status: a.state.as_str(),
            labels: &a.labels,
            annotations: BTreeMap::from([("summary", a.summary.as_str())]),
            starts_at: rfc3339(a.starts_at_ms),
            ends_at: a.ends_at_ms.map(rfc3339),
            count: a.count,
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "version": "1",
        "sender": sender,
        "group": rule,
        "status": status,
        "alerts": list,
    }))
    .unwrap_or_default()
}

/// `sha256=<hex>` of HMAC-SHA256(key, "<timestamp>.<body>").
pub fn signature(key: &[u8], timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// One line per alert, for chat and mail.
pub fn text_lines(alerts: &[Alert]) -> Vec<String> {
    alerts
        .iter()
        .map(|a| {
            let repeat = if a.count > 1 {
                format!(" (x{})", a.count)
            } else {
                String::new()
            };
            format!(
                "[{}] {} {}: {}{repeat}",
                a.state.as_str().to_uppercase(),
                a.severity.as_str(),
                a.labels.get("alertname").map_or("", String::as_str),
                a.summary
            )
        })
        .collect()
}

fn headline(rule: &str, alerts: &[Alert]) -> String {
    let firing = alerts
        .iter()
        .filter(|a| a.state == AlertState::Firing)
        .count();
    format!(
        "Nemesis: {firing} firing, {} resolved ({rule})",
        alerts.len() - firing
    )
}

fn alertmanager_body(alerts: &[Alert], generator: &str, now_ms: u64) -> Vec<u8> {
    let list: Vec<serde_json::Value> = alerts
        .iter()
        .map(|a| {
            let ends = match a.state {
                AlertState::Firing => now_ms + ALERTMANAGER_ENDS_AFTER_MS,
                AlertState::Resolved => a.ends_at_ms.unwrap_or(now_ms),
            };
            serde_json::json!({
                "labels": a.labels,
                "annotations": {"summary": a.summary, "nemesis_id": a.id},
                "startsAt": rfc3339(a.starts_at_ms),
                "endsAt": rfc3339(ends),
                "generatorURL": generator,
            })
        })
        .collect();
    serde_json::to_vec(&list).unwrap_or_default()
}

/// Why a send failed, in words safe to show (no secrets: URLs of secret sinks are left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError(pub String);

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Sends notifications; one per instance, cheap to share.
#[derive(Clone)]
pub struct Sender {
    http: reqwest::Client,
    /// Names this instance in webhooks (`sender`) and Alertmanager's `generatorURL`.
    pub identity: String,
    pub generator_url: String,
}

/// One notification in every form a sink takes; [`Sender::deliver`] picks the one its
/// sink wants.
struct Message {
    /// The signed webhook's JSON body.
    webhook: Vec<u8>,
    /// Slack's text (mrkdwn).
    slack: String,
    /// Alertmanager's `/api/v2/alerts` body (`None`: not something Alertmanager takes).
    alertmanager: Option<Vec<u8>>,
    subject: String,
    /// The mail's text, CRLF line ends.
    mail_body: String,
}

impl Sender {
    pub fn new(identity: String, generator_url: String) -> Self {
        let http = reqwest::Client::builder()
            .timeout(SEND_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            // A redirect would re-send a signed body somewhere not configured.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            http,
            identity,
            generator_url,
        }
    }

    /// Sends `alerts` (of one rule) to `sink`.
    pub async fn send(
        &self,
        sink: &SinkSpec,
        rule: &str,
        alerts: &[Alert],
        now_ms: u64,
    ) -> Result<(), SendError> {
        let headline = headline(rule, alerts);
        let lines = text_lines(alerts);
        let mut mail_body = String::new();
        for l in &lines {
            mail_body.push_str(l);
            mail_body.push_str("\r\n");
        }
        mail_body.push_str(&format!("\r\nSent by Nemesis ({}).\r\n", self.identity));
        let message = Message {
            webhook: webhook_body(&self.identity, rule, alerts),
            slack: std::iter::once(format!("*{headline}*"))
                .chain(lines)
                .collect::<Vec<_>>()
                .join("\n"),
            alertmanager: Some(alertmanager_body(alerts, &self.generator_url, now_ms)),
            subject: headline,
            mail_body,
        };
        self.deliver(sink, message, now_ms).await
    }

    /// Sends a scheduled report to `sink`: the JSON report to a webhook (signed), a text
    /// summary to Slack, a mail with the summary and the CSV over SMTP.
    pub async fn send_report(
        &self,
        sink: &SinkSpec,
        title: &str,
        report: &crate::reports::Report,
        now_ms: u64,
    ) -> Result<(), SendError> {
        use crate::reports::render;
        let message = Message {
            webhook: serde_json::to_vec(&serde_json::json!({
                "version": "1",
                "kind": "report",
                "sender": self.identity,
                "title": title,
                "report": report,
            }))
            .unwrap_or_default(),
            slack: format!("*{title}*\n{}", render::text(report)),
            alertmanager: None,
            subject: title.to_string(),
            mail_body: format!(
                "{}\r\nThe report as CSV:\r\n\r\n{}",
                render::text(report).replace('\n', "\r\n"),
                render::csv(report)
            ),
        };
        self.deliver(sink, message, now_ms).await
    }

    /// Sends `message` in the form `sink` takes, within [`SEND_TIMEOUT`].
    async fn deliver(
        &self,
        sink: &SinkSpec,
        message: Message,
        now_ms: u64,
    ) -> Result<(), SendError> {
        let fut = async {
            match &sink.kind {
                SinkKind::Webhook { url, hmac_key } => {
                    let ts = (now_ms / 1000).to_string();
                    let sig = signature(hmac_key.expose().as_bytes(), &ts, &message.webhook);
                    let req = self
                        .http
                        .post(url)
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .header(TIMESTAMP_HEADER, ts)
                        .header(SIGNATURE_HEADER, sig)
                        .body(message.webhook);
                    self.answer(req, false).await
                }
                SinkKind::Slack { url } => {
                    let req = self
                        .http
                        .post(url.expose())
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(serde_json::json!({ "text": message.slack }).to_string());
                    self.answer(req, true).await
                }
                SinkKind::Alertmanager { url } => {
                    let Some(body) = message.alertmanager else {
                        return Err(SendError("Alertmanager takes alerts, not reports".into()));
                    };
                    let req = self
                        .http
                        .post(format!("{}/api/v2/alerts", url.trim_end_matches('/')))
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(body);
                    self.answer(req, false).await
                }
                SinkKind::Smtp {
                    host,
                    port,
                    from,
                    to,
                    username,
                    password,
                } => {
                    let mail = smtp::Mail {
                        from,
                        to,
                        subject: &message.subject,
                        body: &message.mail_body,
                    };
                    let auth = username
                        .as_deref()
                        .zip(password.as_ref().map(SecretString::expose));
                    smtp::send(host, *port, auth, &mail, now_ms)
                        .await
                        .map_err(|e| SendError(e.to_string()))
                }
            }
        };
        match tokio::time::timeout(SEND_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(SendError(format!(
                "no answer within {} s",
                SEND_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn answer(
        &self,
        req: reqwest::RequestBuilder,
        secret_url: bool,
    ) -> Result<(), SendError> {
        let resp = req.send().await.map_err(|e| {
            // reqwest's message names the URL; a Slack URL is the secret itself.
            let e = if secret_url { e.without_url() } else { e };
            SendError(format!("sending failed: {e}"))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.chars().take(200).collect();
        Err(SendError(format!("answered {status}: {}", body.trim())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sinks_file_parses_every_kind_and_hides_its_secrets() {
        let s = parse_sinks(
            "sinks.yaml",
            r#"
sinks:
- {name: hook, kind: webhook, url: "http://127.0.0.1:1/x", hmacKey: "0123456789abcdef"}
- {name: chat, kind: slack, url: "http://127.0.0.1:1/services/T/B/secret-part"}
- {name: am, kind: alertmanager, url: "http://127.0.0.1:9093"}
- {name: mail, kind: smtp, host: 127.0.0.1, port: 2525, from: a@b.example, to: [c@d.example], username: u, password: hunter2hunter2, rateLimitPerMinute: 2}
"#,
        )
        .unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[3].rate_limit(), 2);
        assert_eq!(s[0].rate_limit(), DEFAULT_RATE_LIMIT_PER_MINUTE);
        assert_eq!(s[2].resend_ms(), Some(ALERTMANAGER_RESEND_MS));
        let shown = format!("{s:?} {}", s[1].target());
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(!shown.contains("secret-part"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn a_bad_sinks_file_is_refused_naming_the_field() {
        let cases = [
            (
                "sinks: [{name: Hook, kind: alertmanager, url: 'http://x'}]",
                "sinks[0].name",
            ),
            (
                "sinks: [{name: h, kind: webhook, url: 'http://x', hmacKey: short}]",
                "sinks[0].hmacKey",
            ),
            (
                "sinks: [{name: h, kind: alertmanager, url: 'ftp://x'}]",
                "sinks[0].url",
            ),
            ("sinks: [{name: h, kind: pager, url: 'http://x'}]", "pager"),
            (
                "sinks: [{name: m, kind: smtp, host: h, from: a@b, to: []}]",
                "sinks[0].to",
            ),
            (
                "sinks: [{name: a, kind: alertmanager, url: 'http://x'}, {name: a, kind: alertmanager, url: 'http://y'}]",
                "sinks[1].name",
            ),
        ];
        for (text, want) in cases {
            let e = parse_sinks("f.yaml", text).unwrap_err().to_string();
            assert!(e.contains("f.yaml") && e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn scheduled_reports_are_checked_against_the_sinks() {
        let sinks = "sinks:\n- {name: am, kind: alertmanager, url: 'http://x'}\n- {name: h, kind: webhook, url: 'http://x', hmacKey: 0123456789abcdef}\n";
        let ok = parse_config(
            "f",
            &format!("{sinks}reports:\n- {{name: weekly, schedule: '0 8 * * MON', timeZone: Europe/Paris, sinks: [h]}}\n"),
        )
        .unwrap();
        assert_eq!(ok.reports.len(), 1);
        assert_eq!(ok.reports[0].2, 7 * 24 * 3_600_000);
        for (report, want) in [
            (
                "{name: w, schedule: '0 8 * * MON', sinks: [am]}",
                "reports[0].sinks[0]: \"am\" is an Alertmanager",
            ),
            (
                "{name: w, schedule: '0 8 * * MON', sinks: [nope]}",
                "no sink named",
            ),
            (
                "{name: w, schedule: 'every monday', sinks: [h]}",
                "reports[0].schedule",
            ),
            (
                "{name: w, schedule: '0 8 * * MON', window: forever, sinks: [h]}",
                "reports[0].window",
            ),
            (
                "{name: w, schedule: '0 8 * * MON', policy: web, sinks: [h]}",
                "needs namespace",
            ),
        ] {
            let e = parse_config("f", &format!("{sinks}reports:\n- {report}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{report}: {e}");
        }
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_and_body() {
        // Python's hmac.new(b"Jefe", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
        let sig = signature(b"Jefe", "1700000000", br#"{"a":1}"#);
        assert_eq!(
            sig,
            "sha256=fa5f6481efc59da48b19c9dc10196c9953e5651f8304b3a318b6b87d70272e0a"
        );
    }
}
