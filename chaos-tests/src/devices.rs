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
    /// Starts `count` devices on LAN A.
    pub fn start(lab: &Lab, devsim: &Path, count: usize, now_us: u64) -> anyhow::Result<Self> {
        let mut fleet = Self { devsim: devsim.to_owned(), devices: Vec::new(), next_host: 20, events: Vec::new() };
        for k in 0..count {
            let sim = fleet.spawn(lab, k, false)?;
            fleet.devices.push(Device { sim: Some(sim), on_b: false });
            fleet.events.push(DeviceEvent { t_us: now_us, device: device_id(k), what: DeviceChange::Started });
        }
        Ok(fleet)
    }

    fn spawn(&mut self, lab: &Lab, k: usize, on_b: bool) -> anyhow::Result<Devsim> {
        let host = self.next_host;
        anyhow::ensure!(host < 150, "the run used up its device hosts");
        self.next_host += 1;
        lab.spawn_devsim(&self.devsim, host, on_b, "mdns", &format!("dev{k}"), 1)
    }

    /// The ids of every device.
    pub fn ids(&self) -> Vec<String> {
        (0..self.devices.len()).map(device_id).collect()
    }

    /// Kills a running device (no goodbye); returns its index.
    pub fn vanish(&mut self, rng: &mut impl Rng, now_us: u64) -> anyhow::Result<usize> {
        let running: Vec<usize> = (0..self.devices.len()).filter(|k| self.devices[*k].sim.is_some()).collect();
        let k = *running.choose(rng).context("no device runs")?;
        drop(self.devices[k].sim.take());
        self.events.push(DeviceEvent { t_us: now_us, device: device_id(k), what: DeviceChange::Vanished });
        Ok(k)
    }

    /// Moves a running device to the other LAN; returns its index.
    pub fn move_one(&mut self, lab: &Lab, rng: &mut impl Rng, now_us: u64) -> anyhow::Result<usize> {
        let running: Vec<usize> = (0..self.devices.len()).filter(|k| self.devices[*k].sim.is_some()).collect();
        let k = *running.choose(rng).context("no device runs")?;
        self.relocate(lab, k, now_us)?;
        Ok(k)
    }

    /// Device `k` to the other LAN: killed where it is, started on the other.
    fn relocate(&mut self, lab: &Lab, k: usize, now_us: u64) -> anyhow::Result<()> {
        drop(self.devices[k].sim.take());
        let on_b = !self.devices[k].on_b;
        let sim = self.spawn(lab, k, on_b)?;
        self.devices[k] = Device { sim: Some(sim), on_b };
        let what = if on_b { DeviceChange::MovedToB } else { DeviceChange::MovedToA };
        self.events.push(DeviceEvent { t_us: now_us, device: device_id(k), what });
        Ok(())
    }

    /// Undoes a device fault on device `k`: starts it again, or brings it back to LAN A.
    pub fn heal(&mut self, lab: &Lab, k: usize, now_us: u64) -> anyhow::Result<()> {
        if self.devices[k].sim.is_none() {
            let sim = self.spawn(lab, k, false)?;
            self.devices[k] = Device { sim: Some(sim), on_b: false };
            self.events.push(DeviceEvent { t_us: now_us, device: device_id(k), what: DeviceChange::Started });
        } else if self.devices[k].on_b {
            self.relocate(lab, k, now_us)?;
        }
        Ok(())
    }

    /// Every device running on LAN A again (the final heal).
    pub fn heal_all(&mut self, lab: &Lab, now_us: u64) -> anyhow::Result<()> {
        for k in 0..self.devices.len() {
            self.heal(lab, k, now_us)?;
        }
        Ok(())
    }
}
