//! Placement policy, run on the leader only. Pure: it reads a `ClusterState` and returns the
//! commands that would fix it, so tests check its exact output.
//!
//! Policy: every task wants one instance (instance 0). An instance is (re)placed when it has no
//! placement or its hub is gone, down, draining, a witness (witnesses never run tasks) or no longer
//! has the labels the task is constrained to (`--on room=attic`). Capacity is both instance slots
//! and memory: the memory caps of a hub's instances must fit in the memory it offers. The chosen hub
//! is the `Up` hub with the most free slots (ties: most free memory, then lowest id). A task that
//! fits nowhere stays pending, with a reason.
//!
//! Stateful tasks with checkpoints: the leader also picks their **holders** (up to
//! `state_replicas` hubs, never the host, spread over the hubs holding least), and a failover
//! goes to a live hub that stores the committed checkpoint first (it restores without fetching).
//! When every hub that stores it is down, the task is not placed at all: it waits, unavailable
//! with a reason, rather than restart empty.

use std::collections::BTreeMap;

use hubmesh_consensus::state::{CheckpointPolicy, ClusterState, NodeRecord, NodeStatus, TaskKind, TaskRecord};
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

/// Hubs that are up and store the task's committed checkpoint (`None`: it has none).
fn live_copies(state: &ClusterState, task: &TaskRecord) -> Option<Vec<NodeId>> {
    let c = task.checkpoint.as_ref()?;
    Some(c.stored_on.iter().copied().filter(|n| state.is_up(*n)).collect())
}

/// The placements the leader should propose now, then the holder changes.
pub fn plan(state: &ClusterState) -> Vec<Command> {
    let mut out = place(state);
    out.extend(holders(state));
    out
}

fn place(state: &ClusterState) -> Vec<Command> {
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
            let copies = live_copies(state, task);
            if copies.as_ref().is_some_and(|c| c.is_empty()) {
                continue; // unavailable: see pending_reason
            }
            let preferred = copies.unwrap_or_default();
            let Some(node) = pick_preferring(state, &load, task, &hosts, &preferred) else { continue };
            let reason = match current.and_then(|p| state.nodes.get(&p.node)) {
                None if current.is_none() => "placed",
                Some(n) if n.status == NodeStatus::Up => "moved",
                _ => "failover",
            };
            out.push(Command::Note { at_ms: hubmesh_consensus::now_ms(), reason: reason.into() });
            load.entry(node).or_default().add(task);
            hosts.push(node);
            out.push(Command::PlaceInstance { task: name.clone(), instance, node, expected: current.map(|p| p.epoch) });
        }
    }
    out
}

/// Where a live migration of `task`'s instance should go: `to` if it qualifies, else the hub
/// the scheduler would pick, preferring one that already stores the task's checkpoint (only the
/// pages changed since travel). `Err` says why no hub (or not `to`) can take it.
pub fn migration_target(state: &ClusterState, task: &str, to: Option<NodeId>) -> Result<NodeId, String> {
    let t = state.tasks.get(task).ok_or_else(|| format!("no task named {task:?}"))?;
    let load = load(state);
    let taken: Vec<NodeId> = t.placements().map(|(_, p)| p.node).collect();
    if let Some(to) = to {
        let n = state.nodes.get(&to).ok_or_else(|| format!("no hub with id {to}"))?;
        if !fits(n, t) {
            return Err(format!("hub {to} is not up, is a witness or lacks the task's labels"));
        }
        if taken.contains(&to) {
            return Err(format!("the task already runs on hub {to}"));
        }
        return match pick(state, &load, t, &state.nodes.keys().copied().filter(|n| *n != to).collect::<Vec<_>>()) {
            Some(n) if n == to => Ok(to),
            _ => Err(format!("hub {to} has no free instance slot or not enough free task memory")),
        };
    }
    let mut preferred: Vec<NodeId> = t.holders.clone();
    preferred.extend(t.checkpoint.iter().flat_map(|c| c.stored_on.iter().copied()));
    preferred.retain(|n| state.is_up(*n));
    pick_preferring(state, &load, t, &taken, &preferred)
        .ok_or_else(|| "no other hub that is up has the task's labels, a free slot and the memory".to_owned())
}

/// Like [`pick`], but a hub in `preferred` that qualifies wins.
fn pick_preferring(
    state: &ClusterState,
    load: &BTreeMap<NodeId, Used>,
    task: &TaskRecord,
    taken: &[NodeId],
    preferred: &[NodeId],
) -> Option<NodeId> {
    let mut others: Vec<NodeId> = taken.to_vec();
    others.extend(state.nodes.keys().filter(|n| !preferred.contains(n)));
    pick(state, load, task, &others).or_else(|| pick(state, load, task, taken))
}

