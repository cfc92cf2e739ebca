//! I5: at most one active instance per task, seen from the clients: once an answer from epoch e'
//! came back, no call made after that may be answered by an older epoch (a hub that was paused or
//! cut off past the lease must not answer with its stale state).

use std::collections::BTreeMap;

use super::{CheckResult, Evidence};
use crate::history::{pair, Event, Type};

/// (invoke time, completion time, epoch, node) of a successful call.
type Answered = (u64, u64, u64, Option<u64>);

pub fn stale_answers(events: &[Event], ev: &Evidence) -> CheckResult {
    let mut r = CheckResult::new("I5", "no answer from a stale instance");
    let ops = pair(events);
    // task → [(invoke time, completion time, epoch, node)]
    let mut by_task: BTreeMap<&str, Vec<Answered>> = BTreeMap::new();
    for o in &ops {
        let (Some(task), Some(done)) = (o.invoke.task.as_deref(), o.done) else { continue };
        if done.kind != Type::Ok || ev.echo.as_deref() == Some(task) {
            continue;
        }
        if let Some(epoch) = done.epoch {
            by_task.entry(task).or_default().push((o.invoke.t_us, done.t_us, epoch, done.node));
        }
    }
    for (task, mut list) in by_task {
        r.count("answers_checked", list.len() as u64);
        // Highest epoch seen by each completion time.
        let mut done: Vec<(u64, u64)> = list.iter().map(|x| (x.1, x.2)).collect();
        done.sort_unstable();
        let mut best = Vec::with_capacity(done.len());
        let mut hi = 0;
        for &(t, e) in &done {
            hi = hi.max(e);
            best.push((t, hi));
        }
        list.sort_unstable();
        for (invoked, completed, epoch, node) in list {
            // Completions strictly before this call was made.
            let n = best.partition_point(|(t, _)| *t < invoked);
            if n == 0 {
                continue;
            }
            let newest = best[n - 1].1;
            if epoch < newest {
                r.violation(format!(
                    "{task}: a call made at {:.3}s was answered at {:.3}s by epoch {epoch} (node {node:?}), after epoch {newest} had answered",
                    invoked as f64 / 1e6,
                    completed as f64 / 1e6
                ));
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{evidence, H};
    use super::super::Verdict;
    use super::*;

    #[test]
    fn an_old_epoch_answering_after_a_newer_one_is_false() {
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 1);
        h.add_ok("c", 2, &[1, 2], 20, 2);
        assert_eq!(stale_answers(&h.events, &evidence(None, true)).verdict, Verdict::True);
        h.read_ok("c", &[1], 10, 1);
        let r = stale_answers(&h.events, &evidence(None, true));
        assert_eq!(r.verdict, Verdict::False, "{r:?}");
    }

    #[test]
    fn overlapping_calls_may_see_either_epoch() {
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 1);
        // Two calls in flight at once: the older epoch's answer may arrive later.
        let mut a = h.events.clone();
        let mut slow = Event::new(100, Type::Invoke, "read");
        slow.task = Some("c".into());
        slow.t_us = 5_000;
        a.push(slow.clone());
        let mut fast = Event::new(101, Type::Invoke, "read");
        fast.task = Some("c".into());
        fast.t_us = 5_100;
        a.push(fast.clone());
        fast.kind = Type::Ok;
        fast.t_us = 6_000;
        fast.epoch = Some(2);
        a.push(fast);
        slow.kind = Type::Ok;
        slow.t_us = 7_000;
        slow.epoch = Some(1);
        a.push(slow);
        assert_eq!(stale_answers(&a, &evidence(None, true)).verdict, Verdict::True);
    }
}
