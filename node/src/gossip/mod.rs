//! The gossip plane (design §8): a libp2p swarm on every hub (TCP, noise, yamux) with gossipsub
//! (every message signed by its origin and delivered only after hubmesh validates it; flooded to
//! every member directly, no forwarding mesh; compact message ids), identify, ping,
//! mDNS to find other hubs on the LAN, and explicit dials to the members' gossip addresses from
//! the replicated state (so hubs in different subnets gossip too). Members only: a hub's libp2p
//! identity is its mesh key, so its PeerId derives from the public key the state recorded when it
//! was admitted; connections from any other PeerId are refused (`allow_block_list`), pending and
//! established connections are bounded (`connection_limits`), and a message counts only if a
//! member signed it for itself (`members::judge`). It carries the hubs' loads (`load`) and the
//! device registry (`devices`).
//!
//! ```text
//!  boot: start() binds (DATA_DIR/gossip.addr) --> Gossip handle (publish) + GossipWorker (swarm)
//!  state change, or 1 s tick while a member is not connected (30 s when all are):
//!    allow-list := members' PeerIds; dial members not connected (the smaller PeerId of two
//!    dials; the larger only after 3 s without a connection)
//!  one connection per member (`links`: a redundant one closed 5 s after it opened);
//!    ping every 5 s, two unanswered in a row: closed
//!    (idle member connections stay)
//!  mDNS: a member found on the LAN is dialled; anyone else is ignored
//!  message: judge (member signer, member relay, speaks for itself, newer seq) -> Accept -> loads
//! ```

mod links;
mod members;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hubmesh_consensus::tls::NodeKey;
use hubmesh_consensus::{ClusterState, NodeId};
use hubmesh_proto::{pb, Message as _};
use libp2p::futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity, ValidationMode};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{allow_block_list, connection_limits, identify, identity, mdns, noise, ping, tcp, yamux, PeerId, Swarm};
use tokio::sync::{mpsc, watch};

use crate::hub::Hub;
use crate::worker::Worker;
use links::Links;
use members::{judge, multiaddr_of, Verdict};
pub(crate) use members::{peer_id_of, Members};

/// The identify protocol version: a peer that speaks another is disconnected.
const PROTOCOL: &str = "/hubmesh/gossip/1";
/// The topic of the hubs' loads.
const LOAD_TOPIC: &str = "hubmesh/load/1";
/// The topic of the device registry (sightings, complete accounts, digests).
const DEVICE_TOPIC: &str = "hubmesh/devices/1";
/// The largest message gossipsub takes or sends.
const MAX_MESSAGE: usize = 64 << 10;
/// How often members that are not connected are dialled again.
const REDIAL: Duration = Duration::from_secs(1);
/// Of two members, the one with the smaller PeerId dials; the other dials only once the first
/// has not for this long (a member that cannot reach it, across a one-way firewall). Two hubs
/// that dial each other at once get two connections, and closing the redundant one (`links`)
/// loses what gossipsub had handed that connection: measured, the first device event after a
/// mesh formed reached one hub 0.2 s late and a leave 1.4 s late (repaired at the next
/// heartbeat's IHAVE).
const DIAL_DEFER: Duration = Duration::from_secs(3);
/// How often the membership is looked at when every member is connected (a state change or a
/// lost connection looks sooner).
const RECHECK: Duration = Duration::from_secs(30);
/// A connection is checked this often, and closed when two checks in a row are not answered in
/// `PING_TIMEOUT` (libp2p's ping keeps the first failure to itself; the second try opens a new
/// stream, with its own 10 s): about 25 s at most. Connections to members are never closed for
/// being idle, so a partition or a peer that vanished without a FIN must be noticed here, or
/// TCP's backoff would delay the reconnection after a heal by tens of seconds. (Each check costs a
/// few packets a connection: about 3 kbit/s a hub of five.)
const PING_INTERVAL: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// A load this recent is sent again to a member that subscribes (loads are published every
/// second).
const LOAD_RESEND_AGE: Duration = Duration::from_secs(2);
/// Loads waiting to be published; more are dropped (loads are sent again each second).
const OUTBOX: usize = 64;
/// Device messages waiting to be published; the sender waits for room (a complete account must
/// arrive whole), on a queue of its own so that it never crowds out the loads.
const DEVICE_OUTBOX: usize = 16;
/// The start counter's file in the data dir.
const BOOT_FILE: &str = "gossip.boot";

