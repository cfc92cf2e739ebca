//! The source side of a live migration, inside the task's actor (design §7).
//!
//! ```text
//!  Running --Begin--> Running (pages tracked) --Round*--> --Freeze--> Frozen --Resolve(moved)--> Moved
//!                                                                       \--Resolve(abort)--> Running
//! ```
//!
//! While frozen the actor runs nothing: calls that arrive are held. `Freeze` hands out what the
//! target needs to go on exactly where the source stopped: the pages not sent yet, the globals,
//! the answers, and the calls already waiting (the manifest's `pending`; the target runs them
//! first). A keyless waiting call gets a key of the migration, so that when the source relays it
//! after the commit the target answers it from its cache instead of running it twice.
//! `Resolve` says how the migration ended: moved (every held call is answered `Moved`, which
//! the invocation path relays to the target, and the actor never writes another checkpoint) or
//! aborted (the held calls run here, in order). Page tracking lives in the image's second dirty
//! set, so an aborted migration leaves the checkpoint's own marks as they were.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hubmesh_consensus::state::CheckpointPolicy;
use hubmesh_storage::PagePin;
use tokio::sync::oneshot;

use super::{Actor, Msg, PENDING_BYTES};
use crate::checkpoint::{Answer, GlobalValue};
use crate::executor::image::MigrationDelta;
use crate::executor::InvokeError;

/// A migration's request to the actor.
pub(crate) enum MigrateMsg {
    /// Starts tracking the pages to send.
    Begin { reply: oneshot::Sender<MigrationStart> },
    /// Copies out up to `max_pages` of the pages changed since the previous round; from now on
    /// each call waits `throttle` first (auto-converge: a task that dirties pages faster than
    /// they travel is slowed down until the migration ends).
    Round { max_pages: usize, throttle: Duration, reply: oneshot::Sender<MigrationDelta> },
    /// Stops running calls and hands out the rest of the state.
    Freeze { id: u64, reply: oneshot::Sender<FinalState> },
    /// How the migration ended.
    Resolve { outcome: Resolution },
}

/// How a migration ended, for the actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// Committed: the task runs at the target; held calls are relayed there.
    Moved(MovedTo),
    /// Aborted: the task runs here again; held calls run in order.
    Aborted,
    /// Cut short by a re-placement (a failover, an update): the task runs elsewhere (or
    /// nowhere), from a checkpoint that may carry some held calls under other keys. A held call
    /// with its own key follows the task (the key makes it apply once); a keyless one's outcome
    /// is unknown.
    Fenced(Option<MovedTo>),
}

impl MigrateMsg {
    /// Answers nothing: the requester hears that the task is gone (its reply channel closes).
    pub(super) fn refuse(self, why: &str) {
        tracing::debug!(why, "a migration request was refused");
    }
}

/// Where the first round starts from.
pub(crate) struct MigrationStart {
    /// The committed checkpoint the rounds are a delta against (the target starts from it):
    /// its key, its encoded manifest and a pin that keeps its pages here while the migration
    /// needs them; `None`: the rounds carry every page.
    pub(crate) base: Option<(String, Vec<u8>, PagePin)>,
}

/// The hub and epoch a task moved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MovedTo {
    pub(crate) node: u64,
    pub(crate) epoch: u64,
}

/// What a frozen source hands over: with the pages sent before, the whole state.
#[derive(Debug, Clone)]
pub(crate) struct FinalState {
    /// The pages changed since the last round, `(index, bytes)`.
    pub(crate) pages: Vec<(u32, Vec<u8>)>,
    pub(crate) memory_pages: u32,
    pub(crate) globals: Vec<(String, GlobalValue)>,
    pub(crate) answers: Vec<(String, Answer)>,
    pub(crate) invocations: u64,
    /// The sequence of the checkpoint that carries this state (never used by the source again,
    /// even if the migration is aborted).
    pub(crate) sequence: u64,
    /// The committed checkpoint the source last knew.
    pub(crate) committed_key: Option<String>,
    /// Calls that were waiting, in order, each with the key it runs under on the target.
    pub(crate) pending: Vec<(Option<String>, Vec<u8>)>,
}

/// Whether the actor runs calls.
pub(in crate::executor) enum Mode {
    Running,
    Frozen {
        held: VecDeque<Held>,
    },
    Moved(MovedTo),
    /// A migration cut short by a re-placement: the instance is stale, it runs nothing.
    Fenced,
}

