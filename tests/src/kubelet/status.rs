//! Pod status as a kubelet reports it, computed from what the pod worker knows about its
//! containers: phase, conditions (with transition times kept while a condition holds),
//! container statuses, pod IP. Pure: the worker decides when to send it.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// What the worker knows about one container.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    pub state: ContainerState,
    pub last_state: Option<ContainerState>,
    pub ready: bool,
    pub restart_count: i32,
    pub container_id: Option<String>,
}

/// What the worker knows about the pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub pod_ip: Option<String>,
    /// The second (IPv6) address of a dual-stack pod.
    pub pod_ip_v6: Option<String>,
    pub host_ip: Option<String>,
    pub host_ip_v6: Option<String>,
    pub start_time: Option<Time>,
    /// The network namespace is up, so containers can be started.
    pub sandbox_ready: bool,
    pub restart_policy: String,
    pub containers: Vec<ContainerView>,
    /// The init containers, run one after the other before `containers`.
    pub init_containers: Vec<ContainerView>,
}

pub fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..Default::default()
    }
}

pub fn running(started_at: Time) -> ContainerState {
    ContainerState {
        running: Some(ContainerStateRunning {
            started_at: Some(started_at),
        }),
        ..Default::default()
    }
}

pub fn terminated(
    exit_code: i32,
    reason: &str,
    started_at: Option<Time>,
    finished_at: Time,
) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code,
            reason: Some(reason.into()),
            started_at,
            finished_at: Some(finished_at),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod phase by the kubelet's rules: Pending while a container has never run,
/// Running while one runs or will be restarted, Succeeded/Failed once all are done for
/// good under the restart policy.
pub fn phase(containers: &[ContainerView], restart_policy: &str) -> &'static str {
    let mut never_ran = 0;
    let mut running = 0;
    let mut stopped = 0;
    let mut succeeded = 0;
    for c in containers {
        if c.state.running.is_some() {
            running += 1;
        } else if let Some(t) = &c.state.terminated {
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else if c.last_state.is_some() {
            // Waiting to restart after an earlier run: the pod is still running.
            running += 1;
        } else {
            never_ran += 1;
        }
    }
    if containers.is_empty() || never_ran > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    debug_assert_eq!(stopped, containers.len());
    match restart_policy {
        "Always" => "Running",
        "OnFailure" if succeeded == stopped => "Succeeded",
        "OnFailure" => "Running",
        _ if succeeded == stopped => "Succeeded",
        _ => "Failed",
    }
}

