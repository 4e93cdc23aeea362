//! Property checks of the engine over many random (but seeded, reproducible) worlds:
//! whatever the metrics, outages, alerts and wake-ups do, the invariants hold.

mod policy_support;

use chrono::TimeDelta;
use nemesis_controller::engine::{Decision, Hold, MAX_REQUEUE, MIN_REQUEUE, Observations, decide};
use nemesis_controller::policy::Replicas;
use policy_support::{Sim, mins, secs};

/// xorshift64*: tiny, seeded, good enough to explore.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const POLICY: &str = r#"
target: {deployment: ml, service: ml}
metrics:
  prometheus: [{name: queue, query: q}]
  alerts: [GPUPressure]
initialState: zero
states:
  - {name: zero, replicas: 0}
  - {name: warm, range: {min: 1, max: 6, metric: queue, target: 10, targetType: AverageValue}}
  - {name: burst, replicas: 10}
transitions:
  - {from: zero, to: warm, when: "demand or queue > 0 for 30s"}
  - {from: warm, to: burst, when: "queue > 80 for 1m", cooldown: 1m}
  - {from: burst, to: warm, when: "queue < 20 for 2m or alert(GPUPressure)", cooldown: 3m}
  - {from: warm, to: zero, when: "(conns.active == 0 and queue == 0) for 5m"}
"#;

const SHORT: &str = "
target: {deployment: web, service: web}
maxReplicas: 5
targetValue: 10
idleTimeout: 3m
";

/// Randomizes the world a little before each tick.
fn perturb(sim: &mut Sim, rng: &mut Rng) {
    if rng.chance(10) {
        sim.conns = if rng.chance(15) {
            None
        } else {
            let active = if rng.chance(50) {
                0.0
            } else {
                rng.below(80) as f64
            };
            let held = if rng.chance(85) {
                0.0
            } else {
                rng.below(5) as f64
            };
            Some((active, if active > 0.0 { 1.0 } else { 0.0 }, held))
        };
    }
    if sim.p.source_index("queue").is_some() && rng.chance(10) {
        let v = if rng.chance(15) {
            None
        } else if rng.chance(40) {
            Some(0.0)
        } else {
            Some(rng.below(150) as f64)
        };
        sim.set_source("queue", v);
    }
    if sim.p.alert_index("GPUPressure").is_some() && rng.chance(3) {
        let firing = rng.chance(50).then_some(sim.now);
        sim.obs.set_alert(&sim.p, "GPUPressure", firing);
    }
    if rng.chance(3) {
        sim.demand_now();
    }
    if rng.chance(5) {
        sim.ready_after = if rng.chance(20) {
            None
        } else {
            Some(secs(rng.below(120) as i64))
        };
    }
}

/// Runs a random world; `check(state name before, observations decided on, sim after,
/// decision)` runs after every tick.
fn explore(yaml: &str, seed: u64, mut check: impl FnMut(&str, &Observations, &Sim, &Decision)) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut sim = Sim::new(yaml, 0);
    for _ in 0..1500 {
        perturb(&mut sim, &mut rng);
        let before = sim.state_name().to_string();
        let d = sim.tick();
        let (state, obs) = sim.decided_on.clone().unwrap();
        // Deterministic: the same inputs give the same decision.
        assert_eq!(decide(&sim.p, &state, &obs, sim.now), d, "seed {seed}");
        check(&before, &obs, &sim, &d);
        sim.now += secs(1 + rng.below(20) as i64);
    }
}

#[test]
fn replicas_always_fit_the_state_decided() {
    for seed in 0..60 {
        explore(POLICY, seed, |_, _, after, d| {
            let state = &after.p.states()[after.p.state_index(after.state_name()).unwrap()];
            match &state.replicas {
                Replicas::Fixed(n) => assert_eq!(d.desired_replicas, *n, "seed {seed}"),
                Replicas::Range(r) => assert!(
                    (r.min..=r.max).contains(&d.desired_replicas),
                    "seed {seed}: {} outside {}..{}",
                    d.desired_replicas,
                    r.min,
                    r.max
                ),
            }
            assert!(
                (MIN_REQUEUE..=MAX_REQUEUE).contains(&d.requeue_after),
                "seed {seed}"
            );
        });
    }
}

#[test]
fn transitions_follow_declared_edges_one_at_a_time() {
    let edges = [
        ("zero", "warm"),
        ("warm", "burst"),
        ("burst", "warm"),
        ("warm", "zero"),
    ];
    for seed in 0..60 {
        explore(POLICY, seed, |before, _, after, d| match &d.transition {
            Some(t) => {
                assert_eq!(t.from, before, "seed {seed}");
                assert_eq!(t.to, after.state_name(), "seed {seed}");
                assert!(
                    edges.contains(&(t.from.as_str(), t.to.as_str())),
                    "seed {seed}: {t:?}"
                );
            }
            None => assert_eq!(before, after.state_name(), "seed {seed}"),
        });
    }
}

#[test]
fn nothing_running_is_put_to_sleep_on_missing_data_or_before_readiness() {
    let mut sleeps = 0;
    let mut guarded = 0;
    for seed in 0..60 {
        for yaml in [POLICY, SHORT] {
            explore(yaml, seed, |_, obs, _, d| {
                guarded += usize::from(d.hold.is_some_and(|h| {
                    matches!(h, Hold::ReadinessPending { .. } | Hold::MissingMetric(_))
                }));
                if obs.replicas > 0 && d.desired_replicas == 0 {
                    sleeps += 1;
                    assert!(
                        !obs.awaiting_readiness(),
                        "seed {seed}: slept before a pod was ready since the wake"
                    );
                    let t = d
                        .transition
                        .as_ref()
                        .expect("only a transition sleeps here");
                    assert!(
                        t.values.iter().all(|(_, v)| v.is_some()),
                        "seed {seed}: slept on missing data: {t:?}"
                    );
                }
            });
        }
    }
    // The worlds really went to sleep, and the guards really held some sleeps back.
    assert!(sleeps > 100, "only {sleeps} sleeps explored");
    assert!(guarded > 100, "only {guarded} guarded decisions explored");
}

#[test]
fn the_short_form_sleeps_only_after_a_full_idle_window() {
    let mut sleeps = 0;
    for seed in 0..80 {
        let mut rng = Rng(seed * 7919 + 1);
        let mut sim = Sim::new(SHORT, 1);
        sim.state = nemesis_controller::engine::State::resume(&sim.p, "warm", sim.now, sim.now);
        let mut busy_at = sim.now;
        for _ in 0..1500 {
            perturb(&mut sim, &mut rng);
            // Anything but a fresh "all zero" restarts the idle clock.
            if sim.conns != Some((0.0, 0.0, 0.0)) {
                busy_at = sim.now;
            }
            let d = sim.tick();
            if d.transition.as_ref().is_some_and(|t| t.to == "zero") {
                sleeps += 1;
                assert!(
                    sim.now - busy_at >= mins(3),
                    "seed {seed}: slept {} after activity",
                    sim.now - busy_at
                );
            }
            sim.now += TimeDelta::seconds(1 + rng.below(15) as i64);
        }
    }
    assert!(sleeps > 50, "only {sleeps} sleeps explored");
}
