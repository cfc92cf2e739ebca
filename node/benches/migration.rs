//! Live migration on 3 release `hubmesh` processes on loopback, `lan` profile (run:
//! `cargo bench -p hubmesh --bench migration`): `churn.wat` with 1, 16 and 64 MiB of state is
//! migrated round-robin over the hubs 20 times per size while a client calls it in a loop.
//! The workload (`MIGRATION_BENCH_WORKLOAD`):
//! - `share` (default, the issue's): a writer rewrites 10 % of the task's pages a second (a few
//!   pages every ~100 ms) and the looping client's calls only count;
//! - `stress`: every call of the looping client rewrites 4 pages — at about 1,000 calls a second
//!   every page of a 64 MiB task changes each second, faster than the rounds carry them.
//!
//! Reported per size: the pause the source measured (freeze → the target serves), the longest
//! gap between two answers the looping client saw during a migration (and, to read it against,
//! in as many windows as long with no migration under way), the whole migration,
//! rounds, bytes against the state and against the pages rewritten during the migration, and
//! calls lost or doubled (the answers of all calls must be consecutive call counts). Every loop
//! is bounded in count and time. `MIGRATION_BENCH_RUNS=N` changes the 20;
//! `MIGRATION_BENCH_SIZES=1,16` picks the sizes; `MIGRATION_BENCH_VERBOSE=1` says where each
//! longest gap fell (with and without a migration); `MIGRATION_BENCH_CHECKPOINT_EVERY=60s`
//! changes the task's checkpoint period (default 1s). Then the overload benchmark (`common::overload`,
//! `MIGRATION_BENCH_OVERLOAD_RUNS=N`, default 5; `MIGRATION_BENCH_ONLY=overload` runs it alone).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubmesh::client::Client;
use hubmesh_proto::api::DeployParams;

mod common;

use common::floor::bulk_floor;
use common::{example, mesh, pct};

/// Bytes of a wasm page: what churn rewrites and a migration sends.
const PAGE: u64 = 64 << 10;

/// What one client saw: when each answer came, and the call count it answered.
#[derive(Default)]
struct Seen {
    answers: Vec<(Instant, u32)>,
    failed: u64,
}

/// Calls the task until `stop` (at most 200,000 calls), each call rewriting `pages` pages,
/// waiting `pace` between calls.
async fn client_loop(
    c: Client,
    task: String,
    prefix: &'static str,
    pages: u32,
    pace: Duration,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    for i in 0..200_000u32 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let key = format!("{prefix}{i}");
        match c.invoke(&task, pages.to_le_bytes().to_vec(), Some(&key)).await {
            Ok(out) => {
                let n = u32::from_le_bytes(out[..4].try_into().expect("churn answers 4 bytes"));
                seen.lock().unwrap().answers.push((Instant::now(), n));
            }
            Err(_) => seen.lock().unwrap().failed += 1,
        }
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
}

