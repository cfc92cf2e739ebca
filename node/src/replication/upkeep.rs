//! The upkeep of checkpoint copies, owned by one worker: copies a committed checkpoint to holders
//! that do not have it yet (a holder that replaced a dead one), and drops manifests this hub no
//! longer needs. It wakes on every applied state and once a second.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubmesh_consensus::state::{parse_checkpoint_key, CheckpointRecord};
use hubmesh_consensus::{ClusterState, Command, NodeId, ProposeError};
use hubmesh_storage::{Hash, PageLog, PageWrite};

use super::push::push_all;
use crate::checkpoint::Manifest;
use crate::executor::LocalCheckpoint;
use crate::hub::Hub;
use crate::worker::{OnState, Worker};

/// Drops manifests this hub no longer needs: of deleted tasks, of epochs older than the task's
/// current placement, and older than its committed checkpoint (never the committed one).
fn collect_garbage(log: &PageLog, state: &ClusterState) {
    let remove: Vec<String> = log
        .manifest_keys()
        .into_iter()
        .filter(|k| {
            let Some((task, epoch, sequence)) = parse_checkpoint_key(k) else { return false };
            if epoch > state.last_epoch {
                return false; // from a placement this hub has not applied yet
            }
            let Some(t) = state.tasks.get(task) else { return true };
            let committed = t.checkpoint.as_ref();
            if committed.is_some_and(|c| c.key(task) == *k) {
                return false;
            }
            let current = t.instances.get(&0).map(|p| p.epoch);
            current.is_some_and(|e| epoch < e) || committed.is_some_and(|c| (epoch, sequence) < (c.epoch, c.sequence))
        })
        .collect();
    if remove.is_empty() {
        return;
    }
    tracing::debug!(manifests = remove.len(), "dropping stale checkpoints");
    // Not synced: a tombstone lost in a crash only means this runs again.
    if let Err(e) = log.write(&[PageWrite { remove, ..Default::default() }], false) {
        tracing::warn!(error = %e, "dropping stale checkpoints failed");
    }
}

/// The upkeep worker: on every applied state (and once a second), copies and garbage.
pub(crate) fn upkeep(hub: Arc<Hub>) -> impl Worker {
    // Tasks whose committed checkpoint is being copied to new holders right now.
    let refilling: Arc<Mutex<HashSet<String>>> = Arc::default();
    OnState::new("replication-upkeep", hub, Duration::from_secs(1), move |hub, state| {
        let refilling = refilling.clone();
        async move {
            refill_holders(&hub, &state, &refilling);
            // A fresh state: GC must not act on an old view.
            let (log, fresh) = (hub.executor().pages().clone(), hub.consensus().state());
            tokio::task::spawn_blocking(move || collect_garbage(&log, &fresh)).await.map_err(|e| e.to_string())
        }
    })
}

/// Copies the committed checkpoint of each task hosted here to holders that do not have it yet
/// (a holder that replaced a dead one), in the background, one copy job per task at a time.
fn refill_holders(hub: &Arc<Hub>, state: &ClusterState, refilling: &Arc<Mutex<HashSet<String>>>) {
    let me = hub.consensus().node_id();
    for (name, t) in &state.tasks {
        let Some(record) = &t.checkpoint else { continue };
        if t.instances.get(&0).is_none_or(|p| p.node != me) {
            continue;
        }
        let up = |n: &NodeId| state.is_up(*n);
        let new: Vec<NodeId> = t.holders.iter().copied().filter(|h| !record.stored_on.contains(h) && up(h)).collect();
        if new.is_empty() || !refilling.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone()) {
            continue;
        }
        let (hub, name, record, refilling) = (hub.clone(), name.clone(), record.clone(), refilling.clone());
        tokio::spawn(async move {
            if let Err(e) = refill(&hub, &name, &record, &new).await {
                tracing::warn!(task = %name, error = %e, "copying the checkpoint to new holders failed; will retry");
            }
            refilling.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
        });
    }
}

async fn refill(hub: &Hub, task: &str, record: &CheckpointRecord, to: &[NodeId]) -> Result<(), String> {
    let key = record.key(task);
    let log = hub.executor().pages().clone();
    let manifest = log
        .read_manifest(&key)
        .map_err(|e| e.to_string())?
        .filter(|b| Hash::of(b) == record.manifest_hash)
        .ok_or_else(|| format!("checkpoint {key} is not intact on this hub"))?;
    let refs = Manifest::decode(&manifest).map_err(|e| e.to_string())?.pages.iter().map(|(_, h)| *h).collect();
    let local = LocalCheckpoint {
        task: task.to_owned(),
        version: record.version,
        epoch: record.epoch.0,
        sequence: record.sequence,
        key: key.clone(),
        manifest,
        manifest_hash: record.manifest_hash,
        refs,
        new_pages: Vec::new(),
        size_bytes: record.size_bytes,
        created_ms: record.at_ms,
        committed_key: Some(key.clone()),
    };
    let mut done = Vec::new();
    for (h, r) in to.iter().zip(push_all(hub, to, &local, &key).await) {
        match r {
            Ok(()) => done.push(*h),
            Err(e) => tracing::warn!(task, holder = %h, error = %e, "copying the checkpoint failed"),
        }
    }
    if done.is_empty() {
        return Err("no new holder took the copy".into());
    }
    let cmd = Command::AddCheckpointCopies {
        task: task.to_owned(),
        epoch: record.epoch,
        sequence: record.sequence,
        nodes: done,
    };
    match hub.consensus().propose(cmd).await {
        Ok(_) | Err(ProposeError::Rejected(_)) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
