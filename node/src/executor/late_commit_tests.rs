//! A checkpoint whose commit the instance was told had failed (its answer was lost in a timeout
//! or a leader change) and that the mesh committed after all: the instance must find its way to
//! it, keep committing after it, and not throw away what it acknowledged since.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hubmesh_consensus::state::{parse_checkpoint_key, CheckpointPolicy, TaskKind};
use hubmesh_storage::{Hash, PageLog, PageWrite};

use super::tests::{call, config, example, executor_in, rt, LIMITS};
use super::*;

/// A stored checkpoint: its manifest and the pages it refers to.
type Stored = (Vec<u8>, Vec<Hash>);

/// A mesh that commits a checkpoint only if it was built on the committed one (as the state
/// machine checks). Its next commit goes through, but the instance hears that it may not have,
/// and this hub applies it only later (`land`).
#[derive(Default)]
struct Mesh {
    committed: Mutex<Option<String>>,
    applied: Mutex<Option<String>>,
    lose_next: AtomicBool,
    /// Commits that fail with an unknown outcome, and did not commit.
    fail_unknown: AtomicUsize,
    /// What each commit carried, as the holders would store it: key → (manifest, refs).
    stored: Mutex<HashMap<String, Stored>>,
    /// The instance's page log, where a fetch puts the committed checkpoint.
    log: Mutex<Option<Arc<PageLog>>>,
    fetches: AtomicUsize,
}

impl Mesh {
    /// This hub applies what the mesh committed.
    fn land(&self) {
        *self.applied.lock().unwrap() = self.committed.lock().unwrap().clone();
    }

    fn committed_sequence(&self) -> u64 {
        parse_checkpoint_key(&self.committed_now()).unwrap().2
    }

    /// The key the mesh has committed (whether this hub applied it or not).
    fn committed_now(&self) -> String {
        self.committed.lock().unwrap().clone().unwrap()
    }

    /// Writes the manifest the commit of `from` carried under `to` in `log`.
    fn copy_manifest(&self, log: &PageLog, from: &str, to: &str) {
        let (manifest, refs) = self.stored.lock().unwrap()[from].clone();
        let write = PageWrite { pages: Vec::new(), key: to.to_owned(), manifest, refs, remove: Vec::new() };
        log.write(&[write], true).unwrap();
    }
}

/// A durable counter at 3, then a call adding 5 whose checkpoint commits with its answer lost:
/// the key committed before, and the one that landed (not applied here yet).
async fn three_then_a_lost_commit(exec: &Executor, mesh: &Mesh) -> (String, String) {
    assert_eq!(call(exec, "c", "3").await.unwrap(), "3");
    let first = mesh.committed_now();
    mesh.lose_next.store(true, Ordering::SeqCst);
    let e = call(exec, "c", "5").await.unwrap_err();
    assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "{e:?}");
    (first, mesh.committed_now())
}

impl CheckpointSink for Mesh {
    fn commit(&self, c: &LocalCheckpoint) -> Result<(), CommitError> {
        self.stored.lock().unwrap().insert(c.key.clone(), (c.manifest.clone(), c.refs.clone()));
        if self.fail_unknown.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(CommitError::MayHaveCommitted("the proposal timed out".into()));
        }
        let mut committed = self.committed.lock().unwrap();
        if c.committed_key != *committed {
            return Err(CommitError::Behind(format!("built on {:?}, {committed:?} is committed", c.committed_key)));
        }
        *committed = Some(c.key.clone());
        if self.lose_next.swap(false, Ordering::SeqCst) {
            return Err(CommitError::MayHaveCommitted("the answer was lost".into()));
        }
        *self.applied.lock().unwrap() = Some(c.key.clone());
        Ok(())
    }

    fn committed_key(&self, _task: &str) -> Option<String> {
        self.applied.lock().unwrap().clone()
    }

    fn committed_hash(&self, _task: &str, key: &str) -> Option<Hash> {
        self.stored.lock().unwrap().get(key).map(|(manifest, _)| Hash::of(manifest))
    }

    fn fetch_committed(&self, _task: &str, key: &str) -> bool {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        if self.applied.lock().unwrap().as_deref() != Some(key) {
            return false;
        }
        if !self.stored.lock().unwrap().contains_key(key) {
            return false;
        }
        // The pages are still in the log (garbage, not yet compacted): only the manifest came back.
        self.copy_manifest(&self.log.lock().unwrap().clone().unwrap(), key, key);
        true
    }
}

