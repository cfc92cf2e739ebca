//! Deploy and invoke through the API of a real hub.

use std::time::Duration;

use hubmesh_proto::api::{self, DeployParams};

use crate::harness::{example, example_bytes, step, wait_until, Hub};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_and_counter_end_to_end() {
    let hub = Hub::start("a").await;
    step("deploy echo (stateless) and counter (stateful)");
    let echo = hub.client.deploy("echo", example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();
    assert!(echo.created);
    assert_eq!(echo.task.state, "running", "{echo:?}");
    assert_eq!(echo.task.kind, api::TaskKind::Stateless);
    let params = DeployParams { stateful: true, ..Default::default() };
    hub.client.deploy("counter", example_bytes("counter.wat"), &params, false).await.unwrap();

    step("invoke");
    assert_eq!(hub.client.invoke("echo", b"hello hub".to_vec(), None).await.unwrap(), b"hello hub");
    let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    assert_eq!(hub.client.invoke("echo", big.clone(), None).await.unwrap(), big);
    for expected in ["1", "3", "0"] {
        let delta = match expected {
            "1" => "",
            "3" => "2",
            _ => "-3",
        };
        let out = hub.client.invoke("counter", delta.as_bytes().to_vec(), None).await.unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    step("concurrent invocations of a stateless task");
    let mut handles = Vec::new();
    for i in 0..32 {
        let c = hub.client.clone();
        handles.push(tokio::spawn(async move { c.invoke("echo", format!("m{i}").into_bytes(), None).await }));
    }
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap().unwrap(), format!("m{i}").into_bytes());
    }

    step("listing, status, metrics");
    let tasks = hub.client.tasks().await.unwrap();
    let names: Vec<_> = tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["counter", "echo"]);
    let counter = tasks.iter().find(|t| t.name == "counter").unwrap();
    assert_eq!(counter.invocations, 3);
    assert!(counter.placement.is_some());
    let status = hub.client.status().await.unwrap();
    assert_eq!((status.tasks_total, status.tasks_placed, status.tasks_pending), (2, 2, 0));
    assert_eq!(status.voters, vec![status.node_id]);
    let metrics = reqwest::get(format!("{}/metrics", hub.url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("hubmesh_invoke_total"), "{metrics}");
    // Both modules were compiled by the hub's compiler process, not in the hub.
    assert!(metrics.contains("hubmesh_module_compiles_total{in=\"child\"} 2"), "{metrics}");

    step("remove");
    hub.client.remove("echo").await.unwrap();
    let err = hub.client.invoke("echo", b"x".to_vec(), None).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_works_like_curl() {
    let hub = Hub::start("curl").await;
    let http = reqwest::Client::new();
    step("deploy with a raw POST of the module and query parameters");
    let resp = http
        .post(format!("{}/v1/tasks/echo?memory=8MiB&timeout=500ms", hub.url))
        .bearer_auth(hub.token())
        .body(example_bytes("echo.wat"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let info: api::DeployResponse = resp.json().await.unwrap();
    assert_eq!(info.task.limits.memory_bytes, 8 << 20);
    assert_eq!(info.task.limits.timeout_ms, 500);
    step("invoke: input is the body, output is the body");
    let resp = http
        .post(format!("{}/v1/tasks/echo/invoke", hub.url))
        .bearer_auth(hub.token())
        .body("raw bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-hubmesh-epoch"));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"raw bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_running_task_ticks() {
    let hub = Hub::start("tick").await;
    let params = DeployParams { stateful: true, tick: Some("20ms".into()), ..Default::default() };
    let d = hub.client.deploy("ticker", example_bytes("ticker.wat"), &params, false).await.unwrap();
    assert_eq!(d.task.tick_ms, Some(20));
    let client = hub.client.clone();
    wait_until(Duration::from_secs(20), "the ticker has ticked 5 times", || {
        let c = client.clone();
        async move {
            let out = c.invoke("ticker", vec![], None).await.unwrap();
            String::from_utf8(out).unwrap().parse::<u64>().unwrap() >= 5
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_task_built_with_clang_runs() {
    let wasm = example("c/thermostat.wasm");
    if !wasm.exists() {
        assert!(std::env::var_os("CI").is_none(), "CI must build examples/tasks/c (build.sh)");
        eprintln!("skipped: {} is not built; run examples/tasks/c/build.sh", wasm.display());
        return;
    }
    let hub = Hub::start("c").await;
    let params = DeployParams { durable: true, ..Default::default() };
    hub.client.deploy("thermostat", std::fs::read(&wasm).unwrap(), &params, false).await.unwrap();
    hub.client.invoke("thermostat", b"set=205".to_vec(), None).await.unwrap();
    let out = String::from_utf8(hub.client.invoke("thermostat", b"180".to_vec(), None).await.unwrap()).unwrap();
    assert!(out.contains("\"heating\":true") && out.contains("\"target\":205"), "{out}");
    let err = hub.client.invoke("thermostat", b"hot".to_vec(), None).await.unwrap_err();
    assert_eq!(err.code(), Some("task_error"), "{err}");
}
