//! The decision engine, table-tested in virtual time: idle windows, wakes, `for`
//! continuity, cooldowns and hysteresis, missing data, readiness, alerts, schedules, the
//! HPA formula with tolerance and step rates, and requeue hints.

mod policy_support;

use chrono::{TimeDelta, TimeZone, Utc};
use nemesis_controller::engine::{
    Hold, MAX_REQUEUE, MIN_REQUEUE, Observations, State, decide, metric_values,
};
use policy_support::{Sim, mins, policy, secs, t0};
use std::time::Duration;

const SHORT: &str = "
target: {deployment: web, service: web}
maxReplicas: 4
targetValue: 10
idleTimeout: 5m
";

const ML: &str = r#"
target: {deployment: ml, service: ml}
metrics:
  prometheus:
    - {name: queue, query: q}
  alerts: [GPUPressure]
initialState: zero
states:
  - {name: zero, replicas: 0}
  - {name: warm, replicas: 2}
  - {name: burst, replicas: 8}
transitions:
  - {from: zero, to: warm, when: demand}
  - {from: warm, to: burst, when: "queue > 40 for 30s"}
  - {from: burst, to: warm, when: "queue < 10 for 1m or alert(GPUPressure)", cooldown: 2m}
  - {from: warm, to: zero, when: "(conns.active == 0 and queue == 0) for 10m"}
"#;

/// ML, started warm with 2 ready pods and an empty queue.
fn ml_warm() -> Sim {
    let mut sim = Sim::new(&ML.replace("initialState: zero", "initialState: warm"), 2);
    sim.set_source("queue", Some(0.0));
    sim
}

// === short form: sleep and wake ===

#[test]
fn an_idle_target_sleeps_exactly_after_the_idle_window() {
    let mut sim = Sim::new(SHORT, 1);
    let asleep_at = sim.run_until_state("zero", mins(10), secs(5));
    assert_eq!(asleep_at - t0(), mins(5));
    let d = sim.last.clone().unwrap();
    assert_eq!(d.desired_replicas, 0);
    assert_eq!(
        d.reason(&sim.p),
        "warm -> zero: `(conns.active == 0 and conns.held == 0) for 5m and conns.rate == 0 for 4m` (conns.active=0, conns.held=0, conns.rate=0)"
    );
}

#[test]
fn one_connection_inside_the_idle_window_restarts_it() {
    let mut sim = Sim::new(SHORT, 1);
    sim.run(mins(4), secs(5));
    sim.conns = Some((1.0, 0.1, 0.0));
    sim.tick();
    sim.now += secs(5);
    sim.conns = Some((0.0, 0.0, 0.0));
    let restarted = sim.now;
    let asleep_at = sim.run_until_state("zero", mins(10), secs(5));
    assert_eq!(asleep_at - restarted, mins(5));
}

#[test]
fn a_connect_seen_only_in_the_rate_puts_the_idle_window_after_it_not_after_the_rate_window() {
    // Opened and closed between two samples: `conns.active` never sees it, the rate
    // (averaged over 1m) stays above 0 for a minute. The target sleeps the idle timeout
    // after the connect: neither before, nor a rate window later.
    let mut sim = Sim::new(SHORT, 1);
    sim.run(mins(2), secs(5));
    let connect = sim.now;
    sim.conns = Some((0.0, 1.0 / 60.0, 0.0));
    sim.run(mins(1), secs(5));
    sim.conns = Some((0.0, 0.0, 0.0));
    let asleep_at = sim.run_until_state("zero", mins(10), secs(5));
    assert_eq!(asleep_at - connect, mins(5));
}

