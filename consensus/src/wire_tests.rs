//! Every command and every result survives the wire, and what a peer could get wrong is refused.

use std::collections::BTreeMap;

use hubmesh_proto::{pb, Message};
use hubmesh_storage::Hash;

use super::{result_from_wire, result_to_wire, WireError};
use crate::ids::{Epoch, NodeId};
use crate::state::{
    ApiScope, ApiTokenRecord, BasedOn, CheckpointPolicy, CheckpointRecord, Command, CommandResult, DeployMode, Limits,
    MigrationReason, MigrationStats, NodeRecord, NodeStatus, Outcome, Rejected, TaskKind, TaskSpec,
};
use crate::tls::CaMaterial;

fn node(status: NodeStatus) -> NodeRecord {
    NodeRecord {
        id: NodeId(7),
        name: "attic".into(),
        api_addr: "127.0.0.1:7070".into(),
        mesh_addr: "127.0.0.1:7071".into(),
        labels: BTreeMap::from([("room".into(), "attic".into())]),
        slots: 8,
        memory_bytes: 1 << 30,
        witness: false,
        cert_fingerprint: "ab".repeat(32),
        gossip_addr: String::new(),
        public_key: String::new(),
        status,
    }
}

fn spec(checkpoint: CheckpointPolicy, kind: TaskKind) -> TaskSpec {
    TaskSpec {
        name: "pump".into(),
        kind,
        module_hash: Hash::of(b"m"),
        source_hash: Hash::of(b"s"),
        limits: Limits {
            memory_bytes: 1 << 20,
            timeout_ms: 250,
            max_input_bytes: 4096,
            max_output_bytes: 4096,
            queue: 16,
        },
        checkpoint,
        tick_ms: Some(100),
        constraints: BTreeMap::from([("room".into(), "garage".into())]),
        replicas: 1,
        state_replicas: 2,
        pinned: true,
        near: Some("mdns:_hap._tcp/id=AA:BB".into()),
    }
}

fn record() -> CheckpointRecord {
    CheckpointRecord {
        version: 3,
        epoch: Epoch(9),
        sequence: 41,
        manifest_hash: Hash::of(b"manifest"),
        stored_on: vec![NodeId(1), NodeId(2)],
        size_bytes: 65536,
        at_ms: 1_700_000_000_000,
    }
}

fn every_command() -> Vec<Command> {
    let mut all = vec![
        Command::RegisterNode { node: node(NodeStatus::Up) },
        Command::DeployTask {
            spec: spec(CheckpointPolicy::Durable, TaskKind::Stateful),
            mode: DeployMode::Create,
            at_ms: 5,
        },
        Command::DeployTask {
            spec: spec(CheckpointPolicy::Periodic { every_ms: 500 }, TaskKind::Stateful),
            mode: DeployMode::Update,
            at_ms: 6,
        },
        Command::DeployTask {
            spec: spec(CheckpointPolicy::None, TaskKind::Stateless),
            mode: DeployMode::Create,
            at_ms: 7,
        },
        Command::DeleteTask { name: "pump".into() },
        Command::PlaceInstance { task: "pump".into(), instance: 0, node: NodeId(2), expected: None },
        Command::PlaceInstance { task: "pump".into(), instance: 1, node: NodeId(3), expected: Some(Epoch(4)) },
        Command::SetHolders { task: "pump".into(), holders: vec![NodeId(1), NodeId(3)] },
        Command::CommitCheckpoint { task: "pump".into(), record: record(), based_on: None },
        Command::CommitCheckpoint {
            task: "pump".into(),
            record: record(),
            based_on: Some(BasedOn { checkpoint: None }),
        },
        Command::CommitCheckpoint {
            task: "pump".into(),
            record: record(),
            based_on: Some(BasedOn { checkpoint: Some((Epoch(9), 40)) }),
        },
        Command::AddCheckpointCopies { task: "pump".into(), epoch: Epoch(9), sequence: 41, nodes: vec![NodeId(3)] },
        Command::Note { at_ms: 8, reason: "failover".into() },
        Command::SetCa { ca: CaMaterial { cert_der: vec![1, 2, 3], key_der: vec![4, 5] } },
        Command::CreateToken { id: "t1".into(), secret_hash: "h".into(), expires_ms: 100, at_ms: 1 },
        Command::RevokeToken { id: "t1".into() },
        Command::RemoveNode { node: NodeId(7) },
        Command::AdmitNode { node: node(NodeStatus::Up), token_id: "t1".into(), secret_hash: "h".into(), at_ms: 2 },
        Command::RevokeApiToken { name: "lights".into() },
        Command::CommitMigration {
            task: "pump".into(),
            id: 77,
            expected: Epoch(9),
            checkpoint: Some(record()),
            based_on: Some(BasedOn { checkpoint: Some((Epoch(9), 40)) }),
            stats: MigrationStats { rounds: 3, bytes: 1 << 20, precopy_ms: 12, pause_us: Some(900) },
            at_ms: 10,
        },
        Command::CommitMigration {
            task: "pump".into(),
            id: 78,
            expected: Epoch(9),
            checkpoint: None,
            based_on: None,
            stats: MigrationStats::default(),
            at_ms: 11,
        },
        Command::AbortMigration { task: "pump".into(), id: 77, why: "the target went down".into(), at_ms: 12 },
        Command::AnnotateMigration { task: "pump".into(), epoch: Epoch(10), pause_us: 1500 },
    ];
    for reason in [MigrationReason::Manual, MigrationReason::Drain, MigrationReason::Overload, MigrationReason::Device]
    {
        all.push(Command::BeginMigration {
            task: "pump".into(),
            instance: 0,
            id: 77,
            from: NodeId(1),
            to: NodeId(2),
            expected: Epoch(9),
            reason,
            at_ms: 9,
        });
    }
    for (scope, tasks, expires_ms, revoked) in [
        (ApiScope::Admin, vec![], u64::MAX, false),
        (ApiScope::Invoke, vec!["hall".to_owned(), "pump".to_owned()], 99, true),
    ] {
        let record = ApiTokenRecord { token_hash: "ab".repeat(32), scope, tasks, created_ms: 5, expires_ms, revoked };
        all.push(Command::CreateApiToken { name: "lights".into(), record });
    }
    for status in [NodeStatus::Up, NodeStatus::Suspect, NodeStatus::Down, NodeStatus::Draining] {
        all.push(Command::SetNodeStatus { node: NodeId(7), status });
    }
    all.push(Command::Batch(all.clone()));
    all
}

