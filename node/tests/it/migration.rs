//! Live migration between real hubs: a task moves while a client keeps calling it, and no call
//! fails, is lost or applies twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hubmesh::client::Client;
use hubmesh_proto::api::DeployParams;

use crate::failover::{deploy_counter, task, three_hubs};
use crate::harness::{example_bytes, step, wait_until, Hub};

/// Every hub sees `name` placed (a hub that has not applied the deploy knows no such task).
async fn placed_everywhere(hubs: &[Hub], name: &str) {
    for hub in hubs {
        let c = hub.client.clone();
        wait_until(Duration::from_secs(30), "every hub sees the task placed", || {
            let (c, name) = (c.clone(), name.to_owned());
            async move { c.task(&name).await.is_ok_and(|t| t.placement.is_some()) }
        })
        .await;
    }
}

/// The placement of `name` once every hub reports the same one (at most 60 s).
async fn one_placement(hubs: &[Hub], name: &str) -> hubmesh_proto::api::PlacementInfo {
    let clients: Vec<_> = hubs.iter().map(|h| h.client.clone()).collect();
    let agreed = Arc::new(std::sync::Mutex::new(None));
    wait_until(Duration::from_secs(60), "every hub sees the same placement", || {
        let (clients, name, agreed) = (clients.clone(), name.to_owned(), agreed.clone());
        async move {
            let mut seen = Vec::new();
            for c in &clients {
                match c.task(&name).await.ok().and_then(|t| t.placement) {
                    Some(p) => seen.push(p),
                    None => return false,
                }
            }
            let same = seen.windows(2).all(|w| (w[0].node_id, w[0].epoch) == (w[1].node_id, w[1].epoch));
            if same {
                *agreed.lock().unwrap() = seen.pop();
            }
            same
        }
    })
    .await;
    let placement = agreed.lock().unwrap().take();
    placement.expect("agreed on a placement")
}

