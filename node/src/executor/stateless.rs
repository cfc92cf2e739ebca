//! A stateless task: a pool of interchangeable warm instances. An invocation borrows an idle
//! instance (or instantiates one: microseconds with the pooling allocator), runs, and gives it
//! back; an instance that trapped is dropped instead.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::instance::{Answer, Instance, InstanceLimits, LoadedModule};
use super::InvokeError;

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
        })
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
        let res = inst.call(input);
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
