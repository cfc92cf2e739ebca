//! How a stateful actor gets back to a state it may answer from: after a trap (rebuilt from the
//! base image), and after a checkpoint that could not be committed (back to the committed one,
//! which the mesh may know to be newer than this instance does); and when it may answer at all
//! (replaced, broken, or without the lease its answers need). Also what a start finds in the
//! local page log: the newest checkpoint that can restore, and the keys an earlier run wrote.

use std::sync::Arc;

use hubmesh_consensus::state::{checkpoint_key, parse_checkpoint_key, CheckpointPolicy};
use hubmesh_consensus::Epoch;
use hubmesh_storage::{Hash, PageLog};

use super::Actor;
use crate::checkpoint::{AnswerCache, Manifest};
use crate::executor::error::CheckpointFailed;
use crate::executor::image::MemoryImage;
use crate::executor::instance::Instance;
use crate::executor::{Answer, InvokeError};

/// Who hears a stateful call's answer, as far as [`Actor::invoke_for`] cares.
#[derive(Debug, Clone, Copy)]
pub(super) enum Caller {
    /// Nobody: the call was carried here in a checkpoint or a migration, or its caller left.
    Gone,
    /// A caller; `recorded`: the call waited in the backlog, which checkpoints record.
    Waits { recorded: bool },
}

/// Whether a call ran before its answer was withheld.
#[derive(Debug, Clone, Copy)]
enum Ran {
    Yes,
    No { recorded: bool },
}

impl Actor {
    /// Takes the mesh's committed checkpoint as this instance's own when it is newer and of this
    /// epoch (one of its own, whose commit landed late); says whether it did. Not in the local page
    /// log any more (past the unsettled ones kept), it is fetched from the hubs that store it:
    /// else every later checkpoint would be refused as not built on it, until the task restarted.
    pub(super) fn catch_up_committed_key(&mut self) -> bool {
        let Some(sink) = self.sink.clone() else { return false };
        let Some(key) = sink.committed_key(&self.cfg.name) else { return false };
        let Some((_, epoch, sequence)) = parse_checkpoint_key(&key) else { return false };
        let mine = self.committed_key.as_deref().and_then(parse_checkpoint_key).map(|(_, e, s)| (e, s));
        if epoch != Epoch(self.cfg.epoch) || mine.is_some_and(|m| m >= (epoch, sequence)) {
            return false;
        }
        // The committed contents, not only the key: a restart may have reused the key for another
        // state of its own here.
        let here = match sink.committed_hash(&self.cfg.name, &key) {
            Some(hash) => self.pages.read_manifest(&key).ok().flatten().is_some_and(|m| Hash::of(&m) == hash),
            None => self.pages.has_manifest(&key),
        };
        if !here && !sink.fetch_committed(&self.cfg.name, &key) {
            return false;
        }
        // Checkpoints built on the one before can never commit now.
        self.unsettled.retain(|k| parse_checkpoint_key(k).is_some_and(|(_, e, s)| (e, s) >= (epoch, sequence)));
        tracing::warn!(task = %self.cfg.name, from = ?self.committed_key, to = %key, "this instance was behind the committed checkpoint");
        self.committed_key = Some(key);
        self.sequence = self.sequence.max(sequence);
        true
    }

    /// The sequence of this instance's next checkpoint (or migration's final state): the next
    /// one whose key the local page log does not hold. A key is written once, as the manifest
    /// under it may be committed; a start moves past the keys an earlier run wrote already, so
    /// this only guards.
    pub(super) fn next_sequence(&self) -> u64 {
        let mut sequence = self.sequence + 1;
        while self.pages.has_manifest(&checkpoint_key(&self.cfg.name, Epoch(self.cfg.epoch), sequence)) {
            tracing::error!(task = %self.cfg.name, sequence, "a checkpoint key of this instance was used already");
            sequence += 1;
        }
        sequence
    }

    /// The answer to a call whose change went when a failed checkpoint took this instance back
    /// to the committed state (`adopted`: a newer one it caught up to). That state may hold an
    /// earlier run of the call under its key, whose commit landed late: then it is committed, and
    /// this is its answer. Or it may carry the call in its pending list, which a host that
    /// restores it runs: then its outcome is unknown, as it is when the failed checkpoint may
    /// commit yet, and while a checkpoint of this instance may have landed that this hub has not
    /// applied (`unsettled`: it may carry the call too).
    pub(super) fn undone(&self, key: Option<&str>, e: &CheckpointFailed, adopted: bool) -> Result<Answer, InvokeError> {
        if let Some(refusal) = self.refused() {
            return Err(refusal);
        }
        if let Some(answer) = key.and_then(|k| self.answers.get(k)) {
            return Ok(answer.clone());
        }
        Err(if e.may_have_committed {
            InvokeError::OutcomeUnknown(format!("the state change may yet be committed: {e}"))
        } else if adopted || !self.unsettled.is_empty() {
            InvokeError::OutcomeUnknown(format!(
                "the state change was undone, but a committed checkpoint may carry the call to run later: {e}"
            ))
        } else {
            InvokeError::Unavailable(format!("the state change could not be committed and was undone: {e}"))
        })
    }

