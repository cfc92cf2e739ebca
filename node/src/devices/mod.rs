//! Devices on the LAN (design §8; docs/plans/devices.md): what each hub sees, gossiped between
//! the hubs so that every hub knows every device and which hubs see it.
//!
//! ```text
//!  mdns (mdns-sd browse, verify)  --saw/left-->  Devices (registry, own counter)
//!  upnp (SSDP: M-SEARCH, NOTIFY)  --saw/left-->     |  own changes (batched 20 ms)
//!                                                   v
//!  DevicesWorker --gossip: sightings / complete accounts / digest every 5 s--> members
//!  members' messages --GossipWorker (judged: a member, for itself)--> Devices::merge_from
//!  a digest whose entry for this hub differs --> a complete account of this hub's sightings
//! ```
//!
//! Each hub speaks only for its own sightings, so anti-entropy is done by the owners: a hub
//! whose sightings a peer's digest gets wrong sends a complete account of them (which also
//! makes peers forget what a restarted hub no longer sees). A device seen only by hubs that this
//! hub has not heard from for [`OUT_OF_REACH`] is `unreachable`, never removed.

pub(crate) mod goodbye;
pub(crate) mod mdns;
mod net;
pub(crate) mod registry;
pub(crate) mod ssdp;
pub(crate) mod upnp;
pub(crate) mod wire;
mod worker;

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use hubmesh_consensus::{now_ms, NodeId};
use hubmesh_proto::pb;
use tokio::sync::Notify;

use registry::{Description, DeviceView, Registry, Sighting};
pub(crate) use worker::DevicesWorker;

/// A hub not heard from on the gossip plane for this long is out of reach (it sends its load
/// every second).
pub(crate) const OUT_OF_REACH: Duration = Duration::from_secs(5);
/// A hub sends no complete account this soon after it started: its discovery has not found
/// again what it saw before the restart, and an account without those devices would make its
/// peers drop them for a moment (its stale sightings go with the first account after this).
const SETTLE: Duration = Duration::from_secs(5);
/// Most devices one hub sees at once; it writes no sighting of more.
pub(crate) const MAX_DEVICES: usize = 4096;
/// Most sightings of one hub a registry keeps: what it sees and as many tombstones (a member's
/// message that would take its hub above this is refused).
pub(crate) const MAX_SIGHTINGS: usize = 2 * MAX_DEVICES;

/// This hub's view of the LAN's devices, shared by the discovery handlers, the gossip worker
/// and the API.
pub(crate) struct Devices {
    me: NodeId,
    inner: Mutex<Inner>,
    /// Wakes the worker: own sightings changed, or a complete account is due.
    wake: Notify,
}

struct Inner {
    registry: Registry,
    /// This hub's counter for its own sightings: the gossip start number in the high half.
    counter: u64,
    /// Own sightings changed since they were last published.
    unsent: BTreeSet<String>,
    /// A peer lacks some of this hub's sightings: send a complete account.
    account_due: bool,
    /// When each hub was last heard from on the gossip plane (ms since the epoch), by its loads.
    heard: HashMap<NodeId, u64>,
    /// When this hub started: the "since" of a hub not heard from since.
    started_ms: u64,
}

/// Why a member's device message was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum DeviceMessageError {
    #[error("a sighting is malformed: {0}")]
    Malformed(#[from] wire::WireError),
    #[error("the hub would have more than {MAX_SIGHTINGS} sightings")]
    TooMany,
}

