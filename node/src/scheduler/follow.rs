//! Tasks follow their device: a task deployed `--near DEVICE` whose hub no longer sees the
//! device (it moved to another hub's segment, or that hub lost it) is live-migrated to a hub that
//! sees it. Which tasks are astray is decided here, pure; the leader's policy waits a grace
//! period before it moves one (a device that blinks does not move its task). A task whose device
//! no hub sees stays where it is: there is nowhere better, and the device may come back.

use std::collections::{BTreeMap, BTreeSet};

use hubmesh_consensus::state::{ClusterState, MigrationReason, TaskRecord};
use hubmesh_consensus::NodeId;

/// The tasks placed near a device whose instance 0 runs on an up hub that does not see the
/// device while another hub that does could take it, with that hub (the migration's source).
/// `reached`: the hubs the leader hears on the gossip plane; a hub it does not hear is not
/// judged (its sightings are out of reach, not gone). Left alone: tasks already migrating,
/// pinned ones (`--pin`), and those that followed their device within `cooldown_ms` (a device
/// that wanders between two segments does not move its task each time).
pub fn astray(
    state: &ClusterState,
    near: &super::Near,
    reached: &BTreeSet<NodeId>,
    now_ms: u64,
    cooldown_ms: u64,
) -> BTreeMap<String, NodeId> {
    state
        .tasks
        .iter()
        .filter(|(_, t)| t.spec.near.is_some() && t.migration.is_none() && !t.spec.pinned)
        .filter(|(_, t)| !followed_within(t, now_ms, cooldown_ms))
        .filter_map(|(name, t)| {
            let host = t.instances.get(&0)?.node;
            let stray = state.is_up(host) && reached.contains(&host) && !near.allows(t, host);
            (stray && super::migration_target(state, near, name, None).is_ok()).then(|| (name.clone(), host))
        })
        .collect()
}

/// Whether `t` was moved after its device within `cooldown_ms`.
fn followed_within(t: &TaskRecord, now_ms: u64, cooldown_ms: u64) -> bool {
    t.history
        .iter()
        .any(|h| h.reason == MigrationReason::Device.as_str() && now_ms.saturating_sub(h.at_ms) < cooldown_ms)
}
