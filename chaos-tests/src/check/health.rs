//! I6 (checkpoints at quiescence), I11 (liveness after the final heal) and I13 (the run was not
//! vacuous: every operation kind succeeded, every fault really happened, failovers were seen).

use super::{CheckResult, Evidence};
use crate::history::{Event, Type};

/// I6: at quiescence every counter task has a committed checkpoint on as many hubs as it wants.
pub fn checkpoints(ev: &Evidence) -> CheckResult {
    let mut r = CheckResult::new("I6", "committed checkpoints kept");
    for (task, a) in &ev.checkpoints {
        r.count("tasks", 1);
        match a.sequence {
            None => r.violation(format!("{task}: no committed checkpoint at the end")),
            Some(_) if a.stored_on < a.wanted => {
                r.violation(format!("{task}: the committed checkpoint is on {} hubs, {} wanted", a.stored_on, a.wanted))
            }
            Some(_) => {}
        }
    }
    if ev.checkpoints.is_empty() && !ev.finals.is_empty() {
        r.unsure("no checkpoint audit was taken".into());
    }
    r
}

/// I11: after the final heal the mesh settled (one leader, full voters, every task running, all
/// hubs agree) within the bound.
pub fn liveness(ev: &Evidence) -> CheckResult {
    let mut r = CheckResult::new("I11", "liveness after heal");
    match ev.liveness.reached_after_ms {
        Some(ms) => r.count("settled_after_ms", ms),
        None => {
            if ev.liveness.problems.is_empty() {
                r.violation("the mesh did not settle after the final heal".into());
            }
            for p in &ev.liveness.problems {
                r.violation(p.clone());
            }
        }
    }
    r
}

/// I13: a run that proves nothing says so (unknown) instead of passing.
pub fn not_vacuous(events: &[Event], ev: &Evidence) -> CheckResult {
    let mut r = CheckResult::new("I13", "not vacuous");
    let mut kinds = vec!["read"];
    if !ev.finals.is_empty() {
        kinds.push("add");
    }
    if ev.echo.is_some() {
        kinds.push("echo");
    }
    for f in kinds {
        let ok = events.iter().filter(|e| e.kind == Type::Ok && e.f == f && e.error.is_none()).count();
        r.count(&format!("{f}_ok"), ok as u64);
        if ok == 0 && !(f == "read" && ev.finals.is_empty()) {
            r.unsure(format!("no `{f}` succeeded"));
        }
    }
    for (name, fired) in &ev.faults_fired {
        r.count(&format!("fired_{name}"), *fired);
        if *fired == 0 {
            r.unsure(format!("the in-process fault {name} was armed but never fired"));
        }
    }
    r.count("crashes", events.iter().filter(|e| e.is_nemesis() && e.f == "crash").count() as u64);
    r.count("faults_planned", ev.planned_faults as u64);
    r.count("faults_applied", ev.faults.len() as u64);
    if ev.faults.len() < ev.planned_faults {
        r.unsure(format!("{} of {} planned faults were applied", ev.faults.len(), ev.planned_faults));
    }
    for f in ev.faults.iter().filter(|f| !f.aimed) {
        r.unsure(format!(
            "{} aimed at the {:?} landed on n{} at random (the mesh could not be read) at {:.3}s",
            f.fault.name(),
            f.target,
            f.hub + 1,
            f.start_us as f64 / 1e6
        ));
    }
    for f in ev.faults.iter().filter(|f| !f.effective) {
        r.unsure(format!(
            "{} on n{} at {:.3}s had no effect (no packet dropped)",
            f.fault.name(),
            f.hub + 1,
            f.start_us as f64 / 1e6
        ));
    }
    // One failover per (fault that took a host away, task on it): the faults are its distinct starts.
    let failovers = super::failover::failovers(events, ev);
    let host_faults = failovers.iter().map(|f| f.at_us).collect::<std::collections::BTreeSet<_>>().len();
    let moved = failovers.iter().filter(|f| f.moved).count();
    r.count("host_faults", host_faults as u64);
    r.count("failovers_seen", moved as u64);
    if host_faults > 0 && moved == 0 {
        r.unsure("faults hit a task's host but no task ever moved".into());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{evidence, H};
    use super::super::{CheckpointAudit, Liveness, Verdict};
    use super::*;

    #[test]
    fn a_run_without_successes_or_with_missing_faults_is_unknown() {
        let h = H::default();
        let ev = evidence(Some(&[]), true);
        assert_eq!(not_vacuous(&h.events, &ev).verdict, Verdict::Unknown);
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 1);
        h.read_ok("c", &[1], 10, 1);
        let mut ev = evidence(Some(&[1]), true);
        assert_eq!(not_vacuous(&h.events, &ev).verdict, Verdict::True);
        ev.faults_fired.insert("drop-forward".into(), 0);
        assert_eq!(not_vacuous(&h.events, &ev).verdict, Verdict::Unknown, "an armed fault that never fired");
        ev.faults_fired.insert("drop-forward".into(), 3);
        assert_eq!(not_vacuous(&h.events, &ev).verdict, Verdict::True);
        ev.planned_faults = 1;
        assert_eq!(not_vacuous(&h.events, &ev).verdict, Verdict::Unknown);
    }

    #[test]
    fn a_fault_that_could_not_be_aimed_makes_the_run_unknown() {
        use crate::nemesis::Applied;
        use crate::scenario::{FaultKind, Target};
        let mut h = H::default();
        h.add_ok("c", 1, &[1], 10, 1);
        h.read_ok("c", &[1], 10, 1);
        let mut ev = evidence(Some(&[1]), true);
        let pause = |aimed| Applied {
            fault: FaultKind::PauseShort,
            target: Target::Holder,
            hub: 2,
            hubs: vec![2],
            start_us: 1_000_000,
            end_us: 2_000_000,
            hosts_before: Default::default(),
            leader_before: Some(1),
            effective: true,
            aimed,
            dropped: 0,
            killed: None,
            cut: false,
            device: None,
            note: String::new(),
        };
        ev.planned_faults = 1;
        ev.faults = vec![pause(true)];
        assert_eq!(not_vacuous(&h.events, &ev).verdict, Verdict::True);
        ev.faults = vec![pause(false)];
        let r = not_vacuous(&h.events, &ev);
        assert_eq!(r.verdict, Verdict::Unknown, "{r:?}");
    }

    #[test]
    fn an_unsettled_mesh_and_a_missing_checkpoint_are_false() {
        let mut ev = evidence(Some(&[]), true);
        ev.liveness = Liveness { reached_after_ms: None, problems: vec!["two leaders".into()] };
        assert_eq!(liveness(&ev).verdict, Verdict::False);
        ev.liveness.reached_after_ms = Some(800);
        assert_eq!(liveness(&ev).verdict, Verdict::True);
        ev.checkpoints.insert("c".into(), CheckpointAudit { sequence: Some(4), stored_on: 1, wanted: 2 });
        assert_eq!(checkpoints(&ev).verdict, Verdict::False);
        ev.checkpoints.insert("c".into(), CheckpointAudit { sequence: Some(4), stored_on: 2, wanted: 2 });
        assert_eq!(checkpoints(&ev).verdict, Verdict::True);
    }
}
