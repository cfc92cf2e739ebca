//! Durable storage of one hub.
//!
//! ```text
//!  DATA_DIR/raft/      sled: trees `logs` (Raft entries, big-endian index keys), `meta` (vote,
//!                      committed, last purged), `snapshot` (state-machine snapshot)
//!  DATA_DIR/blobs/     content-addressed blobs (task modules), one file per blake3 hash
//!  DATA_DIR/checkpoints/pages.log  checkpoint pages and manifests, append-only, one fdatasync
//!                      per batch
//! ```
//!
//! * [`LogStore`] is openraft's `RaftLogStorage`, generic over the type config (as openraft's
//!   `log-mem`): every write is flushed to disk before openraft is told it is durable.
//! * [`SnapshotStore`] keeps the latest state-machine snapshot next to the log.
//! * [`BlobStore`] and [`PageLog`] hold content-addressed bytes and verify them on every read.
//!
//! This crate knows nothing of tasks, placements or sockets; the consensus and node crates give
//! the bytes their meaning.

mod blob_store;
mod file;
mod hash;
mod log_store;
mod page_log;
mod snapshot_store;

pub use blob_store::{BlobError, BlobStore};
pub use file::write_atomic;
pub use hash::Hash;
pub use log_store::{open_raft_db, LogStore};
pub use page_log::{PageLog, PageLogError, PageLogStats, PagePin, PageWrite};
pub use snapshot_store::{SnapshotParts, SnapshotStore};

/// On-disk format version of everything in this crate; written to `DATA_DIR/FORMAT`.
pub const FORMAT_VERSION: u32 = 1;