fn counter(policy: CheckpointPolicy) -> (tempfile::TempDir, Executor, Arc<Mesh>) {
    let dir = tempfile::tempdir().unwrap();
    let exec = executor_in(dir.path());
    let mesh = Arc::new(Mesh::default());
    *mesh.log.lock().unwrap() = Some(exec.pages().clone());
    exec.set_sink(mesh.clone());
    let prepared = exec.prepare(&example("counter.wat"), LIMITS).unwrap();
    let cfg = config("c", &prepared.wasm, TaskKind::Stateful, policy);
    exec.start_task_from(cfg, &prepared.wasm, Restore::Fresh).unwrap();
    (dir, exec, mesh)
}

#[test]
fn a_durable_instance_returns_to_a_checkpoint_that_committed_after_it_gave_it_up() {
    let (_dir, exec, mesh) = counter(CheckpointPolicy::Durable);
    rt().block_on(async {
        three_then_a_lost_commit(&exec, &mesh).await;
        mesh.land();
        // Built on the checkpoint before the lost one: refused, and the instance returns to the
        // lost one, which it kept on disk although it took a newer one since. (Unknown, not
        // undone: a call the landed checkpoint carried in its pending list may run elsewhere.)
        let e = call(&exec, "c", "1").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "{e:?}");
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "8", "the committed state, and commits go on");
        assert!(mesh.committed_sequence() >= 4, "no commit after the late one (checkpoint 2)");
    });
}

#[test]
fn a_periodic_instance_keeps_what_it_answered_after_a_checkpoint_that_committed_late() {
    // Every call is due for a checkpoint (a period of 0).
    let (_dir, exec, mesh) = counter(CheckpointPolicy::Periodic { every_ms: 0 });
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        mesh.lose_next.store(true, Ordering::SeqCst);
        assert_eq!(call(&exec, "c", "5").await.unwrap(), "8", "periodic: answered before its checkpoint");
        // Checkpoints built on the one before the lost one are refused meanwhile.
        assert_eq!(call(&exec, "c", "2").await.unwrap(), "10");
        mesh.land();
        // This state grew from the checkpoint that landed: nothing to undo (the 2 acknowledged
        // since stays), and the next checkpoint builds on it.
        assert_eq!(call(&exec, "c", "1").await.unwrap(), "11");
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "11");
        // (The actor's timer may try more: every page counts as changed after a failed commit.)
        assert!(mesh.committed_sequence() >= 4, "no commit after the late one (checkpoint 2)");
    });
}

#[test]
fn a_keyed_retry_hears_the_answer_of_its_run_that_landed_late() {
    let (_dir, exec, mesh) = counter(CheckpointPolicy::Durable);
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        mesh.lose_next.store(true, Ordering::SeqCst);
        let e = exec.invoke("c", b"5".to_vec(), Some("k".into())).await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "{e:?}");
        mesh.land();
        // The retry runs again on the state before, and its checkpoint is refused: the instance
        // returns to the one that landed, which holds the first run and its answer.
        let again = exec.invoke("c", b"5".to_vec(), Some("k".into())).await.unwrap();
        assert_eq!(again.output, b"8", "the change is committed once, and the retry hears so");
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "8");
    });
}

#[test]
fn a_call_undone_before_this_hub_applied_a_checkpoint_that_landed_late_is_not_said_to_have_failed() {
    let (_dir, exec, mesh) = counter(CheckpointPolicy::Durable);
    rt().block_on(async {
        three_then_a_lost_commit(&exec, &mesh).await;
        // Landed in the mesh but not applied here: the next call's checkpoint is refused, and
        // the instance cannot tell yet where it stands. The landed checkpoint may carry the call
        // (as pending) to a host that restores it: not a definite failure.
        let e = call(&exec, "c", "1").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "{e:?}");
        mesh.land();
        let _ = call(&exec, "c", "0").await; // finds the landed checkpoint and returns to it
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "8");
    });
}

