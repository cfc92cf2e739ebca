//! The quinn side of the endpoint: transport limits, the UDP socket, and the TLS configurations
//! of an identity.
//!
//! A connection starts with a joiner's limits (a few streams, a small receive window): the server
//! sends its transport parameters before it has seen the client's certificate, so whatever they
//! allow, a peer without a certificate gets. Once the handshake shows a cluster certificate, the
//! accept loop raises the connection to a member's limits ([`raise_to_member`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use sha2::{Digest, Sha256};

use super::TransportError;
use crate::tls::Identity;

/// Largest UDP payload over loopback: IPv4's maximum (loopback's MTU is 64 KiB).
const LOOPBACK_UDP_PAYLOAD: u16 = 65_507;
/// Socket buffers: room for dozens of full-size datagrams, so a burst is not dropped while the
/// endpoint's task waits for a core (the kernel caps the value at `net.core.rmem_max`).
const SOCKET_BUFFER: usize = 4 << 20;

/// Streams a member may have open at once on a connection to this hub.
const MEMBER_STREAMS: u32 = 1024;
/// Bytes a member may have in flight to this hub on one stream, and on one connection: checkpoint
/// pushes stream tens of MiB, and windows of that size keep the pipe full.
const MEMBER_STREAM_WINDOW: u32 = 16 << 20;
const MEMBER_WINDOW: u32 = 128 << 20;
/// What a connection without a certificate gets: one join at a time, in a small window.
pub(super) const JOINER_STREAMS: u32 = 1;
pub(super) const JOINER_WINDOW: u32 = 64 << 10;
/// Connection attempts waiting for the accept loop, and the packets they may buffer meanwhile
/// (quinn's defaults allow 65,536 attempts and 100 MiB).
const MAX_INCOMING: usize = 512;
const INCOMING_BUFFER: u64 = 16 << 10;
const INCOMING_BUFFER_TOTAL: u64 = 4 << 20;

/// The transport parameters of connections this hub accepts: a joiner's until the accept loop
/// raises them (see the module doc).
pub(super) fn server_transport(link: Link) -> Arc<quinn::TransportConfig> {
    let mut t = common(link);
    t.max_concurrent_bidi_streams(JOINER_STREAMS.into());
    // The connection window bounds what a joiner can make this hub buffer; the stream window is a
    // member's already (it cannot be raised after the handshake, and bounds nothing on its own).
    t.receive_window(JOINER_WINDOW.into());
    t.stream_receive_window(MEMBER_STREAM_WINDOW.into());
    Arc::new(t)
}

/// The transport parameters of connections this hub opens: the peer serves, it opens no streams.
pub(super) fn client_transport(link: Link) -> Arc<quinn::TransportConfig> {
    let mut t = common(link);
    t.max_concurrent_bidi_streams(0u32.into());
    t.receive_window(MEMBER_WINDOW.into());
    t.stream_receive_window(MEMBER_STREAM_WINDOW.into());
    Arc::new(t)
}

/// How long a peer may hold back an acknowledgement (asked of it with the ack-frequency extension).
const ACK_DELAY: Duration = Duration::from_millis(1);
/// The longest heartbeat of a profile for a local network (`wifi`'s).
const LOCAL_HEARTBEAT: Duration = Duration::from_millis(100);

/// Raises an accepted connection whose certificate the cluster CA signed to a member's limits.
pub(super) fn raise_to_member(conn: &quinn::Connection) {
    conn.set_max_concurrent_bi_streams(MEMBER_STREAMS.into());
    conn.set_receive_window(MEMBER_WINDOW.into());
}

/// What a connection's parameters depend on besides the identity: the address bound, and the
/// round trip it assumes before it has measured one.
#[derive(Clone, Copy, Debug)]
pub(super) struct Link {
    /// Bound to a loopback address: every peer is on this machine.
    pub(super) loopback: bool,
    initial_rtt: Duration,
    /// A local network (the `lan` and `wifi` profiles): loss there is rarely congestion, and the
    /// congestion window keeps a floor (`congestion`).
    local: bool,
}

impl Link {
    /// The guess is the Raft heartbeat (`lan` 30 ms, `wifi` 100 ms, `wan` 300 ms: a profile is
    /// chosen for the link), at most QUIC's default (333 ms, RFC 9002 §6.2.2). With the default,
    /// a handshake's first Initial packet is sent again about a second after the first (the probe
    /// timeout is three round trips), the next at three seconds, past the dial's timeout: a dial
    /// begun while the peer was down (it restarts; its port answers nothing) waited up to that
    /// second after the peer was back — and every call to that peer, Raft's and the election
    /// gate's pings among them, waited behind the dial. With 30 ms the Initial goes out at 0, 90,
    /// 270, 630 and 1,350 ms. A guess far below the real round trip is not free: each early probe
    /// raises quinn's probe count, which the server's first answer does not reset, so a lost
    /// flight later in the handshake waits a long backoff — hence the guess follows the profile.
    pub(super) fn new(addr: SocketAddr, heartbeat: Duration) -> Self {
        let quic_default = Duration::from_millis(333);
        Self {
            loopback: addr.ip().is_loopback(),
            initial_rtt: heartbeat.min(quic_default),
            local: heartbeat <= LOCAL_HEARTBEAT,
        }
    }
}

