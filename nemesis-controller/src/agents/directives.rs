//! The directives the controller wants every agent to apply, one per Service, with the
//! sequence of their changes, so that a heartbeat reply carries only what changed since
//! the cursor the agent sends back (the whole set on first contact, after a gap, or to
//! a cursor this log does not continue). Pure state (the registry holds it under its
//! lock); it never chooses a directive, and keeps nothing per agent: the cursor travels
//! with the agent.
//!
//! # Across failovers
//!
//! Standbys copy the leader's log, versions and all ([`DirectiveLog::replica_page`],
//! [`DirectiveLog::apply_replica`]), and a new leader goes on writing the copy it holds
//! ([`DirectiveLog::begin_term`]), so agents keep their cursors and get only what
//! changed. Versions are numbered per leadership term: a writer of term `t` (the
//! Lease's `leaseTransitions` when it took the lead) writes versions
//! `t << TERM_SHIFT ..` upward, never past its term's range, in the same stream.
//!
//! Why a cursor is patched only when it is sound: the copy a new leader of term `e`
//! holds is the old leader's log up to version `V` (its last complete pull), but the
//! old leader may have written `V+1 ..` afterwards, which the copy never saw. So the new
//! leader keeps the old term as *continued up to `V`*, and writes its own changes from
//! `e << TERM_SHIFT` on. A cursor `(S, x)` is patched only if `x` is a version this log
//! holds the history of: in the open term up to the current version, or in a continued
//! term `t` with `x <= V_t`. Then every change after `x` that the agent lacks is in this
//! log (the changes after `x` up to `V_t` are the old leader's, copied; the later ones
//! are this leader's own, and `(S, x)` with `x <= V_t` was never patched with anything
//! else by anyone but the old leader, whose changes after `V_t` the agent cannot hold
//! at a cursor `<= V_t`). A cursor above `V_t` in an old term (the old leader's unseen
//! versions), of a term this log does not continue (another standby's takeover), of
//! another stream, below the remembered removals or ahead of this log gets the whole
//! set. No two writers share a range: terms are unique per holder change of the Lease
//! and rise, a writer stays within its term's `2^TERM_SHIFT` versions (it starts a new
//! stream first), and a new term not above the old one (a recreated Lease) starts a new
//! stream. The stream stays the same so that agents, which refuse a delta of another
//! stream, take the new leader's deltas unchanged; only a few continued terms are kept
//! ([`MAX_CONTINUED_TERMS`]), older cursors get the whole set. A cursor in the middle of
//! a run of pages is another matter: the agent's copy there is no state of the log at
//! any version (see [`wire`]), so only the log that cut the page continues it, and a new
//! leader gives such an agent the whole set.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use nemesis_common::wire::{DirectivesCursor, ServiceDirective, ServiceRef};
use serde::{Deserialize, Serialize};

/// Removed Services remembered so that a delta can say they are gone. Past this many the
/// oldest are forgotten and an agent whose cursor is older than the forgotten removal
/// gets the whole set: removals come from policies being deleted, so 4,096 covers a
/// mass deletion between two heartbeats of a slow agent, at about 100 bytes each.
pub const MAX_TOMBSTONES: usize = 4096;

/// Versions of one term are `term << TERM_SHIFT` and up: 4 billion changes per term
/// (years at a change per Service per minute for 10,000 Services).
pub const TERM_SHIFT: u32 = 32;

/// Earlier terms a log remembers continuing (a failover each): cursors of older ones
/// get the whole set.
pub const MAX_CONTINUED_TERMS: usize = 8;

/// The highest term whose versions, doubled on the wire (see [`wire`]), fit a `u64`.
const MAX_TERM: u64 = (1 << (63 - TERM_SHIFT)) - 1;

/// Within a term, a writer's own versions start here; the versions below stand for the
/// changes older than the term, by rank (see [`DirectiveLog::page_cursor`]).
const OWN: u64 = 1 << (TERM_SHIFT - 1);

/// A cursor's version on the wire: twice the log's version, plus one when the copy is
/// complete there. A page that ends a run brings the agent's copy to the log's state at
/// that version; a page in the middle of a run brings it to no state of the log at all
/// (a Service changed again after the page was cut is missing until a later page), so
/// its cursor may only be continued by the log that cut it, going forward: another
/// leader's copy of the log, taken before that cut, would leave the Service out. This
/// keeps the versions an agent sees rising (it refuses a delta whose cursor goes back):
/// `2 * last < 2 * version + 1` for `last <= version`, and `2 * v + 1 < 2 * last` for
/// the first page after `v`.
fn wire(version: u64, complete: bool) -> u64 {
    (version << 1) | u64::from(complete)
}

