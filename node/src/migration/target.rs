//! A live migration's target: it takes the base checkpoint (fetched if it lacks it), stores the
//! pages of the rounds as they arrive (verified by hash, bounded by the task's memory) and builds
//! the task's instance from them (`executor::StagedTask`), stores the final manifest with every
//! page it refers to before it answers, and, once the commit has made it the host, starts the
//! task from the staged instance and says when it runs here. Only the hub the replicated state
//! names as the migration's source is heard, and only for a migration to this hub.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmesh_consensus::state::{
    checkpoint_key, parse_checkpoint_key, ClusterState, MigrationOutcome, TaskKind, TaskRecord,
};
use hubmesh_consensus::transport::Refusal;
use hubmesh_consensus::{Epoch, NodeId};
use hubmesh_proto::pb;
use hubmesh_storage::{Hash, PagePin, PageWrite};

use crate::checkpoint::{Manifest, PAGE};
use crate::executor::StagedTask;
use crate::hub::Hub;

/// Longest the target waits for the state to show the migration, or the task to run.
const SETTLE: Duration = Duration::from_secs(10);

/// A migration to this hub: its pages are in the page log as they arrive (synced in the
/// background, so that the critical phase writes and flushes little more than the last ones),
/// pinned until the final manifest refers to them.
pub(super) struct Incoming {
    id: u64,
    from: NodeId,
    /// Page bytes received.
    bytes: u64,
    /// Most page bytes it may take: a few times the task's memory (rounds resend changed pages).
    limit: u64,
    since: Instant,
    /// The base checkpoint's pages and the received ones: compaction keeps them.
    pin: PagePin,
    /// The task's instance, built as the pages arrive (none if it could not be: the task then
    /// restores from the page log at the switch, as after a failover).
    staged: Option<StagedTask>,
    /// Its memory, as of the last round applied: the hub's load counts it while a round has the
    /// instance out.
    staged_bytes: u64,
}

/// A staged instance whose migration handed over its final state: the reconciler starts the task
/// from it once the switch makes this hub the host.
pub(super) struct Ready {
    id: u64,
    from: NodeId,
    /// The page-log key of the migrated checkpoint.
    key: String,
    /// The hash of its manifest as stored here.
    manifest_hash: Hash,
    staged: StagedTask,
    since: Instant,
}

fn refuse(code: pb::ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal::new(code, message)
}

/// Whether the applied state has migration `id` of `task` from `from` to this hub.
fn expected(hub: &Hub, task: &str, id: u64, from: NodeId) -> bool {
    let me = hub.consensus().node_id();
    hub.consensus().state().migration(task).is_some_and(|m| m.id == id && m.from == from && m.to == me)
}

