//! Executor tests against real wasmtime and a real page log, with the example tasks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmesh_consensus::state::{parse_checkpoint_key, CheckpointPolicy, TaskKind};
use hubmesh_storage::{Hash, PageLog};
use proptest::prelude::*;

use super::*;

pub(super) fn example(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tasks").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub(super) const LIMITS: InstanceLimits =
    InstanceLimits { memory_bytes: 16 << 20, timeout_ms: 200, max_input_bytes: 1 << 20, max_output_bytes: 1 << 20 };

struct Fixture {
    dir: tempfile::TempDir,
    exec: Executor,
}

pub(super) fn executor_in(dir: &Path) -> Executor {
    let pages = PageLog::open(dir).unwrap();
    Executor::new(EngineLimits { max_instances: 32, max_task_memory: 64 << 20 }, &dir.join("cache"), pages).unwrap()
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor_in(dir.path());
    Fixture { dir, exec }
}

pub(super) fn config(name: &str, wasm: &[u8], kind: TaskKind, checkpoint: CheckpointPolicy) -> TaskConfig {
    TaskConfig {
        name: name.into(),
        version: 1,
        epoch: 1,
        kind,
        module_hash: Hash::of(wasm),
        limits: LIMITS,
        queue: 8,
        checkpoint,
        tick_ms: Some(5),
    }
}

fn start(exec: &Executor, name: &str, file: &str, kind: TaskKind, checkpoint: CheckpointPolicy) -> Hash {
    let prepared = exec.prepare(&example(file), LIMITS).unwrap();
    let config = config(name, &prepared.wasm, kind, checkpoint);
    exec.start_task(config.clone(), &prepared.wasm).unwrap();
    config.module_hash
}

pub(super) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

pub(super) async fn call(exec: &Executor, name: &str, input: &str) -> Result<String, InvokeError> {
    exec.invoke(name, input.as_bytes().to_vec(), None).await.map(|a| String::from_utf8(a.output).unwrap())
}

#[test]
fn echo_answers_its_input_and_big_inputs_grow_memory() {
    let f = fixture();
    start(&f.exec, "echo", "echo.wat", TaskKind::Stateless, CheckpointPolicy::None);
    let big = vec![7u8; 200_000];
    let a = f.exec.invoke_stateless_blocking("echo", &big).unwrap();
    assert_eq!(a.output, big);
    assert_eq!(f.exec.invoke_stateless_blocking("echo", b"hi").unwrap().output, b"hi");
}

#[test]
fn input_over_the_limit_is_refused() {
    let f = fixture();
    start(&f.exec, "echo", "echo.wat", TaskKind::Stateless, CheckpointPolicy::None);
    let err = f.exec.invoke_stateless_blocking("echo", &vec![0u8; (1 << 20) + 1]).unwrap_err();
    assert_eq!(err, InvokeError::InputTooLarge { size: (1 << 20) + 1, limit: 1 << 20 });
}

#[test]
fn endless_loop_is_stopped_and_the_hub_goes_on() {
    let f = fixture();
    start(&f.exec, "loop", "loop.wat", TaskKind::Stateless, CheckpointPolicy::None);
    start(&f.exec, "echo", "echo.wat", TaskKind::Stateless, CheckpointPolicy::None);
    let err = f.exec.invoke_stateless_blocking("loop", b"").unwrap_err();
    assert_eq!(err, InvokeError::DeadlineExceeded { timeout_ms: 200 });
    assert_eq!(f.exec.invoke_stateless_blocking("echo", b"still here").unwrap().output, b"still here");
    assert!(matches!(f.exec.invoke_stateless_blocking("loop", b""), Err(InvokeError::DeadlineExceeded { .. })));
}

#[test]
fn a_call_that_runs_long_leaves_the_calling_thread_to_the_others() {
    // One runtime thread: a loop that kept it would hold every other call until its deadline.
    let Fixture { dir: _dir, exec } = fixture();
    start(&exec, "loop", "loop.wat", TaskKind::Stateless, CheckpointPolicy::None);
    start(&exec, "echo", "echo.wat", TaskKind::Stateless, CheckpointPolicy::None);
    let exec = Arc::new(exec);
    let runtime_cpu = rt().block_on(async {
        let cpu_before = meter::thread_cpu_ns();
        let started = Instant::now();
        let looping = tokio::spawn({
            let exec = exec.clone();
            async move { call(&exec, "loop", "").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(exec.status("loop").unwrap().in_flight, 1, "the loop runs");
        for i in 0..20 {
            assert_eq!(call(&exec, "echo", &i.to_string()).await.unwrap(), i.to_string());
        }
        assert_eq!(exec.status("loop").unwrap().in_flight, 1, "the loop ended before the echoes: proves nothing");
        let ended =
            tokio::time::timeout(Duration::from_secs(10), looping).await.expect("the loop outlived its deadline");
        assert_eq!(ended.unwrap().unwrap_err(), InvokeError::DeadlineExceeded { timeout_ms: 200 });
        assert!(started.elapsed() >= Duration::from_millis(200), "stopped early: {:?}", started.elapsed());
        meter::thread_cpu_ns() - cpu_before
    });
    // The runtime's one thread ran the loop's first slice only (a tick), not its 200 ms.
    assert!(runtime_cpu < 100_000_000, "the runtime's thread used {runtime_cpu} ns of CPU");
    assert_eq!(exec.status("loop").map(|s| (s.in_flight, s.invocations)), Some((0, 0)));
    let cpu = exec.meters().into_iter().find(|(n, _)| n == "loop").unwrap().1.cpu_ns;
    // Its slices ran on two threads; both count (other tests share the cores: a margin).
    assert!(cpu >= 60_000_000, "a 200 ms loop counted {cpu} ns of CPU");
    assert_eq!(rt().block_on(call(&exec, "echo", "after")).unwrap(), "after");
}

#[test]
fn a_call_whose_caller_stops_waiting_ends_at_the_next_tick() {
    let Fixture { dir: _dir, exec } = fixture();
    let prepared = exec.prepare(&example("loop.wat"), LIMITS).unwrap();
    let mut slow = config("loop", &prepared.wasm, TaskKind::Stateless, CheckpointPolicy::None);
    slow.limits.timeout_ms = 60_000;
    exec.start_task(slow, &prepared.wasm).unwrap();
    rt().block_on(async {
        let gave_up = tokio::time::timeout(Duration::from_millis(100), call(&exec, "loop", "")).await;
        assert!(gave_up.is_err(), "a 60 s loop answered in 100 ms");
        let dropped = Instant::now();
        while exec.status("loop").unwrap().in_flight > 0 {
            assert!(dropped.elapsed() < Duration::from_secs(5), "the abandoned call still runs");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    // Ended, not merely uncounted: it uses no more CPU.
    let cpu = || exec.meters().into_iter().find(|(n, _)| n == "loop").unwrap().1.cpu_ns;
    let before = cpu();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(cpu(), before, "the abandoned call still uses CPU");
}

#[test]
fn memory_hog_fails_only_its_invocation() {
    let f = fixture();
    start(&f.exec, "grow", "grow.wat", TaskKind::Stateless, CheckpointPolicy::None);
    let err = f.exec.invoke_stateless_blocking("grow", b"").unwrap_err();
    assert_eq!(err, InvokeError::MemoryLimit { limit: 16 << 20 });
    start(&f.exec, "echo", "echo.wat", TaskKind::Stateless, CheckpointPolicy::None);
    assert_eq!(f.exec.invoke_stateless_blocking("echo", b"ok").unwrap().output, b"ok");
}

#[test]
fn trap_leaves_stateful_state_as_before() {
    let f = fixture();
    start(&f.exec, "counter", "counter.wat", TaskKind::Stateful, CheckpointPolicy::None);
    rt().block_on(async {
        assert_eq!(call(&f.exec, "counter", "5").await.unwrap(), "5");
        assert!(matches!(call(&f.exec, "counter", "boom").await, Err(InvokeError::Trapped(_))));
        assert_eq!(call(&f.exec, "counter", "").await.unwrap(), "6");
        let bad = f.exec.invoke("counter", b"x".to_vec(), None).await.unwrap();
        assert_eq!((bad.status, bad.output.as_slice()), (1, &b"not a number"[..]));
        assert_eq!(call(&f.exec, "counter", "-10").await.unwrap(), "-4");
    });
}

#[test]
fn a_full_queue_refuses_more_work() {
    let f = fixture();
    let prepared = f.exec.prepare(&example("loop.wat"), LIMITS).unwrap();
    let config = TaskConfig {
        limits: InstanceLimits { timeout_ms: 300, ..LIMITS },
        queue: 1,
        ..config("busy", &prepared.wasm, TaskKind::Stateful, CheckpointPolicy::None)
    };
    f.exec.start_task(config, &prepared.wasm).unwrap();
    rt().block_on(async {
        // The first call occupies the actor for its whole deadline; of the two that follow while
        // it runs, at most one fits in the queue of one. (Which one depends on when the actor
        // thread dequeues the first, so the test accepts either order.)
        let first = f.exec.invoke("busy", vec![], None);
        let second = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            f.exec.invoke("busy", vec![], None).await
        };
        let third = async {
            tokio::time::sleep(Duration::from_millis(60)).await;
            f.exec.invoke("busy", vec![], None).await
        };
        let (a, b, c) = tokio::join!(first, second, third);
        let full = [&b, &c].iter().filter(|r| matches!(r, Err(InvokeError::QueueFull { limit: 1 }))).count();
        assert!(matches!(a, Err(InvokeError::DeadlineExceeded { .. })), "{a:?}");
        assert!(full >= 1, "{b:?} {c:?}");
        for r in [&b, &c] {
            assert!(matches!(r, Err(InvokeError::DeadlineExceeded { .. } | InvokeError::QueueFull { .. })), "{r:?}");
        }
    });
}

#[test]
fn idempotency_key_applies_once() {
    let f = fixture();
    start(&f.exec, "counter", "counter.wat", TaskKind::Stateful, CheckpointPolicy::Durable);
    rt().block_on(async {
        let k = Some("op-1".to_owned());
        let a = f.exec.invoke("counter", b"3".to_vec(), k.clone()).await.unwrap();
        let b = f.exec.invoke("counter", b"3".to_vec(), k).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(call(&f.exec, "counter", "0").await.unwrap(), "3");
    });
}

/// Counters of one module share their pages (each value's page is stored once), and a page one
/// counter left out as stored can be compacted away as another moves on: such a checkpoint is
/// written again with the page, and no call of any counter fails (the executor benchmark's 16
/// counters failed in seconds before).
#[test]
fn durable_tasks_that_share_pages_all_commit_while_the_log_compacts() {
    let f = fixture();
    const TASKS: usize = 8;
    const CALLS: u64 = 150;
    for i in 0..TASKS {
        start(&f.exec, &format!("c{i}"), "counter.wat", TaskKind::Stateful, CheckpointPolicy::Durable);
    }
    // The compactor runs on this small log as it would on a 64 MiB one.
    f.exec.pages().set_compact_min_bytes(512 << 10);
    let retries_before = crate::checkpoint::MISSING_PAGE_RETRIES.load(Ordering::Relaxed);
    let exec = Arc::new(f.exec);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let calls = (0..TASKS).map(|i| {
            let exec = exec.clone();
            tokio::spawn(async move {
                for n in 1..=CALLS {
                    let got =
                        call(&exec, &format!("c{i}"), "1").await.unwrap_or_else(|e| panic!("c{i}, call {n}: {e}"));
                    assert_eq!(got, n.to_string());
                }
            })
        });
        for c in futures_util::future::join_all(calls).await {
            c.unwrap();
        }
    });
    let compactions = exec.pages().stats().compactions;
    let retries = crate::checkpoint::MISSING_PAGE_RETRIES.load(Ordering::Relaxed) - retries_before;
    eprintln!("{compactions} compactions, {retries} checkpoints written again with a compacted page");
    assert!(compactions > 0, "the log compacted while the counters ran");
}

#[test]
fn durable_state_and_keys_survive_a_restart() {
    let f = fixture();
    start(&f.exec, "counter", "counter.wat", TaskKind::Stateful, CheckpointPolicy::Durable);
    rt().block_on(async {
        for _ in 0..10 {
            call(&f.exec, "counter", "2").await.unwrap();
        }
        f.exec.invoke("counter", b"1".to_vec(), Some("k".into())).await.unwrap();
    });
    // Forget the executor without a final checkpoint, as a crash would.
    f.exec.stop_task("counter", false);
    let exec = executor_in(f.dir.path());
    start(&exec, "counter", "counter.wat", TaskKind::Stateful, CheckpointPolicy::Durable);
    rt().block_on(async {
        let again = exec.invoke("counter", b"1".to_vec(), Some("k".into())).await.unwrap();
        assert_eq!(again.output, b"21", "the retried key answers the first answer");
        assert_eq!(call(&exec, "counter", "").await.unwrap(), "22");
    });
    assert_eq!(exec.status("counter").unwrap().invocations, 12);
}

#[test]
fn a_rotten_page_fails_the_restore_and_is_forgotten_so_it_can_be_fetched_again() {
    let f = fixture();
    start(&f.exec, "counter", "counter.wat", TaskKind::Stateful, CheckpointPolicy::Durable);
    rt().block_on(async {
        call(&f.exec, "counter", "5").await.unwrap();
    });
    f.exec.stop_task("counter", false);
    let key = f
        .exec
        .pages()
        .manifest_keys()
        .into_iter()
        .filter_map(|k| parse_checkpoint_key(&k).map(|(_, e, s)| (e, s, k.clone())))
        .max()
        .unwrap()
        .2;
    let manifest = Manifest::decode(&f.exec.pages().read_manifest(&key).unwrap().unwrap()).unwrap();
    let (_, rotten) = manifest.pages[0];
    // The page's bytes no longer match its hash, as after a flipped bit on disk.
    f.exec.pages().forget_page(&rotten);
    let garbage =
        hubmesh_storage::PageWrite { pages: vec![(rotten, vec![7u8; crate::checkpoint::PAGE])], ..Default::default() };
    f.exec.pages().write(&[garbage], true).unwrap();
    assert!(f.exec.pages().has_page(&rotten));
    let prepared = f.exec.prepare(&example("counter.wat"), LIMITS).unwrap();
    let cfg = config("counter", &prepared.wasm, TaskKind::Stateful, CheckpointPolicy::Durable);
    let err = f.exec.start_task_from(cfg, &prepared.wasm, Restore::Key(key)).unwrap_err();
    assert!(matches!(err, StartTaskError::Restore(_)), "{err:?}");
    assert!(!f.exec.pages().has_page(&rotten), "forgotten: the next attempt fetches a good copy");
}

#[test]
fn new_module_version_starts_fresh() {
    let f = fixture();
    start(&f.exec, "t", "counter.wat", TaskKind::Stateful, CheckpointPolicy::Durable);
    rt().block_on(async { call(&f.exec, "t", "9").await.unwrap() });
    f.exec.stop_task("t", false);
    start(&f.exec, "t", "ticker.wat", TaskKind::Stateful, CheckpointPolicy::Durable);
    rt().block_on(async {
        let ticks: u64 = call(&f.exec, "t", "").await.unwrap().parse().unwrap();
        assert!(ticks < 1000);
    });
}

#[test]
fn ticks_run_between_invocations() {
    let f = fixture();
    start(&f.exec, "ticker", "ticker.wat", TaskKind::Stateful, CheckpointPolicy::None);
    rt().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: u64 = call(&f.exec, "ticker", "").await.unwrap().parse().unwrap();
            if n >= 3 {
                break;
            }
            assert!(Instant::now() < deadline, "ticks did not advance");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

#[test]
fn checkpoints_write_only_dirty_pages() {
    let f = fixture();
    start(&f.exec, "big", "bigstate.wat", TaskKind::Stateful, CheckpointPolicy::Durable);
    let pages = PageLog::open(&f.dir.path().join("probe")).unwrap();
    drop(pages);
    rt().block_on(async {
        // 64 pages (4 MiB), then touch 2 pages per call.
        f.exec.invoke("big", 64u32.to_le_bytes().to_vec(), None).await.unwrap();
        let first = f.exec.status("big").unwrap().last_checkpoint.unwrap();
        f.exec.invoke("big", 2u32.to_le_bytes().to_vec(), None).await.unwrap();
        let second = f.exec.status("big").unwrap().last_checkpoint.unwrap();
        assert_eq!(second.sequence, first.sequence + 1);
        // Only the two written pages (plus page 0 with the output) are non-zero.
        assert!(second.pages <= 3, "{second:?}");
    });
}

#[test]
fn corrupted_compiled_cache_is_rebuilt() {
    let f = fixture();
    let hash = start(&f.exec, "echo", "echo.wat", TaskKind::Stateless, CheckpointPolicy::None);
    let file = f.exec.cache.file_of(&hash);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    drop(f.exec);
    let exec = executor_in(f.dir.path());
    let wasm = exec.prepare(&example("echo.wat"), LIMITS).unwrap().wasm;
    let (_, source) = exec.cache.get(&Hash::of(&wasm), &wasm).unwrap();
    assert_eq!(source, module_cache::CacheSource::Memory, "prepare already rebuilt it");
    let on_disk = std::fs::read(&file).unwrap();
    assert_ne!(on_disk, bytes, "the corrupt file was replaced");
}

#[test]
fn bad_modules_are_refused_with_a_reason() {
    let f = fixture();
    assert!(matches!(f.exec.prepare(b"definitely not wasm", LIMITS), Err(PrepareError::Malformed(_))));
    let huge = br#"(module (memory 1000) (func (export "hm_invoke") (param i32) (result i32) i32.const 0))"#;
    let err = f.exec.prepare(huge, LIMITS).unwrap_err();
    assert!(err.to_string().contains("does not start"), "{err}");
}

#[test]
fn c_task_runs_when_built() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tasks/c/thermostat.wasm");
    if !path.exists() {
        assert!(std::env::var_os("CI").is_none(), "CI must build the C example (examples/tasks/c/build.sh)");
        eprintln!("skipped: {} not built (run examples/tasks/c/build.sh)", path.display());
        return;
    }
    let f = fixture();
    let prepared = f.exec.prepare(&std::fs::read(&path).unwrap(), LIMITS).unwrap();
    let config = config("thermo", &prepared.wasm, TaskKind::Stateful, CheckpointPolicy::Durable);
    f.exec.start_task(config.clone(), &prepared.wasm).unwrap();
    rt().block_on(async {
        call(&f.exec, "thermo", "set=210").await.unwrap();
        let out = call(&f.exec, "thermo", "190").await.unwrap();
        assert!(out.contains("\"heating\":true") && out.contains("\"readings\":1"), "{out}");
    });
    f.exec.stop_task("thermo", false);
    f.exec.start_task(config, &prepared.wasm).unwrap();
    rt().block_on(async {
        let out = call(&f.exec, "thermo", "230").await.unwrap();
        assert!(
            out.contains("\"heating\":false") && out.contains("\"readings\":2") && out.contains("\"mean\":210"),
            "{out}"
        );
    });
}

#[derive(Debug, Clone)]
enum Op {
    Add(i64),
    Boom,
    Restart,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Random invocation sequences with restores from the durable checkpoint at random points
    /// answer exactly like a model that never restarts.
    #[test]
    fn restored_instance_behaves_like_the_original(
        ops in proptest::collection::vec(
            prop_oneof![
                6 => (-50i64..50).prop_map(Op::Add),
                1 => Just(Op::Boom),
                1 => Just(Op::Restart),
            ],
            1..40,
        )
    ) {
        let f = fixture();
        start(&f.exec, "counter", "counter.wat", TaskKind::Stateful, CheckpointPolicy::Durable);
        let mut model = 0i64;
        let rt = rt();
        for op in ops {
            match op {
                Op::Add(d) => {
                    model += d;
                    let out = rt.block_on(call(&f.exec, "counter", &d.to_string())).unwrap();
                    prop_assert_eq!(out, model.to_string());
                }
                Op::Boom => {
                    let err = rt.block_on(call(&f.exec, "counter", "boom")).unwrap_err();
                    prop_assert!(matches!(err, InvokeError::Trapped(_)));
                }
                Op::Restart => {
                    f.exec.stop_task("counter", false);
                    start(&f.exec, "counter", "counter.wat", TaskKind::Stateful, CheckpointPolicy::Durable);
                }
            }
        }
        let out = rt.block_on(call(&f.exec, "counter", "0")).unwrap();
        prop_assert_eq!(out, model.to_string());
    }
}

#[test]
fn invocations_a_checkpoint_accepted_run_on_the_host_that_restores_it() {
    let f = fixture();
    let prepared = f.exec.prepare(&example("counter.wat"), LIMITS).unwrap();
    let cfg = config("queued", &prepared.wasm, TaskKind::Stateful, CheckpointPolicy::Durable);
    f.exec.start_task(cfg.clone(), &prepared.wasm).unwrap();
    rt().block_on(async {
        for _ in 0..3 {
            call(&f.exec, "queued", "1").await.unwrap();
        }
    });
    f.exec.stop_task("queued", false);
    // The newest checkpoint, as if two invocations had been waiting in the queue when it was taken.
    let pages = f.exec.pages().clone();
    let (t, epoch, seq) = pages
        .manifest_keys()
        .iter()
        .filter_map(|k| parse_checkpoint_key(k).map(|(t, e, s)| (t.to_owned(), e, s)))
        .max_by_key(|(_, e, s)| (*e, *s))
        .unwrap();
    let key = hubmesh_consensus::state::checkpoint_key(&t, epoch, seq);
    let mut m = Manifest::decode(&pages.read_manifest(&key).unwrap().unwrap()).unwrap();
    m.sequence += 1;
    m.pending = vec![(Some("kp".into()), b"1".to_vec()), (None, b"10".to_vec())];
    let refs = m.pages.iter().map(|(_, h)| *h).collect();
    let next = hubmesh_consensus::state::checkpoint_key(&t, epoch, m.sequence);
    pages
        .write(&[hubmesh_storage::PageWrite { key: next, manifest: m.encode(), refs, ..Default::default() }], true)
        .unwrap();
    f.exec.start_task(cfg, &prepared.wasm).unwrap();
    rt().block_on(async {
        // The keyed one ran first (3 + 1), then the keyless one (+ 10).
        let again = f.exec.invoke("queued", b"1".to_vec(), Some("kp".into())).await.unwrap();
        assert_eq!(again.output, b"4", "the retried key gets the answer of the carried invocation");
        assert_eq!(call(&f.exec, "queued", "1").await.unwrap(), "15");
    });
}

/// A mesh that re-placed the task elsewhere once `replaced` is set (every commit is refused), or
/// that cannot commit for now once `unreachable` is set.
#[derive(Default)]
struct ReplacedAfter {
    replaced: std::sync::atomic::AtomicBool,
    unreachable: std::sync::atomic::AtomicBool,
    committed: std::sync::Mutex<Option<String>>,
    attempts: std::sync::atomic::AtomicUsize,
}

impl CheckpointSink for ReplacedAfter {
    fn commit(&self, c: &LocalCheckpoint) -> Result<(), CommitError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.replaced.load(Ordering::SeqCst) {
            return Err(CommitError::Replaced { may_have_committed: false });
        }
        if self.unreachable.load(Ordering::SeqCst) {
            return Err(CommitError::NotCommitted("this hub lost contact with the mesh".into()));
        }
        *self.committed.lock().unwrap() = Some(c.key.clone());
        Ok(())
    }

    fn committed_key(&self, _task: &str) -> Option<String> {
        self.committed.lock().unwrap().clone()
    }
}

/// A periodic counter `c` checkpointed every `every_ms` into a [`ReplacedAfter`].
fn periodic_counter(every_ms: u64) -> (tempfile::TempDir, Executor, Arc<ReplacedAfter>) {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor_in(dir.path());
    let sink = Arc::new(ReplacedAfter::default());
    exec.set_sink(sink.clone());
    let prepared = exec.prepare(&example("counter.wat"), LIMITS).unwrap();
    let cfg = config("c", &prepared.wasm, TaskKind::Stateful, CheckpointPolicy::Periodic { every_ms });
    exec.start_task_from(cfg, &prepared.wasm, Restore::Fresh).unwrap();
    (dir, exec, sink)
}

#[test]
fn a_periodic_instance_that_learns_it_was_replaced_answers_no_more() {
    // Every call is due for a checkpoint (a period of 0).
    let (_dir, exec, sink) = periodic_counter(0);
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        sink.replaced.store(true, Ordering::SeqCst);
        // The change ran here, but the task now runs elsewhere: no answer from a stale instance,
        // to this call or to any after it (calls queued behind its checkpoint included). Such a
        // call may be in a checkpoint the newer epoch restored, and run there: its outcome is
        // unknown, never a definite failure.
        let e = call(&exec, "c", "10").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "{e:?}");
        sink.replaced.store(false, Ordering::SeqCst);
        let e = call(&exec, "c", "0").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "{e:?}");
        assert!(exec.status("c").unwrap().broken.is_some());
    });
}

