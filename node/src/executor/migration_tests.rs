//! The executor's side of a live migration, between two executors with their own page logs (the
//! mesh protocol that carries the rounds is tested with real hubs elsewhere).

use hubmesh_consensus::state::{checkpoint_key, parse_checkpoint_key, CheckpointPolicy, TaskKind};
use std::time::Duration;

use hubmesh_consensus::Epoch;
use hubmesh_storage::{Hash, PageLog, PageWrite};

use super::tests::{call, config, example, executor_in, rt, LIMITS};
use super::*;
use crate::checkpoint::PAGE;

/// Copies a checkpoint (manifest and pages) from one page log to another, as a holder has it.
fn copy_checkpoint(from: &PageLog, to: &PageLog, key: &str) -> Manifest {
    let bytes = from.read_manifest(key).unwrap().expect("the checkpoint is there");
    let m = Manifest::decode(&bytes).unwrap();
    let pages = m.pages.iter().map(|(_, h)| (*h, from.read_page(h).unwrap())).collect();
    let refs = m.pages.iter().map(|(_, h)| *h).collect();
    let write = PageWrite { pages, key: key.to_owned(), manifest: bytes, refs, remove: Vec::new() };
    to.write(&[write], true).unwrap();
    m
}

fn header(cfg: &TaskConfig, last: &FinalState) -> CheckpointHeader {
    CheckpointHeader {
        task: cfg.name.clone(),
        task_version: cfg.version,
        epoch: cfg.epoch,
        sequence: last.sequence,
        module_hash: cfg.module_hash,
        invocations: last.invocations,
        created_unix_ms: 0,
    }
}