    /// Whether this state grew from the committed checkpoint without a revert since: one this
    /// instance wrote, whose commit it was told had failed, and that the mesh committed after all
    /// with the same contents (kept here as unsettled, or fetched back; not a key an earlier run
    /// wrote). It then needs no revert: the next checkpoint builds on it.
    pub(super) fn descends_from_committed(&self) -> bool {
        let (Some(key), Some(sink)) = (self.committed_key.as_deref(), self.sink.as_ref()) else { return false };
        let committed = sink.committed_hash(&self.cfg.name, key);
        self.grown.iter().any(|(k, hash)| k == key && committed == Some(*hash))
    }

    /// Marks this instance replaced if `e` says a newer epoch of the task exists: it then answers
    /// nothing more — neither the call whose checkpoint said so, nor the calls queued behind it,
    /// nor later ones — until the hub stops it. Whether it did.
    pub(super) fn break_if_replaced(&mut self, e: &CheckpointFailed) -> bool {
        if e.replaced {
            tracing::warn!(task = %self.cfg.name, epoch = self.cfg.epoch, "this instance was replaced: it answers no more");
            let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
            status.replaced = true;
            status.broken = Some("this instance was replaced by a newer epoch of the task".into());
        }
        e.replaced
    }

    /// Why this instance refuses every call, if it does: broken (`unavailable`), or replaced —
    /// then `outcome_unknown`, because a call queued here may be in the pending list of a
    /// checkpoint the newer epoch restored, and run there.
    pub(super) fn refused(&self) -> Option<InvokeError> {
        let status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match (&status.broken, status.replaced) {
            (Some(reason), true) => Some(InvokeError::OutcomeUnknown(format!("{reason}; it may run there"))),
            (Some(reason), false) => Some(InvokeError::Unavailable(reason.clone())),
            (None, _) => None,
        }
    }

    /// [`Self::invoke`], answered to a caller who waits only while this hub may give the answer
    /// ([`CheckpointSink::may_answer`](crate::executor::CheckpointSink::may_answer)): before the
    /// call runs, and again after it and its checkpoint ran. The router checked the lease when it
    /// queued the call, but a call can wait here behind a slow checkpoint for longer than a lease,
    /// while the mesh re-places the task. A call nobody waits for (one a checkpoint or a migration
    /// carried here, or whose caller left) runs regardless: its answer goes at most to the answer
    /// cache, which a retry reads through this same check.
    pub(super) fn invoke_for(
        &mut self,
        input: Vec<u8>,
        key: Option<String>,
        caller: Caller,
    ) -> Result<Answer, InvokeError> {
        let Caller::Waits { recorded } = caller else { return self.invoke(input, key) };
        // A retry of a call that ran here under its key is not refused as not run.
        let ran = match key.as_deref().is_some_and(|k| self.answers.get(k).is_some()) {
            true => Ran::Yes,
            false => Ran::No { recorded },
        };
        if let Some(refusal) = self.may_not_answer(ran) {
            return Err(refusal);
        }
        let answer = self.invoke(input, key)?;
        match self.may_not_answer(Ran::Yes) {
            Some(withheld) => Err(withheld),
            None => Ok(answer),
        }
    }

    /// Why this instance may not answer a caller now, if it may not. A durable answer needs no
    /// such check: its commit is refused to a replaced epoch.
    fn may_not_answer(&self, ran: Ran) -> Option<InvokeError> {
        if self.cfg.checkpoint == CheckpointPolicy::Durable {
            return None;
        }
        let sink = self.sink.as_ref()?;
        if sink.may_answer(&self.cfg.name, self.cfg.epoch) {
            return None;
        }
        metrics::counter!("hubmesh_answers_withheld_total").increment(1);
        tracing::warn!(task = %self.cfg.name, epoch = self.cfg.epoch, ?ran, "an answer withheld: this hub has no lease on the task's instance, or the mesh placed it elsewhere");
        let why = "this hub may not answer for the task now (it has no lease, or the mesh placed the task elsewhere)";
        Some(match ran {
            Ran::Yes => InvokeError::OutcomeUnknown(format!(
                "{why}; the call ran here, and counts only if this instance goes on"
            )),
            // A call that waited in the backlog may be in the pending list of a checkpoint that a
            // newer epoch restores, or of a migration's final state, and run there.
            Ran::No { recorded: true } => InvokeError::OutcomeUnknown(format!(
                "{why}; the call did not run here, but may run on the task's next host"
            )),
            Ran::No { recorded: false } => InvokeError::Unavailable(format!("{why}; the call did not run")),
        })
    }

