//! Kubernetes Events about policies (`kubectl describe scalingpolicy` shows them),
//! published off the scaling path by one task: an actor hands an Event over and never
//! waits for the API server. A full queue drops Events (counted), never blocks.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::metrics::{ControllerMetrics, ErrorKind};

/// Events are rare (transitions, scales, refusals); a backlog this long means the API
/// server is not taking them, and older news is worth less than a free actor.
const QUEUE: usize = 1024;
/// One Event write; a slow API server must not pile up Events behind it.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// The `reportingController` of every Event.
pub const REPORTING_CONTROLLER: &str = "nemesis.dev/controller";

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
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: REPORTING_CONTROLLER.to_string(),
                instance: Some(instance),
            },
        );
        let task = publish_all(recorder, rx, metrics.clone());
        (Self { tx, metrics }, task)
    }

    pub fn emit(&self, note: Note) {
        if self.tx.try_send(note).is_err() {
            self.metrics.error(ErrorKind::KubeApi);
            tracing::debug!("event queue full; an Event was dropped");
        }
    }
}

async fn publish_all(recorder: Recorder, mut rx: mpsc::Receiver<Note>, metrics: ControllerMetrics) {
    while let Some(n) = rx.recv().await {
        let ev = Event {
            type_: if n.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: n.reason.to_string(),
            // The Events API limits a note to 1 kB.
            note: Some(truncate(&n.message, 1000)),
            action: n.action.to_string(),
            secondary: None,
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, recorder.publish(&ev, &n.regarding)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                metrics.error(ErrorKind::KubeApi);
                tracing::warn!(err = %e, reason = n.reason, "publishing an Event failed");
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