#[test]
fn a_migrated_counter_goes_on_exactly_where_the_source_stopped() {
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (src, dst) = (executor_in(src_dir.path()), executor_in(dst_dir.path()));
    let prepared = src.prepare(&example("counter.wat"), LIMITS).unwrap();
    let cfg = config("c", &prepared.wasm, TaskKind::Stateful, CheckpointPolicy::Durable);
    src.start_task_from(cfg.clone(), &prepared.wasm, Restore::Fresh).unwrap();
    let final_sequence = rt().block_on(async {
        for _ in 0..5 {
            call(&src, "c", "1").await.unwrap();
        }
        let keyed = src.invoke("c", b"10".to_vec(), Some("k1".into())).await.unwrap();
        assert_eq!(keyed.output, b"15");

        let start = src.migration_begin("c").await.unwrap();
        let (base_key, _, _pin) = start.base.expect("a durable task has a committed checkpoint");
        // The target holds the base checkpoint, as a holder of the task does.
        let base = copy_checkpoint(src.pages(), dst.pages(), &base_key);
        let mut table = PageTable::from_manifest(Some(&base));
        // The target builds the task's instance from the base, then from each round.
        let mut staged = dst.stage(&cfg, &prepared.wasm, Some(&base)).unwrap();
        let unchanged = dst.stage(&cfg, &prepared.wasm, Some(&base)).unwrap();
        // The task serves during the rounds.
        assert_eq!(call(&src, "c", "100").await.unwrap(), "115");
        let round = src.migration_round("c", 16, Duration::ZERO).await.unwrap();
        assert!(!round.pages.is_empty(), "the page the call changed is sent");
        assert_eq!(round.remaining, 0);
        let memory_pages = round.memory_pages;
        let sent = table.record(memory_pages, round.pages);
        let contents = sent.new.iter().map(|(h, d)| (*h, d.as_slice())).collect();
        staged.apply(dst.pages(), memory_pages, &sent.entries, &contents).unwrap();
        dst.pages().write(&[PageWrite { pages: sent.new, ..Default::default() }], true).unwrap();

        // Calls that wait when the source freezes travel with its state or are held.
        let waiting = (0..4).map(|i| src.invoke("c", b"1000".to_vec(), (i % 2 == 0).then(|| format!("w{i}"))));
        let (answers, last) = tokio::join!(futures_util::future::join_all(waiting), src.migration_freeze("c", 42));
        let last = last.unwrap();
        assert!(last.sequence > 7, "the final state's sequence follows the six checkpoints and the round's");
        // Durable commits went on during the rounds: the final state names the newest.
        assert!(last.committed_key.as_ref().is_some_and(|k| *k != base_key));
        let final_pages = table.record(last.memory_pages, last.pages.clone());
        let contents = final_pages.new.iter().map(|(h, d)| (*h, d.as_slice())).collect();
        staged.apply(dst.pages(), last.memory_pages, &final_pages.entries, &contents).unwrap();
        let manifest = table.manifest(header(&cfg, &last), &last);
        assert!(staged.matches(&manifest), "the staged memory is the migrated state");
        assert!(!unchanged.matches(&manifest), "an instance that missed a round is not used");
        let key = checkpoint_key("c", Epoch(cfg.epoch), last.sequence);
        let refs = manifest.pages.iter().map(|(_, h)| *h).collect();
        let write =
            PageWrite { pages: final_pages.new, key: key.clone(), manifest: manifest.encode(), refs, remove: vec![] };
        dst.pages().write(&[write], true).unwrap();
        // The target keeps the manifest it stored with the instance: the start does not read
        // it back.
        staged.keep_manifest(key.clone(), manifest.clone());

        // The switch: the target runs the task at a new epoch from the migrated state.
        src.migration_resolve("c", Resolution::Moved(MovedTo { node: 2, epoch: 2 })).await.unwrap();
        let target = TaskConfig { epoch: 2, ..cfg.clone() };
        dst.start_staged(target, &prepared.wasm, key, staged).unwrap();
        let mut ran_at_source = 0;
        for answer in answers {
            match answer {
                Ok(_) => ran_at_source += 1,
                // Relayed once, under the key the migration gave it.
                Err(InvokeError::Moved { node: 2, epoch: 2, key }) => {
                    dst.invoke("c", b"1000".to_vec(), key).await.unwrap();
                }
                Err(other) => panic!("a waiting call failed: {other}"),
            }
        }
        // The source runs nothing after the switch; it tells callers where the task went.
        assert_eq!(
            src.invoke("c", b"1".to_vec(), None).await,
            Err(InvokeError::Moved { node: 2, epoch: 2, key: None })
        );
        src.detach_migrated("c");
        assert!(src.status("c").is_none());
        // Every call applied exactly once, wherever it ran.
        assert_eq!(call(&dst, "c", "0").await.unwrap(), "4115", "{ran_at_source} ran on the source");
        // The answers moved with the state.
        assert_eq!(dst.invoke("c", b"10".to_vec(), Some("k1".into())).await.unwrap().output, b"15");
        last.sequence
    });
    // The source never wrote a checkpoint at or after the final state's sequence: that key is
    // the target's.
    let own: Vec<u64> =
        src.pages().manifest_keys().iter().filter_map(|k| parse_checkpoint_key(k)).map(|(.., s)| s).collect();
    assert!(!own.is_empty() && own.iter().all(|s| *s < final_sequence), "{own:?} vs {final_sequence}");
}

