//! I14: a fault that touches neither a task's host nor the leader costs that task nothing. Every
//! window in which callers waited for a task — from the first call made since it last answered to
//! its next successful answer (a task nobody calls is not unavailable) — that is longer than the
//! scenario's bound (`untouched_gap_max`, else `failover_max`) must overlap a fault that touched
//! the task — one whose hubs include the task's host or the leader when it began — or the
//! recovery after it (the failover bound past its heal). Calls sent into a hub that a fault
//! touched at the time, or touched before the call ended, do not open a window (the caller's own
//! hub was faulted, not the task — whether the call went in just before the fault or just after
//! is a race of a few milliseconds), and
//! windows end at the final heal, when the workload stops. A fault whose leader or task host the
//! nemesis could not read touches every task (counted as `unattributed`). Per task, not per
//! caller: a window closes when any caller gets an answer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{CheckResult, Evidence};
use crate::history::{Event, Type};

/// One window without a successful call of a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Window {
    pub task: String,
    pub from_us: u64,
    pub ms: f64,
    /// The fault that touched the task during the window, if one did.
    pub touched_by: Option<String>,
}

/// The tasks the run watched: counters, the echo task, and every task a fault recorded.
fn tasks(ev: &Evidence) -> Vec<String> {
    let mut all: Vec<String> = ev.finals.keys().cloned().chain(ev.echo.clone()).collect();
    for f in &ev.faults {
        all.extend(f.hosts_before.keys().cloned());
    }
    all.sort();
    all.dedup();
    all
}

/// Per task, the windows in which callers waited: from the first call made since the task last
/// answered successfully to its next successful answer (or the final heal, `end_us`), when longer
/// than `min_ms`: (task, from_us, ms). Calls for which `skip` says yes (sent into a faulted hub)
/// open no window.
pub fn waits(
    events: &[Event],
    tasks: &[String],
    min_ms: f64,
    end_us: u64,
    skip: impl Fn(&Event) -> bool,
) -> Vec<(String, u64, f64)> {
    let mut out = Vec::new();
    let mut close = |task: &str, from: u64, to: u64| {
        let ms = to.min(end_us).saturating_sub(from) as f64 / 1e3;
        if ms > min_ms {
            out.push((task.to_owned(), from, ms));
        }
    };
    for task in tasks {
        let mut since: Option<u64> = None;
        for e in events.iter().filter(|e| e.task.as_deref() == Some(task)) {
            match e.kind {
                Type::Invoke if !skip(e) => {
                    since.get_or_insert(e.t_us);
                }
                Type::Ok if e.error.is_none() => {
                    if let Some(from) = since.take() {
                        close(task, from, e.t_us);
                    }
                }
                _ => {}
            }
        }
        if let Some(from) = since {
            close(task, from, end_us);
        }
    }
    out
}

/// When the checks stop looking: the final heal (the workload stops there), or the end of the
/// history for evidence that has none.
fn end_of_workload(events: &[Event], ev: &Evidence) -> u64 {
    if ev.healed_at_us > 0 {
        ev.healed_at_us
    } else {
        events.last().map_or(0, |e| e.t_us)
    }
}

/// The bound of I14 in milliseconds (evidence from before I14 has none: the failover bound).
fn bound_ms(ev: &Evidence) -> u64 {
    ev.untouched_gap_max_ms.unwrap_or(ev.failover_max_ms)
}

/// When each call ended, by (client, sent at): its client's next event (a client makes one call
/// at a time; one that timed out becomes a new client).
fn call_ends(events: &[Event]) -> std::collections::HashMap<(i64, u64), u64> {
    let mut open: std::collections::HashMap<i64, u64> = std::collections::HashMap::new();
    let mut ends = std::collections::HashMap::new();
    for e in events.iter().filter(|e| e.task.is_some()) {
        if let Some(sent) = open.remove(&e.process) {
            ends.insert((e.process, sent), e.t_us);
        }
        if e.kind == Type::Invoke {
            open.insert(e.process, e.t_us);
        }
    }
    ends
}

