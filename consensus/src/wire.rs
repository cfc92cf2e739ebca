//! Conversions between the replicated state's commands and results and their protobuf form
//! (`pb::Command`, `pb::CommandResult`), for proposals a follower forwards to the leader. Every
//! `From<Domain> for pb::X` has a `TryFrom<pb::X>` that refuses what a peer could get wrong
//! (a missing field, an unknown enum value, a hash of the wrong length) with a [`WireError`].

use hubmesh_proto::pb;
use hubmesh_storage::Hash;

use crate::ids::{Epoch, NodeId};
use crate::state::{
    ApiScope, ApiTokenRecord, BasedOn, CheckpointPolicy, CheckpointRecord, Command, CommandResult, DeployMode, Limits,
    MigrationReason, MigrationStats, NodeRecord, NodeStatus, Outcome, Rejected, TaskKind, TaskSpec,
};
use crate::tls::CaMaterial;

/// Why a wire message does not make a command or a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A field the message must have is absent.
    #[error("the message lacks {0}")]
    Missing(&'static str),
    /// An enum field holds a value this hub does not know.
    #[error("unknown {0} value {1}")]
    UnknownValue(&'static str, i32),
    /// A hash is not 32 bytes.
    #[error("a hash is 32 bytes")]
    BadHash,
}

fn hash(raw: &[u8]) -> Result<Hash, WireError> {
    Hash::from_slice(raw).ok_or(WireError::BadHash)
}

fn nodes(ids: &[u64]) -> Vec<NodeId> {
    ids.iter().copied().map(NodeId).collect()
}

fn ids(nodes: &[NodeId]) -> Vec<u64> {
    nodes.iter().map(|n| n.0).collect()
}

impl From<NodeStatus> for pb::NodeStatus {
    fn from(s: NodeStatus) -> Self {
        match s {
            NodeStatus::Up => Self::Up,
            NodeStatus::Suspect => Self::Suspect,
            NodeStatus::Down => Self::Down,
            NodeStatus::Draining => Self::Draining,
        }
    }
}

fn node_status(raw: i32) -> Result<NodeStatus, WireError> {
    match pb::NodeStatus::try_from(raw) {
        Ok(pb::NodeStatus::Up) => Ok(NodeStatus::Up),
        Ok(pb::NodeStatus::Suspect) => Ok(NodeStatus::Suspect),
        Ok(pb::NodeStatus::Down) => Ok(NodeStatus::Down),
        Ok(pb::NodeStatus::Draining) => Ok(NodeStatus::Draining),
        _ => Err(WireError::UnknownValue("node status", raw)),
    }
}

impl From<&NodeRecord> for pb::NodeRecord {
    fn from(n: &NodeRecord) -> Self {
        Self {
            id: n.id.0,
            name: n.name.clone(),
            api_addr: n.api_addr.clone(),
            mesh_addr: n.mesh_addr.clone(),
            labels: n.labels.clone(),
            slots: n.slots,
            memory_bytes: n.memory_bytes,
            witness: n.witness,
            cert_fingerprint: n.cert_fingerprint.clone(),
            status: pb::NodeStatus::from(n.status) as i32,
            gossip_addr: n.gossip_addr.clone(),
            public_key: n.public_key.clone(),
        }
    }
}

impl From<&ApiTokenRecord> for pb::ApiTokenRecord {
    fn from(t: &ApiTokenRecord) -> Self {
        Self {
            token_hash: t.token_hash.clone(),
            scope: match t.scope {
                ApiScope::Admin => pb::ApiScope::Admin,
                ApiScope::Invoke => pb::ApiScope::Invoke,
            } as i32,
            tasks: t.tasks.clone(),
            created_ms: t.created_ms,
            expires_ms: if t.expires_ms == u64::MAX { 0 } else { t.expires_ms },
            revoked: t.revoked,
        }
    }
}

impl TryFrom<pb::ApiTokenRecord> for ApiTokenRecord {
    type Error = WireError;

    fn try_from(t: pb::ApiTokenRecord) -> Result<Self, WireError> {
        let scope = match pb::ApiScope::try_from(t.scope) {
            Ok(pb::ApiScope::Admin) => ApiScope::Admin,
            Ok(pb::ApiScope::Invoke) => ApiScope::Invoke,
            Ok(pb::ApiScope::Unspecified) | Err(_) => return Err(WireError::UnknownValue("API scope", t.scope)),
        };
        Ok(Self {
            token_hash: t.token_hash,
            scope,
            tasks: t.tasks,
            created_ms: t.created_ms,
            expires_ms: if t.expires_ms == 0 { u64::MAX } else { t.expires_ms },
            revoked: t.revoked,
        })
    }
}

impl TryFrom<pb::NodeRecord> for NodeRecord {
    type Error = WireError;

    fn try_from(n: pb::NodeRecord) -> Result<Self, WireError> {
        Ok(Self {
            id: NodeId(n.id),
            name: n.name,
            api_addr: n.api_addr,
            mesh_addr: n.mesh_addr,
            labels: n.labels,
            slots: n.slots,
            memory_bytes: n.memory_bytes,
            witness: n.witness,
            cert_fingerprint: n.cert_fingerprint,
            status: node_status(n.status)?,
            gossip_addr: n.gossip_addr,
            public_key: n.public_key,
        })
    }
}

impl From<&TaskSpec> for pb::TaskSpec {
    fn from(s: &TaskSpec) -> Self {
        let (checkpoint, checkpoint_every_ms) = match s.checkpoint {
            CheckpointPolicy::None => (pb::CheckpointMode::None, 0),
            CheckpointPolicy::Periodic { every_ms } => (pb::CheckpointMode::Periodic, every_ms),
            CheckpointPolicy::Durable => (pb::CheckpointMode::Durable, 0),
        };
        let l = &s.limits;
        Self {
            name: s.name.clone(),
            kind: match s.kind {
                TaskKind::Stateful => pb::TaskKind::Stateful,
                TaskKind::Stateless => pb::TaskKind::Stateless,
            } as i32,
            module_hash: s.module_hash.0.to_vec(),
            source_hash: s.source_hash.0.to_vec(),
            limits: Some(pb::Limits {
                memory_bytes: l.memory_bytes,
                timeout_ms: l.timeout_ms,
                max_input_bytes: l.max_input_bytes,
                max_output_bytes: l.max_output_bytes,
                queue: l.queue,
            }),
            checkpoint: checkpoint as i32,
            checkpoint_every_ms,
            tick_ms: s.tick_ms,
            constraints: s.constraints.clone(),
            replicas: s.replicas,
            state_replicas: s.state_replicas,
            pinned: s.pinned,
            near: s.near.clone(),
        }
    }
}

impl TryFrom<pb::TaskSpec> for TaskSpec {
    type Error = WireError;

    fn try_from(s: pb::TaskSpec) -> Result<Self, WireError> {
        let kind = match pb::TaskKind::try_from(s.kind) {
            Ok(pb::TaskKind::Stateful) => TaskKind::Stateful,
            Ok(pb::TaskKind::Stateless) => TaskKind::Stateless,
            _ => return Err(WireError::UnknownValue("task kind", s.kind)),
        };
        let checkpoint = match pb::CheckpointMode::try_from(s.checkpoint) {
            Ok(pb::CheckpointMode::None) => CheckpointPolicy::None,
            Ok(pb::CheckpointMode::Periodic) => CheckpointPolicy::Periodic { every_ms: s.checkpoint_every_ms },
            Ok(pb::CheckpointMode::Durable) => CheckpointPolicy::Durable,
            _ => return Err(WireError::UnknownValue("checkpoint mode", s.checkpoint)),
        };
        let l = s.limits.ok_or(WireError::Missing("the task's limits"))?;
        Ok(Self {
            name: s.name,
            kind,
            module_hash: hash(&s.module_hash)?,
            source_hash: hash(&s.source_hash)?,
            limits: Limits {
                memory_bytes: l.memory_bytes,
                timeout_ms: l.timeout_ms,
                max_input_bytes: l.max_input_bytes,
                max_output_bytes: l.max_output_bytes,
                queue: l.queue,
            },
            checkpoint,
            tick_ms: s.tick_ms,
            constraints: s.constraints,
            replicas: s.replicas,
            state_replicas: s.state_replicas,
            pinned: s.pinned,
            near: s.near,
        })
    }
}

impl From<&CheckpointRecord> for pb::CheckpointRecord {
    fn from(r: &CheckpointRecord) -> Self {
        Self {
            version: r.version,
            epoch: r.epoch.0,
            sequence: r.sequence,
            manifest_hash: r.manifest_hash.0.to_vec(),
            stored_on: ids(&r.stored_on),
            size_bytes: r.size_bytes,
            at_ms: r.at_ms,
        }
    }
}

impl TryFrom<pb::CheckpointRecord> for CheckpointRecord {
    type Error = WireError;

    fn try_from(r: pb::CheckpointRecord) -> Result<Self, WireError> {
        Ok(Self {
            version: r.version,
            epoch: Epoch(r.epoch),
            sequence: r.sequence,
            manifest_hash: hash(&r.manifest_hash)?,
            stored_on: nodes(&r.stored_on),
            size_bytes: r.size_bytes,
            at_ms: r.at_ms,
        })
    }
}

impl From<MigrationReason> for pb::MigrationReason {
    fn from(r: MigrationReason) -> Self {
        match r {
            MigrationReason::Manual => Self::Manual,
            MigrationReason::Drain => Self::Drain,
            MigrationReason::Overload => Self::Overload,
            MigrationReason::Device => Self::Device,
        }
    }
}

fn migration_reason(raw: i32) -> Result<MigrationReason, WireError> {
    match pb::MigrationReason::try_from(raw) {
        Ok(pb::MigrationReason::Manual) => Ok(MigrationReason::Manual),
        Ok(pb::MigrationReason::Drain) => Ok(MigrationReason::Drain),
        Ok(pb::MigrationReason::Overload) => Ok(MigrationReason::Overload),
        Ok(pb::MigrationReason::Device) => Ok(MigrationReason::Device),
        _ => Err(WireError::UnknownValue("migration reason", raw)),
    }
}

impl From<&MigrationStats> for pb::MigrationStats {
    fn from(s: &MigrationStats) -> Self {
        Self { rounds: s.rounds, bytes: s.bytes, precopy_ms: s.precopy_ms, pause_us: s.pause_us }
    }
}

impl From<pb::MigrationStats> for MigrationStats {
    fn from(s: pb::MigrationStats) -> Self {
        Self { rounds: s.rounds, bytes: s.bytes, precopy_ms: s.precopy_ms, pause_us: s.pause_us }
    }
}

fn checkpoint_id(c: Option<(Epoch, u64)>) -> Option<pb::CheckpointId> {
    c.map(|(e, s)| pb::CheckpointId { epoch: e.0, sequence: s })
}

fn from_checkpoint_id(c: Option<pb::CheckpointId>) -> Option<(Epoch, u64)> {
    c.map(|c| (Epoch(c.epoch), c.sequence))
}

impl From<&Command> for pb::Command {
    fn from(cmd: &Command) -> Self {
        use pb::command::{self as c, Command as C};
        let command = match cmd {
            Command::RegisterNode { node } => C::RegisterNode(c::RegisterNode { node: Some(node.into()) }),
            Command::DeployTask { spec, mode, at_ms } => C::DeployTask(c::DeployTask {
                spec: Some(spec.into()),
                update: *mode == DeployMode::Update,
                at_ms: *at_ms,
            }),
            Command::DeleteTask { name } => C::DeleteTask(c::DeleteTask { name: name.clone() }),
            Command::PlaceInstance { task, instance, node, expected } => C::PlaceInstance(c::PlaceInstance {
                task: task.clone(),
                instance: *instance,
                node: node.0,
                expected_epoch: expected.map(|e| e.0),
            }),
            Command::SetHolders { task, holders } => {
                C::SetHolders(c::SetHolders { task: task.clone(), holders: ids(holders) })
            }
            Command::CommitCheckpoint { task, record, based_on } => C::CommitCheckpoint(c::CommitCheckpoint {
                task: task.clone(),
                record: Some(record.into()),
                has_based_on: based_on.is_some(),
                based_on: based_on.and_then(|b| checkpoint_id(b.checkpoint)),
            }),
            Command::AddCheckpointCopies { task, epoch, sequence, nodes } => {
                C::AddCheckpointCopies(c::AddCheckpointCopies {
                    task: task.clone(),
                    epoch: epoch.0,
                    sequence: *sequence,
                    nodes: ids(nodes),
                })
            }
            Command::Note { at_ms, reason } => C::Note(c::Note { at_ms: *at_ms, reason: reason.clone() }),
            Command::Batch(cmds) => C::Batch(c::Batch { commands: cmds.iter().map(Self::from).collect() }),
            Command::SetCa { ca } => C::SetCa(c::SetCa { cert_der: ca.cert_der.clone(), key_der: ca.key_der.clone() }),
            Command::CreateToken { id, secret_hash, expires_ms, at_ms } => C::CreateToken(c::CreateToken {
                id: id.clone(),
                secret_hash: secret_hash.clone(),
                expires_ms: *expires_ms,
                at_ms: *at_ms,
            }),
            Command::RevokeToken { id } => C::RevokeToken(c::RevokeToken { id: id.clone() }),
            Command::SetNodeStatus { node, status } => {
                C::SetNodeStatus(c::SetNodeStatus { node: node.0, status: pb::NodeStatus::from(*status) as i32 })
            }
            Command::RemoveNode { node } => C::RemoveNode(c::RemoveNode { node: node.0 }),
            Command::AdmitNode { node, token_id, secret_hash, at_ms } => C::AdmitNode(c::AdmitNode {
                node: Some(node.into()),
                token_id: token_id.clone(),
                secret_hash: secret_hash.clone(),
                at_ms: *at_ms,
            }),
            Command::CreateApiToken { name, record } => {
                C::CreateApiToken(c::CreateApiToken { name: name.clone(), record: Some(record.into()) })
            }
            Command::RevokeApiToken { name } => C::RevokeApiToken(c::RevokeApiToken { name: name.clone() }),
            Command::BeginMigration { task, instance, id, from, to, expected, reason, at_ms } => {
                C::BeginMigration(c::BeginMigration {
                    task: task.clone(),
                    instance: *instance,
                    id: *id,
                    from: from.0,
                    to: to.0,
                    expected_epoch: expected.0,
                    reason: pb::MigrationReason::from(*reason) as i32,
                    at_ms: *at_ms,
                })
            }
            Command::CommitMigration { task, id, expected, checkpoint, based_on, stats, at_ms } => {
                C::CommitMigration(c::CommitMigration {
                    task: task.clone(),
                    id: *id,
                    expected_epoch: expected.0,
                    checkpoint: checkpoint.as_ref().map(Into::into),
                    has_based_on: based_on.is_some(),
                    based_on: based_on.and_then(|b| checkpoint_id(b.checkpoint)),
                    stats: Some(stats.into()),
                    at_ms: *at_ms,
                })
            }
            Command::AbortMigration { task, id, why, at_ms } => {
                C::AbortMigration(c::AbortMigration { task: task.clone(), id: *id, why: why.clone(), at_ms: *at_ms })
            }
            Command::AnnotateMigration { task, epoch, pause_us } => {
                C::AnnotateMigration(c::AnnotateMigration { task: task.clone(), epoch: epoch.0, pause_us: *pause_us })
            }
        };
        Self { command: Some(command) }
    }
}

impl TryFrom<pb::Command> for Command {
    type Error = WireError;

    fn try_from(cmd: pb::Command) -> Result<Self, WireError> {
        use pb::command::Command as C;
        let node_of = |n: Option<pb::NodeRecord>| n.ok_or(WireError::Missing("the node record"))?.try_into();
        Ok(match cmd.command.ok_or(WireError::Missing("a command"))? {
            C::RegisterNode(c) => Self::RegisterNode { node: node_of(c.node)? },
            C::DeployTask(c) => Self::DeployTask {
                spec: c.spec.ok_or(WireError::Missing("the task spec"))?.try_into()?,
                mode: if c.update { DeployMode::Update } else { DeployMode::Create },
                at_ms: c.at_ms,
            },
            C::DeleteTask(c) => Self::DeleteTask { name: c.name },
            C::PlaceInstance(c) => Self::PlaceInstance {
                task: c.task,
                instance: c.instance,
                node: NodeId(c.node),
                expected: c.expected_epoch.map(Epoch),
            },
            C::SetHolders(c) => Self::SetHolders { task: c.task, holders: nodes(&c.holders) },
            C::CommitCheckpoint(c) => Self::CommitCheckpoint {
                task: c.task,
                record: c.record.ok_or(WireError::Missing("the checkpoint record"))?.try_into()?,
                based_on: c.has_based_on.then(|| BasedOn { checkpoint: from_checkpoint_id(c.based_on) }),
            },
            C::AddCheckpointCopies(c) => Self::AddCheckpointCopies {
                task: c.task,
                epoch: Epoch(c.epoch),
                sequence: c.sequence,
                nodes: nodes(&c.nodes),
            },
            C::Note(c) => Self::Note { at_ms: c.at_ms, reason: c.reason },
            C::Batch(c) => Self::Batch(c.commands.into_iter().map(Self::try_from).collect::<Result<_, _>>()?),
            C::SetCa(c) => Self::SetCa { ca: CaMaterial { cert_der: c.cert_der, key_der: c.key_der } },
            C::CreateToken(c) => {
                Self::CreateToken { id: c.id, secret_hash: c.secret_hash, expires_ms: c.expires_ms, at_ms: c.at_ms }
            }
            C::RevokeToken(c) => Self::RevokeToken { id: c.id },
            C::SetNodeStatus(c) => Self::SetNodeStatus { node: NodeId(c.node), status: node_status(c.status)? },
            C::RemoveNode(c) => Self::RemoveNode { node: NodeId(c.node) },
            C::AdmitNode(c) => Self::AdmitNode {
                node: node_of(c.node)?,
                token_id: c.token_id,
                secret_hash: c.secret_hash,
                at_ms: c.at_ms,
            },
            C::CreateApiToken(c) => Self::CreateApiToken {
                name: c.name,
                record: c.record.ok_or(WireError::Missing("the API token record"))?.try_into()?,
            },
            C::RevokeApiToken(c) => Self::RevokeApiToken { name: c.name },
            C::BeginMigration(c) => Self::BeginMigration {
                task: c.task,
                instance: c.instance,
                id: c.id,
                from: NodeId(c.from),
                to: NodeId(c.to),
                expected: Epoch(c.expected_epoch),
                reason: migration_reason(c.reason)?,
                at_ms: c.at_ms,
            },
            C::CommitMigration(c) => Self::CommitMigration {
                task: c.task,
                id: c.id,
                expected: Epoch(c.expected_epoch),
                checkpoint: c.checkpoint.map(TryInto::try_into).transpose()?,
                based_on: c.has_based_on.then(|| BasedOn { checkpoint: from_checkpoint_id(c.based_on) }),
                stats: c.stats.ok_or(WireError::Missing("the migration's figures"))?.into(),
                at_ms: c.at_ms,
            },
            C::AbortMigration(c) => Self::AbortMigration { task: c.task, id: c.id, why: c.why, at_ms: c.at_ms },
            C::AnnotateMigration(c) => {
                Self::AnnotateMigration { task: c.task, epoch: Epoch(c.epoch), pause_us: c.pause_us }
            }
        })
    }
}

fn outcome(o: &Outcome) -> pb::Outcome {
    use pb::OutcomeKind as K;
    let plain = |kind: K| pb::Outcome { kind: kind as i32, ..Default::default() };
    match o {
        Outcome::Noop => plain(K::Noop),
        Outcome::NodeRegistered => plain(K::NodeRegistered),
        Outcome::Deployed { version, created } => {
            pb::Outcome { kind: K::Deployed as i32, version: *version, created: *created, ..Default::default() }
        }
        Outcome::Deleted => plain(K::Deleted),
        Outcome::Placed { epoch } => pb::Outcome { kind: K::Placed as i32, epoch: epoch.0, ..Default::default() },
        Outcome::Batch(results) => pb::Outcome {
            kind: K::Batch as i32,
            batch: results.iter().map(result_to_wire).collect(),
            ..Default::default()
        },
        Outcome::CaSet => plain(K::CaSet),
        Outcome::TokenCreated => plain(K::TokenCreated),
        Outcome::TokenRevoked => plain(K::TokenRevoked),
        Outcome::Admitted => plain(K::Admitted),
        Outcome::Committed => plain(K::CheckpointCommitted),
        Outcome::HoldersSet => plain(K::HoldersSet),
        Outcome::StatusSet => plain(K::StatusSet),
        Outcome::NodeRemoved => plain(K::NodeRemoved),
        Outcome::CopiesAdded => plain(K::CopiesAdded),
        Outcome::ApiTokenCreated => plain(K::ApiTokenCreated),
        Outcome::ApiTokenRevoked => plain(K::ApiTokenRevoked),
        Outcome::MigrationBegun => plain(K::MigrationBegun),
        Outcome::Migrated { epoch } => pb::Outcome { kind: K::Migrated as i32, epoch: epoch.0, ..Default::default() },
        Outcome::MigrationAborted => plain(K::MigrationAborted),
        Outcome::MigrationAnnotated => plain(K::MigrationAnnotated),
    }
}

fn from_outcome(o: pb::Outcome) -> Result<Outcome, WireError> {
    use pb::OutcomeKind as K;
    Ok(match K::try_from(o.kind) {
        Ok(K::Noop) => Outcome::Noop,
        Ok(K::NodeRegistered) => Outcome::NodeRegistered,
        Ok(K::Deployed) => Outcome::Deployed { version: o.version, created: o.created },
        Ok(K::Deleted) => Outcome::Deleted,
        Ok(K::Placed) => Outcome::Placed { epoch: Epoch(o.epoch) },
        Ok(K::Batch) => Outcome::Batch(o.batch.into_iter().map(result_from_wire).collect::<Result<_, _>>()?),
        Ok(K::CaSet) => Outcome::CaSet,
        Ok(K::TokenCreated) => Outcome::TokenCreated,
        Ok(K::TokenRevoked) => Outcome::TokenRevoked,
        Ok(K::Admitted) => Outcome::Admitted,
        Ok(K::CheckpointCommitted) => Outcome::Committed,
        Ok(K::HoldersSet) => Outcome::HoldersSet,
        Ok(K::StatusSet) => Outcome::StatusSet,
        Ok(K::NodeRemoved) => Outcome::NodeRemoved,
        Ok(K::CopiesAdded) => Outcome::CopiesAdded,
        Ok(K::ApiTokenCreated) => Outcome::ApiTokenCreated,
        Ok(K::ApiTokenRevoked) => Outcome::ApiTokenRevoked,
        Ok(K::MigrationBegun) => Outcome::MigrationBegun,
        Ok(K::Migrated) => Outcome::Migrated { epoch: Epoch(o.epoch) },
        Ok(K::MigrationAborted) => Outcome::MigrationAborted,
        Ok(K::MigrationAnnotated) => Outcome::MigrationAnnotated,
        Ok(K::Unspecified) | Err(_) => return Err(WireError::UnknownValue("outcome", o.kind)),
    })
}

fn rejection(r: &Rejected) -> pb::Rejection {
    use pb::RejectionKind as K;
    let text = |kind: K, text: &str| pb::Rejection { kind: kind as i32, text: text.to_owned(), ..Default::default() };
    let node = |kind: K, node: NodeId| pb::Rejection { kind: kind as i32, node: node.0, ..Default::default() };
    match r {
        Rejected::TaskExists(t) => text(K::TaskExists, t),
        Rejected::NoSuchTask(t) => text(K::NoSuchTask, t),
        Rejected::NoSuchNode(n) => node(K::NoSuchNode, *n),
        Rejected::NoSuchInstance { task, instance } => {
            pb::Rejection { instance: *instance, ..text(K::NoSuchInstance, task) }
        }
        Rejected::NotBasedOnCommitted { based_on, committed } => pb::Rejection {
            kind: K::NotBasedOnCommitted as i32,
            based_on: checkpoint_id(*based_on),
            committed: checkpoint_id(*committed),
            ..Default::default()
        },
        Rejected::StaleEpoch { current } => {
            pb::Rejection { kind: K::StaleEpoch as i32, current_epoch: current.map(|e| e.0), ..Default::default() }
        }
        Rejected::Invalid(m) => text(K::Invalid, m),
        Rejected::BadToken(m) => text(K::BadToken, m),
        Rejected::Removed(n) => node(K::Removed, *n),
        Rejected::NodeIdTaken(n) => node(K::NodeIdTaken, *n),
        Rejected::ApiTokenExists(n) => text(K::ApiTokenExists, n),
        Rejected::NoSuchApiToken(n) => text(K::NoSuchApiToken, n),
        Rejected::MigrationInProgress { id } => {
            pb::Rejection { kind: K::MigrationInProgress as i32, migration_id: *id, ..Default::default() }
        }
        Rejected::NoSuchMigration { task, id } => pb::Rejection { migration_id: *id, ..text(K::NoSuchMigration, task) },
        Rejected::UnfitTarget { node, why } => pb::Rejection { node: node.0, ..text(K::UnfitTarget, why) },
    }
}

fn from_rejection(r: pb::Rejection) -> Result<Rejected, WireError> {
    use pb::RejectionKind as K;
    Ok(match K::try_from(r.kind) {
        Ok(K::TaskExists) => Rejected::TaskExists(r.text),
        Ok(K::NoSuchTask) => Rejected::NoSuchTask(r.text),
        Ok(K::NoSuchNode) => Rejected::NoSuchNode(NodeId(r.node)),
        Ok(K::NoSuchInstance) => Rejected::NoSuchInstance { task: r.text, instance: r.instance },
        Ok(K::NotBasedOnCommitted) => Rejected::NotBasedOnCommitted {
            based_on: from_checkpoint_id(r.based_on),
            committed: from_checkpoint_id(r.committed),
        },
        Ok(K::StaleEpoch) => Rejected::StaleEpoch { current: r.current_epoch.map(Epoch) },
        Ok(K::Invalid) => Rejected::Invalid(r.text),
        Ok(K::BadToken) => Rejected::BadToken(r.text),
        Ok(K::Removed) => Rejected::Removed(NodeId(r.node)),
        Ok(K::NodeIdTaken) => Rejected::NodeIdTaken(NodeId(r.node)),
        Ok(K::ApiTokenExists) => Rejected::ApiTokenExists(r.text),
        Ok(K::NoSuchApiToken) => Rejected::NoSuchApiToken(r.text),
        Ok(K::MigrationInProgress) => Rejected::MigrationInProgress { id: r.migration_id },
        Ok(K::NoSuchMigration) => Rejected::NoSuchMigration { task: r.text, id: r.migration_id },
        Ok(K::UnfitTarget) => Rejected::UnfitTarget { node: NodeId(r.node), why: r.text },
        Ok(K::Unspecified) | Err(_) => return Err(WireError::UnknownValue("rejection", r.kind)),
    })
}

/// A command's result as it travels (a `Result`, so a function rather than a `From`).
pub fn result_to_wire(r: &CommandResult) -> pb::CommandResult {
    use pb::command_result::Result as R;
    pb::CommandResult {
        result: Some(match r {
            Ok(o) => R::Outcome(outcome(o)),
            Err(e) => R::Rejected(rejection(e)),
        }),
    }
}

/// Reads a command's result back.
pub fn result_from_wire(r: pb::CommandResult) -> Result<CommandResult, WireError> {
    use pb::command_result::Result as R;
    match r.result.ok_or(WireError::Missing("a result"))? {
        R::Outcome(o) => Ok(Ok(from_outcome(o)?)),
        R::Rejected(e) => Ok(Err(from_rejection(e)?)),
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
