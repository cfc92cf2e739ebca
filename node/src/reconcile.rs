//! The reconciler: makes the set of tasks this hub runs match the placements in the replicated
//! state. It wakes on every applied state (and once a second, to retry), starts what is placed
//! here, restarts what changed version or epoch, and stops what moved away or was deleted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hubmesh_consensus::state::{CheckpointPolicy, CheckpointRecord, TaskKind, TaskRecord};
use hubmesh_consensus::ClusterState;

use crate::executor::{InstanceLimits, Restore, TaskConfig};
use crate::hub::{Hub, StartFailure};
use crate::worker::{OnState, Worker};

/// The executor's configuration for a task record.
pub(crate) fn config_of(record: &TaskRecord, epoch: u64) -> TaskConfig {
    let s = &record.spec;
    TaskConfig {
        name: s.name.clone(),
        version: record.version,
        epoch,
        kind: s.kind,
        module_hash: s.module_hash,
        limits: InstanceLimits {
            memory_bytes: s.limits.memory_bytes,
            timeout_ms: s.limits.timeout_ms,
            max_input_bytes: s.limits.max_input_bytes,
            max_output_bytes: s.limits.max_output_bytes,
        },
        queue: s.limits.queue,
        checkpoint: s.checkpoint,
        tick_ms: s.tick_ms,
    }
}

/// The reconciler: a round per applied state, and once a second to retry.
pub(crate) fn reconciler(hub: Arc<Hub>) -> impl Worker {
    OnState::new("reconciler", hub, Duration::from_secs(1), |hub, state| async move {
        reconcile_once(&hub, &state).await;
        Ok(())
    })
}

async fn reconcile_once(hub: &Arc<Hub>, state: &Arc<ClusterState>) {
    let me = hub.consensus().node_id();
    let desired: HashMap<String, TaskConfig> = state
        .tasks
        .values()
        .filter_map(|t| {
            t.placements().find(|(_, p)| p.node == me).map(|(_, p)| (t.spec.name.clone(), config_of(t, p.epoch.0)))
        })
        .collect();
    let running: HashMap<String, TaskConfig> =
        hub.executor().configs().into_iter().map(|c| (c.name.clone(), c)).collect();

    // A task this hub is migrating away is the driver's: it stops it (without a checkpoint) once
    // the target serves, or keeps it if the migration is given up.
    let migrating = |n: &str| hub.migrations().is_outgoing(n);
    hub.migrations().sweep(hub);
    crate::migration::abort_left_behind(hub, state);
    for name in running.keys().filter(|n| !desired.contains_key(*n) && !migrating(n)) {
        let deleted = !state.tasks.contains_key(name);
        tracing::info!(task = %name, deleted, "stopping task");
        let (executor, name2) = (hub.executor().clone(), name.clone());
        let _ = tokio::task::spawn_blocking(move || executor.stop_task(&name2, deleted)).await;
    }
    hub.forget_start_failures(|n| desired.contains_key(n));

    let mut caught_up: Option<Option<Arc<ClusterState>>> = None;
    for (name, cfg) in desired {
        if running.get(&name) == Some(&cfg) || migrating(&name) {
            continue;
        }
        let failed_before = hub.start_failure(&name).is_some_and(|f| f.holds(cfg.version, cfg.epoch));
        if failed_before {
            continue;
        }
        let wasm = match hub.blobs().get(&cfg.module_hash) {
            Ok(w) => w,
            Err(hubmesh_storage::BlobError::NotFound(_) | hubmesh_storage::BlobError::Corrupt(_)) => {
                match crate::dataplane::fetch_module(hub, &cfg.module_hash).await {
                    Ok(w) => {
                        if let Err(e) = hub.blobs().put(&w) {
                            // This hub's disk (full, failing): not the task's.
                            record_retrying(hub, &cfg, &e.to_string());
                            continue;
                        }
                        w
                    }
                    Err(e) => {
                        // Not a start failure: another hub may come back with it; retry next round.
                        tracing::warn!(task = %name, error = %e, "module not available yet");
                        continue;
                    }
                }
            }
            Err(e) => {
                record_retrying(hub, &cfg, &e.to_string());
                continue;
            }
        };
        // This hub's applied state may lag the leader's (it has just restarted, or was cut off):
        // restoring from an older committed checkpoint than the mesh's would reuse its sequence
        // numbers. So a stateful task restores from the leader's view — unless this process
        // staged the instance for the checkpoint the live migration to this epoch committed: it
        // has never run the task at this epoch (a start takes the staged instance), so no newer
        // checkpoint of it can exist, and the barrier would only lengthen the migration's pause.
        // The barrier also confirms the task is still placed here; without it, a lease and no
        // backlog being applied stand in (a target that learns the switch late, after a
        // partition, is applying a backlog that may hold a re-placement).
        let staged_for_this_epoch = hub.has_quorum()
            && hub.consensus().applied_all_received()
            && state.tasks.get(&name).is_some_and(|t| {
                t.checkpoint.as_ref().is_some_and(|c| {
                    migrated_here(t, cfg.epoch, c)
                        && hub.migrations().has_staged(&name, &c.key(&name), &c.manifest_hash)
                })
            });
        let fresh = if cfg.kind == TaskKind::Stateful
            && !staged_for_this_epoch
            && state.tasks.get(&name).is_some_and(|t| t.checkpoint.is_some())
        {
            // One read barrier per round, however many tasks start (a hub's boot starts them all).
            // Without it (no leader known yet after a restart, or cut off), the tasks wait for the
            // next round: a lagging view may name an older checkpoint than the mesh committed.
            let fresh = match &caught_up {
                Some(Some(s)) => Arc::clone(s),
                Some(None) => continue,
                None => {
                    let ok = hub.consensus().catch_up(Duration::from_secs(1)).await;
                    match caught_up.insert(ok.then(|| hub.consensus().state())) {
                        Some(s) => Arc::clone(s),
                        None => {
                            // Not a start failure (no back-off): the next round tries again.
                            tracing::info!(task = %name, "waiting to learn the mesh's current state before restoring");
                            continue;
                        }
                    }
                }
            };
            let still = fresh
                .tasks
                .get(&name)
                .is_some_and(|t| t.placements().any(|(_, p)| p.node == me && p.epoch.0 == cfg.epoch));
            if !still {
                continue;
            }
            fresh
        } else {
            state.clone()
        };
        let record = fresh.tasks.get(&name).and_then(|t| t.checkpoint.as_ref().map(|c| (t, c)));
        let began = std::time::Instant::now();
        let restore = match record {
            // Stored here, with this manifest, before the staged instance was kept.
            Some((_, record)) if staged_for_this_epoch => Restore::Key(record.key(&name)),
            Some((t, record)) if cfg.checkpoint != CheckpointPolicy::None || migrated_here(t, cfg.epoch, record) => {
                match crate::replication::fetch_checkpoint(hub, &name, record).await {
                    Ok(key) => Restore::Key(key),
                    Err(e) => {
                        // Not a start failure: a holder may come back; never start without the state.
                        tracing::warn!(task = %name, error = %e, "the task's checkpoint is not available yet");
                        continue;
                    }
                }
            }
            _ => Restore::Fresh,
        };
        // A live migration to this hub built the instance already.
        let staged = match (&restore, record) {
            (Restore::Key(key), Some((_, record))) => {
                hub.migrations().take_staged(&name, key, &record.manifest_hash).map(|s| (key.clone(), s))
            }
            _ => None,
        };
        let executor = hub.executor().clone();
        let cfg2 = cfg.clone();
        let fetched = began.elapsed();
        let res = tokio::task::spawn_blocking(move || match staged {
            Some((key, staged)) => executor.start_staged(cfg2, &wasm, key, staged),
            None => executor.start_task_from(cfg2, &wasm, restore),
        })
        .await;
        match res {
            Ok(Ok(())) => {
                tracing::info!(task = %name, epoch = cfg.epoch, checkpoint_ready = ?fetched, started = ?began.elapsed(), "task started");
                hub.forget_start_failures(|n| n != name);
            }
            Ok(Err(crate::executor::StartTaskError::Restore(e))) => {
                // The checkpoint may be on its way (or fetched again next round): not permanent.
                tracing::warn!(task = %name, error = %e, "restoring the task failed; retrying");
            }
            // Shown to callers and in `task show` meanwhile, and tried again after a backoff.
            Ok(Err(e @ crate::executor::StartTaskError::Hub(_))) => record_retrying(hub, &cfg, &e.to_string()),
            Ok(Err(e)) => record_failure(hub, &cfg, &e.to_string()),
            Err(e) => record_failure(hub, &cfg, &format!("the start thread failed: {e}")),
        }
    }
    metrics::gauge!("hubmesh_tasks_running").set(hub.executor().configs().len() as f64);
}

