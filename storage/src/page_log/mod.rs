//! Checkpoint pages and manifests in one append-only file, `pages.log` (format in `record`).
//!
//! A batch of records is appended (a vectored write, from the callers' page buffers: `batch`)
//! and then made durable with **one** `fdatasync`, which is what a durable invocation pays. On open the file is scanned to rebuild the in-memory index; a torn
//! tail (a crash mid-append) is cut off at the last whole record. Each page read re-hashes the
//! bytes, so a flipped bit is reported as [`PageLogError::Corrupt`], never returned. When two thirds
//! of the file are garbage (pages no manifest refers to), a background thread rewrites it with only
//! the live records (`compact`), holding the index's lock only to copy what was appended
//! meanwhile and to swap the files: writers never wait for a whole rewrite.
//!
//! ```text
//!  write(batch) --lock--> append records --> fdatasync --> index --> past 64 MiB: wake compactor
//!  compactor: snapshot live set (lock) --> copy live records to pages.log.compact (no lock)
//!             --> catch-up rounds: copy what was appended meanwhile (no lock) until little is left
//!             --> lock: copy that little, fsync, rename, swap
//! ```
//!
//! The manifest format is opaque here; the caller passes the page hashes a manifest refers to,
//! which is all garbage collection needs.

mod batch;
mod compact;
mod record;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use batch::Batch;
use record::{encode, encode_refs, Version, KIND_MANIFEST, KIND_TOMBSTONE, MAGIC};

use crate::Hash;

/// Compaction is considered only past this size.
const COMPACT_MIN_BYTES: u64 = 64 << 20;

/// Errors of [`PageLog`].
#[derive(Debug, thiserror::Error)]
pub enum PageLogError {
    /// The page is not stored on this hub.
    #[error("page {0} is not stored on this hub")]
    MissingPage(Hash),
    /// The page's bytes do not match its hash (disk corruption); fetch it from another holder.
    #[error("page {0} is corrupted on disk")]
    Corrupt(Hash),
    /// The file is not a page log this hubmesh knows.
    #[error("{path} is not a hubmesh page log (unknown format); move it away to start without local checkpoints")]
    Format { path: PathBuf },
    /// The disk failed.
    #[error("page log I/O at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One checkpoint to write: its new pages and its manifest.
#[derive(Debug, Default)]
pub struct PageWrite {
    /// Pages as `(hash, bytes)`; pages already stored are skipped. The hash must be the bytes'
    /// blake3 (the caller computed or verified it): the log does not hash pages again on write.
    pub pages: Vec<(Hash, Vec<u8>)>,
    /// The key the manifest is stored under; empty: this write carries pages only.
    pub key: String,
    /// The encoded manifest.
    pub manifest: Vec<u8>,
    /// Every page the manifest refers to (kept alive by garbage collection).
    pub refs: Vec<Hash>,
    /// Manifests to forget in the same write (their pages become garbage).
    pub remove: Vec<String>,
}

/// Sizes, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageLogStats {
    pub file_bytes: u64,
    pub pages: u64,
    pub manifests: u64,
    pub compactions: u64,
    /// The longest time a compaction held the index's lock, in microseconds.
    pub compaction_lock_micros_max: u64,
    /// The most bytes a compaction copied while holding the index's lock.
    pub compaction_locked_bytes_max: u64,
}

#[derive(Clone, Copy, Debug)]
struct Loc {
    offset: u64,
    len: u32,
}

#[derive(Clone)]
struct ManifestLoc {
    loc: Loc,
    refs: Vec<Hash>,
}

struct Inner {
    file: Arc<File>,
    len: u64,
    pages: HashMap<Hash, Loc>,
    manifests: HashMap<String, ManifestLoc>,
    compactions: u64,
    compaction_lock_micros_max: u64,
    compaction_locked_bytes_max: u64,
}

