//! Checkers: each reads the evidence of a run and says `true` (held), `false` (a counter-example,
//! shown) or `unknown` (not enough evidence). The run's verdict is the worst of them:
//! false > unknown > true.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::history::Event;
use crate::monitor::Sample;
use crate::nemesis::Applied;

pub mod available;
pub mod counter;
pub mod devices;
pub mod failover;
pub mod health;
pub mod periodic;
pub mod stale;

/// A checker's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    True,
    Unknown,
    False,
}

impl Verdict {
    /// The worse of two verdicts.
    pub fn and(self, other: Self) -> Self {
        self.max(other)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "true",
            Self::Unknown => "unknown",
            Self::False => "false",
        }
    }
}

/// One checker's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub id: String,
    pub name: String,
    pub verdict: Verdict,
    pub counts: BTreeMap<String, u64>,
    /// The first counter-examples, or why the verdict is unknown.
    pub examples: Vec<String>,
}

impl CheckResult {
    pub fn new(id: &str, name: &str) -> Self {
        Self { id: id.into(), name: name.into(), verdict: Verdict::True, counts: BTreeMap::new(), examples: Vec::new() }
    }

    /// Records a violation (false) with an example.
    pub fn violation(&mut self, example: String) {
        self.verdict = self.verdict.and(Verdict::False);
        if self.examples.len() < 10 {
            self.examples.push(example);
        }
    }

    /// Records missing evidence (unknown) with the reason.
    pub fn unsure(&mut self, why: String) {
        self.verdict = self.verdict.and(Verdict::Unknown);
        if self.examples.len() < 10 {
            self.examples.push(why);
        }
    }

    pub fn count(&mut self, key: &str, n: u64) {
        *self.counts.entry(key.into()).or_default() += n;
    }
}

/// How the run ended, as the liveness probe after the final heal saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Liveness {
    /// Milliseconds from the final heal until every condition held, if they did in time.
    pub reached_after_ms: Option<u64>,
    /// What still did not hold at the deadline.
    pub problems: Vec<String>,
}

/// A task's committed checkpoint at quiescence.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckpointAudit {
    pub sequence: Option<u64>,
    pub stored_on: usize,
    pub wanted: usize,
}

/// Everything a run leaves for the checkers besides the history.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Evidence {
    pub faults: Vec<Applied>,
    /// Faults the schedule planned (a planned fault that could not be applied makes I13 unknown).
    pub planned_faults: usize,
    pub samples: Vec<Sample>,
    /// The final list of every counter task (None when no final read succeeded).
    pub finals: BTreeMap<String, Option<Vec<u64>>>,
    /// Counter task → whether its appends carried keys.
    pub keyed: BTreeMap<String, bool>,
    pub echo: Option<String>,
    pub durable: bool,
    /// The checkpoint period of the counter tasks in periodic mode (I7).
    #[serde(default)]
    pub checkpoint_every_us: Option<u64>,
    pub liveness: Liveness,
    pub checkpoints: BTreeMap<String, CheckpointAudit>,
    pub failover_max_ms: u64,
    /// The longest callers may wait for a task while no fault touches it (I14); None in evidence
    /// written before I14 (the failover bound then).
    #[serde(default)]
    pub untouched_gap_max_ms: Option<u64>,
    /// The node id of every lab hub, by index.
    pub node_ids: Vec<u64>,
    /// When the fault phase ended (the final heal), from the start of the run.
    pub healed_at_us: u64,
    /// In-process faults armed with `HUBMESH_FAULTS` → times they fired (from the hubs'
    /// `/metrics` at the end; counts of hubs restarted meanwhile are lost, so a lower bound).
    #[serde(default)]
    pub faults_fired: BTreeMap<String, u64>,
    /// The simulated devices, when the run had some (I15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<devices::DeviceEvidence>,
}

