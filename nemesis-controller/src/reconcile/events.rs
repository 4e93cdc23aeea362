//! Kubernetes Events about policies (`kubectl describe scalingpolicy` shows them),
//! published off the scaling path by one task: an actor hands an Event over and never
//! waits for the API server. A full queue drops Events (counted), never blocks.
//! Only an identical repeat (same note too) joins an earlier Event's series: kube's
//! `Recorder` keys series without the note, so `warm -> zero` was shown as a second
//! `zero -> warm` and every later cold start as the first one's time.
//! Events are written through core `v1` with `firstTimestamp`, `lastTimestamp` and
//! `count` beside `eventTime` and `series`: `events.k8s.io/v1` refuses the former, and
//! without them `kubectl get events --sort-by=.lastTimestamp` misordered ours.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSeries, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::mpsc;

use crate::metrics::{ControllerMetrics, ErrorKind};

/// Events are rare (transitions, scales, refusals); a backlog this long means the API
/// server is not taking them, and older news is worth less than a free actor.
const QUEUE: usize = 1024;
/// One Event write; a slow API server must not pile up Events behind it.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// The `reportingController` (core: `reportingComponent`) of every Event.
pub const REPORTING_CONTROLLER: &str = "nemesis.dev/controller";
/// The legacy `source.component`, which `kubectl describe` shows as "From".
const SOURCE_COMPONENT: &str = "nemesis-controller";
/// A repeat joins an Event's series only within this (as kube's and client-go's
/// recorders do); later it is news again.
const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);

/// One Event for the object `regarding`.
pub struct Note {
    pub regarding: ObjectReference,
    pub warning: bool,
    /// PascalCase, e.g. `ScaledToZero`.
    pub reason: &'static str,
    pub action: &'static str,
    pub message: String,
}

#[derive(Clone, Debug)]
pub struct EventSink {
    tx: mpsc::Sender<Note>,
    metrics: ControllerMetrics,
}

impl EventSink {
    /// The sink and the task that publishes what it is given (run it until shutdown).
    pub fn new(
        client: Client,
        instance: String,
        metrics: ControllerMetrics,
    ) -> (Self, impl std::future::Future<Output = ()> + Send) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = publish_all(client, Series::new(instance), rx, metrics.clone());
        (Self { tx, metrics }, task)
    }

    pub fn emit(&self, note: Note) {
        if self.tx.try_send(note).is_err() {
            self.metrics.error(ErrorKind::KubeApi);
            tracing::debug!("event queue full; an Event was dropped");
        }
    }
}

/// What to send for one Note.
#[derive(Debug, Clone, PartialEq)]
enum Publish {
    Create(Event),
    /// A repeat: the earlier Event with its series counted up.
    Patch(Event),
}

/// The Events published lately, by everything that makes one the same (note included).
struct Series {
    instance: String,
    recent: HashMap<String, Event>,
}

impl Series {
    fn new(instance: String) -> Self {
        Self {
            instance,
            recent: HashMap::new(),
        }
    }

