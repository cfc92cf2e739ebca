//! Who may speak on the gossip plane, and whether a message counts (pure; the swarm worker asks).
//! A member's PeerId derives from the Ed25519 key the replicated state recorded when it was
//! admitted; a message counts only if a member signed it, a member relayed it, it decodes, it
//! speaks for the hub that signed it, and it is newer than the last one seen from that hub.

use std::collections::HashMap;
use std::net::SocketAddr;

use hubmesh_consensus::{ClusterState, NodeId};
use hubmesh_proto::{pb, Message as _};
use libp2p::multiaddr::Protocol;
use libp2p::{identity, Multiaddr, PeerId};

/// The PeerId of the hub whose Ed25519 public key is `public_key_hex` (None if it is not one).
pub(crate) fn peer_id_of(public_key_hex: &str) -> Option<PeerId> {
    let raw = hex::decode(public_key_hex).ok()?;
    let key = identity::ed25519::PublicKey::try_from_bytes(&raw).ok()?;
    Some(identity::PublicKey::from(key).to_peer_id())
}

/// A TCP multiaddr for `addr`.
pub(crate) fn multiaddr_of(addr: SocketAddr) -> Multiaddr {
    Multiaddr::from(addr.ip()).with(Protocol::Tcp(addr.port()))
}

/// The members of the mesh as the gossip plane sees them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Members {
    by_peer: HashMap<PeerId, NodeId>,
    /// The other members' gossip addresses, to dial.
    addrs: Vec<(PeerId, Multiaddr)>,
}

impl Members {
    /// From the replicated state: every hub with a recorded key (removed hubs are not in it).
    pub(crate) fn of(state: &ClusterState, me: NodeId) -> Self {
        let mut m = Self::default();
        for n in state.nodes.values() {
            let Some(peer) = peer_id_of(&n.public_key) else { continue };
            m.by_peer.insert(peer, n.id);
            if n.id != me {
                if let Ok(addr) = n.gossip_addr.parse::<SocketAddr>() {
                    m.addrs.push((peer, multiaddr_of(addr)));
                }
            }
        }
        m
    }

    /// The member a PeerId belongs to.
    pub(crate) fn node_of(&self, peer: &PeerId) -> Option<NodeId> {
        self.by_peer.get(peer).copied()
    }

    /// Every member's PeerId (this hub's too).
    pub(crate) fn peers(&self) -> impl Iterator<Item = &PeerId> {
        self.by_peer.keys()
    }

    /// The other members with a gossip address.
    pub(crate) fn dial_targets(&self) -> &[(PeerId, Multiaddr)] {
        &self.addrs
    }
}

