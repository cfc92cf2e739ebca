//! The node's workers: the generic runner is `hubmesh_consensus::worker` (its doc tells the
//! shape); here is the shape most node workers take, [`OnState`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use hubmesh_consensus::worker::{state_or_tick, Worker, Workers};
use hubmesh_consensus::ClusterState;
use tokio::sync::watch;

use crate::hub::Hub;

/// A worker that follows the replicated state: `round` runs with every newly applied state, and
/// at least every `tick` (to retry what failed).
pub(crate) struct OnState<F> {
    name: &'static str,
    hub: Arc<Hub>,
    rx: watch::Receiver<Arc<ClusterState>>,
    tick: Duration,
    round: F,
}

impl<F, Fut> OnState<F>
where
    F: FnMut(Arc<Hub>, Arc<ClusterState>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    pub(crate) fn new(name: &'static str, hub: Arc<Hub>, tick: Duration, round: F) -> Self {
        let rx = hub.consensus().watch();
        Self { name, hub, rx, tick, round }
    }
}

impl<F, Fut> Worker for OnState<F>
where
    F: FnMut(Arc<Hub>, Arc<ClusterState>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    fn name(&self) -> &'static str {
        self.name
    }

    async fn work(&mut self) -> Result<(), String> {
        let state = self.rx.borrow_and_update().clone();
        (self.round)(self.hub.clone(), state).await
    }

    async fn wait(&mut self) {
        state_or_tick(&mut self.rx, self.tick).await;
    }
}
