//! Drain by live migration, and migration on overload, with real hubs: the tasks of a drained
//! hub move while clients keep calling them, losing nothing in any checkpoint mode; a hub that
//! offers one core and runs two CPU-heavy tasks sheds one by itself, and nothing moves after.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hubmesh::client::Client;
use hubmesh_proto::api::{DeployParams, TaskInfo};

use crate::failover::{deploy_counter, host_index, task, three_hubs, three_voters_everywhere};
use crate::harness::{example_bytes, step, wait_until, Hub};
use crate::migration::increment_until;

fn last_reason(t: &TaskInfo) -> (String, bool) {
    let h = t.history.last().expect("a history");
    (h.reason.clone(), h.migration.as_ref().is_some_and(|m| m.aborted.is_none()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_hub_migrates_its_tasks_and_no_call_fails_in_any_mode() {
    let hubs = three_hubs("dr").await;
    deploy_counter(&hubs[0], "tally").await;
    let memory_only = DeployParams { stateful: true, ..Default::default() };
    let periodic = DeployParams { stateful: true, checkpoint_every: Some("1h".into()), ..Default::default() };
    for (name, params) in [("scratch", &memory_only), ("hourly", &periodic)] {
        hubs[0].client.deploy(name, example_bytes("counter.wat"), params, false).await.unwrap();
    }
    for name in ["scratch", "hourly"] {
        let c = hubs[0].client.clone();
        wait_until(Duration::from_secs(30), "the task runs", || {
            let c = c.clone();
            async move { c.task(name).await.is_ok_and(|t| t.state == "running") }
        })
        .await;
    }
    // Every task on the hub that will be drained (the counter's host).
    let host = host_index(&hubs, "tally").await;
    let host_id = task(&hubs[0], "tally").await.placement.unwrap().node_id;
    for name in ["scratch", "hourly"] {
        let m = hubs[0].client.migrate(name, Some(&host_id.to_string())).await;
        assert!(m.is_ok() || task(&hubs[0], name).await.placement.unwrap().node_id == host_id, "{m:?}");
    }
    let callers_at: Vec<usize> = (0..3).filter(|i| *i != host).collect();

    step("clients call the three tasks through the other hubs; the host is drained");
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for (n, name) in ["tally", "scratch", "hourly"].into_iter().enumerate() {
        let client = hubs[callers_at[n % 2]].client.clone();
        callers.push(tokio::spawn(increment_until(client, name, format!("c{n}"), stop.clone())));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let host_name = hubs[host].name.clone();
    let nodes = hubs[callers_at[0]].client.drain(&host_name, false).await.unwrap();
    assert!(nodes.iter().any(|n| n.id == host_id && n.role.contains("draining")), "{nodes:?}");
    let probe = hubs[callers_at[0]].client.clone();
    wait_until(Duration::from_secs(60), "every task left the drained hub by migration", || {
        let c = probe.clone();
        async move {
            let mut all = true;
            for name in ["tally", "scratch", "hourly"] {
                all &= c.task(name).await.is_ok_and(|t| t.placement.is_some_and(|p| p.node_id != host_id));
            }
            all
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    step("no call failed, every count is exact, and the history says drain");
    for (name, caller) in ["tally", "scratch", "hourly"].into_iter().zip(callers) {
        let answers = caller.await.unwrap().unwrap_or_else(|e| panic!("{e}\n{}", hubs[host].log_tail(40)));
        assert!(!answers.is_empty());
        assert_eq!(answers, (1..=answers.len() as u64).collect::<Vec<_>>(), "{name}: each call applied once");
        let now = hubs[callers_at[1]].client.invoke(name, b"0".to_vec(), None).await.unwrap();
        assert_eq!(now, answers.len().to_string().as_bytes(), "{name}: nothing lost");
        let t = task(&hubs[callers_at[1]], name).await;
        assert_eq!(last_reason(&t), ("drain".to_owned(), true), "{name}: {:?}", t.history.last());
    }
    let nodes = hubs[callers_at[0]].client.drain(&host_name, true).await.unwrap();
    assert!(nodes.iter().all(|n| !n.role.contains("draining")), "{nodes:?}");
}

/// Calls a CPU-heavy task in a loop until `stop` (at most 5,000 calls), resting twice as long as
/// each call took: about a third of a core per task, so that the test loads its hub without
/// starving the tests that run beside it. The calls made, or the first failure.
async fn spin_until(client: Client, task: String, stop: Arc<AtomicBool>) -> Result<u32, String> {
    let mut calls = 0;
    for i in 0..5_000u32 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let began = std::time::Instant::now();
        client.invoke(&task, Vec::new(), None).await.map_err(|e| format!("{task}: call {i} failed: {e}"))?;
        calls += 1;
        tokio::time::sleep(began.elapsed() * 2).await;
    }
    Ok(calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_offering_one_core_sheds_a_cpu_heavy_task_by_itself_and_nothing_moves_after() {
    // A short window and cooldown, so that staying put after the move is the policy's doing;
    // low marks, so that two tasks using up to a third of a core each overload a one-core hub.
    // The marks leave room both ways: the source must stay above `high` for the whole window
    // (each task above a tenth of a core: on a loaded CI machine a task gets less than its third,
    // and at 0.3 the hub dipped below the mark and the window never completed), and a target that
    // offers four cores stays below it with one task (under 0.8 of a core).
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hubmesh.toml");
    let overload = "[overload]\nwindow = \"2s\"\ncooldown = \"5s\"\nhigh = 0.2\nlow = 0.1\n";
    std::fs::write(&config, overload).unwrap();
    let config = config.to_str().unwrap().to_owned();
    // The first hub offers one core and the most slots, so the scheduler puts both tasks there.
    let a = Hub::start_with("ova", &["--config", &config, "--task-cpus", "1", "--slots", "200"]).await;
    let token = a.client.create_token(Some("10m")).await.unwrap().token;
    let b = Hub::start_with("ovb", &["--join", &token, "--config", &config, "--task-cpus", "4"]).await;
    let c = Hub::start_with("ovc", &["--join", &token, "--config", &config, "--task-cpus", "4"]).await;
    let hubs = [a, b, c];
    three_voters_everywhere(&hubs).await;
    let a_id = hubs[0].client.status().await.unwrap().node_id;
    let stateful = DeployParams { stateful: true, ..Default::default() };
    for (name, params) in [("spin-a", &stateful), ("spin-b", &DeployParams::default())] {
        let d = hubs[0].client.deploy(name, example_bytes("spin.wat"), params, false).await.unwrap();
        assert_eq!(d.task.placement.map(|p| p.node_id), Some(a_id), "{name} starts on the one-core hub");
    }

    step("two clients keep both tasks busy: the hub is overloaded");
    let stop = Arc::new(AtomicBool::new(false));
    let callers = [("spin-a", 1), ("spin-b", 2)]
        .map(|(name, i)| tokio::spawn(spin_until(hubs[i].client.clone(), name.into(), stop.clone())));
    let probe = hubs[1].client.clone();
    wait_until(Duration::from_secs(30), "node list shows the first hub loaded", || {
        let c = probe.clone();
        async move {
            c.nodes().await.is_ok_and(|ns| {
                ns.iter()
                    .any(|n| n.id == a_id && n.load.as_ref().is_some_and(|l| l.cpu_permille > 200 && l.task_cpus == 1))
            })
        }
    })
    .await;

    step("the leader moves one task off it by live migration, for overload");
    let moved = Arc::new(std::sync::Mutex::new(String::new()));
    wait_until(Duration::from_secs(60), "a task left the overloaded hub", || {
        let (c, moved) = (probe.clone(), moved.clone());
        async move {
            for name in ["spin-a", "spin-b"] {
                if c.task(name).await.is_ok_and(|t| t.placement.is_some_and(|p| p.node_id != a_id)) {
                    *moved.lock().unwrap() = name.to_owned();
                    return true;
                }
            }
            false
        }
    })
    .await;
    let moved = moved.lock().unwrap().clone();
    let stayed = if moved == "spin-a" { "spin-b" } else { "spin-a" };
    let t = task(&hubs[1], &moved).await;
    assert_eq!(last_reason(&t), ("overload".to_owned(), true), "{:?}", t.history.last());

    step("under the same load for 20 s (four cooldowns), nothing moves again");
    let before: Vec<TaskInfo> = vec![task(&hubs[1], &moved).await, task(&hubs[1], stayed).await];
    tokio::time::sleep(Duration::from_secs(20)).await;
    for t in &before {
        let now = task(&hubs[1], &t.name).await;
        assert_eq!(now.placement, t.placement, "{} stayed put", t.name);
        assert_eq!(now.history.len(), t.history.len(), "{}: {:?}", t.name, now.history.last());
    }
    assert_eq!(before[1].placement.as_ref().map(|p| p.node_id), Some(a_id));
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        let calls = caller.await.unwrap().unwrap_or_else(|e| panic!("{e}\n{}", hubs[0].log_tail(40)));
        assert!(calls > 0);
    }
}
