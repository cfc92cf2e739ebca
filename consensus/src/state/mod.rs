//! `ClusterState`: everything the hubs agree on, and the commands that change it.
//!
//! [`ClusterState::apply`] is a pure function of the state and one command. It validates before
//! it mutates, so a rejected command changes nothing. Time comes in the command (stamped by the
//! proposer), never from the clock of the hub applying it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod api_tokens;
pub use api_tokens::{
    hub_token_name, validate_api_token_name, validate_user_api_token_name, MAX_API_TOKEN_NAME, MAX_API_TOKEN_TASKS,
};
mod migration;
mod records;

pub use records::*;

use crate::ids::{Epoch, NodeId};
use crate::tls::CaMaterial;

/// The replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub tasks: BTreeMap<String, TaskRecord>,
    /// The last epoch handed out; the next placement gets `last_epoch + 1`.
    pub last_epoch: Epoch,
    /// The cluster CA, so that any member can admit a hub.
    #[serde(default)]
    pub ca: Option<CaMaterial>,
    /// Join tokens by id.
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenRecord>,
    /// API tokens by name (see `api_tokens`).
    #[serde(default)]
    pub api_tokens: BTreeMap<String, ApiTokenRecord>,
    /// Certificates of removed hubs (hex SHA-256): the mesh endpoint refuses them.
    #[serde(default)]
    pub revoked: std::collections::BTreeSet<String>,
    /// Ids of removed hubs: they may not register or join again under that id.
    #[serde(default)]
    pub removed: std::collections::BTreeSet<NodeId>,
    /// Time and reason for history events of the commands that follow in the same batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<(u64, String)>,
}

/// A change of the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Adds a hub or updates its addresses, labels and capacity.
    RegisterNode { node: NodeRecord },
    /// Creates or updates a task.
    DeployTask { spec: TaskSpec, mode: DeployMode, at_ms: u64 },
    /// Deletes a task and its placements.
    DeleteTask { name: String },
    /// Places (or re-places) one instance. `expected` is the epoch the proposer saw, so a
    /// placement decided on a stale view is rejected instead of overriding a newer one.
    PlaceInstance { task: String, instance: u32, node: NodeId, expected: Option<Epoch> },
    /// The leader's choice of checkpoint holders for a task.
    SetHolders { task: String, holders: Vec<NodeId> },
    /// A checkpoint that its holders have stored; refused unless it comes from the instance's
    /// current epoch, is newer than the last one and — when `based_on` is given — was built on
    /// the committed one (an instance that restored a stale view must not commit over a newer
    /// checkpoint it never saw).
    CommitCheckpoint {
        task: String,
        record: CheckpointRecord,
        #[serde(default)]
        based_on: Option<BasedOn>,
    },
    /// Hubs that received a copy of the committed checkpoint after it was committed (a new
    /// holder); ignored unless that checkpoint is still the committed one.
    AddCheckpointCopies { task: String, epoch: Epoch, sequence: u64, nodes: Vec<NodeId> },
    /// Stamps the time and reason of the next history events (sent with placements).
    Note { at_ms: u64, reason: String },
    /// Independent commands committed as one log entry (group commit); each has its own result.
    Batch(Vec<Self>),
    /// Records the cluster CA (once, by the first hub).
    SetCa { ca: CaMaterial },
    /// Creates a join token.
    CreateToken { id: String, secret_hash: String, expires_ms: u64, at_ms: u64 },
    /// Revokes a join token.
    RevokeToken { id: String },
    /// The leader's view of a hub's health.
    SetNodeStatus { node: NodeId, status: NodeStatus },
    /// Removes a hub for good: its record goes, its certificate is revoked, its instances are
    /// left for the scheduler to re-place.
    RemoveNode { node: NodeId },
    /// Admits a joining hub that proved a token's secret.
    AdmitNode { node: NodeRecord, token_id: String, secret_hash: String, at_ms: u64 },
    /// Creates an API token (its name must be free).
    CreateApiToken { name: String, record: ApiTokenRecord },
    /// Revokes an API token: every hub refuses it from then on.
    RevokeApiToken { name: String },
    /// Starts a live migration of `task`'s instance from `from` (at epoch `expected`) to `to`.
    /// Nothing moves yet; the source keeps the authority. Repeating it with the same id is a no-op.
    BeginMigration {
        task: String,
        instance: u32,
        id: u64,
        from: NodeId,
        to: NodeId,
        expected: Epoch,
        reason: MigrationReason,
        at_ms: u64,
    },
    /// The one switch of a live migration: the instance moves to the target under a new epoch,
    /// and, for a stateful task, `checkpoint` (the source's final state, stored on the target)
    /// becomes the committed checkpoint in the same step. Refused once the migration was aborted.
    CommitMigration {
        task: String,
        id: u64,
        expected: Epoch,
        checkpoint: Option<CheckpointRecord>,
        based_on: Option<BasedOn>,
        stats: MigrationStats,
        at_ms: u64,
    },
    /// Gives a live migration up: the source stays the host. Refused once it was committed.
    AbortMigration { task: String, id: u64, why: String, at_ms: u64 },
    /// Records the pause the source measured after the commit of the migration that made `epoch`.
    AnnotateMigration { task: String, epoch: Epoch, pause_us: u64 },
}

