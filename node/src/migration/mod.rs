//! Live migration (design §7): a running task moves to another hub while it keeps serving.
//!
//! ```text
//!  source (the host)                                   target
//!  BeginMigration --Raft-->
//!  actor: Begin (track pages) ----MIGRATE_PREPARE----> fetch the base checkpoint if missing
//!  rounds: actor Round -> PageTable ----MIGRATE_PAGES--> keep the pages (verified, in memory)
//!  actor Freeze (calls held) -----MIGRATE_PAGES+manifest-> store manifest + pages, fdatasync
//!  own copy of the final checkpoint (fdatasync), in parallel
//!  --------------------MIGRATE_WATCH--------------------> (answers below)
//!  CommitMigration --Raft--> the one switch: placement (target, E+1) + the final checkpoint
//!  actor Resolve(moved): held calls answer Moved --> the invocation path relays each once
//!                                                      applies the commit, starts the staged
//!  <-------------------------------------------------- instance, answers the watch: serving
//!  (a hub without MIGRATE_WATCH: MIGRATE_END(E+1) now, answered once it serves)
//!  pause = until both the held calls are released and the target serves
//!  actor detached (no checkpoint); AnnotateMigration(pause)
//! ```
//!
//! A refusal or an unknown outcome before the commit ends in `AbortMigration` (which excludes a
//! later commit of the same migration): the source runs the held calls itself. `source` drives
//! it, `target` serves the target's endpoints.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubmesh_consensus::state::{ClusterState, Command, MigrationReason, Rejected};
use hubmesh_consensus::transport::{
    Refusal, RpcError, MIGRATE_END, MIGRATE_PAGES, MIGRATE_PREPARE, MIGRATE_REQUEST, MIGRATE_WATCH,
};
use hubmesh_consensus::{NodeId, ProposeError};
use hubmesh_proto::pb;
use hubmesh_storage::Hash;

use crate::dataplane::alive;
use crate::hub::Hub;

mod ending;
mod policy;
mod source;
mod target;

pub(crate) use policy::Policy;

/// Longest a migration may take from its begin to its commit; past it, it is given up.
const BUDGET: Duration = Duration::from_secs(30);

/// Why a task was not migrated. Nothing changed: the task runs where it ran.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MigrateError {
    /// No task has this name.
    #[error("no task named {0:?}")]
    NotFound(String),
    /// No hub can take the task, or not the one asked for.
    #[error("no hub can take the task: {0}")]
    NoTarget(String),
    /// Another migration of the task is under way.
    #[error("migration {0} of the task is in progress")]
    InProgress(u64),
    /// The task cannot be migrated now (not placed, not started yet, moved meanwhile).
    #[error("the task cannot be migrated now: {0}")]
    NotNow(String),
    /// The migration began and was given up; the task runs where it ran.
    #[error("the migration was given up: {0}")]
    Aborted(String),
    /// No answer came in time: the task may or may not have moved.
    #[error("the migration's outcome is unknown: {0}")]
    Unknown(String),
    /// The mesh could not record the migration (nothing changed).
    #[error(transparent)]
    Propose(ProposeError),
}

impl From<ProposeError> for MigrateError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::Timeout => Self::Unknown(e.to_string()),
            e => Self::Propose(e),
        }
    }
}

impl MigrateError {
    fn from_rejected(r: Rejected) -> Self {
        match r {
            Rejected::NoSuchTask(t) => Self::NotFound(t),
            Rejected::MigrationInProgress { id } => Self::InProgress(id),
            Rejected::UnfitTarget { node, why } => Self::NoTarget(format!("hub {node}: {why}")),
            Rejected::NoSuchNode(n) => Self::NoTarget(format!("no hub with id {n}")),
            r @ Rejected::StaleEpoch { .. } => Self::NotNow(r.to_string()),
            r => Self::Propose(ProposeError::Rejected(r)),
        }
    }
}