#[test]
fn an_aborted_migration_leaves_every_changed_page_to_the_next_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor_in(dir.path());
    let prepared = exec.prepare(&example("bigstate.wat"), LIMITS).unwrap();
    let hourly = CheckpointPolicy::Periodic { every_ms: 3_600_000 };
    let cfg = config("big", &prepared.wasm, TaskKind::Stateful, hourly);
    exec.start_task_from(cfg, &prepared.wasm, Restore::Fresh).unwrap();
    rt().block_on(async {
        exec.invoke("big", 64u32.to_le_bytes().to_vec(), None).await.unwrap();
        let first = exec.checkpoint("big").await.unwrap();
        // Eight pages change after the checkpoint; a migration sends them, then is given up.
        exec.invoke("big", 8u32.to_le_bytes().to_vec(), None).await.unwrap();
        let start = exec.migration_begin("big").await.unwrap();
        assert!(start.base.is_some());
        let round = exec.migration_round("big", usize::MAX, Duration::ZERO).await.unwrap();
        assert!(round.pages.len() >= 8, "{} pages", round.pages.len());
        let last = exec.migration_freeze("big", 1).await.unwrap();
        assert!(last.pages.is_empty(), "nothing changed since the round");
        exec.migration_resolve("big", Resolution::Aborted).await.unwrap();
        // The task runs here again.
        assert_eq!(exec.invoke("big", Vec::new(), None).await.unwrap().output, 64u32.to_le_bytes());
        // The checkpoint after the abort still holds the eight pages (page 0, which also holds
        // the output, is one of them), under a sequence the migration's final state never used.
        // Had the round cleared the checkpoint's marks, it would hold page 0 alone.
        assert_eq!(first.pages, 1);
        let second = exec.checkpoint("big").await.unwrap();
        assert_eq!(second.pages, 8, "{second:?} lost pages the migration had sent");
        assert_eq!(second.sequence, last.sequence + 1);
        assert!(second.sequence > first.sequence);
        // A second migration starts again from that checkpoint.
        let again = exec.migration_begin("big").await.unwrap();
        assert_eq!(again.base.map(|b| b.0), Some(checkpoint_key("big", Epoch(1), second.sequence)));
        assert!(exec.migration_round("big", usize::MAX, Duration::ZERO).await.unwrap().pages.is_empty());
    });
}

#[test]
fn a_task_without_checkpoints_sends_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor_in(dir.path());
    let prepared = exec.prepare(&example("counter.wat"), LIMITS).unwrap();
    let cfg = config("c", &prepared.wasm, TaskKind::Stateful, CheckpointPolicy::None);
    exec.start_task_from(cfg, &prepared.wasm, Restore::Fresh).unwrap();
    rt().block_on(async {
        call(&exec, "c", "7").await.unwrap();
        let start = exec.migration_begin("c").await.unwrap();
        assert!(start.base.is_none());
        let part = exec.migration_round("c", 0, Duration::ZERO).await.unwrap();
        assert_eq!((part.pages.len(), part.remaining), (0, part.memory_pages as usize));
        let round = exec.migration_round("c", usize::MAX, Duration::ZERO).await.unwrap();
        assert_eq!((round.pages.len() as u32, round.remaining), (part.memory_pages, 0));
        // Freezing twice is refused; the first freeze stands.
        let last = exec.migration_freeze("c", 3).await.unwrap();
        assert!(exec.migration_freeze("c", 4).await.is_err());
        assert!(last.globals.iter().any(|(name, _)| !name.is_empty()));
        // A stateless task has no state to migrate.
        start_echo(&exec);
        assert!(matches!(exec.migration_begin("echo").await, Err(InvokeError::Unavailable(_))));
        assert_eq!(exec.migration_begin("nope").await.err(), Some(InvokeError::NotFound("nope".into())));
    });
}

#[test]
fn a_migration_cut_short_by_a_failover_sends_keyed_calls_on_and_keyless_ones_back_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor_in(dir.path());
    let prepared = exec.prepare(&example("counter.wat"), LIMITS).unwrap();
    let cfg = config("c", &prepared.wasm, TaskKind::Stateful, CheckpointPolicy::Durable);
    exec.start_task_from(cfg, &prepared.wasm, Restore::Fresh).unwrap();
    rt().block_on(async {
        call(&exec, "c", "1").await.unwrap();
        exec.migration_begin("c").await.unwrap();
        exec.migration_freeze("c", 9).await.unwrap();
        // Held while frozen: `join!` polls the calls first, and each is queued on its first
        // poll, so the resolution reaches the actor after them.
        let keyed = exec.invoke("c", b"1".to_vec(), Some("mine".into()));
        let keyless = exec.invoke("c", b"1".to_vec(), None);
        let fenced = async {
            let to = MovedTo { node: 3, epoch: 7 };
            exec.migration_resolve("c", Resolution::Fenced(Some(to))).await.unwrap();
        };
        let (keyed, keyless, ()) = tokio::join!(keyed, keyless, fenced);
        assert_eq!(keyed, Err(InvokeError::Moved { node: 3, epoch: 7, key: Some("mine".into()) }));
        assert!(matches!(keyless, Err(InvokeError::OutcomeUnknown(_))), "{keyless:?}");
        // A fenced instance runs nothing more.
        assert!(matches!(call(&exec, "c", "1").await, Err(InvokeError::Unavailable(_))));
    });
}

