//! The wasmtime engine of a hub: pooling allocator, epoch interruption and its ticker thread,
//! which ticks only while task code runs.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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

/// Builds a hub's engine: the settings every compiled module depends on ([`settings`]) and the
/// instance pool sized by `limits`.
pub(crate) fn build(limits: EngineLimits) -> wasmtime::Result<Engine> {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(limits.max_instances)
        // Each instance has the task's memory and hubmesh's dirty-page map.
        .total_memories(limits.max_instances * 2)
        .max_memories_per_module(2)
        .total_tables(limits.max_instances)
        .max_memory_size(limits.max_task_memory as usize)
        .max_unused_warm_slots(limits.max_instances.min(64))
        // A stateless call runs on a fiber stack of its own (`Instance::call_sliced`); each holds
        // an instance, so there are never more such calls than instances.
        .total_stacks(limits.max_instances);
    let mut config = settings();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

/// Builds the compiler program's engine: a hub's settings without the instance pool. How
/// instances are allocated is no part of a compiled artefact (wasmtime checks the target, the
/// compiler flags, the tunables and the features), and a pool reserves address space for every
/// instance a hub may hold, which a process that never instantiates need not pay for at each
/// start. A hub checks at start that what this engine compiles loads into its own.
#[cfg(feature = "compiler")]
pub(crate) fn build_for_compiling() -> wasmtime::Result<Engine> {
    Engine::new(&settings())
}

/// What every engine of hubmesh is built with.
fn settings() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true).wasm_multi_memory(true);
    #[cfg(feature = "compiler")]
    config.parallel_compilation(true);
    config
}

/// Which task code runs now: the ticker advances the epoch only while some does, or did within
/// [`IDLE_GRACE`]. An idle hub would otherwise wake 500 times a second for nothing (a small
/// board's idle CPU, measured in docs/benchmarks.md). Every entry into task code holds an
/// [`Entered`] (`instance.rs`), so a deadline is counted in ticks from the moment its call starts.
///
/// Entering is a few atomic operations while the ticker is awake: a call must not pay a lock and a
/// wake-up of the ticker thread (that made a 0.15 µs call cost 1.2 µs). Only a call that finds
/// the ticker parked takes the lock to wake it. The parking handshake: the ticker publishes
/// `parked` and then reads `running`; a caller increments `running` and then reads `parked`
/// (all sequentially consistent), so at least one of them sees the other, and the ticker checks
/// and waits under the lock a waking caller notifies under.
#[derive(Default)]
pub(crate) struct Clock {
    running: AtomicUsize,
    /// Task code was entered since the ticker last looked.
    used: AtomicBool,
    parked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

/// The ticker parks after this long without task code.
pub(crate) const IDLE_GRACE: Duration = Duration::from_millis(500);

impl Clock {
    /// Task code starts: the ticker runs until every [`Entered`] is dropped (and the grace after).
    pub(crate) fn enter(self: &Arc<Self>) -> Entered {
        self.running.fetch_add(1, Ordering::SeqCst);
        self.used.store(true, Ordering::Relaxed);
        if self.parked.load(Ordering::SeqCst) {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_one();
        }
        Entered(self.clone())
    }