    /// [`Self::revert_to_committed`]; an instance that cannot is marked broken (it answers
    /// nothing more from a state that may not be the committed one).
    pub(super) fn revert_or_break(&mut self) {
        if let Err(e) = self.revert_to_committed() {
            tracing::error!(task = %self.cfg.name, error = %e, "could not return to the committed state");
            self.status.lock().unwrap_or_else(|p| p.into_inner()).broken =
                Some(format!("the committed state could not be restored: {e}"));
        }
    }

    /// Rebuilds the instance from the last committed checkpoint (or fresh, if none).
    pub(super) fn revert_to_committed(&mut self) -> Result<(), String> {
        self.grown.clear();
        let migrating = self.image.migrating();
        self.revert_image()?;
        if migrating {
            // The pages a migration sent may hold what was just undone: send every page again.
            self.image.begin_migration(false);
        }
        Ok(())
    }

    fn revert_image(&mut self) -> Result<(), String> {
        let name: Arc<str> = self.cfg.name.as_str().into();
        let Some(key) = self.committed_key.clone() else {
            let mut inst = Instance::new(&self.module, name, self.cfg.limits, true).map_err(|e| e.to_string())?;
            self.image = MemoryImage::capture(&mut inst);
            self.inst = inst;
            self.answers = AnswerCache::default();
            self.invocations = 0;
            return Ok(());
        };
        let bytes = self
            .pages
            .read_manifest(&key)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("checkpoint {key} is gone"))?;
        let m = Manifest::decode(&bytes).map_err(|e| e.to_string())?;
        let image = MemoryImage::restore(&m, &self.pages, self.cfg.limits.memory_bytes)?;
        let mut inst = Instance::new(&self.module, name, self.cfg.limits, false).map_err(|e| e.to_string())?;
        image.apply_to(&mut inst).map_err(|e| e.to_string())?;
        let mut answers = AnswerCache::default();
        for (k, a) in m.answers {
            answers.insert(k, a);
        }
        self.inst = inst;
        self.image = image;
        self.answers = answers;
        self.invocations = m.invocations;
        Ok(())
    }

    /// Replaces the instance with a fresh one carrying the image (the state before the failed
    /// call).
    pub(super) fn rollback(&mut self) {
        let fresh = Instance::new(&self.module, self.cfg.name.as_str().into(), self.cfg.limits, false)
            .map_err(InvokeError::from)
            .and_then(|mut inst| self.image.apply_to(&mut inst).map(|()| inst));
        match fresh {
            Ok(inst) => self.inst = inst,
            Err(e) => {
                tracing::error!(task = %self.cfg.name, error = %e, "could not rebuild the instance");
                self.status.lock().unwrap_or_else(|p| p.into_inner()).broken =
                    Some(format!("the instance could not be rebuilt: {e}"));
            }
        }
    }
}

/// The newest checkpoint of `task` in the local page log that can restore (has all its pages).
/// Passing over a newer one that lost pages rolls the task back, so that is logged as an error.
pub(super) fn newest_local(pages: &PageLog, task: &str) -> Option<String> {
    let mut keys: Vec<_> = pages
        .manifest_keys()
        .into_iter()
        .filter_map(|k| parse_checkpoint_key(&k).filter(|(t, ..)| *t == task).map(|(_, e, s)| (e, s, k.clone())))
        .collect();
    keys.sort();
    while let Some((.., k)) = keys.pop() {
        if pages.is_complete(&k) {
            return Some(k);
        }
        tracing::error!(%task, checkpoint = %k, "a local checkpoint lost pages; restoring an older one");
    }
    None
}

/// Keys of the checkpoints of `task` at `epoch` in the local page log past `sequence`, oldest
/// first: written by an earlier run of this instance before it stopped.
pub(super) fn written_after(pages: &PageLog, task: &str, epoch: Epoch, sequence: u64) -> Vec<String> {
    let mut keys: Vec<(u64, String)> = pages
        .manifest_keys()
        .into_iter()
        .filter_map(|k| match parse_checkpoint_key(&k) {
            Some((t, e, s)) if t == task && e == epoch && s > sequence => Some((s, k.clone())),
            _ => None,
        })
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, k)| k).collect()
}
