//! Whom this hub hears, on monotonic time: the leader whose Raft entries it took, or the quorum
//! that acknowledged it as leader ([`LeaderContact`], the election gate's "hears a leader"; the
//! lease is [`crate::lease`]'s), and which voters answered the gate's pings and when ([`PeerAnswers`]: a
//! peer that stopped answering is "silent", and the invocation router stops sending calls to it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::Raft;

use crate::lease::Lease;
use crate::transport::PingAnswer;
use crate::type_config::TypeConfig;
use crate::worker::Worker;

/// A silence counts only while this hub still asks: a peer it stopped pinging (no longer a voter,
/// or this hub leads alone) is not silent, just not asked; one it asks again after longer than
/// this starts a new silence.
pub(crate) const ASKED_WITHIN: Duration = Duration::from_secs(3);

/// What this hub knows of each other voter from the election gate's pings.
#[derive(Default)]
pub(crate) struct Peer {
    /// When it last answered, and its answer.
    pub(crate) answered: Option<(Instant, PingAnswer)>,
    /// When this hub began asking it, this time (the silence of a peer that has not answered since
    /// runs from here).
    pub(crate) first_asked: Option<Instant>,
    /// When this hub last sent it a ping.
    pub(crate) last_asked: Option<Instant>,
    pub(crate) in_flight: bool,
}

/// The election gate's ping answers, by voter; shared with the rest of the hub.
#[derive(Clone, Default)]
pub(crate) struct PeerAnswers(Arc<Mutex<HashMap<u64, Peer>>>);

impl PeerAnswers {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Peer>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long `peer` has not answered a ping (`None`: this hub does not ask it now).
    pub(crate) fn silent_for(&self, peer: u64) -> Option<Duration> {
        let now = Instant::now();
        self.lock().get(&peer).and_then(|p| silence(p, now))
    }
}

/// How long `p` has been silent at `now`: since its last answer or since this hub began asking
/// it, whichever is later; `None` if it was not asked within [`ASKED_WITHIN`]. Pure.
pub(crate) fn silence(p: &Peer, now: Instant) -> Option<Duration> {
    let asked = p.last_asked.filter(|at| now.saturating_duration_since(*at) <= ASKED_WITHIN)?;
    let since = p.answered.map(|(at, _)| at).into_iter().chain(p.first_asked).max().unwrap_or(asked);
    Some(now.saturating_duration_since(since))
}

/// When the election gate last ran a round, and when it last came back from a stall. This hub's
/// view of whom it hears is current only while the gate runs on time, and only once a full ping
/// round has passed since such a stall: a hub that was itself stopped (SIGSTOP, a VM pause, a
/// starved CPU) must not take the silence of the others during its own stop for theirs, nor its
/// own missed contact with the leader for a lost mesh.
#[derive(Clone)]
pub(crate) struct GateClock {
    rounds: Arc<Mutex<Rounds>>,
    /// A gap between rounds longer than this is a stall.
    stall: Duration,
    /// After a stall, the view is current again after this long (a ping's timeout and a round).
    settle: Duration,
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Rounds {
    pub(crate) last: Option<Instant>,
    pub(crate) resumed: Option<Instant>,
}

impl GateClock {
    /// For a gate that rounds every `heartbeat` and whose pings wait `ping_timeout` for an
    /// answer: a stall is ten rounds missed — and shorter than three election timeouts, which is
    /// less than the lease plus two election timeouts after which a hub counts as cut off.
    pub(crate) fn new(heartbeat: Duration, election_min: Duration, ping_timeout: Duration) -> Self {
        let stall = (heartbeat * 10).min(election_min * 3);
        Self { rounds: Arc::default(), stall, settle: ping_timeout + heartbeat }
    }

    /// The gate runs a round at `now`; `Some(gap)` if it comes back from a stall of `gap`.
    pub(crate) fn round(&self, now: Instant) -> Option<Duration> {
        let mut r = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
        let gap = r.last.map(|l| now.saturating_duration_since(l));
        *r = next_round(*r, now, self.stall);
        gap.filter(|_| r.resumed == Some(now))
    }