/// Whether the placement at `epoch` was made by a live migration that committed `record`: a
/// task without checkpoints then starts from the state the migration carried (after a failover
/// it starts empty, as such a task always does).
fn migrated_here(t: &TaskRecord, epoch: u64, record: &CheckpointRecord) -> bool {
    t.history.iter().rev().any(|h| {
        h.epoch.0 == epoch
            && h.from_sequence == Some(record.sequence)
            && h.migration.as_ref().is_some_and(|m| m.aborted.is_none() && m.from_epoch == record.epoch)
    })
}

fn record_failure(hub: &Hub, cfg: &TaskConfig, reason: &str) {
    hub.record_start_failure(&cfg.name, StartFailure::of_task(cfg.version, cfg.epoch, reason.to_owned()));
}

/// A failure of this hub (see `StartFailure::of_hub`).
fn record_retrying(hub: &Hub, cfg: &TaskConfig, reason: &str) {
    let before = hub.start_failure(&cfg.name);
    let failure = StartFailure::of_hub(cfg.version, cfg.epoch, reason.to_owned(), before.as_ref());
    hub.record_start_failure(&cfg.name, failure);
}

/// Every hub that may run tasks keeps every task's module, so that a failover host never waits
/// for (or loses) a module that only the dead hub had. Its own worker: fetching from a dead hub
/// waits for a timeout, which must not delay starting tasks.
pub(crate) fn module_keeper(hub: Arc<Hub>) -> impl Worker {
    OnState::new("module-keeper", hub, Duration::from_secs(2), |hub, state| async move {
        keep_modules(&hub, &state).await;
        Ok(())
    })
}

async fn keep_modules(hub: &Arc<Hub>, state: &ClusterState) {
    if hub.config().witness {
        return;
    }
    for t in state.tasks.values() {
        let hash = t.spec.module_hash;
        if hub.blobs().contains(&hash) {
            continue;
        }
        match crate::dataplane::fetch_module(hub, &hash).await {
            Ok(w) => {
                if let Err(e) = hub.blobs().put(&w) {
                    tracing::warn!(task = %t.spec.name, error = %e, "storing a module copy failed");
                }
            }
            Err(e) => tracing::debug!(task = %t.spec.name, error = %e, "no copy of the module yet"),
        }
    }
}
