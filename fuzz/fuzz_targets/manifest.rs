//! Checkpoint manifests as a holder or a restoring hub reads them from the page log or the wire.
#![no_main]

use hubmesh::checkpoint::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        // Whatever decodes says what it says: every page index within the memory it declares.
        assert!(m.pages.iter().all(|(i, _)| *i < m.memory_pages), "{m:?}");
    }
});
