//! Checkpoints of stateful task instances (design §6): the manifest format, the writer that
//! appends them to the page log, and the idempotency answers they carry. The memory image they
//! are taken from is the executor's (`executor::image`); this module depends on nothing of the
//! executor.
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
mod manifest;
mod writer;

pub(crate) use answers::AnswerCache;
pub(crate) use manifest::PAGE;
pub use manifest::{GlobalValue, Manifest};
pub(crate) use writer::Writer;
#[cfg(test)]
pub(crate) use writer::MISSING_PAGE_RETRIES;

/// The answer of one successful call: what an invocation returns, and what a checkpoint keeps
/// for each idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// 0 for success, otherwise the task's own error status.
    pub status: i32,
    pub output: Vec<u8>,
}