/// Calls `+1` on `task` in a loop until `stop` (at most 20,000 calls), alternating keyed
/// (`{who}-N`) and keyless calls; returns every answer in order, or the first failure.
pub(crate) async fn increment_until(
    client: Client,
    task: &'static str,
    who: String,
    stop: Arc<AtomicBool>,
) -> Result<Vec<u64>, String> {
    let mut answers = Vec::new();
    for i in 0..20_000u32 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let key = (i % 2 == 0).then(|| format!("{who}-{i}"));
        let out = client
            .invoke(task, b"1".to_vec(), key.as_deref())
            .await
            .map_err(|e| format!("{task}: call {i} failed while it moved: {e}"))?;
        answers.push(String::from_utf8(out).unwrap().parse().unwrap());
    }
    Ok(answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_counter_migrates_back_and_forth_under_load_and_no_call_fails() {
    let hubs = three_hubs("lm").await;
    deploy_counter(&hubs[0], "tally").await;
    placed_everywhere(&hubs, "tally").await;
    let ids: Vec<u64> = {
        let mut ids = Vec::new();
        for h in &hubs {
            ids.push(h.client.status().await.unwrap().node_id);
        }
        ids
    };

    // The first answer says the host runs it.
    assert_eq!(hubs[1].client.invoke("tally", b"0".to_vec(), None).await.unwrap(), b"0");
    step("two clients call through hubs 0 and 2 while the counter migrates 50 times");
    let stop = Arc::new(AtomicBool::new(false));
    let callers = [(0, "a"), (2, "b")]
        .map(|(i, who)| tokio::spawn(increment_until(hubs[i].client.clone(), "tally", who.into(), stop.clone())));
    let mut last_host = task(&hubs[0], "tally").await.placement.unwrap().node_id;
    let mut rounds_seen = 0;
    let mut pauses = Vec::new();
    for i in 0..50usize {
        // Asked through any hub; every third one lets the scheduler pick the target.
        let asker = &hubs[i % 3];
        let others: Vec<u64> = ids.iter().copied().filter(|id| *id != last_host).collect();
        let to = (i % 3 != 2).then_some(others[i % 2]);
        let to_text = to.map(|t| t.to_string());
        let m = asker
            .client
            .migrate("tally", to_text.as_deref())
            .await
            .unwrap_or_else(|e| panic!("migration {i} failed: {e}\n{}", asker.log_tail(40)));
        assert_eq!(m.from_node_id, last_host, "migration {i}: {m:?}");
        assert_ne!(m.to_node_id, last_host);
        if let Some(to) = to {
            assert_eq!(m.to_node_id, to, "--to is honoured");
        }
        assert!(m.rounds >= 2, "pre-copy and the final round: {m:?}");
        rounds_seen += m.rounds;
        pauses.push(m.pause_us);
        last_host = m.to_node_id;
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut first = Vec::new();
    for caller in callers {
        let answers = caller.await.unwrap().unwrap_or_else(|e| {
            let logs: Vec<String> = hubs.iter().map(|h| format!("--- {}:\n{}", h.name, h.log_tail(30))).collect();
            panic!("{e}\n{}", logs.join("\n"))
        });
        assert!(answers.len() > 20, "the client kept calling: {} calls", answers.len());
        assert!(answers.windows(2).all(|w| w[0] < w[1]), "each client sees the total grow: {answers:?}");
        first.push(answers[0]);
        all.extend(answers);
    }
    pauses.sort_unstable();
    eprintln!("{} calls; pauses (µs) p50 {} max {}", all.len(), pauses[pauses.len() / 2], pauses[pauses.len() - 1]);
    step("every call applied exactly once, and the history lists the migrations");
    // Each call adds 1 and answers the new total: together the answers are exactly 1..=N.
    all.sort_unstable();
    assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>(), "no call lost or applied twice");
    let total = String::from_utf8(hubs[1].client.invoke("tally", b"0".to_vec(), None).await.unwrap()).unwrap();
    assert_eq!(total.parse::<u64>().unwrap(), all.len() as u64, "nothing lost, nothing doubled");
    let t = task(&hubs[2], "tally").await;
    assert_eq!(t.placement.as_ref().unwrap().node_id, last_host);
    let migrations: Vec<_> = t.history.iter().filter_map(|h| h.migration.as_ref()).collect();
    assert!(migrations.len() >= 40, "{} migrations in the history", migrations.len());
    assert!(migrations.iter().all(|m| m.reason == "manual" && m.aborted.is_none() && m.rounds >= 2));
    assert!(rounds_seen >= 100);
    // Keys from before the moves are still known where the task runs now.
    let again = hubs[2].client.invoke("tally", b"1".to_vec(), Some("a-0")).await.unwrap();
    assert_eq!(again, first[0].to_string().into_bytes(), "a retried key answers its first answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_and_stateless_tasks_migrate_and_bad_requests_change_nothing() {
    let hubs = three_hubs("lp").await;
    step("a periodic counter changed since its last checkpoint moves with that change");
    let hourly = DeployParams { checkpoint_every: Some("1h".into()), ..Default::default() };
    hubs[0].client.deploy("hourly", example_bytes("counter.wat"), &hourly, false).await.unwrap();
    let echo = DeployParams::default();
    hubs[0].client.deploy("echo", example_bytes("echo.wat"), &echo, false).await.unwrap();
    placed_everywhere(&hubs, "hourly").await;
    placed_everywhere(&hubs, "echo").await;
    for _ in 0..7 {
        hubs[1].client.invoke("hourly", b"1".to_vec(), None).await.unwrap();
    }
    let before = task(&hubs[0], "hourly").await.placement.unwrap();
    // Through the command line, as a user would.
    let out = hubs[2].cli(&["task", "migrate", "hourly", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: hubmesh_proto::api::MigrationInfo = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m.from_node_id, before.node_id);
    assert!(m.epoch > before.epoch);
    let out = hubs[0].client.invoke_placed("hourly", b"1".to_vec(), None).await.unwrap();
    assert_eq!(out.output, b"8", "the seven calls since the last checkpoint moved with the task");
    assert_eq!((out.node, out.epoch), (Some(m.to_node_id), Some(m.epoch)), "answered by the target");
    let out = hubs[0].cli(&["task", "history", "hourly"]);
    let history = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && history.contains("MIGRATION"), "{history}");
    assert!(history.lines().any(|l| l.contains("manual") && l.contains("rounds")), "{history}");
    let out = hubs[1].cli(&["task", "migrate", "hourly", "--to", &m.from_node_name]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.starts_with("migrated hourly from"), "{said}");
    let out = hubs[1].cli(&["task", "migrate", "hourly", "--to", "no-such-hub"]);
    assert!(!out.status.success(), "an unknown hub is refused");

    step("a stateful task without checkpoints moves with its memory");
    let memory_only = DeployParams { stateful: true, ..Default::default() };
    hubs[0].client.deploy("scratch", example_bytes("counter.wat"), &memory_only, false).await.unwrap();
    placed_everywhere(&hubs, "scratch").await;
    for _ in 0..5 {
        hubs[0].client.invoke("scratch", b"2".to_vec(), Some("once")).await.unwrap();
        hubs[0].client.invoke("scratch", b"1".to_vec(), None).await.unwrap();
    }
    for round in 0..2 {
        let m = hubs[1].client.migrate("scratch", None).await.unwrap();
        let out = hubs[2].client.invoke_placed("scratch", b"0".to_vec(), None).await.unwrap();
        assert_eq!(out.output, b"7", "round {round}: the memory moved with the task");
        assert_eq!(out.node, Some(m.to_node_id));
    }
    let again = hubs[0].client.invoke("scratch", b"2".to_vec(), Some("once")).await.unwrap();
    assert_eq!(again, b"2", "the answers moved too");

    step("a stateless task moves to the hub asked for");
    let host = task(&hubs[0], "echo").await.placement.unwrap().node_id;
    let target = hubs[1].client.status().await.unwrap().nodes.iter().map(|n| n.id).find(|id| *id != host).unwrap();
    let m = hubs[1].client.migrate("echo", Some(&target.to_string())).await.unwrap();
    assert_eq!(m.to_node_id, target);
    // A hub that has not applied the move yet may still call the old instance: stateless, it
    // answers the same; every hub calls the target once it has.
    let c = hubs[2].client.clone();
    wait_until(Duration::from_secs(10), "the target answers the stateless task", || {
        let c = c.clone();
        async move {
            c.invoke_placed("echo", b"hi".to_vec(), None)
                .await
                .is_ok_and(|o| o.output == b"hi" && o.node == Some(target))
        }
    })
    .await;

    step("bad requests get a clear error and change nothing");
    let before = task(&hubs[0], "hourly").await;
    let here = before.placement.as_ref().unwrap().node_id.to_string();
    let err = hubs[0].client.migrate("hourly", Some(&here)).await.unwrap_err();
    assert_eq!(err.code(), Some("no_target"), "{err}");
    let err = hubs[0].client.migrate("hourly", Some("no-such-hub")).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"), "{err}");
    let err = hubs[0].client.migrate("no-such-task", None).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"), "{err}");
    let after = task(&hubs[0], "hourly").await;
    assert_eq!(after.placement, before.placement);
    assert_eq!(after.history.len(), before.history.len());
}

/// Keyed `+1` calls with keys `{who}-N`, each retried (through any hub, same key) until it is
/// acknowledged; stops after `stop` or 5,000 calls. Returns the acknowledged answers.
async fn keyed_until(
    clients: Arc<std::sync::Mutex<Vec<Client>>>,
    who: &str,
    stop: Arc<AtomicBool>,
) -> Result<Vec<u64>, String> {
    let mut answers = Vec::new();
    for i in 0..5_000u32 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let key = format!("{who}-{i}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for attempt in 0usize.. {
            let c = {
                let all = clients.lock().unwrap();
                all[attempt % all.len()].clone()
            };
            match c.invoke("tally", b"1".to_vec(), Some(&key)).await {
                Ok(out) => {
                    answers.push(String::from_utf8(out).unwrap().parse().unwrap());
                    break;
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("{key}: no answer in 60 s: {e}"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    Ok(answers)
}

/// When a round kills its victim.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// As soon as the begin is visible: pre-copy (or later, if the migration is quick).
    Begun,
    /// As soon as the switch is visible: the target serves, the source relays.
    Committed,
    /// After a fixed delay into the request (any phase).
    After(u64),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_source_or_the_target_mid_migration_loses_nothing() {
    let mut hubs = three_hubs("lk").await;
    deploy_counter(&hubs[0], "tally").await;
    placed_everywhere(&hubs, "tally").await;
    assert_eq!(hubs[1].client.invoke("tally", b"0".to_vec(), None).await.unwrap(), b"0");
    let clients = Arc::new(std::sync::Mutex::new(hubs.iter().map(|h| h.client.clone()).collect::<Vec<_>>()));
    let stop = Arc::new(AtomicBool::new(false));
    let caller = tokio::spawn(keyed_until(clients.clone(), "k", stop.clone()));

    let plan = [
        (KillAt::Begun, true),
        (KillAt::Begun, false),
        (KillAt::Committed, true),
        (KillAt::Committed, false),
        (KillAt::After(15), true),
        (KillAt::After(15), false),
    ];
    for (round, (at, kill_source)) in plan.into_iter().enumerate() {
        let mut ids = Vec::new();
        for h in &hubs {
            ids.push(h.client.status().await.unwrap().node_id);
        }
        // Every hub's view agrees first: a hub that just came back may still be applying its log,
        // and a round planned on its stale view (a source the task left by a failover) would ask
        // for a migration to the task's own host, refused again and again.
        let before = one_placement(&hubs, "tally").await;
        let source = ids.iter().position(|id| *id == before.node_id).unwrap();
        let target = (source + 1 + round % 2) % 3;
        let asker = 3 - source - target;
        let victim = if kill_source { source } else { target };
        step(&format!(
            "round {round}: migrate {} -> {}, kill {} at {at:?}",
            hubs[source].name, hubs[target].name, hubs[victim].name
        ));
        // A migration refused before it began (the hub that just came back is not up in every
        // view yet) is asked again.
        let mut attempts = 0;
        let migrate = loop {
            attempts += 1;
            let migrate = {
                let c = hubs[asker].client.clone();
                let to = ids[target].to_string();
                tokio::spawn(async move { c.migrate("tally", Some(&to)).await })
            };
            if let KillAt::After(ms) = at {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                break migrate;
            }
            let reached = loop {
                let t = hubs[asker].client.task("tally").await.unwrap();
                let hit = match at {
                    KillAt::Begun => t.migration.is_some(),
                    _ => t.placement.as_ref().is_some_and(|p| p.epoch > before.epoch),
                };
                if hit {
                    break true;
                }
                if migrate.is_finished() {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            if reached {
                break migrate;
            }
            match migrate.await.unwrap() {
                // It ran to its end before it was seen: kill now, after the commit.
                Ok(m) => {
                    eprintln!("round {round}: migrated before {at:?} was seen: {m:?}");
                    break tokio::spawn(async move { Ok(m) });
                }
                Err(e) => eprintln!("round {round}: attempt {attempts} refused: {e}"),
            }
            assert!(attempts < 150, "round {round}: the migration never began");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        hubs[victim].kill9();
        let outcome = migrate.await.unwrap();
        eprintln!("round {round}: the migration answered {outcome:?}");
        // The counter answers again (by the migration or a failover), through the hubs that live.
        let c = hubs[asker].client.clone();
        wait_until(Duration::from_secs(60), "the counter answers after the kill", || {
            let c = c.clone();
            async move { c.invoke("tally", b"0".to_vec(), None).await.is_ok() }
        })
        .await;
        hubs[victim].restart().await;
        clients.lock().unwrap()[victim] = hubs[victim].client.clone();
        for h in &hubs {
            let c = h.client.clone();
            wait_until(Duration::from_secs(60), "every hub sees all three up", || {
                let c = c.clone();
                async move { c.status().await.is_ok_and(|s| s.voters.len() == 3 && s.nodes.iter().all(|n| !n.down)) }
            })
            .await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let answers = caller.await.unwrap().unwrap_or_else(|e| {
        let logs: Vec<String> = hubs.iter().map(|h| format!("--- {}:\n{}", h.name, h.log_tail(40))).collect();
        panic!("{e}\n{}", logs.join("\n"))
    });

    step("every acknowledged call applied exactly once; one instance answers everywhere");
    assert!(answers.len() > 20, "{} calls", answers.len());
    assert!(answers.windows(2).all(|w| w[0] < w[1]), "{answers:?}");
    let mut hosts = std::collections::BTreeSet::new();
    let mut total = 0;
    for h in &hubs {
        // A hub that just came back may briefly reach a replaced instance (refused, undone).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let placed = loop {
            match h.client.invoke_placed("tally", b"0".to_vec(), None).await {
                Ok(p) => break p,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "{} does not reach the counter: {e}", h.name),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        total = String::from_utf8(placed.output).unwrap().parse::<u64>().unwrap();
        hosts.insert((placed.node, placed.epoch));
    }
    // Each key applied once: the acknowledged answers are the totals 1..=N, nothing else applied.
    assert_eq!(answers, (1..=total).collect::<Vec<_>>(), "acknowledged answers are the whole history");
    assert_eq!(hosts.len(), 1, "every hub reaches the same instance: {hosts:?}");
}
