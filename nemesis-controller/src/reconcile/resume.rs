//! Where a policy's actor resumes when a leadership term starts: the state its status
//! records, unless this instance's history holds a later transition. The status is
//! written after the scale it follows, so a term that ends between the two (a lost
//! Lease, a failed or slow status write, a cache that has not caught up) leaves a status
//! one transition behind the target; resuming from it would undo the scale (a woken
//! Service put back to zero with no sleep condition, or a sleeping one woken with no
//! demand). Pure: the actor gathers the inputs.

use chrono::{DateTime, Utc};

use crate::store::{TransitionRecord, unix_ms};

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
