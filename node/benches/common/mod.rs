//! A mesh of real release `hubmesh` processes on loopback for the benchmarks (`mod common;`).

#![allow(dead_code)] // each bench uses part of it

pub(crate) mod floor;
pub(crate) mod lossy;
pub(crate) mod overload;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hubmesh::client::Client;

pub(crate) struct Hub {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) child: Option<Child>,
    pub(crate) client: Client,
    pub(crate) id: u64,
}

/// A bench's hubs end with it: a hub left running would load the machine for every later run
/// (seen: 27 hubs of earlier bench runs took both cores and failed a test run).
impl Drop for Hub {
    fn drop(&mut self) {
        kill(self);
        // BENCH_LOG_DIR keeps the hubs' logs (the data dirs go with the bench).
        if let Some(keep) = std::env::var_os("BENCH_LOG_DIR") {
            let _ = std::fs::create_dir_all(&keep);
            let _ = std::fs::copy(self.dir.path().join("hub.log"), Path::new(&keep).join(format!("{}.log", self.id)));
        }
    }
}

/// Starts a hub; its log goes to `DIR/hub.log` at `BENCH_HUB_LOG` (default `warn,openraft=error`).
pub(crate) fn spawn(dir: &Path, join: Option<&str>) -> Child {
    spawn_with(dir, join, &[])
}

/// Like [`spawn`], with extra `up` flags.
pub(crate) fn spawn_with(dir: &Path, join: Option<&str>, extra: &[&str]) -> Child {
    let mesh = std::fs::read_to_string(dir.join("mesh.addr"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "127.0.0.1:0".into());
    // A restarted hub keeps its gossip address too (the default port, 7072, would be every
    // hub's on loopback).
    let gossip = std::fs::read_to_string(dir.join("gossip.addr"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "127.0.0.1:0".into());
    let _ = std::fs::remove_file(dir.join("api.addr"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hubmesh"));
    cmd.arg("--data-dir").arg(dir).args(["up", "--api", "127.0.0.1:0", "--mesh", &mesh, "--gossip", &gossip]);
    if let Some(t) = join {
        cmd.args(["--join", t]);
    }
    cmd.args(extra);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("hub.log")).unwrap();
    cmd.env("HUBMESH_LOG", std::env::var("BENCH_HUB_LOG").unwrap_or_else(|_| "warn,openraft=error".into()))
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap()
}

pub(crate) async fn ready(dir: &Path) -> Client {
    let end = Instant::now() + Duration::from_secs(60);
    while !dir.join("api.addr").exists() {
        assert!(Instant::now() < end, "hub did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let url = format!("http://{}", std::fs::read_to_string(dir.join("api.addr")).unwrap().trim());
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap().trim().to_owned();
    Client::new(&url, Some(token))
}

pub(crate) async fn settle(hubs: &[Hub]) {
    let end = Instant::now() + Duration::from_secs(60);
    'outer: loop {
        assert!(Instant::now() < end, "the mesh did not settle");
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Every hub follows the same leader in the same term, has applied what the first read
        // showed as applied anywhere, and sees every hub up: a hub that just restarted names
        // itself leader from its stored vote, and a leader killed before it caught up would make
        // the next trial two faults at once. (Two reads: under steady writes the hubs' applied
        // indexes are never equal at one instant.)
        let mut seen = Vec::new();
        for _read in 0..2 {
            for h in hubs {
                match h.client.status().await {
                    Ok(s) if s.voters.len() == 3 && s.leader.is_some() && s.nodes.iter().all(|n| !n.down) => {
                        seen.push((s.leader, s.term, s.last_applied))
                    }
                    _ => continue 'outer,
                }
            }
        }
        let (first, second) = seen.split_at(hubs.len());
        let applied = first.iter().map(|s| s.2).max().unwrap_or(0);
        let one_leader = seen.windows(2).all(|w| (w[0].0, w[0].1) == (w[1].0, w[1].1));
        if one_leader && second.iter().all(|s| s.2 >= applied) {
            return;
        }
    }
}

pub(crate) fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Starts `n` hubs (the first creates the mesh, the others join) and waits for 3 voters.
/// A data dir under `HUBMESH_BENCH_DIR` (e.g. `/dev/shm`, to take the disk out of a figure) or
/// the system's temp dir.
pub(crate) fn data_dir() -> tempfile::TempDir {
    match std::env::var_os("HUBMESH_BENCH_DIR") {
        Some(parent) => tempfile::tempdir_in(parent).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

pub(crate) async fn mesh(n: usize) -> Vec<Hub> {
    mesh_with(&vec![&[][..]; n]).await
}

/// A mesh of one hub per entry of `flags`, each started with its extra `up` flags.
pub(crate) async fn mesh_with(flags: &[&[&str]]) -> Vec<Hub> {
    let n = flags.len();
    let first = data_dir();
    let child = spawn_with(first.path(), None, flags[0]);
    let client = ready(first.path()).await;
    let end = Instant::now() + Duration::from_secs(30);
    let token = loop {
        if let Ok(t) = client.create_token(None).await {
            break t.token;
        }
        assert!(Instant::now() < end);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut hubs = vec![Hub { dir: first, child: Some(child), client, id: 0 }];
    for extra in &flags[1..n] {
        let dir = data_dir();
        let child = spawn_with(dir.path(), Some(&token), extra);
        let client = ready(dir.path()).await;
        hubs.push(Hub { dir, child: Some(child), client, id: 0 });
    }
    settle(&hubs).await;
    for h in hubs.iter_mut() {
        h.id = h.client.status().await.unwrap().node_id;
    }
    hubs
}

/// SIGKILL.
pub(crate) fn kill(hub: &mut Hub) {
    if let Some(mut c) = hub.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Starts a killed hub again on its data dir.
pub(crate) async fn restart(hub: &mut Hub) {
    let dir: PathBuf = hub.dir.path().to_owned();
    hub.child = Some(spawn(&dir, None));
    hub.client = ready(&dir).await;
}

pub(crate) fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tasks").join(name)
}
