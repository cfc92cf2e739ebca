//! Migrate on overload (design §7): which task an overloaded hub sheds, and to which hub. Pure
//! (the leader feeds it the hubs' latest loads each round; tests feed it synthetic ones).
//!
//! - A hub is **overloaded** once its score (the largest of its CPU, memory and queue-wait
//!   fractions; a task's queue wait travels with it) has stayed above `high` for `window`, with
//!   no migration out of it under way.
//! - It sheds the unpinned task whose move gains most for least state: CPU cores used per MiB of
//!   state (+1 MiB), which has not migrated within `cooldown` (read from the replicated history,
//!   so a new leader keeps it), and whose leaving lowers the hub's score.
//! - The **target** is a hub below `low` whose projected score (its load plus the task's) stays
//!   below `high` and no higher than the source's projected score: the move never makes the
//!   target the more loaded of the two, so the task has no reason to move back (no ping-pong).
//! - One move per round; the source's window starts again after it, so the next decision sees
//!   the load the move left behind.

use std::collections::{BTreeMap, BTreeSet};

use hubmesh_consensus::state::{ClusterState, TaskRecord};
use hubmesh_consensus::NodeId;

/// One hub's load, as fractions of what it offers to tasks (1.0 = all of it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HubLoad {
    /// CPU time its tasks used against the cores it offers.
    pub cpu: f64,
    /// Memory its tasks hold against the task memory it offers.
    pub memory: f64,
    /// Cores it offers to tasks.
    pub task_cpus: f64,
    /// Its tasks, by name.
    pub tasks: BTreeMap<String, TaskLoad>,
}

/// What one task costs its hub.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TaskLoad {
    /// CPU cores it used (CPU seconds per second).
    pub cores: f64,
    /// Bytes of state its instance holds.
    pub memory_bytes: u64,
    /// Its calls' mean queue wait against the wait that counts as full. It travels with the
    /// task: a queue a task makes by itself is no reason to move the others.
    pub wait: f64,
}

impl HubLoad {
    /// The longest queue wait of its tasks (as a fraction of a full one).
    pub fn wait(&self) -> f64 {
        self.tasks.values().map(|t| t.wait).fold(0.0, f64::max)
    }

    /// The hub's score: its most loaded resource.
    pub fn score(&self) -> f64 {
        self.cpu.max(self.memory).max(self.wait())
    }
}

/// A move must lower the source's score by at least this much (else it moves a task for nothing,
/// as when a queue that travels with its task is what makes the score).
const MIN_GAIN: f64 = 0.05;

/// The thresholds (`[overload]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub high: f64,
    pub low: f64,
    pub window_ms: u64,
    pub cooldown_ms: u64,
}

/// A migration the policy asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub task: String,
    pub from: NodeId,
    pub to: NodeId,
}

/// The policy's memory between rounds: since when each hub has been above `high`.
#[derive(Debug, Default)]
pub struct Overload {
    above_since: BTreeMap<NodeId, u64>,
}

impl Overload {
    /// One round: records the loads, and returns the move to make now, if any. `busy`: hubs that
    /// are the source of a migration the leader has asked for and not yet heard the end of.
    pub fn round(
        &mut self,
        state: &ClusterState,
        loads: &BTreeMap<NodeId, HubLoad>,
        now_ms: u64,
        th: &Thresholds,
        busy: &BTreeSet<NodeId>,
        near: &super::Near,
    ) -> Option<Move> {
        self.above_since.retain(|n, _| loads.get(n).is_some_and(|l| l.score() > th.high));
        for (n, l) in loads {
            if l.score() > th.high {
                self.above_since.entry(*n).or_insert(now_ms);
            }
        }
        let mut busy = busy.clone();
        // A target sheds nothing while it receives: its load counts the staged instance, which is
        // no task's yet (and the move under way changes its load anyway).
        busy.extend(state.tasks.values().filter_map(|t| t.migration).flat_map(|m| [m.from, m.to]));
        let mut sources: Vec<(NodeId, &HubLoad)> = self
            .above_since
            .iter()
            .filter(|(n, since)| {
                now_ms.saturating_sub(**since) >= th.window_ms && !busy.contains(n) && state.is_up(**n)
            })
            .map(|(n, _)| (*n, &loads[n]))
            .collect();
        sources.sort_by(|a, b| b.1.score().total_cmp(&a.1.score()).then(a.0.cmp(&b.0)));
        for (from, load) in sources {
            if let Some(m) = shed(state, near, loads, from, load, now_ms, th) {
                // The next decision about this hub waits for reports that show the move.
                self.above_since.insert(from, now_ms);
                return Some(m);
            }
        }
        None
    }
}