impl From<MigrateError> for Refusal {
    /// The variant's own text travels, so that the asking hub rebuilds the same error.
    fn from(e: MigrateError) -> Self {
        use pb::ErrorCode as C;
        match e {
            MigrateError::NotFound(task) => Self::new(C::NotFound, task),
            MigrateError::NoTarget(why) => Self::new(C::NoTarget, why),
            MigrateError::InProgress(id) => Self::new(C::MigrationInProgress, e.to_string())
                .with_hint(pb::ErrorHint { limit: id, ..Default::default() }),
            MigrateError::NotNow(why) => Self::new(C::Unavailable, why),
            MigrateError::Aborted(why) => Self::new(C::MigrationAborted, why),
            MigrateError::Unknown(why) => Self::new(C::OutcomeUnknown, why),
            MigrateError::Propose(p) => Self::new(C::Unavailable, p.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_from_this_hub_that_nothing_drives_is_left_behind_once_per_retry() {
        // Task `t` on hub 1, migration 5 to hub 2 under way.
        let mut s = policy::tests::with_migration(Some(5));
        let (mut tried, t0) = (HashMap::new(), Instant::now());
        assert!(left_behind(&s, NodeId(1), |_| true, &mut tried, t0).is_empty(), "a driver runs it");
        assert!(left_behind(&s, NodeId(2), |_| false, &mut tried, t0).is_empty(), "the target's is not its own");
        assert_eq!(left_behind(&s, NodeId(1), |_| false, &mut tried, t0), [("t".to_owned(), 5)]);
        let soon = t0 + LEFT_BEHIND_RETRY / 2;
        assert!(left_behind(&s, NodeId(1), |_| false, &mut tried, soon).is_empty(), "not again at once");
        assert_eq!(left_behind(&s, NodeId(1), |_| false, &mut tried, t0 + LEFT_BEHIND_RETRY).len(), 1);
        s.apply(&Command::AbortMigration { task: "t".into(), id: 5, why: "x".into(), at_ms: 0 }).unwrap();
        assert!(left_behind(&s, NodeId(1), |_| false, &mut tried, t0).is_empty());
        assert!(tried.is_empty(), "an ended migration is forgotten");
    }

    #[test]
    fn a_staged_migration_is_forgotten_once_the_state_shows_it_cannot_land_here() {
        use crate::scheduler::tests::{constrained_deploy, labelled_node};
        use hubmesh_consensus::state::{MigrationStats, NodeStatus, Placement, TaskKind};
        let mut s = ClusterState::default();
        for id in 1..=3 {
            s.apply(&labelled_node(id, 10, NodeStatus::Up, &[])).unwrap();
        }
        s.apply(&constrained_deploy("t", TaskKind::Stateless, &[])).unwrap();
        s.apply(&Command::PlaceInstance { task: "t".into(), instance: 0, node: NodeId(1), expected: None }).unwrap();
        let begin_to = |s: &ClusterState, id: u64, from: u64, to: u64| Command::BeginMigration {
            task: "t".into(),
            instance: 0,
            id,
            from: NodeId(from),
            to: NodeId(to),
            expected: s.placement("t", 0).unwrap().epoch,
            reason: MigrationReason::Manual,
            at_ms: 0,
        };
        let begin = |s: &ClusterState, id: u64| begin_to(s, id, 1, 2);
        let lands = |s: &ClusterState, id: u64| target::may_still_land(s, "t", id, NodeId(2));
        assert!(!lands(&s, 5), "never begun");
        s.apply(&begin(&s, 5)).unwrap();
        assert!(lands(&s, 5) && !lands(&s, 6), "under way, and only that one");
        s.apply(&Command::AbortMigration { task: "t".into(), id: 5, why: "x".into(), at_ms: 0 }).unwrap();
        assert!(!lands(&s, 5), "aborted");
        s.apply(&begin(&s, 7)).unwrap();
        let expected = s.placement("t", 0).unwrap().epoch;
        let commit = Command::CommitMigration {
            task: "t".into(),
            id: 7,
            expected,
            checkpoint: None,
            based_on: None,
            stats: MigrationStats::default(),
            at_ms: 0,
        };
        s.apply(&commit).unwrap();
        let moved: Placement = s.placement("t", 0).unwrap();
        assert_eq!(moved.node, NodeId(2));
        assert!(lands(&s, 7), "committed here: the reconciler takes the staged instance");
        assert!(!target::may_still_land(&s, "t", 7, NodeId(3)), "committed elsewhere");
        let away =
            Command::PlaceInstance { task: "t".into(), instance: 0, node: NodeId(3), expected: Some(moved.epoch) };
        s.apply(&away).unwrap();
        assert!(!lands(&s, 7), "re-placed since: too late to start it");
        // Back on hub 1, then a failover places it on the target itself while a migration is
        // under way: the hub hosts the task, but not from that migration's state.
        let now = |s: &ClusterState| Some(s.placement("t", 0).unwrap().epoch);
        let back = Command::PlaceInstance { task: "t".into(), instance: 0, node: NodeId(1), expected: now(&s) };
        s.apply(&back).unwrap();
        s.apply(&begin(&s, 9)).unwrap();
        assert!(lands(&s, 9));
        let failover = Command::PlaceInstance { task: "t".into(), instance: 0, node: NodeId(2), expected: now(&s) };
        s.apply(&failover).unwrap();
        assert!(!lands(&s, 9), "fenced by the failover");
        s.apply(&begin_to(&s, 11, 2, 3)).unwrap();
        assert!(target::may_still_land(&s, "t", 11, NodeId(3)));
        s.apply(&Command::DeleteTask { name: "t".into() }).unwrap();
        assert!(!target::may_still_land(&s, "t", 11, NodeId(3)), "deleted while under way");
    }

    #[test]
    fn every_error_survives_the_mesh_as_itself() {
        let all = [
            MigrateError::NotFound("t".into()),
            MigrateError::NoTarget("none".into()),
            MigrateError::InProgress(77),
            MigrateError::NotNow("starting".into()),
            MigrateError::Aborted("target down".into()),
            MigrateError::Unknown("no answer".into()),
        ];
        for e in all {
            let text = e.to_string();
            let same = std::mem::discriminant(&e);
            let back = MigrateError::from(Refusal::from(e));
            assert_eq!(std::mem::discriminant(&back), same, "{back:?}");
            assert_eq!(back.to_string(), text);
        }
    }
}

impl From<Refusal> for MigrateError {
    /// The host's refusal, read back on the hub that asked (by code, never by text).
    fn from(r: Refusal) -> Self {
        use pb::ErrorCode as C;
        match r.code {
            C::NotFound => Self::NotFound(r.message),
            C::NoTarget => Self::NoTarget(r.message),
            C::MigrationInProgress => Self::InProgress(r.hint.limit),
            C::OutcomeUnknown => Self::Unknown(r.message),
            C::MigrationAborted => Self::Aborted(r.message),
            _ => Self::NotNow(r.message),
        }
    }
}

/// The migrations this hub takes part in.
#[derive(Default)]
pub(crate) struct Migrations {
    /// Tasks this hub is moving away: the reconciler leaves them to the driver.
    outgoing: Mutex<HashSet<String>>,
    /// Tasks this hub is receiving, by name.
    incoming: Mutex<HashMap<String, target::Incoming>>,
    /// Staged instances of migrated checkpoints, waiting for the switch, by task name.
    ready: Mutex<HashMap<String, target::Ready>>,
    /// Migrations to this hub whose final state is stored here (by task: the migration's id):
    /// the switch may commit any moment, and a call the source relays then waits for it here.
    handed_over: Mutex<HashMap<String, (u64, Instant)>>,
    /// Migrations from this hub left behind (no driver here), by id: when an abort was last
    /// proposed.
    left_behind: Mutex<HashMap<u64, Instant>>,
}

impl Migrations {
    /// Bytes the staged instances of migrations to this hub hold (the hub's load counts them).
    pub(crate) fn staged_memory_bytes(&self) -> u64 {
        let incoming = self.incoming.lock().unwrap_or_else(|p| p.into_inner());
        let ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        target::staged_bytes(&incoming, &ready)
    }

    /// Forgets incoming migrations that `state` shows ended without moving the task here, and
    /// those whose source stopped sending (it died or gave up without telling): their staged
    /// instances and pinned pages go. The reconciler calls it each round.
    pub(crate) fn sweep(&self, hub: &Hub) {
        {
            let mut incoming = self.incoming.lock().unwrap_or_else(|p| p.into_inner());
            let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
            // Read under the locks: every entry was added after its handler saw the begin in an
            // applied state, so this one, no older, shows the begin too (a reconciler's round
            // may run on a state from before it).
            let state = hub.consensus().state();
            target::forget_ended(&mut incoming, &mut ready, &state, hub.consensus().node_id());
        }
        target::sweep(&mut self.incoming.lock().unwrap_or_else(|p| p.into_inner()));
        target::sweep_ready(&mut self.ready.lock().unwrap_or_else(|p| p.into_inner()));
        let mut handed_over = self.handed_over.lock().unwrap_or_else(|p| p.into_inner());
        handed_over.retain(|_, (_, at)| at.elapsed() < BUDGET * 2);
    }

    /// Whether migration `id` of `task` to this hub has handed its final state over here.
    pub(crate) fn handed_over(&self, task: &str, id: u64) -> bool {
        self.handed_over.lock().unwrap_or_else(|p| p.into_inner()).get(task).is_some_and(|(i, _)| *i == id)
    }

    /// Kept until the sweep (twice the budget): once the switch is applied, or the migration
    /// aborted, the state no longer shows the migration and the entry matters no more.
    fn mark_handed_over(&self, task: &str, id: u64) {
        let mut handed_over = self.handed_over.lock().unwrap_or_else(|p| p.into_inner());
        handed_over.insert(task.to_owned(), (id, Instant::now()));
    }

    /// The instance staged for `task`'s migrated checkpoint `key`, if this hub built one (the
    /// reconciler starts the task from it).
    pub(crate) fn take_staged(
        &self,
        task: &str,
        key: &str,
        manifest_hash: &Hash,
    ) -> Option<crate::executor::StagedTask> {
        target::take_ready(&mut self.ready.lock().unwrap_or_else(|p| p.into_inner()), task, key, manifest_hash)
    }

    /// Whether an instance is staged for `task`'s migrated checkpoint `key`, stored here with
    /// this manifest.
    pub(crate) fn has_staged(&self, task: &str, key: &str, manifest_hash: &Hash) -> bool {
        target::has_ready(&self.ready.lock().unwrap_or_else(|p| p.into_inner()), task, key, manifest_hash)
    }

    /// Whether this hub is moving `task` away.
    pub(crate) fn is_outgoing(&self, task: &str) -> bool {
        self.outgoing.lock().unwrap_or_else(|p| p.into_inner()).contains(task)
    }
}

/// How often an abort of a migration left behind is proposed again while it stays in the state.
const LEFT_BEHIND_RETRY: Duration = Duration::from_secs(5);

/// Aborts the migrations from this hub that no driver here runs: left behind by a process that
/// died mid-migration (the begin outlives it in the replicated state) or by a driver that gave
/// up without recording an end. Until it ends, the leader's policy counts this hub as the source
/// of a migration and starts no other from it. The reconciler calls it each round with the state
/// it read before: a driver marks its task outgoing before it proposes a begin and clears the
/// mark only when it is done (the end recorded, or given up), so a begin in that state with no
/// mark now has no driver.
pub(crate) fn abort_left_behind(hub: &Arc<Hub>, state: &ClusterState) {
    let migrations = hub.migrations();
    let mut tried = migrations.left_behind.lock().unwrap_or_else(|p| p.into_inner());
    let due = left_behind(state, hub.consensus().node_id(), |t| migrations.is_outgoing(t), &mut tried, Instant::now());
    for (task, id) in due {
        tracing::info!(task, id, "aborting a migration from this hub that no driver runs");
        let why = "left behind: its source hub no longer drives it".to_owned();
        let abort = Command::AbortMigration { task, id, why, at_ms: hubmesh_consensus::now_ms() };
        let hub = hub.clone();
        tokio::spawn(async move {
            if let Err(e) = hub.consensus().propose(abort).await {
                tracing::debug!(error = %e, "aborting a migration left behind");
            }
        });
    }
}

/// The migrations from `me` in `state` that no driver runs (`driving` says which tasks one
/// does), each at most once per `LEFT_BEHIND_RETRY` (`tried`: id → when; ended ones forgotten).
fn left_behind(
    state: &ClusterState,
    me: NodeId,
    driving: impl Fn(&str) -> bool,
    tried: &mut HashMap<u64, Instant>,
    now: Instant,
) -> Vec<(String, u64)> {
    let mine: Vec<(String, u64)> = state
        .tasks
        .iter()
        .filter_map(|(n, t)| t.migration.filter(|m| m.from == me).map(|m| (n.clone(), m.id)))
        .collect();
    tried.retain(|id, _| mine.iter().any(|(_, i)| i == id));
    mine.into_iter()
        .filter(|(task, id)| {
            if driving(task) || tried.get(id).is_some_and(|at| now < *at + LEFT_BEHIND_RETRY) {
                return false;
            }
            tried.insert(*id, now);
            true
        })
        .collect()
}

/// Marks a task outgoing for as long as it lives.
struct Outgoing<'a> {
    migrations: &'a Migrations,
    task: String,
}

impl<'a> Outgoing<'a> {
    fn start(migrations: &'a Migrations, task: &str) -> Option<Self> {
        let fresh = migrations.outgoing.lock().unwrap_or_else(|p| p.into_inner()).insert(task.to_owned());
        fresh.then(|| Self { migrations, task: task.to_owned() })
    }
}

impl Drop for Outgoing<'_> {
    fn drop(&mut self) {
        self.migrations.outgoing.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.task);
    }
}