#[derive(NetworkBehaviour)]
struct Behaviour {
    allowed: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    limits: connection_limits::Behaviour,
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// The handle the rest of the hub publishes through.
pub(crate) struct Gossip {
    peer_id: PeerId,
    addr: SocketAddr,
    boot: u64,
    outbox: mpsc::Sender<pb::gossip_message::Body>,
    device_outbox: mpsc::Sender<pb::gossip_message::Body>,
}

impl Gossip {
    /// Publishes `body` to every member (dropped if the outbox is full: what is gossiped is sent
    /// again periodically).
    pub(crate) fn publish(&self, body: pb::gossip_message::Body) {
        if self.outbox.try_send(body).is_err() {
            metrics::counter!("hubmesh_gossip_dropped_total").increment(1);
        }
    }

    /// Publishes a device message, waiting for room in its queue (false: the gossip plane
    /// stopped).
    pub(crate) async fn publish_device(&self, body: pb::gossip_message::Body) -> bool {
        self.device_outbox.send(body).await.is_ok()
    }

    /// The address other hubs dial (recorded in the replicated state).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This hub's libp2p identity.
    pub(crate) fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// This start's number (`DATA_DIR/gossip.boot`).
    pub(crate) fn boot(&self) -> u64 {
        self.boot
    }
}

/// The libp2p key pair of the hub whose mesh key is `key` (the same Ed25519 key).
fn keypair_of(key: &NodeKey) -> anyhow::Result<identity::Keypair> {
    // An Ed25519 PKCS#8 document holds the 32-byte seed as an OCTET STRING in an OCTET STRING.
    let der = key.pkcs8();
    let at = der.windows(4).position(|w| w == [0x04, 0x22, 0x04, 0x20]).context("no Ed25519 seed in the node key")?;
    let mut seed: Vec<u8> = der.get(at + 4..at + 36).context("a truncated node key")?.to_vec();
    let pair = identity::Keypair::ed25519_from_bytes(&mut seed).context("the node key's seed")?;
    let public = pair.public().try_into_ed25519().context("an Ed25519 key")?.to_bytes();
    if public[..] != *key.public_key() {
        bail!("the node key's seed does not give its public key");
    }
    Ok(pair)
}

/// Gossipsub's id of a message, which every IHAVE lists: 8 bytes of a hash of its signer and
/// sequence number (unique per message under strict signing), where the default is about 70
/// bytes of text.
fn message_id(message: &gossipsub::Message) -> gossipsub::MessageId {
    let mut hash = blake3::Hasher::new();
    match (&message.source, message.sequence_number) {
        (Some(source), Some(seq)) => {
            hash.update(&source.to_bytes());
            hash.update(&seq.to_be_bytes());
        }
        // Not under strict signing; kept total all the same.
        _ => {
            hash.update(&message.data);
        }
    }
    gossipsub::MessageId::new(&hash.finalize().as_bytes()[..8])
}

/// A bound swarm, before the hub exists.
pub(crate) struct Bound {
    swarm: Swarm<Behaviour>,
    outbox: mpsc::Receiver<pb::gossip_message::Body>,
    device_outbox: mpsc::Receiver<pb::gossip_message::Body>,
    boot: u64,
}

/// This start's number (`DATA_DIR/gossip.boot`, one more each start): the high half of every
/// sequence number this hub gossips, so that a restarted hub's messages are newer than its old
/// ones without trusting its clock (a board without a real-time clock may boot in the past).
fn next_boot(dir: &Path) -> anyhow::Result<u64> {
    let path = dir.join(BOOT_FILE);
    let last = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().with_context(|| format!("{} is not a number", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let boot = last + 1;
    hubmesh_storage::write_atomic(&path, format!("{boot}\n").as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(boot)
}

/// Binds the gossip endpoint at `bind` with the hub's key. `host` is the address other hubs
/// reach this one at when `bind` is a wildcard (the mesh's).
pub(crate) async fn start(
    dir: &Path,
    key: &NodeKey,
    bind: SocketAddr,
    host: IpAddr,
) -> anyhow::Result<(Gossip, Bound)> {
    let boot = next_boot(dir)?;
    let pair = keypair_of(key)?;
    let peer_id = pair.public().to_peer_id();
    let lan = !bind.ip().is_loopback();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(pair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .context("the gossip transport")?
        .with_behaviour(|key| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
            let config = gossipsub::ConfigBuilder::default()
                .validation_mode(ValidationMode::Strict)
                .validate_messages()
                .max_transmit_size(MAX_MESSAGE)
                // A handful of hubs, each connected to every member (the worker dials them all):
                // a publisher floods its message to every member directly, and forwarding along
                // a mesh would only send copies (measured: a mesh of one peer doubled the loads'
                // bytes). A member reached only through another (a cut link) still gets each
                // message: each hub sends the ids of the messages of its last three heartbeats to
                // two random peers each second (IHAVE), and the member asks for what it lacks
                // (IWANT). In a mesh of five, a member cut from one publisher misses a message
                // only if none of the three others picked it in three tries: (1/2)^9, 0.2 %.
                .heartbeat_interval(Duration::from_secs(1))
                .mesh_n_low(0)
                .mesh_n(0)
                .mesh_n_high(0)
                .mesh_outbound_min(0)
                .gossip_lazy(2)
                .history_gossip(3)
                .flood_publish(true)
                .message_id_fn(message_id)
                .build()?;
            let gossipsub = gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), config)?;
            let identify = identify::Behaviour::new(identify::Config::new(PROTOCOL.into(), key.public()));
            let ping =
                ping::Behaviour::new(ping::Config::new().with_interval(PING_INTERVAL).with_timeout(PING_TIMEOUT));
            // mDNS skips loopback: it finds hubs only from a LAN address.
            let mdns = if lan {
                let config = mdns::Config {
                    ttl: Duration::from_secs(30),
                    query_interval: Duration::from_secs(5),
                    enable_ipv6: false,
                };
                mdns::tokio::Behaviour::new(config, key.public().to_peer_id())
                    .map_err(
                        |e| tracing::warn!(error = %e, "mDNS is off: hubs are found only by their recorded addresses"),
                    )
                    .ok()
            } else {
                None
            };
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_pending_incoming(Some(64))
                .with_max_pending_outgoing(Some(32))
                .with_max_established_per_peer(Some(2))
                .with_max_established(Some(256));
            Ok(Behaviour {
                allowed: allow_block_list::Behaviour::default(),
                limits: connection_limits::Behaviour::new(limits),
                gossipsub,
                identify,
                ping,
                mdns: Toggle::from(mdns),
            })
        })
        .context("the gossip behaviour")?
        // Only members may connect (the allow-list closes a removed member's connections), and
        // gossipsub keeps a connection open only for its mesh, which is empty: idle member
        // connections stay; dead ones are found by `ping`.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::MAX))
        // A handshake that stalls gives its pending slot back after 3 s (libp2p's default: 10).
        .with_connection_timeout(Duration::from_secs(3))
        .build();
    for topic in [LOAD_TOPIC, DEVICE_TOPIC] {
        swarm.behaviour_mut().gossipsub.subscribe(&IdentTopic::new(topic)).context("subscribing to a topic")?;
    }
    swarm.listen_on(multiaddr_of(bind)).with_context(|| format!("listening for gossip on {bind}"))?;
    // The bound port (the configured one, or the one port 0 picked).
    let port = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => {
                    if let Some(Protocol::Tcp(port)) = address.iter().find(|p| matches!(p, Protocol::Tcp(_))) {
                        return Ok(port);
                    }
                }
                SwarmEvent::ListenerError { error, .. } => return Err(anyhow::anyhow!("{error}")),
                SwarmEvent::ListenerClosed { reason: Err(error), .. } => return Err(anyhow::anyhow!("{error}")),
                _ => {}
            }
        }
    })
    .await
    .context("binding the gossip endpoint timed out")?
    .with_context(|| format!("binding the gossip endpoint to {bind}"))?;
    let ip = if bind.ip().is_unspecified() { host } else { bind.ip() };
    let (tx, outbox) = mpsc::channel(OUTBOX);
    let (device_tx, device_outbox) = mpsc::channel(DEVICE_OUTBOX);
    let gossip = Gossip { peer_id, addr: SocketAddr::new(ip, port), boot, outbox: tx, device_outbox: device_tx };
    Ok((gossip, Bound { swarm, outbox, device_outbox, boot }))
}

