//! `ClusterState`: everything the hubs agree on, and the commands that change it.
//!
//! [`ClusterState::apply`] is a pure function of the state and one command. It validates before
//! it mutates, so a rejected command changes nothing. Time comes in the command (stamped by the
//! proposer), never from the clock of the hub applying it.

use std::collections::BTreeMap;

use hubmesh_storage::Hash;
use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, NodeId};
use crate::tls::CaMaterial;

/// Whether a task keeps memory across invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskKind {
    /// One instance, memory persists, invocations run one at a time.
    Stateful,
    /// Interchangeable instances, invocations run concurrently.
    Stateless,
}

/// How a stateful task's state is checkpointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointPolicy {
    /// Never: the state lives in memory only.
    None,
    /// Every `every_ms` milliseconds while the state changes.
    Periodic { every_ms: u64 },
    /// Before each answer.
    Durable,
}

/// Per-task resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: u64,
    pub timeout_ms: u64,
    pub max_input_bytes: u64,
    pub max_output_bytes: u64,
    pub queue: u32,
}

/// What a user deployed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub name: String,
    pub kind: TaskKind,
    /// The module as run (instrumented by the hub that accepted the deploy).
    pub module_hash: Hash,
    /// The module as uploaded.
    pub source_hash: Hash,
    pub limits: Limits,
    pub checkpoint: CheckpointPolicy,
    /// Interval of `hm_tick`, if the module exports it.
    pub tick_ms: Option<u64>,
    /// Placement constraints: only hubs whose labels include all of these qualify.
    #[serde(default)]
    pub constraints: BTreeMap<String, String>,
    /// Instances of a stateless task, each on its own hub (a stateful task has exactly 1).
    #[serde(default = "one")]
    pub replicas: u32,
    /// Hubs besides the host that keep each checkpoint of a stateful task (`--replicas-state`).
    #[serde(default = "two")]
    pub state_replicas: u32,
}

fn one() -> u32 {
    1
}

fn two() -> u32 {
    2
}

/// The last checkpoint of a stateful task that the mesh has committed: the state a failover
/// restores. Its key in every page log is [`CheckpointRecord::key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The task version whose module wrote it.
    pub version: u64,
    /// The placement epoch of the instance that wrote it.
    pub epoch: Epoch,
    pub sequence: u64,
    /// blake3 of the encoded manifest.
    pub manifest_hash: Hash,
    /// Hubs that hold the manifest and all its pages (the writing host first).
    pub stored_on: Vec<NodeId>,
    /// Bytes of the pages the manifest refers to.
    pub size_bytes: u64,
    pub at_ms: u64,
}

impl CheckpointRecord {
    /// The page-log key of this checkpoint's manifest.
    pub fn key(&self, task: &str) -> String {
        checkpoint_key(task, self.epoch, self.sequence)
    }
}

/// The page-log key of the manifest of `task` written at `epoch` with `sequence`.
pub fn checkpoint_key(task: &str, epoch: Epoch, sequence: u64) -> String {
    format!("{task}/{}/{sequence}", epoch.0)
}

/// Splits a page-log key made by [`checkpoint_key`].
pub fn parse_checkpoint_key(key: &str) -> Option<(&str, Epoch, u64)> {
    let mut parts = key.rsplitn(3, '/');
    let sequence = parts.next()?.parse().ok()?;
    let epoch = Epoch(parts.next()?.parse().ok()?);
    Some((parts.next()?, epoch, sequence))
}

impl TaskSpec {
    /// The placements of the instances that should exist (index < replicas).
    pub fn wanted(&self) -> std::ops::Range<u32> {
        0..self.replicas.max(1)
    }
}

impl TaskRecord {
    /// Placements of the wanted instances, by index.
    pub fn placements(&self) -> impl Iterator<Item = (u32, Placement)> + '_ {
        let wanted = self.spec.wanted();
        self.instances.iter().filter(move |(i, _)| wanted.contains(i)).map(|(i, p)| (*i, *p))
    }
}

/// Where an instance runs, with its fencing epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub node: NodeId,
    pub epoch: Epoch,
}

