//! Checkpoints of stateful task instances (design §6).
//!
//! ```text
//!  invocation ok --> MemoryImage::sync      copy the pages the dirty map marks into the base image
//!                       |                    (cost: dirty pages; the map comes from instrumentation)
//!  checkpoint  -->  MemoryImage::checkpoint  hash the pages dirtied since the last checkpoint,
//!                       |                    skip zero pages, build the manifest
//!                       v
//!                   Writer (one thread)      group commit: many tasks' pages + manifests,
//!                                            one append and one fdatasync of the page log
//! ```
//!
//! The base image is also what a trapped invocation is rolled back to, so a stateful instance is
//! never left half-mutated. Restore reads a manifest, verifies every page by hash and rebuilds the
//! image; the instance is re-instantiated and overwritten with it.

mod answers;
mod image;
mod manifest;
mod writer;

pub(crate) use answers::AnswerCache;
pub(crate) use image::MemoryImage;
pub use manifest::{GlobalValue, Manifest};
pub(crate) use writer::Writer;

pub(crate) use image::CheckpointHeader;

/// The header of a task's next checkpoint.
pub(crate) fn image_header(
    cfg: &crate::executor::TaskConfig,
    sequence: u64,
    invocations: u64,
    now_ms: u64,
) -> CheckpointHeader {
    CheckpointHeader {
        task: cfg.name.clone(),
        task_version: cfg.version,
        epoch: cfg.epoch,
        sequence,
        module_hash: cfg.module_hash,
        invocations,
        created_unix_ms: now_ms,
    }
}
