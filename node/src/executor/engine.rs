//! The wasmtime engine of a hub: pooling allocator, epoch interruption and its ticker thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances; deadlines are counted in these ticks.
pub(crate) const TICK: Duration = Duration::from_millis(2);

/// Sizes of the engine's instance pool.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Instances the hub can hold at once (each stateful task holds one, each busy or idle
    /// stateless instance one).
    pub max_instances: u32,
    /// The largest memory any task may be given.
    pub max_task_memory: u64,
}

/// Builds the engine.
pub(crate) fn build(limits: EngineLimits) -> wasmtime::Result<Engine> {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(limits.max_instances)
        // Each instance has the task's memory and hubmesh's dirty-page map.
        .total_memories(limits.max_instances * 2)
        .max_memories_per_module(2)
        .total_tables(limits.max_instances)
        .max_memory_size(limits.max_task_memory as usize)
        .max_unused_warm_slots(limits.max_instances.min(64));
    let mut config = Config::new();
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        .wasm_multi_memory(true)
        .parallel_compilation(true);
    Engine::new(&config)
}

/// Advances the engine's epoch every [`TICK`] until dropped.
pub(crate) struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    pub(crate) fn start(engine: Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("hm-epoch".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(TICK);
                engine.increment_epoch();
            }
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Epoch ticks for a deadline of `ms` milliseconds (at least one).
pub(crate) fn ticks_for(ms: u64) -> u64 {
    (ms / TICK.as_millis() as u64).max(1) + 1
}
