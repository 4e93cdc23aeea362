//! The hand-over between two agents of one node (a DaemonSet's surge: the new agent
//! starts before the old one stops): the writer lock that lets one agent at a time
//! write the pinned datapath, and the kernel setting that moves a closing listener's
//! pending connections to the other agent. Owns these two; never touches a map, a
//! program or a connection.
//!
//! Why two agents at once are safe:
//! - Both listen on the proxy (and admin) address with SO_REUSEPORT, so the kernel
//!   spreads new connects over both queues; with `net.ipv4.tcp_migrate_req=1` the
//!   connections still queued at a listener that closes move to the other one instead
//!   of being reset. Nothing is refused while one of them listens.
//! - Only the holder of the writer lock (an exclusive `flock` on the instance's pin
//!   directory) loads and writes the datapath: the services table and its counters, the
//!   modes, the dead-man heartbeat, the config. A second agent waits in standby: it
//!   listens (its queue fills, connections wait, none is refused) but neither accepts
//!   nor writes, and it adopts the pins only once the lock is its own, so its mirror of
//!   the services table (slots, modes, epochs) is read after the old agent's last
//!   write and the two never allocate slots or set modes against each other.
//! - The old agent lets go in this order on SIGTERM: close its listeners (their queues
//!   move to the standby's), stop every writer (mode follower, Service watch, dead-man
//!   heartbeat, reports to the controller) and release the lock, then drain the
//!   connections it already accepted, whose endpoints it still watches.
//! - The dead-man switch needs no hand-over: the heartbeat is one value in a pinned
//!   map, written only by the lock holder; while the standby takes over (milliseconds)
//!   it ages far less than `--deadman-max-age`.
//! - The mode followers never fight: the standby runs none until it holds the lock,
//!   and it starts from the table as the old one left it. The controller hears from one
//!   agent of the node at a time too: a standby sends no heartbeat and no wake-up (its
//!   proxy accepts nothing), and the old agent stops reporting when it lets go; the new
//!   one reports under a new instance id, as after any restart.
//! - The lock dies with its process (it is a `flock` on an open file), so a crashed
//!   agent never blocks its successor.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

/// The kernel setting that migrates pending connections of a closing listener to the
/// others of its SO_REUSEPORT group (Linux 5.14 and newer).
pub const TCP_MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
/// How often a standby agent tries the writer lock: its queued connections wait at
/// most this much longer than the old agent's release.
pub const LOCK_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("opening the pin directory {path} to lock it")]
    OpenLockDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("locking the pin directory {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// The right to write the pinned datapath of one instance; released when dropped.
#[derive(Debug)]
pub struct WriterLock {
    _lock: Flock<File>,
}

impl WriterLock {
    /// Takes the lock on `dir` if free; `Ok(None)` while another agent holds it.
    pub fn try_acquire(dir: &Path) -> Result<Option<WriterLock>, HandoverError> {
        let file = File::open(dir).map_err(|source| HandoverError::OpenLockDir {
            path: dir.to_path_buf(),
            source,
        })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(WriterLock { _lock: lock })),
            Err((_, nix::Error::EWOULDBLOCK)) => Ok(None),
            Err((_, source)) => Err(HandoverError::Lock {
                path: dir.to_path_buf(),
                source,
            }),
        }
    }

    /// Waits (polling every [`LOCK_POLL`], so that dropping the future gives up at once)
    /// until the lock on `dir` is free, and takes it.
    pub async fn acquire(dir: &Path) -> Result<WriterLock, HandoverError> {
        loop {
            if let Some(lock) = Self::try_acquire(dir)? {
                return Ok(lock);
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }
}

/// What [`enable_listener_migration`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Migration {
    /// It was on already.
    AlreadyOn,
    /// This agent turned it on.
    TurnedOn,
    /// Off, and it could not be turned on (the reason).
    Unavailable(String),
}

/// What a read of the setting says: on, off, or not a value this understands.
pub fn parse_migrate_req(text: &str) -> Option<bool> {
    match text.trim() {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// Turns `net.ipv4.tcp_migrate_req` on in this network namespace (the host's, for a
/// host-network agent) at `path` (normally [`TCP_MIGRATE_REQ`]). Best effort: without
/// it a restart still works, but the connections queued at the old agent's listener
/// when it closes are reset; the result says which.
pub fn enable_listener_migration(path: &Path) -> Migration {
    match std::fs::read_to_string(path) {
        Ok(text) if parse_migrate_req(&text) == Some(true) => return Migration::AlreadyOn,
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Migration::Unavailable(format!(
                "{} does not exist (Linux older than 5.14)",
                path.display()
            ));
        }
        Err(e) => return Migration::Unavailable(format!("reading {}: {e}", path.display())),
    }
    match std::fs::write(path, "1\n") {
        Ok(()) => Migration::TurnedOn,
        Err(e) => Migration::Unavailable(format!("writing 1 to {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory of this test's own, removed when dropped.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("nemesis-handover-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_setting_reads_as_on_off_or_unknown() {
        assert_eq!(parse_migrate_req("1\n"), Some(true));
        assert_eq!(parse_migrate_req("0\n"), Some(false));
        assert_eq!(parse_migrate_req("yes"), None);
    }

    #[test]
    fn migration_is_turned_on_once_and_a_missing_setting_says_why() {
        let dir = TestDir::new("sysctl");
        let path = dir.path().join("tcp_migrate_req");
        std::fs::write(&path, "0\n").unwrap();
        assert_eq!(enable_listener_migration(&path), Migration::TurnedOn);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        assert_eq!(enable_listener_migration(&path), Migration::AlreadyOn);
        let missing = dir.path().join("absent");
        let Migration::Unavailable(why) = enable_listener_migration(&missing) else {
            panic!("a missing setting is unavailable")
        };
        assert!(why.contains("5.14"), "{why}");
    }

    #[test]
    fn one_writer_at_a_time_and_the_next_gets_the_lock_once_it_is_dropped() {
        let dir = TestDir::new("lock");
        let first = WriterLock::try_acquire(dir.path()).unwrap().expect("free");
        assert!(WriterLock::try_acquire(dir.path()).unwrap().is_none());
        drop(first);
        assert!(WriterLock::try_acquire(dir.path()).unwrap().is_some());
    }

    #[tokio::test]
    async fn a_waiting_agent_takes_the_lock_as_soon_as_it_is_released() {
        let dir = TestDir::new("wait");
        let first = WriterLock::try_acquire(dir.path()).unwrap().expect("free");
        let path = dir.path().to_path_buf();
        let waiting = tokio::spawn(async move { WriterLock::acquire(&path).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "took a lock that is held");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("taken within 2 s")
            .unwrap();
        assert!(second.is_ok());
    }
}
