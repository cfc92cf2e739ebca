//! Elections only where they can succeed, and only where they are needed. openraft 0.9 has no
//! pre-vote: a voter cut off from the others raises its term at every election timeout, and when
//! the cut heals the leader steps down at the first heartbeat answer that carries that higher
//! term — every partial fault became an election, and every election unavailability (the chaos
//! suite counted 17 terms for one isolated follower in 4 s). So, as pre-vote would, a voter
//! campaigns only while
//! - it reaches a majority of the voters, itself included: every voter pings the others every
//!   heartbeat; an answer is fresh for `min(FRESH_HEARTBEATS heartbeats, election_timeout_min)`;
//! - and a majority has lost the leader: each answer says whether the answering voter still
//!   hears one (it leads with a quorum, or it took Raft entries from its leader within
//!   `election_timeout_min`: [`LeaderContact`]); this voter counts as leaderless, since its own
//!   timer fires only when it is. A voter that only it cannot hear — one side of a bridge, a
//!   follower behind a lossy link — must not depose a leader the others still follow.
//!
//! The gate switches openraft's timer elections (`runtime_config().elect`) accordingly; openraft
//! starts with them off (a restarted voter's first tick would otherwise campaign before the
//! gate's first round). Not campaigning never endangers safety, only availability. When the
//! leader dies, the others stop hearing it after `election_timeout_min`, and the gate opens a
//! heartbeat or two later (a ping round, then a tick). It then campaigns itself
//! (`trigger().elect()`) once no leader's entries and no change of its vote came for the leader
//! lease (`election_timeout_max`, after which the others grant votes) plus a heartbeat plus a
//! fresh random share of `election_timeout_min` — instead of waiting for openraft's timer, which
//! adds an election timeout drawn once per process, so that two voters with close draws split
//! the vote round after round.
//! When a majority answers again after a cut, elections stay off until every voter has answered
//! (for a fresh answer's lifetime at most), and, once an answer says a leader may be alive (an
//! answering voter hears one or leads), until `election_timeout_max` after the return: the
//! leader's heartbeat must reach a returning voter (and reset its long-expired timer) before that
//! voter may campaign. Of the voters that lost the leader, one whose last log index is lower
//! than another's leaves the first campaign to that one for up to `election_timeout_min` (the
//! answers carry each voter's last log index and leader): its vote request would likely be
//! refused for its log, costing an election timeout (a voter that had just restarted and not
//! caught up went first and lost). Pings are not "hearing from the leader": they feed neither
//! the gate's leader contact nor the lease (`crate::lease`). One ping per peer in flight at a time. Voting for
//! others, and a leader's work, are untouched.
//!
//! A hub that leads a mesh of one (the only voter, no learners) has no one to send heartbeats
//! to and no election to gate: the gate switches openraft's tick off (`runtime_config().tick`)
//! and sleeps until Raft's metrics change (a proposal, a member joining): an idle hub on its own
//! then runs no Raft loop pass, metrics report, gate round or metrics watcher per tick (openraft's
//! tick task itself still wakes, and does nothing). Any change that adds a member — which only
//! this leader can commit — wakes it, and the tick comes back before the new member needs a
//! heartbeat. The lease of a voter alone needs no quorum's answer (`Consensus::holds_lease`,
//! [`hears_leader`](crate::contact::hears_leader)).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::Raft;

use crate::contact::{GateClock, LeaderContact, Peer, PeerAnswers};
use crate::transport::{Json, PingAnswer, Transport, PING};
use crate::type_config::TypeConfig;
use crate::worker::Worker;

/// An answer is fresh for this many heartbeats.
const FRESH_HEARTBEATS: u32 = 5;

/// A ping waits this long for its answer (a late answer still counts, from when it came; a
/// timeout drops the connection the peer's Raft traffic shares, so it must be rare).
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(1);

pub(crate) struct ElectionGate {
    raft: Raft<TypeConfig>,
    metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, crate::type_config::NodeAddr>>,
    /// This hub leads a mesh of one, and openraft's tick is off (see the module doc).
    solo: bool,
    transport: Arc<Transport>,
    node_id: u64,
    /// An answer older than this does not count.
    fresh: Duration,
    /// How long elections stay off after a majority answers again.
    hold: Duration,
    peers: PeerAnswers,
    clock: GateClock,
    /// What the gate last told openraft (openraft starts with elections off, see `Consensus`).
    elections: bool,
    /// A majority did not answer at the last tick.
    cut: bool,
    /// When a majority last answered again after a cut.
    back: Option<Instant>,
    /// Back from a cut: no elections before this.
    held_until: Option<Instant>,
    /// In a leaderless spell: campaign once no leader was heard and no vote seen for this long.
    campaign_at: Option<Duration>,
    /// This voter started its campaign for the current leaderless spell.
    campaigned: bool,
    /// This voter's vote as last seen, and since when.
    vote: Option<(openraft::Vote<u64>, Instant)>,
    election_min: Duration,
    /// openraft's leader lease (`election_timeout_max`): a voter refuses votes for this long
    /// after it last heard the leader.
    lease: Duration,
    heartbeat: Duration,
    contact: LeaderContact,
    tick: tokio::time::Interval,
}

