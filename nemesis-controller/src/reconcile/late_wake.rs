//! Whether an agent's wake-up is new demand, or a late send of a flight a wake of the
//! target already answered. Seen after a failover at zero: the agent's wake-up, retried
//! while no leader answered, reached the new leader just after that leader had woken the
//! target on its own (from the held connections the agent's heartbeat reported). Counted
//! as demand while warm, it held the next sleep off for the whole `DEMAND_WINDOW`.
//! Pure; the actor asks it for every wake-up it is sent.

use nemesis_common::wire::{Directive, ServiceDirective};

/// Whether a wake-up is already answered: it is not counted as demand then (it is still
/// accepted, so the agent keeps holding its connections until a backend is ready).
///
/// - `applied_epoch`: the directive epoch the agent had applied for the Service when its
///   flight began (`None` from agents that predate it, or that had applied none).
/// - `directive`: this leader's current directive for the Service.
/// - `replicas`: the target's replicas now (`None`: not known yet).
///
/// Answered only when the current directive is a `Follow` after zero with an epoch above
/// the flight's, and the target is above zero. Why no genuine demand is dropped:
/// - A `Follow` after zero is only ever written while the target is at zero or just
///   woken from it (a term's first directive at zero, or the wake itself), and the target
///   is above zero now: it was woken since that directive was written.
/// - The agent's flight began before the agent applied that directive (its epoch is
///   lower, and epochs only rise). So the flight is from before the wake, or from the
///   moment the wake was still reaching the agent: either way its connections are held
///   for pods this wake is starting, and they are released when those are ready.
/// - The wake-up's own demand is what a wake needs; the held connections themselves
///   stay demand through the agent's heartbeats (`held`, in `Observations::demand_since`)
///   for as long as they wait, and count as open connections once released.
/// - At zero (or target unknown) every wake-up counts: waking is what it asks for. A
///   `Sleep` or plain `Follow` in force counts it too (no wake answered it in this
///   leader's view). A flight begun after the agent applied the wake's `Follow` (the
///   target emptied again without a sleep, pods crashed) carries that epoch or a later
///   one, and counts. Old agents send no epoch and keep today's rule.
pub fn already_answered(
    applied_epoch: Option<u64>,
    directive: Option<&ServiceDirective>,
    replicas: Option<u32>,
) -> bool {
    let (Some(flight), Some(d), Some(replicas)) = (applied_epoch, directive, replicas) else {
        return false;
    };
    replicas > 0 && d.directive == Directive::Follow && d.after_zero && flight < d.epoch
}

#[cfg(test)]
mod tests {
    use super::*;
    use nemesis_common::wire::ServiceRef;

    fn directive(directive: Directive, after_zero: bool, epoch: u64) -> ServiceDirective {
        ServiceDirective {
            service: ServiceRef {
                namespace: "shop".into(),
                name: "web".into(),
            },
            directive,
            epoch,
            hold_ports: Vec::new(),
            after_zero,
        }
    }

    #[test]
    fn a_flight_older_than_the_wake_that_answered_it_is_not_demand_only_while_up() {
        let woken = directive(Directive::Follow, true, 200);
        // The failover case: the flight began under the old leader's Sleep (100); the
        // new leader woke the target and wrote its Follow after zero (200).
        assert!(already_answered(Some(100), Some(&woken), Some(1)));
        // The same wake-up while the target is still at zero asks for the wake.
        assert!(!already_answered(Some(100), Some(&woken), Some(0)));
        assert!(!already_answered(Some(100), Some(&woken), None));
    }

    #[test]
    fn a_flight_begun_after_the_wake_reached_the_agent_is_demand() {
        let woken = directive(Directive::Follow, true, 200);
        assert!(!already_answered(Some(200), Some(&woken), Some(1)));
        assert!(!already_answered(Some(300), Some(&woken), Some(1)));
    }

    #[test]
    fn without_a_wake_in_force_or_an_epoch_every_wake_up_is_demand() {
        for d in [
            directive(Directive::Sleep, false, 200),
            directive(Directive::Follow, false, 200),
        ] {
            assert!(!already_answered(Some(100), Some(&d), Some(1)), "{d:?}");
        }
        assert!(!already_answered(Some(100), None, Some(1)));
        let woken = directive(Directive::Follow, true, 200);
        assert!(
            !already_answered(None, Some(&woken), Some(1)),
            "an old agent"
        );
    }
}