#[test]
fn an_idle_timeout_shorter_than_a_minute_sleeps_that_long_after_the_last_connect() {
    // Tried on a real cluster: a 20s policy slept 65 s after its last connection (the
    // 1m rate window kept `conns.rate` above 0 for a minute). The rate here comes from
    // the controller's own window over the agents' connect total, as in the actor.
    use nemesis_controller::reconcile::connections::RateWindow;
    let mut sim = Sim::new(
        "target: {deployment: web, service: web}\nidleTimeout: 20s\n",
        1,
    );
    let mut rates = RateWindow::new(sim.p.rate_window());
    let mut total = 0u64;
    let mut step = |sim: &mut Sim, total: u64| {
        let rate = rates.push(sim.now, total);
        sim.conns = Some((0.0, rate, 0.0));
        sim.tick();
        sim.now += secs(1);
    };
    // Short connections every second for half a minute, seen only in the connect total.
    let mut connect = sim.now;
    for _ in 0..30 {
        total += 1;
        connect = sim.now;
        step(&mut sim, total);
        assert_eq!(sim.state_name(), "warm", "asleep while busy");
    }
    while sim.state_name() != "zero" {
        assert!(
            sim.now - connect <= secs(60),
            "still warm 60 s after the connect"
        );
        step(&mut sim, total);
    }
    let asleep_after = sim.now - secs(1) - connect;
    assert!(
        asleep_after >= secs(20) && asleep_after <= secs(21),
        "asleep {asleep_after} after the last connect"
    );
}

#[test]
fn a_wake_up_scales_a_sleeping_target_at_once() {
    let mut sim = Sim::new(SHORT, 1);
    sim.run_until_state("zero", mins(10), secs(5));
    sim.now += mins(3);
    sim.demand_now();
    let d = sim.tick();
    assert_eq!(sim.state_name(), "warm");
    assert_eq!(d.desired_replicas, 1);
    assert_eq!(d.requeue_after, MIN_REQUEUE);
    assert_eq!(
        d.reason(&sim.p),
        "zero -> warm: `demand or conns.active > 0` (demand=true, conns.active=0)"
    );
    assert_eq!(sim.obs.last_wake, Some(sim.now));
}

#[test]
fn held_connections_count_as_demand() {
    let mut sim = Sim::new(SHORT, 1);
    sim.run_until_state("zero", mins(10), secs(5));
    sim.now += secs(30);
    sim.conns = Some((0.0, 0.0, 3.0));
    sim.tick();
    assert_eq!(sim.state_name(), "warm");
}

#[test]
fn a_wake_up_from_before_the_sleep_does_not_wake_it_again() {
    let mut sim = Sim::new(SHORT, 1);
    sim.demand_now();
    sim.run_until_state("zero", mins(10), secs(5));
    sim.run(mins(5), secs(5));
    assert_eq!(sim.state_name(), "zero");
    assert_eq!(sim.obs.replicas, 0);
}

#[test]
fn following_the_requeue_hint_sleeps_on_time_with_few_evaluations() {
    let mut sim = Sim::new(SHORT, 1);
    let mut evaluations = 0;
    while sim.state_name() != "zero" {
        let d = sim.tick();
        evaluations += 1;
        assert!(evaluations < 50, "too many evaluations");
        sim.now += TimeDelta::from_std(d.requeue_after).unwrap();
    }
    assert_eq!(sim.transitions[0].0 - t0(), mins(5));
    // 5 minutes at the 30 s maximum, plus the first.
    assert!(evaluations <= 12, "{evaluations} evaluations");
}

#[test]
fn the_requeue_hint_points_at_the_end_of_a_running_window() {
    let mut sim = Sim::new(SHORT, 1);
    sim.tick();
    sim.now += mins(4) + secs(50);
    assert_eq!(sim.tick().requeue_after, Duration::from_secs(10));
    sim.conns = Some((5.0, 1.0, 0.0));
    sim.now += secs(1);
    // No window runs and nothing changes: the longest wait.
    let d = sim.tick();
    assert_eq!(d.requeue_after, MAX_REQUEUE);
    assert_eq!(d.reason(&sim.p), "steady");
}

// === missing data never sleeps ===

