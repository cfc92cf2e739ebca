//! Stateful tasks with replicated checkpoints on 3 release `hubmesh` processes on loopback, `lan`
//! profile (run: `cargo bench -p hubmesh --bench stateful`): durable invocations per second,
//! incremental checkpoint cost against dirty pages, checkpoint replication throughput, and
//! failover time from `kill -9` of the host to the first answer elsewhere, split into
//! detection, re-placement and restore + first answer, for 1 MiB and 64 MiB of state. Every
//! loop is bounded in count and time. `STATEFUL_BENCH=lossy` (root): durable commits with one
//! holder, then the host, behind 30 % packet loss, against none.

use std::time::{Duration, Instant};

use hubmesh::client::Client;
use hubmesh_proto::api::DeployParams;

mod common;

use common::floor::bulk_floor;
use common::{example, kill, mesh, ms, pct, restart, settle, Hub};

fn durable(memory: &str) -> DeployParams {
    DeployParams { durable: true, memory: Some(memory.into()), ..Default::default() }
}

/// Waits until `task` runs with two holders and its committed checkpoint is on three hubs.
async fn fully_replicated(c: &Client, task: &str) {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(t) = c.task(task).await {
            if t.state == "running"
                && t.holders.len() == 2
                && t.committed.as_ref().is_some_and(|c| c.stored_on.len() == 3)
            {
                return;
            }
        }
        assert!(Instant::now() < end, "{task} did not get three copies: {:?}", c.task(task).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn host_client(hubs: &[Hub], node: u64) -> Client {
    hubs.iter().find(|h| h.id == node).unwrap().client.clone()
}

async fn host(c: &Client, task: &str) -> u64 {
    c.task(task).await.unwrap().placement.unwrap().node_id
}

fn pages_input(n: u32) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut hubs = mesh(3).await;
        let counter = std::fs::read(example("counter.wat")).unwrap();
        let big = std::fs::read(example("bigstate.wat")).unwrap();
        println!("| benchmark (3 release hubs on loopback, lan profile, k = 2 holders) | p50 | p99 | other |");
        println!("|---|---|---|---|");

        // `STATEFUL_BENCH=failover` runs only the failover trials.
        // `STATEFUL_BENCH=replication` only the 64 MiB checkpoints and their pushes.
        let only_failover = std::env::var("STATEFUL_BENCH").is_ok_and(|v| v == "failover");
        let only_replication = std::env::var("STATEFUL_BENCH").is_ok_and(|v| v == "replication");
        // `STATEFUL_BENCH=checkpoints`: those and the small-dirty runs, no failover.
        let only_checkpoints = std::env::var("STATEFUL_BENCH").is_ok_and(|v| v == "checkpoints");
        // `STATEFUL_BENCH=lossy`: durable commits with one holder behind 30 % packet loss (root).
        if std::env::var("STATEFUL_BENCH").is_ok_and(|v| v == "lossy") {
            lossy_holder(&hubs, &counter).await;
            for h in hubs.iter_mut() {
                kill(h);
            }
            return;
        }
        let skip_durable = only_failover || only_replication || only_checkpoints;
        // Durable invocations: one client on one task, then 64 clients over 16 tasks.
        for i in 0..if skip_durable { 0 } else { 16 } {
            hubs[0].client.deploy(&format!("d{i}"), counter.clone(), &durable("1MiB"), false).await.unwrap();
        }
        for i in 0..if skip_durable { 0 } else { 16 } {
            let c = hubs[0].client.clone();
            let name = format!("d{i}");
            let end = Instant::now() + Duration::from_secs(60);
            while !c.task(&name).await.is_ok_and(|t| t.holders.len() == 2 && t.state == "running") {
                assert!(Instant::now() < end);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if !skip_durable {
        let via = host_client(&hubs, host(&hubs[0].client, "d0").await);
        let mut lat = Vec::new();
        let started = Instant::now();
        for _ in 0..500 {
            let t = Instant::now();
            via.invoke("d0", b"1".to_vec(), None).await.unwrap();
            lat.push(t.elapsed());
        }
        let rate = 500.0 / started.elapsed().as_secs_f64();
        println!("| durable invoke, 1 client, 1 task (through its host), 500 calls, 0 failed (a failure stops the run) | {:.2} ms | {:.2} ms | {rate:.0}/s |", ms(pct(&mut lat, 0.5)), ms(pct(&mut lat, 0.99)));
        let mut clients = Vec::new();
        for i in 0..16 {
            clients.push(host_client(&hubs, host(&hubs[0].client, &format!("d{i}")).await));
        }
        let started = Instant::now();
        let mut joins = Vec::new();
        for w in 0..64 {
            let c = clients[w % 16].clone();
            let name = format!("d{}", w % 16);
            joins.push(tokio::spawn(async move {
                let mut v = Vec::new();
                for _ in 0..40 {
                    let t = Instant::now();
                    c.invoke(&name, b"1".to_vec(), None).await.unwrap();
                    v.push(t.elapsed());
                }
                v
            }));
        }
        let mut lat: Vec<Duration> = Vec::new();
        for j in joins {
            lat.extend(j.await.unwrap());
        }
        let rate = lat.len() as f64 / started.elapsed().as_secs_f64();
        println!("| durable invoke, 64 clients over 16 tasks, {} calls, 0 failed (a failure stops the run) | {:.2} ms | {:.2} ms | {rate:.0}/s |", lat.len(), ms(pct(&mut lat, 0.5)), ms(pct(&mut lat, 0.99)));
        for i in 0..16 {
            hubs[0].client.remove(&format!("d{i}")).await.unwrap();
        }
        }

        // Incremental checkpoints of a 64 MiB task, and the full copy to two holders.
        hubs[0].client.deploy("big64", big.clone(), &durable("80MiB"), false).await.unwrap();
        fully_replicated_after(&hubs[0].client, "big64", 1024).await;
        let via = host_client(&hubs, host(&hubs[0].client, "big64").await);
        if !only_failover {
        let mut full = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            via.invoke("big64", pages_input(1024), None).await.unwrap();
            full.push(t.elapsed());
        }
        let f50 = pct(&mut full, 0.5);
        println!(
            "| durable invoke dirtying all 1,024 pages of 64 MiB (local write + push to 2 holders + Raft record), 5 runs | {:.0} ms | {:.0} ms | {:.0} MB/s to holders (2 × 64 MiB) |",
            ms(f50),
            ms(pct(&mut full, 0.99)),
            2.0 * 64.0 * 1.048576 / f50.as_secs_f64()
        );
        // Every push so far carried 64 MiB (the first full copy and these runs), two at a time.
        let m = via.metrics().await.unwrap();
        let bytes = metric(&m, "hubmesh_checkpoint_push_bytes_total");
        let secs = metric(&m, "hubmesh_checkpoint_push_micros_total") / 1e6;
        println!(
            "| checkpoint push of 64 MiB to one holder (bulk stream: host reads + verifies, QUIC, holder verifies + appends + fdatasync), two holders at once | | | {:.0} MB/s per holder, {:.0} MB/s to both ({:.0} MiB in {:.2} s of pushes) |",
            bytes / 1e6 / secs,
            2.0 * bytes / 1e6 / secs,
            bytes / 1048576.0,
            secs
        );
        // The floor in the same run: the bare transport carrying as many bytes to two peers.
        let mut floor = bulk_floor(64 << 20, 5);
        floor.sort_by(f64::total_cmp);
        let median = floor[floor.len() / 2];
        println!(
            "| floor: the bare mesh transport, 64 MiB to two peers at once on bulk streams (no page read, hash or store), 5 runs | | | {median:.0} MB/s to both (median; {:.0}–{:.0}); the push does {:.2}× that |",
            floor[0],
            floor[floor.len() - 1],
            2.0 * bytes / 1e6 / secs / median
        );
        if only_replication {
            for h in hubs.iter_mut() {
                kill(h);
            }
            return;
        }
        for dirty in [1u32, 16, 256] {
            let mut v = Vec::new();
            for _ in 0..20 {
                let t = Instant::now();
                via.invoke("big64", pages_input(dirty), None).await.unwrap();
                v.push(t.elapsed());
            }
            println!("| durable invoke on 64 MiB dirtying {dirty} pages, 20 calls, 0 failed (a failure stops the run) | {:.2} ms | {:.2} ms | |", ms(pct(&mut v, 0.5)), ms(pct(&mut v, 0.99)));
        }
        for h in &hubs {
            let m = h.client.metrics().await.unwrap();
            println!(
                "| page log of hub {}: {:.0} compactions, longest hold of the index's lock {:.2} ms (at most {:.0} KiB copied under it), {:.0} MiB now | | | |",
                h.id,
                metric(&m, "hubmesh_page_log_compactions"),
                metric(&m, "hubmesh_page_log_compaction_lock_micros_max") / 1e3,
                metric(&m, "hubmesh_page_log_compaction_locked_bytes_max") / 1024.0,
                metric(&m, "hubmesh_page_log_bytes") / 1048576.0,
            );
        }
        if only_checkpoints {
            for h in hubs.iter_mut() {
                kill(h);
            }
            return;
        }
        }

        // Failover trials: 1 MiB (16 pages) and 64 MiB.
        hubs[0].client.deploy("big1", big.clone(), &durable("2MiB"), false).await.unwrap();
        fully_replicated_after(&hubs[0].client, "big1", 16).await;
        let trials: &[(&str, u32)] = if only_failover { &[("big64", 1024)] } else { &[("big1", 16), ("big64", 1024)] };
        for &(task, pages) in trials {
            let (mut detect, mut place, mut restore, mut total) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut leader_hosts = 0;
            let deadline = Instant::now() + Duration::from_secs(420);
            let mut trial = 0u32;
            while total.len() < 20 && Instant::now() < deadline {
                trial += 1;
                let info = hubs[0].client.task(task).await.unwrap();
                let old = info.placement.unwrap();
                let victim = hubs.iter().position(|h| h.id == old.node_id).unwrap();
                let leader = hubs[(victim + 1) % 3].client.status().await.unwrap().leader;
                if leader == Some(old.node_id) {
                    leader_hosts += 1;
                }
                let survivor = hubs[(victim + 1) % 3].client.clone();
                let kill_ms = hubmesh_consensus::now_ms();
                let t = Instant::now();
                kill(&mut hubs[victim]);
                // Re-placement as the survivors see it.
                let end = Instant::now() + Duration::from_secs(30);
                let placed = loop {
                    if let Ok(i) = survivor.task(task).await {
                        if i.placement.as_ref().is_some_and(|p| p.epoch > old.epoch) {
                            break Some((t.elapsed(), i));
                        }
                    }
                    if Instant::now() > end {
                        break None;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                };
                let answered = loop {
                    let key = format!("t{trial}");
                    if survivor.invoke(task, pages_input(1), Some(&key)).await.is_ok() {
                        break Some(t.elapsed());
                    }
                    if Instant::now() > end {
                        break None;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                };
                if let (Some((placed_at, info)), Some(answer_at)) = (placed, answered) {
                    let decided_ms = info.history.last().map_or(kill_ms, |h| h.at_ms);
                    let d = Duration::from_millis(decided_ms.saturating_sub(kill_ms));
                    detect.push(d);
                    place.push(placed_at.saturating_sub(d));
                    restore.push(answer_at.saturating_sub(placed_at));
                    total.push(answer_at);
                }
                restart(&mut hubs[victim]).await;
                settle(&hubs).await;
                // A new checkpoint so that all three hubs have the state again.
                let c = hubs[(victim + 1) % 3].client.clone();
                let _ = c.invoke(task, pages_input(1), None).await;
                fully_replicated_after(&c, task, 0).await;
                let _ = pages;
            }
            let n = total.len();
            println!(
                "| failover of {task} ({}), kill -9 of the host → first answer elsewhere, {n} trials ({leader_hosts} where the host also led) | {:.0} ms | {:.0} ms | detection {:.0}/{:.0} ms, re-placement {:.0}/{:.0} ms, restore + first answer {:.0}/{:.0} ms (p50/p99) |",
                if pages == 16 { "1 MiB" } else { "64 MiB" },
                ms(pct(&mut total, 0.5)),
                ms(pct(&mut total, 0.99)),
                ms(pct(&mut detect, 0.5)),
                ms(pct(&mut detect, 0.99)),
                ms(pct(&mut place, 0.5)),
                ms(pct(&mut place, 0.99)),
                ms(pct(&mut restore, 0.5)),
                ms(pct(&mut restore, 0.99)),
            );
        }
        for h in hubs.iter_mut() {
            kill(h);
        }
    });
}

/// The value of an unlabelled counter in a Prometheus text page (0 if absent).
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Sizes a bigstate task (first call: `pages` pages, 0 = leave it) and waits for three copies.
async fn fully_replicated_after(c: &Client, task: &str, pages: u32) {
    let end = Instant::now() + Duration::from_secs(60);
    while !c.task(task).await.is_ok_and(|t| t.state == "running" && t.holders.len() == 2) {
        assert!(Instant::now() < end, "{task} did not start with two holders");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if pages > 0 {
        c.invoke(task, pages_input(pages), None).await.unwrap();
    }
    fully_replicated(c, task).await;
}

/// Durable invocations of one counter through its host: with no loss, then with 30 % of the
/// packets to and from one of its holders dropped (that holder stays a voter and a holder: the
/// leader does not mark it down), then with the host's mesh packets dropped instead (every push
/// and every proposal crosses the loss). Each phase: 20 s or 2,000 calls, whichever ends first.
async fn lossy_holder(hubs: &[Hub], counter: &[u8]) {
    hubs[0].client.deploy("lossy", counter.to_vec(), &durable("1MiB"), false).await.unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while !hubs[0].client.task("lossy").await.is_ok_and(|t| t.holders.len() == 2 && t.state == "running") {
        assert!(Instant::now() < end, "the task did not start with two holders");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let task = hubs[0].client.task("lossy").await.unwrap();
    let host = task.placement.unwrap().node_id;
    let leader = hubs[0].client.status().await.unwrap().leader.unwrap();
    // A holder that does not lead, if there is one: the fault is on a follower that holds.
    let holder = task.holders.iter().copied().find(|h| *h != leader).unwrap_or(task.holders[0]);
    let mesh_port = |id: u64| -> u16 {
        let hub = hubs.iter().find(|h| h.id == id).unwrap();
        let addr = std::fs::read_to_string(hub.dir.path().join("mesh.addr")).unwrap();
        addr.trim().rsplit(':').next().unwrap().parse().unwrap()
    };
    let via = host_client(hubs, host);
    for phase in ["no loss", "one holder at 30 % loss", "the host at 30 % loss"] {
        let port = match phase {
            "no loss" => None,
            "one holder at 30 % loss" => Some(mesh_port(holder)),
            _ => Some(mesh_port(host)),
        };
        let loss = port.map(|p| common::lossy::Loss::on_port(p, 30).unwrap());
        let (mut lat, mut failed, mut attempts) = (Vec::new(), 0, 0);
        let started = Instant::now();
        while attempts < 2000 && started.elapsed() < Duration::from_secs(20) {
            attempts += 1;
            let t = Instant::now();
            match via.invoke("lossy", b"1".to_vec(), None).await {
                Ok(_) => lat.push(t.elapsed()),
                Err(_) => failed += 1,
            }
        }
        let dropped = loss.as_ref().map_or(0, |l| l.dropped());
        let copies = via.task("lossy").await.unwrap().committed.map_or(0, |c| c.stored_on.len());
        println!(
            "| durable invoke, 1 client, {phase} (host {host}, holder {holder}, leader {leader}) | {:.2} ms | {:.2} ms | {} ok of {attempts}, {failed} failed, max {:.0} ms, {dropped} packets dropped, last record on {copies} hubs |",
            ms(pct(&mut lat, 0.5)),
            ms(pct(&mut lat, 0.99)),
            lat.len(),
            ms(*lat.iter().max().unwrap())
        );
    }
}