/// What woke the worker.
enum Input {
    Swarm(Box<SwarmEvent<BehaviourEvent>>),
    Publish(pb::gossip_message::Body),
    Members,
    /// A redundant connection is due to be closed (`links`).
    Duplicates,
}

/// The swarm's owner: it polls the swarm, publishes, and follows the membership.
pub(crate) struct GossipWorker {
    hub: Arc<Hub>,
    swarm: Swarm<Behaviour>,
    outbox: mpsc::Receiver<pb::gossip_message::Body>,
    device_outbox: mpsc::Receiver<pb::gossip_message::Body>,
    state: watch::Receiver<Arc<ClusterState>>,
    state_open: bool,
    members: Members,
    links: Links,
    /// When each member was last dialled.
    dialled: HashMap<PeerId, tokio::time::Instant>,
    /// Since when each member that is not connected has been found so.
    missing_since: HashMap<PeerId, tokio::time::Instant>,
    /// This hub's last load and when it was published, sent again at once to a member that
    /// (re)subscribes while it is recent.
    last_load: Option<(tokio::time::Instant, pb::gossip_message::Body)>,
    /// Addresses mDNS found members at: dialled with the recorded one (a deferred dial must not
    /// forget them; mDNS reports an entry once).
    mdns_addrs: HashMap<PeerId, libp2p::Multiaddr>,
    last_seq: HashMap<NodeId, u64>,
    /// The sequence number of this hub's last message: this start's number in the high half, a
    /// count in the low half.
    seq: u64,
    next_dial: tokio::time::Instant,
    input: Option<Input>,
}

