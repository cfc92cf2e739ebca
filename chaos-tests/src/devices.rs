//! The run's LAN devices: one `hubmesh-devsim` per device, each in a device host of its own, on
//! LAN A (every hub) or LAN B (only the last task hub, through a second interface). The device
//! faults act on them: `device-vanish` kills one without a goodbye (healed by starting it again),
//! `device-move` takes one to the other LAN (healed by bringing it back). The fleet keeps what it
//! did, as [`DeviceEvent`]s, for the registry check (I15).

use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::seq::IndexedRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::lab::{Devsim, Lab};

/// The id hubs give simulated device `k` (mDNS, TXT id `dev<k>-0`).
pub fn device_id(k: usize) -> String {
    format!("mdns:_hubmesh-dev._tcp/id=dev{k}-0")
}

/// What the fleet did to a device, and when (µs on the run's clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEvent {
    pub t_us: u64,
    pub device: String,
    pub what: DeviceChange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceChange {
    /// Started (at the beginning, or again after a vanish).
    Started,
    /// Killed without a goodbye.
    Vanished,
    /// Now on LAN B (only the last task hub sees it).
    MovedToB,
    /// Back on LAN A.
    MovedToA,
}

struct Device {
    sim: Option<Devsim>,
    on_b: bool,
}

/// The simulated devices of a run.
pub struct Fleet {
    devsim: PathBuf,
    devices: Vec<Device>,
    /// Device hosts are never reused in a run: a deleted namespace's veth goes away in the
    /// background, and its name must not be taken again meanwhile.
    next_host: usize,
    pub events: Vec<DeviceEvent>,
}

/// The `hubmesh-devsim` binary next to this program (or one up from a test binary).
pub fn find_devsim() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("hubmesh-devsim"))
        .find(|p| p.is_file())
        .context("cannot find hubmesh-devsim next to this program: build it (cargo build -p hubmesh-chaos)")
}

impl Fleet {
    /// Starts `count` devices on LAN A; `now` is the run's clock (µs), read after each start.
    pub fn start(lab: &Lab, devsim: &Path, count: usize, now: &dyn Fn() -> u64) -> anyhow::Result<Self> {
        let mut fleet = Self { devsim: devsim.to_owned(), devices: Vec::new(), next_host: 20, events: Vec::new() };
        for k in 0..count {
            let sim = fleet.spawn(lab, k, false)?;
            fleet.devices.push(Device { sim: Some(sim), on_b: false });
            fleet.events.push(DeviceEvent { t_us: now(), device: device_id(k), what: DeviceChange::Started });
        }
        Ok(fleet)
    }

    fn spawn(&mut self, lab: &Lab, k: usize, on_b: bool) -> anyhow::Result<Devsim> {
        anyhow::ensure!(self.can_spawn(), "the run used up its device hosts");
        let host = self.next_host;
        self.next_host += 1;
        lab.spawn_devsim(&self.devsim, host, on_b, "mdns", &format!("dev{k}"), 1)
    }

    /// Whether a device host is left (they are never reused in a run).
    fn can_spawn(&self) -> bool {
        self.next_host < 150
    }

    fn running(&self) -> Vec<usize> {
        (0..self.devices.len()).filter(|k| self.devices[*k].sim.is_some()).collect()
    }

    /// Kills a running device (no goodbye); returns its index.
    pub fn vanish(&mut self, rng: &mut impl Rng, now: &dyn Fn() -> u64) -> anyhow::Result<usize> {
        let k = *self.running().choose(rng).context("no device runs")?;
        drop(self.devices[k].sim.take());
        self.events.push(DeviceEvent { t_us: now(), device: device_id(k), what: DeviceChange::Vanished });
        Ok(k)
    }

    /// Moves a running device to the other LAN; returns its index.
    pub fn move_one(&mut self, lab: &Lab, rng: &mut impl Rng, now: &dyn Fn() -> u64) -> anyhow::Result<usize> {
        let k = *self.running().choose(rng).context("no device runs")?;
        self.relocate(lab, k, now)?;
        Ok(k)
    }

    /// Device `k` to the other LAN: it says goodbye where it is (so the hubs there drop it at
    /// once, and only gossip from the other LAN's hubs keeps it listed), then starts there.
    fn relocate(&mut self, lab: &Lab, k: usize, now: &dyn Fn() -> u64) -> anyhow::Result<()> {
        anyhow::ensure!(self.can_spawn(), "the run used up its device hosts");
        if let Some(mut sim) = self.devices[k].sim.take() {
            sim.leave_all();
        }
        let on_b = !self.devices[k].on_b;
        match self.spawn(lab, k, on_b) {
            Ok(sim) => {
                self.devices[k] = Device { sim: Some(sim), on_b };
                let what = if on_b { DeviceChange::MovedToB } else { DeviceChange::MovedToA };
                self.events.push(DeviceEvent { t_us: now(), device: device_id(k), what });
                Ok(())
            }
            Err(e) => {
                // It left and did not come back: nobody should list it.
                self.events.push(DeviceEvent { t_us: now(), device: device_id(k), what: DeviceChange::Vanished });
                Err(e)
            }
        }
    }

    /// Undoes a device fault on device `k`: starts it again, or brings it back to LAN A.
    pub fn heal(&mut self, lab: &Lab, k: usize, now: &dyn Fn() -> u64) -> anyhow::Result<()> {
        if self.devices[k].sim.is_none() {
            let sim = self.spawn(lab, k, false)?;
            self.devices[k] = Device { sim: Some(sim), on_b: false };
            self.events.push(DeviceEvent { t_us: now(), device: device_id(k), what: DeviceChange::Started });
        } else if self.devices[k].on_b {
            self.relocate(lab, k, now)?;
        }
        Ok(())
    }

    /// Every device running on LAN A again (the final heal); the devices that could not be are
    /// named in the error, the others are healed all the same.
    pub fn heal_all(&mut self, lab: &Lab, now: &dyn Fn() -> u64) -> anyhow::Result<()> {
        let failed: Vec<String> = (0..self.devices.len())
            .filter_map(|k| self.heal(lab, k, now).err().map(|e| format!("{}: {e:#}", device_id(k))))
            .collect();
        anyhow::ensure!(failed.is_empty(), "devices not restored: {}", failed.join("; "));
        Ok(())
    }

    /// The devices that run (their ids): what every hub must list after the final heal.
    pub fn running_ids(&self) -> Vec<String> {
        self.running().into_iter().map(device_id).collect()
    }
}
