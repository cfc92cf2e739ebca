//! Compaction: the file is rewritten with only the live records (pages a manifest refers to or a
//! pin holds, and the latest manifests), holding the index's lock only for moments.
//!
//! ```text
//!  1 lock:    decide (live bytes a third of the file or less); snapshot the live records' places and
//!             the file's length; unlock
//!  2 no lock: copy those records into pages.log.compact (the old file below a length read
//!             under the lock never changes: it is append-only)
//!  3 catch up, a few rounds (lock only to read the length and the pages that became live):
//!             copy what was appended since as it is, and pages that sat below the snapshot as
//!             garbage but are referred to again; until what is left is small; fsync
//!  4 lock:    the same for the little left; fsync, rename over pages.log, sync the directory,
//!             swap the file and the index; unlock
//! ```
//! Like a VM's pre-copy: a writer that appends during a compaction (a full checkpoint of a big
//! task) is copied in the rounds, not while every other writer waits for the lock.
//! Readers that took the old file's handle before the swap read it to the end (it stays open).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::record::{self, checksum, encode, encode_head, encode_refs, Version, KIND_MANIFEST, KIND_PAGE, MAGIC};
use super::{io, sync_dir, Inner, Loc, ManifestLoc, PageLog, PageLogError};
use crate::Hash;

/// A record's bytes around its data: kind, key length, a 32-byte key or so, length, checksum.
const RECORD_OVERHEAD: u64 = 100;
/// Catch-up rounds stop once less than this is left to copy: the last of it is copied under the
/// lock, which every writer waits for.
const CATCH_UP_ENOUGH: u64 = 1 << 20;
/// At most this many catch-up rounds (a writer faster than the copy must not keep a compaction
/// going forever; what is left then is copied under the lock).
const CATCH_UP_ROUNDS: usize = 8;
/// A compaction waits until the file is this many times its live bytes: each then copies at most
/// half a byte per byte of garbage it drops. At 2 (compact once half is garbage) a task whose
/// checkpoints rewrite all its pages had every checkpoint copied once more on every hub that
/// stores it, and the compactors took a quarter of the CPU during pushes (docs/benchmarks.md,
/// "The mesh plane, fifth pass"); the price is a file up to three times its live bytes (four
/// while a compaction writes the new one).
const FILE_PER_LIVE_BYTE: u64 = 3;
/// How much of the old file a raw copy reads at a time.
const COPY_CHUNK: usize = 1 << 20;
/// A page record's bytes before its data (kind, key length, its 32-byte hash, data length) and
/// after it (the checksum).
const PAGE_HEAD: u64 = 1 + 2 + 32 + 4;
const PAGE_TAIL: u64 = 32;

/// What step 2 copies: taken under the lock in step 1.
struct Snapshot {
    file: Arc<File>,
    len: u64,
    pages: Vec<(Hash, Loc)>,
    manifests: Vec<(String, Loc, Vec<Hash>)>,
}

/// A stretch of the old file appended after the snapshot, copied as it is to `new`.
#[derive(Clone, Copy)]
struct Segment {
    old: u64,
    new: u64,
    len: u64,
}

/// The new file being built (streamed to `out`: a compaction never holds the live set in
/// memory), and where its records are.
struct Rewrite<W> {
    out: W,
    /// Bytes written so far: where the next record starts.
    len: u64,
    pages: HashMap<Hash, Loc>,
    manifests: HashMap<String, ManifestLoc>,
    /// The old file from the snapshot's length up to `copied_to`, copied as it is, in order.
    segments: Vec<Segment>,
    copied_to: u64,
    /// One record at a time.
    record: Vec<u8>,
}

impl<W: Write> Rewrite<W> {
    /// A rewrite into `out`, which already holds `len` bytes, of a file snapshotted at `from`.
    fn new(out: W, len: u64, from: u64) -> Self {
        Self {
            out,
            len,
            pages: HashMap::new(),
            manifests: HashMap::new(),
            segments: Vec::new(),
            copied_to: from,
            record: Vec::new(),
        }
    }

