//! The data each wasm `Store` carries: the invocation's input and output, the limits, and the
//! handles of the instance's memories (cached so host functions do not look exports up by name).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::{Memory, ResourceLimiter};

/// Why the host stopped an invocation (as opposed to the guest trapping by itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostFault {
    /// The task asked for more memory than its cap.
    MemoryDenied { cap: u64 },
    /// The task produced more output than allowed.
    OutputTooLarge { limit: u64 },
    /// The task called `proc_exit`.
    Exit(i32),
}

/// Per-store state.
pub(crate) struct HostState {
    pub(crate) task: Arc<str>,
    pub(crate) input: Vec<u8>,
    pub(crate) output: Vec<u8>,
    pub(crate) output_limit: u64,
    pub(crate) memory_cap: u64,
    pub(crate) fault: Option<HostFault>,
    pub(crate) memory: Option<Memory>,
    pub(crate) dirty: Option<Memory>,
    /// When a call run in slices (`Instance::call_sliced`) must end.
    pub(crate) deadline: Instant,
    /// Set when the caller of a call in slices stopped waiting: the call ends at the next tick.
    pub(crate) abandoned: Arc<AtomicBool>,
}

impl HostState {
    pub(crate) fn new(task: Arc<str>, memory_cap: u64, output_limit: u64) -> Self {
        Self {
            task,
            input: Vec::new(),
            output: Vec::new(),
            output_limit,
            memory_cap,
            fault: None,
            memory: None,
            dirty: None,
            deadline: Instant::now(),
            abandoned: Arc::default(),
        }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_cap {
            // Refused growth returns -1 to the guest; most guests then trap, and the fault tells
            // the caller why.
            self.fault = Some(HostFault::MemoryDenied { cap: self.memory_cap });
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}