/// The best task for `from` to shed, and where to.
fn shed(
    state: &ClusterState,
    near: &super::Near,
    loads: &BTreeMap<NodeId, HubLoad>,
    from: NodeId,
    load: &HubLoad,
    now_ms: u64,
    th: &Thresholds,
) -> Option<Move> {
    let mut candidates: Vec<(&String, TaskLoad)> = load
        .tasks
        .iter()
        .filter(|(name, tl)| {
            tl.cores > 0.0
                && state.tasks.get(*name).is_some_and(|t| {
                    t.instances.get(&0).is_some_and(|p| p.node == from)
                        && !t.spec.pinned
                        && t.migration.is_none()
                        && !migrated_within(t, now_ms, th.cooldown_ms)
                })
        })
        .map(|(name, tl)| (name, *tl))
        .collect();
    let gain = |tl: &TaskLoad| tl.cores / (tl.memory_bytes as f64 / f64::from(1 << 20) + 1.0);
    candidates.sort_by(|a, b| gain(&b.1).total_cmp(&gain(&a.1)).then(a.0.cmp(b.0)));
    for (task, tl) in candidates {
        let source_after = without(load, state.nodes.get(&from).map_or(0, |n| n.memory_bytes), task, tl);
        if source_after > load.score() - MIN_GAIN {
            continue;
        }
        let target = loads
            .iter()
            .filter(|(n, l)| **n != from && l.score() < th.low)
            .filter_map(|(n, l)| {
                let projected = with(l, state.nodes.get(n)?.memory_bytes, tl);
                (projected < th.high && projected <= source_after).then_some((projected, *n))
            })
            .filter(|(_, n)| super::migration_target(state, near, task, Some(*n)).is_ok())
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        if let Some((_, to)) = target {
            return Some(Move { task: task.clone(), from, to });
        }
    }
    None
}

/// A hub's score once `task` has left it.
fn without(l: &HubLoad, offered_memory: u64, task: &str, tl: TaskLoad) -> f64 {
    let cpu = l.cpu - tl.cores / l.task_cpus.max(1.0);
    let memory = l.memory - tl.memory_bytes as f64 / offered_memory.max(1) as f64;
    let wait = l.tasks.iter().filter(|(n, _)| n.as_str() != task).map(|(_, t)| t.wait).fold(0.0, f64::max);
    cpu.max(memory).max(wait).max(0.0)
}

/// A hub's score once the task has come to it.
fn with(l: &HubLoad, offered_memory: u64, tl: TaskLoad) -> f64 {
    let cpu = l.cpu + tl.cores / l.task_cpus.max(1.0);
    let memory = l.memory + tl.memory_bytes as f64 / offered_memory.max(1) as f64;
    cpu.max(memory).max(l.wait()).max(tl.wait)
}

/// Whether `t` took part in a live migration (committed or given up) within `cooldown_ms`.
fn migrated_within(t: &TaskRecord, now_ms: u64, cooldown_ms: u64) -> bool {
    t.history.iter().any(|h| h.migration.is_some() && now_ms.saturating_sub(h.at_ms) < cooldown_ms)
}

#[cfg(test)]
mod tests;