/// A task with its version history and placements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub spec: TaskSpec,
    /// 1 on creation, +1 per explicit update.
    pub version: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Instance index -> placement. A stateful task has the single instance 0.
    pub instances: BTreeMap<u32, Placement>,
    /// Hubs the leader chose to keep this task's checkpoints (never its host).
    #[serde(default)]
    pub holders: Vec<NodeId>,
    /// The last committed checkpoint.
    #[serde(default)]
    pub checkpoint: Option<CheckpointRecord>,
    /// Placements and failovers, oldest first (the last [`MAX_HISTORY`]).
    #[serde(default)]
    pub history: Vec<HistoryEvent>,
}

/// Events kept per task.
pub const MAX_HISTORY: usize = 32;

/// A change of where a task's instance runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEvent {
    pub at_ms: u64,
    pub instance: u32,
    pub node: NodeId,
    pub epoch: Epoch,
    /// `placed`, `failover` (its hub was down), `moved` (drain, labels) or `updated`.
    pub reason: String,
    /// The checkpoint sequence the instance starts from, if any.
    pub from_sequence: Option<u64>,
}

/// Health of a hub as the leader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    Up,
    Suspect,
    Down,
    Draining,
}

/// A hub of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    pub api_addr: String,
    /// Its mesh (QUIC) address.
    #[serde(default)]
    pub mesh_addr: String,
    pub labels: BTreeMap<String, String>,
    /// How many instances the hub offers to run.
    pub slots: u32,
    /// Memory the hub offers to task instances: the sum of their memory caps stays below it.
    #[serde(default = "unlimited")]
    pub memory_bytes: u64,
    /// A witness votes but never runs tasks.
    #[serde(default)]
    pub witness: bool,
    /// Hex SHA-256 of the hub's mesh certificate (revoked when the hub is removed).
    #[serde(default)]
    pub cert_fingerprint: String,
    pub status: NodeStatus,
}

fn unlimited() -> u64 {
    u64::MAX
}

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
    pub tokens: BTreeMap<String, JoinToken>,
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

/// A join token as the mesh remembers it: only a hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub revoked: bool,
}

/// The committed checkpoint a new one was built on: `(epoch, sequence)`, or none at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasedOn {
    pub checkpoint: Option<(Epoch, u64)>,
}

/// Whether a deploy creates a task or replaces an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployMode {
    /// The name must be free.
    Create,
    /// The task must exist; it gets a new version and its instances new epochs.
    Update,
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
    Committed,
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
}

/// The state machine's answer to one command.
pub type CommandResult = Result<Outcome, Rejected>;

/// Longest task name; names are also used in URLs and file names.
pub const MAX_TASK_NAME: usize = 64;

/// Checks a task name: 1–64 characters of `[a-z0-9_-]`, starting with a letter or digit.
pub fn validate_task_name(name: &str) -> Result<(), Rejected> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TASK_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Rejected::Invalid(format!(
            "task name {name:?} must be 1-{MAX_TASK_NAME} characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
        )))
    }
}