impl GossipWorker {
    pub(crate) fn new(hub: Arc<Hub>, bound: Bound) -> Self {
        let state = hub.consensus().watch();
        Self {
            hub,
            swarm: bound.swarm,
            outbox: bound.outbox,
            device_outbox: bound.device_outbox,
            state,
            state_open: true,
            members: Members::default(),
            links: Links::default(),
            dialled: HashMap::new(),
            missing_since: HashMap::new(),
            last_load: None,
            mdns_addrs: HashMap::new(),
            last_seq: HashMap::new(),
            seq: bound.boot << 32,
            next_dial: tokio::time::Instant::now(),
            input: Some(Input::Members),
        }
    }

    /// Follows the membership: the allow-list is exactly the members, and members not connected
    /// are dialled.
    fn follow_members(&mut self) {
        let me = self.hub.consensus().node_id();
        let members = Members::of(&self.hub.consensus().state(), me);
        let local = *self.swarm.local_peer_id();
        let allowed = &mut self.swarm.behaviour_mut().allowed;
        let gone: Vec<PeerId> =
            allowed.allowed_peers().iter().filter(|p| members.node_of(p).is_none()).copied().collect();
        for p in gone {
            allowed.disallow_peer(p);
        }
        for p in members.peers().filter(|p| **p != local) {
            allowed.allow_peer(*p);
        }
        self.last_seq.retain(|n, _| members.peers().any(|p| members.node_of(p) == Some(*n)));
        self.dialled.retain(|p, _| members.node_of(p).is_some());
        self.missing_since.retain(|p, _| members.node_of(p).is_some());
        self.mdns_addrs.retain(|p, _| members.node_of(p).is_some());
        self.members = members;
        let mut missing = false;
        for (peer, addr) in self.members.dial_targets().to_vec() {
            missing |= !self.swarm.is_connected(&peer);
            self.dial(peer, addr);
        }
        // A timer that ticks for nothing wakes a small board: every second only while a member
        // is not connected.
        self.next_dial = tokio::time::Instant::now() + if missing { REDIAL } else { RECHECK };
        metrics::gauge!("hubmesh_gossip_peers").set(self.swarm.connected_peers().count() as f64);
    }

