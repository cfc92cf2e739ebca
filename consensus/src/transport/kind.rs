//! The registry of stream kinds: every kind of call the mesh endpoint carries, consensus's and
//! the node's, numbered in this one place. The number is the first field of every request.

/// What a stream carries, and so which handler answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum StreamKind {
    /// openraft AppendEntries (consensus).
    RaftAppend = 1,
    /// openraft Vote (consensus).
    RaftVote = 2,
    /// openraft InstallSnapshot (consensus).
    RaftSnapshot = 3,
    /// A hub without a certificate asks to join (consensus); the only kind joiners may use.
    Join = 4,
    /// A follower forwards a proposal to the leader (consensus).
    Propose = 5,
    /// Are you there? Between voters, for the election gate (consensus).
    Ping = 6,
    /// What has the leader committed? A read barrier before "no such name" (consensus).
    ReadIndex = 7,
    /// A module blob by hash (node data plane).
    ModuleFetch = 100,
    /// An invocation forwarded to the instance's host (node data plane).
    InvokeForward = 101,
    /// A checkpoint's manifest and pages, host to holder, as a bulk stream (node data plane).
    CheckpointPush = 102,
    /// A checkpoint's manifest and pages, holder to a new host (node data plane).
    CheckpointFetch = 103,
    /// Ask a task's host to live-migrate it (node).
    MigrateRequest = 104,
    /// A live migration's source asks the target to get ready (node).
    MigratePrepare = 105,
    /// A live migration's pages and final manifest, source to target (node).
    MigratePages = 106,
    /// A live migration ended: aborted, or committed at an epoch (node).
    MigrateEnd = 107,
    // 108 was a hub's load report; loads travel on the gossip plane now. Not reused.
    /// A live migration's source asks the target to answer once the switch's commit has it
    /// serving (node).
    MigrateWatch = 109,
}

impl StreamKind {
    /// Every kind, for lookups and listings.
    pub const ALL: [Self; 16] = [
        Self::RaftAppend,
        Self::RaftVote,
        Self::RaftSnapshot,
        Self::Join,
        Self::Propose,
        Self::Ping,
        Self::ReadIndex,
        Self::ModuleFetch,
        Self::InvokeForward,
        Self::CheckpointPush,
        Self::CheckpointFetch,
        Self::MigrateRequest,
        Self::MigratePrepare,
        Self::MigratePages,
        Self::MigrateEnd,
        Self::MigrateWatch,
    ];

    /// The kind a request names, if it is one of ours.
    pub fn from_wire(raw: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u32 == raw)
    }

    /// Whether a hub without a CA-signed certificate may use it.
    pub fn open_to_joiners(self) -> bool {
        self == Self::Join
    }

    /// A name for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::RaftAppend => "raft-append",
            Self::RaftVote => "raft-vote",
            Self::RaftSnapshot => "raft-snapshot",
            Self::Join => "join",
            Self::Propose => "propose",
            Self::Ping => "ping",
            Self::ReadIndex => "read-index",
            Self::ModuleFetch => "module-fetch",
            Self::InvokeForward => "invoke-forward",
            Self::CheckpointPush => "checkpoint-push",
            Self::CheckpointFetch => "checkpoint-fetch",
            Self::MigrateRequest => "migrate-request",
            Self::MigratePrepare => "migrate-prepare",
            Self::MigratePages => "migrate-pages",
            Self::MigrateEnd => "migrate-end",
            Self::MigrateWatch => "migrate-watch",
        }
    }
}

impl std::fmt::Display for StreamKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_and_numbers_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for k in StreamKind::ALL {
            assert_eq!(StreamKind::from_wire(k as u32), Some(k));
            assert!(seen.insert(k as u32), "{k} is numbered twice");
        }
        assert_eq!(StreamKind::from_wire(0), None);
        assert_eq!(StreamKind::from_wire(999), None);
    }
}
