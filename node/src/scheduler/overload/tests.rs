//! The overload policy over synthetic loads: hysteresis, one move per hub at a time, the
//! cooldown and the pin, and a simulation in which moves never go back and forth.

use hubmesh_consensus::state::{MigrationReason, MigrationStats, NodeStatus, Outcome, TaskKind};
use hubmesh_consensus::Command;

use super::super::tests::{constrained_deploy, labelled_node};
use super::*;
use crate::scheduler::Near;

const TH: Thresholds = Thresholds { high: 0.85, low: 0.6, window_ms: 10_000, cooldown_ms: 120_000 };

/// Hubs 1..=n, each offering one core; stateless tasks placed as given.
fn mesh(hubs: u64, tasks: &[(&str, u64)]) -> ClusterState {
    let mut s = ClusterState::default();
    for id in 1..=hubs {
        s.apply(&labelled_node(id, 10, NodeStatus::Up, &[])).unwrap();
    }
    for (name, node) in tasks {
        s.apply(&constrained_deploy(name, TaskKind::Stateless, &[])).unwrap();
        s.apply(&Command::PlaceInstance { task: (*name).into(), instance: 0, node: NodeId(*node), expected: None })
            .unwrap();
    }
    s
}

/// Each hub's load from what runs on it: `cores` per task, one core per hub.
fn loads(s: &ClusterState, cores: &BTreeMap<&str, f64>) -> BTreeMap<NodeId, HubLoad> {
    let mut out: BTreeMap<NodeId, HubLoad> =
        s.nodes.keys().map(|n| (*n, HubLoad { task_cpus: 1.0, ..HubLoad::default() })).collect();
    for (name, t) in &s.tasks {
        let l = out.get_mut(&t.instances[&0].node).unwrap();
        let c = cores[name.as_str()];
        l.cpu += c;
        l.tasks.insert(name.clone(), TaskLoad { cores: c, memory_bytes: 1 << 20, wait: 0.0 });
    }
    out
}

/// The begin of migration 7 of `task` (at its current epoch) from hub `from` to hub `to`.
fn begin(s: &ClusterState, task: &str, from: u64, to: u64, reason: MigrationReason, at_ms: u64) -> Command {
    Command::BeginMigration {
        task: task.into(),
        instance: 0,
        id: 7,
        from: NodeId(from),
        to: NodeId(to),
        expected: s.tasks[task].instances[&0].epoch,
        reason,
        at_ms,
    }
}

/// Applies a move as the mesh would: begin, then commit (a history event with the migration).
fn apply(s: &mut ClusterState, m: &Move, now_ms: u64) {
    let epoch = s.tasks[&m.task].instances[&0].epoch;
    let b = begin(s, &m.task, m.from.0, m.to.0, MigrationReason::Overload, now_ms);
    s.apply(&b).unwrap();
    let commit = Command::CommitMigration {
        task: m.task.clone(),
        id: 7,
        expected: epoch,
        checkpoint: None,
        based_on: None,
        stats: MigrationStats::default(),
        at_ms: now_ms,
    };
    assert!(matches!(s.apply(&commit), Ok(Outcome::Migrated { .. })), "{m:?}");
}

#[test]
fn a_hub_sheds_only_after_staying_above_high_for_the_window() {
    let s = mesh(2, &[("a", 1), ("b", 1), ("c", 1)]);
    let cores = BTreeMap::from([("a", 0.5), ("b", 0.3), ("c", 0.2)]);
    let l = loads(&s, &cores);
    let mut p = Overload::default();
    let none = BTreeSet::new();
    assert_eq!(p.round(&s, &l, 0, &TH, &none, &Near::default()), None, "just went above high");
    assert_eq!(p.round(&s, &l, 9_999, &TH, &none, &Near::default()), None);
    // A dip below high starts the window again.
    let mut calm = l.clone();
    calm.get_mut(&NodeId(1)).unwrap().cpu = 0.8;
    assert_eq!(p.round(&s, &calm, 9_999, &TH, &none, &Near::default()), None);
    assert_eq!(p.round(&s, &l, 10_000, &TH, &none, &Near::default()), None);
    // The most CPU per MiB of state goes first, to the hub below low (and it may: the target
    // ends no more loaded than the source, 0.5 against 0.5).
    let m = p.round(&s, &l, 20_000, &TH, &none, &Near::default()).expect("a move after the window");
    assert_eq!(m, Move { task: "a".into(), from: NodeId(1), to: NodeId(2) });
    // The window restarts after a move.
    assert_eq!(p.round(&s, &l, 20_500, &TH, &none, &Near::default()), None);
}