/// Keeps pages alive through compactions until it is dropped: a checkpoint push stores its pages
/// before the manifest that refers to them, and a compaction in between must not drop them.
pub struct PagePin {
    log: Arc<PageLog>,
    hashes: Vec<Hash>,
}

impl PagePin {
    /// Pins `hashes` too (call before writing them).
    pub fn add(&mut self, hashes: impl IntoIterator<Item = Hash>) {
        let mut pinned = self.log.pinned();
        for h in hashes {
            *pinned.entry(h).or_insert(0) += 1;
            self.hashes.push(h);
        }
    }
}

impl Drop for PagePin {
    fn drop(&mut self) {
        let mut pinned = self.log.pinned();
        for h in &self.hashes {
            if let Some(n) = pinned.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    pinned.remove(h);
                }
            }
        }
    }
}

/// The page log of one hub. Safe to share between threads.
pub struct PageLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// Pages kept through compactions although no manifest refers to them yet, with how many
    /// [`PagePin`]s hold each. A lock of its own: pins are taken on async threads and must not
    /// wait for a write's fdatasync (lock order: `inner`, then `pinned`).
    pinned: Mutex<HashMap<Hash, u32>>,
    /// Wakes the compactor thread; dropping it ends the thread.
    wake_compactor: SyncSender<()>,
    /// One compaction at a time (the background thread's, or a caller's).
    compacting: Mutex<()>,
    /// Whether writes wake the compactor (tests turn it off to compact at a chosen moment).
    auto_compact: AtomicBool,
    /// Compaction is considered only past this size ([`COMPACT_MIN_BYTES`] unless set).
    compact_min: AtomicU64,
    /// Wakes the syncer thread ([`PageLog::sync_behind`]); dropping it ends the thread.
    wake_syncer: SyncSender<()>,
    /// Held through every fdatasync, and the first one that failed (see [`PageLog::fdatasync`]).
    sync_failed: Mutex<Option<(std::io::ErrorKind, String)>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PageLogError + '_ {
    move |source| PageLogError::Io { path: path.to_owned(), source }
}

/// Syncs the directory that holds `path`, so a rename in it is durable.
fn sync_dir(path: &Path) -> Result<(), PageLogError> {
    match path.parent() {
        Some(dir) => File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir)),
        None => Ok(()),
    }
}

