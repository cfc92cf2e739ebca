//! I15, the device registry: no hub fault makes a hub drop a device that is there (a device
//! seen only by hubs out of reach is `unreachable`, never missing), and after the final heal
//! every hub lists exactly the devices that run, all `seen`.
//!
//! A device is expected on a hub's list from [`SETTLE`] after it started (discovery and gossip)
//! or [`MOVE_GRACE`] after it moved, until it vanishes; a hub is judged from [`SETTLE`] after it
//! (re)started (it catches up from its peers first).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{CheckResult, Evidence};
use crate::devices::{DeviceChange, DeviceEvent};
use crate::monitor::DeviceSample;

/// From a device's start (or a hub's) until the hub must list it.
pub const SETTLE_US: u64 = 5_000_000;
/// From a device's move to the other LAN (a goodbye, then its start there, with its mDNS
/// probing) until every hub must list it again.
pub const MOVE_GRACE_US: u64 = 3_000_000;

/// What the run saw of the devices.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceEvidence {
    pub events: Vec<DeviceEvent>,
    pub samples: Vec<DeviceSample>,
    /// The devices that run at the end.
    pub ids: Vec<String>,
    /// Milliseconds from the final heal until every hub listed exactly those, all `seen`.
    pub converged_after_ms: Option<u64>,
    /// The lists when convergence was given up (empty when it converged).
    pub unconverged: Vec<String>,
}

/// Whether `device` must be listed at `t_us`, by the fleet's events.
fn expected(events: &[&DeviceEvent], t_us: u64) -> bool {
    let Some(last) = events.iter().rev().find(|e| e.t_us <= t_us) else { return false };
    match last.what {
        DeviceChange::Vanished => false,
        DeviceChange::Started => t_us >= last.t_us + SETTLE_US,
        DeviceChange::MovedToA | DeviceChange::MovedToB => t_us >= last.t_us + MOVE_GRACE_US,
    }
}

pub fn registry(ev: &Evidence) -> CheckResult {
    let mut r = CheckResult::new("I15", "device registry: nothing there goes missing; all hubs agree after the heal");
    let Some(d) = &ev.devices else {
        r.count("devices", 0);
        return r;
    };
    let mut by_device: BTreeMap<&str, Vec<&DeviceEvent>> = BTreeMap::new();
    for e in &d.events {
        by_device.entry(e.device.as_str()).or_default().push(e);
    }
    for events in by_device.values_mut() {
        events.sort_by_key(|e| e.t_us);
    }
    let (mut judged, mut young) = (0, 0);
    for s in &d.samples {
        if s.uptime_ms * 1000 < SETTLE_US {
            young += 1;
            continue;
        }
        judged += 1;
        for (device, events) in &by_device {
            if expected(events, s.t_us) && !s.devices.contains_key(*device) {
                r.violation(format!(
                    "n{} did not list {device} at {:.3}s (it runs; the hub had been up {} ms)",
                    s.hub + 1,
                    s.t_us as f64 / 1e6,
                    s.uptime_ms
                ));
            }
        }
    }
    r.count("samples judged", judged);
    r.count("samples of a hub just started", young);
    r.count("devices", by_device.len() as u64);
    if judged == 0 {
        r.unsure("no hub answered its device list".into());
    }
    match d.converged_after_ms {
        Some(ms) => r.count("converged after the heal (ms)", ms),
        None => {
            r.violation(format!("the hubs did not agree on the devices after the heal: {}", d.unconverged.join("; ")))
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Verdict;

    fn event(t_us: u64, what: DeviceChange) -> DeviceEvent {
        DeviceEvent { t_us, device: "d".into(), what }
    }

    fn sample(t_us: u64, hub: usize, listed: bool) -> DeviceSample {
        let devices = if listed { [("d".to_string(), "seen".to_string())].into() } else { BTreeMap::new() };
        DeviceSample { t_us, hub, uptime_ms: 60_000, devices }
    }

    fn evidence(events: Vec<DeviceEvent>, samples: Vec<DeviceSample>, converged: bool) -> Evidence {
        let devices = DeviceEvidence {
            events,
            samples,
            ids: vec!["d".into()],
            converged_after_ms: converged.then_some(800),
            unconverged: if converged { vec![] } else { vec!["n2 lists nothing".into()] },
        };
        Evidence { devices: Some(devices), ..Default::default() }
    }

    #[test]
    fn a_device_that_runs_and_goes_missing_is_false() {
        let ev = evidence(
            vec![event(0, DeviceChange::Started)],
            vec![sample(6_000_000, 0, true), sample(7_000_000, 1, false)],
            true,
        );
        let r = registry(&ev);
        assert_eq!(r.verdict, Verdict::False, "{r:?}");
        assert!(r.examples[0].contains("n2 did not list d"), "{r:?}");
    }

    #[test]
    fn a_vanished_device_a_young_hub_and_the_settling_time_are_not_held_against_it() {
        let mut young = sample(20_000_000, 2, false);
        young.uptime_ms = 1_000;
        let ev = evidence(
            vec![
                event(0, DeviceChange::Started),
                event(10_000_000, DeviceChange::Vanished),
                event(30_000_000, DeviceChange::Started),
            ],
            vec![
                sample(1_000_000, 0, false), // not settled yet
                sample(6_000_000, 0, true),
                sample(15_000_000, 0, false), // vanished
                young,
                sample(31_000_000, 1, false), // started again, settling
                sample(36_000_000, 1, true),
            ],
            true,
        );
        assert_eq!(registry(&ev).verdict, Verdict::True);
    }

    #[test]
    fn a_move_keeps_it_expected_after_the_grace_and_no_convergence_is_false() {
        let ev = evidence(
            vec![event(0, DeviceChange::Started), event(10_000_000, DeviceChange::MovedToB)],
            vec![sample(11_000_000, 0, false), sample(14_000_000, 0, false)],
            true,
        );
        let r = registry(&ev);
        assert_eq!(r.verdict, Verdict::False);
        assert_eq!(r.examples.len(), 1, "only after the grace: {r:?}");
        let ev = evidence(vec![event(0, DeviceChange::Started)], vec![sample(6_000_000, 0, true)], false);
        assert_eq!(registry(&ev).verdict, Verdict::False);
    }
}
