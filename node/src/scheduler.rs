//! Placement policy, run on the leader only. Pure: it reads a `ClusterState` and returns the
//! commands that would fix it, so tests check its exact output.
//!
//! Policy: every task wants one instance (instance 0). An instance is (re)placed when it has no
//! placement or its hub is gone, down, draining, a witness (witnesses never run tasks) or no longer
//! has the labels the task is constrained to (`--on room=attic`). Capacity is both instance slots
//! and memory: the memory caps of a hub's instances must fit in the memory it offers. The chosen hub
//! is the `Up` hub with the most free slots (ties: most free memory, then lowest id). A task that
//! fits nowhere stays pending, with a reason.

use std::collections::BTreeMap;

use hubmesh_consensus::state::{ClusterState, NodeRecord, NodeStatus, TaskRecord};
use hubmesh_consensus::{Command, NodeId};

/// What is placed on one hub.
#[derive(Debug, Clone, Copy, Default)]
struct Used {
    instances: u32,
    memory: u64,
}

impl Used {
    fn add(&mut self, task: &TaskRecord) {
        self.instances += 1;
        self.memory = self.memory.saturating_add(task.spec.limits.memory_bytes);
    }
}

/// What is placed on each hub.
fn load(state: &ClusterState) -> BTreeMap<NodeId, Used> {
    let mut load: BTreeMap<NodeId, Used> = state.nodes.keys().map(|id| (*id, Used::default())).collect();
    for t in state.tasks.values() {
        for p in t.instances.values() {
            load.entry(p.node).or_default().add(t);
        }
    }
    load
}

fn fits(n: &NodeRecord, task: &TaskRecord) -> bool {
    n.status == NodeStatus::Up && !n.witness && task.spec.constraints.iter().all(|(k, v)| n.labels.get(k) == Some(v))
}

fn usable(state: &ClusterState, node: NodeId, task: &TaskRecord) -> bool {
    state.nodes.get(&node).is_some_and(|n| fits(n, task))
}

/// The placements the leader should propose now.
pub fn plan(state: &ClusterState) -> Vec<Command> {
    let mut load = load(state);
    let mut out = Vec::new();
    for (name, task) in &state.tasks {
        // Replicas spread: one instance of a task per hub.
        let mut hosts: Vec<NodeId> =
            task.placements().filter(|(_, p)| usable(state, p.node, task)).map(|(_, p)| p.node).collect();
        for instance in task.spec.wanted() {
            let current = task.instances.get(&instance).copied();
            if current.is_some_and(|p| usable(state, p.node, task)) {
                continue;
            }
            let Some(node) = pick(state, &load, task, &hosts) else { continue };
            load.entry(node).or_default().add(task);
            hosts.push(node);
            out.push(Command::PlaceInstance { task: name.clone(), instance, node, expected: current.map(|p| p.epoch) });
        }
    }
    out
}

fn pick(state: &ClusterState, load: &BTreeMap<NodeId, Used>, task: &TaskRecord, taken: &[NodeId]) -> Option<NodeId> {
    state
        .nodes
        .values()
        .filter(|n| fits(n, task) && !taken.contains(&n.id))
        .filter_map(|n| {
            let used = load.get(&n.id).copied().unwrap_or_default();
            let free_memory = n.memory_bytes.saturating_sub(used.memory);
            let room = used.instances < n.slots && task.spec.limits.memory_bytes <= free_memory;
            room.then_some((n.slots - used.instances, free_memory, n.id))
        })
        .max_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.cmp(&a.2)))
        .map(|(_, _, id)| id)
}

/// Why `task` has no placement, for `task list`.
pub fn pending_reason(state: &ClusterState, task: &str) -> Option<String> {
    let t = state.tasks.get(task)?;
    if t.placements().any(|(_, p)| usable(state, p.node, t)) {
        return None;
    }
    if state.nodes.values().all(|n| n.status != NodeStatus::Up) {
        return Some("no hub is up".into());
    }
    if !state.nodes.values().any(|n| fits(n, t)) {
        let wanted: Vec<String> = t.spec.constraints.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Some(format!("no hub that is up (and not a witness) has the labels {}", wanted.join(",")));
    }
    if pick(state, &load(state), t, &[]).is_none() {
        return Some(format!(
            "no hub that qualifies has a free instance slot and {} of free task memory",
            bytesize::ByteSize(t.spec.limits.memory_bytes)
        ));
    }
    Some("waiting for the leader to place it".into())
}

#[cfg(test)]
mod tests {
    use hubmesh_consensus::state::{CheckpointPolicy, DeployMode, Limits, NodeRecord, TaskKind, TaskSpec};
    use hubmesh_consensus::Epoch;
    use hubmesh_storage::Hash;

    use super::*;

    fn node(id: u64, slots: u32, status: NodeStatus) -> Command {
        labelled_node(id, slots, status, &[])
    }

    pub(super) fn labelled_node(id: u64, slots: u32, status: NodeStatus, labels: &[(&str, &str)]) -> Command {
        Command::RegisterNode {
            node: NodeRecord {
                id: NodeId(id),
                name: format!("h{id}"),
                api_addr: String::new(),
                mesh_addr: String::new(),
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                slots,
                memory_bytes: 1 << 30,
                witness: false,
                cert_fingerprint: String::new(),
                status,
            },
        }
    }

    fn deploy(name: &str) -> Command {
        constrained_deploy(name, TaskKind::Stateful, &[])
    }

