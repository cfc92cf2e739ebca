//! Mesh-wide API tokens: created on one hub, honoured on every hub, limited by scope and task,
//! expired and revoked everywhere.

use std::time::{Duration, Instant};

use hubmesh_proto::api::{ApiTokenRequest, DeployParams};

use crate::harness::{example_bytes, step, wait_until, Hub};

fn request(name: &str, scope: &str, tasks: &[&str], expires: Option<&str>) -> ApiTokenRequest {
    ApiTokenRequest {
        name: name.into(),
        scope: Some(scope.into()),
        tasks: tasks.iter().map(|t| t.to_string()).collect(),
        expires: expires.map(str::to_owned),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_work_on_every_hub_within_their_scope_until_revoked() {
    let a = Hub::start("tok-a").await;
    let join = a.client.create_token(None).await.unwrap().token;
    let b = Hub::start_with("tok-b", &["--join", &join]).await;
    let (ca, cb) = (a.client.clone(), b.client.clone());
    wait_until(Duration::from_secs(60), "both hubs' admin tokens are registered", || {
        let c = cb.clone();
        async move { c.api_tokens().await.is_ok_and(|t| t.iter().filter(|t| t.name.starts_with("hub-")).count() == 2) }
    })
    .await;
    for name in ["echo", "echo2"] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = ca.deploy(name, example_bytes("echo.wat"), &DeployParams::default(), false).await {
            assert!(Instant::now() < deadline, "deploying {name}: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    step("one hub's admin.token works on the other");
    let a_admin_on_b = b.client_with_token(Some(&a.token()));
    a_admin_on_b.status().await.expect("hub a's admin token on hub b");

    step("an invoke token limited to echo, created through a, used on b");
    let created = ca.create_api_token(&request("hall-light", "invoke", &["echo"], None)).await.unwrap();
    assert!(created.token.starts_with("hmt.hall-light."), "{}", created.token);
    assert_eq!((created.info.scope.as_str(), created.info.valid), ("invoke", true));
    let device = b.client_with_token(Some(&created.token));
    let out = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match device.invoke("echo", b"on".to_vec(), None).await {
                Ok(out) => return out,
                // The token reaches b with the state; a 401 until then.
                Err(e) if e.status() == Some(401) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("invoking echo with the invoke token: {e}"),
            }
        }
    })
    .await
    .expect("the token works on b within 10 s");
    assert_eq!(out, b"on");
    let err = device.invoke("echo2", b"x".to_vec(), None).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(403), Some("forbidden")), "another task: {err}");
    let err = device.status().await.unwrap_err();
    assert_eq!(err.status(), Some(403), "an admin route: {err}");
    let err = device.deploy("evil", example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap_err();
    assert_eq!(err.status(), Some(403), "deploying: {err}");
    let err = device.create_api_token(&request("escalate", "admin", &[], None)).await.unwrap_err();
    assert_eq!(err.status(), Some(403), "minting an admin token: {err}");

    step("the list shows names and scopes, never the tokens");
    let listed = serde_json::to_string(&cb.api_tokens().await.unwrap()).unwrap();
    assert!(listed.contains("hall-light") && !listed.contains(&created.token), "{listed}");
    assert!(!listed.contains(&a.token()), "the list holds no admin token: {listed}");

    step("bad requests change nothing");
    let before = cb.api_tokens().await.unwrap();
    for (req, status) in [
        (request("hall-light", "invoke", &[], None), 409),
        (request("Bad Name", "admin", &[], None), 400),
        (request("x", "root", &[], None), 400),
        (request("x", "admin", &["echo"], None), 400),
        (request("x", "invoke", &[], Some("soon")), 400),
        // The hubs' own names: a user cannot take one (not even a future hub's).
        (request("hub-99", "admin", &[], None), 400),
    ] {
        let err = ca.create_api_token(&req).await.unwrap_err();
        assert_eq!(err.status(), Some(status), "{req:?}: {err}");
    }
    assert_eq!(ca.revoke_api_token("nobody").await.unwrap_err().status(), Some(404));
    assert_eq!(cb.api_tokens().await.unwrap(), before);

    step("an expired token works nowhere");
    let short = ca.create_api_token(&request("short", "admin", &[], Some("1ms"))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for hub in [&a, &b] {
        let err = hub.client_with_token(Some(&short.token)).status().await.unwrap_err();
        assert_eq!(err.status(), Some(401), "hub {}", hub.name);
    }

    step("revoked through b: a refuses it within a second");
    cb.revoke_api_token("hall-light").await.unwrap();
    let revoked_at = Instant::now();
    let on_a = a.client_with_token(Some(&created.token));
    loop {
        match on_a.invoke("echo", b"x".to_vec(), None).await {
            Err(e) if e.status() == Some(401) => break,
            _ => {
                assert!(revoked_at.elapsed() < Duration::from_secs(1), "hub a still takes the revoked token");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let err = device.invoke("echo", b"x".to_vec(), None).await.unwrap_err();
    assert_eq!(err.status(), Some(401), "hub b refuses it too");
    let listed = cb.api_tokens().await.unwrap();
    let t = listed.iter().find(|t| t.name == "hall-light").unwrap();
    assert!(t.revoked && !t.valid, "{t:?}");

    step("revoking a hub's admin token stops it on every hub, its own included");
    let a_name = format!("hub-{}", ca.status().await.unwrap().node_id);
    cb.revoke_api_token(&a_name).await.unwrap();
    wait_until(Duration::from_secs(5), "hub a refuses its own revoked admin token", || {
        let c = ca.clone();
        async move { c.status().await.is_err_and(|e| e.status() == Some(401)) }
    })
    .await;
    assert_eq!(a_admin_on_b.status().await.unwrap_err().status(), Some(401));
}
