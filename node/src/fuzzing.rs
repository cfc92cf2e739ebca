//! Entry points for the fuzz targets (`fuzz/`): decoders of what the LAN and member hubs send,
//! without the rest of a hub. Not an API.

use hubmesh_consensus::NodeId;
use hubmesh_proto::{pb, Message as _};

use crate::devices::{goodbye, ssdp, Devices, MAX_SIGHTINGS};

/// One datagram or message about devices, read every way a hub reads one: as SSDP, as an mDNS
/// response (goodbyes), and as a member's gossip message merged into a registry (twice, as a
/// replay would), whose bounds must hold.
pub fn devices(data: &[u8]) {
    let _ = ssdp::parse(data);
    let _ = goodbye::pointers(data, goodbye::GROUP.port());
    let Ok(msg) = pb::GossipMessage::decode(data) else { return };
    let registry = Devices::new(NodeId(1), 1);
    for _ in 0..2 {
        match msg.body.clone() {
            Some(pb::gossip_message::Body::Sightings(s)) => {
                let _ = registry.merge_from(NodeId(2), s);
            }
            Some(pb::gossip_message::Body::Digest(d)) => registry.on_digest(&d),
            _ => {}
        }
    }
    let views = registry.view();
    assert!(views.len() <= MAX_SIGHTINGS, "a registry holds at most {MAX_SIGHTINGS} of one hub's sightings");
    let _ = registry.near();
}
