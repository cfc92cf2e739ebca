//! [`Hub`]: the running services of one hub, shared by the API handlers, the mesh handlers and
//! the workers. Its fields are private: the rest of the node reads them through accessors, and
//! records why a task could not start through [`Hub::record_start_failure`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubmesh_consensus::{ClusterState, Consensus, NodeId};
use hubmesh_storage::BlobStore;

use crate::config::Config;
use crate::executor::Executor;
use crate::worker::Workers;

/// Why a task placed here could not be started, for the task version and epoch it was tried at.
/// A failure of the task is not tried again before a new version or epoch; one of this hub
/// (`StartTaskError::Hub`) is, after a wait that doubles with each failed try.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{version}@{epoch}: {reason}{}", if .retry_at.is_some() { " (retrying)" } else { "" })]
pub(crate) struct StartFailure {
    pub(crate) version: u64,
    pub(crate) epoch: u64,
    /// For people: the module does not load, the module could not be stored, ...
    pub(crate) reason: String,
    /// When the reconciler tries again; never for a failure of the task.
    pub(crate) retry_at: Option<Instant>,
    /// Failed tries of this version and epoch in a row.
    pub(crate) tries: u32,
}

/// The first wait before a failure of the hub is tried again, and the longest.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);

impl StartFailure {
    /// A failure of the task: not tried again at this version and epoch.
    pub(crate) fn of_task(version: u64, epoch: u64, reason: String) -> Self {
        Self { version, epoch, reason, retry_at: None, tries: 1 }
    }

    /// A failure of this hub, after `before` (the last failure recorded for the task, if any):
    /// tried again after 1 s, 2 s, 4 s... up to 5 min, counted per version and epoch.
    pub(crate) fn of_hub(version: u64, epoch: u64, reason: String, before: Option<&Self>) -> Self {
        let tries = before.filter(|b| b.retry_at.is_some() && b.is_of(version, epoch)).map_or(0, |b| b.tries) + 1;
        let wait = RETRY_FIRST.saturating_mul(1 << (tries - 1).min(16)).min(RETRY_MAX);
        Self { version, epoch, reason, retry_at: Some(Instant::now() + wait), tries }
    }

    /// Whether this failure, of `version` at `epoch`, stands now (the reconciler does not try
    /// the start).
    pub(crate) fn holds(&self, version: u64, epoch: u64) -> bool {
        self.is_of(version, epoch) && self.retry_at.is_none_or(|t| Instant::now() < t)
    }

    /// Whether it is of `version` at `epoch` (a failure of an older one says nothing of this).
    pub(crate) fn is_of(&self, version: u64, epoch: u64) -> bool {
        (self.version, self.epoch) == (version, epoch)
    }
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