#[test]
fn silent_agents_never_put_a_target_to_sleep() {
    let mut sim = Sim::new(SHORT, 1);
    sim.conns = None;
    sim.run(mins(30), secs(10));
    assert_eq!(sim.state_name(), "warm");
    assert_eq!(sim.obs.replicas, 1);
}

#[test]
fn stale_connection_counts_count_as_missing() {
    let p = policy(SHORT);
    let mut state = State::initial(&p, t0());
    let mut obs = Observations::for_policy(&p);
    obs.replicas = 1;
    obs.ready_replicas = 1;
    obs.connections = Some(nemesis_controller::engine::ConnectionSample {
        active: 0.0,
        rate: 0.0,
        held: 0.0,
        at: t0(),
    });
    for minute in 0..20 {
        let d = decide(&p, &state, &obs, t0() + mins(minute));
        state = d.state;
    }
    assert_eq!(state.name(&p), "warm");
}

#[test]
fn a_failing_query_holds_the_state_instead_of_sleeping() {
    let mut sim = ml_warm();
    sim.set_source("queue", None);
    sim.run(mins(30), secs(15));
    assert_eq!(sim.state_name(), "warm");
    assert!(sim.transitions.is_empty());
}

#[test]
fn an_or_with_a_missing_side_fires_but_never_into_zero() {
    let yaml = r#"
target: {deployment: ml, service: ml}
metrics:
  prometheus: [{name: queue, query: q}]
initialState: warm
states:
  - {name: zero, replicas: 0}
  - {name: warm, replicas: 2}
  - {name: big, replicas: 6}
transitions:
  - {from: warm, to: big, when: "queue > 100 or conns.active > 50"}
  - {from: big, to: zero, when: "queue == 0 or conns.active == 0"}
"#;
    let mut sim = Sim::new(yaml, 2);
    sim.conns = Some((80.0, 5.0, 0.0));
    let d = sim.tick();
    assert_eq!(sim.state_name(), "big", "the known side of `or` is enough");
    assert_eq!(
        d.reason(&sim.p),
        "warm -> big: `queue > 100 or conns.active > 50` (queue=missing, conns.active=80)"
    );
    sim.now += secs(5);
    sim.conns = Some((0.0, 0.0, 0.0));
    let d = sim.tick();
    assert_eq!(sim.state_name(), "big");
    assert_eq!(d.hold, Some(Hold::MissingMetric(p_source(&sim, "queue"))));
    assert_eq!(d.reason(&sim.p), "held: `queue` is missing");
    sim.set_source("queue", Some(3.0));
    sim.now += secs(5);
    sim.tick();
    assert_eq!(
        sim.state_name(),
        "zero",
        "with the data back, the known-true side decides"
    );
}

fn p_source(sim: &Sim, name: &str) -> nemesis_controller::policy::expr::Metric {
    nemesis_controller::policy::expr::Metric::Source(sim.p.source_index(name).unwrap() as u32)
}

#[test]
fn a_declared_fallback_stands_in_for_a_failing_query() {
    let yaml = ML.replace(
        "{name: queue, query: q}",
        "{name: queue, query: q, fallback: 0}",
    );
    let mut sim = Sim::new(&yaml.replace("initialState: zero", "initialState: warm"), 2);
    sim.set_source("queue", None);
    let at = sim.run_until_state("zero", mins(20), secs(15));
    assert_eq!(at - t0(), mins(10));
    assert!(sim.last.unwrap().reason(&sim.p).contains("queue=0"));
}

#[test]
fn division_by_zero_is_unknown_not_true() {
    let yaml = r#"
target: {deployment: w}
metrics:
  prometheus: [{name: queue, query: q}]
initialState: a
states: [{name: a, replicas: 0}, {name: b, replicas: 1}]
transitions: [{from: a, to: b, when: "queue / replicas > 5"}]
"#;
    let mut sim = Sim::new(yaml, 0);
    sim.set_source("queue", Some(10.0));
    sim.tick();
    assert_eq!(sim.state_name(), "a");
}

