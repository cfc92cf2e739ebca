//! One connection per member. Of two members only the smaller PeerId dials at first (`DIAL_DEFER`
//! in the worker), but two hubs may still dial each other at the same moment (after a partition
//! heals, both have been dialling) and end up with two connections; gossipsub uses one, but both would be kept (member connections never idle out)
//! and checked by `ping`. Both sides must close the same one without talking about it: the one
//! kept is the one dialled by the hub with the smaller PeerId. The other is closed only
//! [`SETTLE`] after it opened: gossipsub announces a hub's topics once per peer, on whichever
//! connection is ready first, and closing that connection at once could drop the announcement
//! unread (the peer would then never be sent anything).

use std::collections::HashMap;
use std::time::Duration;

use libp2p::swarm::ConnectionId;
use libp2p::PeerId;
use tokio::time::Instant;

/// How long a redundant connection stays open before it is closed.
pub(super) const SETTLE: Duration = Duration::from_secs(5);

/// The established connections of each peer, in the order they were established, each with
/// whether this hub dialled it; and the redundant ones waiting to be closed.
#[derive(Default)]
pub(super) struct Links {
    open: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
    closing: Vec<(Instant, ConnectionId)>,
}

impl Links {
    /// Records a new connection; a redundant one (to `peer`, which has another) is due to be
    /// closed [`SETTLE`] after `now`.
    pub(super) fn established(&mut self, local: &PeerId, peer: PeerId, id: ConnectionId, dialled: bool, now: Instant) {
        let conns = self.open.entry(peer).or_default();
        conns.push((id, dialled));
        for extra in redundant(local, &peer, conns) {
            if !self.closing.iter().any(|(_, c)| *c == extra) {
                self.closing.push((now + SETTLE, extra));
            }
        }
    }

    pub(super) fn closed(&mut self, peer: &PeerId, id: ConnectionId) {
        if let Some(conns) = self.open.get_mut(peer) {
            conns.retain(|(c, _)| *c != id);
            if conns.is_empty() {
                self.open.remove(peer);
            }
        }
        self.closing.retain(|(_, c)| *c != id);
    }

    /// When the next redundant connection is due to be closed.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.closing.iter().map(|(at, _)| *at).min()
    }

    /// The redundant connections due by `now`, to close.
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<ConnectionId> {
        let (due, later) = self.closing.drain(..).partition(|(at, _)| *at <= now);
        self.closing = later;
        due.into_iter().map(|(_, c)| c).collect()
    }
}

/// All of `conns` but one: the first dialled by the smaller of the two PeerIds, or, when none
/// was (two dials the same way), the first.
fn redundant(local: &PeerId, peer: &PeerId, conns: &[(ConnectionId, bool)]) -> Vec<ConnectionId> {
    if conns.len() < 2 {
        return Vec::new();
    }
    let want_dialled = local < peer;
    let keep = conns.iter().find(|(_, dialled)| *dialled == want_dialled).unwrap_or(&conns[0]).0;
    conns.iter().map(|(c, _)| *c).filter(|c| *c != keep).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (PeerId, PeerId) {
        let (a, b) = (PeerId::random(), PeerId::random());
        if a < b {
            (a, b)
        } else {
            (b, a)
        }
    }

    #[test]
    fn both_sides_close_the_connection_the_larger_peer_dialled_after_a_while() {
        let (small, big) = pair();
        let (c1, c2) = (ConnectionId::new_unchecked(1), ConnectionId::new_unchecked(2));
        let now = Instant::now();
        // c1: small dialled big; c2: big dialled small. Each side sees them in its own order.
        let mut at_small = Links::default();
        at_small.established(&small, big, c2, false, now);
        assert_eq!(at_small.next_due(), None, "one connection: kept");
        at_small.established(&small, big, c1, true, now);
        assert_eq!(at_small.next_due(), Some(now + SETTLE));
        assert!(at_small.take_due(now).is_empty(), "not at once: the topics are still being announced");
        assert_eq!(at_small.take_due(now + SETTLE), vec![c2]);
        let mut at_big = Links::default();
        at_big.established(&big, small, c1, false, now);
        at_big.established(&big, small, c2, true, now);
        assert_eq!(at_big.take_due(now + SETTLE), vec![c2]);
        assert_eq!(at_big.next_due(), None);
    }

    #[test]
    fn two_dials_the_same_way_keep_the_first_and_a_closed_one_is_forgotten() {
        let (small, big) = pair();
        let (c1, c2, c3) =
            (ConnectionId::new_unchecked(1), ConnectionId::new_unchecked(2), ConnectionId::new_unchecked(3));
        let now = Instant::now();
        let mut links = Links::default();
        links.established(&big, small, c1, true, now);
        links.established(&big, small, c2, true, now);
        // It closed by itself before it was due: nothing left to close.
        links.closed(&small, c2);
        assert_eq!(links.next_due(), None);
        links.closed(&small, c1);
        links.established(&big, small, c3, false, now);
        assert!(links.take_due(now + SETTLE).is_empty(), "alone again: kept");
    }
}
