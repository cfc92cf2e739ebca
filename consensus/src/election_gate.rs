//! Elections only where they can succeed. openraft 0.9 has no pre-vote: a voter cut off from the
//! others raises its term at every election timeout, and when the cut heals the leader steps
//! down at the first heartbeat answer that carries that higher term — every partial fault became
//! an election, and every election unavailability (the chaos suite counted 17 terms for one
//! isolated follower in 4 s). So a voter campaigns only while it reaches a majority of the voters,
//! itself included: every voter pings the others every heartbeat, and the gate switches
//! openraft's timer elections (`runtime_config().elect`) on only while enough answers are fresh.
//!
//! Not campaigning never endangers safety, only availability; the gate reacts within
//! `FRESH_HEARTBEATS + 1` heartbeats, well before the first election timer can fire after a cut
//! (`election_timeout_max` as leader lease plus a random election timeout). Voting for others,
//! and a leader's work, are untouched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::Raft;

use crate::transport::{Json, Transport, PING};
use crate::type_config::TypeConfig;
use crate::worker::Worker;

/// An answer is fresh for this many heartbeats.
const FRESH_HEARTBEATS: u32 = 5;

pub(crate) struct ElectionGate {
    raft: Raft<TypeConfig>,
    transport: Arc<Transport>,
    node_id: u64,
    every: Duration,
    /// When each other voter last answered a ping.
    answered: Arc<Mutex<HashMap<u64, Instant>>>,
    /// What the gate last told openraft (it starts with elections on).
    elections: bool,
    tick: tokio::time::Interval,
}

impl ElectionGate {
    pub(crate) fn new(raft: Raft<TypeConfig>, transport: Arc<Transport>, node_id: u64, heartbeat: Duration) -> Self {
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            raft,
            transport,
            node_id,
            every: heartbeat,
            answered: Arc::new(Mutex::new(HashMap::new())),
            elections: true,
            tick,
        }
    }
}

/// Whether `reached` voters (this one included) out of `voters` are a majority.
pub(crate) fn majority(reached: usize, voters: usize) -> bool {
    reached * 2 > voters
}

impl Worker for ElectionGate {
    fn name(&self) -> &'static str {
        "election-gate"
    }

    async fn work(&mut self) -> Result<(), String> {
        let voters: Vec<u64> = self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        if !voters.contains(&self.node_id) {
            return Ok(()); // a learner never campaigns
        }
        let fresh = self.every * FRESH_HEARTBEATS;
        for &peer in voters.iter().filter(|&&v| v != self.node_id) {
            // In the background: a round must not wait for a peer that does not answer.
            let (transport, answered) = (self.transport.clone(), self.answered.clone());
            tokio::spawn(async move {
                if PING.call(&transport, peer, &Json(()), fresh).await.is_ok() {
                    answered.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, Instant::now());
                }
            });
        }
        let reached = 1 + {
            let answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
            voters.iter().filter(|v| answered.get(v).is_some_and(|t| t.elapsed() <= fresh)).count()
        };
        let elections = majority(reached, voters.len());
        if elections != self.elections {
            self.raft.runtime_config().elect(elections);
            self.elections = elections;
            if elections {
                tracing::info!(reached, voters = voters.len(), "a majority of voters answers again: elections on");
            } else {
                tracing::warn!(
                    reached,
                    voters = voters.len(),
                    "fewer than a majority of voters answer: this hub will not campaign"
                );
            }
        }
        Ok(())
    }

    async fn wait(&mut self) {
        self.tick.tick().await;
    }
}

/// Answers the gate's pings of other voters; called once at boot.
pub(crate) fn serve(transport: &Transport) {
    PING.serve(transport, |_from, Json(())| async { Ok(Json(())) });
}

#[cfg(test)]
mod tests {
    use super::majority;

    #[test]
    fn a_majority_counts_this_voter() {
        assert!(majority(1, 1), "a single voter always may");
        assert!(!majority(1, 2) && majority(2, 2));
        assert!(!majority(1, 3) && majority(2, 3));
        assert!(!majority(2, 5) && majority(3, 5));
    }
}
