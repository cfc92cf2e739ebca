//! The device registry (design §8; docs/plans/devices.md §2): what the hubs see of the LAN's
//! devices, merged without coordination. Pure.
//!
//! Each hub writes only its own sightings (the gossip plane checks that a hub speaks for itself),
//! one per device, each with the hub's own version counter; merging keeps, per (device, hub), the
//! sighting with the higher version — commutative, associative and idempotent, so hubs converge
//! whatever order the messages arrive in. A device that left cleanly is a sighting marked absent
//! (kept for a while so that an older sighting arriving late cannot bring it back). Nothing here
//! ever removes a device because a hub is unreachable: the view marks it `Unreachable` instead.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use hubmesh_consensus::NodeId;

/// What a hub says a device is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Description {
    pub(crate) name: String,
    /// Its service type (`_hap._tcp`, `ssdp:urn:…`).
    pub(crate) kind: String,
    /// Every address it answered from: one device, however many addresses.
    pub(crate) addresses: BTreeSet<String>,
    /// Its TXT records (mDNS) or headers of note (SSDP).
    pub(crate) properties: BTreeMap<String, String>,
}

/// One hub's sighting of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sighting {
    /// The hub's counter: the higher one wins.
    pub(crate) version: u64,
    /// When the hub last saw it (or saw it leave), ms since the epoch on the hub's clock.
    pub(crate) at_ms: u64,
    /// False once it left cleanly or missed its probes.
    pub(crate) present: bool,
    pub(crate) description: Description,
}

/// Whether a device can be reached now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reach {
    /// A hub that the mesh reaches sees it.
    Seen,
    /// Only hubs the mesh cannot reach see it: since the latest of them went out of reach.
    Unreachable { since_ms: u64 },
}

/// A device as the registry shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceView {
    pub(crate) id: String,
    /// From the newest present sighting.
    pub(crate) description: Description,
    /// The hubs that see it, and when each last did, newest first.
    pub(crate) seen_by: Vec<(NodeId, u64)>,
    pub(crate) reach: Reach,
}

