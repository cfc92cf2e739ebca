//! [`Hub`]: the running services of one hub, shared by the API handlers and the workers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubmesh_consensus::state::{CheckpointPolicy, NodeStatus, TaskKind, TaskRecord};
use hubmesh_consensus::{ClusterState, Consensus};
use hubmesh_proto::api;
use hubmesh_storage::BlobStore;

use crate::config::Config;
use crate::executor::{CheckpointSummary, Executor};
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

/// The services of a hub.
pub(crate) struct Hub {
    pub(crate) config: Config,
    pub(crate) consensus: Consensus,
    pub(crate) executor: Arc<Executor>,
    pub(crate) blobs: BlobStore,
    pub(crate) token: String,
    pub(crate) started: Instant,
    /// Why a task placed here could not be started, by task name.
    pub(crate) start_failures: Mutex<std::collections::HashMap<String, String>>,
    /// Tasks whose committed checkpoint is being copied to new holders right now.
    pub(crate) refilling: Mutex<std::collections::HashSet<String>>,
}

impl Hub {
    /// This hub's view of a task, for `task list`.
    pub(crate) fn task_info(&self, state: &ClusterState, record: &TaskRecord) -> api::TaskInfo {
        let spec = &record.spec;
        let name = &spec.name;
        let info = |p: &hubmesh_consensus::state::Placement| api::PlacementInfo {
            node_id: p.node.0,
            node_name: state.nodes.get(&p.node).map(|n| n.name.clone()).unwrap_or_default(),
            epoch: p.epoch.0,
        };
        let instances: Vec<api::PlacementInfo> = record.placements().map(|(_, p)| info(&p)).collect();
        let placement = record.instances.get(&0).map(info);
        let local = self.executor.status(name);
        let failure = self.start_failures.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned();
        let here = record.placements().any(|(_, p)| p.node == self.consensus.node_id());
        let (state_text, reason) = if let Some(reason) = scheduler::pending_reason(state, name) {
            ("pending", Some(reason))
        } else if let Some(f) = failure.filter(|_| here) {
            ("failed", Some(f))
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
            instances,
            last_checkpoint: local.as_ref().and_then(|s| s.last_checkpoint.as_ref()).map(checkpoint_info),
            invocations: local.map_or(0, |s| s.invocations),
            holders: record.holders.iter().map(|n| n.0).collect(),
            committed: record.checkpoint.as_ref().map(|c| api::CommittedCheckpointInfo {
                sequence: c.sequence,
                epoch: c.epoch.0,
                age_ms: now_ms().saturating_sub(c.at_ms),
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
                    node_name: state.nodes.get(&h.node).map(|n| n.name.clone()).unwrap_or_default(),
                    epoch: h.epoch.0,
                    reason: h.reason.clone(),
                    from_sequence: h.from_sequence,
                })
                .collect(),
        }
    }

    /// `GET /v1/status`.
    pub(crate) fn status(&self) -> api::StatusInfo {
        let state = self.consensus.state();
        let mesh = self.consensus.status();
        let mut tasks_placed = 0;
        let mut tasks_pending = 0;
        for name in state.tasks.keys() {
            if scheduler::pending_reason(&state, name).is_some() {
                tasks_pending += 1;
            } else {
                tasks_placed += 1;
            }
        }
        api::StatusInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            node_id: mesh.node_id,
            name: self.config.name.clone(),
            leader: mesh.leader,
            term: mesh.term,
            last_applied: mesh.last_applied,
            voters: mesh.voters.clone(),
            nodes: self.nodes(&state, &mesh.voters, mesh.leader),
            tasks_total: state.tasks.len() as u32,
            tasks_placed,
            tasks_pending,
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    fn nodes(&self, state: &ClusterState, voters: &[u64], leader: Option<u64>) -> Vec<api::NodeInfo> {
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
                }
            })
            .collect()
    }

    /// Whether a change proposed now can commit: this hub holds its lease (it has recently heard
    /// from the leader, or as leader from a quorum). Checked before a change starts, so a mesh
    /// without quorum refuses at once instead of timing out with an unknown outcome.
    pub(crate) fn has_quorum(&self) -> bool {
        self.consensus.holds_lease(self.config.timeouts.resolve().lease)
    }

    /// Waits until `cond` holds for the applied state, or `timeout` passes.
    pub(crate) async fn wait_state(&self, timeout: Duration, cond: impl Fn(&ClusterState) -> bool) -> bool {
        let mut rx = self.consensus.watch();
        tokio::time::timeout(timeout, rx.wait_for(|s| cond(s))).await.is_ok_and(|r| r.is_ok())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
