//! History on every replica: the leader serves its replication log
//! (`GET /internal/history?after=<seq>`, authenticated with the replicas' own bearer
//! token from a Secret (`token`), apart from the agents' routes), and every standby pulls it into its own redb
//! in sequence order. So a standby's UI shows the leader's records, and a new leader
//! has the old one's history. A standby finds the leader through the Lease: its holder
//! and the URL the holder wrote on it (`leader::HISTORY_URL_ANNOTATION`).
//!
//! The agents' directives travel the same way (`GET /internal/directives`): a standby
//! keeps a copy of the leader's directive log, versions and all, and a new leader goes
//! on from it, so agents keep their cursors across a failover and get only what changed
//! (see `agents::directives`).
//!
//! What is served and applied is the store's (`store::log`) and the directive log's
//! business; this module only moves pages and keeps the standby's view of how far
//! behind it is.

pub mod follow;
pub mod serve;
pub mod token;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use follow::Follower;
pub use serve::{DIRECTIVES_PATH, HISTORY_PATH, replica_routes};
pub use token::{ReplicaToken, TokenSecret};

/// The most entries one page carries (a record is well under a kilobyte).
pub const MAX_PAGE: usize = 1000;

/// One page as the leader sends it: the entries after `after` in sequence order, and
/// how many more follow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page {
    pub entries: Vec<PageEntry>,
    pub remaining: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageEntry {
    pub seq: u64,
    pub entry: crate::store::LogEntry,
}

/// Which part this instance plays for the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// It leads: its history is the source.
    Leader,
    /// It pulls from the leader.
    #[default]
    Standby,
    /// `--history-replication=false`: it neither serves nor pulls.
    Disabled,
}

/// A standby's replication as the UI shows it (`GET /api/v1/replication`).
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationView {
    pub role: Role,
    /// The Lease holder, as last read.
    pub leader: Option<String>,
    /// The highest sequence number this instance holds.
    pub head: u64,
    /// Records the leader held beyond `head` at the last pull.
    pub behind: Option<u64>,
    /// When the last pull succeeded (Unix milliseconds).
    pub last_pull_ms: Option<u64>,
    /// Why the last pull failed (cleared by a success).
    pub error: Option<String>,
    /// True when the history shown may lack the leader's latest records: a standby whose
    /// last pull failed, or that has not pulled yet, or is still behind.
    pub stale: bool,
}

/// The shared, current [`ReplicationView`]; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ReplicationStatus(Arc<Mutex<ReplicationView>>);

impl ReplicationStatus {
    pub fn disabled() -> Self {
        Self(Arc::new(Mutex::new(ReplicationView {
            role: Role::Disabled,
            stale: true,
            ..ReplicationView::default()
        })))
    }

    pub fn view(&self) -> ReplicationView {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut ReplicationView)) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut v);
        v.stale = match v.role {
            Role::Leader => false,
            Role::Disabled => true,
            Role::Standby => v.error.is_some() || v.last_pull_ms.is_none() || v.behind != Some(0),
        };
    }
}
