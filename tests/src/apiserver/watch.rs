//! Watches: the bounded event history (resume from a resourceVersion, `410 Expired` when
//! it is too old) and the task that streams one watch as JSON lines (ADDED, MODIFIED,
//! DELETED, BOOKMARK, ERROR) with selector-aware translation and a timeout, holding its
//! events back while a test's [`EventHold`] covers it. It reads events; it never writes
//! objects.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::registry::StoreKey;
use super::status::ApiError;

/// How many events a lagging watcher may fall behind before it is cut off (it then
/// resumes from its last resourceVersion, or relists on `410`).
const BROADCAST_CAPACITY: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug)]
pub struct StoredEvent {
    pub rv: u64,
    pub key: StoreKey,
    pub etype: EventType,
    pub object: Value,
    /// The object before a `Modified`, so selector watches can see it leave or enter.
    pub old: Option<Value>,
}

pub struct EventLog {
    buf: VecDeque<Arc<StoredEvent>>,
    cap: usize,
    /// The highest resourceVersion no longer in `buf`: a watch from an older one is `410`.
    evicted_upto: u64,
    tx: broadcast::Sender<Arc<StoredEvent>>,
}

impl EventLog {
    pub fn new(cap: usize) -> Self {
        EventLog {
            buf: VecDeque::new(),
            cap: cap.max(1),
            evicted_upto: 0,
            tx: broadcast::channel(BROADCAST_CAPACITY).0,
        }
    }

    pub fn push(&mut self, ev: StoredEvent) {
        let ev = Arc::new(ev);
        if self.buf.len() == self.cap
            && let Some(old) = self.buf.pop_front()
        {
            self.evicted_upto = old.rv;
        }
        self.buf.push_back(ev.clone());
        // No receiver is fine: nobody watches.
        let _ = self.tx.send(ev);
    }

    /// Events after `rv`, or `410 Expired` when some of them were already forgotten.
    pub fn since(&self, rv: u64, current: u64) -> Result<Vec<Arc<StoredEvent>>, ApiError> {
        if rv < self.evicted_upto {
            return Err(ApiError::gone(format!(
                "too old resource version: {rv} ({})",
                self.evicted_upto + 1
            )));
        }
        if rv > current {
            let mut e = ApiError::timeout(format!(
                "Too large resource version: {rv}, current: {current}"
            ));
            e.details = Some(Box::new(super::status::Details {
                causes: vec![super::status::Cause {
                    reason: "ResourceVersionTooLarge",
                    field: String::new(),
                    message: "Too large resource version".into(),
                }],
                ..Default::default()
            }));
            e.retry_after = Some(1);
            return Err(e);
        }
        Ok(self.buf.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.tx.subscribe()
    }

    /// Forget all history up to `current` (like an etcd compaction).
    pub fn compact(&mut self, current: u64) {
        self.buf.clear();
        self.evicted_upto = current;
    }
}

/// A fault: the watches of one resource (by some users) stop delivering events, which
/// queue and are delivered in order once the hold ends, as a lagging cache or a slow
/// watch connection shows a client an old world while writes go on. Lists and gets
/// still see the store as it is; bookmarks wait too (they would skip the held events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventHold {
    /// The resource, as `(group, plural)`.
    pub key: StoreKey,
    /// Only watches by these users (exact names as authenticated); empty: everybody's.
    pub users: Vec<String>,
}

/// Whether one watch is held back now: the hold switch and who is watching.
pub struct HoldWatch {
    pub user: String,
    pub rx: tokio::sync::watch::Receiver<Option<EventHold>>,
}

impl HoldWatch {
    fn holds(&self, key: &StoreKey) -> bool {
        self.rx
            .borrow()
            .as_ref()
            .is_some_and(|h| h.key == *key && (h.users.is_empty() || h.users.contains(&self.user)))
    }
}

/// Renders a stored object in the form the watcher asked for (version, Table).
pub type Render = Box<dyn Fn(&Value) -> Value + Send + Sync>;
/// Whether an object is in the watcher's namespace and selectors.
pub type Filter = Box<dyn Fn(&Value) -> bool + Send + Sync>;

