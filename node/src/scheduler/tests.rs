//! The scheduler's tests: exact plans for small states.

use hubmesh_consensus::state::{CheckpointPolicy, DeployMode, Limits, NodeRecord, TaskKind, TaskSpec};
use hubmesh_consensus::Epoch;
use hubmesh_storage::Hash;

use super::*;

/// The plan without its history notes.
pub(crate) fn places(s: &ClusterState) -> Vec<Command> {
    plan(s).into_iter().filter(|c| !matches!(c, Command::Note { .. })).collect()
}

fn node(id: u64, slots: u32, status: NodeStatus) -> Command {
    labelled_node(id, slots, status, &[])
}

pub(crate) fn labelled_node(id: u64, slots: u32, status: NodeStatus, labels: &[(&str, &str)]) -> Command {
    Command::RegisterNode {
        node: NodeRecord {
            id: NodeId(id),
            name: format!("h{id}"),
            api_addr: String::new(),
            mesh_addr: String::new(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            slots,
            memory_bytes: 1 << 30,
            witness: false,
            cert_fingerprint: String::new(),
            gossip_addr: String::new(),
            public_key: String::new(),
            status,
        },
    }
}

fn deploy(name: &str) -> Command {
    constrained_deploy(name, TaskKind::Stateful, &[])
}

pub(crate) fn constrained_deploy(name: &str, kind: TaskKind, constraints: &[(&str, &str)]) -> Command {
    Command::DeployTask {
        spec: TaskSpec {
            name: name.into(),
            kind,
            module_hash: Hash::of(b"m"),
            source_hash: Hash::of(b"s"),
            limits: Limits { memory_bytes: 1, timeout_ms: 1, max_input_bytes: 1, max_output_bytes: 1, queue: 1 },
            checkpoint: CheckpointPolicy::None,
            tick_ms: None,
            constraints: constraints.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            replicas: 1,
            state_replicas: 2,
            pinned: false,
            near: None,
        },
        mode: DeployMode::Create,
        at_ms: 0,
    }
}

fn state(cmds: &[Command]) -> ClusterState {
    let mut s = ClusterState::default();
    for c in cmds {
        s.apply(c).unwrap();
    }
    s
}

#[test]
fn places_unplaced_tasks_on_the_emptiest_up_hub() {
    let s = state(&[
        node(1, 1, NodeStatus::Up),
        node(2, 5, NodeStatus::Up),
        node(3, 9, NodeStatus::Down),
        deploy("a"),
        deploy("b"),
    ]);
    assert_eq!(
        places(&s),
        vec![
            Command::PlaceInstance { task: "a".into(), instance: 0, node: NodeId(2), expected: None },
            Command::PlaceInstance { task: "b".into(), instance: 0, node: NodeId(2), expected: None },
        ]
    );
}

#[test]
fn full_hubs_leave_tasks_pending_with_a_reason() {
    let mut s = state(&[node(1, 1, NodeStatus::Up), deploy("a"), deploy("b")]);
    for c in plan(&s) {
        s.apply(&c).unwrap();
    }
    assert_eq!(s.placement("a", 0).map(|p| p.node), Some(NodeId(1)));
    assert!(places(&s).is_empty());
    assert_eq!(pending_reason(&s, &Near::default(), "a"), None);
    assert!(pending_reason(&s, &Near::default(), "b").unwrap().to_string().contains("slot"));
}

#[test]
fn memory_caps_must_fit_in_the_memory_a_hub_offers() {
    // Hub 1 has the most slots but room for one 600 MiB task only; hub 2 has room for one more.
    let mut s = state(&[node(1, 9, NodeStatus::Up), node(2, 5, NodeStatus::Up), deploy("a"), deploy("b"), deploy("c")]);
    for (id, mib) in [(1, 1000), (2, 700)] {
        let mut n = s.nodes[&NodeId(id)].clone();
        n.memory_bytes = mib << 20;
        s.apply(&Command::RegisterNode { node: n }).unwrap();
    }
    for t in s.tasks.values_mut() {
        t.spec.limits.memory_bytes = 600 << 20;
    }
    assert_eq!(
        places(&s),
        vec![
            Command::PlaceInstance { task: "a".into(), instance: 0, node: NodeId(1), expected: None },
            Command::PlaceInstance { task: "b".into(), instance: 0, node: NodeId(2), expected: None },
        ]
    );
    for c in plan(&s) {
        s.apply(&c).unwrap();
    }
    let reason = pending_reason(&s, &Near::default(), "c").unwrap().to_string();
    assert!(reason.contains("600.0 MiB") && reason.contains("memory"), "{reason}");
    // Capacity appears (task a goes away): c is placed.
    s.apply(&Command::DeleteTask { name: "a".into() }).unwrap();
    assert_eq!(
        places(&s),
        vec![Command::PlaceInstance { task: "c".into(), instance: 0, node: NodeId(1), expected: None }]
    );
}

#[test]
fn instances_of_a_down_hub_are_replaced_with_the_seen_epoch() {
    let mut s = state(&[node(1, 4, NodeStatus::Up), deploy("a")]);
    for c in plan(&s) {
        s.apply(&c).unwrap();
    }
    s.apply(&node(1, 4, NodeStatus::Down)).unwrap();
    s.apply(&node(2, 4, NodeStatus::Up)).unwrap();
    assert_eq!(
        places(&s),
        vec![Command::PlaceInstance { task: "a".into(), instance: 0, node: NodeId(2), expected: Some(Epoch(1)) }]
    );
}

mod constraint_tests {
    use hubmesh_consensus::state::TaskKind;

    use super::super::*;
    use super::{constrained_deploy, labelled_node, places};

    fn node(id: u64, room: &str) -> Command {
        labelled_node(id, 10, NodeStatus::Up, &[("room", room)])
    }

    fn deploy(name: &str, room: &str) -> Command {
        constrained_deploy(name, TaskKind::Stateless, &[("room", room)])
    }

    #[test]
    fn replicas_spread_one_per_hub() {
        let mut s = ClusterState::default();
        for c in [node(1, "a"), node(2, "a"), deploy("web", "a")] {
            s.apply(&c).unwrap();
        }
        if let Some(t) = s.tasks.get_mut("web") {
            t.spec.replicas = 3;
        }
        let p = places(&s);
        let nodes: Vec<NodeId> = p
            .iter()
            .map(|c| match c {
                Command::PlaceInstance { node, .. } => *node,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(nodes.len(), 2, "two hubs, so two of three replicas: {p:?}");
        assert_ne!(nodes[0], nodes[1]);
    }

    #[test]
    fn tasks_go_only_to_hubs_with_their_labels() {
        let mut s = ClusterState::default();
        for c in [node(1, "attic"), node(2, "cellar"), deploy("fan", "attic"), deploy("pump", "garage")] {
            s.apply(&c).unwrap();
        }
        assert_eq!(
            places(&s),
            vec![Command::PlaceInstance { task: "fan".into(), instance: 0, node: NodeId(1), expected: None }]
        );
        assert!(pending_reason(&s, &Near::default(), "pump").unwrap().to_string().contains("room=garage"));
    }

    #[test]
    fn holders_spread_never_the_host_and_failover_prefers_a_live_holder() {
        use hubmesh_consensus::state::{CheckpointPolicy, CheckpointRecord};
        use hubmesh_storage::Hash;
        let mut s = ClusterState::default();
        for c in [node(1, "a"), node(2, "a"), node(3, "a"), node(4, "a")] {
            s.apply(&c).unwrap();
        }
        for name in ["x", "y"] {
            s.apply(&constrained_deploy(name, TaskKind::Stateful, &[])).unwrap();
            s.tasks.get_mut(name).unwrap().spec.checkpoint = CheckpointPolicy::Durable;
        }
        for c in plan(&s) {
            s.apply(&c).unwrap();
        }
        for c in plan(&s) {
            s.apply(&c).unwrap();
        }
        assert!(plan(&s).is_empty(), "stable: {:?}", plan(&s));
        let (x, y) = (&s.tasks["x"], &s.tasks["y"]);
        for t in [x, y] {
            assert_eq!(t.holders.len(), 2, "{t:?}");
            assert!(!t.holders.contains(&t.instances[&0].node));
        }
        // Four holder slots over the hubs: no hub holds both tasks' checkpoints twice over.
        let mut all: Vec<NodeId> = x.holders.iter().chain(&y.holders).copied().collect();
        all.sort();
        all.dedup();
        assert!(all.len() >= 3, "spread: {all:?}");

        // x's host dies after a checkpoint stored on it and on its holders.
        let host = x.instances[&0].node;
        let epoch = x.instances[&0].epoch;
        let holder = x.holders[1];
        let record = CheckpointRecord {
            version: 1,
            epoch,
            sequence: 4,
            manifest_hash: Hash::of(b"m"),
            stored_on: vec![host, x.holders[0], holder],
            size_bytes: 0,
            at_ms: 0,
        };
        s.apply(&Command::CommitCheckpoint { task: "x".into(), record, based_on: None }).unwrap();
        let dead = s.tasks["x"].holders[0];
        for n in [host, dead] {
            let mut r = s.nodes[&n].clone();
            r.status = NodeStatus::Down;
            s.apply(&Command::RegisterNode { node: r }).unwrap();
        }
        let p = places(&s);
        assert!(
            p.contains(&Command::PlaceInstance { task: "x".into(), instance: 0, node: holder, expected: Some(epoch) }),
            "{p:?}"
        );
        // Every hub with the checkpoint down: x waits, unavailable, and is not restarted empty.
        let mut r = s.nodes[&holder].clone();
        r.status = NodeStatus::Down;
        s.apply(&Command::RegisterNode { node: r }).unwrap();
        assert!(!places(&s).iter().any(|c| matches!(c, Command::PlaceInstance { task, .. } if task == "x")));
        assert!(
            matches!(pending_reason(&s, &Near::default(), "x"), Some(Pending::StateUnavailable { .. })),
            "{:?}",
            pending_reason(&s, &Near::default(), "x")
        );
    }
}

fn near_deploy(name: &str, device: &str) -> Command {
    let Command::DeployTask { mut spec, mode, at_ms } = deploy(name) else { unreachable!() };
    spec.near = Some(device.into());
    Command::DeployTask { spec, mode, at_ms }
}

#[test]
fn a_task_near_a_device_goes_only_where_it_is_seen_and_waits_when_nowhere() {
    let mut s = state(&[
        node(1, 9, NodeStatus::Up),
        node(2, 1, NodeStatus::Up),
        node(3, 1, NodeStatus::Up),
        near_deploy("light", "mdns:_hap._tcp/id=lamp"),
    ]);
    // Nobody sees it: pending with the reason, never placed.
    assert!(plan(&s).is_empty());
    assert_eq!(
        pending_reason(&s, &Near::default(), "light").unwrap().to_string(),
        "no hub sees mdns:_hap._tcp/id=lamp"
    );
    // Seen by 3 (last) and 2: hub 3, though hub 1 has far more room.
    let near = Near::new([("mdns:_hap._tcp/id=lamp".to_owned(), vec![NodeId(3), NodeId(2)])].into());
    let p: Vec<Command> = plan_deferring(&s, &BTreeSet::new(), &near)
        .into_iter()
        .filter(|c| !matches!(c, Command::Note { .. }))
        .collect();
    assert_eq!(p, vec![Command::PlaceInstance { task: "light".into(), instance: 0, node: NodeId(3), expected: None }]);
    for c in p {
        s.apply(&c).unwrap();
    }
    assert_eq!(pending_reason(&s, &near, "light"), None);
    // Its host dies: it fails over only to the other hub that sees the device.
    s.apply(&Command::SetNodeStatus { node: NodeId(3), status: NodeStatus::Down }).unwrap();
    let p: Vec<Command> = plan_deferring(&s, &BTreeSet::new(), &near)
        .into_iter()
        .filter(|c| !matches!(c, Command::Note { .. }))
        .collect();
    assert!(matches!(&p[..], [Command::PlaceInstance { node: NodeId(2), .. }]), "{p:?}");
    // A migration may go only to a hub that sees it.
    assert!(migration_target(&s, &near, "light", Some(NodeId(1))).unwrap_err().contains("does not see"));
    assert_eq!(migration_target(&s, &near, "light", None), Ok(NodeId(2)));
}

#[test]
fn a_task_whose_hub_stops_seeing_its_device_is_astray_only_when_another_hub_sees_it() {
    let lamp = "mdns:_hap._tcp/id=lamp";
    let mut s = state(&[node(1, 1, NodeStatus::Up), node(2, 1, NodeStatus::Up), near_deploy("light", lamp)]);
    s.apply(&Command::PlaceInstance { task: "light".into(), instance: 0, node: NodeId(2), expected: None }).unwrap();
    let seen_by = |nodes: &[u64]| Near::new([(lamp.to_owned(), nodes.iter().map(|n| NodeId(*n)).collect())].into());
    let both: BTreeSet<NodeId> = [NodeId(1), NodeId(2)].into();
    let astray = |s: &ClusterState, near: &Near| follow::astray(s, near, &both, 1_000_000, 60_000);
    assert!(astray(&s, &seen_by(&[2])).is_empty(), "its hub sees it");
    assert!(astray(&s, &seen_by(&[2, 1])).is_empty(), "its hub still sees it");
    // The device moved to hub 1's segment.
    assert_eq!(astray(&s, &seen_by(&[1])), [("light".to_owned(), NodeId(2))].into());
    // Its hub is out of the leader's gossip reach: its sightings are unknown, not gone.
    assert!(follow::astray(&s, &seen_by(&[1]), &[NodeId(1)].into(), 1_000_000, 60_000).is_empty());
    // Pinned: left where it is.
    let mut pinned = s.clone();
    pinned.tasks.get_mut("light").unwrap().spec.pinned = true;
    assert!(astray(&pinned, &seen_by(&[1])).is_empty());
    // It followed its device 30 s ago: not again within the cooldown, but after it.
    let mut followed = s.clone();
    let mut event = followed.tasks["light"].history.last().unwrap().clone();
    (event.reason, event.at_ms) = ("device".into(), 970_000);
    followed.tasks.get_mut("light").unwrap().history.push(event);
    assert!(astray(&followed, &seen_by(&[1])).is_empty());
    assert_eq!(follow::astray(&followed, &seen_by(&[1]), &both, 1_030_000, 60_000).len(), 1);
    // Nobody sees it: nowhere better to go.
    assert!(astray(&s, &Near::default()).is_empty());
    // The only hub that sees it has no free slot: it stays.
    let mut full = s.clone();
    full.apply(&deploy("other")).unwrap();
    full.apply(&Command::PlaceInstance { task: "other".into(), instance: 0, node: NodeId(1), expected: None }).unwrap();
    assert!(astray(&full, &seen_by(&[1])).is_empty());
    // Its hub is down: failover re-places it, not a migration.
    s.apply(&Command::SetNodeStatus { node: NodeId(2), status: NodeStatus::Down }).unwrap();
    assert!(astray(&s, &seen_by(&[1])).is_empty());
    // A task near no device is never astray.
    let plain = state(&[node(1, 1, NodeStatus::Up), node(2, 1, NodeStatus::Up), deploy("echo")]);
    assert!(astray(&plain, &seen_by(&[1])).is_empty());
}
