//! The CLI contract: noun-verb commands against a real hub.

use crate::harness::{example, step, Hub};

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "CLI failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_invoke_list_rm_from_the_command_line() {
    let hub = Hub::start("cli").await;
    let counter = example("counter.wat");
    step("task deploy");
    let out = ok(&hub.cli(&["task", "deploy", counter.to_str().unwrap(), "--name", "counter", "--durable"]));
    assert!(out.contains("deployed counter v1"), "{out}");
    step("task invoke writes the output bytes to stdout");
    assert_eq!(ok(&hub.cli(&["task", "invoke", "counter", "--data", "5"])), "5");
    assert_eq!(ok(&hub.cli(&["task", "invoke", "counter", "--data", "2", "--key", "k1"])), "7");
    assert_eq!(ok(&hub.cli(&["task", "invoke", "counter", "--data", "2", "--key", "k1"])), "7");
    step("listings, in tables and JSON");
    let table = ok(&hub.cli(&["task", "list"]));
    assert!(table.starts_with("NAME") && table.contains("counter") && table.contains("stateful/durable"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&ok(&hub.cli(&["task", "list", "--json"]))).unwrap();
    assert_eq!(json[0]["name"], "counter");
    assert_eq!(json[0]["invocations"], 2);
    let status: serde_json::Value = serde_json::from_str(&ok(&hub.cli(&["status", "--json"]))).unwrap();
    assert_eq!(status["tasks_total"], 1);
    assert!(ok(&hub.cli(&["node", "list"])).contains("leader"));
    // The hub's own load report, once a second: CPU against the cores it offers.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let loaded = loop {
        let nodes: serde_json::Value = serde_json::from_str(&ok(&hub.cli(&["node", "list", "--json"]))).unwrap();
        if nodes[0]["load"]["task_cpus"].as_u64().is_some_and(|n| n >= 1) || std::time::Instant::now() > deadline {
            break nodes;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(loaded[0]["load"]["cpu_permille"].is_u64(), "{loaded}");
    let table = ok(&hub.cli(&["node", "list"]));
    let header = table.lines().next().unwrap();
    assert!(header.contains("CPU") && header.contains("WAIT"), "{table}");
    assert!(table.lines().nth(1).unwrap().contains("% of "), "the hub's load in its row: {table}");
    assert!(ok(&hub.cli(&["task", "checkpoint", "counter"])).contains("checkpoint #"));
    step("worker list: every background loop, with its rounds");
    let workers: serde_json::Value = serde_json::from_str(&ok(&hub.cli(&["worker", "list", "--json"]))).unwrap();
    let names: Vec<&str> = workers.as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "autopilot",
            "address-book",
            "quorum-ack",
            "election-gate",
            "reconciler",
            "module-keeper",
            "replication-upkeep",
            "leader",
            "api-tokens",
            "load",
            "gossip",
            "devices"
        ]
    );
    assert!(workers.as_array().unwrap().iter().all(|w| w["rounds"].as_u64().unwrap() > 0), "{workers}");
    assert!(ok(&hub.cli(&["worker", "list"])).starts_with("WORKER"));

    step("device list and show: none on loopback (discovery looks at the LAN only); an unknown id is a clear 404");
    assert_eq!(ok(&hub.cli(&["device", "list", "--json"])).trim(), "[]");
    assert!(ok(&hub.cli(&["device", "list"])).starts_with("ID"));
    let unknown = hub.cli(&["device", "show", "mdns:_hap._tcp/id=nobody"]);
    assert!(!unknown.status.success());
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(said.contains("no hub sees a device") && said.contains("device list"), "{said}");

    step("api-token create, list, revoke");
    let token =
        ok(&hub.cli(&["api-token", "create", "dev", "--scope", "invoke", "--task", "counter", "--expires", "1d"]));
    assert!(token.trim().starts_with("hmt.dev."), "{token}");
    let list = ok(&hub.cli(&["api-token", "list"]));
    assert!(
        list.starts_with("NAME") && list.contains("dev") && list.contains("invoke") && list.contains("counter"),
        "{list}"
    );
    assert!(!list.contains(token.trim()), "the list shows no token");
    assert!(ok(&hub.cli(&["api-token", "revoke", "dev"])).contains("revoked dev"));
    let listed: serde_json::Value = serde_json::from_str(&ok(&hub.cli(&["api-token", "list", "--json"]))).unwrap();
    let dev = listed.as_array().unwrap().iter().find(|t| t["name"] == "dev").unwrap();
    assert_eq!((dev["revoked"].as_bool(), dev["valid"].as_bool()), (Some(true), Some(false)), "{dev}");
    step("errors go to stderr with a non-zero exit");
    let out = hub.cli(&["task", "invoke", "missing"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no task named"));
    let out = hub.cli(&["task", "deploy", counter.to_str().unwrap(), "--name", "counter"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--update"), "{}", String::from_utf8_lossy(&out.stderr));
    step("task rm");
    ok(&hub.cli(&["task", "rm", "counter"]));
    assert!(ok(&hub.cli(&["task", "list", "--json"])).trim() == "[]");
}

#[test]
fn config_show_prints_the_effective_configuration() {
    let out = std::process::Command::new(crate::harness::bin())
        .args(["config", "show", "--name", "attic", "--label", "room=attic"])
        .env("HUBMESH_API", "127.0.0.1:9999")
        .output()
        .unwrap();
    let text = ok(&out);
    assert!(
        text.contains("name = \"attic\"")
            && text.contains("api = \"127.0.0.1:9999\"")
            && text.contains("room = \"attic\""),
        "{text}"
    );
}

#[test]
fn a_hub_refuses_to_start_with_a_lease_that_outlasts_a_leader_change() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    // `lan`: election 100 ms and node_down 1 s, so a new leader may mark the previous one down
    // 700 ms after the last quorum acknowledgement the previous one had.
    std::fs::write(&cfg, "[timeouts]\nlease = \"900ms\"\n").unwrap();
    let out = std::process::Command::new(crate::harness::bin())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["up", "--api", "127.0.0.1:0", "--mesh", "127.0.0.1:0", "--gossip", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the hub started");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("unsafe [timeouts]") && said.contains("half of node_down"), "{said}");
    assert!(!dir.path().join("data").join("raft").exists(), "Raft was started: {said}");
}
