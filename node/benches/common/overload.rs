//! The overload benchmark (part of `--bench migration`): 3 release hubs, the first offering one
//! core to tasks (`--task-cpus 1`) and the most slots, so two CPU-heavy tasks (`spin.wat`) land on
//! it; two clients call them in a loop. Measured per run: from the clients' first call (the load
//! rising) to the first answer from another hub, with the default policy (10 s window). Every
//! loop is bounded in count and time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubmesh::client::Client;
use hubmesh_proto::api::DeployParams;

use super::{example, mesh_with, pct};

/// Calls `task` in a loop until `stop` (at most 20,000 calls, 60 s); records when an answer
/// first came from a hub other than `home`, and counts failures.
async fn spin(c: Client, task: String, home: u64, stop: Arc<AtomicBool>, moved: Arc<Mutex<Option<Instant>>>) -> u64 {
    let (mut failed, end) = (0, Instant::now() + Duration::from_secs(60));
    for _ in 0..20_000 {
        if stop.load(Ordering::Relaxed) || Instant::now() > end {
            break;
        }
        match c.invoke_placed(&task, Vec::new(), None).await {
            Ok(out) if out.node.is_some_and(|n| n != home) => {
                moved.lock().unwrap().get_or_insert_with(Instant::now);
            }
            Ok(_) => {}
            Err(_) => failed += 1,
        }
    }
    failed
}

/// Runs `runs` overloads and prints the table rows.
pub(crate) async fn bench(runs: usize) {
    let hubs = mesh_with(&[&["--task-cpus", "1", "--slots", "200"], &[], &[]]).await;
    let home = hubs[0].id;
    let wasm = std::fs::read(example("spin.wat")).unwrap();
    let (mut times, mut failed, mut missed) = (Vec::new(), 0, 0);
    for run in 0..runs {
        let names = [format!("spin{run}a"), format!("spin{run}b")];
        for (i, name) in names.iter().enumerate() {
            let params = DeployParams { stateful: i == 0, ..Default::default() };
            let d = hubs[0].client.deploy(name, wasm.clone(), &params, false).await.unwrap();
            assert_eq!(d.task.placement.map(|p| p.node_id), Some(home), "{name} starts on the one-core hub");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let moved = Arc::new(Mutex::new(None));
        let began = Instant::now();
        let callers: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| tokio::spawn(spin(hubs[i + 1].client.clone(), n.clone(), home, stop.clone(), moved.clone())))
            .collect();
        let end = began + Duration::from_secs(45);
        while moved.lock().unwrap().is_none() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for c in callers {
            failed += c.await.unwrap();
        }
        match *moved.lock().unwrap() {
            Some(at) => times.push(at - began),
            None => missed += 1,
        }
        for n in &names {
            hubs[0].client.remove(n).await.unwrap();
        }
        // The hub's load falls below high before the next run starts its window.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let ok = times.len();
    if ok == 0 {
        println!("| overload: no task moved in {runs} runs | | | |");
        return;
    }
    println!(
        "| overload (default policy: 10 s window): load rising → a task answers from another hub, {ok} of {runs} runs, {missed} without a move in 45 s, {failed} calls failed | {:.1} s | {:.1} s | target p50 ≤ 15 s |",
        pct(&mut times, 0.5).as_secs_f64(),
        pct(&mut times, 0.99).as_secs_f64(),
    );
}
