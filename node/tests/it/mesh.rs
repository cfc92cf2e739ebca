//! Several real hubs forming a mesh over QUIC with mutual TLS.

use std::time::Duration;

use hubmesh_proto::api::DeployParams;

use crate::harness::{bin, example_bytes, retrying_nothing_changed, step, wait_until, Hub};

async fn three_voters(hub: &Hub) -> bool {
    hub.client.status().await.is_ok_and(|s| s.voters.len() == 3)
}

/// Runs `hubmesh up --join TOKEN` on a fresh data dir and returns its exit status and stderr.
fn try_join(token: &str) -> (bool, String) {
    try_join_as(token, None)
}

/// `try_join`, with the node id the new hub claims.
fn try_join_as(token: &str, node_id: Option<u64>) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("--data-dir")
        .arg(dir.path())
        .args(["up", "--api", "127.0.0.1:0", "--mesh", "127.0.0.1:0", "--join", token])
        .env("NO_COLOR", "1");
    if let Some(id) = node_id {
        cmd.env("HUBMESH_NODE_ID", id.to_string());
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Deploys through `hub`, retrying refusals that say nothing changed (see
/// `retrying_nothing_changed`).
async fn deploy_retrying(hub: &Hub, name: &str, module: &str, params: &DeployParams) {
    retrying_nothing_changed(|| hub.client.deploy(name, example_bytes(module), params, false))
        .await
        .unwrap_or_else(|e| panic!("deploying {name} through hub {}: {e}", hub.name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hubs_join_share_tasks_and_survive_the_leader() {
    let a = Hub::start("a").await;
    step("token create on the first hub; two hubs join with it");
    let token = a.client.create_token(Some("10m")).await.unwrap().token;
    assert!(token.starts_with("HM1."), "{token}");
    let b = Hub::start_with("b", &["--join", &token]).await;
    let c = Hub::start_with("c", &["--join", &token]).await;
    let mut hubs = vec![a, b, c];
    for h in &hubs {
        wait_until(Duration::from_secs(60), &format!("hub {} sees 3 voters", h.name), || three_voters(h)).await;
    }
    let status = hubs[2].client.status().await.unwrap();
    assert_eq!(status.nodes.len(), 3);
    assert_eq!(status.voters.len(), 3);

    step("deploy through a joined hub; invoke through every hub");
    let params = DeployParams { durable: true, ..Default::default() };
    deploy_retrying(&hubs[2], "counter", "counter.wat", &params).await;
    deploy_retrying(&hubs[1], "echo", "echo.wat", &DeployParams::default()).await;
    let mut expected = 0;
    for h in &hubs {
        expected += 1;
        let c = h.client.clone();
        let out = c.invoke("counter", b"1".to_vec(), Some(&format!("k{expected}"))).await.unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), expected.to_string(), "through hub {}", h.name);
        assert_eq!(c.invoke("echo", b"via".to_vec(), None).await.unwrap(), b"via");
    }
    let tasks = hubs[0].client.tasks().await.unwrap();
    assert!(tasks.iter().all(|t| t.placement.is_some()), "{tasks:?}");

    step("a task created through one hub is known on every hub once its creation is answered");
    for i in 0..6 {
        let name = format!("fresh{i}");
        let through = &hubs[i % 3];
        through.client.deploy(&name, example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();
        for h in &hubs {
            // No retry: a hub that has not applied the creation yet catches up before answering.
            let t = h.client.task(&name).await.unwrap_or_else(|e| panic!("{name} on hub {}: {e}", h.name));
            assert_eq!(t.name, name);
        }
        let other = &hubs[(i + 1) % 3];
        let out = other.client.invoke(&name, b"hi".to_vec(), None).await;
        assert_eq!(out.unwrap_or_else(|e| panic!("{name} through hub {}: {e}", other.name)), b"hi");
    }

    step("kill the leader: the others elect a new one and still take changes");
    let leader = hubs[0].client.status().await.unwrap().leader.unwrap();
    let idx = {
        let mut idx = None;
        for (i, h) in hubs.iter().enumerate() {
            if h.client.status().await.unwrap().node_id == leader {
                idx = Some(i);
            }
        }
        idx.expect("the leader is one of the hubs")
    };
    hubs[idx].kill9();
    let dead = hubs.remove(idx);
    let survivor = hubs[0].client.clone();
    wait_until(Duration::from_secs(30), "a new leader is elected", || {
        let c = survivor.clone();
        async move { c.status().await.is_ok_and(|s| s.leader.is_some_and(|l| l != leader)) }
    })
    .await;
    deploy_retrying(&hubs[0], "echo2", "echo.wat", &DeployParams::default()).await;
    let names: Vec<String> = hubs[1].client.tasks().await.unwrap().into_iter().map(|t| t.name).collect();
    assert!(names.contains(&"echo2".to_owned()), "{names:?}");
    drop(dead);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_and_change_nothing() {
    let a = Hub::start("gate").await;
    let token = a.client.create_token(Some("10m")).await.unwrap().token;
    let parts: Vec<&str> = token.splitn(5, '.').collect();
    step("garbage");
    let (ok, err) = try_join("not-a-token");
    assert!(!ok && err.contains("not a hubmesh join token"), "{err}");
    step("wrong secret");
    let wrong_secret = format!("HM1.{}.{}.{}.{}", parts[1], parts[2], "00".repeat(16), parts[4]);
    let (ok, err) = try_join(&wrong_secret);
    assert!(!ok && err.contains("wrong secret"), "{err}");
    step("another CA's fingerprint: the joiner refuses the hub before sending its secret");
    let wrong_ca = format!("HM1.{}.{}.{}.{}", "ab".repeat(32), parts[2], parts[3], parts[4]);
    let (ok, err) = try_join(&wrong_ca);
    assert!(!ok && err.contains("certificate is not from the token's CA"), "{err}");
    step("a revoked token");
    let revoked = a.client.create_token(None).await.unwrap().token;
    a.client.revoke_token(&revoked).await.unwrap();
    let (ok, err) = try_join(&revoked);
    assert!(!ok && err.contains("revoked"), "{err}");
    assert_eq!(a.client.revoke_token("ffff0000").await.unwrap_err().code(), Some("not_found"));
    step("an expired token");
    let short = a.client.create_token(Some("1ms")).await.unwrap().token;
    let (ok, err) = try_join(&short);
    assert!(!ok && err.contains("expired"), "{err}");
    step("a joiner claiming the node id of a member is refused");
    let member = node_id(&a).await;
    let valid = a.client.create_token(None).await.unwrap().token;
    let (ok, err) = try_join_as(&valid, Some(member));
    assert!(!ok && err.contains("already taken"), "{err}");
    step("the mesh is unchanged: one hub, one voter");
    let s = a.client.status().await.unwrap();
    assert_eq!((s.nodes.len(), s.voters.len()), (1, 1));
}

async fn host_of(hub: &Hub, task: &str) -> Option<u64> {
    hub.client.task(task).await.ok()?.placement.map(|p| p.node_id)
}

async fn node_id(hub: &Hub) -> u64 {
    hub.client.status().await.unwrap().node_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hubs_tasks_move_and_the_mesh_survives_a_full_restart() {
    let a = Hub::start("fa").await;
    let token = a.client.create_token(None).await.unwrap().token;
    let b = Hub::start_with("fb", &["--join", &token]).await;
    let c = Hub::start_with("fc", &["--join", &token]).await;
    let mut hubs = vec![a, b, c];
    for h in &hubs {
        wait_until(Duration::from_secs(60), "3 voters", || three_voters(h)).await;
    }
    step("three stateless tasks, spread over the hubs");
    for t in ["e1", "e2", "e3"] {
        hubs[0].client.deploy(t, example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();
    }
    let mut ids = Vec::new();
    for h in &hubs {
        ids.push(node_id(h).await);
    }
    let victim_id = host_of(&hubs[0], "e1").await.unwrap();
    let victim = ids.iter().position(|id| *id == victim_id).unwrap();
    step("kill -9 the host of e1; it is marked down and e1 answers from another hub");
    hubs[victim].kill9();
    let alive: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    let probe = hubs[alive[0]].client.clone();
    wait_until(Duration::from_secs(60), "e1 is re-placed and answers", || {
        let c = probe.clone();
        async move {
            let moved = c.task("e1").await.ok().and_then(|t| t.placement).is_some_and(|p| p.node_id != victim_id);
            moved && c.invoke("e1", b"again".to_vec(), None).await.is_ok_and(|o| o == b"again")
        }
    })
    .await;
    let nodes = hubs[alive[1]].client.nodes().await.unwrap();
    let dead = nodes.iter().find(|n| n.id == victim_id).unwrap();
    assert!(dead.role.contains("down"), "{nodes:?}");

    step("restart every hub at once (the dead one too): the mesh comes back with its state");
    for h in hubs.iter_mut() {
        h.kill9();
    }
    let mut restarts = Vec::new();
    for h in hubs.iter_mut() {
        restarts.push(h.restart());
    }
    futures_join_all(restarts).await;
    for h in &hubs {
        wait_until(Duration::from_secs(60), "3 voters after the restart", || three_voters(h)).await;
    }
    let probe = hubs[victim].client.clone();
    wait_until(Duration::from_secs(60), "every task answers through the restarted victim", || {
        let c = probe.clone();
        async move {
            let mut ok = true;
            for t in ["e1", "e2", "e3"] {
                ok &= c.invoke(t, t.as_bytes().to_vec(), None).await.is_ok_and(|o| o == t.as_bytes());
            }
            ok
        }
    })
    .await;
    let s = hubs[0].client.status().await.unwrap();
    assert_eq!((s.tasks_total, s.nodes.len()), (3, 3));
}

/// Runs the futures concurrently (the restarts of several hubs).
async fn futures_join_all<F: std::future::Future<Output = ()>>(futs: Vec<F>) {
    let mut pinned: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut done = vec![false; pinned.len()];
    std::future::poll_fn(|cx| {
        for (i, f) in pinned.iter_mut().enumerate() {
            if !done[i] && f.as_mut().poll(cx).is_ready() {
                done[i] = true;
            }
        }
        if done.iter().all(|d| *d) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_votes_but_never_hosts() {
    let a = Hub::start("wa").await;
    let token = a.client.create_token(None).await.unwrap().token;
    let b = Hub::start_with("wb", &["--join", &token]).await;
    let w = Hub::start_with("ww", &["--join", &token, "--witness"]).await;
    for h in [&a, &b, &w] {
        wait_until(Duration::from_secs(60), "3 voters", || three_voters(h)).await;
    }
    let witness_id = node_id(&w).await;
    for t in ["t1", "t2", "t3", "t4"] {
        a.client.deploy(t, example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();
    }
    for t in a.client.tasks().await.unwrap() {
        assert_ne!(t.placement.unwrap().node_id, witness_id, "{} was placed on the witness", t.name);
    }
    step("two real hubs and a witness fail over: kill b, and a + witness keep a quorum");
    let mut b = b;
    b.kill9();
    let probe = a.client.clone();
    wait_until(Duration::from_secs(60), "every task answers from a", || {
        let c = probe.clone();
        async move {
            let mut ok = true;
            for t in ["t1", "t2", "t3", "t4"] {
                ok &= c.invoke(t, b"x".to_vec(), None).await.is_ok();
            }
            ok
        }
    })
    .await;
    for t in a.client.tasks().await.unwrap() {
        assert_ne!(t.placement.unwrap().node_id, witness_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_changes_are_refused_and_nothing_is_half_done() {
    let a = Hub::start("qa").await;
    let token = a.client.create_token(None).await.unwrap().token;
    let mut b = Hub::start_with("qb", &["--join", &token]).await;
    let mut c = Hub::start_with("qc", &["--join", &token]).await;
    for h in [&a, &b, &c] {
        wait_until(Duration::from_secs(60), "3 voters", || three_voters(h)).await;
    }
    a.client.deploy("kept", example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();
    step("kill two of three voters");
    b.kill9();
    c.kill9();
    let client = a.client.clone();
    wait_until(Duration::from_secs(30), "the survivor notices it has no quorum", || {
        let c = client.clone();
        async move { matches!(c.create_token(None).await, Err(e) if e.code() == Some("no_quorum")) }
    })
    .await;
    step("deploy, remove and token create are refused at once");
    let blobs = std::fs::read_dir(a.data_dir().join("blobs")).unwrap().count();
    let err = a.client.deploy("new", example_bytes("counter.wat"), &DeployParams::default(), false).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(503), Some("no_quorum")), "{err}");
    assert_eq!(a.client.remove("kept").await.unwrap_err().code(), Some("no_quorum"));
    step("nothing was stored or changed");
    assert_eq!(std::fs::read_dir(a.data_dir().join("blobs")).unwrap().count(), blobs);
    let names: Vec<String> = a.client.tasks().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["kept"]);
    step("without a leader an unknown name cannot be confirmed absent: 503, not a 404 that may be false");
    let err = a.client.task("never-made").await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(503), Some("unavailable")), "{err}");
    assert_eq!(a.client.task("kept").await.unwrap().name, "kept", "a known task is still shown");
    let err = a.client.task("NotAName").await.unwrap_err();
    assert_eq!(err.status(), Some(404), "a name no task can have needs no leader: {err}");
    step("a voter comes back: changes go through again");
    b.restart().await;
    let client = a.client.clone();
    wait_until(Duration::from_secs(60), "the deploy succeeds with a quorum again", || {
        let c = client.clone();
        async move { c.deploy("new", example_bytes("counter.wat"), &DeployParams::default(), false).await.is_ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_whose_raft_state_is_gone_does_not_come_back_as_the_same_member() {
    let a = Hub::start("wipe-a").await;
    let token = a.client.create_token(None).await.unwrap().token;
    let mut b = Hub::start_with("wipe-b", &["--join", &token]).await;
    wait_until(Duration::from_secs(60), "b is a member", || {
        let c = a.client.clone();
        async move { c.status().await.is_ok_and(|s| s.voters.len() >= 2) }
    })
    .await;
    b.terminate();
    std::fs::remove_dir_all(b.data_dir().join("raft")).unwrap();
    let out = std::process::Command::new(bin())
        .arg("--data-dir")
        .arg(b.data_dir())
        .args(["up", "--api", "127.0.0.1:0", "--mesh", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("must not come back as the same member"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_constrain_placement_and_drain_moves_tasks() {
    let a = Hub::start_with("la", &["--label", "room=attic"]).await;
    let token = a.client.create_token(None).await.unwrap().token;
    let b = Hub::start_with("lb", &["--join", &token, "--label", "room=cellar"]).await;
    let c = Hub::start_with("lc", &["--join", &token, "--label", "room=cellar"]).await;
    for h in [&a, &b, &c] {
        wait_until(Duration::from_secs(60), "3 voters", || three_voters(h)).await;
    }
    let (b_id, c_id) = (node_id(&b).await, node_id(&c).await);
    step("a task constrained to the cellar runs on a cellar hub; one for the garage waits");
    let cellar = DeployParams { on: Some("room=cellar".into()), ..Default::default() };
    let d = a.client.deploy("pump", example_bytes("echo.wat"), &cellar, false).await.unwrap();
    let host = d.task.placement.unwrap().node_id;
    assert!(host == b_id || host == c_id, "{host}");
    let garage = DeployParams { on: Some("room=garage".into()), ..Default::default() };
    let d = a.client.deploy("door", example_bytes("echo.wat"), &garage, false).await.unwrap();
    assert_eq!(d.task.state, "pending");
    assert!(d.task.reason.unwrap().contains("room=garage"));
    step("drain the pump's host: it moves to the other cellar hub");
    let host_name = if host == b_id { "lb" } else { "lc" };
    a.client.drain(host_name, false).await.unwrap();
    let other = if host == b_id { c_id } else { b_id };
    let probe = a.client.clone();
    wait_until(Duration::from_secs(30), "the pump runs on the other cellar hub", || {
        let c = probe.clone();
        async move {
            c.task("pump").await.ok().and_then(|t| t.placement).is_some_and(|p| p.node_id == other)
                && c.invoke("pump", b"w".to_vec(), None).await.is_ok()
        }
    })
    .await;
    let nodes = a.client.drain(host_name, true).await.unwrap();
    assert!(nodes.iter().all(|n| !n.role.contains("draining")), "{nodes:?}");
    let err = a.client.drain("nobody", false).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hubs_lose_a_learner_and_remove_a_voter_for_good() {
    let a = Hub::start("ra").await;
    let token = a.client.create_token(None).await.unwrap().token;
    let b = Hub::start_with("rb", &["--join", &token]).await;
    let c = Hub::start_with("rc", &["--join", &token]).await;
    let mut d = Hub::start_with("rd", &["--join", &token]).await;
    let client = a.client.clone();
    wait_until(Duration::from_secs(60), "3 voters and a learner", || {
        let c = client.clone();
        async move { c.status().await.is_ok_and(|s| s.voters.len() == 3 && s.nodes.len() == 4) }
    })
    .await;
    step("kill the learner: the mesh goes on");
    let status = a.client.status().await.unwrap();
    let learner_id = status.nodes.iter().find(|n| !status.voters.contains(&n.id)).unwrap().id;
    let mut hubs = [b, c];
    let mut learner = None;
    if node_id(&d).await == learner_id {
        learner = Some(&mut d);
    }
    for h in hubs.iter_mut() {
        if node_id(h).await == learner_id {
            learner = Some(h);
        }
    }
    let learner = learner.expect("the learner is one of b, c, d");
    learner.kill9();
    // A brief "no quorum" (a lease that lapsed on a loaded machine) is retried, never a lost write.
    deploy_retrying(&a, "after", "echo.wat", &DeployParams::default()).await;

    step("remove a live voter for good: it leaves the membership and a learner would replace it");
    let status = a.client.status().await.unwrap();
    let voter = status.nodes.iter().find(|n| status.voters.contains(&n.id) && n.id != status.node_id).unwrap().clone();
    a.client.remove_node(&voter.name).await.unwrap();
    let client = a.client.clone();
    let gone = voter.id;
    wait_until(Duration::from_secs(60), "the removed hub is out of the membership", || {
        let c = client.clone();
        async move { c.status().await.is_ok_and(|s| !s.voters.contains(&gone) && s.nodes.iter().all(|n| n.id != gone)) }
    })
    .await;
    assert_eq!(a.client.remove_node("nobody").await.unwrap_err().code(), Some("not_found"));
    let me = a.client.status().await.unwrap().name;
    assert_eq!(a.client.remove_node(&me).await.unwrap_err().code(), Some("bad_request"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_replaces_a_voter_that_stays_down() {
    let a = Hub::start("pa").await;
    let token = a.client.create_token(None).await.unwrap().token;
    let mut others = Vec::new();
    for name in ["pb", "pc", "pd"] {
        others.push(Hub::start_with(name, &["--join", &token]).await);
    }
    let client = a.client.clone();
    wait_until(Duration::from_secs(60), "3 voters and a learner", || {
        let c = client.clone();
        async move { c.status().await.is_ok_and(|s| s.voters.len() == 3 && s.nodes.len() == 4) }
    })
    .await;
    let status = a.client.status().await.unwrap();
    step("kill a voter other than the one we ask");
    let mut victim = None;
    for (i, h) in others.iter().enumerate() {
        let id = node_id(h).await;
        if status.voters.contains(&id) {
            victim = Some((i, id));
            break;
        }
    }
    let (i, dead) = victim.expect("a voter among the joiners");
    others[i].kill9();
    let client = a.client.clone();
    wait_until(Duration::from_secs(60), "the learner votes in the dead voter's place", || {
        let c = client.clone();
        async move { c.status().await.is_ok_and(|s| s.voters.len() == 3 && !s.voters.contains(&dead)) }
    })
    .await;
    step("the mesh still takes changes with another hub gone");
    a.client.deploy("still", example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hubs_have_five_voters_and_survive_two_losses() {
    let a = Hub::start("v1").await;
    let token = a.client.create_token(None).await.unwrap().token;
    let mut others = Vec::new();
    for name in ["v2", "v3", "v4", "v5"] {
        others.push(Hub::start_with(name, &["--join", &token]).await);
    }
    let client = a.client.clone();
    wait_until(Duration::from_secs(90), "5 voters", || {
        let c = client.clone();
        async move { c.status().await.is_ok_and(|s| s.voters.len() == 5) }
    })
    .await;
    a.client.deploy("echo", example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();
    step("kill two hubs: three of five voters keep the quorum");
    others[0].kill9();
    others[1].kill9();
    let client = a.client.clone();
    wait_until(Duration::from_secs(60), "changes still commit and the task answers", || {
        let c = client.clone();
        async move {
            c.deploy("echo-late", example_bytes("echo.wat"), &DeployParams::default(), false).await.is_ok()
                || c.task("echo-late").await.is_ok()
        }
    })
    .await;
    let probe = others[2].client.clone();
    wait_until(Duration::from_secs(60), "echo answers through a surviving hub", || {
        let c = probe.clone();
        async move { c.invoke("echo", b"five".to_vec(), None).await.is_ok_and(|o| o == b"five") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_replicas_spread_and_answer_through_a_hub_death() {
    let a = Hub::start("sa").await;
    let token = a.client.create_token(None).await.unwrap().token;
    let b = Hub::start_with("sb", &["--join", &token]).await;
    let mut c = Hub::start_with("sc", &["--join", &token]).await;
    for h in [&a, &b, &c] {
        wait_until(Duration::from_secs(60), "3 voters", || three_voters(h)).await;
    }
    let params = DeployParams { replicas: Some(3), ..Default::default() };
    a.client.deploy("web", example_bytes("echo.wat"), &params, false).await.unwrap();
    let client = a.client.clone();
    wait_until(Duration::from_secs(30), "three replicas on three hubs", || {
        let c = client.clone();
        async move {
            let t = c.task("web").await.unwrap();
            let mut hubs: Vec<u64> = t.instances.iter().map(|p| p.node_id).collect();
            hubs.sort();
            hubs.dedup();
            t.replicas == 3 && hubs.len() == 3
        }
    })
    .await;
    let stateful = DeployParams { stateful: true, replicas: Some(2), ..Default::default() };
    let err = a.client.deploy("bad", example_bytes("counter.wat"), &stateful, false).await.unwrap_err();
    assert_eq!(err.code(), Some("bad_request"));
    step("kill a hub: the others answer from their own replica at once");
    c.kill9();
    for h in [&a, &b] {
        assert_eq!(h.client.invoke("web", b"still".to_vec(), None).await.unwrap(), b"still");
    }
}
