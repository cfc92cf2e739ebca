//! The gossip plane: real hubs find each other by the addresses in the replicated state (mDNS
//! skips loopback), gossip their loads, and a stranger — a real libp2p node with its own key,
//! speaking the same protocols — can neither stay connected nor get a message in.

use std::time::Duration;

use hubmesh_proto::Message as _;
use libp2p::futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, noise, tcp, yamux, Multiaddr};

use crate::harness::{step, wait_until, Hub};

/// What a stranger forges: hub `node`'s load at an absurd value.
const FORGED_CPU: u32 = 987_654;

#[derive(NetworkBehaviour)]
struct Stranger {
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
}

fn gossip_addr(hub: &Hub) -> std::net::SocketAddr {
    std::fs::read_to_string(hub.data_dir().join("gossip.addr")).unwrap().trim().parse().unwrap()
}

/// Dials `to` for `how_long` as a non-member and publishes forged loads of `node` the whole
/// time. Returns how many connections were established and how many publishes went out.
async fn stranger(to: std::net::SocketAddr, node: u64, how_long: Duration) -> (u32, u32) {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|key| {
            let config = gossipsub::ConfigBuilder::default().validation_mode(ValidationMode::Strict).build().unwrap();
            Stranger {
                gossipsub: gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), config).unwrap(),
                identify: identify::Behaviour::new(identify::Config::new("/hubmesh/gossip/1".into(), key.public())),
            }
        })
        .unwrap()
        .build();
    let topic = IdentTopic::new("hubmesh/load/1");
    swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
    let addr: Multiaddr = format!("/ip4/{}/tcp/{}", to.ip(), to.port()).parse().unwrap();
    let (mut established, mut published, mut seq) = (0, 0, u64::MAX / 2);
    let deadline = tokio::time::Instant::now() + how_long;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            event = swarm.select_next_some() => {
                if let SwarmEvent::ConnectionEstablished { .. } = event {
                    established += 1;
                }
            }
            _ = tick.tick() => {
                if swarm.connected_peers().count() == 0 {
                    let _ = swarm.dial(addr.clone());
                }
                seq += 1;
                let load = hubmesh_proto::pb::LoadReport { cpu_permille: FORGED_CPU, task_cpus: 1, ..Default::default() };
                let msg = hubmesh_proto::pb::GossipMessage {
                    node,
                    seq,
                    body: Some(hubmesh_proto::pb::gossip_message::Body::Load(load)),
                };
                if swarm.behaviour_mut().gossipsub.publish(topic.clone(), msg.encode_to_vec()).is_ok() {
                    published += 1;
                }
            }
        }
    }
    (established, published)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_gossip_their_loads_and_a_stranger_gets_nothing_in() {
    let a = Hub::start("a").await;
    let token = a.client.create_token(Some("10m")).await.unwrap().token;
    let b = Hub::start_with("b", &["--join", &token]).await;
    let c = Hub::start_with("c", &["--join", &token]).await;
    let hubs = [&a, &b, &c];

    step("every hub knows every hub's PeerId and gossip address, and a fresh load of each (gossiped)");
    for h in hubs {
        wait_until(Duration::from_secs(30), &format!("hub {} has every hub's load", h.name), || async {
            h.client.nodes().await.is_ok_and(|nodes| {
                nodes.len() == 3
                    && nodes.iter().all(|n| n.peer_id.starts_with("12D3KooW") && !n.gossip_addr.is_empty())
                    && nodes.iter().all(|n| n.load.as_ref().is_some_and(|l| l.task_cpus >= 1 && l.age_ms < 4000))
            })
        })
        .await;
    }
    let nodes = a.client.nodes().await.unwrap();
    let mut ids: Vec<&str> = nodes.iter().map(|n| n.peer_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "one PeerId per hub: {nodes:?}");
    let a_id = a.client.status().await.unwrap().node_id;

    step("a stranger dials hub a and publishes forged loads of hub a for 4 s");
    let (established, published) = stranger(gossip_addr(&a), a_id, Duration::from_secs(4)).await;
    eprintln!("stranger: {established} connections established (the hub closes them), {published} publishes went out");
    assert_eq!(published, 0, "a non-member never has a subscribed peer to publish to");
    for h in hubs {
        let nodes = h.client.nodes().await.unwrap();
        let forged = nodes.iter().any(|n| n.load.as_ref().is_some_and(|l| l.cpu_permille == FORGED_CPU));
        assert!(!forged, "hub {} took a forged load: {nodes:?}", h.name);
    }
    let refused = a.client.metrics().await.unwrap();
    assert!(
        refused.lines().any(|l| l.starts_with("hubmesh_gossip_peers") && l.ends_with(" 2")),
        "hub a still gossips with its two members: {}",
        refused.lines().filter(|l| l.starts_with("hubmesh_gossip")).collect::<Vec<_>>().join("\n")
    );
}
