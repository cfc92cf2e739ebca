//! The driver of a live migration, on the task's host (see the module map in `migration`).
//! Pre-copy rounds run while the task serves; the critical phase freezes it, hands the rest to
//! the target, keeps a copy of the final checkpoint and commits the switch. Whatever happens
//! before the commit ends in an abort that leaves the task serving here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmesh_consensus::state::{
    checkpoint_key, parse_checkpoint_key, BasedOn, CheckpointPolicy, CheckpointRecord, Command, MigrationReason,
    MigrationStats, Outcome, Placement, Rejected, TaskKind,
};
use hubmesh_consensus::transport::{MIGRATE_PAGES, MIGRATE_PREPARE};
use hubmesh_consensus::{now_ms, NodeId, ProposeError};
use hubmesh_proto::pb;
use hubmesh_storage::{Hash, PagePin, PageWrite};

use super::{MigrateError, Outgoing, BUDGET};
use crate::checkpoint::Manifest;
use crate::executor::{CheckpointHeader, FinalState, MovedTo, PageTable};
use crate::hub::Hub;

/// Pages per round message (8 MiB): the actor copies them out between calls.
const PAGES_PER_MESSAGE: usize = 128;
/// Rounds before the critical phase, whatever the task dirties.
const MAX_ROUNDS: u32 = 8;
/// A round this small (1 MiB) means the next delta is small enough to freeze for.
const SMALL_ROUND: usize = 16;
/// The longest wait before each of the task's calls when its pages do not converge.
const MAX_THROTTLE: Duration = Duration::from_millis(16);
/// Longest wait for one message to the target.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Migrates `task`, which runs on this hub. The driver runs on a task of its own: a caller that
/// goes away (an HTTP client that disconnects) cannot cut it short and leave the task frozen.
pub(super) async fn run(
    hub: &Arc<Hub>,
    task: &str,
    to: Option<NodeId>,
    reason: MigrationReason,
) -> Result<pb::MigrateReport, MigrateError> {
    let (hub, task) = (hub.clone(), task.to_owned());
    let driver = {
        let (hub, task) = (hub.clone(), task.clone());
        tokio::spawn(async move { drive(&hub, &task, to, reason).await })
    };
    driver.await.unwrap_or_else(|e| {
        // A bug: the actor may be frozen with nobody to resolve it. Stopping it answers what
        // it holds (never running a call twice) and the reconciler starts it again from the
        // committed checkpoint if it is still placed here.
        tracing::error!(task, error = %e, "the migration's driver failed; restarting the task");
        let ex = hub.executor().clone();
        tokio::task::spawn_blocking(move || ex.stop_task(&task, false));
        Err(MigrateError::NotNow(format!("the migration's driver failed: {e}")))
    })
}

