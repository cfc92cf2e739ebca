//! In-process executor benchmarks (run: `cargo bench -p hubmesh --bench executor`).
//!
//! Prints a Markdown table for docs/benchmarks.md: warm invoke next to a bare wasmtime call of
//! the same function, cold start from the compiled cache, checkpoint cost against dirty pages
//! and memory size, and durable invocations (one fdatasync each, group-committed across tasks).
//! Every loop is bounded in count and time. `EXECUTOR_BENCH=warm|cold|checkpoints|durable` runs
//! one section alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmesh::executor::{EngineLimits, Executor, InstanceLimits, TaskConfig};
use hubmesh_consensus::state::{CheckpointPolicy, TaskKind};
use hubmesh_storage::{Hash, PageLog};

fn example(name: &str) -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tasks").join(name)).expect("example task")
}

struct Stats {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let pick = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    Stats { p50: pick(0.50), p99: pick(0.99), mean }
}

fn us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

const LIMITS: InstanceLimits =
    InstanceLimits { memory_bytes: 256 << 20, timeout_ms: 10_000, max_input_bytes: 1 << 20, max_output_bytes: 1 << 20 };

fn executor(dir: &Path) -> Executor {
    let pages = PageLog::open(&dir.join("checkpoints")).unwrap();
    Executor::new(EngineLimits { max_instances: 64, max_task_memory: 256 << 20 }, &dir.join("cache"), pages).unwrap()
}

fn start(
    exec: &Executor,
    name: &str,
    file: &str,
    kind: TaskKind,
    checkpoint: CheckpointPolicy,
) -> (TaskConfig, Vec<u8>) {
    let prepared = exec.prepare(&example(file), LIMITS).unwrap();
    let config = TaskConfig {
        name: name.into(),
        version: 1,
        epoch: 1,
        kind,
        module_hash: Hash::of(&prepared.wasm),
        limits: LIMITS,
        queue: 1024,
        checkpoint,
        tick_ms: None,
    };
    exec.start_task(config.clone(), &prepared.wasm).unwrap();
    (config, prepared.wasm)
}

/// Runs `f` for `n` samples (after `warm` unrecorded ones), at most `budget` long.
fn sample(n: usize, warm: usize, budget: Duration, mut f: impl FnMut()) -> Vec<Duration> {
    for _ in 0..warm {
        f();
    }
    let end = Instant::now() + budget;
    let mut out = Vec::with_capacity(n);
    while out.len() < n && Instant::now() < end {
        let t = Instant::now();
        f();
        out.push(t.elapsed());
    }
    out
}

fn bare_wasmtime_echo(input: &[u8]) -> Vec<Duration> {
    use wasmtime::{Caller, Engine, Linker, Module, Store};
    struct S {
        input: Vec<u8>,
        output: Vec<u8>,
        memory: Option<wasmtime::Memory>,
    }
    let engine = Engine::default();
    let module = Module::new(&engine, wat::parse_bytes(&example("echo.wat")).unwrap()).unwrap();
    let mut linker: Linker<S> = Linker::new(&engine);
    linker
        .func_wrap("hubmesh", "input", |mut c: Caller<'_, S>, ptr: i32| {
            let mem = c.data().memory.unwrap();
            let input = std::mem::take(&mut c.data_mut().input);
            mem.write(&mut c, ptr as usize, &input).unwrap();
            c.data_mut().input = input;
        })
        .unwrap();
    linker
        .func_wrap("hubmesh", "output", |mut c: Caller<'_, S>, ptr: i32, len: i32| {
            let mem = c.data().memory.unwrap();
            let mut out = vec![0u8; len as usize];
            mem.read(&c, ptr as usize, &mut out).unwrap();
            c.data_mut().output = out;
        })
        .unwrap();
    let mut store = Store::new(&engine, S { input: Vec::new(), output: Vec::new(), memory: None });
    let instance = linker.instantiate(&mut store, &module).unwrap();
    store.data_mut().memory = instance.get_memory(&mut store, "memory");
    let f = instance.get_typed_func::<i32, i32>(&mut store, "hm_invoke").unwrap();
    sample(200_000, 10_000, Duration::from_secs(10), || {
        store.data_mut().input.clear();
        store.data_mut().input.extend_from_slice(input);
        f.call(&mut store, input.len() as i32).unwrap();
        assert_eq!(store.data().output.len(), input.len());
    })
}

const SECTIONS: [&str; 4] = ["warm", "cold", "checkpoints", "durable"];

/// Whether the section `name` runs (all of them unless `EXECUTOR_BENCH` names one).
fn wanted(name: &str) -> bool {
    std::env::var("EXECUTOR_BENCH").map_or(true, |only| only == name)
}

fn main() {
    if let Ok(only) = std::env::var("EXECUTOR_BENCH") {
        assert!(SECTIONS.contains(&only.as_str()), "EXECUTOR_BENCH={only}: not one of {SECTIONS:?}");
    }
    println!("| benchmark | p50 | p99 | other |");
    println!("|---|---|---|---|");
    if wanted("warm") {
        warm();
    }
    if wanted("cold") {
        cold();
    }
    if wanted("checkpoints") {
        checkpoints();
    }
    if wanted("durable") {
        durable();
    }
}

