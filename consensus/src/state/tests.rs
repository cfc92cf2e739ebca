//! Tests of `ClusterState::apply`: every refusal leaves the state as it was.
use hubmesh_storage::Hash;

use super::*;

/// A hub's record, for tests here and in the state's other modules.
pub(super) fn node(id: u64) -> NodeRecord {
    NodeRecord {
        id: NodeId(id),
        name: format!("hub{id}"),
        api_addr: "127.0.0.1:7070".into(),
        mesh_addr: String::new(),
        labels: BTreeMap::new(),
        slots: 100,
        memory_bytes: u64::MAX,
        witness: false,
        cert_fingerprint: String::new(),
        gossip_addr: String::new(),
        public_key: String::new(),
        status: NodeStatus::Up,
    }
}

pub(super) fn spec(name: &str, kind: TaskKind) -> TaskSpec {
    TaskSpec {
        name: name.into(),
        kind,
        module_hash: Hash::of(name.as_bytes()),
        source_hash: Hash::of(b"src"),
        limits: Limits {
            memory_bytes: 1 << 20,
            timeout_ms: 1000,
            max_input_bytes: 1024,
            max_output_bytes: 1024,
            queue: 8,
        },
        checkpoint: CheckpointPolicy::None,
        tick_ms: None,
        constraints: BTreeMap::new(),
        replicas: 1,
        state_replicas: 2,
        pinned: false,
        near: None,
    }
}

fn deploy(name: &str, mode: DeployMode) -> Command {
    Command::DeployTask { spec: spec(name, TaskKind::Stateful), mode, at_ms: 5 }
}

#[test]
fn a_checkpoint_must_be_built_on_the_committed_one() {
    let mut s = ClusterState::default();
    s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
    s.apply(&deploy("t", DeployMode::Create)).unwrap();
    let place = Command::PlaceInstance { task: "t".into(), instance: 0, node: NodeId(1), expected: None };
    let Outcome::Placed { epoch: e1 } = s.apply(&place).unwrap() else { panic!() };
    let rec = |epoch, sequence| CheckpointRecord {
        version: 1,
        epoch,
        sequence,
        manifest_hash: Hash::of(b"m"),
        stored_on: vec![NodeId(1)],
        size_bytes: 65536,
        at_ms: 9,
    };
    let based =
        |r, on| Command::CommitCheckpoint { task: "t".into(), record: r, based_on: Some(BasedOn { checkpoint: on }) };
    assert_eq!(s.apply(&based(rec(e1, 1), None)), Ok(Outcome::Committed));
    // Built on nothing, or on an older checkpoint, while (e1, 1) is committed: a host that
    // restarted from a lagging view. Refused, whatever its sequence.
    for stale in [None, Some((e1, 0))] {
        assert!(matches!(s.apply(&based(rec(e1, 2), stale)), Err(Rejected::NotBasedOnCommitted { .. })), "{stale:?}");
        assert!(matches!(s.apply(&based(rec(e1, 9), stale)), Err(Rejected::NotBasedOnCommitted { .. })));
    }
    assert_eq!(s.apply(&based(rec(e1, 2), Some((e1, 1)))), Ok(Outcome::Committed));
    assert_eq!(s.tasks["t"].checkpoint.as_ref().map(|c| c.sequence), Some(2));
}

