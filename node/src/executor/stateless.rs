//! A stateless task: a pool of interchangeable warm instances. An invocation borrows an idle
//! instance (or instantiates one: microseconds with the pooling allocator), runs, and gives it
//! back; an instance that trapped is dropped instead.
//!
//! Where a call runs: under `block_in_place` on the API's runtime (tokio first hands this
//! worker's other tasks to another thread, so a task that runs to its deadline stalls nothing).
//! Calls used to run inline on the API's thread when quick, which was faster, but an inline call
//! that turned out to be a runaway kept the task in its worker's LIFO slot, which tokio does not
//! let other workers steal (tokio-rs/tokio#4941), waiting until the call's deadline.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::instance::{Instance, InstanceError, InstanceLimits, LoadedModule};
use super::meter::TaskMeter;
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
    /// What the task costs (CPU; stateless calls do not queue).
    pub(crate) meter: TaskMeter,
}

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
    ) -> Result<Self, InstanceError> {
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
            meter: TaskMeter::default(),
        })
    }

    /// Invocations running now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
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
        let res = self.meter.run(|| inst.call(input));
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