pub(super) async fn prepare(
    hub: &Arc<Hub>,
    from: NodeId,
    req: pb::MigratePrepare,
) -> Result<pb::MigratePrepareResponse, Refusal> {
    let me = hub.consensus().node_id();
    let (task, id) = (req.task.clone(), req.id);
    let shown = hub
        .wait_state(SETTLE, |s| s.migration(&task).is_some_and(|m| m.id == id && m.from == from && m.to == me))
        .await;
    if !shown {
        return Err(refuse(pb::ErrorCode::NotFound, format!("no migration {id} of {task:?} from hub {from} to here")));
    }
    let state = hub.consensus().state();
    let t = state.tasks.get(&task).ok_or_else(|| refuse(pb::ErrorCode::NotFound, "the task was deleted"))?;
    let memory = t.spec.limits.memory_bytes;
    let mut pin = hub.executor().pages().pin();
    if !req.base_key.is_empty() {
        let m = Manifest::decode(&req.base_manifest).map_err(|e| Refusal::bad_request(e.to_string()))?;
        let (_, epoch, _) =
            parse_checkpoint_key(&req.base_key).ok_or_else(|| Refusal::bad_request("a malformed key"))?;
        // The source's own checkpoint of this task, this version, of an epoch the mesh handed
        // out, within the task's memory: nothing else is fetched or stored.
        let well_formed = m.task == task
            && m.module_hash == t.spec.module_hash
            && m.task_version == t.version
            && epoch <= state.last_epoch
            && req.base_key == checkpoint_key(&task, Epoch(m.epoch), m.sequence)
            && u64::from(m.memory_pages) * PAGE as u64 <= memory;
        if !well_formed {
            return Err(Refusal::bad_request("the base checkpoint does not belong to this task"));
        }
        // The pages it lacks come from the source (which pins them) or the hubs storing it.
        let mut sources = vec![from];
        if let Some(c) = t.checkpoint.as_ref().filter(|c| c.key(&task) == req.base_key) {
            sources.extend(c.stored_on.iter().copied().filter(|n| *n != me && *n != from));
        }
        // Pinned first: a newer committed checkpoint may make the garbage collector drop this
        // manifest at once, and a compaction its pages, while the migration needs them.
        pin.add(m.pages.iter().map(|(_, h)| *h));
        crate::replication::store_with_pages(hub, &task, &req.base_key, req.base_manifest.clone(), &sources)
            .await
            .map_err(|e| refuse(pb::ErrorCode::Unavailable, format!("the base checkpoint: {e}")))?;
    }
    let staged =
        if staging_room(hub) { stage(hub, t, &req.base_manifest, !req.base_key.is_empty()).await } else { None };
    let mut incoming = hub.migrations().incoming.lock().unwrap_or_else(|p| p.into_inner());
    sweep(&mut incoming);
    // Again, under the lock: a prepare slowed by fetching its base may end after its migration
    // was aborted, and must not replace the entry of a newer one.
    if !expected(hub, &task, id, from) {
        drop(incoming);
        drop_later(staged);
        return Err(refuse(pb::ErrorCode::Unavailable, "the migration is no longer under way"));
    }
    let entry = Incoming {
        id,
        from,
        bytes: 0,
        limit: memory.saturating_mul(4).saturating_add(1 << 20),
        since: Instant::now(),
        pin,
        staged_bytes: staged.as_ref().map_or(0, StagedTask::memory_bytes),
        staged,
    };
    incoming.insert(task, entry);
    drop(incoming);
    crate::faults::crash_point("crash-migration-target-precopy");
    Ok(pb::MigratePrepareResponse {})
}

/// Builds the task's instance from the base checkpoint (stored here already) off the runtime's
/// threads. None when it cannot be (the module is not here, the pool is full): the task then
/// restores from the page log at the switch.
async fn stage(hub: &Arc<Hub>, t: &TaskRecord, base_manifest: &[u8], has_base: bool) -> Option<StagedTask> {
    if t.spec.kind != TaskKind::Stateful {
        return None;
    }
    let wasm = hub.blobs().get(&t.spec.module_hash).ok()?;
    let base = if has_base { Some(Manifest::decode(base_manifest).ok()?) } else { None };
    let cfg = crate::reconcile::config_of(t, 0);
    let ex = hub.executor().clone();
    let staged = tokio::task::spawn_blocking(move || ex.stage(&cfg, &wasm, base.as_ref())).await.ok()?;
    staged.map_err(|e| tracing::info!(task = %t.spec.name, error = %e, "no staged instance for the migration")).ok()
}

/// Staged instances one hub holds at once: each takes an instance slot and twice the task's
/// memory, so a few migrations to one hub must not crowd out its own tasks' starts.
const MAX_STAGED: usize = 2;

/// Whether another staged instance may be built here.
fn staging_room(hub: &Hub) -> bool {
    let m = hub.migrations();
    let incoming = m.incoming.lock().unwrap_or_else(|p| p.into_inner()).values().filter(|i| i.staged.is_some()).count();
    let ready = m.ready.lock().unwrap_or_else(|p| p.into_inner()).len();
    incoming + ready < MAX_STAGED
}

/// Bytes the staged instances of migrations to this hub hold, built or handed over: not a task's
/// yet, but this hub's memory all the same.
pub(super) fn staged_bytes(incoming: &HashMap<String, Incoming>, ready: &HashMap<String, Ready>) -> u64 {
    let building: u64 = incoming.values().map(|i| i.staged_bytes).sum();
    building + ready.values().map(|r| r.staged.memory_bytes()).sum::<u64>()
}

/// Drops `what` (staged instances: a pool slot and large buffers to free) off the runtime's
/// threads.
pub(super) fn drop_later<T: Send + 'static>(what: T) {
    tokio::task::spawn_blocking(move || drop(what));
}

/// Forgets migrations whose source stopped sending (it died, or gave up without telling).
pub(super) fn sweep(incoming: &mut HashMap<String, Incoming>) {
    let stale: Vec<String> =
        incoming.iter().filter(|(_, i)| i.since.elapsed() >= super::BUDGET * 2).map(|(k, _)| k.clone()).collect();
    drop_later(stale.into_iter().filter_map(|k| incoming.remove(&k)).collect::<Vec<_>>());
}

