//! Errors of the executor, named for what the caller should do.

/// Why an invocation did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum InvokeError {
    /// No task of this name runs on this hub.
    #[error("no task named {0:?} runs on this hub")]
    NotFound(String),
    /// The input is larger than the task accepts.
    #[error("input of {size} bytes is over the task's limit of {limit} bytes")]
    InputTooLarge { size: u64, limit: u64 },
    /// The task tried to return more than its output limit.
    #[error("the task's output is over its limit of {limit} bytes")]
    OutputTooLarge { limit: u64 },
    /// The invocation ran past its deadline and was stopped.
    #[error("the invocation ran past its deadline of {timeout_ms} ms and was stopped")]
    DeadlineExceeded { timeout_ms: u64 },
    /// The task asked for more memory than its cap.
    #[error("the task needed more memory than its cap of {limit} bytes")]
    MemoryLimit { limit: u64 },
    /// The task trapped.
    #[error("the task trapped: {0}")]
    Trapped(String),
    /// Too many invocations are waiting for this task.
    #[error("the task's queue is full ({limit} waiting)")]
    QueueFull { limit: u32 },
    /// The task is stopping, restarting, not here, or its state change could not be saved and
    /// was undone: the call did not take effect (a forwarder tries another host). A durable
    /// change that may yet commit answers [`Self::OutcomeUnknown`] instead.
    #[error("the task is unavailable: {0}")]
    Unavailable(String),
    /// The task was live-migrated to hub `node` (placement epoch `epoch`) while this call waited
    /// on the source; the source relays it there once, under `key` (the caller's key, or the one
    /// the migration gave a keyless call it carried), so that it runs exactly once.
    #[error("the task moved to hub {node} (epoch {epoch})")]
    Moved { node: u64, epoch: u64, key: Option<String> },
    /// The invocation may or may not have run (a live migration it waited on was cut short by a
    /// failover, or its relay got no answer); retry only with an idempotency key.
    #[error("the invocation may or may not have run: {0}")]
    OutcomeUnknown(String),
}

/// Why a task could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartTaskError {
    /// The module does not compile or instantiate.
    #[error("the module does not load: {0}")]
    Module(String),
    /// The saved state could not be restored.
    #[error("restoring the task's checkpoint: {0}")]
    Restore(String),
    /// This hub failed, not the module: its compiler program died, timed out or is of another
    /// build (upgraded under the running hub), its instance pool is full, or no thread could be
    /// spawned. Worth trying again.
    #[error("this hub could not start it now: {0}")]
    Hub(String),
}

impl From<super::instance::InstanceError> for StartTaskError {
    /// An instance that could not be built: the engine's pool was full (this hub's failure, for
    /// now), or the module failed (its own).
    fn from(e: super::instance::InstanceError) -> Self {
        match e {
            super::instance::InstanceError::NoSlot(_) => Self::Hub(e.to_string()),
            super::instance::InstanceError::Module(e) => Self::Module(e.to_string()),
        }
    }
}

/// Why a checkpoint was not committed for the mesh (the [`super::CheckpointSink`]'s answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// A newer epoch of the instance exists: this one was replaced and must not commit. With
    /// `may_have_committed`, a proposal of the record was taken before that was seen: the change
    /// may be in a checkpoint committed before the re-placement.
    #[error("this instance was replaced (a newer epoch exists); its change is not committed")]
    Replaced { may_have_committed: bool },
    /// The instance is behind the committed checkpoint; it must return to it.
    #[error("this instance is behind the committed checkpoint: {0}")]
    Behind(String),
    /// The task was deleted.
    #[error("the task was deleted")]
    Deleted,
    /// Holders or the leader did not take it in time; a later checkpoint may.
    #[error("the checkpoint could not be committed: {0}")]
    NotCommitted(String),
    /// Its record was proposed and no answer came in time: it may still commit.
    #[error("the checkpoint's record was proposed without an answer; it may yet be committed: {0}")]
    MayHaveCommitted(String),
    /// The hub is shutting down; the commit was not begun.
    #[error("the hub is shutting down")]
    ShuttingDown,
}

/// Why the actor's checkpoint failed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct CheckpointFailed {
    pub(crate) message: String,
    /// Its record may still commit ([`CommitError::MayHaveCommitted`]): a change it carries may
    /// take effect, so its caller must not be told that it did not.
    pub(crate) may_have_committed: bool,
    /// A newer epoch of the task exists ([`CommitError::Replaced`]): this instance is stale and
    /// must answer nothing more.
    pub(crate) replaced: bool,
}

impl From<CheckpointFailed> for InvokeError {
    /// A checkpoint asked for on its own: whether its change may still be committed.
    fn from(e: CheckpointFailed) -> Self {
        match e.may_have_committed {
            true => Self::OutcomeUnknown(e.message),
            false => Self::Unavailable(e.message),
        }
    }
}

impl From<String> for CheckpointFailed {
    fn from(message: String) -> Self {
        Self { message, may_have_committed: false, replaced: false }
    }
}