impl Mode {
    pub(super) fn running(&self) -> bool {
        matches!(self, Self::Running)
    }
}

/// A call that arrived or waited while the actor was frozen.
pub(in crate::executor) struct Held {
    input: Vec<u8>,
    key: Option<String>,
    /// The key it is relayed under after a move (set for the calls the final state carries).
    relay_key: Option<String>,
    /// The final state carries it: it may run on the target whatever happens here.
    carried: bool,
    reply: oneshot::Sender<Result<Answer, InvokeError>>,
}

impl Actor {
    /// A migration request while running.
    pub(super) fn migrate(&mut self, msg: MigrateMsg) {
        match msg {
            MigrateMsg::Begin { reply } => {
                // A checkpoint whose commit answered too late for this instance may be committed
                // after all: the migration's commit must build on the mesh's committed one, or
                // it is refused (every attempt, until a call happens to catch up). A durable
                // instance went back to its older committed state when the commit failed, so it
                // returns to the newer one; a periodic one that grew from it holds more than
                // either (its failed checkpoint marked every page again, so all of it travels).
                if self.catch_up_committed_key()
                    && (self.cfg.checkpoint == CheckpointPolicy::Durable || !self.descends_from_committed())
                {
                    self.revert_or_break();
                }
                // The image's checkpoint marks are relative to the last checkpoint, which is the
                // committed one: a checkpoint that failed to commit marked every page again.
                // Read here, on the thread that deletes older manifests, so it cannot go away.
                let base = self.committed_key.clone().and_then(|k| match self.pin_base(&k) {
                    Ok((bytes, pin)) => Some((k, bytes, pin)),
                    Err(e) => {
                        tracing::warn!(task = %self.cfg.name, checkpoint = %k, error = %e, "migrating every page");
                        None
                    }
                });
                self.image.begin_migration(base.is_some());
                self.throttle = Duration::ZERO;
                let _ = reply.send(MigrationStart { base });
            }
            MigrateMsg::Round { max_pages, throttle, reply } => {
                self.throttle = throttle;
                let _ = reply.send(self.image.take_migration_delta(max_pages));
            }
            MigrateMsg::Freeze { id, reply } => {
                let state = self.freeze(id);
                let _ = reply.send(state);
            }
            MigrateMsg::Resolve { outcome: Resolution::Aborted } => {
                self.image.end_migration();
                self.throttle = Duration::ZERO;
            }
            MigrateMsg::Resolve { outcome } => {
                // Moved or fenced without a freeze: not through the driver, but the authority
                // is gone either way.
                self.image.end_migration();
                self.mode = match outcome {
                    Resolution::Moved(to) => Mode::Moved(to),
                    _ => Mode::Fenced,
                };
            }
        }
    }

    /// The manifest of the checkpoint `key` and a pin on its pages.
    fn pin_base(&self, key: &str) -> Result<(Vec<u8>, PagePin), String> {
        let bytes = self.pages.read_manifest(key).map_err(|e| e.to_string())?.ok_or("the manifest is gone")?;
        let m = crate::checkpoint::Manifest::decode(&bytes).map_err(|e| e.to_string())?;
        let mut pin = self.pages.pin();
        pin.add(m.pages.iter().map(|(_, h)| *h));
        if let Some((_, h)) = m.pages.iter().find(|(_, h)| !self.pages.has_page(h)) {
            return Err(format!("page {h} is gone"));
        }
        Ok((bytes, pin))
    }

    fn freeze(&mut self, id: u64) -> FinalState {
        while let Ok(m) = self.rx.try_recv() {
            self.backlog.push_back(m);
        }
        let mut held = VecDeque::new();
        let mut others = VecDeque::new();
        let mut bytes = 0usize;
        let mut pending = Vec::new();
        for m in self.backlog.drain(..) {
            let Msg::Invoke { input, key, reply, .. } = m else {
                others.push_back(m);
                continue;
            };
            bytes += input.len();
            // Up to PENDING_BYTES travel with the state; later ones are relayed as new calls.
            let relay_key = if bytes <= PENDING_BYTES {
                let k = key.clone().or_else(|| Some(format!("mig:{id}:{}", pending.len())));
                pending.push((k.clone(), input.clone()));
                k
            } else {
                key.clone()
            };
            held.push_back(Held { input, key, relay_key, carried: bytes <= PENDING_BYTES, reply });
        }
        self.backlog = others;
        let delta = self.image.take_migration_delta(usize::MAX);
        self.sequence = self.next_sequence();
        self.count_waiting(held.len());
        self.mode = Mode::Frozen { held };
        tracing::info!(task = %self.cfg.name, id, pages = delta.pages.len(), pending = pending.len(), "frozen for migration");
        FinalState {
            pages: delta.pages,
            memory_pages: delta.memory_pages,
            globals: self.image.globals(&self.module.global_names),
            answers: self.answers.entries().map(|(k, a)| (k.clone(), a.clone())).collect(),
            invocations: self.invocations,
            sequence: self.sequence,
            committed_key: self.committed_key.clone(),
            pending,
        }
    }

