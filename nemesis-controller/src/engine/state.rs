//! The engine's memory between two decisions for one policy: the current state and since
//! when, what was last decided and when, the step-rate windows, and when each `for`
//! condition became true. Owns that record; `decide` is the only thing that advances it.

use super::eval::NOT_TRUE;
use crate::policy::CompiledPolicy;
use chrono::{DateTime, Utc};

/// A step-rate window: replicas were `base` when it opened at `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepWindow {
    pub start: DateTime<Utc>,
    pub base: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub(crate) current: usize,
    /// When the current state was entered.
    pub since: DateTime<Utc>,
    /// The replicas last decided (`None` before the first decision).
    pub desired: Option<u32>,
    /// The last time the policy changed state or its decided replicas (cooldowns count
    /// from here).
    pub last_change: Option<DateTime<Utc>>,
    pub(crate) up_window: Option<StepWindow>,
    pub(crate) down_window: Option<StepWindow>,
    /// Per `for` clause: when its condition became true without a break since (ms since
    /// the epoch), or `eval::NOT_TRUE`. Plain integers: this is cloned on every decision.
    pub(crate) true_since: Trackers,
    /// `eval::resumed_bit` per tracker resumed from a status and not yet confirmed by a
    /// known value of its condition.
    pub(crate) resumed: u64,
}

/// Trackers live inline up to this many `for` clauses, so cloning a state (once per
/// decision) allocates nothing for ordinary policies.
const INLINE_TRACKERS: usize = 6;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Trackers {
    Inline(u8, [i64; INLINE_TRACKERS]),
    Heap(Vec<i64>),
}

impl Trackers {
    fn new(n: usize) -> Self {
        if n <= INLINE_TRACKERS {
            Trackers::Inline(n as u8, [NOT_TRUE; INLINE_TRACKERS])
        } else {
            Trackers::Heap(vec![NOT_TRUE; n])
        }
    }
}

impl std::ops::Deref for Trackers {
    type Target = [i64];
    fn deref(&self) -> &[i64] {
        match self {
            Trackers::Inline(n, a) => &a[..*n as usize],
            Trackers::Heap(v) => v,
        }
    }
}

impl std::ops::DerefMut for Trackers {
    fn deref_mut(&mut self) -> &mut [i64] {
        match self {
            Trackers::Inline(n, a) => &mut a[..*n as usize],
            Trackers::Heap(v) => v,
        }
    }
}

impl State {
    /// A new policy, in its initial state from `now`.
    pub fn initial(policy: &CompiledPolicy, now: DateTime<Utc>) -> Self {
        Self {
            current: policy.initial,
            since: now,
            desired: None,
            last_change: None,
            up_window: None,
            down_window: None,
            true_since: Trackers::new(policy.sustained_slots),
            resumed: 0,
        }
    }

    /// Resumes from what a status recorded (state name, since when), e.g. after a
    /// controller restart or a policy edit. An unknown name starts over in the initial
    /// state. `for` windows restart, and cooldowns count from the first decision after
    /// the resume: a restart never shortens an idle window or a cooldown.
    pub fn resume(
        policy: &CompiledPolicy,
        state: &str,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Self {
        match policy.state_index(state) {
            Some(current) => Self {
                current,
                since,
                ..Self::initial(policy, now)
            },
            None => Self::initial(policy, now),
        }
    }

    /// Carries this state over to a recompiled policy (the spec was edited).
    pub fn carry_over(
        &self,
        old: &CompiledPolicy,
        new: &CompiledPolicy,
        now: DateTime<Utc>,
    ) -> Self {
        let mut s = Self::resume(new, self.name(old), self.since, now);
        if new.state_index(self.name(old)).is_some() {
            s.desired = self.desired;
            s.last_change = self.last_change;
            s.up_window = self.up_window;
            s.down_window = self.down_window;
        }
        s
    }

    pub fn name<'p>(&self, policy: &'p CompiledPolicy) -> &'p str {
        policy
            .states
            .get(self.current)
            .map_or(policy.initial_state(), |s| s.name.as_str())
    }

    /// The `for` condition trackers that are running (true, window not yet over).
    pub fn pending_windows(&self) -> usize {
        self.true_since.iter().filter(|t| **t != NOT_TRUE).count()
    }

    /// The running `for` windows: (clause slot, since when). A status records them so
    /// that the next controller to run the policy resumes them (see [`Self::resume_windows`]).
    pub fn windows(&self) -> Vec<(u32, DateTime<Utc>)> {
        self.true_since
            .iter()
            .enumerate()
            .filter(|(_, t)| **t != NOT_TRUE)
            .filter_map(|(i, t)| {
                Some((u32::try_from(i).ok()?, DateTime::from_timestamp_millis(*t)?))
            })
            .collect()
    }

    /// Resumes `for` windows another controller recorded for this state, so a leader
    /// change mid-window fires at the original deadline instead of a whole window later.
    /// Only for the same policy generation and state (the caller checks both): slots are
    /// the clauses' order in that compiled program. A resumed window survives unknown
    /// values (this controller has no agent counts yet) and ends at a known false.
    pub fn resume_windows(&mut self, windows: &[(u32, DateTime<Utc>)], now: DateTime<Utc>) {
        for (slot, since) in windows {
            let bit = super::eval::resumed_bit(*slot);
            let Some(tracker) = self.true_since.get_mut(*slot as usize) else {
                continue;
            };
            if bit == 0 || *since > now {
                continue;
            }
            *tracker = since.timestamp_millis();
            self.resumed |= bit;
        }
    }

    /// Repairs a state that does not fit `policy` (a state built for another version).
    pub(crate) fn fit(&mut self, policy: &CompiledPolicy, now: DateTime<Utc>) {
        if self.current >= policy.states.len() {
            *self = Self::initial(policy, now);
        } else if self.true_since.len() != policy.sustained_slots {
            self.true_since = Trackers::new(policy.sustained_slots);
            self.resumed = 0;
        }
    }
}
