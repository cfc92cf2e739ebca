//! The API's views of the mesh: task listings, status and node tables, built from the
//! replicated state and this hub's executor. The one place where domain records become the HTTP
//! API's JSON bodies.

use hubmesh_consensus::state::{CheckpointPolicy, NodeStatus, TaskKind, TaskRecord};
use hubmesh_consensus::{ClusterState, NodeId};
use hubmesh_proto::api;

use crate::executor::CheckpointSummary;
use crate::hub::Hub;
use crate::scheduler;

/// The API's view of a checkpoint.
pub(crate) fn checkpoint_info(c: &CheckpointSummary) -> api::CheckpointInfo {
    api::CheckpointInfo {
        sequence: c.sequence,
        epoch: c.epoch,
        age_ms: c.age_ms(),
        size_bytes: c.size_bytes,
        pages: c.pages,
        invocations: c.invocations,
    }
}

/// This hub's view of a task, for `task list`.
/// `near`: the devices the hubs see (`Devices::near`, computed once per answer).
pub(crate) fn task_info(hub: &Hub, state: &ClusterState, near: &scheduler::Near, record: &TaskRecord) -> api::TaskInfo {
    let spec = &record.spec;
    let name = &spec.name;
    let info = |p: &hubmesh_consensus::state::Placement| api::PlacementInfo {
        node_id: p.node.0,
        node_name: state.nodes.get(&p.node).map(|n| n.name.clone()).unwrap_or_default(),
        epoch: p.epoch.0,
    };
    let instances: Vec<api::PlacementInfo> = record.placements().map(|(_, p)| info(&p)).collect();
    let placement = record.instances.get(&0).map(info);
    let local = hub.executor().status(name);
    let here_at = record.placements().find(|(_, p)| p.node == hub.consensus().node_id()).map(|(_, p)| p.epoch.0);
    let here = here_at.is_some();
    // Only a failure of this version at this placement: an older one says nothing of it.
    let failure = hub.start_failure(name).filter(|f| here_at.is_some_and(|e| f.is_of(record.version, e)));
    let (state_text, reason) = if let Some(reason) = scheduler::pending_reason(state, near, name) {
        ("pending", Some(reason.to_string()))
    } else if let Some(f) = failure {
        // A failure of the hub (its compiler program, say) is tried again: still starting.
        (if f.retry_at.is_some() { "starting" } else { "failed" }, Some(f.to_string()))
    } else if let Some(broken) = local.as_ref().and_then(|s| s.broken.clone()) {
        ("failed", Some(broken))
    } else if here && local.as_ref().is_none_or(|s| s.config.version != record.version) {
        ("starting", None)
    } else {
        ("running", None)
    };
    let (checkpoint, checkpoint_every_ms) = match spec.checkpoint {
        CheckpointPolicy::None => (api::CheckpointMode::None, None),
        CheckpointPolicy::Periodic { every_ms } => (api::CheckpointMode::Periodic, Some(every_ms)),
        CheckpointPolicy::Durable => (api::CheckpointMode::Durable, None),
    };
    api::TaskInfo {
        name: name.clone(),
        version: record.version,
        kind: match spec.kind {
            TaskKind::Stateful => api::TaskKind::Stateful,
            TaskKind::Stateless => api::TaskKind::Stateless,
        },
        checkpoint,
        checkpoint_every_ms,
        tick_ms: spec.tick_ms,
        constraints: spec.constraints.clone(),
        module_hash: spec.module_hash.to_hex(),
        source_hash: spec.source_hash.to_hex(),
        limits: api::LimitsInfo {
            memory_bytes: spec.limits.memory_bytes,
            timeout_ms: spec.limits.timeout_ms,
            max_input_bytes: spec.limits.max_input_bytes,
            max_output_bytes: spec.limits.max_output_bytes,
            queue: spec.limits.queue,
        },
        state: state_text.into(),
        reason,
        placement,
        replicas: spec.replicas,
        pinned: spec.pinned,
        near: spec.near.clone(),
        migration: record.migration.map(|m| api::MigrationProgressInfo {
            id: m.id,
            reason: m.reason.as_str().to_owned(),
            from_node_id: m.from.0,
            to_node_id: m.to.0,
            started_ms: m.started_ms,
        }),
        instances,
        last_checkpoint: local.as_ref().and_then(|s| s.last_checkpoint.as_ref()).map(checkpoint_info),
        invocations: local.as_ref().map_or(0, |s| s.invocations),
        in_flight: local.map_or(0, |s| s.in_flight),
        holders: record.holders.iter().map(|n| n.0).collect(),
        committed: record.checkpoint.as_ref().map(|c| api::CommittedCheckpointInfo {
            sequence: c.sequence,
            epoch: c.epoch.0,
            age_ms: hubmesh_consensus::now_ms().saturating_sub(c.at_ms),
            size_bytes: c.size_bytes,
            stored_on: c.stored_on.iter().map(|n| n.0).collect(),
        }),
        history: record
            .history
            .iter()
            .map(|h| api::HistoryInfo {
                at_ms: h.at_ms,
                instance: h.instance,
                node_id: h.node.0,
                node_name: node_name(state, h.node),
                epoch: h.epoch.0,
                reason: h.reason.clone(),
                from_sequence: h.from_sequence,
                migration: h.migration.as_ref().map(|m| api::MigrationEventInfo {
                    reason: m.reason.as_str().to_owned(),
                    from_node_id: m.from.0,
                    from_node_name: node_name(state, m.from),
                    to_node_id: m.to.0,
                    to_node_name: node_name(state, m.to),
                    rounds: m.stats.rounds,
                    bytes: m.stats.bytes,
                    precopy_ms: m.stats.precopy_ms,
                    pause_us: m.stats.pause_us,
                    aborted: m.aborted.clone(),
                }),
            })
            .collect(),
    }
}

