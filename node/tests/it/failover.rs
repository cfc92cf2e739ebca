//! Failover of stateful tasks with replicated checkpoints: nothing acknowledged is lost.

use std::time::Duration;

use hubmesh_proto::api::{DeployParams, TaskInfo};

use crate::harness::{example_bytes, step, wait_until, Hub};

/// Three hubs, all voters.
async fn three_hubs(prefix: &str) -> Vec<Hub> {
    let a = Hub::start(&format!("{prefix}a")).await;
    let token = a.client.create_token(Some("10m")).await.unwrap().token;
    let b = Hub::start_with(&format!("{prefix}b"), &["--join", &token]).await;
    let c = Hub::start_with(&format!("{prefix}c"), &["--join", &token]).await;
    let hubs = vec![a, b, c];
    for h in &hubs {
        let client = h.client.clone();
        wait_until(Duration::from_secs(60), "3 voters", || {
            let c = client.clone();
            async move { c.status().await.is_ok_and(|s| s.voters.len() == 3 && s.nodes.len() == 3) }
        })
        .await;
    }
    hubs
}

async fn task(hub: &Hub, name: &str) -> TaskInfo {
    hub.client.task(name).await.unwrap()
}

/// Index of the hub that hosts `name`.
async fn host_index(hubs: &[Hub], name: &str) -> usize {
    let host = task(&hubs[0], name).await.placement.expect("placed").node_id;
    for (i, h) in hubs.iter().enumerate() {
        if h.client.status().await.is_ok_and(|s| s.node_id == host) {
            return i;
        }
    }
    panic!("host {host} is not one of the hubs");
}

async fn deploy_counter(hub: &Hub, name: &str) {
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
async fn add_eventually(hub: &Hub, name: &str, key: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match hub.client.invoke(name, b"1".to_vec(), Some(key)).await {
            Ok(out) => return String::from_utf8(out).unwrap().parse().unwrap(),
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "no answer within 60 s: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_counter_loses_nothing_when_its_host_is_killed() {
    let mut hubs = three_hubs("kf").await;
    deploy_counter(&hubs[0], "tally").await;
    step("20 acknowledged increments, some with idempotency keys");
    for i in 1..=20u64 {
        let key = format!("op{i}");
        assert_eq!(add(&hubs[i as usize % 3], "tally", Some(&key)).await, i);
    }
    let before = task(&hubs[0], "tally").await;
    let committed = before.committed.clone().expect("a committed checkpoint");
    assert_eq!(committed.sequence, 20, "{before:?}");
    assert_eq!(committed.stored_on.len(), 3, "host + 2 holders: {committed:?}");

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
    let t = task(&hubs[h], "tally").await;
    assert_eq!(t.committed.unwrap().sequence, 11);
}
