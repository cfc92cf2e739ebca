//! The discovery handlers' sockets: UDP on the LAN's IPv4 interfaces (never loopback), shared
//! with other listeners of the same well-known port (mDNS 5353, SSDP 1900), joined to a
//! multicast group on each interface as interfaces appear.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// The LAN's IPv4 interface addresses (loopback and link-local never).
pub(crate) fn lan_interfaces() -> Vec<Ipv4Addr> {
    let all = if_addrs::get_if_addrs().unwrap_or_default();
    all.iter()
        .filter(|i| !i.is_loopback())
        .filter_map(|i| match i.ip() {
            IpAddr::V4(v4) if !v4.is_link_local() => Some(v4),
            _ => None,
        })
        .collect()
}

/// A UDP socket on `port` of every address; `shared`: other sockets may bind the same port
/// (mdns-sd, libp2p's mDNS, other SSDP stacks, other hubs in tests).
pub(crate) fn udp(port: u16, shared: bool) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    if shared {
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).into())?;
    UdpSocket::from_std(socket.into())
}

/// Joins `group` on the LAN interfaces `socket` has not joined yet (`joined`); one that refuses
/// is tried again next time.
pub(crate) fn join_new(socket: &UdpSocket, group: Ipv4Addr, joined: &mut Vec<Ipv4Addr>) {
    for ip in lan_interfaces() {
        if joined.contains(&ip) {
            continue;
        }
        match socket.join_multicast_v4(group, ip) {
            Ok(()) => joined.push(ip),
            Err(e) => tracing::debug!(%ip, %group, error = %e, "joining a multicast group failed"),
        }
    }
}