impl Hub {
    /// Live-migrates `task` to `to` (or where the scheduler says), from whichever hub runs it.
    pub(crate) async fn migrate(
        self: &Arc<Self>,
        task: &str,
        to: Option<NodeId>,
        reason: MigrationReason,
    ) -> Result<pb::MigrateReport, MigrateError> {
        // The host as the leader knows it: a migration just committed may not be applied here.
        self.consensus().catch_up(Duration::from_secs(1)).await;
        let state = self.consensus().state();
        let t = state.tasks.get(task).ok_or_else(|| MigrateError::NotFound(task.to_owned()))?;
        let host = t.instances.get(&0).ok_or_else(|| MigrateError::NotNow("the task is not placed".into()))?.node;
        if host == self.consensus().node_id() {
            return source::run(self, task, to, reason).await;
        }
        let req = pb::MigrateRequest {
            task: task.to_owned(),
            to: to.map_or(0, |n| n.0),
            reason: pb::MigrationReason::from(reason) as i32,
        };
        let transport = self.consensus().transport();
        // Longer than a driver's worst case: pre-copy, the hand-over's calls, the commit, the end.
        match MIGRATE_REQUEST.call(&transport, host.0, &req, BUDGET * 3).await {
            Ok(report) => Ok(report),
            Err(RpcError::Remote(r)) => Err(r.into()),
            Err(e @ RpcError::Timeout) => Err(MigrateError::Unknown(format!("the task's hub {host}: {e}"))),
            Err(e) => Err(MigrateError::NotNow(format!("the task's hub {host} could not be asked: {e}"))),
        }
    }

