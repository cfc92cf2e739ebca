//! The migration commands: every refusal leaves the state as it was, commit and abort exclude
//! each other, and a re-placement fences a migration.
use hubmesh_storage::Hash;

use super::super::tests::{node, spec};
use super::super::*;

/// Hubs 1–4 (4 a witness), a stateful task `t` on hub 1 with holders 2 and 3, and its first
/// committed checkpoint. Returns the state and the task's epoch.
fn mesh() -> (ClusterState, Epoch) {
    let mut s = ClusterState::default();
    for id in 1..=4 {
        let mut n = node(id);
        n.witness = id == 4;
        s.apply(&Command::RegisterNode { node: n }).unwrap();
    }
    let deploy = Command::DeployTask { spec: spec("t", TaskKind::Stateful), mode: DeployMode::Create, at_ms: 1 };
    s.apply(&deploy).unwrap();
    let place = Command::PlaceInstance { task: "t".into(), instance: 0, node: NodeId(1), expected: None };
    let Outcome::Placed { epoch } = s.apply(&place).unwrap() else { panic!("placed") };
    s.apply(&Command::SetHolders { task: "t".into(), holders: vec![NodeId(2), NodeId(3)] }).unwrap();
    let commit = Command::CommitCheckpoint { task: "t".into(), record: record(epoch, 1), based_on: None };
    s.apply(&commit).unwrap();
    (s, epoch)
}

fn record(epoch: Epoch, sequence: u64) -> CheckpointRecord {
    CheckpointRecord {
        version: 1,
        epoch,
        sequence,
        manifest_hash: Hash::of(&sequence.to_le_bytes()),
        stored_on: vec![NodeId(2), NodeId(1)],
        size_bytes: 65536,
        at_ms: 9,
    }
}

fn begin(id: u64, to: u64, expected: Epoch) -> Command {
    Command::BeginMigration {
        task: "t".into(),
        instance: 0,
        id,
        from: NodeId(1),
        to: NodeId(to),
        expected,
        reason: MigrationReason::Manual,
        at_ms: 20,
    }
}

fn commit(id: u64, expected: Epoch, sequence: u64, on: u64) -> Command {
    Command::CommitMigration {
        task: "t".into(),
        id,
        expected,
        checkpoint: Some(record(expected, sequence)),
        based_on: Some(BasedOn { checkpoint: Some((expected, on)) }),
        stats: MigrationStats { rounds: 2, bytes: 8192, precopy_ms: 3, pause_us: None },
        at_ms: 30,
    }
}

fn abort(id: u64) -> Command {
    Command::AbortMigration { task: "t".into(), id, why: "target down".into(), at_ms: 40 }
}

/// Applies `cmd`, asserts that it is refused as `matches` says, and that nothing changed.
fn refused(s: &mut ClusterState, cmd: &Command, matches: impl Fn(&Rejected) -> bool) {
    let before = s.clone();
    let r = s.apply(cmd);
    assert!(r.as_ref().is_err_and(&matches), "{cmd:?} gave {r:?}");
    assert_eq!(*s, before, "a refused {cmd:?} changed the state");
}

#[test]
fn a_commit_is_the_one_switch() {
    let (mut s, e) = mesh();
    assert_eq!(s.tasks["t"].migration_outcome(7), MigrationOutcome::NotMoved, "not begun");
    assert_eq!(s.apply(&begin(7, 2, e)), Ok(Outcome::MigrationBegun));
    assert_eq!(s.apply(&begin(7, 2, e)), Ok(Outcome::MigrationBegun), "a repeated begin is a no-op");
    assert_eq!(s.tasks["t"].migration_outcome(7), MigrationOutcome::Underway);
    // Until the commit, the source is the host and may keep committing checkpoints.
    assert_eq!(s.placement("t", 0).map(|p| p.node), Some(NodeId(1)));
    let durable = Command::CommitCheckpoint { task: "t".into(), record: record(e, 2), based_on: None };
    assert_eq!(s.apply(&durable), Ok(Outcome::Committed));

    let Outcome::Migrated { epoch } = s.apply(&commit(7, e, 3, 2)).unwrap() else { panic!("migrated") };
    assert!(epoch > e);
    let t = &s.tasks["t"];
    assert_eq!(t.instances[&0], Placement { node: NodeId(2), epoch });
    assert_eq!(t.checkpoint.as_ref().map(|c| (c.epoch, c.sequence)), Some((e, 3)));
    assert_eq!(t.holders, vec![NodeId(1), NodeId(3)], "the source takes the target's place as holder");
    assert_eq!(t.migration, None);
    assert_eq!(t.migration_outcome(7), MigrationOutcome::Moved(Placement { node: NodeId(2), epoch }));
    assert_eq!(t.migration_outcome(6), MigrationOutcome::NotMoved, "another migration");
    let last = t.history.last().unwrap();
    assert_eq!((last.node, last.epoch, last.reason.as_str()), (NodeId(2), epoch, "manual"));
    let m = last.migration.as_ref().unwrap();
    assert_eq!((m.id, m.from, m.from_epoch, m.stats.rounds, m.aborted.as_deref()), (7, NodeId(1), e, 2, None));

    assert_eq!(
        s.apply(&Command::AnnotateMigration { task: "t".into(), epoch, pause_us: 800 }),
        Ok(Outcome::MigrationAnnotated)
    );
    assert_eq!(s.tasks["t"].history.last().unwrap().migration.as_ref().unwrap().stats.pause_us, Some(800));
    // After the commit, an abort of it is refused: the source learns that it moved.
    refused(&mut s, &abort(7), |r| matches!(r, Rejected::NoSuchMigration { id: 7, .. }));
    refused(&mut s, &commit(7, e, 4, 3), |r| matches!(r, Rejected::NoSuchMigration { .. }));
}