fn start_echo(exec: &Executor) {
    let prepared = exec.prepare(&example("echo.wat"), LIMITS).unwrap();
    let cfg = config("echo", &prepared.wasm, TaskKind::Stateless, CheckpointPolicy::None);
    exec.start_task_from(cfg, &prepared.wasm, Restore::Fresh).unwrap();
}

#[test]
fn a_page_table_sends_each_content_once() {
    let page = |b: u8| vec![b; PAGE];
    let mut table = PageTable::default();
    let round = table.record(4, vec![(0, page(1)), (1, page(1)), (2, page(0)), (3, page(2))]);
    assert_eq!(round.entries.len(), 3, "a zero page that was zero is no change");
    assert_eq!(round.new.iter().map(|(h, _)| *h).collect::<Vec<_>>(), vec![Hash::of(&page(1)), Hash::of(&page(2))]);
    assert_eq!(round.bytes, 2 * PAGE as u64);
    // Unchanged pages are left out; a page that became zero is an entry without content; the
    // memory grew by a page.
    let round = table.record(5, vec![(0, page(1)), (3, page(0)), (4, page(2))]);
    assert_eq!(round.entries, vec![(3, None), (4, Some(Hash::of(&page(2))))]);
    assert!(round.new.is_empty(), "page 4's content was sent as page 3");
    assert_eq!(table.pages(), vec![(0, Hash::of(&page(1))), (1, Hash::of(&page(1))), (4, Hash::of(&page(2)))]);
    // Back to a smaller image (a failed commit was undone): the pages beyond it are gone.
    table.record(2, Vec::new());
    assert_eq!(table.pages(), vec![(0, Hash::of(&page(1))), (1, Hash::of(&page(1)))]);
}

/// The checked-in checkpoint of `fixture_checkpoint`: a counter at 42 with an answered key `k`,
/// written by a hub on x86_64 (`cargo test -p hubmesh --lib -- --ignored write_checkpoint_fixture`
/// writes it again).
fn fixture_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/ckpt-v1")
}

#[test]
#[ignore = "writes the checked-in fixture; run by hand when the format changes on purpose"]
fn write_checkpoint_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor_in(dir.path());
    let prepared = exec.prepare(&example("counter.wat"), LIMITS).unwrap();
    let cfg = config("fixture", &prepared.wasm, TaskKind::Stateful, CheckpointPolicy::Durable);
    exec.start_task_from(cfg, &prepared.wasm, Restore::Fresh).unwrap();
    let key = rt().block_on(async {
        call(&exec, "fixture", "40").await.unwrap();
        exec.invoke("fixture", b"2".to_vec(), Some("k".into())).await.unwrap();
        let s = exec.checkpoint("fixture").await.unwrap();
        checkpoint_key("fixture", Epoch(s.epoch), s.sequence)
    });
    let out = fixture_dir();
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(out.join("pages")).unwrap();
    std::fs::write(out.join("module.wasm"), &prepared.wasm).unwrap();
    let bytes = exec.pages().read_manifest(&key).unwrap().unwrap();
    std::fs::write(out.join("manifest.pb"), &bytes).unwrap();
    for (_, h) in Manifest::decode(&bytes).unwrap().pages {
        std::fs::write(out.join("pages").join(h.to_hex()), exec.pages().read_page(&h).unwrap()).unwrap();
    }
}