#[test]
fn every_command_survives_the_wire() {
    for cmd in every_command() {
        let bytes = pb::Command::from(&cmd).encode_to_vec();
        let back = Command::try_from(pb::Command::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(back, cmd);
    }
}

#[test]
fn every_result_survives_the_wire() {
    let results: Vec<CommandResult> = vec![
        Ok(Outcome::Noop),
        Ok(Outcome::NodeRegistered),
        Ok(Outcome::Deployed { version: 2, created: false }),
        Ok(Outcome::Deleted),
        Ok(Outcome::Placed { epoch: Epoch(12) }),
        Ok(Outcome::CaSet),
        Ok(Outcome::TokenCreated),
        Ok(Outcome::TokenRevoked),
        Ok(Outcome::Admitted),
        Ok(Outcome::Committed),
        Ok(Outcome::HoldersSet),
        Ok(Outcome::StatusSet),
        Ok(Outcome::NodeRemoved),
        Ok(Outcome::CopiesAdded),
        Ok(Outcome::ApiTokenCreated),
        Ok(Outcome::ApiTokenRevoked),
        Ok(Outcome::MigrationBegun),
        Ok(Outcome::Migrated { epoch: Epoch(13) }),
        Ok(Outcome::MigrationAborted),
        Ok(Outcome::MigrationAnnotated),
        Err(Rejected::TaskExists("a".into())),
        Err(Rejected::NoSuchTask("b".into())),
        Err(Rejected::NoSuchNode(NodeId(3))),
        Err(Rejected::NoSuchInstance { task: "c".into(), instance: 2 }),
        Err(Rejected::NotBasedOnCommitted { based_on: None, committed: Some((Epoch(2), 5)) }),
        Err(Rejected::NotBasedOnCommitted { based_on: Some((Epoch(1), 1)), committed: None }),
        Err(Rejected::StaleEpoch { current: None }),
        Err(Rejected::StaleEpoch { current: Some(Epoch(4)) }),
        Err(Rejected::Invalid("batches do not nest".into())),
        Err(Rejected::BadToken("wrong secret".into())),
        Err(Rejected::Removed(NodeId(5))),
        Err(Rejected::NodeIdTaken(NodeId(6))),
        Err(Rejected::ApiTokenExists("lights".into())),
        Err(Rejected::NoSuchApiToken("pump".into())),
        Err(Rejected::MigrationInProgress { id: 4 }),
        Err(Rejected::NoSuchMigration { task: "pump".into(), id: 5 }),
        Err(Rejected::UnfitTarget { node: NodeId(2), why: "it is a witness".into() }),
    ];
    let mut all = results.clone();
    all.push(Ok(Outcome::Batch(results)));
    for r in all {
        let bytes = result_to_wire(&r).encode_to_vec();
        let back = result_from_wire(pb::CommandResult::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}

#[test]
fn what_a_peer_gets_wrong_is_refused() {
    assert_eq!(Command::try_from(pb::Command::default()), Err(WireError::Missing("a command")));
    let mut bad = pb::Command::from(&Command::SetNodeStatus { node: NodeId(1), status: NodeStatus::Up });
    if let Some(pb::command::Command::SetNodeStatus(c)) = bad.command.as_mut() {
        c.status = 99;
    }
    assert_eq!(Command::try_from(bad), Err(WireError::UnknownValue("node status", 99)));
    let mut short = pb::Command::from(&every_command()[1]);
    if let Some(pb::command::Command::DeployTask(c)) = short.command.as_mut() {
        c.spec.as_mut().unwrap().module_hash.truncate(5);
    }
    assert_eq!(Command::try_from(short), Err(WireError::BadHash));
    assert_eq!(result_from_wire(pb::CommandResult::default()), Err(WireError::Missing("a result")));
    let begin = every_command().into_iter().find(|c| matches!(c, Command::BeginMigration { .. })).unwrap();
    let mut unknown = pb::Command::from(&begin);
    if let Some(pb::command::Command::BeginMigration(c)) = unknown.command.as_mut() {
        c.reason = 0;
    }
    assert_eq!(Command::try_from(unknown), Err(WireError::UnknownValue("migration reason", 0)));
}
