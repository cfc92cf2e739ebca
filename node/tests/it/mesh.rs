//! Several real hubs forming a mesh over QUIC with mutual TLS.

use std::time::Duration;

use hubmesh_proto::api::DeployParams;

use crate::harness::{bin, example_bytes, step, wait_until, Hub};

async fn three_voters(hub: &Hub) -> bool {
    hub.client.status().await.is_ok_and(|s| s.voters.len() == 3)
}

/// Runs `hubmesh up --join TOKEN` on a fresh data dir and returns its exit status and stderr.
fn try_join(token: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .arg("--data-dir")
        .arg(dir.path())
        .args(["up", "--api", "127.0.0.1:0", "--mesh", "127.0.0.1:0", "--join", token])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
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
    hubs[2].client.deploy("counter", example_bytes("counter.wat"), &params, false).await.unwrap();
    hubs[1].client.deploy("echo", example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();
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
    hubs[0].client.deploy("echo2", example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();
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
    step("an expired token");
    let short = a.client.create_token(Some("1ms")).await.unwrap().token;
    let (ok, err) = try_join(&short);
    assert!(!ok && err.contains("expired"), "{err}");
    step("the mesh is unchanged: one hub, one voter");
    let s = a.client.status().await.unwrap();
    assert_eq!((s.nodes.len(), s.voters.len()), (1, 1));
}
