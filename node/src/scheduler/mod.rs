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
//!
//! A task deployed `--near DEVICE` goes only to hubs that see the device ([`Near`], the leader's
//! device registry), the one that saw it last first, and fails over or migrates only to such
//! hubs; when its hub stops seeing the device and another sees it, the leader moves it there by
//! live migration ([`follow`]). When none sees it, it is pending.
//!
//! Tasks on a draining hub move by live migration ([`drain`]: the leader defers their re-placement
//! while it migrates them one by one; the re-placement from the checkpoint is the fallback), and
//! an overloaded hub sheds tasks the same way ([`overload`]).

use std::collections::{BTreeMap, BTreeSet};

use hubmesh_consensus::state::{CheckpointPolicy, ClusterState, NodeRecord, NodeStatus, TaskKind, TaskRecord};
use hubmesh_consensus::{Command, NodeId};

pub mod drain;
pub mod follow;
pub mod overload;

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
        // A migration under way takes its room on the target already: two at once must not
        // pick the same last slot.
        if let Some(m) = &t.migration {
            load.entry(m.to).or_default().add(t);
        }
    }
    load
}

/// Which hubs see each LAN device, the one that saw it last first (the leader's device registry,
/// hubs in reach only): where a task deployed `--near` the device may go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Near(BTreeMap<String, Vec<NodeId>>);

impl Near {
    pub fn new(seen_by: BTreeMap<String, Vec<NodeId>>) -> Self {
        Self(seen_by)
    }

    /// Whether `node` may take `task`: the task is near no device, or `node` sees it.
    fn allows(&self, task: &TaskRecord, node: NodeId) -> bool {
        self.rank(task, node).is_some()
    }

    /// 0 for the hub that saw the task's device last, 1 for the next…; 0 for every hub when the
    /// task is near no device; `None` for a hub that does not see it.
    fn rank(&self, task: &TaskRecord, node: NodeId) -> Option<usize> {
        match &task.spec.near {
            None => Some(0),
            Some(d) => self.0.get(d)?.iter().position(|n| *n == node),
        }
    }
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

/// The placements the leader should propose now, then the holder changes (no device is seen:
/// tasks deployed `--near` one stay pending; see [`plan_deferring`]).
pub fn plan(state: &ClusterState) -> Vec<Command> {
    plan_deferring(state, &BTreeSet::new(), &Near::default())
}

/// Like [`plan`], with the devices the hubs see, and the instance 0 of the tasks in `deferred`
/// left where it is even if its hub is draining: the leader is moving it by live migration (see
/// [`drain`]).
pub fn plan_deferring(state: &ClusterState, deferred: &BTreeSet<String>, near: &Near) -> Vec<Command> {
    let mut out = place(state, deferred, near);
    out.extend(holders(state));
    out
}

fn place(state: &ClusterState, deferred: &BTreeSet<String>, near: &Near) -> Vec<Command> {
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
            let draining =
                current.is_some_and(|p| state.nodes.get(&p.node).is_some_and(|n| n.status == NodeStatus::Draining));
            if instance == 0 && draining && deferred.contains(name) {
                continue;
            }
            let copies = live_copies(state, task);
            if copies.as_ref().is_some_and(|c| c.is_empty()) {
                continue; // unavailable: see pending_reason
            }
            let preferred = copies.unwrap_or_default();
            let Some(node) = pick_preferring(state, &load, near, task, &hosts, &preferred) else { continue };
            let reason = match current.and_then(|p| state.nodes.get(&p.node)) {
                None if current.is_none() => "placed",
                Some(n) if matches!(n.status, NodeStatus::Up | NodeStatus::Draining) => "moved",
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
pub fn migration_target(state: &ClusterState, near: &Near, task: &str, to: Option<NodeId>) -> Result<NodeId, String> {
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
        if let (Some(device), false) = (&t.spec.near, near.allows(t, to)) {
            return Err(format!("hub {to} does not see the device {device:?} the task is placed near"));
        }
        let others: Vec<NodeId> = state.nodes.keys().copied().filter(|n| *n != to).collect();
        return match pick(state, &load, near, t, &others) {
            Some(n) if n == to => Ok(to),
            _ => Err(format!("hub {to} has no free instance slot or not enough free task memory")),
        };
    }
    let mut preferred: Vec<NodeId> = t.holders.clone();
    preferred.extend(t.checkpoint.iter().flat_map(|c| c.stored_on.iter().copied()));
    preferred.retain(|n| state.is_up(*n));
    pick_preferring(state, &load, near, t, &taken, &preferred).ok_or_else(|| match &t.spec.near {
        Some(device) => format!(
            "no other hub that sees the device {device:?} is up with the task's labels, a free slot and the memory"
        ),
        None => "no other hub that is up has the task's labels, a free slot and the memory".to_owned(),
    })
}

/// Like [`pick`], but a hub in `preferred` that qualifies wins.
fn pick_preferring(
    state: &ClusterState,
    load: &BTreeMap<NodeId, Used>,
    near: &Near,
    task: &TaskRecord,
    taken: &[NodeId],
    preferred: &[NodeId],
) -> Option<NodeId> {
    let mut others: Vec<NodeId> = taken.to_vec();
    others.extend(state.nodes.keys().filter(|n| !preferred.contains(n)));
    pick(state, load, near, task, &others).or_else(|| pick(state, load, near, task, taken))
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

/// The hub with the most free slots (then free memory, then lowest id) among those that fit the
/// task, are not `taken` and see its device; of those, the one that saw the device last wins.
fn pick(
    state: &ClusterState,
    load: &BTreeMap<NodeId, Used>,
    near: &Near,
    task: &TaskRecord,
    taken: &[NodeId],
) -> Option<NodeId> {
    state
        .nodes
        .values()
        .filter(|n| fits(n, task) && !taken.contains(&n.id))
        .filter_map(|n| {
            let rank = near.rank(task, n.id)?;
            let used = load.get(&n.id).copied().unwrap_or_default();
            let free_memory = n.memory_bytes.saturating_sub(used.memory);
            let room = used.instances < n.slots && task.spec.limits.memory_bytes <= free_memory;
            room.then_some((std::cmp::Reverse(rank), n.slots - used.instances, free_memory, std::cmp::Reverse(n.id)))
        })
        .max()
        .map(|(_, _, _, id)| id.0)
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
    /// The task is placed near a device that no hub in reach sees.
    #[error("no hub sees {0}")]
    NoHubSees(String),
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
pub fn pending_reason(state: &ClusterState, near: &Near, task: &str) -> Option<Pending> {
    let t = state.tasks.get(task)?;
    // A task on a draining hub runs and answers there until its migration moves it.
    let draining = |n: NodeId| state.nodes.get(&n).is_some_and(|r| r.status == NodeStatus::Draining);
    if t.placements().any(|(_, p)| usable(state, p.node, t) || draining(p.node)) {
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
    if let Some(device) = &t.spec.near {
        if !state.nodes.values().any(|n| fits(n, t) && near.allows(t, n.id)) {
            return Some(Pending::NoHubSees(device.clone()));
        }
    }
    if pick(state, &load(state), near, t, &[]).is_none() {
        return Some(Pending::NoRoom { memory: bytesize::ByteSize(t.spec.limits.memory_bytes) });
    }
    Some(Pending::WaitingForLeader)
}

#[cfg(test)]
pub(crate) mod tests;