impl Command {
    /// Whether applying it a second time changes nothing and answers as the first time did, so
    /// that a proposal whose outcome is unknown (the leader restarted, an election) may simply be
    /// proposed again. A repeat that lands after another change of the same field overrides it,
    /// as a later identical request would: only for commands where the last request should win
    /// (an operator's drain or undrain; the leader's own health marks go `propose_as_leader`,
    /// never repeated, and correct a wrong mark at the next health round).
    pub fn is_idempotent(&self) -> bool {
        matches!(self, Self::SetNodeStatus { .. })
    }
}

/// What an applied command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Nothing to report (blank and membership entries).
    Noop,
    NodeRegistered,
    Deployed {
        version: u64,
        created: bool,
    },
    Deleted,
    Placed {
        epoch: Epoch,
    },
    Batch(Vec<CommandResult>),
    CaSet,
    TokenCreated,
    TokenRevoked,
    Admitted,
    /// A checkpoint record was committed.
    Committed,
    /// The task's holders were set.
    HoldersSet,
    /// The hub's status was set.
    StatusSet,
    /// The hub was removed.
    NodeRemoved,
    /// Copies of the committed checkpoint were recorded.
    CopiesAdded,
    ApiTokenCreated,
    ApiTokenRevoked,
    /// A live migration was recorded (or was already).
    MigrationBegun,
    /// A live migration was committed: the instance now runs at `epoch` on the target.
    Migrated {
        epoch: Epoch,
    },
    /// A live migration was given up.
    MigrationAborted,
    /// A migration's history event got its pause.
    MigrationAnnotated,
}

/// Why a command was refused. A refused command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejected {
    /// A task with this name exists; deploy it as an explicit update.
    #[error("task {0:?} already exists")]
    TaskExists(String),
    /// No task has this name.
    #[error("no task named {0:?}")]
    NoSuchTask(String),
    /// No hub has this id.
    #[error("no hub with id {0}")]
    NoSuchNode(NodeId),
    /// No such instance of the task.
    #[error("task {task:?} has no instance {instance}")]
    NoSuchInstance { task: String, instance: u32 },
    /// A checkpoint built on another state than the committed checkpoint.
    #[error("the checkpoint was built on {based_on:?}, but {committed:?} is committed")]
    NotBasedOnCommitted { based_on: Option<(Epoch, u64)>, committed: Option<(Epoch, u64)> },
    /// The placement changed since the proposer looked; re-read and decide again.
    #[error("stale epoch: the instance is at epoch {current:?}")]
    StaleEpoch { current: Option<Epoch> },
    /// The command is malformed.
    #[error("invalid command: {0}")]
    Invalid(String),
    /// The join token is unknown, expired, revoked or its secret is wrong.
    #[error("join refused: {0}")]
    BadToken(String),
    /// This hub was removed from the mesh; it must join again with a new identity.
    #[error("hub {0} was removed from the mesh; wipe its data dir and join again")]
    Removed(NodeId),
    /// Another hub already has this node id.
    #[error("node id {0} is already taken by another hub")]
    NodeIdTaken(NodeId),
    /// An API token with this name exists (revoked or not).
    #[error("an API token named {0:?} exists")]
    ApiTokenExists(String),
    /// No API token has this name.
    #[error("no API token named {0:?}")]
    NoSuchApiToken(String),
    /// Another live migration of the task is in progress.
    #[error("migration {id} of this task is in progress")]
    MigrationInProgress { id: u64 },
    /// The task has no live migration with this id (it was committed, aborted or fenced).
    #[error("task {task:?} has no migration {id} in progress")]
    NoSuchMigration { task: String, id: u64 },
    /// The hub cannot take the task (a witness, not up, already runs it, or is its source).
    #[error("hub {node} cannot take the task: {why}")]
    UnfitTarget { node: NodeId, why: String },
}