    /// Copies the old file from `copied_to` up to `to` as it is (records appended since the
    /// snapshot: their places move by a constant per segment).
    fn copy_raw(&mut self, file: &File, to: u64, path: &Path) -> Result<(), PageLogError> {
        let mut at = self.copied_to;
        if to <= at {
            return Ok(());
        }
        self.segments.push(Segment { old: at, new: self.len, len: to - at });
        let mut buf = vec![0u8; COPY_CHUNK.min((to - at) as usize)];
        while at < to {
            let n = COPY_CHUNK.min((to - at) as usize);
            file.read_exact_at(&mut buf[..n], at).map_err(io(path))?;
            self.out.write_all(&buf[..n]).map_err(io(path))?;
            at += n as u64;
        }
        self.len += to - self.copied_to;
        self.copied_to = to;
        Ok(())
    }

    /// Copies version-2 page records as they are, in file order, neighbours in one read and one
    /// write of up to `COPY_CHUNK`: their checksum covers the head, not where they sit, so they
    /// need no new one (re-encoding each page cost two more copies of it). A run whose heads or
    /// checksums are not what the index says (rot since the scan) is written anew, page by page.
    fn copy_pages(&mut self, file: &File, mut pages: Vec<(Hash, Loc)>, path: &Path) -> Result<(), PageLogError> {
        pages.sort_unstable_by_key(|(_, l)| l.offset);
        let span = |l: &Loc| (l.offset - PAGE_HEAD, l.offset + u64::from(l.len) + PAGE_TAIL);
        let (mut buf, mut head) = (Vec::new(), Vec::with_capacity(PAGE_HEAD as usize));
        let mut rest = &pages[..];
        while let Some((first, _)) = rest.split_first() {
            let (start, mut end) = span(&first.1);
            let mut n = 1;
            for (_, l) in &rest[1..] {
                let (s, e) = span(l);
                if s != end || e - start > COPY_CHUNK as u64 {
                    break;
                }
                end = e;
                n += 1;
            }
            buf.resize((end - start) as usize, 0);
            file.read_exact_at(&mut buf, start).map_err(io(path))?;
            let (run, after) = rest.split_at(n);
            rest = after;
            let intact = run.iter().all(|(hash, loc)| {
                let (s, e) = span(loc);
                let record = &buf[(s - start) as usize..(e - start) as usize];
                head.clear();
                encode_head(&mut head, KIND_PAGE, &hash.0, loc.len as usize);
                record.starts_with(&head)
                    && record.ends_with(&checksum(
                        Version::V2,
                        KIND_PAGE,
                        &hash.0,
                        &record[head.len()..][..loc.len as usize],
                    ))
            });
            if !intact {
                tracing::warn!(pages = n, "page records changed since the page log was read; written anew");
                for (hash, loc) in run {
                    self.copy_page(file, *hash, *loc, path)?;
                }
                continue;
            }
            self.out.write_all(&buf).map_err(io(path))?;
            for (hash, loc) in run {
                self.pages.insert(*hash, Loc { offset: self.len + (loc.offset - start), ..*loc });
            }
            self.len += end - start;
        }
        Ok(())
    }

    /// Where a record that sat at `loc` in the old file, past the snapshot, is now.
    fn moved(&self, loc: Loc) -> Option<Loc> {
        let i = self.segments.partition_point(|s| s.old + s.len <= loc.offset);
        let s = self.segments.get(i).filter(|s| s.old <= loc.offset)?;
        Some(Loc { offset: loc.offset - s.old + s.new, ..loc })
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

/// A rewrite into a new file at `tmp`, its magic written, of a file snapshotted at `from`.
fn rewrite_file(tmp: &Path, from: u64) -> Result<Rewrite<BufWriter<File>>, PageLogError> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(tmp).map_err(io(tmp))?);
    out.write_all(MAGIC).map_err(io(tmp))?;
    Ok(Rewrite::new(out, MAGIC.len() as u64, from))
}

