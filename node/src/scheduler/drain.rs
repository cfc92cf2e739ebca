//! Drain by live migration (design §7): the leader moves the tasks off a draining hub one at a
//! time by migrating them, so that nothing is lost in any checkpoint mode, and holds back their
//! re-placement meanwhile. Falling back to a re-placement from the last checkpoint loses nothing
//! only for a durable task (its committed checkpoint holds every acknowledged update): so a
//! durable task whose migration failed [`MAX_ATTEMPTS`] times is left to the ordinary re-placement,
//! and any other task keeps being migrated (with a back-off) for as long as its hub answers. A
//! draining hub that goes silent (the leader's judgement, `silent`) keeps its status, but its
//! tasks fail over like a dead hub's. Pure.

use std::collections::{BTreeMap, BTreeSet};

use hubmesh_consensus::state::{CheckpointPolicy, ClusterState, NodeStatus, TaskRecord};
use hubmesh_consensus::NodeId;

/// Failed migrations of a durable task before its drain falls back to a re-placement.
pub const MAX_ATTEMPTS: u32 = 3;

/// The tasks whose instance 0 runs on a draining hub that is not silent and that the leader
/// still migrates (some other hub can take them; a durable one has failed fewer than
/// [`MAX_ATTEMPTS`] times).
pub fn deferred(
    state: &ClusterState,
    near: &super::Near,
    attempts: &BTreeMap<String, u32>,
    silent: &BTreeSet<NodeId>,
) -> BTreeSet<String> {
    state
        .tasks
        .iter()
        .filter(|(name, t)| {
            let Some(host) = t.instances.get(&0).map(|p| p.node) else { return false };
            let draining = state.nodes.get(&host).is_some_and(|n| n.status == NodeStatus::Draining);
            let given_up = durable(t) && attempts.get(*name).copied().unwrap_or(0) >= MAX_ATTEMPTS;
            draining
                && !silent.contains(&host)
                && !given_up
                && (t.migration.is_some() || super::migration_target(state, near, name, None).is_ok())
        })
        .map(|(name, _)| name.clone())
        .collect()
}

fn durable(t: &TaskRecord) -> bool {
    t.spec.checkpoint == CheckpointPolicy::Durable
}

/// The next migration of each draining hub that has none under way (`busy`: hubs that are the
/// source of a migration, in the state or being asked for), as (task, its hub). Tasks in
/// `resting` (a failed attempt a moment ago) wait their turn.
pub fn next(
    state: &ClusterState,
    near: &super::Near,
    attempts: &BTreeMap<String, u32>,
    silent: &BTreeSet<NodeId>,
    busy: &BTreeSet<NodeId>,
    resting: &BTreeSet<String>,
) -> Vec<(String, NodeId)> {
    let mut busy = busy.clone();
    busy.extend(state.tasks.values().filter_map(|t| t.migration.map(|m| m.from)));
    let mut out = Vec::new();
    for name in deferred(state, near, attempts, silent) {
        let t = &state.tasks[&name];
        let from = t.instances[&0].node;
        if t.migration.is_none() && !resting.contains(&name) && busy.insert(from) {
            out.push((name, from));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use hubmesh_consensus::state::{CheckpointPolicy, TaskKind};
    use hubmesh_consensus::Command;

    use super::super::tests::{constrained_deploy, labelled_node};
    use super::*;

    fn drained_state() -> ClusterState {
        let mut s = ClusterState::default();
        for c in [
            labelled_node(1, 10, NodeStatus::Up, &[]),
            labelled_node(2, 10, NodeStatus::Up, &[]),
            constrained_deploy("a", TaskKind::Stateful, &[]),
            constrained_deploy("b", TaskKind::Stateless, &[]),
        ] {
            s.apply(&c).unwrap();
        }
        for t in ["a", "b"] {
            s.apply(&Command::PlaceInstance { task: t.into(), instance: 0, node: NodeId(1), expected: None }).unwrap();
        }
        s.apply(&Command::SetNodeStatus { node: NodeId(1), status: NodeStatus::Draining }).unwrap();
        s
    }

    #[test]
    fn tasks_of_a_draining_hub_migrate_one_at_a_time_and_are_not_re_placed_meanwhile() {
        let s = drained_state();
        let attempts = BTreeMap::new();
        let none_silent = BTreeSet::new();
        let deferred = deferred(&s, &super::super::Near::default(), &attempts, &none_silent);
        assert_eq!(deferred, BTreeSet::from(["a".to_owned(), "b".to_owned()]));
        assert!(super::super::plan_deferring(&s, &deferred, &super::super::Near::default())
            .iter()
            .all(|c| !matches!(c, Command::PlaceInstance { .. })));
        // Without the deferral the scheduler would re-place both at once.
        assert_eq!(super::super::tests::places(&s).len(), 2);
        let none = BTreeSet::new();
        assert_eq!(
            next(&s, &super::super::Near::default(), &attempts, &none_silent, &BTreeSet::new(), &none),
            vec![("a".to_owned(), NodeId(1))]
        );
        let busy = BTreeSet::from([NodeId(1)]);
        assert!(
            next(&s, &super::super::Near::default(), &attempts, &none_silent, &busy, &none).is_empty(),
            "one migration per hub at a time"
        );
        let resting = BTreeSet::from(["a".to_owned()]);
        assert_eq!(
            next(&s, &super::super::Near::default(), &attempts, &none_silent, &BTreeSet::new(), &resting),
            vec![("b".to_owned(), NodeId(1))]
        );
        // A silent draining hub's tasks are not waited for: they fail over.
        let silent = BTreeSet::from([NodeId(1)]);
        assert!(super::deferred(&s, &super::super::Near::default(), &attempts, &silent).is_empty());
    }

    #[test]
    fn only_a_durable_task_that_keeps_failing_falls_back_to_a_re_placement() {
        let mut s = drained_state();
        s.tasks.get_mut("a").unwrap().spec.checkpoint = CheckpointPolicy::Durable;
        s.tasks.get_mut("b").unwrap().spec.checkpoint = CheckpointPolicy::Periodic { every_ms: 1000 };
        let attempts = BTreeMap::from([("a".to_owned(), MAX_ATTEMPTS), ("b".to_owned(), MAX_ATTEMPTS + 5)]);
        let none = BTreeSet::new();
        let deferred = deferred(&s, &super::super::Near::default(), &attempts, &none);
        // b's state since its last checkpoint would be lost by a re-placement: it keeps trying.
        assert_eq!(deferred, BTreeSet::from(["b".to_owned()]));
        let plan = super::super::plan_deferring(&s, &deferred, &super::super::Near::default());
        assert!(plan.iter().any(|c| matches!(c, Command::PlaceInstance { task, .. } if task == "a")), "{plan:?}");
        assert!(!plan.iter().any(|c| matches!(c, Command::PlaceInstance { task, .. } if task == "b")), "{plan:?}");
        assert_eq!(
            next(&s, &super::super::Near::default(), &attempts, &none, &BTreeSet::new(), &BTreeSet::new()),
            vec![("b".to_owned(), NodeId(1))]
        );
    }

    #[test]
    fn nothing_is_deferred_when_no_hub_can_take_the_task() {
        let mut s = drained_state();
        s.apply(&Command::SetNodeStatus { node: NodeId(2), status: NodeStatus::Down }).unwrap();
        assert!(deferred(&s, &super::super::Near::default(), &BTreeMap::new(), &BTreeSet::new()).is_empty());
    }
}