    /// The migrations this hub takes part in.
    pub(crate) fn migrations(&self) -> &Migrations {
        &self.migrations
    }
}

/// Serves the migration endpoints; called once at boot.
pub(crate) fn register(hub: &Arc<Hub>) {
    let transport = hub.consensus().transport();
    let h = Arc::downgrade(hub);
    MIGRATE_REQUEST.serve(&transport, move |_from, req: pb::MigrateRequest| {
        let h = h.clone();
        async move {
            let hub = alive(&h)?;
            let reason = match pb::MigrationReason::try_from(req.reason) {
                Ok(pb::MigrationReason::Drain) => MigrationReason::Drain,
                Ok(pb::MigrationReason::Overload) => MigrationReason::Overload,
                Ok(pb::MigrationReason::Device) => MigrationReason::Device,
                _ => MigrationReason::Manual,
            };
            let me = Some(hub.consensus().node_id());
            if hub.consensus().state().placement(&req.task, 0).map(|p| p.node) != me {
                hub.consensus().catch_up(Duration::from_secs(1)).await;
            }
            if hub.consensus().state().placement(&req.task, 0).map(|p| p.node) != me {
                return Err(MigrateError::NotNow("the task does not run on this hub".into()).into());
            }
            let to = (req.to != 0).then_some(NodeId(req.to));
            source::run(&hub, &req.task, to, reason).await.map_err(Refusal::from)
        }
    });
    let h = Arc::downgrade(hub);
    MIGRATE_PREPARE.serve(&transport, move |from, req| {
        let h = h.clone();
        async move { target::prepare(&alive(&h)?, from, req).await }
    });
    let h = Arc::downgrade(hub);
    MIGRATE_PAGES.serve(&transport, move |from, req| {
        let h = h.clone();
        async move { target::pages(&alive(&h)?, from, req).await }
    });
    let h = Arc::downgrade(hub);
    MIGRATE_END.serve(&transport, move |from, req| {
        let h = h.clone();
        async move { target::end(&alive(&h)?, from, req).await }
    });
    // A hub from before the watch does not know its stream kind (the fault makes this one such
    // a hub, for the test of the source's fallback to `MIGRATE_END`).
    if !crate::faults::armed("no-migrate-watch") {
        let h = Arc::downgrade(hub);
        MIGRATE_WATCH.serve(&transport, move |_, req| {
            let h = h.clone();
            async move { target::watch(&alive(&h)?, req).await }
        });
    }
}
