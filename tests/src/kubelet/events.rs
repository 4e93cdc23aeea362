//! The Events a kubelet (and, for `Scheduled`, the scheduler it stands in for) records
//! about a pod, as `kubectl describe pod` lists them: Scheduled, Pulled (the sandbox runs
//! no image, so "already present"), Created, Started, Killing, Unhealthy on a failed
//! readiness probe, BackOff, Failed. Core/v1 Events with `involvedObject` naming the pod
//! (and container); a repeat of the same reason and message raises `count` and
//! `lastTimestamp`, as the kubelet's recorder aggregates. Writes only Events, in the
//! background: a lost Event never holds a pod up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// One Event write gives up after this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Who says it: the kubelet, or the scheduler it plays for `Scheduled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Kubelet,
    Scheduler,
}

/// What makes two Events the same one: pod uid, container, reason, message.
type EventKey = (String, String, String, String);

pub struct Recorder {
    client: Client,
    node: String,
    /// Each Event recorded so far: its name and count.
    seen: Mutex<HashMap<EventKey, (String, i32)>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    pub fn new(client: Client, node: String) -> Arc<Self> {
        Arc::new(Self {
            client,
            node,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Records `reason`/`message` about `pod` (and `container`), in the background.
    pub fn record(
        self: &Arc<Self>,
        pod: &Pod,
        container: Option<&str>,
        source: Source,
        warning: bool,
        reason: &str,
        message: String,
    ) {
        let ns = pod.namespace().unwrap_or_else(|| "default".into());
        let name = pod.name_any();
        let uid = pod.uid().unwrap_or_default();
        let key = (
            uid.clone(),
            container.unwrap_or("").to_owned(),
            reason.to_owned(),
            message.clone(),
        );
        let (event_name, count) = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let entry = seen.entry(key).or_insert_with(|| {
                let suffix: u64 = rand::random();
                (format!("{name}.{suffix:016x}"), 0)
            });
            entry.1 += 1;
            entry.clone()
        };
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let component = match source {
            Source::Kubelet => "kubelet",
            Source::Scheduler => "default-scheduler",
        };
        let mut involved =
            json!({"kind": "Pod", "apiVersion": "v1", "namespace": ns, "name": name, "uid": uid});
        if let Some(c) = container {
            involved["fieldPath"] = json!(format!("spec.containers{{{c}}}"));
        }
        let event = json!({
            "metadata": {"name": event_name, "namespace": ns},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": if warning { "Warning" } else { "Normal" },
            "source": {"component": component, "host": self.node},
            "reportingComponent": component,
            "reportingInstance": self.node,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": count,
        });
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        tokio::spawn(async move {
            let write = async {
                if count == 1 {
                    let e: Event = serde_json::from_value(event)?;
                    api.create(&PostParams::default(), &e).await.map(drop)?;
                } else {
                    let patch = json!({"count": count, "lastTimestamp": now});
                    api.patch(&event_name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map(drop)?;
                }
                anyhow::Ok(())
            };
            match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::debug!(%err, "recording a pod Event failed"),
                Err(_) => tracing::debug!("recording a pod Event timed out"),
            }
        });
    }
}