/// Runs every checker.
pub fn check_all(events: &[Event], ev: &Evidence) -> Vec<CheckResult> {
    vec![
        counter::lost(events, ev),
        counter::fork(events, ev),
        counter::exactly_once(events, ev),
        periodic::bounded_loss(events, ev),
        counter::fencing(events, ev),
        stale::stale_answers(events, ev),
        health::checkpoints(ev),
        failover::bound(events, ev),
        available::untouched(events, ev),
        devices::registry(ev),
        health::liveness(ev),
        health::not_vacuous(events, ev),
    ]
}

/// The worst verdict of `results`.
pub fn overall(results: &[CheckResult]) -> Verdict {
    results.iter().fold(Verdict::True, |v, r| v.and(r.verdict))
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Small histories for the checkers' tests.

    use super::*;
    use crate::history::Type;
    use crate::workload::prefix_hashes;

    /// A kill of hub 0 at `start_us`, held 2 s.
    pub(crate) fn kill_at(start_us: u64) -> Applied {
        fault(crate::scenario::FaultKind::Kill, 0, start_us, 2_000_000)
    }

    /// `kind` on hub `hub` (index) from `start_us` for `hold_us`, aimed at a host; no task hosts
    /// or leader recorded (a test sets what it needs).
    pub(crate) fn fault(kind: crate::scenario::FaultKind, hub: usize, start_us: u64, hold_us: u64) -> Applied {
        Applied {
            fault: kind,
            target: crate::scenario::Target::Host,
            hub,
            hubs: vec![hub],
            start_us,
            end_us: start_us + hold_us,
            hosts_before: Default::default(),
            leader_before: None,
            effective: true,
            aimed: true,
            dropped: 0,
            killed: None,
            cut: false,
            device: None,
            note: String::new(),
        }
    }

    /// A history builder with a clock.
    #[derive(Default)]
    pub(crate) struct H {
        pub events: Vec<Event>,
        pub t: u64,
        process: i64,
    }

    impl H {
        /// An append of `op` to `task` answered by (node, epoch) with the list `after` it.
        pub(crate) fn add_ok(&mut self, task: &str, op: u64, after: &[u64], node: u64, epoch: u64) {
            let hs = prefix_hashes(after);
            self.op(task, "add", Some(op), Type::Ok, Some((after.len() as u64, hs[after.len()])), node, epoch);
        }

        pub(crate) fn add(&mut self, task: &str, op: u64, kind: Type) {
            self.op(task, "add", Some(op), kind, None, 0, 0);
        }

        pub(crate) fn read_ok(&mut self, task: &str, list: &[u64], node: u64, epoch: u64) {
            let hs = prefix_hashes(list);
            self.op(task, "read", None, Type::Ok, Some((list.len() as u64, hs[list.len()])), node, epoch);
        }

        #[allow(clippy::too_many_arguments)]
        pub(crate) fn op(
            &mut self,
            task: &str,
            f: &str,
            op: Option<u64>,
            kind: Type,
            lh: Option<(u64, u64)>,
            node: u64,
            epoch: u64,
        ) {
            self.process += 1;
            let mut e = Event::new(self.process, Type::Invoke, f);
            e.task = Some(task.into());
            e.op = op;
            self.t += 1000;
            e.t_us = self.t;
            self.events.push(e.clone());
            e.kind = kind;
            self.t += 1000;
            e.t_us = self.t;
            if kind == Type::Ok {
                e.node = Some(node);
                e.epoch = Some(epoch);
                e.len = lh.map(|x| x.0);
                e.hash = lh.map(|x| x.1);
            }
            self.events.push(e);
        }
    }

    /// Evidence with one durable counter task `c` whose final list is `list`.
    pub(crate) fn evidence(list: Option<&[u64]>, keyed: bool) -> Evidence {
        Evidence {
            finals: [("c".to_string(), list.map(<[u64]>::to_vec))].into(),
            keyed: [("c".to_string(), keyed)].into(),
            durable: true,
            failover_max_ms: 10_000,
            untouched_gap_max_ms: Some(10_000),
            ..Default::default()
        }
    }
}
