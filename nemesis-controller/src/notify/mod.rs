//! Alerts out: AlertRules (a CRD) turn what the core reports (scales, wakes,
//! transitions, metric samples, policy validity, agents) into alerts; an outbox kept in a
//! Secret delivers them to the administrator's sinks with deduplication, grouping, rate
//! limits and retries, and the next leader carries on where a crashed one stopped.
//!
//! - [`rule`]: the CRD and its validation; [`evaluate`]: signal -> raise/resolve;
//! - [`outbox`]: alert and delivery state (pure, virtual time);
//! - [`sinks`], [`smtp`]: the configured sinks and how each is sent to;
//! - [`Notifier`] (here): the running service; [`NotifyTap`]: the core's handle.
//!
//! Only the leader evaluates, delivers and writes the outbox; a standby reloads it now
//! and then so its UI shows the same alerts. Nothing here scales or decides for a policy.

pub mod evaluate;
pub mod outbox;
pub mod rule;
pub mod sinks;
pub mod smtp;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::agents::AgentRegistry;
use crate::metrics::{ControllerMetrics, DeliveryOutcome, ErrorKind};
use crate::store::{PolicyId, unix_ms};
use evaluate::{Action, Memory, Signal};
use outbox::{AlertState, Outbox, RateLimit};
use rule::{AlertRule, CompiledRule};
use sinks::{Sender, SinkSpec};

pub const DEFAULT_OUTBOX_SECRET: &str = "nemesis-alert-outbox";
/// The key of the outbox JSON in its Secret.
pub const OUTBOX_KEY: &str = "outbox.json";
/// Signals waiting for the service; samples of every policy each interval plus events.
const TAP_QUEUE: usize = 8 * 1024;
/// Deliveries, retries and auto-resolutions are looked at this often.
const TICK: Duration = Duration::from_secs(1);
/// A standby re-reads the outbox this often, for its UI.
const STANDBY_RELOAD: Duration = Duration::from_secs(5);
/// One Secret read or write.
const API_TIMEOUT: Duration = Duration::from_secs(10);

// === the core's handle ===

/// What the core holds to report signals; a no-op without a notifier. Never blocks: a
/// full queue drops the signal (counted as a store error would be, logged at debug).
#[derive(Clone, Debug, Default)]
pub struct NotifyTap {
    tx: Option<mpsc::Sender<Signal>>,
}

impl NotifyTap {
    pub fn send(&self, s: Signal) {
        if let Some(tx) = &self.tx
            && tx.try_send(s).is_err()
        {
            tracing::debug!("notify queue full; a signal was dropped");
        }
    }
}

// === where the outbox is kept ===

type BoxFut<'a, T> = futures::future::BoxFuture<'a, T>;

/// Keeps the outbox across restarts and leaders (a Secret; tests may keep it in memory).
pub trait OutboxStore: Send + Sync {
    fn load(&self) -> BoxFut<'_, Result<Option<Outbox>, String>>;
    fn save<'a>(&'a self, json: &'a [u8]) -> BoxFut<'a, Result<(), String>>;
}

/// The outbox in a Secret's `outbox.json`. Only the leader writes; a write races a
/// deposed leader's late one at most, and the next leader's state wins.
pub struct SecretOutbox {
    api: Api<Secret>,
    name: String,
}

impl SecretOutbox {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
        }
    }

    async fn get(&self) -> Result<Option<Secret>, String> {
        tokio::time::timeout(API_TIMEOUT, self.api.get_opt(&self.name))
            .await
            .map_err(|_| format!("reading Secret {}: timed out", self.name))?
            .map_err(|e| format!("reading Secret {}: {e}", self.name))
    }
}

