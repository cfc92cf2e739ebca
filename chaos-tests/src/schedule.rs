//! The fault schedule: which fault, on which kind of target, when and for how long. Generated from
//! the scenario and the seed, saved as `schedule.json` so `hubmesh-chaos replay` repeats it.

use std::time::Duration;

use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::scenario::{FaultKind, Scenario, Target};

/// One planned fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// From the start of the fault phase.
    pub at_ms: u64,
    pub fault: FaultKind,
    pub target: Target,
    pub hold_ms: u64,
}

/// The planned faults of a run, in time order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub seed: u64,
    pub steps: Vec<Step>,
}

/// How long a fault of `kind` lasts: a short pause stays under node-down, the others use `hold`.
pub fn hold_for(kind: FaultKind, hold: Duration, node_down: Duration) -> Duration {
    match kind {
        FaultKind::PauseShort => node_down / 2,
        FaultKind::PauseLong => hold.max(node_down * 3),
        _ => hold,
    }
}

/// Plans the faults of `scenario`: its scripted steps, or every listed kind in a seeded random
/// order (repeated while the fault phase has room), each with a target allowed for it.
pub fn generate(scenario: &Scenario, seed: u64, rng: &mut impl Rng) -> Schedule {
    let node_down = scenario.node_down();
    let c = &scenario.chaos;
    if !scenario.steps.is_empty() {
        let mut steps: Vec<Step> = scenario
            .steps
            .iter()
            .map(|s| Step {
                at_ms: s.at.as_millis() as u64,
                fault: s.fault,
                target: s.target,
                hold_ms: s.hold.unwrap_or_else(|| hold_for(s.fault, c.hold, node_down)).as_millis() as u64,
            })
            .collect();
        steps.sort_by_key(|s| s.at_ms);
        return Schedule { seed, steps };
    }
    let mut steps = Vec::new();
    let mut at = Duration::ZERO;
    let mut round: Vec<FaultKind> = Vec::new();
    while !c.faults.is_empty() {
        if round.is_empty() {
            round = c.faults.clone();
            round.shuffle(rng);
        }
        let fault = round.pop().expect("refilled above");
        let hold = hold_for(fault, c.hold, node_down);
        if at + hold > c.duration {
            break;
        }
        let target = pick_target(fault, &c.targets, rng);
        steps.push(Step { at_ms: at.as_millis() as u64, fault, target, hold_ms: hold.as_millis() as u64 });
        at += hold + c.gap;
    }
    Schedule { seed, steps }
}

/// Splits and bridges cut the mesh in a fixed shape around the target; a holder is only
/// meaningful with stateful tasks, which every scenario has unless it runs echo only.
fn pick_target(fault: FaultKind, allowed: &[Target], rng: &mut impl Rng) -> Target {
    let usable: Vec<Target> = match fault {
        FaultKind::LeaderDeaf => vec![Target::Leader],
        FaultKind::Migrate => vec![Target::Host],
        _ => allowed.to_vec(),
    };
    *usable.choose(rng).unwrap_or(&Target::One)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn scenario() -> Scenario {
        Scenario::parse("name = \"t\"\n[chaos]\nduration = \"60s\"\nhold = \"3s\"\ngap = \"4s\"\n").unwrap()
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let s = scenario();
        let a = generate(&s, 7, &mut rand::rngs::StdRng::seed_from_u64(7));
        let b = generate(&s, 7, &mut rand::rngs::StdRng::seed_from_u64(7));
        assert_eq!(a, b);
        let c = generate(&s, 8, &mut rand::rngs::StdRng::seed_from_u64(8));
        assert_ne!(a.steps, c.steps, "another seed, another order");
    }

    #[test]
    fn every_kind_comes_once_before_any_repeats_and_faults_never_overlap() {
        let s = scenario();
        let plan = generate(&s, 1, &mut rand::rngs::StdRng::seed_from_u64(1));
        let first: std::collections::BTreeSet<_> =
            plan.steps.iter().take(s.chaos.faults.len()).map(|st| st.fault).collect();
        assert_eq!(first.len(), s.chaos.faults.len(), "{plan:?}");
        for w in plan.steps.windows(2) {
            assert!(w[0].at_ms + w[0].hold_ms < w[1].at_ms, "{w:?}");
        }
        let last = plan.steps.last().unwrap();
        assert!(last.at_ms + last.hold_ms <= 60_000);
        let pause = plan.steps.iter().find(|st| st.fault == FaultKind::PauseShort).unwrap();
        assert!(pause.hold_ms < 1000, "a short pause stays under node-down: {pause:?}");
        let deaf = plan.steps.iter().find(|st| st.fault == FaultKind::LeaderDeaf).unwrap();
        assert_eq!(deaf.target, Target::Leader);
    }
}