impl ClusterState {
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
                self.nodes.insert(node.id, node.clone());
                Ok(Outcome::NodeRegistered)
            }
            Command::DeployTask { spec, mode, at_ms } => self.deploy(spec, *mode, *at_ms),
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
                Ok(Outcome::NodeRegistered)
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
                Ok(Outcome::Committed)
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
                let token = JoinToken {
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
                Ok(Outcome::NodeRegistered)
            }
            Command::RemoveNode { node } => {
                let n = self.nodes.remove(node).ok_or(Rejected::NoSuchNode(*node))?;
                self.removed.insert(*node);
                if !n.cert_fingerprint.is_empty() {
                    self.revoked.insert(n.cert_fingerprint);
                }
                Ok(Outcome::NodeRegistered)
            }
            Command::RevokeToken { id } => {
                let t = self.tokens.get_mut(id).ok_or_else(|| Rejected::BadToken(format!("no token {id}")))?;
                t.revoked = true;
                Ok(Outcome::TokenRevoked)
            }
            Command::AdmitNode { node, token_id, secret_hash, at_ms } => {
                let t = self.tokens.get(token_id).ok_or_else(|| Rejected::BadToken("unknown token".into()))?;
                if t.revoked {
                    return Err(Rejected::BadToken("the token was revoked".into()));
                }
                if t.expires_ms <= *at_ms {
                    return Err(Rejected::BadToken("the token has expired".into()));
                }
                if &t.secret_hash != secret_hash {
                    return Err(Rejected::BadToken("wrong secret".into()));
                }
                if node.id.0 == 0 || self.nodes.contains_key(&node.id) || self.removed.contains(&node.id) {
                    return Err(Rejected::NodeIdTaken(node.id));
                }
                self.nodes.insert(node.id, node.clone());
                Ok(Outcome::Admitted)
            }
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
        let from_sequence = record.checkpoint.as_ref().map(|c| c.sequence);
        record.history.push(HistoryEvent { at_ms, instance, node, epoch, reason, from_sequence });
        if record.history.len() > MAX_HISTORY {
            record.history.remove(0);
        }
        Ok(Outcome::Placed { epoch })
    }

    fn commit_checkpoint(&mut self, task: &str, record: &CheckpointRecord, based_on: Option<BasedOn>) -> CommandResult {
        let t = self.tasks.get_mut(task).ok_or_else(|| Rejected::NoSuchTask(task.to_owned()))?;
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
        t.checkpoint = Some(record.clone());
        Ok(Outcome::Committed)
    }

    /// The placement of `task`'s instance `instance`, if placed.
    pub fn placement(&self, task: &str, instance: u32) -> Option<Placement> {
        self.tasks.get(task)?.instances.get(&instance).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64) -> NodeRecord {
        NodeRecord {
            id: NodeId(id),
            name: format!("hub{id}"),
            api_addr: "127.0.0.1:7070".into(),
            mesh_addr: String::new(),
            labels: BTreeMap::new(),
            slots: 100,
            memory_bytes: u64::MAX,
            witness: false,
            cert_fingerprint: String::new(),
            status: NodeStatus::Up,
        }
    }

    fn spec(name: &str, kind: TaskKind) -> TaskSpec {
        TaskSpec {
            name: name.into(),
            kind,
            module_hash: Hash::of(name.as_bytes()),
            source_hash: Hash::of(b"src"),
            limits: Limits {
                memory_bytes: 1 << 20,
                timeout_ms: 1000,
                max_input_bytes: 1024,
                max_output_bytes: 1024,
                queue: 8,
            },
            checkpoint: CheckpointPolicy::None,
            tick_ms: None,
            constraints: BTreeMap::new(),
            replicas: 1,
            state_replicas: 2,
        }
    }

    fn deploy(name: &str, mode: DeployMode) -> Command {
        Command::DeployTask { spec: spec(name, TaskKind::Stateful), mode, at_ms: 5 }
    }

    #[test]
    fn a_checkpoint_must_be_built_on_the_committed_one() {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
        s.apply(&deploy("t", DeployMode::Create)).unwrap();
        let place = Command::PlaceInstance { task: "t".into(), instance: 0, node: NodeId(1), expected: None };
        let Outcome::Placed { epoch: e1 } = s.apply(&place).unwrap() else { panic!() };
        let rec = |epoch, sequence| CheckpointRecord {
            version: 1,
            epoch,
            sequence,
            manifest_hash: Hash::of(b"m"),
            stored_on: vec![NodeId(1)],
            size_bytes: 65536,
            at_ms: 9,
        };
        let based = |r, on| Command::CommitCheckpoint {
            task: "t".into(),
            record: r,
            based_on: Some(BasedOn { checkpoint: on }),
        };
        assert_eq!(s.apply(&based(rec(e1, 1), None)), Ok(Outcome::Committed));
        // Built on nothing, or on an older checkpoint, while (e1, 1) is committed: a host that
        // restarted from a lagging view. Refused, whatever its sequence.
        for stale in [None, Some((e1, 0))] {
            assert!(
                matches!(s.apply(&based(rec(e1, 2), stale)), Err(Rejected::NotBasedOnCommitted { .. })),
                "{stale:?}"
            );
            assert!(matches!(s.apply(&based(rec(e1, 9), stale)), Err(Rejected::NotBasedOnCommitted { .. })));
        }
        assert_eq!(s.apply(&based(rec(e1, 2), Some((e1, 1)))), Ok(Outcome::Committed));
        assert_eq!(s.tasks["t"].checkpoint.as_ref().map(|c| c.sequence), Some(2));
    }

    #[test]
    fn checkpoints_commit_only_from_the_current_epoch_and_in_order() {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
        s.apply(&Command::RegisterNode { node: node(2) }).unwrap();
        s.apply(&deploy("t", DeployMode::Create)).unwrap();
        let place =
            |node, expected| Command::PlaceInstance { task: "t".into(), instance: 0, node: NodeId(node), expected };
        let Outcome::Placed { epoch: e1 } = s.apply(&place(1, None)).unwrap() else { panic!() };
        let rec = |epoch, sequence| CheckpointRecord {
            version: 1,
            epoch,
            sequence,
            manifest_hash: Hash::of(b"m"),
            stored_on: vec![NodeId(1), NodeId(2)],
            size_bytes: 65536,
            at_ms: 9,
        };
        let commit = |r| Command::CommitCheckpoint { task: "t".into(), record: r, based_on: None };
        assert_eq!(s.apply(&commit(rec(e1, 1))), Ok(Outcome::Committed));
        assert!(matches!(s.apply(&commit(rec(e1, 1))), Err(Rejected::Invalid(_))), "not newer");
        s.apply(&Command::SetHolders { task: "t".into(), holders: vec![NodeId(2)] }).unwrap();
        // Failover: the new host (a holder) gets a new epoch and leaves the holder list.
        s.apply(&Command::Batch(vec![Command::Note { at_ms: 77, reason: "failover".into() }, place(2, Some(e1))]))
            .unwrap();
        let t = &s.tasks["t"];
        assert!(t.holders.is_empty());
        let last = t.history.last().unwrap();
        assert_eq!((last.at_ms, last.reason.as_str(), last.from_sequence), (77, "failover", Some(1)));
        assert_eq!(s.note, None);
        let before = s.clone();
        // The old host, cut off, tries to commit at its old epoch: refused, nothing changes.
        assert!(matches!(s.apply(&commit(rec(e1, 2))), Err(Rejected::StaleEpoch { .. })));
        assert_eq!(s, before);
        let e2 = s.placement("t", 0).unwrap().epoch;
        assert_eq!(s.apply(&commit(rec(e2, 2))), Ok(Outcome::Committed));
        assert_eq!(s.tasks["t"].checkpoint.as_ref().unwrap().key("t"), format!("t/{}/2", e2.0));
        assert_eq!(parse_checkpoint_key("t/5/2"), Some(("t", Epoch(5), 2)));
        assert_eq!(parse_checkpoint_key("t"), None);
    }

    #[test]
    fn create_then_second_create_is_rejected_and_changes_nothing() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(&deploy("counter", DeployMode::Create)),
            Ok(Outcome::Deployed { version: 1, created: true })
        );
        let before = s.clone();
        assert_eq!(s.apply(&deploy("counter", DeployMode::Create)), Err(Rejected::TaskExists("counter".into())));
        assert_eq!(s, before);
    }

    #[test]
    fn update_bumps_version_and_epochs() {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
        s.apply(&deploy("c", DeployMode::Create)).unwrap();
        let placed =
            s.apply(&Command::PlaceInstance { task: "c".into(), instance: 0, node: NodeId(1), expected: None });
        assert_eq!(placed, Ok(Outcome::Placed { epoch: Epoch(1) }));
        assert_eq!(s.apply(&deploy("c", DeployMode::Update)), Ok(Outcome::Deployed { version: 2, created: false }));
        assert_eq!(s.placement("c", 0), Some(Placement { node: NodeId(1), epoch: Epoch(2) }));
        assert_eq!(s.apply(&deploy("nope", DeployMode::Update)), Err(Rejected::NoSuchTask("nope".into())));
    }

    #[test]
    fn placement_with_a_stale_epoch_is_rejected() {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
        s.apply(&deploy("c", DeployMode::Create)).unwrap();
        let place = |expected| Command::PlaceInstance { task: "c".into(), instance: 0, node: NodeId(1), expected };
        s.apply(&place(None)).unwrap();
        let before = s.clone();
        assert_eq!(s.apply(&place(None)), Err(Rejected::StaleEpoch { current: Some(Epoch(1)) }));
        assert_eq!(s, before);
        assert_eq!(s.apply(&place(Some(Epoch(1)))), Ok(Outcome::Placed { epoch: Epoch(2) }));
        let bad_node =
            Command::PlaceInstance { task: "c".into(), instance: 0, node: NodeId(9), expected: Some(Epoch(2)) };
        assert_eq!(s.apply(&bad_node), Err(Rejected::NoSuchNode(NodeId(9))));
    }

    #[test]
    fn epochs_never_repeat_across_delete_and_recreate() {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
        s.apply(&deploy("c", DeployMode::Create)).unwrap();
        let place = Command::PlaceInstance { task: "c".into(), instance: 0, node: NodeId(1), expected: None };
        assert_eq!(s.apply(&place), Ok(Outcome::Placed { epoch: Epoch(1) }));
        s.apply(&Command::DeleteTask { name: "c".into() }).unwrap();
        s.apply(&deploy("c", DeployMode::Create)).unwrap();
        assert_eq!(s.apply(&place), Ok(Outcome::Placed { epoch: Epoch(2) }));
    }

    #[test]
    fn bad_names_and_nested_batches_are_rejected() {
        let mut s = ClusterState::default();
        for bad in ["", "Caps", "-lead", "a/b", &"x".repeat(65)] {
            let cmd = Command::DeployTask { spec: spec(bad, TaskKind::Stateless), mode: DeployMode::Create, at_ms: 0 };
            assert!(matches!(s.apply(&cmd), Err(Rejected::Invalid(_))), "{bad:?}");
        }
        let nested = Command::Batch(vec![Command::Batch(vec![])]);
        assert!(matches!(s.apply(&nested), Err(Rejected::Invalid(_))));
        assert_eq!(s, ClusterState::default());
    }

    #[test]
    fn batch_results_are_per_command() {
        let mut s = ClusterState::default();
        let out = s.apply(&Command::Batch(vec![deploy("a", DeployMode::Create), deploy("a", DeployMode::Create)]));
        assert_eq!(
            out,
            Ok(Outcome::Batch(vec![
                Ok(Outcome::Deployed { version: 1, created: true }),
                Err(Rejected::TaskExists("a".into()))
            ]))
        );
    }
}

