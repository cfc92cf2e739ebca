//! I1–I4 over the counter (oplog) tasks: the final list against every acknowledged answer.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{CheckResult, Evidence};
use crate::history::{pair, Event, Op, Type};
use crate::scenario::FaultKind;
use crate::workload::prefix_hashes;

pub(super) fn ops_of<'a>(ops: &'a [Op<'a>], task: &'a str, f: &'a str) -> impl Iterator<Item = &'a Op<'a>> + 'a {
    ops.iter().filter(move |o| o.invoke.f == f && o.invoke.task.as_deref() == Some(task))
}

/// I1: every acknowledged append is in the final list; a call that failed definitely is not.
pub fn lost(events: &[Event], ev: &Evidence) -> CheckResult {
    let mut r = CheckResult::new("I1", "no lost acknowledged update");
    let ops = pair(events);
    for (task, list) in &ev.finals {
        let Some(list) = list else {
            r.unsure(format!("{task}: no final read succeeded"));
            continue;
        };
        let present: HashSet<u64> = list.iter().copied().collect();
        let mut acked = HashSet::new();
        for o in ops_of(&ops, task, "add") {
            let op = o.invoke.op.unwrap_or_default();
            match o.kind() {
                Type::Ok => {
                    acked.insert(op);
                }
                Type::Fail if present.contains(&op) => {
                    // Keyed retries reuse the op id: only a failure of an op never acked elsewhere counts.
                    let retried_ok =
                        ops_of(&ops, task, "add").any(|x| x.invoke.op == Some(op) && x.kind() != Type::Fail);
                    if !retried_ok {
                        r.count("failed_but_applied", 1);
                        r.violation(format!(
                            "{task}: op {op} failed definitely ({}) yet is in the final list",
                            o.done.and_then(|d| d.error.clone()).unwrap_or_default()
                        ));
                    }
                }
                _ => {}
            }
        }
        let lost: Vec<u64> = acked.iter().copied().filter(|op| !present.contains(op)).collect();
        r.count("acknowledged", acked.len() as u64);
        r.count("lost", lost.len() as u64);
        let unknown_applied = ops_of(&ops, task, "add")
            .filter(|o| o.kind() == Type::Info && present.contains(&o.invoke.op.unwrap_or_default()))
            .count();
        r.count("unknown_but_applied", unknown_applied as u64);
        if !lost.is_empty() {
            let mut lost = lost;
            lost.sort_unstable();
            let msg = format!(
                "{task}: {} acknowledged ops missing from the final list, e.g. {:?}",
                lost.len(),
                &lost[..lost.len().min(5)]
            );
            if ev.durable {
                r.violation(msg);
            } else {
                // Periodic mode loses up to a period by design (I7, `periodic::bounded_loss`, bounds it).
                r.count("lost_in_periodic_mode", lost.len() as u64);
            }
        }
    }
    r
}

/// I2: every answer's (length, prefix hash) is a prefix of the final list, and an append's own
/// id is at the position it reported; a mismatch is a fork (split brain) or a rollback. In periodic
/// mode an instance's last changes may be lost with it (I1 counts them, I7 bounds them): the
/// answers of an instance that a newer epoch replaced (or that a kill or restart of its hub ended:
/// restarted within its epoch, it restores its last checkpoint) then saw entries the final list
/// does not hold, which is a rollback, not a fork — unless an append's own op is in the final list
/// after all (elsewhere), which no rollback explains. Other answers must match. A stale
/// instance answering after a newer one is I5's (and I7's, when what it acknowledged is lost).
pub fn fork(events: &[Event], ev: &Evidence) -> CheckResult {
    let mut r = CheckResult::new("I2", "no forked or rolled-back history");
    for e in events.iter().filter(|e| e.kind == Type::Ok && !e.is_nemesis()) {
        if let Some(err) = &e.error {
            r.count("garbled_answers", 1);
            r.violation(format!("{} {} at {:.3}s: {err}", e.f, e.task.as_deref().unwrap_or("?"), e.t_us as f64 / 1e6));
        }
    }
    for (task, list) in &ev.finals {
        let Some(list) = list else {
            r.unsure(format!("{task}: no final read succeeded"));
            continue;
        };
        let hashes = prefix_hashes(list);
        let kept: HashSet<u64> = list.iter().copied().collect();
        let newest = events
            .iter()
            .filter(|e| e.kind == Type::Ok && e.task.as_deref() == Some(task))
            .filter_map(|e| e.epoch)
            .max();
        for e in events.iter().filter(|e| e.kind == Type::Ok && e.task.as_deref() == Some(task)) {
            let (Some(len), Some(hash)) = (e.len, e.hash) else { continue };
            r.count("answers_checked", 1);
            let at = format!("{} at {:.3}s from node {:?} epoch {:?}", e.f, e.t_us as f64 / 1e6, e.node, e.epoch);
            if len as usize > list.len() {
                if ev.durable {
                    r.violation(format!(
                        "{task}: {at} saw {len} entries, the final list has {} (rolled back)",
                        list.len()
                    ));
                } else {
                    r.count("rolled_back_in_periodic_mode", 1);
                }
                continue;
            }
            if hashes[len as usize] != hash {
                let ended = |f: &&crate::nemesis::Applied| {
                    matches!(f.fault, FaultKind::Kill | FaultKind::Restart)
                        && f.start_us >= e.t_us
                        && f.hubs.iter().any(|i| ev.node_ids.get(*i).copied() == e.node)
                };
                let replaced = e.epoch.is_some_and(|epoch| Some(epoch) < newest) || ev.faults.iter().any(|f| ended(&f));
                if !ev.durable && replaced && (e.f != "add" || e.op.is_some_and(|op| !kept.contains(&op))) {
                    r.count("rolled_back_in_periodic_mode", 1);
                    continue;
                }
                r.violation(format!(
                    "{task}: {at} answered a prefix of length {len} that is not the final list's (fork)"
                ));
                continue;
            }
            if e.f == "add" && len > 0 && e.op != Some(list[len as usize - 1]) {
                r.violation(format!(
                    "{task}: {at}: op {:?} reported position {len}, which holds op {}",
                    e.op,
                    list[len as usize - 1]
                ));
            }
        }
    }
    r
}

/// I3: with idempotency keys no op id is applied twice; without keys duplicates are counted, and
/// no entry may come from an op nobody sent.
pub fn exactly_once(events: &[Event], ev: &Evidence) -> CheckResult {
    let mut r = CheckResult::new("I3", "exactly-once with keys");
    let sent: HashSet<(String, u64)> = events
        .iter()
        .filter(|e| e.kind == Type::Invoke && e.f == "add")
        .filter_map(|e| Some((e.task.clone()?, e.op?)))
        .collect();
    for (task, list) in &ev.finals {
        let Some(list) = list else {
            r.unsure(format!("{task}: no final read succeeded"));
            continue;
        };
        let keyed = ev.keyed.get(task).copied().unwrap_or(false);
        let mut seen: HashMap<u64, u32> = HashMap::new();
        for &op in list {
            *seen.entry(op).or_default() += 1;
            if !sent.contains(&(task.clone(), op)) {
                r.violation(format!("{task}: op {op} is in the list but was never sent"));
            }
        }
        let dups: Vec<u64> = seen.iter().filter(|(_, &n)| n > 1).map(|(&op, _)| op).collect();
        if keyed {
            r.count("duplicates_with_keys", dups.len() as u64);
            if !dups.is_empty() {
                r.violation(format!("{task}: ops applied twice despite their key: {:?}", &dups[..dups.len().min(5)]));
            }
        } else {
            r.count("duplicates_without_keys", dups.len() as u64);
        }
    }
    r
}

/// I4: along the final list the epochs of the acknowledged appends never go down, and an epoch
/// belongs to one hub.
pub fn fencing(events: &[Event], ev: &Evidence) -> CheckResult {
    let mut r = CheckResult::new("I4", "epochs never go backwards");
    let mut owner: BTreeMap<(String, u64), u64> = BTreeMap::new();
    for e in events.iter().filter(|e| e.kind == Type::Ok) {
        let (Some(task), Some(epoch), Some(node)) = (&e.task, e.epoch, e.node) else { continue };
        if ev.echo.as_deref() == Some(task.as_str()) {
            continue; // stateless replicas share an epoch across hubs
        }
        match owner.insert((task.clone(), epoch), node) {
            Some(other) if other != node => {
                r.violation(format!("{task}: epoch {epoch} answered from node {other} and node {node}"))
            }
            _ => {}
        }
    }
    r.count("epochs", owner.len() as u64);
    for (task, list) in &ev.finals {
        let Some(list) = list else {
            r.unsure(format!("{task}: no final read succeeded"));
            continue;
        };
        // A keyed retry may be answered from the idempotency cache by a newer instance than the
        // one that applied it: only an op sent once tells which epoch applied it — and only
        // without a key, since a hub retries a keyed call itself (on the new host, after a
        // failover) and the cached answer carries the responder's epoch.
        let mut sends: HashMap<u64, u32> = HashMap::new();
        for e in events.iter().filter(|e| e.kind == Type::Invoke && e.f == "add" && e.task.as_deref() == Some(task)) {
            *sends.entry(e.op.unwrap_or_default()).or_default() += 1;
        }
        let epoch_of: HashMap<u64, u64> = events
            .iter()
            .filter(|e| e.kind == Type::Ok && e.f == "add" && e.task.as_deref() == Some(task) && !e.keyed)
            .filter_map(|e| Some((e.op?, e.epoch?)))
            .filter(|(op, _)| sends.get(op) == Some(&1))
            .collect();
        // An op the list holds twice (an unkeyed call a hub sent again after its first host died
        // having applied it) was applied by two instances: its answer dates only one of them.
        let mut copies: HashMap<u64, u32> = HashMap::new();
        for op in list {
            *copies.entry(*op).or_default() += 1;
        }
        let mut highest = (0, 0);
        for (pos, op) in list.iter().enumerate() {
            if copies.get(op).is_some_and(|n| *n > 1) {
                continue;
            }
            let Some(&e) = epoch_of.get(op) else { continue };
            if e < highest.0 {
                r.violation(format!(
                    "{task}: op {op} at position {} has epoch {e} after op at position {} with epoch {}",
                    pos + 1,
                    highest.1,
                    highest.0
                ));
            }
            if e > highest.0 {
                highest = (e, pos + 1);
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

    fn good() -> H {
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 1);
        h.add_ok("c", 2, &[1, 2], 10, 1);
        h.add_ok("c", 3, &[1, 2, 3], 20, 2);
        h.read_ok("c", &[1, 2, 3], 20, 2);
        h
    }

    #[test]
    fn a_clean_history_passes_every_counter_check() {
        let h = good();
        let ev = evidence(Some(&[1, 2, 3]), true);
        for r in [lost(&h.events, &ev), fork(&h.events, &ev), exactly_once(&h.events, &ev), fencing(&h.events, &ev)] {
            assert_eq!(r.verdict, Verdict::True, "{r:?}");
        }
    }

    #[test]
    fn a_lost_ack_is_false_and_a_missing_final_read_is_unknown() {
        let h = good();
        let r = lost(&h.events, &evidence(Some(&[1, 3]), true));
        assert_eq!(r.verdict, Verdict::False, "{r:?}");
        assert_eq!(r.counts["lost"], 1);
        assert_eq!(lost(&h.events, &evidence(None, true)).verdict, Verdict::Unknown);
    }

    #[test]
    fn a_definite_failure_that_took_effect_is_false() {
        let mut h = good();
        h.add("c", 4, Type::Fail);
        assert_eq!(lost(&h.events, &evidence(Some(&[1, 2, 3, 4]), true)).verdict, Verdict::False);
        // An unknown outcome may or may not show up.
        let mut h = good();
        h.add("c", 4, Type::Info);
        assert_eq!(lost(&h.events, &evidence(Some(&[1, 2, 3, 4]), true)).verdict, Verdict::True);
    }

    #[test]
    fn a_fork_or_rollback_is_false() {
        let h = good();
        // The final list lost its tail: the answers saw more than it holds.
        assert_eq!(fork(&h.events, &evidence(Some(&[1, 2]), true)).verdict, Verdict::False);
        // A different prefix: another instance appended 9 where 2 was acknowledged.
        assert_eq!(fork(&h.events, &evidence(Some(&[1, 9, 3]), true)).verdict, Verdict::False);
    }

    #[test]
    fn a_periodic_rollback_is_counted_and_a_fork_is_still_false() {
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 1);
        h.add_ok("c", 2, &[1, 2], 10, 1);
        // Op 3 was acknowledged and lost with epoch 1; epoch 2 restored [1, 2] and appended 4.
        h.add_ok("c", 3, &[1, 2, 3], 10, 1);
        h.read_ok("c", &[1, 2, 3], 10, 1);
        h.add_ok("c", 4, &[1, 2, 4], 20, 2);
        let periodic = Evidence { durable: false, ..evidence(Some(&[1, 2, 4]), true) };
        let r = fork(&h.events, &periodic);
        assert_eq!(r.verdict, Verdict::True, "{r:?}");
        assert_eq!(r.counts["rolled_back_in_periodic_mode"], 2);
        assert_eq!(fork(&h.events, &evidence(Some(&[1, 2, 4]), true)).verdict, Verdict::False, "durable: a loss");
        // Op 2 answered at position 2, but the final list holds it at 3: no rollback explains it.
        let periodic = Evidence { durable: false, ..evidence(Some(&[1, 9, 2, 4]), true) };
        assert_eq!(fork(&h.events, &periodic).verdict, Verdict::False);
        // The newest epoch's answers must match the final list: nothing replaced it ...
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 1);
        h.read_ok("c", &[1, 7], 10, 1);
        let mut periodic = Evidence { durable: false, ..evidence(Some(&[1, 2]), true) };
        assert_eq!(fork(&h.events, &periodic).verdict, Verdict::False);
        // ... unless a kill of its hub came after: restarted in its epoch, it rolled back.
        periodic.node_ids = vec![10];
        periodic.faults = vec![super::super::fixtures::kill_at(1_000_000)];
        assert_eq!(fork(&h.events, &periodic).verdict, Verdict::True);
    }

    #[test]
    fn duplicates_are_false_with_keys_and_counted_without() {
        let h = good();
        let r = exactly_once(&h.events, &evidence(Some(&[1, 2, 2, 3]), true));
        assert_eq!(r.verdict, Verdict::False, "{r:?}");
        let r = exactly_once(&h.events, &evidence(Some(&[1, 2, 2, 3]), false));
        assert_eq!(r.verdict, Verdict::True);
        assert_eq!(r.counts["duplicates_without_keys"], 1);
        let r = exactly_once(&h.events, &evidence(Some(&[1, 2, 3, 77]), false));
        assert_eq!(r.verdict, Verdict::False, "an op nobody sent: {r:?}");
    }

    #[test]
    fn a_retry_answered_from_the_cache_by_a_newer_epoch_is_not_a_violation() {
        let mut h = H::default();
        // Op 1 is applied by epoch 1 but its answer is lost; epoch 1 applies op 2; after a
        // failover the retry of op 1 is answered from the idempotency cache by epoch 2.
        h.add("c", 1, Type::Info);
        h.add_ok("c", 2, &[1, 2], 10, 1);
        h.add_ok("c", 1, &[1], 20, 2);
        let r = fencing(&h.events, &evidence(Some(&[1, 2]), true));
        assert_eq!(r.verdict, Verdict::True, "{r:?}");
    }

    #[test]
    fn an_op_applied_twice_is_not_dated_by_its_one_answer() {
        let mut h = H::default();
        // Unkeyed op 1: epoch 1 applied it and died before answering; the hub sent it again to
        // epoch 2, which applied it a second time and answered. Epoch 1 had applied op 2 too.
        h.add_ok("c", 2, &[1, 2], 10, 1);
        h.add_ok("c", 1, &[1, 2, 1], 20, 2);
        let r = fencing(&h.events, &evidence(Some(&[1, 2, 1]), false));
        assert_eq!(r.verdict, Verdict::True, "{r:?}");
        // Sent once and held once, the same answer would be a violation.
        let r = fencing(&h.events, &evidence(Some(&[1, 2]), false));
        assert_eq!(r.verdict, Verdict::False, "{r:?}");
    }

    #[test]
    fn a_keyed_call_retried_by_the_hub_is_not_dated_by_its_answer() {
        let mut h = H::default();
        // Keyed op 1, sent once: epoch 1 applied it, then epoch 1 applied op 2; the hub retried
        // op 1 on epoch 2 after the failover, which answered from the idempotency cache.
        h.add_ok("c", 2, &[1, 2], 10, 1);
        h.add_ok("c", 1, &[1], 20, 2);
        for e in h.events.iter_mut().filter(|e| e.op == Some(1)) {
            e.keyed = true;
        }
        let r = fencing(&h.events, &evidence(Some(&[1, 2]), true));
        assert_eq!(r.verdict, Verdict::True, "{r:?}");
    }

    #[test]
    fn epochs_going_backwards_or_shared_are_false() {
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 2);
        h.add_ok("c", 2, &[1, 2], 20, 1);
        let r = fencing(&h.events, &evidence(Some(&[1, 2]), true));
        assert_eq!(r.verdict, Verdict::False, "{r:?}");
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 1);
        h.add_ok("c", 2, &[1, 2], 20, 1);
        assert_eq!(fencing(&h.events, &evidence(Some(&[1, 2]), true)).verdict, Verdict::False);
    }
}
