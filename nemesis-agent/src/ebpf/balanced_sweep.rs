//! The sweeper of SOCK_BAL (`nemesis_common::maps::SOCK_BAL`): a balanced socket's
//! entry is deleted by sock_ops at the socket's close once its SYN went out
//! ([`BAL_CONNECTING`]); a connect that failed before its SYN (no route to the backend,
//! a fast-open connect closed before it sent anything) leaves an entry nothing deletes.
//! Such an entry never gets the flag: connect4/6 and the SYN's callback run within one
//! connect() call, so an entry seen without it at two sweeps a whole interval apart,
//! unchanged, is one of those, and goes. A later connect of the same socket writes a
//! new entry (a changed one starts over), and the delete is made only if the entry is
//! still as it was read.

use std::collections::HashMap;

use nemesis_common::maps::{BAL_CONNECTING, BalancedSock};

/// The entries without [`BAL_CONNECTING`] at the last sweep, as they were then.
#[derive(Debug, Default)]
pub(crate) struct Sweeper {
    suspects: HashMap<u64, BalancedSock>,
}

impl Sweeper {
    /// One sweep over the entries as read now: the ones to delete (with the value each
    /// must still have), those seen unflagged and unchanged at the last sweep too. The
    /// other unflagged ones are remembered for the next sweep.
    pub(crate) fn sweep(
        &mut self,
        entries: impl IntoIterator<Item = (u64, BalancedSock)>,
    ) -> Vec<(u64, BalancedSock)> {
        let mut next = HashMap::new();
        let mut gone = vec![];
        for (cookie, rec) in entries {
            if rec.flags & BAL_CONNECTING != 0 {
                continue;
            }
            if self.suspects.get(&cookie) == Some(&rec) {
                gone.push((cookie, rec));
            } else {
                next.insert(cookie, rec);
            }
        }
        self.suspects = next;
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(slot: u32, flags: u32) -> BalancedSock {
        BalancedSock {
            slot,
            flags,
            ..Default::default()
        }
    }

    #[test]
    fn an_unflagged_entry_goes_at_its_second_sweep_only() {
        let mut s = Sweeper::default();
        assert!(s.sweep([(1, rec(0, 0))]).is_empty(), "first seen: kept");
        assert_eq!(s.sweep([(1, rec(0, 0))]), vec![(1, rec(0, 0))]);
        assert!(s.sweep([]).is_empty(), "deleted: forgotten");
    }

    #[test]
    fn flagged_or_changed_entries_stay() {
        let mut s = Sweeper::default();
        s.sweep([(1, rec(0, 0)), (2, rec(0, 0))]);
        // 1 reached its SYN meanwhile; 2 is a new connect of the same socket.
        let gone = s.sweep([(1, rec(0, BAL_CONNECTING)), (2, rec(7, 0))]);
        assert!(gone.is_empty());
        // 2 unchanged since: it goes now; 1 never does.
        let gone = s.sweep([(1, rec(0, BAL_CONNECTING | 1)), (2, rec(7, 0))]);
        assert_eq!(gone, vec![(2, rec(7, 0))]);
    }
}
