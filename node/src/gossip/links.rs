//! One connection per member. Two hubs that dial each other at the same moment end up with two
//! connections; gossipsub uses one, but both would be kept (member connections never idle out)
//! and checked by `ping`. Both sides must close the same one without talking about it: the one
//! kept is the one dialled by the hub with the smaller PeerId.

use std::collections::HashMap;

use libp2p::swarm::ConnectionId;
use libp2p::PeerId;

/// The established connections of each peer, in the order they were established, each with
/// whether this hub dialled it.
#[derive(Default)]
pub(super) struct Links {
    open: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
}

impl Links {
    /// Records a new connection; returns the connections to `peer` to close (none while it has
    /// one).
    pub(super) fn established(
        &mut self,
        local: &PeerId,
        peer: PeerId,
        id: ConnectionId,
        dialled: bool,
    ) -> Vec<ConnectionId> {
        let conns = self.open.entry(peer).or_default();
        conns.push((id, dialled));
        redundant(local, &peer, conns)
    }

    pub(super) fn closed(&mut self, peer: &PeerId, id: ConnectionId) {
        if let Some(conns) = self.open.get_mut(peer) {
            conns.retain(|(c, _)| *c != id);
            if conns.is_empty() {
                self.open.remove(peer);
            }
        }
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
    fn both_sides_keep_the_connection_the_smaller_peer_dialled() {
        let (small, big) = pair();
        let (c1, c2) = (ConnectionId::new_unchecked(1), ConnectionId::new_unchecked(2));
        // c1: small dialled big; c2: big dialled small. Each side sees them in its own order.
        let mut at_small = Links::default();
        assert!(at_small.established(&small, big, c2, false).is_empty());
        assert_eq!(at_small.established(&small, big, c1, true), vec![c2]);
        let mut at_big = Links::default();
        assert!(at_big.established(&big, small, c1, false).is_empty());
        assert_eq!(at_big.established(&big, small, c2, true), vec![c2]);
    }

    #[test]
    fn two_dials_the_same_way_keep_the_first_and_a_closed_one_is_forgotten() {
        let (small, big) = pair();
        let (c1, c2, c3) =
            (ConnectionId::new_unchecked(1), ConnectionId::new_unchecked(2), ConnectionId::new_unchecked(3));
        let mut links = Links::default();
        assert!(links.established(&big, small, c1, true).is_empty());
        assert_eq!(links.established(&big, small, c2, true), vec![c2]);
        links.closed(&small, c2);
        links.closed(&small, c1);
        assert!(links.established(&big, small, c3, false).is_empty(), "alone again: kept");
    }
}