/// Whether migration `id` of `task` may still make this hub the task's host: under way, or
/// committed here with the task still placed at that epoch (the reconciler is about to take its
/// staged instance).
pub(super) fn may_still_land(state: &ClusterState, task: &str, id: u64, me: NodeId) -> bool {
    state.tasks.get(task).is_some_and(|t| match t.migration_outcome(id) {
        MigrationOutcome::Underway => true,
        MigrationOutcome::Moved(p) => p.node == me && t.placements().any(|(_, q)| q == p),
        MigrationOutcome::NotMoved => false,
    })
}

/// Forgets the migrations to this hub that the applied state shows ended without moving the task
/// here (aborted, fenced by a failover after the source died, the task deleted): their staged
/// instances and pinned pages go at once, not at the sweep's timeout. An entry exists only once
/// this hub applied the migration's begin, so a state that no longer shows it under way is newer
/// than the begin, never a lagging view of it.
pub(super) fn forget_ended(
    incoming: &mut HashMap<String, Incoming>,
    ready: &mut HashMap<String, Ready>,
    state: &ClusterState,
    me: NodeId,
) {
    let ended: Vec<String> =
        incoming.iter().filter(|(t, i)| !may_still_land(state, t, i.id, me)).map(|(t, _)| t.clone()).collect();
    drop_later(ended.into_iter().filter_map(|t| incoming.remove(&t)).collect::<Vec<_>>());
    let ended: Vec<String> =
        ready.iter().filter(|(t, r)| !may_still_land(state, t, r.id, me)).map(|(t, _)| t.clone()).collect();
    drop_later(ended.into_iter().filter_map(|t| ready.remove(&t)).collect::<Vec<_>>());
}

/// Forgets staged instances the reconciler did not take (the commit never came).
pub(super) fn sweep_ready(ready: &mut HashMap<String, Ready>) {
    let stale: Vec<String> =
        ready.iter().filter(|(_, r)| r.since.elapsed() >= super::BUDGET * 2).map(|(k, _)| k.clone()).collect();
    drop_later(stale.into_iter().filter_map(|k| ready.remove(&k)).collect::<Vec<_>>());
}

pub(super) fn has_ready(ready: &HashMap<String, Ready>, task: &str, key: &str, manifest_hash: &Hash) -> bool {
    ready.get(task).is_some_and(|r| r.key == key && r.manifest_hash == *manifest_hash)
}

/// The staged instance of `task`'s migrated checkpoint `key` with this manifest, if this hub
/// built one (the key alone is not enough: a source that restarted may have stored other
/// contents under the same epoch and sequence since, and the instance carries its manifest).
pub(super) fn take_ready(
    ready: &mut HashMap<String, Ready>,
    task: &str,
    key: &str,
    manifest_hash: &Hash,
) -> Option<StagedTask> {
    match ready.remove(task) {
        Some(r) if r.key == key && r.manifest_hash == *manifest_hash => Some(r.staged),
        other => {
            drop_later(other);
            None
        }
    }
}

/// The round's entries, checked against the task's memory.
fn entries(req: &pb::MigratePages, memory: u64) -> Result<Vec<(u32, Option<Hash>)>, Refusal> {
    let max_pages = memory / PAGE as u64;
    if u64::from(req.memory_pages) > max_pages || req.entries.len() as u64 > max_pages {
        return Err(Refusal::bad_request("more pages than the task's memory"));
    }
    req.entries
        .iter()
        .map(|e| {
            if e.index >= req.memory_pages {
                return Err(Refusal::bad_request(format!("page {} is beyond the memory", e.index)));
            }
            match e.hash.as_slice() {
                [] => Ok((e.index, None)),
                raw => Hash::from_slice(raw)
                    .map(|h| (e.index, Some(h)))
                    .ok_or_else(|| Refusal::bad_request("a hash is 32 bytes")),
            }
        })
        .collect()
}