/// Holder changes: each checkpointed stateful task keeps the live holders it has and gets more,
/// up to `state_replicas`, from the up hubs (not witnesses, not its host) that hold fewest.
fn holders(state: &ClusterState) -> Vec<Command> {
    let mut held: BTreeMap<NodeId, usize> = BTreeMap::new();
    for t in state.tasks.values() {
        for h in &t.holders {
            *held.entry(*h).or_default() += 1;
        }
    }
    let mut out = Vec::new();
    for (name, task) in &state.tasks {
        if task.spec.kind != TaskKind::Stateful || task.spec.checkpoint == CheckpointPolicy::None {
            continue;
        }
        let Some(host) = task.instances.get(&0).map(|p| p.node) else { continue };
        let eligible = |n: &NodeRecord| n.status == NodeStatus::Up && !n.witness && n.id != host;
        let mut want: Vec<NodeId> =
            task.holders.iter().copied().filter(|h| state.nodes.get(h).is_some_and(eligible)).collect();
        let mut candidates: Vec<&NodeRecord> =
            state.nodes.values().filter(|n| eligible(n) && !want.contains(&n.id)).collect();
        candidates.sort_by_key(|n| (held.get(&n.id).copied().unwrap_or(0), n.id));
        for n in candidates {
            if want.len() >= task.spec.state_replicas as usize {
                break;
            }
            want.push(n.id);
            *held.entry(n.id).or_default() += 1;
        }
        want.truncate(task.spec.state_replicas as usize);
        if want != task.holders {
            out.push(Command::SetHolders { task: name.clone(), holders: want });
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

/// Why a task has no usable placement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Pending {
    /// Every hub that stores its committed checkpoint is down: it never restarts without it.
    #[error(
        "unavailable: every hub that stores its last checkpoint (sequence {sequence}) is down (hubs {}); \
         it will not restart without its state",
        stored_on.iter().map(|n| n.0.to_string()).collect::<Vec<_>>().join(", ")
    )]
    StateUnavailable { sequence: u64, stored_on: Vec<NodeId> },
    /// No hub is up at all.
    #[error("no hub is up")]
    NoHubUp,
    /// No hub that is up carries the task's labels.
    #[error("no hub that is up (and not a witness) has the labels {0}")]
    NoHubWithLabels(String),
    /// Hubs qualify but none has a free slot and the memory.
    #[error("no hub that qualifies has a free instance slot and {memory} of free task memory")]
    NoRoom { memory: bytesize::ByteSize },
    /// A hub qualifies: the leader will place it.
    #[error("waiting for the leader to place it")]
    WaitingForLeader,
}

impl Pending {
    /// Whether waiting will place the task (the leader just has not yet).
    pub fn resolves_by_waiting(&self) -> bool {
        *self == Self::WaitingForLeader
    }
}

/// Why `task` has no usable placement, or `None` when it has one.
pub fn pending_reason(state: &ClusterState, task: &str) -> Option<Pending> {
    let t = state.tasks.get(task)?;
    if t.placements().any(|(_, p)| usable(state, p.node, t)) {
        return None;
    }
    if let (Some(c), Some(copies)) = (&t.checkpoint, live_copies(state, t)) {
        if copies.is_empty() {
            return Some(Pending::StateUnavailable { sequence: c.sequence, stored_on: c.stored_on.clone() });
        }
    }
    if state.nodes.values().all(|n| n.status != NodeStatus::Up) {
        return Some(Pending::NoHubUp);
    }
    if !state.nodes.values().any(|n| fits(n, t)) {
        let wanted: Vec<String> = t.spec.constraints.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Some(Pending::NoHubWithLabels(wanted.join(",")));
    }
    if pick(state, &load(state), t, &[]).is_none() {
        return Some(Pending::NoRoom { memory: bytesize::ByteSize(t.spec.limits.memory_bytes) });
    }
    Some(Pending::WaitingForLeader)
}

#[cfg(test)]
mod tests {
    use hubmesh_consensus::state::{CheckpointPolicy, DeployMode, Limits, NodeRecord, TaskKind, TaskSpec};
    use hubmesh_consensus::Epoch;
    use hubmesh_storage::Hash;

    use super::*;