#[cfg(test)]
mod join_tests {
    use super::*;

    fn node(id: u64) -> NodeRecord {
        NodeRecord {
            id: NodeId(id),
            name: format!("hub{id}"),
            api_addr: String::new(),
            mesh_addr: "127.0.0.1:1".into(),
            labels: BTreeMap::new(),
            slots: 1,
            memory_bytes: u64::MAX,
            witness: false,
            cert_fingerprint: String::new(),
            status: NodeStatus::Up,
        }
    }

    fn admit(id: u64, secret: &str, at_ms: u64) -> Command {
        Command::AdmitNode { node: node(id), token_id: "t1".into(), secret_hash: secret.into(), at_ms }
    }

    #[test]
    fn tokens_admit_until_they_expire_or_are_revoked() {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
        s.apply(&Command::CreateToken { id: "t1".into(), secret_hash: "h".into(), expires_ms: 100, at_ms: 0 }).unwrap();
        let before = s.clone();
        assert!(matches!(s.apply(&admit(2, "wrong", 10)), Err(Rejected::BadToken(m)) if m.contains("secret")));
        assert!(matches!(s.apply(&admit(2, "h", 100)), Err(Rejected::BadToken(m)) if m.contains("expired")));
        assert_eq!(s.apply(&admit(1, "h", 10)), Err(Rejected::NodeIdTaken(NodeId(1))));
        assert_eq!(s, before);
        assert_eq!(s.apply(&admit(2, "h", 10)), Ok(Outcome::Admitted));
        s.apply(&Command::RevokeToken { id: "t1".into() }).unwrap();
        assert!(matches!(s.apply(&admit(3, "h", 10)), Err(Rejected::BadToken(m)) if m.contains("revoked")));
    }

    #[test]
    fn a_removed_hub_is_revoked_and_cannot_come_back() {
        let mut s = ClusterState::default();
        let mut n = node(2);
        n.cert_fingerprint = "ab".repeat(32);
        s.apply(&Command::RegisterNode { node: n.clone() }).unwrap();
        s.apply(&Command::RemoveNode { node: NodeId(2) }).unwrap();
        assert!(s.revoked.contains(&"ab".repeat(32)));
        assert_eq!(s.apply(&Command::RegisterNode { node: n }), Err(Rejected::Removed(NodeId(2))));
        s.apply(&Command::CreateToken { id: "t1".into(), secret_hash: "h".into(), expires_ms: 100, at_ms: 0 }).unwrap();
        assert_eq!(s.apply(&admit(2, "h", 1)), Err(Rejected::NodeIdTaken(NodeId(2))));
        assert_eq!(s.apply(&Command::RemoveNode { node: NodeId(9) }), Err(Rejected::NoSuchNode(NodeId(9))));
    }
}
