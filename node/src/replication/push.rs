//! The host's side: a checkpoint goes to every holder over one bulk stream each, then its record
//! is proposed. The first round reads each new page once, on a blocking thread a few
//! pages ahead, and streams it to every holder; pages one holder still lacks afterwards go to that
//! holder alone. A holder the leader marks down is skipped (and refilled later by `upkeep`).
//!
//! One slow holder must not hold up every durable answer of the tasks it holds (a lossy link,
//! a paused or restarting hub: until the leader marks it down, a second or more). So a commit
//! waits for all holders but one ([`ack_quorum`]: the first k of k+1), gives the last a short
//! grace, and records who stored the checkpoint; `upkeep` copies it to the others afterwards.
//! Nothing is acknowledged that fewer than k holders that are up have (k falls only when the
//! leader marks holders down, as before). The shared page reader never waits long for one
//! holder: a holder that stops taking pages is dropped from the first round and gets its pages
//! alone afterwards.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hubmesh_consensus::state::{parse_checkpoint_key, BasedOn, CheckpointRecord, NodeStatus};
use hubmesh_consensus::transport::{RpcError, CHECKPOINT_PUSH};
use hubmesh_consensus::{ClusterState, Command, Epoch, NodeId, ProposeError, Rejected};
use hubmesh_proto::pb;
use hubmesh_storage::Hash;
use tokio::time::Instant;

use super::{CALL_TIMEOUT, FRAME_HEAD, PAGES_READ_AHEAD, PUSH_ROUNDS};
use crate::executor::{CommitError, LocalCheckpoint};
use crate::hub::Hub;

/// How long the holders past the quorum may take beyond it, at most: healthy holders finish
/// together, so a commit records them all and `upkeep` has nothing to copy.
const TAIL_GRACE: Duration = Duration::from_millis(100);
/// The least grace they get.
const TAIL_GRACE_MIN: Duration = Duration::from_millis(1);
/// How long the first round's reader waits for one holder's stream to take a page while others
/// wait too.
const LAGGARD_WAIT: Duration = Duration::from_millis(200);
/// How long a failed commit waits, at most, before it tries again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Replicates `c` to the task's holders and commits its record, retrying (holders change when
/// one dies, leaders change) until the propose timeout has passed twice. Once a proposal of the
/// record may have been taken (it timed out, or went lost on the way), any failure is
/// [`CommitError::MayHaveCommitted`]: the record may yet commit, or have committed already and
/// been restored elsewhere, so the change it carries must not be reported as not made.
pub(super) async fn commit(hub: &Hub, c: &LocalCheckpoint) -> Result<(), CommitError> {
    let mut maybe_proposed = false;
    match try_commit(hub, c, &mut maybe_proposed).await {
        // Still a replacement: the instance must stop answering whatever became of the record.
        Err(CommitError::Replaced { .. }) if maybe_proposed => Err(CommitError::Replaced { may_have_committed: true }),
        Err(e) if maybe_proposed && !matches!(e, CommitError::MayHaveCommitted(_)) => {
            Err(CommitError::MayHaveCommitted(e.to_string()))
        }
        res => res,
    }
}