pub struct WatchSpec {
    pub key: StoreKey,
    pub filter: Filter,
    pub render: Render,
    /// apiVersion and kind for BOOKMARK objects.
    pub api_version: String,
    pub kind: String,
    pub bookmarks: bool,
    pub bookmark_interval: Duration,
    pub timeout: Duration,
    /// Synthetic ADDED events sent first (watch from "0"/unset, or sendInitialEvents).
    pub initial: Vec<Value>,
    /// After `initial`, send the `k8s.io/initial-events-end` bookmark.
    pub initial_events_end: bool,
    pub start_rv: u64,
}

fn line(etype: &str, object: Value) -> Bytes {
    let mut s = json!({"type": etype, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

/// The single ERROR event a watch sends when it cannot start (e.g. `410`).
pub fn error_line(e: &ApiError) -> Bytes {
    line("ERROR", e.to_status())
}

fn bookmark(spec: &WatchSpec, rv: u64, initial_end: bool) -> Bytes {
    let mut md = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        json!({"kind": spec.kind, "apiVersion": spec.api_version, "metadata": md}),
    )
}

/// The watch event (if any) a watcher with `spec`'s filter sees for `ev`.
fn translate(spec: &WatchSpec, ev: &StoredEvent) -> Option<(&'static str, Value)> {
    if ev.key != spec.key {
        return None;
    }
    let now = (spec.filter)(&ev.object);
    let etype = match ev.etype {
        EventType::Added => now.then_some("ADDED")?,
        EventType::Deleted => now.then_some("DELETED")?,
        EventType::Modified => match (ev.old.as_ref().is_some_and(|o| (spec.filter)(o)), now) {
            (true, true) => "MODIFIED",
            (false, true) => "ADDED",
            (true, false) => "DELETED",
            (false, false) => return None,
        },
    };
    Some((etype, (spec.render)(&ev.object)))
}

/// Stream one watch into `out` until the timeout, cancellation, a lagging receiver, or
/// the client going away; while `hold` covers it, events queue instead (dropped if the
/// watch ends first: its client resumes from the last version it was sent).
pub async fn run(
    spec: WatchSpec,
    backlog: Vec<Arc<StoredEvent>>,
    mut rx: broadcast::Receiver<Arc<StoredEvent>>,
    cancel: CancellationToken,
    out: mpsc::Sender<Bytes>,
    mut hold: HoldWatch,
) {
    // The latest version sent (an event or a bookmark may carry it), and the latest
    // received (to skip what the backlog already had).
    let mut last_rv = spec.start_rv;
    let mut seen_rv = spec.start_rv;
    let mut queued: VecDeque<Arc<StoredEvent>> = VecDeque::new();
    for obj in &spec.initial {
        if out.send(line("ADDED", (spec.render)(obj))).await.is_err() {
            return;
        }
    }
    if spec.initial_events_end && out.send(bookmark(&spec, last_rv, true)).await.is_err() {
        return;
    }
    for ev in backlog {
        seen_rv = ev.rv;
        queued.push_back(ev);
    }
    let deadline = tokio::time::sleep(spec.timeout);
    tokio::pin!(deadline);
    let mut ticker = tokio::time::interval(spec.bookmark_interval);
    ticker.tick().await;
    let mut hold_open = true;
    loop {
        if !hold.holds(&spec.key) {
            while let Some(ev) = queued.pop_front() {
                last_rv = ev.rv;
                if let Some((t, o)) = translate(&spec, &ev)
                    && out.send(line(t, o)).await.is_err()
                {
                    return;
                }
            }
        }
        tokio::select! {
            _ = &mut deadline => break,
            _ = cancel.cancelled() => break,
            _ = out.closed() => return,
            changed = hold.rx.changed(), if hold_open => {
                // Gone with the server: nothing can hold this watch any more.
                if changed.is_err() {
                    hold_open = false;
                }
            }
            _ = ticker.tick(), if spec.bookmarks => {
                if queued.is_empty() && out.send(bookmark(&spec, last_rv, false)).await.is_err() {
                    return;
                }
            }
            ev = rx.recv() => match ev {
                Ok(ev) => {
                    if ev.rv <= seen_rv {
                        continue;
                    }
                    seen_rv = ev.rv;
                    queued.push_back(ev);
                }
                // Lagged: this watcher missed events; end it so the client resumes.
                Err(_) => break,
            },
        }
    }
    if spec.bookmarks && queued.is_empty() {
        let _ = out.send(bookmark(&spec, last_rv, false)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(rv: u64) -> StoredEvent {
        StoredEvent {
            rv,
            key: ("".into(), "pods".into()),
            etype: EventType::Added,
            object: json!({}),
            old: None,
        }
    }

    #[test]
    fn history_resumes_and_expires() {
        let mut log = EventLog::new(3);
        for rv in 2..=6 {
            log.push(ev(rv));
        }
        // 2 and 3 were evicted: resuming from 3 is fine (only later events are needed).
        assert_eq!(log.since(3, 6).unwrap().len(), 3);
        let e = log.since(2, 6).unwrap_err();
        assert_eq!((e.code, e.reason), (410, "Expired"));
        assert_eq!(log.since(7, 6).unwrap_err().code, 504);
        log.compact(6);
        assert!(log.since(5, 6).is_err());
        assert!(log.since(6, 6).unwrap().is_empty());
    }

    fn pods_spec() -> WatchSpec {
        WatchSpec {
            key: ("".into(), "pods".into()),
            filter: Box::new(|_| true),
            render: Box::new(|o| o.clone()),
            api_version: "v1".into(),
            kind: "Pod".into(),
            bookmarks: true,
            bookmark_interval: Duration::from_millis(20),
            timeout: Duration::from_secs(60),
            initial: vec![],
            initial_events_end: false,
            start_rv: 1,
        }
    }

    #[tokio::test]
    async fn a_held_watch_sends_nothing_then_every_event_in_order() {
        let mut log = EventLog::new(16);
        let hold = tokio::sync::watch::Sender::new(Some(EventHold {
            key: ("".into(), "pods".into()),
            users: vec!["slow".into()],
        }));
        let (tx, mut rx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            pods_spec(),
            vec![],
            log.subscribe(),
            cancel.clone(),
            tx,
            HoldWatch {
                user: "slow".into(),
                rx: hold.subscribe(),
            },
        ));
        for rv in 2..=4 {
            log.push(StoredEvent {
                object: json!({ "n": rv }),
                ..ev(rv)
            });
        }
        // Held: not even a bookmark (it would claim the held events were seen).
        let quiet = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(quiet.is_err(), "a held watch sent {quiet:?}");
        hold.send_replace(None);
        let mut rvs = vec![];
        while rvs.len() < 3 {
            let l = rx.recv().await.expect("the watch runs");
            let v: Value = serde_json::from_slice(&l).unwrap();
            if v["type"] == "ADDED" {
                rvs.push(v["object"]["n"].as_u64().unwrap());
            }
        }
        assert_eq!(rvs, vec![2, 3, 4]);
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_hold_covers_only_its_resource_and_users() {
        let hold = tokio::sync::watch::Sender::new(Some(EventHold {
            key: ("".into(), "pods".into()),
            users: vec!["slow".into()],
        }));
        let w = |user: &str| HoldWatch {
            user: user.into(),
            rx: hold.subscribe(),
        };
        assert!(w("slow").holds(&("".into(), "pods".into())));
        assert!(!w("other").holds(&("".into(), "pods".into())));
        assert!(!w("slow").holds(&("apps".into(), "deployments".into())));
        hold.send_replace(None);
        assert!(!w("slow").holds(&("".into(), "pods".into())));
    }

    #[test]
    fn selector_watches_see_objects_enter_and_leave() {
        let spec = WatchSpec {
            key: ("".into(), "pods".into()),
            filter: Box::new(|o| o["l"] == "yes"),
            render: Box::new(|o| o.clone()),
            api_version: "v1".into(),
            kind: "Pod".into(),
            bookmarks: false,
            bookmark_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            initial: vec![],
            initial_events_end: false,
            start_rv: 0,
        };
        let modified = |old: &str, new: &str| StoredEvent {
            rv: 1,
            key: ("".into(), "pods".into()),
            etype: EventType::Modified,
            object: json!({"l": new}),
            old: Some(json!({"l": old})),
        };
        assert_eq!(translate(&spec, &modified("no", "yes")).unwrap().0, "ADDED");
        assert_eq!(
            translate(&spec, &modified("yes", "no")).unwrap().0,
            "DELETED"
        );
        assert_eq!(
            translate(&spec, &modified("yes", "yes")).unwrap().0,
            "MODIFIED"
        );
        assert!(translate(&spec, &modified("no", "no")).is_none());
    }
}
