//! The outbox: every alert raised, its state (firing, resolved, acknowledged) and its
//! delivery to each sink (pending, delivered, failed; attempts, last error, next retry).
//! Deduplication (a repeat of a firing alert is counted, not sent again), grouping (one
//! notification per rule and sink carries every alert due), retries with exponential
//! backoff. A plain value with virtual time: the service persists it (a Secret) so a
//! new leader delivers what the old one raised; nothing here does I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::rule::Severity;

/// First retry after this; each failure doubles it, up to [`MAX_BACKOFF_MS`].
pub const FIRST_BACKOFF_MS: u64 = 1_000;
/// A sink down for hours is retried every five minutes, not hammered.
pub const MAX_BACKOFF_MS: u64 = 5 * 60_000;
/// After this many failed attempts (about a day at the longest backoff) a delivery is
/// given up and marked failed; the UI shows why.
pub const MAX_ATTEMPTS: u32 = 300;
/// The outbox lives in a Secret (1 MiB at most): the oldest finished alerts go first
/// past this many.
pub const MAX_ALERTS: usize = 500;
/// A resolved alert whose deliveries are all finished stays visible this long.
pub const KEEP_RESOLVED_MS: u64 = 24 * 3_600_000;
/// Summaries and errors are cut to this many characters (they come from user text and
/// remote servers).
const MAX_TEXT: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Firing,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    Pending,
    Delivered,
    Failed,
}

/// One alert's delivery to one sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub state: DeliveryState,
    /// Attempts for the current notification (reset when the alert resolves).
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it is due (pending: next attempt; delivered: a re-send for sinks that want one).
    pub next_attempt_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at_ms: Option<u64>,
    /// The alert state the last successful delivery told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub told: Option<AlertState>,
}