    /// Dials `peer` unless it is connected, it is the smaller PeerId and has been missing for
    /// less than [`DIAL_DEFER`] (it dials), or it was dialled less than half a [`REDIAL`] ago. A
    /// dial still pending does not hold back the next one: through a partition each attempt
    /// waits out its 3 s, and a heal would otherwise wait for the attempt in flight to give up.
    fn dial(&mut self, peer: PeerId, addr: libp2p::Multiaddr) {
        let now = tokio::time::Instant::now();
        if self.swarm.is_connected(&peer) {
            self.missing_since.remove(&peer);
            return;
        }
        let missing_since = *self.missing_since.entry(peer).or_insert(now);
        let defer = *self.swarm.local_peer_id() > peer && now < missing_since + DIAL_DEFER;
        if defer || self.dialled.get(&peer).is_some_and(|at| now < *at + REDIAL / 2) {
            return;
        }
        self.dialled.insert(peer, now);
        let mut addresses = vec![addr];
        if let Some(found) = self.mdns_addrs.get(&peer).filter(|a| **a != addresses[0]) {
            addresses.push(found.clone());
        }
        let opts = DialOpts::peer_id(peer).addresses(addresses).condition(PeerCondition::Disconnected).build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "dialling a member for gossip failed");
        }
    }

    fn publish(&mut self, body: pb::gossip_message::Body) {
        if matches!(body, pb::gossip_message::Body::Load(_)) {
            self.last_load = Some((tokio::time::Instant::now(), body.clone()));
        }
        self.seq += 1;
        let topic = match body {
            pb::gossip_message::Body::Load(_) => LOAD_TOPIC,
            pb::gossip_message::Body::Sightings(_) | pb::gossip_message::Body::Digest(_) => DEVICE_TOPIC,
        };
        let msg = pb::GossipMessage { node: self.hub.consensus().node_id().0, seq: self.seq, body: Some(body) };
        match self.swarm.behaviour_mut().gossipsub.publish(IdentTopic::new(topic), msg.encode_to_vec()) {
            Ok(_) => metrics::counter!("hubmesh_gossip_published_total").increment(1),
            // Alone, or no member connected yet: nothing to do until one is.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => tracing::debug!(error = %e, "publishing on the gossip plane failed"),
        }
    }

    fn on_swarm(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let verdict = judge(
                    &self.members,
                    &mut self.last_seq,
                    message.source.as_ref(),
                    &propagation_source,
                    &message.data,
                );
                let acceptance = match &verdict {
                    Verdict::Accept(..) => MessageAcceptance::Accept,
                    Verdict::Reject(why) => {
                        tracing::warn!(source = ?message.source, via = %propagation_source, why, "a gossip message refused");
                        metrics::counter!("hubmesh_gossip_refused_total").increment(1);
                        MessageAcceptance::Reject
                    }
                    Verdict::Ignore(why) => {
                        tracing::debug!(source = ?message.source, why, "a gossip message ignored");
                        metrics::counter!("hubmesh_gossip_ignored_total").increment(1);
                        MessageAcceptance::Ignore
                    }
                };
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
                if let Verdict::Accept(node, msg) = verdict {
                    self.deliver(node, msg);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic }))
                if topic == IdentTopic::new(DEVICE_TOPIC).hash() && self.members.node_of(&peer_id).is_some() =>
            {
                // A member (re)joined the device topic: it may lack this hub's sightings.
                self.hub.devices().account_due();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic }))
                if topic == IdentTopic::new(LOAD_TOPIC).hash() && self.members.node_of(&peer_id).is_some() =>
            {
                // A member (re)joined: it judges this hub in reach only once it hears a load, so
                // send the last one now rather than up to a second later (a partition's heal).
                // Only a recent one: a stalled meter's old report must not pass for current.
                let recent = self.last_load.as_ref().filter(|(at, _)| at.elapsed() < LOAD_RESEND_AGE);
                if let Some((_, load)) = recent.cloned() {
                    self.publish(load);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if self.members.node_of(&peer).is_some() && peer != *self.swarm.local_peer_id() {
                        self.mdns_addrs.insert(peer, addr.clone());
                        self.dial(peer, addr);
                    } else if let Some(mdns) = self.swarm.behaviour_mut().mdns.as_mut() {
                        // Anyone on the LAN can announce PeerIds: mDNS would keep each (with
                        // the TTL it claims) and look it up linearly. Only members are kept.
                        #[allow(deprecated)] // the one way to drop an entry in libp2p-mdns 0.49
                        mdns.expire_node(&peer);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }))
                if info.protocol_version != PROTOCOL =>
            {
                tracing::warn!(peer = %peer_id, version = %info.protocol_version, "a gossip peer speaks another protocol");
                let _ = self.swarm.disconnect_peer_id(peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e @ (ping::Failure::Timeout | ping::Failure::Other { .. })),
            })) => {
                tracing::debug!(%peer, error = %e, "a gossip connection did not answer its check: closed");
                self.swarm.close_connection(connection);
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                let local = *self.swarm.local_peer_id();
                let now = tokio::time::Instant::now();
                self.links.established(&local, peer_id, connection_id, endpoint.is_dialer(), now);
                self.missing_since.remove(&peer_id);
                metrics::gauge!("hubmesh_gossip_peers").set(self.swarm.connected_peers().count() as f64);
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, .. } => {
                self.links.closed(&peer_id, connection_id);
                let connected = self.swarm.is_connected(&peer_id);
                tracing::debug!(peer = %peer_id, connected, "gossip connection");
                metrics::gauge!("hubmesh_gossip_peers").set(self.swarm.connected_peers().count() as f64);
                if !connected && self.members.node_of(&peer_id).is_some() {
                    self.next_dial = self.next_dial.min(tokio::time::Instant::now() + REDIAL);
                }
            }
            _ => {}
        }
    }

    fn deliver(&self, node: NodeId, msg: pb::GossipMessage) {
        let devices = self.hub.devices();
        match msg.body {
            Some(pb::gossip_message::Body::Load(report)) => {
                devices.heard_from(node);
                self.hub.loads().record(node, report);
            }
            Some(pb::gossip_message::Body::Sightings(sightings)) => {
                if let Err(e) = devices.merge_from(node, sightings) {
                    tracing::warn!(node = node.0, error = %e, "device sightings refused");
                    metrics::counter!("hubmesh_gossip_refused_total").increment(1);
                }
            }
            Some(pb::gossip_message::Body::Digest(digest)) => devices.on_digest(&digest),
            None => {}
        }
    }
}

