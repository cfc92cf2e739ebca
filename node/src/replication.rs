//! Checkpoint replication: a stateful task's checkpoints go from its host to the holders the
//! leader chose, and a checkpoint counts only once its record is committed in Raft.
//!
//! ```text
//!  actor thread: checkpoint -> local page log (fdatasync) -> Replicator::commit (blocks the actor)
//!     for each holder, in parallel, one bulk stream:
//!        CKPT_PUSH header{task, key, manifest, refs, keep}, body: the checkpoint's new pages
//!          (read and verified once for all holders by a blocking thread a few pages ahead)
//!        holder: verifies each page's blake3 and appends them 8 MiB at a time as they arrive;
//!          at the end stores the manifest (one fdatasync) only if it has all its pages, else
//!          answers the missing ones, which the host sends to it alone in the next round;
//!          the pages are pinned in its page log until then (a compaction must keep them)
//!     all holders have it -> propose CommitCheckpoint{task, epoch, sequence, manifest hash, stored_on}
//!       the state machine refuses a stale epoch: a replaced host can never commit
//!     committed -> the durable answer goes out
//!
//!  new host (failover): the record names the key and the hubs that store it
//!     manifest and pages missing or corrupt locally -> CKPT_FETCH from those hubs, verified by hash
//!     -> written to the local page log -> the instance restores from that key
//! ```
//!
//! Garbage: every hub drops manifests of deleted tasks, of epochs older than the task's current
//! placement, and older than the committed checkpoint ([`collect_garbage`]); pages nothing
//! refers to go at the page log's next compaction.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use hubmesh_consensus::state::{parse_checkpoint_key, validate_task_name, BasedOn, CheckpointRecord, NodeStatus};
use hubmesh_consensus::transport::{bulk_handler, handler, kind, BulkBody, RpcError};
use hubmesh_consensus::{ClusterState, Command, Epoch, NodeId, ProposeError, Rejected};
use hubmesh_proto::{pb, Message};
use hubmesh_storage::{Hash, PageLog, PageLogError, PageWrite};
use tokio::time::Instant;

use crate::checkpoint::Manifest;
use crate::dataplane::{member_request, refuse};
use crate::executor::{CheckpointSink, LocalCheckpoint};
use crate::hub::Hub;

/// Stream kind: pages and manifest of a checkpoint, host to holder.
pub(crate) const CKPT_PUSH: u32 = kind::FIRST_NODE_KIND + 2;
/// Stream kind: a manifest and pages, to a new host.
pub(crate) const CKPT_FETCH: u32 = kind::FIRST_NODE_KIND + 3;

/// Pages per fetch message (8 MiB of 64 KiB pages), well under the transport's frame limit.
const PAGES_PER_MESSAGE: usize = 128;
/// Bytes of pages a holder stores per write while the rest of a push arrives.
const BATCH_BYTES: usize = 8 << 20;
/// Pages the host reads ahead of a push stream.
const PAGES_READ_AHEAD: usize = 32;
/// A page frame's head: its hash and its length.
const FRAME_HEAD: usize = 36;
/// Largest page a holder accepts (checkpoint pages are 64 KiB).
const MAX_PAGE: usize = 1 << 20;
/// Rounds of "you still lack these" before a holder counts as failed.
const PUSH_ROUNDS: usize = 4;
/// Time for one message to a holder.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The node's [`CheckpointSink`]: replicates, then commits the record.
pub(crate) struct Replicator {
    hub: Weak<Hub>,
    runtime: tokio::runtime::Handle,
}

impl Replicator {
    pub(crate) fn new(hub: &Arc<Hub>) -> Self {
        Self { hub: Arc::downgrade(hub), runtime: tokio::runtime::Handle::current() }
    }
}

impl CheckpointSink for Replicator {
    fn commit(&self, checkpoint: &LocalCheckpoint) -> Result<(), String> {
        let hub = self.hub.upgrade().ok_or("the hub is shutting down")?;
        // The actor thread is not a runtime thread, so it may block on the runtime.
        self.runtime.block_on(commit(&hub, checkpoint))
    }

    fn committed_key(&self, task: &str) -> Option<String> {
        let hub = self.hub.upgrade()?;
        let state = hub.consensus.state();
        state.tasks.get(task)?.checkpoint.as_ref().map(|r| r.key(task))
    }
}

