//! Directives across a failover: the standby copies the leader's directive log, and
//! when the leader is SIGKILLed the new leader goes on from the copy, so an agent keeps
//! its cursor: its first heartbeat to the new leader gets a delta (empty: nothing
//! changed), not the whole set again, and later changes come as deltas too.

mod controller_support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use controller_support::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use nemesis_common::wire::{
    DirectiveView, Heartbeat, HeartbeatReply, ServiceDirective, ServiceRef, ViewUpdate,
};
use nemesis_controller::app::Running;

const NAMES: [&str; 3] = ["dfo-a", "dfo-b", "dfo-c"];
/// Loaded machines start slowly: every wait for something to start is this long.
const START: Duration = Duration::from_secs(90);

/// A simulated agent: speaks the agent API as `nemesis-agent` does, keeping its copy of
/// the directives in a [`DirectiveView`] and sending its cursor back.
struct SimAgent {
    node: String,
    instance: String,
    view: DirectiveView,
    http: Http,
    /// What the heartbeats report (nothing, unless a test sets it).
    reports: Vec<nemesis_common::wire::ServiceReport>,
}

impl SimAgent {
    fn new(node: &str) -> Self {
        Self {
            node: node.into(),
            instance: format!("{node}-{:08x}", rand::random::<u32>()),
            view: DirectiveView::default(),
            http: Http::default(),
            reports: vec![],
        }
    }

    /// One heartbeat to `addr`; the reply is applied to the view.
    async fn beat(&mut self, addr: SocketAddr) -> anyhow::Result<(HeartbeatReply, ViewUpdate)> {
        let hb = Heartbeat {
            node: self.node.clone(),
            instance: self.instance.clone(),
            services: self.reports.clone(),
            addresses: vec![],
            ready: true,
            directives_cursor: self.view.cursor(),
            pages: true,
            reports_seq: None,
            reports_since: None,
            gone: vec![],
        };
        let token = agent_token(addr, &self.node).await?;
        let (status, body) = self
            .http
            .post(
                addr,
                "/v1/agents/heartbeat",
                &token,
                &serde_json::to_value(&hb)?,
            )
            .await?;
        anyhow::ensure!(status == 200, "heartbeat to {addr}: {status} {body}");
        let reply: HeartbeatReply = serde_json::from_value(body).context("heartbeat reply")?;
        let update = self.view.apply(&reply);
        Ok((reply, update))
    }

    /// Heartbeats until a reply ends a run of pages; the first reply and whether any
    /// reply had to start over.
    async fn sync(&mut self, addr: SocketAddr) -> anyhow::Result<(HeartbeatReply, bool)> {
        let (first, mut update) = self.beat(addr).await?;
        let mut resynced = update == ViewUpdate::Resync;
        for _ in 0..100 {
            if !matches!(update, ViewUpdate::Partial | ViewUpdate::Resync) {
                return Ok((first, resynced));
            }
            update = self.beat(addr).await?.1;
            resynced |= update == ViewUpdate::Resync;
        }
        anyhow::bail!("no end to the pages from {addr}")
    }

    fn directives(&self) -> Vec<ServiceDirective> {
        self.view.directives().cloned().collect()
    }
}

fn held_by(c: &Running) -> Vec<ServiceDirective> {
    c.registry.directives()
}

