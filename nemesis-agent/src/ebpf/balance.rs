//! The balance-mode maps: each balanced Service port's set (BACKENDS), the node-wide
//! backend table under compact ids (BACKEND_TABLE), and the per-id counts (this node's
//! in BACKEND_CONNS, the other nodes' in BACKEND_REMOTE), with a mirror of what was
//! written. It owns id allocation and the least-connections candidate lists; it never
//! decides which backends are ready (the caller says so).
//!
//! Safety of id reuse: an id's BACKEND_TABLE entry is written only while no set lists
//! it (a new id before the set that adds it, never after removal), and a freed id goes
//! to the back of a FIFO of [`m::MAX_BACKEND_IDS`] ids, so a program still reading a
//! replaced set (RCU) never meets an id rewritten under it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError};
use nemesis_common::maps::{self as m, Backend, BackendSet};
use tracing::warn;

use super::{Slot, sys};
use nemesis_common::policy::{Algorithm, LoadBalancing};

/// What can go wrong changing a set.
#[derive(Debug, thiserror::Error)]
pub(super) enum BalanceError {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("{needed} new backend ids needed, {free} free of {max}", max = m::MAX_BACKEND_IDS)]
    IdsExhausted { needed: usize, free: usize },
}

/// One Service port's set as written, and its members by id.
#[derive(Clone, Debug, Default)]
pub(super) struct Members {
    pub set: BackendSet,
    pub entries: BTreeMap<u16, Backend>,
}

/// The balance maps and their mirror. Locked as one (see `Datapath::balance`).
pub(super) struct BalanceTable {
    sets: BpfHashMap<MapData, u32, BackendSet>,
    table: Array<MapData, Backend>,
    conns: Array<MapData, u64>,
    remote: Array<MapData, u64>,
    mirror: HashMap<Slot, Members>,
    /// Ids no set lists, longest free first.
    free_ids: VecDeque<u16>,
    next_generation: u32,
}

// === impl BalanceTable ===

impl BalanceTable {
    /// Adopts what an earlier agent left: the sets of slots still in use (their ids,
    /// generations and counts carry on), dropping the others.
    pub fn adopt(
        mut sets: BpfHashMap<MapData, u32, BackendSet>,
        table: Array<MapData, Backend>,
        conns: Array<MapData, u64>,
        remote: Array<MapData, u64>,
        used_slots: &BTreeSet<Slot>,
    ) -> Result<BalanceTable, MapError> {
        let mut mirror = HashMap::new();
        let mut stale = vec![];
        for kv in sets.iter() {
            let (slot, set) = kv?;
            if !used_slots.contains(&slot) {
                stale.push(slot);
                continue;
            }
            let mut entries = BTreeMap::new();
            for id in set.order.iter().take(set.count as usize) {
                let e = table.get(&u32::from(*id), 0)?;
                if e.generation != 0 {
                    entries.insert(*id, e);
                }
            }
            mirror.insert(slot, Members { set, entries });
        }
        for slot in stale {
            let _ = sets.remove(&slot);
        }
        let used: BTreeSet<u16> = mirror
            .values()
            .flat_map(|s| s.entries.keys().copied())
            .collect();
        let free_ids = (0..m::MAX_BACKEND_IDS)
            .map(|id| id as u16)
            .filter(|id| !used.contains(id))
            .collect();
        let next_generation = mirror
            .values()
            .flat_map(|s| s.entries.values().map(|b| b.generation))
            .max()
            .unwrap_or(0)
            .max(sys::monotonic_ns() as u32);
        Ok(BalanceTable {
            sets,
            table,
            conns,
            remote,
            mirror,
            free_ids,
            next_generation,
        })
    }