#[test]
fn a_periodic_instance_whose_timed_checkpoint_finds_it_replaced_answers_no_more() {
    let (_dir, exec, sink) = periodic_counter(100);
    rt().block_on(async {
        sink.replaced.store(true, Ordering::SeqCst);
        // Too soon for a checkpoint after the call: the actor's timer takes it, and is refused.
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.attempts.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no checkpoint was tried");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let e = call(&exec, "c", "1").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "a replaced instance answered: {e:?}");
        // An absence is checked over a window of three periods: no condition to wait for.
        let attempts = sink.attempts.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sink.attempts.load(Ordering::SeqCst), attempts, "a replaced instance takes no more checkpoints");
    });
}

#[test]
fn a_periodic_checkpoint_that_fails_is_tried_again_a_period_later_not_at_once() {
    let (_dir, exec, sink) = periodic_counter(100);
    // Refused without a replacement (no lease): the instance goes on, and so do its checkpoints.
    sink.unreachable.store(true, Ordering::SeqCst);
    rt().block_on(async {
        // Too soon for a checkpoint: the change waits for the timer's.
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        // A rate is counted over a fixed window: no condition to wait for.
        tokio::time::sleep(Duration::from_millis(550)).await;
    });
    // Every 100 ms, not in a loop (which tried thousands of times in this half second).
    let attempts = sink.attempts.load(Ordering::SeqCst);
    assert!((1..=10).contains(&attempts), "{attempts} attempts in 550 ms");
}
