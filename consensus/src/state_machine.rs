//! openraft's state machine over [`ClusterState`], with snapshots in sled.
//!
//! Durability model: the state is persisted only as snapshots; on restart the latest snapshot
//! is loaded and openraft re-applies the committed log after it (the log store keeps the
//! committed id). Every applied batch is published on a `watch` channel so the rest of the hub
//! reacts to the new state without polling.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hubmesh_storage::SnapshotStore;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::state::{ClusterState, Outcome};
use crate::type_config::{NodeAddr, TypeConfig};

/// The state machine as openraft sees it.
pub(crate) struct StateMachine {
    data: SmData,
    store: SnapshotStore,
    published: watch::Sender<Arc<ClusterState>>,
    applied: watch::Sender<u64>,
    snapshot_seq: Arc<AtomicU64>,
}

#[derive(Clone, Default, Serialize, Deserialize)]
struct SmData {
    state: ClusterState,
    last_applied: Option<LogId<u64>>,
    last_membership: StoredMembership<u64, NodeAddr>,
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageError::from(StorageIOError::read_state_machine(AnyError::new(&e)))
}

impl StateMachine {
    /// Loads the latest snapshot (if any) from `store`.
    pub(crate) fn open(
        store: SnapshotStore,
        published: watch::Sender<Arc<ClusterState>>,
        applied: watch::Sender<u64>,
    ) -> Result<Self, StorageError<u64>> {
        let data = match store.load().map_err(read_err)? {
            Some((_meta, data)) => serde_json::from_slice::<SmData>(&data).map_err(read_err)?,
            None => SmData::default(),
        };
        published.send_replace(Arc::new(data.state.clone()));
        applied.send_replace(data.last_applied.map_or(0, |l| l.index));
        Ok(Self { data, store, published, applied, snapshot_seq: Arc::new(AtomicU64::new(0)) })
    }

    fn publish(&self) {
        self.published.send_replace(Arc::new(self.data.state.clone()));
        self.applied.send_replace(self.data.last_applied.map_or(0, |l| l.index));
    }
}

/// Builds a snapshot from a copy of the state taken when openraft asked for it.
pub(crate) struct SnapshotBuilder {
    data: SmData,
    store: SnapshotStore,
    seq: Arc<AtomicU64>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let bytes = serde_json::to_vec(&self.data)
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, AnyError::new(&e))))?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match self.data.last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id.term, l.index),
            None => format!("0-0-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self.data.last_applied,
            last_membership: self.data.last_membership.clone(),
            snapshot_id,
        };
        let meta_bytes = serde_json::to_vec(&meta)
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, AnyError::new(&e))))?;
        self.store.save(meta_bytes, bytes.clone()).await.map_err(|e| {
            StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))
        })?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, NodeAddr>), StorageError<u64>> {
        Ok((self.data.last_applied, self.data.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<crate::state::CommandResult>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for entry in entries {
            self.data.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Ok(Outcome::Noop),
                EntryPayload::Normal(cmd) => self.data.state.apply(&cmd),
                EntryPayload::Membership(m) => {
                    self.data.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(Outcome::Noop)
                }
            };
            out.push(result);
        }
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { data: self.data.clone(), store: self.store.clone(), seq: self.snapshot_seq.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, NodeAddr>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let bytes = snapshot.into_inner();
        let mut data: SmData = serde_json::from_slice(&bytes).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e)))
        })?;
        data.last_applied = meta.last_log_id;
        data.last_membership = meta.last_membership.clone();
        let meta_bytes = serde_json::to_vec(meta)
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, AnyError::new(&e))))?;
        let data_bytes = serde_json::to_vec(&data)
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, AnyError::new(&e))))?;
        self.store.save(meta_bytes, data_bytes).await.map_err(|e| {
            StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))
        })?;
        self.data = data;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let Some((meta, data)) = self.store.load().map_err(read_err)? else { return Ok(None) };
        let meta: SnapshotMeta<u64, NodeAddr> = serde_json::from_slice(&meta).map_err(read_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}
