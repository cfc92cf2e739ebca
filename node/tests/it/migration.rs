//! Live migration between real hubs: a task moves while a client keeps calling it, and no call
//! fails, is lost or applies twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hubmesh::client::Client;
use hubmesh_proto::api::DeployParams;

use crate::failover::{deploy_counter, task, three_hubs, three_hubs_with};
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
        // The target said when it served, within the pause the source saw, after both stored.
        let parts = [m.stored_us, m.applied_us, m.running_us, m.pause_us];
        assert!(m.pause_us > 0 && parts.windows(2).all(|w| w[0] <= w[1]), "the pause's parts: {m:?}");
        assert!(m.committed_us <= m.pause_us, "the held calls were released within the pause: {m:?}");
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

/// The sum over `hubs` of the counter `series` (a name with its labels, as `/metrics` writes
/// them) in their `/metrics`.
async fn counter_total(hubs: &[Hub], series: &str) -> u64 {
    let mut total = 0;
    for h in hubs {
        let text = reqwest::get(format!("{}/metrics", h.url)).await.unwrap().text().await.unwrap();
        let line = text.lines().find(|l| l.split_whitespace().next() == Some(series));
        total += line.and_then(|l| l.split_whitespace().nth(1)).map_or(0, |v| v.parse::<u64>().unwrap());
    }
    total
}