/// Replicates `c` to the task's holders and commits its record, retrying (holders change when
/// one dies, leaders change) until the propose timeout has passed twice.
async fn commit(hub: &Hub, c: &LocalCheckpoint) -> Result<(), String> {
    let started = Instant::now();
    let deadline = started + hub.config.timeouts.resolve().propose * 2;
    let me = hub.consensus.node_id();
    let manifest_hash = Hash::of(&c.manifest);
    let mut last_error;
    loop {
        let state = hub.consensus.state();
        let task = state.tasks.get(&c.task).ok_or("the task was deleted")?;
        let current = task.instances.get(&0).copied();
        if !current.is_some_and(|p| p.node == me && p.epoch.0 == c.epoch) {
            return Err("this instance was replaced (a newer epoch exists); its change is not committed".into());
        }
        if let Some(r) = task.checkpoint.as_ref().filter(|r| r.epoch.0 == c.epoch && r.sequence == c.sequence) {
            if r.manifest_hash == manifest_hash {
                return Ok(()); // an earlier attempt whose answer was lost did commit
            }
            // Another state under this checkpoint's name (an instance that restarted from a
            // stale view of the committed checkpoint): this one can never commit.
            return Err(format!("checkpoint {} was committed with other contents: this instance is behind", c.key));
        }
        let holders: Vec<NodeId> = task.holders.iter().copied().filter(|h| *h != me).collect();
        // Until the leader has chosen as many holders as the mesh allows, committing would keep
        // fewer copies than asked for.
        let wanted = (task.spec.state_replicas as usize).min(eligible_holders(&state, me));
        // The newest checkpoint known committed: this hub's state may not have applied the
        // actor's last commit yet, which the actor itself knows.
        let keep = [task.checkpoint.as_ref().map(|r| r.key(&c.task)), c.committed_key.clone()]
            .into_iter()
            .flatten()
            .max_by_key(|k| parse_checkpoint_key(k).map(|(_, e, s)| (e, s)))
            .unwrap_or_default();
        // A holder the leader marked down gets no push (it is refilled when it returns), so a
        // dead holder that cannot be replaced does not stall every commit of the task.
        let live: Vec<NodeId> = holders.iter().copied().filter(|h| state.is_up(*h)).collect();
        if live.len() < wanted {
            last_error = format!("waiting for the leader to choose holders ({} of {wanted} up)", live.len());
        } else {
            let results = push_all(hub, &live, c, &keep).await;
            let mut stored: Vec<NodeId> = Vec::new();
            let mut failed = Vec::new();
            for (h, r) in live.iter().zip(results) {
                match r {
                    Ok(()) => stored.push(*h),
                    Err(e) => failed.push((*h, e)),
                }
            }
            // A push abandoned because its holder went down meanwhile does not count against the
            // commit, as long as the copies that were made are as many as the mesh allows now.
            let now = hub.consensus.state();
            let wanted_now = (task.spec.state_replicas as usize).min(eligible_holders(&now, me));
            let still_up: Vec<String> = failed.iter().filter(|(h, _)| now.is_up(*h)).map(|(_, e)| e.clone()).collect();
            if still_up.is_empty() && stored.len() >= wanted_now {
                let record = CheckpointRecord {
                    version: c.version,
                    epoch: Epoch(c.epoch),
                    sequence: c.sequence,
                    manifest_hash,
                    stored_on: std::iter::once(me).chain(stored).collect(),
                    size_bytes: c.size_bytes,
                    at_ms: c.created_ms,
                };
                crate::faults::crash_point("crash-before-checkpoint-commit");
                let based_on = BasedOn {
                    checkpoint: c.committed_key.as_deref().and_then(parse_checkpoint_key).map(|(_, e, s)| (e, s)),
                };
                let cmd = Command::CommitCheckpoint { task: c.task.clone(), record, based_on: Some(based_on) };
                match hub.consensus.propose(cmd).await {
                    Ok(_) => {
                        crate::faults::crash_point("crash-after-checkpoint-commit");
                        metrics::histogram!("hubmesh_checkpoint_commit_seconds")
                            .record(started.elapsed().as_secs_f64());
                        return Ok(());
                    }
                    Err(ProposeError::Rejected(e @ Rejected::NotBasedOnCommitted { .. })) => {
                        return Err(format!("this instance is behind the committed checkpoint: {e}"))
                    }
                    Err(ProposeError::Rejected(Rejected::StaleEpoch { .. })) => {
                        return Err(
                            "this instance was replaced (a newer epoch exists); its change is not committed".into()
                        )
                    }
                    Err(e) => last_error = format!("committing the record: {e}"),
                }
            } else if still_up.is_empty() {
                last_error = format!("only {} of {wanted_now} holders took the checkpoint", stored.len());
            } else {
                last_error = still_up.join("; ");
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("the checkpoint could not be committed: {last_error}"));
        }
        tracing::debug!(task = %c.task, error = %last_error, "checkpoint commit retry");
        let mut rx = hub.consensus.watch();
        let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
    }
}

