//! The commands of a live migration (design §7): begin, the one switch (commit), abort and the
//! pause annotation. Between begin and commit the source owns the instance; the commit moves the
//! placement to the target under a new epoch and, for a stateful task, commits the source's final
//! checkpoint in the same step, so that no state can be answered from by both hubs. A commit and
//! an abort of one migration exclude each other: each clears the record the other needs.

use super::{
    check_checkpoint, BasedOn, CheckpointRecord, ClusterState, CommandResult, HistoryEvent, MigrationEvent,
    MigrationRecord, MigrationStats, NodeStatus, Outcome, Rejected, TaskKind,
};
use crate::ids::{Epoch, NodeId};

impl ClusterState {
    pub(super) fn begin_migration(&mut self, task: &str, m: MigrationRecord) -> CommandResult {
        let t = self.tasks.get(task).ok_or_else(|| Rejected::NoSuchTask(task.to_owned()))?;
        if let Some(current) = t.migration {
            return if current == (MigrationRecord { started_ms: current.started_ms, ..m }) {
                Ok(Outcome::MigrationBegun)
            } else {
                Err(Rejected::MigrationInProgress { id: current.id })
            };
        }
        if !t.spec.wanted().contains(&m.instance) {
            return Err(Rejected::NoSuchInstance { task: task.to_owned(), instance: m.instance });
        }
        let current = t.instances.get(&m.instance).copied();
        if current.map(|p| (p.node, p.epoch)) != Some((m.from, m.epoch)) {
            return Err(Rejected::StaleEpoch { current: current.map(|p| p.epoch) });
        }
        self.check_target(task, m.instance, m.to)?;
        let t = self.tasks.get_mut(task).expect("checked: the task exists");
        t.migration = Some(m);
        Ok(Outcome::MigrationBegun)
    }

    /// Whether hub `to` may take instance `instance` of `task`: a member that is up, runs tasks,
    /// and does not already run this instance or another instance of the task.
    fn check_target(&self, task: &str, instance: u32, to: NodeId) -> Result<(), Rejected> {
        let unfit = |why: &str| Err(Rejected::UnfitTarget { node: to, why: why.to_owned() });
        let Some(n) = self.nodes.get(&to) else {
            return Err(Rejected::NoSuchNode(to));
        };
        if n.witness {
            return unfit("it is a witness");
        }
        if n.status != NodeStatus::Up {
            return unfit("it is not up");
        }
        let t = &self.tasks[task];
        if t.instances.get(&instance).is_some_and(|p| p.node == to) {
            return unfit("the instance already runs there");
        }
        if t.placements().any(|(i, p)| i != instance && p.node == to) {
            return unfit("another instance of the task runs there");
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn commit_migration(
        &mut self,
        task: &str,
        id: u64,
        expected: Epoch,
        checkpoint: Option<&CheckpointRecord>,
        based_on: Option<BasedOn>,
        stats: MigrationStats,
        at_ms: u64,
    ) -> CommandResult {
        let t = self.tasks.get(task).ok_or_else(|| Rejected::NoSuchTask(task.to_owned()))?;
        let Some(m) = t.migration.filter(|m| m.id == id) else {
            return Err(Rejected::NoSuchMigration { task: task.to_owned(), id });
        };
        let current = t.instances.get(&m.instance).copied();
        if m.epoch != expected || current.map(|p| (p.node, p.epoch)) != Some((m.from, expected)) {
            return Err(Rejected::StaleEpoch { current: current.map(|p| p.epoch) });
        }
        match (t.spec.kind, checkpoint) {
            (TaskKind::Stateful, Some(record)) => check_checkpoint(task, t, record, based_on)?,
            (TaskKind::Stateful, None) => {
                return Err(Rejected::Invalid("a stateful task migrates with its final checkpoint".into()))
            }
            (TaskKind::Stateless, Some(_)) => {
                return Err(Rejected::Invalid("a stateless task has no checkpoint to move".into()))
            }
            (TaskKind::Stateless, None) => {}
        }
        self.check_target(task, m.instance, m.to)?;

        let epoch = self.next_epoch();
        let t = self.tasks.get_mut(task).expect("checked: the task exists");
        if let Some(record) = checkpoint {
            t.checkpoint = Some(record.clone());
        }
        t.instances.insert(m.instance, super::Placement { node: m.to, epoch });
        // The target is never its own holder; the source, which keeps a copy of the final
        // checkpoint, takes its place.
        if let Some(slot) = t.holders.iter().position(|h| *h == m.to) {
            if t.holders.contains(&m.from) {
                t.holders.remove(slot);
            } else {
                t.holders[slot] = m.from;
            }
        }
        t.migration = None;
        let event =
            MigrationEvent { id, reason: m.reason, from: m.from, to: m.to, from_epoch: m.epoch, stats, aborted: None };
        t.push_history(HistoryEvent {
            at_ms,
            instance: m.instance,
            node: m.to,
            epoch,
            reason: m.reason.as_str().to_owned(),
            from_sequence: checkpoint.map(|c| c.sequence),
            migration: Some(event),
        });
        Ok(Outcome::Migrated { epoch })
    }

    pub(super) fn abort_migration(&mut self, task: &str, id: u64, why: &str, at_ms: u64) -> CommandResult {
        let t = self.tasks.get_mut(task).ok_or_else(|| Rejected::NoSuchTask(task.to_owned()))?;
        let Some(m) = t.migration.filter(|m| m.id == id) else {
            return Err(Rejected::NoSuchMigration { task: task.to_owned(), id });
        };
        t.migration = None;
        let event = MigrationEvent {
            id,
            reason: m.reason,
            from: m.from,
            to: m.to,
            from_epoch: m.epoch,
            stats: MigrationStats::default(),
            aborted: Some(why.to_owned()),
        };
        // The event names the hub that stays the host, at the epoch it keeps.
        t.push_history(HistoryEvent {
            at_ms,
            instance: m.instance,
            node: m.from,
            epoch: m.epoch,
            reason: "aborted".to_owned(),
            from_sequence: None,
            migration: Some(event),
        });
        Ok(Outcome::MigrationAborted)
    }

    pub(super) fn annotate_migration(&mut self, task: &str, epoch: Epoch, pause_us: u64) -> CommandResult {
        let t = self.tasks.get_mut(task).ok_or_else(|| Rejected::NoSuchTask(task.to_owned()))?;
        let event = t
            .history
            .iter_mut()
            .rev()
            .find(|e| e.epoch == epoch && e.migration.as_ref().is_some_and(|m| m.aborted.is_none()));
        let Some(m) = event.and_then(|e| e.migration.as_mut()) else {
            return Err(Rejected::Invalid(format!("no migration made epoch {}", epoch.0)));
        };
        m.stats.pause_us = Some(pause_us);
        Ok(Outcome::MigrationAnnotated)
    }

    /// The migration of `task` in progress, if any.
    pub fn migration(&self, task: &str) -> Option<MigrationRecord> {
        self.tasks.get(task)?.migration
    }
}

#[cfg(test)]
#[path = "migration_tests.rs"]
mod tests;