async fn drive(
    hub: &Arc<Hub>,
    task: &str,
    to: Option<NodeId>,
    reason: MigrationReason,
) -> Result<pb::MigrateReport, MigrateError> {
    let started = Instant::now();
    let me = hub.consensus().node_id();
    let state = hub.consensus().state();
    let t = state.tasks.get(task).ok_or_else(|| MigrateError::NotFound(task.to_owned()))?;
    let p = t
        .instances
        .get(&0)
        .copied()
        .filter(|p| p.node == me)
        .ok_or_else(|| MigrateError::NotNow("the task does not run on this hub".into()))?;
    // A task placed a moment ago may still be starting.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !hub.executor().runs_at(task, t.version, p.epoch.0) {
        if Instant::now() >= deadline {
            return Err(MigrateError::NotNow("the task is not running here yet".into()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let target =
        crate::scheduler::migration_target(&state, &hub.devices().near(), task, to).map_err(MigrateError::NoTarget)?;
    let Some(_outgoing) = Outgoing::start(hub.migrations(), task) else {
        return Err(MigrateError::InProgress(state.migration(task).map_or(0, |m| m.id)));
    };
    let id = rand::random::<u64>() | 1;
    begin(hub, task, id, p, target, reason).await?;
    // The begin is committed, not yet applied here: once it is, so is every checkpoint committed
    // before it, which the instance must build the migration's state on (a late commit of its own).
    hub.wait_state(Duration::from_secs(2), |s| s.migration(task).is_some_and(|m| m.id == id)).await;
    let d = Driver {
        hub,
        task,
        id,
        from: p,
        to: target,
        version: t.version,
        policy: t.spec.checkpoint,
        memory: t.spec.limits.memory_bytes,
        started,
    };
    let result = match t.spec.kind {
        TaskKind::Stateful => d.stateful(t.spec.module_hash).await,
        TaskKind::Stateless => d.stateless().await,
    };
    let outcome = if result.is_ok() { "moved" } else { "not_moved" };
    metrics::counter!("hubmesh_migration_requests_total", "reason" => reason.as_str(), "outcome" => outcome)
        .increment(1);
    match &result {
        Ok(r) => tracing::info!(
            task,
            to = r.to,
            epoch = r.epoch,
            pause_us = r.pause_us,
            rounds = r.rounds,
            bytes = r.bytes,
            "migrated"
        ),
        Err(e) => tracing::warn!(task, error = %e, "migration given up"),
    }
    result
}

/// Proposes the begin. A migration this hub left behind (its driver died with an unknown
/// outcome) is aborted first.
async fn begin(
    hub: &Hub,
    task: &str,
    id: u64,
    p: Placement,
    to: NodeId,
    reason: MigrationReason,
) -> Result<(), MigrateError> {
    let me = hub.consensus().node_id();
    let cmd = Command::BeginMigration {
        task: task.to_owned(),
        instance: 0,
        id,
        from: me,
        to,
        expected: p.epoch,
        reason,
        at_ms: now_ms(),
    };
    for _ in 0..2 {
        match hub.consensus().propose(cmd.clone()).await {
            Ok(_) => return Ok(()),
            Err(ProposeError::Rejected(Rejected::MigrationInProgress { id: old })) => {
                let left_behind = hub.consensus().state().migration(task).is_some_and(|m| m.id == old && m.from == me);
                if !left_behind {
                    return Err(MigrateError::InProgress(old));
                }
                let abort = Command::AbortMigration {
                    task: task.to_owned(),
                    id: old,
                    why: "left behind by an earlier attempt".into(),
                    at_ms: now_ms(),
                };
                let _ = hub.consensus().propose(abort).await;
            }
            Err(ProposeError::Rejected(r)) => return Err(MigrateError::from_rejected(r)),
            Err(e) => {
                // The begin may have been recorded: withdraw it (else the reconciler's
                // `abort_left_behind` does, once this driver is gone).
                let abort = Command::AbortMigration { task: task.to_owned(), id, why: e.to_string(), at_ms: now_ms() };
                let _ = hub.consensus().propose(abort).await;
                return Err(MigrateError::NotNow(format!("the migration could not be recorded: {e}")));
            }
        }
    }
    Err(MigrateError::NotNow("an earlier migration of the task could not be cleared".into()))
}

/// How a migration that began ended, as the replicated state says.
pub(super) enum Ended {
    /// Committed: the task runs at this placement.
    Moved(Placement),
    /// Aborted, or fenced by a re-placement: the task's placement now.
    NotMoved(Option<Placement>),
}

pub(super) struct Driver<'a> {
    pub(super) hub: &'a Arc<Hub>,
    pub(super) task: &'a str,
    pub(super) id: u64,
    pub(super) from: Placement,
    pub(super) to: NodeId,
    version: u64,
    policy: CheckpointPolicy,
    /// The task's memory limit.
    memory: u64,
    pub(super) started: Instant,
}

impl Driver<'_> {
    async fn stateful(&self, module_hash: Hash) -> Result<pb::MigrateReport, MigrateError> {
        let ex = self.hub.executor();
        let start = match ex.migration_begin(self.task).await {
            Ok(s) => s,
            Err(e) => return Err(self.give_up(format!("the task: {e}"), false).await),
        };
        // The actor read and pinned its committed checkpoint: the rounds are a delta to it.
        let (base_key, base_manifest, _pin) = match start.base {
            Some((k, bytes, pin)) => (k, bytes, Some(pin)),
            None => (String::new(), Vec::new(), None),
        };
        let table = if base_key.is_empty() {
            PageTable::default()
        } else {
            match Manifest::decode(&base_manifest) {
                Ok(m) => PageTable::from_manifest(Some(&m)),
                Err(e) => return Err(self.give_up(format!("the base checkpoint: {e}"), false).await),
            }
        };
        let prepare = pb::MigratePrepare { task: self.task.to_owned(), id: self.id, base_key, base_manifest };
        let transport = self.hub.consensus().transport();
        if let Err(e) = MIGRATE_PREPARE.call(&transport, self.to.0, &prepare, CALL_TIMEOUT).await {
            return Err(self.give_up(format!("hub {} could not get ready: {e}", self.to), false).await);
        }
        tracing::debug!(task = self.task, took = ?self.started.elapsed(), "the target is ready");
        crate::faults::crash_point("crash-migration-source-precopy");
        let mut copy = Copy { table, pin: self.hub.executor().pages().pin(), rounds: 0, bytes: 0 };
        if let Err(why) = self.precopy(&mut copy).await {
            return Err(self.give_up(why, false).await);
        }
        let precopy_ms = self.started.elapsed().as_millis() as u64;

        let frozen = Instant::now();
        let last = match ex.migration_freeze(self.task, self.id).await {
            Ok(l) => l,
            Err(e) => return Err(self.give_up(format!("freezing the task: {e}"), false).await),
        };
        let froze_in = frozen.elapsed();
        let record = match self.hand_over(&mut copy, &last, module_hash).await {
            Ok(r) => r,
            Err(why) => return Err(self.give_up(why, true).await),
        };
        let handed_over = frozen.elapsed();
        crate::faults::crash_point("crash-migration-source-frozen");
        // A task without checkpoints has no committed state but a migration's: its commit is
        // not checked against one.
        let based_on = (self.policy != CheckpointPolicy::None).then(|| BasedOn {
            checkpoint: last.committed_key.as_deref().and_then(parse_checkpoint_key).map(|(_, e, s)| (e, s)),
        });
        let stats = MigrationStats { rounds: copy.rounds, bytes: copy.bytes, precopy_ms, pause_us: None };
        let commit = Command::CommitMigration {
            task: self.task.to_owned(),
            id: self.id,
            expected: self.from.epoch,
            checkpoint: Some(record),
            based_on,
            stats,
            at_ms: now_ms(),
        };
        let watch = self.watch_target(frozen);
        let ended = match self.hub.consensus().propose(commit).await {
            Ok(Outcome::Migrated { epoch }) => Ended::Moved(Placement { node: self.to, epoch }),
            Ok(other) => return Err(self.give_up(format!("unexpected outcome {other:?}"), true).await),
            Err(e) => {
                tracing::warn!(task = self.task, error = %e, "the migration's commit did not answer; settling it");
                self.settle(&format!("the commit failed: {e}"), true).await
            }
        };
        if matches!(ended, Ended::Moved(_)) {
            crate::faults::crash_point("crash-migration-source-committed");
        }
        let parts = [froze_in, handed_over, frozen.elapsed()].map(|d| d.as_micros() as u64);
        let mut report = self.finish(ended, frozen, stats, true, Some(watch)).await?;
        [report.frozen_us, report.stored_us, report.committed_us] = parts;
        Ok(report)
    }

    async fn stateless(&self) -> Result<pb::MigrateReport, MigrateError> {
        let commit = Command::CommitMigration {
            task: self.task.to_owned(),
            id: self.id,
            expected: self.from.epoch,
            checkpoint: None,
            based_on: None,
            stats: MigrationStats::default(),
            at_ms: now_ms(),
        };
        let switched = Instant::now();
        let ended = match self.hub.consensus().propose(commit).await {
            Ok(Outcome::Migrated { epoch }) => Ended::Moved(Placement { node: self.to, epoch }),
            // Nothing is frozen: no need to wait for the mesh beyond the budget.
            Ok(_) | Err(_) => self.settle("the commit failed", false).await,
        };
        // Calls in flight here finish; the reconciler stops the pool once the driver is done.
        self.finish(ended, switched, MigrationStats::default(), false, None).await
    }

    /// Rounds while the task serves, until one is small, or `MAX_ROUNDS`. A round sends at most
    /// the pages marked when it began (what is dirtied meanwhile is the next round's); past half
    /// the budget the migration is given up.
    async fn precopy(&self, copy: &mut Copy) -> Result<(), String> {
        let ex = self.hub.executor();
        let (mut throttle, mut previous) = (Duration::ZERO, usize::MAX);
        loop {
            copy.rounds += 1;
            let (mut round, mut marked) = (0, None);
            loop {
                if self.started.elapsed() > BUDGET / 2 {
                    return Err(format!(
                        "the task dirties pages faster than they travel ({round} pages into round {})",
                        copy.rounds
                    ));
                }
                let delta =
                    ex.migration_round(self.task, PAGES_PER_MESSAGE, throttle).await.map_err(|e| e.to_string())?;
                round += delta.pages.len();
                let marked = *marked.get_or_insert(delta.pages.len() + delta.remaining);
                let pages = copy.table.record(delta.memory_pages, delta.pages);
                let layout = Layout { entries: pages.entries, memory_pages: delta.memory_pages };
                self.send(copy, layout, pages.new, pages.bytes).await?;
                if delta.remaining == 0 || round >= marked {
                    break;
                }
            }
            tracing::debug!(task = self.task, round = copy.rounds, pages = round, took = ?self.started.elapsed(), "round sent");
            // Several times the state sent: the rounds chase a hot task; freeze now (the last
            // delta is at most the state) rather than send more.
            if round <= SMALL_ROUND || copy.rounds >= MAX_ROUNDS || copy.bytes > 3 * self.memory {
                return Ok(());
            }
            // Not shrinking by a quarter: slow the task's calls down (doubling, bounded).
            if round * 4 > previous * 3 {
                throttle = (throttle * 2).clamp(Duration::from_millis(1), MAX_THROTTLE);
                metrics::counter!("hubmesh_migration_throttled_total").increment(1);
                tracing::info!(
                    task = self.task,
                    round,
                    ?throttle,
                    "the task's pages do not converge; slowing its calls"
                );
            }
            previous = round;
        }
    }

    /// Sends a round's pages and, at the same time, stores them here (pinned, synced in the
    /// background): this hub's copy of the migrated state then needs only the last ones in the
    /// critical phase.
    async fn send(
        &self,
        copy: &mut Copy,
        layout: Layout,
        pages: Vec<(Hash, Vec<u8>)>,
        bytes: u64,
    ) -> Result<(), String> {
        let log = self.hub.executor().pages().clone();
        // Every page the migrated state refers to stays here, stored before or now.
        copy.pin.add(pages.iter().map(|(h, _)| *h));
        let mut own: Vec<(Hash, Vec<u8>)> = pages.iter().filter(|(h, _)| !log.has_page(h)).cloned().collect();
        let store = tokio::task::spawn_blocking(move || {
            if own.is_empty() {
                return Ok::<u64, hubmesh_storage::PageLogError>(0);
            }
            // Synced in the background: the critical phase's synced write makes them durable
            // and then finds little left to flush; neither the round nor the task's own
            // checkpoints wait for the disk.
            let n = log.write(&[PageWrite { pages: std::mem::take(&mut own), ..Default::default() }], false)?;
            log.sync_behind();
            Ok(n)
        });
        let (sent, stored) = tokio::join!(self.send_counted(&mut copy.bytes, layout, pages, bytes, None), store);
        sent?;
        match stored {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("storing the sent pages here: {e}")),
            Err(e) => Err(format!("storing the sent pages here: {e}")),
        }
    }

    async fn send_counted(
        &self,
        sent: &mut u64,
        layout: Layout,
        pages: Vec<(Hash, Vec<u8>)>,
        bytes: u64,
        last: Option<(String, Vec<u8>)>,
    ) -> Result<(), String> {
        if pages.is_empty() && layout.entries.is_empty() && last.is_none() {
            return Ok(());
        }
        let (key, manifest) = last.unwrap_or_default();
        let entries = layout
            .entries
            .into_iter()
            .map(|(index, h)| pb::PageAt { index, hash: h.map_or_else(Vec::new, |h| h.0.to_vec()) })
            .collect();
        let req = pb::MigratePages {
            task: self.task.to_owned(),
            id: self.id,
            pages: pages.into_iter().map(|(h, data)| pb::Page { hash: h.0.to_vec(), data }).collect(),
            key,
            manifest,
            entries,
            memory_pages: layout.memory_pages,
        };
        *sent += bytes;
        MIGRATE_PAGES
            .call(&self.hub.consensus().transport(), self.to.0, &req, CALL_TIMEOUT)
            .await
            .map_err(|e| format!("sending pages to hub {}: {e}", self.to))?;
        Ok(())
    }

    /// The critical phase's hand-over: the last pages and the manifest to the target, which
    /// stores them, and this hub's own copy, in parallel. Returns the record to commit.
    async fn hand_over(
        &self,
        copy: &mut Copy,
        last: &FinalState,
        module_hash: Hash,
    ) -> Result<CheckpointRecord, String> {
        copy.rounds += 1;
        let pages = copy.table.record(last.memory_pages, last.pages.clone());
        let header = CheckpointHeader {
            task: self.task.to_owned(),
            task_version: self.version,
            epoch: self.from.epoch.0,
            sequence: last.sequence,
            module_hash,
            invocations: last.invocations,
            created_unix_ms: now_ms(),
        };
        let manifest = copy.table.manifest(header, last);
        let key = checkpoint_key(self.task, self.from.epoch, last.sequence);
        let encoded = manifest.encode();
        let refs: Vec<Hash> = manifest.pages.iter().map(|(_, h)| *h).collect();
        // The rounds' pages are stored here already; the last ones go with the manifest.
        let log = self.hub.executor().pages().clone();
        copy.pin.add(pages.new.iter().map(|(h, _)| *h));
        let own: Vec<(Hash, Vec<u8>)> = pages.new.iter().filter(|(h, _)| !log.has_page(h)).cloned().collect();
        let write = PageWrite { pages: own, key: key.clone(), manifest: encoded.clone(), refs, remove: Vec::new() };
        let began = Instant::now();
        let local = tokio::task::spawn_blocking(move || {
            let r = log.write(&[write], true);
            (r, began.elapsed())
        });
        // The last pages in messages of at most PAGES_PER_MESSAGE, the manifest with the last.
        // The layout goes with the last message: the target stores the earlier ones' pages first.
        let layout = Layout { entries: pages.entries, memory_pages: last.memory_pages };
        let remote = async {
            let mut rest = pages.new;
            while rest.len() > PAGES_PER_MESSAGE {
                let tail = rest.split_off(PAGES_PER_MESSAGE);
                let bytes = rest.iter().map(|(_, d)| d.len() as u64).sum();
                let size_only = Layout { entries: Vec::new(), memory_pages: last.memory_pages };
                self.send_counted(&mut copy.bytes, size_only, rest, bytes, None).await?;
                rest = tail;
            }
            let bytes = rest.iter().map(|(_, d)| d.len() as u64).sum();
            self.send_counted(&mut copy.bytes, layout, rest, bytes, Some((key, encoded.clone()))).await?;
            Ok::<_, String>(began.elapsed())
        };
        let (local, remote) = tokio::join!(local, remote);
        let remote_took = remote?;
        let local = local.map(|(r, took)| {
            tracing::debug!(
                task = self.task,
                local_us = took.as_micros() as u64,
                remote_us = remote_took.as_micros() as u64,
                "final state handed over"
            );
            r
        });
        // Two copies before the switch, as a durable commit has: the target's and this hub's.
        match local {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("keeping a copy of the migrated state: {e}")),
            Err(e) => return Err(format!("keeping a copy of the migrated state: {e}")),
        }
        Ok(CheckpointRecord {
            version: self.version,
            epoch: self.from.epoch,
            sequence: last.sequence,
            manifest_hash: Hash::of(&encoded),
            stored_on: vec![self.to, self.hub.consensus().node_id()],
            size_bytes: manifest.size_bytes(),
            at_ms: now_ms(),
        })
    }
}

/// Where a message's round puts which content, and the memory's size (for the target's staged
/// instance).
struct Layout {
    entries: Vec<(u32, Option<Hash>)>,
    memory_pages: u32,
}

/// What a migration has sent so far.
struct Copy {
    table: PageTable,
    /// The sent pages, stored here for this hub's copy of the migrated state.
    pin: PagePin,
    rounds: u32,
    bytes: u64,
}

pub(super) fn moved_to(p: Placement) -> MovedTo {
    MovedTo { node: p.node.0, epoch: p.epoch.0 }
}
