//! The status conditions a policy reports: `Ready` (it runs) and `Invalid` (it was
//! rejected, with every problem and its place). Owns their wording and the Kubernetes
//! convention that `lastTransitionTime` moves only when a condition's status changes; it
//! never writes to the API.

use super::{CompiledPolicy, InvalidPolicy};
use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_INVALID: &str = "Invalid";

/// The `Ready` and `Invalid` conditions for a compile result, keeping each condition's
/// `lastTransitionTime` from `previous` when its status did not change.
pub fn policy_conditions(
    result: Result<&CompiledPolicy, &InvalidPolicy>,
    generation: Option<i64>,
    previous: &[Condition],
    now: DateTime<Utc>,
) -> Vec<Condition> {
    let (ready, invalid) = match result {
        Ok(policy) => {
            let message = if policy.warnings().is_empty() {
                "the policy is valid and running".to_string()
            } else {
                let warnings: Vec<String> =
                    policy.warnings().iter().map(ToString::to_string).collect();
                format!("running with warnings: {}", warnings.join("; "))
            };
            (
                ("True", "Valid", message),
                ("False", "Valid", "no problems found".to_string()),
            )
        }
        Err(e) => {
            let problems: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
            (
                (
                    "False",
                    "InvalidPolicy",
                    "the policy is invalid; nothing is scaled for it (see Invalid)".to_string(),
                ),
                ("True", "InvalidPolicy", problems.join("; ")),
            )
        }
    };
    [(CONDITION_READY, ready), (CONDITION_INVALID, invalid)]
        .into_iter()
        .map(|(kind, (status, reason, message))| {
            let kept = previous
                .iter()
                .find(|c| c.type_ == kind && c.status == status)
                .map(|c| c.last_transition_time.clone());
            Condition {
                type_: kind.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message,
                observed_generation: generation,
                last_transition_time: kept.unwrap_or_else(|| to_time(now)),
            }
        })
        .collect()
}

fn to_time(t: DateTime<Utc>) -> Time {
    Time(
        Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32)
            .unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile;
    use crate::policy::crd::{ScalingPolicySpec, TargetRef};
    use chrono::TimeZone;

    fn spec(idle: &str) -> ScalingPolicySpec {
        ScalingPolicySpec {
            target: TargetRef {
                deployment: Some("web".into()),
                service: Some("web".into()),
                ..Default::default()
            },
            idle_timeout: Some(idle.into()),
            ..Default::default()
        }
    }

    #[test]
    fn an_invalid_policy_is_not_ready_and_says_where() {
        let err = compile(&spec("10x")).unwrap_err();
        let now = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
        let c = policy_conditions(Err(&err), Some(3), &[], now);
        assert_eq!(c[0].type_, "Ready");
        assert_eq!(c[0].status, "False");
        assert_eq!(c[1].type_, "Invalid");
        assert_eq!(c[1].status, "True");
        assert!(
            c[1].message
                .starts_with("spec.idleTimeout: column 3: unknown unit `x`"),
            "{}",
            c[1].message
        );
        assert_eq!(c[1].observed_generation, Some(3));
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let t0 = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
        let t1 = t0 + chrono::TimeDelta::minutes(5);
        let ok = compile(&spec("10m")).unwrap();
        let first = policy_conditions(Ok(&ok), Some(1), &[], t0);
        let again = policy_conditions(Ok(&ok), Some(2), &first, t1);
        assert_eq!(again[0].last_transition_time, first[0].last_transition_time);
        let err = compile(&spec("nope")).unwrap_err();
        let broken = policy_conditions(Err(&err), Some(3), &again, t1);
        assert_eq!(broken[0].last_transition_time, to_time(t1));
    }
}