    /// Whether this hub's view of whom it hears is current at `now`.
    pub(crate) fn is_current(&self, now: Instant) -> bool {
        let r = *self.rounds.lock().unwrap_or_else(|p| p.into_inner());
        is_current(r, now, self.stall, self.settle)
    }
}

/// The rounds after one at `now`: a gap over `stall` since the last is a return from a stall. Pure.
pub(crate) fn next_round(r: Rounds, now: Instant, stall: Duration) -> Rounds {
    let stalled = r.last.is_some_and(|l| now.saturating_duration_since(l) > stall);
    Rounds { last: Some(now), resumed: if stalled { Some(now) } else { r.resumed } }
}

/// Whether the view is current at `now`: the last round is at most `stall` old, and the last
/// return from a stall at least `settle`. Pure.
pub(crate) fn is_current(r: Rounds, now: Instant, stall: Duration, settle: Duration) -> bool {
    r.last.is_some_and(|l| now.saturating_duration_since(l) <= stall)
        && r.resumed.is_none_or(|at| now.saturating_duration_since(at) >= settle)
}

impl Peer {
    /// This hub sends `self` a ping at `now`.
    pub(crate) fn asked(&mut self, now: Instant) {
        // Asked again after a pause (it was not a voter, or this hub led alone): an answer from
        // before is no evidence either way, and its age must not count as silence.
        if self.last_asked.is_none_or(|at| now.saturating_duration_since(at) > ASKED_WITHIN) {
            self.first_asked = Some(now);
        }
        self.last_asked = Some(now);
        self.in_flight = true;
    }
}

/// Whether the leader this hub follows has gone deaf to it: its entries still arrive, but it has
/// not answered this hub's pings for `after` while this hub's own view is current ([`GateClock`]).
/// Such a leader hears nothing this hub sends — its appends' answers included — and keeps this
/// hub's leader contact fresh with them (not its lease: the acknowledgement they lend ages) until
/// its transport gives up on the silent connection (`transport::silence`, 400 ms). Refusing its entries from `after` on lets this hub (and every
/// follower that sees the same) lose the leader sooner; the election gate still decides whether
/// to campaign, which needs a majority that lost the leader: a follower alone whose messages to
/// the leader are lost (a lossy or one-way link; its answers to the entries would be lost too)
/// refuses entries while that lasts, and deposes no one. Limits: the leader's appends and this
/// hub's pings travel on different connections (each hub calls on the one it dialled), so a
/// redial of this hub's own connection to a healthy leader also reads as deafness; and a leader
/// that restarts fast and keeps its vote is refused until a ping reaches its new process.
#[derive(Clone)]
pub(crate) struct DeafLeader {
    peers: PeerAnswers,
    clock: GateClock,
    after: Duration,
    /// Whether entries are being refused now (to log the start and the end of a refusal once).
    refusing: Arc<std::sync::atomic::AtomicBool>,
}

impl DeafLeader {
    pub(crate) fn new(peers: PeerAnswers, clock: GateClock, after: Duration) -> Self {
        Self { peers, clock, after, refusing: Arc::default() }
    }

    /// Whether entries from `leader` should be refused now.
    pub(crate) fn refuses(&self, leader: u64) -> bool {
        let now = Instant::now();
        let deaf =
            self.clock.is_current(now) && self.peers.lock().get(&leader).is_some_and(|p| deaf(p, now, self.after));
        if self.refusing.swap(deaf, std::sync::atomic::Ordering::Relaxed) != deaf {
            let silent = self.peers.silent_for(leader);
            tracing::info!(
                leader,
                deaf,
                ?silent,
                "the leader's entries are {}",
                if deaf { "refused: it does not answer pings" } else { "taken again" }
            );
        }
        deaf
    }
}

/// Whether `p` has not answered for `after` at `now` although it answered since this hub began
/// asking it (a peer not yet answered — a restart, a new dial — is no evidence of deafness). Pure.
pub(crate) fn deaf(p: &Peer, now: Instant, after: Duration) -> bool {
    let answered_this_time = p.answered.is_some_and(|(at, _)| p.first_asked.is_none_or(|f| at >= f));
    answered_this_time && silence(p, now).is_some_and(|s| s >= after)
}

/// When this hub last took Raft entries (or a snapshot) from a leader, and from which. This, not
/// any request, is "hearing the leader" for the gate (the lease has more to it: `crate::lease`): a hub whose Raft has
/// stopped or that was deposed may still forward calls and fetch pages.
#[derive(Clone, Default)]
pub(crate) struct LeaderContact(Arc<Mutex<Option<(u64, Instant)>>>);

impl LeaderContact {
    /// `leader` just sent entries this hub took.
    pub(crate) fn record(&self, leader: u64) {
        self.record_at(leader, Instant::now());
    }

