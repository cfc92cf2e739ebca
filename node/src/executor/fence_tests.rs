//! When a stateful instance may answer a caller without a commit (a periodic task's answers):
//! only while its hub holds the lease and the mesh still places it there
//! ([`CheckpointSink::may_answer`]), checked when the call runs and again when it answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubmesh_consensus::state::{checkpoint_key, parse_checkpoint_key, CheckpointPolicy, TaskKind};

use super::tests::{call, config, example, executor_in, rt, LIMITS};
use super::*;

/// A mesh in which this hub may answer while `may` is set. The next commit fails and clears it
/// when `lapse_in_commit` is set (the lease ran out while the checkpoint waited for the mesh),
/// after `held` is cleared if that is set (a commit that waits).
struct Lease {
    may: AtomicBool,
    lapse_in_commit: AtomicBool,
    held: AtomicBool,
    waiting: AtomicBool,
    committed: Mutex<Option<String>>,
}

impl Lease {
    fn held() -> Arc<Self> {
        Arc::new(Self {
            may: AtomicBool::new(true),
            lapse_in_commit: AtomicBool::new(false),
            held: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            committed: Mutex::default(),
        })
    }
}

impl CheckpointSink for Lease {
    fn commit(&self, c: &LocalCheckpoint) -> Result<(), CommitError> {
        self.waiting.store(true, Ordering::SeqCst);
        while self.held.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.waiting.store(false, Ordering::SeqCst);
        if self.lapse_in_commit.swap(false, Ordering::SeqCst) {
            self.may.store(false, Ordering::SeqCst);
            return Err(CommitError::NotCommitted("this hub lost contact with the mesh".into()));
        }
        *self.committed.lock().unwrap() = Some(c.key.clone());
        Ok(())
    }

    fn committed_key(&self, _task: &str) -> Option<String> {
        self.committed.lock().unwrap().clone()
    }

    fn may_answer(&self, _task: &str, _epoch: u64) -> bool {
        self.may.load(Ordering::SeqCst)
    }
}

/// A counter `c` with `policy`, whose checkpoints go to `lease`.
fn counter(policy: CheckpointPolicy, lease: &Arc<Lease>) -> (tempfile::TempDir, Executor, TaskConfig, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor_in(dir.path());
    exec.set_sink(lease.clone());
    let prepared = exec.prepare(&example("counter.wat"), LIMITS).unwrap();
    let cfg = config("c", &prepared.wasm, TaskKind::Stateful, policy);
    exec.start_task_from(cfg.clone(), &prepared.wasm, Restore::Fresh).unwrap();
    (dir, exec, cfg, prepared.wasm)
}

async fn keyed(exec: &Executor, input: &str, key: &str) -> Result<String, InvokeError> {
    let answer = exec.invoke("c", input.as_bytes().to_vec(), Some(key.into())).await?;
    Ok(String::from_utf8(answer.output).unwrap())
}

#[test]
fn a_periodic_instance_without_a_lease_runs_nothing_for_its_callers() {
    let lease = Lease::held();
    let (_dir, exec, ..) = counter(CheckpointPolicy::Periodic { every_ms: 60_000 }, &lease);
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        lease.may.store(false, Ordering::SeqCst);
        // A definite refusal: no checkpoint recorded these calls, so they cannot run elsewhere.
        let e = call(&exec, "c", "10").await.unwrap_err();
        assert!(matches!(e, InvokeError::Unavailable(_)), "{e:?}");
        let e = keyed(&exec, "10", "k").await.unwrap_err();
        assert!(matches!(e, InvokeError::Unavailable(_)), "{e:?}");
        lease.may.store(true, Ordering::SeqCst);
        // Neither ran: the state is as the last answer left it, and the key is free.
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "3");
        assert_eq!(keyed(&exec, "1", "k").await.unwrap(), "4");
    });
}