/// The status to report, keeping each condition's `lastTransitionTime` from `previous`
/// while its value is unchanged.
pub fn pod_status(view: &PodView, previous: Option<&PodStatus>, now: &Time) -> PodStatus {
    let phase = phase(&view.containers, &view.restart_policy);
    let all_ready = !view.containers.is_empty() && view.containers.iter().all(|c| c.ready);
    let not_ready: Vec<&str> = view
        .containers
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let unready_message = (!not_ready.is_empty())
        .then(|| format!("containers with unready status: [{}]", not_ready.join(" ")));
    let terminal = phase == "Succeeded" || phase == "Failed";
    let condition = |type_: &str, status: bool, reason: Option<&str>, message: Option<String>| {
        let status = if status { "True" } else { "False" };
        let kept = previous
            .and_then(|p| p.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time.clone());
        PodCondition {
            type_: type_.into(),
            status: status.into(),
            reason: if status == "True" {
                None
            } else {
                reason.map(String::from)
            },
            message: if status == "True" { None } else { message },
            last_transition_time: Some(kept.unwrap_or_else(|| now.clone())),
            ..Default::default()
        }
    };
    let ready_reason = if terminal {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let conditions = vec![
        condition("PodReadyToStartContainers", view.sandbox_ready, None, None),
        condition(
            "Initialized",
            view.init_containers.iter().all(|c| {
                c.state
                    .terminated
                    .as_ref()
                    .is_some_and(|t| t.exit_code == 0)
            }),
            Some("ContainersNotInitialized"),
            None,
        ),
        condition(
            "Ready",
            all_ready && !terminal,
            Some(ready_reason),
            unready_message.clone(),
        ),
        condition(
            "ContainersReady",
            all_ready && !terminal,
            Some(ready_reason),
            unready_message,
        ),
        condition("PodScheduled", true, None, None),
    ];
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: view.host_ip.clone(),
        host_ips: view.host_ip.clone().map(|ip| {
            std::iter::once(ip)
                .chain(view.host_ip_v6.clone())
                .map(|ip| HostIP { ip })
                .collect()
        }),
        pod_ip: view.pod_ip.clone(),
        pod_ips: view.pod_ip.clone().map(|ip| {
            std::iter::once(ip)
                .chain(view.pod_ip_v6.clone())
                .map(|ip| PodIP { ip })
                .collect()
        }),
        start_time: view.start_time.clone(),
        qos_class: Some("BestEffort".into()),
        init_container_statuses: (!view.init_containers.is_empty())
            .then(|| view.init_containers.iter().map(container_status).collect()),
        container_statuses: Some(
            view.containers
                .iter()
                .map(|c| ContainerStatus {
                    name: c.name.clone(),
                    image: c.image.clone(),
                    image_id: String::new(),
                    container_id: c.container_id.clone(),
                    ready: c.ready,
                    restart_count: c.restart_count,
                    started: Some(c.state.running.is_some()),
                    state: Some(c.state.clone()),
                    last_state: c.last_state.clone(),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    }
}

fn container_status(c: &ContainerView) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: String::new(),
        container_id: c.container_id.clone(),
        ready: c.ready,
        restart_count: c.restart_count,
        started: Some(c.state.running.is_some()),
        state: Some(c.state.clone()),
        last_state: c.last_state.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn c(state: ContainerState, last: Option<ContainerState>, ready: bool) -> ContainerView {
        ContainerView {
            name: "app".into(),
            image: "local".into(),
            state,
            last_state: last,
            ready,
            restart_count: 0,
            container_id: None,
        }
    }

    #[test]
    fn phase_follows_the_kubelet_rules() {
        let creating = c(waiting("ContainerCreating", None), None, false);
        let run = c(running(t(1)), None, false);
        let ok = c(terminated(0, "Completed", None, t(2)), None, false);
        let bad = c(terminated(1, "Error", None, t(2)), None, false);
        let backoff = c(
            waiting("CrashLoopBackOff", None),
            Some(bad.state.clone()),
            false,
        );
        assert_eq!(phase(&[creating.clone(), run.clone()], "Always"), "Pending");
        assert_eq!(phase(&[run.clone(), ok.clone()], "Always"), "Running");
        assert_eq!(phase(&[backoff], "Always"), "Running");
        assert_eq!(phase(std::slice::from_ref(&ok), "Always"), "Running");
        assert_eq!(phase(std::slice::from_ref(&ok), "OnFailure"), "Succeeded");
        assert_eq!(phase(std::slice::from_ref(&bad), "OnFailure"), "Running");
        assert_eq!(phase(&[ok.clone(), bad.clone()], "Never"), "Failed");
        assert_eq!(phase(&[ok], "Never"), "Succeeded");
    }

    #[test]
    fn ready_condition_keeps_its_transition_time_while_it_holds() {
        let mut view = PodView {
            pod_ip: Some("198.18.1.2".into()),
            pod_ip_v6: Some("fd6e:6d00:0:1::2".into()),
            host_ip: Some("198.18.1.1".into()),
            host_ip_v6: Some("fd6e:6d00:0:1::1".into()),
            start_time: Some(t(1)),
            sandbox_ready: true,
            restart_policy: "Always".into(),
            containers: vec![c(running(t(1)), None, false)],
            init_containers: vec![],
        };
        let first = pod_status(&view, None, &t(10));
        let ready = |s: &PodStatus| {
            s.conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == "Ready")
                .cloned()
                .unwrap()
        };
        assert_eq!(ready(&first).status, "False");
        assert_eq!(
            ready(&first).message.as_deref(),
            Some("containers with unready status: [app]")
        );
        let same = pod_status(&view, Some(&first), &t(20));
        assert_eq!(ready(&same).last_transition_time, Some(t(10)));
        view.containers[0].ready = true;
        let flipped = pod_status(&view, Some(&same), &t(30));
        assert_eq!(ready(&flipped).status, "True");
        assert_eq!(ready(&flipped).last_transition_time, Some(t(30)));
        assert_eq!(flipped.phase.as_deref(), Some("Running"));
        assert_eq!(flipped.pod_ip.as_deref(), Some("198.18.1.2"));
    }
}
