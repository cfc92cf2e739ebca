//! The leader's migrations: it drains hubs, sheds load and moves tasks after their devices by
//! asking tasks' hosts to migrate them (`Hub::migrate`, which forwards to the host). The decisions
//! are the scheduler's, pure: `scheduler::drain`, `scheduler::overload` and `scheduler::follow`;
//! this module feeds them the state and the hubs' loads, runs what they ask for (at most one
//! migration out of each hub at a time, and one overload move in the whole mesh at a time), and
//! remembers failures. What it remembers lives in the leader's memory only: a new leader starts
//! afresh, and reads the cooldowns from the replicated history.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubmesh_consensus::state::{ClusterState, Command, MigrationReason};
use hubmesh_consensus::{now_ms, NodeId};

use super::MigrateError;
use crate::hub::Hub;
use crate::scheduler::overload::{HubLoad, Overload, TaskLoad, Thresholds};
use crate::scheduler::{drain, follow};

/// The first wait after a failed drain migration; it doubles with each failure.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two drain attempts of one task.
const LAST_RETRY: Duration = Duration::from_secs(30);
/// How long a task's hub must have stopped seeing the task's device (while another hub sees
/// it) before the task follows: a device that blinks, or one between its goodbye on one segment
/// and its hello on the other, does not move its task.
const FOLLOW_GRACE: Duration = Duration::from_secs(10);
/// After a failed move after a device, the next try waits this long.
const FOLLOW_RETRY: Duration = Duration::from_secs(10);
/// A task that followed its device does not follow it again for this long.
const FOLLOW_COOLDOWN: Duration = Duration::from_secs(60);
/// After an overload move ends, the loads the next decision reads must show it.
const SETTLE: Duration = Duration::from_secs(2 * crate::load::INTERVAL.as_secs());

/// A migration the leader has seen under way for this long (by its own clock) is aborted. Its
/// source aborts one it no longer drives (`abort_left_behind`), and a driver gives up its
/// pre-copy after half the budget; this catches the rest: a driver that hangs, or a hand-over
/// so slow (each message may take `CALL_TIMEOUT`) that it is better given up. Aborting is safe in
/// every phase: a commit proposed after it is refused, and the driver then resumes the task.
const ABANDONED: Duration = Duration::from_secs(3 * super::BUDGET.as_secs());
/// After an abort of an abandoned migration is proposed, the next try for it waits this long.
const ABANDONED_RETRY: Duration = Duration::from_secs(5);

/// What the policy's migrations report back.
#[derive(Default)]
struct Shared {
    /// Migrations asked for and not ended, by source hub, with their reason.
    running: BTreeMap<NodeId, (String, MigrationReason)>,
    /// Failed drain migrations, by task.
    drain_failures: BTreeMap<String, u32>,
    /// When a task whose drain migration failed may be tried again.
    retry_at: BTreeMap<String, Instant>,
    /// No overload decision before this (the last overload move's effect is not measured yet).
    overload_quiet_until: Option<Instant>,
    /// When a task whose move after its device failed may be tried again.
    follow_retry_at: BTreeMap<String, Instant>,
}

/// The leader's migration policy.
#[derive(Default)]
pub(crate) struct Policy {
    overload: Overload,
    /// Since when each task has been astray (its hub does not see its device; another does).
    astray_since: BTreeMap<String, Instant>,
    /// Migrations under way, by task and id: when this leader may abort them as abandoned.
    watchdog: BTreeMap<(String, u64), Instant>,
    shared: Arc<Mutex<Shared>>,
}

