//! The read barrier: before a hub answers "no such name" it catches up with what the leader has
//! committed, so a task created through one hub is known on every hub the moment its creation is
//! answered (read-your-writes across hubs, like a linearizable read in etcd).
//!
//! The leader answers `READ_INDEX` with the index openraft's `ensure_linearizable` confirms (a
//! heartbeat round with a quorum proves it still leads); the asking hub waits until it has applied
//! that index. Only a miss pays for this, and misses share rounds: one round is in flight per hub
//! at a time, and a caller that waited for it uses the next round that began after it asked, so a
//! flood of misses costs the leader at most one round per hub per round trip.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hubmesh_proto::pb;
use openraft::Raft;
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use crate::transport::{Json, Refusal, Transport, READ_INDEX};
use crate::TypeConfig;

/// How long the leader tries to confirm its lead for a follower's `READ_INDEX` (less than a
/// follower waits, so that the follower hears the refusal rather than timing out).
const CONFIRM_TIME: Duration = Duration::from_millis(500);

/// Answers other hubs' `READ_INDEX` while this hub leads; called once at boot.
pub(crate) fn serve(transport: &Transport, raft: Raft<TypeConfig>) {
    READ_INDEX.serve(transport, move |_from, Json(())| {
        let raft = raft.clone();
        async move {
            match tokio::time::timeout(CONFIRM_TIME, raft.ensure_linearizable()).await {
                Ok(Ok(read)) => Ok(Json(read.map_or(0, |l| l.index))),
                Ok(Err(e)) => Err(Refusal::new(pb::ErrorCode::NotLeader, e.to_string())),
                Err(_) => Err(Refusal::new(pb::ErrorCode::Unavailable, "could not confirm the lead in time")),
            }
        }
    });
}

/// A hub's side of the barrier.
pub(crate) struct ReadBarrier {
    raft: Raft<TypeConfig>,
    transport: Arc<Transport>,
    applied: watch::Receiver<u64>,
    /// Rounds begun so far.
    begun: AtomicU64,
    /// The last round: its number and the index it learned. Held while a round runs.
    round: Mutex<Option<(u64, u64)>>,
}

impl ReadBarrier {
    pub(crate) fn new(raft: Raft<TypeConfig>, transport: Arc<Transport>, applied: watch::Receiver<u64>) -> Self {
        Self { raft, transport, applied, begun: AtomicU64::new(0), round: Mutex::new(None) }
    }

    /// Waits until this hub has applied everything the leader had committed when asked; `false`
    /// when that could not be learned or reached within `timeout` (no leader, a partition).
    pub(crate) async fn catch_up(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let asked = self.begun.load(Ordering::Acquire);
        let index = {
            let Ok(mut last) = tokio::time::timeout_at(deadline, self.round.lock()).await else { return false };
            match *last {
                // A round that began after this call asked has seen everything committed before it.
                Some((round, index)) if round > asked => index,
                _ => {
                    let round = self.begun.fetch_add(1, Ordering::AcqRel) + 1;
                    let Some(index) = self.read_index(deadline).await else { return false };
                    *last = Some((round, index));
                    index
                }
            }
        };
        let mut applied = self.applied.clone();
        let caught_up = tokio::time::timeout_at(deadline, applied.wait_for(|i| *i >= index)).await;
        caught_up.is_ok_and(|r| r.is_ok())
    }

    /// The leader's confirmed commit index.
    async fn read_index(&self, deadline: Instant) -> Option<u64> {
        let (leader, me) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            (m.current_leader?, m.id)
        };
        if leader == me {
            return match tokio::time::timeout_at(deadline, self.raft.ensure_linearizable()).await {
                Ok(Ok(read)) => Some(read.map_or(0, |l| l.index)),
                _ => None,
            };
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match READ_INDEX.call(&self.transport, leader, &Json(()), left).await {
            Ok(Json(index)) => Some(index),
            Err(e) => {
                tracing::debug!(leader, error = %e, "the leader did not give its read index");
                None
            }
        }
    }
}