#[test]
fn checkpoints_commit_only_from_the_current_epoch_and_in_order() {
    let mut s = ClusterState::default();
    s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
    s.apply(&Command::RegisterNode { node: node(2) }).unwrap();
    s.apply(&deploy("t", DeployMode::Create)).unwrap();
    let place = |node, expected| Command::PlaceInstance { task: "t".into(), instance: 0, node: NodeId(node), expected };
    let Outcome::Placed { epoch: e1 } = s.apply(&place(1, None)).unwrap() else { panic!() };
    let rec = |epoch, sequence| CheckpointRecord {
        version: 1,
        epoch,
        sequence,
        manifest_hash: Hash::of(b"m"),
        stored_on: vec![NodeId(1), NodeId(2)],
        size_bytes: 65536,
        at_ms: 9,
    };
    let commit = |r| Command::CommitCheckpoint { task: "t".into(), record: r, based_on: None };
    assert_eq!(s.apply(&commit(rec(e1, 1))), Ok(Outcome::Committed));
    assert!(matches!(s.apply(&commit(rec(e1, 1))), Err(Rejected::Invalid(_))), "not newer");
    s.apply(&Command::SetHolders { task: "t".into(), holders: vec![NodeId(2)] }).unwrap();
    // Failover: the new host (a holder) gets a new epoch and leaves the holder list.
    s.apply(&Command::Batch(vec![Command::Note { at_ms: 77, reason: "failover".into() }, place(2, Some(e1))])).unwrap();
    let t = &s.tasks["t"];
    assert!(t.holders.is_empty());
    let last = t.history.last().unwrap();
    assert_eq!((last.at_ms, last.reason.as_str(), last.from_sequence), (77, "failover", Some(1)));
    assert_eq!(s.note, None);
    let before = s.clone();
    // The old host, cut off, tries to commit at its old epoch: refused, nothing changes.
    assert!(matches!(s.apply(&commit(rec(e1, 2))), Err(Rejected::StaleEpoch { .. })));
    assert_eq!(s, before);
    let e2 = s.placement("t", 0).unwrap().epoch;
    assert_eq!(s.apply(&commit(rec(e2, 2))), Ok(Outcome::Committed));
    assert_eq!(s.tasks["t"].checkpoint.as_ref().unwrap().key("t"), format!("t/{}/2", e2.0));
    assert_eq!(parse_checkpoint_key("t/5/2"), Some(("t", Epoch(5), 2)));
    assert_eq!(parse_checkpoint_key("t"), None);
}

#[test]
fn create_then_second_create_is_rejected_and_changes_nothing() {
    let mut s = ClusterState::default();
    assert_eq!(s.apply(&deploy("counter", DeployMode::Create)), Ok(Outcome::Deployed { version: 1, created: true }));
    let before = s.clone();
    assert_eq!(s.apply(&deploy("counter", DeployMode::Create)), Err(Rejected::TaskExists("counter".into())));
    assert_eq!(s, before);
}

#[test]
fn update_bumps_version_and_epochs() {
    let mut s = ClusterState::default();
    s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
    s.apply(&deploy("c", DeployMode::Create)).unwrap();
    let placed = s.apply(&Command::PlaceInstance { task: "c".into(), instance: 0, node: NodeId(1), expected: None });
    assert_eq!(placed, Ok(Outcome::Placed { epoch: Epoch(1) }));
    assert_eq!(s.apply(&deploy("c", DeployMode::Update)), Ok(Outcome::Deployed { version: 2, created: false }));
    assert_eq!(s.placement("c", 0), Some(Placement { node: NodeId(1), epoch: Epoch(2) }));
    assert_eq!(s.apply(&deploy("nope", DeployMode::Update)), Err(Rejected::NoSuchTask("nope".into())));
}

#[test]
fn placement_with_a_stale_epoch_is_rejected() {
    let mut s = ClusterState::default();
    s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
    s.apply(&deploy("c", DeployMode::Create)).unwrap();
    let place = |expected| Command::PlaceInstance { task: "c".into(), instance: 0, node: NodeId(1), expected };
    s.apply(&place(None)).unwrap();
    let before = s.clone();
    assert_eq!(s.apply(&place(None)), Err(Rejected::StaleEpoch { current: Some(Epoch(1)) }));
    assert_eq!(s, before);
    assert_eq!(s.apply(&place(Some(Epoch(1)))), Ok(Outcome::Placed { epoch: Epoch(2) }));
    let bad_node = Command::PlaceInstance { task: "c".into(), instance: 0, node: NodeId(9), expected: Some(Epoch(2)) };
    assert_eq!(s.apply(&bad_node), Err(Rejected::NoSuchNode(NodeId(9))));
}

