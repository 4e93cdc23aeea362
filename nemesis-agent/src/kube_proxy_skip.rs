//! The kube-proxy skip rule (opt-in, `--kube-proxy-skip-mark`): one rule at the head of
//! the nat table's OUTPUT chain, `-m mark --mark M/M -j RETURN`, so that a connect the
//! balance-mode hook already sent to a pod (and marked with the bit M, see
//! `mark_for_skip` in the eBPF programs) does not walk kube-proxy's KUBE-SERVICES list,
//! where it could match nothing anyway. Owns installing that rule, keeping it ahead of
//! kube-proxy's jump, and removing it; it never touches any other rule or chain.
//!
//! Why it is safe: kube-proxy's nat rules only ever rewrite a destination that is a
//! Service address (ClusterIP, external or load-balancer IP, a node port on a local
//! address). A marked connect's destination is a ready backend's pod IP and target port,
//! which the hook took from the Service's EndpointSlices: exactly where kube-proxy's own
//! DNAT would have sent it, and never a Service address itself. The mark is set by the
//! programs only on such connects (never on held ones, passthrough or unmanaged
//! traffic), so every other connection of the node walks kube-proxy's rules unchanged.
//! The masquerade kube-proxy adds for hairpin connects (a pod reaching itself through
//! its Service's ClusterIP) is not needed: without the DNAT the pod simply connects
//! to its own address. Removing the rule is always safe (connects are then NAT-free
//! anyway and only walk the list again), so the agent removes it when it stops, and
//! `nemesis-agent cleanup` removes any left behind.

use std::{process::Command, sync::Mutex, time::Duration};

/// Marks the agent's rule, so that it is found (and only it is removed) whatever else
/// the chain holds.
pub const COMMENT: &str = "nemesis: balanced connect already addressed to a pod";
/// How often the rule is checked: kube-proxy re-inserts its jump at the head of the
/// chain when it finds it missing (after a flush or reboot), which would put the rule
/// behind it; until then connects are only slower, never wrong.
pub const REFRESH: Duration = Duration::from_secs(30);
/// The commands the rule is written with by default: IPv4 and IPv6 nat tables.
pub const DEFAULT_COMMANDS: &[&str] = &["iptables", "ip6tables"];
/// The chain kube-proxy's iptables mode sends every locally made connection through.
const KUBE_SERVICES: &str = "KUBE-SERVICES";

#[derive(Debug, thiserror::Error)]
pub enum SkipError {
    #[error("the kube-proxy skip mark must be exactly one bit (e.g. 0x2000), not {0:#x}")]
    BadMark(u32),
    #[error("running `{command}` for the kube-proxy skip rule")]
    Run {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// What to do to the OUTPUT chain so that it holds exactly one rule of ours, with the
/// wanted mark, ahead of kube-proxy's jump.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The `--mark` values (as `iptables -S` prints them, `0x2000/0x2000`) of our rules
    /// to delete, one deletion each.
    pub delete: Vec<String>,
    /// Insert the rule at the head of the chain (after the deletions).
    pub insert: bool,
}

/// The plan for `listing` (the output of `iptables -t nat -S OUTPUT`): keep our first
/// rule if it has `mark` and comes before kube-proxy's jump; delete every other rule of
/// ours (a wrong mark, a duplicate, behind the jump). `mark: None`: delete all of ours.
pub fn plan(listing: &str, mark: Option<u32>) -> Plan {
    let wanted = mark.map(mark_match);
    let mut plan = Plan::default();
    let mut kept = false;
    let mut behind_jump = false;
    for line in listing.lines() {
        let line = line.trim();
        if !line.starts_with("-A ") {
            continue;
        }
        if !line.contains(COMMENT) {
            if jumps_to(line, KUBE_SERVICES) {
                behind_jump = true;
            }
            continue;
        }
        let found = mark_of(line).unwrap_or_default();
        if !kept && !behind_jump && wanted.as_deref() == Some(found.as_str()) {
            kept = true;
        } else {
            plan.delete.push(found);
        }
    }
    plan.insert = wanted.is_some() && !kept;
    plan
}

/// `M/M` as iptables prints a mark match.
fn mark_match(mark: u32) -> String {
    format!("{mark:#x}/{mark:#x}")
}

/// The value after `--mark` in a rule line.
fn mark_of(line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == "--mark")?;
    words.next().map(str::to_string)
}

fn jumps_to(line: &str, chain: &str) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1] == chain)
}

/// The rule's match and target for `mark` (as `M/M`), without the chain.
fn rule_args(mark: &str) -> Vec<String> {
    [
        "-m",
        "mark",
        "--mark",
        mark,
        "-m",
        "comment",
        "--comment",
        COMMENT,
        "-j",
        "RETURN",
    ]
    .map(str::to_string)
    .to_vec()
}

/// The skip rule of one agent: its mark bit and the commands (one per address family)
/// it is written with.
#[derive(Debug)]
pub struct SkipRule {
    mark: u32,
    commands: Vec<String>,
    /// Set by [`SkipRule::remove`]: a later [`SkipRule::ensure`] (a refresh racing the
    /// shutdown) installs nothing.
    removed: Mutex<bool>,
}

impl SkipRule {
    /// The rule for `mark` (exactly one bit: the programs OR it into the socket's mark,
    /// so every other bit stays the application's), written with `commands`
    /// (e.g. `iptables`, `ip6tables`, or `iptables-legacy` where kube-proxy uses it).
    pub fn new(mark: u32, commands: &[String]) -> Result<Self, SkipError> {
        if mark.count_ones() != 1 {
            return Err(SkipError::BadMark(mark));
        }
        Ok(Self {
            mark,
            commands: commands.to_vec(),
            removed: Mutex::new(false),
        })
    }

