//! The base image of a stateful instance: its memory and globals as of the last successful
//! invocation, plus which pages changed since the last checkpoint and, while a live migration is
//! under way, since its last round.
//!
//! The two dirty sets are separate on purpose: a migration round consumes only its own, so an
//! aborted migration leaves every page the next checkpoint must write still marked for it, and a
//! retry starts again from the pages changed since the last checkpoint.

use hubmesh_storage::{Hash, PageLog};

use super::instance::Instance;
use super::InvokeError;
use crate::checkpoint::{GlobalValue, Manifest, PAGE};

/// A stateful instance's memory as of its last successful call (the base a trap rolls back to),
/// with the pages changed since the last checkpoint.
pub(crate) struct MemoryImage {
    base: Vec<u8>,
    /// Pages changed since the last checkpoint.
    ckpt_dirty: Vec<bool>,
    /// Hash of each page as of the last checkpoint (`None`: all zero).
    hashes: Vec<Option<Hash>>,
    globals: Vec<GlobalValue>,
    /// Something (pages, size or globals) changed since the last checkpoint.
    changed: bool,
    /// Pages changed since the last migration round, while a migration is under way.
    mig_dirty: Option<Vec<bool>>,
    scratch: Vec<u32>,
}

/// Pages a migration round copied out of the image.
pub(crate) struct MigrationDelta {
    /// `(page index, its bytes)`, in index order.
    pub(crate) pages: Vec<(u32, Vec<u8>)>,
    /// The memory's size in pages.
    pub(crate) memory_pages: u32,
    /// Pages still marked after this round.
    pub(crate) remaining: usize,
}

/// Identity of a checkpoint, filled in by the caller.
pub(crate) struct CheckpointHeader {
    pub(crate) task: String,
    pub(crate) task_version: u64,
    pub(crate) epoch: u64,
    pub(crate) sequence: u64,
    pub(crate) module_hash: Hash,
    pub(crate) invocations: u64,
    pub(crate) created_unix_ms: u64,
}

impl CheckpointHeader {
    /// The manifest of a checkpoint with this header: `hashes` by page index (`None`: a zero
    /// page), the globals named, the answers and the calls waiting.
    pub(crate) fn manifest(
        self,
        hashes: &[Option<Hash>],
        globals: Vec<(String, GlobalValue)>,
        answers: Vec<(String, super::Answer)>,
        pending: Vec<(Option<String>, Vec<u8>)>,
    ) -> Manifest {
        Manifest {
            task: self.task,
            task_version: self.task_version,
            epoch: self.epoch,
            sequence: self.sequence,
            module_hash: self.module_hash,
            memory_pages: hashes.len() as u32,
            pages: hashes.iter().enumerate().filter_map(|(i, h)| h.map(|h| (i as u32, h))).collect(),
            globals,
            answers,
            invocations: self.invocations,
            created_unix_ms: self.created_unix_ms,
            pending,
        }
    }

    /// The header of a task's next checkpoint.
    pub(crate) fn of(cfg: &super::TaskConfig, sequence: u64, invocations: u64, now_ms: u64) -> Self {
        Self {
            task: cfg.name.clone(),
            task_version: cfg.version,
            epoch: cfg.epoch,
            sequence,
            module_hash: cfg.module_hash,
            invocations,
            created_unix_ms: now_ms,
        }
    }
}

fn is_zero(page: &[u8]) -> bool {
    let words = page.chunks_exact(8);
    let tail = words.remainder();
    words.map(|c| u64::from_ne_bytes(c.try_into().expect("chunks_exact(8) yields 8 bytes"))).all(|w| w == 0)
        && tail.iter().all(|b| *b == 0)
}

impl MemoryImage {
    /// Captures a fresh instance whole: every page counts as changed.
    pub(crate) fn capture(inst: &mut Instance) -> Self {
        let base = inst.memory.data(&inst.store).to_vec();
        let pages = base.len() / PAGE;
        inst.dirty.data_mut(&mut inst.store).fill(0);
        let globals = inst.read_globals().iter().filter_map(GlobalValue::from_val).collect();
        Self {
            base,
            ckpt_dirty: vec![true; pages],
            hashes: vec![None; pages],
            globals,
            changed: true,
            mig_dirty: None,
            scratch: Vec::new(),
        }
    }

