//! mDNS/DNS-SD discovery (RFC 6762/6763) with the `mdns-sd` crate: browse each configured
//! service type on the LAN's IPv4 interfaces (never loopback; IPv6 is off), and
//! report to [`Devices`](super::Devices) what resolves, what says goodbye and what stops
//! answering.
//!
//! mDNS alone would keep a silent device for its records' TTL (75 minutes for the pointer
//! record): every [`PROBE`] each known instance is verified (RFC 6762 §10.4: queried, and
//! flushed when nothing answers within [`VERIFY`]), a slice of them each second, so a device
//! that vanished leaves this hub's sightings within about `PROBE + VERIFY`. A goodbye is taken
//! at once from the wire (`goodbye`), not a second later when `mdns-sd` drops the record.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use mdns_sd::{IfKind, ResolvedService, ServiceDaemon, ServiceEvent};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::registry::Description;
use super::{goodbye, net, wire};
use crate::hub::Hub;
use crate::worker::Worker;

/// How often each known instance is verified.
pub(crate) const PROBE: Duration = Duration::from_secs(10);
/// How long a verified instance has to answer.
pub(crate) const VERIFY: Duration = Duration::from_secs(10);
/// How often a slice of the known instances is verified (each one every [`PROBE`]): mdns-sd's
/// command queue holds 100, so thousands are never asked at once.
const PROBE_TICK: Duration = Duration::from_secs(1);
/// The service types browsed when none are configured: common home devices, and hubmesh's own
/// type for simple devices.
pub(crate) const DEFAULT_TYPES: &[&str] = &[
    "_hubmesh-dev._tcp",
    "_hap._tcp",
    "_hue._tcp",
    "_matter._tcp",
    "_esphomelib._tcp",
    "_googlecast._tcp",
    "_airplay._tcp",
    "_ipp._tcp",
];

/// Whether `ty` is a DNS-SD service type this hub can browse: `_name._tcp` or `_name._udp`, the
/// name 1-15 letters, digits and hyphens (RFC 6335 §5.1).
pub(crate) fn valid_type(ty: &str) -> bool {
    let Some(name) = ty.strip_suffix("._tcp").or_else(|| ty.strip_suffix("._udp")) else { return false };
    let Some(name) = name.strip_prefix('_') else { return false };
    (1..=15).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The registry's key of an instance: its TXT `id` when it has one (a device that renames
/// itself stays one entry), else its instance name; never an address.
pub(crate) fn device_id(service_type: &str, instance: &str, txt_id: Option<&str>) -> String {
    match txt_id.filter(|id| !id.is_empty()) {
        Some(id) => format!("mdns:{service_type}/id={id}"),
        None => format!("mdns:{service_type}/{instance}"),
    }
}

/// `_hap._tcp.local.` -> `_hap._tcp`.
fn short_type(ty_domain: &str) -> &str {
    ty_domain.trim_end_matches('.').trim_end_matches(".local")
}

/// The instance part of a full name (`Hall lamp._hap._tcp.local.` -> `Hall lamp`).
fn instance_of<'a>(fullname: &'a str, ty_domain: &str) -> &'a str {
    fullname.strip_suffix(ty_domain).map_or(fullname, |s| s.trim_end_matches('.'))
}

/// What a resolved instance says: its id and description.
fn describe(r: &ResolvedService) -> (String, Description) {
    let ty = short_type(&r.ty_domain);
    let instance = instance_of(&r.fullname, &r.ty_domain);
    let properties: BTreeMap<String, String> =
        r.txt_properties.iter().map(|p| (p.key().to_owned(), p.val_str().to_owned())).collect();
    let id = device_id(ty, instance, properties.get("id").map(String::as_str));
    let addresses = r.addresses.iter().map(|a| std::net::SocketAddr::new(a.to_ip_addr(), r.port).to_string()).collect();
    let description = wire::fit(Description { name: instance.to_owned(), kind: ty.to_owned(), addresses, properties });
    (id, description)
}

/// Browses the LAN and keeps this hub's mDNS sightings.
pub(crate) struct MdnsWorker {
    hub: Arc<Hub>,
    daemon: ServiceDaemon,
    events: mpsc::Receiver<ServiceEvent>,
    /// Full instance name -> device id, for what resolved (two names may be one device: a
    /// rename, or a name conflict, keeps its TXT id).
    known: BTreeMap<String, String>,
    /// The instance verified last: the next tick goes on after it.
    cursor: Option<String>,
    next_probe: Instant,
    event: Option<ServiceEvent>,
    /// Bound to 5353 beside the daemon, for goodbyes (None: it could not bind; the daemon's
    /// removals, a second later, still come).
    goodbyes: Option<UdpSocket>,
    joined: Vec<std::net::Ipv4Addr>,
    datagram: Option<Vec<u8>>,
}