impl Delivery {
    fn pending(at_ms: u64) -> Self {
        Self {
            state: DeliveryState::Pending,
            attempts: 0,
            last_error: None,
            next_attempt_ms: at_ms,
            delivered_at_ms: None,
            told: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// Stable for one alert instance: rule, trigger, subject (see [`alert_id`]).
    pub id: String,
    /// The AlertRule, `namespace/name`: the group its notifications go in.
    pub rule: String,
    pub severity: Severity,
    pub summary: String,
    pub labels: BTreeMap<String, String>,
    pub state: AlertState,
    pub starts_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at_ms: Option<u64>,
    pub last_seen_ms: u64,
    /// Occurrences folded into this alert (a repeat while firing counts here).
    pub count: u64,
    /// Event alerts resolve by themselves at this time unless repeated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_resolve_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_at_ms: Option<u64>,
    /// By sink name.
    pub deliveries: BTreeMap<String, Delivery>,
}

/// What the evaluator asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Raise {
    pub id: String,
    pub rule: String,
    pub severity: Severity,
    pub summary: String,
    pub labels: BTreeMap<String, String>,
    pub sinks: Vec<String>,
    pub group_wait_ms: u64,
    /// `Some` for event alerts (resolve after this long without a repeat).
    pub resolve_after_ms: Option<u64>,
}

/// A stable short id: FNV-1a 64 of the parts (no cryptographic need: ids only have to
/// be the same for the same rule, trigger and subject, on every instance).
pub fn alert_id(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn cut(s: &str) -> String {
    if s.chars().count() <= MAX_TEXT {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(MAX_TEXT).collect();
        t.push('…');
        t
    }
}

/// One notification to send: the alerts of one rule due at one sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub sink: String,
    pub rule: String,
    pub ids: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outbox {
    /// By id.
    pub alerts: BTreeMap<String, Alert>,
    /// Scheduled reports: `<schedule>/<sink>` -> the firing time last sent (Unix ms), so
    /// the next leader neither repeats nor skips one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reports_sent: BTreeMap<String, u64>,
}

impl Outbox {
    /// Raises (or repeats) an alert. Returns whether it is news (a new notification).
    pub fn raise(&mut self, r: Raise, now_ms: u64) -> bool {
        if let Some(a) = self.alerts.get_mut(&r.id)
            && a.state == AlertState::Firing
        {
            // Deduplicated: counted, the summary refreshed, nothing sent again.
            a.count += 1;
            a.last_seen_ms = now_ms;
            a.summary = cut(&r.summary);
            a.auto_resolve_at_ms = r.resolve_after_ms.map(|d| now_ms + d);
            return false;
        }
        let deliveries = r
            .sinks
            .iter()
            .map(|s| (s.clone(), Delivery::pending(now_ms + r.group_wait_ms)))
            .collect();
        self.alerts.insert(
            r.id.clone(),
            Alert {
                id: r.id,
                rule: r.rule,
                severity: r.severity,
                summary: cut(&r.summary),
                labels: r.labels,
                state: AlertState::Firing,
                starts_at_ms: now_ms,
                ends_at_ms: None,
                last_seen_ms: now_ms,
                count: 1,
                auto_resolve_at_ms: r.resolve_after_ms.map(|d| now_ms + d),
                acknowledged_by: None,
                acknowledged_at_ms: None,
                deliveries,
            },
        );
        self.trim();
        true
    }

    /// Resolves a firing alert; every sink is told (a resolved notification is due).
    pub fn resolve(&mut self, id: &str, now_ms: u64) -> bool {
        let Some(a) = self.alerts.get_mut(id) else {
            return false;
        };
        if a.state != AlertState::Firing {
            return false;
        }
        a.state = AlertState::Resolved;
        a.ends_at_ms = Some(now_ms);
        a.auto_resolve_at_ms = None;
        for d in a.deliveries.values_mut() {
            if d.told.is_none() && d.state == DeliveryState::Pending {
                // Never told it fired: one notification saying both is enough.
                continue;
            }
            *d = Delivery {
                delivered_at_ms: d.delivered_at_ms,
                told: d.told,
                ..Delivery::pending(now_ms)
            };
        }
        true
    }

    pub fn acknowledge(&mut self, id: &str, by: &str, now_ms: u64) -> Option<&Alert> {
        let a = self.alerts.get_mut(id)?;
        a.acknowledged_by = Some(by.to_string());
        a.acknowledged_at_ms = Some(now_ms);
        Some(a)
    }

    /// Ids of every firing alert.
    pub fn firing_ids(&self) -> impl Iterator<Item = &str> {
        self.alerts
            .values()
            .filter(|a| a.state == AlertState::Firing)
            .map(|a| a.id.as_str())
    }

    /// Time passing: event alerts resolve by themselves, old finished ones go.
    /// Returns whether anything changed.
    pub fn advance(&mut self, now_ms: u64) -> bool {
        let due: Vec<String> = self
            .alerts
            .values()
            .filter(|a| {
                a.state == AlertState::Firing && a.auto_resolve_at_ms.is_some_and(|t| t <= now_ms)
            })
            .map(|a| a.id.clone())
            .collect();
        let mut changed = false;
        for id in due {
            changed |= self.resolve(&id, now_ms);
        }
        let before = self.alerts.len();
        self.alerts.retain(|_, a| {
            !(finished(a) && a.ends_at_ms.is_some_and(|e| e + KEEP_RESOLVED_MS <= now_ms))
        });
        changed | (before != self.alerts.len())
    }

    /// Past [`MAX_ALERTS`], the oldest finished alerts go, then the oldest of all.
    fn trim(&mut self) {
        while self.alerts.len() > MAX_ALERTS {
            let victim = self
                .alerts
                .values()
                .min_by_key(|a| (!finished(a), a.last_seen_ms))
                .map(|a| a.id.clone());
            match victim {
                Some(id) => self.alerts.remove(&id),
                None => break,
            };
        }
    }

    /// Notifications due at `now_ms`, one per (sink, rule). `resend_ms(sink)` is how
    /// often a sink wants firing alerts sent again (Alertmanager forgets an alert that is
    /// not re-sent), `None` for once.
    pub fn due(&self, now_ms: u64, resend_ms: impl Fn(&str) -> Option<u64>) -> Vec<Batch> {
        let mut groups: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for a in self.alerts.values() {
            for (sink, d) in &a.deliveries {
                let due = match d.state {
                    DeliveryState::Pending => d.next_attempt_ms <= now_ms,
                    DeliveryState::Delivered => {
                        a.state == AlertState::Firing
                            && resend_ms(sink).is_some_and(|every| {
                                d.delivered_at_ms.is_some_and(|t| t + every <= now_ms)
                            })
                    }
                    DeliveryState::Failed => false,
                };
                if due {
                    groups
                        .entry((sink.clone(), a.rule.clone()))
                        .or_default()
                        .push(a.id.clone());
                }
            }
        }
        groups
            .into_iter()
            .map(|((sink, rule), ids)| Batch { sink, rule, ids })
            .collect()
    }

    /// The alerts of a batch as they are now (gone ones left out).
    pub fn alerts_of(&self, b: &Batch) -> Vec<Alert> {
        b.ids
            .iter()
            .filter_map(|id| self.alerts.get(id).cloned())
            .collect()
    }

    /// The sink took the batch; `told` is the state each alert had when it was sent.
    pub fn delivered(&mut self, sink: &str, told: &[(String, AlertState)], now_ms: u64) {
        for (id, state) in told {
            let Some(a) = self.alerts.get_mut(id) else {
                continue;
            };
            let still_current = a.state == *state;
            if let Some(d) = a.deliveries.get_mut(sink) {
                d.told = Some(*state);
                d.delivered_at_ms = Some(now_ms);
                d.last_error = None;
                d.attempts += 1;
                if still_current {
                    d.state = DeliveryState::Delivered;
                }
                // Resolved while the firing notification was in flight: stay pending,
                // the resolution goes next.
            }
        }
    }

    /// The sink refused or could not be reached: back off, or give up past the limit.
    pub fn failed(&mut self, sink: &str, ids: &[String], error: &str, now_ms: u64) {
        for id in ids {
            let Some(d) = self
                .alerts
                .get_mut(id)
                .and_then(|a| a.deliveries.get_mut(sink))
            else {
                continue;
            };
            d.attempts += 1;
            d.last_error = Some(cut(error));
            if d.attempts >= MAX_ATTEMPTS {
                d.state = DeliveryState::Failed;
            } else {
                d.state = DeliveryState::Pending;
                d.next_attempt_ms = now_ms + backoff_ms(d.attempts);
            }
        }
    }

    /// Pending deliveries, for the gauge.
    pub fn pending(&self) -> usize {
        self.alerts
            .values()
            .flat_map(|a| a.deliveries.values())
            .filter(|d| d.state == DeliveryState::Pending)
            .count()
    }
}

fn finished(a: &Alert) -> bool {
    a.state == AlertState::Resolved
        && a.deliveries
            .values()
            .all(|d| d.state != DeliveryState::Pending)
}

/// 1 s, 2 s, 4 s, ... up to five minutes.
pub fn backoff_ms(attempts: u32) -> u64 {
    FIRST_BACKOFF_MS
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(20))
        .min(MAX_BACKOFF_MS)
}

/// A token bucket per sink: at most `per_minute` notifications a minute, bursts up to
/// the same number. Over it, notifications wait (they stay pending), never dropped.
#[derive(Debug, Clone)]
pub struct RateLimit {
    per_minute: u32,
    tokens: f64,
    at_ms: u64,
}

impl RateLimit {
    pub fn new(per_minute: u32, now_ms: u64) -> Self {
        Self {
            per_minute: per_minute.max(1),
            tokens: f64::from(per_minute.max(1)),
            at_ms: now_ms,
        }
    }

