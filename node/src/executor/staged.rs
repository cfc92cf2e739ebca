//! A live migration's target builds the task's instance before the switch: from the base
//! checkpoint when the migration is prepared, then each round's pages as they arrive, the last
//! ones with the final manifest. When the switch makes this hub the host, the task starts from
//! it at once ([`Executor::start_staged`]) instead of reading its state back from the page log
//! and copying it into a new instance — the work that dominated the pause.
//!
//! Every page it holds was verified: the base's when read from the page log, the rounds' by the
//! target on arrival. The task starts from it only if its pages are exactly the manifest's.

use std::collections::HashMap;

use hubmesh_storage::{Hash, PageLog};

use super::image::MemoryImage;
use super::instance::{Instance, InstanceLimits};
use super::{Executor, StartTaskError, TaskConfig};
use crate::checkpoint::{Manifest, PAGE};

/// A stateful task's instance built ahead of its migration's switch.
pub struct StagedTask {
    module_hash: Hash,
    /// The limits its instance was built with (an update may change them before the switch).
    limits: InstanceLimits,
    memory_limit: u64,
    pub(super) inst: Instance,
    pub(super) image: MemoryImage,
    /// The checkpoint it was kept for — its key and manifest, decoded when the target stored
    /// it — so that the start at the switch does not read and decode it again.
    pub(super) manifest: Option<(String, Manifest)>,
}

impl Executor {
    /// Builds `cfg`'s instance from the base checkpoint `base` (its pages in the local page log)
    /// or, without one, with all-zero memory (the rounds then carry every page).
    pub fn stage(&self, cfg: &TaskConfig, wasm: &[u8], base: Option<&Manifest>) -> Result<StagedTask, StartTaskError> {
        let module = self.load(&cfg.module_hash, wasm)?;
        let mut inst = Instance::new(&module, cfg.name.as_str().into(), cfg.limits, false)?;
        let image = match base {
            Some(m) => {
                let image =
                    MemoryImage::restore(m, &self.pages, cfg.limits.memory_bytes).map_err(StartTaskError::Restore)?;
                image.apply_to(&mut inst).map_err(|e| StartTaskError::Restore(e.to_string()))?;
                image
            }
            None => {
                // Zero, not the module's data segments: the rounds send only non-zero pages.
                inst.memory.data_mut(&mut inst.store).fill(0);
                MemoryImage::capture(&mut inst)
            }
        };
        Ok(StagedTask {
            module_hash: cfg.module_hash,
            limits: cfg.limits,
            memory_limit: cfg.limits.memory_bytes,
            inst,
            image,
            manifest: None,
        })
    }
}

impl StagedTask {
    /// Applies a round: the memory is `memory_pages` pages, and page `index` holds the content
    /// with that hash (`None`: zero), found in `contents` (verified by the caller) or in the page
    /// log (verified on reading).
    pub fn apply(
        &mut self,
        log: &PageLog,
        memory_pages: u32,
        entries: &[(u32, Option<Hash>)],
        contents: &HashMap<Hash, &[u8]>,
    ) -> Result<(), String> {
        if u64::from(memory_pages) * PAGE as u64 > self.memory_limit {
            return Err(format!("{memory_pages} pages exceed the task's memory"));
        }
        self.image.stage_size(&mut self.inst, memory_pages as usize)?;
        for (index, hash) in entries {
            let i = *index as usize;
            if i >= memory_pages as usize {
                return Err(format!("page {index} is beyond the memory's {memory_pages} pages"));
            }
            match hash {
                None => self.image.stage_page(&mut self.inst, i, None, None),
                Some(h) => match contents.get(h).filter(|b| b.len() == PAGE) {
                    Some(bytes) => self.image.stage_page(&mut self.inst, i, Some(*h), Some(bytes)),
                    None => {
                        let bytes = log.read_page(h).map_err(|e| format!("page {h}: {e}"))?;
                        if bytes.len() != PAGE {
                            return Err(format!("page {h} has {} bytes", bytes.len()));
                        }
                        self.image.stage_page(&mut self.inst, i, Some(*h), Some(&bytes));
                    }
                },
            }
        }
        Ok(())
    }

    /// Keeps the manifest stored under `key` that it matches, for the start.
    pub fn keep_manifest(&mut self, key: String, manifest: Manifest) {
        self.manifest = Some((key, manifest));
    }

    /// The manifest it keeps, if it was kept for `key` and `log` still holds it there (decoded
    /// when the target stored it: the start need not read it back).
    pub(super) fn take_manifest(&mut self, key: &str, log: &PageLog) -> Option<Manifest> {
        let (kept, manifest) = self.manifest.take()?;
        (kept == key && log.has_manifest(key)).then_some(manifest)
    }

    /// Whether it was built with these limits (an update between the switch and the start may
    /// have changed them: the task then restores with the new ones).
    pub fn built_with(&self, limits: &InstanceLimits) -> bool {
        self.limits == *limits
    }

    /// Bytes of memory it holds, measured as a running task's meter measures its instance: the
    /// linear memory (the image beside it is not counted for either).
    pub fn memory_bytes(&self) -> u64 {
        self.image.staged_hashes().len() as u64 * PAGE as u64
    }

    /// Whether the staged memory is exactly `manifest`'s (its module, size and every page).
    pub fn matches(&self, manifest: &Manifest) -> bool {
        let hashes = self.image.staged_hashes();
        if manifest.module_hash != self.module_hash || hashes.len() != manifest.memory_pages as usize {
            return false;
        }
        let mut expected = vec![None; hashes.len()];
        for (i, h) in &manifest.pages {
            match expected.get_mut(*i as usize) {
                Some(slot) => *slot = Some(*h),
                None => return false,
            }
        }
        expected == hashes
    }
}

/// Starting from a staged instance.
impl Executor {
    /// Starts `config` from the checkpoint `key` (stored locally) with the instance `staged`
    /// built for it, if its pages are the checkpoint's; otherwise restores it from the page log.
    pub fn start_staged(
        &self,
        config: TaskConfig,
        wasm: &[u8],
        key: String,
        staged: StagedTask,
    ) -> Result<(), StartTaskError> {
        self.start_task_with(config, wasm, super::Restore::Key(key), Some(staged))
    }
}

/// What `StatefulTask::start` takes from a staged instance once it matches the manifest.
pub(super) fn take(staged: StagedTask, manifest: &Manifest) -> Result<(Instance, MemoryImage), StartTaskError> {
    let StagedTask { mut inst, mut image, .. } = staged;
    image.finish_staging(&mut inst, manifest).map_err(|e| StartTaskError::Restore(e.to_string()))?;
    Ok((inst, image))
}
