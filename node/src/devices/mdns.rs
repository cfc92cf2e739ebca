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
/// How often the goodbye socket joins the group on interfaces that appeared.
const JOIN_EVERY: Duration = Duration::from_secs(10);
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

/// An instance that resolved.
struct Instance {
    /// Its device (two names may be one device: a rename, or a name conflict, keeps its TXT id).
    id: String,
    description: Description,
    /// It said goodbye (this hub reported it gone); `mdns-sd` still holds it for a second, in
    /// which a re-announcement brings it back.
    gone: bool,
}

/// Browses the LAN and keeps this hub's mDNS sightings.
pub(crate) struct MdnsWorker {
    hub: Arc<Hub>,
    daemon: ServiceDaemon,
    events: mpsc::Receiver<ServiceEvent>,
    /// The browsed types, as in PTR owners (`_hap._tcp.local.`).
    types: Vec<String>,
    /// By full instance name.
    known: BTreeMap<String, Instance>,
    /// The instance verified last: the next tick goes on after it.
    cursor: Option<String>,
    next_probe: Instant,
    /// When the goodbye socket next joins the group on interfaces that appeared.
    next_join: Instant,
    event: Option<ServiceEvent>,
    /// Bound to 5353 beside the daemon, for goodbyes (None: it could not bind; the daemon's
    /// removals, a second later, still come).
    goodbyes: Option<UdpSocket>,
    joined: Vec<std::net::Ipv4Addr>,
    buf: Vec<u8>,
    /// The length and source port of a datagram in `buf`.
    datagram: Option<(usize, u16)>,
}

impl MdnsWorker {
    /// Starts the mDNS daemon (its own thread) and browses `types` (`_hap._tcp`, …).
    pub(crate) fn start(hub: Arc<Hub>, types: &[String]) -> Result<Self, mdns_sd::Error> {
        let daemon = ServiceDaemon::new()?;
        daemon.disable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6, IfKind::IPv6])?;
        let (tx, events) = mpsc::channel(256);
        let types: Vec<String> = types.iter().map(|t| format!("{t}.local.")).collect();
        for ty in &types {
            let receiver = daemon.browse(ty)?;
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
        let goodbyes = net::udp(goodbye::GROUP.port(), true)
            .map_err(|e| tracing::warn!(error = %e, "mDNS goodbyes are taken a second late (the daemon's removal)"))
            .ok();
        Ok(Self {
            hub,
            daemon,
            events,
            types,
            known: BTreeMap::new(),
            cursor: None,
            next_probe: Instant::now() + PROBE_TICK,
            next_join: Instant::now(),
            event: None,
            goodbyes,
            joined: Vec::new(),
            buf: vec![0; 9000],
            datagram: None,
        })
    }

    fn on_event(&mut self, event: ServiceEvent) {
        match event {
            ServiceEvent::ServiceResolved(r) => {
                let (id, description) = describe(&r);
                tracing::debug!(device = %id, addresses = ?description.addresses, "mDNS: resolved");
                // A device the registry refused (this hub sees too many) is not tracked either.
                if self.hub.devices().saw(&id, description.clone()) {
                    self.known.insert(r.fullname.clone(), Instance { id, description, gone: false });
                }
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                if let Some(i) = self.known.remove(&fullname) {
                    self.left_unless_announced(&i.id, "removed");
                }
            }
            _ => {}
        }
    }

    /// `id` left, unless it is still announced under another name.
    fn left_unless_announced(&self, id: &str, how: &str) {
        if !self.known.values().any(|i| i.id == id && !i.gone) {
            tracing::debug!(device = %id, how, "mDNS: gone");
            self.hub.devices().left(id);
        }
    }

    /// A PTR seen on the wire: a goodbye of a known instance makes it gone at once; a PTR that
    /// re-asserts an instance that said goodbye brings it back.
    fn on_pointer(&mut self, p: goodbye::Pointer) {
        if !self.types.contains(&p.owner) {
            return; // a subtype, or a type this hub does not browse
        }
        let Some(i) = self.known.get_mut(&p.target) else { return };
        match (p.ttl, i.gone) {
            (0, false) => {
                i.gone = true;
                let id = i.id.clone();
                self.left_unless_announced(&id, "goodbye");
            }
            (1.., true) => {
                i.gone = false;
                self.hub.devices().saw(&i.id, i.description.clone());
            }
            _ => {}
        }
    }

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
        if let Some((len, port)) = self.datagram.take() {
            for p in goodbye::pointers(&self.buf[..len], port) {
                self.on_pointer(p);
            }
        }
        let now = Instant::now();
        if now >= self.next_join {
            self.next_join = now + JOIN_EVERY;
            if let Some(s) = &self.goodbyes {
                net::join_new(s, *goodbye::GROUP.ip(), &mut self.joined);
            }
        }
        if now >= self.next_probe {
            self.next_probe = now + PROBE_TICK;
            self.verify_slice()?;
        }
        Ok(())
    }

    async fn wait(&mut self) {
        // Nothing to verify: only the join timer (an idle hub sleeps).
        let wake = if self.known.is_empty() { self.next_join } else { self.next_join.min(self.next_probe) };
        let goodbyes = self.goodbyes.as_ref();
        tokio::select! {
            Some(event) = self.events.recv() => self.event = Some(event),
            Ok(()) = async { goodbyes.expect("guarded").readable().await }, if goodbyes.is_some() => {
                // A readiness that was spurious reads nothing.
                if let Some(Ok((len, from))) = goodbyes.map(|s| s.try_recv_from(&mut self.buf)) {
                    self.datagram = Some((len, from.port()));
                }
            }
            () = tokio::time::sleep_until(wake) => {
                if self.known.is_empty() {
                    self.next_probe = Instant::now() + PROBE_TICK;
                }
            }
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