impl Devices {
    /// `boot` is this start's number (the gossip plane's), so that a restarted hub's sightings are
    /// newer than its old ones.
    pub(crate) fn new(me: NodeId, boot: u64) -> Self {
        let inner = Inner {
            registry: Registry::default(),
            counter: boot << 32,
            unsent: BTreeSet::new(),
            account_due: false,
            heard: HashMap::new(),
            started_ms: now_ms(),
        };
        Self { me, inner: Mutex::new(inner), wake: Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This hub sees `device` now, as `description`; false if it already sees [`MAX_DEVICES`]
    /// others. Only a change is written (and gossiped): a present sighting of a hub in reach means
    /// that hub still sees the device (it would have said otherwise within its probe bound), so
    /// probes that find nothing new cost no traffic.
    pub(crate) fn saw(&self, device: &str, description: Description) -> bool {
        let device = wire::bounded_id(device);
        let description = wire::fit(description);
        let now = now_ms();
        let mut inner = self.lock();
        match inner.registry.get(&device, self.me) {
            Some(known) if known.present && known.description == description => return true,
            Some(known) if known.present => {}
            _ if inner.registry.count_of(self.me, |_, s| s.present) >= MAX_DEVICES => {
                metrics::counter!("hubmesh_devices_refused_total").increment(1);
                return false;
            }
            _ => {}
        }
        self.write_own(&mut inner, &device, Sighting { version: 0, at_ms: now, present: true, description });
        true
    }

    /// `device` left cleanly (goodbye, byebye) or stopped answering this hub's probes.
    pub(crate) fn left(&self, device: &str) {
        let device = wire::bounded_id(device);
        let mut inner = self.lock();
        let Some(known) = inner.registry.get(&device, self.me) else { return };
        if known.present {
            let gone = Sighting { version: 0, at_ms: now_ms(), present: false, description: known.description.clone() };
            self.write_own(&mut inner, &device, gone);
        }
    }

    fn write_own(&self, inner: &mut Inner, device: &str, mut sighting: Sighting) {
        let change = if sighting.present { "seen" } else { "left" };
        metrics::counter!("hubmesh_devices_changes_total", "change" => change).increment(1);
        inner.counter += 1;
        sighting.version = inner.counter;
        inner.registry.merge(device, self.me, sighting);
        inner.unsent.insert(device.to_owned());
        self.wake.notify_one();
    }

    /// A newer load of `hub` arrived: it is in reach (only loads count: they are checked to be
    /// newer than the last, so a late or replayed message cannot make a silent hub look alive).
    pub(crate) fn heard_from(&self, hub: NodeId) {
        self.lock().heard.insert(hub, now_ms());
    }

    /// Takes `hub`'s sightings (the gossip plane checked that `hub` signed them).
    pub(crate) fn merge_from(&self, hub: NodeId, msg: pb::DeviceSightings) -> Result<bool, DeviceMessageError> {
        if hub == self.me {
            return Ok(false);
        }
        // A malformed sighting is left out, not the message: the others still count.
        let (mut sightings, mut malformed) = (Vec::new(), None);
        for s in msg.sightings {
            match wire::from_pb(s) {
                Ok(s) => sightings.push(s),
                Err(e) => malformed = Some(e),
            }
        }
        let mut inner = self.lock();
        let to = (!msg.to.is_empty()).then_some(msg.to.as_str());
        let within = |id: &str| id >= msg.from.as_str() && to.is_none_or(|t| id < t);
        // What the hub will have once this message is taken.
        let after = if msg.complete {
            let kept = inner.registry.count_of(hub, |id, s| !within(id) || s.version > msg.as_of);
            kept + sightings.iter().filter(|(id, _)| within(id)).count()
        } else {
            let all = inner.registry.count_of(hub, |_, _| true);
            all + sightings.iter().filter(|(id, _)| !inner.registry.has(id, hub)).count()
        };
        if after > MAX_SIGHTINGS {
            return Err(DeviceMessageError::TooMany);
        }
        let changed = if msg.complete {
            inner.registry.replace_range(hub, msg.as_of, &msg.from, to, sightings)
        } else {
            sightings.into_iter().fold(false, |c, (id, s)| inner.registry.merge(&id, hub, s) | c)
        };
        match malformed {
            Some(e) => Err(DeviceMessageError::Malformed(e)),
            None => Ok(changed),
        }
    }

    /// A member's digest: if what it holds of this hub's sightings differs from what this hub
    /// has, a complete account is due.
    pub(crate) fn on_digest(&self, digest: &pb::DeviceDigest) {
        let theirs = digest.hubs.iter().find(|h| h.hub == self.me.0).map(|h| (h.max_version, h.fingerprint));
        let mut inner = self.lock();
        let mine = inner.registry.digest().get(&self.me).copied();
        if theirs != mine && !inner.account_due {
            inner.account_due = true;
            drop(inner);
            self.wake.notify_one();
        }
    }

    /// A member joined the devices topic: it needs this hub's sightings.
    pub(crate) fn account_due(&self) {
        self.lock().account_due = true;
        self.wake.notify_one();
    }

    /// Own sightings changed since the last call, to publish.
    fn take_unsent(&self) -> Vec<pb::DeviceSighting> {
        let mut inner = self.lock();
        let unsent = std::mem::take(&mut inner.unsent);
        let own = inner.registry.sightings_of(self.me);
        own.into_iter().filter(|(id, _)| unsent.contains(id)).map(|(id, s)| wire::to_pb(&id, &s)).collect()
    }

    /// A complete account of own sightings if one is due: the counter it is as of, and the
    /// sightings by device id.
    fn take_account(&self) -> Option<(u64, Vec<pb::DeviceSighting>)> {
        let mut inner = self.lock();
        if now_ms().saturating_sub(inner.started_ms) < SETTLE.as_millis() as u64
            || !std::mem::take(&mut inner.account_due)
        {
            return None;
        }
        let own = inner.registry.sightings_of(self.me);
        Some((inner.counter, own.iter().map(|(id, s)| wire::to_pb(id, s)).collect()))
    }

    fn is_account_due(&self) -> bool {
        self.lock().account_due
    }

    /// What this hub holds of each hub's sightings.
    fn digest(&self) -> pb::DeviceDigest {
        let hubs = self.lock().registry.digest();
        let hubs = hubs
            .into_iter()
            .map(|(hub, (max_version, fingerprint))| pb::HubDigest { hub: hub.0, max_version, fingerprint })
            .collect();
        pb::DeviceDigest { hubs }
    }

    /// Forgets hubs that left the mesh, and this hub's tombstones older than `before_ms` or
    /// beyond the newest [`MAX_DEVICES`] (a LAN churning through names cannot fill the registry).
    fn prune(&self, is_member: impl Fn(NodeId) -> bool, before_ms: u64) {
        let mut inner = self.lock();
        inner.registry.prune(&is_member, self.me, before_ms);
        let mut tombstones: Vec<(u64, String)> = inner
            .registry
            .sightings_of(self.me)
            .into_iter()
            .filter(|(_, s)| !s.present)
            .map(|(id, s)| (s.at_ms, id))
            .collect();
        if tombstones.len() > MAX_DEVICES {
            tombstones.sort();
            let excess = tombstones.len() - MAX_DEVICES;
            for (_, id) in tombstones.into_iter().take(excess) {
                inner.registry.forget(&id, self.me);
            }
        }
        inner.heard.retain(|h, _| is_member(*h));
    }

    /// The devices some hub sees, with reach judged by when each hub was last heard from. In
    /// `seen_by` the hubs stay in the order of their sightings (the latest (re)discovery first),
    /// and each time is when that hub was last known to see the device: now for this hub, the
    /// last message heard from a hub (it still saw it then), or its sighting's time if older.
    pub(crate) fn view(&self) -> Vec<DeviceView> {
        let now = now_ms();
        let inner = self.lock();
        let heard =
            |hub: NodeId| if hub == self.me { now } else { inner.heard.get(&hub).copied().unwrap_or(inner.started_ms) };
        let mut views = inner.registry.view(|hub| {
            (hub != self.me && now.saturating_sub(heard(hub)) > OUT_OF_REACH.as_millis() as u64).then(|| heard(hub))
        });
        for v in &mut views {
            for (hub, at_ms) in &mut v.seen_by {
                *at_ms = (*at_ms).max(heard(*hub));
            }
        }
        views
    }

    /// This hub and the hubs heard from on the gossip plane lately: whose sightings are in reach.
    pub(crate) fn reached(&self) -> BTreeSet<NodeId> {
        let now = now_ms();
        let inner = self.lock();
        let heard = inner.heard.iter().filter(|(_, t)| now.saturating_sub(**t) <= OUT_OF_REACH.as_millis() as u64);
        heard.map(|(h, _)| *h).chain([self.me]).collect()
    }

    /// For each device, the hubs in reach that see it, the most recent sighting first: where
    /// tasks deployed `--near` it may go.
    pub(crate) fn near(&self) -> crate::scheduler::Near {
        let views = self.view();
        let reached = self.reached();
        let seen = views
            .into_iter()
            .map(|v| (v.id, v.seen_by.iter().map(|(h, _)| *h).filter(|h| reached.contains(h)).collect::<Vec<_>>()))
            .filter(|(_, hubs)| !hubs.is_empty())
            .collect();
        crate::scheduler::Near::new(seen)
    }
}
