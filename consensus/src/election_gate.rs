//! Elections only where they can succeed. openraft 0.9 has no pre-vote: a voter cut off from the
//! others raises its term at every election timeout, and when the cut heals the leader steps
//! down at the first heartbeat answer that carries that higher term — every partial fault became
//! an election, and every election unavailability (the chaos suite counted 17 terms for one
//! isolated follower in 4 s). So a voter campaigns only while it reaches a majority of the voters,
//! itself included: every voter pings the others every heartbeat, and the gate switches
//! openraft's timer elections (`runtime_config().elect`) on only while enough answers are fresh.
//!
//! Not campaigning never endangers safety, only availability. The gate reacts within
//! `min(FRESH_HEARTBEATS heartbeats, election_timeout_min)` plus one heartbeat, before the first
//! election timer fires after a cut when this voter's vote is committed (`election_timeout_max`
//! as leader lease plus a random election timeout; a candidate's own timer is shorter). When a
//! majority answers again, elections stay off for `election_timeout_max` more: the leader's
//! heartbeat must reach a returning voter (and reset its long-expired timer) before that voter
//! may campaign, else its first election would depose the leader after all. Pings are not
//! "hearing from the leader": they do not feed the follower lease (`transport::server`). One
//! ping per peer in flight at a time. Voting for others, and a leader's work, are untouched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::Raft;

use crate::transport::{Json, Transport, PING};
use crate::type_config::TypeConfig;
use crate::worker::Worker;

/// An answer is fresh for this many heartbeats.
const FRESH_HEARTBEATS: u32 = 5;

/// A ping waits this long for its answer (a late answer still counts, from when it came; a
/// timeout drops the connection the peer's Raft traffic shares, so it must be rare).
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// What the gate knows of each other voter.
#[derive(Default)]
struct Peer {
    answered: Option<Instant>,
    in_flight: bool,
}

pub(crate) struct ElectionGate {
    raft: Raft<TypeConfig>,
    transport: Arc<Transport>,
    node_id: u64,
    /// An answer older than this does not count.
    fresh: Duration,
    /// How long elections stay off after a majority answers again.
    hold: Duration,
    peers: Arc<Mutex<HashMap<u64, Peer>>>,
    /// What the gate last told openraft (it starts with elections on).
    elections: bool,
    /// Since when a majority answers, while elections are still off.
    majority_since: Option<Instant>,
    tick: tokio::time::Interval,
}

/// The Raft timings the gate works with.
pub(crate) struct Timings {
    pub(crate) heartbeat: Duration,
    pub(crate) election_min: Duration,
    pub(crate) election_max: Duration,
}

impl ElectionGate {
    pub(crate) fn new(raft: Raft<TypeConfig>, transport: Arc<Transport>, node_id: u64, t: Timings) -> Self {
        let mut tick = tokio::time::interval(t.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            raft,
            transport,
            node_id,
            fresh: (t.heartbeat * FRESH_HEARTBEATS).min(t.election_min),
            hold: t.election_max,
            peers: Arc::new(Mutex::new(HashMap::new())),
            elections: true,
            majority_since: None,
            tick,
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
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
        for &peer in voters.iter().filter(|&&v| v != self.node_id) {
            let mut peers = self.peers();
            let p = peers.entry(peer).or_default();
            if p.in_flight {
                continue;
            }
            p.in_flight = true;
            drop(peers);
            // In the background: a round must not wait for a peer that does not answer.
            let (transport, all) = (self.transport.clone(), self.peers.clone());
            tokio::spawn(async move {
                let ok = PING.call(&transport, peer, &Json(()), PING_TIMEOUT).await.is_ok();
                let mut all = all.lock().unwrap_or_else(|p| p.into_inner());
                let p = all.entry(peer).or_default();
                p.in_flight = false;
                if ok {
                    p.answered = Some(Instant::now());
                }
            });
        }
        let reached = 1 + {
            let peers = self.peers();
            voters
                .iter()
                .filter(|v| peers.get(v).and_then(|p| p.answered).is_some_and(|t| t.elapsed() <= self.fresh))
                .count()
        };
        let majority = majority(reached, voters.len());
        self.majority_since = match (majority, self.majority_since) {
            (false, _) => None,
            (true, since) => Some(since.unwrap_or_else(Instant::now)),
        };
        let elections = match (self.elections, majority) {
            (_, false) => false,
            (true, true) => true,
            // Back from a cut: the leader's heartbeat first.
            (false, true) => self.majority_since.is_some_and(|t| t.elapsed() >= self.hold),
        };
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
