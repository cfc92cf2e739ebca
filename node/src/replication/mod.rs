//! Checkpoint replication: a stateful task's checkpoints go from its host to the holders the
//! leader chose, and a checkpoint counts only once its record is committed in Raft.
//!
//! ```text
//!  actor thread: checkpoint -> local page log (fdatasync) -> Replicator::commit: the commit runs
//!     on the hub's runtime (push::commit) while the actor thread waits for its result
//!     for each holder, in parallel, one bulk stream:
//!        CHECKPOINT_PUSH header{task, key, manifest, refs, keep}, body: the checkpoint's new pages
//!          (read once for all holders by a blocking thread a few pages ahead; the holder verifies)
//!        holder: verifies each page's blake3 and appends them 8 MiB at a time as they arrive;
//!          at the end stores the manifest (one fdatasync) only if it has all its pages, else
//!          answers the missing ones, which the host sends to it alone in the next round;
//!          the pages are pinned in its page log until then (a compaction must keep them)
//!     all holders but one have it (the last gets a short grace; upkeep copies to it later)
//!       -> propose CommitCheckpoint{task, epoch, sequence, manifest hash, stored_on}
//!       the state machine refuses a stale epoch: a replaced host can never commit
//!     committed -> the durable answer goes out
//!
//!  new host (failover): the record names the key and the hubs that store it
//!     manifest and pages missing or corrupt locally -> CHECKPOINT_FETCH from those hubs, verified
//!     -> written to the local page log -> the instance restores from that key
//! ```
//!
//! | module   | job                                                                        |
//! |----------|----------------------------------------------------------------------------|
//! | `push`   | the host: commit = push to the holders, then propose the record            |
//! | `holder` | a holder: receive a push, verify, store                                    |
//! | `fetch`  | a new host: put the committed checkpoint together; holders serve it        |
//! | `upkeep` | one worker: copies to new holders, and garbage (manifests of deleted tasks, |
//! |          | of older epochs, older than the committed checkpoint)                      |
//!
//! Pages nothing refers to go at the page log's next compaction.

mod fetch;
mod holder;
mod push;
mod upkeep;

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use hubmesh_consensus::transport::{Refusal, CHECKPOINT_FETCH, CHECKPOINT_PUSH};
use hubmesh_storage::Hash;

pub(crate) use fetch::{fetch_checkpoint, store_with_pages};
pub(crate) use upkeep::upkeep;

use crate::dataplane::alive;
use crate::executor::{CheckpointSink, CommitError, LocalCheckpoint};
use crate::hub::Hub;

/// Pages per fetch message (8 MiB of 64 KiB pages), well under the transport's frame limit.
const PAGES_PER_MESSAGE: usize = 128;
/// Bytes of pages a holder stores per write while the rest of a push arrives.
const BATCH_BYTES: usize = 8 << 20;
/// Pages the host reads ahead of a push stream.
const PAGES_READ_AHEAD: usize = 32;
/// A page frame's head: its hash and its length.
const FRAME_HEAD: usize = 36;
/// Largest page a holder accepts (checkpoint pages are 64 KiB).
const MAX_PAGE: usize = 1 << 20;
/// Rounds of "you still lack these" before a holder counts as failed.
const PUSH_ROUNDS: usize = 4;
/// Time for one message to a holder.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an instance waits for its committed checkpoint to be fetched back (its calls wait
/// behind it; it tries again at its next failed checkpoint).
const FETCH_COMMITTED_BUDGET: Duration = Duration::from_secs(30);

/// The node's [`CheckpointSink`]: replicates, then commits the record.
pub(crate) struct Replicator {
    hub: Weak<Hub>,
    runtime: tokio::runtime::Handle,
}

impl Replicator {
    pub(crate) fn new(hub: &Arc<Hub>) -> Self {
        Self { hub: Arc::downgrade(hub), runtime: tokio::runtime::Handle::current() }
    }
}

impl CheckpointSink for Replicator {
    fn commit(&self, checkpoint: &LocalCheckpoint) -> Result<(), CommitError> {
        let hub = self.hub.upgrade().ok_or(CommitError::ShuttingDown)?;
        // The commit runs on the hub's runtime; the actor thread (not a runtime thread) only
        // waits for its result.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let checkpoint = checkpoint.clone();
        self.runtime.spawn(async move {
            let _ = tx.send(push::commit(&hub, &checkpoint).await);
        });
        await_commit(rx)
    }