#[test]
fn an_answer_is_withheld_when_the_lease_runs_out_while_its_checkpoint_waits_for_the_mesh() {
    let lease = Lease::held();
    // Every call is due for a checkpoint (a period of 0), which now fails after the lease lapsed.
    let (_dir, exec, ..) = counter(CheckpointPolicy::Periodic { every_ms: 0 }, &lease);
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        lease.lapse_in_commit.store(true, Ordering::SeqCst);
        let e = keyed(&exec, "5", "k").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "an answer without a lease: {e:?}");
        // A retry while the lease is still out hears the same, not the cached answer.
        let e = keyed(&exec, "5", "k").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "a cached answer without a lease: {e:?}");
        // The lease is back and the instance was not replaced: the call ran once and counts.
        lease.may.store(true, Ordering::SeqCst);
        assert_eq!(keyed(&exec, "5", "k").await.unwrap(), "8");
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "8");
    });
}

#[test]
fn a_durable_answer_is_fenced_by_its_commit_not_by_the_lease() {
    let lease = Lease::held();
    let (_dir, exec, ..) = counter(CheckpointPolicy::Durable, &lease);
    lease.may.store(false, Ordering::SeqCst);
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3", "committed, so answered");
        lease.lapse_in_commit.store(true, Ordering::SeqCst);
        let e = call(&exec, "c", "5").await.unwrap_err();
        assert!(matches!(e, InvokeError::Unavailable(_)), "not committed, so undone: {e:?}");
    });
}

#[test]
fn calls_a_checkpoint_carried_run_on_its_new_host_even_before_it_may_answer() {
    let lease = Lease::held();
    let (_dir, exec, cfg, wasm) = counter(CheckpointPolicy::Periodic { every_ms: 0 }, &lease);
    rt().block_on(async { assert_eq!(call(&exec, "c", "3").await.unwrap(), "3") });
    exec.stop_task("c", false);
    // The committed checkpoint, as if a keyed call had been waiting when it was taken.
    let pages = exec.pages().clone();
    let key = lease.committed_key("c").unwrap();
    let (_, epoch, sequence) = parse_checkpoint_key(&key).unwrap();
    let mut m = Manifest::decode(&pages.read_manifest(&key).unwrap().unwrap()).unwrap();
    m.sequence = sequence + 1;
    m.pending = vec![(Some("kp".into()), b"1".to_vec())];
    let next = checkpoint_key("c", epoch, m.sequence);
    let refs = m.pages.iter().map(|(_, h)| *h).collect();
    let write = hubmesh_storage::PageWrite { key: next.clone(), manifest: m.encode(), refs, ..Default::default() };
    pages.write(&[write], true).unwrap();
    *lease.committed.lock().unwrap() = Some(next.clone());
    lease.may.store(false, Ordering::SeqCst);
    exec.start_task_from(cfg, &wasm, Restore::Key(next)).unwrap();
    rt().block_on(async {
        // Its caller hears the answer only through a retry, once this hub may give it; until
        // then the retry hears that the call under its key may have run, not that it did not.
        let e = keyed(&exec, "1", "kp").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "{e:?}");
        // The carried call ran meanwhile (the refused one did not): one more than the checkpoint's.
        assert_eq!(exec.status("c").unwrap().invocations, 2);
        lease.may.store(true, Ordering::SeqCst);
        assert_eq!(keyed(&exec, "1", "kp").await.unwrap(), "4", "the carried call ran, once");
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "4");
    });
}

#[test]
fn calls_queued_behind_a_checkpoint_that_outlasts_the_lease_get_no_answer() {
    let lease = Lease::held();
    let (_dir, exec, ..) = counter(CheckpointPolicy::Periodic { every_ms: 0 }, &lease);
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        lease.held.store(true, Ordering::SeqCst);
        lease.lapse_in_commit.store(true, Ordering::SeqCst);
        // The first call's checkpoint waits for the mesh; the second waits behind it. The lease
        // runs out meanwhile.
        let first = call(&exec, "c", "5");
        let second = async {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !lease.waiting.load(Ordering::SeqCst) {
                assert!(Instant::now() < deadline, "the checkpoint never began");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let queued = call(&exec, "c", "7");
            let release = async {
                tokio::task::yield_now().await;
                lease.held.store(false, Ordering::SeqCst);
            };
            tokio::join!(queued, release).0
        };
        let (first, second) = tokio::join!(first, second);
        assert!(matches!(first, Err(InvokeError::OutcomeUnknown(_))), "ran, then answered without a lease: {first:?}");
        assert!(matches!(second, Err(InvokeError::Unavailable(_))), "ran without a lease: {second:?}");
        lease.may.store(true, Ordering::SeqCst);
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "8", "the first ran, the second did not");
    });
}