/// A 64-bit hash of one sighting's identity (FNV-1a over the device id and the version).
fn fingerprint(device: &str, version: u64) -> u64 {
    device
        .bytes()
        .chain(version.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Every hub's sightings of every device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Registry {
    devices: BTreeMap<String, BTreeMap<NodeId, Sighting>>,
}

impl Registry {
    /// Merges `hub`'s sighting of `device`; true if it changed the registry (it was newer).
    pub(crate) fn merge(&mut self, device: &str, hub: NodeId, sighting: Sighting) -> bool {
        let sightings = self.devices.entry(device.to_owned()).or_default();
        match sightings.get(&hub) {
            Some(known) if known.version >= sighting.version => false,
            _ => {
                sightings.insert(hub, sighting);
                true
            }
        }
    }

    /// Per hub, the highest version of its sightings and a fingerprint of which ones (device and
    /// version): equal digests mean equal registries, for what each hub said.
    pub(crate) fn digest(&self) -> BTreeMap<NodeId, (u64, u64)> {
        let mut d: BTreeMap<NodeId, (u64, u64)> = BTreeMap::new();
        for (id, by) in &self.devices {
            for (hub, s) in by {
                let e = d.entry(*hub).or_default();
                e.0 = e.0.max(s.version);
                e.1 ^= fingerprint(id, s.version);
            }
        }
        d
    }

    /// `hub`'s sightings, by device id: what it sends as a complete account of itself.
    pub(crate) fn sightings_of(&self, hub: NodeId) -> Vec<(String, Sighting)> {
        self.devices.iter().filter_map(|(id, by)| by.get(&hub).map(|s| (id.clone(), s.clone()))).collect()
    }

    /// How many of `hub`'s sightings pass `keep`.
    pub(crate) fn count_of(&self, hub: NodeId, keep: impl Fn(&str, &Sighting) -> bool) -> usize {
        self.devices.iter().filter(|(id, by)| by.get(&hub).is_some_and(|s| keep(id, s))).count()
    }

    /// `hub`'s sighting of `device`.
    pub(crate) fn get(&self, device: &str, hub: NodeId) -> Option<&Sighting> {
        self.devices.get(device)?.get(&hub)
    }

    /// Drops `hub`'s sighting of `device`.
    pub(crate) fn forget(&mut self, device: &str, hub: NodeId) {
        if let Some(by) = self.devices.get_mut(device) {
            by.remove(&hub);
            if by.is_empty() {
                self.devices.remove(device);
            }
        }
    }

    /// Whether `hub` has a sighting of `device`.
    pub(crate) fn has(&self, device: &str, hub: NodeId) -> bool {
        self.get(device, hub).is_some()
    }

    /// Takes `hub`'s complete account of its sightings of the devices whose ids are in
    /// `[from, to)` (`to` = `None`: no end), written when its counter was `as_of`: its sightings
    /// there that the account leaves out and that are not newer than `as_of` are forgotten (a
    /// restarted hub's stale ones, tombstones it pruned), and the account's are merged. True if
    /// the registry changed.
    pub(crate) fn replace_range(
        &mut self,
        hub: NodeId,
        as_of: u64,
        from: &str,
        to: Option<&str>,
        account: Vec<(String, Sighting)>,
    ) -> bool {
        let within = |id: &str| id >= from && to.is_none_or(|t| id < t);
        let mentioned: BTreeSet<&str> = account.iter().map(|(id, _)| id.as_str()).collect();
        let range = match to {
            Some(t) if t <= from => return false,
            Some(t) => self.devices.range::<str, _>((Bound::Included(from), Bound::Excluded(t))),
            None => self.devices.range::<str, _>((Bound::Included(from), Bound::Unbounded)),
        };
        let stale: Vec<String> = range
            .filter(|(id, by)| !mentioned.contains(id.as_str()) && by.get(&hub).is_some_and(|s| s.version <= as_of))
            .map(|(id, _)| id.clone())
            .collect();
        let mut changed = !stale.is_empty();
        for id in stale {
            if let Some(by) = self.devices.get_mut(&id) {
                by.remove(&hub);
                if by.is_empty() {
                    self.devices.remove(&id);
                }
            }
        }
        for (id, s) in account {
            if within(&id) {
                changed |= self.merge(&id, hub, s);
            }
        }
        changed
    }

    /// Forgets hubs that left the mesh, and `owner`'s own absent sightings older than
    /// `before_ms` (late copies of what they replaced can no longer be in flight). Only the owner
    /// prunes its tombstones, by its own clock: peers forget them through its complete account
    /// (pruning by each peer's clock would disagree with the owner's and never settle).
    pub(crate) fn prune(&mut self, is_member: impl Fn(NodeId) -> bool, owner: NodeId, before_ms: u64) {
        for by in self.devices.values_mut() {
            by.retain(|hub, s| is_member(*hub) && (*hub != owner || s.present || s.at_ms >= before_ms));
        }
        self.devices.retain(|_, by| !by.is_empty());
    }

    /// The devices some hub sees. `out_of_reach(hub)` is `Some(since_ms)` for a hub the mesh
    /// cannot reach now: a device only such hubs see is `Unreachable`, never left out.
    pub(crate) fn view(&self, out_of_reach: impl Fn(NodeId) -> Option<u64>) -> Vec<DeviceView> {
        let mut out = Vec::new();
        for (id, by) in &self.devices {
            let mut present: Vec<(NodeId, &Sighting)> =
                by.iter().filter(|(_, s)| s.present).map(|(h, s)| (*h, s)).collect();
            if present.is_empty() {
                continue;
            }
            present.sort_by(|a, b| b.1.at_ms.cmp(&a.1.at_ms).then(a.0.cmp(&b.0)));
            // Versions of different hubs do not compare: the latest sighting (by its time) tells.
            let newest = present.iter().max_by_key(|(h, s)| (s.at_ms, *h)).map(|(_, s)| s.description.clone());
            let downs: Vec<Option<u64>> = present.iter().map(|(h, _)| out_of_reach(*h)).collect();
            let reach = if downs.iter().all(Option::is_some) {
                Reach::Unreachable { since_ms: downs.iter().flatten().copied().max().unwrap_or(0) }
            } else {
                Reach::Seen
            };
            out.push(DeviceView {
                id: id.clone(),
                description: newest.unwrap_or_default(),
                seen_by: present.iter().map(|(h, s)| (*h, s.at_ms)).collect(),
                reach,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn seen(version: u64, at_ms: u64, present: bool, name: &str) -> Sighting {
        Sighting {
            version,
            at_ms,
            present,
            description: Description { name: name.into(), kind: "_hap._tcp".into(), ..Default::default() },
        }
    }

    #[test]
    fn a_clean_leave_is_not_undone_by_an_older_sighting() {
        let mut r = Registry::default();
        assert!(r.merge("lamp", NodeId(1), seen(1, 10, true, "lamp")));
        assert!(r.merge("lamp", NodeId(1), seen(2, 20, false, "lamp")));
        assert!(!r.merge("lamp", NodeId(1), seen(1, 10, true, "lamp")), "late and older: ignored");
        assert!(r.view(|_| None).is_empty());
        // Seen again (a newer sighting): back.
        assert!(r.merge("lamp", NodeId(1), seen(3, 30, true, "lamp")));
        assert_eq!(r.view(|_| None).len(), 1);
    }

    #[test]
    fn a_partitioned_hub_makes_its_devices_unreachable_never_gone() {
        let mut r = Registry::default();
        r.merge("lamp", NodeId(1), seen(1, 10, true, "lamp"));
        r.merge("tv", NodeId(1), seen(2, 10, true, "tv"));
        r.merge("tv", NodeId(2), seen(7, 12, true, "tv (newer name)"));
        let cut = |h: NodeId| (h == NodeId(1)).then_some(500);
        let v = r.view(cut);
        assert_eq!(v.len(), 2, "nothing removed: {v:?}");
        let lamp = v.iter().find(|d| d.id == "lamp").unwrap();
        assert_eq!(lamp.reach, Reach::Unreachable { since_ms: 500 });
        let tv = v.iter().find(|d| d.id == "tv").unwrap();
        assert_eq!(tv.reach, Reach::Seen, "another hub still sees it");
        assert_eq!(tv.description.name, "tv (newer name)");
        assert_eq!(tv.seen_by, vec![(NodeId(2), 12), (NodeId(1), 10)]);
    }

    #[test]
    fn pruning_forgets_removed_hubs_and_old_tombstones_only() {
        let mut r = Registry::default();
        r.merge("lamp", NodeId(1), seen(1, 10, true, "lamp"));
        r.merge("tv", NodeId(2), seen(1, 10, false, "tv"));
        r.merge("fan", NodeId(3), seen(1, 10, true, "fan"));
        r.merge("fan", NodeId(1), seen(2, 10, false, "fan"));
        // Hub 1 prunes: hub 3 left the mesh, hub 1's own old tombstone goes, hub 2's stays (only
        // its owner prunes it, by its own clock).
        r.prune(|h| h != NodeId(3), NodeId(1), 100);
        assert_eq!(r.view(|_| None).iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["lamp"]);
        assert_eq!(r.digest().keys().copied().collect::<Vec<_>>(), [NodeId(1), NodeId(2)]);
        assert!(r.has("tv", NodeId(2)) && !r.has("fan", NodeId(1)));
    }

    /// One anti-entropy exchange as the hubs run it: each hub whose entry in the peer's digest
    /// differs from its own sends the peer a complete account of itself, in two ranges.
    fn exchange(owner: &Registry, hub: NodeId, peer: &mut Registry) {
        if owner.digest().get(&hub) == peer.digest().get(&hub) {
            return;
        }
        let as_of = owner.digest().get(&hub).map_or(0, |d| d.0);
        let (low, high): (Vec<_>, Vec<_>) = owner.sightings_of(hub).into_iter().partition(|(id, _)| id.as_str() < "d2");
        peer.replace_range(hub, as_of, "", Some("d2"), low);
        peer.replace_range(hub, as_of, "d2", None, high);
    }

    #[test]
    fn a_complete_account_makes_a_peer_hold_exactly_what_the_hub_says() {
        let mut owner = Registry::default();
        owner.merge("d1", NodeId(1), seen(5, 50, true, "lamp"));
        owner.merge("d3", NodeId(1), seen(6, 60, false, "fan"));
        let mut peer = Registry::default();
        // A stale sighting from before a restart, an old version, and another hub's.
        peer.merge("d0", NodeId(1), seen(2, 20, true, "gone"));
        peer.merge("d1", NodeId(1), seen(3, 30, true, "lamp (old)"));
        peer.merge("d2", NodeId(2), seen(9, 90, true, "tv"));
        exchange(&owner, NodeId(1), &mut peer);
        assert_eq!(peer.sightings_of(NodeId(1)), owner.sightings_of(NodeId(1)));
        assert_eq!(peer.count_of(NodeId(2), |_, _| true), 1, "another hub's sightings are not touched");
        assert_eq!(peer.digest().get(&NodeId(1)), owner.digest().get(&NodeId(1)));
        // A sighting newer than the account (sent after it, arrived first) stays.
        peer.merge("d4", NodeId(1), seen(8, 80, true, "new"));
        assert!(!peer.replace_range(NodeId(1), 6, "", None, owner.sightings_of(NodeId(1))));
        assert!(peer.has("d4", NodeId(1)));
    }

    fn arb_update() -> impl Strategy<Value = (String, NodeId, Sighting)> {
        (0..4u8, 1..4u64, 1..20u64, any::<bool>(), 0..3u8).prop_map(|(d, h, v, present, n)| {
            // The same (hub, version) always carries the same sighting, as a hub's counter does.
            let at_ms = v * 10 + h;
            (format!("d{d}"), NodeId(h), seen(v, at_ms, present ^ (n == 0 && v % 2 == 0), &format!("n{h}-{v}")))
        })
    }

    fn consistent(updates: &[(String, NodeId, Sighting)]) -> Vec<(String, NodeId, Sighting)> {
        // A hub never sends two different sightings of one device under one version.
        let mut seen = BTreeMap::new();
        updates.iter().filter(|(d, h, s)| seen.insert((d.clone(), *h, s.version), ()).is_none()).cloned().collect()
    }

    proptest! {
        #[test]
        fn merging_is_order_free_and_idempotent(updates in prop::collection::vec(arb_update(), 0..40), seed in any::<u64>()) {
            let updates = consistent(&updates);
            let mut a = Registry::default();
            for (d, h, s) in &updates {
                a.merge(d, *h, s.clone());
            }
            let mut shuffled = updates.clone();
            // A deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut b = Registry::default();
            for (d, h, s) in shuffled.iter().chain(&shuffled) {
                b.merge(d, *h, s.clone());
            }
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.digest(), b.digest());
            // Unreachable hubs hide no device.
            let all: Vec<String> = a.view(|_| None).into_iter().map(|d| d.id).collect();
            let cut: Vec<String> = a.view(|_| Some(1)).into_iter().map(|d| d.id).collect();
            prop_assert_eq!(all, cut);
        }

        #[test]
        fn one_complete_account_makes_a_peer_agree_with_each_hub(updates in prop::collection::vec(arb_update(), 0..40), split in any::<u64>()) {
            let updates = consistent(&updates);
            // Each hub's own registry holds everything it said; the peer got some of it.
            let (mut owners, mut peer) = (Registry::default(), Registry::default());
            for (i, (d, h, s)) in updates.iter().enumerate() {
                owners.merge(d, *h, s.clone());
                if (split >> (i % 64)) & 1 == 1 {
                    peer.merge(d, *h, s.clone());
                }
            }
            for hub in 1..4 {
                exchange(&owners, NodeId(hub), &mut peer);
            }
            prop_assert_eq!(peer, owners);
        }
    }
}