/// The state machine's answer to one command.
pub type CommandResult = Result<Outcome, Rejected>;

/// Longest task name; names are also used in URLs and file names.
pub const MAX_TASK_NAME: usize = 64;

/// Checks a task name: 1–64 characters of `[a-z0-9_-]`, starting with a letter or digit.
pub fn validate_task_name(name: &str) -> Result<(), Rejected> {
    validate_name("task name", name, MAX_TASK_NAME)
}

/// The rule of task and API token names: 1–`max` characters of `[a-z0-9_-]`, starting with a
/// letter or digit.
pub(crate) fn validate_name(what: &str, name: &str, max: usize) -> Result<(), Rejected> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Rejected::Invalid(format!(
            "{what} {name:?} must be 1-{max} characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
        )))
    }
}

/// Longest hub name.
pub const MAX_NODE_NAME: usize = 64;

/// Checks what a joining hub says about itself: a name of 1–64 printable characters, a mesh
/// address that parses and an API address that parses or is empty. Checked by the member that
/// admits it, not by `apply` (entries admitted before this rule existed must replay alike).
pub fn validate_joiner(node: &NodeRecord) -> Result<(), Rejected> {
    let name_ok = !node.name.is_empty() && node.name.len() <= MAX_NODE_NAME && !node.name.chars().any(char::is_control);
    if !name_ok {
        return Err(Rejected::Invalid(format!("a hub name must be 1-{MAX_NODE_NAME} printable characters")));
    }
    for (what, addr) in [("API", &node.api_addr), ("mesh", &node.mesh_addr)] {
        if !(what == "API" && addr.is_empty()) && addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Rejected::Invalid(format!("the joiner's {what} address is not host:port")));
        }
    }
    Ok(())
}

impl ClusterState {
    /// Whether `AdmitNode` of `node` with this token would be accepted at `at_ms`: the token
    /// exists, is neither revoked nor expired, its secret matches and the id is free. A member
    /// checks this (and [`validate_joiner`]) before it signs or proposes anything for a joiner.
    pub fn check_admission(
        &self,
        node: &NodeRecord,
        token_id: &str,
        secret_hash: &str,
        at_ms: u64,
    ) -> Result<(), Rejected> {
        let t = self.tokens.get(token_id).ok_or_else(|| Rejected::BadToken("unknown token".into()))?;
        if t.revoked {
            return Err(Rejected::BadToken("the token was revoked".into()));
        }
        if t.expires_ms <= at_ms {
            return Err(Rejected::BadToken("the token has expired".into()));
        }
        if t.secret_hash != secret_hash {
            return Err(Rejected::BadToken("wrong secret".into()));
        }
        if node.id.0 == 0 || self.nodes.contains_key(&node.id) || self.removed.contains(&node.id) {
            return Err(Rejected::NodeIdTaken(node.id));
        }
        self.check_key_free(node)
    }

    /// A hub's key (its gossip identity) is its own: no other hub may record it.
    fn check_key_free(&self, node: &NodeRecord) -> Result<(), Rejected> {
        match self
            .nodes
            .values()
            .find(|n| n.id != node.id && !node.public_key.is_empty() && n.public_key == node.public_key)
        {
            Some(other) => Err(Rejected::Invalid(format!("that public key belongs to hub {}", other.id))),
            None => Ok(()),
        }
    }

