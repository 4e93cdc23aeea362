//! Where a policy's actor resumes when a leadership term starts, and which change of the
//! target its history lacks. The first: the state its status the state its status
//! records, unless this instance's history holds a later transition. The status is
//! written after the scale it follows, so a term that ends between the two (a lost
//! Lease, a failed or slow status write, a cache that has not caught up) leaves a status
//! one transition behind the target; resuming from it would undo the scale (a woken
//! Service put back to zero with no sleep condition, or a sleeping one woken with no
//! demand). The second: a leader killed after its scale reached the API server and
//! before the record was committed leaves a change no store holds, and the next leader
//! records it (`crate::store::scales` keeps it once where it was recorded after all).
//! Pure: the actor gathers the inputs.

use chrono::{DateTime, Utc};

use crate::store::{ScaleRecord, TransitionRecord, unix_ms};

/// What the status says about the state.
#[derive(Debug, Clone, Copy)]
pub struct FromStatus<'a> {
    pub state: &'a str,
    pub since: Option<DateTime<Utc>>,
}

/// Where to resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The status's state (its `for` windows may resume too).
    Status { state: String, since: DateTime<Utc> },
    /// A later transition from the history: its target state since it happened (the
    /// status's windows belong to another state).
    History { state: String, since: DateTime<Utc> },
    /// Neither names a state.
    Nothing,
}

/// `created`: the policy object's creation (a transition recorded before it belongs to
/// an earlier object of the same name). `known`: whether a state name exists in the
/// policy as compiled now.
pub fn resume_point(
    status: Option<FromStatus<'_>>,
    latest: Option<&TransitionRecord>,
    created: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    known: impl Fn(&str) -> bool,
) -> Resume {
    let status = status.filter(|s| known(s.state));
    let latest = latest.filter(|t| {
        known(&t.to_state)
            && created.is_none_or(|c| t.at_ms >= unix_ms(c.into()))
            && t.at_ms <= unix_ms(now.into())
    });
    let from_history = |t: &TransitionRecord| Resume::History {
        state: t.to_state.clone(),
        since: DateTime::<Utc>::from(crate::store::from_unix_ms(t.at_ms)),
    };
    match (status, latest) {
        (None, None) => Resume::Nothing,
        (None, Some(t)) => from_history(t),
        (Some(s), latest) => {
            let since = s.since.unwrap_or(now);
            match latest {
                // Later than the state the status shows, and elsewhere: the status has
                // not caught up with it.
                Some(t) if t.to_state != s.state && t.at_ms > unix_ms(since.into()) => {
                    from_history(t)
                }
                _ => Resume::Status {
                    state: s.state.to_string(),
                    since,
                },
            }
        }
    }
}

