//! What a new leader makes of a `Sleep` it inherited from the last leader's directive
//! log, when its policy wants the target up and its watch shows replicas: was the sleep
//! given up (its pods stay: a plain `Follow`), or did the target go through zero since
//! (its pods were stopped: `Follow` with `afterZero`, or still at zero: a wake from
//! there)? Pure: the actor reads the target fresh and applies the verdict; this never
//! reads anything.
//!
//! # Why these facts, and why they suffice
//!
//! Neither the copy of the log nor the watch can say. The copy ends at its last pull:
//! the last leader may have scaled to zero and back (sending `Follow afterZero`) within
//! one poll after it, and died. The watch of a new term may still show the replicas from
//! before that scale to zero (a list served from an API server's cache). So the target
//! is read from the API server itself (its `/scale`, and the object listed by name, not
//! from a cache), and compared with what the `Sleep` carries: the target's
//! `metadata.generation` the last leader saw when it asked for it. Every change of the
//! spec raises the generation, a scale included.
//!
//! - **At zero now**: the sleep completed and nothing woke the target. The `Sleep`
//!   stays (agents hold), and scaling up from here is a wake from zero like any other.
//! - **Above zero, generation less than two above the noted one**: the target was not
//!   scaled to zero and back since the `Sleep`, which takes two changes of the spec
//!   (the scale to zero, then the one from it). Its pods are the ones the agents listed:
//!   a plain `Follow` lets them go to them.
//! - **Above zero, two or more above**: taken as a completed sleep and its wake, so
//!   `Follow afterZero`. This is wrong only if two other changes of the spec came while
//!   the sleep was not completed. Even then it harms only the agents that still hold the
//!   `Sleep` (for an agent that got the last leader's `Follow`, `afterZero` changes
//!   nothing: it keeps no sleep any more), and only if the pods they listed stay: a
//!   rollout replaces them, and the agent's gate opens once they are gone.
//! - **No generation noted** (a `Sleep` from a leader that predates the note, or a
//!   target without generations): nothing to compare, so a plain `Follow`, as before.
//!
//! A noted generation older than the one at the `Sleep` (the last leader's watch
//! lagging) can only move a verdict from `Follow` towards `afterZero`, never back.

/// The target as the API server has it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fresh {
    /// `spec.replicas`, from its `/scale`.
    pub replicas: u32,
    /// `metadata.generation` (`None`: the object has none).
    pub generation: Option<i64>,
}

/// What happened to the target since the inherited `Sleep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Scaled to zero, and still there: scale up from zero, then `Follow afterZero`.
    AtZero,
    /// Scaled to zero and up again: `Follow afterZero`.
    WokenFromZero,
    /// Not through zero (the sleep was given up, or never completed): a plain `Follow`.
    GivenUp,
}

/// The changes of the spec a completed sleep and its wake make at least.
const THROUGH_ZERO_CHANGES: i64 = 2;

/// See the module's comment.
pub fn judge(noted_generation: Option<i64>, fresh: Fresh) -> Verdict {
    if fresh.replicas == 0 {
        return Verdict::AtZero;
    }
    match (noted_generation, fresh.generation) {
        (Some(noted), Some(now)) if now.saturating_sub(noted) >= THROUGH_ZERO_CHANGES => {
            Verdict::WokenFromZero
        }
        _ => Verdict::GivenUp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(replicas: u32, generation: Option<i64>) -> Fresh {
        Fresh {
            replicas,
            generation,
        }
    }

    #[test]
    fn at_zero_now_is_a_completed_sleep_whatever_was_noted() {
        for noted in [None, Some(3), Some(7)] {
            for now in [None, Some(3), Some(4), Some(9)] {
                assert_eq!(
                    judge(noted, fresh(0, now)),
                    Verdict::AtZero,
                    "{noted:?} {now:?}"
                );
            }
        }
    }

    #[test]
    fn above_zero_it_went_through_zero_only_with_two_changes_of_the_spec_since_the_sleep() {
        // (noted, now, verdict)
        let table = [
            // Unchanged: the sleep's pods are still there.
            (Some(5), Some(5), Verdict::GivenUp),
            // One change (a scale by someone, an edit): not to zero and back.
            (Some(5), Some(6), Verdict::GivenUp),
            // The scale to zero and the wake.
            (Some(5), Some(7), Verdict::WokenFromZero),
            // And more since.
            (Some(5), Some(12), Verdict::WokenFromZero),
            // A generation below the noted one (the object recreated): no evidence.
            (Some(5), Some(1), Verdict::GivenUp),
            // Nothing to compare.
            (None, Some(7), Verdict::GivenUp),
            (Some(5), None, Verdict::GivenUp),
            (None, None, Verdict::GivenUp),
            // No overflow at the edges.
            (Some(i64::MIN), Some(i64::MAX), Verdict::WokenFromZero),
            (Some(i64::MAX), Some(i64::MIN), Verdict::GivenUp),
        ];
        for (noted, now, want) in table {
            for replicas in [1, 3] {
                assert_eq!(
                    judge(noted, fresh(replicas, now)),
                    want,
                    "noted {noted:?}, now {now:?}, {replicas} replicas"
                );
            }
        }
    }
}
