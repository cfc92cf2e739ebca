//! One shape for the hub's background loops (Garage's `Worker`): a worker does one round of work,
//! then waits for its next reason to run (a new applied state, a tick). [`Workers`] runs each on
//! its own task, counts rounds and errors, keeps the last error, and stops them all at shutdown.
//! `hubmesh worker list` shows their status. Consensus runs its own (autopilot, address book);
//! the node runs the rest on the same shape.
//!
//! ```text
//!  Workers::spawn(w) --> loop { state = working; w.work() (error: counted, logged);
//!                               state = idle; select { w.wait(), stop } }
//!  Workers::stop(deadline) --> stop flips --> every loop ends after its current round
//! ```

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A background loop.
pub trait Worker: Send + 'static {
    /// Its name in logs and `worker list`.
    fn name(&self) -> &'static str;

    /// One round. An error is counted and logged; the worker goes on with its next round.
    fn work(&mut self) -> impl Future<Output = Result<(), String>> + Send;

    /// Completes when the next round is due.
    fn wait(&mut self) -> impl Future<Output = ()> + Send;
}

/// What `worker list` shows of one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    pub name: &'static str,
    /// `starting`, `working`, `idle` or `stopped`.
    pub state: &'static str,
    /// Rounds done.
    pub rounds: u64,
    /// Rounds that failed.
    pub errors: u64,
    pub last_error: Option<String>,
}

/// A started worker: its status, and its task until `stop` takes it.
type Running = (Arc<Mutex<WorkerStatus>>, Option<JoinHandle<()>>);

/// The running workers of a hub.
pub struct Workers {
    stop: watch::Sender<bool>,
    running: Mutex<Vec<Running>>,
}

impl Default for Workers {
    fn default() -> Self {
        Self::new()
    }
}

impl Workers {
    pub fn new() -> Self {
        Self { stop: watch::channel(false).0, running: Mutex::new(Vec::new()) }
    }

    /// Starts `worker` on its own task.
    pub fn spawn(&self, mut worker: impl Worker) {
        let status = Arc::new(Mutex::new(WorkerStatus {
            name: worker.name(),
            state: "starting",
            rounds: 0,
            errors: 0,
            last_error: None,
        }));
        let mut stop = self.stop.subscribe();
        let shared = status.clone();
        let handle = tokio::spawn(async move {
            let set = |f: &dyn Fn(&mut WorkerStatus)| f(&mut shared.lock().unwrap_or_else(|p| p.into_inner()));
            loop {
                set(&|s| s.state = "working");
                let result = worker.work().await;
                set(&|s| {
                    s.rounds += 1;
                    s.state = "idle";
                    if let Err(e) = &result {
                        s.errors += 1;
                        s.last_error = Some(e.clone());
                    }
                });
                if let Err(e) = result {
                    tracing::warn!(worker = worker.name(), error = %e, "worker round failed");
                }
                tokio::select! {
                    () = worker.wait() => {}
                    _ = stop.changed() => break,
                }
            }
            set(&|s| s.state = "stopped");
        });
        self.running.lock().unwrap_or_else(|p| p.into_inner()).push((status, Some(handle)));
    }

    /// Every worker's status, in start order.
    pub fn list(&self) -> Vec<WorkerStatus> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.iter().map(|(status, _)| status.lock().unwrap_or_else(|p| p.into_inner()).clone()).collect()
    }

    /// Stops every worker after its current round, waiting at most `deadline` for all of them.
    pub async fn stop(&self, deadline: Duration) {
        let _ = self.stop.send(true);
        let handles: Vec<JoinHandle<()>> =
            self.running.lock().unwrap_or_else(|p| p.into_inner()).iter_mut().filter_map(|(_, h)| h.take()).collect();
        let _ = tokio::time::timeout(deadline, futures_util::future::join_all(handles)).await;
    }
}

/// Waits for a new applied state or `tick`, whichever comes first: the usual `wait` of a worker
/// that follows the replicated state.
pub async fn state_or_tick<T>(rx: &mut watch::Receiver<T>, tick: Duration) {
    tokio::select! {
        r = rx.changed() => if r.is_err() {
            // The state's sender is gone (Raft stopped): rounds go on at the tick, never faster.
            tokio::time::sleep(tick).await;
        },
        () = tokio::time::sleep(tick) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter {
        fail_every: u64,
        n: u64,
    }

    impl Worker for Counter {
        fn name(&self) -> &'static str {
            "counter"
        }

        async fn work(&mut self) -> Result<(), String> {
            self.n += 1;
            if self.n.is_multiple_of(self.fail_every) {
                return Err(format!("round {} failed", self.n));
            }
            Ok(())
        }

        async fn wait(&mut self) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn workers_count_rounds_and_errors_and_stop() {
        let workers = Workers::new();
        workers.spawn(Counter { fail_every: 3, n: 0 });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while workers.list()[0].rounds < 6 {
            assert!(tokio::time::Instant::now() < deadline, "the worker does not run");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        workers.stop(Duration::from_secs(5)).await;
        let w = &workers.list()[0];
        assert_eq!((w.name, w.state), ("counter", "stopped"));
        assert_eq!(w.errors, w.rounds / 3);
        assert!(w.last_error.as_deref().is_some_and(|e| e.ends_with("failed")), "{w:?}");
    }
}
