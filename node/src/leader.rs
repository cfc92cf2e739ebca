//! Every hub keeps its own node record current (proposing through the leader); only the leader
//! runs the scheduler and proposes its placements. Followers never decide placement.

use std::sync::Arc;
use std::time::Duration;

use hubmesh_consensus::state::{NodeRecord, NodeStatus};
use hubmesh_consensus::Command;
use tokio::sync::watch;

use crate::hub::Hub;
use crate::scheduler;

/// Runs until `shutdown` flips.
pub(crate) async fn run(hub: Arc<Hub>, api_addr: String, mut shutdown: watch::Receiver<bool>) {
    let mut rx = hub.consensus.watch();
    loop {
        step(&hub, &api_addr).await;
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn step(hub: &Hub, api_addr: &str) {
    let state = hub.consensus.state();
    let me = hub.consensus.node_id();
    let record = NodeRecord {
        id: me,
        name: hub.config.name.clone(),
        api_addr: api_addr.to_owned(),
        mesh_addr: hub.consensus.mesh_addr().to_string(),
        labels: hub.config.labels.clone(),
        slots: hub.config.slots,
        status: NodeStatus::Up,
    };
    if state.nodes.get(&me) != Some(&record) {
        if let Err(e) = hub.consensus.propose(Command::RegisterNode { node: record }).await {
            tracing::warn!(error = %e, "registering this hub failed");
        }
        return;
    }
    if !hub.consensus.is_leader() {
        return;
    }
    let plan = scheduler::plan(&state);
    if plan.is_empty() {
        return;
    }
    tracing::info!(placements = plan.len(), "scheduler proposes placements");
    if let Err(e) = hub.consensus.propose(Command::Batch(plan)).await {
        tracing::warn!(error = %e, "proposing placements failed");
    }
}