    fn committed_key(&self, task: &str) -> Option<String> {
        let hub = self.hub.upgrade()?;
        let state = hub.consensus().state();
        state.tasks.get(task)?.checkpoint.as_ref().map(|r| r.key(task))
    }

    fn committed_hash(&self, task: &str, key: &str) -> Option<Hash> {
        let hub = self.hub.upgrade()?;
        let state = hub.consensus().state();
        state.tasks.get(task)?.checkpoint.as_ref().filter(|r| r.key(task) == key).map(|r| r.manifest_hash)
    }

    fn fetch_committed(&self, task: &str, key: &str) -> bool {
        let Some(hub) = self.hub.upgrade() else { return false };
        let state = hub.consensus().state();
        let Some(record) = state.tasks.get(task).and_then(|t| t.checkpoint.clone()).filter(|r| r.key(task) == key)
        else {
            return false; // committed past it meanwhile: the caller looks again
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let name = task.to_owned();
        self.runtime.spawn(async move {
            let fetched = tokio::time::timeout(FETCH_COMMITTED_BUDGET, fetch_checkpoint(&hub, &name, &record)).await;
            let _ = tx.send(fetched);
        });
        match rx.blocking_recv() {
            Ok(Ok(Ok(fetched))) => fetched == key,
            Ok(Ok(Err(e))) => {
                tracing::warn!(task, key, error = %e, "could not fetch the committed checkpoint");
                false
            }
            Ok(Err(_)) => {
                tracing::warn!(task, key, "fetching the committed checkpoint timed out");
                false
            }
            Err(_) => false, // the hub is shutting down
        }
    }

    fn may_answer(&self, task: &str, epoch: u64) -> bool {
        let Some(hub) = self.hub.upgrade() else { return false };
        let me = hub.consensus().node_id();
        let placed_here = |t: &hubmesh_consensus::state::TaskRecord| {
            t.placements().any(|(_, p)| p.node == me && p.epoch == hubmesh_consensus::Epoch(epoch))
        };
        // As the router does, wait while an election may renew the lease rather than refuse (on
        // the actor's thread: the calls behind this one wait for it anyway), within the time
        // after which this hub has lost the mesh.
        let t = hub.config().timeouts.resolve();
        let deadline = Instant::now() + t.lease + t.election * 2 + t.heartbeat;
        loop {
            // The lease first: once it holds, this hub has applied what the leader had committed
            // when it began, so the placement read after it is current.
            let leased = hub.has_quorum();
            if !hub.consensus().state().tasks.get(task).is_some_and(placed_here) {
                return false; // replaced (or deleted): an older view could not say so
            }
            if leased {
                return true;
            }
            if hub.lost_mesh() || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(t.heartbeat);
        }
    }
}

/// The commit's answer, waited for on the actor's thread. A commit dropped unanswered (the runtime
/// shut down under it) may have proposed its record already: its change may still commit, so the
/// call it carries is not reported as undone.
fn await_commit(rx: tokio::sync::oneshot::Receiver<Result<(), CommitError>>) -> Result<(), CommitError> {
    rx.blocking_recv().unwrap_or_else(|_| {
        Err(CommitError::MayHaveCommitted("the hub shut down while the checkpoint was being committed".into()))
    })
}

/// Serves the holder-side endpoints; called once at boot.
pub(crate) fn register(hub: &Arc<Hub>) {
    let transport = hub.consensus().transport();
    let h = Arc::downgrade(hub);
    CHECKPOINT_PUSH.serve(&transport, move |_from, req, body| {
        let h = h.clone();
        async move { holder::receive_push(&*alive(&h)?, req, body).await }
    });
    let h = Arc::downgrade(hub);
    CHECKPOINT_FETCH.serve(&transport, move |_from, req| {
        let h = h.clone();
        async move {
            let log = alive(&h)?.executor().pages().clone();
            tokio::task::spawn_blocking(move || fetch::serve_fetch(&log, req))
                .await
                .map_err(|e| Refusal::internal(e.to_string()))?
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_dropped_unanswered_may_have_committed() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        drop(tx);
        assert!(matches!(await_commit(rx), Err(CommitError::MayHaveCommitted(_))));
        let (tx, rx) = tokio::sync::oneshot::channel();
        tx.send(Err(CommitError::Deleted)).unwrap();
        assert_eq!(await_commit(rx), Err(CommitError::Deleted), "an answer is passed on as it is");
    }
}
