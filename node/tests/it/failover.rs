//! Failover of stateful tasks with replicated checkpoints: nothing acknowledged is lost.

use std::time::Duration;

use hubmesh_proto::api::{DeployParams, TaskInfo};

use crate::harness::{example_bytes, step, wait_until, Hub};

/// Three hubs, all voters.
pub(crate) async fn three_hubs(prefix: &str) -> Vec<Hub> {
    three_hubs_with(prefix, &[]).await
}

/// Three hubs, all voters, each started with `extra` flags.
pub(crate) async fn three_hubs_with(prefix: &str, extra: &[&str]) -> Vec<Hub> {
    let a = Hub::start_with(&format!("{prefix}a"), extra).await;
    let token = a.client.create_token(Some("10m")).await.unwrap().token;
    let joining: Vec<&str> = ["--join", token.as_str()].into_iter().chain(extra.iter().copied()).collect();
    let b = Hub::start_with(&format!("{prefix}b"), &joining).await;
    let c = Hub::start_with(&format!("{prefix}c"), &joining).await;
    let hubs = vec![a, b, c];
    three_voters_everywhere(&hubs).await;
    hubs
}

/// Waits until every hub sees 3 voters and 3 hubs.
pub(crate) async fn three_voters_everywhere(hubs: &[Hub]) {
    for h in hubs {
        let client = h.client.clone();
        wait_until(Duration::from_secs(60), "3 voters", || {
            let c = client.clone();
            async move { c.status().await.is_ok_and(|s| s.voters.len() == 3 && s.nodes.len() == 3) }
        })
        .await;
    }
}

pub(crate) async fn task(hub: &Hub, name: &str) -> TaskInfo {
    hub.client.task(name).await.unwrap()
}

/// Index of the hub that hosts `name`.
pub(crate) async fn host_index(hubs: &[Hub], name: &str) -> usize {
    let host = task(&hubs[0], name).await.placement.expect("placed").node_id;
    for (i, h) in hubs.iter().enumerate() {
        if h.client.status().await.is_ok_and(|s| s.node_id == host) {
            return i;
        }
    }
    panic!("host {host} is not one of the hubs");
}