// === readiness budget ===

#[test]
fn pods_not_ready_since_the_wake_are_never_put_back_to_sleep() {
    let mut sim = Sim::new(SHORT, 0);
    sim.state = State::resume(&sim.p, "zero", t0(), t0());
    sim.ready_after = None;
    sim.demand_now();
    sim.tick();
    assert_eq!(sim.state_name(), "warm");
    sim.now += secs(5);
    let decisions = sim.run(mins(30), secs(10));
    assert_eq!(sim.state_name(), "warm");
    assert_eq!(sim.obs.replicas, 1);
    let held = decisions.iter().find(|d| d.hold.is_some()).unwrap();
    assert!(matches!(held.hold, Some(Hold::ReadinessPending { .. })));
    // The default budget is 10 minutes; past it the decision says so.
    assert!(!decisions[50].readiness_overdue);
    assert!(decisions.last().unwrap().readiness_overdue);
    assert!(
        decisions
            .last()
            .unwrap()
            .reason(&sim.p)
            .contains("readiness budget")
    );
    // Once a pod is ready, the long-true idle window lets it sleep at once.
    sim.ready_after = Some(secs(0));
    sim.tick();
    sim.now += secs(10);
    sim.tick();
    assert_eq!(sim.state_name(), "zero");
}

#[test]
fn a_wake_up_during_the_idle_window_blocks_the_sleep() {
    let mut sim = ml_warm();
    sim.run(mins(10), secs(5));
    sim.demand_now();
    let d = sim.tick();
    assert_eq!(sim.state_name(), "warm");
    assert_eq!(d.hold, Some(Hold::DemandPending));
}

// === `for` continuity, cooldowns, hysteresis ===

#[test]
fn a_sustained_condition_needs_continuous_truth() {
    let mut sim = ml_warm();
    sim.set_source("queue", Some(50.0));
    sim.run(secs(25), secs(5));
    sim.set_source("queue", Some(30.0));
    sim.run(secs(5), secs(5));
    sim.set_source("queue", Some(50.0));
    sim.run(secs(25), secs(5));
    assert_eq!(
        sim.state_name(),
        "warm",
        "the dip restarted the 30 s window"
    );
    let start = sim.now - secs(25);
    let at = sim.run_until_state("burst", mins(1), secs(5));
    assert_eq!(at - start, secs(30));
    assert_eq!(sim.obs.replicas, 8);
}

#[test]
fn a_cooldown_holds_a_true_condition_until_it_passes() {
    let mut sim = ml_warm();
    sim.set_source("queue", Some(50.0));
    let burst_at = sim.run_until_state("burst", mins(2), secs(5));
    sim.now += secs(5);
    sim.set_source("queue", Some(0.0));
    let decisions = sim.run(mins(1) + secs(30), secs(5));
    assert_eq!(sim.state_name(), "burst");
    let held = decisions.last().unwrap();
    assert_eq!(
        held.hold,
        Some(Hold::Cooldown {
            transition: 2,
            until: burst_at + mins(2)
        })
    );
    let back_at = sim.run_until_state("warm", mins(2), secs(5));
    assert_eq!(back_at - burst_at, mins(2));
}

#[test]
fn a_metric_hovering_at_a_threshold_does_not_flap() {
    let mut sim = ml_warm();
    for i in 0..240 {
        sim.set_source("queue", Some(if i % 4 < 2 { 45.0 } else { 35.0 }));
        sim.tick();
        sim.now += secs(5);
    }
    assert!(sim.transitions.is_empty(), "{:?}", sim.transitions);
}

