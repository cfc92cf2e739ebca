//! The checkpoint writer: one thread that appends checkpoints to the page log, committing every
//! checkpoint that is waiting at once with a single fdatasync (group commit), so many durable
//! tasks share the cost of one flush.
//!
//! A checkpoint leaves out the pages the page log already holds, and another task's page may be
//! compacted away between that look and the write (identical pages are stored once: every
//! counter of one module shares its pages). The log refuses such a write whole; the writer then
//! hands back only the checkpoints that need the missing page, with the write, so their tasks can
//! add it from memory and write again ([`WriteError::MissingPage`]), and writes the rest of the
//! batch: one task's race must not fail every checkpoint that shared its flush.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use hubmesh_storage::{Hash, PageLog, PageLogError, PageWrite};

/// Why a checkpoint was not written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// The checkpoint refers to a page no longer stored here that it does not carry (see the
    /// module doc); the write comes back to be sent again with that page.
    #[error("page {0} is no longer stored on this hub")]
    MissingPage(Hash, Box<PageWrite>),
    #[error("{0}")]
    Failed(String),
    #[error("the checkpoint writer stopped")]
    Stopped,
}

type Reply = mpsc::SyncSender<Result<(), WriteError>>;

/// Checkpoints written again with a page compacted away meanwhile.
pub(crate) static MISSING_PAGE_RETRIES: AtomicU64 = AtomicU64::new(0);

struct Job {
    write: PageWrite,
    sync: bool,
    done: Option<Reply>,
}

/// Handle to the writer thread. Dropping every handle stops it after the queued jobs.
#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Job>,
}

/// Most checkpoints committed by one flush.
const MAX_BATCH: usize = 256;

impl Writer {
    pub(crate) fn start(pages: Arc<PageLog>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new().name("hm-ckpt-writer".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut jobs = vec![first];
                while jobs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                write_batch(&pages, jobs);
            }
        })?;
        Ok(Self { tx })
    }

    /// Writes a checkpoint and waits until it is on disk (fdatasync'ed). A page it left out as
    /// stored that was compacted away meanwhile is taken from `page` (the task's memory) and the
    /// checkpoint written again; returns the pages so added. Bounded: each round adds a page the
    /// write lacked.
    pub(crate) fn write_durable(
        &self,
        mut write: PageWrite,
        page: impl Fn(&Hash) -> Option<Vec<u8>>,
    ) -> Result<Vec<Hash>, WriteError> {
        let mut added = Vec::new();
        loop {
            match self.write_once(write) {
                Err(WriteError::MissingPage(h, back)) => match page(&h) {
                    Some(bytes) if !back.pages.iter().any(|(p, _)| *p == h) => {
                        MISSING_PAGE_RETRIES.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("hubmesh_checkpoint_missing_page_retries_total").increment(1);
                        write = *back;
                        write.pages.push((h, bytes));
                        added.push(h);
                    }
                    _ => return Err(WriteError::MissingPage(h, back)),
                },
                r => return r.map(|()| added),
            }
        }
    }

    fn write_once(&self, write: PageWrite) -> Result<(), WriteError> {
        let (done, wait) = mpsc::sync_channel(1);
        self.tx.send(Job { write, sync: true, done: Some(done) }).map_err(|_| WriteError::Stopped)?;
        wait.recv().map_err(|_| WriteError::Stopped)?
    }
}

/// Writes `jobs` with one fdatasync (if any asks for one) and answers each.
fn write_batch(pages: &PageLog, jobs: Vec<Job>) {
    let sync = jobs.iter().any(|j| j.sync);
    let (mut writes, mut replies): (Vec<PageWrite>, Vec<Option<Reply>>) =
        jobs.into_iter().map(|j| (j.write, j.done)).unzip();
    let res = loop {
        match pages.write(&writes, sync) {
            // Each round hands back at least one write (the one the log found
            // wanting), so this ends.
            Err(PageLogError::MissingPage(h)) => {
                let mut i = 0;
                while i < writes.len() {
                    if !writes[i].key.is_empty() && writes[i].refs.contains(&h) {
                        let back = Box::new(writes.remove(i));
                        if let Some(reply) = replies.remove(i) {
                            let _ = reply.send(Err(WriteError::MissingPage(h, back)));
                        }
                    } else {
                        i += 1;
                    }
                }
                if writes.is_empty() {
                    break Ok(());
                }
            }
            res => break res.map(|_| ()).map_err(|e| e.to_string()),
        }
    };
    if let Err(e) = &res {
        tracing::error!(error = %e, "writing checkpoints failed");
    }
    metrics::counter!("hubmesh_checkpoint_flushes_total").increment(1);
    for reply in replies.into_iter().flatten() {
        let _ = reply.send(res.clone().map_err(WriteError::Failed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> (Hash, Vec<u8>) {
        let bytes = vec![fill; 65536];
        (Hash::of(&bytes), bytes)
    }

    fn job(key: &str, pages: Vec<(Hash, Vec<u8>)>, refs: Vec<Hash>) -> (Job, mpsc::Receiver<Result<(), WriteError>>) {
        let (done, wait) = mpsc::sync_channel(1);
        let write = PageWrite { pages, key: key.into(), manifest: key.as_bytes().to_vec(), refs, remove: vec![] };
        (Job { write, sync: true, done: Some(done) }, wait)
    }

    #[test]
    fn a_checkpoint_missing_a_page_comes_back_alone_and_the_rest_of_its_batch_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let log = PageLog::open(dir.path()).unwrap();
        let (kept, gone) = (page(1), page(2));
        // `gone` was seen stored, left out, and compacted away before this flush.
        let (wanting, wanting_rx) = job("a/1/1", vec![kept.clone()], vec![kept.0, gone.0]);
        let (fine, fine_rx) = job("b/1/1", vec![page(3)], vec![page(3).0]);
        write_batch(&log, vec![wanting, fine]);
        match wanting_rx.recv().unwrap() {
            Err(WriteError::MissingPage(h, back)) => {
                assert_eq!(h, gone.0);
                assert_eq!(back.key, "a/1/1", "the write comes back to be sent again");
            }
            other => panic!("expected the missing page, got {other:?}"),
        }
        assert!(log.read_manifest("a/1/1").unwrap().is_none(), "nothing of it was written");
        assert!(matches!(fine_rx.recv().unwrap(), Ok(())));
        assert!(log.read_manifest("b/1/1").unwrap().is_some(), "the other checkpoint of the flush");
        // Sent again with the page, it is written.
        let (again, again_rx) = job("a/1/1", vec![kept.clone(), gone.clone()], vec![kept.0, gone.0]);
        write_batch(&log, vec![again]);
        assert!(matches!(again_rx.recv().unwrap(), Ok(())));
        assert_eq!(log.read_page(&gone.0).unwrap(), gone.1);
    }
}