    /// Evidence of `leader` dated `at` (this hub leading: a quorum's acknowledgement).
    pub(crate) fn record_at(&self, leader: u64, at: Instant) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((leader, at));
    }

    /// How long ago a leader last sent entries this hub took (`None`: never since it started).
    pub(crate) fn since(&self) -> Option<Duration> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).map(|(_, at)| at.elapsed())
    }

    /// Whether `leader` sent entries this hub took within `within`, on monotonic time.
    pub(crate) fn within(&self, leader: u64, within: Duration) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|(l, at)| l == leader && at.elapsed() <= within)
    }
}

/// Whether `me` has heard a leader within `within`: it leads and a quorum acknowledged it (as
/// [`QuorumAckWatch`] dated it), or the leader it follows sent it entries it took (see
/// [`LeaderContact`]). The election gate's test; the lease's is [`crate::lease::holds`].
pub(crate) fn hears_leader(raft: &Raft<TypeConfig>, contact: &LeaderContact, within: Duration) -> bool {
    // Called on every local invocation: read the metrics in place rather than clone them.
    let (leader, alone) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let Some(leader) = m.current_leader else { return false };
        let mut voters = m.membership_config.membership().voter_ids();
        (leader, leader == m.id && voters.next() == Some(m.id) && voters.next().is_none())
    };
    // The only voter hears itself: its tick is off (see `election_gate`'s module doc), so no quorum
    // acknowledgement dates the contact.
    alone || contact.within(leader, within)
}

/// Dates this hub's quorum acknowledgements while it leads, into its [`LeaderContact`] and its
/// [`Lease`], at every metrics report. openraft computes `millis_since_quorum_ack` only when it reports metrics (each
/// pass of its loop, at least every tick), so the value read later is as old as that report — and
/// frozen if the loop stalls (a disk flush that hangs): a lease taken from it would never run out.
pub(crate) struct QuorumAckWatch {
    pub(crate) metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, crate::type_config::NodeAddr>>,
    pub(crate) me: u64,
    pub(crate) contact: LeaderContact,
    pub(crate) lease: Lease,
}

