//! Fault injection for chaos tests: a seeded schedule of phases, each one kind of API
//! failure (500s, answers slower than the client's timeout, watches cut, `410 Gone` on
//! a watch resume, `409` on updates) hitting a share of the requests of chosen users.
//! It decides which request fails and counts what it injected; the HTTP front and the
//! watch handler carry the faults out. It never changes an object itself.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Past the controller's 10 s API timeout (`reconcile::API_TIMEOUT`) and the agent's.
pub const DEFAULT_SLOW_BY: Duration = Duration::from_secs(12);
/// How often a cut-watches phase may cut every running watch.
pub const CUT_TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// `500 InternalError` instead of the answer; nothing is changed.
    ServerError,
    /// The request is carried out, and its answer held back past the client's timeout
    /// (as a server whose commit succeeded but whose answer is lost); watches excepted.
    Slow,
    /// Every running watch ends (as a load balancer or a restarting server cuts them).
    CutWatches,
    /// A watch that resumes from a resourceVersion gets `410 Expired` (the history was
    /// compacted): the client must relist.
    GoneOnResume,
    /// An update (`PUT`, `PATCH`) gets `409 Conflict`; nothing is changed.
    Conflict,
}

pub const ALL_KINDS: [FaultKind; 5] = [
    FaultKind::ServerError,
    FaultKind::Slow,
    FaultKind::CutWatches,
    FaultKind::GoneOnResume,
    FaultKind::Conflict,
];

impl FaultKind {
    fn index(self) -> usize {
        ALL_KINDS.iter().position(|k| *k == self).unwrap_or(0)
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ServerError => "500",
            FaultKind::Slow => "slow",
            FaultKind::CutWatches => "cut-watches",
            FaultKind::GoneOnResume => "410-on-resume",
            FaultKind::Conflict => "409-on-update",
        }
    }
}

/// One kind of fault, active from `start` to `end` after the plan began, hitting each
/// eligible request (or, for [`FaultKind::CutWatches`], each [`CUT_TICK`]) with
/// `probability`.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub start: Duration,
    pub end: Duration,
    pub kind: FaultKind,
    pub probability: f64,
}

/// A fault schedule: the same seed gives the same phases and the same sequence of
/// draws (which request gets which draw depends on the clients' timing).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    pub seed: u64,
    pub phases: Vec<Phase>,
    /// Only requests by these users are hit (exact user names as the server
    /// authenticated them, e.g. `system:serviceaccount:ns:name`); empty: everybody's.
    pub users: Vec<String>,
    /// Only requests for this subresource (e.g. `scale`) are hit; `None`: any request.
    pub subresource: Option<String>,
    /// How long a [`FaultKind::Slow`] answer is held back.
    pub slow_by: Duration,
}

