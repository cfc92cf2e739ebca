//! The read barrier: before a hub answers "no such name" it catches up with what the leader has
//! committed, so a task created through one hub is known on every hub the moment its creation is
//! answered (read-your-writes across hubs, like a linearizable read in etcd).
//!
//! The leader answers `READ_INDEX` with the index openraft's `ensure_linearizable` confirms (a
//! heartbeat round with a quorum proves it still leads); the asking hub waits until it has applied
//! that index. Only a miss pays for this: a name the hub already knows is answered at once.

use std::time::Duration;

use hubmesh_proto::pb;
use openraft::Raft;
use tokio::sync::watch;

use crate::transport::{Json, Refusal, Transport, READ_INDEX};
use crate::TypeConfig;

/// Answers other hubs' `READ_INDEX` while this hub leads; called once at boot.
pub(crate) fn serve(transport: &Transport, raft: Raft<TypeConfig>) {
    READ_INDEX.serve(transport, move |_from, Json(())| {
        let raft = raft.clone();
        async move {
            match raft.ensure_linearizable().await {
                Ok(read) => Ok(Json(read.map_or(0, |l| l.index))),
                Err(e) => Err(Refusal::new(pb::ErrorCode::NotLeader, e.to_string())),
            }
        }
    });
}

/// Waits until this hub has applied everything the leader had committed when asked; `false` when
/// that could not be learned or reached within `timeout` (no leader, a partition).
pub(crate) async fn catch_up(
    raft: &Raft<TypeConfig>,
    transport: &Transport,
    applied: &watch::Receiver<u64>,
    timeout: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let (leader, me) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        (m.current_leader, m.id)
    };
    let Some(leader) = leader else { return false };
    let index = if leader == me {
        // `ensure_linearizable` itself waits until the leader applied what it read.
        return matches!(tokio::time::timeout(timeout, raft.ensure_linearizable()).await, Ok(Ok(_)));
    } else {
        match READ_INDEX.call(transport, leader, &Json(()), timeout).await {
            Ok(Json(index)) => index,
            Err(e) => {
                tracing::debug!(leader, error = %e, "the leader did not give its read index");
                return false;
            }
        }
    };
    let mut applied = applied.clone();
    let caught_up = tokio::time::timeout_at(deadline, applied.wait_for(|i| *i >= index)).await;
    caught_up.is_ok_and(|r| r.is_ok())
}