fn unwire(version: u64) -> (u64, bool) {
    (version >> 1, version & 1 == 1)
}

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

/// One change of the log as a standby copies it: its version, and the directive it set
/// (none: it removed the Service's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoggedChange {
    pub version: u64,
    pub service: ServiceRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directive: Option<ServiceDirective>,
    /// With a `Sleep`: the target's `metadata.generation` the leader saw when it asked
    /// for it (see [`DirectiveLog::set_noted`]). Absent from leaders that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_generation: Option<i64>,
}

/// A page of the leader's log for a standby (`GET /internal/directives`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPage {
    pub stream: u64,
    /// True: `changes` start from the beginning of the log (the standby's cursor is not
    /// one this log continues); the copy is rebuilt from them.
    pub restart: bool,
    /// In version order, removals included.
    pub changes: Vec<LoggedChange>,
    /// More changes follow: ask again with `(stream, version)`.
    pub more: bool,
    /// The cursor version to ask the next page from (as agents' cursors: see
    /// [`wire`]); with the last page, where the copy stands.
    pub version: u64,
    pub floor: u64,
    pub term: u64,
    /// The leader's continued terms: `(term, last version of it the log holds)`.
    pub continued: Vec<(u64, u64)>,
}

impl ReplicaPage {
    pub fn cursor(&self) -> DirectivesCursor {
        DirectivesCursor {
            stream: self.stream,
            version: self.version,
        }
    }
}

/// Why a copied run of pages was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error("the copy moved on since the pull started (from {expected:?}, now {actual:?})")]
    Moved {
        expected: Option<DirectivesCursor>,
        actual: DirectivesCursor,
    },
    #[error("the pages do not follow each other (page {index} starts at {found:?})")]
    Broken {
        index: usize,
        found: Option<DirectivesCursor>,
    },
    #[error("the run of pages is not complete (the last one says more follow)")]
    Incomplete,
}

#[derive(Debug, Clone)]
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
    /// The term the newest versions belong to (0 for a log no term began).
    term: u64,
    /// Earlier terms this log goes on from, oldest first: `(term, last version of it
    /// held here)` (see the module's comment).
    continued: Vec<(u64, u64)>,
    /// This process began `term` (it may write on in it); false for a copy.
    writing: bool,
    /// The versions of the changes older than `term`, when this process began it: a
    /// page cut at one of them carries the version `term << TERM_SHIFT | rank`.
    older: Vec<u64>,
    /// Per Service, the target's generation noted with its directive of the epoch
    /// given (see [`DirectiveLog::set_noted`]); a note whose epoch is not the
    /// directive's any more is stale and never read. Controllers' business only:
    /// agents never see it, standbys copy it with the directive.
    notes: HashMap<ServiceRef, (u64, i64)>,
}

// === impl DirectiveLog ===

impl DirectiveLog {
    /// An empty log whose cursors carry `stream` (pick it at random per process, so a
    /// cursor of another controller is never taken for one of this).
    pub fn new(stream: u64) -> Self {
        Self {
            stream,
            version: OWN,
            current: BTreeMap::new(),
            changed_at: HashMap::new(),
            changes: BTreeMap::new(),
            tombstones: BTreeSet::new(),
            floor: 0,
            term: 0,
            continued: Vec::new(),
            writing: true,
            older: Vec::new(),
            notes: HashMap::new(),
        }
    }

    pub fn get(&self, svc: &ServiceRef) -> Option<&ServiceDirective> {
        self.current.get(svc)
    }

