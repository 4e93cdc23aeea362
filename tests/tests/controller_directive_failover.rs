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
}

impl SimAgent {
    fn new(node: &str) -> Self {
        Self {
            node: node.into(),
            instance: format!("{node}-{:08x}", rand::random::<u32>()),
            view: DirectiveView::default(),
            http: Http::default(),
        }
    }

    /// One heartbeat to `addr`; the reply is applied to the view.
    async fn beat(&mut self, addr: SocketAddr) -> anyhow::Result<(HeartbeatReply, ViewUpdate)> {
        let hb = Heartbeat {
            node: self.node.clone(),
            instance: self.instance.clone(),
            services: vec![],
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