fn svc(name: &str) -> ServiceRef {
    ServiceRef {
        namespace: "default".into(),
        name: name.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_continues_the_agents_cursors_with_deltas() -> anyhow::Result<()> {
    init_tracing();
    let OneDeployment {
        server,
        client,
        deployments,
        policies,
        log: _log,
    } = OneDeployment::start(NAMES[0], 1).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    for name in NAMES {
        if name != NAMES[0] {
            let d: Deployment = deployment(name, 1);
            deployments.create(&PostParams::default(), &d).await?;
        }
        services
            .create(&PostParams::default(), &service(name))
            .await?;
        policies
            .create(&PostParams::default(), &busy_policy(name))
            .await?;
    }

    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = start_controller(&server, dir_a.path(), &[]).await?;
    wait_leading(&a, START).await?;
    let b = start_controller(&server, dir_b.path(), &[]).await?;
    assert!(!b.is_leading(), "A leads, B stands by");

    // A hands every managed Service a directive with its hold ports.
    eventually("A's directives for every Service", START, || async {
        let held = held_by(&a);
        Ok(
            (held.len() == NAMES.len() && held.iter().all(|d| !d.hold_ports.is_empty()))
                .then_some(()),
        )
    })
    .await?;

    // The agent holds A's set, and B's copy is A's log at the agent's cursor.
    let mut agent = SimAgent::new("node-dfo");
    let deadline = std::time::Instant::now() + START;
    let before = loop {
        agent.sync(a.api_addr).await?;
        let at = a.registry.directives_cursor();
        if agent.view.cursor() == Some(at)
            && b.registry.directives_cursor() == at
            && agent.directives() == held_by(&a)
            && held_by(&b) == held_by(&a)
        {
            break held_by(&a);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the agent and B's copy not in step with A within {START:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let cursor = agent.view.cursor();

    // SIGKILL A (nothing released); B takes over when A's Lease runs out.
    a.kill();
    wait_leading(&b, START).await?;

    // The agent's first heartbeat to B, with A's cursor: a delta, and an empty one (B
    // set every directive as A had it), not the whole set.
    let (first, resynced) = agent.sync(b.api_addr).await?;
    assert!(
        first.delta,
        "B answered A's cursor {cursor:?} with the whole set: {first:?}"
    );
    assert!(!resynced, "the agent had to ask for the whole set");
    assert!(
        first.directives.is_empty() && first.removed.is_empty(),
        "nothing changed, yet B sent {first:?}"
    );
    assert_eq!(first.cursor.map(|c| c.stream), cursor.map(|c| c.stream));
    assert_eq!(agent.directives(), held_by(&b));
    assert_eq!(held_by(&b), before, "B leads on with A's directives");

    // B's own changes reach the agent as deltas: a policy goes, its directive with it.
    policies.delete(NAMES[2], &DeleteParams::default()).await?;
    let gone = svc(NAMES[2]);
    eventually(
        "B dropping the deleted policy's directive",
        START,
        || async { Ok(b.registry.directive(&gone).is_none().then_some(())) },
    )
    .await?;
    let (reply, resynced) = agent.sync(b.api_addr).await?;
    assert!(reply.delta && !resynced, "{reply:?}");
    assert_eq!(reply.removed, vec![gone.clone()]);
    assert_eq!(agent.directives(), held_by(&b));
    assert!(agent.view.get(&gone).is_none());
    b.shutdown().await;
    Ok(())
}

// === a new leader after a completed sleep ===

/// Where the second controller is when the leader is killed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Standby {
    /// Running, its copy of the leader's directives in step (it holds the `Sleep`).
    Copied,
    /// Started only after the kill (a single replica restarted, or a standby that never
    /// pulled): it holds no directive of the old leader at all.
    None,
}

/// An agent heartbeating every 100 ms to one controller, reporting the epoch it applied
/// for `svc` (so a sleep's handshake completes), and applying directives as
/// `nemesis-agent` does: a directive replaces the one applied only with an epoch at
/// least as high. Every directive it applies is kept with the controller it came from
/// (0: the first, 1: the one after [`ApplyingAgent::switch`], a port the killed one had
/// may be the next one's).
struct ApplyingAgent {
    to: std::sync::Arc<std::sync::Mutex<(SocketAddr, u32)>>,
    applied: std::sync::Arc<std::sync::Mutex<Vec<(u32, ServiceDirective)>>>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl ApplyingAgent {
    fn start(node: &str, svc: ServiceRef, to: SocketAddr) -> Self {
        let to = std::sync::Arc::new(std::sync::Mutex::new((to, 0)));
        let applied: std::sync::Arc<std::sync::Mutex<Vec<(u32, ServiceDirective)>>> =
            Default::default();
        let mut agent = SimAgent::new(node);
        let (t, a) = (to.clone(), applied.clone());
        let task = tokio::spawn(async move {
            let mut current: Option<ServiceDirective> = None;
            loop {
                let (addr, controller) = *t.lock().unwrap();
                let epoch = current.as_ref().map_or(0, |d| d.epoch);
                if agent.sync_reporting(addr, &svc, epoch).await.is_ok()
                    && let Some(d) = agent.view.get(&svc)
                    && current.as_ref().is_none_or(|c| d.epoch > c.epoch)
                {
                    current = Some(d.clone());
                    a.lock().unwrap().push((controller, d.clone()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self {
            to,
            applied,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// Heartbeats go to `addr` from now on.
    fn switch(&self, addr: SocketAddr) {
        let mut to = self.to.lock().unwrap();
        *to = (addr, to.1 + 1);
    }

    fn applied_from(&self, controller: u32) -> Vec<ServiceDirective> {
        self.applied
            .lock()
            .unwrap()
            .iter()
            .filter(|(from, _)| *from == controller)
            .map(|(_, d)| d.clone())
            .collect()
    }
}

impl SimAgent {
    /// [`SimAgent::sync`], reporting `svc` as applied at `epoch`, nothing open or held.
    async fn sync_reporting(
        &mut self,
        addr: SocketAddr,
        svc: &ServiceRef,
        epoch: u64,
    ) -> anyhow::Result<()> {
        self.reports = vec![nemesis_common::wire::ServiceReport {
            service: svc.clone(),
            mode: nemesis_common::wire::AppliedMode::Hold,
            applied_epoch: epoch,
            connects_total: 0,
            open_connections: 0,
            closed_total: 0,
            held_connections: 0,
            accepted_total: 0,
            accepted_open: 0,
            hold_ports: vec![],
            holds_total: 0,
            holds_refused_total: 0,
            proxy_errors: Default::default(),
        }];
        self.sync(addr).await.map(drop)
    }
}

/// Leader A puts the Service to sleep (every agent holds, the Deployment scaled to
/// zero) and is SIGKILLed right after; B takes over and the Service is woken. The
/// agents listed the sleep's pods while holding; those pods are stopping, and an agent
/// whose view of the endpoints still lists them must send them nothing: B's `Follow`
/// has to say the wake is from zero (`afterZero`), whatever B holds of A's directives.
async fn a_new_leader_after_a_completed_sleep(standby: Standby) -> anyhow::Result<()> {
    init_tracing();
    let name = match standby {
        Standby::Copied => "dfo-zero-copied",
        Standby::None => "dfo-zero-fresh",
    };
    let OneDeployment {
        server,
        client,
        deployments,
        policies,
        log,
    } = OneDeployment::start(name, 1).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services
        .create(&PostParams::default(), &service(name))
        .await?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = start_controller(&server, dir_a.path(), &[]).await?;
    wait_leading(&a, START).await?;
    let b = match standby {
        Standby::Copied => Some(start_controller(&server, dir_b.path(), &[]).await?),
        Standby::None => None,
    };
    let svc = svc(name);
    let agent = ApplyingAgent::start("node-dfo-zero", svc.clone(), a.api_addr);
    policies
        .create(
            &PostParams::default(),
            &zero_until_demand(name, "DfoZeroSleep"),
        )
        .await?;

    // A's sleep completes: the agent holds (A's `Sleep` applied), then the scale to 0.
    wait_replicas(&deployments, name, 0, START).await?;
    let sleep = agent
        .applied_from(0)
        .into_iter()
        .rfind(|d| d.directive == nemesis_common::wire::Directive::Sleep)
        .context("the agent applied A's Sleep before the scale to zero")?;
    if let Some(b) = &b {
        eventually("B's copy holding A's Sleep", START, || async {
            Ok(b.registry
                .directive(&svc)
                .filter(|d| d.epoch == sleep.epoch)
                .map(drop))
        })
        .await?;
    }

    a.kill();
    let b = match b {
        Some(b) => b,
        None => start_controller(&server, dir_b.path(), &[]).await?,
    };
    agent.switch(b.api_addr);
    wait_leading(&b, START).await?;

    // A held client asks B to wake the Service.
    let http = Http::default();
    eventually("B waking the Service", START, || async {
        let (status, body) = http.wake(b.api_addr, "node-dfo-zero", &svc, 1).await?;
        anyhow::ensure!(status == 200, "wake: {status} {body}");
        Ok((replicas(&deployments, name).await? == 1).then_some(()))
    })
    .await?;
    let from_b = eventually("the agent applying B's Follow", START, || async {
        let from_b = agent.applied_from(1);
        Ok(from_b
            .iter()
            .any(|d| d.directive == nemesis_common::wire::Directive::Follow)
            .then_some(from_b))
    })
    .await?;
    // Before the wake's Follow, nothing from B may have let the agent forget the sleep's
    // pods (a plain Follow ends the sleep for it: the pods stay, as after a sleep given
    // up), whether it arrived at term start or with the wake.
    let first_follow = from_b
        .iter()
        .find(|d| d.directive == nemesis_common::wire::Directive::Follow)
        .expect("found above");
    assert!(
        first_follow.after_zero,
        "B's first Follow does not say the wake is from zero (the sleep's pods are stopping): \
         {first_follow:?}; everything B sent the agent: {from_b:?}"
    );
    assert!(
        first_follow.epoch > sleep.epoch,
        "{first_follow:?} after {sleep:?}"
    );
    // (B may have put it to sleep again since: idle.)
    assert_eq!(
        log.seen().get(..3),
        Some(&[1, 0, 1][..]),
        "one sleep, one wake"
    );
    b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_with_the_copy_wakes_after_a_completed_sleep_with_after_zero()
-> anyhow::Result<()> {
    a_new_leader_after_a_completed_sleep(Standby::Copied).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_without_the_copy_wakes_after_a_completed_sleep_with_after_zero()
-> anyhow::Result<()> {
    a_new_leader_after_a_completed_sleep(Standby::None).await
}

/// Leader A puts the Service to sleep and B's copy of A's directives takes the `Sleep`;
/// then B's copying stops (the replicas' URL A wrote on the Lease answers 503), A
/// completes the sleep, wakes the Service (its `Follow afterZero` reaches the agent, not
/// B) and is SIGKILLed. B inherits a `Sleep` while the target runs again: the pods the
/// agent listed during the sleep were stopped, so B's first directive must be a
/// `Follow` with `afterZero` too (a plain one would let the agent send to them), with an
/// epoch above A's, and B must not scale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_whose_copy_ends_at_a_sleep_the_old_one_completed_and_woke_follows_after_zero()
-> anyhow::Result<()> {
    use nemesis_common::wire::Directive;
    use nemesis_tests::faultproxy::{Answer, Fault, FaultProxy};
    init_tracing();
    let name = "dfo-zero-woken";
    let OneDeployment {
        server,
        client,
        deployments,
        policies,
        log,
    } = OneDeployment::start(name, 1).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services
        .create(&PostParams::default(), &service(name))
        .await?;
    // B copies A through this proxy; the test cuts it when it wants B's copy to stop.
    let copy_path = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], 9))).await?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let url = format!("http://{}", copy_path.addr());
    let a = start_controller(&server, dir_a.path(), &["--history-url", &url]).await?;
    copy_path.set_upstream(a.api_addr);
    wait_leading(&a, START).await?;
    let b = start_controller(&server, dir_b.path(), &[]).await?;
    let svc = svc(name);
    let agent = ApplyingAgent::start("node-dfo-woken", svc.clone(), a.api_addr);
    policies
        .create(
            &PostParams::default(),
            &zero_until_demand(name, "DfoWokenSleep"),
        )
        .await?;

    // A's `Sleep` reaches the agent and B's copy; then B's copying stops.
    let sleep = eventually("the agent applying A's Sleep", START, || async {
        Ok(agent
            .applied_from(0)
            .into_iter()
            .rfind(|d| d.directive == Directive::Sleep))
    })
    .await?;
    eventually("B's copy holding A's Sleep", START, || async {
        Ok(b.registry
            .directive(&svc)
            .filter(|d| d.epoch == sleep.epoch)
            .map(drop))
    })
    .await?;
    copy_path
        .set(Fault::Answer(Answer {
            status: 503,
            content_type: "text/plain",
            body: "the copy is cut".into(),
        }))
        .await?;
    let inherited = b.registry.inherited_sleep(&svc);
    assert!(
        inherited.is_some_and(|s| s.target_generation.is_some()),
        "B's copy of A's Sleep carries the target's generation: {inherited:?}"
    );

    // A completes the sleep, then wakes the Service: its `Follow afterZero` reaches the
    // agent but not B.
    wait_replicas(&deployments, name, 0, START).await?;
    let http = Http::default();
    eventually("A waking the Service", START, || async {
        let (status, body) = http.wake(a.api_addr, "node-dfo-woken", &svc, 1).await?;
        anyhow::ensure!(status == 200, "wake: {status} {body}");
        Ok((replicas(&deployments, name).await? == 1).then_some(()))
    })
    .await?;
    let a_wake = eventually("the agent applying A's wake", START, || async {
        Ok(agent
            .applied_from(0)
            .into_iter()
            .find(|d| d.directive == Directive::Follow && d.epoch > sleep.epoch))
    })
    .await?;
    assert!(a_wake.after_zero, "A's wake: {a_wake:?}");
    // B's engine resumes from the status A wrote: warm.
    wait_state(&policies, name, "warm", START).await?;
    assert_eq!(
        b.registry.directive(&svc).map(|d| d.epoch),
        Some(sleep.epoch),
        "B's copy still ends at A's Sleep"
    );

    a.kill();
    agent.switch(b.api_addr);
    wait_leading(&b, START).await?;
    let first = eventually("the agent applying B's first directive", START, || async {
        Ok(agent.applied_from(1).into_iter().next())
    })
    .await?;
    assert_eq!(
        (first.directive, first.after_zero),
        (Directive::Follow, true),
        "B's first directive after inheriting a Sleep the old leader completed and woke \
         from: {first:?} (A's Sleep {sleep:?}, A's wake {a_wake:?})"
    );
    assert!(first.epoch > a_wake.epoch, "{first:?} after {a_wake:?}");
    assert_eq!(
        log.seen(),
        vec![1, 0, 1],
        "one sleep and one wake, both A's"
    );
    b.shutdown().await;
    Ok(())
}

/// Sets the Deployment's `status.readyReplicas`, as observed at its current generation
/// (no Deployment controller runs here).
async fn set_ready(api: &Api<Deployment>, name: &str, ready: i32) -> anyhow::Result<()> {
    let generation = api.get(name).await?.metadata.generation;
    api.patch_status(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({
            "status": {"readyReplicas": ready, "observedGeneration": generation}
        })),
    )
    .await
    .with_context(|| format!("setting {name}'s readyReplicas to {ready}"))?;
    Ok(())
}

/// A wake-up with `applied_epoch`, sent until the controller forwards it to the policy
/// (while the last wake is in progress the gate only acknowledges it).
async fn wake_forwarded(
    c: &Running,
    node: &str,
    svc: &ServiceRef,
    applied_epoch: u64,
) -> anyhow::Result<()> {
    let http = Http::default();
    eventually("a wake-up forwarded to the policy", START, || async {
        let (status, body) = http
            .wake_applied(c.api_addr, node, svc, 1, applied_epoch)
            .await?;
        anyhow::ensure!(status == 200, "wake: {status} {body}");
        let message = body["message"].as_str().unwrap_or_default();
        Ok(message.starts_with("waking").then_some(()))
    })
    .await
}

/// The failover case of a late wake-up, on one controller: an agent's flight began under
/// the `Sleep` (its connections were held at zero), the target was woken and its pods
/// are ready, and the flight's wake-up arrives only now (in the chaos test it was being
/// retried while no leader answered, and the new leader had woken the target from the
/// held connections its heartbeat reported). It must not hold the next sleep off for the
/// demand window. A wake-up from a flight begun after the agent applied the wake's
/// `Follow` (new demand) still must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_wake_up_from_before_the_wake_does_not_hold_the_next_sleep_but_new_demand_does()
-> anyhow::Result<()> {
    init_tracing();
    let name = "dfo-late-wake";
    let node = "node-dfo-late";
    let OneDeployment {
        server,
        client,
        deployments,
        policies,
        log,
    } = OneDeployment::start(name, 1).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services
        .create(&PostParams::default(), &service(name))
        .await?;
    let dir = tempfile::tempdir()?;
    let c = start_controller(&server, dir.path(), &[]).await?;
    wait_leading(&c, START).await?;
    let svc = svc(name);
    let agent = ApplyingAgent::start(node, svc.clone(), c.api_addr);
    // warm -> zero as soon as two pods are ready (the test sets that), unless demand.
    let policy = controller_support::policy(
        name,
        serde_json::json!({
            "target": {"deployment": name, "service": name},
            "initialState": "zero",
            "states": [{"name": "zero", "replicas": 0}, {"name": "warm", "replicas": 1}],
            "transitions": [
                {"from": "zero", "to": "warm", "when": "demand"},
                {"from": "warm", "to": "zero", "when": "replicas.ready >= 2"},
            ],
        }),
    );
    policies.create(&PostParams::default(), &policy).await?;
    wait_replicas(&deployments, name, 0, START).await?;
    let applied = |directive, after_zero| {
        agent
            .applied_from(0)
            .into_iter()
            .rfind(|d: &ServiceDirective| d.directive == directive && d.after_zero == after_zero)
    };
    let sleep = applied(nemesis_common::wire::Directive::Sleep, false)
        .context("the agent applied the Sleep before the scale to zero")?;

    // The flight begins under the Sleep: its first wake-up wakes the target.
    wake_forwarded(&c, node, &svc, sleep.epoch).await?;
    wait_replicas(&deployments, name, 1, START).await?;
    let woken =
        eventually("the agent applying the wake's Follow", START, || async {
            Ok(applied(nemesis_common::wire::Directive::Follow, true)
                .filter(|d| d.epoch > sleep.epoch))
        })
        .await?;
    set_ready(&deployments, name, 1).await?;
    // The same flight's late wake-up, once the wake is over (forwarded, not deduplicated).
    wake_forwarded(&c, node, &svc, sleep.epoch).await?;
    set_ready(&deployments, name, 2).await?;
    // Without the fix the sleep waits out the demand window (60 s).
    let asleep = Duration::from_secs(20);
    wait_replicas(&deployments, name, 0, asleep)
        .await
        .context("a late wake-up held the sleep off")?;

    // New demand: a flight begun after the agent applied the next wake's Follow.
    set_ready(&deployments, name, 0).await?;
    let sleep2 =
        eventually("the agent applying the second Sleep", START, || async {
            Ok(applied(nemesis_common::wire::Directive::Sleep, false)
                .filter(|d| d.epoch > woken.epoch))
        })
        .await?;
    wake_forwarded(&c, node, &svc, sleep2.epoch).await?;
    wait_replicas(&deployments, name, 1, START).await?;
    let woken2 = eventually(
        "the agent applying the second wake's Follow",
        START,
        || async {
            Ok(applied(nemesis_common::wire::Directive::Follow, true)
                .filter(|d| d.epoch > sleep2.epoch))
        },
    )
    .await?;
    set_ready(&deployments, name, 1).await?;
    wake_forwarded(&c, node, &svc, woken2.epoch).await?;
    set_ready(&deployments, name, 2).await?;
    tokio::time::sleep(asleep).await;
    assert_eq!(
        replicas(&deployments, name).await?,
        1,
        "a wake-up of new demand (its flight began after the wake reached the agent) must hold the sleep"
    );
    assert_eq!(
        log.seen().get(..5),
        Some(&[1, 0, 1, 0, 1][..]),
        "two sleeps, two wakes"
    );
    c.shutdown().await;
    Ok(())
}
