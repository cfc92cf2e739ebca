//! A new host's side of a failover: the committed checkpoint's manifest and pages, from the local
//! page log where they are intact, else from the hubs that store them (verified by hash), written
//! to the local page log before the instance restores. The holder's side serves them.

use std::collections::HashSet;

use hubmesh_consensus::state::{CheckpointRecord, NodeStatus};
use hubmesh_consensus::transport::{Refusal, CHECKPOINT_FETCH};
use hubmesh_consensus::NodeId;
use hubmesh_proto::pb;
use hubmesh_storage::{Hash, PageLog, PageLogError, PageWrite};

use super::{CALL_TIMEOUT, PAGES_PER_MESSAGE};
use crate::checkpoint::Manifest;
use crate::hub::Hub;

/// Why the committed checkpoint could not be put together here (the reconciler retries).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct FetchError(String);

impl From<String> for FetchError {
    fn from(m: String) -> Self {
        Self(m)
    }
}

/// Holder side of `CHECKPOINT_FETCH`: the manifest (if asked) and the pages it has intact.
pub(super) fn serve_fetch(log: &PageLog, req: pb::CheckpointFetch) -> Result<pb::CheckpointFetchResponse, Refusal> {
    if req.pages.len() > PAGES_PER_MESSAGE {
        return Err(Refusal::new(pb::ErrorCode::BadRequest, format!("at most {PAGES_PER_MESSAGE} pages per request")));
    }
    let manifest = if req.key.is_empty() {
        Vec::new()
    } else {
        log.read_manifest(&req.key)
            .map_err(|e| Refusal::internal(e.to_string()))?
            .ok_or_else(|| Refusal::new(pb::ErrorCode::NotFound, format!("no checkpoint {} here", req.key)))?
    };
    let mut pages = Vec::with_capacity(req.pages.len());
    for raw in &req.pages {
        let Some(hash) = Hash::from_slice(raw) else { continue };
        match log.read_page(&hash) {
            Ok(data) => pages.push(pb::Page { hash: hash.0.to_vec(), data }),
            Err(PageLogError::Corrupt(h)) => {
                // Forgotten: this hub's own next restore or copy fetches a good one.
                tracing::error!(page = %h, "a checkpoint page is corrupt on this hub; forgetting it");
                log.forget_page(&h);
            }
            Err(_) => {}
        }
    }
    Ok(pb::CheckpointFetchResponse { manifest, pages })
}

/// Makes sure the manifest of `record` and all its pages are in the local page log, verified,
/// fetching what is missing or corrupt from the hubs that store it. Returns the key to restore.
pub(crate) async fn fetch_checkpoint(hub: &Hub, task: &str, record: &CheckpointRecord) -> Result<String, FetchError> {
    let key = record.key(task);
    let log = hub.executor().pages().clone();
    let me = hub.consensus().node_id();
    let state = hub.consensus().state();
    let transport = hub.consensus().transport();
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
                let req = pb::CheckpointFetch { key: key.clone(), pages: vec![] };
                match CHECKPOINT_FETCH.call(&transport, s.0, &req, CALL_TIMEOUT).await {
                    Ok(r) if Hash::of(&r.manifest) == record.manifest_hash => {
                        found = Some(r.manifest);
                        break;
                    }
                    Ok(_) => last = format!("hub {s} sent a manifest that does not match the record"),
                    Err(e) => last = format!("hub {s}: {e}"),
                }
            }
            found.ok_or_else(|| format!("checkpoint {key}: {last}"))?
        }
    };
    store_with_pages(hub, task, &key, manifest_bytes, &sources).await
}

/// Stores the checkpoint `key` (its manifest given) with all its pages in the local page log:
/// the pages that are missing or fail their hash here come from `sources`, verified.
pub(crate) async fn store_with_pages(
    hub: &Hub,
    task: &str,
    key: &str,
    manifest_bytes: Vec<u8>,
    sources: &[NodeId],
) -> Result<String, FetchError> {
    let key = key.to_owned();
    let log = hub.executor().pages().clone();
    let transport = hub.consensus().transport();
    let manifest = Manifest::decode(&manifest_bytes).map_err(|e| format!("checkpoint {key}: {e}"))?;
    let refs: Vec<Hash> = manifest.pages.iter().map(|(_, h)| *h).collect();
    // Missing pages are fetched. Local ones are verified once, by the restore that reads them:
    // one found rotten there is forgotten, and the next attempt fetches it here.
    // Off the runtime: a page-log write holds the log's lock through its fdatasync.
    let (log2, refs2) = (log.clone(), refs.clone());
    let mut wanted: Vec<Hash> = tokio::task::spawn_blocking(move || {
        let mut seen = HashSet::new();
        refs2.into_iter().filter(|h| seen.insert(*h) && !log2.has_page(h)).collect()
    })
    .await
    .map_err(|e| e.to_string())?;
    let total = wanted.len();
    let mut fetched: Vec<(Hash, Vec<u8>)> = Vec::with_capacity(total);
    for s in sources {
        if wanted.is_empty() {
            break;
        }
        let mut still = Vec::new();
        for chunk in wanted.chunks(PAGES_PER_MESSAGE) {
            let req = pb::CheckpointFetch { key: String::new(), pages: chunk.iter().map(|h| h.0.to_vec()).collect() };
            let got = match CHECKPOINT_FETCH.call(&transport, s.0, &req, CALL_TIMEOUT).await {
                Ok(r) => r.pages,
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
        return Err(format!("checkpoint {key}: {} of its pages are on no reachable hub", wanted.len()).into());
    }
    // Nothing to store when the manifest and every page are here already (a migration's target
    // stored them, fdatasync'ed, before the commit).
    let write = PageWrite { pages: fetched, key: key.clone(), manifest: manifest_bytes, refs, remove: vec![] };
    tokio::task::spawn_blocking(move || {
        let stored =
            write.pages.is_empty() && log.read_manifest(&write.key).ok().flatten().is_some_and(|m| m == write.manifest);
        if stored {
            Ok(0)
        } else {
            log.write(&[write], true)
        }
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    if total > 0 {
        tracing::info!(task, key = %key, pages = total, "fetched checkpoint pages from holders");
    }
    Ok(key)
}
