//! openraft's storage conformance suite, run against the real sled log store and the real
//! ClusterState state machine.

use std::sync::Arc;

use hubmesh_storage::{open_raft_db, LogStore, SnapshotStore};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use tokio::sync::watch;

use crate::state::ClusterState;
use crate::state_machine::StateMachine;
use crate::type_config::TypeConfig;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore<TypeConfig>, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore<TypeConfig>, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("a temp dir for the suite");
        let db = open_raft_db(dir.path()).expect("sled opens in a fresh temp dir");
        let log = LogStore::new(&db).expect("log trees open");
        let snapshots = SnapshotStore::new(&db).expect("snapshot tree opens");
        let (state_tx, _) = watch::channel(Arc::new(ClusterState::default()));
        let (applied_tx, _) = watch::channel(0);
        let sm = StateMachine::open(snapshots, state_tx, applied_tx)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_sled() -> Result<(), StorageError<u64>> {
    Suite::test_all(SledBuilder)?;
    Ok(())
}
