//! The lease: whether this hub may still act for its instances without asking the mesh. A leader
//! holds it while a quorum acknowledged it within the lease (dated by [`QuorumAckWatch`]). A
//! follower's lease is borrowed from its leader's, and outlasts it by no more than the append's
//! way from the leader's lease slot to this hub (a dial or stream credit can add to it; the
//! leader marks a follower down a whole `node_down` after it last reached it):
//! - each append carries how old the leader's last quorum acknowledgement was when it sent it
//!   ([`LeaderAppend`](crate::transport::LeaderAppend)), and the follower dates its lease that
//!   much before it took the append. A leader cut off from its quorum keeps sending (openraft 0.9
//!   has no check-quorum step-down), and the followers on its side of a split would otherwise keep
//!   their leases for as long as it does — after the majority re-placed their tasks;
//! - it runs from an append only once this hub has applied what that append said was committed.
//!   A hub back from a pause or a partition takes appends at once; it must not answer from an
//!   instance whose re-placement the mesh committed meanwhile and it has not applied yet. Until
//!   then the lease runs from the last append whose committed prefix it had applied (in steady
//!   state, the one before).
//!
//! Entries this hub took at all (the election gate's "hears a leader") are
//! [`LeaderContact`](crate::contact::LeaderContact)'s; snapshots feed only that, not the lease (a
//! hub that needs one is too far behind to answer for anything).
//!
//! [`QuorumAckWatch`]: crate::contact::QuorumAckWatch

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::Raft;

use crate::type_config::TypeConfig;

/// Whether this hub holds a lease from the leader it knows now (itself, leading) within `within`,
/// on monotonic time, with its log applied as far as that lease needs.
pub(crate) fn holds(raft: &Raft<TypeConfig>, lease: &Lease, within: Duration) -> bool {
    // Called on every local invocation: read the metrics in place rather than clone them.
    let (leader, applied) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let Some(leader) = m.current_leader else { return false };
        (leader, applied(&m))
    };
    lease.runs_from(leader, applied).is_some_and(|at| at.elapsed() <= within)
}

/// The index up to which this hub has applied its log.
pub(crate) fn applied(m: &openraft::RaftMetrics<u64, crate::type_config::NodeAddr>) -> u64 {
    m.last_applied.map_or(0, |a| a.index)
}

/// The lease this hub holds, or is about to.
#[derive(Clone, Default)]
pub(crate) struct Lease(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    held: Option<Held>,
    /// The latest start of a lease that counted, from any leader: how long ago the lease ran out
    /// is counted from here, also while a new leader has nothing to lend yet.
    last: Option<Instant>,
}

/// A lease from one leader (this hub, when it leads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) leader: u64,
    /// Where the lease runs from; `None`: the leader had no quorum acknowledgement to lend.
    pub(crate) from: Option<Instant>,
    /// A later start, which counts once this hub has applied the log up to this index. The
    /// oldest one not yet covered is kept (a newer one would move the goal on every append under
    /// a steady load, and the lease would never advance).
    pub(crate) pending: Option<(Instant, u64)>,
}

impl Lease {
    /// This hub leads and a quorum acknowledged it at `at`.
    pub(crate) fn led(&self, me: u64, at: Instant) {
        let mut s = self.lock();
        s.held = Some(Held { leader: me, from: Some(at), pending: None });
        s.last = s.last.max(Some(at));
    }

    /// This hub took an append from `leader` at `now`; the leader's quorum acknowledgement was
    /// `leader_age` old when it sent it, and it had committed the log up to `committed`; this hub
    /// has applied up to `applied`.
    pub(crate) fn took(&self, leader: u64, now: Instant, leader_age: Option<Duration>, committed: u64, applied: u64) {
        let mut s = self.lock();
        let h = took(s.held, leader, now, leader_age, committed, applied);
        s.held = Some(h);
        s.last = s.last.max(h.from);
    }

    /// Where the lease from `leader` runs from, with this hub's log applied up to `applied`.
    pub(crate) fn runs_from(&self, leader: u64, applied: u64) -> Option<Instant> {
        self.current(applied).filter(|h| h.leader == leader).and_then(|h| h.from)
    }

    /// How long ago the latest lease that counted (from any leader) began; `None`: there never
    /// was one.
    pub(crate) fn age(&self, applied: u64) -> Option<Duration> {
        self.current(applied);
        self.lock().last.map(|at| at.elapsed())
    }

    /// How old this hub's own quorum acknowledgement is, while it leads (what its appends lend).
    pub(crate) fn own_age(&self, me: u64) -> Option<Duration> {
        self.lock().held.filter(|h| h.leader == me).and_then(|h| h.from).map(|at| at.elapsed())
    }