/// Applies a round to the staged instance off the runtime's threads; a round that does not
/// apply drops it (the task will restore from the page log).
async fn apply_round(
    hub: &Hub,
    staged: Option<StagedTask>,
    memory_pages: u32,
    entries: Vec<(u32, Option<Hash>)>,
    pages: Vec<(Hash, Vec<u8>)>,
) -> Result<(Option<StagedTask>, Vec<(Hash, Vec<u8>)>), Refusal> {
    let Some(mut staged) = staged else { return Ok((None, pages)) };
    let log = hub.executor().pages().clone();
    let applied = tokio::task::spawn_blocking(move || {
        let contents: HashMap<Hash, &[u8]> = pages.iter().map(|(h, d)| (*h, d.as_slice())).collect();
        let r = staged.apply(&log, memory_pages, &entries, &contents);
        drop(contents);
        (r.map(|()| staged), pages)
    })
    .await;
    match applied {
        Ok((Ok(staged), pages)) => Ok((Some(staged), pages)),
        Ok((Err(e), pages)) => {
            tracing::info!(error = %e, "the staged instance is dropped; the task will restore at the switch");
            Ok((None, pages))
        }
        Err(e) => Err(Refusal::internal(format!("applying a round: {e}"))),
    }
}

/// Most page bytes all incoming migrations together may take.
fn global_limit(hub: &Hub) -> u64 {
    hub.executor().max_task_memory().saturating_mul(2)
}

pub(super) async fn pages(
    hub: &Arc<Hub>,
    from: NodeId,
    req: pb::MigratePages,
) -> Result<pb::MigratePagesResponse, Refusal> {
    {
        let mut incoming = hub.migrations().incoming.lock().unwrap_or_else(|p| p.into_inner());
        sweep(&mut incoming);
        if !incoming.get(&req.task).is_some_and(|i| i.id == req.id && i.from == from) {
            return Err(refuse(pb::ErrorCode::NotFound, format!("no migration {} of {:?} here", req.id, req.task)));
        }
    }
    let memory = hub.consensus().state().tasks.get(&req.task).map_or(0, |t| t.spec.limits.memory_bytes);
    let entries = entries(&req, memory)?;
    let received = Instant::now();
    // Verified before anything is kept.
    let mut pages = Vec::with_capacity(req.pages.len());
    for p in req.pages {
        let hash = Hash::from_slice(&p.hash).ok_or_else(|| Refusal::bad_request("a hash is 32 bytes"))?;
        if p.data.len() != PAGE || Hash::of(&p.data) != hash {
            return Err(Refusal::bad_request(format!("page {hash} does not match its hash or size")));
        }
        pages.push((hash, p.data));
    }
    let (finished, staged) = {
        let mut incoming = hub.migrations().incoming.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = incoming.get_mut(&req.task).filter(|i| i.id == req.id && i.from == from) else {
            return Err(refuse(pb::ErrorCode::NotFound, format!("no migration {} of {:?} here", req.id, req.task)));
        };
        // Out while the round applies: rounds of one migration come one at a time.
        let staged = entry.staged.take();
        entry.bytes += pages.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        // Pinned before they are written: compaction must not drop them before the manifest.
        entry.pin.add(pages.iter().map(|(h, _)| *h));
        let over_task = entry.bytes > entry.limit;
        let taken: u64 = incoming.values().map(|i| i.bytes).sum();
        if over_task || taken > global_limit(hub) {
            drop_later((incoming.remove(&req.task), staged));
            return Err(refuse(pb::ErrorCode::PayloadTooLarge, "more pages than this hub takes for migrations"));
        }
        if req.key.is_empty() {
            (None, staged)
        } else {
            (incoming.remove(&req.task), staged)
        }
    };
    let verified_us = received.elapsed().as_micros() as u64;
    match finished {
        None => {
            let (staged, pages) = apply_round(hub, staged, req.memory_pages, entries, pages).await?;
            match hub.migrations().incoming.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&req.task) {
                Some(entry) if entry.id == req.id => {
                    entry.staged_bytes = staged.as_ref().map_or(0, StagedTask::memory_bytes);
                    entry.staged = staged;
                }
                _ => drop_later(staged),
            }
            let log = hub.executor().pages().clone();
            let write = PageWrite { pages, ..Default::default() };
            // Synced in the background (the final manifest's synced write makes them durable):
            // neither the round nor this hub's own tasks' checkpoints wait for the disk.
            tokio::task::spawn_blocking(move || {
                let n = log.write(&[write], false)?;
                log.sync_behind();
                Ok::<_, hubmesh_storage::PageLogError>(n)
            })
            .await
            .map_err(|e| Refusal::internal(e.to_string()))?
            .map_err(|e| Refusal::internal(format!("storing migrated pages: {e}")))?;
        }
        Some(entry) => {
            // The last pages apply to the staged instance while they are stored.
            let n = pages.len();
            let (applied, stored) = tokio::join!(
                apply_round(hub, staged, req.memory_pages, entries, pages.clone()),
                store_final(hub, &req.task, &req.key, req.manifest, pages, &entry),
            );
            let (m, staged) = match (stored, applied) {
                (Ok(m), Ok((staged, _))) => (m, staged),
                (Err(e), applied) => {
                    drop_later((entry, applied.ok()));
                    return Err(e);
                }
                // Stored: the task restores from the page log at the switch instead.
                (Ok(m), Err(e)) => {
                    tracing::warn!(task = %req.task, error = %e.message, "the staged instance is lost; the task will restore at the switch");
                    (m, None)
                }
            };
            hub.migrations().mark_handed_over(&req.task, req.id);
            crate::faults::crash_point("crash-migration-target-stored");
            keep_ready(hub, &req.task, &req.key, entry, staged, m);
            let stored_us = received.elapsed().as_micros() as u64;
            tracing::debug!(task = req.task, pages = n, verified_us, stored_us, "final state stored");
        }
    }
    Ok(pb::MigratePagesResponse {})
}

