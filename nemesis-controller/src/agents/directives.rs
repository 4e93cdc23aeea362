//! The directives the controller wants every agent to apply, one per Service, with the
//! sequence of their changes, so that a heartbeat reply carries only what changed since
//! the cursor the agent sends back (the whole set on first contact, after a gap, or to
//! another controller's cursor). Pure state (the registry holds it under its lock); it
//! never chooses a directive, and keeps nothing per agent: the cursor travels with the
//! agent.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use nemesis_common::wire::{DirectivesCursor, ServiceDirective, ServiceRef};

/// Removed Services remembered so that a delta can say they are gone. Past this many the
/// oldest are forgotten and an agent whose cursor is older than the forgotten removal
/// gets the whole set: removals come from policies being deleted, so 4,096 covers a
/// mass deletion between two heartbeats of a slow agent, at about 100 bytes each.
pub const MAX_TOMBSTONES: usize = 4096;

/// What a heartbeat reply carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// True: `directives` and `removed` patch the agent's copy at the cursor it sent.
    /// False: `directives` is the whole set.
    pub delta: bool,
    pub directives: Vec<ServiceDirective>,
    pub removed: Vec<ServiceRef>,
    /// Where the agent's copy stands once it applied these.
    pub cursor: DirectivesCursor,
    /// A page: more changes follow (ask again at once with `cursor`).
    pub more: bool,
}

#[derive(Debug)]
pub struct DirectiveLog {
    stream: u64,
    /// Counts changes; every change takes the next version.
    version: u64,
    current: BTreeMap<ServiceRef, ServiceDirective>,
    /// The version of the last change of every Service present or remembered removed,
    /// and the same the other way round (one entry per Service), so a delta is a range.
    changed_at: HashMap<ServiceRef, u64>,
    changes: BTreeMap<u64, ServiceRef>,
    /// Versions (in `changes`) that removed their Service.
    tombstones: BTreeSet<u64>,
    /// The version of the newest forgotten removal: a cursor below it cannot be patched.
    floor: u64,
}

// === impl DirectiveLog ===

impl DirectiveLog {
    /// An empty log whose cursors carry `stream` (pick it at random per process, so a
    /// cursor of another controller is never taken for one of this).
    pub fn new(stream: u64) -> Self {
        Self {
            stream,
            version: 0,
            current: BTreeMap::new(),
            changed_at: HashMap::new(),
            changes: BTreeMap::new(),
            tombstones: BTreeSet::new(),
            floor: 0,
        }
    }

