//! I10: after a fault takes a task's host away, the task answers again within the bound; the time
//! is split into detection (a hub marks the host down), placement (a newer epoch is committed) and
//! the first successful answer. Also the unavailability windows seen by the clients.

use serde::{Deserialize, Serialize};

use super::{CheckResult, Evidence};
use crate::history::{Event, Type};

/// One measured failover.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failover {
    pub task: String,
    pub fault: String,
    pub at_us: u64,
    /// From the fault to the first sample that shows the host down.
    pub detect_ms: Option<f64>,
    /// From the fault to the first sample that shows a newer epoch.
    pub place_ms: Option<f64>,
    /// From the fault to the first successful call of the task.
    pub first_ok_ms: Option<f64>,
    /// Whether the task moved (a newer epoch) rather than coming back on the healed host.
    pub moved: bool,
}

/// The failovers of a run: one per (fault that took a host away, task on that host).
pub fn failovers(events: &[Event], ev: &Evidence) -> Vec<Failover> {
    let mut out = Vec::new();
    for f in ev.faults.iter() {
        for (task, &(host, epoch)) in &f.hosts_before {
            if !f.hubs_taken_away().iter().any(|&h| ev.node_ids.get(h) == Some(&host)) {
                continue;
            }
            let since = |t: u64| (t.saturating_sub(f.start_us)) as f64 / 1e3;
            let detect =
                ev.samples.iter().find(|s| s.t_us >= f.start_us && s.down.contains(&host)).map(|s| since(s.t_us));
            let placed = ev
                .samples
                .iter()
                .find(|s| s.t_us >= f.start_us && s.tasks.get(task).is_some_and(|(_, e, _)| *e > epoch));
            let first_ok = events
                .iter()
                .find(|e| {
                    e.kind == Type::Ok && e.t_us >= f.start_us && e.task.as_deref() == Some(task) && e.error.is_none()
                })
                .map(|e| since(e.t_us));
            out.push(Failover {
                task: task.clone(),
                fault: f.fault.name().into(),
                at_us: f.start_us,
                detect_ms: detect,
                place_ms: placed.map(|s| since(s.t_us)),
                first_ok_ms: first_ok,
                moved: placed.is_some(),
            });
        }
    }
    out
}

pub fn bound(events: &[Event], ev: &Evidence) -> CheckResult {
    let mut r = CheckResult::new("I10", "failover within the bound");
    let list = failovers(events, ev);
    r.count("failovers", list.len() as u64);
    r.count("moved", list.iter().filter(|f| f.moved).count() as u64);
    for f in &list {
        match f.first_ok_ms {
            Some(ms) if ms > ev.failover_max_ms as f64 => r.violation(format!(
                "{}: after {} at {:.3}s the first answer took {:.0} ms (bound {} ms)",
                f.task,
                f.fault,
                f.at_us as f64 / 1e6,
                ms,
                ev.failover_max_ms
            )),
            Some(_) => {}
            None => {
                r.violation(format!("{}: no successful call after {} at {:.3}s", f.task, f.fault, f.at_us as f64 / 1e6))
            }
        }
    }
    r
}

/// Gaps between consecutive successful calls of a task longer than `min_ms`: (task, from_us, ms).
pub fn unavailability(events: &[Event], tasks: &[String], min_ms: f64) -> Vec<(String, u64, f64)> {
    let mut out = Vec::new();
    for task in tasks {
        let mut last: Option<u64> = None;
        for e in events.iter().filter(|e| e.kind == Type::Ok && e.task.as_deref() == Some(task)) {
            if let Some(l) = last {
                let ms = (e.t_us - l) as f64 / 1e3;
                if ms > min_ms {
                    out.push((task.clone(), l, ms));
                }
            }
            last = Some(e.t_us);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{evidence, H};
    use super::super::Verdict;
    use super::*;
    use crate::nemesis::Applied;
    use crate::scenario::FaultKind;

    fn kill_at(t_us: u64) -> Applied {
        Applied {
            hosts_before: [("c".to_string(), (10, 1))].into(),
            leader_before: Some(20),
            ..super::super::fixtures::fault(FaultKind::Kill, 0, t_us, 3_000_000)
        }
    }

    #[test]
    fn a_slow_or_missing_failover_is_false() {
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 1);
        let mut ev = evidence(Some(&[1, 2]), true);
        ev.node_ids = vec![10, 20, 30];
        ev.faults = vec![kill_at(h.t + 1)];
        let r = bound(&h.events, &ev);
        assert_eq!(r.verdict, Verdict::False, "no answer after the kill: {r:?}");
        h.t += 20_000_000; // 20 s later
        h.add_ok("c", 2, &[1, 2], 20, 2);
        let r = bound(&h.events, &ev);
        assert_eq!(r.verdict, Verdict::False, "over the 10 s bound: {r:?}");
        ev.failover_max_ms = 30_000;
        assert_eq!(bound(&h.events, &ev).verdict, Verdict::True);
    }
}
