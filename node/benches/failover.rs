//! Failover of a 3-hub mesh of real `hubmesh` processes on loopback, `lan` profile
//! (run: `cargo bench -p hubmesh --bench failover`):
//! leader killed → new leader; hub killed → its stateless task answers from another hub;
//! and the cost of a forwarded invocation over a local one. Loops are bounded in count and time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hubmesh::client::Client;
use hubmesh_proto::api::DeployParams;

struct Hub {
    dir: tempfile::TempDir,
    child: Option<Child>,
    client: Client,
    id: u64,
}

fn spawn(dir: &Path, join: Option<&str>) -> Child {
    let mesh = std::fs::read_to_string(dir.join("mesh.addr"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "127.0.0.1:0".into());
    let _ = std::fs::remove_file(dir.join("api.addr"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hubmesh"));
    cmd.arg("--data-dir").arg(dir).args(["up", "--api", "127.0.0.1:0", "--mesh", &mesh]);
    if let Some(t) = join {
        cmd.args(["--join", t]);
    }
    cmd.env("HUBMESH_LOG", "error").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

async fn ready(dir: &Path) -> Client {
    let end = Instant::now() + Duration::from_secs(60);
    while !dir.join("api.addr").exists() {
        assert!(Instant::now() < end, "hub did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let url = format!("http://{}", std::fs::read_to_string(dir.join("api.addr")).unwrap().trim());
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap().trim().to_owned();
    Client::new(&url, Some(token))
}

async fn settle(hubs: &[Hub]) {
    let end = Instant::now() + Duration::from_secs(60);
    'outer: loop {
        assert!(Instant::now() < end, "the mesh did not settle");
        tokio::time::sleep(Duration::from_millis(20)).await;
        for h in hubs {
            match h.client.status().await {
                Ok(s) if s.voters.len() == 3 && s.leader.is_some() => {}
                _ => continue 'outer,
            }
        }
        return;
    }
}

fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let first = tempfile::tempdir().unwrap();
        let child = spawn(first.path(), None);
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
        for _ in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            let child = spawn(dir.path(), Some(&token));
            let client = ready(dir.path()).await;
            hubs.push(Hub { dir, child: Some(child), client, id: 0 });
        }
        settle(&hubs).await;
        for h in hubs.iter_mut() {
            h.id = h.client.status().await.unwrap().node_id;
        }
        println!("| benchmark (3 release hubs on loopback, lan profile) | p50 | p99 | other |");
        println!("|---|---|---|---|");

        // Forwarded vs local invoke.
        hubs[0].client.deploy("echo", std::fs::read(example("echo.wat")).unwrap(), &DeployParams::default(), false).await.unwrap();
        let web = DeployParams { replicas: Some(3), ..Default::default() };
        hubs[0].client.deploy("web", std::fs::read(example("echo.wat")).unwrap(), &web, false).await.unwrap();
        let host = hubs[0].client.task("echo").await.unwrap().placement.unwrap().node_id;
        let local = hubs.iter().position(|h| h.id == host).unwrap();
        let remote = (local + 1) % 3;
        let lat = |c: Client| async move {
            let mut v = Vec::new();
            for _ in 0..300 {
                c.invoke("echo", b"warm".to_vec(), None).await.unwrap();
            }
            for _ in 0..3000 {
                let t = Instant::now();
                c.invoke("echo", b"hello, hubmesh!!".to_vec(), None).await.unwrap();
                v.push(t.elapsed());
            }
            v
        };
        let mut l = lat(hubs[local].client.clone()).await;
        let mut r = lat(hubs[remote].client.clone()).await;
        let (l50, r50) = (pct(&mut l, 0.5), pct(&mut r, 0.5));
        println!("| invoke through the host hub (HTTP, reqwest) | {:.0} µs | {:.0} µs | |", l50.as_secs_f64() * 1e6, pct(&mut l, 0.99).as_secs_f64() * 1e6);
        println!(
            "| invoke through another hub (HTTP + forward over QUIC) | {:.0} µs | {:.0} µs | forwarding adds {:.0} µs at p50 |",
            r50.as_secs_f64() * 1e6,
            pct(&mut r, 0.99).as_secs_f64() * 1e6,
            (r50.as_secs_f64() - l50.as_secs_f64()) * 1e6
        );

        // Leader failover and stateless failover, alternating, bounded.
        let mut election = Vec::new();
        let mut stateless = Vec::new();
        let mut replicated = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(400);
        let mut trial = 0;
        while (election.len() < 20 || stateless.len() < 10) && Instant::now() < deadline {
            trial += 1;
            let leader = hubs[0].client.status().await.ok().and_then(|s| s.leader).or(hubs[1].client.status().await.ok().and_then(|s| s.leader)).unwrap();
            let victim = if trial % 2 == 0 && stateless.len() < 10 {
                let host = hubs[0].client.task("echo").await.unwrap().placement.unwrap().node_id;
                hubs.iter().position(|h| h.id == host).unwrap()
            } else {
                hubs.iter().position(|h| h.id == leader).unwrap()
            };
            let measure_stateless = hubs[0].client.task("echo").await.unwrap().placement.unwrap().node_id == hubs[victim].id;
            let others: Vec<Client> = hubs.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, h)| h.client.clone()).collect();
            let t = Instant::now();
            if let Some(mut c) = hubs[victim].child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            // The two clocks run in their own tasks: an invocation waits (bounded) for the
            // re-placement and must not delay the election watcher.
            let watch_election = hubs[victim].id == leader;
            let probes = others.clone();
            let election_task = tokio::spawn(async move {
                let end = Instant::now() + Duration::from_secs(30);
                while watch_election && Instant::now() < end {
                    for c in &probes {
                        if c.status().await.is_ok_and(|s| s.leader.is_some_and(|l| l != leader)) {
                            return Some(t.elapsed());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                None
            });
            let caller = others[0].clone();
            let stateless_task = tokio::spawn(async move {
                let end = Instant::now() + Duration::from_secs(30);
                while measure_stateless && Instant::now() < end {
                    if caller.invoke("echo", b"x".to_vec(), None).await.is_ok() {
                        return Some(t.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                None
            });
            let caller = others[1].clone();
            let replica_task = tokio::spawn(async move {
                let end = Instant::now() + Duration::from_secs(30);
                while Instant::now() < end {
                    if caller.invoke("web", b"x".to_vec(), None).await.is_ok() {
                        return Some(t.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                None
            });
            let new_leader = election_task.await.unwrap();
            replicated.extend(replica_task.await.unwrap());
            let answered = stateless_task.await.unwrap();
            election.extend(new_leader);
            stateless.extend(answered);
            let dir: PathBuf = hubs[victim].dir.path().to_owned();
            hubs[victim].child = Some(spawn(&dir, None));
            hubs[victim].client = ready(&dir).await;
            settle(&hubs).await;
        }
        let ne = election.len();
        println!("| leader killed → new leader elected, {ne} trials | {:.0} ms | {:.0} ms | max {:.0} ms |", ms(pct(&mut election, 0.5)), ms(pct(&mut election, 0.99)), ms(*election.iter().max().unwrap()));
        let ns = stateless.len();
        if ns > 0 {
            println!("| host killed → its stateless task answers from another hub, {ns} trials | {:.0} ms | {:.0} ms | max {:.0} ms |", ms(pct(&mut stateless, 0.5)), ms(pct(&mut stateless, 0.99)), ms(*stateless.iter().max().unwrap()));
        }
        let nr = replicated.len();
        if nr > 0 {
            println!("| a hub killed → a 3-replica stateless task answers through a survivor, {nr} trials | {:.1} ms | {:.1} ms | max {:.1} ms |", ms(pct(&mut replicated, 0.5)), ms(pct(&mut replicated, 0.99)), ms(*replicated.iter().max().unwrap()));
        }
        for h in hubs.iter_mut() {
            if let Some(mut c) = h.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    });
}

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tasks").join(name)
}