#[test]
fn bursts_and_lulls_change_state_no_faster_than_windows_and_cooldowns_allow() {
    let mut sim = ml_warm();
    // A square wave: 90 s at 100, 90 s at 0, for an hour.
    for i in 0..720 {
        sim.set_source("queue", Some(if (i / 18) % 2 == 0 { 100.0 } else { 0.0 }));
        sim.conns = Some((5.0, 1.0, 0.0));
        sim.tick();
        sim.now += secs(5);
    }
    let gaps: Vec<TimeDelta> = sim
        .transitions
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .collect();
    assert!(!sim.transitions.is_empty());
    assert!(gaps.iter().all(|g| *g >= secs(30)), "{gaps:?}");
    let burst_to_warm: Vec<_> = sim.transitions.iter().filter(|t| t.1 == "burst").collect();
    for t in &burst_to_warm {
        let entered = sim
            .transitions
            .iter()
            .rev()
            .find(|e| e.2 == "burst" && e.0 < t.0)
            .unwrap();
        assert!(t.0 - entered.0 >= mins(2), "cooldown respected");
    }
}

#[test]
fn only_one_transition_fires_per_decision() {
    let yaml = r#"
target: {deployment: w}
initialState: a
states: [{name: a, replicas: 0}, {name: b, replicas: 1}, {name: c, replicas: 2}]
transitions:
  - {from: a, to: b, when: "true"}
  - {from: b, to: c, when: "true"}
"#;
    let mut sim = Sim::new(yaml, 0);
    sim.tick();
    assert_eq!(sim.state_name(), "b");
    sim.now += secs(1);
    sim.tick();
    assert_eq!(sim.state_name(), "c");
}

#[test]
fn the_first_listed_true_transition_wins() {
    let yaml = r#"
target: {deployment: w}
initialState: a
states: [{name: a, replicas: 1}, {name: b, replicas: 2}, {name: c, replicas: 3}]
transitions:
  - {from: a, to: c, when: "replicas >= 1"}
  - {from: a, to: b, when: "true"}
"#;
    let mut sim = Sim::new(yaml, 1);
    sim.tick();
    assert_eq!(sim.state_name(), "c");
}

// === alerts and schedules ===

#[test]
fn a_firing_alert_fires_its_transition() {
    let mut sim = ml_warm();
    sim.set_source("queue", Some(50.0));
    let burst_at = sim.run_until_state("burst", mins(2), secs(5));
    sim.now = burst_at + mins(3);
    sim.set_source("queue", Some(60.0));
    sim.tick();
    assert_eq!(sim.state_name(), "burst");
    sim.now += secs(5);
    let since = sim.now - secs(1);
    assert!(sim.obs.set_alert(&sim.p, "GPUPressure", Some(since)));
    let d = sim.tick();
    assert_eq!(sim.state_name(), "warm");
    assert_eq!(
        d.reason(&sim.p),
        "burst -> warm: `queue < 10 for 1m or alert(GPUPressure)` (queue=60)"
    );
}

#[test]
fn a_resolved_alert_does_not_fire() {
    let yaml = r#"
target: {deployment: w}
metrics: {alerts: [GPUPressure]}
initialState: a
states: [{name: a, replicas: 2}, {name: b, replicas: 1}]
transitions: [{from: a, to: b, when: "alert(GPUPressure) for 1m"}]
"#;
    let mut sim = Sim::new(yaml, 2);
    sim.obs.set_alert(&sim.p, "GPUPressure", Some(t0()));
    sim.run(secs(50), secs(10));
    sim.obs.set_alert(&sim.p, "GPUPressure", None);
    sim.run(secs(30), secs(10));
    assert_eq!(sim.state_name(), "a");
    sim.obs.set_alert(&sim.p, "GPUPressure", Some(sim.now));
    let start = sim.now;
    let at = sim.run_until_state("b", mins(5), secs(10));
    assert_eq!(at - start, mins(1));
}