/// Every window longer than `min_ms`, with the fault (if any) that touched its task meanwhile.
pub fn windows(events: &[Event], ev: &Evidence, min_ms: f64) -> Vec<Window> {
    let grace_us = ev.failover_max_ms * 1000;
    let ends = call_ends(events);
    // A fault on the call's hub that began before the call ended, and had not long healed when
    // it was sent.
    let during = |f: &crate::nemesis::Applied, e: &Event| {
        let end = ends.get(&(e.process, e.t_us)).copied().unwrap_or(e.t_us);
        f.start_us <= end && e.t_us < f.end_us.max(f.start_us) + grace_us
    };
    let into_faulted_hub =
        |e: &Event| ev.faults.iter().any(|f| during(f, e) && e.hubs.iter().any(|h| f.hubs.contains(h)));
    waits(events, &tasks(ev), min_ms, end_of_workload(events, ev), into_faulted_hub)
        .into_iter()
        .map(|(task, from_us, ms)| {
            let to_us = from_us + (ms * 1e3) as u64;
            let touched_by = ev
                .faults
                .iter()
                // A device fault touches no hub: it excuses nothing.
                .filter(|f| f.device.is_none() && f.start_us < to_us && from_us < f.end_us.max(f.start_us) + grace_us)
                .find(|f| {
                    let nodes: Vec<u64> = f.hubs.iter().filter_map(|h| ev.node_ids.get(*h).copied()).collect();
                    let host = f.hosts_before.get(&task).map(|(h, _)| *h);
                    match (f.leader_before, host) {
                        (Some(leader), Some(host)) => nodes.contains(&leader) || nodes.contains(&host),
                        _ => true,
                    }
                })
                .map(|f| format!("{} at {:.3}s ({})", f.fault.name(), f.start_us as f64 / 1e6, f.note));
            Window { task, from_us, ms, touched_by }
        })
        .collect()
}

pub fn untouched(events: &[Event], ev: &Evidence) -> CheckResult {
    let mut r = CheckResult::new("I14", "faults elsewhere cost a task nothing");
    let bound_ms = bound_ms(ev);
    let bound = bound_ms as f64;
    let tasks = tasks(ev);
    let unattributed = ev
        .faults
        .iter()
        .filter(|f| f.device.is_none())
        .filter(|f| f.leader_before.is_none() || tasks.iter().any(|t| !f.hosts_before.contains_key(t)))
        .count();
    r.count("unattributed", unattributed as u64);
    for w in windows(events, ev, bound) {
        match &w.touched_by {
            Some(_) => r.count("excused", 1),
            None => {
                r.count("violations", 1);
                r.violation(format!(
                    "{}: callers waited {:.0} ms for an answer from {:.3}s while no fault touched its host or the leader (bound {} ms)",
                    w.task,
                    w.ms,
                    w.from_us as f64 / 1e6,
                    bound_ms
                ));
            }
        }
    }
    r
}