impl PageLog {
    /// Opens (creating if needed) `dir/pages.log`, rewriting a version-1 log as version 2, and
    /// rebuilds the index. Starts the compactor thread.
    pub fn open(dir: &Path) -> Result<Arc<Self>, PageLogError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("pages.log");
        // Left by a compaction or a migration that a crash interrupted: never in use.
        for stale in ["log.compact", "log.v2"] {
            let _ = fs::remove_file(path.with_extension(stale));
        }
        OpenOptions::new().append(true).create(true).open(&path).map_err(io(&path))?;
        if record::version_of(&path)? == Version::V1 {
            compact::migrate_v1(&path)?;
        }
        let file = OpenOptions::new().read(true).append(true).open(&path).map_err(io(&path))?;
        if file.metadata().map_err(io(&path))?.len() < MAGIC.len() as u64 {
            // New, or cut inside its magic by a crash: nothing else can be in it.
            file.set_len(0).map_err(io(&path))?;
            (&file).write_all(MAGIC).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        let index = record::scan(&path, Version::V2)?;
        let actual = file.metadata().map_err(io(&path))?.len();
        if index.good < actual {
            tracing::warn!(path = %path.display(), good = index.good, actual, "cutting a torn tail off the page log");
            file.set_len(index.good).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        let inner = Inner {
            file: Arc::new(file),
            len: index.good,
            pages: index.pages,
            manifests: index.manifests,
            compactions: 0,
            compaction_lock_micros_max: 0,
            compaction_locked_bytes_max: 0,
        };
        let (wake_compactor, wakes) = std::sync::mpsc::sync_channel(1);
        let (wake_syncer, sync_wakes) = std::sync::mpsc::sync_channel(1);
        let log = Arc::new(Self {
            path,
            inner: Mutex::new(inner),
            pinned: Mutex::new(HashMap::new()),
            wake_compactor,
            compacting: Mutex::new(()),
            auto_compact: AtomicBool::new(true),
            compact_min: AtomicU64::new(COMPACT_MIN_BYTES),
            wake_syncer,
            sync_failed: Mutex::new(None),
        });
        let weak = Arc::downgrade(&log);
        std::thread::Builder::new()
            .name("page-log-compactor".into())
            .spawn(move || compactor(weak, wakes))
            .map_err(io(&log.path))?;
        let weak = Arc::downgrade(&log);
        std::thread::Builder::new()
            .name("page-log-syncer".into())
            .spawn(move || syncer(weak, sync_wakes))
            .map_err(io(&log.path))?;
        Ok(log)
    }

    /// Considers compaction past `bytes` of file instead of 64 MiB (tests of other crates make
    /// the compactor run on small logs with it).
    pub fn set_compact_min_bytes(&self, bytes: u64) {
        self.compact_min.store(bytes, Ordering::Relaxed);
    }

    /// Stops writes from waking the compactor.
    #[cfg(test)]
    fn pause_compactor(&self) {
        self.auto_compact.store(false, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the index consistent with what was appended
        // (the index is updated only after a successful write), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pinned(&self) -> MutexGuard<'_, HashMap<Hash, u32>> {
        self.pinned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pin that keeps pages through compactions until it drops (see [`PagePin`]).
    pub fn pin(self: &Arc<Self>) -> PagePin {
        PagePin { log: self.clone(), hashes: Vec::new() }
    }

    /// Whether a page with this hash is stored.
    pub fn has_page(&self, hash: &Hash) -> bool {
        self.lock().pages.contains_key(hash)
    }

    /// Makes everything appended so far durable with one fdatasync, without holding the log's
    /// lock meanwhile (other writers and readers go on).
    pub fn sync(&self) -> Result<(), PageLogError> {
        let file = self.lock().file.clone();
        self.fdatasync(&file)
    }

    /// Starts an fdatasync of everything appended so far on a background thread and returns at
    /// once (one already due covers it). For pages written with `sync` unset that a later
    /// synced write will need durable: a live migration's rounds, whose pages are then mostly on
    /// disk when the critical phase's write syncs, without any round waiting for a disk flush.
    /// A failure fails every later sync (see [`Self::fdatasync`]).
    pub fn sync_behind(&self) {
        // Full: a wake-up is pending, and the sync it starts comes after this call's appends.
        let _ = self.wake_syncer.try_send(());
    }

    /// fdatasyncs `file` (the log's). The first failure is sticky: every later sync fails too,
    /// until the hub restarts and rescans the file. After a failed fdatasync the kernel may have
    /// dropped pages appended earlier by any writer (still in the index) and reports the error
    /// only once, so a later sync that "succeeds" would vouch for pages that are gone. The lock
    /// is held through the fdatasync: a failure is recorded before any other sync can start.
    fn fdatasync(&self, file: &File) -> Result<(), PageLogError> {
        let mut failed = self.sync_failed.lock().unwrap_or_else(|p| p.into_inner());
        let failure = |(kind, message): &(std::io::ErrorKind, String)| PageLogError::Io {
            path: self.path.clone(),
            source: std::io::Error::new(*kind, format!("an earlier fdatasync failed ({message}); restart the hub")),
        };
        if let Some(f) = failed.as_ref() {
            return Err(failure(f));
        }
        file.sync_data().map_err(|e| {
            tracing::error!(path = %self.path.display(), error = %e, "fdatasync of the page log failed; it takes no more durable writes");
            let f = (e.kind(), e.to_string());
            let err = failure(&f);
            *failed = Some(f);
            err
        })
    }

    /// Appends the checkpoints in `writes`, skipping pages already stored, and makes them durable
    /// with one fdatasync when `sync` is set. Returns the bytes appended.
    pub fn write(&self, writes: &[PageWrite], sync: bool) -> Result<u64, PageLogError> {
        let mut inner = self.lock();
        // A manifest stored without one of its pages would restore nothing: a page the caller
        // found here a moment ago may have been compacted away since (it was garbage then).
        let batch: HashSet<Hash> = writes.iter().flat_map(|w| w.pages.iter().map(|(h, _)| *h)).collect();
        for w in writes.iter().filter(|w| !w.key.is_empty()) {
            if let Some(h) = w.refs.iter().find(|h| !inner.pages.contains_key(*h) && !batch.contains(*h)) {
                return Err(PageLogError::MissingPage(*h));
            }
        }
        // Pages are written from the callers' buffers (a vectored write), not copied first.
        let mut buf = Batch::new();
        let mut new_pages: Vec<(Hash, Loc)> = Vec::new();
        let mut seen = HashSet::new();
        let mut new_manifests: Vec<(String, ManifestLoc)> = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        for w in writes {
            for key in &w.remove {
                if inner.manifests.contains_key(key) && *key != w.key {
                    buf.record(KIND_TOMBSTONE, key.as_bytes(), &[]);
                    removed.push(key.clone());
                }
            }
            for (hash, bytes) in &w.pages {
                if inner.pages.contains_key(hash) || !seen.insert(*hash) {
                    continue;
                }
                let loc = buf.page(hash, bytes);
                new_pages.push((*hash, loc));
            }
            if w.key.is_empty() {
                continue;
            }
            let refs = encode_refs(&w.refs);
            let loc = buf.record(KIND_MANIFEST, w.key.as_bytes(), &[&refs, &w.manifest]);
            let loc = Loc { offset: loc.offset + refs.len() as u64, len: w.manifest.len() as u32 };
            new_manifests.push((w.key.clone(), ManifestLoc { loc, refs: w.refs.clone() }));
        }
        let base = inner.len;
        let file = inner.file.clone();
        if let Err(e) = buf.write_to(&file) {
            // Cut off whatever part was written, so the index and the file agree again.
            let _ = file.set_len(base);
            return Err(io(&self.path)(e));
        }
        if sync {
            if let Err(e) = self.fdatasync(&file) {
                // Not durable, so not there: the index and the file must agree again.
                let _ = file.set_len(base);
                return Err(e);
            }
        }
        inner.len = base + buf.len();
        for (hash, loc) in new_pages {
            inner.pages.insert(hash, Loc { offset: base + loc.offset, ..loc });
        }
        for key in removed {
            inner.manifests.remove(&key);
        }
        for (key, m) in new_manifests {
            inner
                .manifests
                .insert(key, ManifestLoc { loc: Loc { offset: base + m.loc.offset, ..m.loc }, refs: m.refs });
        }
        let large = inner.len >= self.compact_min.load(Ordering::Relaxed);
        drop(inner);
        if large && self.auto_compact.load(Ordering::Relaxed) {
            // A full channel means a wake-up is pending already: nothing is lost by dropping this one.
            let _ = self.wake_compactor.try_send(());
        }
        Ok(buf.len())
    }

    /// Forgets the manifest of `key` (durably); its pages become garbage.
    pub fn remove(&self, key: &str) -> Result<(), PageLogError> {
        let mut inner = self.lock();
        if !inner.manifests.contains_key(key) {
            return Ok(());
        }
        let mut buf = Vec::new();
        encode(&mut buf, KIND_TOMBSTONE, key.as_bytes(), &[]);
        let base = inner.len;
        let file = inner.file.clone();
        let written = (&*file).write_all(&buf).map_err(io(&self.path)).and_then(|()| self.fdatasync(&file));
        if let Err(e) = written {
            let _ = file.set_len(base);
            return Err(e);
        }
        inner.len += buf.len() as u64;
        inner.manifests.remove(key);
        Ok(())
    }

    /// Reads and verifies one page.
    pub fn read_page(&self, hash: &Hash) -> Result<Vec<u8>, PageLogError> {
        let buf = self.read_page_unverified(hash)?;
        if Hash::of(&buf) != *hash {
            return Err(PageLogError::Corrupt(*hash));
        }
        Ok(buf)
    }

    /// Reads one page without hashing it: for copies to a receiver that verifies every page
    /// itself (a checkpoint push), so the bytes are hashed once on each side.
    pub fn read_page_unverified(&self, hash: &Hash) -> Result<Vec<u8>, PageLogError> {
        let (file, loc) = {
            let inner = self.lock();
            let loc = *inner.pages.get(hash).ok_or(PageLogError::MissingPage(*hash))?;
            (inner.file.clone(), loc)
        };
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset).map_err(io(&self.path))?;
        Ok(buf)
    }

    /// The latest manifest of `key`, if any.
    pub fn read_manifest(&self, key: &str) -> Result<Option<Vec<u8>>, PageLogError> {
        let (file, loc) = {
            let inner = self.lock();
            let Some(m) = inner.manifests.get(key) else { return Ok(None) };
            (inner.file.clone(), m.loc)
        };
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset).map_err(io(&self.path))?;
        Ok(Some(buf))
    }

    /// Forgets a page whose bytes turned out corrupt, so that a good copy can be written again.
    pub fn forget_page(&self, hash: &Hash) {
        self.lock().pages.remove(hash);
    }

    /// Whether a manifest is stored under `key`.
    pub fn has_manifest(&self, key: &str) -> bool {
        self.lock().manifests.contains_key(key)
    }

    /// Whether a manifest is stored under `key` and every page it names is still here (a page
    /// found rotten is forgotten, which leaves its manifests unable to restore).
    pub fn is_complete(&self, key: &str) -> bool {
        let inner = self.lock();
        inner.manifests.get(key).is_some_and(|m| m.refs.iter().all(|h| inner.pages.contains_key(h)))
    }

    /// Keys of every stored manifest.
    pub fn manifest_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.lock().manifests.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Current sizes.
    pub fn stats(&self) -> PageLogStats {
        let inner = self.lock();
        PageLogStats {
            file_bytes: inner.len,
            pages: inner.pages.len() as u64,
            manifests: inner.manifests.len() as u64,
            compactions: inner.compactions,
            compaction_lock_micros_max: inner.compaction_lock_micros_max,
            compaction_locked_bytes_max: inner.compaction_locked_bytes_max,
        }
    }
}

/// After a failed compaction (a full disk, say), how long the compactor waits before it tries
/// again: every write past the threshold wakes it, and each try copies the whole live set.
const COMPACT_BACKOFF: std::time::Duration = std::time::Duration::from_secs(60);

/// The background fdatasyncs of [`PageLog::sync_behind`]; ends when the log drops. A failure
/// is recorded (sticky) by `fdatasync` itself.
fn syncer(log: Weak<PageLog>, wakes: Receiver<()>) {
    while wakes.recv().is_ok() {
        let Some(log) = log.upgrade() else { return };
        let file = log.lock().file.clone();
        let _ = log.fdatasync(&file);
    }
}

/// The compactor thread: one compaction check per wake-up, until the log is dropped.
fn compactor(log: Weak<PageLog>, wakes: Receiver<()>) {
    let mut failed_at: Option<std::time::Instant> = None;
    while wakes.recv().is_ok() {
        if failed_at.is_some_and(|t| t.elapsed() < COMPACT_BACKOFF) {
            continue;
        }
        let Some(log) = log.upgrade() else { return };
        match log.compact_if_needed() {
            Ok(_) => failed_at = None,
            Err(e) => {
                tracing::warn!(error = %e, "compacting the page log failed; the log goes on uncompacted");
                failed_at = Some(std::time::Instant::now());
            }
        }
    }
}