/// What becomes of a received message.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Delivered and forwarded: it came from `NodeId`.
    Accept(NodeId, pb::GossipMessage),
    /// Dropped and not forwarded: it breaks a rule no member's message breaks.
    Reject(&'static str),
    /// Dropped without penalty (a replay, or an old message relayed late).
    Ignore(&'static str),
}

/// Judges a message signed by `source`, relayed by `via`, against the members and the last
/// sequence number seen from each (updated on acceptance).
pub(crate) fn judge(
    members: &Members,
    last_seq: &mut HashMap<NodeId, u64>,
    source: Option<&PeerId>,
    via: &PeerId,
    data: &[u8],
) -> Verdict {
    let Some(signer) = source.and_then(|s| members.node_of(s)) else {
        return Verdict::Reject("not signed by a member");
    };
    if members.node_of(via).is_none() {
        return Verdict::Reject("relayed by a non-member");
    }
    let Ok(msg) = pb::GossipMessage::decode(data) else { return Verdict::Reject("does not decode") };
    if msg.node != signer.0 {
        return Verdict::Reject("speaks for another hub");
    }
    match msg.body {
        None => return Verdict::Reject("says nothing"),
        // Device messages merge by their own versions, so a late or repeated one changes
        // nothing: only loads (the latest wins) must be newer than the last one.
        Some(pb::gossip_message::Body::Sightings(_) | pb::gossip_message::Body::Digest(_)) => {
            return Verdict::Accept(signer, msg)
        }
        Some(pb::gossip_message::Body::Load(_)) => {}
    }
    let last = last_seq.entry(signer).or_insert(0);
    if msg.seq <= *last {
        return Verdict::Ignore("not newer than the last one from its hub");
    }
    *last = msg.seq;
    Verdict::Accept(signer, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubmesh_consensus::state::{NodeRecord, NodeStatus};

    fn key() -> identity::Keypair {
        identity::Keypair::generate_ed25519()
    }

    fn hex_of(k: &identity::Keypair) -> String {
        hex::encode(k.public().try_into_ed25519().unwrap().to_bytes())
    }

    fn state(keys: &[(u64, &identity::Keypair)]) -> ClusterState {
        let mut s = ClusterState::default();
        for (id, k) in keys {
            s.nodes.insert(
                NodeId(*id),
                NodeRecord {
                    id: NodeId(*id),
                    name: format!("n{id}"),
                    api_addr: String::new(),
                    mesh_addr: String::new(),
                    labels: Default::default(),
                    slots: 1,
                    memory_bytes: 1,
                    witness: false,
                    cert_fingerprint: String::new(),
                    status: NodeStatus::Up,
                    gossip_addr: format!("127.0.0.1:{}", 7000 + id),
                    public_key: hex_of(k),
                },
            );
        }
        s
    }

    fn load(node: u64, seq: u64) -> Vec<u8> {
        let body = pb::gossip_message::Body::Load(pb::LoadReport::default());
        pb::GossipMessage { node, seq, body: Some(body) }.encode_to_vec()
    }

    #[test]
    fn a_members_message_counts_once_and_only_for_itself() {
        let (a, b, stranger) = (key(), key(), key());
        let members = Members::of(&state(&[(1, &a), (2, &b)]), NodeId(1));
        assert_eq!(members.dial_targets().len(), 1, "the other member, not this hub");
        let (pa, pb_, ps) = (a.public().to_peer_id(), b.public().to_peer_id(), stranger.public().to_peer_id());
        let mut last = HashMap::new();
        assert!(matches!(judge(&members, &mut last, Some(&pb_), &pb_, &load(2, 5)), Verdict::Accept(NodeId(2), _)));
        // Replayed, or older: ignored.
        assert_eq!(
            judge(&members, &mut last, Some(&pb_), &pa, &load(2, 5)),
            Verdict::Ignore("not newer than the last one from its hub")
        );
        assert!(matches!(judge(&members, &mut last, Some(&pb_), &pa, &load(2, 6)), Verdict::Accept(..)));
        // A member speaking for another, a stranger's message, a stranger relaying, garbage.
        assert_eq!(
            judge(&members, &mut last, Some(&pb_), &pb_, &load(1, 9)),
            Verdict::Reject("speaks for another hub")
        );
        assert_eq!(judge(&members, &mut last, Some(&ps), &pb_, &load(2, 9)), Verdict::Reject("not signed by a member"));
        assert_eq!(judge(&members, &mut last, None, &pb_, &load(2, 9)), Verdict::Reject("not signed by a member"));
        assert_eq!(
            judge(&members, &mut last, Some(&pb_), &ps, &load(2, 9)),
            Verdict::Reject("relayed by a non-member")
        );
        assert_eq!(judge(&members, &mut last, Some(&pb_), &pb_, b"\xff\xff\xff"), Verdict::Reject("does not decode"));
        let empty = pb::GossipMessage { node: 2, seq: 10, body: None }.encode_to_vec();
        assert_eq!(judge(&members, &mut last, Some(&pb_), &pb_, &empty), Verdict::Reject("says nothing"));
        assert_eq!(last.get(&NodeId(2)), Some(&6), "a refused message moves nothing");
        // A device message is judged by its signer, never by its place in the sequence: its
        // sightings carry their own versions.
        let digest = pb::gossip_message::Body::Digest(pb::DeviceDigest::default());
        let late = pb::GossipMessage { node: 2, seq: 3, body: Some(digest) }.encode_to_vec();
        assert!(matches!(judge(&members, &mut last, Some(&pb_), &pb_, &late), Verdict::Accept(NodeId(2), _)));
        let forged =
            pb::GossipMessage { node: 1, seq: 3, body: Some(pb::gossip_message::Body::Digest(Default::default())) };
        assert_eq!(
            judge(&members, &mut last, Some(&pb_), &pb_, &forged.encode_to_vec()),
            Verdict::Reject("speaks for another hub")
        );
        assert_eq!(last.get(&NodeId(2)), Some(&6), "device messages leave the load sequence alone");
    }

    #[test]
    fn a_hub_without_a_recorded_key_is_no_member() {
        let a = key();
        let mut s = state(&[(1, &a)]);
        s.nodes.get_mut(&NodeId(1)).unwrap().public_key = "not hex".into();
        assert_eq!(Members::of(&s, NodeId(2)), Members::default());
        assert_eq!(peer_id_of(&hex_of(&a)), Some(a.public().to_peer_id()));
    }
}