/// Per task: (seconds of windows over `min_ms` while a fault touched it, seconds while none did).
pub fn split_by_touch(events: &[Event], ev: &Evidence, min_ms: f64) -> BTreeMap<String, (f64, f64)> {
    let mut out: BTreeMap<String, (f64, f64)> = tasks(ev).into_iter().map(|t| (t, (0.0, 0.0))).collect();
    for w in windows(events, ev, min_ms) {
        let e = out.entry(w.task).or_default();
        if w.touched_by.is_some() {
            e.0 += w.ms / 1e3;
        } else {
            e.1 += w.ms / 1e3;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{evidence, H};
    use super::super::Verdict;
    use super::*;
    use crate::history::Type;
    use crate::nemesis::Applied;
    use crate::scenario::{FaultKind, Target};

    /// A fault on hub `hub` (index) from `start_us` for 3 s; task `c` ran on node 10 (hub 0) and
    /// node 30 (hub 2) led.
    fn fault(hub: usize, start_us: u64, leader: Option<u64>) -> Applied {
        Applied {
            target: Target::One,
            hosts_before: [("c".to_string(), (10, 1))].into(),
            leader_before: leader,
            ..super::super::fixtures::fault(FaultKind::Flaky, hub, start_us, 3_000_000)
        }
    }

    /// An answer of `c`, then a call that fails and is retried with success 4 s later: callers
    /// wait 4 s from the returned time.
    fn four_second_gap(h: &mut H) -> u64 {
        h.add_ok("c", 1, &[1], 10, 1);
        let from = h.t;
        h.add("c", 2, Type::Fail);
        h.t += 4_000_000;
        h.add_ok("c", 2, &[1, 2], 10, 1);
        from
    }

    #[test]
    fn a_task_nobody_calls_is_not_unavailable() {
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 1);
        h.t += 4_000_000;
        h.add_ok("c", 2, &[1, 2], 10, 1);
        assert!(waits(&h.events, &["c".to_string()], 300.0, u64::MAX, |_| false).is_empty());
        assert_eq!(untouched(&h.events, &ev(vec![])).verdict, Verdict::True);
    }

    fn ev(faults: Vec<Applied>) -> Evidence {
        let mut ev = evidence(Some(&[1, 2]), true);
        ev.node_ids = vec![10, 20, 30];
        ev.untouched_gap_max_ms = Some(300);
        ev.failover_max_ms = 1_000;
        ev.faults = faults;
        ev
    }

    #[test]
    fn a_stall_during_a_fault_on_a_bystander_is_false() {
        let mut h = H::default();
        let from = four_second_gap(&mut h);
        // Hub 1 (node 20) is neither the host (10) nor the leader (30).
        let r = untouched(&h.events, &ev(vec![fault(1, from + 500_000, Some(30))]));
        assert_eq!(r.verdict, Verdict::False, "{r:?}");
        assert_eq!(r.counts.get("violations"), Some(&1));
    }

    #[test]
    fn calls_into_a_faulted_hub_and_the_idle_end_of_a_run_open_no_window() {
        let mut h = H::default();
        h.t = 10_000_000;
        let from = four_second_gap(&mut h);
        // The failed call went into hub 1 (node 20), which a fault touched then.
        let failed = h.events.iter().position(|e| e.kind == Type::Invoke && e.t_us > from).unwrap();
        h.events[failed].hubs = vec![1];
        let e = ev(vec![fault(1, from - 500_000, Some(30))]);
        assert_eq!(untouched(&h.events, &e).verdict, Verdict::True, "the caller's hub was faulted, not the task");
        // The same call, sent just before the fault began on its hub (it ended 1 ms after it was sent).
        let e = ev(vec![fault(1, h.events[failed].t_us + 500, Some(30))]);
        assert_eq!(untouched(&h.events, &e).verdict, Verdict::True, "the fault met the call in its hub");
        // But not a fault on its hub that began after the call had ended.
        let ended = h.events[failed + 1].t_us;
        let e = ev(vec![fault(1, ended + 1, Some(30))]);
        assert_eq!(untouched(&h.events, &e).verdict, Verdict::False, "the call had failed before the fault");
        // A call that failed just before the final heal: the idle time after it is no window.
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 1);
        h.add("c", 2, Type::Fail);
        let mut e = ev(vec![]);
        e.healed_at_us = h.t + 100_000;
        h.t += 30_000_000;
        h.read_ok("c", &[1], 10, 1);
        assert_eq!(untouched(&h.events, &e).verdict, Verdict::True);
        // Unless the wait before the heal was itself too long.
        e.healed_at_us = h.t - 29_000_000;
        assert_eq!(untouched(&h.events, &e).verdict, Verdict::False);
    }

    #[test]
    fn a_stall_with_no_fault_at_all_is_false() {
        let mut h = H::default();
        four_second_gap(&mut h);
        assert_eq!(untouched(&h.events, &ev(vec![])).verdict, Verdict::False);
    }

    #[test]
    fn a_stall_while_the_host_or_the_leader_is_faulted_is_excused() {
        let mut h = H::default();
        let from = four_second_gap(&mut h);
        for (hub, why) in [(0, "the host"), (2, "the leader")] {
            let r = untouched(&h.events, &ev(vec![fault(hub, from + 500_000, Some(30))]));
            assert_eq!(r.verdict, Verdict::True, "a fault on {why}: {r:?}");
            assert_eq!(r.counts.get("excused"), Some(&1));
        }
        // Unknown leader: the fault may have touched it.
        let r = untouched(&h.events, &ev(vec![fault(1, from + 500_000, None)]));
        assert_eq!(r.verdict, Verdict::True, "{r:?}");
        assert_eq!(r.counts.get("unattributed"), Some(&1));
    }

    #[test]
    fn recovery_after_a_touching_fault_is_excused_but_not_forever() {
        let mut h = H::default();
        h.t = 10_000_000;
        h.add_ok("c", 1, &[1], 10, 1);
        // The host's fault heals here; a 3.5 s window follows, then a 2 s one.
        let heal_at = h.t;
        h.add("c", 2, Type::Fail);
        h.t += 3_500_000;
        h.add_ok("c", 2, &[1, 2], 10, 1);
        h.add("c", 3, Type::Fail);
        h.t += 2_000_000;
        h.add_ok("c", 3, &[1, 2, 3], 10, 1);
        let mut f = fault(0, heal_at - 3_000_000, Some(30));
        f.end_us = heal_at;
        let mut e = ev(vec![f]);
        // 1 s of grace after the heal does not reach the 2 s window 3.5 s later.
        let r = untouched(&h.events, &e);
        assert_eq!(r.verdict, Verdict::False, "{r:?}");
        e.failover_max_ms = 10_000;
        assert_eq!(untouched(&h.events, &e).verdict, Verdict::True);
        let split = split_by_touch(&h.events, &e, 300.0);
        assert!(split["c"].0 > 5.0 && split["c"].1 == 0.0, "{split:?}");
    }
}
