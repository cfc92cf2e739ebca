//! What preparing a module yields and how it fails: the names instrumentation adds to a module
//! and the facts it learns. Shared by the instrumenter (compiled only with the `compiler`
//! feature, and run in `hubmesh-compile`) and the runtime of every hub.

/// Export name of the task's memory after instrumentation.
pub(crate) const MEMORY_EXPORT: &str = "hm:memory";
/// Export name of the dirty-page map.
pub(crate) const DIRTY_EXPORT: &str = "hm:dirty";
/// Prefix of the exported mutable globals.
pub(crate) const GLOBAL_PREFIX: &str = "hm:g";

/// Why a module was refused.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// Not WebAssembly (or WAT) at all.
    #[error("not a WebAssembly module: {0}")]
    Malformed(String),
    /// Valid WebAssembly that hubmesh cannot run or checkpoint.
    #[error("unsupported module: {0}")]
    Unsupported(String),
    /// The hub's compiler process failed: not the module's fault as far as anyone knows.
    #[error("{0}")]
    Compiler(String),
    /// The hub's compiler program is of another build (upgraded under a running hub).
    #[error("{0}")]
    CompilerBuild(String),
}

/// What the rewriting learned about a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModuleFacts {
    pub(crate) has_tick: bool,
    pub(crate) has_initialize: bool,
    pub(crate) mutable_globals: u32,
}