/// Hubs that could hold a checkpoint of a task hosted on `me`: up, not witnesses, not `me`.
fn eligible_holders(state: &ClusterState, me: NodeId) -> usize {
    state.nodes.values().filter(|n| n.id != me && !n.witness && n.status == NodeStatus::Up).count()
}

/// Completes once the state no longer says `node` is up: a push to it is then abandoned.
async fn until_down(hub: &Hub, node: NodeId) {
    let mut rx = hub.consensus.watch();
    loop {
        if !rx.borrow_and_update().is_up(node) {
            return;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Sends checkpoint `c` to every holder in `holders` until each has the manifest and every page.
/// The first round reads (and verifies) each new page once for all of them and streams it to each
/// holder; pages one holder still lacks afterwards go to that holder alone.
async fn push_all(hub: &Hub, holders: &[NodeId], c: &LocalCheckpoint, keep: &str) -> Vec<Result<(), String>> {
    if let Some(d) = crate::faults::delay("delay-checkpoint-push") {
        tokio::time::sleep(d).await;
    }
    let (txs, rxs): (Vec<_>, Vec<_>) =
        holders.iter().map(|_| tokio::sync::mpsc::channel::<(Bytes, Bytes)>(PAGES_READ_AHEAD)).unzip();
    let reader = read_ahead(hub, distinct(&c.new_pages), txs);
    let firsts = join_all(
        holders.iter().zip(rxs).map(|(h, rx)| guarded(hub, *h, c.new_pages.len(), stream_round(hub, *h, c, keep, rx))),
    )
    .await;
    if let Err(e) = reader.await.map_err(|e| e.to_string()).and_then(|r| r) {
        return holders.iter().map(|_| Err(e.clone())).collect();
    }
    join_all(holders.iter().zip(firsts).map(|(h, first)| async move { finish_push(hub, *h, c, keep, first?).await }))
        .await
}

/// After a round's answer: more rounds with the pages `holder` still lacks, until it has them all.
async fn finish_push(
    hub: &Hub,
    holder: NodeId,
    c: &LocalCheckpoint,
    keep: &str,
    mut raw: Vec<u8>,
) -> Result<(), String> {
    for round in 1..=PUSH_ROUNDS {
        let resp = pb::CheckpointPushResponse::decode(raw.as_slice())
            .map_err(|e| format!("holder {holder} answered garbage: {e}"))?;
        let missing: Vec<Hash> = distinct(&resp.missing.iter().filter_map(|h| Hash::from_slice(h)).collect::<Vec<_>>());
        if missing.is_empty() {
            metrics::counter!("hubmesh_checkpoint_pushes_total").increment(1);
            return Ok(());
        }
        if round == PUSH_ROUNDS {
            break;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(PAGES_READ_AHEAD);
        let reader = read_ahead(hub, missing.clone(), vec![tx]);
        let answer = guarded(hub, holder, missing.len(), stream_round(hub, holder, c, keep, rx)).await;
        reader.await.map_err(|e| e.to_string())??;
        raw = answer?;
    }
    Err(format!("holder {holder} still lacks pages after {PUSH_ROUNDS} rounds"))
}

/// Bounds a push round to `holder` in time (a call's timeout plus its pages at 8 MB/s) and
/// abandons it when the holder is marked down.
async fn guarded(
    hub: &Hub,
    holder: NodeId,
    pages: usize,
    round: impl Future<Output = Result<Vec<u8>, String>>,
) -> Result<Vec<u8>, String> {
    let budget = CALL_TIMEOUT + Duration::from_millis(8 * pages as u64);
    tokio::select! {
        biased;
        () = until_down(hub, holder) => Err(format!("holder {holder} was marked down")),
        r = tokio::time::timeout(budget, round) => r.map_err(|_| format!("holder {holder}: the push timed out"))?,
    }
}

/// A blocking thread that reads and verifies `pages` a few ahead and hands each, as a frame head
/// and its bytes, to every stream still reading.
fn read_ahead(
    hub: &Hub,
    pages: Vec<Hash>,
    txs: Vec<tokio::sync::mpsc::Sender<(Bytes, Bytes)>>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    let log = hub.executor.pages().clone();
    tokio::task::spawn_blocking(move || {
        let mut txs: Vec<_> = txs.into_iter().map(Some).collect();
        for h in pages {
            if txs.iter().all(Option::is_none) {
                break; // every stream failed; their errors are the ones reported
            }
            let data = Bytes::from(log.read_page(&h).map_err(|e| format!("local page: {e}"))?);
            let head = frame_head(&h, data.len());
            for slot in txs.iter_mut() {
                if slot.as_ref().is_some_and(|tx| tx.blocking_send((head.clone(), data.clone())).is_err()) {
                    *slot = None;
                }
            }
        }
        Ok(())
    })
}

/// One bulk stream to `holder`: the header (key, manifest, refs), then the frames `rx` yields.
async fn stream_round(
    hub: &Hub,
    holder: NodeId,
    c: &LocalCheckpoint,
    keep: &str,
    mut rx: tokio::sync::mpsc::Receiver<(Bytes, Bytes)>,
) -> Result<Vec<u8>, String> {
    let header = pb::CheckpointPush {
        task: c.task.clone(),
        key: c.key.clone(),
        manifest: c.manifest.clone(),
        refs: c.refs.iter().map(|h| h.0.to_vec()).collect(),
        keep: keep.to_owned(),
    };
    let lost = |e: RpcError| format!("holder {holder}: {e}");
    let started = Instant::now();
    let mut call =
        hub.consensus.transport().call_bulk(holder.0, CKPT_PUSH, header.encode_to_vec()).await.map_err(lost)?;
    let mut bytes = 0u64;
    while let Some((head, data)) = rx.recv().await {
        bytes += data.len() as u64;
        call.send(head).await.map_err(lost)?;
        call.send(data).await.map_err(lost)?;
    }
    let answer = call.finish().await.map_err(lost)?;
    // Pushes that carried pages: their rate is the replication throughput (`/metrics`).
    if bytes > 0 {
        metrics::counter!("hubmesh_checkpoint_push_bytes_total").increment(bytes);
        metrics::counter!("hubmesh_checkpoint_push_micros_total").increment(started.elapsed().as_micros() as u64);
    }
    Ok(answer)
}

/// `hashes` without repeats (two memory pages with the same bytes share one page), in order.
fn distinct(hashes: &[Hash]) -> Vec<Hash> {
    let mut seen = HashSet::new();
    hashes.iter().copied().filter(|h| seen.insert(*h)).collect()
}

/// Hash and length of a page, as sent before its bytes.
fn frame_head(hash: &Hash, len: usize) -> Bytes {
    let mut head = Vec::with_capacity(FRAME_HEAD);
    head.extend_from_slice(&hash.0);
    head.extend_from_slice(&(len as u32).to_le_bytes());
    Bytes::from(head)
}

/// Registers the holder-side handlers; called once at boot.
pub(crate) fn register(hub: &Arc<Hub>) {
    let transport = hub.consensus.transport();
    let h = Arc::downgrade(hub);
    transport.register_bulk(
        CKPT_PUSH,
        bulk_handler(move |caller, header, body| {
            let h = h.clone();
            async move {
                let (hub, req) = member_request::<pb::CheckpointPush>(caller, &h, &header)?;
                receive_push(&hub, req, body).await
            }
        }),
    );
    let h = Arc::downgrade(hub);
    transport.register(
        CKPT_FETCH,
        handler(move |caller, payload| {
            let h = h.clone();
            async move {
                let (hub, req) = member_request::<pb::CheckpointFetch>(caller, &h, &payload)?;
                let log = hub.executor.pages().clone();
                tokio::task::spawn_blocking(move || serve_fetch(&log, req))
                    .await
                    .map_err(|e| refuse(pb::ErrorCode::Internal, e.to_string()))?
            }
        }),
    );
}

/// Holder side of [`CKPT_PUSH`]: checks the header, stores the pages of the body in batches as
/// they arrive (verified, not yet synced; hashing and writing on a blocking thread while the next
/// batch is read), then stores the manifest if every page it refers to is here.
async fn receive_push(hub: &Hub, req: pb::CheckpointPush, mut body: BulkBody) -> Result<Vec<u8>, RpcError> {
    let bad = |m: String| refuse(pb::ErrorCode::BadRequest, m);
    validate_task_name(&req.task).map_err(|e| bad(e.to_string()))?;
    let state = hub.consensus.state();
    check_push_epoch(&state, &req)?;
    let log = hub.executor.pages().clone();
    // The pages go in before the manifest that refers to them: a compaction in between (old
    // checkpoints' pages are garbage by now) must keep them.
    let mut pin = log.pin();
    let mut writing: Option<tokio::task::JoinHandle<Result<(), RpcError>>> = None;
    // Only pages of this checkpoint, and no more frames than it refers to pages: a push is
    // bounded by its manifest. (A page may come twice: two memory pages with the same bytes.)
    let refs: HashSet<Hash> = req
        .refs
        .iter()
        .map(|h| Hash::from_slice(h).ok_or_else(|| bad("a ref is 32 bytes".into())))
        .collect::<Result<_, _>>()?;
    let mut frames_left = req.refs.len();
    let mut batch: Vec<(Hash, Vec<u8>)> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut head = [0u8; FRAME_HEAD];
    loop {
        let more = body.read_exact_or_end(&mut head).await?;
        if more {
            let hash = Hash::from_slice(&head[..32]).expect("32 bytes");
            let len = u32::from_le_bytes(head[32..].try_into().expect("4 bytes")) as usize;
            if len > MAX_PAGE {
                return Err(bad(format!("a page of {len} bytes is larger than {MAX_PAGE}")));
            }
            if !refs.contains(&hash) {
                return Err(bad(format!("page {hash} is not part of checkpoint {}", req.key)));
            }
            frames_left = frames_left
                .checked_sub(1)
                .ok_or_else(|| bad(format!("more pages than checkpoint {} refers to", req.key)))?;
            let mut data = vec![0u8; len];
            if !body.read_exact_or_end(&mut data).await? && len > 0 {
                return Err(bad(format!("the push ended inside page {hash}")));
            }
            batch_bytes += data.len();
            batch.push((hash, data));
        }
        if batch_bytes >= BATCH_BYTES || (!more && !batch.is_empty()) {
            batch_bytes = 0;
            if let Some(w) = writing.take() {
                w.await.map_err(|e| refuse(pb::ErrorCode::Internal, e.to_string()))??;
            }
            let (log, pages) = (log.clone(), std::mem::take(&mut batch));
            pin.add(pages.iter().map(|(h, _)| *h));
            writing = Some(tokio::task::spawn_blocking(move || store_pages(&log, pages)));
        }
        if !more {
            break;
        }
    }
    if let Some(w) = writing.take() {
        w.await.map_err(|e| refuse(pb::ErrorCode::Internal, e.to_string()))??;
    }
    // The body may have taken a while: the host may have been replaced meanwhile.
    let state = hub.consensus.state();
    check_push_epoch(&state, &req)?;
    let answer = tokio::task::spawn_blocking(move || store_manifest(&log, &state, req))
        .await
        .map_err(|e| refuse(pb::ErrorCode::Internal, e.to_string()))?;
    drop(pin);
    answer
}

/// A host that was replaced must not leave its late checkpoints here (a copy of the committed
/// checkpoint for a new holder is fine, whatever its epoch).
fn check_push_epoch(state: &ClusterState, req: &pb::CheckpointPush) -> Result<(), RpcError> {
    let Some((task, epoch, _)) = parse_checkpoint_key(&req.key).filter(|(t, ..)| *t == req.task) else {
        return Err(refuse(
            pb::ErrorCode::BadRequest,
            format!("checkpoint key {:?} is not of task {:?}", req.key, req.task),
        ));
    };
    let committed = state.tasks.get(task).and_then(|t| t.checkpoint.as_ref()).map(|c| c.key(task));
    if let Some(p) = state.placement(task, 0) {
        if epoch < p.epoch && committed.as_deref() != Some(req.key.as_str()) {
            return Err(refuse(
                pb::ErrorCode::Unavailable,
                format!("stale epoch {}: the task is at epoch {}", epoch.0, p.epoch.0),
            ));
        }
    }
    Ok(())
}

/// Verifies pages against their hashes and appends them (synced with the manifest later).
fn store_pages(log: &PageLog, pages: Vec<(Hash, Vec<u8>)>) -> Result<(), RpcError> {
    for (hash, data) in &pages {
        if Hash::of(data) != *hash {
            return Err(refuse(pb::ErrorCode::BadRequest, format!("page {hash} does not match its hash")));
        }
    }
    log.write(&[PageWrite { pages, ..Default::default() }], false)
        .map_err(|e| refuse(pb::ErrorCode::Internal, e.to_string()))?;
    Ok(())
}

/// Stores the manifest of a push (with one fdatasync for it and its pages) once every page it
/// refers to is here; else answers the missing ones. Drops this task's checkpoints older than the
/// newest committed one.
fn store_manifest(log: &PageLog, state: &ClusterState, req: pb::CheckpointPush) -> Result<Vec<u8>, RpcError> {
    let bad = |m: String| refuse(pb::ErrorCode::BadRequest, m);
    let io = |e: PageLogError| refuse(pb::ErrorCode::Internal, e.to_string());
    let (task, ..) = parse_checkpoint_key(&req.key).ok_or_else(|| bad(format!("bad checkpoint key {:?}", req.key)))?;
    let refs: Vec<Hash> = req
        .refs
        .iter()
        .map(|h| Hash::from_slice(h).ok_or_else(|| bad("a ref is 32 bytes".into())))
        .collect::<Result<_, _>>()?;
    let missing: Vec<Vec<u8>> = distinct(&refs).iter().filter(|h| !log.has_page(h)).map(|h| h.0.to_vec()).collect();
    if !missing.is_empty() {
        return Ok(pb::CheckpointPushResponse { missing }.encode_to_vec());
    }
    let committed = state.tasks.get(task).and_then(|t| t.checkpoint.as_ref()).map(|c| c.key(task));
    // Only checkpoints older than the newest committed one go: newer ones may be about to commit.
    let keep = parse_checkpoint_key(&req.keep).filter(|(t, ..)| *t == task).map(|(_, e, s)| (e, s));
    let remove = log
        .manifest_keys()
        .into_iter()
        .filter(|k| {
            parse_checkpoint_key(k).is_some_and(|(t, e, s)| t == task && keep.is_some_and(|kp| (e, s) < kp))
                && *k != req.key
                && Some(k) != committed.as_ref()
        })
        .collect();
    let key = req.key.clone();
    log.write(&[PageWrite { pages: Vec::new(), key, manifest: req.manifest, refs, remove }], true).map_err(io)?;
    Ok(pb::CheckpointPushResponse::default().encode_to_vec())
}

/// Holder side of [`CKPT_FETCH`]: the manifest (if asked) and the pages it has intact.
fn serve_fetch(log: &PageLog, req: pb::CheckpointFetch) -> Result<Vec<u8>, RpcError> {
    if req.pages.len() > PAGES_PER_MESSAGE {
        return Err(refuse(pb::ErrorCode::BadRequest, format!("at most {PAGES_PER_MESSAGE} pages per request")));
    }
    let manifest = if req.key.is_empty() {
        Vec::new()
    } else {
        log.read_manifest(&req.key)
            .map_err(|e| refuse(pb::ErrorCode::Internal, e.to_string()))?
            .ok_or_else(|| refuse(pb::ErrorCode::NotFound, format!("no checkpoint {} here", req.key)))?
    };
    let mut pages = Vec::with_capacity(req.pages.len());
    for raw in &req.pages {
        let Some(hash) = Hash::from_slice(raw) else { continue };
        match log.read_page(&hash) {
            Ok(data) => pages.push(pb::Page { hash: hash.0.to_vec(), data }),
            Err(PageLogError::Corrupt(h)) => tracing::error!(page = %h, "a checkpoint page is corrupt on this hub"),
            Err(_) => {}
        }
    }
    Ok(pb::CheckpointFetchResponse { manifest, pages }.encode_to_vec())
}

/// Makes sure the manifest of `record` and all its pages are in the local page log, verified,
/// fetching what is missing or corrupt from the hubs that store it. Returns the key to restore.
pub(crate) async fn fetch_checkpoint(hub: &Hub, task: &str, record: &CheckpointRecord) -> Result<String, String> {
    let key = record.key(task);
    let log = hub.executor.pages().clone();
    let me = hub.consensus.node_id();
    let state = hub.consensus.state();
    let transport = hub.consensus.transport();
    // Sources: hubs the state says are up first.
    let mut sources: Vec<NodeId> = record.stored_on.iter().copied().filter(|n| *n != me).collect();
    sources.sort_by_key(|n| state.nodes.get(n).is_none_or(|r| r.status != NodeStatus::Up));

    let local = log.read_manifest(&key).ok().flatten().filter(|b| Hash::of(b) == record.manifest_hash);
    let manifest_bytes = match local {
        Some(b) => b,
        None => {
            let mut found = None;
            let mut last = String::from("no hub stores it");
            for s in &sources {
                let req = pb::CheckpointFetch { key: key.clone(), pages: vec![] }.encode_to_vec();
                match transport.call(s.0, CKPT_FETCH, req, CALL_TIMEOUT).await {
                    Ok(raw) => match pb::CheckpointFetchResponse::decode(raw.as_slice()) {
                        Ok(r) if Hash::of(&r.manifest) == record.manifest_hash => {
                            found = Some(r.manifest);
                            break;
                        }
                        Ok(_) => last = format!("hub {s} sent a manifest that does not match the record"),
                        Err(e) => last = format!("hub {s}: {e}"),
                    },
                    Err(e) => last = format!("hub {s}: {e}"),
                }
            }
            found.ok_or_else(|| format!("checkpoint {key}: {last}"))?
        }
    };
    let manifest = Manifest::decode(&manifest_bytes).map_err(|e| format!("checkpoint {key}: {e}"))?;
    let refs: Vec<Hash> = manifest.pages.iter().map(|(_, h)| *h).collect();
    // Local pages are read back (verifying them); missing and corrupt ones are fetched.
    let log2 = log.clone();
    let refs2 = refs.clone();
    let mut wanted: Vec<Hash> = tokio::task::spawn_blocking(move || {
        let mut seen = HashSet::new();
        refs2
            .into_iter()
            .filter(|h| seen.insert(*h))
            .filter(|h| match log2.read_page(h) {
                Ok(_) => false,
                Err(PageLogError::Corrupt(h)) => {
                    tracing::error!(page = %h, "corrupt checkpoint page; fetching it from another holder");
                    log2.forget_page(&h);
                    true
                }
                Err(_) => true,
            })
            .collect()
    })
    .await
    .map_err(|e| e.to_string())?;
    let total = wanted.len();
    let mut fetched: Vec<(Hash, Vec<u8>)> = Vec::with_capacity(total);
    for s in &sources {
        if wanted.is_empty() {
            break;
        }
        let mut still = Vec::new();
        for chunk in wanted.chunks(PAGES_PER_MESSAGE) {
            let req = pb::CheckpointFetch { key: String::new(), pages: chunk.iter().map(|h| h.0.to_vec()).collect() };
            let got = match transport.call(s.0, CKPT_FETCH, req.encode_to_vec(), CALL_TIMEOUT).await {
                Ok(raw) => pb::CheckpointFetchResponse::decode(raw.as_slice()).map(|r| r.pages).unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(hub = %s, error = %e, "fetching checkpoint pages failed");
                    Vec::new()
                }
            };
            let mut got: std::collections::HashMap<Hash, Vec<u8>> = got
                .into_iter()
                .filter_map(|p| {
                    let h = Hash::from_slice(&p.hash)?;
                    (Hash::of(&p.data) == h).then_some((h, p.data))
                })
                .collect();
            for h in chunk {
                match got.remove(h) {
                    Some(d) => fetched.push((*h, d)),
                    None => still.push(*h),
                }
            }
        }
        wanted = still;
    }
    if !wanted.is_empty() {
        return Err(format!("checkpoint {key}: {} of its pages are on no reachable hub", wanted.len()));
    }
    let write = PageWrite { pages: fetched, key: key.clone(), manifest: manifest_bytes, refs, remove: vec![] };
    tokio::task::spawn_blocking(move || log.write(&[write], true))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if total > 0 {
        tracing::info!(task, key = %key, pages = total, "fetched checkpoint pages from holders");
    }
    Ok(key)
}

/// Drops manifests this hub no longer needs: of deleted tasks, of epochs older than the task's
/// current placement, and older than its committed checkpoint (never the committed one).
pub(crate) fn collect_garbage(log: &PageLog, state: &ClusterState) {
    let remove: Vec<String> = log
        .manifest_keys()
        .into_iter()
        .filter(|k| {
            let Some((task, epoch, sequence)) = parse_checkpoint_key(k) else { return false };
            if epoch > state.last_epoch {
                return false; // from a placement this hub has not applied yet
            }
            let Some(t) = state.tasks.get(task) else { return true };
            let committed = t.checkpoint.as_ref();
            if committed.is_some_and(|c| c.key(task) == *k) {
                return false;
            }
            let current = t.instances.get(&0).map(|p| p.epoch);
            current.is_some_and(|e| epoch < e) || committed.is_some_and(|c| (epoch, sequence) < (c.epoch, c.sequence))
        })
        .collect();
    if remove.is_empty() {
        return;
    }
    tracing::debug!(manifests = remove.len(), "dropping stale checkpoints");
    // Not synced: a tombstone lost in a crash only means this runs again.
    if let Err(e) = log.write(&[PageWrite { remove, ..Default::default() }], false) {
        tracing::warn!(error = %e, "dropping stale checkpoints failed");
    }
}

/// Copies the committed checkpoint of each task hosted here to holders that do not have it yet
/// (a holder that replaced a dead one), in the background, one copy job per task at a time.
pub(crate) fn refill_holders(hub: &Arc<Hub>, state: &ClusterState) {
    let me = hub.consensus.node_id();
    for (name, t) in &state.tasks {
        let Some(record) = &t.checkpoint else { continue };
        if t.instances.get(&0).is_none_or(|p| p.node != me) {
            continue;
        }
        let up = |n: &NodeId| state.is_up(*n);
        let new: Vec<NodeId> = t.holders.iter().copied().filter(|h| !record.stored_on.contains(h) && up(h)).collect();
        if new.is_empty() || !hub.refilling.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone()) {
            continue;
        }
        let (hub, name, record) = (hub.clone(), name.clone(), record.clone());
        tokio::spawn(async move {
            if let Err(e) = refill(&hub, &name, &record, &new).await {
                tracing::warn!(task = %name, error = %e, "copying the checkpoint to new holders failed; will retry");
            }
            hub.refilling.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
        });
    }
}

async fn refill(hub: &Hub, task: &str, record: &CheckpointRecord, to: &[NodeId]) -> Result<(), String> {
    let key = record.key(task);
    let log = hub.executor.pages().clone();
    let manifest = log
        .read_manifest(&key)
        .map_err(|e| e.to_string())?
        .filter(|b| Hash::of(b) == record.manifest_hash)
        .ok_or_else(|| format!("checkpoint {key} is not intact on this hub"))?;
    let refs = Manifest::decode(&manifest).map_err(|e| e.to_string())?.pages.iter().map(|(_, h)| *h).collect();
    let local = LocalCheckpoint {
        task: task.to_owned(),
        version: record.version,
        epoch: record.epoch.0,
        sequence: record.sequence,
        key: key.clone(),
        manifest,
        refs,
        new_pages: Vec::new(),
        size_bytes: record.size_bytes,
        created_ms: record.at_ms,
        committed_key: Some(key.clone()),
    };
    let mut done = Vec::new();
    for (h, r) in to.iter().zip(push_all(hub, to, &local, &key).await) {
        match r {
            Ok(()) => done.push(*h),
            Err(e) => tracing::warn!(task, holder = %h, error = %e, "copying the checkpoint failed"),
        }
    }
    if done.is_empty() {
        return Err("no new holder took the copy".into());
    }
    let cmd = Command::AddCheckpointCopies {
        task: task.to_owned(),
        epoch: record.epoch,
        sequence: record.sequence,
        nodes: done,
    };
    match hub.consensus.propose(cmd).await {
        Ok(_) | Err(ProposeError::Rejected(_)) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