    /// Makes `slot`'s set exactly `wanted` (address, port, tier; deduplicated by the
    /// caller): a backend that stays keeps its id, count and ready time; one that goes
    /// gets no new connects (its open connections carry on, its id is freed); one that
    /// comes gets a fresh id, ready from now unless the set is new to this agent (then
    /// warm). Returns the number of backends in the set.
    pub fn set(
        &mut self,
        slot: Slot,
        wanted: &[Backend],
        balancing: LoadBalancing,
    ) -> Result<u32, BalanceError> {
        let known = self.mirror.contains_key(&slot);
        let mut members = self.mirror.get(&slot).cloned().unwrap_or_default();
        let before = members.set;
        let same = |x: &Backend, y: &Backend| x.addr == y.addr && x.port == y.port;

        let removed: Vec<u16> = members
            .entries
            .iter()
            .filter(|(_, e)| !wanted.iter().any(|w| same(w, e)))
            .map(|(id, _)| *id)
            .collect();
        for id in &removed {
            members.entries.remove(id);
        }
        let mut fresh = vec![];
        for w in wanted {
            match members.entries.iter_mut().find(|(_, e)| same(w, e)) {
                Some((id, e)) if e.tier != w.tier => {
                    // Only the tier byte changes: a program reading the entry now sees
                    // the same address either way.
                    e.tier = w.tier;
                    self.table.set(u32::from(*id), *e, 0)?;
                }
                Some(_) => {}
                None => fresh.push(*w),
            }
        }
        if fresh.len() > self.free_ids.len() {
            return Err(BalanceError::IdsExhausted {
                needed: fresh.len(),
                free: self.free_ids.len(),
            });
        }
        let now = sys::monotonic_ns();
        let mut taken = vec![];
        let written = (|| -> Result<(), MapError> {
            for w in &fresh {
                let Some(id) = self.free_ids.pop_front() else {
                    break; // checked above
                };
                taken.push(id);
                self.next_generation = match self.next_generation.wrapping_add(1) {
                    0 => 1,
                    g => g,
                };
                let entry = Backend {
                    generation: self.next_generation,
                    ready_ns: if known { now } else { 0 },
                    ..*w
                };
                // Fresh counts, then the entry: nothing lists the id until the set
                // below is written.
                self.conns.set(u32::from(id), 0, 0)?;
                self.remote.set(u32::from(id), 0, 0)?;
                self.table.set(u32::from(id), entry, 0)?;
                members.entries.insert(id, entry);
            }
            let window = window_ns(balancing);
            seal(&mut members, balancing, |id, e| {
                self.load(id, e, now, window)
            });
            if members.set != before || !known {
                self.sets.insert(slot, members.set, 0)?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            // The set was not written: the new ids are listed nowhere.
            self.free_ids.extend(taken);
            return Err(e.into());
        }
        let count = members.set.count;
        self.mirror.insert(slot, members);
        self.free_ids.extend(removed);
        Ok(count)
    }

    /// The members of `slot`'s set, each with this node's open connections to it.
    pub fn local_counts(&self, slot: Slot) -> Result<Vec<(Backend, u64)>, MapError> {
        let Some(members) = self.mirror.get(&slot) else {
            return Ok(vec![]);
        };
        members
            .entries
            .iter()
            .map(|(id, e)| Ok((*e, sane(self.conns.get(&u32::from(*id), 0)?))))
            .collect()
    }

    /// The members of `slot`'s set, each with the other nodes' open connections to it
    /// as last written.
    pub fn remote_counts(&self, slot: Slot) -> Result<Vec<(Backend, u64)>, MapError> {
        let Some(members) = self.mirror.get(&slot) else {
            return Ok(vec![]);
        };
        members
            .entries
            .iter()
            .map(|(id, e)| Ok((*e, self.remote.get(&u32::from(*id), 0)?)))
            .collect()
    }

    /// Writes the other nodes' open connections to `slot`'s backends (0 for a member
    /// `remote` does not name). Returns how many members got a non-zero load.
    pub fn set_remote(&mut self, slot: Slot, remote: &[(Backend, u64)]) -> Result<usize, MapError> {
        let Some(members) = self.mirror.get(&slot) else {
            return Ok(0);
        };
        let mut loaded = 0;
        for (id, e) in &members.entries {
            let load = remote
                .iter()
                .find(|(r, _)| r.addr == e.addr && r.port == e.port)
                .map_or(0, |(_, n)| *n);
            if load > 0 {
                loaded += 1;
            }
            if self.remote.get(&u32::from(*id), 0)? != load {
                self.remote.set(u32::from(*id), load, 0)?;
            }
        }
        Ok(loaded)
    }

    /// Least connections over sets larger than [`m::LC_CANDIDATES`]: recomputes each
    /// set's candidates (the least loaded of each tier by the counts now) and writes
    /// the sets whose list changed. Returns how many were written.
    pub fn refresh_candidates(&mut self) -> Result<usize, MapError> {
        let now = sys::monotonic_ns();
        let slots: Vec<Slot> = self
            .mirror
            .iter()
            .filter(|(_, s)| {
                s.set.algorithm == m::ALG_LEAST_CONNECTIONS && s.set.count > m::LC_CANDIDATES
            })
            .map(|(slot, _)| *slot)
            .collect();
        let mut written = 0;
        for slot in slots {
            let Some(mut members) = self.mirror.get(&slot).cloned() else {
                continue;
            };
            let before = members.set.candidates;
            let window = members.set.slow_start_ns;
            set_candidates(&mut members, |id, e| self.load(id, e, now, window));
            if members.set.candidates != before {
                self.sets.insert(slot, members.set, 0)?;
                self.mirror.insert(slot, members);
                written += 1;
            }
        }
        Ok(written)
    }

    /// Forgets the set of a slot (its service is gone or the slot is fresh).
    pub fn clear(&mut self, slot: Slot) {
        let members = self.mirror.remove(&slot);
        if members.is_some() || self.sets.get(&slot, 0).is_ok() {
            match self.sets.remove(&slot) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(error) => warn!(slot, %error, "removing a balance backend set failed"),
            }
        }
        if let Some(members) = members {
            self.free_ids.extend(members.entries.keys());
        }
    }

    /// Ids free now (for tests and metrics).
    pub fn free_ids(&self) -> usize {
        self.free_ids.len()
    }

    /// A backend's weighted load as the kernel computes it (see `weighted_load` in
    /// nemesis-ebpf), from every node's counts; 0 on a read error.
    fn load(&self, id: u16, e: &Backend, now: u64, window: u64) -> u64 {
        let id = u32::from(id);
        let conns =
            sane(self.conns.get(&id, 0).unwrap_or(0)) + sane(self.remote.get(&id, 0).unwrap_or(0));
        conns * m::WEIGHT_FULL * m::WEIGHT_FULL / weight(e.ready_ns, now, window)
    }
}

/// A count as the kernel reads it: a close racing an id's reuse may have taken it
/// below zero (huge), which counts as 0.
fn sane(v: u64) -> u64 {
    if v > (1 << 40) { 0 } else { v }
}

/// The slow-start weight in thousandths, as the kernel's `weight`.
fn weight(ready_ns: u64, now: u64, window: u64) -> u64 {
    if window == 0 || ready_ns == 0 {
        return m::WEIGHT_FULL;
    }
    if now <= ready_ns {
        return m::WEIGHT_MIN;
    }
    let age = now - ready_ns;
    if age >= window {
        return m::WEIGHT_FULL;
    }
    (age * m::WEIGHT_FULL / window).max(m::WEIGHT_MIN)
}

/// Recomputes a set from its members: count, dense order (preferred tiers first), tier
/// bounds, the algorithm and window of `balancing`, and the least-connections
/// candidates (by `load`).
fn seal(members: &mut Members, balancing: LoadBalancing, load: impl Fn(u16, &Backend) -> u64) {
    let mut occupied: Vec<(u8, u16)> = members
        .entries
        .iter()
        .map(|(id, e)| (e.tier, *id))
        .collect();
    occupied.sort();
    let set = &mut members.set;
    set.count = occupied.len() as u32;
    set.order = [0; m::MAX_BACKENDS as usize];
    for (pos, (_, id)) in occupied.iter().enumerate() {
        set.order[pos] = *id;
    }
    let within = |tier: u8| occupied.iter().filter(|(t, _)| *t <= tier).count() as u32;
    set.tiers = [
        if balancing.prefer_same_node {
            within(m::TIER_NODE)
        } else {
            0
        },
        if balancing.prefer_same_zone {
            within(m::TIER_ZONE)
        } else {
            0
        },
    ];
    set.algorithm = algorithm_raw(balancing.algorithm);
    set.slow_start_ns = window_ns(balancing);
    set_candidates(members, load);
}

/// The least-connections candidates of a sealed set: every position when the set has
/// at most [`m::LC_CANDIDATES`]; else, for each tier present, the least loaded of its
/// positions (an equal share of the list each), so that the least loaded backend of
/// any prefix a connect may be confined to (node, node + zone, all) is listed.
fn set_candidates(members: &mut Members, load: impl Fn(u16, &Backend) -> u64) {
    let set = &mut members.set;
    let count = set.count as usize;
    let max = m::LC_CANDIDATES as usize;
    let mut picked: Vec<u16> = if count <= max || set.algorithm != m::ALG_LEAST_CONNECTIONS {
        (0..count.min(max) as u16).collect()
    } else {
        let tier_of = |pos: usize| {
            members
                .entries
                .get(&set.order[pos])
                .map_or(m::TIER_REMOTE, |e| e.tier)
        };
        // Positions are sorted by tier: each tier is a run.
        let mut runs: Vec<(usize, usize)> = vec![];
        for pos in 0..count {
            match runs.last_mut() {
                Some((start, end)) if tier_of(*start) == tier_of(pos) => *end = pos + 1,
                _ => runs.push((pos, pos + 1)),
            }
        }
        let share = max / runs.len();
        let mut out = vec![];
        for (i, (start, end)) in runs.iter().enumerate() {
            // The last run takes what the others' rounding left.
            let take = if i + 1 == runs.len() {
                max - out.len()
            } else {
                share
            };
            let mut ranked: Vec<(u64, usize)> = (*start..*end)
                .map(|pos| {
                    let id = set.order[pos];
                    let l = members.entries.get(&id).map_or(u64::MAX, |e| load(id, e));
                    (l, pos)
                })
                .collect();
            ranked.sort();
            out.extend(ranked.iter().take(take).map(|(_, pos)| *pos as u16));
        }
        out.sort();
        out
    };
    picked.truncate(max);
    set.candidates = [0; m::LC_CANDIDATES as usize];
    set.candidates[..picked.len()].copy_from_slice(&picked);
    set.candidate_count = picked.len() as u32;
}

fn window_ns(balancing: LoadBalancing) -> u64 {
    u64::try_from(balancing.slow_start.as_nanos()).unwrap_or(u64::MAX)
}

fn algorithm_raw(a: Algorithm) -> u32 {
    match a {
        Algorithm::P2c => m::ALG_P2C,
        Algorithm::LeastConnections => m::ALG_LEAST_CONNECTIONS,
        Algorithm::RoundRobin => m::ALG_ROUND_ROBIN,
        Algorithm::Random => m::ALG_RANDOM,
    }
}