#[test]
fn an_abort_leaves_the_source_and_fences_a_late_commit() {
    let (mut s, e) = mesh();
    s.apply(&begin(7, 3, e)).unwrap();
    assert_eq!(s.apply(&abort(7)), Ok(Outcome::MigrationAborted));
    let t = &s.tasks["t"];
    assert_eq!(t.instances[&0], Placement { node: NodeId(1), epoch: e });
    assert_eq!(t.migration, None);
    assert_eq!(t.migration_outcome(7), MigrationOutcome::NotMoved);
    let last = t.history.last().unwrap();
    assert_eq!((last.node, last.reason.as_str()), (NodeId(1), "aborted"));
    assert_eq!(last.migration.as_ref().unwrap().aborted.as_deref(), Some("target down"));
    refused(&mut s, &commit(7, e, 2, 1), |r| matches!(r, Rejected::NoSuchMigration { id: 7, .. }));
    refused(&mut s, &abort(7), |r| matches!(r, Rejected::NoSuchMigration { .. }));
    // A retry is a new migration.
    assert_eq!(s.apply(&begin(8, 3, e)), Ok(Outcome::MigrationBegun));
    assert!(matches!(s.apply(&commit(8, e, 2, 1)), Ok(Outcome::Migrated { .. })));
    assert_eq!(s.tasks["t"].holders, vec![NodeId(2), NodeId(1)]);
}

#[test]
fn bad_begins_are_refused_and_change_nothing() {
    let (mut s, e) = mesh();
    refused(&mut s, &begin(7, 4, e), |r| matches!(r, Rejected::UnfitTarget { node: NodeId(4), .. }));
    refused(&mut s, &begin(7, 1, e), |r| matches!(r, Rejected::UnfitTarget { node: NodeId(1), .. }));
    refused(&mut s, &begin(7, 9, e), |r| *r == Rejected::NoSuchNode(NodeId(9)));
    refused(&mut s, &begin(7, 2, Epoch(e.0 + 5)), |r| matches!(r, Rejected::StaleEpoch { .. }));
    let mut wrong_source = begin(7, 2, e);
    if let Command::BeginMigration { from, .. } = &mut wrong_source {
        *from = NodeId(3);
    }
    refused(&mut s, &wrong_source, |r| matches!(r, Rejected::StaleEpoch { .. }));
    let mut no_task = begin(7, 2, e);
    if let Command::BeginMigration { task, .. } = &mut no_task {
        *task = "nope".into();
    }
    refused(&mut s, &no_task, |r| matches!(r, Rejected::NoSuchTask(_)));
    s.apply(&Command::SetNodeStatus { node: NodeId(3), status: NodeStatus::Down }).unwrap();
    refused(&mut s, &begin(7, 3, e), |r| matches!(r, Rejected::UnfitTarget { node: NodeId(3), .. }));

    s.apply(&begin(7, 2, e)).unwrap();
    refused(&mut s, &begin(8, 2, e), |r| *r == Rejected::MigrationInProgress { id: 7 });
}

#[test]
fn bad_commits_are_refused_and_change_nothing() {
    let (mut s, e) = mesh();
    s.apply(&begin(7, 2, e)).unwrap();
    refused(&mut s, &commit(8, e, 2, 1), |r| matches!(r, Rejected::NoSuchMigration { id: 8, .. }));
    // Built on an older checkpoint than the committed one (a durable commit raced it).
    let durable = Command::CommitCheckpoint { task: "t".into(), record: record(e, 2), based_on: None };
    s.apply(&durable).unwrap();
    refused(&mut s, &commit(7, e, 3, 1), |r| matches!(r, Rejected::NotBasedOnCommitted { .. }));
    // Not newer than the committed one.
    refused(&mut s, &commit(7, e, 2, 2), |r| matches!(r, Rejected::Invalid(_)));
    let mut without = commit(7, e, 3, 2);
    if let Command::CommitMigration { checkpoint, .. } = &mut without {
        *checkpoint = None;
    }
    refused(&mut s, &without, |r| matches!(r, Rejected::Invalid(_)));
    refused(&mut s, &commit(7, Epoch(e.0 + 1), 3, 2), |r| matches!(r, Rejected::StaleEpoch { .. }));
    // The target went down since the begin.
    s.apply(&Command::SetNodeStatus { node: NodeId(2), status: NodeStatus::Down }).unwrap();
    refused(&mut s, &commit(7, e, 3, 2), |r| matches!(r, Rejected::UnfitTarget { node: NodeId(2), .. }));
}