    /// Handles a message while frozen or moved; says whether the actor ends.
    pub(super) fn while_migrating(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Invoke { input, key, reply, .. } => match &mut self.mode {
                Mode::Frozen { held } => {
                    held.push_back(Held { input, relay_key: key.clone(), key, carried: false, reply });
                    let n = held.len();
                    self.count_waiting(n);
                }
                Mode::Moved(to) => {
                    let _ = reply.send(Err(InvokeError::Moved { node: to.node, epoch: to.epoch, key }));
                }
                Mode::Fenced => {
                    let _ = reply.send(Err(InvokeError::Unavailable("the task was placed elsewhere".into())));
                }
                Mode::Running => unreachable!("only called while not running"),
            },
            Msg::Checkpoint { reply } => {
                let _ = reply.send(Err(InvokeError::Unavailable("the task is being migrated".into())));
            }
            Msg::Migrate(MigrateMsg::Resolve { outcome }) => self.resolve(outcome),
            Msg::Migrate(other) => other.refuse("a migration is already frozen or done"),
            Msg::Stop { .. } => {
                if let Mode::Frozen { held } = std::mem::replace(&mut self.mode, Mode::Running) {
                    // The migration's outcome is not known here: a call the final state carries
                    // may run on the target (outcome unknown); the others never ran.
                    for h in held {
                        let why = "the task stopped during a live migration".to_owned();
                        let answer =
                            if h.carried { InvokeError::OutcomeUnknown(why) } else { InvokeError::Unavailable(why) };
                        let _ = h.reply.send(Err(answer));
                    }
                }
                // Never a final checkpoint: the state is the target's or the frozen one.
                return true;
            }
        }
        false
    }

    fn resolve(&mut self, outcome: Resolution) {
        let Mode::Frozen { held } = std::mem::replace(&mut self.mode, Mode::Running) else {
            return;
        };
        self.image.end_migration();
        self.throttle = Duration::ZERO;
        match outcome {
            Resolution::Moved(to) => {
                tracing::info!(task = %self.cfg.name, node = to.node, epoch = to.epoch, relayed = held.len(), "migrated");
                for h in held {
                    let moved = InvokeError::Moved { node: to.node, epoch: to.epoch, key: h.relay_key };
                    let _ = h.reply.send(Err(moved));
                }
                self.mode = Mode::Moved(to);
                self.count_waiting(0);
            }
            Resolution::Fenced(to) => {
                tracing::warn!(task = %self.cfg.name, held = held.len(), "the migration was cut short by a re-placement");
                for h in held {
                    let answer = match (to, h.key) {
                        // Its own key makes it apply once wherever it runs.
                        (Some(to), Some(key)) => InvokeError::Moved { node: to.node, epoch: to.epoch, key: Some(key) },
                        _ => InvokeError::OutcomeUnknown(
                            "a live migration it waited on was cut short by a failover".into(),
                        ),
                    };
                    let _ = h.reply.send(Err(answer));
                }
                self.mode = Mode::Fenced;
                self.count_waiting(0);
            }
            Resolution::Aborted => {
                tracing::info!(task = %self.cfg.name, resumed = held.len(), "migration aborted; running here again");
                for h in held.into_iter().rev() {
                    self.backlog.push_front(Msg::Invoke {
                        input: h.input,
                        key: h.key,
                        reply: h.reply,
                        queued: Instant::now(),
                    });
                }
                let n = self.backlog.len();
                self.count_waiting(n);
            }
        }
    }

    fn count_waiting(&self, n: usize) {
        self.backlog_len.store(n, std::sync::atomic::Ordering::Release);
    }
}
