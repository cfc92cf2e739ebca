//! A hub cut off from the mesh, or a host that stopped answering: calls are refused at once with a
//! definite `no_quorum` (503, nothing ran), instead of being held for the router's 10 s or sent
//! into a dead connection — and what was refused never applies later.

use std::time::{Duration, Instant};

use hubmesh_proto::api::DeployParams;

use crate::failover::{add_eventually, deploy_counter, host_index, three_hubs};
use crate::harness::{example_bytes, step, wait_until, Hub};

/// What the router held a call for before it refused (`route`'s settle time): a refusal must come
/// well before it.
const HELD_BEFORE: Duration = Duration::from_secs(10);

/// Invokes `task` on `hub`, expecting a definite refusal for want of a quorum; returns how long
/// the answer took.
async fn refused(hub: &Hub, task: &str, input: &[u8], key: Option<&str>) -> Duration {
    let started = Instant::now();
    let err = hub.client.invoke(task, input.to_vec(), key).await.expect_err("a hub without the mesh answered");
    let took = started.elapsed();
    assert_eq!((err.status(), err.code()), (Some(503), Some("no_quorum")), "{task} via {}: {err}", hub.name);
    took
}

async fn add(hub: &Hub, key: &str) -> u64 {
    add_eventually(hub, "tally", key).await
}

/// Waits until `hub` sees `task` placed (it forwards calls to it only then).
async fn sees_placed(hub: &Hub, task: &str) {
    let c = hub.client.clone();
    wait_until(Duration::from_secs(30), &format!("{} sees {task} placed", hub.name), || {
        let (c, task) = (c.clone(), task.to_owned());
        async move { c.task(&task).await.is_ok_and(|t| t.placement.is_some()) }
    })
    .await;
}

/// Three hubs with the durable counter `tally` at 3 and `echo` placed, every hub seeing both.
/// Where `echo` runs is the scheduler's choice: on the host of `tally` (refused there for want of
/// a lease) or on another hub (not sent there: it is silent); both end `no_quorum`.
async fn mesh(prefix: &str) -> Vec<Hub> {
    let hubs = three_hubs(prefix).await;
    deploy_counter(&hubs[0], "tally").await;
    hubs[0].client.deploy("echo", example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();
    for hub in &hubs {
        let c = hub.client.clone();
        wait_until(Duration::from_secs(30), "every hub sees both tasks running", || {
            let c = c.clone();
            async move {
                let running = |t: &str| {
                    let c = c.clone();
                    let t = t.to_owned();
                    async move { c.task(&t).await.is_ok_and(|t| t.state == "running") }
                };
                running("tally").await && running("echo").await
            }
        })
        .await;
    }
    for i in 1..=3u64 {
        assert_eq!(add(&hubs[i as usize % 3], &format!("k{i}")).await, i);
    }
    hubs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_from_the_mesh_refuses_at_once_and_nothing_refused_applies() {
    let hubs = mesh("co").await;
    let h = host_index(&hubs, "tally").await;
    let others: Vec<usize> = (0..3).filter(|i| *i != h).collect();

    step("SIGSTOP both other hubs: the host loses its lease, then the mesh");
    for &o in &others {
        hubs[o].pause(true);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (task, input, key) in [("echo", &b"hi"[..], None), ("tally", b"1", Some("k4")), ("tally", b"1", None)] {
        let took = refused(&hubs[h], task, input, key).await;
        assert!(took < HELD_BEFORE / 2, "{task}: refused only after {took:?} (held as before)");
    }
    step("the refusal says when to retry");
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/tasks/echo/invoke", hubs[h].url))
        .bearer_auth(hubs[h].token())
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));

    step("SIGCONT: the counter goes on from 3 — neither refused increment applied");
    for &o in &others {
        hubs[o].pause(false);
    }
    assert_eq!(add(&hubs[h], "k5").await, 4);
    assert_eq!(add(&hubs[others[0]], "k4").await, 5, "k4 was refused, so it applies now, once");
    assert_eq!(add(&hubs[others[1]], "k4").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_not_sent_to_a_host_that_stopped_answering() {
    let hubs = mesh("sh").await;
    let h = host_index(&hubs, "tally").await;
    let (via, third) = ((h + 1) % 3, (h + 2) % 3);

    step("SIGSTOP the host and the third hub: the hub left has no lease and its host is silent");
    hubs[h].pause(true);
    hubs[third].pause(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for key in [Some("k4"), None] {
        let took = refused(&hubs[via], "tally", b"1", key).await;
        assert!(took < HELD_BEFORE / 2, "refused only after {took:?} (sent into the dead connection, as before)");
    }

    step("SIGCONT: the counter goes on from 3 — neither refused increment applied");
    hubs[h].pause(false);
    hubs[third].pause(false);
    assert_eq!(add(&hubs[via], "k5").await, 4);
    assert_eq!(add(&hubs[h], "k4").await, 5, "k4 was refused, so it applies now, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_call_in_flight_when_its_host_goes_silent_ends_outcome_unknown_never_refused() {
    let hubs = three_hubs("if").await;
    let params = DeployParams { timeout: Some("4s".into()), ..Default::default() };
    hubs[0].client.deploy("spinner", example_bytes("loop.wat"), &params, false).await.unwrap();
    let h = host_index(&hubs, "spinner").await;
    let (via, third) = ((h + 1) % 3, (h + 2) % 3);
    let c = hubs[via].client.clone();
    sees_placed(&hubs[via], "spinner").await;

    step("a keyed call runs on the host (it loops until its 4 s deadline); then the host and the third hub stop");
    let call = tokio::spawn(async move { c.invoke("spinner", b"x".to_vec(), Some("once")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    hubs[h].pause(true);
    hubs[third].pause(true);
    let err = call.await.unwrap().expect_err("a stopped host answered");
    // It was sent and may have run: never a definite refusal, whatever this hub learns after.
    assert_eq!((err.status(), err.code()), (Some(504), Some("outcome_unknown")), "{err}");
    hubs[h].pause(false);
    hubs[third].pause(false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_was_itself_stopped_does_not_take_the_others_for_silent() {
    let hubs = three_hubs("st").await;
    hubs[0].client.deploy("echo", example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();
    let h = host_index(&hubs, "echo").await;
    let p = (h + 1) % 3;
    let c = hubs[p].client.clone();
    sees_placed(&hubs[p], "echo").await;

    step("SIGSTOP a hub that does not host echo for 2 s, with a call to it waiting in its socket");
    hubs[p].pause(true);
    let call = tokio::spawn(async move { c.invoke("echo", b"still here".to_vec(), None).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    hubs[p].pause(false);
    // On waking, its lease and its last ping answers are 2 s old: its own stop, not the mesh's.
    assert_eq!(call.await.unwrap().expect("the woken hub forwards the call"), b"still here");
}
