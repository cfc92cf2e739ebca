//! What a live migration's target holds, page by page, as its source keeps track of it: the
//! hash of each page's content. It starts from the checkpoint the target starts from; each round
//! records the pages sent, and only contents the target lacks travel. With the frozen source's
//! final state it makes the manifest of the checkpoint that the migration commits.

use hubmesh_storage::Hash;

use super::image::CheckpointHeader;
use super::FinalState;
use crate::checkpoint::{Manifest, PAGE};

/// The target's page contents, by page index (`None`: all zero).
#[derive(Debug, Clone, Default)]
pub(crate) struct PageTable {
    hashes: Vec<Option<Hash>>,
}

/// Pages a round carries: the table's entries it changed, and the contents to send.
#[derive(Debug, Default)]
pub(crate) struct RoundPages {
    /// `(index, hash)` of every changed page; `None` for a page that became zero.
    pub(crate) entries: Vec<(u32, Option<Hash>)>,
    /// Contents not sent before in this migration nor in the base checkpoint.
    pub(crate) new: Vec<(Hash, Vec<u8>)>,
    /// Bytes of `new`.
    pub(crate) bytes: u64,
}

impl PageTable {
    /// The table of a target that starts from `base` (or from nothing).
    pub(crate) fn from_manifest(base: Option<&Manifest>) -> Self {
        let mut hashes = Vec::new();
        if let Some(m) = base {
            hashes = vec![None; m.memory_pages as usize];
            for (i, h) in &m.pages {
                if let Some(slot) = hashes.get_mut(*i as usize) {
                    *slot = Some(*h);
                }
            }
        }
        Self { hashes }
    }

    /// Records pages copied out of the source (memory of `memory_pages` pages). Pages whose
    /// content the target already has at that index are left out.
    pub(crate) fn record(&mut self, memory_pages: u32, pages: Vec<(u32, Vec<u8>)>) -> RoundPages {
        // Memory only grows, except when a failed commit took the source back to a smaller
        // committed image: the table follows the size either way.
        self.hashes.resize(memory_pages as usize, None);
        let mut known: std::collections::HashSet<Hash> = self.hashes.iter().flatten().copied().collect();
        let mut round = RoundPages::default();
        for (i, bytes) in pages {
            debug_assert_eq!(bytes.len(), PAGE);
            let hash = (!bytes.iter().all(|b| *b == 0)).then(|| Hash::of(&bytes));
            let Some(slot) = self.hashes.get_mut(i as usize) else { continue };
            if *slot == hash {
                continue;
            }
            *slot = hash;
            round.entries.push((i, hash));
            if let Some(h) = hash.filter(|h| known.insert(*h)) {
                round.bytes += bytes.len() as u64;
                round.new.push((h, bytes));
            }
        }
        round
    }

    /// Every non-zero page, `(index, hash)`.
    #[cfg(test)]
    pub(crate) fn pages(&self) -> Vec<(u32, Hash)> {
        self.hashes.iter().enumerate().filter_map(|(i, h)| h.map(|h| (i as u32, h))).collect()
    }

    /// The manifest of the migrated state, after `last` (the frozen source's) was recorded.
    pub(crate) fn manifest(&self, header: CheckpointHeader, last: &FinalState) -> Manifest {
        header.manifest(&self.hashes, last.globals.clone(), last.answers.clone(), last.pending.clone())
    }
}
