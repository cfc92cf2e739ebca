//! The records the replicated state is made of: hubs, tasks with their placements and committed
//! checkpoints, join tokens. Plain data; [`super::ClusterState::apply`] changes them.

use std::collections::BTreeMap;

use hubmesh_storage::Hash;
use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, NodeId};

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
    /// Never moved off its hub by the overload policy or after its device (`task deploy --pin`);
    /// an operator's migration, a drain or a failover still moves it.
    #[serde(default)]
    pub pinned: bool,
    /// Placed only on hubs that see this LAN device (`task deploy --near`, a device id of the
    /// gossiped registry), preferring the one that saw it last; moved (failover, migration) only
    /// to such hubs. The registry is not replicated: the leader judges by its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near: Option<String>,
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

    /// Where live migration `id` of this task stands in this state (the source and the target
    /// each read it from their own applied state).
    pub fn migration_outcome(&self, id: u64) -> MigrationOutcome {
        if self.migration.is_some_and(|m| m.id == id) {
            return MigrationOutcome::Underway;
        }
        let committed =
            self.history.iter().rev().find(|h| h.migration.as_ref().is_some_and(|m| m.id == id && m.aborted.is_none()));
        match committed {
            Some(h) => MigrationOutcome::Moved(Placement { node: h.node, epoch: h.epoch }),
            None => MigrationOutcome::NotMoved,
        }
    }
}

/// Where a live migration stands: its begin and its commit or abort exclude each other, so once
/// it is not underway it either moved the task (to that placement) or never will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationOutcome {
    /// Begun, neither committed nor aborted yet.
    Underway,
    /// Committed: the instance went to this placement.
    Moved(Placement),
    /// Aborted, fenced by a re-placement, or never begun here (or its event is older than the
    /// kept history).
    NotMoved,
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
    /// A live migration in progress, between `BeginMigration` and its commit or abort.
    #[serde(default)]
    pub migration: Option<MigrationRecord>,
}

/// Events kept per task.
pub const MAX_HISTORY: usize = 64;

/// Why a task is being moved while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationReason {
    /// An operator asked (`task migrate`).
    Manual,
    /// Its hub is being drained.
    Drain,
    /// Its hub is overloaded.
    Overload,
    /// It runs near a device its hub no longer sees, and another hub does.
    Device,
}

impl MigrationReason {
    /// The word `task history` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::Drain => "drain",
            Self::Overload => "overload",
            Self::Device => "device",
        }
    }
}

/// A live migration the mesh has agreed to try: the source (`from`) keeps the authority over the
/// instance until `CommitMigration` switches it to `to`; `AbortMigration` ends it without a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// Chosen by the source; a commit or abort must name it.
    pub id: u64,
    pub instance: u32,
    pub from: NodeId,
    pub to: NodeId,
    /// The instance's epoch when the migration began (the source's).
    pub epoch: Epoch,
    pub reason: MigrationReason,
    pub started_ms: u64,
}

/// What a committed migration cost, as its source measured it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStats {
    /// Pre-copy rounds, the final one included.
    pub rounds: u32,
    /// Page bytes sent to the target.
    pub bytes: u64,
    /// From the begin to the freeze.
    pub precopy_ms: u64,
    /// From the freeze until the target served and the source had released the calls it held;
    /// filled in by `AnnotateMigration`.
    pub pause_us: Option<u64>,
}

/// How a history event's instance got there when it was live-migrated, or why a migration of it
/// was given up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationEvent {
    pub id: u64,
    pub reason: MigrationReason,
    pub from: NodeId,
    pub to: NodeId,
    /// The source's epoch.
    pub from_epoch: Epoch,
    pub stats: MigrationStats,
    /// Set when the migration was aborted: why (the event then records no move).
    pub aborted: Option<String>,
}

/// A change of where a task's instance runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEvent {
    pub at_ms: u64,
    pub instance: u32,
    pub node: NodeId,
    pub epoch: Epoch,
    /// `placed`, `failover` (its hub was down), `moved` (drain, labels), `updated`, or for a
    /// live migration `manual`, `drain`, `overload`, `device` (or `aborted`, which moved nothing).
    pub reason: String,
    /// The checkpoint sequence the instance starts from, if any.
    pub from_sequence: Option<u64>,
    /// Set for a live migration (committed or aborted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationEvent>,
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
    /// Its gossip (libp2p, TCP) address, as it reports it.
    #[serde(default)]
    pub gossip_addr: String,
    /// Hex of its Ed25519 public key: the key its mesh certificate was issued for, and the one
    /// its libp2p PeerId derives from. Set when it is admitted (or, for the hub that started
    /// the mesh, when it first registers) and never changed after.
    #[serde(default)]
    pub public_key: String,
}

fn unlimited() -> u64 {
    u64::MAX
}

/// A join token as the mesh remembers it: only a hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub revoked: bool,
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiScope {
    /// Every route of the API.
    Admin,
    /// Only invoking tasks: all of them, or the ones the record names.
    Invoke,
}

/// An API token as the mesh remembers it: a hash of the token, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    /// Hex SHA-256 of the whole token.
    pub token_hash: String,
    pub scope: ApiScope,
    /// For `Invoke`: the tasks it may invoke; empty for all.
    pub tasks: Vec<String>,
    pub created_ms: u64,
    /// When it stops working; `u64::MAX` for never.
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
