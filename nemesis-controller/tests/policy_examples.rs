//! Every example policy in `manifests/examples/` parses, validates without warnings, and
//! the ML example really uses what it claims to show (Prometheus, alerts, schedules).

use nemesis_controller::policy::{ScalingPolicy, compile};
use std::path::PathBuf;

fn examples() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("manifests/examples exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), text)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_example_parses_and_validates_without_warnings() {
    let all = examples();
    assert!(all.len() >= 3, "the examples are there: {all:?}");
    for (name, text) in all {
        let policy: ScalingPolicy =
            serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
        assert_eq!(
            policy.metadata.name.as_deref().map(str::is_empty),
            Some(false),
            "{name}"
        );
        let compiled = compile(&policy.spec).unwrap_or_else(|e| panic!("{name} is invalid: {e}"));
        assert!(
            compiled.warnings().is_empty(),
            "{name} has warnings: {:?}",
            compiled.warnings()
        );
    }
}

#[test]
fn the_ml_example_uses_prometheus_an_alert_and_a_schedule() {
    let (_, text) = examples()
        .into_iter()
        .find(|(n, _)| n == "ml-inference.yaml")
        .expect("ml-inference.yaml exists");
    let policy: ScalingPolicy = serde_norway::from_str(&text).unwrap();
    let compiled = compile(&policy.spec).unwrap();
    assert!(!compiled.is_short_form());
    assert_eq!(compiled.sources()[0].name, "queue");
    assert_eq!(compiled.alerts(), ["GPUPressure"]);
    let conditions: Vec<&str> = compiled
        .transitions()
        .iter()
        .map(|t| t.text.as_str())
        .collect();
    assert!(conditions.iter().any(|c| c.contains("alert(GPUPressure)")));
    assert!(conditions.iter().any(|c| c.contains("schedule(")));
    assert!(conditions.iter().any(|c| c.contains(" for ")));
    assert!(compiled.state_names().eq(["zero", "warm", "burst"]));
}

#[test]
fn the_short_form_example_expands_to_zero_and_warm() {
    let (_, text) = examples()
        .into_iter()
        .find(|(n, _)| n == "short-form.yaml")
        .expect("short-form.yaml exists");
    let policy: ScalingPolicy = serde_norway::from_str(&text).unwrap();
    let compiled = compile(&policy.spec).unwrap();
    assert!(compiled.is_short_form());
    assert!(compiled.state_names().eq(["zero", "warm"]));
    assert_eq!(compiled.initial_state(), "warm");
    let idle = &compiled.transitions()[1].text;
    assert_eq!(
        idle,
        "(conns.active == 0 and conns.held == 0) for 10m and conns.rate == 0 for 9m"
    );
}