#[test]
fn epochs_never_repeat_across_delete_and_recreate() {
    let mut s = ClusterState::default();
    s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
    s.apply(&deploy("c", DeployMode::Create)).unwrap();
    let place = Command::PlaceInstance { task: "c".into(), instance: 0, node: NodeId(1), expected: None };
    assert_eq!(s.apply(&place), Ok(Outcome::Placed { epoch: Epoch(1) }));
    s.apply(&Command::DeleteTask { name: "c".into() }).unwrap();
    s.apply(&deploy("c", DeployMode::Create)).unwrap();
    assert_eq!(s.apply(&place), Ok(Outcome::Placed { epoch: Epoch(2) }));
}

#[test]
fn bad_names_and_nested_batches_are_rejected() {
    let mut s = ClusterState::default();
    for bad in ["", "Caps", "-lead", "a/b", &"x".repeat(65)] {
        let cmd = Command::DeployTask { spec: spec(bad, TaskKind::Stateless), mode: DeployMode::Create, at_ms: 0 };
        assert!(matches!(s.apply(&cmd), Err(Rejected::Invalid(_))), "{bad:?}");
    }
    let nested = Command::Batch(vec![Command::Batch(vec![])]);
    assert!(matches!(s.apply(&nested), Err(Rejected::Invalid(_))));
    assert_eq!(s, ClusterState::default());
}

#[test]
fn batch_results_are_per_command() {
    let mut s = ClusterState::default();
    let out = s.apply(&Command::Batch(vec![deploy("a", DeployMode::Create), deploy("a", DeployMode::Create)]));
    assert_eq!(
        out,
        Ok(Outcome::Batch(vec![
            Ok(Outcome::Deployed { version: 1, created: true }),
            Err(Rejected::TaskExists("a".into()))
        ]))
    );
}

mod join_tests {
    use super::*;

    fn node(id: u64) -> NodeRecord {
        NodeRecord {
            id: NodeId(id),
            name: format!("hub{id}"),
            api_addr: String::new(),
            mesh_addr: "127.0.0.1:1".into(),
            labels: BTreeMap::new(),
            slots: 1,
            memory_bytes: u64::MAX,
            witness: false,
            cert_fingerprint: String::new(),
            gossip_addr: String::new(),
            public_key: String::new(),
            status: NodeStatus::Up,
        }
    }

    fn admit(id: u64, secret: &str, at_ms: u64) -> Command {
        Command::AdmitNode { node: node(id), token_id: "t1".into(), secret_hash: secret.into(), at_ms }
    }

    #[test]
    fn tokens_admit_until_they_expire_or_are_revoked() {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
        s.apply(&Command::CreateToken { id: "t1".into(), secret_hash: "h".into(), expires_ms: 100, at_ms: 0 }).unwrap();
        let before = s.clone();
        assert!(matches!(s.apply(&admit(2, "wrong", 10)), Err(Rejected::BadToken(m)) if m.contains("secret")));
        assert!(matches!(s.apply(&admit(2, "h", 100)), Err(Rejected::BadToken(m)) if m.contains("expired")));
        assert_eq!(s.apply(&admit(1, "h", 10)), Err(Rejected::NodeIdTaken(NodeId(1))));
        assert_eq!(s, before);
        for bad in [
            NodeRecord { name: String::new(), ..node(2) },
            NodeRecord { name: "x".repeat(MAX_NODE_NAME + 1), ..node(2) },
            NodeRecord { name: "a\nb".into(), ..node(2) },
            NodeRecord { mesh_addr: "nowhere".into(), ..node(2) },
            NodeRecord { api_addr: "x".repeat(10_000), ..node(2) },
        ] {
            assert!(matches!(validate_joiner(&bad), Err(Rejected::Invalid(_))), "{bad:?}");
        }
        assert_eq!(validate_joiner(&node(2)), Ok(()));
        assert_eq!(s.apply(&admit(2, "h", 10)), Ok(Outcome::Admitted));
        s.apply(&Command::RevokeToken { id: "t1".into() }).unwrap();
        assert!(matches!(s.apply(&admit(3, "h", 10)), Err(Rejected::BadToken(m)) if m.contains("revoked")));
    }