/// Waits until `hub` has applied a committed checkpoint of `name` that passes `ok` (a hub applies
/// a commit a moment after the leader, so reads through it lag slightly), and returns the task.
async fn committed_on(
    hub: &Hub,
    name: &str,
    ok: impl Fn(&hubmesh_proto::api::CommittedCheckpointInfo) -> bool,
) -> TaskInfo {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = task(hub, name).await;
        if t.committed.as_ref().is_some_and(&ok) {
            return t;
        }
        assert!(tokio::time::Instant::now() < deadline, "no such committed checkpoint on {}: {t:?}", hub.name);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn deploy_counter(hub: &Hub, name: &str) {
    let params = DeployParams { durable: true, ..Default::default() };
    hub.client.deploy(name, example_bytes("counter.wat"), &params, false).await.unwrap();
    let client = hub.client.clone();
    wait_until(Duration::from_secs(30), "the counter runs and has two holders", || {
        let c = client.clone();
        let name = name.to_owned();
        async move { c.task(&name).await.is_ok_and(|t| t.state == "running" && t.holders.len() == 2) }
    })
    .await;
}

async fn add(hub: &Hub, name: &str, key: Option<&str>) -> u64 {
    let out = hub.client.invoke(name, b"1".to_vec(), key).await.unwrap();
    String::from_utf8(out).unwrap().parse().unwrap()
}

/// Invokes through `hub` until it answers (the task may be failing over), bounded.
pub(crate) async fn add_eventually(hub: &Hub, name: &str, key: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match hub.client.invoke(name, b"1".to_vec(), Some(key)).await {
            Ok(out) => return String::from_utf8(out).unwrap().parse().unwrap(),
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no answer within 60 s: {e}\n--- log of {}:\n{}",
                    hub.name,
                    hub.log_tail(60)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_counter_loses_nothing_when_its_host_is_killed() {
    let mut hubs = three_hubs("kf").await;
    deploy_counter(&hubs[0], "tally").await;
    // Every hub takes calls below: each must have applied the deploy (a hub that has not yet
    // knows no such task).
    for hub in &hubs {
        let c = hub.client.clone();
        wait_until(Duration::from_secs(30), "every hub sees the counter placed", || {
            let c = c.clone();
            async move { c.task("tally").await.is_ok_and(|t| t.placement.is_some()) }
        })
        .await;
    }
    step("20 acknowledged increments, some with idempotency keys");
    for i in 1..=20u64 {
        let key = format!("op{i}");
        assert_eq!(add(&hubs[i as usize % 3], "tally", Some(&key)).await, i);
    }
    // Host + 2 holders (the second holder's copy may follow the commit).
    let before = committed_on(&hubs[0], "tally", |c| c.sequence == 20 && c.stored_on.len() == 3).await;

    step("kill -9 the host");
    let h = host_index(&hubs, "tally").await;
    hubs[h].kill9();
    let dead = hubs.remove(h);
    let old_epoch = before.placement.unwrap().epoch;

    step("the next increment through another hub answers 21; a retried key answers its first result");
    assert_eq!(add_eventually(&hubs[0], "tally", "op21").await, 21);
    assert_eq!(add(&hubs[1], "tally", Some("op21")).await, 21, "a retried key is applied once");
    assert_eq!(add(&hubs[1], "tally", Some("op7")).await, 7, "keys from before the failover are remembered");
    assert_eq!(add(&hubs[1], "tally", None).await, 22);
    let after = task(&hubs[1], "tally").await;
    let p = after.placement.clone().unwrap();
    assert!(p.epoch > old_epoch, "{after:?}");
    let last = after.history.last().expect("history");
    assert_eq!(last.reason, "failover");
    assert_eq!(last.from_sequence, Some(20));
    drop(dead);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_host_does_not_answer_with_stale_state() {
    let hubs = three_hubs("ps").await;
    deploy_counter(&hubs[0], "tally").await;
    for i in 1..=5u64 {
        assert_eq!(add(&hubs[0], "tally", Some(&format!("p{i}"))).await, i);
    }
    let h = host_index(&hubs, "tally").await;
    let other = (h + 1) % 3;
    let old = task(&hubs[other], "tally").await.placement.unwrap();

    step("SIGSTOP the host past node_down; the task moves and goes on from 5");
    hubs[h].pause(true);
    let client = hubs[other].client.clone();
    wait_until(Duration::from_secs(30), "the task is re-placed", || {
        let c = client.clone();
        async move { c.task("tally").await.is_ok_and(|t| t.placement.is_some_and(|p| p.epoch > old.epoch)) }
    })
    .await;
    assert_eq!(add_eventually(&hubs[other], "tally", "p6").await, 6);

    step("SIGCONT: the old host wakes up, finds a newer epoch and does not answer from its stale copy");
    hubs[h].pause(false);
    for i in 7..=10u64 {
        // Through every hub, the woken one included.
        let via = &hubs[i as usize % 3];
        assert_eq!(add_eventually(via, "tally", &format!("p{i}")).await, i);
    }
    assert_eq!(add_eventually(&hubs[h], "tally", "p11").await, 11);
    committed_on(&hubs[h], "tally", |c| c.sequence == 11).await;
}

/// Flips one byte in every page record of a hub's page log (format in `storage::page_log`).
fn corrupt_every_page(data_dir: &std::path::Path) -> usize {
    use std::os::unix::fs::FileExt;
    let path = data_dir.join("checkpoints/pages.log");
    let bytes = std::fs::read(&path).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // Format 2 starts with its magic (`storage::page_log::record`).
    let start = if bytes.starts_with(b"HMPLOG2\n") { 8 } else { 0 };
    let (mut at, mut flipped) = (start, 0);
    while at + 3 <= bytes.len() {
        let kind = bytes[at];
        let key_len = u16::from_le_bytes([bytes[at + 1], bytes[at + 2]]) as usize;
        let len_at = at + 3 + key_len;
        let data_len = u32::from_le_bytes(bytes[len_at..len_at + 4].try_into().unwrap()) as usize;
        let data_at = len_at + 4;
        if kind == 1 && data_len > 0 {
            let mid = data_at + data_len / 2;
            file.write_all_at(&[bytes[mid] ^ 0xff], mid as u64).unwrap();
            flipped += 1;
        }
        at = data_at + data_len + 32;
    }
    file.sync_all().unwrap();
    flipped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_are_replaced_and_a_corrupt_page_is_repaired_from_another_holder() {
    let mut hubs = three_hubs("hr").await;
    deploy_counter(&hubs[0], "tally").await;
    for i in 1..=3u64 {
        assert_eq!(add(&hubs[0], "tally", Some(&format!("h{i}"))).await, i);
    }
    let id_of = |hubs: &[Hub], i: usize| {
        let c = hubs[i].client.clone();
        async move { c.status().await.unwrap().node_id }
    };
    let h = host_index(&hubs, "tally").await;
    let holder = (0..3).find(|i| *i != h).unwrap();
    let holder_id = id_of(&hubs, holder).await;

    step("kill a holder: durable increments go on with the holder that is left");
    hubs[holder].kill9();
    let watcher = hubs[h].client.clone();
    wait_until(Duration::from_secs(30), "the dead holder is replaced in the holder list", || {
        let c = watcher.clone();
        async move { c.task("tally").await.is_ok_and(|t| t.holders.len() == 1 && !t.holders.contains(&holder_id)) }
    })
    .await;
    assert_eq!(add_eventually(&hubs[h], "tally", "h4").await, 4);
    let t = committed_on(&hubs[h], "tally", |c| c.sequence == 4).await;
    assert_eq!(t.committed.unwrap().stored_on.len(), 2);

    step("it comes back: it is a holder again and gets a copy of the committed checkpoint unasked");
    hubs[holder].restart().await;
    wait_until(Duration::from_secs(30), "two holders again, and three copies without a new checkpoint", || {
        let c = watcher.clone();
        async move {
            c.task("tally").await.is_ok_and(|t| {
                t.holders.len() == 2 && t.committed.is_some_and(|c| c.sequence == 4 && c.stored_on.len() == 3)
            })
        }
    })
    .await;
    assert_eq!(add_eventually(&hubs[h], "tally", "h5").await, 5);
    committed_on(&hubs[h], "tally", |c| c.sequence == 5 && c.stored_on.len() == 3).await;

    step("corrupt every page on the holder that will take over (the lowest id), then kill the host");
    let mut holder_ids = Vec::new();
    for i in (0..3).filter(|i| *i != h) {
        holder_ids.push((id_of(&hubs, i).await, i));
    }
    holder_ids.sort();
    let (_, next) = holder_ids[0];
    assert!(corrupt_every_page(hubs[next].data_dir()) > 0);
    hubs[h].kill9();
    assert_eq!(add_eventually(&hubs[next], "tally", "h6").await, 6);
    assert_eq!(task(&hubs[next], "tally").await.placement.unwrap().node_id, holder_ids[0].0);
    assert!(
        hubs[next].log_tail(usize::MAX).contains("a checkpoint page is corrupt here"),
        "{}",
        hubs[next].log_tail(60)
    );
    assert_eq!(add(&hubs[next], "tally", Some("h2")).await, 2, "idempotency answers survive the repair");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_dies_during_a_failover_and_nothing_acknowledged_is_lost() {
    let a = Hub::start("lha").await;
    let token = a.client.create_token(Some("10m")).await.unwrap().token;
    let mut hubs = vec![a];
    for n in ["lhb", "lhc", "lhd", "lhe"] {
        hubs.push(Hub::start_with(n, &["--join", &token]).await);
    }
    for h in &hubs {
        let client = h.client.clone();
        wait_until(Duration::from_secs(90), "5 voters", || {
            let c = client.clone();
            async move { c.status().await.is_ok_and(|s| s.voters.len() == 5) }
        })
        .await;
    }
    deploy_counter(&hubs[0], "tally").await;
    for i in 1..=10u64 {
        assert_eq!(add(&hubs[i as usize % 5], "tally", Some(&format!("l{i}"))).await, i);
    }
    step("kill -9 the host, then the leader while the failover is under way (or one hub that is both)");
    let host = host_index(&hubs, "tally").await;
    let leader_id = hubs[0].client.status().await.unwrap().leader.unwrap();
    let mut leader = None;
    for (i, h) in hubs.iter().enumerate() {
        if h.client.status().await.unwrap().node_id == leader_id {
            leader = Some(i);
        }
    }
    let leader = leader.expect("the leader is a hub");
    let mut ids = Vec::new();
    for h in &hubs {
        ids.push(h.client.status().await.unwrap().node_id);
    }
    hubs[host].kill9();
    if host != leader {
        // The failover is under way once the leader has judged the host down (its next step is
        // the re-placement): the leader dies then, not after a guessed delay.
        let host_id = ids[host];
        let judge = hubs[leader].client.clone();
        wait_until(Duration::from_secs(10), "the leader marks the dead host down", || {
            let c = judge.clone();
            async move { c.nodes().await.is_ok_and(|ns| ns.iter().any(|n| n.id == host_id && n.down)) }
        })
        .await;
    }
    hubs[leader].kill9();
    let mut victims = vec![host, leader];
    victims.sort();
    victims.dedup();
    for v in victims.iter().rev() {
        drop(hubs.remove(*v));
    }
    step("a new leader re-places the task; the count goes on from 10");
    assert_eq!(add_eventually(&hubs[0], "tally", "l11").await, 11);
    assert_eq!(add(&hubs[1], "tally", Some("l11")).await, 11);
    assert_eq!(add(&hubs[2], "tally", None).await, 12);
    let t = task(&hubs[0], "tally").await;
    assert_eq!(t.history.last().unwrap().from_sequence, Some(10), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_while_checkpoints_stream_loses_and_duplicates_nothing() {
    let mut hubs = three_hubs("hs").await;
    deploy_counter(&hubs[0], "tally").await;
    let h = host_index(&hubs, "tally").await;
    let holder = (h + 1) % 3;
    let via = hubs[h].client.clone();
    step("a stream of keyed increments through the host; a holder dies in the middle of it");
    let writer = tokio::spawn(async move {
        let mut answers = Vec::new();
        for i in 1..=60u64 {
            // An error is retried with the same key until it answers: applied exactly once.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let n = loop {
                match via.invoke("tally", b"1".to_vec(), Some(&format!("s{i}"))).await {
                    Ok(out) => break String::from_utf8(out).unwrap().parse::<u64>().unwrap(),
                    Err(e) => {
                        assert!(tokio::time::Instant::now() < deadline, "op s{i}: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            };
            answers.push(n);
        }
        answers
    });
    // The stream is under way once a few of its increments are committed.
    committed_on(&hubs[h], "tally", |c| c.sequence >= 5).await;
    assert!(!writer.is_finished(), "the holder must die while the stream runs");
    hubs[holder].kill9();
    let answers = writer.await.unwrap();
    assert_eq!(answers, (1..=60).collect::<Vec<u64>>(), "every op applied once, in order");
    step("then the host dies too: the survivor answers 61");
    let survivor = 3 - h - holder;
    hubs[h].kill9();
    // One hub of three is left: no quorum, so the task cannot move; bring the holder back.
    hubs[holder].restart().await;
    assert_eq!(add_eventually(&hubs[survivor], "tally", "s61").await, 61);
}

/// Frame of a checkpoint push body: hash, little-endian length, bytes.
fn push_frame(hash: &[u8; 32], len: u32, data: &[u8]) -> bytes::Bytes {
    [&hash[..], &len.to_le_bytes(), data].concat().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_refuses_bad_checkpoint_pushes_and_stores_nothing() {
    use hubmesh_consensus::tls::{Identity, NodeKey};
    use hubmesh_consensus::transport::{RpcError, StreamKind, Transport};
    use hubmesh_proto::{pb, Message};
    // Untyped, so that the test can send what no typed caller would.
    const PUSH: StreamKind = StreamKind::CheckpointPush;

    let hubs = three_hubs("bp").await;
    deploy_counter(&hubs[0], "bp").await;
    assert_eq!(add(&hubs[0], "bp", None).await, 1);
    let h = host_index(&hubs, "bp").await;
    let holder = (0..3).find(|i| *i != h).unwrap();
    let c = committed_on(&hubs[h], "bp", |c| c.sequence == 1 && c.stored_on.len() == 3).await.committed.unwrap();
    let host_id = hubs[h].client.status().await.unwrap().node_id;
    let holder_id = hubs[holder].client.status().await.unwrap().node_id;

    step("speak as the host (its own certificate) from another endpoint, to a holder");
    let tls = hubs[h].data_dir().join("tls");
    let read = |f: &str| std::fs::read(tls.join(f)).unwrap();
    let identity = Identity {
        ca_der: read("ca.der"),
        cert_der: read("node.der"),
        key: NodeKey::from_pkcs8(&read("node.key")).unwrap(),
    };
    let t = Transport::bind("127.0.0.1:0".parse().unwrap(), &identity, host_id, Duration::from_millis(30)).unwrap();
    let mesh = std::fs::read_to_string(hubs[holder].data_dir().join("mesh.addr")).unwrap();
    t.set_peer(holder_id, mesh.trim().parse().unwrap());
    let log = hubs[holder].data_dir().join("checkpoints/pages.log");
    let size = || std::fs::metadata(&log).unwrap().len();
    let before = size();

    let page = vec![7u8; 65536];
    let good = *blake3::hash(&page).as_bytes();
    let next_key = format!("bp/{}/{}", c.epoch, c.sequence + 1);
    let header = |key: &str| {
        pb::CheckpointPush {
            task: "bp".into(),
            key: key.into(),
            manifest: b"manifest".to_vec(),
            refs: vec![good.to_vec()],
            keep: String::new(),
        }
        .encode_to_vec()
    };
    let refused = |r: Result<Vec<u8>, RpcError>, code: pb::ErrorCode, says: &str| match r {
        Err(RpcError::Remote(r)) => {
            assert_eq!(r.code, code, "{}", r.message);
            assert!(r.message.contains(says), "{:?} does not say {says:?}", r.message);
        }
        other => panic!("expected a refusal saying {says:?}, got {other:?}"),
    };
    let send = |key: String, body: Vec<bytes::Bytes>| {
        let t = t.clone();
        let header = header(&key);
        async move {
            let mut call = t.call_bulk(holder_id, PUSH, header).await?;
            for b in body {
                call.send(b).await?;
            }
            tokio::time::timeout(Duration::from_secs(30), call.finish()).await.unwrap()
        }
    };

    step("a page that does not match its hash");
    let r = send(next_key.clone(), vec![push_frame(&good, 65536, &[8u8; 65536])]).await;
    refused(r, pb::ErrorCode::BadRequest, "does not match its hash");
    step("a page the manifest does not refer to, and more pages than it refers to");
    let r = send(next_key.clone(), vec![push_frame(&[1u8; 32], 65536, &page)]).await;
    refused(r, pb::ErrorCode::BadRequest, "is not part of checkpoint");
    let r = send(next_key.clone(), vec![push_frame(&good, 65536, &page), push_frame(&good, 65536, &page)]).await;
    refused(r, pb::ErrorCode::BadRequest, "more pages than");
    step("a page length over the limit");
    let r = send(next_key.clone(), vec![push_frame(&good, 1 << 30, &page)]).await;
    refused(r, pb::ErrorCode::BadRequest, "larger than");
    step("a body that ends inside a page");
    let r = send(next_key.clone(), vec![push_frame(&good, 65536, &page[..100])]).await;
    refused(r, pb::ErrorCode::BadRequest, "ended");
    step("a checkpoint of an epoch older than the task's placement");
    let r = send(format!("bp/{}/99", c.epoch - 1), vec![push_frame(&good, 65536, &page)]).await;
    refused(r, pb::ErrorCode::Unavailable, "stale epoch");
    step("a key of another task, and a task name that is not one");
    let r = send("other/1/1".into(), vec![]).await;
    refused(r, pb::ErrorCode::BadRequest, "is not of task");
    let bad_name = pb::CheckpointPush { task: "../x".into(), key: "../x/1/1".into(), ..Default::default() };
    let r = async { t.call_bulk(holder_id, PUSH, bad_name.encode_to_vec()).await?.finish().await }.await;
    refused(r, pb::ErrorCode::BadRequest, "");
    step("a header that is not protobuf");
    let r = async { t.call_bulk(holder_id, PUSH, vec![0xff; 16]).await?.finish().await }.await;
    refused(r, pb::ErrorCode::BadRequest, "");

    assert_eq!(size(), before, "a refused push wrote to the holder's page log");
    step("the task goes on: its committed checkpoint cannot be replaced under its key");
    assert_eq!(add(&hubs[h], "bp", None).await, 2);
    // The answer waits for the commit, not for the holder to apply it: the holder judges the
    // push by what it has applied.
    committed_on(&hubs[holder], "bp", |c| c.sequence == 2).await;
    let r = send(next_key.clone(), vec![]).await;
    refused(r, pb::ErrorCode::Unavailable, "is not newer than the committed");
    step("a good push of a page it lacks is answered with the page missing");
    let later_key = format!("bp/{}/{}", c.epoch, c.sequence + 100);
    let r = send(later_key, vec![]).await.unwrap();
    let missing = pb::CheckpointPushResponse::decode(r.as_slice()).unwrap().missing;
    assert_eq!(missing, vec![good.to_vec()], "the holder names the page it lacks");
}

/// Two memory pages with the same (non-zero) bytes are one page in the page log and may be one
/// page sent twice; the checkpoint must still replicate, and restore both after a failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_with_identical_pages_replicate_and_fail_over() {
    const TWINS: &str = r#"(module
      (import "hubmesh" "output" (func $output (param i32 i32)))
      (memory (export "memory") 4)
      (func (export "hm_invoke") (param $len i32) (result i32)
        ;; pages 1 and 2 hold the same bytes; page 0 counts the calls
        (memory.fill (i32.const 65536) (i32.const 0xab) (i32.const 131072))
        (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))
        ;; the answer: the count, and one byte from each twin
        (i32.store8 (i32.const 4) (i32.load8_u (i32.const 70000)))
        (i32.store8 (i32.const 5) (i32.load8_u (i32.const 140000)))
        (call $output (i32.const 0) (i32.const 6))
        (i32.const 0)))"#;
    let mut hubs = three_hubs("tw").await;
    let params = DeployParams { durable: true, ..Default::default() };
    hubs[0].client.deploy("twins", TWINS.as_bytes().to_vec(), &params, false).await.unwrap();
    let client = hubs[0].client.clone();
    wait_until(Duration::from_secs(30), "twins runs with two holders", || {
        let c = client.clone();
        async move { c.task("twins").await.is_ok_and(|t| t.state == "running" && t.holders.len() == 2) }
    })
    .await;
    for i in 1..=3u32 {
        let out = hubs[0].client.invoke("twins", vec![], Some(&format!("k{i}"))).await.unwrap();
        assert_eq!(out, [&i.to_le_bytes()[..], &[0xab, 0xab]].concat());
    }
    let h = host_index(&hubs, "twins").await;
    committed_on(&hubs[h], "twins", |c| c.sequence >= 3 && c.stored_on.len() == 3).await;

    step("kill the host: a holder restores both twins");
    hubs[h].kill9();
    let via = &hubs[(h + 1) % 3];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let out = loop {
        match via.client.invoke("twins", vec![], Some("k4")).await {
            Ok(out) => break out,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "no answer after the failover: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(out, [&4u32.to_le_bytes()[..], &[0xab, 0xab]].concat());
}

/// One stopped holder must not hold up durable answers: with `node_down` far away (30 s), the
/// leader does not mark it down, so a commit that waited for every holder would fail at its
/// deadline (10 s); it commits on the holder that answers and copies to the other afterwards.
/// Each checkpoint carries 64 new pages, more than the push reads ahead for its holders, so a
/// holder that takes none of them must not hold up the one that does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_holder_does_not_hold_up_durable_answers() {
    let cfg = tempfile::tempdir().unwrap();
    let path = cfg.path().join("config.toml");
    std::fs::write(&path, "[timeouts]\nnode_down = \"30s\"\n").unwrap();
    let hubs = three_hubs_with("sh", &["--config", path.to_str().unwrap()]).await;
    let params = DeployParams { durable: true, ..Default::default() };
    hubs[0].client.deploy("big", example_bytes("bigstate.wat"), &params, false).await.unwrap();
    let client = hubs[0].client.clone();
    wait_until(Duration::from_secs(30), "the task runs and has two holders", || {
        let c = client.clone();
        async move { c.task("big").await.is_ok_and(|t| t.state == "running" && t.holders.len() == 2) }
    })
    .await;
    let h = host_index(&hubs, "big").await;
    let pages = |n: u32| n.to_le_bytes().to_vec();
    assert_eq!(hubs[h].client.invoke("big", pages(256), None).await.unwrap(), pages(256), "sized to 256 pages");
    hubs[h].client.invoke("big", pages(64), None).await.unwrap();
    // The host's own last checkpoint is the one its durable answer waited for; the state it
    // reads may lag a moment, so wait for that sequence by number.
    let first = task(&hubs[h], "big").await.last_checkpoint.expect("a checkpoint").sequence;
    committed_on(&hubs[h], "big", |c| c.sequence == first && c.stored_on.len() == 3).await;
    let leader = hubs[h].client.status().await.unwrap().leader.unwrap();
    let mut ids = Vec::new();
    for hub in &hubs {
        ids.push(hub.client.status().await.unwrap().node_id);
    }
    // A holder that does not lead, so that the mesh keeps its leader.
    let slow = (0..3).find(|i| *i != h && ids[*i] != leader).unwrap();

    step(
        "SIGSTOP a holder; once the pings to it time out its connection is gone (a push to it hangs in the handshake)",
    );
    hubs[slow].pause(true);
    // Part of the fault, not a wait for a result: past the election gate's 1 s ping timeout the
    // host drops its connection to the stopped hub, so that the next push to it hangs in a new
    // handshake (not in an open stream's buffer) and takes no pages at all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    step("durable invocations of 64 dirty pages go on, committed on the host and the other holder");
    for i in 1..=5u64 {
        let started = std::time::Instant::now();
        let out = hubs[h].client.invoke("big", pages(64), None).await;
        assert!(out.is_ok(), "invocation {i} with a stopped holder: {out:?}");
        // Held up by the stopped holder, an answer would wait for its push to fail: the QUIC
        // handshake's 5 s, or the commit's 10 s deadline. Unhindered it takes milliseconds.
        let took = started.elapsed();
        assert!(took < Duration::from_millis(2500), "invocation {i} waited {took:?} for the stopped holder");
    }
    let t = committed_on(&hubs[h], "big", |c| c.sequence == first + 5).await;
    let stored = t.committed.clone().unwrap().stored_on;
    assert!(!stored.contains(&ids[slow]) && stored.len() == 2, "stored on {stored:?}, stopped: {}", ids[slow]);
    assert!(t.holders.contains(&ids[slow]), "the stopped holder was not marked down or replaced: {t:?}");

    step("SIGCONT: the holder gets the committed checkpoint without a new invocation");
    hubs[slow].pause(false);
    let watcher = hubs[h].client.clone();
    wait_until(Duration::from_secs(30), "three copies of the last checkpoint", || {
        let c = watcher.clone();
        async move {
            c.task("big")
                .await
                .is_ok_and(|t| t.committed.is_some_and(|c| c.sequence == first + 5 && c.stored_on.len() == 3))
        }
    })
    .await;
}