    /// Whether the state says hub `node` is up.
    pub fn is_up(&self, node: NodeId) -> bool {
        self.nodes.get(&node).is_some_and(|n| n.status == NodeStatus::Up)
    }

    /// Applies one command. Deterministic; on `Err` the state is unchanged.
    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        match cmd {
            Command::RegisterNode { node } => {
                if self.removed.contains(&node.id) {
                    return Err(Rejected::Removed(node.id));
                }
                // A hub's key is fixed once known (admitted with it, or first registered), and no
                // other hub's.
                let known = self.nodes.get(&node.id).map(|n| n.public_key.as_str()).filter(|k| !k.is_empty());
                if known.is_some_and(|k| k != node.public_key) {
                    return Err(Rejected::Invalid(format!("hub {}'s key never changes", node.id)));
                }
                self.check_key_free(node)?;
                self.nodes.insert(node.id, node.clone());
                Ok(Outcome::NodeRegistered)
            }
            Command::DeployTask { spec, mode, at_ms } => self.deploy(spec, *mode, *at_ms),
            Command::BeginMigration { task, instance, id, from, to, expected, reason, at_ms } => {
                let m = MigrationRecord {
                    id: *id,
                    instance: *instance,
                    from: *from,
                    to: *to,
                    epoch: *expected,
                    reason: *reason,
                    started_ms: *at_ms,
                };
                self.begin_migration(task, m)
            }
            Command::CommitMigration { task, id, expected, checkpoint, based_on, stats, at_ms } => {
                self.commit_migration(task, *id, *expected, checkpoint.as_ref(), *based_on, *stats, *at_ms)
            }
            Command::AbortMigration { task, id, why, at_ms } => self.abort_migration(task, *id, why, *at_ms),
            Command::AnnotateMigration { task, epoch, pause_us } => self.annotate_migration(task, *epoch, *pause_us),
            Command::DeleteTask { name } => {
                self.tasks.remove(name).ok_or_else(|| Rejected::NoSuchTask(name.clone()))?;
                Ok(Outcome::Deleted)
            }
            Command::PlaceInstance { task, instance, node, expected } => self.place(task, *instance, *node, *expected),
            Command::SetHolders { task, holders } => {
                let t = self.tasks.get_mut(task).ok_or_else(|| Rejected::NoSuchTask(task.clone()))?;
                // The host is never its own holder (a plan made before a re-placement may say so).
                let host = t.instances.get(&0).map(|p| p.node);
                t.holders = holders.iter().copied().filter(|h| Some(*h) != host).collect();
                Ok(Outcome::HoldersSet)
            }
            Command::CommitCheckpoint { task, record, based_on } => self.commit_checkpoint(task, record, *based_on),
            Command::AddCheckpointCopies { task, epoch, sequence, nodes } => {
                let t = self.tasks.get_mut(task).ok_or_else(|| Rejected::NoSuchTask(task.clone()))?;
                let Some(c) = t.checkpoint.as_mut().filter(|c| c.epoch == *epoch && c.sequence == *sequence) else {
                    return Err(Rejected::Invalid("that checkpoint is no longer the committed one".into()));
                };
                for n in nodes {
                    if !c.stored_on.contains(n) {
                        c.stored_on.push(*n);
                    }
                }
                Ok(Outcome::CopiesAdded)
            }
            Command::Note { at_ms, reason } => {
                self.note = Some((*at_ms, reason.clone()));
                Ok(Outcome::Noop)
            }
            Command::SetCa { ca } => {
                if self.ca.is_some() {
                    return Err(Rejected::Invalid("the mesh already has a CA".into()));
                }
                self.ca = Some(ca.clone());
                Ok(Outcome::CaSet)
            }
            Command::CreateToken { id, secret_hash, expires_ms, at_ms } => {
                if self.tokens.contains_key(id) {
                    return Err(Rejected::Invalid(format!("token {id} exists")));
                }
                // Expired tokens are forgotten when a new one is made, so the map stays small.
                self.tokens.retain(|_, t| t.expires_ms > *at_ms && !t.revoked);
                let token = TokenRecord {
                    secret_hash: secret_hash.clone(),
                    created_ms: *at_ms,
                    expires_ms: *expires_ms,
                    revoked: false,
                };
                self.tokens.insert(id.clone(), token);
                Ok(Outcome::TokenCreated)
            }
            Command::SetNodeStatus { node, status } => {
                let n = self.nodes.get_mut(node).ok_or(Rejected::NoSuchNode(*node))?;
                n.status = *status;
                Ok(Outcome::StatusSet)
            }
            Command::RemoveNode { node } => {
                let n = self.nodes.remove(node).ok_or(Rejected::NoSuchNode(*node))?;
                self.removed.insert(*node);
                if !n.cert_fingerprint.is_empty() {
                    self.revoked.insert(n.cert_fingerprint);
                }
                // Its admin.token goes with it (registered as `hub-<id>` by the hub itself).
                if let Some(t) = self.api_tokens.get_mut(&hub_token_name(*node)) {
                    t.revoked = true;
                }
                // A migration to or from it cannot finish.
                for t in self.tasks.values_mut() {
                    if t.migration.is_some_and(|m| m.from == *node || m.to == *node) {
                        t.migration = None;
                    }
                }
                Ok(Outcome::NodeRemoved)
            }
            Command::RevokeToken { id } => {
                let t = self.tokens.get_mut(id).ok_or_else(|| Rejected::BadToken(format!("no token {id}")))?;
                t.revoked = true;
                Ok(Outcome::TokenRevoked)
            }
            Command::AdmitNode { node, token_id, secret_hash, at_ms } => {
                self.check_admission(node, token_id, secret_hash, *at_ms)?;
                self.nodes.insert(node.id, node.clone());
                Ok(Outcome::Admitted)
            }
            Command::CreateApiToken { name, record } => self.create_api_token(name, record),
            Command::RevokeApiToken { name } => self.revoke_api_token(name),
            Command::Batch(cmds) => {
                if cmds.iter().any(|c| matches!(c, Command::Batch(_))) {
                    return Err(Rejected::Invalid("batches do not nest".into()));
                }
                let out = Outcome::Batch(cmds.iter().map(|c| self.apply(c)).collect());
                self.note = None;
                Ok(out)
            }
        }
    }

    fn next_epoch(&mut self) -> Epoch {
        self.last_epoch = Epoch(self.last_epoch.0 + 1);
        self.last_epoch
    }

    fn deploy(&mut self, spec: &TaskSpec, mode: DeployMode, at_ms: u64) -> CommandResult {
        validate_task_name(&spec.name)?;
        if spec.replicas == 0 || (spec.kind == TaskKind::Stateful && spec.replicas != 1) {
            return Err(Rejected::Invalid(
                "a stateful task has exactly one instance; a stateless one at least one".into(),
            ));
        }
        if spec.limits.memory_bytes == 0 || spec.limits.timeout_ms == 0 {
            return Err(Rejected::Invalid("memory and timeout limits must be positive".into()));
        }
        match (mode, self.tasks.contains_key(&spec.name)) {
            (DeployMode::Create, true) => Err(Rejected::TaskExists(spec.name.clone())),
            (DeployMode::Update, false) => Err(Rejected::NoSuchTask(spec.name.clone())),
            (DeployMode::Create, false) => {
                let record = TaskRecord {
                    spec: spec.clone(),
                    version: 1,
                    created_ms: at_ms,
                    updated_ms: at_ms,
                    instances: BTreeMap::new(),
                    holders: Vec::new(),
                    checkpoint: None,
                    history: Vec::new(),
                    migration: None,
                };
                self.tasks.insert(spec.name.clone(), record);
                Ok(Outcome::Deployed { version: 1, created: true })
            }
            (DeployMode::Update, true) => {
                let mut record = self.tasks.remove(&spec.name).expect("checked: the task exists");
                if record.spec.module_hash != spec.module_hash {
                    // The saved state belongs to the old module.
                    record.checkpoint = None;
                }
                record.spec = spec.clone();
                record.version += 1;
                record.updated_ms = at_ms;
                // The new epochs fence a migration's source as well.
                record.migration = None;
                // New epochs fence the instances that still run the old version.
                let nodes: Vec<(u32, NodeId)> = record.instances.iter().map(|(i, p)| (*i, p.node)).collect();
                for (i, node) in nodes {
                    let epoch = self.next_epoch();
                    record.instances.insert(i, Placement { node, epoch });
                }
                let version = record.version;
                self.tasks.insert(spec.name.clone(), record);
                Ok(Outcome::Deployed { version, created: false })
            }
        }
    }

    fn place(&mut self, task: &str, instance: u32, node: NodeId, expected: Option<Epoch>) -> CommandResult {
        if !self.nodes.contains_key(&node) {
            return Err(Rejected::NoSuchNode(node));
        }
        let record = self.tasks.get(task).ok_or_else(|| Rejected::NoSuchTask(task.to_owned()))?;
        if !record.spec.wanted().contains(&instance) {
            return Err(Rejected::NoSuchInstance { task: task.to_owned(), instance });
        }
        let current = record.instances.get(&instance).map(|p| p.epoch);
        if current != expected {
            return Err(Rejected::StaleEpoch { current });
        }
        let epoch = self.next_epoch();
        let (at_ms, reason) = self.note.clone().unwrap_or((0, "placed".into()));
        let record = self.tasks.get_mut(task).expect("checked: the task exists");
        record.instances.insert(instance, Placement { node, epoch });
        // The new host must not keep its own checkpoints: it already has the state.
        record.holders.retain(|h| *h != node);
        // A re-placement (failover, drain, labels) fences a migration of this instance.
        if record.migration.is_some_and(|m| m.instance == instance) {
            record.migration = None;
        }
        let from_sequence = record.checkpoint.as_ref().map(|c| c.sequence);
        record.push_history(HistoryEvent { at_ms, instance, node, epoch, reason, from_sequence, migration: None });
        Ok(Outcome::Placed { epoch })
    }

    fn commit_checkpoint(&mut self, task: &str, record: &CheckpointRecord, based_on: Option<BasedOn>) -> CommandResult {
        let t = self.tasks.get_mut(task).ok_or_else(|| Rejected::NoSuchTask(task.to_owned()))?;
        check_checkpoint(task, t, record, based_on)?;
        t.checkpoint = Some(record.clone());
        Ok(Outcome::Committed)
    }

    /// The placement of `task`'s instance `instance`, if placed.
    pub fn placement(&self, task: &str, instance: u32) -> Option<Placement> {
        self.tasks.get(task)?.instances.get(&instance).copied()
    }
}