impl Worker for QuorumAckWatch {
    fn name(&self) -> &'static str {
        "quorum-ack"
    }

    async fn work(&mut self) -> Result<(), String> {
        let acked = {
            let m = self.metrics.borrow_and_update();
            let ms = m.millis_since_quorum_ack.filter(|_| m.current_leader == Some(self.me));
            ms.and_then(|ms| Instant::now().checked_sub(Duration::from_millis(ms)))
        };
        if let Some(at) = acked {
            self.contact.record_at(self.me, at);
            self.lease.led(self.me, at);
        }
        Ok(())
    }

    async fn wait(&mut self) {
        if self.metrics.changed().await.is_err() {
            std::future::pending::<()>().await; // Raft is gone; shutdown stops this worker
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{deaf, is_current, next_round, silence, LeaderContact, Peer, Rounds};
    use crate::transport::PingAnswer;

    #[test]
    fn contact_is_dated_and_belongs_to_one_leader() {
        let c = LeaderContact::default();
        assert!(!c.within(1, Duration::from_secs(60)), "no contact yet");
        // A quorum acknowledgement 200 ms old, as the watcher dates it.
        c.record_at(1, Instant::now() - Duration::from_millis(200));
        assert!(!c.within(1, Duration::from_millis(100)), "too old for a 100 ms window");
        assert!(c.within(1, Duration::from_millis(300)));
        assert!(!c.within(2, Duration::from_millis(300)), "another leader's contact does not count");
        c.record(2);
        assert!(c.within(2, Duration::from_millis(100)) && !c.within(1, Duration::from_secs(60)));
    }

    #[test]
    fn a_peer_is_silent_since_its_last_answer_and_only_while_it_is_asked() {
        let now = Instant::now();
        let ago = |ms| now - Duration::from_millis(ms);
        let answer = PingAnswer { hears_leader: true, last_log_index: None, leader: None };
        let peer = |answered: Option<u64>, first: Option<u64>, last: Option<u64>| Peer {
            answered: answered.map(|ms| (ago(ms), answer)),
            first_asked: first.map(ago),
            last_asked: last.map(ago),
            in_flight: false,
        };
        assert_eq!(silence(&peer(Some(700), Some(9000), Some(30)), now), Some(Duration::from_millis(700)));
        assert_eq!(silence(&peer(None, Some(900), Some(30)), now), Some(Duration::from_millis(900)), "never answered");
        assert_eq!(silence(&peer(Some(5), Some(900), Some(5)), now), Some(Duration::from_millis(5)));
        assert_eq!(silence(&peer(Some(4000), Some(9000), Some(3500)), now), None, "no longer asked");
        assert_eq!(silence(&peer(None, None, None), now), None, "never asked");
        assert_eq!(silence(&peer(Some(60_000), Some(100), Some(30)), now), Some(Duration::from_millis(100)));
    }

    #[test]
    fn a_leader_is_deaf_once_it_stops_answering_pings_it_answered_before() {
        let now = Instant::now();
        let ago = |ms| now - Duration::from_millis(ms);
        let answer = PingAnswer { hears_leader: true, last_log_index: None, leader: None };
        let peer = |answered: Option<u64>, first: u64| Peer {
            answered: answered.map(|ms| (ago(ms), answer)),
            first_asked: Some(ago(first)),
            last_asked: Some(ago(10)),
            in_flight: true,
        };
        let after = Duration::from_millis(200);
        assert!(deaf(&peer(Some(250), 5000), now, after), "answered, then silent for 250 ms");
        assert!(!deaf(&peer(Some(150), 5000), now, after), "silent for less than the bound");
        assert!(!deaf(&peer(None, 5000), now, after), "never answered: no evidence");
        assert!(!deaf(&peer(Some(6000), 5000), now, after), "its only answer is from before this asking began");
        let mut not_asked = peer(Some(9000), 10_000);
        not_asked.last_asked = Some(ago(4000));
        assert!(!deaf(&not_asked, now, after), "not asked lately");
    }

    #[test]
    fn the_view_is_current_only_while_the_gate_runs_on_time_and_a_while_after_a_stall() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let (stall, settle) = (ms(300), ms(1030));
        assert!(!is_current(Rounds::default(), t0, stall, settle), "no round yet");
        let r = next_round(Rounds::default(), t0, stall);
        assert!(is_current(r, t0 + ms(300), stall, settle));
        assert!(!is_current(r, t0 + ms(301), stall, settle), "the gate stopped running: this hub may be stalled");
        let r = next_round(r, t0 + ms(30), stall);
        assert_eq!(r.resumed, None, "rounds on time");
        let back = t0 + ms(2030);
        let r = next_round(r, back, stall);
        assert_eq!(r.resumed, Some(back), "a 2 s gap is a stall");
        assert!(!is_current(r, back + ms(30), stall, settle), "a full ping round first");
        // Rounds on time again, every 30 ms.
        let mut r = r;
        for i in 1..=34 {
            r = next_round(r, back + ms(30 * i), stall);
        }
        assert_eq!(r.resumed, Some(back));
        assert!(!is_current(r, back + ms(1029), stall, settle));
        assert!(is_current(r, back + ms(1030), stall, settle));
    }

    #[test]
    fn asking_again_after_a_pause_starts_a_new_silence() {
        let now = Instant::now();
        let answer = PingAnswer { hears_leader: true, last_log_index: None, leader: None };
        let mut p = Peer {
            answered: Some((now - Duration::from_secs(60), answer)),
            first_asked: Some(now - Duration::from_secs(70)),
            last_asked: Some(now - Duration::from_secs(59)),
            in_flight: false,
        };
        assert_eq!(silence(&p, now), None, "not asked lately");
        p.asked(now);
        assert_eq!(silence(&p, now), Some(Duration::ZERO), "the old answer's age does not count");
        p.in_flight = false;
        let later = now + Duration::from_millis(500);
        p.asked(later);
        assert_eq!(p.first_asked, Some(now), "asked without a pause: the same silence goes on");
        assert_eq!(silence(&p, later), Some(Duration::from_millis(500)));
    }
}
