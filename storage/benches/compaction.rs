//! One page-log compaction of 64 MiB of live pages (1,024 pages of 64 KiB) out of a file five
//! times that (four full checkpoints written over the live one), as a task whose checkpoints
//! rewrite every page leaves it: wall and CPU time of the
//! compacting thread, and the live bytes it copies per second. Data dir in `HUBMESH_BENCH_DIR`
//! (default `/dev/shm`, the figure then excludes the disk). Run:
//! `cargo bench -p hubmesh-storage --bench compaction`. Bounded: `ROUNDS` compactions.

use std::time::{Duration, Instant};

use hubmesh_storage::{Hash, PageLog, PageWrite};

const ROUNDS: usize = 12;
const PAGES: u32 = 1024;
const PAGE: usize = 64 << 10;

/// CPU time this thread has used (`/proc/thread-self/schedstat`, nanoseconds on a CPU).
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    Duration::from_nanos(s.split_whitespace().next().and_then(|n| n.parse().ok()).expect("a number"))
}

/// A full checkpoint of distinct pages, each marked with `generation` and its index.
fn checkpoint(generation: u32) -> PageWrite {
    let pages: Vec<(Hash, Vec<u8>)> = (0..PAGES)
        .map(|i| {
            let mut b = vec![(i % 251) as u8; PAGE];
            b[..4].copy_from_slice(&generation.to_le_bytes());
            b[4..8].copy_from_slice(&i.to_le_bytes());
            (Hash::of(&b), b)
        })
        .collect();
    let refs = pages.iter().map(|(h, _)| *h).collect();
    PageWrite { pages, key: "t/1/1".into(), manifest: generation.to_le_bytes().to_vec(), refs, remove: vec![] }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let base = std::env::var("HUBMESH_BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let dir = tempfile::tempdir_in(&base).expect("bench dir");
    let log = PageLog::open(dir.path()).expect("page log");
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    let mut generation = 0;
    for round in 0..ROUNDS {
        // No compaction while the garbage piles up: four full checkpoints over the live one (the
        // first round has none), all but the last garbage.
        log.set_compact_min_bytes(u64::MAX);
        for _ in 0..4 {
            generation += 1;
            log.write(&[checkpoint(generation)], false).expect("write");
        }
        log.sync().expect("sync");
        let before = log.stats();
        log.set_compact_min_bytes(0);
        let (t, c) = (Instant::now(), thread_cpu());
        assert!(log.compact_if_needed().expect("compaction"), "round {round}: no compaction: {before:?}");
        let (t, c) = (t.elapsed(), thread_cpu() - c);
        let after = log.stats();
        assert!(after.file_bytes < before.file_bytes / 3, "round {round}: {before:?} -> {after:?}");
        if round > 0 {
            // The first round warms the page cache of a fresh file.
            wall.push(t.as_secs_f64() * 1e3);
            cpu.push(c.as_secs_f64() * 1e3);
        }
    }
    for v in [&mut wall, &mut cpu] {
        v.sort_by(f64::total_cmp);
    }
    let live_mb = f64::from(PAGES) * PAGE as f64 / 1e6;
    println!("compaction of {live_mb:.0} MB live out of a file 5x that, {} rounds (+1 warm-up) in {base}", wall.len());
    println!(
        "  wall ms: p50 {:.1}  min {:.1}  max {:.1}   cpu ms: p50 {:.1}  min {:.1}  max {:.1}   live copied: {:.0} MB/s (p50 wall)",
        pct(&wall, 0.5),
        wall[0],
        wall[wall.len() - 1],
        pct(&cpu, 0.5),
        cpu[0],
        cpu[cpu.len() - 1],
        live_mb / (pct(&wall, 0.5) / 1e3)
    );
}
