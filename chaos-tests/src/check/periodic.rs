//! I7 (periodic mode): a task checkpointed every period may lose what it acknowledged since its
//! last committed checkpoint, and no more. An update acknowledged at `t` is in a checkpoint taken
//! by `t + period` and committed a moment later; so an acknowledged update that is missing from
//! the final list must have been acknowledged within one period (plus `COMMIT_SLACK_US`) of the
//! fault that lost it — the first fault under way at or after its acknowledgement that touched the
//! task's host (any such fault when none did). And it must have been acknowledged before any newer
//! epoch of the task answered: an instance that goes on acknowledging after it was replaced (a
//! cut-off host answering at the heal) loses what it acknowledges. Durable mode loses nothing
//! (I1); this check has nothing to say there.

use std::collections::{BTreeMap, HashSet};

use super::counter::ops_of;
use super::{CheckResult, Evidence};
use crate::history::{pair, Event, Type};

/// Time from taking a checkpoint to its commit (push to the holders and a Raft entry) that I7
/// allows on top of the period.
pub const COMMIT_SLACK_US: u64 = 500_000;

/// I7: losses in periodic mode stay within one checkpoint period of a fault.
pub fn bounded_loss(events: &[Event], ev: &Evidence) -> CheckResult {
    let mut r = CheckResult::new("I7", "periodic mode loses at most one checkpoint period");
    let Some(period) = ev.checkpoint_every_us.filter(|_| !ev.durable) else {
        return r;
    };
    let bound = period + COMMIT_SLACK_US;
    let ops = pair(events);
    for (task, list) in &ev.finals {
        let Some(list) = list else {
            r.unsure(format!("{task}: no final read succeeded"));
            continue;
        };
        let present: HashSet<u64> = list.iter().copied().collect();
        // The latest acknowledgement of each op (a keyed retry may answer it twice), and its epoch.
        let mut acked: BTreeMap<u64, (u64, Option<u64>)> = BTreeMap::new();
        for o in ops_of(&ops, task, "add") {
            if let (Type::Ok, Some(done), Some(op)) = (o.kind(), o.done, o.invoke.op) {
                let t = acked.entry(op).or_default();
                *t = (*t).max((done.t_us, done.epoch));
            }
        }
        // When each epoch first answered a call of this task.
        let mut first_answer: BTreeMap<u64, u64> = BTreeMap::new();
        for o in ops.iter().filter(|o| o.invoke.task.as_deref() == Some(task.as_str())) {
            if let (Type::Ok, Some(done)) = (o.kind(), o.done) {
                if let Some(epoch) = done.epoch {
                    let t = first_answer.entry(epoch).or_insert(done.t_us);
                    *t = (*t).min(done.t_us);
                }
            }
        }
        for (op, (t_ack, epoch)) in acked.into_iter().filter(|(op, _)| !present.contains(op)) {
            r.count("lost", 1);
            let newer = epoch.and_then(|e| first_answer.range(e + 1..).map(|(e, t)| (*t, *e)).min());
            if let Some((at, newer)) = newer.filter(|(at, _)| *at < t_ack) {
                r.violation(format!(
                    "{task}: op {op} acknowledged at {:.3}s by epoch {} is lost, and epoch {newer} had answered at {:.3}s: a replaced instance acknowledged it",
                    t_ack as f64 / 1e6,
                    epoch.unwrap_or_default(),
                    at as f64 / 1e6
                ));
                continue;
            }
            // The first fault under way at or after the acknowledgement that touched the task's
            // host (any fault, when the nemesis could not tell where the task ran).
            let pending = || ev.faults.iter().filter(|f| f.end_us >= t_ack);
            let touched_host = |f: &&crate::nemesis::Applied| {
                f.hosts_before
                    .get(task)
                    .is_some_and(|(host, _)| f.hubs.iter().any(|i| ev.node_ids.get(*i) == Some(host)))
            };
            let fault = pending()
                .filter(touched_host)
                .min_by_key(|f| f.start_us)
                .or_else(|| pending().min_by_key(|f| f.start_us));
            match fault {
                None => r.violation(format!(
                    "{task}: op {op} acknowledged at {:.3}s is lost, and no fault came after it",
                    t_ack as f64 / 1e6
                )),
                Some(f) => {
                    let before = f.start_us.saturating_sub(t_ack);
                    if before > bound {
                        r.violation(format!(
                            "{task}: op {op} acknowledged at {:.3}s is lost, {} ms before the {} at {:.3}s (allowed: {} ms)",
                            t_ack as f64 / 1e6,
                            before / 1000,
                            f.fault.name(),
                            f.start_us as f64 / 1e6,
                            bound / 1000
                        ));
                    } else {
                        r.count("lost_within_a_period", 1);
                    }
                }
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{evidence, kill_at, H};
    use super::super::Verdict;
    use super::*;

    /// Ops 1..=3 acknowledged (at 2, 4 and 6 ms); the final list has only op 1.
    fn history() -> (H, Evidence) {
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 1);
        h.add_ok("c", 2, &[1, 2], 10, 1);
        h.add_ok("c", 3, &[1, 2, 3], 10, 1);
        let mut ev = evidence(Some(&[1]), false);
        ev.durable = false;
        ev.checkpoint_every_us = Some(200_000);
        (h, ev)
    }

    #[test]
    fn a_loss_within_a_period_before_the_fault_is_allowed() {
        let (h, mut ev) = history();
        ev.faults = vec![kill_at(300_000)];
        let r = bounded_loss(&h.events, &ev);
        assert_eq!(r.verdict, Verdict::True, "{r:?}");
        assert_eq!(r.counts["lost_within_a_period"], 2);
    }

    #[test]
    fn a_loss_acknowledged_after_a_newer_epoch_answered_is_false() {
        let (mut h, mut ev) = history();
        ev.faults = vec![kill_at(300_000)];
        // Epoch 2 answers (at 8 ms), then the replaced epoch 1 acknowledges op 4, which is lost.
        h.read_ok("c", &[1], 20, 2);
        h.add_ok("c", 4, &[1, 2, 3, 4], 10, 1);
        let r = bounded_loss(&h.events, &ev);
        assert_eq!(r.verdict, Verdict::False, "{r:?}");
        assert_eq!(r.examples.len(), 1, "{r:?}");
    }

    #[test]
    fn a_loss_older_than_a_period_or_without_a_fault_is_false() {
        let (h, mut ev) = history();
        ev.faults = vec![kill_at(5_000_000)];
        assert_eq!(bounded_loss(&h.events, &ev).verdict, Verdict::False, "lost 5 s before the kill");
        ev.faults = vec![];
        assert_eq!(bounded_loss(&h.events, &ev).verdict, Verdict::False, "lost without any fault");
        ev.durable = true;
        assert_eq!(bounded_loss(&h.events, &ev).verdict, Verdict::True, "durable mode is I1's");
    }
}
