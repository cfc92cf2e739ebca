//! How a live migration ends, on its source: settling an unknown outcome (an abort is proposed
//! until the commit or the abort is recorded — they exclude each other), giving up before the
//! commit, and finishing after it (the actor told, the target's answer that it serves — watched
//! for since before the commit — awaited, the moved instance dropped once this hub applied the
//! commit).

use std::time::{Duration, Instant};

use hubmesh_consensus::state::{Command, MigrationOutcome, MigrationStats, Placement};
use hubmesh_consensus::transport::{RpcError, MIGRATE_END, MIGRATE_WATCH};
use hubmesh_consensus::{now_ms, ProposeError};
use hubmesh_proto::pb;

use super::source::{moved_to, Driver, Ended, CALL_TIMEOUT};
use super::{MigrateError, BUDGET};
use crate::executor::Resolution;

impl Driver<'_> {
    /// Settles a migration whose commit gave no clear answer: an abort is proposed until one of
    /// the two is recorded (they exclude each other), then the state says which. With a commit
    /// proposed (`patient`) that takes as long as it takes — a frozen task answering from here
    /// could fork its state; otherwise no commit was proposed, and after the budget the task
    /// simply goes on here (a begin left behind is aborted by the reconciler, `abort_left_behind`).
    pub(super) async fn settle(&self, why: &str, patient: bool) -> Ended {
        let deadline = Instant::now() + BUDGET;
        loop {
            if let Some(ended) = self.recorded() {
                return ended;
            }
            let abort = Command::AbortMigration {
                task: self.task.to_owned(),
                id: self.id,
                why: why.to_owned(),
                at_ms: now_ms(),
            };
            match self.hub.consensus().propose(abort).await {
                Ok(_) => return Ended::NotMoved(self.hub.consensus().state().placement(self.task, 0)),
                Err(ProposeError::Rejected(_)) => {
                    self.hub.consensus().catch_up(Duration::from_secs(1)).await;
                    if let Some(ended) = self.recorded() {
                        return ended;
                    }
                }
                Err(e) => tracing::warn!(task = self.task, error = %e, "aborting the migration failed; retrying"),
            }
            if Instant::now() >= deadline && !patient {
                return Ended::NotMoved(self.hub.consensus().state().placement(self.task, 0));
            }
            if Instant::now() >= deadline {
                // Frozen until the mesh answers: the lease and failover decide then.
                tracing::error!(task = self.task, "the migration's outcome is still unknown; the task stays frozen");
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The migration's end as the applied state has it, if it has ended.
    fn recorded(&self) -> Option<Ended> {
        let state = self.hub.consensus().state();
        let Some(t) = state.tasks.get(self.task) else { return Some(Ended::NotMoved(None)) };
        match t.migration_outcome(self.id) {
            MigrationOutcome::Underway => None,
            MigrationOutcome::Moved(p) => Some(Ended::Moved(p)),
            MigrationOutcome::NotMoved => Some(Ended::NotMoved(t.instances.get(&0).copied())),
        }
    }

    /// Gives the migration up before the commit: aborted in the state, the actor runs again.
    pub(super) async fn give_up(&self, why: String, committing: bool) -> MigrateError {
        metrics::counter!("hubmesh_migration_aborts_total").increment(1);
        match self.settle(&why, committing).await {
            Ended::Moved(p) => {
                // The commit went through after all (an earlier answer was lost).
                let _ = self.hub.executor().migration_resolve(self.task, Resolution::Moved(moved_to(p))).await;
                self.detach_once_applied(p).await;
                MigrateError::Aborted(format!("{why}; yet the task moved to hub {}", p.node))
            }
            Ended::NotMoved(now) => {
                self.resume(now).await;
                let _ = self.end_on_target(0).await;
                MigrateError::Aborted(why)
            }
        }
    }

    /// The actor runs again here (still the host), or — a re-placement fenced the migration —
    /// it runs nothing more (see `Resolution::Fenced`).
    async fn resume(&self, now: Option<Placement>) {
        let outcome = match now {
            Some(p) if p == self.from => Resolution::Aborted,
            now => Resolution::Fenced(now.map(moved_to)),
        };
        if let Err(e) = self.hub.executor().migration_resolve(self.task, outcome).await {
            tracing::debug!(task = self.task, error = %e, "resuming after the migration");
        }
    }

    /// Drops the moved instance once this hub's own state shows the task at `p` (until then the
    /// reconciler could take the old placement for current and restart it here from an older
    /// checkpoint). If it never does in time, the moved actor stays: it answers `Moved` and the
    /// reconciler stops it once the state arrives (without a checkpoint).
    async fn detach_once_applied(&self, p: Placement) {
        let task = self.task.to_owned();
        let applied = self.hub.wait_state(Duration::from_secs(10), move |s| s.placement(&task, 0) == Some(p)).await;
        if applied {
            // Off the runtime's threads: it queues the stop (waiting for room) and joins the
            // actor's thread, which frees the instance and its image (for a 64 MiB task,
            // milliseconds in which this worker would poll nothing else, such as the relayed
            // calls' answers coming back from the target).
            let (ex, task) = (self.hub.executor().clone(), self.task.to_owned());
            if let Err(e) = tokio::task::spawn_blocking(move || ex.detach_migrated(&task)).await {
                tracing::warn!(task = self.task, error = %e, "dropping the moved instance failed");
            }
        } else {
            tracing::warn!(task = self.task, "this hub has not applied the migration's commit yet");
        }
    }

    async fn end_on_target(&self, epoch: u64) -> Result<pb::MigrateEndResponse, RpcError> {
        let req = pb::MigrateEnd { task: self.task.to_owned(), id: self.id, epoch };
        MIGRATE_END.call(&self.hub.consensus().transport(), self.to.0, &req, CALL_TIMEOUT).await
    }

    /// Asks the target, with the commit still in flight, to answer once it serves at the
    /// commit's epoch (`MIGRATE_WATCH`): the pause then ends when the target serves, not a round
    /// trip after this hub learned of the commit. Nothing depends on the answer but the figures.
    pub(super) fn watch_target(&self, frozen: Instant) -> Watch {
        let transport = self.hub.consensus().transport();
        let req = pb::MigrateWatch { task: self.task.to_owned(), id: self.id };
        let to = self.to.0;
        Watch(tokio::spawn(async move {
            let asked = frozen.elapsed();
            let target = MIGRATE_WATCH.call(&transport, to, &req, CALL_TIMEOUT).await?;
            Ok(Serving { asked, answered: frozen.elapsed(), target })
        }))
    }

    /// When the target served at `epoch`: the watch's answer, or — the target did not take the
    /// watch (a hub from before it), refused it, or served another epoch — `MIGRATE_END` asked
    /// now (or could not reach it). A watch that timed out is not asked again: the target is
    /// stuck or gone, and failover takes over.
    async fn serving(&self, watch: Option<Watch>, paused: Instant, epoch: u64) -> Result<Serving, RpcError> {
        if let Some(mut w) = watch {
            let reason = match (&mut w.0).await {
                Ok(Ok(s)) if s.target.epoch == epoch => return Ok(s),
                Ok(Ok(s)) => {
                    tracing::debug!(task = self.task, epoch = s.target.epoch, "the target serves another epoch");
                    "other_epoch"
                }
                Ok(Err(e @ (RpcError::Remote(_) | RpcError::NotDelivered(_) | RpcError::Unreachable(..)))) => {
                    tracing::debug!(task = self.task, error = %e, "the target did not take the watch; asking again");
                    // A hub from before the watch refuses its stream kind as a bad request (the
                    // watch itself never answers that).
                    match e.code() {
                        Some(pb::ErrorCode::BadRequest) => "not_served",
                        Some(_) => "refused",
                        None => "unreachable",
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(e) => {
                    tracing::warn!(task = self.task, error = %e, "the watch's task failed; asking again");
                    "failed"
                }
            };
            metrics::counter!("hubmesh_migration_watch_fallbacks_total", "reason" => reason).increment(1);
        }
        let asked = paused.elapsed();
        let target = self.end_on_target(epoch).await?;
        Ok(Serving { asked, answered: paused.elapsed(), target })
    }

    /// After the state recorded the end: the actor is told (its held calls go to the target),
    /// the target's answer that it serves awaited (`watch`, or asked now), the pause recorded.
    pub(super) async fn finish(
        &self,
        ended: Ended,
        paused: Instant,
        stats: MigrationStats,
        stateful: bool,
        watch: Option<Watch>,
    ) -> Result<pb::MigrateReport, MigrateError> {
        let moved = match ended {
            Ended::Moved(p) if p.node == self.to => p,
            Ended::Moved(p) => {
                drop(watch);
                if stateful {
                    let _ = self.hub.executor().migration_resolve(self.task, Resolution::Moved(moved_to(p))).await;
                }
                return Err(MigrateError::Aborted(format!("the task was moved to hub {} meanwhile", p.node)));
            }
            Ended::NotMoved(now) => {
                drop(watch);
                metrics::counter!("hubmesh_migration_aborts_total").increment(1);
                if stateful {
                    self.resume(now).await;
                }
                let _ = self.end_on_target(0).await;
                return Err(MigrateError::Aborted("the commit was refused".into()));
            }
        };
        if stateful {
            if let Err(e) = self.hub.executor().migration_resolve(self.task, Resolution::Moved(moved_to(moved))).await {
                tracing::warn!(task = self.task, error = %e, "telling the task it moved");
            }
        }
        // The held calls are on their way to the target now.
        let released = paused.elapsed();
        // The pause ends when the target serves and the held calls are released; if the target
        // cannot say when it serves (it died after the commit: failover takes over), the pause
        // is not known.
        let (pause_us, applied_us, running_us) = match self.serving(watch, paused, moved.epoch.0).await {
            Ok(s) => {
                let asked = s.asked.as_micros() as u64;
                let pause = s.answered.max(released).as_micros() as u64;
                (pause, asked + s.target.applied_us, asked + s.target.running_us)
            }
            Err(e) => {
                tracing::warn!(task = self.task, error = %e, "the target did not say it serves");
                (0, 0, 0)
            }
        };
        if stateful {
            self.detach_once_applied(moved).await;
        }
        if pause_us > 0 {
            let note = Command::AnnotateMigration { task: self.task.to_owned(), epoch: moved.epoch, pause_us };
            let hub = self.hub.clone();
            tokio::spawn(async move {
                if let Err(e) = hub.consensus().propose(note).await {
                    tracing::debug!(error = %e, "recording the migration's pause");
                }
            });
            metrics::histogram!("hubmesh_migration_pause_seconds").record(pause_us as f64 / 1e6);
        }
        metrics::counter!("hubmesh_migrations_total").increment(1);
        Ok(pb::MigrateReport {
            from: self.from.node.0,
            to: self.to.0,
            epoch: moved.epoch.0,
            rounds: stats.rounds,
            bytes: stats.bytes,
            precopy_ms: stats.precopy_ms,
            pause_us,
            duration_ms: self.started.elapsed().as_millis() as u64,
            applied_us,
            running_us,
            ..Default::default()
        })
    }
}

/// The target's answer that it serves: when (from the freeze) it was asked and when it answered.
pub(super) struct Serving {
    asked: Duration,
    answered: Duration,
    target: pb::MigrateEndResponse,
}

/// A request to the target to answer once it serves; dropped, it stops waiting for the answer.
pub(super) struct Watch(tokio::task::JoinHandle<Result<Serving, RpcError>>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}
