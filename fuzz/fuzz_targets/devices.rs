//! What LAN devices and member hubs send about devices: SSDP datagrams, mDNS goodbyes and gossip
//! messages of device sightings, merged into a registry. Garbage gets an error or nothing,
//! never a panic, and a registry never holds more than its bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hubmesh::fuzzing::devices(data);
});