    /// Records that `task` could not start. Logged when the reason is new (a failure of the hub
    /// recurs at every try).
    pub(crate) fn record_start_failure(&self, task: &str, failure: StartFailure) {
        let mut failures = self.start_failures.lock().unwrap_or_else(|p| p.into_inner());
        let again =
            failures.get(task).is_some_and(|f| f.is_of(failure.version, failure.epoch) && f.reason == failure.reason);
        match (&failure.retry_at, again) {
            (_, true) => tracing::debug!(task, %failure, tries = failure.tries, "task failed to start again"),
            (Some(_), false) => tracing::warn!(task, %failure, "task failed to start"),
            (None, false) => tracing::error!(task, %failure, "task failed to start"),
        }
        failures.insert(task.to_owned(), failure);
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

    /// Whether this hub has lost the mesh rather than waiting out an election: it has had no lease
    /// for two election timeouts past its end. A call to one of its own instances is then refused
    /// at once (it cannot run without a lease) instead of being held for seconds.
    pub(crate) fn lost_mesh(&self) -> bool {
        let t = self.config.timeouts.resolve();
        lost_mesh(self.consensus.lease_lapsed_for(t.lease), t.election) && self.consensus.view_is_current()
    }

    /// Completes once [`lost_mesh`](Self::lost_mesh) holds (checked every heartbeat).
    pub(crate) async fn until_lost_mesh(&self) {
        let every = self.config.timeouts.resolve().heartbeat;
        while !self.lost_mesh() {
            tokio::time::sleep(every).await;
        }
    }

    /// Whether `node` has not answered this hub's pings for max(lease, ping timeout + heartbeat)
    /// (1.03 s with `lan`), judged only while this hub's own view is current: a call is not sent
    /// to it, and one waiting on it stops waiting (it is as good as down for this hub, whatever
    /// the leader says).
    pub(crate) fn is_silent(&self, node: NodeId) -> bool {
        self.consensus.silent_for(node.0).is_some_and(|d| d >= self.silent_after()) && self.consensus.view_is_current()
    }

    fn silent_after(&self) -> Duration {
        let t = self.config.timeouts.resolve();
        self.consensus.silent_after(t.lease, t.heartbeat)
    }

    /// Completes once `node` [is silent](Self::is_silent).
    pub(crate) async fn until_silent(&self, node: NodeId) {
        let (after, heartbeat) = (self.silent_after(), self.config.timeouts.resolve().heartbeat);
        while !self.is_silent(node) {
            let quiet = self.consensus.silent_for(node.0).unwrap_or_default();
            // Silent long enough but this hub's own view is not current yet: look again soon.
            tokio::time::sleep(after.saturating_sub(quiet).max(heartbeat)).await;
        }
    }

    /// Waits until `cond` holds for the applied state, or `timeout` passes.
    pub(crate) async fn wait_state(&self, timeout: Duration, cond: impl Fn(&ClusterState) -> bool) -> bool {
        let mut rx = self.consensus.watch();
        tokio::time::timeout(timeout, rx.wait_for(|s| cond(s))).await.is_ok_and(|r| r.is_ok())
    }
}

/// Whether a hub whose lease ran out `lapsed` ago (`None`: it holds one) has lost the mesh: two
/// election timeouts past the lease, an election that could renew it has had its chance (one
/// normally ends within one). Pure.
fn lost_mesh(lapsed: Option<Duration>, election: Duration) -> bool {
    lapsed.is_some_and(|d| d >= election * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_loses_the_mesh_two_election_timeouts_after_its_lease() {
        let ms = Duration::from_millis;
        assert!(!lost_mesh(None, ms(100)), "it holds a lease");
        assert!(!lost_mesh(Some(ms(0)), ms(100)), "the lease just ran out: an election may renew it");
        assert!(!lost_mesh(Some(ms(199)), ms(100)));
        assert!(lost_mesh(Some(ms(200)), ms(100)));
    }

    #[test]
    fn a_failure_of_the_hub_is_tried_again_ever_later_and_one_of_the_task_not_at_all() {
        let task = StartFailure::of_task(2, 5, "the module does not load".into());
        assert!(task.holds(2, 5), "not tried again at its version and epoch");
        assert!(!task.holds(3, 5) && !task.holds(2, 6), "a new version or epoch is tried");
        assert!(!task.to_string().contains("retrying"));

        let mut waits = Vec::new();
        let mut last: Option<StartFailure> = Some(task);
        for _ in 0..12 {
            let f = StartFailure::of_hub(2, 5, "the compiler died".into(), last.as_ref());
            assert!(f.holds(2, 5), "not before its time");
            waits.push(f.retry_at.unwrap().saturating_duration_since(Instant::now()));
            last = Some(f);
        }
        let secs: Vec<u64> = waits.iter().map(|w| (w.as_millis() as u64 + 500) / 1000).collect();
        assert_eq!(
            secs,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300],
            "doubling from 1 s (a task's failure does not count), at most 5 min"
        );
        let last = last.unwrap();
        assert!(last.to_string().ends_with("the compiler died (retrying)"), "{last}");
        assert_eq!(StartFailure::of_hub(2, 6, "x".into(), Some(&last)).tries, 1, "counted per epoch");

        let due = StartFailure { retry_at: Some(Instant::now() - Duration::from_millis(1)), ..last };
        assert!(!due.holds(2, 5), "tried once its time has come");
    }
}