#[test]
fn a_schedule_prewarms_in_business_hours_of_its_own_time_zone() {
    let yaml = r#"
target: {deployment: app, service: app}
initialState: zero
states: [{name: zero, replicas: 0}, {name: warm, replicas: 3}]
transitions:
  - {from: zero, to: warm, when: 'demand or schedule("0 8 * * MON-FRI", "Europe/Paris", for 10h)'}
  - {from: warm, to: zero, when: 'conns.active == 0 for 15m and not schedule("0 8 * * MON-FRI", "Europe/Paris", for 10h)'}
"#;
    let mut sim = Sim::new(yaml, 0);
    let paris = |d: u32, h: u32, m: u32| {
        chrono_tz::Europe::Paris
            .with_ymd_and_hms(2024, 3, d, h, m, 0)
            .unwrap()
            .with_timezone(&Utc)
    };
    // Monday 4 March: the window opens at 08:00 Paris (07:00 UTC).
    sim.now = paris(4, 7, 0);
    let up = sim.run_until_state("warm", TimeDelta::hours(2), secs(30));
    assert_eq!(up, paris(4, 8, 0));
    // Idle all day, but the window keeps it warm until 18:00, then 15 idle minutes pass.
    let down = sim.run_until_state("zero", TimeDelta::hours(12), secs(30));
    assert_eq!(down, paris(4, 18, 0));
    // Saturday 9 March: no pre-warm.
    sim.now = paris(9, 7, 0);
    sim.run(TimeDelta::hours(4), mins(1));
    assert_eq!(sim.state_name(), "zero");
}

#[test]
fn the_requeue_hint_wakes_the_engine_when_a_schedule_opens() {
    let yaml = r#"
target: {deployment: app}
initialState: zero
states: [{name: zero, replicas: 0}, {name: warm, replicas: 1}]
transitions: [{from: zero, to: warm, when: 'schedule("0 8 * * *", "UTC", for 1h)'}]
"#;
    let p = policy(yaml);
    let mut obs = Observations::for_policy(&p);
    obs.replicas = 0;
    let now = Utc.with_ymd_and_hms(2024, 3, 4, 7, 59, 50).unwrap();
    let d = decide(&p, &State::initial(&p, now), &obs, now);
    assert_eq!(d.requeue_after, Duration::from_secs(10));
}

// === range states: the HPA formula ===

const RANGE: &str = r#"
target: {deployment: w}
metrics:
  prometheus: [{name: load, query: q}]
initialState: r
states:
  - name: r
    range: {min: 1, max: 20, metric: load, target: 0.6, scaleUp: {maxStep: 4, period: 15s}, scaleDown: {maxStep: 1, period: 30s}}
  - {name: z, replicas: 0}
"#;

#[test]
fn a_value_target_follows_ceil_of_current_times_metric_over_target() {
    for (current, load, want) in [
        (4, 0.9, 6),  // ceil(4 * 1.5)
        (4, 0.63, 4), // within the 10% tolerance
        (4, 0.66, 4), // exactly at the tolerance edge
        (4, 0.7, 5),  // ceil(4 * 1.1667)
        (4, 0.3, 3),  // down: ceil(4 * 0.5) = 2, but only one per period
        (2, 6.0, 6),  // up: ceil(2 * 10) = 20, but only 4 per period
        (1, 0.0, 1),  // never below min
    ] {
        let mut sim = Sim::new(RANGE, current);
        sim.set_source("load", Some(load));
        let d = sim.tick();
        assert_eq!(d.desired_replicas, want, "current {current}, load {load}");
    }
}

#[test]
fn an_average_value_target_divides_the_total_by_the_target() {
    let yaml = RANGE.replace("target: 0.6,", "target: 10, targetType: AverageValue,");
    for (current, load, want) in [(1, 45.0, 5), (5, 52.0, 5), (5, 30.0, 4), (3, 30.0, 3)] {
        let mut sim = Sim::new(&yaml, current);
        sim.set_source("load", Some(load));
        assert_eq!(
            sim.tick().desired_replicas,
            want,
            "current {current}, load {load}"
        );
    }
}

