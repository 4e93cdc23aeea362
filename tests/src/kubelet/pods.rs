//! The kubelet's pod loop: watches the pods bound to its node (or to no node: there is
//! no scheduler) and keeps exactly one worker per pod uid, feeding it every update.
//! It never writes to the API itself; the workers do.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::worker::{self, WorkerEnv};

/// Whether this kubelet runs `pod`: bound to `node`, or not bound at all when it adopts
/// unbound pods (there is no scheduler to bind them).
pub fn runs_here(pod: &Pod, node: &str, adopt_unbound: bool) -> bool {
    match pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        None | Some("") => adopt_unbound,
        Some(n) => n == node,
    }
}

struct Handle {
    updates: watch::Sender<Option<Pod>>,
}

/// Runs until `cancel` fires; on return every worker has stopped its processes.
pub async fn run(env: Arc<WorkerEnv>, api: Api<Pod>, cancel: CancellationToken) {
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut workers: HashMap<String, Handle> = HashMap::new();
    // Uids whose worker already finished: later events for them (the final updates of
    // a pod being removed) must not start a new one.
    let mut finished: HashSet<String> = HashSet::new();
    let mut tasks: JoinSet<String> = JoinSet::new();
    let mut listed: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(uid) = done {
                    workers.remove(&uid);
                    finished.insert(uid);
                }
            }
            event = events.next() => {
                let Some(event) = event else { break };
                match event {
                    Ok(watcher::Event::Init) => listed.clear(),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let Some(uid) = pod.uid() {
                            listed.insert(uid);
                        }
                        apply(&env, pod, &mut workers, &finished, &mut tasks, &cancel);
                    }
                    Ok(watcher::Event::Apply(pod)) => {
                        apply(&env, pod, &mut workers, &finished, &mut tasks, &cancel);
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        if let Some(handle) = pod.uid().and_then(|u| workers.get(&u)) {
                            handle.updates.send_replace(None);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        // Pods we run that the relist did not return were deleted meanwhile.
                        for (uid, handle) in &workers {
                            if !listed.contains(uid) {
                                handle.updates.send_replace(None);
                            }
                        }
                        finished.retain(|uid| listed.contains(uid));
                    }
                    Err(err) => tracing::warn!(%err, "pod watch failed, retrying"),
                }
            }
        }
    }
    // Workers see the cancellation and kill their processes; wait for them to finish.
    while tasks.join_next().await.is_some() {}
}

fn apply(
    env: &Arc<WorkerEnv>,
    pod: Pod,
    workers: &mut HashMap<String, Handle>,
    finished: &HashSet<String>,
    tasks: &mut JoinSet<String>,
    cancel: &CancellationToken,
) {
    let Some(uid) = pod.uid() else { return };
    if let Some(handle) = workers.get(&uid) {
        handle.updates.send_replace(Some(pod));
        return;
    }
    // A pod already being deleted still gets a worker: it completes the deletion (a
    // grace-0 delete) as a kubelet does, even with no process to stop.
    if finished.contains(&uid) || !runs_here(&pod, &env.node_name, env.adopt_unbound) {
        return;
    }
    tracing::debug!(pod = %pod.name_any(), %uid, "starting pod worker");
    let (tx, rx) = watch::channel(Some(pod));
    workers.insert(uid.clone(), Handle { updates: tx });
    let env = Arc::clone(env);
    let cancel = cancel.child_token();
    tasks.spawn(async move {
        worker::run(env, rx, cancel).await;
        uid
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    fn pod(node: Option<&str>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                node_name: node.map(String::from),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn unbound_and_own_pods_run_here_others_do_not() {
        assert!(runs_here(&pod(None), "n1", true));
        assert!(runs_here(&pod(Some("")), "n1", true));
        assert!(runs_here(&pod(Some("n1")), "n1", true));
        assert!(!runs_here(&pod(Some("n2")), "n1", true));
    }

    #[test]
    fn a_second_node_leaves_unbound_pods_to_the_first() {
        assert!(!runs_here(&pod(None), "n2", false));
        assert!(runs_here(&pod(Some("n2")), "n2", false));
    }
}