impl FaultPlan {
    /// Phases over `total` derived from `seed`: every kind in turn (a shuffled order,
    /// reshuffled each round), each for 1 to 4 s with a probability of 0.2 to 0.6 (slow
    /// answers 0.1 to 0.3: each one costs its caller a whole timeout).
    pub fn seeded(seed: u64, total: Duration) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut phases = Vec::new();
        let mut at = Duration::ZERO;
        'outer: loop {
            let mut order = ALL_KINDS;
            order.shuffle(&mut rng);
            for kind in order {
                if at >= total {
                    break 'outer;
                }
                let len = Duration::from_millis(rng.random_range(1000..=4000));
                let probability = match kind {
                    FaultKind::Slow => rng.random_range(0.1..=0.3),
                    _ => rng.random_range(0.2..=0.6),
                };
                let end = (at + len).min(total);
                phases.push(Phase {
                    start: at,
                    end,
                    kind,
                    probability,
                });
                at = end;
            }
        }
        FaultPlan {
            seed,
            phases,
            users: Vec::new(),
            subresource: None,
            slow_by: DEFAULT_SLOW_BY,
        }
    }

    /// `kind` alone for `total`, hitting with `probability`. A `410 on resume` phase
    /// comes with watch cuts at the same rate: a watch resumes only after it ended, and
    /// without cuts none may end while the phase lasts (one seeded run injected none).
    pub fn only(seed: u64, kind: FaultKind, total: Duration, probability: f64) -> Self {
        let phase = |kind| Phase {
            start: Duration::ZERO,
            end: total,
            kind,
            probability,
        };
        let mut phases = vec![phase(kind)];
        if kind == FaultKind::GoneOnResume {
            phases.push(phase(FaultKind::CutWatches));
        }
        FaultPlan {
            seed,
            phases,
            users: Vec::new(),
            subresource: None,
            slow_by: DEFAULT_SLOW_BY,
        }
    }

    /// Only requests by `users` are hit.
    pub fn for_users(mut self, users: &[&str]) -> Self {
        self.users = users.iter().map(|u| u.to_string()).collect();
        self
    }

    /// Only requests for the subresource `sub` (e.g. `scale`) are hit.
    pub fn for_subresource(mut self, sub: &str) -> Self {
        self.subresource = Some(sub.to_string());
        self
    }

    /// When the last phase ends.
    pub fn duration(&self) -> Duration {
        self.phases.iter().map(|p| p.end).max().unwrap_or_default()
    }

    /// Parses `seed=<u64>,for=<seconds>[,slow=<seconds>][,users=<a>+<b>]` (the
    /// `--faults` flag of the standalone server).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut seed = None;
        let mut total = None;
        let mut slow_by = DEFAULT_SLOW_BY;
        let mut users = Vec::new();
        for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("faults: `{part}` is not key=value"))?;
            let secs = |v: &str| {
                v.trim_end_matches('s')
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| format!("faults: {k}={v} is not a number of seconds"))
            };
            match k.trim() {
                "seed" => {
                    seed = Some(
                        v.parse::<u64>()
                            .map_err(|_| format!("faults: seed={v} is not an unsigned integer"))?,
                    )
                }
                "for" => total = Some(secs(v)?),
                "slow" => slow_by = secs(v)?,
                "users" => users = v.split('+').map(str::to_owned).collect(),
                other => {
                    return Err(format!(
                        "faults: unknown key `{other}` (known: seed, for, slow, users)"
                    ));
                }
            }
        }
        let seed = seed.ok_or("faults: seed=<u64> is required")?;
        let total = total.ok_or("faults: for=<seconds> is required")?;
        let mut plan = FaultPlan::seeded(seed, total);
        plan.slow_by = slow_by;
        plan.users = users;
        Ok(plan)
    }

    fn active(&self, elapsed: Duration, kind: FaultKind) -> Option<&Phase> {
        self.phases
            .iter()
            .find(|p| p.kind == kind && p.start <= elapsed && elapsed < p.end)
    }
}

/// What the injector needs to know about a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub user: &'a str,
    /// `GET ...?watch=true`.
    pub watch: bool,
    /// A watch from a given resourceVersion (not `0`, not unset, not initial events).
    pub resume: bool,
    /// `PUT` or `PATCH`.
    pub update: bool,
    /// The subresource the request is for (`scale`, `status`, ...), if any.
    pub subresource: Option<&'a str>,
}

/// What to do to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    ServerError,
    Slow(Duration),
    Gone,
    Conflict,
}

/// How many faults of each kind were injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub server_errors: u64,
    pub slow: u64,
    pub watch_cuts: u64,
    pub gone: u64,
    pub conflicts: u64,
}

impl FaultCounts {
    pub fn total(&self) -> u64 {
        self.server_errors + self.slow + self.watch_cuts + self.gone + self.conflicts
    }

    /// How many of `kind` were injected.
    pub fn of(&self, kind: FaultKind) -> u64 {
        match kind {
            FaultKind::ServerError => self.server_errors,
            FaultKind::Slow => self.slow,
            FaultKind::CutWatches => self.watch_cuts,
            FaultKind::GoneOnResume => self.gone,
            FaultKind::Conflict => self.conflicts,
        }
    }