#[test]
fn step_rates_bound_how_fast_replicas_move() {
    let mut sim = Sim::new(RANGE, 1);
    sim.set_source("load", Some(60.0));
    let replicas: Vec<u32> = sim
        .run(mins(1), secs(5))
        .iter()
        .map(|d| d.desired_replicas)
        .collect();
    // +4 per 15 s: 5, then 9 at 15 s, 13 at 30 s, 17 at 45 s, 20 (max) at 60 s.
    assert_eq!(replicas, [5, 5, 5, 9, 9, 9, 13, 13, 13, 17, 17, 17]);
    sim.tick();
    assert_eq!(sim.obs.replicas, 20);
    let held = sim.run(secs(5), secs(5));
    assert_eq!(held[0].desired_replicas, 20);

    sim.set_source("load", Some(0.0));
    let down: Vec<u32> = sim
        .run(mins(2), secs(10))
        .iter()
        .map(|d| d.desired_replicas)
        .collect();
    // -1 per 30 s.
    assert_eq!(down, [19, 19, 19, 18, 18, 18, 17, 17, 17, 16, 16, 16]);
    let d = sim.last.clone().unwrap();
    assert!(
        matches!(d.hold, Some(Hold::StepLimit { .. })),
        "{:?}",
        d.hold
    );
}

#[test]
fn entering_a_range_clamps_to_its_bounds_at_once() {
    let yaml = r#"
target: {deployment: w, service: w}
metrics:
  prometheus: [{name: load, query: q}]
initialState: zero
states:
  - {name: zero, replicas: 0}
  - {name: r, range: {min: 3, max: 6, metric: load, target: 1}}
transitions: [{from: zero, to: r, when: demand}]
"#;
    let mut sim = Sim::new(yaml, 0);
    sim.set_source("load", Some(100.0));
    sim.demand_now();
    let d = sim.tick();
    assert_eq!(
        d.desired_replicas, 3,
        "min at once, the step rate applies after"
    );
}

#[test]
fn a_missing_range_metric_keeps_the_replicas() {
    let mut sim = Sim::new(RANGE, 7);
    let d = sim.tick();
    assert_eq!(d.desired_replicas, 7);
    assert_eq!(d.hold, Some(Hold::MissingMetric(p_source(&sim, "load"))));
}

#[test]
fn a_range_reaching_zero_is_guarded_by_readiness() {
    let yaml = RANGE.replace("min: 1, max: 20", "min: 0, max: 20");
    let mut sim = Sim::new(&yaml, 1);
    sim.obs.last_wake = Some(t0());
    sim.obs.ready_since_wake = false;
    sim.ready_after = None;
    sim.set_source("load", Some(0.0));
    let d = sim.tick();
    assert_eq!(d.desired_replicas, 1);
    assert!(matches!(d.hold, Some(Hold::ReadinessPending { .. })));
    sim.obs.ready_since_wake = true;
    sim.now += mins(1);
    assert_eq!(sim.tick().desired_replicas, 0);
}

#[test]
fn a_rescale_says_which_metric_moved_it() {
    let mut sim = Sim::new(RANGE, 4);
    sim.set_source("load", Some(0.9));
    let d = sim.tick();
    assert_eq!(d.reason(&sim.p), "replicas -> 6: load=0.9 for target 0.6");
}

// === state across restarts and edits ===

#[test]
fn deciding_twice_on_the_same_input_changes_nothing() {
    let mut sim = ml_warm();
    sim.run(mins(3), secs(5));
    let d1 = decide(&sim.p, &sim.state, &sim.obs, sim.now);
    let d2 = decide(&sim.p, &d1.state, &sim.obs, sim.now);
    assert_eq!(d1, d2);
    assert_eq!(d2.state.last_change, d1.state.last_change);
}

