//! A page log file as a hub finds it on disk after a crash or rot: opening it never panics, and
//! every manifest it then lists can be read.
#![no_main]

use hubmesh_storage::PageLog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("pages.log"), data).expect("writing the log");
    let Ok(log) = PageLog::open(dir.path()) else { return };
    for key in log.manifest_keys() {
        log.read_manifest(&key).expect("a listed manifest reads");
    }
});
