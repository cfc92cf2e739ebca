//! Failover of a 3-hub mesh of real `hubmesh` processes on loopback, `lan` profile
//! (run: `cargo bench -p hubmesh --bench failover`):
//! leader killed → new leader; hub killed → its stateless task answers from another hub;
//! and the cost of a forwarded invocation over a local one. Loops are bounded in count and time.
//! `FAILOVER_BENCH=forward` measures forwarding only; `FAILOVER_BENCH=election` kills only leaders,
//! each once the mesh has settled after the last kill (every hub follows one leader and has
//! applied the same log); `FAILOVER_BENCH=election-rejoin` kills the leader as soon as the hub
//! killed before answers again, before it has caught up: two faults at once.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hubmesh::client::Client;
use hubmesh_proto::api::DeployParams;

mod common;

use common::floor::transport_floor;
use common::{example, kill, mesh, ms, pct, ready, settle, spawn, Hub};

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut hubs = mesh(3).await;
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
        println!("| invoke through the host hub (HTTP, reqwest), 3000 calls, 0 failed (a failure stops the run) | {:.0} µs | {:.0} µs | |", l50.as_secs_f64() * 1e6, pct(&mut l, 0.99).as_secs_f64() * 1e6);
        println!(
            "| invoke through another hub (HTTP + forward over QUIC), 3000 calls, 0 failed | {:.0} µs | {:.0} µs | forwarding adds {:.0} µs at p50 |",
            r50.as_secs_f64() * 1e6,
            pct(&mut r, 0.99).as_secs_f64() * 1e6,
            (r50.as_secs_f64() - l50.as_secs_f64()) * 1e6
        );

        // The floor of the forwarding hop: the mesh transport alone, one echo call at a time.
        let (mut bare, bare_failed) = transport_floor();
        println!(
            "| floor: a 16-byte echo over the bare mesh transport (two endpoints in the bench, QUIC + mutual TLS, on streams kept between calls), {} calls, {bare_failed} failed | {:.0} µs | {:.0} µs | forwarding adds {:.1}× the bare round trip |",
            bare.len(),
            pct(&mut bare, 0.5).as_secs_f64() * 1e6,
            pct(&mut bare, 0.99).as_secs_f64() * 1e6,
            (r50.as_secs_f64() - l50.as_secs_f64()) / pct(&mut bare, 0.5).as_secs_f64()
        );

        // `FAILOVER_BENCH=forward` stops here.
        if std::env::var("FAILOVER_BENCH").is_ok_and(|v| v == "forward") {
            for h in hubs.iter_mut() {
                kill(h);
            }
            return;
        }

        // Leader failover and stateless failover, alternating, bounded.
        // `FAILOVER_BENCH=election` kills only leaders.
        let rejoin = std::env::var("FAILOVER_BENCH").is_ok_and(|v| v == "election-rejoin");
        let elections_only = rejoin || std::env::var("FAILOVER_BENCH").is_ok_and(|v| v == "election");
        let stateless_wanted = if elections_only { 0 } else { 10 };
        let mut election = Vec::new();
        let mut stateless = Vec::new();
        let mut replicated = Vec::new();
        let (mut leader_kills, mut host_kills) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(400);
        let mut trial = 0;
        while (election.len() < 20 || stateless.len() < stateless_wanted) && Instant::now() < deadline {
            trial += 1;
            let (leader, term) = agreed_leader(&hubs).await;
            let victim = if trial % 2 == 0 && stateless.len() < stateless_wanted {
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
            leader_kills += usize::from(watch_election);
            host_kills += usize::from(measure_stateless);
            let probes = others.clone();
            let election_task = tokio::spawn(async move {
                let end = Instant::now() + Duration::from_secs(30);
                while watch_election && Instant::now() < end {
                    for c in &probes {
                        // Of a later term: a hub that just restarted names itself leader from
                        // its stored vote, of an older term.
                        if c.status().await.is_ok_and(|s| s.term > term && s.leader.is_some_and(|l| l != leader)) {
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
            if rejoin {
                answering(&hubs).await;
            } else {
                settle(&hubs).await;
            }
        }
        // Attempts next to every percentile: a trial without its event within 30 s is a failure.
        let ne = election.len();
        let mut each: Vec<u128> = election.iter().map(|d| d.as_millis()).collect();
        each.sort_unstable();
        eprintln!("elections, ms: {each:?}");
        println!("| leader killed → new leader elected, {ne} of {leader_kills} kills | {:.0} ms | {:.0} ms | max {:.0} ms |", ms(pct(&mut election, 0.5)), ms(pct(&mut election, 0.99)), ms(*election.iter().max().unwrap()));
        let ns = stateless.len();
        if ns > 0 {
            println!("| host killed → its stateless task answers from another hub, {ns} of {host_kills} kills | {:.0} ms | {:.0} ms | max {:.0} ms |", ms(pct(&mut stateless, 0.5)), ms(pct(&mut stateless, 0.99)), ms(*stateless.iter().max().unwrap()));
        }
        let nr = replicated.len();
        if nr > 0 {
            println!("| a hub killed → a 3-replica stateless task answers through a survivor, {nr} of {trial} kills | {:.1} ms | {:.1} ms | max {:.1} ms |", ms(pct(&mut replicated, 0.5)), ms(pct(&mut replicated, 0.99)), ms(*replicated.iter().max().unwrap()));
        }
        for h in hubs.iter_mut() {
            if let Some(mut c) = h.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    });
}

/// The leader two of the three hubs name, and its term (a hub that just restarted names
/// itself, from its stored vote, until it hears the current one).
async fn agreed_leader(hubs: &[Hub]) -> (u64, u64) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < end, "no leader two hubs agree on");
        let mut named = Vec::new();
        for h in hubs {
            named.extend(h.client.status().await.ok().and_then(|s| Some((s.leader?, s.term))));
        }
        if let Some(l) = named.iter().find(|l| named.iter().filter(|m| m == l).count() >= 2) {
            return *l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every hub answers with three voters and names a leader (not necessarily the same one, and a
/// restarted hub not caught up yet): what `election-rejoin` waits for.
async fn answering(hubs: &[Hub]) {
    let end = Instant::now() + Duration::from_secs(60);
    'outer: loop {
        assert!(Instant::now() < end, "the hubs did not answer");
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
