//! A stateless task: a pool of interchangeable warm instances. An invocation borrows an idle
//! instance (or instantiates one: microseconds with the pooling allocator), runs, and gives it
//! back; an instance that trapped is dropped instead.
//!
//! Where a call runs: inline on the API's thread when the task's calls have been quick and no
//! other inline call runs (no thread hand-off: most calls take microseconds; a call finding the
//! slot taken waits for it, for at most [`INLINE_BUDGET`]), else under
//! `block_in_place`. A call that runs past [`INLINE_BUDGET`] sends the task's calls off the API's
//! threads for [`SLOW_PENALTY`], and only one call runs inline at a time, so a runaway task holds
//! at most one runtime thread, until its deadline, once per penalty.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::instance::{Instance, InstanceLimits, LoadedModule};
use super::{Answer, InvokeError};

/// Idle instances kept per task.
const MAX_IDLE: usize = 16;

pub(crate) struct StatelessTask {
    name: Arc<str>,
    module: LoadedModule,
    limits: InstanceLimits,
    idle: Mutex<Vec<Instance>>,
    in_flight: AtomicU32,
    max_in_flight: u32,
    pub(crate) invocations: AtomicU64,
    /// Until when (milliseconds on [`clock`]) the task's calls stay off the API's threads, since
    /// one ran long (see [`Self::wait_to_run_inline`]).
    slow_until_ms: AtomicU64,
}

/// A call that takes longer than this is slow: the task's next calls leave the API's threads.
const INLINE_BUDGET: Duration = Duration::from_millis(2);
/// How long a slow call keeps its task's calls off the API's threads.
const SLOW_PENALTY: Duration = Duration::from_secs(10);

/// Milliseconds since the first call of this process: a monotonic clock that fits an atomic.
fn clock() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
/// At most one inline call at a time in the whole process: a runaway call can hold one of the
/// runtime's threads (until its deadline), never all of them.
static INLINE_SLOT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// The inline slot while held.
pub(crate) struct InlineSlot(#[allow(dead_code)] tokio::sync::SemaphorePermit<'static>);

struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl StatelessTask {
    /// Checks that the module instantiates, and keeps that instance warm.
    pub(crate) fn start(
        name: &str,
        module: LoadedModule,
        limits: InstanceLimits,
        queue: u32,
    ) -> Result<Self, InvokeError> {
        let name: Arc<str> = name.into();
        let first = Instance::new(&module, name.clone(), limits, true)?;
        Ok(Self {
            name,
            module,
            limits,
            idle: Mutex::new(vec![first]),
            in_flight: AtomicU32::new(0),
            max_in_flight: queue.max(1),
            invocations: AtomicU64::new(0),
            slow_until_ms: AtomicU64::new(0),
        })
    }

    /// Invocations running now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the next call may run right on the API's thread, and the slot if so: the task's
    /// recent calls were all quick, and the slot is free or freed soon. A call that finds it
    /// taken waits to be woken (other requests run on this thread meanwhile), which costs less
    /// than handing this thread's work to another one, as `block_in_place` does; it gives up
    /// after [`INLINE_BUDGET`], since the holder may be a runaway. Holding the slot, the caller
    /// runs the call and then drops it.
    pub(crate) async fn wait_to_run_inline(&self) -> Option<InlineSlot> {
        if self.is_slow() {
            return None;
        }
        if let Ok(p) = INLINE_SLOT.try_acquire() {
            return Some(InlineSlot(p));
        }
        let permit = tokio::time::timeout(INLINE_BUDGET, INLINE_SLOT.acquire()).await.ok()?.ok()?;
        // The task may have turned slow while this call waited.
        (!self.is_slow()).then_some(InlineSlot(permit))
    }

    /// Whether a call of this task ran long lately.
    fn is_slow(&self) -> bool {
        clock() < self.slow_until_ms.load(Ordering::Relaxed)
    }

    /// Runs one invocation on the calling thread.
    pub(crate) fn invoke(&self, input: &[u8]) -> Result<Answer, InvokeError> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(InvokeError::QueueFull { limit: self.max_in_flight });
        }
        let _guard = InFlight(&self.in_flight);
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut inst = match pooled {
            Some(i) => i,
            None => Instance::new(&self.module, self.name.clone(), self.limits, true)?,
        };
        // Only the call counts: a cold instantiation is not the task being slow.
        let started = Instant::now();
        let res = inst.call(input);
        if started.elapsed() > INLINE_BUDGET {
            let until = clock() + SLOW_PENALTY.as_millis() as u64;
            self.slow_until_ms.fetch_max(until, Ordering::Relaxed);
        }
        if matches!(res, Ok(_) | Err(InvokeError::InputTooLarge { .. })) {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(inst);
            }
        }
        if res.is_ok() {
            self.invocations.fetch_add(1, Ordering::Relaxed);
        }
        res
    }
}
