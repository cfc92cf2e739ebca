//! A stateful task: one instance owned by one thread (an actor). Invocations wait in a bounded
//! queue and run one at a time; after each the base image is synced, and depending on the
//! checkpoint policy the state is written before (durable) or after (periodic) the answer.
//!
//! ```text
//!  invoke --try_send--> [queue] --> actor thread: call -> ok:   sync image -> (durable: checkpoint) -> answer
//!                                                      -> trap: re-instantiate from image -> error
//!                                   idle: hm_tick on its interval, periodic checkpoint when due
//! ```

use std::sync::mpsc::{self, RecvTimeoutError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubmesh_consensus::state::{checkpoint_key, parse_checkpoint_key, CheckpointPolicy};
use hubmesh_consensus::Epoch;
use hubmesh_storage::{Hash, PageLog, PageWrite};
use tokio::sync::oneshot;

use super::error::CheckpointFailed;
use super::image::{CheckpointHeader, MemoryImage};
use super::instance::{Instance, LoadedModule};
use super::meter::TaskMeter;
use super::Answer;
use super::{
    CheckpointSink, CheckpointSummary, CommitError, InvokeError, LocalCheckpoint, Restore, StartTaskError, TaskConfig,
};
use crate::checkpoint::{AnswerCache, Manifest, Writer};

mod migrate;
mod recovery;
mod timer;

use recovery::{newest_local, written_after, Caller};

pub(crate) use migrate::{FinalState, MigrateMsg, MigrationStart, MovedTo, Resolution};

enum Msg {
    Invoke {
        input: Vec<u8>,
        key: Option<String>,
        reply: oneshot::Sender<Result<Answer, InvokeError>>,
        /// When it was queued (for the queue wait the load worker reports).
        queued: Instant,
    },
    Checkpoint {
        reply: oneshot::Sender<Result<CheckpointSummary, InvokeError>>,
    },
    Stop {
        final_checkpoint: bool,
    },
    /// A live migration's messages (see `migrate`).
    Migrate(MigrateMsg),
}

/// What a stateful task reports about itself.
#[derive(Debug, Clone, Default)]
pub struct StatefulStatus {
    pub invocations: u64,
    pub last_checkpoint: Option<CheckpointSummary>,
    /// Sequence of the checkpoint the instance was restored from at start.
    pub restored_from: Option<u64>,
    /// Set when the instance could not be rebuilt after a trap, or was replaced.
    pub broken: Option<String>,
    /// A newer epoch of the task exists: this instance answers nothing more (`recovery.rs`).
    pub replaced: bool,
}

/// Handle to a running stateful task.
pub(crate) struct StatefulTask {
    tx: mpsc::SyncSender<Msg>,
    queue: u32,
    /// Invocations the actor moved from the channel into its backlog (they still count against
    /// the queue limit).
    backlog_len: Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) status: Arc<Mutex<StatefulStatus>>,
    /// What the task costs (CPU, queue wait, memory).
    pub(crate) meter: Arc<TaskMeter>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Actor {
    cfg: TaskConfig,
    module: LoadedModule,
    inst: Instance,
    image: MemoryImage,
    answers: AnswerCache,
    sequence: u64,
    invocations: u64,
    pages: Arc<PageLog>,
    writer: Writer,
    /// Messages taken off the channel ahead of time: a checkpoint records the invocations waiting
    /// there, so a host that restores it runs them.
    rx: mpsc::Receiver<Msg>,
    backlog: std::collections::VecDeque<Msg>,
    backlog_len: Arc<std::sync::atomic::AtomicUsize>,
    /// Where checkpoints go after the local disk (replication and the Raft record); none in
    /// unit tests, where a local write is the commit.
    sink: Option<Arc<dyn CheckpointSink>>,
    /// Key of the last committed checkpoint: kept until a newer one is committed.
    committed_key: Option<String>,
    /// This instance's checkpoints whose commit may have gone through although it failed here (its
    /// answer was lost), since one last committed, oldest first (at most [`UNSETTLED`]): they stay
    /// on disk for [`Self::catch_up_committed_key`].
    unsettled: Vec<String>,
    /// The checkpoints this instance wrote since it last went back to a committed state (or
    /// started), with their manifest's hash, newest last (at most [`GROWN`]): this state grew
    /// from each of them.
    grown: Vec<(String, Hash)>,
    status: Arc<Mutex<StatefulStatus>>,
    /// When the last checkpoint was committed, or a periodic one last failed: the next periodic
    /// one is due a period later (one that fails at once, without a lease, is not retried in a loop).
    last_checkpoint: Instant,
    next_tick: Option<Instant>,
    /// Running, or frozen / moved by a live migration.
    mode: migrate::Mode,
    /// A wait before each call while a migration's pages do not converge.
    throttle: Duration,
    meter: Arc<TaskMeter>,
}

/// Most checkpoints an instance keeps on disk in case the mesh committed them after it heard
/// their commit failed.
pub(super) const UNSETTLED: usize = 4;

/// Most checkpoints an instance remembers having grown from since its last commit (a periodic
/// one whose commits fail for long takes one a period): past them, one that lands late is gone
/// back to.
const GROWN: usize = 64;

/// Most input bytes of queued invocations a checkpoint carries.
const PENDING_BYTES: usize = 8 << 20;

impl StatefulTask {
    /// Restores the task from the checkpoint `restore` names (its manifest and pages must be in
    /// the local page log) or starts it fresh, then starts its thread.
    pub(crate) fn start(
        cfg: TaskConfig,
        module: LoadedModule,
        pages: Arc<PageLog>,
        writer: Writer,
        sink: Option<Arc<dyn CheckpointSink>>,
        restore: Restore,
        mut staged: Option<super::StagedTask>,
    ) -> Result<Self, StartTaskError> {
        let name: Arc<str> = cfg.name.as_str().into();
        let mut status = StatefulStatus::default();
        // A key guessed from the local log may be of an older module; one from the mesh may not.
        let guessed = matches!(restore, Restore::NewestLocal);
        let key = match restore {
            Restore::Fresh => None,
            Restore::Key(k) => Some(k),
            Restore::NewestLocal => newest_local(&pages, &cfg.name),
        };
        // A task without checkpoints restores only what the mesh names (a live migration's
        // state), never an old local one.
        let key = key.filter(|_| cfg.checkpoint != CheckpointPolicy::None || !guessed);
        let carried = key.as_ref().zip(staged.as_mut()).and_then(|(k, s)| s.take_manifest(k, &pages));
        let saved = match &key {
            None => None,
            Some(k) if carried.is_some() => match carried {
                Some(m) if m.module_hash == cfg.module_hash => Some(m),
                _ => return Err(StartTaskError::Restore(format!("checkpoint {k} belongs to another module"))),
            },
            Some(k) => match pages.read_manifest(k) {
                Ok(Some(bytes)) => match Manifest::decode(&bytes) {
                    Ok(m) if m.module_hash == cfg.module_hash => Some(m),
                    Ok(m) if guessed => {
                        tracing::info!(task = %cfg.name, old = m.task_version, "the saved state belongs to another module version; starting fresh");
                        None
                    }
                    Ok(_) => return Err(StartTaskError::Restore(format!("checkpoint {k} belongs to another module"))),
                    Err(e) => return Err(StartTaskError::Restore(e.to_string())),
                },
                Ok(None) => return Err(StartTaskError::Restore(format!("checkpoint {k} is not on this hub"))),
                Err(e) => return Err(StartTaskError::Restore(e.to_string())),
            },
        };
        let committed_key = saved.as_ref().and(key);
        let (inst, image, answers, pending, sequence, invocations) = match saved {
            Some(mut m) => {
                let began = Instant::now();
                let staged = staged.filter(|s| s.matches(&m) && s.built_with(&cfg.limits));
                let from_staged = staged.is_some();
                let (inst, image) = match staged {
                    // Built while the migration ran: nothing to read back or copy.
                    Some(s) => super::staged::take(s, &m)?,
                    None => {
                        let image = MemoryImage::restore(&m, &pages, cfg.limits.memory_bytes)
                            .map_err(StartTaskError::Restore)?;
                        let mut inst = Instance::new(&module, name, cfg.limits, false)?;
                        image.apply_to(&mut inst).map_err(|e| StartTaskError::Restore(e.to_string()))?;
                        (inst, image)
                    }
                };
                tracing::debug!(task = %cfg.name, took = ?began.elapsed(), from_staged, "restored");
                status.restored_from = Some(m.sequence);
                status.invocations = m.invocations;
                status.last_checkpoint = Some(CheckpointSummary::of(&m));
                let answers = AnswerCache::from_oldest_first(std::mem::take(&mut m.answers));
                let pending = std::mem::take(&mut m.pending);
                tracing::info!(task = %cfg.name, sequence = m.sequence, pages = m.pages.len(), "restored from checkpoint");
                (inst, image, answers, pending, m.sequence, m.invocations)
            }
            None => {
                let mut inst = Instance::new(&module, name, cfg.limits, true)?;
                let image = MemoryImage::capture(&mut inst);
                (inst, image, AnswerCache::default(), Vec::new(), 0, 0)
            }
        };
        // A hub restarted from a lagging view of the mesh restores an older committed checkpoint
        // than the newest it wrote at this epoch, whose commit may land yet: those are unsettled,
        // and a checkpoint under a used key would replace one's manifest here and on holders.
        let unsettled = written_after(&pages, &cfg.name, Epoch(cfg.epoch), sequence);
        let sequence = unsettled.last().and_then(|k| parse_checkpoint_key(k)).map_or(sequence, |(.., s)| s);
        let unsettled: Vec<String> = unsettled.into_iter().rev().take(UNSETTLED).rev().collect();
        let status = Arc::new(Mutex::new(status));
        let next_tick = match (module.has_tick, cfg.tick_ms) {
            (true, Some(ms)) => Some(Instant::now() + Duration::from_millis(ms)),
            _ => None,
        };
        let queue = cfg.queue;
        let (tx, rx) = mpsc::sync_channel(queue.max(1) as usize);
        // Invocations the checkpoint had accepted run first; nobody waits for their answers here
        // (a caller that retries with the same key gets the cached one).
        let backlog: std::collections::VecDeque<Msg> = pending
            .into_iter()
            .map(|(key, input)| Msg::Invoke { input, key, reply: oneshot::channel().0, queued: Instant::now() })
            .collect();
        if !backlog.is_empty() {
            tracing::info!(task = %cfg.name, pending = backlog.len(), "running invocations the checkpoint had accepted");
        }
        let backlog_len = Arc::new(std::sync::atomic::AtomicUsize::new(backlog.len()));
        let meter = Arc::new(TaskMeter::default());
        meter.set_memory(inst.memory_len() as u64);
        let actor = Actor {
            cfg,
            module,
            inst,
            image,
            answers,
            sequence,
            invocations,
            pages,
            writer,
            rx,
            backlog,
            backlog_len: backlog_len.clone(),
            sink,
            committed_key,
            unsettled,
            grown: Vec::new(),
            status: status.clone(),
            last_checkpoint: Instant::now(),
            next_tick,
            mode: migrate::Mode::Running,
            throttle: Duration::ZERO,
            meter: meter.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("hm-task-{}", actor.cfg.name))
            .spawn(move || actor.run())
            .map_err(|e| StartTaskError::Hub(format!("spawning the task thread: {e}")))?;
        Ok(Self { tx, queue, backlog_len, status, meter, thread: Mutex::new(Some(thread)) })
    }

    /// Queues an invocation and waits for its answer.
    pub(crate) async fn invoke(&self, input: Vec<u8>, key: Option<String>) -> Result<Answer, InvokeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Invoke { input, key, reply, queued: Instant::now() })?;
        rx.await.map_err(|_| InvokeError::Unavailable("the task stopped".into()))?
    }

    /// Takes a checkpoint now.
    pub(crate) async fn checkpoint(&self) -> Result<CheckpointSummary, InvokeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Checkpoint { reply })?;
        rx.await.map_err(|_| InvokeError::Unavailable("the task stopped".into()))?
    }

    /// Sends a live migration's request; it waits for room in the queue rather than failing
    /// (the queue drains within a call's deadline).
    pub(crate) async fn migrate(&self, msg: MigrateMsg) -> Result<(), InvokeError> {
        // Most often the queue has room: no thread hand-off (the freeze is inside the pause).
        let msg = match self.tx.try_send(Msg::Migrate(msg)) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Disconnected(_)) => return Err(InvokeError::Unavailable("the task stopped".into())),
            Err(TrySendError::Full(msg)) => msg,
        };
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || tx.send(msg))
            .await
            .map_err(|e| InvokeError::Unavailable(format!("the sending thread failed: {e}")))?
            .map_err(|_| InvokeError::Unavailable("the task stopped".into()))
    }

    fn send(&self, msg: Msg) -> Result<(), InvokeError> {
        if self.backlog_len.load(std::sync::atomic::Ordering::Acquire) >= self.queue as usize {
            return Err(InvokeError::QueueFull { limit: self.queue });
        }
        self.tx.try_send(msg).map_err(|e| match e {
            TrySendError::Full(_) => InvokeError::QueueFull { limit: self.queue },
            TrySendError::Disconnected(_) => InvokeError::Unavailable("the task stopped".into()),
        })
    }

    /// Stops the actor after the invocations already queued; with `final_checkpoint` the state
    /// is saved first (graceful shutdown). Blocks until the thread has ended.
    pub(crate) fn stop(&self, final_checkpoint: bool) {
        // A full queue must not keep the task alive: `send` blocks until there is room.
        let _ = self.tx.send(Msg::Stop { final_checkpoint });
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Actor {
    fn run(mut self) {
        loop {
            // A call from the backlog may be in the pending list of a checkpoint or a migration.
            let recorded = !self.backlog.is_empty();
            let msg = match self.backlog.pop_front() {
                Some(m) => {
                    self.backlog_len.store(self.backlog.len(), std::sync::atomic::Ordering::Release);
                    Ok(m)
                }
                None => match self.next_wakeup().map(|t| t.saturating_duration_since(Instant::now())) {
                    Some(t) => self.rx.recv_timeout(t),
                    None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                },
            };
            let msg = match msg {
                Ok(m) if !self.mode.running() => {
                    if self.while_migrating(m) {
                        return;
                    }
                    continue;
                }
                other => other,
            };
            match msg {
                Ok(Msg::Invoke { input, key, reply, queued }) => {
                    self.meter.waited(queued.elapsed());
                    if !self.throttle.is_zero() && self.image.migrating() {
                        std::thread::sleep(self.throttle);
                    }
                    // The call's whole cost: the run, the page sync, the checkpoint's hashing.
                    let meter = self.meter.clone();
                    let caller = if reply.is_closed() { Caller::Gone } else { Caller::Waits { recorded } };
                    let res = meter.run(|| self.invoke_for(input, key, caller));
                    let _ = reply.send(res);
                }
                Ok(Msg::Checkpoint { reply }) => {
                    let res = self.checkpoint().inspect_err(|e| _ = self.break_if_replaced(e));
                    let _ = reply.send(res.map_err(InvokeError::from));
                }
                Ok(Msg::Migrate(m)) => self.migrate(m),
                Ok(Msg::Stop { final_checkpoint }) => {
                    // What arrived after the stop is refused, not carried in the final checkpoint:
                    // its callers hear that it did not run.
                    while let Ok(m) = self.rx.try_recv() {
                        self.backlog.push_back(m);
                    }
                    for m in self.backlog.drain(..) {
                        match m {
                            Msg::Invoke { reply, .. } => {
                                let _ = reply
                                    .send(Err(InvokeError::Unavailable("the task stopped before running it".into())));
                            }
                            Msg::Checkpoint { reply } => {
                                let _ = reply.send(Err(InvokeError::Unavailable("the task stopped".into())));
                            }
                            Msg::Migrate(m) => m.refuse("the task stopped"),
                            Msg::Stop { .. } => {}
                        }
                    }
                    if final_checkpoint && self.cfg.checkpoint != CheckpointPolicy::None && self.image.changed() {
                        if let Err(e) = self.checkpoint() {
                            tracing::error!(task = %self.cfg.name, error = %e, "final checkpoint failed");
                        }
                    }
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    let meter = self.meter.clone();
                    meter.run(|| self.on_timer());
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn invoke(&mut self, input: Vec<u8>, key: Option<String>) -> Result<Answer, InvokeError> {
        if let Some(refusal) = self.refused() {
            return Err(refusal);
        }
        if let Some(answer) = key.as_deref().and_then(|k| self.answers.get(k)) {
            metrics::counter!("hubmesh_invoke_deduplicated_total").increment(1);
            return Ok(answer.clone());
        }
        let answer = match self.inst.call(&input) {
            Ok(a) => a,
            Err(e @ InvokeError::InputTooLarge { .. }) => return Err(e),
            Err(e) => {
                self.rollback();
                return Err(e);
            }
        };
        self.image.sync(&mut self.inst);
        self.meter.set_memory(self.inst.memory_len() as u64);
        self.invocations += 1;
        if let Some(k) = &key {
            self.answers.insert(k.clone(), answer.clone());
        }
        match self.cfg.checkpoint {
            CheckpointPolicy::Durable if crate::faults::armed("durable-ack-without-commit") => {}
            CheckpointPolicy::Durable => {
                if let Err(e) = self.checkpoint() {
                    // Not acknowledged, so not kept: back to the committed state, which a retry
                    // then changes once. The mesh's committed checkpoint wins over this
                    // instance's belief when it is newer in this epoch and here (an instance
                    // restarted from a lagging view of the state is behind it).
                    let adopted = self.catch_up_committed_key();
                    self.revert_or_break();
                    return self.undone(key.as_deref(), &e, adopted);
                }
            }
            CheckpointPolicy::Periodic { every_ms } => {
                if self.last_checkpoint.elapsed() >= Duration::from_millis(every_ms) {
                    if let Err(e) = self.checkpoint() {
                        tracing::error!(task = %self.cfg.name, error = %e, "periodic checkpoint failed");
                        self.last_checkpoint = Instant::now();
                        if self.break_if_replaced(&e) {
                            return Err(self.refused().unwrap_or(InvokeError::OutcomeUnknown(e.message)));
                        }
                        // Behind the mesh's committed checkpoint, which is not one this state
                        // grew from: this state can never commit, and this call's change goes.
                        if self.catch_up_committed_key() && !self.descends_from_committed() {
                            self.revert_or_break();
                            return self.undone(key.as_deref(), &e, true);
                        }
                    }
                }
            }
            CheckpointPolicy::None => {}
        }
        self.status.lock().unwrap_or_else(|p| p.into_inner()).invocations = self.invocations;
        Ok(answer)
    }

    fn checkpoint(&mut self) -> Result<CheckpointSummary, CheckpointFailed> {
        let started = Instant::now();
        let sequence = self.next_sequence();
        // A checkpoint at or behind the mesh's committed one of this epoch could never commit,
        // and written here it would replace the committed manifest under its key (an instance
        // restarted from a lagging view of the mesh). Checked before the image's marks are taken.
        let committed = self.sink.as_ref().and_then(|s| s.committed_key(&self.cfg.name));
        if let Some((_, epoch, at)) = committed.as_deref().and_then(parse_checkpoint_key) {
            if epoch == Epoch(self.cfg.epoch) && at >= sequence {
                return Err(CheckpointFailed::from(format!(
                    "this instance is behind the committed checkpoint {}",
                    committed.clone().unwrap_or_default()
                )));
            }
        }
        let key = checkpoint_key(&self.cfg.name, Epoch(self.cfg.epoch), sequence);
        let header = CheckpointHeader::of(&self.cfg, sequence, self.invocations, hubmesh_consensus::now_ms());
        let answers = self.answers.entries().map(|(k, a)| (k.clone(), a.clone())).collect();
        let pages = &self.pages;
        let (mut manifest, new_pages) =
            self.image.checkpoint(header, &self.module.global_names, answers, |h| pages.has_page(h));
        // Invocations waiting in the channel are part of the state: a host that restores this
        // checkpoint runs them.
        while let Ok(m) = self.rx.try_recv() {
            self.backlog.push_back(m);
        }
        self.backlog_len.store(self.backlog.len(), std::sync::atomic::Ordering::Release);
        // Up to a stop (what comes after it is refused, never run here or elsewhere), and up to
        // PENDING_BYTES of inputs so a manifest stays well inside a mesh message; invocations
        // beyond that are lost with the host like any unanswered call.
        let mut bytes = 0usize;
        manifest.pending = self
            .backlog
            .iter()
            .take_while(|m| !matches!(m, Msg::Stop { .. }))
            .filter_map(|m| match m {
                Msg::Invoke { input, key, .. } => Some((key.clone(), input.clone())),
                _ => None,
            })
            .take_while(|(_, input)| {
                bytes += input.len();
                bytes <= PENDING_BYTES
            })
            .collect();
        let encoded = manifest.encode();
        let refs: Vec<_> = manifest.pages.iter().map(|(_, h)| *h).collect();
        let mut new_hashes: Vec<_> = new_pages.iter().map(|(h, _)| *h).collect();
        // Older manifests of this task go, except the committed one (a failover may need it until
        // this one is committed).
        // Only what is surely garbage goes: checkpoints older than the committed one, and this
        // instance's own earlier ones that never committed. Another epoch's newer ones (a lagging
        // view of a move) are left to the garbage collector, which reads the mesh's state.
        let older_than = self.committed_key.as_deref().and_then(parse_checkpoint_key).map(|(_, e, s)| (e, s));
        let mine = Epoch(self.cfg.epoch);
        let remove = self
            .pages
            .manifest_keys()
            .into_iter()
            .filter(|k| {
                parse_checkpoint_key(k).is_some_and(|(t, e, s)| {
                    t == self.cfg.name && (older_than.is_some_and(|c| (e, s) < c) || (e == mine && s < sequence))
                })
            })
            .filter(|k| Some(k) != self.committed_key.as_ref() && *k != key)
            // Nor the one the mesh says is committed: a late commit this instance has not caught
            // up to yet (past the unsettled ones it keeps) is what it must return to.
            .filter(|k| Some(k) != committed.as_ref())
            .filter(|k| !self.unsettled.contains(k))
            .collect();
        let write =
            PageWrite { pages: new_pages, key: key.clone(), manifest: encoded.clone(), refs: refs.clone(), remove };
        let built = Instant::now();
        match self.writer.write_durable(write, |h| self.image.page_with_hash(h)) {
            Ok(added) => new_hashes.extend(added), // holders may lack them as well
            Err(e) => {
                // The pages this checkpoint marked clean were not written: make the next one
                // write them again.
                self.image.mark_all_changed();
                return Err(e.to_string().into());
            }
        }
        // The sequence moves on even if the commit below fails: this key is on disk already.
        self.sequence = sequence;
        if self.grown.len() == GROWN {
            self.grown.remove(0);
        }
        let manifest_hash = Hash::of(&encoded);
        self.grown.push((key.clone(), manifest_hash));
        if let Some(sink) = &self.sink {
            let local = LocalCheckpoint {
                task: self.cfg.name.clone(),
                version: self.cfg.version,
                epoch: self.cfg.epoch,
                sequence,
                key: key.clone(),
                manifest: encoded,
                manifest_hash,
                refs,
                new_pages: new_hashes,
                size_bytes: manifest.size_bytes(),
                created_ms: manifest.created_unix_ms,
                committed_key: self.committed_key.clone(),
            };
            if let Err(e) = sink.commit(&local) {
                // The next checkpoint must carry this state again (periodic mode retries it, a
                // stop takes it as the final one).
                self.image.mark_all_changed();
                let (may_have_committed, replaced) = match e {
                    CommitError::Replaced { may_have_committed } => (may_have_committed, true),
                    _ => (matches!(e, CommitError::MayHaveCommitted(_)), false),
                };
                // All are built on the same committed one, so at most one of them can commit:
                // most likely the first proposed, so the oldest are kept.
                if may_have_committed && self.unsettled.len() < UNSETTLED {
                    self.unsettled.push(key);
                }
                return Err(CheckpointFailed { message: e.to_string(), may_have_committed, replaced });
            }
        }
        self.committed_key = Some(key);
        self.unsettled.clear(); // older than what is committed now: garbage
        self.grown.clear(); // what is committed now is this state
        self.last_checkpoint = Instant::now();
        let mut summary = CheckpointSummary::of(&manifest);
        summary.build_micros = built.duration_since(started).as_micros() as u64;
        summary.write_micros = built.elapsed().as_micros() as u64;
        metrics::histogram!("hubmesh_checkpoint_build_seconds").record(built.duration_since(started).as_secs_f64());
        metrics::histogram!("hubmesh_checkpoint_write_seconds").record(built.elapsed().as_secs_f64());
        self.status.lock().unwrap_or_else(|p| p.into_inner()).last_checkpoint = Some(summary.clone());
        metrics::counter!("hubmesh_checkpoints_total").increment(1);
        Ok(summary)
    }
}