/// The writer of the `share` workload for a task of `pages` pages: how many pages a call
/// rewrites and how often, for 10 % of the pages a second.
fn writer_of(pages: u32) -> (u32, Duration) {
    let k = (pages / 100).max(1);
    (k, Duration::from_secs_f64(f64::from(k) / (f64::from(pages) * 0.10)))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let runs: usize = std::env::var("MIGRATION_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let overload_runs: usize =
        std::env::var("MIGRATION_BENCH_OVERLOAD_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if std::env::var("MIGRATION_BENCH_ONLY").as_deref() == Ok("overload") {
        rt.block_on(common::overload::bench(overload_runs));
        return;
    }
    rt.block_on(async {
        let hubs = mesh(3).await;
        let churn = std::fs::read(example("churn.wat")).unwrap();
        let stress = std::env::var("MIGRATION_BENCH_WORKLOAD").as_deref() == Ok("stress");
        let workload = if stress {
            "stress: every looping call rewrites 4 pages"
        } else {
            "share: a writer rewrites 10 % of the pages a second"
        };
        println!("| live migration (3 release hubs on loopback, lan profile; {runs} migrations per size, round-robin; {workload}) | p50 | p99 | other |");
        println!("|---|---|---|---|");
        let sizes: Vec<u32> = std::env::var("MIGRATION_BENCH_SIZES")
            .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
            .unwrap_or_else(|_| vec![1, 16, 64]);
        for mib in sizes {
            let task = format!("big{mib}");
            // `MIGRATION_BENCH_CHECKPOINT_EVERY` (default 1s): the task's periodic checkpoints,
            // which the client's gaps with no migration under way are read against.
            let every = std::env::var("MIGRATION_BENCH_CHECKPOINT_EVERY").unwrap_or_else(|_| "1s".into());
            let params = DeployParams {
                checkpoint_every: Some(every),
                memory: Some(format!("{}MiB", mib + 16)),
                ..Default::default()
            };
            hubs[0].client.deploy(&task, churn.clone(), &params, false).await.unwrap();
            // Sizes the memory: 16 pages per MiB (call 1).
            let end = Instant::now() + Duration::from_secs(60);
            while hubs[1].client.invoke(&task, (mib * 16).to_le_bytes().to_vec(), None).await.is_err() {
                assert!(Instant::now() < end, "{task} does not answer");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let (seen, written) = (Arc::new(Mutex::new(Seen::default())), Arc::new(Mutex::new(Seen::default())));
            let pages = mib * 16;
            let (loop_pages, writer) = if stress { (4, None) } else { (0, Some(writer_of(pages))) };
            let caller = tokio::spawn(client_loop(
                hubs[2].client.clone(),
                task.clone(),
                "c",
                loop_pages,
                Duration::ZERO,
                stop.clone(),
                seen.clone(),
            ));
            let writing = writer.map(|(k, pace)| {
                tokio::spawn(client_loop(hubs[1].client.clone(), task.clone(), "w", k, pace, stop.clone(), written.clone()))
            });
            tokio::time::sleep(Duration::from_millis(300)).await;

            let (mut pauses, mut gaps, mut totals) = (Vec::new(), Vec::new(), Vec::new());
            let (mut rounds, mut bytes, mut dirtied, mut failed) = (Vec::new(), Vec::new(), Vec::new(), 0);
            let mut parts: [Vec<Duration>; 5] = Default::default();
            for i in 0..runs {
                let host = hubs[0].client.task(&task).await.unwrap().placement.unwrap().node_id;
                let to = hubs.iter().map(|h| h.id).filter(|id| *id != host).nth(i % 2).unwrap();
                let began = Instant::now();
                match hubs[i % 3].client.migrate(&task, Some(&to.to_string())).await {
                    Ok(m) => {
                        pauses.push(Duration::from_micros(m.pause_us));
                        totals.push(Duration::from_millis(m.duration_ms));
                        rounds.push(m.rounds);
                        bytes.push(m.bytes);
                        // Pages rewritten from the begin to the answer: by the writer's calls,
                        // or the looping client's.
                        // And from a second before the begin: the target's copy is the last
                        // periodic checkpoint (every second), so what changed since then had to
                        // travel too.
                        let ended = Instant::now();
                        let rewrote = |from: Instant| {
                            let count = |s: &Seen| s.answers.iter().filter(|(t, _)| *t >= from && *t <= ended).count() as u64;
                            match writer {
                                Some((k, _)) => count(&written.lock().unwrap()) * u64::from(k),
                                None => count(&seen.lock().unwrap()) * u64::from(loop_pages),
                            }
                        };
                        // Every call stores its count in page 0: each round carries it again.
                        let before = began.checked_sub(Duration::from_secs(1)).unwrap_or(began);
                        let counter = u64::from(m.rounds);
                        dirtied.push(((rewrote(began) + counter) * PAGE, (rewrote(before) + counter) * PAGE));
                        for (v, us) in parts.iter_mut().zip([m.frozen_us, m.stored_us, m.committed_us, m.applied_us, m.running_us]) {
                            v.push(Duration::from_micros(us));
                        }
                        // The longest gap between answers the client saw from the begin to
                        // 200 ms after the answer.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let s = seen.lock().unwrap();
                        let during: Vec<Instant> =
                            s.answers.iter().map(|(t, _)| *t).filter(|t| *t >= began).collect();
                        let gap = during.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
                        if std::env::var_os("MIGRATION_BENCH_VERBOSE").is_some() {
                            // Where the longest gap fell: its start from the begin, against the
                            // whole migration's length.
                            let at = during.windows(2).max_by_key(|w| w[1] - w[0]).map(|w| w[0] - began);
                            let wall = at.map(|a| humantime::format_rfc3339_micros(std::time::SystemTime::now() - began.elapsed() + a));
                            eprintln!("{task} #{i}: gap {gap:?} starting {at:?} after the begin (at {wall:?}); migration {} ms, pause {} µs", m.duration_ms, m.pause_us);
                        }
                        gaps.push(gap);
                    }
                    Err(e) => {
                        eprintln!("migration {i} of {task} failed: {e}");
                        failed += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The same client's longest gap in windows as long as a migration's (the whole
            // migration's p50 and the 200 ms after it) with none under way: what it sees anyway
            // (periodic checkpoints, the writer's calls), against which the gaps above are read.
            let whole = if totals.is_empty() { Duration::ZERO } else { pct(&mut totals.clone(), 0.5) };
            let window = whole + Duration::from_millis(200);
            let mut quiet = Vec::new();
            for _ in 0..runs {
                let began = Instant::now();
                tokio::time::sleep(window).await;
                {
                    let s = seen.lock().unwrap();
                    let during: Vec<Instant> = s.answers.iter().map(|(t, _)| *t).filter(|t| *t >= began).collect();
                    let longest = during.windows(2).max_by_key(|w| w[1] - w[0]);
                    if let (Some(w), Some(_)) = (longest, std::env::var_os("MIGRATION_BENCH_VERBOSE")) {
                        let wall = std::time::SystemTime::now() - w[0].elapsed();
                        eprintln!("{task} quiet: gap {:?} at {}", w[1] - w[0], humantime::format_rfc3339_micros(wall));
                    }
                    quiet.push(longest.map(|w| w[1] - w[0]).unwrap_or_default());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            stop.store(true, Ordering::Relaxed);
            caller.await.unwrap();
            if let Some(w) = writing {
                w.await.unwrap();
            }
            // The report, with the clients' records locked (not across an await).
            {
            let s = seen.lock().unwrap();
            let w = written.lock().unwrap();
            let calls = s.answers.len() + w.answers.len();
            // The sizing call was call 1: all answers together must be 2, 3, ... with no gap
            // (a lost call) and no repeat (a doubled one).
            let mut all: Vec<u32> = s.answers.iter().chain(&w.answers).map(|(_, n)| *n).collect();
            all.sort_unstable();
            let wrong = all.iter().enumerate().filter(|(i, n)| **n as usize != i + 2).count();
            let state_bytes = u64::from(mib) << 20;
            let ok = pauses.len();
            let bytes_ratio = bytes.iter().map(|b| *b as f64 / state_bytes as f64).fold(0.0, f64::max);
            // Against what had to travel: at least the pages rewritten from the begin to the end
            // (a ratio that errs high), at most those and the ones rewritten in the second before
            // (the target's copy is the last checkpoint: a ratio that errs low).
            let p50_ratio = |pick: fn(&(u64, u64)) -> u64| {
                let mut r: Vec<f64> =
                    bytes.iter().zip(&dirtied).map(|(b, d)| *b as f64 / pick(d).max(PAGE) as f64).collect();
                r.sort_by(f64::total_cmp);
                r.get(r.len() / 2).copied().unwrap_or(0.0)
            };
            let (during_p50, wide_p50) = (p50_ratio(|d| d.0), p50_ratio(|d| d.1));
            let rounds_max = rounds.iter().copied().max().unwrap_or(0);
            println!(
                "| {mib} MiB: pause (source: freeze → target serves), {ok} of {runs} migrations ok, {failed} failed | {:.0} µs | {:.0} µs | rounds ≤ {rounds_max}; bytes sent ≤ {bytes_ratio:.2}× the state; p50 {during_p50:.2}× the pages rewritten during the migration (page 0, the call counter, once a round), {wide_p50:.2}× those and the second before |",
                us(pct(&mut pauses, 0.5)),
                us(pct(&mut pauses, 0.99)),
            );
            println!(
                "| {mib} MiB: longest gap between answers a client calling in a loop saw, per migration ({calls} calls, {} failed) | {:.1} ms | {:.1} ms | answers out of sequence (lost or doubled calls): {wrong} |",
                s.failed + w.failed,
                pct(&mut gaps, 0.5).as_secs_f64() * 1e3,
                pct(&mut gaps, 0.99).as_secs_f64() * 1e3,
            );
            println!(
                "| {mib} MiB: the same client's longest gap in as long a window with no migration ({} windows of {} ms) | {:.1} ms | {:.1} ms | |",
                quiet.len(),
                window.as_millis(),
                pct(&mut quiet, 0.5).as_secs_f64() * 1e3,
                pct(&mut quiet, 0.99).as_secs_f64() * 1e3,
            );
            let at = |q: f64, parts: &mut [Vec<Duration>; 5]| {
                parts.iter_mut().map(|v| format!("{:.1}", pct(v, q).as_secs_f64() * 1e3)).collect::<Vec<_>>().join(" / ")
            };
            println!(
                "| {mib} MiB: the pause's parts, ms from the freeze: final state out / stored on both hubs / switch committed / the target applied it / the task runs there | {} | {} | |",
                at(0.5, &mut parts),
                at(0.99, &mut parts),
            );
            println!(
                "| {mib} MiB: whole migration (begin → target serves) | {:.1} ms | {:.1} ms | |",
                pct(&mut totals, 0.5).as_secs_f64() * 1e3,
                pct(&mut totals, 0.99).as_secs_f64() * 1e3,
            );
            }
            hubs[0].client.remove(&task).await.unwrap();
        }
        drop(hubs);
        common::overload::bench(overload_runs).await;
        let mut floor = bulk_floor(64 << 20, 3);
        floor.sort_by(f64::total_cmp);
        println!(
            "| floor: 64 MiB pushed over the bare mesh transport to two peers at once (3 runs) | {:.0} MB/s | | |",
            floor[floor.len() / 2]
        );
    });
}