/// The change `(from, to)` of the target that the history does not hold: the target is
/// at `observed` replicas while the newest scale record (`last`) left it elsewhere. None
/// when they agree, when nothing was ever recorded (the replicas are where the target
/// was made; no scale of this policy is known), when the record belongs to an earlier
/// object of the same name (before `created`), and beside an HPA unless zero is on
/// one side (the policy owns only zero and the wake; between counts above zero the HPA
/// scales, and its changes are not the policy's records).
pub fn unrecorded_scale(
    last: Option<&ScaleRecord>,
    observed: u32,
    beside_hpa: bool,
    created: Option<DateTime<Utc>>,
) -> Option<(u32, u32)> {
    let last = last.filter(|s| created.is_none_or(|c| s.at_ms >= unix_ms(c.into())))?;
    let from = u32::try_from(last.to_replicas).unwrap_or(0);
    if from == observed || (beside_hpa && from != 0 && observed != 0) {
        return None;
    }
    Some((from, observed))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeZone;

    use super::*;
    use crate::store::PolicyId;

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
    }

    fn moved(to: &str, when: DateTime<Utc>) -> TransitionRecord {
        TransitionRecord {
            at_ms: unix_ms(when.into()),
            policy: PolicyId::new("ns", "p"),
            from_state: "x".into(),
            to_state: to.into(),
            from_replicas: 0,
            to_replicas: 1,
            reason: String::new(),
            metrics: BTreeMap::new(),
        }
    }

    fn known(s: &str) -> bool {
        ["zero", "warm"].contains(&s)
    }

    #[test]
    fn a_status_behind_the_history_resumes_where_the_history_is() {
        // Woken at 20 s (zero -> warm recorded), the status still says zero since 0 s.
        let status = FromStatus {
            state: "zero",
            since: Some(at(0)),
        };
        let r = resume_point(
            Some(status),
            Some(&moved("warm", at(20))),
            Some(at(-100)),
            at(30),
            known,
        );
        assert_eq!(
            r,
            Resume::History {
                state: "warm".into(),
                since: at(20)
            }
        );
    }

    #[test]
    fn a_status_that_caught_up_wins() {
        let status = FromStatus {
            state: "zero",
            since: Some(at(40)),
        };
        // The history's newest is older than the status's state...
        let r = resume_point(
            Some(status),
            Some(&moved("warm", at(20))),
            None,
            at(50),
            known,
        );
        assert_eq!(
            r,
            Resume::Status {
                state: "zero".into(),
                since: at(40)
            }
        );
        // ...or the same transition.
        let status = FromStatus {
            state: "warm",
            since: Some(at(20)),
        };
        let r = resume_point(
            Some(status),
            Some(&moved("warm", at(20))),
            None,
            at(50),
            known,
        );
        assert!(matches!(r, Resume::Status { ref state, .. } if state == "warm"));
    }

    #[test]
    fn history_of_an_earlier_object_or_an_unknown_state_is_ignored() {
        let status = FromStatus {
            state: "zero",
            since: Some(at(0)),
        };
        // Recorded before this object was created (a policy deleted and made again).
        let r = resume_point(
            Some(status),
            Some(&moved("warm", at(20))),
            Some(at(25)),
            at(30),
            known,
        );
        assert!(matches!(r, Resume::Status { ref state, .. } if state == "zero"));
        // A state the edited policy no longer has.
        let r = resume_point(
            Some(status),
            Some(&moved("gone", at(20))),
            None,
            at(30),
            known,
        );
        assert!(matches!(r, Resume::Status { ref state, .. } if state == "zero"));
    }

    fn scaled(from: i32, to: i32, when: DateTime<Utc>) -> ScaleRecord {
        ScaleRecord {
            at_ms: unix_ms(when.into()),
            policy: PolicyId::new("ns", "p"),
            state: "warm".into(),
            from_replicas: from,
            to_replicas: to,
            reason: String::new(),
            metrics: BTreeMap::new(),
            recovered: false,
        }
    }

    #[test]
    fn a_target_elsewhere_than_the_last_scale_left_it_is_an_unrecorded_change() {
        // The history ends with the sleep 1 -> 0; the previous leader woke the target
        // and was killed before recording it.
        let last = scaled(1, 0, at(10));
        assert_eq!(
            unrecorded_scale(Some(&last), 1, false, Some(at(0))),
            Some((0, 1))
        );
        assert_eq!(unrecorded_scale(Some(&last), 0, false, Some(at(0))), None);
        // Nothing recorded, or recorded for an earlier object: nothing to compare with.
        assert_eq!(unrecorded_scale(None, 1, false, None), None);
        assert_eq!(unrecorded_scale(Some(&last), 1, false, Some(at(20))), None);
    }

    #[test]
    fn beside_an_hpa_only_changes_to_or_from_zero_are_the_policys() {
        let woke = scaled(0, 2, at(10));
        assert_eq!(
            unrecorded_scale(Some(&woke), 5, true, None),
            None,
            "the HPA's"
        );
        assert_eq!(unrecorded_scale(Some(&woke), 0, true, None), Some((2, 0)));
        let slept = scaled(2, 0, at(10));
        assert_eq!(unrecorded_scale(Some(&slept), 2, true, None), Some((0, 2)));
        // Without an HPA every change is the policy's.
        assert_eq!(unrecorded_scale(Some(&woke), 5, false, None), Some((2, 5)));
    }

    #[test]
    fn a_status_never_written_resumes_from_the_history_else_nothing() {
        let r = resume_point(None, Some(&moved("warm", at(20))), None, at(30), known);
        assert!(matches!(r, Resume::History { ref state, .. } if state == "warm"));
        assert_eq!(
            resume_point(None, None, None, at(30), known),
            Resume::Nothing
        );
    }
}