async fn try_commit(hub: &Hub, c: &LocalCheckpoint, maybe_proposed: &mut bool) -> Result<(), CommitError> {
    let started = Instant::now();
    let deadline = started + hub.config().timeouts.resolve().propose * 2;
    let me = hub.consensus().node_id();
    let manifest_hash = c.manifest_hash;
    let mut last_error;
    // The leader this hub knew when it last proposed the record and the proposal failed for want
    // of a leader (`None` inside: it knew none); `None`: no such failure to follow up.
    let mut leader_tried: Option<Option<u64>> = None;
    // Until a proposal may have been taken, nothing can have committed, and a hub that lost the
    // mesh gives up at once: its caller is told, and the state is undone.
    loop {
        let state = hub.consensus().state();
        let task = state.tasks.get(&c.task).ok_or(CommitError::Deleted)?;
        // First: an earlier attempt whose answer was lost may have committed (and the instance
        // been re-placed since, from this very checkpoint).
        if let Some(r) = task.checkpoint.as_ref().filter(|r| r.epoch.0 == c.epoch && r.sequence == c.sequence) {
            if r.manifest_hash == manifest_hash {
                return Ok(());
            }
            // Another state under this checkpoint's name (an instance that restarted from a
            // stale view of the committed checkpoint): this one can never commit.
            return Err(CommitError::Behind(format!("checkpoint {} was committed with other contents", c.key)));
        }
        let current = task.instances.get(&0).copied();
        if !current.is_some_and(|p| p.node == me && p.epoch.0 == c.epoch) {
            return Err(CommitError::Replaced { may_have_committed: false });
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
            let lost = async {
                if *maybe_proposed {
                    std::future::pending().await
                } else {
                    hub.until_lost_mesh().await
                }
            };
            let results = tokio::select! {
                r = push_until(hub, &live, c, &keep, ack_quorum(wanted)) => r,
                () = lost => return Err(CommitError::NotCommitted("this hub lost contact with the mesh".into())),
            };
            let stored: Vec<NodeId> =
                live.iter().copied().filter(|h| results.get(h).is_some_and(Result::is_ok)).collect();
            // A holder marked down meanwhile lowers what is wanted, and its copy does not count:
            // the holders that are up and have it must be as many as the mesh allows now.
            let now = hub.consensus().state();
            let need_now = ack_quorum((task.spec.state_replicas as usize).min(eligible_holders(&now, me)));
            if stored.iter().filter(|h| now.is_up(**h)).count() >= need_now {
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
                let leader_before = hub.consensus().leader();
                match hub.consensus().propose(cmd).await {
                    Ok(_) => {
                        crate::faults::crash_point("crash-after-checkpoint-commit");
                        metrics::histogram!("hubmesh_checkpoint_commit_seconds")
                            .record(started.elapsed().as_secs_f64());
                        return Ok(());
                    }
                    Err(ProposeError::Rejected(e @ Rejected::NotBasedOnCommitted { .. })) => {
                        return Err(CommitError::Behind(e.to_string()))
                    }
                    Err(ProposeError::Rejected(Rejected::StaleEpoch { .. })) => {
                        return Err(CommitError::Replaced { may_have_committed: false })
                    }
                    Err(e) => {
                        if matches!(e, ProposeError::NotLeader { .. } | ProposeError::Timeout) {
                            leader_tried = Some(leader_before);
                        }
                        *maybe_proposed |= !matches!(e, ProposeError::NotLeader { .. } | ProposeError::Rejected(_));
                        last_error = format!("committing the record: {e}");
                    }
                }
            } else {
                let errors: Vec<String> = results.into_values().filter_map(Result::err).collect();
                last_error =
                    format!("only {} of {need_now} holders took the checkpoint: {}", stored.len(), errors.join("; "));
            }
        }
        if Instant::now() >= deadline || !*maybe_proposed && hub.lost_mesh() {
            return Err(CommitError::NotCommitted(last_error)); // MayHaveCommitted if it may have
        }
        tracing::debug!(task = %c.task, error = %last_error, "checkpoint commit retry");
        // Again once the state changes or, after a proposal that found no leader or lost the one
        // it went to, as soon as another leader is known (an election ends, or the forward was
        // cut short because a new leader was already known): the caller has waited long enough.
        let mut rx = hub.consensus().changes();
        let tried = leader_tried.take();
        let new_leader = async {
            match tried {
                Some(tried) => hub.consensus().another_leader(tried).await,
                None => std::future::pending().await,
            }
        };
        let _ = tokio::time::timeout(RETRY_PAUSE, async {
            tokio::select! {
                _ = rx.changed() => {}
                () = new_leader => {}
            }
        })
        .await;
    }
}

/// How many of `holders` must have stored a checkpoint before it is committed: all but one (the
/// first k of k+1), at least one, so that one slow holder never holds up a commit.
pub(super) fn ack_quorum(holders: usize) -> usize {
    if holders > 1 {
        holders - 1
    } else {
        holders
    }
}

/// Hubs that could hold a checkpoint of a task hosted on `me`: up, not witnesses, not `me`.
fn eligible_holders(state: &ClusterState, me: NodeId) -> usize {
    state.nodes.values().filter(|n| n.id != me && !n.witness && n.status == NodeStatus::Up).count()
}

