//! A virtual-time world for the decision engine: observations are stamped with the
//! virtual clock at every tick, the "reconciler" applies each decision at once, and pods
//! become ready a set time after a wake. Shared by the policy_* tests.
#![allow(dead_code)]

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use nemesis_controller::engine::{ConnectionSample, Decision, Observations, Sample, State, decide};
use nemesis_controller::policy::{CompiledPolicy, ScalingPolicySpec, compile};

/// Monday 2024-03-04 00:00 UTC.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 3, 4, 0, 0, 0).unwrap()
}

pub fn secs(n: i64) -> TimeDelta {
    TimeDelta::seconds(n)
}

pub fn mins(n: i64) -> TimeDelta {
    TimeDelta::minutes(n)
}

pub fn policy(yaml: &str) -> CompiledPolicy {
    let spec: ScalingPolicySpec = serde_norway::from_str(yaml).expect("test spec parses");
    compile(&spec).unwrap_or_else(|e| panic!("test policy is valid: {e}"))
}

pub struct Sim {
    pub p: CompiledPolicy,
    pub state: State,
    pub obs: Observations,
    pub now: DateTime<Utc>,
    /// (active, rate, held) the agents report; `None`: no agent reports.
    pub conns: Option<(f64, f64, f64)>,
    /// Per Prometheus source: the value a query returns now; `None`: the query fails.
    pub sources: Vec<Option<f64>>,
    /// Pods become ready this long after a wake (`None`: never).
    pub ready_after: Option<TimeDelta>,
    /// Every transition that fired: (when, from, to).
    pub transitions: Vec<(DateTime<Utc>, String, String)>,
    pub last: Option<Decision>,
    /// The engine state and observations the last decision was made on.
    pub decided_on: Option<(State, Observations)>,
}

impl Sim {
    /// A world where the target currently runs `replicas` ready pods.
    pub fn new(yaml: &str, replicas: u32) -> Self {
        let p = policy(yaml);
        let state = State::initial(&p, t0());
        let mut obs = Observations::for_policy(&p);
        obs.replicas = replicas;
        obs.ready_replicas = replicas;
        let sources = vec![None; p.sources().len()];
        Self {
            p,
            state,
            obs,
            now: t0(),
            conns: Some((0.0, 0.0, 0.0)),
            sources,
            ready_after: Some(secs(20)),
            transitions: Vec::new(),
            last: None,
            decided_on: None,
        }
    }

    pub fn set_source(&mut self, name: &str, value: Option<f64>) {
        let i = self
            .p
            .source_index(name)
            .expect("the policy has this source");
        self.sources[i] = value;
    }

    pub fn demand_now(&mut self) {
        self.obs.last_demand = Some(self.now);
    }

    pub fn state_name(&self) -> &str {
        self.state.name(&self.p)
    }

    /// One decision at `now`, applied at once.
    pub fn tick(&mut self) -> Decision {
        let now = self.now;
        self.obs.connections = self.conns.map(|(active, rate, held)| ConnectionSample {
            active,
            rate,
            held,
            at: now,
        });
        for (i, v) in self.sources.iter().enumerate() {
            self.obs.sources[i] = v.map(|value| Sample { value, at: now });
        }
        if let (Some(woke), Some(delay)) = (self.obs.last_wake, self.ready_after)
            && now >= woke + delay
            && self.obs.replicas > 0
        {
            self.obs.ready_since_wake = true;
            self.obs.ready_replicas = self.obs.replicas;
        }
        self.decided_on = Some((self.state.clone(), self.obs.clone()));
        let d = decide(&self.p, &self.state, &self.obs, now);
        if d.wakes(&self.obs) {
            self.obs.last_wake = Some(now);
            self.obs.ready_since_wake = false;
            self.obs.ready_replicas = 0;
        }
        self.obs.replicas = d.desired_replicas;
        if self.obs.replicas == 0 {
            self.obs.ready_replicas = 0;
        } else if self.obs.ready_since_wake || self.obs.last_wake.is_none() {
            self.obs.ready_replicas = self.obs.replicas;
        }
        if let Some(t) = &d.transition {
            self.transitions.push((now, t.from.clone(), t.to.clone()));
        }
        self.state = d.state.clone();
        self.last = Some(d.clone());
        d
    }

    /// Ticks every `step` for `total`, starting now; returns the decisions.
    pub fn run(&mut self, total: TimeDelta, step: TimeDelta) -> Vec<Decision> {
        let end = self.now + total;
        let mut out = Vec::new();
        while self.now < end {
            out.push(self.tick());
            self.now += step;
        }
        out
    }

    /// Ticks until the state is `name`, or panics after `limit` of virtual time.
    pub fn run_until_state(
        &mut self,
        name: &str,
        limit: TimeDelta,
        step: TimeDelta,
    ) -> DateTime<Utc> {
        let end = self.now + limit;
        while self.now <= end {
            self.tick();
            if self.state_name() == name {
                return self.now;
            }
            self.now += step;
        }
        panic!(
            "never reached state `{name}` within {limit}; in `{}`",
            self.state_name()
        );
    }
}