    /// Rebuilds the image from a manifest, verifying every page (a page that fails its hash is
    /// forgotten by the page log, so that the caller's next attempt fetches it again). A manifest whose memory exceeds
    /// the task's limit (`max_bytes`) is refused before anything is allocated.
    pub(crate) fn restore(manifest: &Manifest, pages: &PageLog, max_bytes: u64) -> Result<Self, String> {
        let bytes = u64::from(manifest.memory_pages) * PAGE as u64;
        if bytes > max_bytes {
            return Err(format!(
                "the checkpoint's memory ({} pages, {bytes} bytes) exceeds the task's limit of {max_bytes} bytes",
                manifest.memory_pages
            ));
        }
        let n = manifest.memory_pages as usize;
        let mut base = vec![0u8; n * PAGE];
        let mut hashes = vec![None; n];
        for (index, hash) in &manifest.pages {
            let bytes = pages.read_page(hash).map_err(|e| {
                if let hubmesh_storage::PageLogError::Corrupt(h) = &e {
                    // The next attempt fetches it again from a hub that stores it.
                    tracing::error!(page = %h, "a checkpoint page is corrupt here; forgetting it");
                    pages.forget_page(h);
                }
                e.to_string()
            })?;
            if bytes.len() != PAGE {
                return Err(format!("page {hash} has {} bytes", bytes.len()));
            }
            let i = *index as usize;
            base[i * PAGE..(i + 1) * PAGE].copy_from_slice(&bytes);
            hashes[i] = Some(*hash);
        }
        Ok(Self {
            base,
            ckpt_dirty: vec![false; n],
            hashes,
            globals: manifest.globals.iter().map(|(_, v)| *v).collect(),
            changed: false,
            mig_dirty: None,
            scratch: Vec::new(),
        })
    }

    /// Staging (a live migration's target): grows the image and `inst` to `pages` pages. Wasm
    /// memory cannot shrink: a smaller size is refused.
    pub(crate) fn stage_size(&mut self, inst: &mut Instance, pages: usize) -> Result<(), String> {
        let have = inst.memory_len() / PAGE;
        if pages < have || pages < self.hashes.len() {
            return Err(format!("the memory shrank to {pages} pages"));
        }
        if pages > have {
            inst.memory.grow(&mut inst.store, (pages - have) as u64).map_err(|e| format!("growing memory: {e}"))?;
        }
        self.base.resize(pages * PAGE, 0);
        self.hashes.resize(pages, None);
        self.ckpt_dirty.resize(pages, false);
        Ok(())
    }

    /// Staging: page `index` of the image and of `inst` becomes `bytes` (`None`: zero), whose
    /// hash is `hash` (the caller verified it).
    pub(crate) fn stage_page(&mut self, inst: &mut Instance, index: usize, hash: Option<Hash>, bytes: Option<&[u8]>) {
        let range = index * PAGE..(index + 1) * PAGE;
        match bytes {
            Some(b) => {
                self.base[range.clone()].copy_from_slice(b);
                inst.memory.data_mut(&mut inst.store)[range].copy_from_slice(b);
            }
            None => {
                self.base[range.clone()].fill(0);
                inst.memory.data_mut(&mut inst.store)[range].fill(0);
            }
        }
        self.hashes[index] = hash;
    }

    /// Staging: the hash of each page as the image holds it (`None`: zero).
    pub(crate) fn staged_hashes(&self) -> &[Option<Hash>] {
        &self.hashes
    }

    /// Staging done: the image is the checkpoint `manifest` (the caller checked its pages): its
    /// globals are set on `inst`, nothing counts as changed since it.
    pub(crate) fn finish_staging(&mut self, inst: &mut Instance, manifest: &Manifest) -> Result<(), InvokeError> {
        self.globals = manifest.globals.iter().map(|(_, v)| *v).collect();
        self.set_globals(inst)?;
        self.ckpt_dirty.iter_mut().for_each(|d| *d = false);
        self.changed = false;
        self.mig_dirty = None;
        Ok(())
    }