/// Writes out what is buffered and makes the file durable.
fn finish_file(rewrite: Rewrite<BufWriter<File>>, tmp: &Path) -> Result<(File, Rewrite<()>), PageLogError> {
    let Rewrite { out, len, pages, manifests, segments, copied_to, record } = rewrite;
    let f = out.into_inner().map_err(|e| io(tmp)(e.into_error()))?;
    f.sync_all().map_err(io(tmp))?;
    Ok((f, Rewrite { out: (), len, pages, manifests, segments, copied_to, record }))
}

impl PageLog {
    /// Compacts the file if at least two thirds of it are garbage. Returns whether it did.
    pub fn compact_if_needed(&self) -> Result<bool, PageLogError> {
        self.compact_with(|| {})
    }

    /// [`compact_if_needed`](Self::compact_if_needed), running `meanwhile` between the copy of
    /// the live records and the catch-up rounds (tests write there, as other threads may).
    pub(super) fn compact_with(&self, meanwhile: impl FnOnce()) -> Result<bool, PageLogError> {
        let _one = self.compacting.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut snapshot) = self.snapshot() else { return Ok(false) };
        let tmp = self.path.with_extension("log.compact");
        let copied = rewrite_file(&tmp, snapshot.len).and_then(|mut rewrite| {
            // The live file is version 2 (a version-1 one is rewritten when it is opened).
            rewrite.copy_pages(&snapshot.file, std::mem::take(&mut snapshot.pages), &self.path)?;
            for (key, loc, refs) in &snapshot.manifests {
                rewrite.copy_manifest(&snapshot.file, key, *loc, refs, &self.path)?;
            }
            meanwhile();
            self.catch_up(&snapshot, &mut rewrite)?;
            finish_file(rewrite, &tmp)
        });
        let swapped = copied.and_then(|(f, rewrite)| self.swap(snapshot, rewrite, f));
        if swapped.is_err() {
            // Nothing of it is in use: the old file still is the log.
            let _ = fs::remove_file(&tmp);
        }
        swapped.map(|()| true)
    }

    /// Step 3: rounds that copy, without the lock, what was appended and what became live since
    /// the last look, until little is left.
    fn catch_up<W: Write>(&self, snapshot: &Snapshot, rewrite: &mut Rewrite<W>) -> Result<(), PageLogError> {
        for _ in 0..CATCH_UP_ROUNDS {
            let (len, revived) = {
                let inner = self.lock();
                (inner.len, self.revived(&inner, snapshot, rewrite))
            };
            let left = len - rewrite.copied_to + revived.iter().map(|(_, l)| u64::from(l.len)).sum::<u64>();
            if left < CATCH_UP_ENOUGH {
                break;
            }
            rewrite.copy_raw(&snapshot.file, len, &self.path)?;
            for (hash, loc) in revived {
                rewrite.copy_page(&snapshot.file, hash, loc, &self.path)?;
            }
        }
        Ok(())
    }

    /// Pages below the snapshot that were garbage then and not copied, but that a manifest
    /// written since or a pin refers to now (a write skips pages the log has).
    fn revived<W>(&self, inner: &Inner, snapshot: &Snapshot, rewrite: &Rewrite<W>) -> Vec<(Hash, Loc)> {
        let newer = inner.manifests.values().filter(|m| m.loc.offset >= snapshot.len).flat_map(|m| m.refs.iter());
        let pinned: Vec<Hash> = self.pinned().keys().copied().collect();
        let mut seen = HashSet::new();
        newer
            .chain(pinned.iter())
            .filter(|h| !rewrite.pages.contains_key(*h) && seen.insert(**h))
            .filter_map(|h| inner.pages.get(h).filter(|l| l.offset < snapshot.len).map(|l| (*h, *l)))
            .collect()
    }

    /// Pages a manifest refers to or a pin holds.
    fn live(&self, inner: &Inner) -> HashSet<Hash> {
        inner.manifests.values().flat_map(|m| m.refs.iter().copied()).chain(self.pinned().keys().copied()).collect()
    }

    /// Step 1: whether to compact, and what.
    fn snapshot(&self) -> Option<Snapshot> {
        let inner = self.lock();
        if inner.len < self.compact_min.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let live = self.live(&inner);
        let pages: Vec<(Hash, Loc)> = live.iter().filter_map(|h| inner.pages.get(h).map(|l| (*h, *l))).collect();
        let live_bytes: u64 = pages.iter().map(|(_, l)| u64::from(l.len) + RECORD_OVERHEAD).sum();
        if live_bytes * FILE_PER_LIVE_BYTE > inner.len {
            return None;
        }
        let manifests = inner.manifests.iter().map(|(k, m)| (k.clone(), m.loc, m.refs.clone())).collect();
        Some(Snapshot { file: inner.file.clone(), len: inner.len, pages, manifests })
    }

    /// Step 4: the rest of the tail, pages revived meanwhile, and the swap, under the lock.
    fn swap(&self, snapshot: Snapshot, rewrite: Rewrite<()>, mut f: File) -> Result<(), PageLogError> {
        let mut inner = self.lock();
        let held = Instant::now();
        let tmp = self.path.with_extension("log.compact");
        let revived = self.revived(&inner, &snapshot, &rewrite);
        let Rewrite { len, pages: copied, manifests: mut copied_manifests, segments, copied_to, .. } = rewrite;
        let mut rest = Rewrite::new(Vec::new(), len, copied_to);
        rest.segments = segments;
        rest.copy_raw(&snapshot.file, inner.len, &self.path)?;
        for (hash, loc) in revived {
            rest.copy_page(&snapshot.file, hash, loc, &self.path)?;
        }
        let mut pages = HashMap::with_capacity(inner.pages.len());
        for (hash, loc) in &inner.pages {
            let now = if loc.offset >= snapshot.len {
                rest.moved(*loc)
            } else {
                copied.get(hash).or_else(|| rest.pages.get(hash)).copied()
            };
            // Else garbage at the snapshot and still: dropped.
            if let Some(l) = now {
                pages.insert(*hash, l);
            }
        }
        let mut manifests = HashMap::with_capacity(inner.manifests.len());
        for (key, m) in &inner.manifests {
            let loc = if m.loc.offset >= snapshot.len {
                rest.moved(m.loc)
            } else {
                copied_manifests.remove(key).map(|c| c.loc)
            };
            let Some(loc) = loc else {
                // Every manifest below the snapshot was copied: this cannot happen, but a
                // compaction that would lose a manifest must not swap.
                return Err(io(&self.path)(std::io::Error::other(format!("compaction lost manifest {key}"))));
            };
            manifests.insert(key.clone(), ManifestLoc { loc, refs: m.refs.clone() });
        }
        f.write_all(&rest.out).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        let locked_bytes = rest.out.len() as u64;
        // The handle writes go to from now on, opened before the rename (it follows the file):
        // once the rename is done, nothing may fail before the index points at the new file.
        let file = OpenOptions::new().read(true).append(true).open(&tmp).map_err(io(&tmp))?;
        fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        if let Err(e) = sync_dir(&self.path) {
            // The rename may not be durable yet: a crash now leaves the old file, which is whole.
            tracing::warn!(error = %e, "syncing the page log's directory after a compaction");
        }
        let len = rest.len;
        tracing::info!(before = inner.len, after = len, held = ?held.elapsed(), locked_bytes, "compacted the page log");
        inner.file = Arc::new(file);
        inner.len = len;
        inner.pages = pages;
        inner.manifests = manifests;
        inner.compactions += 1;
        inner.compaction_lock_micros_max = inner.compaction_lock_micros_max.max(held.elapsed().as_micros() as u64);
        inner.compaction_locked_bytes_max = inner.compaction_locked_bytes_max.max(locked_bytes);
        Ok(())
    }
}

/// Rewrites a version-1 log at `path` as version 2 (every record it holds, checked as it is
/// read), then renames it into place.
pub(super) fn migrate_v1(path: &Path) -> Result<(), PageLogError> {
    let index = record::scan(path, Version::V1)?;
    let old = File::open(path).map_err(io(path))?;
    let tmp = path.with_extension("log.v2");
    let mut rewrite = rewrite_file(&tmp, 0)?;
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
