//! What each task costs this hub: the CPU time its calls and ticks use, how long its calls wait
//! in the queue, and the memory its state holds. The load worker (`crate::load`) reads these
//! counters once a second and turns their differences into the hub's load.
//!
//! CPU time is read two ways. By the thread's own CPU clock, so that time spent waiting for a
//! core does not count: around each call and tick of a stateful task's actor thread, and around
//! each slice of a stateless call after its first, on a blocking thread (many such threads may
//! share a core). The first slice of a stateless call, on the runtime's thread that took the
//! request (where most calls begin and end, within a tick), is timed by the monotonic clock
//! instead: the thread CPU clock is a system call, not a vDSO read, and its two reads per call
//! took up to 12 % of the hub's CPU under `wrk -c32` (docs/benchmarks.md). A first slice the
//! kernel preempts also counts its wait for a core; it lasts about a tick (2 ms).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Counters of one task; they only grow (except `memory_bytes`, a level).
#[derive(Debug, Default)]
pub(crate) struct TaskMeter {
    cpu_ns: AtomicU64,
    wait_ns: AtomicU64,
    waits: AtomicU64,
    memory_bytes: AtomicU64,
}

/// A reading of a [`TaskMeter`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeterReading {
    /// CPU time used by the task's calls and ticks since it started here.
    pub cpu_ns: u64,
    /// Time its calls waited in the queue before they ran, summed.
    pub wait_ns: u64,
    /// Calls that waited (or not) in the queue.
    pub waits: u64,
    /// Bytes of linear memory its instance holds (stateful tasks; 0 for stateless).
    pub memory_bytes: u64,
}

impl TaskMeter {
    /// Runs `f` on this thread, adding the CPU time it used.
    pub(crate) fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        let before = thread_cpu_ns();
        let out = f();
        self.cpu_ns.fetch_add(thread_cpu_ns().saturating_sub(before), Ordering::Relaxed);
        out
    }

    /// A call waited `d` in the queue before it ran.
    pub(crate) fn waited(&self, d: Duration) {
        self.wait_ns.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.waits.fetch_add(1, Ordering::Relaxed);
    }

    /// The instance now holds `bytes` of memory.
    pub(crate) fn set_memory(&self, bytes: u64) {
        self.memory_bytes.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn read(&self) -> MeterReading {
        MeterReading {
            cpu_ns: self.cpu_ns.load(Ordering::Relaxed),
            wait_ns: self.wait_ns.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            memory_bytes: self.memory_bytes.load(Ordering::Relaxed),
        }
    }
}

/// A future whose polls count as its task's CPU time, on whichever thread polls it: a call in
/// slices may begin on an API thread and end on a blocking one. Timed by the monotonic clock
/// until [`Metered::by_thread_clock`] (see the module doc).
pub(crate) struct Metered<F> {
    meter: Arc<TaskMeter>,
    inner: F,
    thread_clock: bool,
}

impl<F: Future + Unpin> Metered<F> {
    pub(crate) fn new(meter: Arc<TaskMeter>, inner: F) -> Self {
        Self { meter, inner, thread_clock: false }
    }

    /// From now on, each poll is timed by the polling thread's CPU clock.
    pub(crate) fn by_thread_clock(mut self) -> Self {
        self.thread_clock = true;
        self
    }
}

impl<F: Future + Unpin> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if this.thread_clock {
            return this.meter.run(|| Pin::new(&mut this.inner).poll(cx));
        }
        let began = std::time::Instant::now();
        let out = Pin::new(&mut this.inner).poll(cx);
        this.meter.cpu_ns.fetch_add(began.elapsed().as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        out
    }
}

/// CPU time this thread has used, from `CLOCK_THREAD_CPUTIME_ID`. Not a vDSO read on Linux: a
/// system call, twice per call into a task (docs/benchmarks.md, "Packaging and footprint,
/// second pass").
pub(super) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins until this thread has used `d` of CPU (not of the clock: other threads may share
    /// the core).
    fn spin_cpu(d: Duration) {
        let start = thread_cpu_ns();
        let mut x = 0u64;
        while thread_cpu_ns() - start < d.as_nanos() as u64 {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    #[test]
    fn counts_cpu_spent_and_not_sleep() {
        let m = TaskMeter::default();
        m.run(|| std::thread::sleep(Duration::from_millis(30)));
        let slept = m.read().cpu_ns;
        m.run(|| spin_cpu(Duration::from_millis(30)));
        let spun = m.read().cpu_ns - slept;
        assert!(slept < 10_000_000, "sleeping used {slept} ns of CPU");
        assert!((30_000_000..45_000_000).contains(&spun), "spinning 30 ms of CPU counted {spun} ns");
        m.waited(Duration::from_millis(2));
        assert_eq!((m.read().wait_ns, m.read().waits), (2_000_000, 1));
    }

    #[test]
    fn a_metered_future_counts_its_polls_and_not_its_waits() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let meter = Arc::new(TaskMeter::default());
        rt.block_on(Metered::new(
            meter.clone(),
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Busy for 30 ms of the clock it is metered by, however the cores are shared.
                let start = std::time::Instant::now();
                while start.elapsed() < Duration::from_millis(30) {
                    std::hint::spin_loop();
                }
            }),
        ));
        let cpu = meter.read().cpu_ns;
        assert!((30_000_000..90_000_000).contains(&cpu), "100 ms asleep and 30 ms busy counted {cpu} ns");
    }

    #[test]
    fn a_future_metered_by_the_thread_clock_counts_only_its_cpu() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let meter = Arc::new(TaskMeter::default());
        let busy = Box::pin(async {
            // A thread that does not run (a blocked one, or one waiting for a core) costs nothing.
            std::thread::sleep(Duration::from_millis(30));
            spin_cpu(Duration::from_millis(30));
        });
        rt.block_on(Metered::new(meter.clone(), busy).by_thread_clock());
        let cpu = meter.read().cpu_ns;
        assert!((30_000_000..45_000_000).contains(&cpu), "30 ms blocked and 30 ms of CPU counted {cpu} ns");
    }
}