    /// The plan without its history notes.
    pub(super) fn places(s: &ClusterState) -> Vec<Command> {
        plan(s).into_iter().filter(|c| !matches!(c, Command::Note { .. })).collect()
    }

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
                state_replicas: 2,
                pinned: false,
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
            places(&s),
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
        assert!(places(&s).is_empty());
        assert_eq!(pending_reason(&s, "a"), None);
        assert!(pending_reason(&s, "b").unwrap().to_string().contains("slot"));
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
            places(&s),
            vec![
                Command::PlaceInstance { task: "a".into(), instance: 0, node: NodeId(1), expected: None },
                Command::PlaceInstance { task: "b".into(), instance: 0, node: NodeId(2), expected: None },
            ]
        );
        for c in plan(&s) {
            s.apply(&c).unwrap();
        }
        let reason = pending_reason(&s, "c").unwrap().to_string();
        assert!(reason.contains("600.0 MiB") && reason.contains("memory"), "{reason}");
        // Capacity appears (task a goes away): c is placed.
        s.apply(&Command::DeleteTask { name: "a".into() }).unwrap();
        assert_eq!(
            places(&s),
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
            places(&s),
            vec![Command::PlaceInstance { task: "a".into(), instance: 0, node: NodeId(2), expected: Some(Epoch(1)) }]
        );
    }
}

#[cfg(test)]
mod constraint_tests {
    use hubmesh_consensus::state::TaskKind;

    use super::tests::{constrained_deploy, labelled_node, places};
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
        let p = places(&s);
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
            places(&s),
            vec![Command::PlaceInstance { task: "fan".into(), instance: 0, node: NodeId(1), expected: None }]
        );
        assert!(pending_reason(&s, "pump").unwrap().to_string().contains("room=garage"));
    }

    #[test]
    fn holders_spread_never_the_host_and_failover_prefers_a_live_holder() {
        use hubmesh_consensus::state::{CheckpointPolicy, CheckpointRecord};
        use hubmesh_storage::Hash;
        let mut s = ClusterState::default();
        for c in [node(1, "a"), node(2, "a"), node(3, "a"), node(4, "a")] {
            s.apply(&c).unwrap();
        }
        for name in ["x", "y"] {
            s.apply(&constrained_deploy(name, TaskKind::Stateful, &[])).unwrap();
            s.tasks.get_mut(name).unwrap().spec.checkpoint = CheckpointPolicy::Durable;
        }
        for c in plan(&s) {
            s.apply(&c).unwrap();
        }
        for c in plan(&s) {
            s.apply(&c).unwrap();
        }
        assert!(plan(&s).is_empty(), "stable: {:?}", plan(&s));
        let (x, y) = (&s.tasks["x"], &s.tasks["y"]);
        for t in [x, y] {
            assert_eq!(t.holders.len(), 2, "{t:?}");
            assert!(!t.holders.contains(&t.instances[&0].node));
        }
        // Four holder slots over the hubs: no hub holds both tasks' checkpoints twice over.
        let mut all: Vec<NodeId> = x.holders.iter().chain(&y.holders).copied().collect();
        all.sort();
        all.dedup();
        assert!(all.len() >= 3, "spread: {all:?}");

        // x's host dies after a checkpoint stored on it and on its holders.
        let host = x.instances[&0].node;
        let epoch = x.instances[&0].epoch;
        let holder = x.holders[1];
        let record = CheckpointRecord {
            version: 1,
            epoch,
            sequence: 4,
            manifest_hash: Hash::of(b"m"),
            stored_on: vec![host, x.holders[0], holder],
            size_bytes: 0,
            at_ms: 0,
        };
        s.apply(&Command::CommitCheckpoint { task: "x".into(), record, based_on: None }).unwrap();
        let dead = s.tasks["x"].holders[0];
        for n in [host, dead] {
            let mut r = s.nodes[&n].clone();
            r.status = NodeStatus::Down;
            s.apply(&Command::RegisterNode { node: r }).unwrap();
        }
        let p = places(&s);
        assert!(
            p.contains(&Command::PlaceInstance { task: "x".into(), instance: 0, node: holder, expected: Some(epoch) }),
            "{p:?}"
        );
        // Every hub with the checkpoint down: x waits, unavailable, and is not restarted empty.
        let mut r = s.nodes[&holder].clone();
        r.status = NodeStatus::Down;
        s.apply(&Command::RegisterNode { node: r }).unwrap();
        assert!(!places(&s).iter().any(|c| matches!(c, Command::PlaceInstance { task, .. } if task == "x")));
        assert!(
            matches!(pending_reason(&s, "x"), Some(Pending::StateUnavailable { .. })),
            "{:?}",
            pending_reason(&s, "x")
        );
    }
}