impl Worker for GossipWorker {
    fn name(&self) -> &'static str {
        "gossip"
    }

    async fn work(&mut self) -> Result<(), String> {
        match self.input.take() {
            Some(Input::Swarm(event)) => self.on_swarm(*event),
            Some(Input::Publish(body)) => self.publish(body),
            Some(Input::Members) => self.follow_members(),
            Some(Input::Duplicates) => {
                for extra in self.links.take_due(tokio::time::Instant::now()) {
                    tracing::debug!("a second gossip connection to a member: closed");
                    self.swarm.close_connection(extra);
                }
            }
            None => {}
        }
        Ok(())
    }

    async fn wait(&mut self) {
        let duplicates = self.links.next_due();
        let input = tokio::select! {
            event = self.swarm.select_next_some() => Input::Swarm(Box::new(event)),
            Some(body) = self.outbox.recv() => Input::Publish(body),
            Some(body) = self.device_outbox.recv() => Input::Publish(body),
            changed = self.state.changed(), if self.state_open => {
                self.state_open = changed.is_ok();
                Input::Members
            }
            () = tokio::time::sleep_until(self.next_dial) => Input::Members,
            () = tokio::time::sleep_until(duplicates.unwrap_or(self.next_dial)), if duplicates.is_some() => {
                Input::Duplicates
            }
        };
        self.input = Some(input);
    }
}