    /// Copies into the image the pages the instance changed since the last sync (as marked in
    /// its dirty map) and its globals. Returns how many pages were copied.
    pub(crate) fn sync(&mut self, inst: &mut Instance) -> usize {
        let len = inst.memory_len();
        let pages = len / PAGE;
        if pages > self.hashes.len() {
            self.base.resize(pages * PAGE, 0);
            self.ckpt_dirty.resize(pages, false);
            self.hashes.resize(pages, None);
            if let Some(m) = &mut self.mig_dirty {
                // The target learns the new size with the next round; new pages are zero there.
                m.resize(pages, false);
            }
            self.changed = true;
        }
        self.scratch.clear();
        {
            let map = inst.dirty.data_mut(&mut inst.store);
            let n = pages.min(map.len());
            let map = &mut map[..n];
            for (w, chunk) in map.chunks_mut(8).enumerate() {
                if chunk.iter().all(|b| *b == 0) {
                    continue;
                }
                for (j, b) in chunk.iter_mut().enumerate() {
                    if *b != 0 {
                        *b = 0;
                        self.scratch.push((w * 8 + j) as u32);
                    }
                }
            }
        }
        let mem = inst.memory.data(&inst.store);
        for &p in &self.scratch {
            let r = p as usize * PAGE..(p as usize + 1) * PAGE;
            self.base[r.clone()].copy_from_slice(&mem[r]);
            self.ckpt_dirty[p as usize] = true;
            if let Some(m) = &mut self.mig_dirty {
                m[p as usize] = true;
            }
        }
        let globals: Vec<GlobalValue> = inst.read_globals().iter().filter_map(GlobalValue::from_val).collect();
        if globals != self.globals {
            self.globals = globals;
            self.changed = true;
        }
        if !self.scratch.is_empty() {
            self.changed = true;
        }
        self.scratch.len()
    }

    /// Overwrites a freshly instantiated instance with the image.
    pub(crate) fn apply_to(&self, inst: &mut Instance) -> Result<(), InvokeError> {
        let have = inst.memory_len() / PAGE;
        let want = self.hashes.len();
        if want < have {
            return Err(InvokeError::Unavailable(format!(
                "saved memory ({want} pages) is smaller than the module's minimum ({have})"
            )));
        }
        if want > have {
            inst.memory
                .grow(&mut inst.store, (want - have) as u64)
                .map_err(|e| InvokeError::Unavailable(format!("growing memory to the saved size: {e}")))?;
        }
        inst.memory.data_mut(&mut inst.store)[..self.base.len()].copy_from_slice(&self.base);
        self.set_globals(inst)
    }

    /// Sets the image's globals on `inst` and clears its dirty map (nothing changed since).
    fn set_globals(&self, inst: &mut Instance) -> Result<(), InvokeError> {
        if self.globals.len() != inst.globals.len() {
            return Err(InvokeError::Unavailable("saved globals do not match the module".into()));
        }
        for (value, (name, g)) in self.globals.iter().zip(inst.globals.clone()) {
            g.set(&mut inst.store, value.to_val())
                .map_err(|e| InvokeError::Unavailable(format!("restoring global {name}: {e}")))?;
        }
        inst.dirty.data_mut(&mut inst.store).fill(0);
        Ok(())
    }

    /// Makes the next checkpoint consider every page again (after a failed write).
    pub(crate) fn mark_all_changed(&mut self) {
        self.ckpt_dirty.iter_mut().for_each(|d| *d = true);
        self.hashes.iter_mut().for_each(|h| *h = None);
        self.changed = true;
    }

    /// The bytes of a page of the last checkpoint whose hash is `h`, if any.
    pub(crate) fn page_with_hash(&self, h: &Hash) -> Option<Vec<u8>> {
        let i = self.hashes.iter().position(|x| x.as_ref() == Some(h))?;
        Some(self.base[i * PAGE..(i + 1) * PAGE].to_vec())
    }

