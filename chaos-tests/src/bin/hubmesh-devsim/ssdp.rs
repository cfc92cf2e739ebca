//! The simulator's SSDP side: each device answers `M-SEARCH` (for `ssdp:all`, `upnp:rootdevice`
//! or its own type or UDN) with a unicast response, announces `ssdp:alive` when it starts and every
//! [`ANNOUNCE`], and `ssdp:byebye` when it leaves.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

const GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 255, 250), 1900);
/// How often a device announces itself unasked.
pub(crate) const ANNOUNCE: Duration = Duration::from_secs(20);
const DEVICE_TYPE: &str = "urn:schemas-upnp-org:device:BinaryLight:1";

/// One simulated UPnP device.
pub(crate) struct Device {
    pub(crate) udn: String,
    pub(crate) location: String,
    pub(crate) gone: bool,
}

/// The simulator's SSDP sockets.
pub(crate) struct Ssdp {
    socket: UdpSocket,
}

impl Ssdp {
    pub(crate) fn bind(ip: Ipv4Addr) -> anyhow::Result<Self> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, GROUP.port())).into())?;
        socket.join_multicast_v4(GROUP.ip(), &ip)?;
        socket.set_multicast_if_v4(&ip)?;
        Ok(Self { socket: UdpSocket::from_std(socket.into())? })
    }

    async fn notify(&self, d: &Device, nts: &str) {
        let text = format!(
            "NOTIFY * HTTP/1.1\r\nHOST: {GROUP}\r\nCACHE-CONTROL: max-age=1800\r\nLOCATION: {}\r\nNT: {DEVICE_TYPE}\r\n\
             NTS: {nts}\r\nSERVER: Linux UPnP/1.1 hubmesh-devsim/1\r\nUSN: {}::{DEVICE_TYPE}\r\n\r\n",
            d.location, d.udn
        );
        let _ = self.socket.send_to(text.as_bytes(), SocketAddr::V4(GROUP)).await;
    }

    /// Announces every device that has not left.
    pub(crate) async fn alive(&self, devices: &[Device]) {
        for d in devices.iter().filter(|d| !d.gone) {
            self.notify(d, "ssdp:alive").await;
        }
    }

    pub(crate) async fn byebye(&self, d: &Device) {
        self.notify(d, "ssdp:byebye").await;
    }

    /// Waits for one datagram (cancel-safe: nothing is sent here).
    pub(crate) async fn receive(&self) -> Option<(String, SocketAddr)> {
        let mut buf = [0u8; 2048];
        let (len, from) = self.socket.recv_from(&mut buf).await.ok()?;
        Some((String::from_utf8_lossy(&buf[..len]).into_owned(), from))
    }

    /// Answers `text` from `from` if it is a search that some device matches.
    pub(crate) async fn answer(&self, devices: &[Device], text: &str, from: SocketAddr) {
        if !text.starts_with("M-SEARCH") {
            return;
        }
        let st = text
            .lines()
            .find_map(|l| {
                l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case("ST")).map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        for d in devices.iter().filter(|d| !d.gone) {
            // The answer names what was searched for (UPnP 1.1 §1.3.3): `ssdp:all` gets the
            // device type.
            let answered = match st.as_str() {
                "ssdp:all" | DEVICE_TYPE => DEVICE_TYPE,
                "upnp:rootdevice" => "upnp:rootdevice",
                s if s == d.udn => d.udn.as_str(),
                _ => continue,
            };
            let usn = if answered == d.udn { d.udn.clone() } else { format!("{}::{answered}", d.udn) };
            let text = format!(
                "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=1800\r\nEXT:\r\nLOCATION: {}\r\nSERVER: Linux UPnP/1.1 hubmesh-devsim/1\r\n\
                 ST: {answered}\r\nUSN: {usn}\r\n\r\n",
                d.location
            );
            let _ = self.socket.send_to(text.as_bytes(), from).await;
        }
    }
}