impl OutboxStore for SecretOutbox {
    fn load(&self) -> BoxFut<'_, Result<Option<Outbox>, String>> {
        Box::pin(async move {
            let Some(secret) = self.get().await? else {
                return Ok(None);
            };
            let Some(data) = secret.data.as_ref().and_then(|d| d.get(OUTBOX_KEY)) else {
                return Ok(None);
            };
            serde_json::from_slice(&data.0)
                .map(Some)
                .map_err(|e| format!("Secret {} key {OUTBOX_KEY}: not an outbox: {e}", self.name))
        })
    }

    fn save<'a>(&'a self, json: &'a [u8]) -> BoxFut<'a, Result<(), String>> {
        Box::pin(async move {
            let data = BTreeMap::from([(OUTBOX_KEY.to_string(), ByteString(json.to_vec()))]);
            let existing = self.get().await?;
            let mut secret = Secret {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/part-of".to_string(),
                        "nemesis".to_string(),
                    )])),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                type_: Some("Opaque".into()),
                ..Secret::default()
            };
            let call = async {
                match existing {
                    Some(old) => {
                        secret.metadata.resource_version = old.resource_version();
                        self.api
                            .replace(&self.name, &PostParams::default(), &secret)
                            .await
                    }
                    None => self.api.create(&PostParams::default(), &secret).await,
                }
            };
            tokio::time::timeout(API_TIMEOUT, call)
                .await
                .map_err(|_| format!("writing Secret {}: timed out", self.name))?
                .map(drop)
                .map_err(|e| format!("writing Secret {}: {e}", self.name))
        })
    }
}

// === scheduled reports ===

/// Builds a report for a scheduled delivery (the UI's report code over the store).
pub trait ReportSource: Send + Sync {
    fn build<'a>(
        &'a self,
        namespace: Option<&'a str>,
        policy: Option<&'a str>,
        from_ms: u64,
        to_ms: u64,
    ) -> BoxFut<'a, Result<crate::reports::Report, String>>;
}

/// A failed scheduled report is tried again this much later.
const REPORT_RETRY_MS: u64 = 30_000;

type Scheduled = (
    sinks::ReportSchedule,
    crate::policy::schedule::Schedule,
    u64,
);

// === what the UI reads ===

/// Delivery counters of one sink since this instance started.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkCounters {
    pub delivered: u64,
    pub failed: u64,
    pub rate_limited: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_delivered_at_ms: Option<u64>,
}

/// A sink as the API shows it: never its secrets.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkView {
    pub name: String,
    pub kind: &'static str,
    pub target: String,
    pub rate_limit_per_minute: u32,
    pub counters: SinkCounters,
}

/// Why an acknowledgement was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckError {
    NotFound,
    /// This instance is a standby: its copy is read-only.
    NotLeader,
}

/// The shared view of the notifier: the UI reads it, acknowledges through it.
#[derive(Clone)]
pub struct NotifyHandle {
    outbox: Arc<Mutex<Outbox>>,
    sinks: Arc<Vec<SinkSpec>>,
    counters: Arc<Mutex<BTreeMap<String, SinkCounters>>>,
    dirty: Arc<AtomicBool>,
    leading: watch::Receiver<bool>,
}

impl NotifyHandle {
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    pub fn alerts(&self) -> Vec<outbox::Alert> {
        let o = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<outbox::Alert> = o.alerts.values().cloned().collect();
        all.sort_by(|a, b| b.last_seen_ms.cmp(&a.last_seen_ms).then(a.id.cmp(&b.id)));
        all
    }

    pub fn sinks(&self) -> Vec<SinkView> {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        self.sinks
            .iter()
            .map(|s| SinkView {
                name: s.name.clone(),
                kind: s.kind.as_str(),
                target: s.target(),
                rate_limit_per_minute: s.rate_limit(),
                counters: counters.get(&s.name).cloned().unwrap_or_default(),
            })
            .collect()
    }

