//! The holder's side of a push: the header is checked before any page is read; pages are
//! verified and appended 8 MiB at a time as they arrive (hash and write on a blocking thread
//! while the next batch is read), pinned until the manifest is stored with one fdatasync. A stale
//! epoch, a key of another task, a page that is not the manifest's, a page over the size limit
//! or a body that ends inside a page is refused, and nothing of it is kept.

use std::collections::HashSet;

use hubmesh_consensus::state::{parse_checkpoint_key, validate_task_name};
use hubmesh_consensus::transport::{BulkBody, Refusal};
use hubmesh_consensus::ClusterState;
use hubmesh_proto::pb;
use hubmesh_storage::{Hash, PageLog, PageLogError, PageWrite};

use super::push::distinct;
use super::{BATCH_BYTES, FRAME_HEAD, MAX_PAGE};
use crate::hub::Hub;

/// Holder side of `CHECKPOINT_PUSH`: checks the header, stores the pages of the body in batches as
/// they arrive (verified, not yet synced; hashing and writing on a blocking thread while the next
/// batch is read), then stores the manifest if every page it refers to is here.
pub(super) async fn receive_push(
    hub: &Hub,
    req: pb::CheckpointPush,
    mut body: BulkBody,
) -> Result<pb::CheckpointPushResponse, Refusal> {
    let bad = |m: String| Refusal::bad_request(m);
    validate_task_name(&req.task).map_err(|e| bad(e.to_string()))?;
    let state = hub.consensus().state();
    check_push_epoch(&state, &req)?;
    let log = hub.executor().pages().clone();
    // The pages go in before the manifest that refers to them: a compaction in between (old
    // checkpoints' pages are garbage by now) must keep them.
    let mut pin = log.pin();
    let mut writing: Option<tokio::task::JoinHandle<Result<(), Refusal>>> = None;
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
            let Some(data) = body.read_vec(len).await? else {
                return Err(bad(format!("the push ended inside page {hash}")));
            };
            batch_bytes += data.len();
            batch.push((hash, data));
        }
        if batch_bytes >= BATCH_BYTES || (!more && !batch.is_empty()) {
            batch_bytes = 0;
            if let Some(w) = writing.take() {
                w.await.map_err(|e| Refusal::internal(e.to_string()))??;
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
        w.await.map_err(|e| Refusal::internal(e.to_string()))??;
    }
    // The body may have taken a while: the host may have been replaced meanwhile.
    let state = hub.consensus().state();
    check_push_epoch(&state, &req)?;
    let answer = tokio::task::spawn_blocking(move || store_manifest(&log, &state, req))
        .await
        .map_err(|e| Refusal::internal(e.to_string()))?;
    drop(pin);
    answer
}

/// A host that was replaced must not leave its late checkpoints here (a copy of the committed
/// checkpoint for a new holder is fine, whatever its epoch).
fn check_push_epoch(state: &ClusterState, req: &pb::CheckpointPush) -> Result<(), Refusal> {
    let Some((task, epoch, sequence)) = parse_checkpoint_key(&req.key).filter(|(t, ..)| *t == req.task) else {
        return Err(Refusal::new(
            pb::ErrorCode::BadRequest,
            format!("checkpoint key {:?} is not of task {:?}", req.key, req.task),
        ));
    };
    let record = state.tasks.get(task).and_then(|t| t.checkpoint.as_ref());
    // A checkpoint no newer than the committed one can never commit; stored under the committed
    // key with other contents it would replace the committed state here (a host restarted from
    // a lagging view of the mesh reuses sequence numbers). Only the committed one itself passes.
    if let Some(c) = record.filter(|c| c.epoch == epoch && sequence <= c.sequence) {
        if !(sequence == c.sequence && Hash::of(&req.manifest) == c.manifest_hash) {
            return Err(Refusal::new(
                pb::ErrorCode::Unavailable,
                format!("checkpoint {} is not newer than the committed {}", req.key, c.key(task)),
            ));
        }
    }
    let committed = record.map(|c| c.key(task));
    if let Some(p) = state.placement(task, 0) {
        if epoch < p.epoch && committed.as_deref() != Some(req.key.as_str()) {
            return Err(Refusal::new(
                pb::ErrorCode::Unavailable,
                format!("stale epoch {}: the task is at epoch {}", epoch.0, p.epoch.0),
            ));
        }
    }
    Ok(())
}

