//! The one way to change the replicated state: propose a [`Command`], get the state machine's
//! answer. The leader commits through its own log with group commit; a follower forwards the
//! command to the leader over the `PROPOSE` endpoint (never re-forwarded).
//!
//! ```text
//!  propose(cmd) --> Batcher (commands that arrive while a write is in flight share one entry)
//!     --> openraft client_write --> Outcome | Rejected
//!     not leader --> PROPOSE{pb::Command} to the leader --> its Batcher --> ProposeResponse{pb::CommandResult}
//!                    refusals travel as codes: NOT_LEADER{leader}, OUTCOME_UNKNOWN, UNAVAILABLE
//! ```

use std::time::Duration;

use hubmesh_proto::pb;
use openraft::error::{ClientWriteError, RaftError};
use openraft::Raft;

use crate::state::{Command, CommandResult, Outcome, Rejected};
use crate::transport::{Refusal, RpcError, Transport, PROPOSE};
use crate::type_config::TypeConfig;
use crate::wire::{result_from_wire, result_to_wire};

/// Why a proposal failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// The state machine refused the command; nothing changed.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// No leader is reachable (no quorum, or an election is under way); nothing changed.
    #[error("no leader can take the change now (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// The outcome is unknown: the command may still be committed. Retry only if idempotent.
    #[error("the proposal timed out; its outcome is unknown")]
    Timeout,
    /// Raft is shutting down or failed.
    #[error("consensus is unavailable: {0}")]
    Unavailable(String),
}

impl ProposeError {
    /// How the leader tells a forwarding follower (a [`Rejected`] travels in the answer).
    fn into_refusal(self) -> Refusal {
        let message = self.to_string();
        match self {
            Self::NotLeader { leader } => Refusal::new(pb::ErrorCode::NotLeader, message)
                .with_hint(pb::ErrorHint { leader: leader.unwrap_or(0), ..Default::default() }),
            Self::Timeout => Refusal::new(pb::ErrorCode::OutcomeUnknown, message),
            Self::Unavailable(_) | Self::Rejected(_) => Refusal::new(pb::ErrorCode::Unavailable, message),
        }
    }

    /// What a forwarded proposal's failure means for the follower that forwarded it.
    fn from_forward(e: RpcError) -> Self {
        match e {
            RpcError::Timeout => Self::Timeout,
            // The leader never had the command: nothing changed, another leader may take it.
            RpcError::Unreachable(..) | RpcError::NotDelivered(_) => Self::NotLeader { leader: None },
            RpcError::Remote(r) => match r.code {
                pb::ErrorCode::NotLeader => Self::NotLeader { leader: (r.hint.leader != 0).then_some(r.hint.leader) },
                pb::ErrorCode::OutcomeUnknown => Self::Timeout,
                _ => Self::Unavailable(r.message),
            },
            RpcError::Protocol(m) => Self::Unavailable(m),
        }
    }
}

/// What proposing needs, cheap to clone into handlers.
#[derive(Clone)]
pub(crate) struct ProposeHandle {
    raft: Raft<TypeConfig>,
    transport: std::sync::Arc<Transport>,
    timeout: Duration,
    batcher: Batcher,
}

type Waiter = tokio::sync::oneshot::Sender<Result<Outcome, ProposeError>>;

/// Group commit by hand: openraft 0.9 appends (and fsyncs) one client write at a time, so the
/// commands that arrive while a write is in flight are committed together as one
/// `Command::Batch` entry, and each waiter gets its own result.
#[derive(Clone)]
struct Batcher {
    tx: tokio::sync::mpsc::UnboundedSender<(Command, Waiter)>,
}

/// Most commands in one log entry.
const MAX_BATCH: usize = 512;

/// The first and the longest pause between two tries of an idempotent command.
const RETRY_FIRST_PAUSE: Duration = Duration::from_millis(25);
const RETRY_MAX_PAUSE: Duration = Duration::from_millis(400);

impl Batcher {
    fn start(raft: Raft<TypeConfig>, timeout: Duration) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Command, Waiter)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(x) => batch.push(x),
                        Err(_) => break,
                    }
                }
                if batch.len() == 1 {
                    let (cmd, waiter) = batch.pop().expect("one command");
                    let _ = waiter.send(propose_raw(&raft, cmd, timeout).await);
                    continue;
                }
                let (cmds, waiters): (Vec<Command>, Vec<Waiter>) = batch.into_iter().unzip();
                match propose_raw(&raft, Command::Batch(cmds), timeout).await {
                    Ok(Outcome::Batch(results)) if results.len() == waiters.len() => {
                        for (w, r) in waiters.into_iter().zip(results) {
                            let _ = w.send(r.map_err(ProposeError::Rejected));
                        }
                    }
                    Ok(other) => {
                        let e = ProposeError::Unavailable(format!("unexpected batch outcome {other:?}"));
                        waiters.into_iter().for_each(|w| drop(w.send(Err(e.clone()))));
                    }
                    Err(e) => waiters.into_iter().for_each(|w| drop(w.send(Err(e.clone())))),
                }
            }
        });
        Self { tx }
    }

    async fn propose(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send((cmd, tx)).map_err(|_| ProposeError::Unavailable("consensus is shutting down".into()))?;
        rx.await.map_err(|_| ProposeError::Unavailable("consensus is shutting down".into()))?
    }
}

