//! The invocation router: finds where a task's instance runs and dispatches to it.
//!
//! ```text
//!  api::invoke --> Router::invoke: task in state? input within its limit?
//!                  placement here, with the epoch the executor runs? --> executor.invoke
//!                  not yet placed / (re)starting --> wait for the state, bounded by the deadline
//!                  placed on another hub --> forwarding (the mesh issue); refused for now
//! ```

use std::time::Duration;

use hubmesh_consensus::state::Placement;
use tokio::time::Instant;

use crate::executor::{Answer, InvokeError};
use crate::hub::Hub;
use crate::scheduler;

/// Extra time an invocation may wait for its task to be placed or started.
const SETTLE: Duration = Duration::from_secs(10);

/// Why an invocation was not dispatched, or what the executor said.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RouteError {
    /// No such task in the mesh.
    #[error("no task named {0:?}")]
    NotFound(String),
    /// The task is not placed (or not started) and did not become so within the deadline.
    #[error("the task is not available: {0}")]
    NotReady(String),
    /// The instance runs on another hub and this build cannot forward.
    #[error("the task runs on hub {node}, and forwarding between hubs is not available in this build")]
    Elsewhere { node: u64 },
    /// The executor's answer.
    #[error(transparent)]
    Invoke(#[from] InvokeError),
}

impl Hub {
    /// The input limit of a task, if it exists.
    pub(crate) fn input_limit(&self, name: &str) -> Option<u64> {
        self.consensus.state().tasks.get(name).map(|t| t.spec.limits.max_input_bytes)
    }

    /// Invokes `name` wherever it runs.
    pub(crate) async fn invoke(
        &self,
        name: &str,
        input: Vec<u8>,
        key: Option<String>,
    ) -> Result<(Answer, Placement), RouteError> {
        let me = self.consensus.node_id();
        let deadline = Instant::now() + SETTLE;
        loop {
            let state = self.consensus.state();
            let task = state.tasks.get(name).ok_or_else(|| RouteError::NotFound(name.to_owned()))?;
            let limit = task.spec.limits.max_input_bytes;
            if input.len() as u64 > limit {
                return Err(InvokeError::InputTooLarge { size: input.len() as u64, limit }.into());
            }
            let placement = task.instances.get(&0).copied();
            let reason = match placement {
                Some(p) if p.node != me => return Err(RouteError::Elsewhere { node: p.node.0 }),
                Some(p) => {
                    let ready = self
                        .executor
                        .status(name)
                        .is_some_and(|s| s.config.epoch == p.epoch.0 && s.config.version == task.version);
                    if ready {
                        let started = std::time::Instant::now();
                        let res = self.executor.invoke(name, input, key).await;
                        metrics::histogram!("hubmesh_invoke_seconds").record(started.elapsed().as_secs_f64());
                        return res.map(|a| (a, p)).map_err(RouteError::from);
                    }
                    let failure = self.start_failures.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned();
                    if let Some(f) = failure {
                        return Err(RouteError::NotReady(f));
                    }
                    "the task is starting".to_owned()
                }
                None => scheduler::pending_reason(&state, name).unwrap_or_else(|| "not placed".into()),
            };
            if Instant::now() >= deadline {
                return Err(RouteError::NotReady(reason));
            }
            let mut rx = self.consensus.watch();
            let _ = tokio::time::timeout(Duration::from_millis(20), rx.changed()).await;
        }
    }
}