    pub fn try_take(&mut self, now_ms: u64) -> bool {
        let cap = f64::from(self.per_minute);
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64;
        self.tokens = (self.tokens + elapsed * cap / 60_000.0).min(cap);
        self.at_ms = now_ms;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raise(id: &str, rule: &str, sinks: &[&str], resolve_after: Option<u64>) -> Raise {
        Raise {
            id: id.into(),
            rule: rule.into(),
            severity: Severity::Warning,
            summary: format!("alert {id}"),
            labels: BTreeMap::new(),
            sinks: sinks.iter().map(|s| s.to_string()).collect(),
            group_wait_ms: 1_000,
            resolve_after_ms: resolve_after,
        }
    }

    #[test]
    fn a_repeat_while_firing_is_counted_not_sent_again() {
        let mut o = Outbox::default();
        assert!(o.raise(raise("a", "r", &["s"], Some(60_000)), 0));
        assert!(
            o.due(500, |_| None).is_empty(),
            "the group wait holds it back"
        );
        let due = o.due(1_000, |_| None);
        assert_eq!(due.len(), 1);
        o.delivered("s", &[("a".into(), AlertState::Firing)], 1_000);
        assert!(!o.raise(raise("a", "r", &["s"], Some(60_000)), 2_000));
        assert_eq!(o.alerts["a"].count, 2);
        assert!(o.due(3_000, |_| None).is_empty());
        // Auto-resolution counts from the last repeat, then the resolution is due.
        assert!(!o.advance(61_000));
        assert!(o.advance(62_000));
        assert_eq!(o.alerts["a"].state, AlertState::Resolved);
        assert_eq!(o.due(62_000, |_| None).len(), 1);
        // Raised again after resolving: a new notification.
        o.delivered("s", &[("a".into(), AlertState::Resolved)], 62_000);
        assert!(o.raise(raise("a", "r", &["s"], None), 70_000));
    }

    #[test]
    fn alerts_of_one_rule_go_in_one_notification_per_sink() {
        let mut o = Outbox::default();
        o.raise(raise("a", "r1", &["s", "t"], None), 0);
        o.raise(raise("b", "r1", &["s", "t"], None), 100);
        o.raise(raise("c", "r2", &["s"], None), 100);
        let due = o.due(2_000, |_| None);
        assert_eq!(
            due,
            vec![
                Batch {
                    sink: "s".into(),
                    rule: "r1".into(),
                    ids: vec!["a".into(), "b".into()]
                },
                Batch {
                    sink: "s".into(),
                    rule: "r2".into(),
                    ids: vec!["c".into()]
                },
                Batch {
                    sink: "t".into(),
                    rule: "r1".into(),
                    ids: vec!["a".into(), "b".into()]
                },
            ]
        );
    }

    #[test]
    fn failures_back_off_exponentially_and_give_up_at_the_limit() {
        let mut o = Outbox::default();
        o.raise(raise("a", "r", &["s"], None), 0);
        o.failed("s", &["a".into()], "503 Service Unavailable", 1_000);
        let d = &o.alerts["a"].deliveries["s"];
        assert_eq!((d.attempts, d.next_attempt_ms), (1, 2_000));
        assert_eq!(d.last_error.as_deref(), Some("503 Service Unavailable"));
        o.failed("s", &["a".into()], "x", 2_000);
        assert_eq!(o.alerts["a"].deliveries["s"].next_attempt_ms, 4_000);
        assert_eq!(backoff_ms(30), MAX_BACKOFF_MS);
        for _ in 2..MAX_ATTEMPTS {
            o.failed("s", &["a".into()], "x", 5_000);
        }
        assert_eq!(o.alerts["a"].deliveries["s"].state, DeliveryState::Failed);
        assert!(o.due(u64::MAX / 2, |_| None).is_empty());
    }

    #[test]
    fn firing_alerts_are_resent_to_sinks_that_want_it() {
        let mut o = Outbox::default();
        o.raise(raise("a", "r", &["am", "hook"], None), 0);
        o.delivered("am", &[("a".into(), AlertState::Firing)], 1_000);
        o.delivered("hook", &[("a".into(), AlertState::Firing)], 1_000);
        let resend = |s: &str| (s == "am").then_some(60_000);
        assert!(o.due(60_999, resend).is_empty());
        let due = o.due(61_000, resend);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].sink, "am");
    }

