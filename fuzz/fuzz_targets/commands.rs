//! Replicated commands from their protobuf form, applied to a state: decoding refuses garbage, and
//! `ClusterState::apply` never panics and changes nothing when it refuses.
#![no_main]

use hubmesh_consensus::{ClusterState, Command};
use hubmesh_proto::{pb, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = pb::Command::decode(data) else { return };
    let Ok(cmd) = Command::try_from(raw) else { return };
    let mut state = ClusterState::default();
    let before = state.clone();
    if state.apply(&cmd).is_err() {
        assert!(state == before, "a refused command changed the state: {cmd:?}");
    }
});