    /// Marks an alert acknowledged by `user` (persisted with the next outbox write).
    pub fn acknowledge(&self, id: &str, user: &str) -> Result<outbox::Alert, AckError> {
        if !*self.leading.borrow() {
            return Err(AckError::NotLeader);
        }
        let mut o = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        let a = o
            .acknowledge(id, user, now_ms())
            .cloned()
            .ok_or(AckError::NotFound)?;
        self.dirty.store(true, Ordering::SeqCst);
        Ok(a)
    }
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

// === the service ===

/// Everything the notifier needs; build with [`Notifier::new`], run with [`Notifier::run`].
pub struct Notifier {
    handle: NotifyHandle,
    rx: mpsc::Receiver<Signal>,
    store: Box<dyn OutboxStore>,
    sender: Sender,
    metrics: ControllerMetrics,
    registry: Option<Arc<AgentRegistry>>,
    rules: RuleSource,
    limits: HashMap<String, RateLimit>,
    memory: Memory,
    lost_agents: BTreeSet<String>,
    loaded: bool,
    last_saved: Vec<u8>,
    schedules: Vec<Scheduled>,
    report_source: Option<Arc<dyn ReportSource>>,
    /// `<schedule>/<sink>` -> not before (after a failure).
    report_retry: HashMap<String, u64>,
}

/// Where rules come from: a cluster watch, or a fixed list (tests).
pub enum RuleSource {
    Watch {
        store: reflector::Store<AlertRule>,
        client: Client,
        /// (uid, generation) -> what its status says now.
        statused: HashMap<(String, i64), bool>,
    },
    Fixed(Vec<CompiledRule>),
}

impl RuleSource {
    /// Watches every AlertRule; the returned future feeds the cache (run it until stop).
    pub fn watch(
        client: Client,
        stop: CancellationToken,
    ) -> (Self, impl std::future::Future<Output = ()> + Send) {
        let (store, writer) = reflector::store();
        let api = Api::<AlertRule>::all(client.clone());
        let feed = async move {
            let stream =
                reflector::reflector(writer, watcher::watcher(api, watcher::Config::default()))
                    .default_backoff();
            futures::pin_mut!(stream);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = stream.next() => match ev {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => tracing::warn!(err = %e, "watching AlertRules failed; retrying"),
                        None => return,
                    },
                }
            }
        };
        (
            RuleSource::Watch {
                store,
                client,
                statused: HashMap::new(),
            },
            feed,
        )
    }
}

impl Notifier {
    /// The service, its handle for the UI and the tap for the core.
    pub fn new(
        sinks: Vec<SinkSpec>,
        store: Box<dyn OutboxStore>,
        rules: RuleSource,
        sender: Sender,
        metrics: ControllerMetrics,
        registry: Option<Arc<AgentRegistry>>,
        leading: watch::Receiver<bool>,
    ) -> (Self, NotifyHandle, NotifyTap) {
        let (tx, rx) = mpsc::channel(TAP_QUEUE);
        let handle = NotifyHandle {
            outbox: Arc::new(Mutex::new(Outbox::default())),
            counters: Arc::new(Mutex::new(
                sinks
                    .iter()
                    .map(|s| (s.name.clone(), SinkCounters::default()))
                    .collect(),
            )),
            sinks: Arc::new(sinks),
            dirty: Arc::new(AtomicBool::new(false)),
            leading,
        };
        let n = Self {
            handle: handle.clone(),
            rx,
            store,
            sender,
            metrics,
            registry,
            rules,
            limits: HashMap::new(),
            memory: Memory::default(),
            lost_agents: BTreeSet::new(),
            loaded: false,
            last_saved: Vec::new(),
            schedules: Vec::new(),
            report_source: None,
            report_retry: HashMap::new(),
        };
        (n, handle, NotifyTap { tx: Some(tx) })
    }

    fn leading(&self) -> bool {
        *self.handle.leading.borrow()
    }

    /// Sends `schedules`' reports, built by `source`.
    pub fn with_reports(
        mut self,
        schedules: Vec<Scheduled>,
        source: Arc<dyn ReportSource>,
    ) -> Self {
        self.schedules = schedules;
        self.report_source = Some(source);
        self
    }