#[test]
fn an_instance_past_its_kept_checkpoints_fetches_the_one_that_landed_late() {
    let (_dir, exec, mesh) = counter(CheckpointPolicy::Durable);
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        // More checkpoints whose outcome is unknown than the instance keeps on disk...
        mesh.fail_unknown.store(stateful::UNSETTLED, Ordering::SeqCst);
        for _ in 0..stateful::UNSETTLED {
            let e = call(&exec, "c", "1").await.unwrap_err();
            assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "{e:?}");
        }
        // ...and then the one that did commit, whose answer was lost too.
        mesh.lose_next.store(true, Ordering::SeqCst);
        let e = call(&exec, "c", "5").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "{e:?}");
        // Refused before this hub applied the commit: the next checkpoint drops it from disk.
        let e = call(&exec, "c", "1").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "{e:?}");
        assert!(!exec.pages().has_manifest(mesh.committed.lock().unwrap().as_ref().unwrap()));
        mesh.land();
        // Behind the landed checkpoint, which is not here: fetched, and returned to.
        let _ = call(&exec, "c", "0").await;
        assert_eq!(mesh.fetches.load(Ordering::SeqCst), 1);
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "8", "the committed state, and commits go on");
        assert_eq!(call(&exec, "c", "2").await.unwrap(), "10");
    });
}

#[test]
fn a_checkpoint_the_mesh_committed_is_kept_on_disk_past_the_unsettled_ones() {
    let (_dir, exec, mesh) = counter(CheckpointPolicy::Durable);
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        mesh.fail_unknown.store(stateful::UNSETTLED, Ordering::SeqCst);
        for _ in 0..stateful::UNSETTLED {
            assert!(call(&exec, "c", "1").await.is_err());
        }
        mesh.lose_next.store(true, Ordering::SeqCst);
        assert!(call(&exec, "c", "5").await.is_err());
        // Applied here before the next checkpoint: that one keeps it on disk, and no fetch is needed.
        mesh.land();
        let e = call(&exec, "c", "1").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "{e:?}");
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "8");
        assert_eq!(mesh.fetches.load(Ordering::SeqCst), 0, "fetched what was on disk");
    });
}

#[test]
fn a_committed_key_held_here_with_other_contents_is_fetched_not_taken() {
    let (_dir, exec, mesh) = counter(CheckpointPolicy::Durable);
    rt().block_on(async {
        let (first, landed) = three_then_a_lost_commit(&exec, &mesh).await;
        // This hub holds the key that landed with other contents (as after a restart that
        // reused it): the state of the checkpoint before.
        mesh.copy_manifest(exec.pages(), &first, &landed);
        mesh.land();
        let _ = call(&exec, "c", "0").await;
        assert_eq!(mesh.fetches.load(Ordering::SeqCst), 1, "the contents here were taken as committed");
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "8", "the committed state, and commits go on");
    });
}

#[test]
fn a_restart_from_a_lagging_view_uses_no_key_again_and_returns_to_the_one_that_landed() {
    let (_dir, exec, mesh) = counter(CheckpointPolicy::Durable);
    let prepared = exec.prepare(&example("counter.wat"), LIMITS).unwrap();
    rt().block_on(async {
        // The hub dies while its checkpoint commits: the mesh commits it, this hub never hears.
        let (first, landed) = three_then_a_lost_commit(&exec, &mesh).await;
        let landed_manifest = mesh.stored.lock().unwrap()[&landed].0.clone();
        exec.stop_task("c", false);
        // Back, it restores from the checkpoint its lagging view says is committed.
        let cfg = config("c", &prepared.wasm, TaskKind::Stateful, CheckpointPolicy::Durable);
        exec.start_task_from(cfg, &prepared.wasm, Restore::Key(first)).unwrap();
        let e = call(&exec, "c", "1").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "the landed checkpoint may carry it: {e:?}");
        // That checkpoint went under a new key: the one that landed is the same here and on holders.
        assert_eq!(mesh.stored.lock().unwrap()[&landed].0, landed_manifest, "the landed key was used again");
        assert_eq!(exec.pages().read_manifest(&landed).unwrap(), Some(landed_manifest));
        mesh.land();
        let _ = call(&exec, "c", "0").await; // finds the landed checkpoint here and returns to it
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "8", "the committed state, and commits go on");
        assert_eq!(mesh.fetches.load(Ordering::SeqCst), 0, "fetched what was on disk");
    });
}