/// Verifies pages against their hashes and appends them (synced with the manifest later).
fn store_pages(log: &PageLog, pages: Vec<(Hash, Vec<u8>)>) -> Result<(), Refusal> {
    for (hash, data) in &pages {
        if Hash::of(data) != *hash {
            return Err(Refusal::new(pb::ErrorCode::BadRequest, format!("page {hash} does not match its hash")));
        }
    }
    log.write(&[PageWrite { pages, ..Default::default() }], false).map_err(|e| Refusal::internal(e.to_string()))?;
    Ok(())
}

/// Stores the manifest of a push (with one fdatasync for it and its pages) once every page it
/// refers to is here; else answers the missing ones. Drops this task's checkpoints older than the
/// newest committed one.
fn store_manifest(
    log: &PageLog,
    state: &ClusterState,
    req: pb::CheckpointPush,
) -> Result<pb::CheckpointPushResponse, Refusal> {
    let bad = |m: String| Refusal::bad_request(m);
    let io = |e: PageLogError| Refusal::internal(e.to_string());
    let (task, ..) = parse_checkpoint_key(&req.key).ok_or_else(|| bad(format!("bad checkpoint key {:?}", req.key)))?;
    let refs: Vec<Hash> = req
        .refs
        .iter()
        .map(|h| Hash::from_slice(h).ok_or_else(|| bad("a ref is 32 bytes".into())))
        .collect::<Result<_, _>>()?;
    let missing: Vec<Vec<u8>> = distinct(&refs).iter().filter(|h| !log.has_page(h)).map(|h| h.0.to_vec()).collect();
    if !missing.is_empty() {
        return Ok(pb::CheckpointPushResponse { missing });
    }
    let record = state.tasks.get(task).and_then(|t| t.checkpoint.as_ref());
    // A key is stored once: other contents under it are a host that used it again (the one here
    // may be committed, which this hub may not know yet) — unless they are the committed ones.
    if log.read_manifest(&req.key).map_err(io)?.is_some_and(|here| here != req.manifest) {
        let committed_new =
            record.is_some_and(|c| c.key(task) == req.key && c.manifest_hash == Hash::of(&req.manifest));
        if !committed_new {
            return Err(Refusal::new(
                pb::ErrorCode::Unavailable,
                format!("checkpoint {} is here already with other contents", req.key),
            ));
        }
    }
    let committed = record.map(|c| c.key(task));
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
    Ok(pb::CheckpointPushResponse::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(key: &str, manifest: &[u8], page: &Hash) -> pb::CheckpointPush {
        pb::CheckpointPush {
            task: "t".into(),
            key: key.into(),
            manifest: manifest.to_vec(),
            refs: vec![page.0.to_vec()],
            keep: String::new(),
        }
    }

    #[test]
    fn a_key_stored_here_is_not_replaced_by_other_contents() {
        let dir = tempfile::tempdir().unwrap();
        let log = PageLog::open(dir.path()).unwrap();
        let state = ClusterState::default();
        let page = vec![7u8; 100];
        let hash = Hash::of(&page);
        store_pages(&log, vec![(hash, page)]).unwrap();
        store_manifest(&log, &state, push("t/1/2", b"first", &hash)).unwrap();
        // The same again (a retried push) is fine.
        store_manifest(&log, &state, push("t/1/2", b"first", &hash)).unwrap();
        // Other contents under the key (a host that used it again) are refused, and change nothing.
        let e = store_manifest(&log, &state, push("t/1/2", b"second", &hash)).unwrap_err();
        assert_eq!(e.code, pb::ErrorCode::Unavailable, "{e:?}");
        assert_eq!(log.read_manifest("t/1/2").unwrap().as_deref(), Some(&b"first"[..]));
        // A new key is stored.
        store_manifest(&log, &state, push("t/1/3", b"second", &hash)).unwrap();
        assert_eq!(log.read_manifest("t/1/3").unwrap().as_deref(), Some(&b"second"[..]));
    }
}