#[test]
fn a_resumed_state_restarts_its_windows_so_a_restart_never_shortens_an_idle_window() {
    let mut sim = ml_warm();
    sim.run(mins(8), secs(5));
    assert_eq!(sim.state.pending_windows(), 1);
    // The controller restarts: state from status, trackers gone.
    sim.state = State::resume(&sim.p, "warm", t0(), sim.now);
    let restarted = sim.now;
    let at = sim.run_until_state("zero", mins(20), secs(5));
    assert_eq!(at - restarted, mins(10));
    assert_eq!(
        State::resume(&sim.p, "gone", t0(), t0()).name(&sim.p),
        "warm"
    );
}

#[test]
fn resumed_windows_fire_at_the_original_deadline_through_unknown_values_until_a_known_false() {
    let mut sim = Sim::new(SHORT, 1);
    sim.run(mins(3), secs(5));
    let windows = sim.state.windows();
    assert_eq!(windows.len(), 2, "both clauses of the idle condition run");
    assert!(windows.iter().all(|(_, since)| *since == t0()));

    // A new leader takes over 3 minutes into the 5-minute window: it resumes the
    // windows the status recorded, and hears from no agent for a while (unknown).
    let mut resumed = State::resume(&sim.p, "warm", t0(), sim.now);
    resumed.resume_windows(&windows, sim.now);
    assert_eq!(resumed.windows(), windows);
    sim.state = resumed.clone();
    sim.conns = None;
    sim.run(mins(1), secs(5));
    assert_eq!(sim.state_name(), "warm", "unknown never fires");
    assert_eq!(
        sim.state.windows(),
        windows,
        "unknown is no break in a resumed window"
    );
    sim.conns = Some((0.0, 0.0, 0.0));
    let at = sim.run_until_state("zero", mins(10), secs(5));
    assert_eq!(
        at - t0(),
        mins(5),
        "the original deadline, not a window after the take-over"
    );

    // A known false ends a resumed window as it ends any other.
    let mut sim = Sim::new(SHORT, 1);
    sim.run(mins(3), secs(5));
    let windows = sim.state.windows();
    let mut resumed = State::resume(&sim.p, "warm", t0(), sim.now);
    resumed.resume_windows(&windows, sim.now);
    sim.state = resumed;
    sim.conns = Some((1.0, 0.1, 0.0));
    sim.tick();
    assert_eq!(sim.state.pending_windows(), 0);
    sim.now += secs(5);
    sim.conns = Some((0.0, 0.0, 0.0));
    let restarted = sim.now;
    let at = sim.run_until_state("zero", mins(10), secs(5));
    assert_eq!(at - restarted, mins(5));

    // Unknown values end a window this controller started itself (as before).
    let mut sim = Sim::new(SHORT, 1);
    sim.run(mins(3), secs(5));
    sim.conns = None;
    sim.tick();
    assert_eq!(sim.state.pending_windows(), 0);
}

#[test]
fn an_edited_policy_keeps_the_state_it_still_has() {
    let old = policy(ML);
    let new = policy(&ML.replace("{name: burst, replicas: 8}", "{name: burst, replicas: 10}"));
    let s = State::resume(&old, "burst", t0(), t0());
    assert_eq!(s.carry_over(&old, &new, t0()).name(&new), "burst");
    let smaller = policy(
        r#"
target: {deployment: ml, service: ml}
initialState: zero
states: [{name: zero, replicas: 0}, {name: warm, replicas: 2}]
transitions: [{from: zero, to: warm, when: demand}]
"#,
    );
    assert_eq!(s.carry_over(&old, &smaller, t0()).name(&smaller), "zero");
}

#[test]
fn metric_values_report_what_the_policy_reads() {
    let mut sim = ml_warm();
    sim.set_source("queue", Some(12.0));
    sim.conns = Some((3.0, 0.5, 0.0));
    sim.tick();
    let values = metric_values(&sim.p, &sim.obs, sim.now);
    assert_eq!(
        values,
        vec![
            ("conns.active".to_string(), Some(3.0)),
            ("queue".to_string(), Some(12.0)),
        ]
    );
}