    fn current(&self, applied: u64) -> Option<Held> {
        let mut s = self.lock();
        s.held = s.held.map(|h| settle(h, applied));
        s.last = s.last.max(s.held.and_then(|h| h.from));
        s.held
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `h` once the log is applied up to `applied`: a pending start that is now covered counts. Pure.
pub(crate) fn settle(h: Held, applied: u64) -> Held {
    match h.pending {
        Some((at, index)) if applied >= index => Held { from: Some(at), pending: None, ..h },
        _ => h,
    }
}

/// The lease after an append from `leader` taken at `now` (see [`Lease::took`]). Pure.
pub(crate) fn took(
    prev: Option<Held>,
    leader: u64,
    now: Instant,
    leader_age: Option<Duration>,
    committed: u64,
    applied: u64,
) -> Held {
    let h = match prev {
        Some(h) if h.leader == leader => settle(h, applied),
        _ => Held { leader, from: None, pending: None },
    };
    match leader_age.and_then(|age| now.checked_sub(age)) {
        // The leader has nothing to lend (no quorum acknowledgement yet, or it lost its quorum
        // long enough ago that the age does not fit in this clock): whatever this hub held from
        // it is no longer backed.
        None => Held { from: None, pending: None, ..h },
        Some(from) if applied >= committed => Held { from: Some(from), pending: None, ..h },
        Some(_) if h.pending.is_some() => h,
        Some(from) => Held { pending: Some((from, committed)), ..h },
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{settle, took, Held, Lease};

    #[test]
    fn a_follower_lease_runs_from_the_leaders_own_quorum_acknowledgement() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let h = took(None, 1, now, Some(ms(40)), 7, 7);
        assert_eq!(h, Held { leader: 1, from: Some(now - ms(40)), pending: None });
        // A leader cut off from its quorum: its acknowledgement ages, and so does the lease.
        let later = now + ms(600);
        let h = took(Some(h), 1, later, Some(ms(640)), 7, 7);
        assert_eq!(h.from, Some(now - ms(40)), "no younger than the leader's own");
        // A leader with nothing to lend takes back what this hub held from it.
        assert_eq!(took(Some(h), 1, later, None, 7, 7).from, None);
    }

    #[test]
    fn a_lease_counts_only_once_what_the_append_said_was_committed_is_applied() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let old = took(None, 1, now, Some(ms(0)), 5, 5);
        // Back from a pause: the mesh committed up to 9 meanwhile (a re-placement, say).
        let back = now + ms(3000);
        let h = took(Some(old), 1, back, Some(ms(10)), 9, 5);
        assert_eq!(h.from, Some(now), "still the old start, long run out");
        assert_eq!(h.pending, Some((back - ms(10), 9)));
        assert_eq!(settle(h, 8).from, Some(now), "not applied far enough");
        assert_eq!(settle(h, 9), Held { leader: 1, from: Some(back - ms(10)), pending: None });
        // In steady state the next append settles the one before it.
        let next = took(Some(h), 1, back + ms(30), Some(ms(10)), 11, 9);
        assert_eq!(next.from, Some(back - ms(10)));
        assert_eq!(next.pending, Some((back + ms(20), 11)));
        // Under a load that keeps the applied index behind each append's commit, the oldest
        // pending start is kept until it is covered, so the lease still moves on.
        let busy = took(Some(next), 1, back + ms(60), Some(ms(10)), 13, 10);
        assert_eq!(busy.pending, Some((back + ms(20), 11)), "not pushed on to 13");
        let busy = took(Some(busy), 1, back + ms(90), Some(ms(10)), 15, 12);
        assert_eq!(busy.from, Some(back + ms(20)));
        assert_eq!(busy.pending, Some((back + ms(80), 15)));
    }

    #[test]
    fn a_lease_belongs_to_one_leader() {
        let now = Instant::now();
        let lease = Lease::default();
        lease.took(1, now, Some(Duration::ZERO), 3, 3);
        assert_eq!(lease.runs_from(1, 3), Some(now));
        assert_eq!(lease.runs_from(2, 3), None, "another leader's lease does not count");
        // A new leader's first append, before it has a quorum's acknowledgement of its own: no
        // lease from it yet, but the last one still dates how long ago the lease ran out.
        let later = now + Duration::from_millis(50);
        lease.took(2, later, None, 3, 3);
        assert_eq!((lease.runs_from(1, 3), lease.runs_from(2, 3)), (None, None));
        let since = now.elapsed();
        assert!(lease.age(3).unwrap() >= since, "from the last lease that counted");
        assert_eq!(lease.own_age(2), None, "a follower lends nothing");
        lease.led(3, now);
        assert_eq!(lease.runs_from(3, 0), Some(now));
        assert!(lease.own_age(3).is_some() && lease.age(0).is_some());
    }
}