    #[test]
    fn a_hubs_key_is_its_own_and_never_changes() {
        let mut s = ClusterState::default();
        let keyed = |id: u64, key: &str| NodeRecord { public_key: key.into(), ..node(id) };
        s.apply(&Command::RegisterNode { node: keyed(1, "k1") }).unwrap();
        s.apply(&Command::CreateToken { id: "t1".into(), secret_hash: "h".into(), expires_ms: 100, at_ms: 0 }).unwrap();
        let before = s.clone();
        let taken =
            Command::AdmitNode { node: keyed(2, "k1"), token_id: "t1".into(), secret_hash: "h".into(), at_ms: 1 };
        assert!(matches!(s.apply(&taken), Err(Rejected::Invalid(m)) if m.contains("belongs to hub 1")));
        assert!(matches!(s.apply(&Command::RegisterNode { node: keyed(1, "k9") }), Err(Rejected::Invalid(_))));
        assert!(matches!(s.apply(&Command::RegisterNode { node: keyed(3, "k1") }), Err(Rejected::Invalid(_))));
        assert_eq!(s, before);
        let admitted =
            Command::AdmitNode { node: keyed(2, "k2"), token_id: "t1".into(), secret_hash: "h".into(), at_ms: 1 };
        assert_eq!(s.apply(&admitted), Ok(Outcome::Admitted));
        // Its own record again, with its own key: fine (a hub keeps its description current).
        assert_eq!(
            s.apply(&Command::RegisterNode { node: NodeRecord { slots: 9, ..keyed(2, "k2") } }),
            Ok(Outcome::NodeRegistered)
        );
    }

    #[test]
    fn a_removed_hub_is_revoked_and_cannot_come_back() {
        let mut s = ClusterState::default();
        let admin = ApiTokenRecord {
            token_hash: "cd".repeat(32),
            scope: ApiScope::Admin,
            tasks: vec![],
            created_ms: 0,
            expires_ms: u64::MAX,
            revoked: false,
        };
        let mut n = node(2);
        n.cert_fingerprint = "ab".repeat(32);
        s.apply(&Command::RegisterNode { node: n.clone() }).unwrap();
        s.apply(&Command::CreateApiToken { name: "hub-2".into(), record: admin }).unwrap();
        s.apply(&Command::RemoveNode { node: NodeId(2) }).unwrap();
        assert!(s.revoked.contains(&"ab".repeat(32)));
        assert!(s.api_tokens["hub-2"].revoked, "the removed hub's admin token is revoked with it");
        assert_eq!(s.apply(&Command::RegisterNode { node: n }), Err(Rejected::Removed(NodeId(2))));
        s.apply(&Command::CreateToken { id: "t1".into(), secret_hash: "h".into(), expires_ms: 100, at_ms: 0 }).unwrap();
        assert_eq!(s.apply(&admit(2, "h", 1)), Err(Rejected::NodeIdTaken(NodeId(2))));
        assert_eq!(s.apply(&Command::RemoveNode { node: NodeId(9) }), Err(Rejected::NoSuchNode(NodeId(9))));
    }
}

#[test]
fn an_idempotent_command_applied_twice_changes_nothing_more_and_answers_alike() {
    let mut s = ClusterState::default();
    s.apply(&Command::RegisterNode { node: node(1) }).unwrap();
    s.apply(&Command::RegisterNode { node: node(2) }).unwrap();
    for status in [NodeStatus::Draining, NodeStatus::Up, NodeStatus::Down] {
        let cmd = Command::SetNodeStatus { node: NodeId(2), status };
        assert!(cmd.is_idempotent());
        let first = s.apply(&cmd);
        let once = s.clone();
        assert_eq!(s.apply(&cmd), first, "{status:?}");
        assert_eq!(s, once, "{status:?}");
    }
    // Not every command: a second deploy under Create is refused, a second registration
    // re-registers, a removal of a removed hub is refused.
    assert!(!deploy("t", DeployMode::Create).is_idempotent());
    assert!(!Command::RemoveNode { node: NodeId(2) }.is_idempotent());
}
