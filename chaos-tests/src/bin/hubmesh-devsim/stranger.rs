//! `--stranger`: a real libp2p node with a key of its own — no member of any mesh — on the LAN.
//! It announces itself by mDNS, dials the hubs' gossip ports, and publishes forged device
//! sightings (of a device it makes up, in the name of a member) and forged loads, ten times a
//! second. A hub must neither keep it connected nor take anything it sends.

use std::time::Duration;

use hubmesh_proto::{pb, Message as _};
use libp2p::futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, mdns, noise, tcp, yamux, Multiaddr};

#[derive(NetworkBehaviour)]
struct Stranger {
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    mdns: mdns::tokio::Behaviour,
}

/// What the stranger managed.
pub(crate) struct Outcome {
    pub(crate) established: u32,
    pub(crate) published: u32,
    /// The longest a connection stayed up.
    pub(crate) longest_ms: u128,
}

/// Runs for `how_long` against the gossip addresses `to`, speaking as member `node`.
pub(crate) async fn run(
    to: &[std::net::SocketAddr],
    node: u64,
    device: &str,
    how_long: Duration,
) -> anyhow::Result<Outcome> {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key| {
            let config = gossipsub::ConfigBuilder::default().validation_mode(ValidationMode::Strict).build()?;
            Ok(Stranger {
                gossipsub: gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), config)?,
                identify: identify::Behaviour::new(identify::Config::new("/hubmesh/gossip/1".into(), key.public())),
                mdns: mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id())?,
            })
        })?
        .build();
    swarm.listen_on("/ip4/0.0.0.0/tcp/0".parse()?)?;
    let devices = IdentTopic::new("hubmesh/devices/1");
    let loads = IdentTopic::new("hubmesh/load/1");
    swarm.behaviour_mut().gossipsub.subscribe(&devices)?;
    swarm.behaviour_mut().gossipsub.subscribe(&loads)?;
    let addrs: Vec<Multiaddr> =
        to.iter().map(|a| format!("/ip4/{}/tcp/{}", a.ip(), a.port()).parse()).collect::<Result<_, _>>()?;
    let (mut out, mut seq) = (Outcome { established: 0, published: 0, longest_ms: 0 }, u64::MAX / 2);
    let mut up_since = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + how_long;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { connection_id, .. } => {
                    out.established += 1;
                    up_since.insert(connection_id, std::time::Instant::now());
                }
                SwarmEvent::ConnectionClosed { connection_id, .. } => {
                    if let Some(t) = up_since.remove(&connection_id) {
                        out.longest_ms = out.longest_ms.max(t.elapsed().as_millis());
                    }
                }
                // It also dials whatever mDNS finds (the hubs announce themselves).
                SwarmEvent::Behaviour(StrangerEvent::Mdns(mdns::Event::Discovered(found))) => {
                    for (_, addr) in found {
                        let _ = swarm.dial(addr);
                    }
                }
                _ => {}
            },
            _ = tick.tick() => {
                for a in &addrs {
                    let _ = swarm.dial(a.clone());
                }
                seq += 1;
                let sighting = pb::DeviceSighting {
                    device: device.to_owned(),
                    version: seq,
                    at_ms: 1,
                    present: true,
                    name: "intruder".into(),
                    kind: "_hubmesh-dev._tcp".into(),
                    ..Default::default()
                };
                let forged = [
                    (devices.clone(), pb::gossip_message::Body::Sightings(pb::DeviceSightings { sightings: vec![sighting], ..Default::default() })),
                    (loads.clone(), pb::gossip_message::Body::Load(pb::LoadReport { cpu_permille: 987_654, task_cpus: 1, ..Default::default() })),
                ];
                for (topic, body) in forged {
                    let msg = pb::GossipMessage { node, seq, body: Some(body) };
                    if swarm.behaviour_mut().gossipsub.publish(topic, msg.encode_to_vec()).is_ok() {
                        out.published += 1;
                    }
                }
            }
        }
    }
    for t in up_since.values() {
        out.longest_ms = out.longest_ms.max(t.elapsed().as_millis());
    }
    Ok(out)
}