    pub(super) fn constrained_deploy(name: &str, kind: TaskKind, constraints: &[(&str, &str)]) -> Command {
        Command::DeployTask {
            spec: TaskSpec {
                name: name.into(),
                kind,
                module_hash: Hash::of(b"m"),
                source_hash: Hash::of(b"s"),
                limits: Limits { memory_bytes: 1, timeout_ms: 1, max_input_bytes: 1, max_output_bytes: 1, queue: 1 },
                checkpoint: CheckpointPolicy::None,
                tick_ms: None,
                constraints: constraints.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                replicas: 1,
            },
            mode: DeployMode::Create,
            at_ms: 0,
        }
    }

    fn state(cmds: &[Command]) -> ClusterState {
        let mut s = ClusterState::default();
        for c in cmds {
            s.apply(c).unwrap();
        }
        s
    }

    #[test]
    fn places_unplaced_tasks_on_the_emptiest_up_hub() {
        let s = state(&[
            node(1, 1, NodeStatus::Up),
            node(2, 5, NodeStatus::Up),
            node(3, 9, NodeStatus::Down),
            deploy("a"),
            deploy("b"),
        ]);
        assert_eq!(
            plan(&s),
            vec![
                Command::PlaceInstance { task: "a".into(), instance: 0, node: NodeId(2), expected: None },
                Command::PlaceInstance { task: "b".into(), instance: 0, node: NodeId(2), expected: None },
            ]
        );
    }

    #[test]
    fn full_hubs_leave_tasks_pending_with_a_reason() {
        let mut s = state(&[node(1, 1, NodeStatus::Up), deploy("a"), deploy("b")]);
        for c in plan(&s) {
            s.apply(&c).unwrap();
        }
        assert_eq!(s.placement("a", 0).map(|p| p.node), Some(NodeId(1)));
        assert!(plan(&s).is_empty());
        assert_eq!(pending_reason(&s, "a"), None);
        assert!(pending_reason(&s, "b").unwrap().contains("slot"));
    }

    #[test]
    fn memory_caps_must_fit_in_the_memory_a_hub_offers() {
        // Hub 1 has the most slots but room for one 600 MiB task only; hub 2 has room for one more.
        let mut s =
            state(&[node(1, 9, NodeStatus::Up), node(2, 5, NodeStatus::Up), deploy("a"), deploy("b"), deploy("c")]);
        for (id, mib) in [(1, 1000), (2, 700)] {
            let mut n = s.nodes[&NodeId(id)].clone();
            n.memory_bytes = mib << 20;
            s.apply(&Command::RegisterNode { node: n }).unwrap();
        }
        for t in s.tasks.values_mut() {
            t.spec.limits.memory_bytes = 600 << 20;
        }
        assert_eq!(
            plan(&s),
            vec![
                Command::PlaceInstance { task: "a".into(), instance: 0, node: NodeId(1), expected: None },
                Command::PlaceInstance { task: "b".into(), instance: 0, node: NodeId(2), expected: None },
            ]
        );
        for c in plan(&s) {
            s.apply(&c).unwrap();
        }
        let reason = pending_reason(&s, "c").unwrap();
        assert!(reason.contains("600.0 MiB") && reason.contains("memory"), "{reason}");
        // Capacity appears (task a goes away): c is placed.
        s.apply(&Command::DeleteTask { name: "a".into() }).unwrap();
        assert_eq!(
            plan(&s),
            vec![Command::PlaceInstance { task: "c".into(), instance: 0, node: NodeId(1), expected: None }]
        );
    }

    #[test]
    fn instances_of_a_down_hub_are_replaced_with_the_seen_epoch() {
        let mut s = state(&[node(1, 4, NodeStatus::Up), deploy("a")]);
        for c in plan(&s) {
            s.apply(&c).unwrap();
        }
        s.apply(&node(1, 4, NodeStatus::Down)).unwrap();
        s.apply(&node(2, 4, NodeStatus::Up)).unwrap();
        assert_eq!(
            plan(&s),
            vec![Command::PlaceInstance { task: "a".into(), instance: 0, node: NodeId(2), expected: Some(Epoch(1)) }]
        );
    }
}

#[cfg(test)]
mod constraint_tests {
    use hubmesh_consensus::state::TaskKind;

    use super::tests::{constrained_deploy, labelled_node};
    use super::*;

    fn node(id: u64, room: &str) -> Command {
        labelled_node(id, 10, NodeStatus::Up, &[("room", room)])
    }

    fn deploy(name: &str, room: &str) -> Command {
        constrained_deploy(name, TaskKind::Stateless, &[("room", room)])
    }

    #[test]
    fn replicas_spread_one_per_hub() {
        let mut s = ClusterState::default();
        for c in [node(1, "a"), node(2, "a"), deploy("web", "a")] {
            s.apply(&c).unwrap();
        }
        if let Some(t) = s.tasks.get_mut("web") {
            t.spec.replicas = 3;
        }
        let p = plan(&s);
        let nodes: Vec<NodeId> = p
            .iter()
            .map(|c| match c {
                Command::PlaceInstance { node, .. } => *node,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(nodes.len(), 2, "two hubs, so two of three replicas: {p:?}");
        assert_ne!(nodes[0], nodes[1]);
    }

    #[test]
    fn tasks_go_only_to_hubs_with_their_labels() {
        let mut s = ClusterState::default();
        for c in [node(1, "attic"), node(2, "cellar"), deploy("fan", "attic"), deploy("pump", "garage")] {
            s.apply(&c).unwrap();
        }
        assert_eq!(
            plan(&s),
            vec![Command::PlaceInstance { task: "fan".into(), instance: 0, node: NodeId(1), expected: None }]
        );
        assert!(pending_reason(&s, "pump").unwrap().contains("room=garage"));
    }
}