impl MdnsWorker {
    /// Starts the mDNS daemon (its own thread) and browses `types` (`_hap._tcp`, …).
    pub(crate) fn start(hub: Arc<Hub>, types: &[String]) -> Result<Self, mdns_sd::Error> {
        let daemon = ServiceDaemon::new()?;
        daemon.disable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6, IfKind::IPv6])?;
        let (tx, events) = mpsc::channel(256);
        for ty in types {
            let receiver = daemon.browse(&format!("{ty}.local."))?;
            let tx = tx.clone();
            // Ends when the daemon shuts down (the receiver closes) or the worker is gone.
            tokio::spawn(async move {
                while let Ok(event) = receiver.recv_async().await {
                    if tx.send(event).await.is_err() {
                        break;
                    }
                }
            });
        }
        let next_probe = Instant::now() + PROBE_TICK;
        let goodbyes = net::udp(goodbye::GROUP.port(), true)
            .map_err(|e| tracing::warn!(error = %e, "mDNS goodbyes are taken a second late (the daemon's removal)"))
            .ok();
        let mut joined = Vec::new();
        if let Some(s) = &goodbyes {
            net::join_new(s, *goodbye::GROUP.ip(), &mut joined);
        }
        Ok(Self {
            hub,
            daemon,
            events,
            known: BTreeMap::new(),
            cursor: None,
            next_probe,
            event: None,
            goodbyes,
            joined,
            datagram: None,
        })
    }

    fn on_event(&mut self, event: ServiceEvent) {
        match event {
            ServiceEvent::ServiceResolved(r) => {
                let (id, description) = describe(&r);
                tracing::debug!(device = %id, addresses = ?description.addresses, "mDNS: resolved");
                // A device the registry refused (this hub sees too many) is not tracked either.
                if self.hub.devices().saw(&id, description) {
                    self.known.insert(r.fullname.clone(), id);
                }
            }
            ServiceEvent::ServiceRemoved(_, fullname) => self.removed(&fullname, "removed"),
            _ => {}
        }
    }

    fn removed(&mut self, fullname: &str, how: &str) {
        if let Some(id) = self.known.remove(fullname) {
            // Still announced under another name: it did not leave.
            if !self.known.values().any(|other| *other == id) {
                tracing::debug!(device = %id, how, "mDNS: gone");
                self.hub.devices().left(&id);
            }
        }
    }
}

impl MdnsWorker {
    /// Verifies the next slice of the known instances, going on where the last tick stopped.
    fn verify_slice(&mut self) -> Result<(), String> {
        let share = self.known.len().div_ceil((PROBE.as_millis() / PROBE_TICK.as_millis()) as usize);
        let after = match &self.cursor {
            Some(c) => self.known.range::<str, _>((Bound::Excluded(c.as_str()), Bound::Unbounded)),
            None => self.known.range::<str, _>(..),
        };
        let slice: Vec<String> = after.chain(self.known.iter()).map(|(name, _)| name.clone()).take(share).collect();
        for fullname in slice {
            match self.daemon.verify(fullname.clone(), VERIFY) {
                Ok(()) => self.cursor = Some(fullname),
                // The daemon's queue is full: the rest waits for the next tick.
                Err(mdns_sd::Error::Again) => break,
                Err(e) => return Err(format!("verifying {fullname}: {e}")),
            }
        }
        Ok(())
    }
}

impl Drop for MdnsWorker {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

impl Worker for MdnsWorker {
    fn name(&self) -> &'static str {
        "mdns"
    }

    async fn work(&mut self) -> Result<(), String> {
        if let Some(event) = self.event.take() {
            self.on_event(event);
        }
        if let Some(datagram) = self.datagram.take() {
            for fullname in goodbye::goodbyes(&datagram) {
                self.removed(&fullname, "goodbye");
            }
        }
        if Instant::now() >= self.next_probe || self.known.is_empty() {
            self.next_probe = Instant::now() + PROBE_TICK;
            if let Some(s) = &self.goodbyes {
                net::join_new(s, *goodbye::GROUP.ip(), &mut self.joined);
            }
            self.verify_slice()?;
        }
        Ok(())
    }

    async fn wait(&mut self) {
        let goodbyes = self.goodbyes.as_ref();
        tokio::select! {
            Some(event) = self.events.recv() => self.event = Some(event),
            Ok(()) = async { goodbyes.expect("guarded").readable().await }, if goodbyes.is_some() => {
                let mut buf = vec![0; 9000];
                // A readiness that was spurious reads nothing.
                if let Some(Ok((len, _))) = goodbyes.map(|s| s.try_recv_from(&mut buf)) {
                    buf.truncate(len);
                    self.datagram = Some(buf);
                }
            }
            // Nothing to verify: no tick (an idle hub sleeps).
            () = tokio::time::sleep_until(self.next_probe), if !self.known.is_empty() => {}
            // The daemon is gone and nothing is known: nothing will ever happen.
            else => std::future::pending::<()>().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_keyed_by_its_txt_id_or_instance_never_its_address() {
        assert_eq!(device_id("_hap._tcp", "Hall lamp", Some("AA:BB")), "mdns:_hap._tcp/id=AA:BB");
        assert_eq!(device_id("_hap._tcp", "Hall lamp", Some("")), "mdns:_hap._tcp/Hall lamp");
        assert_eq!(device_id("_hap._tcp", "Hall lamp", None), "mdns:_hap._tcp/Hall lamp");
        assert_eq!(short_type("_hap._tcp.local."), "_hap._tcp");
        assert!(DEFAULT_TYPES.iter().all(|t| valid_type(t)));
        for bad in [
            "_hap",
            "hap._tcp",
            "_._tcp",
            "_a-very-long-service-name._tcp",
            "_hap._tcp.local.",
            "_-x._udp",
            "_h p._tcp",
        ] {
            assert!(!valid_type(bad), "{bad}");
        }
        assert_eq!(instance_of("Hall lamp._hap._tcp.local.", "_hap._tcp.local."), "Hall lamp");
    }
}