    pub fn get(&self, svc: &ServiceRef) -> Option<&ServiceDirective> {
        self.current.get(svc)
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    pub fn cursor(&self) -> DirectivesCursor {
        DirectivesCursor {
            stream: self.stream,
            version: self.version,
        }
    }

    /// Records `d` as its Service's directive (a change even if equal: callers store
    /// only what changed).
    pub fn set(&mut self, d: ServiceDirective) {
        let version = self.touch(&d.service);
        self.tombstones.remove(&version);
        self.current.insert(d.service.clone(), d);
    }

    /// Drops the directive of `svc`; false if it had none.
    pub fn remove(&mut self, svc: &ServiceRef) -> bool {
        if self.current.remove(svc).is_none() {
            return false;
        }
        let version = self.touch(svc);
        self.tombstones.insert(version);
        while self.tombstones.len() > MAX_TOMBSTONES {
            let Some(oldest) = self.tombstones.pop_first() else {
                break;
            };
            if let Some(gone) = self.changes.remove(&oldest) {
                self.changed_at.remove(&gone);
            }
            self.floor = self.floor.max(oldest);
        }
        true
    }

    /// Moves `svc` to a new version; returns the version it had (0: none).
    fn touch(&mut self, svc: &ServiceRef) -> u64 {
        self.version += 1;
        let old = self.changed_at.insert(svc.clone(), self.version);
        if let Some(old) = old {
            self.changes.remove(&old);
        }
        self.changes.insert(self.version, svc.clone());
        old.unwrap_or(0)
    }

    /// What an agent holding the set at `since` needs: the changes after it, or the whole
    /// set when `since` is absent, of another stream, older than the remembered removals,
    /// or ahead of this log. With `page`, at most that many directives and removals, in
    /// the order of their changes (see [`DirectiveLog::page`]); without, all at once, and
    /// the whole set also when the changes would be as large as it.
    pub fn since(&self, since: Option<DirectivesCursor>, page: Option<usize>) -> Changes {
        let cursor = self.cursor();
        let patchable = since.filter(|c| {
            c.stream == self.stream && c.version >= self.floor && c.version <= self.version
        });
        if let Some(size) = page {
            return self.page(patchable.map(|c| c.version), size.max(1));
        }
        if let Some(c) = patchable {
            let changed = self.changes.range(c.version + 1..);
            if changed.clone().count() < self.current.len().max(1) {
                let (mut directives, mut removed) = (Vec::new(), Vec::new());
                for (_, svc) in changed {
                    match self.current.get(svc) {
                        Some(d) => directives.push(d.clone()),
                        None => removed.push(svc.clone()),
                    }
                }
                return Changes {
                    delta: true,
                    directives,
                    removed,
                    cursor,
                    more: false,
                };
            }
        }
        Changes {
            delta: false,
            directives: self.current.values().cloned().collect(),
            removed: Vec::new(),
            cursor,
            more: false,
        }
    }

    /// One page of changes after version `from` (none: a whole set, the changes after
    /// version 0 without removals, applied to an empty copy). A page that stops early
    /// carries the version of its last change as cursor: the next page is the changes
    /// after it, so a Service changed again meanwhile comes in a later page with its
    /// latest directive, and the agent's copy equals the set once a page ends the run.
    fn page(&self, from: Option<u64>, size: usize) -> Changes {
        let delta = from.is_some();
        let (mut directives, mut removed) = (Vec::new(), Vec::new());
        let mut more = false;
        let mut last = from.unwrap_or(0);
        for (&version, svc) in self.changes.range(last + 1..) {
            if directives.len() + removed.len() >= size {
                more = true;
                break;
            }
            match self.current.get(svc) {
                Some(d) => directives.push(d.clone()),
                None if delta => removed.push(svc.clone()),
                None => {}
            }
            last = version;
        }
        let cursor = if more {
            DirectivesCursor {
                stream: self.stream,
                version: last,
            }
        } else {
            self.cursor()
        };
        Changes {
            delta,
            directives,
            removed,
            cursor,
            more,
        }
    }
}

#[cfg(test)]
mod tests {
    use nemesis_common::wire::{Directive, DirectiveView, HeartbeatReply, HoldPort, ViewUpdate};

    use super::*;

    fn svc(i: usize) -> ServiceRef {
        ServiceRef {
            namespace: "ns".into(),
            name: format!("s{i}"),
        }
    }

    fn directive(i: usize, directive: Directive, epoch: u64) -> ServiceDirective {
        ServiceDirective {
            service: svc(i),
            directive,
            epoch,
            hold_ports: vec![],
            after_zero: false,
        }
    }

    fn reply(c: Changes) -> HeartbeatReply {
        HeartbeatReply {
            directives: c.directives,
            lease_seconds: 15,
            cursor: Some(c.cursor),
            delta: c.delta,
            removed: c.removed,
            more: c.more,
            reports_seq: None,
        }
    }

    impl DirectiveLog {
        fn since_all(&self, since: Option<DirectivesCursor>) -> Changes {
            self.since(since, None)
        }
    }

    fn whole(log: &DirectiveLog) -> Vec<ServiceDirective> {
        log.current.values().cloned().collect()
    }

    #[test]
    fn first_contact_gets_the_whole_set_and_then_only_changes() {
        let mut log = DirectiveLog::new(1);
        for i in 0..10 {
            log.set(directive(i, Directive::Follow, i as u64 + 1));
        }
        let first = log.since_all(None);
        assert!(!first.delta);
        assert_eq!(first.directives.len(), 10);
        let nothing = log.since_all(Some(first.cursor));
        assert!(nothing.delta && nothing.directives.is_empty() && nothing.removed.is_empty());
        assert_eq!(nothing.cursor, first.cursor);

        log.set(directive(3, Directive::Sleep, 20));
        log.remove(&svc(5));
        log.set(directive(11, Directive::Follow, 21));
        let changes = log.since_all(Some(first.cursor));
        assert!(changes.delta);
        assert_eq!(
            changes.directives,
            vec![
                directive(3, Directive::Sleep, 20),
                directive(11, Directive::Follow, 21)
            ]
        );
        assert_eq!(changes.removed, vec![svc(5)]);
    }