    /// Whether anything changed since the last checkpoint.
    pub(crate) fn changed(&self) -> bool {
        self.changed
    }

    /// Starts tracking pages for a migration. With `since_checkpoint`, the first round carries
    /// only the pages changed since the last checkpoint (the target starts from that checkpoint);
    /// otherwise every page. Starting again restarts the tracking.
    pub(crate) fn begin_migration(&mut self, since_checkpoint: bool) {
        self.mig_dirty = Some(if since_checkpoint { self.ckpt_dirty.clone() } else { vec![true; self.hashes.len()] });
    }

    /// Whether a migration is being tracked.
    pub(crate) fn migrating(&self) -> bool {
        self.mig_dirty.is_some()
    }

    /// Copies out at most `max_pages` of the pages marked for the migration, lowest index first,
    /// and unmarks them. The checkpoint's own marks are untouched. With no migration under way,
    /// an empty delta.
    pub(crate) fn take_migration_delta(&mut self, max_pages: usize) -> MigrationDelta {
        let memory_pages = self.hashes.len() as u32;
        let Some(marks) = &mut self.mig_dirty else {
            return MigrationDelta { pages: Vec::new(), memory_pages, remaining: 0 };
        };
        let mut pages = Vec::new();
        for (i, d) in marks.iter_mut().enumerate() {
            if pages.len() == max_pages {
                break;
            }
            if *d {
                *d = false;
                pages.push((i as u32, self.base[i * PAGE..(i + 1) * PAGE].to_vec()));
            }
        }
        let remaining = marks.iter().filter(|d| **d).count();
        MigrationDelta { pages, memory_pages, remaining }
    }

    /// Stops tracking pages for a migration.
    pub(crate) fn end_migration(&mut self) {
        self.mig_dirty = None;
    }

    /// The globals as of the last sync, named as the module names them.
    pub(crate) fn globals(&self, names: &[String]) -> Vec<(String, GlobalValue)> {
        names.iter().cloned().zip(self.globals.iter().copied()).collect()
    }

    /// Builds the next checkpoint: the manifest and the changed non-zero pages that `known` does
    /// not already hold. Afterwards nothing counts as changed.
    pub(crate) fn checkpoint(
        &mut self,
        header: CheckpointHeader,
        global_names: &[String],
        answers: Vec<(String, super::Answer)>,
        known: impl Fn(&Hash) -> bool,
    ) -> (Manifest, Vec<(Hash, Vec<u8>)>) {
        let mut new_pages = Vec::new();
        for (i, dirty) in self.ckpt_dirty.iter_mut().enumerate() {
            if !*dirty {
                continue;
            }
            *dirty = false;
            let page = &self.base[i * PAGE..(i + 1) * PAGE];
            if is_zero(page) {
                self.hashes[i] = None;
                continue;
            }
            let h = Hash::of(page);
            if self.hashes[i] != Some(h) && !known(&h) {
                new_pages.push((h, page.to_vec()));
            }
            self.hashes[i] = Some(h);
        }
        self.changed = false;
        let manifest = header.manifest(&self.hashes, self.globals(global_names), answers, Vec::new());
        (manifest, new_pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_larger_than_the_task_limit_is_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let pages = PageLog::open(dir.path()).unwrap();
        let manifest = Manifest {
            task: "t".into(),
            task_version: 1,
            epoch: 1,
            sequence: 1,
            module_hash: Hash::of(b"m"),
            // 256 TiB: allocating it would abort the process.
            memory_pages: u32::MAX,
            pages: Vec::new(),
            globals: Vec::new(),
            answers: Vec::new(),
            invocations: 0,
            created_unix_ms: 0,
            pending: Vec::new(),
        };
        let err = MemoryImage::restore(&manifest, &pages, 16 << 20).err().expect("refused");
        assert!(err.contains("exceeds the task's limit"), "{err}");
        let small = Manifest { memory_pages: 2, ..manifest };
        let image = MemoryImage::restore(&small, &pages, 16 << 20).expect("within the limit");
        assert_eq!(image.base.len(), 2 * PAGE);
    }
}