/// A checkpoint is wasm state only (pages, globals, answers), so one written on another hub —
/// of another CPU architecture, say — restores here: the checked-in one answers as it did.
#[test]
fn a_checked_in_checkpoint_restores_on_this_host() {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor_in(dir.path());
    let fixture = fixture_dir();
    let wasm = std::fs::read(fixture.join("module.wasm")).unwrap();
    let bytes = std::fs::read(fixture.join("manifest.pb")).unwrap();
    let m = Manifest::decode(&bytes).unwrap();
    let pages: Vec<(Hash, Vec<u8>)> =
        m.pages.iter().map(|(_, h)| (*h, std::fs::read(fixture.join("pages").join(h.to_hex())).unwrap())).collect();
    assert!(pages.iter().all(|(h, p)| Hash::of(p) == *h), "the fixture's pages match their hashes");
    let key = checkpoint_key(&m.task, Epoch(m.epoch), m.sequence);
    let refs = m.pages.iter().map(|(_, h)| *h).collect();
    exec.pages().write(&[PageWrite { pages, key: key.clone(), manifest: bytes, refs, remove: vec![] }], true).unwrap();
    let cfg =
        TaskConfig { epoch: m.epoch + 1, ..config(&m.task, &wasm, TaskKind::Stateful, CheckpointPolicy::Durable) };
    assert_eq!(cfg.module_hash, m.module_hash);
    exec.start_task_from(cfg, &wasm, Restore::Key(key)).unwrap();
    rt().block_on(async {
        assert_eq!(exec.invoke(&m.task, b"2".to_vec(), Some("k".into())).await.unwrap().output, b"42");
        assert_eq!(call(&exec, &m.task, "1").await.unwrap(), "43");
    });
}

/// A sink whose next commit lands in the mesh only after the instance was told it failed (its
/// answer was lost in a crash or a timeout, and the mesh committed it later).
#[derive(Default)]
struct LateCommits {
    committed: std::sync::Mutex<Option<String>>,
    lose_next: std::sync::atomic::AtomicBool,
    late: std::sync::Mutex<Option<String>>,
}

impl LateCommits {
    /// The commit whose answer was lost lands now.
    fn land(&self) {
        *self.committed.lock().unwrap() = self.late.lock().unwrap().take();
    }
}

impl CheckpointSink for LateCommits {
    fn commit(&self, c: &LocalCheckpoint) -> Result<(), CommitError> {
        if self.lose_next.swap(false, Ordering::SeqCst) {
            *self.late.lock().unwrap() = Some(c.key.clone());
            return Err(CommitError::NotCommitted("the answer was lost".into()));
        }
        *self.committed.lock().unwrap() = Some(c.key.clone());
        Ok(())
    }

    fn committed_key(&self, _task: &str) -> Option<String> {
        self.committed.lock().unwrap().clone()
    }
}

#[test]
fn a_migration_builds_on_a_checkpoint_committed_after_the_instance_gave_it_up() {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor_in(dir.path());
    let sink = Arc::new(LateCommits::default());
    exec.set_sink(sink.clone());
    let prepared = exec.prepare(&example("counter.wat"), LIMITS).unwrap();
    let cfg = config("c", &prepared.wasm, TaskKind::Stateful, CheckpointPolicy::Durable);
    exec.start_task_from(cfg, &prepared.wasm, Restore::Fresh).unwrap();
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        sink.lose_next.store(true, Ordering::SeqCst);
        // Told it failed: the instance goes back to 3 ...
        assert!(call(&exec, "c", "10").await.is_err());
        // ... but the mesh committed the change after all.
        sink.land();
        let landed = sink.committed_key("c").unwrap();
        let start = exec.migration_begin("c").await.unwrap();
        let (base, _, _pin) = start.base.expect("a base checkpoint");
        assert_eq!(base, landed, "the migration builds on the mesh's committed checkpoint");
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "13", "the instance holds the committed state");
    });
}