    #[test]
    fn a_service_changed_twice_is_sent_once_with_its_latest_directive() {
        let mut log = DirectiveLog::new(1);
        for i in 0..4 {
            log.set(directive(i, Directive::Follow, 1));
        }
        let at = log.cursor();
        log.set(directive(0, Directive::Sleep, 2));
        log.set(directive(0, Directive::Follow, 3));
        log.remove(&svc(1));
        log.set(directive(1, Directive::Sleep, 4));
        let c = log.since_all(Some(at));
        assert_eq!(
            c.directives,
            vec![
                directive(0, Directive::Follow, 3),
                directive(1, Directive::Sleep, 4)
            ]
        );
        assert!(c.removed.is_empty(), "re-added, not removed");
    }

    #[test]
    fn cursors_of_another_stream_ahead_or_past_forgotten_removals_get_the_whole_set() {
        let mut log = DirectiveLog::new(1);
        for i in 0..(MAX_TOMBSTONES + 20) {
            log.set(directive(i, Directive::Follow, 1));
        }
        let old = log.cursor();
        let other = DirectivesCursor {
            stream: 2,
            version: old.version,
        };
        assert!(!log.since_all(Some(other)).delta);
        let ahead = DirectivesCursor {
            stream: 1,
            version: old.version + 1,
        };
        assert!(!log.since_all(Some(ahead)).delta);
        // One more removal than remembered: the oldest is forgotten.
        for i in 0..=MAX_TOMBSTONES {
            log.remove(&svc(i));
        }
        assert_eq!(log.tombstones.len(), MAX_TOMBSTONES);
        let c = log.since_all(Some(old));
        assert!(
            !c.delta,
            "the first removal is forgotten: no delta can say it"
        );
        assert_eq!(c.directives.len(), 19);
        // A cursor after the forgotten removal still gets a delta.
        let mut later = log.cursor();
        later.version -= 3;
        let c = log.since_all(Some(later));
        assert!(c.delta);
        assert_eq!(
            c.removed,
            (MAX_TOMBSTONES - 2..=MAX_TOMBSTONES)
                .map(svc)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn changes_as_large_as_the_set_go_as_the_set() {
        let mut log = DirectiveLog::new(1);
        let start = log.cursor();
        log.set(directive(0, Directive::Follow, 1));
        log.set(directive(1, Directive::Follow, 1));
        assert!(!log.since_all(Some(start)).delta);
        // An empty log still answers a delta to a current cursor.
        let empty = DirectiveLog::new(1);
        assert!(empty.since_all(Some(empty.cursor())).delta);
    }

    /// An agent following every reply, or only some (lost replies, restarts, controller
    /// changes), always ends with the controller's set.
    #[test]
    fn an_agent_view_kept_by_replies_matches_the_log_whatever_it_missed() {
        use rand::{Rng as _, SeedableRng as _};
        let seed = rand::random::<u64>();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut log = DirectiveLog::new(rng.random());
        let mut views = vec![DirectiveView::default(); 4];
        let mut epoch = 0;
        for step in 0..3000 {
            let i = rng.random_range(0..40);
            match rng.random_range(0..10) {
                0..=4 => {
                    epoch += 1;
                    let kind = if rng.random() {
                        Directive::Sleep
                    } else {
                        Directive::Follow
                    };
                    let mut d = directive(i, kind, epoch);
                    d.hold_ports = vec![HoldPort {
                        name: String::new(),
                        port: 20000 + (epoch % 100) as u16,
                    }];
                    log.set(d);
                }
                5..=6 => {
                    log.remove(&svc(i));
                }
                7 => {
                    // A new controller: another stream, the same directives.
                    let mut next = DirectiveLog::new(rng.random());
                    for d in whole(&log) {
                        next.set(d);
                    }
                    log = next;
                }
                _ => {
                    let v = rng.random_range(0..views.len());
                    views[v] = DirectiveView::default();
                }
            }
            for (v, view) in views.iter_mut().enumerate() {
                // View v hears one reply in v + 1.
                if step % (v + 1) != 0 {
                    continue;
                }
                let update = view.apply(&reply(log.since_all(view.cursor())));
                if update == ViewUpdate::Resync {
                    view.apply(&reply(log.since_all(view.cursor())));
                }
                let mine: Vec<_> = view.directives().cloned().collect();
                assert_eq!(mine, whole(&log), "seed {seed}, step {step}, view {v}");
            }
        }
    }

    #[test]
    fn pages_carry_at_most_their_size_and_a_whole_set_arrives_before_it_is_used() {
        let mut log = DirectiveLog::new(1);
        for i in 0..10 {
            log.set(directive(i, Directive::Follow, 1));
        }
        let mut view = DirectiveView::default();
        // An old copy in use (another controller's), kept until the new set is complete.
        view.apply(&HeartbeatReply {
            directives: vec![directive(99, Directive::Sleep, 1)],
            lease_seconds: 15,
            cursor: Some(DirectivesCursor {
                stream: 2,
                version: 1,
            }),
            delta: false,
            removed: vec![],
            more: false,
            reports_seq: None,
        });
        let mut pages = 0;
        loop {
            let c = log.since(view.cursor(), Some(4));
            assert!(c.directives.len() + c.removed.len() <= 4);
            pages += 1;
            // Changes between pages: one already sent, one removed, one new.
            if pages == 2 {
                log.set(directive(0, Directive::Sleep, 2));
                log.remove(&svc(1));
                log.set(directive(10, Directive::Follow, 2));
            }
            let update = view.apply(&reply(c));
            if update != ViewUpdate::Partial {
                break;
            }
            assert!(view.is_building());
            assert_eq!(
                view.directives()
                    .map(|d| d.service.clone())
                    .collect::<Vec<_>>(),
                vec![svc(99)],
                "the old copy stays in use while pages arrive"
            );
        }
        assert_eq!(pages, 4);
        assert!(!view.is_building());
        assert_eq!(view.directives().cloned().collect::<Vec<_>>(), whole(&log));
        // Steady: an empty delta, no more pages.
        let c = log.since(view.cursor(), Some(4));
        assert!(c.delta && !c.more && c.directives.is_empty());
        // A mass change goes as a paged delta.
        for i in 0..9 {
            log.set(directive(i, Directive::Sleep, 3));
        }
        let mut pages = 0;
        loop {
            let c = log.since(view.cursor(), Some(4));
            assert!(c.delta);
            pages += 1;
            if view.apply(&reply(c)) != ViewUpdate::Partial {
                break;
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(view.directives().cloned().collect::<Vec<_>>(), whole(&log));
    }

    /// Agents taking pages of any size converge to the set through changes between
    /// their pages, lost copies and controller changes (each a new stream: the whole set
    /// again, in pages), and every completed run equals the set.
    #[test]
    fn paged_views_converge_through_changes_restarts_and_controller_changes() {
        use rand::{Rng as _, SeedableRng as _};
        let seed = rand::random::<u64>();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut log = DirectiveLog::new(rng.random());
        let sizes = [1, 2, 3, 7, 1000];
        let mut views = vec![DirectiveView::default(); sizes.len()];
        let mut epoch = 0;
        for step in 0..5000 {
            let i = rng.random_range(0..60);
            match rng.random_range(0..20) {
                0..=11 => {
                    epoch += 1;
                    let kind = if rng.random() {
                        Directive::Sleep
                    } else {
                        Directive::Follow
                    };
                    log.set(directive(i, kind, epoch));
                }
                12..=15 => {
                    log.remove(&svc(i));
                }
                16 => {
                    let mut next = DirectiveLog::new(rng.random());
                    for d in whole(&log) {
                        next.set(d);
                    }
                    log = next;
                }
                17 => {
                    let v = rng.random_range(0..views.len());
                    views[v] = DirectiveView::default();
                }
                _ => {}
            }
            for (v, view) in views.iter_mut().enumerate() {
                let c = log.since(view.cursor(), Some(sizes[v]));
                assert!(c.directives.len() + c.removed.len() <= sizes[v]);
                match view.apply(&reply(c)) {
                    ViewUpdate::Partial => {}
                    ViewUpdate::Resync => panic!("seed {seed}, step {step}: a page resynced"),
                    _ => assert_eq!(
                        view.directives().cloned().collect::<Vec<_>>(),
                        whole(&log),
                        "seed {seed}, step {step}, view {v}"
                    ),
                }
            }
        }
        // Quiet: every view finishes its run and holds the set.
        for view in &mut views {
            for _ in 0..1000 {
                if view.apply(&reply(log.since(view.cursor(), Some(3)))) != ViewUpdate::Partial {
                    break;
                }
            }
            assert_eq!(view.directives().cloned().collect::<Vec<_>>(), whole(&log));
        }
    }
}
