//! Every hub keeps its own node record current (proposing through the leader); only the leader
//! runs the scheduler and proposes its placements, judges the hubs' health, and runs the
//! migration policy (drain and overload, `migration::policy`). Followers never decide placement.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmesh_consensus::state::{NodeRecord, NodeStatus};
use hubmesh_consensus::{ClusterState, Command, NodeId};
use tokio::sync::watch;

use crate::hub::Hub;
use crate::migration::Policy;
use crate::scheduler;
use crate::worker::{state_or_tick, Worker};

/// The leader worker: every hub's own record, and the leader's duties.
pub(crate) struct LeaderDuties {
    hub: Arc<Hub>,
    api_addr: String,
    rx: watch::Receiver<Arc<ClusterState>>,
    /// Since when this hub leads (None while it follows).
    leading_since: Option<Instant>,
    /// The leader this hub last followed: if it became leader because that one went silent, the
    /// silence started before the election (see `watch_health`).
    followed: Option<NodeId>,
    previous_leader: Option<NodeId>,
    /// Health is judged this often: a tenth of node_down keeps detection within 10 % of it.
    tick: Duration,
    /// Drains and overload (while this hub leads).
    policy: Policy,
    /// Draining hubs this leader has not reached for `node_down`: their tasks fail over.
    silent_draining: BTreeSet<NodeId>,
}

/// The round interval of a hub alone in the mesh.
const ALONE_TICK: Duration = Duration::from_secs(1);

impl LeaderDuties {
    pub(crate) fn new(hub: Arc<Hub>, api_addr: String) -> Self {
        let rx = hub.consensus().watch();
        let tick = (hub.config().timeouts.resolve().node_down / 10)
            .clamp(Duration::from_millis(20), Duration::from_millis(500));
        Self {
            hub,
            api_addr,
            rx,
            leading_since: None,
            followed: None,
            previous_leader: None,
            tick,
            policy: Policy::default(),
            silent_draining: BTreeSet::new(),
        }
    }
}

impl Worker for LeaderDuties {
    fn name(&self) -> &'static str {
        "leader"
    }

    async fn work(&mut self) -> Result<(), String> {
        self.rx.borrow_and_update();
        let hub = &self.hub;
        let deferred = if hub.consensus().is_leader() {
            self.policy.round(hub, &hub.consensus().state(), &self.silent_draining)
        } else {
            self.policy.reset();
            self.silent_draining.clear();
            BTreeSet::new()
        };
        step(hub, &self.api_addr, &deferred).await;
        if hub.consensus().is_leader() {
            let since = *self.leading_since.get_or_insert_with(|| {
                self.previous_leader = self.followed;
                Instant::now()
            });
            if let Some(silent) = watch_health(hub, since, self.previous_leader).await {
                self.silent_draining = silent;
            }
        } else {
            self.leading_since = None;
            if let Some(l) = hub.consensus().status().leader.filter(|l| *l != hub.consensus().node_id().0) {
                self.followed = Some(NodeId(l));
            }
        }
        Ok(())
    }

    async fn wait(&mut self) {
        // A hub alone in the mesh has no one's health to judge: a change of the state (a deploy,
        // a hub admitted) or a slow tick is enough.
        let alone = self.rx.borrow().nodes.len() <= 1;
        state_or_tick(&mut self.rx, if alone { ALONE_TICK } else { self.tick }).await;
    }
}

async fn step(hub: &Hub, api_addr: &str, deferred: &BTreeSet<String>) {
    let state = hub.consensus().state();
    let me = hub.consensus().node_id();
    // The status is the leader's to judge; a hub only keeps its own description current.
    let status = state.nodes.get(&me).map_or(NodeStatus::Up, |n| n.status);
    let record = NodeRecord {
        id: me,
        name: hub.config().name.clone(),
        api_addr: api_addr.to_owned(),
        mesh_addr: hub.consensus().mesh_addr().to_string(),
        labels: hub.config().labels.clone(),
        slots: if hub.config().witness { 0 } else { hub.config().slots },
        memory_bytes: if hub.config().witness {
            0
        } else {
            hub.config().task_memory.unwrap_or_else(crate::config::half_of_ram).as_u64()
        },
        witness: hub.config().witness,
        cert_fingerprint: hub.consensus().cert_fingerprint(),
        status,
        gossip_addr: hub.gossip().addr().to_string(),
        public_key: hex::encode(hub.consensus().node_key().public_key()),
    };
    if state.nodes.get(&me) != Some(&record) {
        if let Err(e) = hub.consensus().propose(Command::RegisterNode { node: record }).await {
            tracing::warn!(error = %e, "registering this hub failed");
        }
        return;
    }
    if !hub.consensus().is_leader() {
        return;
    }
    let plan = scheduler::plan_deferring(&state, deferred, &hub.devices().near());
    if plan.is_empty() {
        return;
    }
    tracing::info!(placements = plan.len(), "scheduler proposes placements");
    if let Err(e) = hub.consensus().propose_as_leader(Command::Batch(plan)).await {
        tracing::warn!(error = %e, "proposing placements failed");
    }
}

