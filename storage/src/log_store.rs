//! openraft's log storage on sled.
//!
//! Keys of the `logs` tree are big-endian log indexes, so range scans come out in order; values
//! are JSON-encoded entries. The `meta` tree holds the vote, the committed log id and the last
//! purged log id. Every mutating call ends with `flush_async`, which fsyncs sled's log: openraft
//! is told an append is done only after that (sled's default 500 ms background flush would let
//! an acknowledged entry or a vote vanish on a crash).

use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::path::Path;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogId, RaftTypeConfig, StorageError, StorageIOError,
    Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// Opens (or creates) the sled database that holds the Raft log, vote and snapshot.
pub fn open_raft_db(dir: &Path) -> Result<sled::Db, sled::Error> {
    // No background flusher: every write that must survive a crash flushes itself (see the
    // module doc), and the flusher fsynced twice a second on an idle hub.
    sled::Config::new().path(dir).mode(sled::Mode::HighThroughput).flush_every_ms(None).open()
}

/// The Raft log and vote of one hub, in sled. Cloning is cheap and shares the trees.
pub struct LogStore<C: RaftTypeConfig> {
    db: sled::Db,
    logs: sled::Tree,
    meta: sled::Tree,
    _c: PhantomData<C>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self { db: self.db.clone(), logs: self.logs.clone(), meta: self.meta.clone(), _c: PhantomData }
    }
}

impl<C: RaftTypeConfig> LogStore<C> {
    /// Opens the log trees inside `db`.
    pub fn new(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(Self { db: db.clone(), logs: db.open_tree("logs")?, meta: db.open_tree("meta")?, _c: PhantomData })
    }

    async fn flush(&self, subject: ErrorSubject<C::NodeId>, verb: ErrorVerb) -> Result<(), StorageError<C::NodeId>> {
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageError::from(StorageIOError::new(subject, verb, AnyError::new(&e))))?;
        Ok(())
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError<C::NodeId>> {
        let Some(raw) = self.meta.get(key).map_err(|e| StorageError::from(StorageIOError::read(AnyError::new(&e))))?
        else {
            return Ok(None);
        };
        let value =
            serde_json::from_slice(&raw).map_err(|e| StorageError::from(StorageIOError::read(AnyError::new(&e))))?;
        Ok(Some(value))
    }

    fn write_meta<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError<C::NodeId>> {
        let raw =
            serde_json::to_vec(value).map_err(|e| StorageError::from(StorageIOError::write(AnyError::new(&e))))?;
        self.meta.insert(key, raw).map_err(|e| StorageError::from(StorageIOError::write(AnyError::new(&e))))?;
        Ok(())
    }

    fn decode_entry(raw: &[u8]) -> Result<C::Entry, StorageError<C::NodeId>> {
        serde_json::from_slice(raw).map_err(|e| StorageError::from(StorageIOError::read_logs(AnyError::new(&e))))
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl<C: RaftTypeConfig> RaftLogReader<C> for LogStore<C>
where
    C::Entry: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.logs.range((Bound::Included(index_key(start)), end)) {
            let (_, raw) = item.map_err(|e| StorageError::from(StorageIOError::read_logs(AnyError::new(&e))))?;
            out.push(Self::decode_entry(&raw)?);
        }
        Ok(out)
    }
}

impl<C: RaftTypeConfig> RaftLogStorage<C> for LogStore<C>
where
    C::Entry: Serialize + DeserializeOwned,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<C::NodeId>> {
        let last_purged: Option<LogId<C::NodeId>> = self.read_meta(LAST_PURGED)?;
        let last =
            match self.logs.last().map_err(|e| StorageError::from(StorageIOError::read_logs(AnyError::new(&e))))? {
                Some((_, raw)) => Some(Self::decode_entry(&raw[..])?.get_log_id().clone()),
                None => None,
            };
        Ok(LogState { last_purged_log_id: last_purged.clone(), last_log_id: last.or(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        self.write_meta(VOTE, vote)?;
        self.flush(ErrorSubject::Vote, ErrorVerb::Write).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, StorageError<C::NodeId>> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<C::NodeId>>) -> Result<(), StorageError<C::NodeId>> {
        // Not flushed on its own: a lost committed marker only means re-applying from the
        // snapshot, and the next append or vote flushes it anyway.
        self.write_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        Ok(self.read_meta::<Option<LogId<C::NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let raw = serde_json::to_vec(&entry)
                .map_err(|e| StorageError::from(StorageIOError::write_logs(AnyError::new(&e))))?;
            batch.insert(&index_key(entry.get_log_id().index), raw);
        }
        self.logs.apply_batch(batch).map_err(|e| StorageError::from(StorageIOError::write_logs(AnyError::new(&e))))?;
        let flushed = self.db.flush_async().await;
        match flushed {
            Ok(_) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = StorageError::from(StorageIOError::write_logs(AnyError::new(&e)));
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(err)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let mut batch = sled::Batch::default();
        for item in self.logs.range(index_key(log_id.index)..) {
            let (key, _) = item.map_err(|e| StorageError::from(StorageIOError::write_logs(AnyError::new(&e))))?;
            batch.remove(key);
        }
        self.logs.apply_batch(batch).map_err(|e| StorageError::from(StorageIOError::write_logs(AnyError::new(&e))))?;
        self.flush(ErrorSubject::Logs, ErrorVerb::Write).await
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        // Record the purge point first: a crash between the two steps leaves extra entries,
        // never a gap that get_log_state cannot explain.
        self.write_meta(LAST_PURGED, &log_id)?;
        let mut batch = sled::Batch::default();
        for item in self.logs.range(..=index_key(log_id.index)) {
            let (key, _) = item.map_err(|e| StorageError::from(StorageIOError::write_logs(AnyError::new(&e))))?;
            batch.remove(key);
        }
        self.logs.apply_batch(batch).map_err(|e| StorageError::from(StorageIOError::write_logs(AnyError::new(&e))))?;
        self.flush(ErrorSubject::Logs, ErrorVerb::Delete).await
    }
}
