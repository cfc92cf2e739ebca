//! Devices on the LAN (design §8; docs/plans/devices.md): what the hubs see, gossiped between
//! them. Built so far: the registry (`registry`, pure) and SSDP's messages (`ssdp`, pure); the
//! discovery handlers, its gossip and
//! anti-entropy, `--near` placement and the device API follow the plan.

pub(crate) mod registry;
pub(crate) mod ssdp;
