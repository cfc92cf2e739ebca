//! State across crashes and restarts of a real hub.

use std::time::Duration;

use hubmesh_proto::api::DeployParams;

use crate::harness::{example_bytes, step, wait_until, Hub};

async fn add(hub: &Hub, task: &str, delta: &str, key: Option<&str>) -> i64 {
    let out = hub.client.invoke(task, delta.as_bytes().to_vec(), key).await.unwrap();
    String::from_utf8(out).unwrap().parse().unwrap()
}

/// Invokes until the task answers (an update restarts it), within 20 s.
async fn invoke_when_ready(hub: &Hub, task: &str, delta: &str) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match hub.client.invoke(task, delta.as_bytes().to_vec(), None).await {
            Ok(out) => return String::from_utf8(out).unwrap().parse().unwrap(),
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{task} does not answer: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_task_keeps_every_acknowledged_update_after_kill_9() {
    let mut hub = Hub::start("durable").await;
    let params = DeployParams { durable: true, ..Default::default() };
    hub.client.deploy("counter", example_bytes("counter.wat"), &params, false).await.unwrap();
    step("100 acknowledged increments, some with keys");
    for i in 1..=100 {
        let key = (i % 10 == 0).then(|| format!("op-{i}"));
        assert_eq!(add(&hub, "counter", "1", key.as_deref()).await, i);
    }
    step("kill -9 and restart");
    hub.kill9();
    hub.restart().await;
    step("the next invocation answers N+1, and a retried key is not applied again");
    assert_eq!(add(&hub, "counter", "1", Some("op-100")).await, 100);
    assert_eq!(add(&hub, "counter", "1", None).await, 101);
    let t = hub.client.task("counter").await.unwrap();
    assert_eq!(t.version, 1);
    assert!(t.last_checkpoint.is_some_and(|c| c.sequence >= 101));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_task_loses_at_most_its_interval() {
    let mut hub = Hub::start("periodic").await;
    let params = DeployParams { checkpoint_every: Some("100ms".into()), ..Default::default() };
    hub.client.deploy("counter", example_bytes("counter.wat"), &params, false).await.unwrap();
    for _ in 0..20 {
        add(&hub, "counter", "1", None).await;
    }
    step("the idle task's timer takes a checkpoint covering all 20");
    let client = hub.client.clone();
    wait_until(Duration::from_secs(20), "a checkpoint covers the 20 updates", || {
        let c = client.clone();
        async move { c.task("counter").await.unwrap().last_checkpoint.is_some_and(|cp| cp.invocations == 20) }
    })
    .await;
    step("5 more, then kill -9 right away: what was checkpointed survives, at most 5 are lost");
    for _ in 0..5 {
        add(&hub, "counter", "1", None).await;
    }
    hub.kill9();
    hub.restart().await;
    let after = add(&hub, "counter", "0", None).await;
    assert!((20..=25).contains(&after), "after restart the total is {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_saves_periodic_state_and_keeps_deployments() {
    let mut hub = Hub::start("graceful").await;
    let params = DeployParams { checkpoint_every: Some("1h".into()), ..Default::default() };
    hub.client.deploy("counter", example_bytes("counter.wat"), &params, false).await.unwrap();
    hub.client.deploy("echo", example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();
    assert_eq!(add(&hub, "counter", "7", None).await, 7);
    step("SIGTERM: the final checkpoint is taken even though the interval has not passed");
    hub.terminate();
    hub.restart().await;
    assert_eq!(add(&hub, "counter", "1", None).await, 8);
    assert_eq!(hub.client.invoke("echo", b"back".to_vec(), None).await.unwrap(), b"back");
    let names: Vec<String> = hub.client.tasks().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["counter", "echo"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_keeps_the_state_of_the_same_module_and_starts_another_fresh() {
    let hub = Hub::start("update").await;
    let params = DeployParams { durable: true, ..Default::default() };
    hub.client.deploy("counter", example_bytes("counter.wat"), &params, false).await.unwrap();
    assert_eq!(add(&hub, "counter", "5", None).await, 5);
    step("a second deploy without --update is refused and changes nothing");
    let err = hub.client.deploy("counter", example_bytes("counter.wat"), &params, false).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(409), Some("task_exists")));
    assert_eq!(add(&hub, "counter", "0", None).await, 5);
    step("--update publishes version 2 with a new epoch");
    let before = hub.client.task("counter").await.unwrap();
    let upd = hub.client.deploy("counter", example_bytes("counter.wat"), &params, true).await.unwrap();
    assert!(!upd.created);
    assert_eq!(upd.task.version, 2);
    assert!(upd.task.placement.unwrap().epoch > before.placement.unwrap().epoch);
    step("the same module keeps its state across the update: the count is still 5");
    assert_eq!(invoke_when_ready(&hub, "counter", "0").await, 5);
    step("another module (version 3) starts from fresh state: the count is 0, not 5");
    let wat = String::from_utf8(example_bytes("counter.wat")).unwrap();
    let changed =
        format!("{})", wat.trim_end().strip_suffix(')').expect("a module ends with ')'").to_owned() + "(func $unused)");
    let upd = hub.client.deploy("counter", changed.into_bytes(), &params, true).await.unwrap();
    assert_eq!(upd.task.version, 3);
    assert_eq!(invoke_when_ready(&hub, "counter", "0").await, 0, "the new module kept the old module's state");
    assert_eq!(add(&hub, "counter", "1", None).await, 1);
    step("update of a missing task is a 404");
    let err = hub.client.deploy("ghost", example_bytes("counter.wat"), &params, true).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"));
}