/// Checks the final manifest against the task and stores it with the last pages (the others are
/// stored and pinned already). Returns the manifest and its hash.
async fn store_final(
    hub: &Hub,
    task: &str,
    key: &str,
    bytes: Vec<u8>,
    pages: Vec<(Hash, Vec<u8>)>,
    entry: &Incoming,
) -> Result<(Manifest, Hash), Refusal> {
    if !expected(hub, task, entry.id, entry.from) {
        return Err(refuse(pb::ErrorCode::Unavailable, "the migration is no longer under way"));
    }
    let m = Manifest::decode(&bytes).map_err(|e| Refusal::bad_request(e.to_string()))?;
    let state = hub.consensus().state();
    let t = state.tasks.get(task).ok_or_else(|| refuse(pb::ErrorCode::NotFound, "the task was deleted"))?;
    let well_formed = m.task == task
        && m.module_hash == t.spec.module_hash
        && m.task_version == t.version
        && key == checkpoint_key(task, Epoch(m.epoch), m.sequence)
        && u64::from(m.memory_pages) * PAGE as u64 <= t.spec.limits.memory_bytes;
    if !well_formed {
        return Err(Refusal::bad_request("the manifest does not belong to this task or its key"));
    }
    let log = hub.executor().pages().clone();
    let refs: Vec<Hash> = m.pages.iter().map(|(_, h)| *h).collect();
    let last: std::collections::HashSet<&Hash> = pages.iter().map(|(h, _)| h).collect();
    if let Some(h) = refs.iter().find(|h| !last.contains(h) && !log.has_page(h)) {
        return Err(Refusal::bad_request(format!("page {h} of the manifest was never sent")));
    }
    let manifest_hash = Hash::of(&bytes);
    let write = PageWrite { pages, key: key.to_owned(), manifest: bytes, refs, remove: Vec::new() };
    tokio::task::spawn_blocking(move || {
        // A key is stored once: other contents here are a state the source wrote before under
        // the key it used again (a restart from a lagging view), which the mesh may have committed.
        match log.read_manifest(&write.key) {
            Ok(Some(here)) if here != write.manifest => {
                return Err(refuse(pb::ErrorCode::Unavailable, format!("{} is here with other contents", write.key)))
            }
            Err(e) => return Err(Refusal::internal(e.to_string())),
            Ok(_) => {}
        }
        log.write(&[write], true).map_err(|e| Refusal::internal(format!("storing the migrated state: {e}")))
    })
    .await
    .map_err(|e| Refusal::internal(e.to_string()))??;
    Ok((m, manifest_hash))
}

/// Keeps the staged instance for the switch if its pages are exactly the stored manifest's; the
/// migration's pins go (the manifest refers to the pages now).
fn keep_ready(
    hub: &Hub,
    task: &str,
    key: &str,
    entry: Incoming,
    staged: Option<StagedTask>,
    (m, manifest_hash): (Manifest, Hash),
) {
    let (id, from) = (entry.id, entry.from);
    drop_later(entry);
    match staged {
        Some(mut staged) if staged.matches(&m) => {
            staged.keep_manifest(key.to_owned(), m);
            let mut ready = hub.migrations().ready.lock().unwrap_or_else(|p| p.into_inner());
            sweep_ready(&mut ready);
            let key = key.to_owned();
            let old =
                ready.insert(task.to_owned(), Ready { id, from, key, manifest_hash, staged, since: Instant::now() });
            drop_later(old);
        }
        other => {
            // A staged instance kept for an earlier migration of the task is stale now.
            let old = hub.migrations().ready.lock().unwrap_or_else(|p| p.into_inner()).remove(task);
            drop_later((other, old));
        }
    }
}