impl ProposeHandle {
    pub(crate) fn new(raft: Raft<TypeConfig>, transport: std::sync::Arc<Transport>, timeout: Duration) -> Self {
        let batcher = Batcher::start(raft.clone(), timeout);
        Self { raft, transport, timeout, batcher }
    }

    /// Serves `PROPOSE`: a follower hands a command to this hub, which commits it locally only.
    pub(crate) fn serve(&self) {
        let local = self.clone();
        PROPOSE.serve(&self.transport, move |_from, req: pb::ProposeRequest| {
            let local = local.clone();
            async move {
                let cmd = req.command.ok_or_else(|| Refusal::bad_request("the proposal lacks its command"))?;
                let cmd = Command::try_from(cmd).map_err(|e| Refusal::bad_request(format!("a bad command: {e}")))?;
                let result: CommandResult = match local.propose_here(cmd).await {
                    Ok(o) => Ok(o),
                    Err(ProposeError::Rejected(r)) => Err(r),
                    Err(e) => return Err(e.into_refusal()),
                };
                Ok(pb::ProposeResponse { result: Some(result_to_wire(&result)) })
            }
        });
    }

    /// Commits on this hub only (it must lead).
    pub(crate) async fn propose_here(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        match cmd {
            // Batches go as they are: batches do not nest.
            Command::Batch(_) => propose_raw(&self.raft, cmd, self.timeout).await,
            _ => self.batcher.propose(cmd).await,
        }
    }

    /// Commits here if this hub leads, else through the leader. A command that applies the same
    /// twice ([`Command::is_idempotent`]) is proposed again, within the proposal timeout, while
    /// no leader takes it or its outcome is unknown: an operator's `node drain` right after the
    /// leader restarted would otherwise fail on a forward to the leader's previous run.
    pub(crate) async fn propose(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        if !cmd.is_idempotent() {
            return self.propose_once(cmd).await;
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut pause = RETRY_FIRST_PAUSE;
        loop {
            // Every try within the one budget: a last try must not get a whole timeout of its own.
            let once = tokio::time::timeout_at(deadline, self.propose_once(cmd.clone()));
            match once.await.unwrap_or(Err(ProposeError::Timeout)) {
                Err(ProposeError::NotLeader { .. } | ProposeError::Timeout)
                    if tokio::time::Instant::now() + pause < deadline =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX_PAUSE);
                }
                other => return other,
            }
        }
    }

    async fn propose_once(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        match self.propose_here(cmd.clone()).await {
            Err(ProposeError::NotLeader { leader }) => {
                // openraft names the leader only once its vote is committed here; the metrics may
                // already know it.
                let metrics = self.raft.metrics().borrow().clone();
                match leader.or(metrics.current_leader) {
                    Some(l) if l != metrics.id => self.forward(l, cmd).await,
                    other => Err(ProposeError::NotLeader { leader: other }),
                }
            }
            other => other,
        }
    }

    async fn forward(&self, leader: u64, cmd: Command) -> Result<Outcome, ProposeError> {
        // Stop waiting on a leader that has been replaced: if it never got the command, the caller
        // may retry with the new one; if it did, the outcome is unknown.
        let mut metrics = self.raft.metrics();
        let replaced = async move {
            let _ = metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != leader)).await;
        };
        let req = pb::ProposeRequest { command: Some(pb::Command::from(&cmd)) };
        let resp = PROPOSE
            .call_unless(&self.transport, leader, &req, self.timeout, replaced)
            .await
            .map_err(ProposeError::from_forward)?;
        let result =
            resp.result.ok_or_else(|| ProposeError::Unavailable("the leader's answer lacks its result".into()))?;
        let result = result_from_wire(result)
            .map_err(|e| ProposeError::Unavailable(format!("a bad answer from the leader: {e}")))?;
        Ok(result?)
    }

    /// The Raft handle, for the facade's status reads.
    pub(crate) fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }
}

async fn propose_raw(raft: &Raft<TypeConfig>, cmd: Command, timeout: Duration) -> Result<Outcome, ProposeError> {
    match tokio::time::timeout(timeout, raft.client_write(cmd)).await {
        Err(_) => Err(ProposeError::Timeout),
        Ok(Ok(resp)) => Ok(resp.data?),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            Err(ProposeError::NotLeader { leader: f.leader_id })
        }
        Ok(Err(e)) => Err(ProposeError::Unavailable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(e: ProposeError) -> ProposeError {
        ProposeError::from_forward(RpcError::Remote(e.into_refusal()))
    }

    #[test]
    fn refusals_map_back_to_the_same_error() {
        use ProposeError::*;
        assert!(matches!(round_trip(NotLeader { leader: Some(7) }), NotLeader { leader: Some(7) }));
        assert!(matches!(round_trip(NotLeader { leader: None }), NotLeader { leader: None }));
        assert!(matches!(round_trip(Timeout), Timeout));
        assert!(matches!(round_trip(Unavailable("raft stopped".into())), Unavailable(_)));
        // A leader that cannot be reached never had the command: another leader may take it.
        assert!(matches!(ProposeError::from_forward(RpcError::NotDelivered(3)), NotLeader { leader: None }));
        assert!(matches!(ProposeError::from_forward(RpcError::Timeout), Timeout));
    }
}