/// Whether `record` may become `t`'s committed checkpoint: a stateful task's, written at the
/// instance's current epoch by the current version, newer than the committed one and — when
/// `based_on` is given — built on it.
fn check_checkpoint(
    task: &str,
    t: &TaskRecord,
    record: &CheckpointRecord,
    based_on: Option<BasedOn>,
) -> Result<(), Rejected> {
    if t.spec.kind != TaskKind::Stateful {
        return Err(Rejected::Invalid(format!("task {task:?} is stateless")));
    }
    let current = t.instances.get(&0).map(|p| p.epoch);
    if current != Some(record.epoch) || record.version != t.version {
        return Err(Rejected::StaleEpoch { current });
    }
    if t.checkpoint.as_ref().is_some_and(|c| (c.epoch, c.sequence) >= (record.epoch, record.sequence)) {
        return Err(Rejected::Invalid("the checkpoint is not newer than the committed one".into()));
    }
    let committed = t.checkpoint.as_ref().map(|c| (c.epoch, c.sequence));
    if let Some(b) = based_on.filter(|b| b.checkpoint != committed) {
        return Err(Rejected::NotBasedOnCommitted { based_on: b.checkpoint, committed });
    }
    Ok(())
}

impl TaskRecord {
    /// Appends a history event, forgetting the oldest beyond [`MAX_HISTORY`].
    fn push_history(&mut self, event: HistoryEvent) {
        self.history.push(event);
        if self.history.len() > MAX_HISTORY {
            self.history.remove(0);
        }
    }
}

#[cfg(test)]
mod tests;