pub(super) async fn end(hub: &Arc<Hub>, from: NodeId, req: pb::MigrateEnd) -> Result<pb::MigrateEndResponse, Refusal> {
    {
        let mut incoming = hub.migrations().incoming.lock().unwrap_or_else(|p| p.into_inner());
        if incoming.get(&req.task).is_some_and(|i| i.id == req.id && i.from == from) {
            drop_later(incoming.remove(&req.task));
        }
    }
    if req.epoch == 0 {
        let mut ready = hub.migrations().ready.lock().unwrap_or_else(|p| p.into_inner());
        if ready.get(&req.task).is_some_and(|r| r.id == req.id && r.from == from) {
            drop_later(ready.remove(&req.task));
        }
        return Ok(pb::MigrateEndResponse::default());
    }
    // Committed: answer once the task runs here at that epoch (the source measures the pause).
    serving(hub, &req.task, |_| Ok(Some(req.epoch))).await
}

/// Answers once the state shows migration `req.id` committed to this hub and the task runs at
/// the commit's epoch; sent by the source with the commit in flight, so the answer comes when
/// the task serves here rather than a round trip after the source learned of the commit.
pub(super) async fn watch(hub: &Arc<Hub>, req: pb::MigrateWatch) -> Result<pb::MigrateEndResponse, Refusal> {
    let me = hub.consensus().node_id();
    serving(hub, &req.task, |t| match t.migration_outcome(req.id) {
        MigrationOutcome::Underway => Ok(None),
        MigrationOutcome::Moved(p) if p.node == me => Ok(Some(p.epoch.0)),
        MigrationOutcome::Moved(_) | MigrationOutcome::NotMoved => {
            Err(refuse(pb::ErrorCode::MigrationAborted, "the migration ended without moving the task here"))
        }
    })
    .await
}

/// Waits until `task` runs here at the epoch `epoch_of` reads from the applied state (`None`:
/// not known yet), and says how long after the call this hub had applied it and ran the task.
async fn serving(
    hub: &Arc<Hub>,
    task: &str,
    epoch_of: impl Fn(&TaskRecord) -> Result<Option<u64>, Refusal>,
) -> Result<pb::MigrateEndResponse, Refusal> {
    let asked = Instant::now();
    let deadline = asked + SETTLE;
    let me = hub.consensus().node_id();
    let mut applied_us = None;
    loop {
        // Watched from before the check: a change during it wakes the wait below.
        let (mut changes, mut starts) = (hub.consensus().changes(), hub.executor().starts());
        let state = hub.consensus().state();
        let Some(t) = state.tasks.get(task) else {
            return Err(refuse(pb::ErrorCode::NotFound, "the task was deleted"));
        };
        let epoch = epoch_of(t)?;
        let now = t.instances.get(&0).copied();
        if let (Some(epoch), Some(now)) = (epoch, now) {
            if now.epoch.0 > epoch {
                return Err(refuse(pb::ErrorCode::Unavailable, format!("the task moved on (epoch {})", now.epoch.0)));
            }
            let placed = now.node == me && now.epoch.0 == epoch;
            if placed && applied_us.is_none() {
                applied_us = Some(asked.elapsed().as_micros() as u64);
                crate::faults::crash_point("crash-migration-target-committed");
            }
            if placed && hub.executor().runs_at(task, t.version, epoch) {
                let running_us = asked.elapsed().as_micros() as u64;
                return Ok(pb::MigrateEndResponse { applied_us: applied_us.unwrap_or(running_us), running_us, epoch });
            }
        }
        if Instant::now() >= deadline {
            let why = match epoch {
                Some(_) => "the task did not start here in time",
                None => "the migration's commit did not reach this hub in time",
            };
            return Err(refuse(pb::ErrorCode::Unavailable, why));
        }
        let _ = tokio::time::timeout(Duration::from_millis(20), async {
            tokio::select! {
                _ = changes.changed() => {}
                _ = starts.changed() => {}
            }
        })
        .await;
    }
}