/// A hub's name, or "" once it was removed.
fn node_name(state: &ClusterState, node: NodeId) -> String {
    state.nodes.get(&node).map(|n| n.name.clone()).unwrap_or_default()
}

/// `GET /v1/status`.
pub(crate) fn status(hub: &Hub) -> api::StatusInfo {
    let state = hub.consensus().state();
    let mesh = hub.consensus().status();
    let mut tasks_placed = 0;
    let mut tasks_pending = 0;
    let near = hub.devices().near();
    for name in state.tasks.keys() {
        if scheduler::pending_reason(&state, &near, name).is_some() {
            tasks_pending += 1;
        } else {
            tasks_placed += 1;
        }
    }
    api::StatusInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        build: crate::executor::BUILD_ID.into(),
        node_id: mesh.node_id,
        name: hub.config().name.clone(),
        leader: mesh.leader,
        term: mesh.term,
        last_applied: mesh.last_applied,
        voters: mesh.voters.clone(),
        nodes: nodes(&state, &mesh.voters, mesh.leader, hub.loads()),
        tasks_total: state.tasks.len() as u32,
        tasks_placed,
        tasks_pending,
        uptime_ms: hub.uptime().as_millis() as u64,
    }
}

fn nodes(state: &ClusterState, voters: &[u64], leader: Option<u64>, loads: &crate::load::Loads) -> Vec<api::NodeInfo> {
    state
        .nodes
        .values()
        .map(|n| {
            let role = if leader == Some(n.id.0) {
                "leader"
            } else if n.witness {
                "witness"
            } else if voters.contains(&n.id.0) {
                "voter"
            } else {
                "learner"
            };
            let instances =
                state.tasks.values().flat_map(|t| t.instances.values()).filter(|p| p.node == n.id).count() as u32;
            api::NodeInfo {
                id: n.id.0,
                name: n.name.clone(),
                api_addr: n.api_addr.clone(),
                role: match n.status {
                    NodeStatus::Up => role.into(),
                    other => format!("{role} ({other:?})").to_lowercase(),
                },
                instances,
                down: n.status == NodeStatus::Down,
                load: loads.get(n.id).filter(|(age, _)| *age <= crate::load::FRESH).map(|(age, r)| api::LoadInfo {
                    cpu_permille: r.cpu_permille,
                    task_cpus: r.task_cpus,
                    memory_permille: r.memory_permille,
                    queue_wait_us: r.queue_wait_us,
                    cpu_pressure: r.cpu_pressure,
                    age_ms: age.as_millis() as u64,
                    tasks: r.tasks.iter().map(|t| (t.name.clone(), t.cpu_millicores)).collect(),
                }),
                gossip_addr: n.gossip_addr.clone(),
                peer_id: crate::gossip::peer_id_of(&n.public_key).map(|p| p.to_string()).unwrap_or_default(),
            }
        })
        .collect()
}

/// Every background worker of the hub: consensus's, then the node's.
pub(crate) fn workers(hub: &Hub) -> Vec<api::WorkerInfo> {
    let all = hub.consensus().workers().list().into_iter().chain(hub.workers().list());
    all.map(|w| api::WorkerInfo {
        name: w.name.into(),
        state: w.state.into(),
        rounds: w.rounds,
        errors: w.errors,
        last_error: w.last_error,
    })
    .collect()
}