    /// Each schedule's latest firing goes to every sink that has not had it. A schedule
    /// seen for the first time starts from its next firing (no report for the past).
    async fn scheduled_reports(&mut self, now: u64) {
        let Some(source) = self.report_source.clone() else {
            return;
        };
        let now_utc = chrono::DateTime::<chrono::Utc>::from(crate::store::from_unix_ms(now));
        for (r, schedule, window) in self.schedules.clone() {
            let Some(at) = schedule.last_at_or_before(now_utc) else {
                continue;
            };
            let at_ms = u64::try_from(at.timestamp_millis()).unwrap_or(0);
            let mut due = Vec::new();
            {
                let mut o = self.lock();
                for sink in &r.sinks {
                    let key = format!("{}/{sink}", r.name);
                    match o.reports_sent.get(&key) {
                        None => {
                            o.reports_sent.insert(key, at_ms);
                        }
                        Some(last) if *last >= at_ms => {}
                        Some(_) => {
                            if self.report_retry.get(&key).is_none_or(|t| *t <= now) {
                                due.push((sink.clone(), key));
                            }
                        }
                    }
                }
            }
            if due.is_empty() {
                continue;
            }
            let from = at_ms.saturating_sub(window);
            let report = match source
                .build(r.namespace.as_deref(), r.policy.as_deref(), from, at_ms)
                .await
            {
                Ok(rep) => rep,
                Err(e) => {
                    tracing::warn!(schedule = %r.name, err = %e, "building a scheduled report failed; retrying");
                    for (_, key) in due {
                        self.report_retry.insert(key, now + REPORT_RETRY_MS);
                    }
                    continue;
                }
            };
            let title = format!(
                "Nemesis report {}: {} to {}",
                r.name,
                chrono::DateTime::<chrono::Utc>::from(crate::store::from_unix_ms(from))
                    .format("%Y-%m-%d %H:%M UTC"),
                at.format("%Y-%m-%d %H:%M UTC")
            );
            for (sink, key) in due {
                let Some(spec) = self.handle.sinks.iter().find(|s| s.name == sink).cloned() else {
                    continue;
                };
                match self.sender.send_report(&spec, &title, &report, now).await {
                    Ok(()) => {
                        self.lock().reports_sent.insert(key.clone(), at_ms);
                        self.report_retry.remove(&key);
                        self.metrics
                            .alert_delivery(&sink, DeliveryOutcome::Delivered);
                        self.count(&sink, |c| {
                            c.delivered += 1;
                            c.last_delivered_at_ms = Some(now_ms());
                        });
                        tracing::info!(schedule = %r.name, %sink, "scheduled report delivered");
                    }
                    Err(e) => {
                        self.report_retry.insert(key, now + REPORT_RETRY_MS);
                        self.metrics.alert_delivery(&sink, DeliveryOutcome::Failed);
                        self.count(&sink, |c| {
                            c.failed += 1;
                            c.last_error = Some(e.0.clone());
                        });
                        tracing::warn!(schedule = %r.name, %sink, err = %e, "sending a scheduled report failed; retrying");
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.handle.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reload = tokio::time::Instant::now() - STANDBY_RELOAD;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                sig = self.rx.recv() => {
                    let Some(sig) = sig else { return };
                    if self.leading() && self.ensure_loaded().await {
                        self.on_signal(sig).await;
                        // Persisted before any delivery attempt: a crash from here on
                        // still leaves the alert to the next leader.
                        self.save().await;
                    }
                }
                _ = tick.tick() => {
                    if self.leading() {
                        if self.ensure_loaded().await {
                            self.on_tick().await;
                        }
                    } else {
                        self.loaded = false;
                        if last_reload.elapsed() >= STANDBY_RELOAD {
                            last_reload = tokio::time::Instant::now();
                            if let Ok(Some(o)) = self.store.load().await {
                                *self.lock() = o;
                            }
                        }
                    }
                }
            }
        }
    }

    /// On taking the lead: the outbox as the last leader left it.
    async fn ensure_loaded(&mut self) -> bool {
        if self.loaded {
            return true;
        }
        match self.store.load().await {
            Ok(stored) => {
                let stored = stored.unwrap_or_default();
                let n = stored.alerts.len();
                self.last_saved = serde_json::to_vec(&stored).unwrap_or_default();
                *self.lock() = stored;
                self.loaded = true;
                self.lost_agents.clear();
                tracing::info!(
                    alerts = n,
                    "alert outbox loaded; delivering what is pending"
                );
                true
            }
            Err(e) => {
                self.metrics.error(ErrorKind::KubeApi);
                tracing::warn!(err = %e, "loading the alert outbox failed; retrying");
                false
            }
        }
    }

    fn rules(&mut self) -> Vec<CompiledRule> {
        match &self.rules {
            RuleSource::Fixed(r) => r.clone(),
            RuleSource::Watch { store, .. } => store
                .state()
                .iter()
                .filter_map(|r| rule::compile(r).ok())
                .collect(),
        }
    }

    async fn on_signal(&mut self, sig: Signal) {
        let rules = self.rules();
        let all: Vec<String> = self.handle.sinks.iter().map(|s| s.name.clone()).collect();
        let actions = evaluate::evaluate(&rules, &all, &sig, &mut self.memory, now_ms());
        self.apply(actions);
    }

    fn apply(&mut self, actions: Vec<Action>) {
        if actions.is_empty() {
            return;
        }
        let now = now_ms();
        let mut raised = 0;
        {
            let mut o = self.lock();
            for a in actions {
                match a {
                    Action::Raise(r) => {
                        let summary = r.summary.clone();
                        if o.raise(r, now) {
                            raised += 1;
                            tracing::info!(%summary, "alert raised");
                        }
                    }
                    Action::Resolve(id) => {
                        if o.resolve(&id, now) {
                            tracing::info!(%id, "alert resolved");
                        }
                    }
                }
            }
        }
        for _ in 0..raised {
            self.metrics.alert_raised();
        }
    }

    async fn on_tick(&mut self) {
        self.write_rule_statuses().await;
        self.check_agents();
        let now = now_ms();
        self.lock().advance(now);
        self.save().await;
        self.deliver(now).await;
        self.scheduled_reports(now).await;
        self.save().await;
        let pending = self.lock().pending();
        self.metrics.set_alert_outbox_pending(pending);
    }

    /// Lost agents (lease expired, not yet forgotten) raise; returning ones resolve.
    fn check_agents(&mut self) {
        let Some(reg) = &self.registry else { return };
        let agents = reg.agents(tokio::time::Instant::now());
        let lost: BTreeSet<String> = agents
            .iter()
            .filter(|a| !a.live)
            .map(|a| a.node.clone())
            .collect();
        let mut signals = Vec::new();
        for n in lost.difference(&self.lost_agents) {
            signals.push(Signal::AgentLost { node: n.clone() });
        }
        for n in self.lost_agents.difference(&lost) {
            signals.push(Signal::AgentBack { node: n.clone() });
        }
        self.lost_agents = lost;
        let rules = self.rules();
        let all: Vec<String> = self.handle.sinks.iter().map(|s| s.name.clone()).collect();
        for s in signals {
            let actions = evaluate::evaluate(&rules, &all, &s, &mut self.memory, now_ms());
            self.apply(actions);
        }
    }

    /// Writes the outbox when it changed since the last write.
    async fn save(&mut self) {
        let json = serde_json::to_vec(&*self.lock()).unwrap_or_default();
        self.handle.dirty.store(false, Ordering::SeqCst);
        if json == self.last_saved {
            return;
        }
        match self.store.save(&json).await {
            Ok(()) => self.last_saved = json,
            Err(e) => {
                self.handle.dirty.store(true, Ordering::SeqCst);
                self.metrics.error(ErrorKind::KubeApi);
                tracing::warn!(err = %e, "writing the alert outbox failed; retrying");
            }
        }
    }

    /// Sends what is due, each sink's notifications at once, sinks side by side.
    async fn deliver(&mut self, now: u64) {
        let sinks = self.handle.sinks.clone();
        let by_name: HashMap<&str, &SinkSpec> =
            sinks.iter().map(|s| (s.name.as_str(), s)).collect();
        let due = self
            .lock()
            .due(now, |s| by_name.get(s).and_then(|k| k.resend_ms()));
        if due.is_empty() {
            return;
        }
        let mut sends = Vec::new();
        for batch in due {
            let Some(spec) = by_name.get(batch.sink.as_str()) else {
                // A sink removed from the file: nothing will ever deliver there.
                self.lock().failed(
                    &batch.sink,
                    &batch.ids,
                    "no sink of this name is configured",
                    now,
                );
                continue;
            };
            let limit = self
                .limits
                .entry(batch.sink.clone())
                .or_insert_with(|| RateLimit::new(spec.rate_limit(), now));
            if !limit.try_take(now) {
                self.metrics
                    .alert_delivery(&batch.sink, DeliveryOutcome::RateLimited);
                self.count(&batch.sink, |c| c.rate_limited += 1);
                continue;
            }
            let alerts = self.lock().alerts_of(&batch);
            let sender = self.sender.clone();
            let spec = (*spec).clone();
            sends.push(async move {
                let r = sender.send(&spec, &batch.rule, &alerts, now).await;
                (batch, alerts, r)
            });
        }
        for (batch, alerts, result) in futures::future::join_all(sends).await {
            let done = now_ms();
            match result {
                Ok(()) => {
                    let told: Vec<(String, AlertState)> =
                        alerts.iter().map(|a| (a.id.clone(), a.state)).collect();
                    self.lock().delivered(&batch.sink, &told, done);
                    self.metrics
                        .alert_delivery(&batch.sink, DeliveryOutcome::Delivered);
                    self.count(&batch.sink, |c| {
                        c.delivered += 1;
                        c.last_delivered_at_ms = Some(done);
                    });
                    tracing::info!(sink = %batch.sink, rule = %batch.rule, alerts = alerts.len(), "alerts delivered");
                }
                Err(e) => {
                    self.lock().failed(&batch.sink, &batch.ids, &e.0, done);
                    self.metrics
                        .alert_delivery(&batch.sink, DeliveryOutcome::Failed);
                    self.count(&batch.sink, |c| {
                        c.failed += 1;
                        c.last_error = Some(e.0.clone());
                    });
                    tracing::warn!(sink = %batch.sink, rule = %batch.rule, err = %e, "delivering alerts failed; retrying with backoff");
                }
            }
        }
    }

    fn count(&self, sink: &str, f: impl FnOnce(&mut SinkCounters)) {
        let mut c = self
            .handle
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f(c.entry(sink.to_string()).or_default());
    }

    /// Each rule's `Ready` condition says whether it is valid, with every problem.
    async fn write_rule_statuses(&mut self) {
        let RuleSource::Watch {
            store,
            client,
            statused,
        } = &mut self.rules
        else {
            return;
        };
        for r in store.state() {
            let key = (
                r.uid().unwrap_or_default(),
                r.metadata.generation.unwrap_or(0),
            );
            let result = rule::compile(&r);
            let ok = result.is_ok();
            let current = r.status.as_ref().is_some_and(|s| {
                s.observed_generation == r.metadata.generation
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && (c.status == "True") == ok)
            });
            if current || statused.get(&key) == Some(&ok) {
                continue;
            }
            let (status, reason, message) = match &result {
                Ok(_) => ("True", "Valid", "the rule is evaluated".to_string()),
                Err(problems) => (
                    "False",
                    "Invalid",
                    problems
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            };
            let patch = serde_json::json!({"status": rule::AlertRuleStatus {
                observed_generation: r.metadata.generation,
                conditions: vec![Condition {
                    type_: "Ready".into(),
                    status: status.into(),
                    reason: reason.into(),
                    message,
                    observed_generation: r.metadata.generation,
                    last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
                }],
            }});
            let api: Api<AlertRule> =
                Api::namespaced(client.clone(), &r.namespace().unwrap_or_default());
            let name = r.name_any();
            let params = PatchParams::default();
            let merge = Patch::Merge(&patch);
            let call = api.patch_status(&name, &params, &merge);
            match tokio::time::timeout(API_TIMEOUT, call).await {
                Ok(Ok(_)) => {
                    statused.insert(key, ok);
                }
                Ok(Err(e)) => {
                    self.metrics.error(ErrorKind::KubeApi);
                    tracing::warn!(rule = %r.name_any(), err = %e, "writing an AlertRule status failed");
                }
                Err(_) => {
                    tracing::warn!(rule = %r.name_any(), "writing an AlertRule status timed out")
                }
            }
        }
    }
}

/// The signal a history record carries, if any.
pub fn signal_of(item: &crate::reconcile::history::Item) -> Option<Signal> {
    use crate::reconcile::history::Item;
    Some(match item {
        Item::Transition(t) => Signal::Transition {
            policy: t.policy.clone(),
            from: t.from_state.clone(),
            to: t.to_state.clone(),
            reason: t.reason.clone(),
        },
        // The previous leader made it and signalled it when it did (the record is what
        // its kill lost); rules must not see one change twice.
        Item::Scale(s) if s.recovered => return None,
        Item::Scale(s) => Signal::Scaled {
            policy: s.policy.clone(),
            from: s.from_replicas,
            to: s.to_replicas,
            reason: s.reason.clone(),
        },
        Item::ColdStart(c) => Signal::ColdStart {
            policy: c.policy.clone(),
            time_to_ready_ms: c.time_to_ready_ms,
            outcome: c.outcome.clone(),
            held: c.held_connections,
        },
        Item::Samples { policy, values, .. } => Signal::Samples {
            policy: policy.clone(),
            values: values.iter().cloned().collect(),
        },
    })
}

/// For tests and the core: a policy's validity as a signal.
pub fn validity(policy: PolicyId, error: Option<String>) -> Signal {
    match error {
        Some(message) => Signal::PolicyInvalid { policy, message },
        None => Signal::PolicyValid { policy },
    }
}