    pub fn mark(&self) -> u32 {
        self.mark
    }

    /// Makes each command's nat OUTPUT chain hold the rule ahead of kube-proxy's jump
    /// (idempotent: nothing is written when it already does). One result per command, in
    /// order; a failing command does not stop the others.
    pub fn ensure(&self) -> Vec<(String, Result<Plan, SkipError>)> {
        let removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        self.commands
            .iter()
            .map(|c| {
                let result = if *removed {
                    Ok(Plan::default())
                } else {
                    apply(c, Some(self.mark))
                };
                (c.clone(), result)
            })
            .collect()
    }

    /// Removes the rule (every rule of ours, whatever its mark) and keeps later
    /// [`SkipRule::ensure`] calls from installing it again. One result per command.
    pub fn remove(&self) -> Vec<(String, Result<Plan, SkipError>)> {
        let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        *removed = true;
        remove_all(&self.commands)
    }
}

/// Removes every rule of ours from each command's nat OUTPUT chain (`cleanup`: whatever
/// mark the agent that left it used).
pub fn remove_all(commands: &[String]) -> Vec<(String, Result<Plan, SkipError>)> {
    commands
        .iter()
        .map(|c| (c.clone(), apply(c, None)))
        .collect()
}

/// Lists the chain, plans, and applies the plan: deletions by the rule's full
/// specification (never by number, which kube-proxy could shift in between), then the
/// insert at the head.
fn apply(command: &str, mark: Option<u32>) -> Result<Plan, SkipError> {
    let listing = run(command, &["-w", "5", "-t", "nat", "-S", "OUTPUT"])?;
    let plan = plan(&listing, mark);
    for m in &plan.delete {
        let mut args = vec!["-w", "5", "-t", "nat", "-D", "OUTPUT"]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>();
        args.extend(rule_args(m));
        run(command, &args)?;
    }
    if plan.insert
        && let Some(mark) = mark
    {
        let mut args = vec!["-w", "5", "-t", "nat", "-I", "OUTPUT", "1"]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>();
        args.extend(rule_args(&mark_match(mark)));
        run(command, &args)?;
    }
    Ok(plan)
}

fn run<S: AsRef<std::ffi::OsStr>>(command: &str, args: &[S]) -> Result<String, SkipError> {
    let describe = || {
        let mut s = command.to_string();
        for a in args {
            s.push(' ');
            s.push_str(&a.as_ref().to_string_lossy());
        }
        s
    };
    let out = Command::new(command)
        .args(args)
        .output()
        .map_err(|source| SkipError::Run {
            command: describe(),
            source,
        })?;
    if !out.status.success() {
        return Err(SkipError::Failed {
            command: describe(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBE_JUMP: &str =
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES";

    fn ours(mark: &str) -> String {
        format!("-A OUTPUT -m mark --mark {mark} -m comment --comment \"{COMMENT}\" -j RETURN")
    }

    #[test]
    fn a_chain_without_the_rule_gets_it_inserted() {
        let listing = format!("-P OUTPUT ACCEPT\n{KUBE_JUMP}\n");
        assert_eq!(
            plan(&listing, Some(0x2000)),
            Plan {
                delete: vec![],
                insert: true
            }
        );
    }

    #[test]
    fn the_rule_ahead_of_kube_proxy_is_kept_as_it_is() {
        let listing = format!(
            "-P OUTPUT ACCEPT\n-A OUTPUT -j cali-OUTPUT\n{}\n{KUBE_JUMP}\n",
            ours("0x2000/0x2000")
        );
        assert_eq!(plan(&listing, Some(0x2000)), Plan::default());
    }

    #[test]
    fn the_rule_behind_kube_proxys_jump_is_moved_to_the_head() {
        let listing = format!("-P OUTPUT ACCEPT\n{KUBE_JUMP}\n{}\n", ours("0x2000/0x2000"));
        assert_eq!(
            plan(&listing, Some(0x2000)),
            Plan {
                delete: vec!["0x2000/0x2000".into()],
                insert: true
            }
        );
    }

    #[test]
    fn a_rule_with_another_mark_and_duplicates_are_deleted() {
        let listing = format!(
            "{}\n{}\n{}\n{KUBE_JUMP}\n",
            ours("0x1000/0x1000"),
            ours("0x2000/0x2000"),
            ours("0x2000/0x2000")
        );
        assert_eq!(
            plan(&listing, Some(0x2000)),
            Plan {
                delete: vec!["0x1000/0x1000".into(), "0x2000/0x2000".into()],
                insert: false
            }
        );
    }

    #[test]
    fn removing_deletes_every_rule_of_ours_and_nothing_else() {
        let listing = format!(
            "-P OUTPUT ACCEPT\n{}\n{KUBE_JUMP}\n-A OUTPUT -m mark --mark 0x2000/0x2000 -j ACCEPT\n",
            ours("0x2000/0x2000")
        );
        assert_eq!(
            plan(&listing, None),
            Plan {
                delete: vec!["0x2000/0x2000".into()],
                insert: false
            }
        );
    }

    #[test]
    fn a_mark_of_more_or_fewer_than_one_bit_is_refused() {
        for bad in [0, 0x3000, u32::MAX] {
            let err = SkipRule::new(bad, &[]).unwrap_err();
            assert!(err.to_string().contains("exactly one bit"), "{err}");
        }
        assert_eq!(SkipRule::new(0x2000, &[]).unwrap().mark(), 0x2000);
    }
}
