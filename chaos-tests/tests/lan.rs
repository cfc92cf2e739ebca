//! The LAN mode, against hubs this test starts itself on loopback (no root, no namespaces): the
//! faults are the shell commands a user would write for their own machines (here `kill` on a pid
//! file, and a start command that puts the hub in the background).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hubmesh::client::Client;
use hubmesh_chaos::check::Verdict;
use hubmesh_chaos::run::{run, RunOptions};
use hubmesh_chaos::scenario::Scenario;

fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct LoopbackHub {
    dir: PathBuf,
    api: String,
    start: String,
}

impl LoopbackHub {
    fn new(root: &Path, name: &str, bin: &Path) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let api = format!("127.0.0.1:{}", free_tcp());
        let mesh = format!("127.0.0.1:{}", free_udp());
        // Its own gossip port: the default (the mesh's host, port 7072) is every hub's on loopback.
        let gossip = format!("127.0.0.1:{}", free_tcp());
        let d = dir.display();
        let start = format!(
            "{} --data-dir {d} up --api {api} --mesh {mesh} --gossip {gossip} --name {name} >> {d}/hub.log 2>&1 & echo $! > {d}/pid",
            bin.display()
        );
        Self { dir, api, start }
    }

    fn sh(cmd: &str) {
        assert!(std::process::Command::new("sh").arg("-c").arg(cmd).status().unwrap().success(), "{cmd}");
    }

    fn launch(&self, join: Option<&str>) {
        match join {
            Some(t) => Self::sh(&self.start.replace(" >> ", &format!(" --join {t} >> "))),
            None => Self::sh(&self.start),
        }
    }

    fn pid_cmd(&self, signal: &str) -> String {
        format!("kill -{signal} $(cat {}/pid)", self.dir.display())
    }

    /// The end of the hub's log.
    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("hub.log")).unwrap_or_default();
        let from = (log.len().saturating_sub(4_000)..log.len()).find(|i| log.is_char_boundary(*i)).unwrap_or(log.len());
        log[from..].to_owned()
    }

    async fn client(&self) -> Client {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(t) = std::fs::read_to_string(self.dir.join("admin.token")) {
                let c = Client::new(&format!("http://{}", self.api), Some(t.trim().to_owned()));
                if c.status().await.is_ok_and(|s| s.leader.is_some()) {
                    return c;
                }
            }
            // A hub that exited (a port another process took between `free_*` and its bind, say)
            // fails at once, with its log: a CI run once saw only "did not start".
            let alive = std::process::Command::new("sh").arg("-c").arg(self.pid_cmd("0")).status().unwrap().success();
            assert!(
                alive && tokio::time::Instant::now() < deadline,
                "hub at {} did not start:\n{}",
                self.api,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for LoopbackHub {
    fn drop(&mut self) {
        let _ = std::process::Command::new("sh").arg("-c").arg(self.pid_cmd("CONT")).status();
        let _ = std::process::Command::new("sh").arg("-c").arg(self.pid_cmd("KILL")).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_mode_drives_running_hubs_with_the_users_commands() {
    let bin = hubmesh_chaos::find_hubmesh(None).expect("cargo test --workspace builds the hubmesh binary");
    let root = tempfile::tempdir().unwrap();
    let hubs: Vec<LoopbackHub> = ["l1", "l2", "l3"].iter().map(|n| LoopbackHub::new(root.path(), n, &bin)).collect();
    hubs[0].launch(None);
    let first = hubs[0].client().await;
    let token = first.create_token(Some("10m")).await.unwrap().token;
    for h in &hubs[1..] {
        h.launch(Some(&token));
        h.client().await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !first.status().await.is_ok_and(|s| s.voters.len() == 3) {
        assert!(tokio::time::Instant::now() < deadline, "three voters");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut text = String::from(
        r#"
name = "lan-loopback"
seed = 11
[workload]
counters = 1
keys = "always"
rate_hz = 20
clients = 6
[chaos]
warmup = "3s"
duration = "22s"
hold = "3s"
gap = "5s"
faults = ["kill", "pause-long"]
targets = ["host"]
"#,
    );
    for h in &hubs {
        text += &format!(
            "[[lan.hub]]\nurl = \"http://{}\"\ntoken_file = \"{}\"\nkill = \"{}\"\nstart = \"{}\"\npause = \"{}\"\nresume = \"{}\"\n",
            h.api,
            h.dir.join("admin.token").display(),
            h.pid_cmd("KILL"),
            h.start,
            h.pid_cmd("STOP"),
            h.pid_cmd("CONT"),
        );
    }
    let sc = Scenario::parse(&text).unwrap();
    let out = root.path().join("run");
    let r = run(RunOptions { scenario: sc, out, bin, seed: None, schedule: None }).await.expect("the run completes");
    let summary = std::fs::read_to_string(r.dir.join("summary.md")).unwrap();
    eprintln!("{summary}");
    assert_eq!(r.verdict, Verdict::True, "the LAN run must pass");
    let nem = std::fs::read_to_string(r.dir.join("nemesis.jsonl")).unwrap();
    assert!(nem.contains("\"f\":\"kill\"") && nem.contains("\"f\":\"pause-long\""), "{nem}");
    // The suite's tasks are gone from the user's mesh, and every hub runs again.
    let tasks = first.tasks().await.unwrap();
    assert!(tasks.iter().all(|t| !t.name.starts_with("chaos-")), "{tasks:?}");
    for h in &hubs {
        h.client().await;
    }
}
