//! [`Hub`]: the running services of one hub, shared by the API handlers, the mesh handlers and
//! the workers. Its fields are private: the rest of the node reads them through accessors, and
//! records why a task could not start through [`Hub::record_start_failure`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubmesh_consensus::{ClusterState, Consensus};
use hubmesh_storage::BlobStore;

use crate::config::Config;
use crate::executor::Executor;
use crate::worker::Workers;

/// Why a task placed here could not be started, for the task version and epoch it was tried at
/// (a new version or epoch is tried again).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{version}@{epoch}: {reason}")]
pub(crate) struct StartFailure {
    pub(crate) version: u64,
    pub(crate) epoch: u64,
    /// For people: the module does not load, the module could not be stored, ...
    pub(crate) reason: String,
}

/// The services of a hub.
pub(crate) struct Hub {
    config: Config,
    consensus: Consensus,
    executor: Arc<Executor>,
    blobs: BlobStore,
    token: String,
    started: Instant,
    /// By task name.
    start_failures: Mutex<HashMap<String, StartFailure>>,
    workers: Workers,
    /// Live migrations in and out (`migration`).
    pub(super) migrations: crate::migration::Migrations,
    /// The hubs' latest load reports (`load`).
    loads: crate::load::Loads,
    /// The gossip plane (`gossip`).
    gossip: crate::gossip::Gossip,
    /// The LAN's devices as the hubs see them (`devices`).
    devices: crate::devices::Devices,
}

impl Hub {
    pub(crate) fn new(
        config: Config,
        consensus: Consensus,
        executor: Arc<Executor>,
        blobs: BlobStore,
        token: String,
        started: Instant,
        gossip: crate::gossip::Gossip,
    ) -> Self {
        let consensus_node_id = consensus.node_id();
        Self {
            config,
            consensus,
            executor,
            blobs,
            token,
            started,
            start_failures: Mutex::new(HashMap::new()),
            workers: Workers::new(),
            migrations: crate::migration::Migrations::default(),
            loads: crate::load::Loads::default(),
            devices: crate::devices::Devices::new(consensus_node_id, gossip.boot()),
            gossip,
        }
    }

    /// The gossip plane.
    pub(crate) fn gossip(&self) -> &crate::gossip::Gossip {
        &self.gossip
    }

    /// The LAN's devices.
    pub(crate) fn devices(&self) -> &crate::devices::Devices {
        &self.devices
    }

    /// The background workers.
    pub(crate) fn workers(&self) -> &Workers {
        &self.workers
    }

    /// The hubs' latest load reports.
    pub(crate) fn loads(&self) -> &crate::load::Loads {
        &self.loads
    }

    /// The configuration this hub runs with.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The Raft node and mesh endpoint.
    pub(crate) fn consensus(&self) -> &Consensus {
        &self.consensus
    }

    /// The task executor.
    pub(crate) fn executor(&self) -> &Arc<Executor> {
        &self.executor
    }

    /// Module blobs.
    pub(crate) fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// This hub's own API token (`DATA_DIR/admin.token`).
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// Whether `presented` is this hub's API token.
    pub(crate) fn token_matches(&self, presented: &[u8]) -> bool {
        // Constant time: the comparison must not tell how much of a guess was right.
        presented.len() == self.token.len()
            && presented.iter().zip(self.token.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// How long this hub has run (boot included).
    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Why `task` could not start here, if it could not.
    pub(crate) fn start_failure(&self, task: &str) -> Option<StartFailure> {
        self.start_failures.lock().unwrap_or_else(|p| p.into_inner()).get(task).cloned()
    }

    /// Records that `task` could not start.
    pub(crate) fn record_start_failure(&self, task: &str, failure: StartFailure) {
        tracing::error!(task, %failure, "task failed to start");
        self.start_failures.lock().unwrap_or_else(|p| p.into_inner()).insert(task.to_owned(), failure);
    }

    /// Forgets the failures of tasks for which `keep` is false (started, moved away, deleted).
    pub(crate) fn forget_start_failures(&self, keep: impl Fn(&str) -> bool) {
        self.start_failures.lock().unwrap_or_else(|p| p.into_inner()).retain(|n, _| keep(n));
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