    /// The target's generation noted with `svc`'s current directive, if any.
    pub fn target_generation(&self, svc: &ServiceRef) -> Option<i64> {
        let d = self.current.get(svc)?;
        self.notes
            .get(svc)
            .filter(|(epoch, _)| *epoch == d.epoch)
            .map(|&(_, generation)| generation)
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// Every directive, by Service.
    pub fn iter(&self) -> impl Iterator<Item = &ServiceDirective> {
        self.current.values()
    }

    pub fn cursor(&self) -> DirectivesCursor {
        DirectivesCursor {
            stream: self.stream,
            version: wire(self.version, true),
        }
    }

    /// The term this log's newest versions belong to.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Whether an agent's copy at `c` can be patched from this log (see the module's
    /// comment for why exactly these).
    pub fn continues(&self, c: DirectivesCursor) -> bool {
        self.patch_from(Some(c)).is_some()
    }

    /// The version a copy at `c` is patched from, if this log continues it.
    fn patch_from(&self, c: Option<DirectivesCursor>) -> Option<u64> {
        let c = c?;
        let (version, complete) = unwire(c.version);
        if c.stream != self.stream || version < self.floor || version > self.version {
            return None;
        }
        let term = version >> TERM_SHIFT;
        if complete {
            let known = term == self.term
                || self
                    .continued
                    .iter()
                    .any(|&(t, last)| t == term && version <= last);
            return known.then_some(version);
        }
        // Within a run of pages: only the writer that cut the page, going forward.
        if !self.writing || term != self.term {
            return None;
        }
        let count = version & ((1 << TERM_SHIFT) - 1);
        if count >= OWN {
            return Some(version);
        }
        let older = *self.older.get(usize::try_from(count).ok()?)?;
        (older >= self.floor).then_some(older)
    }

    /// This process starts writing as the leader of `term` (the Lease's
    /// `leaseTransitions`): its versions go on above any the log's earlier writer may
    /// have written, in the same stream, and cursors up to what this log holds stay
    /// valid. The same term again (this process led before with no one in between)
    /// changes nothing; a term not above the log's (a recreated Lease) starts a new
    /// stream, with every cursor given the whole set.
    pub fn begin_term(&mut self, term: u64) {
        // `leaseTransitions` is an i32: this bound never binds, it keeps the shift in range.
        let term = term.min(MAX_TERM);
        if self.writing && term == self.term {
            return;
        }
        let start = (term << TERM_SHIFT) | OWN;
        if term > self.term && start > self.version {
            if !self.changes.is_empty() {
                self.continued.push((self.term, self.version));
                if self.continued.len() > MAX_CONTINUED_TERMS {
                    self.continued.remove(0);
                }
            }
            self.older = self.changes.keys().copied().collect();
            self.term = term;
            self.version = start;
            self.writing = true;
            return;
        }
        self.restream(rand::random(), term, start);
    }

    /// The same directives in a new stream, renumbered from `start`: no cursor of the
    /// old one is patched.
    fn restream(&mut self, stream: u64, term: u64, start: u64) {
        let current = std::mem::take(&mut self.current);
        let notes = std::mem::take(&mut self.notes);
        *self = Self::new(stream);
        self.notes = notes;
        self.term = term;
        self.version = start;
        self.floor = start;
        for d in current.into_values() {
            self.set(d);
        }
    }

    /// A writer never leaves its term's range: at its end it starts a new stream.
    fn make_room(&mut self) {
        if (self.version + 1) >> TERM_SHIFT != self.term {
            let (term, start) = (self.term, (self.term << TERM_SHIFT) | OWN);
            self.restream(rand::random(), term, start);
        }
    }

    /// Records `d` as its Service's directive (a change even if equal: callers store
    /// only what changed). A note made with the same epoch stays.
    pub fn set(&mut self, d: ServiceDirective) {
        self.make_room();
        let version = self.touch(&d.service);
        self.tombstones.remove(&version);
        self.current.insert(d.service.clone(), d);
    }

    /// [`Self::set`], noting with `d` the target's `metadata.generation` when it was
    /// decided (`None`: unknown). The note travels with the directive to standbys in the
    /// same change, so a copy that holds the directive holds its note: a new leader
    /// compares it with the target as it finds it (`reconcile::inherited_sleep`).
    pub fn set_noted(&mut self, d: ServiceDirective, target_generation: Option<i64>) {
        match target_generation {
            Some(g) => self.notes.insert(d.service.clone(), (d.epoch, g)),
            None => self.notes.remove(&d.service),
        };
        self.set(d);
    }

    /// Drops the directive of `svc`; false if it had none.
    pub fn remove(&mut self, svc: &ServiceRef) -> bool {
        if !self.current.contains_key(svc) {
            return false;
        }
        self.make_room();
        self.current.remove(svc);
        self.notes.remove(svc);
        // The tombstone is the removal's own version (`touch` returns the one before).
        self.touch(svc);
        self.tombstones.insert(self.version);
        self.forget_old_tombstones();
        true
    }

    fn forget_old_tombstones(&mut self) {
        let mut forgot = false;
        while self.tombstones.len() > MAX_TOMBSTONES {
            let Some(oldest) = self.tombstones.pop_first() else {
                break;
            };
            if let Some(gone) = self.changes.remove(&oldest) {
                self.changed_at.remove(&gone);
            }
            self.floor = self.floor.max(oldest);
            forgot = true;
        }
        if forgot {
            self.renumber_below_floor();
        }
    }

    /// Moves every directive whose last change is older than the floor to a new
    /// version. A whole set travels in pages cut at the versions of its directives; a
    /// page cut at one below the floor would carry a cursor this log refuses (it cannot
    /// say which removals that copy missed), so the agent would start the whole set
    /// again, and again, for ever. Renumbered, they reach agents once more, unchanged, as
    /// changes: a cost paid once per [`MAX_TOMBSTONES`] removals at most.
    fn renumber_below_floor(&mut self) {
        let stale: Vec<ServiceRef> = self
            .changes
            .range(..self.floor)
            // The removals there were forgotten with their tombstones.
            .filter(|(_, svc)| self.current.contains_key(*svc))
            .map(|(_, svc)| svc.clone())
            .collect();
        for svc in stale {
            self.touch(&svc);
        }
    }

    /// Moves `svc` to a new version; returns the version it had (0: none).
    fn touch(&mut self, svc: &ServiceRef) -> u64 {
        self.version += 1;
        self.place(svc, self.version)
    }

    /// Puts `svc`'s last change at `version`; returns the version it had (0: none).
    fn place(&mut self, svc: &ServiceRef, version: u64) -> u64 {
        let old = self.changed_at.insert(svc.clone(), version);
        if let Some(old) = old {
            self.changes.remove(&old);
        }
        self.changes.insert(version, svc.clone());
        old.unwrap_or(0)
    }

    /// What an agent holding the set at `since` needs: the changes after it, or the whole
    /// set when `since` is absent or not a cursor this log continues (see
    /// [`DirectiveLog::continues`]). With `page`, at most that many directives and
    /// removals, in the order of their changes (see [`DirectiveLog::page`]); without,
    /// all at once, and the whole set also when the changes would be as large as it.
    ///
    /// A copy (a standby's) answers in one reply: it continues no run of pages, not even
    /// its own, as the leader may replace it between two pages.
    pub fn since(&self, since: Option<DirectivesCursor>, page: Option<usize>) -> Changes {
        let cursor = self.cursor();
        let page = page.filter(|_| self.writing);
        let patchable = self.patch_from(since);
        if let Some(size) = page {
            return self.page(patchable, size.max(1));
        }
        if let Some(from) = patchable {
            let changed = self.changes.range(from + 1..);
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

    /// Walks the changes after version `after` in order, handing each to `take` (with
    /// its directive; none: a removal), at most `size` of them, removals left out
    /// unless `removals`. Returns whether more follow and the version of the last change
    /// walked (`after` if none). The one place both agents' pages and standbys' copies
    /// are cut.
    fn walk(
        &self,
        after: u64,
        size: usize,
        removals: bool,
        mut take: impl FnMut(u64, &ServiceRef, Option<&ServiceDirective>),
    ) -> (bool, u64) {
        let mut taken = 0;
        let mut last = after;
        for (&version, svc) in self.changes.range(after.saturating_add(1)..) {
            if taken >= size {
                return (true, last);
            }
            let d = self.current.get(svc);
            if d.is_some() || removals {
                take(version, svc, d);
                taken += 1;
            }
            last = version;
        }
        (false, last)
    }

    /// The cursor a page that ended at `last` carries: the version of its last change
    /// while more follow (the next page is the changes after it, so a Service changed
    /// again meanwhile comes in a later page with its latest directive), else the log's.
    /// A change older than the term is named by its rank among those (the versions
    /// below [`OWN`] in the term): a cursor in the middle of a run then says which
    /// writer cut it (only this one continues it, see [`wire`]) and still rises page by
    /// page.
    fn page_cursor(&self, more: bool, last: u64) -> DirectivesCursor {
        if !more {
            return self.cursor();
        }
        let version = if last >> TERM_SHIFT == self.term && last & ((1 << TERM_SHIFT) - 1) >= OWN {
            last
        } else {
            match self.older.binary_search(&last) {
                Ok(rank) if self.writing && (rank as u64) < OWN => {
                    (self.term << TERM_SHIFT) | rank as u64
                }
                // Not a change this writer walks (a copy's): continued by no one.
                _ => last,
            }
        };
        DirectivesCursor {
            stream: self.stream,
            version: wire(version, false),
        }
    }

    /// One page of changes after version `from` (none: a whole set, the changes after
    /// version 0 without removals, applied to an empty copy). The agent's copy equals
    /// the set once a page ends the run (see [`DirectiveLog::page_cursor`]).
    fn page(&self, from: Option<u64>, size: usize) -> Changes {
        let delta = from.is_some();
        let (mut directives, mut removed) = (Vec::new(), Vec::new());
        let (more, last) = self.walk(from.unwrap_or(0), size, delta, |_, svc, d| match d {
            Some(d) => directives.push(d.clone()),
            None => removed.push(svc.clone()),
        });
        Changes {
            delta,
            directives,
            removed,
            cursor: self.page_cursor(more, last),
            more,
        }
    }

    /// A page of this log for a standby whose copy stands at `since`: the changes after
    /// it with their versions, removals included, or, when this log does not continue
    /// `since`, from the beginning (`restart`). Cut as agents' pages are.
    pub fn replica_page(&self, since: Option<DirectivesCursor>, size: usize) -> ReplicaPage {
        let from = self.patch_from(since);
        let mut changes = Vec::new();
        let (more, last) = self.walk(from.unwrap_or(0), size.max(1), true, |version, svc, d| {
            changes.push(LoggedChange {
                version,
                service: svc.clone(),
                directive: d.cloned(),
                target_generation: d.and_then(|_| self.target_generation(svc)),
            })
        });
        ReplicaPage {
            stream: self.stream,
            restart: from.is_none(),
            changes,
            more,
            version: self.page_cursor(more, last).version,
            floor: self.floor,
            term: self.term,
            continued: self.continued.clone(),
        }
    }

    /// Applies a complete run of pages pulled from the leader, the first asked at
    /// `from` (this copy's cursor when the pull began): the copy then holds the leader's
    /// log as it stood at the last page's version, with its versions, so that the
    /// leader's cursors up to there are this copy's too. A run is applied whole or not
    /// at all: a copy never stands between two pages (where it is not the leader's log
    /// at any version). Returns how many changes it took.
    pub fn apply_replica(
        &mut self,
        from: Option<DirectivesCursor>,
        pages: &[ReplicaPage],
    ) -> Result<usize, ReplicaError> {
        let Some(first) = pages.first() else {
            return Ok(0);
        };
        if pages.last().is_some_and(|p| p.more) {
            return Err(ReplicaError::Incomplete);
        }
        if !first.restart && from != Some(self.cursor()) {
            return Err(ReplicaError::Moved {
                expected: from,
                actual: self.cursor(),
            });
        }
        let mut at = (!first.restart).then(|| self.cursor());
        for (index, p) in pages.iter().enumerate() {
            let follows = match at {
                Some(c) => !p.restart && c.stream == p.stream,
                None => index == 0 && p.restart,
            };
            if !follows {
                return Err(ReplicaError::Broken { index, found: at });
            }
            at = Some(p.cursor());
        }
        let mut log = if first.restart {
            Self::new(first.stream)
        } else {
            std::mem::replace(self, Self::new(first.stream))
        };
        let mut taken = 0;
        for p in pages {
            // Removals are this copy's tombstones as they are the leader's, and
            // forgotten where the leader's floor says it forgot them: a copy that comes
            // to lead neither keeps them for ever nor takes them for directives.
            for c in &p.changes {
                let before = log.place(&c.service, c.version);
                log.tombstones.remove(&before);
                match &c.directive {
                    Some(d) => {
                        log.current.insert(c.service.clone(), d.clone());
                        match c.target_generation {
                            Some(g) => log.notes.insert(c.service.clone(), (d.epoch, g)),
                            None => log.notes.remove(&c.service),
                        };
                    }
                    None => {
                        log.current.remove(&c.service);
                        log.notes.remove(&c.service);
                        log.tombstones.insert(c.version);
                    }
                }
                taken += 1;
            }
            log.version = unwire(p.version).0;
            log.floor = log.floor.max(p.floor);
            // The floor is the newest removal the leader forgot.
            while let Some(&oldest) = log.tombstones.first()
                && oldest <= log.floor
            {
                log.tombstones.pop_first();
                if let Some(gone) = log.changes.remove(&oldest) {
                    log.changed_at.remove(&gone);
                }
            }
            log.term = p.term;
            log.continued = p.continued.clone();
        }
        log.writing = false;
        *self = log;
        Ok(taken)
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
        // A cursor after the forgotten removal still gets a delta: the last three
        // removals, then the 19 directives left, renumbered above the forgotten removal
        // (unchanged).
        let mut later = log.cursor();
        later.version -= 2 * (3 + 19);
        // (In pages: all at once, 22 changes to a set of 19 would go as the set.)
        let c = log.since(Some(later), Some(1000));
        assert!(c.delta);
        assert_eq!(c.directives, whole(&log));
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

    /// Copies `leader` into `copy` as a standby's pull does: pages of `size` from the
    /// copy's cursor until one ends the run, applied at once.
    fn pull(copy: &mut DirectiveLog, leader: &DirectiveLog, size: usize) -> usize {
        let from = copy.cursor();
        let mut pages = vec![leader.replica_page(Some(from), size)];
        while pages.last().unwrap().more {
            let at = pages.last().unwrap().cursor();
            pages.push(leader.replica_page(Some(at), size));
        }
        copy.apply_replica(Some(from), &pages).unwrap()
    }

    /// An agent's copy after one reply to `cursor` (and the pages that follow it).
    fn follow_up(view: &mut DirectiveView, log: &DirectiveLog) -> (bool, usize) {
        let mut first_delta = None;
        let mut sent = 0;
        loop {
            let c = log.since(view.cursor(), Some(3));
            first_delta.get_or_insert(c.delta);
            sent += c.directives.len() + c.removed.len();
            match view.apply(&reply(c)) {
                ViewUpdate::Partial => {}
                ViewUpdate::Resync => panic!("a reply did not continue the view"),
                _ => return (first_delta.unwrap(), sent),
            }
        }
    }

    fn view_at(log: &DirectiveLog) -> DirectiveView {
        let mut v = DirectiveView::default();
        follow_up(&mut v, log);
        assert_eq!(v.directives().cloned().collect::<Vec<_>>(), whole(log));
        v
    }

    #[test]
    fn a_copy_has_the_leaders_versions_and_answers_its_cursors_alike() {
        let mut leader = DirectiveLog::new(7);
        leader.begin_term(1);
        for i in 0..10 {
            leader.set(directive(i, Directive::Follow, 1));
        }
        let early = view_at(&leader);
        leader.set(directive(2, Directive::Sleep, 2));
        leader.remove(&svc(3));
        let mut copy = DirectiveLog::new(99);
        // From nothing (another stream): the whole log, removals included, in pages.
        assert_eq!(pull(&mut copy, &leader, 4), 10);
        assert_eq!(copy.cursor(), leader.cursor());
        assert_eq!(whole(&copy), whole(&leader));
        for at in [None, early.cursor(), Some(leader.cursor())] {
            assert_eq!(copy.since(at, None), leader.since(at, None), "{at:?}");
            // A copy answers in one reply (it continues no run of pages).
            assert_eq!(copy.since(at, Some(4)), leader.since(at, None), "{at:?}");
        }
        // Then only what changed, and nothing when nothing did.
        leader.set(directive(11, Directive::Follow, 3));
        assert_eq!(pull(&mut copy, &leader, 4), 1);
        assert_eq!(pull(&mut copy, &leader, 4), 0);
        assert_eq!(whole(&copy), whole(&leader));
        // A run that moved on, or that does not end, is refused whole.
        let page = leader.replica_page(Some(early.cursor().unwrap()), 2);
        assert!(page.more);
        assert_eq!(
            copy.apply_replica(early.cursor(), std::slice::from_ref(&page)),
            Err(ReplicaError::Incomplete)
        );
        let done = leader.replica_page(early.cursor(), 100);
        assert!(matches!(
            copy.apply_replica(early.cursor(), &[done]),
            Err(ReplicaError::Moved { .. })
        ));
        assert_eq!(whole(&copy), whole(&leader));
    }

    /// Past [`MAX_TOMBSTONES`] removals the oldest are forgotten for good (the log does
    /// not grow with every name ever removed), and a whole set still arrives in pages:
    /// the directives older than the forgotten removals are renumbered above them, so
    /// no page is cut at a version the log refuses to continue (an agent would start
    /// over for ever). A copy following through it forgets alike and, leading, pages
    /// the set to a new agent.
    #[test]
    fn many_removals_are_forgotten_and_a_paged_whole_set_still_completes() {
        let mut leader = DirectiveLog::new(5);
        leader.begin_term(1);
        let mut copy = DirectiveLog::new(6);
        for i in 0..2500 {
            leader.set(directive(i, Directive::Follow, 1));
        }
        let before = view_at(&leader);
        pull(&mut copy, &leader, 1000);
        // Policies come and go: many more removals than remembered.
        for round in 0..3 {
            for i in 0..2000 {
                leader.set(directive(10_000 + round * 2000 + i, Directive::Follow, 2));
            }
            for i in 0..2000 {
                leader.remove(&svc(10_000 + round * 2000 + i));
            }
            pull(&mut copy, &leader, 1000);
        }
        assert_eq!(leader.tombstones.len(), MAX_TOMBSTONES);
        assert_eq!(
            leader.changes.len(),
            2500 + MAX_TOMBSTONES,
            "forgotten removals leave the log"
        );
        assert_eq!(leader.changed_at.len(), leader.changes.len());
        assert_eq!(copy.changes.len(), leader.changes.len());
        assert_eq!(whole(&copy), whole(&leader));
        // A new agent takes the set in pages of 1,000 and completes it.
        let mut fresh = DirectiveView::default();
        let mut pages = 0;
        while fresh.apply(&reply(leader.since(fresh.cursor(), Some(1000)))) == ViewUpdate::Partial {
            pages += 1;
            assert!(pages < 10, "a paged whole set started over");
        }
        assert_eq!(
            fresh.directives().cloned().collect::<Vec<_>>(),
            whole(&leader)
        );
        // An agent from before the forgotten removals gets the whole set, and completes.
        let mut old = before;
        let (delta, _) = follow_up(&mut old, &leader);
        assert!(!delta);
        assert_eq!(
            old.directives().cloned().collect::<Vec<_>>(),
            whole(&leader)
        );
        // The copy, leading, does the same.
        copy.begin_term(2);
        let mut fresh = DirectiveView::default();
        let mut pages = 0;
        while fresh.apply(&reply(copy.since(fresh.cursor(), Some(1000)))) == ViewUpdate::Partial {
            pages += 1;
            assert!(
                pages < 10,
                "a paged whole set started over on the new leader"
            );
        }
        assert_eq!(
            fresh.directives().cloned().collect::<Vec<_>>(),
            whole(&leader)
        );
    }

    /// The rule a new leader patches by: cursors of the old leader up to the version its
    /// copy holds are continued, above it (changes the copy never saw) or of another
    /// stream they get the whole set; through two failovers.
    #[test]
    fn a_new_leader_continues_cursors_up_to_its_copy_and_no_further() {
        let mut a = DirectiveLog::new(7);
        a.begin_term(4);
        for i in 0..20 {
            a.set(directive(i, Directive::Follow, 1));
        }
        let below = view_at(&a);
        a.set(directive(0, Directive::Sleep, 2));
        a.remove(&svc(1));
        let at_v = view_at(&a);
        let mut b = DirectiveLog::new(8);
        pull(&mut b, &a, 1000);
        // A goes on after B's last pull: versions B never saw.
        a.set(directive(5, Directive::Sleep, 3));
        let above = view_at(&a);
        let other = {
            let mut o = DirectiveLog::new(9);
            for d in whole(&a) {
                o.set(d);
            }
            view_at(&o)
        };

        // B takes the lead in term 5 and sets what A had: nothing changes (the registry
        // only stores changes), then changes one Service.
        b.begin_term(5);
        assert_eq!(b.cursor().stream, 7, "the stream goes on");
        b.set(directive(7, Directive::Sleep, 4));
        let check = |view: &DirectiveView, log: &DirectiveLog, want_delta: bool, what: &str| {
            let mut v = view.clone();
            let (delta, sent) = follow_up(&mut v, log);
            assert_eq!(delta, want_delta, "{what}");
            assert_eq!(
                v.directives().cloned().collect::<Vec<_>>(),
                whole(log),
                "{what}"
            );
            sent
        };
        assert_eq!(check(&at_v, &b, true, "at V"), 1, "only B's change");
        assert_eq!(check(&below, &b, true, "below V"), 3, "A's two and B's one");
        check(&above, &b, false, "above V");
        check(&other, &b, false, "another stream");
        let b_early = view_at(&b);

        // Second failover: C copied B, then B changed more; C leads in term 6.
        let mut c = DirectiveLog::new(10);
        pull(&mut c, &b, 5);
        b.set(directive(8, Directive::Sleep, 5));
        let b_above = view_at(&b);
        c.begin_term(6);
        c.set(directive(9, Directive::Sleep, 6));
        assert_eq!(check(&at_v, &c, true, "A's V at C"), 2);
        assert_eq!(check(&below, &c, true, "below A's V at C"), 4);
        assert_eq!(check(&b_early, &c, true, "B's, held by C"), 1);
        check(&above, &c, false, "A's unseen at C");
        check(&b_above, &c, false, "B's unseen at C");
        // The old leaders' logs never patch C's cursors either.
        let c_view = view_at(&c);
        assert!(!a.since(c_view.cursor(), None).delta);
        assert!(!b.since(c_view.cursor(), None).delta);
    }

    /// A note belongs to the directive it was set with: a later directive of the
    /// Service (another epoch) has none, a removal drops it, and a page from a leader
    /// that predates notes (no field) is read as one without.
    #[test]
    fn a_note_belongs_to_its_directive_and_old_pages_have_none() {
        let mut log = DirectiveLog::new(7);
        log.begin_term(1);
        log.set_noted(directive(0, Directive::Sleep, 5), Some(3));
        assert_eq!(log.target_generation(&svc(0)), Some(3));
        // The same directive again (new hold ports): the note stays.
        log.set(ServiceDirective {
            hold_ports: vec![HoldPort {
                name: "http".into(),
                port: 30001,
            }],
            ..directive(0, Directive::Sleep, 5)
        });
        assert_eq!(log.target_generation(&svc(0)), Some(3));
        log.set(directive(0, Directive::Follow, 6));
        assert_eq!(log.target_generation(&svc(0)), None);
        log.set_noted(directive(0, Directive::Sleep, 7), Some(4));
        log.remove(&svc(0));
        log.set(directive(0, Directive::Sleep, 7));
        assert_eq!(
            log.target_generation(&svc(0)),
            None,
            "removed with its directive"
        );
        let old: LoggedChange = serde_json::from_value(serde_json::json!({
            "version": 1,
            "service": {"namespace": "ns", "name": "s0"},
            "directive": {"service": {"namespace": "ns", "name": "s0"}, "directive": "sleep", "epoch": 5},
        }))
        .unwrap();
        assert_eq!(old.target_generation, None);
    }

    #[test]
    fn a_term_again_goes_on_and_a_term_not_above_starts_a_new_stream() {
        let mut log = DirectiveLog::new(7);
        log.begin_term(3);
        log.set(directive(0, Directive::Follow, 1));
        let v = view_at(&log);
        // Led again with no one between: the same versions go on.
        log.begin_term(3);
        log.set(directive(1, Directive::Follow, 1));
        assert!(log.since(v.cursor(), None).delta);
        // A copy of a term-3 log taken over in term 2 (a recreated Lease): nothing can be
        // told apart, every cursor gets the whole set.
        let mut copy = DirectiveLog::new(1);
        pull(&mut copy, &log, 10);
        copy.begin_term(2);
        assert_ne!(copy.cursor().stream, 7);
        assert_eq!(whole(&copy), whole(&log));
        assert!(!copy.since(v.cursor(), None).delta);
        // A copy taken over in its own leader's term (impossible with a Lease, as holders
        // differ) is not taken for the writer's: a new stream too.
        let mut copy = DirectiveLog::new(1);
        pull(&mut copy, &log, 10);
        copy.begin_term(3);
        assert_ne!(copy.cursor().stream, 7);
    }

    /// Leaders fail over to standbys whose copies lag by random amounts, old leaders
    /// become standbys, and agents taking pages follow whoever leads: every completed
    /// copy equals the leader's set, and most replies after a failover are deltas.
    #[test]
    fn agents_converge_through_failovers_to_lagging_copies() {
        use rand::{Rng as _, SeedableRng as _};
        let seed = rand::random::<u64>();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut logs: Vec<DirectiveLog> = (0..3).map(|_| DirectiveLog::new(rng.random())).collect();
        let mut leader = 0;
        let mut term = 1;
        logs[leader].begin_term(term);
        let mut views = vec![DirectiveView::default(); 4];
        let (mut epoch, mut deltas_after_failover, mut failovers) = (0, 0, 0);
        for step in 0..4000 {
            let i = rng.random_range(0..50);
            match rng.random_range(0..40) {
                0..=19 => {
                    epoch += 1;
                    let kind = if rng.random() {
                        Directive::Sleep
                    } else {
                        Directive::Follow
                    };
                    logs[leader].set(directive(i, kind, epoch));
                }
                20..=27 => {
                    logs[leader].remove(&svc(i));
                }
                28..=34 => {
                    let s = rng.random_range(0..logs.len());
                    if s != leader {
                        let (src, dst) = if s < leader {
                            let (l, r) = logs.split_at_mut(leader);
                            (&r[0], &mut l[s])
                        } else {
                            let (l, r) = logs.split_at_mut(s);
                            (&l[leader], &mut r[0])
                        };
                        pull(dst, src, rng.random_range(1..20));
                    }
                }
                35 => {
                    let old = leader;
                    leader = (leader + rng.random_range(1..logs.len())) % logs.len();
                    // Half the time the standby pulled just before the leader died.
                    if rng.random_bool(0.5) {
                        let src = logs[old].clone();
                        pull(&mut logs[leader], &src, 1000);
                    }
                    term += 1;
                    logs[leader].begin_term(term);
                    failovers += 1;
                    for view in &views {
                        let c = logs[leader].since(view.cursor(), Some(1000));
                        deltas_after_failover += usize::from(c.delta);
                    }
                }
                _ => {
                    let v = rng.random_range(0..views.len());
                    views[v] = DirectiveView::default();
                }
            }
            let log = &logs[leader];
            for (v, view) in views.iter_mut().enumerate() {
                if step % (v + 1) != 0 {
                    continue;
                }
                let c = log.since(view.cursor(), Some(v + 2));
                match view.apply(&reply(c)) {
                    ViewUpdate::Partial => {}
                    ViewUpdate::Resync => panic!("seed {seed}, step {step}: a reply resynced"),
                    _ => assert_eq!(
                        view.directives().cloned().collect::<Vec<_>>(),
                        whole(log),
                        "seed {seed}, step {step}, view {v}"
                    ),
                }
            }
        }
        assert!(failovers > 50, "seed {seed}: {failovers} failovers");
        assert!(
            deltas_after_failover > 0,
            "seed {seed}: no delta after {failovers} failovers"
        );
    }
}
