//! The policy condition language: the text of a transition's `when` (and of a range
//! state's `metric`) through the parser, and through the whole validator
//! (`check_draft`: YAML, name resolution, compilation) as the UI's editor and the
//! controller read it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nemesis_controller::policy::parser::parse;
use nemesis_controller::ui::edit::{Draft, check_draft};

/// A valid policy with every kind of source, the condition inserted twice.
const TEMPLATE: &str = r#"apiVersion: nemesis.dev/v1alpha1
kind: ScalingPolicy
metadata:
  name: fuzz
  namespace: fuzz
spec:
  target:
    deployment: web
    service: web
  metrics:
    prometheus:
      - name: queue
        query: sum(q)
        fallback: 0
    alerts:
      - Pressure
  initialState: zero
  states:
    - name: zero
      replicas: 0
    - name: warm
      range:
        min: 1
        max: 4
        metric: CONDITION
        target: 10
  transitions:
    - from: zero
      to: warm
      when: CONDITION
    - from: "*"
      to: zero
      when: conns.active == 0 for 10m
"#;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse(text);
    // A JSON string is a YAML double-quoted scalar: any text goes in unchanged.
    let quoted = serde_json::to_string(text).expect("a string serializes");
    let yaml = TEMPLATE.replace("CONDITION", &quoted);
    let _ = check_draft(&Draft {
        yaml: Some(yaml),
        form: None,
    });
});