/// Completes once the state no longer says `node` is up: a push to it is then abandoned.
async fn until_down(hub: &Hub, node: NodeId) {
    let mut rx = hub.consensus().watch();
    loop {
        if !rx.borrow_and_update().is_up(node) {
            return;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Sends checkpoint `c` to every holder in `holders` until each has the manifest and every page
/// (or has failed); one result per holder, in order.
pub(super) async fn push_all(
    hub: &Hub,
    holders: &[NodeId],
    c: &LocalCheckpoint,
    keep: &str,
) -> Vec<Result<(), String>> {
    let mut results = push_until(hub, holders, c, keep, holders.len()).await;
    holders
        .iter()
        .map(|h| results.remove(h).unwrap_or_else(|| Err(format!("holder {h}: the push was abandoned"))))
        .collect()
}

/// Sends checkpoint `c` to `holders` until `need` of them have the manifest and every page; the
/// others then get [`TAIL_GRACE`] (at most as long again as the first `need` took) before their
/// pushes are dropped (a dropped push is reset, so the holder stores nothing of it but pages). The
/// first round reads each new page once for all holders and streams it to each; pages one holder
/// still lacks afterwards go to that holder alone. The results of the pushes that ended, by holder.
pub(super) async fn push_until(
    hub: &Hub,
    holders: &[NodeId],
    c: &LocalCheckpoint,
    keep: &str,
    need: usize,
) -> HashMap<NodeId, Result<(), String>> {
    if let Some(d) = crate::faults::delay("delay-checkpoint-push") {
        tokio::time::sleep(d).await;
    }
    let started = Instant::now();
    let (txs, rxs): (Vec<_>, Vec<_>) =
        holders.iter().map(|_| tokio::sync::mpsc::channel::<(Bytes, Bytes)>(PAGES_READ_AHEAD)).unzip();
    let reader = read_ahead(hub, distinct(&c.new_pages), txs);
    let mut pushes: FuturesUnordered<_> = holders
        .iter()
        .zip(rxs)
        .map(|(&h, rx)| async move {
            let first = guarded(hub, h, c.new_pages.len(), stream_round(hub, h, c, keep, rx)).await;
            (h, async { finish_push(hub, h, c, keep, first?).await }.await)
        })
        .collect();
    let mut results = HashMap::new();
    // With nothing needed, the holders get only the grace.
    let mut grace: Option<Instant> = (need == 0).then(|| Instant::now() + TAIL_GRACE_MIN);
    loop {
        let next = match grace {
            None => pushes.next().await,
            Some(until) => tokio::time::timeout_at(until, pushes.next()).await.unwrap_or(None),
        };
        let Some((h, r)) = next else { break };
        results.insert(h, r);
        if grace.is_none() && results.values().filter(|r| r.is_ok()).count() >= need {
            grace = Some(Instant::now() + started.elapsed().min(TAIL_GRACE).max(TAIL_GRACE_MIN));
        }
    }
    drop(pushes);
    // A holder that stored the checkpoint verified every page; a failed read matters to the rest.
    if let Err(e) = reader.await.map_err(|e| e.to_string()).and_then(|r| r) {
        for r in results.values_mut().filter(|r| r.is_err()) {
            *r = Err(e.clone());
        }
    }
    results
}

/// After a round's answer: more rounds with the pages `holder` still lacks, until it has them all.
async fn finish_push(
    hub: &Hub,
    holder: NodeId,
    c: &LocalCheckpoint,
    keep: &str,
    mut resp: pb::CheckpointPushResponse,
) -> Result<(), String> {
    for round in 1..=PUSH_ROUNDS {
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
        resp = answer?;
    }
    Err(format!("holder {holder} still lacks pages after {PUSH_ROUNDS} rounds"))
}

/// Bounds a push round to `holder` in time (a call's timeout plus its pages at 8 MB/s) and
/// abandons it when the holder is marked down.
async fn guarded(
    hub: &Hub,
    holder: NodeId,
    pages: usize,
    round: impl Future<Output = Result<pb::CheckpointPushResponse, String>>,
) -> Result<pb::CheckpointPushResponse, String> {
    let budget = CALL_TIMEOUT + Duration::from_millis(8 * pages as u64);
    tokio::select! {
        biased;
        () = until_down(hub, holder) => Err(format!("holder {holder} was marked down")),
        r = tokio::time::timeout(budget, round) => r.map_err(|_| format!("holder {holder}: the push timed out"))?,
    }
}

/// A blocking thread that reads `pages` a few ahead and hands each, as a frame head
/// and its bytes, to every stream still reading. While several streams read, one that has taken
/// nothing for [`LAGGARD_WAIT`] is dropped (its stream ends; the holder answers what it lacks and
/// gets it alone), so that one stalled holder does not stall the others.
fn read_ahead(
    hub: &Hub,
    pages: Vec<Hash>,
    txs: Vec<tokio::sync::mpsc::Sender<(Bytes, Bytes)>>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    let log = hub.executor().pages().clone();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut txs: Vec<_> = txs.into_iter().map(Some).collect();
        for h in pages {
            if txs.iter().all(Option::is_none) {
                break; // every stream failed; their errors are the ones reported
            }
            // Not hashed here: the holder verifies every page, so each side hashes it once.
            let data = Bytes::from(log.read_page_unverified(&h).map_err(|e| format!("local page: {e}"))?);
            let head = frame_head(&h, data.len());
            for i in 0..txs.len() {
                let Some(tx) = txs[i].clone() else { continue };
                let others = txs.iter().flatten().count() > 1;
                let frame = (head.clone(), data.clone());
                let taken = if others {
                    runtime.block_on(tokio::time::timeout(LAGGARD_WAIT, tx.send(frame))).is_ok_and(|r| r.is_ok())
                } else {
                    tx.blocking_send(frame).is_ok()
                };
                if !taken {
                    txs[i] = None;
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
) -> Result<pb::CheckpointPushResponse, String> {
    let header = pb::CheckpointPush {
        task: c.task.clone(),
        key: c.key.clone(),
        manifest: c.manifest.clone(),
        refs: c.refs.iter().map(|h| h.0.to_vec()).collect(),
        keep: keep.to_owned(),
    };
    let lost = |e: RpcError| format!("holder {holder}: {e}");
    let started = Instant::now();
    let mut call = CHECKPOINT_PUSH.open(&hub.consensus().transport(), holder.0, &header).await.map_err(lost)?;
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
pub(super) fn distinct(hashes: &[Hash]) -> Vec<Hash> {
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

#[cfg(test)]
mod tests {
    use super::ack_quorum;

    #[test]
    fn a_commit_waits_for_all_holders_but_one() {
        assert_eq!(ack_quorum(0), 0, "no holders: the host's copy");
        assert_eq!(ack_quorum(1), 1, "a single holder is needed");
        assert_eq!(ack_quorum(2), 1);
        assert_eq!(ack_quorum(3), 2);
    }
}
