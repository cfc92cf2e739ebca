//! Compaction: the file is rewritten with only the live records (pages a manifest refers to or a
//! pin holds, and the latest manifests), without holding the index's lock for the rewrite.
//!
//! ```text
//!  1 lock:    decide (live bytes under half the file); snapshot the live records' places and
//!             the file's length; unlock
//!  2 no lock: copy those records into pages.log.compact (the old file below the snapshot's
//!             length never changes: it is append-only), fsync
//!  3 lock:    copy the tail appended since the snapshot as it is, and pages that became live
//!             meanwhile but sat below the snapshot; fsync, rename over pages.log, sync the
//!             directory, swap the file and the index; unlock
//! ```
//! Readers that took the old file's handle before the swap read it to the end (it stays open).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::record::{self, encode, encode_refs, Version, KIND_MANIFEST, KIND_PAGE, MAGIC};
use super::{io, sync_dir, Inner, Loc, ManifestLoc, PageLog, PageLogError, COMPACT_MIN_BYTES};
use crate::Hash;

/// A record's bytes around its data: kind, key length, a 32-byte key or so, length, checksum.
const RECORD_OVERHEAD: u64 = 100;

/// What step 2 copies: taken under the lock in step 1.
struct Snapshot {
    file: Arc<File>,
    len: u64,
    pages: Vec<(Hash, Loc)>,
    manifests: Vec<(String, Loc, Vec<Hash>)>,
}

/// The new file being built (streamed to `out`: a compaction never holds the live set in
/// memory), and where its records are.
struct Rewrite<W> {
    out: W,
    /// Bytes written so far: where the next record starts.
    len: u64,
    pages: HashMap<Hash, Loc>,
    manifests: HashMap<String, ManifestLoc>,
    /// One record at a time.
    record: Vec<u8>,
}

impl<W: Write> Rewrite<W> {
    /// A rewrite into `out`, which already holds `len` bytes.
    fn new(out: W, len: u64) -> Self {
        Self { out, len, pages: HashMap::new(), manifests: HashMap::new(), record: Vec::new() }
    }

    /// Writes the record in `self.record` and returns where it started.
    fn flush_record(&mut self, path: &Path) -> Result<u64, PageLogError> {
        self.out.write_all(&self.record).map_err(io(path))?;
        let start = self.len;
        self.len += self.record.len() as u64;
        Ok(start)
    }

    fn copy_page(&mut self, file: &File, hash: Hash, loc: Loc, path: &Path) -> Result<(), PageLogError> {
        let mut data = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut data, loc.offset).map_err(io(path))?;
        self.record.clear();
        let l = encode(&mut self.record, KIND_PAGE, &hash.0, &[&data]);
        let start = self.flush_record(path)?;
        self.pages.insert(hash, Loc { offset: start + l.offset, ..l });
        Ok(())
    }

    fn copy_manifest(
        &mut self,
        file: &File,
        key: &str,
        loc: Loc,
        refs: &[Hash],
        path: &Path,
    ) -> Result<(), PageLogError> {
        let mut data = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut data, loc.offset).map_err(io(path))?;
        let encoded = encode_refs(refs);
        self.record.clear();
        let l = encode(&mut self.record, KIND_MANIFEST, key.as_bytes(), &[&encoded, &data]);
        let start = self.flush_record(path)?;
        let loc = Loc { offset: start + l.offset + encoded.len() as u64, len: data.len() as u32 };
        self.manifests.insert(key.to_owned(), ManifestLoc { loc, refs: refs.to_vec() });
        Ok(())
    }
}

/// A rewrite into a new file at `tmp`, its magic written.
fn rewrite_file(tmp: &Path) -> Result<Rewrite<BufWriter<File>>, PageLogError> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(tmp).map_err(io(tmp))?);
    out.write_all(MAGIC).map_err(io(tmp))?;
    Ok(Rewrite::new(out, MAGIC.len() as u64))
}

/// Writes out what is buffered and makes the file durable.
fn finish_file(rewrite: Rewrite<BufWriter<File>>, tmp: &Path) -> Result<(File, Rewrite<()>), PageLogError> {
    let Rewrite { out, len, pages, manifests, record } = rewrite;
    let f = out.into_inner().map_err(|e| io(tmp)(e.into_error()))?;
    f.sync_all().map_err(io(tmp))?;
    Ok((f, Rewrite { out: (), len, pages, manifests, record }))
}

impl PageLog {
    /// Compacts the file if at least half of it is garbage. Returns whether it did.
    pub fn compact_if_needed(&self) -> Result<bool, PageLogError> {
        self.compact_with(|| {})
    }

    /// [`compact_if_needed`](Self::compact_if_needed), running `meanwhile` between the copy and
    /// the swap (tests write there, as other threads may).
    pub(super) fn compact_with(&self, meanwhile: impl FnOnce()) -> Result<bool, PageLogError> {
        let _one = self.compacting.lock().unwrap_or_else(|p| p.into_inner());
        let Some(snapshot) = self.snapshot() else { return Ok(false) };
        let tmp = self.path.with_extension("log.compact");
        let copied = rewrite_file(&tmp).and_then(|mut rewrite| {
            for (hash, loc) in &snapshot.pages {
                rewrite.copy_page(&snapshot.file, *hash, *loc, &self.path)?;
            }
            for (key, loc, refs) in &snapshot.manifests {
                rewrite.copy_manifest(&snapshot.file, key, *loc, refs, &self.path)?;
            }
            finish_file(rewrite, &tmp)
        });
        meanwhile();
        let swapped = copied.and_then(|(f, rewrite)| self.swap(snapshot, rewrite, f));
        if swapped.is_err() {
            // Nothing of it is in use: the old file still is the log.
            let _ = fs::remove_file(&tmp);
        }
        swapped.map(|()| true)
    }