impl Policy {
    /// Forgets everything (this hub no longer leads).
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }

    /// One round on the leader: starts the migrations the drain and overload policies ask for.
    /// `silent`: draining hubs the leader has not reached lately (their tasks fail over).
    /// Returns the tasks whose re-placement waits for their drain migration.
    pub(crate) fn round(
        &mut self,
        hub: &Arc<Hub>,
        state: &ClusterState,
        silent: &BTreeSet<NodeId>,
    ) -> BTreeSet<String> {
        let now = Instant::now();
        for (task, id) in overdue(&mut self.watchdog, state, now) {
            tracing::warn!(task, id, "a migration has not ended in {ABANDONED:?}: aborting it");
            let abort = Command::AbortMigration {
                task,
                id,
                why: format!("abandoned: not ended after {}s", ABANDONED.as_secs()),
                at_ms: now_ms(),
            };
            let hub = hub.clone();
            tokio::spawn(async move {
                if let Err(e) = hub.consensus().propose(abort).await {
                    tracing::debug!(error = %e, "aborting an abandoned migration");
                }
            });
        }
        let near = hub.devices().near();
        let (mut busy, failures, resting, overload_running, quiet) = {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            // A task no longer on a draining hub starts with a clean slate next time.
            let draining = drain::deferred(state, &near, &BTreeMap::new(), &BTreeSet::new());
            shared.drain_failures.retain(|t, _| draining.contains(t));
            shared.retry_at.retain(|t, at| *at > now && draining.contains(t));
            let busy: BTreeSet<NodeId> = shared.running.keys().copied().collect();
            let overload_running = shared.running.values().any(|(_, r)| *r == MigrationReason::Overload);
            let quiet = shared.overload_quiet_until.is_some_and(|t| t > now);
            let resting: BTreeSet<String> = shared.retry_at.keys().cloned().collect();
            (busy, shared.drain_failures.clone(), resting, overload_running, quiet)
        };
        let deferred = drain::deferred(state, &near, &failures, silent);
        for (task, from) in drain::next(state, &near, &failures, silent, &busy, &resting) {
            busy.insert(from);
            self.start(hub, task, from, None, MigrationReason::Drain);
        }
        // A hub that is the source of a migration (the policy's, an operator's, a former
        // leader's) starts no other.
        busy.extend(state.tasks.values().filter_map(|t| t.migration.map(|m| m.from)));
        let reached = hub.devices().reached();
        for (task, from) in self.follow(state, &near, &reached, now) {
            if busy.insert(from) {
                tracing::info!(%task, from = from.0, "its hub no longer sees its device: moving it to one that does");
                self.start(hub, task, from, None, MigrationReason::Device);
            }
        }
        let config = hub.config().overload;
        if config.enabled {
            let thresholds = Thresholds {
                high: config.high,
                low: config.low,
                window_ms: config.window.as_millis() as u64,
                cooldown_ms: config.cooldown.as_millis() as u64,
            };
            let loads = loads(hub, state, config.queue_wait.as_micros() as f64);
            // Every round records the loads (the windows), but a move waits until the last one
            // has ended and shows in the reports: two decisions on one stale report could send
            // two tasks to the same hub.
            let mv = self.overload.round(state, &loads, now_ms(), &thresholds, &busy, &near);
            if let Some(m) = mv.filter(|_| !overload_running && !quiet) {
                tracing::info!(task = %m.task, from = m.from.0, to = m.to.0, "shedding load by live migration");
                self.start(hub, m.task, m.from, Some(m.to), MigrationReason::Overload);
            }
        }
        deferred
    }

    /// The tasks astray for `FOLLOW_GRACE` and not resting after a failed move, with their hubs.
    fn follow(
        &mut self,
        state: &ClusterState,
        near: &crate::scheduler::Near,
        reached: &BTreeSet<NodeId>,
        now: Instant,
    ) -> Vec<(String, NodeId)> {
        let astray = follow::astray(state, near, reached, now_ms(), FOLLOW_COOLDOWN.as_millis() as u64);
        self.astray_since.retain(|t, _| astray.contains_key(t));
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.follow_retry_at.retain(|t, at| *at > now && astray.contains_key(t));
        astray
            .into_iter()
            .filter(|(task, _)| {
                let since = *self.astray_since.entry(task.clone()).or_insert(now);
                now.duration_since(since) >= FOLLOW_GRACE && !shared.follow_retry_at.contains_key(task)
            })
            .collect()
    }

    /// Asks for one migration on a task of its own; its end is recorded in `shared`.
    fn start(&self, hub: &Arc<Hub>, task: String, from: NodeId, to: Option<NodeId>, reason: MigrationReason) {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).running.insert(from, (task.clone(), reason));
        let (hub, shared) = (hub.clone(), self.shared.clone());
        tokio::spawn(async move {
            let result = hub.migrate(&task, to, reason).await;
            let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
            shared.running.remove(&from);
            if reason == MigrationReason::Overload {
                shared.overload_quiet_until = Some(Instant::now() + SETTLE);
            }
            let Err(e) = result else { return };
            tracing::warn!(task, reason = reason.as_str(), error = %e, "the policy's migration failed");
            if reason == MigrationReason::Device {
                shared.follow_retry_at.insert(task, Instant::now() + FOLLOW_RETRY);
                return;
            }
            if reason != MigrationReason::Drain {
                return;
            }
            // Another migration under way, or an outcome not known yet, says nothing about
            // this task: it is tried again without counting.
            let counts = !matches!(e, MigrateError::InProgress(_) | MigrateError::Unknown(_));
            let n = shared.drain_failures.entry(task.clone()).or_default();
            if counts {
                *n += 1;
            }
            let wait = FIRST_RETRY.saturating_mul(1 << (*n).min(5)).min(LAST_RETRY);
            if *n == drain::MAX_ATTEMPTS {
                tracing::warn!(
                    task,
                    "drain keeps failing to migrate it; a durable task restarts elsewhere from its checkpoint"
                );
            }
            shared.retry_at.insert(task, Instant::now() + wait);
        });
    }
}