#[test]
fn one_move_per_hub_at_a_time_and_never_a_pinned_or_recently_moved_task() {
    let mut s = mesh(3, &[("a", 1), ("b", 1)]);
    let cores = BTreeMap::from([("a", 0.6), ("b", 0.4)]);
    let l = loads(&s, &cores);
    let mut p = Overload::default();
    p.round(&s, &l, 0, &TH, &BTreeSet::new(), &Near::default());
    assert_eq!(p.round(&s, &l, 10_000, &TH, &BTreeSet::from([NodeId(1)]), &Near::default()), None, "busy");
    let epoch = s.tasks["a"].instances[&0].epoch;
    let mut migrating = s.clone();
    migrating.apply(&begin(&s, "b", 1, 2, MigrationReason::Manual, 0)).unwrap();
    assert_eq!(
        p.round(&migrating, &l, 10_000, &TH, &BTreeSet::new(), &Near::default()),
        None,
        "a migration out is under way"
    );
    s.tasks.get_mut("a").unwrap().spec.pinned = true;
    let m = p.round(&s, &l, 10_000, &TH, &BTreeSet::new(), &Near::default()).unwrap();
    assert_eq!(m.task, "b", "a is pinned");
    // b moved a moment ago (history): within the cooldown nothing else qualifies.
    apply(&mut s, &Move { task: "b".into(), from: NodeId(1), to: NodeId(3) }, 5_000);
    apply(&mut s, &Move { task: "b".into(), from: NodeId(3), to: NodeId(1) }, 6_000);
    let mut p = Overload::default();
    p.round(&s, &l, 0, &TH, &BTreeSet::new(), &Near::default());
    assert_eq!(p.round(&s, &l, 20_000, &TH, &BTreeSet::new(), &Near::default()), None, "cooldown");
    assert!(p.round(&s, &l, 6_000 + TH.cooldown_ms + 10_000, &TH, &BTreeSet::new(), &Near::default()).is_some());
    assert_eq!(s.tasks["a"].instances[&0].epoch, epoch);
}

#[test]
fn a_hub_receiving_a_migration_sheds_nothing_meanwhile() {
    let s = mesh(3, &[("a", 1), ("b", 1), ("c", 3)]);
    let cores = BTreeMap::from([("a", 0.6), ("b", 0.4), ("c", 0.1)]);
    let l = loads(&s, &cores);
    let mut p = Overload::default();
    p.round(&s, &l, 0, &TH, &BTreeSet::new(), &Near::default());
    let mut receiving = s.clone();
    receiving.apply(&begin(&s, "c", 3, 1, MigrationReason::Manual, 0)).unwrap();
    assert_eq!(p.round(&receiving, &l, 10_000, &TH, &BTreeSet::new(), &Near::default()), None, "receiving");
    let m = p.round(&s, &l, 10_000, &TH, &BTreeSet::new(), &Near::default());
    assert_eq!(m.map(|m| m.from), Some(NodeId(1)), "once the migration is over it sheds");
}

#[test]
fn a_task_that_would_overload_any_target_stays_put() {
    let s = mesh(2, &[("hog", 1)]);
    let l = loads(&s, &BTreeMap::from([("hog", 0.95)]));
    let mut p = Overload::default();
    p.round(&s, &l, 0, &TH, &BTreeSet::new(), &Near::default());
    assert_eq!(p.round(&s, &l, 60_000, &TH, &BTreeSet::new(), &Near::default()), None);
}

/// Two loaded hubs and two idle, with the loads following every move, for 60 rounds of a
/// second without a cooldown: the moves settle, no task ever returns to a hub it left, and no
/// hub is left above high.
#[test]
fn loaded_hubs_do_not_ping_pong() {
    let mut s = mesh(4, &[("a", 1), ("b", 1), ("c", 2), ("d", 2)]);
    let cores = BTreeMap::from([("a", 0.5), ("b", 0.45), ("c", 0.5), ("d", 0.4)]);
    let th = Thresholds { window_ms: 3_000, cooldown_ms: 0, ..TH };
    let mut p = Overload::default();
    let mut left: BTreeMap<String, BTreeSet<NodeId>> = BTreeMap::new();
    let mut moves = Vec::new();
    for tick in 0..60u64 {
        let now = tick * 1000;
        let l = loads(&s, &cores);
        if let Some(m) = p.round(&s, &l, now, &th, &BTreeSet::new(), &Near::default()) {
            assert!(!left.get(&m.task).is_some_and(|l| l.contains(&m.to)), "{m:?} goes back after {moves:?}");
            left.entry(m.task.clone()).or_default().insert(m.from);
            apply(&mut s, &m, now);
            moves.push((tick, m));
        }
    }
    assert!(!moves.is_empty(), "the idle hub takes load");
    assert!(moves.iter().all(|(tick, _)| *tick < 30), "settled: {moves:?}");
    for (n, l) in loads(&s, &cores) {
        assert!(l.score() <= th.high, "hub {n} left above high: {l:?}");
    }
}

#[test]
fn a_queue_that_travels_with_its_task_moves_nothing() {
    let s = mesh(2, &[("busy", 1), ("light", 1)]);
    let mut l = loads(&s, &BTreeMap::from([("busy", 0.2), ("light", 0.2)]));
    // busy's own queue makes the hub's score (wait 2x the full mark); moving light would not
    // lower it, and moving busy would only carry the queue along.
    l.get_mut(&NodeId(1)).unwrap().tasks.get_mut("busy").unwrap().wait = 2.0;
    assert!(l[&NodeId(1)].score() > TH.high);
    let mut p = Overload::default();
    p.round(&s, &l, 0, &TH, &BTreeSet::new(), &Near::default());
    assert_eq!(p.round(&s, &l, 60_000, &TH, &BTreeSet::new(), &Near::default()), None);
}