/// The Raft timings the gate works with.
pub(crate) struct Timings {
    pub(crate) heartbeat: Duration,
    pub(crate) election_min: Duration,
    pub(crate) election_max: Duration,
}

impl ElectionGate {
    pub(crate) fn new(
        raft: Raft<TypeConfig>,
        transport: Arc<Transport>,
        contact: LeaderContact,
        peers: PeerAnswers,
        clock: GateClock,
        node_id: u64,
        t: Timings,
    ) -> Self {
        let mut tick = tokio::time::interval(t.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            metrics: raft.metrics(),
            solo: false,
            raft,
            transport,
            node_id,
            fresh: (t.heartbeat * FRESH_HEARTBEATS).min(t.election_min),
            hold: t.election_max,
            peers,
            clock,
            elections: false,
            cut: false,
            back: None,
            held_until: None,
            campaign_at: None,
            campaigned: false,
            vote: None,
            election_min: t.election_min,
            lease: t.election_max,
            heartbeat: t.heartbeat,
            contact,
            tick,
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Peer>> {
        self.peers.lock()
    }
}

/// Whether `reached` voters (this one included) out of `voters` are a majority.
pub(crate) fn majority(reached: usize, voters: usize) -> bool {
    reached * 2 > voters
}

/// Whether a voter may campaign, given the fresh answers of the other `voters` (each: whether
/// that voter hears a leader): a majority answers, and a majority has lost the leader. This voter
/// counts itself as leaderless without asking: openraft's timer, which the gate only lets
/// through, fires only when it has not heard a leader.
pub(crate) fn may_campaign(voters: usize, answers: &[bool]) -> bool {
    let leaderless = 1 + answers.iter().filter(|hears| !**hears).count();
    majority(1 + answers.len(), voters) && majority(leaderless, voters)
}

/// Whether a voter whose last log index is `mine` leaves the first campaign to another voter
/// that also lost the leader and has a longer log (its answer among `fresh`). Pure.
pub(crate) fn defers(mine: Option<u64>, fresh: &[(u64, PingAnswer)]) -> bool {
    fresh.iter().any(|(_, a)| !a.hears_leader && a.last_log_index > mine)
}

/// Whether this voter campaigns now, `quiet` into a leaderless spell: it has heard no leader
/// (`heard`: how long ago it last did; `None`: never since it started) and seen no change of vote
/// (`voted`: how long ago) for `quiet`; and if it `defers` to a longer log, for `election_min`
/// more (the other may be unable to win, or its gate shut). The vote's clock counts for a hub that
/// just restarted and has heard no leader yet: it must neither campaign at once nor skip the
/// deferral. Pure.
pub(crate) fn campaigns(
    quiet: Duration,
    election_min: Duration,
    heard: Option<Duration>,
    voted: Duration,
    defers: bool,
) -> bool {
    let silent = |d: Duration| heard.is_none_or(|h| h >= d) && voted >= d;
    silent(quiet) && (!defers || silent(quiet + election_min))
}

/// Back from a cut at `back` (`None`: not back from one): elections stay off until `back + hold`
/// once the answers say a leader may be alive. Asked each round of that window, not only the
/// first, since the answers arrive one by one. Pure.
pub(crate) fn hold_after_cut(
    back: Option<Instant>,
    hold: Duration,
    now: Instant,
    fresh: &[(u64, PingAnswer)],
) -> Option<Instant> {
    back.map(|b| b + hold).filter(|end| now < *end && leader_may_live(fresh))
}

/// Whether a voter back from a cut at `back` still waits for the answers of all `voters` (it has
/// `answered`, itself included) before it may campaign, for `grace` at most. Pure.
pub(crate) fn awaits_answers(
    back: Option<Instant>,
    grace: Duration,
    now: Instant,
    answered: usize,
    voters: usize,
) -> bool {
    back.is_some_and(|b| now < b + grace) && answered < voters
}

/// Whether the answers (by voter) say a leader may be alive: one hears a leader, or one names
/// itself leader. Pure.
pub(crate) fn leader_may_live(fresh: &[(u64, PingAnswer)]) -> bool {
    fresh.iter().any(|(voter, a)| a.hears_leader || a.leader == Some(*voter))
}

impl Worker for ElectionGate {
    fn name(&self) -> &'static str {
        "election-gate"
    }

    async fn work(&mut self) -> Result<(), String> {
        let (voters, solo) = {
            let m = self.metrics.borrow_and_update();
            let membership = m.membership_config.membership();
            let voters: Vec<u64> = membership.voter_ids().collect();
            let solo = leads_alone(self.node_id, &voters, membership.learner_ids().count(), m.current_leader);
            (voters, solo)
        };
        if solo != self.solo {
            self.raft.runtime_config().tick(!solo);
            self.solo = solo;
            tracing::debug!(solo, "openraft's tick is {}", if solo { "off: this hub leads alone" } else { "on" });
        }
        if let Some(gap) = self.clock.round(Instant::now()) {
            // This hub itself stood still (a pause, a starved CPU): until a ping round has passed,
            // it judges no one silent and does not count itself cut off.
            tracing::info!(?gap, "the election gate ran late; this hub's view of its peers is stale for a ping round");
        }
        // Only the voters this hub pings now have answers to go by (`Consensus::silent_for`).
        let asks = !solo && voters.contains(&self.node_id);
        self.peers().retain(|peer, _| asks && voters.contains(peer));
        if solo {
            return Ok(());
        }
        if !voters.contains(&self.node_id) {
            return Ok(()); // a learner never campaigns
        }
        for &peer in voters.iter().filter(|&&v| v != self.node_id) {
            let mut peers = self.peers();
            let p = peers.entry(peer).or_default();
            if p.in_flight {
                continue;
            }
            p.asked(Instant::now());
            drop(peers);
            // In the background: a round must not wait for a peer that does not answer.
            let (transport, all) = (self.transport.clone(), self.peers.clone());
            tokio::spawn(async move {
                let answer = PING.call(&transport, peer, &Json(()), PING_TIMEOUT).await;
                let mut all = all.lock();
                // Not recreated if the gate stopped asking meanwhile (it is no voter any more).
                if let Some(p) = all.get_mut(&peer) {
                    p.in_flight = false;
                    if let Ok(Json(a)) = answer {
                        p.answered = Some((Instant::now(), a));
                    }
                }
            });
        }
        // The fresh answers of the other voters, by voter.
        let fresh: Vec<(u64, PingAnswer)> = {
            let peers = self.peers();
            voters
                .iter()
                .filter_map(|v| Some((*v, peers.get(v)?.answered?)))
                .filter(|(_, (at, _))| at.elapsed() <= self.fresh)
                .map(|(v, (_, a))| (v, a))
                .collect()
        };
        // Whether each voter that answered freshly hears a leader.
        let answers: Vec<bool> = fresh.iter().map(|(_, a)| a.hears_leader).collect();
        let reach = majority(1 + answers.len(), voters.len());
        if !reach {
            self.cut = true;
            self.back = None;
            self.held_until = None;
        } else if self.cut {
            self.cut = false;
            self.back = Some(Instant::now());
        }
        // Back from a cut: the leader's heartbeat first — if a leader may be alive: an answering
        // voter hears one, or leads (it answers, so it will send heartbeats; after a cut of the
        // whole mesh its quorum is too old for it to say it hears itself). When neither holds
        // (the leader died while this voter heard from too few, say a peer that had just
        // restarted), there is no heartbeat to wait for.
        // The answers come one by one: until every voter has answered, or for `fresh` at most (a
        // voter may be dead), elections stay off, so that a leader whose answer comes last is not
        // deposed by a campaign decided on the others'.
        let now = Instant::now();
        if self.held_until.is_none() {
            self.held_until = hold_after_cut(self.back, self.hold, now, &fresh);
        }
        let held = self.held_until.is_some_and(|t| now < t)
            || awaits_answers(self.back, self.fresh, now, fresh.len() + 1, voters.len());
        let open = !held && may_campaign(voters.len(), &answers);
        // Campaign as soon as the others' leases have run out (they heard the leader when this
        // voter last did), rather than after openraft's lease plus its election timeout, which
        // it draws once at start — two voters whose draws are close split the vote round after
        // round. A fresh random delay per leaderless spell keeps two campaigns apart.
        let elections = open;
        if !open {
            self.campaign_at = None;
        } else if self.campaign_at.is_none() {
            let jitter = self.election_min.mul_f64(rand::random::<f64>());
            self.campaign_at = Some(self.lease + self.heartbeat + jitter);
            self.campaigned = false;
        }
        // A vote seen changes the clock as a leader's entries do (openraft's lease does the
        // same): a leader that was just deposed, or a voter that just restarted, has heard no
        // entries from the new leader yet, and must not depose it at once.
        let vote = self.raft.metrics().borrow().vote;
        if self.vote.as_ref().is_none_or(|(v, _)| *v != vote) {
            self.vote = Some((vote, Instant::now()));
        }
        let voted = self.vote.as_ref().map_or(Duration::ZERO, |(_, at)| at.elapsed());
        // A voter with a longer log would likely refuse this one's vote request (openraft
        // compares term and index; the answers carry the index), and the failed campaign would
        // cost this voter an election timeout: the longer log campaigns first — for at most
        // `election_min` more, after which this voter campaigns anyway (the other may be unable
        // to win, or its gate shut).
        let mine = self.raft.metrics().borrow().last_log_index;
        if let Some(quiet) = self.campaign_at.filter(|_| !self.campaigned) {
            let heard = self.contact.since();
            if campaigns(quiet, self.election_min, heard, voted, defers(mine, &fresh)) {
                self.campaigned = true;
                tracing::info!(voters = voters.len(), "a majority lost the leader: campaigning");
                self.raft.trigger().elect().await.map_err(|e| e.to_string())?;
            }
        }
        if elections != self.elections {
            self.raft.runtime_config().elect(elections);
            self.elections = elections;
            tracing::debug!(answers = ?answers, voters = voters.len(), held, elections, "election gate");
            if !reach {
                tracing::warn!(
                    answered = answers.len(),
                    voters = voters.len(),
                    "fewer than a majority of voters answer: this hub will not campaign"
                );
            }
        }
        Ok(())
    }

    async fn wait(&mut self) {
        if !self.solo {
            self.tick.tick().await;
        } else if self.metrics.changed().await.is_err() {
            std::future::pending::<()>().await; // Raft is gone; shutdown stops this worker
        }
    }
}

/// Whether `me` leads a mesh of one: the only voter, no learners. Pure.
pub(crate) fn leads_alone(me: u64, voters: &[u64], learners: usize, leader: Option<u64>) -> bool {
    voters == [me] && learners == 0 && leader == Some(me)
}

/// Answers the gate's pings of other voters with `answer()` (whether this voter hears a leader
/// now, see [`hears_leader`](crate::contact::hears_leader)); called once at boot.
pub(crate) fn serve(transport: &Transport, answer: impl Fn() -> PingAnswer + Send + Sync + 'static) {
    let answer = Arc::new(answer);
    PING.serve(transport, move |_from, Json(())| {
        let answer = answer();
        async move { Ok(Json(answer)) }
    });
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{
        awaits_answers, campaigns, defers, hold_after_cut, leader_may_live, leads_alone, majority, may_campaign,
    };
    use crate::transport::PingAnswer;

    #[test]
    fn a_leader_may_live_if_an_answer_hears_one_or_one_leads() {
        let answer = |hears_leader, leader| PingAnswer { hears_leader, last_log_index: Some(1), leader };
        assert!(leader_may_live(&[(2, answer(true, Some(3)))]));
        assert!(leader_may_live(&[(2, answer(false, Some(2)))]), "a leader whose quorum is old still leads");
        assert!(!leader_may_live(&[(2, answer(false, Some(3)))]), "it names a leader that does not answer");
        assert!(!leader_may_live(&[(2, answer(false, None))]));
        assert!(!leader_may_live(&[]));
    }

    #[test]
    fn a_deferring_voter_waits_election_min_more_even_just_restarted() {
        let ms = Duration::from_millis;
        let (quiet, min) = (ms(1000), ms(300));
        assert!(campaigns(quiet, min, Some(ms(1000)), ms(5000), false));
        assert!(!campaigns(quiet, min, Some(ms(999)), ms(5000), false), "heard a leader too recently");
        assert!(!campaigns(quiet, min, Some(ms(5000)), ms(999), false), "saw a vote too recently");
        assert!(!campaigns(quiet, min, Some(ms(1200)), ms(5000), true), "a longer log goes first");
        assert!(!campaigns(quiet, min, Some(ms(5000)), ms(1200), true), "the vote's clock counts in the cap too");
        assert!(campaigns(quiet, min, Some(ms(1300)), ms(5000), true), "for election_min at most");
        // Just restarted: no leader heard since; its vote's clock started with it.
        assert!(!campaigns(quiet, min, None, ms(500), false));
        assert!(campaigns(quiet, min, None, ms(1000), false));
        assert!(!campaigns(quiet, min, None, ms(1000), true), "the restarted voter defers too");
        assert!(campaigns(quiet, min, None, ms(1300), true));
    }

    #[test]
    fn back_from_a_cut_the_hold_starts_when_a_leader_may_live_and_ends_on_time() {
        let answer = |hears_leader| (2, PingAnswer { hears_leader, last_log_index: Some(1), leader: None });
        let hold = Duration::from_millis(600);
        let back = Instant::now();
        assert_eq!(hold_after_cut(None, hold, back, &[answer(true)]), None, "not back from a cut");
        assert_eq!(hold_after_cut(Some(back), hold, back, &[answer(false)]), None, "no leader in sight");
        let later = back + Duration::from_millis(200);
        assert_eq!(
            hold_after_cut(Some(back), hold, later, &[answer(true)]),
            Some(back + hold),
            "an answer that hears the leader arrives a round later: held until the same end"
        );
        assert_eq!(hold_after_cut(Some(back), hold, back + hold, &[answer(true)]), None, "the window is over");
    }

    #[test]
    fn back_from_a_cut_a_voter_waits_for_every_answer_for_a_while() {
        let grace = Duration::from_millis(100);
        let back = Instant::now();
        assert!(awaits_answers(Some(back), grace, back, 2, 3), "the third voter may be the leader");
        assert!(!awaits_answers(Some(back), grace, back, 3, 3), "all answered: decide now");
        assert!(!awaits_answers(Some(back), grace, back + grace, 2, 3), "the third may be dead");
        assert!(!awaits_answers(None, grace, back, 2, 3), "not back from a cut");
    }

    #[test]
    fn the_longer_log_campaigns_first() {
        let answer = |hears_leader, last| (2, PingAnswer { hears_leader, last_log_index: last, leader: None });
        assert!(defers(Some(7), &[answer(false, Some(8))]), "the other one's vote would be refused");
        assert!(!defers(Some(8), &[answer(false, Some(8))]), "equal logs: both may");
        assert!(!defers(Some(9), &[answer(false, Some(8))]));
        assert!(!defers(Some(7), &[answer(true, Some(8))]), "one that still hears a leader does not campaign");
        assert!(!defers(Some(7), &[answer(false, None)]), "an older hub says nothing of its log");
        assert!(defers(None, &[answer(false, Some(0))]), "an empty log is the shortest");
        assert!(defers(Some(3), &[answer(false, Some(1)), answer(false, Some(4))]));
    }

    #[test]
    fn only_a_leader_without_other_members_is_alone() {
        assert!(leads_alone(1, &[1], 0, Some(1)));
        assert!(!leads_alone(1, &[1], 0, None), "not yet leader: the tick must run to elect it");
        assert!(!leads_alone(1, &[1], 1, Some(1)), "a learner needs heartbeats");
        assert!(!leads_alone(1, &[1, 2], 0, Some(1)));
        assert!(!leads_alone(1, &[2], 0, Some(2)), "a hub that is not the voter");
    }

    #[test]
    fn a_voter_campaigns_only_when_a_majority_lost_the_leader() {
        // Three voters: the answers of the two others (true: "I hear a leader").
        assert!(may_campaign(3, &[false, false]), "the leader is gone for everyone");
        assert!(may_campaign(3, &[false]), "two of three reached, both leaderless");
        assert!(!may_campaign(3, &[true]), "one side of a bridge: the bridge still hears the leader");
        assert!(!may_campaign(3, &[true, true]), "a lossy follower that alone missed heartbeats");
        assert!(!may_campaign(3, &[]), "cut off: no majority reached");
        // Five voters.
        assert!(may_campaign(5, &[false, false, true, true]));
        assert!(!may_campaign(5, &[false, true, true, true]));
        assert!(!may_campaign(5, &[false]), "two of five reached");
        assert!(may_campaign(1, &[]), "a single voter always may");
    }

    #[test]
    fn a_majority_counts_this_voter() {
        assert!(majority(1, 1), "a single voter always may");
        assert!(!majority(1, 2) && majority(2, 2));
        assert!(!majority(1, 3) && majority(2, 3));
        assert!(!majority(2, 5) && majority(3, 5));
    }
}