fn common(link: Link) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.initial_rtt(link.initial_rtt);
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(Duration::from_secs(5).try_into().expect("5 s is a valid idle timeout")));
    // The mesh uses neither unidirectional streams nor datagrams.
    t.max_concurrent_uni_streams(0u32.into());
    t.datagram_receive_buffer_size(None);
    t.send_window(64 << 20);
    // Ask the peer to acknowledge within 1 ms instead of QUIC's 25 ms (the ack-frequency
    // extension, which every hub speaks). The probe timeout that resends a lost tail packet is the
    // round trip + 4 × its variance + the peer's ack delay: with 25 ms it came after Raft's 30 ms
    // append timeout, so a lost request or answer was never resent in time, and one lossy hub
    // (30 % loss: one packet each way gets through about half the time) failed about half the
    // heartbeats to and from it. With 1 ms a LAN resends within a few ms; the cost is more ack
    // packets: a lone packet is acknowledged within 1 ms instead of riding on the next answer
    // (docs/benchmarks.md, "Availability, stage 4").
    // The ack threshold stays quinn's (every other packet), so bulk pushes do not double their
    // acks; a packet out of order is acknowledged at once, as without the extension. Limit:
    // quinn-proto 0.11 sends the request once, at the connection's start, and does not resend it
    // if that packet is lost; such a connection keeps the 25 ms.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.max_ack_delay(Some(ACK_DELAY)).reordering_threshold(1u32.into());
    t.ack_frequency_config(Some(acks));
    if link.local {
        t.congestion_controller_factory(Arc::new(super::congestion::FlooredCubic));
    }
    if link.loopback {
        // Loopback carries 64 KiB datagrams: MTU discovery climbs there in a dozen probes, and
        // every packet then costs 45 times fewer sends, receives and seals per byte. Segmentation
        // offload is off because a batch of such datagrams exceeds what one send may carry (the
        // kernel refuses it, which quinn took for a black hole and fell back to 1200 bytes).
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(LOOPBACK_UDP_PAYLOAD);
        t.mtu_discovery_config(Some(mtu));
        t.enable_segmentation_offload(false);
    }
    t
}

/// Keys that let a restarted hub's endpoint recognise the connection ids its previous run handed
/// out, and answer a packet on one with a stateless reset (RFC 9000 §10.3) that the peer can
/// verify. Without them the new process drops such packets as garbage, and a peer that still
/// holds a connection to the old one sends into the void until its idle timeout (5 s): a
/// proposal forwarded to a leader that had just restarted timed out after a rolling upgrade's
/// fast restart. With them the peer's keep-alive (every second) is answered by a reset, the
/// connection closes, and the next call dials the new process. Both keys derive from the node's
/// private key: secret, and the same in every run.
fn restart_keys(identity: &Identity) -> (ring::hmac::Key, u64) {
    let derive = |purpose: &[u8]| -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(purpose);
        h.update(identity.key.pkcs8());
        h.finalize().into()
    };
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &derive(b"hubmesh quic stateless reset key v1"));
    let cid = derive(b"hubmesh quic connection id key v1");
    (reset, u64::from_le_bytes(cid[..8].try_into().expect("8 of 32 bytes")))
}

/// Binds the UDP socket and wraps it in a quinn endpoint with this mesh's limits.
pub(super) fn endpoint(
    server: quinn::ServerConfig,
    identity: &Identity,
    addr: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Best effort: a smaller buffer only costs retransmissions under bursts.
    let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER);
    let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER);
    let (reset, cid_key) = restart_keys(identity);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    if addr.ip().is_loopback() {
        config
            .max_udp_payload_size(LOOPBACK_UDP_PAYLOAD)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    }
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime for the mesh endpoint"))?;
    quinn::Endpoint::new(config, Some(server), socket, runtime)
}

/// The QUIC server and member-client configurations of an identity.
pub(super) fn configs(
    identity: &Identity,
    link: Link,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let server_crypto =
        QuicServerConfig::try_from(identity.server_config()?).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(server_transport(link));
    server.max_incoming(MAX_INCOMING);
    server.incoming_buffer_size(INCOMING_BUFFER);
    server.incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    let client_crypto =
        QuicClientConfig::try_from(identity.client_config()?).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(client_transport(link));
    Ok((server, client))
}
