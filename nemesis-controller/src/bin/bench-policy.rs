//! `policy_decide_10k_ms` (formerly `policy_tick_10k_ms`): the time of the pure decision
//! function (no I/O, no status write) over 10,000 compiled policies (half the
//! short form, half multi-state automata with Prometheus metrics, alerts, schedules and
//! `for` windows), each with realistic observations and warmed-up engine state. Prints
//! the median of several runs as `policy_decide_10k_ms=<ms>` for `cargo xtask bench`;
//! bench-status (tests crate) times a tick with its status writes to an API server.

use anyhow::{Context, Result};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use nemesis_controller::engine::{ConnectionSample, Decision, Observations, Sample, State, decide};
use nemesis_controller::policy::{CompiledPolicy, ScalingPolicySpec, compile};
use std::hint::black_box;
use std::time::Instant;

const POLICIES: usize = 10_000;
const RUNS: usize = 31;

/// A small deterministic generator, so every run measures the same mix.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn short_form(i: usize, rng: &mut Rng) -> String {
    format!(
        "target: {{deployment: web-{i}, service: web-{i}}}\nmaxReplicas: {}\ntargetValue: {}\nidleTimeout: {}m\n",
        2 + rng.below(8),
        10 + rng.below(90),
        1 + rng.below(15)
    )
}

fn automaton(i: usize, rng: &mut Rng) -> String {
    let schedule = if i.is_multiple_of(3) {
        r#" or schedule("0 8 * * MON-FRI", "Europe/Paris", for 10h)"#
    } else {
        ""
    };
    format!(
        r#"
target: {{deployment: ml-{i}, service: ml-{i}}}
metrics:
  prometheus:
    - {{name: queue, query: "sum(queue{{app=\"ml-{i}\"}})"}}
    - {{name: gpu, query: "avg(gpu{{app=\"ml-{i}\"}})", fallback: 0.5}}
  alerts: [GPUPressure]
initialState: zero
states:
  - {{name: zero, replicas: 0}}
  - name: warm
    range: {{min: 1, max: {max}, metric: queue, target: {target}, targetType: AverageValue}}
  - {{name: burst, replicas: {burst}}}
transitions:
  - {{from: zero, to: warm, when: 'demand or queue > 0 for 30s{schedule}'}}
  - {{from: warm, to: burst, when: "queue > {high} for 1m and gpu < 0.95", cooldown: 2m}}
  - {{from: burst, to: warm, when: "queue < {low} for 5m or alert(GPUPressure)", cooldown: 5m}}
  - {{from: warm, to: zero, when: "(conns.active == 0 and conns.held == 0 and queue == 0) for 15m"}}
"#,
        max = 2 + rng.below(6),
        target = 5 + rng.below(20),
        burst = 8 + rng.below(8),
        high = 40 + rng.below(40),
        low = 5 + rng.below(10),
    )
}

struct World {
    policy: CompiledPolicy,
    state: State,
    obs: Observations,
}

/// Observations as the reconciler would hand them over: fresh connection counts, query
/// results (some failing), the odd alert and wake-up.
fn observe(w: &mut World, rng: &mut Rng, now: DateTime<Utc>) {
    // Sleeping targets see no connections; warm ones are idle a third of the time.
    let active = if w.obs.replicas == 0 || rng.below(3) == 0 {
        0.0
    } else {
        rng.below(200) as f64
    };
    w.obs.connections = Some(ConnectionSample {
        active,
        rate: active / 10.0,
        held: if rng.below(50) == 0 { 1.0 } else { 0.0 },
        at: now,
    });
    for i in 0..w.obs.sources.len() {
        let idle = w.obs.replicas == 0 && rng.below(10) != 0;
        w.obs.sources[i] = (rng.below(20) != 0).then(|| Sample {
            value: if idle { 0.0 } else { rng.below(100) as f64 },
            at: now,
        });
    }
    for a in w.obs.alerts.iter_mut() {
        *a = (rng.below(40) == 0).then_some(now);
    }
    if rng.below(400) == 0 {
        w.obs.last_demand = Some(now);
    }
}

fn apply(w: &mut World, d: &Decision) {
    w.obs.replicas = d.desired_replicas;
    w.obs.ready_replicas = d.desired_replicas;
    w.state = d.state.clone();
}

fn main() -> Result<()> {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    // Monday 2024-03-04 07:40 UTC: business hours in Paris, so schedules are live.
    let start = Utc.with_ymd_and_hms(2024, 3, 4, 7, 40, 0).unwrap();
    let mut worlds = Vec::with_capacity(POLICIES);
    for i in 0..POLICIES {
        let yaml = if i.is_multiple_of(2) {
            short_form(i, &mut rng)
        } else {
            automaton(i, &mut rng)
        };
        let spec: ScalingPolicySpec = serde_norway::from_str(&yaml).context("bench spec parses")?;
        let policy = compile(&spec).with_context(|| format!("bench policy {i} is valid"))?;
        // Spread the starting states: a third asleep, some automata bursting.
        let (name, replicas) = match (i % 2, i % 6) {
            (_, 0 | 3) => ("zero", 0),
            (1, 5) => ("burst", 8),
            _ => ("warm", 1),
        };
        let state = State::resume(&policy, name, start, start);
        let mut obs = Observations::for_policy(&policy);
        obs.replicas = replicas;
        obs.ready_replicas = replicas;
        worlds.push(World { policy, state, obs });
    }
    // Warm up: a few minutes of ticks, so states spread over zero/warm/burst and `for`
    // windows are running when the measurement starts.
    let mut now = start;
    for _ in 0..20 {
        for w in worlds.iter_mut() {
            observe(w, &mut rng, now);
            let d = decide(&w.policy, &w.state, &w.obs, now);
            apply(w, &d);
        }
        now += TimeDelta::seconds(15);
    }
    for w in worlds.iter_mut() {
        observe(w, &mut rng, now);
    }
    let states: std::collections::BTreeMap<String, usize> =
        worlds.iter().fold(Default::default(), |mut m, w| {
            *m.entry(w.state.name(&w.policy).to_string()).or_default() += 1;
            m
        });
    let windows: usize = worlds.iter().map(|w| w.state.pending_windows()).sum();
    eprintln!("states before the measured tick: {states:?}; running `for` windows: {windows}");

    let mut times = Vec::with_capacity(RUNS);
    let mut decisions: Vec<Decision> = Vec::with_capacity(POLICIES);
    for _ in 0..RUNS {
        decisions.clear();
        let t = Instant::now();
        for w in &worlds {
            decisions.push(decide(&w.policy, &w.state, &w.obs, now));
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        black_box(&decisions);
    }
    times.sort_by(f64::total_cmp);
    let median = times[RUNS / 2];
    eprintln!(
        "one evaluation of {POLICIES} policies: min {:.3} ms, median {median:.3} ms, max {:.3} ms",
        times[0],
        times[RUNS - 1]
    );
    println!("policy_decide_10k_ms={median:.3}");
    Ok(())
}
