//! A stateless task: a pool of interchangeable warm instances. An invocation borrows an idle
//! instance (or instantiates one: microseconds with the pooling allocator), runs, and gives it
//! back; an instance that trapped is dropped instead.
//!
//! Where a call runs: its first slice (up to one epoch tick, 2 ms) on the thread that polls the
//! invocation, with no hand-off; a call still running then finishes on a blocking thread, where
//! it may run to its deadline and hold no thread of the runtime. Quick calls, nearly all of them,
//! never leave the caller's thread. (Before, every call ran under `block_in_place`, which costs
//! two thread hand-offs; running whole calls inline was faster but let a runaway call keep the
//! task in its worker's LIFO slot, which tokio does not let other workers steal
//! (tokio-rs/tokio#4941), until the call's deadline. A slice ends at the next tick, so that
//! slot waits a tick at most.)

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use super::instance::{Instance, InstanceError, InstanceLimits, LoadedModule};
use super::meter::{Metered, TaskMeter};
use super::{Answer, InvokeError};

/// Idle instances kept per task.
const MAX_IDLE: usize = 16;

pub(crate) struct StatelessTask {
    name: Arc<str>,
    module: LoadedModule,
    limits: InstanceLimits,
    idle: Mutex<Vec<Instance>>,
    in_flight: Arc<AtomicU32>,
    max_in_flight: u32,
    pub(crate) invocations: AtomicU64,
    /// What the task costs (CPU; stateless calls do not queue).
    pub(crate) meter: Arc<TaskMeter>,
}

/// A call counted in; owned, so that it goes with a call that outlives its caller.
struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Ends a call in slices at its next tick if its caller stops waiting (a client that hangs up):
/// a call on a blocking thread would otherwise run on, uncounted, to its deadline.
struct AbandonOnDrop(Option<Arc<AtomicBool>>);

impl AbandonOnDrop {
    /// The call ended: its instance may serve another call, which must not be abandoned.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::Relaxed);
        }
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
            in_flight: Arc::default(),
            max_in_flight: queue.max(1),
            invocations: AtomicU64::new(0),
            meter: Arc::default(),
        })
    }

    /// Invocations running now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Runs one invocation on the calling thread, to its end or its deadline.
    pub(crate) fn invoke(&self, input: &[u8]) -> Result<Answer, InvokeError> {
        let _guard = self.admit()?;
        let mut inst = match self.take_idle() {
            Some(i) => i,
            None => Instance::new(&self.module, self.name.clone(), self.limits, true)?,
        };
        let res = self.meter.run(|| inst.call(input));
        self.finish(inst, res)
    }

    /// Runs one invocation: its first slice on this thread, the rest (a call still running at
    /// the first tick) on a blocking thread.
    pub(crate) async fn invoke_sliced(self: &Arc<Self>, input: Vec<u8>) -> Result<Answer, InvokeError> {
        let counted = self.admit()?;
        let (inst, counted) = match self.take_idle() {
            Some(i) => (i, counted),
            // Instantiating runs the module's `_initialize`, which may run long: not on this
            // thread. It stays counted until it ends, even if its caller stops waiting.
            None => {
                let task = self.clone();
                tokio::task::spawn_blocking(move || {
                    Instance::new(&task.module, task.name.clone(), task.limits, true).map(|i| (i, counted))
                })
                .await
                .map_err(|e| InvokeError::Unavailable(format!("the instantiating thread failed: {e}")))??
            }
        };
        let abandon = AbandonOnDrop(Some(inst.abandon_flag()));
        let call: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
            let _counted = counted;
            let mut inst = inst;
            let res = inst.call_sliced(&input).await;
            (inst, res)
        });
        let mut call = Metered::new(self.meter.clone(), call);
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut call).poll(cx))).await;
        let (inst, res) = match first {
            Poll::Ready(done) => done,
            Poll::Pending => {
                let runtime = tokio::runtime::Handle::current();
                let call = call.by_thread_clock();
                tokio::task::spawn_blocking(move || runtime.block_on(call))
                    .await
                    .map_err(|e| InvokeError::Unavailable(format!("the invocation thread failed: {e}")))?
            }
        };
        abandon.disarm();
        self.finish(inst, res)
    }

    /// Counts a call in, or refuses it when `queue` calls already run.
    fn admit(&self) -> Result<InFlight, InvokeError> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(InvokeError::QueueFull { limit: self.max_in_flight });
        }
        Ok(InFlight(self.in_flight.clone()))
    }

    fn take_idle(&self) -> Option<Instance> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// Keeps a healthy instance warm (one that trapped is dropped) and counts the call.
    fn finish(&self, inst: Instance, res: Result<Answer, InvokeError>) -> Result<Answer, InvokeError> {
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
