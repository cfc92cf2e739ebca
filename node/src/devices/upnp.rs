//! SSDP (UPnP) discovery, the second handler beside mDNS: listen on 239.255.255.250:1900 on the
//! LAN's interfaces for `NOTIFY` (alive, byebye), and search (`M-SEARCH ssdp:all`) every
//! [`PROBE`] from a socket of its own, whose unicast answers count as sightings. A device that
//! answers neither search nor announcement for [`SILENT`] has vanished; a byebye leaves at once.
//! Messages are parsed by `ssdp` (pure); this module owns the sockets and the timers.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::registry::Description;
use super::ssdp::{self, Announcement, GROUP, MAX_DATAGRAM};
use super::{net, MAX_DEVICES};
use crate::hub::Hub;
use crate::worker::Worker;

/// How often the hub searches.
pub(crate) const PROBE: Duration = Duration::from_secs(10);
/// A device silent this long has vanished: it missed two searches and their answer time, with
/// room for one lost answer (2 × PROBE + MX + a margin), so one dropped datagram is no flap.
pub(crate) const SILENT: Duration = Duration::from_secs(25);
/// How often silence is looked for: a vanished device leaves within `SILENT + EXPIRY_TICK`.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// What this hub knows of one device from SSDP.
struct Known {
    last: Instant,
    /// Each address it spoke from, and when last: one that has been silent for [`SILENT`] is
    /// dropped (a device that moved does not keep its old address).
    addresses: HashMap<IpAddr, Instant>,
    description: Description,
}

/// The SSDP handler.
pub(crate) struct UpnpWorker {
    hub: Arc<Hub>,
    /// Bound to 1900, joined to the group: announcements.
    listen: UdpSocket,
    /// An ephemeral port: searches out, their unicast answers in.
    search: UdpSocket,
    interfaces: Vec<Ipv4Addr>,
    known: HashMap<String, Known>,
    next_probe: Instant,
    next_expiry: Instant,
    buf: Vec<u8>,
    received: Option<(usize, SocketAddr)>,
}

impl UpnpWorker {
    /// Binds the sockets (the group is joined on each LAN interface at every probe).
    pub(crate) fn start(hub: Arc<Hub>) -> std::io::Result<Self> {
        let listen = net::udp(GROUP.port(), true)?;
        let search = net::udp(0, false)?;
        Ok(Self {
            hub,
            listen,
            search,
            interfaces: Vec::new(),
            known: HashMap::new(),
            next_probe: Instant::now(),
            next_expiry: Instant::now() + EXPIRY_TICK,
            buf: vec![0; MAX_DATAGRAM + 1],
            received: None,
        })
    }

    /// Joins the group on interfaces that appeared since the last probe (best effort: one that
    /// refuses is tried again next time), then sends an M-SEARCH out of every LAN interface.
    async fn probe(&mut self) {
        net::join_new(&self.listen, *GROUP.ip(), &mut self.interfaces);
        let message = ssdp::search("ssdp:all", 2);
        for ip in &self.interfaces {
            let sent = match socket2::SockRef::from(&self.search).set_multicast_if_v4(ip) {
                Ok(()) => self.search.send_to(&message, SocketAddr::V4(GROUP)).await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                tracing::debug!(%ip, error = %e, "an SSDP search was not sent");
            }
        }
    }

    fn on_datagram(&mut self, len: usize, from: SocketAddr) {
        let announcement = match ssdp::parse(&self.buf[..len]) {
            Ok(a) => a,
            Err(e) => {
                tracing::trace!(%from, error = %e, "an SSDP datagram ignored");
                return;
            }
        };
        let id = announcement.device_id();
        match announcement {
            Announcement::ByeBye { .. } => {
                if self.known.remove(&id).is_some() {
                    tracing::debug!(device = %id, "SSDP: byebye");
                    self.hub.devices().left(&id);
                }
            }
            Announcement::Alive { kind, location, server, .. } => {
                if !self.known.contains_key(&id) && self.known.len() >= MAX_DEVICES {
                    return;
                }
                let entry = self.known.entry(id.clone()).or_insert_with(|| Known {
                    last: Instant::now(),
                    addresses: HashMap::new(),
                    description: Description { name: id.trim_start_matches("ssdp:").to_owned(), ..Default::default() },
                });
                entry.last = Instant::now();
                entry.addresses.insert(from.ip(), entry.last);
                entry.addresses.retain(|_, at| at.elapsed() < SILENT);
                let d = &mut entry.description;
                // A device announces itself once per type it has: keep the most telling one.
                let vague = d.kind == "upnp:rootdevice" || d.kind.starts_with("uuid:");
                if d.kind.is_empty() || (vague && kind.contains(":device:")) {
                    d.kind = kind;
                }
                d.addresses = entry.addresses.keys().map(ToString::to_string).collect();
                if let Some(l) = location {
                    d.properties.insert("location".into(), l);
                }
                if let Some(s) = server {
                    d.properties.insert("server".into(), s);
                }
                if !self.hub.devices().saw(&id, d.clone()) {
                    self.known.remove(&id);
                }
            }
        }
    }

    /// Devices silent for [`SILENT`] have vanished.
    fn expire(&mut self) {
        let silent: Vec<String> =
            self.known.iter().filter(|(_, k)| k.last.elapsed() >= SILENT).map(|(id, _)| id.clone()).collect();
        for id in silent {
            self.known.remove(&id);
            tracing::debug!(device = %id, "SSDP: silent, gone");
            self.hub.devices().left(&id);
        }
    }
}

impl Worker for UpnpWorker {
    fn name(&self) -> &'static str {
        "ssdp"
    }

    async fn work(&mut self) -> Result<(), String> {
        if let Some((len, from)) = self.received.take() {
            self.on_datagram(len, from);
        }
        if Instant::now() >= self.next_expiry {
            self.next_expiry = Instant::now() + EXPIRY_TICK;
            self.expire();
        }
        if Instant::now() >= self.next_probe {
            self.next_probe = Instant::now() + PROBE;
            self.probe().await;
        }
        Ok(())
    }

    async fn wait(&mut self) {
        // Silence is looked for only while there is someone to fall silent.
        let wake = if self.known.is_empty() { self.next_probe } else { self.next_probe.min(self.next_expiry) };
        let ready = tokio::select! {
            r = self.listen.readable() => r.ok().map(|()| true),
            r = self.search.readable() => r.ok().map(|()| false),
            () = tokio::time::sleep_until(wake) => None,
        };
        let Some(announcements) = ready else { return };
        let socket = if announcements { &self.listen } else { &self.search };
        // A readiness that was spurious reads nothing (WouldBlock); a datagram longer than the
        // buffer's one spare byte was cut, and is dropped.
        self.received = socket.try_recv_from(&mut self.buf).ok().filter(|(len, _)| *len <= MAX_DATAGRAM);
    }
}
