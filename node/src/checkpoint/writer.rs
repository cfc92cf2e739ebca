//! The checkpoint writer: one thread that appends checkpoints to the page log, committing every
//! checkpoint that is waiting at once with a single fdatasync (group commit), so many durable
//! tasks share the cost of one flush.

use std::sync::mpsc;
use std::sync::Arc;

use hubmesh_storage::{PageLog, PageWrite};

struct Job {
    write: PageWrite,
    sync: bool,
    done: Option<mpsc::SyncSender<Result<(), String>>>,
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
                let sync = jobs.iter().any(|j| j.sync);
                let mut writes = Vec::with_capacity(jobs.len());
                let mut replies = Vec::with_capacity(jobs.len());
                for j in jobs {
                    writes.push(j.write);
                    replies.push(j.done);
                }
                let res = pages.write(&writes, sync).map(|_| ()).map_err(|e| e.to_string());
                if let Err(e) = &res {
                    tracing::error!(error = %e, "writing checkpoints failed");
                }
                metrics::counter!("hubmesh_checkpoint_flushes_total").increment(1);
                for reply in replies.into_iter().flatten() {
                    let _ = reply.send(res.clone());
                }
            }
        })?;
        Ok(Self { tx })
    }

    /// Writes a checkpoint and waits until it is on disk (fdatasync'ed).
    pub(crate) fn write_durable(&self, write: PageWrite) -> Result<(), String> {
        let (done, wait) = mpsc::sync_channel(1);
        self.tx
            .send(Job { write, sync: true, done: Some(done) })
            .map_err(|_| "the checkpoint writer stopped".to_owned())?;
        wait.recv().map_err(|_| "the checkpoint writer stopped".to_owned())?
    }
}