/// Warm invoke vs bare wasmtime.
fn warm() {
    let dir = tempfile::tempdir().unwrap();
    let input = b"hello, hubmesh!!";
    let exec = executor(dir.path());
    start(&exec, "echo", "echo.wat", TaskKind::Stateless, CheckpointPolicy::None);
    let ours = stats(sample(200_000, 10_000, Duration::from_secs(10), || {
        let a = exec.invoke_stateless_blocking("echo", input).unwrap();
        assert_eq!(a.output.len(), input.len());
    }));
    let bare = stats(bare_wasmtime_echo(input));
    println!(
        "| warm invoke `echo` (16 B), in process, one thread | {} | {} | {:.0}/s; overhead vs bare wasmtime {:.2}× at p50 |",
        us(ours.p50),
        us(ours.p99),
        1.0 / ours.mean.as_secs_f64(),
        ours.p50.as_secs_f64() / bare.p50.as_secs_f64()
    );
    println!(
        "| bare wasmtime call of the same `hm_invoke` (same run) | {} | {} | {:.0}/s |",
        us(bare.p50),
        us(bare.p99),
        1.0 / bare.mean.as_secs_f64()
    );
}

/// Cold start from the compiled cache: a new executor (as after a restart) loads the module from
/// DATA_DIR/cache, instantiates and answers the first call.
fn cold() {
    let input = b"hello, hubmesh!!";
    let cold_dir = tempfile::tempdir().unwrap();
    let (config, wasm) = {
        let e = executor(cold_dir.path());
        start(&e, "echo", "echo.wat", TaskKind::Stateless, CheckpointPolicy::None)
    };
    let mut cold = Vec::new();
    for _ in 0..30 {
        let e = executor(cold_dir.path());
        let t = Instant::now();
        e.start_task(config.clone(), &wasm).unwrap();
        e.invoke_stateless_blocking("echo", input).unwrap();
        cold.push(t.elapsed());
    }
    let cold = stats(cold);
    println!(
        "| cold start from the compiled cache (load + instantiate + first invoke) | {} | {} | 30 samples |",
        ms(cold.p50),
        ms(cold.p99)
    );
}

/// Checkpoints: cost against dirty pages and memory size.
fn checkpoints() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ck_dir = tempfile::tempdir().unwrap();
    let exec = executor(ck_dir.path());
    for (mem_pages, dirty) in [(1024u32, 1u32), (1024, 10), (1024, 100), (256, 10)] {
        let name = format!("big{mem_pages}-{dirty}");
        start(&exec, &name, "bigstate.wat", TaskKind::Stateful, CheckpointPolicy::Periodic { every_ms: 3_600_000 });
        rt.block_on(async {
            exec.invoke(&name, mem_pages.to_le_bytes().to_vec(), None).await.unwrap();
            exec.invoke(&name, mem_pages.to_le_bytes().to_vec(), None).await.unwrap();
            exec.checkpoint(&name).await.unwrap();
            let mut build = Vec::new();
            let mut write = Vec::new();
            let mut invoke = Vec::new();
            for _ in 0..60 {
                let t = Instant::now();
                exec.invoke(&name, dirty.to_le_bytes().to_vec(), None).await.unwrap();
                invoke.push(t.elapsed());
                let c = exec.checkpoint(&name).await.unwrap();
                build.push(Duration::from_micros(c.build_micros));
                write.push(Duration::from_micros(c.write_micros));
            }
            let (b, w, i) = (stats(build), stats(write), stats(invoke));
            println!(
                "| checkpoint, {} MiB memory, {dirty} dirty pages ({:.1} %): find + hash + encode | {} | {} | append + fdatasync p50 {}; the invocation that dirtied them (incl. page copy) p50 {} |",
                mem_pages / 16,
                dirty as f64 * 100.0 / mem_pages as f64,
                ms(b.p50),
                ms(b.p99),
                ms(w.p50),
                ms(i.p50)
            );
        });
        exec.stop_task(&name, true);
    }
}

/// Durable invocations: one task sequentially, then 16 tasks at once (group commit).
fn durable() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let exec = executor(dir.path());
    start(&exec, "counter", "counter.wat", TaskKind::Stateful, CheckpointPolicy::Durable);
    rt.block_on(async {
        let s = stats(sample_async(&exec, "counter", 2000, Duration::from_secs(10)).await);
        println!(
            "| durable invoke `counter` (one fdatasync each), one client | {} | {} | {:.0}/s |",
            ms(s.p50),
            ms(s.p99),
            1.0 / s.mean.as_secs_f64()
        );
    });
    drop(rt);
    let exec = Arc::new(exec);
    for i in 0..16 {
        start(&exec, &format!("c{i}"), "counter.wat", TaskKind::Stateful, CheckpointPolicy::Durable);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (ops, took) = rt.block_on(async {
        let t = Instant::now();
        let end = t + Duration::from_secs(3);
        let mut handles = Vec::new();
        for i in 0..16 {
            let exec = exec.clone();
            handles.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < end && n < 100_000 {
                    exec.invoke(&format!("c{i}"), b"1".to_vec(), None).await.unwrap();
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for h in handles {
            total += h.await.unwrap();
        }
        (total, t.elapsed())
    });
    println!(
        "| durable invokes, 16 tasks × 1 client each (group commit) | | | {:.0}/s in total |",
        ops as f64 / took.as_secs_f64()
    );
}

async fn sample_async(exec: &Executor, name: &str, n: usize, budget: Duration) -> Vec<Duration> {
    let end = Instant::now() + budget;
    let mut out = Vec::with_capacity(n);
    while out.len() < n && Instant::now() < end {
        let t = Instant::now();
        exec.invoke(name, b"1".to_vec(), None).await.unwrap();
        out.push(t.elapsed());
    }
    out
}
