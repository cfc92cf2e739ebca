//! The latest state-machine snapshot, kept in the Raft sled database.
//!
//! The snapshot is stored as one record (metadata and data together) so that a crash can never
//! pair the metadata of one snapshot with the data of another.

use serde::{Deserialize, Serialize};

const CURRENT: &[u8] = b"current";

/// A stored snapshot: `(meta, data)`.
pub type SnapshotParts = (Vec<u8>, Vec<u8>);

/// Stores one snapshot: opaque metadata bytes and opaque data bytes.
#[derive(Clone)]
pub struct SnapshotStore {
    db: sled::Db,
    tree: sled::Tree,
}

#[derive(Serialize, Deserialize)]
struct Record {
    meta: Vec<u8>,
    data: Vec<u8>,
}

impl SnapshotStore {
    /// Opens the `snapshot` tree inside `db`.
    pub fn new(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(Self { db: db.clone(), tree: db.open_tree("snapshot")? })
    }

    /// Replaces the stored snapshot and flushes it to disk.
    pub async fn save(&self, meta: Vec<u8>, data: Vec<u8>) -> Result<(), sled::Error> {
        let raw = serde_json::to_vec(&Record { meta, data })
            .map_err(|e| sled::Error::Unsupported(format!("encoding snapshot record: {e}")))?;
        self.tree.insert(CURRENT, raw)?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// The stored snapshot as `(meta, data)`, if any.
    pub fn load(&self) -> Result<Option<SnapshotParts>, sled::Error> {
        let Some(raw) = self.tree.get(CURRENT)? else { return Ok(None) };
        let rec: Record = serde_json::from_slice(&raw)
            .map_err(|e| sled::Error::Unsupported(format!("snapshot record does not decode: {e}")))?;
        Ok(Some((rec.meta, rec.data)))
    }
}
