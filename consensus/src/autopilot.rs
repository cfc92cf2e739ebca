//! Membership autopilot, run by the leader: every admitted hub becomes a Raft learner; learners
//! that have caught up are promoted until there are 3 healthy voters (5 once the mesh has 5 or
//! more hubs); a voter the leader has marked down is then demoted to learner, so the mesh keeps
//! its fault tolerance; hubs removed from the mesh leave the membership.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::{ChangeMembers, Raft};
use tokio::sync::watch;

use crate::state::{ClusterState, NodeStatus};
use crate::type_config::{NodeAddr, TypeConfig};
use crate::worker::Worker;

/// A hub alone in the mesh looks again at least this often.
const ALONE_RECHECK: Duration = Duration::from_secs(5);

/// How far behind the leader's log a learner may be and still be promoted.
const CAUGHT_UP: u64 = 16;

/// Voters wanted for a mesh of `hubs` hubs.
pub fn target_voters(hubs: usize) -> usize {
    if hubs >= 5 {
        5
    } else {
        3.min(hubs)
    }
}

/// The autopilot as a worker: a round every 200 ms (it acts only while this hub leads); a hub
/// alone in the mesh — one record in the state, one member in Raft — has nothing to promote or
/// demote until another is admitted, and waits for a change of the state (at most 5 s, which
/// also retries a change that failed).
pub(crate) struct Autopilot {
    pub(crate) raft: Raft<TypeConfig>,
    pub(crate) node_id: u64,
    pub(crate) state: watch::Receiver<Arc<ClusterState>>,
}

impl Worker for Autopilot {
    fn name(&self) -> &'static str {
        "autopilot"
    }

    async fn work(&mut self) -> Result<(), String> {
        // Seen before the round: a change published while it runs wakes the next wait.
        self.state.borrow_and_update();
        round(&self.raft, self.node_id, &self.state).await;
        Ok(())
    }

    async fn wait(&mut self) {
        let alone = self.state.borrow().nodes.len() <= 1
            && self.raft.metrics().borrow().membership_config.membership().nodes().count() <= 1;
        if !alone {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        tokio::select! {
            r = self.state.changed() => if r.is_err() {
                tokio::time::sleep(ALONE_RECHECK).await; // Raft is gone; shutdown stops this worker
            },
            () = tokio::time::sleep(ALONE_RECHECK) => {}
        }
    }
}

/// One look at the membership; changes are retried on the next round if they fail.
async fn round(raft: &Raft<TypeConfig>, node_id: u64, state: &watch::Receiver<Arc<ClusterState>>) {
    {
        let metrics = raft.metrics().borrow().clone();
        if metrics.current_leader != Some(node_id) {
            return;
        }
        let membership = metrics.membership_config.membership().clone();
        if membership.get_joint_config().len() > 1 {
            return;
        }
        let members: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let st = state.borrow().clone();
        // A removed leader removes itself too (openraft lets it; it steps down once committed).
        let removed: BTreeSet<u64> =
            members.iter().copied().filter(|id| !st.nodes.contains_key(&crate::NodeId(*id))).collect();
        // Every member has a record once admitted; with no records at all the state is not
        // there yet, so nothing is removed then.
        if !removed.is_empty() && !st.nodes.is_empty() {
            let voters_removed: BTreeSet<u64> = removed.iter().copied().filter(|id| voters.contains(id)).collect();
            tracing::info!(?removed, "autopilot: removing hubs that were removed from the mesh");
            let change = if voters_removed.is_empty() {
                ChangeMembers::RemoveNodes(removed)
            } else {
                ChangeMembers::RemoveVoters(voters_removed)
            };
            if let Err(e) = raft.change_membership(change, false).await {
                tracing::debug!(error = %e, "change_membership (remove)");
            }
            return;
        }
        for n in st.nodes.values() {
            if members.contains(&n.id.0) || n.mesh_addr.is_empty() {
                continue;
            }
            let addr = NodeAddr { name: n.name.clone(), api_addr: n.api_addr.clone(), mesh_addr: n.mesh_addr.clone() };
            tracing::info!(node = n.id.0, name = %n.name, "autopilot: adding learner");
            if let Err(e) = raft.add_learner(n.id.0, addr, false).await {
                tracing::debug!(error = %e, "add_learner");
            }
        }
        let want = target_voters(st.nodes.len().max(members.len()));
        let down = |id: &u64| st.nodes.get(&crate::NodeId(*id)).is_some_and(|n| n.status == NodeStatus::Down);
        let healthy_voters = voters.iter().filter(|id| !down(id)).count();
        // A down voter is demoted (kept as a learner, so it can catch up when it returns) once
        // a healthy replacement votes in its place.
        if voters.len() > want {
            if let Some(d) = voters.iter().copied().find(|id| down(id)) {
                tracing::info!(node = d, "autopilot: demoting a down voter");
                if let Err(e) = raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([d])), true).await {
                    tracing::debug!(error = %e, "change_membership (demote)");
                }
                return;
            }
        }
        if healthy_voters >= want {
            return;
        }
        let last = metrics.last_log_index.unwrap_or(0);
        let caught_up: Vec<u64> = metrics
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .filter(|(id, matched)| {
                        !voters.contains(id) && !down(id) && matched.is_some_and(|m| m.index + CAUGHT_UP >= last)
                    })
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        let promote: BTreeSet<u64> = caught_up.into_iter().take(want - healthy_voters).collect();
        if promote.is_empty() {
            return;
        }
        tracing::info!(?promote, "autopilot: promoting learners to voters");
        if let Err(e) = raft.change_membership(ChangeMembers::AddVoterIds(promote), false).await {
            tracing::debug!(error = %e, "change_membership");
        }
    }
}