    #[test]
    fn resolving_during_a_firing_send_keeps_the_resolution_pending() {
        let mut o = Outbox::default();
        o.raise(raise("a", "r", &["s"], None), 0);
        o.delivered("s", &[("a".into(), AlertState::Firing)], 1_000);
        o.raise(raise("b", "r", &["s"], None), 0);
        o.resolve("b", 1_500);
        o.delivered("s", &[("b".into(), AlertState::Firing)], 2_000);
        assert_eq!(o.alerts["b"].deliveries["s"].state, DeliveryState::Pending);
        assert!(o.resolve("a", 3_000));
        assert_eq!(
            o.due(3_000, |_| None)[0].ids,
            vec!["a".to_string(), "b".to_string()]
        );
    }

    #[test]
    fn the_outbox_keeps_a_bounded_number_of_alerts() {
        let mut o = Outbox::default();
        for i in 0..(MAX_ALERTS + 10) {
            o.raise(raise(&format!("{i:04}"), "r", &[], None), i as u64);
        }
        assert_eq!(o.alerts.len(), MAX_ALERTS);
        assert!(!o.alerts.contains_key("0000"));
    }

    #[test]
    fn the_rate_limit_lets_a_burst_through_then_one_per_interval() {
        let mut r = RateLimit::new(2, 0);
        assert!(r.try_take(0) && r.try_take(0));
        assert!(!r.try_take(1_000));
        assert!(r.try_take(30_000));
    }

    #[test]
    fn ids_are_stable_and_distinguish_their_parts() {
        assert_eq!(alert_id(&["a", "b"]), alert_id(&["a", "b"]));
        assert_ne!(alert_id(&["ab", ""]), alert_id(&["a", "b"]));
    }
}
