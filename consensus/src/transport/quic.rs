//! The quinn side of the endpoint: transport limits, the UDP socket, and the TLS configurations
//! of an identity.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use super::TransportError;
use crate::tls::Identity;

/// Largest UDP payload over loopback: IPv4's maximum (loopback's MTU is 64 KiB).
const LOOPBACK_UDP_PAYLOAD: u16 = 65_507;
/// Socket buffers: room for dozens of full-size datagrams, so a burst is not dropped while the
/// endpoint's task waits for a core (the kernel caps the value at `net.core.rmem_max`).
const SOCKET_BUFFER: usize = 4 << 20;

pub(super) fn transport_config(loopback: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(Duration::from_secs(5).try_into().expect("5 s is a valid idle timeout")));
    t.max_concurrent_bidi_streams(1024u32.into());
    // Checkpoint pushes stream tens of MiB: windows of that size keep the pipe full.
    t.stream_receive_window((16u32 << 20).into());
    t.send_window(64 << 20);
    if loopback {
        // Loopback carries 64 KiB datagrams: MTU discovery climbs there in a dozen probes, and
        // every packet then costs 45 times fewer sends, receives and seals per byte. Segmentation
        // offload is off because a batch of such datagrams exceeds what one send may carry (the
        // kernel refuses it, which quinn took for a black hole and fell back to 1200 bytes).
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(LOOPBACK_UDP_PAYLOAD);
        t.mtu_discovery_config(Some(mtu));
        t.enable_segmentation_offload(false);
    }
    Arc::new(t)
}

/// Binds the UDP socket and wraps it in a quinn endpoint with this mesh's limits.
pub(super) fn endpoint(server: quinn::ServerConfig, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Best effort: a smaller buffer only costs retransmissions under bursts.
    let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER);
    let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER);
    let mut config = quinn::EndpointConfig::default();
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
    loopback: bool,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let server_crypto =
        QuicServerConfig::try_from(identity.server_config()?).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport_config(loopback));
    let client_crypto =
        QuicClientConfig::try_from(identity.client_config()?).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport_config(loopback));
    Ok((server, client))
}