/// Marks hubs down after `node_down` without contact (and up again when contact resumes). Contact
/// is the last successful call from this leader to the hub: Raft heartbeats make it at least every
/// heartbeat interval. A new leader gives every hub a full `node_down` of grace — except the
/// leader it replaced, whose heartbeats it received until they stopped: that silence is counted
/// from the last request it heard from it (with at least half a `node_down` of grace after the
/// election), so a dead leader's tasks fail over about as soon as a dead follower's would, not a
/// whole election later.
///
/// A draining hub keeps its status (the operator's): when it goes silent it is returned in the
/// set of silent draining hubs instead, whose tasks the scheduler then re-places (a failover)
/// rather than wait for their migration. `None`: this leader cannot judge now.
async fn watch_health(hub: &Hub, leading_since: Instant, previous_leader: Option<NodeId>) -> Option<BTreeSet<NodeId>> {
    let state = hub.consensus().state();
    let me = hub.consensus().node_id();
    let node_down = hub.config().timeouts.resolve().node_down;
    let transport = hub.consensus().transport();
    // A leader that has not heard from a quorum lately is the one cut off: its silence from the
    // others says nothing about them.
    if !hub.consensus().holds_lease(hub.config().timeouts.resolve().lease) {
        return None;
    }
    let mut changes = Vec::new();
    let mut silent_draining = BTreeSet::new();
    // The leader is alive by definition: a record saying otherwise (left by a deposed leader's
    // view, or by a partition the mesh has healed) would keep tasks and holders off it forever.
    if state.nodes.get(&me).is_some_and(|n| n.status == NodeStatus::Down) {
        tracing::warn!(node = me.0, "this leader was recorded as down; marking it up");
        changes.push(Command::SetNodeStatus { node: me, status: NodeStatus::Up });
    }
    for n in state.nodes.values().filter(|n| n.id != me) {
        let called = transport.last_ok(n.id.0);
        let (status, silent_for) = match n.status {
            NodeStatus::Up | NodeStatus::Suspect | NodeStatus::Draining => {
                let last = if Some(n.id) == previous_leader {
                    // At least half a node_down of grace still, for this leader's first
                    // heartbeats to reach a previous leader that is alive but was cut off.
                    let floor = leading_since.checked_sub(node_down / 2).unwrap_or(leading_since);
                    [called, transport.last_heard(n.id.0)]
                        .into_iter()
                        .flatten()
                        .max()
                        .map_or(leading_since, |t| t.max(floor))
                } else {
                    called.map_or(leading_since, |t| t.max(leading_since))
                };
                if last.elapsed() <= node_down {
                    continue;
                }
                if n.status == NodeStatus::Draining {
                    silent_draining.insert(n.id);
                    continue;
                }
                (NodeStatus::Down, last.elapsed())
            }
            // Only this leader's own recent successful call brings a hub back up (a new
            // leader's grace period says nothing about a hub recorded down).
            NodeStatus::Down => match called.filter(|t| t.elapsed() <= node_down) {
                Some(t) => (NodeStatus::Up, t.elapsed()),
                None => continue,
            },
        };
        tracing::warn!(node = n.id.0, name = %n.name, ?status, ?silent_for, "hub health changed");
        changes.push(Command::SetNodeStatus { node: n.id, status });
    }
    if !changes.is_empty() {
        if let Err(e) = hub.consensus().propose_as_leader(Command::Batch(changes)).await {
            tracing::warn!(error = %e, "recording hub health failed");
        }
    }
    Some(silent_draining)
}