#[test]
fn a_failover_an_update_or_a_removal_fences_the_migration() {
    let (mut s, e) = mesh();
    s.apply(&begin(7, 2, e)).unwrap();
    let place = Command::PlaceInstance { task: "t".into(), instance: 0, node: NodeId(3), expected: Some(e) };
    let Outcome::Placed { epoch } = s.apply(&place).unwrap() else { panic!("placed") };
    assert_eq!(s.migration("t"), None);
    assert_eq!(s.tasks["t"].migration_outcome(7), MigrationOutcome::NotMoved, "fenced, not moved");
    refused(&mut s, &commit(7, e, 2, 1), |r| matches!(r, Rejected::NoSuchMigration { .. }));

    let from_3 = |id| Command::BeginMigration {
        task: "t".into(),
        instance: 0,
        id,
        from: NodeId(3),
        to: NodeId(2),
        expected: epoch,
        reason: MigrationReason::Drain,
        at_ms: 50,
    };
    s.apply(&from_3(8)).unwrap();
    let mut update = spec("t", TaskKind::Stateful);
    update.pinned = true;
    s.apply(&Command::DeployTask { spec: update, mode: DeployMode::Update, at_ms: 60 }).unwrap();
    assert_eq!(s.migration("t"), None, "an update gives the instance a new epoch");

    let epoch = s.placement("t", 0).unwrap().epoch;
    let mut again = from_3(9);
    if let Command::BeginMigration { expected, .. } = &mut again {
        *expected = epoch;
    }
    s.apply(&again).unwrap();
    s.apply(&Command::RemoveNode { node: NodeId(2) }).unwrap();
    assert_eq!(s.migration("t"), None, "the target was removed");
}

#[test]
fn a_stateless_instance_migrates_without_a_checkpoint_and_not_onto_a_sibling() {
    let mut s = ClusterState::default();
    for id in 1..=3 {
        s.apply(&Command::RegisterNode { node: node(id) }).unwrap();
    }
    let mut web = spec("web", TaskKind::Stateless);
    web.replicas = 2;
    s.apply(&Command::DeployTask { spec: web, mode: DeployMode::Create, at_ms: 1 }).unwrap();
    let mut epochs = Vec::new();
    for (i, n) in [(0, 1), (1, 2)] {
        let place = Command::PlaceInstance { task: "web".into(), instance: i, node: NodeId(n), expected: None };
        let Outcome::Placed { epoch } = s.apply(&place).unwrap() else { panic!("placed") };
        epochs.push(epoch);
    }
    let begin = |to| Command::BeginMigration {
        task: "web".into(),
        instance: 1,
        id: 5,
        from: NodeId(2),
        to: NodeId(to),
        expected: epochs[1],
        reason: MigrationReason::Overload,
        at_ms: 2,
    };
    refused(&mut s, &begin(1), |r| matches!(r, Rejected::UnfitTarget { node: NodeId(1), .. }));
    s.apply(&begin(3)).unwrap();
    let commit = |checkpoint| Command::CommitMigration {
        task: "web".into(),
        id: 5,
        expected: epochs[1],
        checkpoint,
        based_on: None,
        stats: MigrationStats::default(),
        at_ms: 3,
    };
    refused(&mut s, &commit(Some(record(epochs[1], 1))), |r| matches!(r, Rejected::Invalid(_)));
    let Outcome::Migrated { epoch } = s.apply(&commit(None)).unwrap() else { panic!("migrated") };
    assert_eq!(s.placement("web", 1), Some(Placement { node: NodeId(3), epoch }));
    assert_eq!(s.placement("web", 0), Some(Placement { node: NodeId(1), epoch: epochs[0] }));
}

#[test]
fn an_annotation_needs_a_committed_migration() {
    let (mut s, e) = mesh();
    let note = Command::AnnotateMigration { task: "t".into(), epoch: e, pause_us: 5 };
    refused(&mut s, &note, |r| matches!(r, Rejected::Invalid(_)));
    s.apply(&begin(7, 2, e)).unwrap();
    s.apply(&abort(7)).unwrap();
    let note = Command::AnnotateMigration { task: "t".into(), epoch: e, pause_us: 5 };
    refused(&mut s, &note, |r| matches!(r, Rejected::Invalid(_)));
}

#[test]
fn old_snapshots_without_migration_fields_still_load() {
    let (s, _) = mesh();
    let mut json: serde_json::Value = serde_json::to_value(&s).unwrap();
    let task = json["tasks"]["t"].as_object_mut().unwrap();
    task.remove("migration");
    task["spec"].as_object_mut().unwrap().remove("pinned");
    let back: ClusterState = serde_json::from_value(json).unwrap();
    assert_eq!(back, s);
}