    /// Parks the ticker while no task code runs; false once the ticker must stop.
    fn park(&self) -> bool {
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.parked.store(true, Ordering::SeqCst);
        while self.running.load(Ordering::SeqCst) == 0 && !self.stop.load(Ordering::SeqCst) {
            g = self.wake.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        self.parked.store(false, Ordering::SeqCst);
        !self.finished()
    }

    /// The ticker was dropped and no task code runs: code still running when it was dropped (a
    /// call whose caller is gone, on a blocking thread) reaches its deadline only through ticks.
    fn finished(&self) -> bool {
        self.stop.load(Ordering::SeqCst) && self.running.load(Ordering::SeqCst) == 0
    }

    /// Whether task code ran since the last call (or runs now).
    fn was_used(&self) -> bool {
        self.used.swap(false, Ordering::Relaxed) || self.running.load(Ordering::SeqCst) > 0
    }
}

/// Task code runs while this lives.
pub(crate) struct Entered(Arc<Clock>);

impl Drop for Entered {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Advances the engine's epoch every [`TICK`] while task code runs, until dropped and no task
/// code runs.
pub(crate) struct Ticker {
    clock: Arc<Clock>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    /// Calls `tick` (the engine's `increment_epoch`) every [`TICK`] while `clock` says task code
    /// runs or ran within [`IDLE_GRACE`].
    pub(crate) fn start(clock: Arc<Clock>, mut tick: impl FnMut() + Send + 'static) -> std::io::Result<Self> {
        let shared = clock.clone();
        let thread = std::thread::Builder::new().name("hm-epoch".into()).spawn(move || {
            // On the clock, not in ticks: a loaded machine stretches every sleep.
            let mut used_at: Option<Instant> = None; // park at once: nothing ran yet
            loop {
                if used_at.is_none_or(|at| at.elapsed() >= IDLE_GRACE) {
                    if !shared.park() {
                        return;
                    }
                    used_at = Some(Instant::now());
                }
                if shared.finished() {
                    return;
                }
                std::thread::sleep(TICK);
                tick();
                if shared.was_used() {
                    used_at = Some(Instant::now());
                }
            }
        })?;
        Ok(Self { clock, thread: Some(thread) })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.clock.stop.store(true, Ordering::SeqCst);
        {
            // Under the lock: the thread is either before its check or waiting, never between.
            let _g = self.clock.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.clock.wake.notify_one();
        }
        // Code that still runs keeps the thread ticking until it ends; do not wait for it here.
        if let Some(t) = self.thread.take().filter(|_| self.clock.running.load(Ordering::SeqCst) == 0) {
            let _ = t.join();
        }
    }
}

/// Epoch ticks for a deadline of `ms` milliseconds (at least one).
pub(crate) fn ticks_for(ms: u64) -> u64 {
    (ms / TICK.as_millis() as u64).max(1) + 1
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    fn ticks_while(count: &AtomicU64, window: Duration) -> u64 {
        let before = count.load(Ordering::Relaxed);
        std::thread::sleep(window);
        count.load(Ordering::Relaxed) - before
    }

    #[test]
    fn the_clock_ticks_only_while_task_code_runs_or_just_ran_and_stops_once_dropped_and_idle() {
        let clock = Arc::new(Clock::default());
        let count = Arc::new(AtomicU64::new(0));
        let counted = count.clone();
        let ticker = Ticker::start(clock.clone(), move || {
            counted.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(ticks_while(&count, Duration::from_millis(30)), 0, "idle: no tick");
        let (a, b) = (clock.enter(), clock.enter());
        let start = Instant::now();
        while count.load(Ordering::Relaxed) < 5 {
            assert!(start.elapsed() < Duration::from_secs(5), "running: it ticks");
            std::thread::yield_now();
        }
        drop(a);
        assert!(ticks_while(&count, Duration::from_millis(20)) > 0, "one caller still runs");
        drop(b);
        assert!(ticks_while(&count, Duration::from_millis(20)) > 0, "it ticks on for the grace");
        // Past the grace (and the tick in progress, however late a loaded machine runs it).
        std::thread::sleep(IDLE_GRACE + Duration::from_millis(250));
        assert_eq!(ticks_while(&count, Duration::from_millis(30)), 0, "idle again: no tick");
        let c = clock.enter();
        drop(ticker);
        assert!(ticks_while(&count, Duration::from_millis(20)) > 0, "dropped while code runs: it ticks on");
        drop(c);
        // The tick in progress, however late a loaded machine runs it.
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(ticks_while(&count, Duration::from_millis(30)), 0, "dropped, and nothing runs: it stopped");
    }
}