#[test]
fn a_checkpoint_skips_a_key_the_page_log_holds_already() {
    let (_dir, exec, mesh) = counter(CheckpointPolicy::Durable);
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        let first = mesh.committed_now();
        let (_, epoch, sequence) = parse_checkpoint_key(&first).unwrap();
        // Something holds the next key here (what an earlier run of the instance would leave).
        let next = hubmesh_consensus::state::checkpoint_key("c", epoch, sequence + 1);
        mesh.copy_manifest(exec.pages(), &first, &next);
        assert_eq!(call(&exec, "c", "5").await.unwrap(), "8", "the checkpoint went under the key after it");
        assert_eq!(mesh.committed_sequence(), sequence + 2);
        assert!(!mesh.stored.lock().unwrap().contains_key(&next), "a checkpoint went under the key held");
    });
}

#[test]
fn a_periodic_instance_that_fetched_back_its_own_late_checkpoint_keeps_what_it_answered_since() {
    // Every change is due for a checkpoint (a period of 0): the actor's timer retries at once.
    let (_dir, exec, mesh) = counter(CheckpointPolicy::Periodic { every_ms: 0 });
    let bounded = |what: &str, cond: &dyn Fn() -> bool| {
        use std::time::{Duration, Instant};
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "waited 10 s until {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        let first = mesh.committed_now();
        // More checkpoints of unknown outcome than the instance keeps, then one that commits
        // with its answer lost (whoever takes them: the call or the timer).
        mesh.lose_next.store(true, Ordering::SeqCst);
        mesh.fail_unknown.store(stateful::UNSETTLED, Ordering::SeqCst);
        assert_eq!(call(&exec, "c", "1").await.unwrap(), "4", "periodic: answered before its checkpoint");
        bounded("the lost checkpoint committed", &|| mesh.committed.lock().unwrap().as_ref() != Some(&first));
        let landed = mesh.committed_now();
        assert_eq!(call(&exec, "c", "2").await.unwrap(), "6");
        // Refused as not built on it, the later checkpoints drop it from disk: it was past the
        // unsettled ones kept, and this hub has not applied its commit.
        bounded("the landed checkpoint left the disk", &|| !exec.pages().has_manifest(&landed));
        mesh.land();
        // Fetched back, and taken without going back to it: this state grew from it.
        let _ = call(&exec, "c", "0").await;
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "6", "what was answered since the landed one stays");
        assert!(mesh.fetches.load(Ordering::SeqCst) >= 1, "not fetched");
        bounded("a checkpoint built on the landed one commits", &|| {
            parse_checkpoint_key(mesh.committed.lock().unwrap().as_deref().unwrap()).unwrap().2
                > parse_checkpoint_key(&landed).unwrap().2
        });
    });
}

#[test]
fn a_periodic_instance_goes_back_to_a_committed_checkpoint_it_did_not_write() {
    let (_dir, exec, mesh) = counter(CheckpointPolicy::Periodic { every_ms: 0 });
    rt().block_on(async {
        assert_eq!(call(&exec, "c", "3").await.unwrap(), "3");
        let first = mesh.committed_now();
        let (_, epoch, sequence) = parse_checkpoint_key(&first).unwrap();
        // The next key of its epoch, written by someone else (an earlier run) and committed: a
        // sequence within what this instance took since, but not a state it grew from.
        let foreign = hubmesh_consensus::state::checkpoint_key("c", epoch, sequence + 1);
        mesh.copy_manifest(exec.pages(), &first, &foreign);
        let carried = mesh.stored.lock().unwrap()[&first].clone();
        mesh.stored.lock().unwrap().insert(foreign.clone(), carried);
        *mesh.committed.lock().unwrap() = Some(foreign);
        mesh.land();
        // Its checkpoint (past the key held) is refused; it goes back to the committed state.
        let e = call(&exec, "c", "5").await.unwrap_err();
        assert!(matches!(e, InvokeError::OutcomeUnknown(_)), "{e:?}");
        assert_eq!(call(&exec, "c", "0").await.unwrap(), "3", "the committed state, not one grown from another");
    });
}