    fn next(&mut self, n: &Note, now: Timestamp) -> Publish {
        self.recent.retain(|_, e| {
            let last = e
                .series
                .as_ref()
                .and_then(|s| s.last_observed_time.as_ref())
                .or(e.event_time.as_ref())
                .map(|t| t.0);
            last.is_some_and(|t| t + SERIES_TTL > now)
        });
        let type_ = if n.warning { "Warning" } else { "Normal" };
        let r = &n.regarding;
        let key = serde_json::json!([
            type_,
            n.reason,
            n.action,
            r.namespace,
            r.name,
            r.uid,
            r.kind,
            n.message
        ])
        .to_string();
        if let Some(e) = self.recent.get_mut(&key) {
            let count = e.count.map_or(2, |c| c + 1);
            e.count = Some(count);
            e.last_timestamp = Some(Time(now));
            e.series = Some(EventSeries {
                count: Some(count),
                last_observed_time: Some(MicroTime(now)),
            });
            return Publish::Patch(e.clone());
        }
        let e = Event {
            action: Some(n.action.to_string()),
            reason: Some(n.reason.to_string()),
            event_time: Some(MicroTime(now)),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            count: Some(1),
            involved_object: r.clone(),
            // The Events API limits a note to 1 kB.
            message: Some(truncate(&n.message, 1000)),
            metadata: ObjectMeta {
                namespace: r.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    r.name.as_deref().unwrap_or("nemesis"),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            reporting_component: Some(REPORTING_CONTROLLER.to_string()),
            reporting_instance: Some(self.instance.clone()),
            source: Some(EventSource {
                component: Some(SOURCE_COMPONENT.to_string()),
                host: None,
            }),
            type_: Some(type_.to_string()),
            ..Default::default()
        };
        self.recent.insert(key, e.clone());
        Publish::Create(e)
    }
}

async fn publish_all(
    client: Client,
    mut series: Series,
    mut rx: mpsc::Receiver<Note>,
    metrics: ControllerMetrics,
) {
    while let Some(n) = rx.recv().await {
        let ns = n.regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(client.clone(), ns);
        let write = async {
            match series.next(&n, Timestamp::now()) {
                Publish::Create(e) => api.create(&PostParams::default(), &e).await.map(drop),
                Publish::Patch(e) => {
                    let name = e.metadata.name.clone().unwrap_or_default();
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&e))
                        .await
                        .map(drop)
                }
            }
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                metrics.error(ErrorKind::KubeApi);
                tracing::warn!(err = %crate::permissions::explain(&e), reason = n.reason, "publishing an Event failed");
            }
            Err(_) => {
                metrics.error(ErrorKind::KubeApi);
                tracing::warn!(reason = n.reason, "publishing an Event timed out");
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(reason: &'static str, message: &str) -> Note {
        Note {
            regarding: ObjectReference {
                api_version: Some("nemesis.dev/v1alpha1".into()),
                kind: Some("ScalingPolicy".into()),
                namespace: Some("demo".into()),
                name: Some("hello".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            warning: false,
            reason,
            action: "Evaluate",
            message: message.into(),
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(2_000_000_000 + s).unwrap()
    }

    #[test]
    fn a_different_note_is_a_new_event_with_that_note() {
        let mut s = Series::new("c-0".into());
        let Publish::Create(a) = s.next(&note("Transition", "zero -> warm"), at(0)) else {
            panic!("the first Event is created");
        };
        let Publish::Create(b) = s.next(&note("Transition", "warm -> zero"), at(60)) else {
            panic!("a transition with another note must not join the first one's series");
        };
        assert_eq!(b.message.as_deref(), Some("warm -> zero"));
        assert_ne!(a.metadata.name, b.metadata.name);
        assert_eq!(b.series, None);
        // What `kubectl get events --sort-by=.lastTimestamp` sorts on.
        assert_eq!(
            (a.last_timestamp, b.last_timestamp),
            (Some(Time(at(0))), Some(Time(at(60))))
        );
    }

    #[test]
    fn an_identical_repeat_counts_up_the_series_until_it_is_old_news() {
        let mut s = Series::new("c-0".into());
        let n = note("ScaledToZero", "Deployment hello scaled from 1 to 0");
        let Publish::Create(a) = s.next(&n, at(0)) else {
            panic!("created")
        };
        let Publish::Patch(b) = s.next(&n, at(10)) else {
            panic!("an identical repeat joins the series")
        };
        assert_eq!(a.metadata.name, b.metadata.name);
        assert_eq!((a.count, a.first_timestamp), (Some(1), Some(Time(at(0)))));
        assert_eq!(
            (b.count, b.first_timestamp, b.last_timestamp),
            (Some(2), Some(Time(at(0))), Some(Time(at(10))))
        );
        assert_eq!(b.series.as_ref().and_then(|x| x.count), Some(2));
        assert_eq!(
            b.series.as_ref().and_then(|x| x.last_observed_time.clone()),
            Some(MicroTime(at(10)))
        );
        let Publish::Patch(c) = s.next(&n, at(20)) else {
            panic!("a third repeat joins it too")
        };
        assert_eq!(c.series.and_then(|x| x.count), Some(3));
        assert_eq!(c.count, Some(3));
        assert!(matches!(s.next(&n, at(20 + 7 * 60)), Publish::Create(_)));
    }
}