/// Hubs from before `MIGRATE_WATCH` (a rolling upgrade's older half; the fault makes all three
/// such hubs) refuse the watch: each source asks the target with `MIGRATE_END` after the commit
/// instead, and the migrations go on as before — no call fails, each applies once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "fault-injection"), ignore = "needs the fault-injection feature: cargo test --workspace")]
async fn a_target_that_does_not_know_the_watch_still_takes_the_task() {
    const FALLBACKS: &str = r#"hubmesh_migration_watch_fallbacks_total{reason="not_served"}"#;
    let env = [("HUBMESH_FAULTS", "no-migrate-watch")];
    let a = Hub::start_with_env("lwa", &[], &env).await;
    let token = a.client.create_token(Some("10m")).await.unwrap().token;
    let b = Hub::start_with_env("lwb", &["--join", &token], &env).await;
    let c = Hub::start_with_env("lwc", &["--join", &token], &env).await;
    let hubs = vec![a, b, c];
    crate::failover::three_voters_everywhere(&hubs).await;
    deploy_counter(&hubs[0], "tally").await;
    placed_everywhere(&hubs, "tally").await;
    let ids = node_ids(&hubs).await;
    assert_eq!(hubs[1].client.invoke("tally", b"0".to_vec(), None).await.unwrap(), b"0");
    assert_eq!(counter_total(&hubs, FALLBACKS).await, 0);

    step("a client calls while the counter migrates 6 times");
    let stop = Arc::new(AtomicBool::new(false));
    let caller = tokio::spawn(increment_until(hubs[0].client.clone(), "tally", "w".into(), stop.clone()));
    let mut host = task(&hubs[0], "tally").await.placement.unwrap().node_id;
    for i in 0..6usize {
        let to = ids.iter().copied().filter(|id| *id != host).nth(i % 2).unwrap();
        let m = hubs[i % 3]
            .client
            .migrate("tally", Some(&to.to_string()))
            .await
            .unwrap_or_else(|e| panic!("migration {i} failed: {e}\n{}", hubs[i % 3].log_tail(40)));
        assert_eq!((m.from_node_id, m.to_node_id), (host, to), "migration {i}: {m:?}");
        // The target's answer to MIGRATE_END said when it ran the task, within the pause.
        let parts = [m.stored_us, m.applied_us, m.running_us, m.pause_us];
        assert!(m.running_us > 0 && parts.windows(2).all(|w| w[0] <= w[1]), "the pause's parts: {m:?}");
        host = to;
    }
    stop.store(true, Ordering::Relaxed);
    let answers = caller.await.unwrap().unwrap_or_else(|e| panic!("{e}"));

    step("every source fell back to MIGRATE_END; every call applied once");
    assert_eq!(counter_total(&hubs, FALLBACKS).await, 6);
    // The mesh's small calls (Raft's, the migrations') went on streams kept between calls.
    assert!(counter_total(&hubs, "hubmesh_mesh_kept_streams_reused_total").await > 100);
    assert!(answers.len() > 10, "the client kept calling: {} calls", answers.len());
    assert_eq!(answers, (1..=answers.len() as u64).collect::<Vec<_>>(), "no call lost or applied twice");
    let placed = hubs[2].client.invoke_placed("tally", b"0".to_vec(), None).await.unwrap();
    assert_eq!(placed.node, Some(host), "the last target runs it");
    assert_eq!(String::from_utf8(placed.output).unwrap(), answers.len().to_string());
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
/// acknowledged; stops after `stop` or 20,000 calls. Returns the acknowledged answers.
async fn keyed_until(
    clients: Arc<std::sync::Mutex<Vec<Client>>>,
    who: &str,
    stop: Arc<AtomicBool>,
) -> Result<Vec<u64>, String> {
    let mut answers = Vec::new();
    for i in 0..20_000u32 {
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
    /// The victim restarts with this crash point armed (src/faults.rs) and aborts right there:
    /// a phase hit exactly, whatever the timing.
    Crash(&'static str),
    /// SIGKILL after a fixed delay into the request (any phase).
    After(u64),
}

/// The hubs' node ids, in the order of `hubs`.
async fn node_ids(hubs: &[Hub]) -> Vec<u64> {
    let mut ids = Vec::new();
    for h in hubs {
        ids.push(h.client.status().await.unwrap().node_id);
    }
    ids
}

/// Every hub sees all three up.
async fn all_up(hubs: &[Hub]) {
    for h in hubs {
        let c = h.client.clone();
        wait_until(Duration::from_secs(60), "every hub sees all three up", || {
            let c = c.clone();
            async move { c.status().await.is_ok_and(|s| s.voters.len() == 3 && s.nodes.iter().all(|n| !n.down)) }
        })
        .await;
    }
}

/// Asks `asker` to migrate the counter to hub `to`, again while it is refused (a hub that just
/// came back is not up in every view yet).
async fn migrate_retrying(asker: &Hub, to: u64) -> hubmesh_proto::api::MigrationInfo {
    for attempt in 1..150 {
        match asker.client.migrate("tally", Some(&to.to_string())).await {
            Ok(m) => return m,
            Err(e) => eprintln!("attempt {attempt} to migrate to hub {to} refused: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the migration to hub {to} was refused 150 times")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_source_or_the_target_mid_migration_loses_nothing() {
    let hubs = three_hubs("lk").await;
    // (when, whether the victim is the source): early (pre-copy or the hand-over) and later.
    let plan =
        [(KillAt::After(5), true), (KillAt::After(5), false), (KillAt::After(30), true), (KillAt::After(30), false)];
    kill_rounds(hubs, &plan).await;
}

/// Each phase on each side, hit exactly by a crash point; the victim comes back at once, before
/// the leader would mark it down (30 s here), so what it left behind is cleaned up by the hubs'
/// own recovery, not by a failover. The points exist only in a build with `fault-injection`,
/// which `cargo test --workspace` (the README's test command) turns on through the chaos suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "fault-injection"), ignore = "needs the fault-injection feature: cargo test --workspace")]
async fn a_crash_at_each_phase_of_a_migration_on_either_side_loses_nothing() {
    let cfg = tempfile::tempdir().unwrap();
    let path = cfg.path().join("config.toml");
    std::fs::write(&path, "[timeouts]\nnode_down = \"30s\"\n").unwrap();
    let hubs = three_hubs_with("lc", &["--config", path.to_str().unwrap()]).await;
    let plan = [
        (KillAt::Crash("crash-migration-source-precopy"), true),
        (KillAt::Crash("crash-migration-target-precopy"), false),
        (KillAt::Crash("crash-migration-source-frozen"), true),
        (KillAt::Crash("crash-migration-target-stored"), false),
        (KillAt::Crash("crash-migration-source-committed"), true),
        (KillAt::Crash("crash-migration-target-committed"), false),
    ];
    kill_rounds(hubs, &plan).await;
}

/// Runs `plan` (when, whether the victim is the source) on a durable counter of `hubs` under a
/// stream of keyed calls through all three: every acknowledged call applied exactly once, one
/// instance answers everywhere, no migration left under way after a round.
async fn kill_rounds(mut hubs: Vec<Hub>, plan: &[(KillAt, bool)]) {
    deploy_counter(&hubs[0], "tally").await;
    placed_everywhere(&hubs, "tally").await;
    assert_eq!(hubs[1].client.invoke("tally", b"0".to_vec(), None).await.unwrap(), b"0");
    let clients = Arc::new(std::sync::Mutex::new(hubs.iter().map(|h| h.client.clone()).collect::<Vec<_>>()));
    let stop = Arc::new(AtomicBool::new(false));
    let caller = tokio::spawn(keyed_until(clients.clone(), "k", stop.clone()));

    for (round, &(at, kill_source)) in plan.iter().enumerate() {
        let ids = node_ids(&hubs).await;
        let victim = match at {
            KillAt::Crash(point) => {
                // The victim restarts with the point armed, then the task is brought to the
                // victim (it is to be the source) or away from it (the target) by a plain
                // migration, which the armed point does not touch (it is of the other side).
                let victim = round % 3;
                step(&format!("round {round}: {} restarts with {point} armed", hubs[victim].name));
                hubs[victim].kill9();
                hubs[victim].set_env("HUBMESH_FAULTS", Some(point));
                hubs[victim].restart().await;
                clients.lock().unwrap()[victim] = hubs[victim].client.clone();
                all_up(&hubs).await;
                let host = one_placement(&hubs, "tally").await.node_id;
                let host = ids.iter().position(|id| *id == host).unwrap();
                if (host == victim) != kill_source {
                    let to = if kill_source { victim } else { (victim + 1) % 3 };
                    let m = migrate_retrying(&hubs[3 - host - to], ids[to]).await;
                    eprintln!("round {round}: brought to {}: {m:?}", hubs[to].name);
                }
                victim
            }
            KillAt::After(_) => {
                let host = one_placement(&hubs, "tally").await.node_id;
                let host = ids.iter().position(|id| *id == host).unwrap();
                if kill_source {
                    host
                } else {
                    (host + 1 + round % 2) % 3
                }
            }
        };
        // Every hub's view agrees first: a hub that just came back may still be applying its log,
        // and a round planned on its stale view would ask for a migration to the task's own host.
        let before = one_placement(&hubs, "tally").await;
        let source = ids.iter().position(|id| *id == before.node_id).unwrap();
        let target = if kill_source { (source + 1 + round % 2) % 3 } else { victim };
        assert_ne!(source, target);
        assert_eq!(victim, if kill_source { source } else { target }, "round {round}");
        let asker = 3 - source - target;
        step(&format!(
            "round {round}: migrate {} -> {}, kill {} at {at:?}",
            hubs[source].name, hubs[target].name, hubs[victim].name
        ));
        let outcome = match at {
            KillAt::Crash(point) => {
                // Asked again while it is refused before it begins (the victim lives on then).
                let mut attempts = 0;
                let outcome = loop {
                    attempts += 1;
                    let outcome = hubs[asker].client.migrate("tally", Some(&ids[target].to_string())).await;
                    if hubs[victim].wait_exit(Duration::from_secs(5)).await {
                        break outcome;
                    }
                    let Err(e) = outcome else {
                        panic!("round {round}: migrated without reaching {point}: {outcome:?}");
                    };
                    eprintln!("round {round}: attempt {attempts} refused: {e}");
                    assert!(attempts < 20, "round {round}: the migration never began");
                };
                let marker = hubs[victim].data_dir().join(format!("fault-crashed-{point}"));
                assert!(marker.exists(), "round {round}: the crash was not {point}");
                hubs[victim].set_env("HUBMESH_FAULTS", None);
                hubs[victim].restart().await;
                clients.lock().unwrap()[victim] = hubs[victim].client.clone();
                outcome
            }
            KillAt::After(ms) => {
                let migrate = {
                    let c = hubs[asker].client.clone();
                    let to = ids[target].to_string();
                    tokio::spawn(async move { c.migrate("tally", Some(&to)).await })
                };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                hubs[victim].kill9();
                migrate.await.unwrap()
            }
        };
        eprintln!("round {round}: the migration answered {outcome:?}");
        // The counter answers again (by the migration, a failover or the victim's restart).
        let c = hubs[asker].client.clone();
        wait_until(Duration::from_secs(60), "the counter answers after the kill", || {
            let c = c.clone();
            async move { c.invoke("tally", b"0".to_vec(), None).await.is_ok() }
        })
        .await;
        if matches!(at, KillAt::After(_)) {
            hubs[victim].restart().await;
            clients.lock().unwrap()[victim] = hubs[victim].client.clone();
        }
        all_up(&hubs).await;
        // Nothing is left half done: no hub shows a migration of the task under way.
        for h in &hubs {
            let c = h.client.clone();
            wait_until(Duration::from_secs(30), "no migration left under way", || {
                let c = c.clone();
                async move { c.task("tally").await.is_ok_and(|t| t.migration.is_none()) }
            })
            .await;
        }
        // Nor a staged instance of it: one the switch never came for goes as soon as the state
        // shows its migration ended, not at the 60 s sweep.
        wait_until(Duration::from_secs(10), "no staged instance left", || async {
            counter_total(&hubs, "hubmesh_migration_staged_bytes").await == 0
        })
        .await;
        // A source that crashed before the switch and came back at once keeps the task at its
        // epoch: the migration it left behind was aborted (by itself: no failover, no watchdog
        // within the 30 s above).
        if matches!(at, KillAt::Crash(p) if kill_source && !p.ends_with("committed")) {
            let now = one_placement(&hubs, "tally").await;
            assert_eq!((now.node_id, now.epoch), (before.node_id, before.epoch), "round {round}");
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