    /// The kinds injected at least once.
    pub fn kinds(&self) -> Vec<FaultKind> {
        let n = [
            self.server_errors,
            self.slow,
            self.watch_cuts,
            self.gone,
            self.conflicts,
        ];
        ALL_KINDS
            .iter()
            .zip(n)
            .filter(|(_, n)| *n > 0)
            .map(|(k, _)| *k)
            .collect()
    }
}

struct Active {
    plan: FaultPlan,
    started: Instant,
    rng: StdRng,
}

/// The server's injector: off until a plan is given.
#[derive(Default)]
pub struct Injector {
    active: Mutex<Option<Active>>,
    counts: [AtomicU64; 5],
}

impl Injector {
    pub fn start(&self, plan: FaultPlan) {
        let rng = StdRng::seed_from_u64(plan.seed ^ 0x5eed_f417);
        *self.lock() = Some(Active {
            plan,
            started: Instant::now(),
            rng,
        });
    }

    pub fn stop(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Active>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a plan is set and not over yet.
    pub fn running(&self) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|a| a.started.elapsed() < a.plan.duration())
    }

    fn count(&self, kind: FaultKind) {
        self.counts[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn counts(&self) -> FaultCounts {
        let n = |k: FaultKind| self.counts[k.index()].load(Ordering::Relaxed);
        FaultCounts {
            server_errors: n(FaultKind::ServerError),
            slow: n(FaultKind::Slow),
            watch_cuts: n(FaultKind::CutWatches),
            gone: n(FaultKind::GoneOnResume),
            conflicts: n(FaultKind::Conflict),
        }
    }

    /// The fault (if any) for one request, counted.
    pub fn decide(&self, req: &RequestInfo) -> Option<Fault> {
        let mut guard = self.lock();
        let a = guard.as_mut()?;
        if !a.plan.users.is_empty() && !a.plan.users.iter().any(|u| u == req.user) {
            return None;
        }
        if a.plan.subresource.is_some() && a.plan.subresource.as_deref() != req.subresource {
            return None;
        }
        let elapsed = a.started.elapsed();
        let candidates: &[FaultKind] = if req.watch {
            &[FaultKind::GoneOnResume, FaultKind::ServerError]
        } else {
            &[FaultKind::Conflict, FaultKind::ServerError, FaultKind::Slow]
        };
        for kind in candidates {
            let eligible = match kind {
                FaultKind::GoneOnResume => req.resume,
                FaultKind::Conflict => req.update,
                _ => true,
            };
            if !eligible {
                continue;
            }
            let Some(p) = a.plan.active(elapsed, *kind).map(|p| p.probability) else {
                continue;
            };
            if a.rng.random_bool(p.clamp(0.0, 1.0)) {
                let fault = match kind {
                    FaultKind::ServerError => Fault::ServerError,
                    FaultKind::Slow => Fault::Slow(a.plan.slow_by),
                    FaultKind::GoneOnResume => Fault::Gone,
                    FaultKind::Conflict => Fault::Conflict,
                    FaultKind::CutWatches => continue,
                };
                drop(guard);
                self.count(*kind);
                return Some(fault);
            }
        }
        None
    }

    /// Whether to cut every watch now (called each [`CUT_TICK`]), counted.
    pub fn cut_watches_now(&self) -> bool {
        let mut guard = self.lock();
        let Some(a) = guard.as_mut() else {
            return false;
        };
        let Some(p) = a
            .plan
            .active(a.started.elapsed(), FaultKind::CutWatches)
            .map(|p| p.probability)
        else {
            return false;
        };
        let cut = a.rng.random_bool(p.clamp(0.0, 1.0));
        drop(guard);
        if cut {
            self.count(FaultKind::CutWatches);
        }
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_schedule_covering_every_kind() {
        let a = FaultPlan::seeded(7, Duration::from_secs(30));
        assert_eq!(a, FaultPlan::seeded(7, Duration::from_secs(30)));
        assert_ne!(
            a.phases,
            FaultPlan::seeded(8, Duration::from_secs(30)).phases
        );
        for k in ALL_KINDS {
            assert!(a.phases.iter().any(|p| p.kind == k), "{k:?} scheduled");
        }
        assert_eq!(a.duration(), Duration::from_secs(30));
        for w in a.phases.windows(2) {
            assert_eq!(w[0].end, w[1].start, "phases follow each other");
        }
    }

    #[test]
    fn a_plan_of_one_kind_hits_with_that_kind_and_a_410_phase_cuts_watches_too() {
        let plan = FaultPlan::only(3, FaultKind::Conflict, Duration::from_secs(5), 1.0);
        assert_eq!(plan.duration(), Duration::from_secs(5));
        let kinds = |p: &FaultPlan| p.phases.iter().map(|p| p.kind).collect::<Vec<_>>();
        assert_eq!(kinds(&plan), [FaultKind::Conflict]);
        let inj = Injector::default();
        inj.start(plan);
        let update = RequestInfo {
            user: "ctl",
            watch: false,
            resume: false,
            update: true,
            subresource: None,
        };
        assert_eq!(inj.decide(&update), Some(Fault::Conflict));
        assert!(!inj.cut_watches_now());
        let counts = inj.counts();
        assert_eq!(counts.of(FaultKind::Conflict), 1);
        assert_eq!(counts.kinds(), [FaultKind::Conflict]);
        let gone = FaultPlan::only(3, FaultKind::GoneOnResume, Duration::from_secs(5), 1.0);
        assert_eq!(
            kinds(&gone),
            [FaultKind::GoneOnResume, FaultKind::CutWatches]
        );
        inj.start(gone);
        assert!(inj.cut_watches_now());
        let resume = RequestInfo {
            user: "ctl",
            watch: true,
            resume: true,
            update: false,
            subresource: None,
        };
        assert_eq!(inj.decide(&resume), Some(Fault::Gone));
        assert_eq!(inj.counts().of(FaultKind::GoneOnResume), 1);
        assert_eq!(inj.counts().of(FaultKind::CutWatches), 1);
    }

    #[test]
    fn faults_hit_only_eligible_requests_of_the_chosen_users() {
        let plan = FaultPlan {
            seed: 1,
            phases: vec![Phase {
                start: Duration::ZERO,
                end: Duration::from_secs(3600),
                kind: FaultKind::Conflict,
                probability: 1.0,
            }],
            users: vec!["ctl".into()],
            subresource: None,
            slow_by: DEFAULT_SLOW_BY,
        };
        let inj = Injector::default();
        inj.start(plan);
        let req = |user, update| RequestInfo {
            user,
            watch: false,
            resume: false,
            update,
            subresource: None,
        };
        assert_eq!(inj.decide(&req("ctl", true)), Some(Fault::Conflict));
        assert_eq!(inj.decide(&req("ctl", false)), None, "a read is no update");
        assert_eq!(inj.decide(&req("other", true)), None, "not a chosen user");
        assert_eq!(inj.counts().conflicts, 1);
        assert!(!inj.cut_watches_now());
        inj.stop();
        assert_eq!(inj.decide(&req("ctl", true)), None);
    }

    #[test]
    fn the_flag_parses_and_names_what_is_wrong() {
        let p = FaultPlan::parse("seed=3,for=20s,slow=11,users=a+b").unwrap();
        assert_eq!(p.seed, 3);
        assert_eq!(p.duration(), Duration::from_secs(20));
        assert_eq!(p.slow_by, Duration::from_secs(11));
        assert_eq!(p.users, vec!["a", "b"]);
        assert!(FaultPlan::parse("for=3").unwrap_err().contains("seed"));
        assert!(
            FaultPlan::parse("seed=1,for=x")
                .unwrap_err()
                .contains("for=x")
        );
        assert!(
            FaultPlan::parse("seed=1,for=1,bogus=2")
                .unwrap_err()
                .contains("bogus")
        );
    }
}