    /// Pages a manifest refers to or a pin holds.
    fn live(&self, inner: &Inner) -> HashSet<Hash> {
        inner.manifests.values().flat_map(|m| m.refs.iter().copied()).chain(self.pinned().keys().copied()).collect()
    }

    /// Step 1: whether to compact, and what.
    fn snapshot(&self) -> Option<Snapshot> {
        let inner = self.lock();
        if inner.len < COMPACT_MIN_BYTES {
            return None;
        }
        let live = self.live(&inner);
        let pages: Vec<(Hash, Loc)> = live.iter().filter_map(|h| inner.pages.get(h).map(|l| (*h, *l))).collect();
        let live_bytes: u64 = pages.iter().map(|(_, l)| u64::from(l.len) + RECORD_OVERHEAD).sum();
        if live_bytes * 2 > inner.len {
            return None;
        }
        let manifests = inner.manifests.iter().map(|(k, m)| (k.clone(), m.loc, m.refs.clone())).collect();
        Some(Snapshot { file: inner.file.clone(), len: inner.len, pages, manifests })
    }

    /// Step 3: the tail, late live pages, and the swap, under the lock.
    fn swap(&self, snapshot: Snapshot, mut rewrite: Rewrite<()>, mut f: File) -> Result<(), PageLogError> {
        let mut inner = self.lock();
        let held = Instant::now();
        let tmp = self.path.with_extension("log.compact");
        // Records appended since the snapshot, copied as they are: their places move by `shift`.
        let tail_base = rewrite.len;
        let mut tail = vec![0u8; (inner.len - snapshot.len) as usize];
        inner.file.read_exact_at(&mut tail, snapshot.len).map_err(io(&self.path))?;
        let shift = |loc: Loc| Loc { offset: loc.offset - snapshot.len + tail_base, ..loc };
        let late_base = tail_base + tail.len() as u64;
        let mut late = Rewrite::new(Vec::new(), late_base);
        let live = self.live(&inner);
        let mut pages = HashMap::with_capacity(inner.pages.len());
        for (hash, loc) in &inner.pages {
            if loc.offset >= snapshot.len {
                pages.insert(*hash, shift(*loc));
            } else if let Some(l) = rewrite.pages.get(hash) {
                pages.insert(*hash, *l);
            } else if live.contains(hash) {
                // Garbage at the snapshot, referred to since (a write skips pages it has).
                late.copy_page(&snapshot.file, *hash, *loc, &self.path)?;
            }
        }
        let mut manifests = HashMap::with_capacity(inner.manifests.len());
        for (key, m) in &inner.manifests {
            let loc = if m.loc.offset >= snapshot.len {
                shift(m.loc)
            } else if let Some(copied) = rewrite.manifests.remove(key) {
                copied.loc
            } else {
                late.copy_manifest(&snapshot.file, key, m.loc, &m.refs, &self.path)?;
                continue;
            };
            manifests.insert(key.clone(), ManifestLoc { loc, refs: m.refs.clone() });
        }
        pages.extend(late.pages);
        manifests.extend(late.manifests);
        f.write_all(&tail).and_then(|()| f.write_all(&late.out)).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        // The handle writes go to from now on, opened before the rename (it follows the file):
        // once the rename is done, nothing may fail before the index points at the new file.
        let file = OpenOptions::new().read(true).append(true).open(&tmp).map_err(io(&tmp))?;
        fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        if let Err(e) = sync_dir(&self.path) {
            // The rename may not be durable yet: a crash now leaves the old file, which is whole.
            tracing::warn!(error = %e, "syncing the page log's directory after a compaction");
        }
        let len = late.len;
        tracing::info!(before = inner.len, after = len, held = ?held.elapsed(), "compacted the page log");
        inner.file = Arc::new(file);
        inner.len = len;
        inner.pages = pages;
        inner.manifests = manifests;
        inner.compactions += 1;
        inner.compaction_lock_micros_max = inner.compaction_lock_micros_max.max(held.elapsed().as_micros() as u64);
        Ok(())
    }
}

/// Rewrites a version-1 log at `path` as version 2 (every record it holds, checked as it is
/// read), then renames it into place.
pub(super) fn migrate_v1(path: &Path) -> Result<(), PageLogError> {
    let index = record::scan(path, Version::V1)?;
    let old = File::open(path).map_err(io(path))?;
    let tmp = path.with_extension("log.v2");
    let mut rewrite = rewrite_file(&tmp)?;
    for (hash, loc) in &index.pages {
        rewrite.copy_page(&old, *hash, *loc, path)?;
    }
    for (key, m) in &index.manifests {
        rewrite.copy_manifest(&old, key, m.loc, &m.refs, path)?;
    }
    finish_file(rewrite, &tmp)?;
    fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(path)?;
    tracing::info!(
        path = %path.display(),
        pages = index.pages.len(),
        manifests = index.manifests.len(),
        "rewrote a version-1 page log as version 2"
    );
    Ok(())
}