/// The migrations in `state` that `watchdog` has seen for `ABANDONED`; each is due again only
/// after `ABANDONED_RETRY`. Forgets the ones that ended.
fn overdue(watchdog: &mut BTreeMap<(String, u64), Instant>, state: &ClusterState, now: Instant) -> Vec<(String, u64)> {
    let live: BTreeSet<(String, u64)> =
        state.tasks.iter().filter_map(|(n, t)| t.migration.map(|m| (n.clone(), m.id))).collect();
    watchdog.retain(|k, _| live.contains(k));
    let mut due = Vec::new();
    for k in live {
        let at = watchdog.entry(k.clone()).or_insert(now + ABANDONED);
        if *at <= now {
            *at = now + ABANDONED_RETRY;
            due.push(k);
        }
    }
    due
}

/// The fresh loads of the hubs that are up, as the overload policy reads them.
fn loads(hub: &Hub, state: &ClusterState, full_wait_us: f64) -> BTreeMap<NodeId, HubLoad> {
    let wait = |us: u64| us as f64 / full_wait_us.max(1.0);
    hub.loads()
        .fresh()
        .into_iter()
        .filter(|(n, _)| state.nodes.get(n).is_some_and(|r| state.is_up(*n) && !r.witness))
        .map(|(n, r)| {
            let tasks = r
                .tasks
                .iter()
                .map(|t| {
                    let load = TaskLoad {
                        cores: f64::from(t.cpu_millicores) / 1000.0,
                        memory_bytes: t.memory_bytes,
                        wait: wait(t.queue_wait_us),
                    };
                    (t.name.clone(), load)
                })
                .collect();
            let load = HubLoad {
                cpu: f64::from(r.cpu_permille) / 1000.0,
                memory: f64::from(r.memory_permille) / 1000.0,
                task_cpus: f64::from(r.task_cpus.max(1)),
                tasks,
            };
            (n, load)
        })
        .collect()
}

#[cfg(test)]
pub(super) mod tests {
    use hubmesh_consensus::state::{NodeStatus, TaskKind};
    use hubmesh_consensus::NodeId;

    use super::*;
    use crate::scheduler::tests::{constrained_deploy, labelled_node};

    /// Task `t` on hub 1, with migration `id` to hub 2 under way (or none).
    pub(in crate::migration) fn with_migration(id: Option<u64>) -> ClusterState {
        let mut s = ClusterState::default();
        let place = Command::PlaceInstance { task: "t".into(), instance: 0, node: NodeId(1), expected: None };
        for c in [
            labelled_node(1, 10, NodeStatus::Up, &[]),
            labelled_node(2, 10, NodeStatus::Up, &[]),
            constrained_deploy("t", TaskKind::Stateful, &[]),
            place,
        ] {
            s.apply(&c).unwrap();
        }
        if let Some(id) = id {
            let epoch = s.placement("t", 0).unwrap().epoch;
            let begin = Command::BeginMigration {
                task: "t".into(),
                instance: 0,
                id,
                from: NodeId(1),
                to: NodeId(2),
                expected: epoch,
                reason: MigrationReason::Manual,
                at_ms: 0,
            };
            s.apply(&begin).unwrap();
        }
        s
    }

    #[test]
    fn a_migration_is_overdue_after_the_watchdogs_time_then_again_after_the_retry() {
        let (mut watchdog, t0) = (BTreeMap::new(), Instant::now());
        let state = with_migration(Some(7));
        assert!(overdue(&mut watchdog, &state, t0).is_empty(), "first seen");
        assert!(overdue(&mut watchdog, &state, t0 + ABANDONED - Duration::from_millis(1)).is_empty());
        assert_eq!(overdue(&mut watchdog, &state, t0 + ABANDONED), [("t".to_owned(), 7)]);
        let later = t0 + ABANDONED + ABANDONED_RETRY / 2;
        assert!(overdue(&mut watchdog, &state, later).is_empty(), "not proposed again at once");
        assert_eq!(overdue(&mut watchdog, &state, t0 + ABANDONED + ABANDONED_RETRY).len(), 1);
    }

    #[test]
    fn an_ended_migration_is_forgotten_and_a_new_one_waits_the_whole_time() {
        let (mut watchdog, t0) = (BTreeMap::new(), Instant::now());
        assert!(overdue(&mut watchdog, &with_migration(Some(7)), t0).is_empty());
        assert!(overdue(&mut watchdog, &with_migration(None), t0 + ABANDONED).is_empty());
        assert!(watchdog.is_empty());
        // Another migration of the same task (a new id) starts its own clock.
        let t1 = t0 + ABANDONED;
        assert!(overdue(&mut watchdog, &with_migration(Some(9)), t1).is_empty());
        assert!(overdue(&mut watchdog, &with_migration(Some(9)), t1 + ABANDONED / 2).is_empty());
        assert_eq!(overdue(&mut watchdog, &with_migration(Some(9)), t1 + ABANDONED), [("t".to_owned(), 9)]);
    }
}
