//! The nemesis: turns a planned [`Step`] into a real fault on the lab (signals or firewall rules),
//! resolving its target against the live mesh, and heals it.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::lab::{Lab, Rules};
use crate::scenario::{FaultKind, Target};
use crate::schedule::Step;

/// A fault as it was applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Applied {
    pub fault: FaultKind,
    pub target: Target,
    /// The hub the target resolved to (0-based).
    pub hub: usize,
    /// Every hub the fault touched (a split's minority, a bridge's ends, ...).
    pub hubs: Vec<usize>,
    pub start_us: u64,
    pub end_us: u64,
    /// Where each counter task (and the echo task) ran when the fault began: task → (node id,
    /// epoch).
    pub hosts_before: BTreeMap<String, (u64, u64)>,
    /// The leader when the fault began, as the nemesis saw it (None: no hub answered).
    #[serde(default)]
    pub leader_before: Option<u64>,
    /// The signals were delivered, or the rules dropped at least one packet.
    pub effective: bool,
    /// The hub was the one the target names (`false`: the mesh could not be read, or named no
    /// such hub, and the fault landed on a random hub; I13 then says unknown).
    #[serde(default = "yes")]
    pub aimed: bool,
    /// Packets the rules dropped (network faults).
    pub dropped: u64,
    /// The hub a `migrate` step killed mid-migration (restarted at the heal).
    #[serde(default)]
    pub killed: Option<usize>,
    /// A `migrate` step cut the source and the target apart mid-migration (joined at the heal).
    #[serde(default)]
    pub cut: bool,
    /// The simulated device a device fault acted on (it touches no hub: `hubs` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<usize>,
    pub note: String,
}

fn yes() -> bool {
    true
}

impl Applied {
    /// The hubs whose tasks the fault should move (the failover bound applies to them): every
    /// hub it touched for a fault that takes a host away, the killed hub for a migration.
    pub fn hubs_taken_away(&self) -> Vec<usize> {
        match self.fault {
            FaultKind::Migrate => self.killed.into_iter().collect(),
            f if f.takes_host_away() => self.hubs.clone(),
            _ => Vec::new(),
        }
    }
}

/// What the nemesis knows of the mesh when it picks a target.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub leader: Option<u64>,
    /// Counter task → (host node id, epoch, holder node ids).
    pub tasks: BTreeMap<String, (u64, u64, Vec<u64>)>,
}

/// Reads the mesh through the first hub that answers.
pub async fn view(lab: &Lab, tasks: &[String]) -> View {
    for h in lab.hubs.iter().filter(|h| h.is_running() && !h.paused) {
        let Ok(status) = h.client.status().await else { continue };
        let mut v = View { leader: status.leader, tasks: BTreeMap::new() };
        for t in tasks {
            if let Ok(info) = h.client.task(t).await {
                if let Some(p) = info.placement {
                    v.tasks.insert(t.clone(), (p.node_id, p.epoch, info.holders.clone()));
                }
            }
        }
        return v;
    }
    View::default()
}

/// Picks the hub a step's target names, and whether it found one; falls back to a random running
/// hub (not aimed).
pub fn resolve(lab: &Lab, view: &View, target: Target, rng: &mut impl Rng) -> (usize, bool) {
    let running: Vec<usize> = lab.hubs.iter().filter(|h| h.is_running()).map(|h| h.index).collect();
    let by_node = |id: u64| lab.index_of(id).filter(|i| running.contains(i));
    let picked = match target {
        Target::One => None,
        Target::Leader => view.leader.and_then(by_node),
        Target::Host => {
            let hosts: Vec<u64> = view.tasks.values().map(|(h, _, _)| *h).collect();
            hosts.choose(rng).copied().and_then(by_node)
        }
        Target::Holder => {
            let holders: Vec<u64> = view.tasks.values().flat_map(|(_, _, hs)| hs.iter().copied()).collect();
            holders.choose(rng).copied().and_then(by_node)
        }
    };
    match (picked, target) {
        (Some(i), _) => (i, true),
        (None, Target::One) => (*running.choose(rng).unwrap_or(&0), true),
        (None, _) => (*running.choose(rng).unwrap_or(&0), false),
    }
}

/// The firewall rules of every hub for a network fault around hub `t`; also the hubs involved.
pub fn rules_for(
    fault: FaultKind,
    t: usize,
    n: usize,
    flaky_percent: u8,
    rng: &mut impl Rng,
) -> (Vec<Rules>, Vec<usize>) {
    let mut rules = vec![Rules::default(); n];
    let others: Vec<usize> = (0..n).filter(|&j| j != t).collect();
    let cut = |a: &[usize], b: &[usize], rules: &mut Vec<Rules>| {
        for &x in a {
            for &y in b {
                rules[x].drop_from.insert(y);
                rules[x].drop_to.insert(y);
                rules[y].drop_from.insert(x);
                rules[y].drop_to.insert(x);
            }
        }
    };
    let involved = match fault {
        FaultKind::Isolate => {
            cut(&[t], &others, &mut rules);
            vec![t]
        }
        FaultKind::Split => {
            // The target and enough others to make the largest minority.
            let mut rest = others.clone();
            rest.shuffle(rng);
            let minority_size = (n - 1) / 2;
            let mut minority = vec![t];
            minority.extend(rest.iter().take(minority_size - 1));
            let majority: Vec<usize> = (0..n).filter(|j| !minority.contains(j)).collect();
            cut(&minority, &majority, &mut rules);
            minority
        }
        FaultKind::Bridge => {
            // The target is the bridge; the others form two sides that cannot talk.
            let mut rest = others.clone();
            rest.shuffle(rng);
            let (a, b) = rest.split_at(rest.len() / 2);
            cut(a, b, &mut rules);
            let mut v = vec![t];
            v.extend(rest.iter());
            v
        }
        FaultKind::LeaderDeaf => {
            rules[t].drop_from = others.iter().copied().collect();
            vec![t]
        }
        FaultKind::Flaky => {
            rules[t].flaky = others.iter().copied().collect();
            rules[t].flaky_percent = flaky_percent;
            vec![t]
        }
        _ => vec![t],
    };
    (rules, involved)
}

/// Applies `step` now. The returned record's `end_us` and `effective` are filled by [`heal`].
/// `watched` are further tasks whose hosts are recorded (the echo task) but never targeted.
pub async fn apply(
    lab: &mut Lab,
    step: &Step,
    tasks: &[String],
    watched: &[String],
    flaky_percent: u8,
    now_us: u64,
    rng: &mut impl Rng,
) -> anyhow::Result<Applied> {
    let all: Vec<String> = tasks.iter().chain(watched).cloned().collect();
    let v = view(lab, &all).await;
    let mut targets = v.clone();
    targets.tasks.retain(|name, _| tasks.contains(name));
    let (t, aimed) = resolve(lab, &targets, step.target, rng);
    let n = lab.hubs.len();
    let mut applied = Applied {
        fault: step.fault,
        target: step.target,
        hub: t,
        hubs: vec![t],
        start_us: now_us,
        end_us: now_us,
        hosts_before: v.tasks.iter().map(|(k, (h, e, _))| (k.clone(), (*h, *e))).collect(),
        leader_before: v.leader,
        effective: false,
        aimed,
        dropped: 0,
        killed: None,
        cut: false,
        device: None,
        note: String::new(),
    };
    if !lab.hubs[t].is_running() {
        bail!("hub {} is not running", lab.hubs[t].name());
    }
    match step.fault {
        FaultKind::Kill => {
            lab.kill(t)?;
            applied.effective = true;
        }
        FaultKind::Restart => {
            lab.terminate(t)?;
            applied.effective = true;
        }
        FaultKind::PauseShort | FaultKind::PauseLong => {
            lab.pause(t, true)?;
            applied.effective = true;
        }
        FaultKind::Migrate => migrate(lab, &targets, t, &mut applied, rng).await?,
        FaultKind::DeviceVanish | FaultKind::DeviceMove => bail!("a device fault is the fleet's (run::device_fault)"),
        kind => {
            let (rules, involved) = rules_for(kind, t, n, flaky_percent, rng);
            for (i, r) in rules.iter().enumerate() {
                lab.set_rules(i, r).with_context(|| format!("setting the rules of {}", kind.name()))?;
            }
            applied.note = describe(&rules);
            applied.hubs = involved;
        }
    }
    if applied.note.is_empty() {
        applied.note = format!("{} {}", step.fault.name(), lab.hubs[t].name());
    }
    Ok(applied)
}

/// A live migration of a counter hosted on hub `t` to another running hub, asked through a random
/// hub; three times in four the source or the target is killed, or the two are cut apart, 0-300
/// ms into it. Effective when the
/// migration committed or the kill was delivered. Without a kill it waits for the outcome, so the
/// migration's own pause falls before the step's start and counts against I14 like any stall.
async fn migrate(
    lab: &mut Lab,
    view: &View,
    t: usize,
    applied: &mut Applied,
    rng: &mut impl Rng,
) -> anyhow::Result<()> {
    let from = lab.hubs[t].node_id;
    let movable: Vec<&String> = view.tasks.iter().filter(|(_, (h, _, _))| *h == from).map(|(k, _)| k).collect();
    let others: Vec<usize> =
        lab.hubs.iter().filter(|h| h.is_running() && !h.paused && h.index != t).map(|h| h.index).collect();
    let (Some(task), Some(&to)) = (movable.choose(rng).map(|s| (*s).clone()), others.choose(rng)) else {
        applied.note = format!("migrate: no counter on n{} or no other hub to take it", t + 1);
        return Ok(());
    };
    let askers: Vec<usize> = lab.hubs.iter().filter(|h| h.is_running() && !h.paused).map(|h| h.index).collect();
    let client = lab.hubs[*askers.choose(rng).unwrap_or(&t)].client.clone();
    let to_id = lab.hubs[to].node_id.to_string();
    let call = {
        let task = task.clone();
        tokio::spawn(async move { client.migrate(&task, Some(&to_id)).await })
    };
    applied.hubs = vec![t, to];
    // A quarter each: kill the source, kill the target, cut them apart (not on a LAN run, which
    // has no firewall), or let the migration run.
    let mut pick = rng.random_range(0..4u8);
    if pick == 2 && lab.is_lan() {
        pick = 3;
    }
    let victim = match pick {
        0 => Some(t),
        1 => Some(to),
        _ => None,
    };
    let note = format!("migrate {task} n{}->n{}", t + 1, to + 1);
    if pick == 2 {
        let delay = rng.random_range(0..=300);
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        let mut rules = vec![Rules::default(); lab.hubs.len()];
        for (a, b) in [(t, to), (to, t)] {
            rules[a].drop_from.insert(b);
            rules[a].drop_to.insert(b);
        }
        for (i, r) in rules.iter().enumerate() {
            lab.set_rules(i, r).context("cutting the source from the target")?;
        }
        applied.cut = true;
        applied.note = format!("{note}, n{} and n{} cut apart after {delay} ms", t + 1, to + 1);
        return Ok(());
    }
    if let Some(v) = victim {
        // The fault starts when `apply` returns: the migration's own outcome is left to the
        // hubs' logs and to the checks (one instance, nothing acknowledged lost).
        let delay = rng.random_range(0..=300);
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        lab.kill(v)?;
        applied.killed = Some(v);
        applied.effective = true;
        applied.note = format!("{note}, n{} killed after {delay} ms", v + 1);
        return Ok(());
    }
    // Bounded (the lab is not supervised meanwhile): a migration takes well under a second.
    let outcome = match tokio::time::timeout(std::time::Duration::from_secs(10), call).await {
        Ok(Ok(Ok(m))) => {
            applied.effective = true;
            format!("moved, pause {} us, {} rounds", m.pause_us, m.rounds)
        }
        Ok(Ok(Err(e))) => format!("not moved ({e})"),
        Ok(Err(e)) => format!("the call panicked ({e})"),
        Err(_) => "no answer in 10 s".to_owned(),
    };
    applied.note = format!("{note}: {outcome}");
    Ok(())
}

fn describe(rules: &[Rules]) -> String {
    let mut parts = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let names = |s: &BTreeSet<usize>| s.iter().map(|j| format!("n{}", j + 1)).collect::<Vec<_>>().join(",");
        if !r.drop_from.is_empty() {
            parts.push(format!("n{} drops from {}", i + 1, names(&r.drop_from)));
        }
        if !r.drop_to.is_empty() {
            parts.push(format!("n{} drops to {}", i + 1, names(&r.drop_to)));
        }
        if !r.flaky.is_empty() {
            parts.push(format!("n{} drops {}% with {}", i + 1, r.flaky_percent, names(&r.flaky)));
        }
    }
    parts.join("; ")
}

/// Undoes `applied`: clears the rules (after reading how much they dropped), wakes or restarts.
pub async fn heal(lab: &mut Lab, applied: &mut Applied) -> anyhow::Result<()> {
    let t = applied.hub;
    match applied.fault {
        FaultKind::Kill | FaultKind::Restart => lab.restart(t).await?,
        FaultKind::Migrate if applied.cut => {
            applied.dropped = (0..lab.hubs.len()).map(|i| lab.dropped_packets(i)).sum();
            applied.effective = applied.dropped > 0;
            for i in 0..lab.hubs.len() {
                lab.set_rules(i, &Rules::default())?;
            }
        }
        FaultKind::Migrate => {
            if let Some(v) = applied.killed {
                lab.restart(v).await?;
            }
        }
        FaultKind::PauseShort | FaultKind::PauseLong => lab.pause(t, false)?,
        FaultKind::DeviceVanish | FaultKind::DeviceMove => {}
        _ => {
            applied.dropped = (0..lab.hubs.len()).map(|i| lab.dropped_packets(i)).sum();
            applied.effective = applied.dropped > 0;
            for i in 0..lab.hubs.len() {
                lab.set_rules(i, &Rules::default())?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(3)
    }

    /// Whether `a` can send to `b` under `rules`.
    fn reaches(rules: &[Rules], a: usize, b: usize) -> bool {
        !rules[a].drop_to.contains(&b) && !rules[b].drop_from.contains(&a)
    }

    #[test]
    fn isolate_cuts_the_target_both_ways_and_nobody_else() {
        let (r, hubs) = rules_for(FaultKind::Isolate, 1, 3, 30, &mut rng());
        assert_eq!(hubs, vec![1]);
        for j in [0, 2] {
            assert!(!reaches(&r, 1, j) && !reaches(&r, j, 1));
        }
        assert!(reaches(&r, 0, 2) && reaches(&r, 2, 0));
    }

    #[test]
    fn split_of_five_leaves_a_majority_of_three() {
        let (r, minority) = rules_for(FaultKind::Split, 4, 5, 30, &mut rng());
        assert_eq!(minority.len(), 2);
        assert!(minority.contains(&4));
        let majority: Vec<usize> = (0..5).filter(|j| !minority.contains(j)).collect();
        for &a in &minority {
            for &b in &majority {
                assert!(!reaches(&r, a, b) && !reaches(&r, b, a));
            }
        }
        assert!(reaches(&r, majority[0], majority[1]));
        assert!(reaches(&r, minority[0], minority[1]));
    }

    #[test]
    fn bridge_keeps_the_middle_connected_to_both_ends() {
        let (r, hubs) = rules_for(FaultKind::Bridge, 0, 3, 30, &mut rng());
        assert_eq!(hubs[0], 0);
        assert!(reaches(&r, 0, 1) && reaches(&r, 1, 0) && reaches(&r, 0, 2) && reaches(&r, 2, 0));
        assert!(!reaches(&r, 1, 2) && !reaches(&r, 2, 1));
    }

    #[test]
    fn leader_deaf_is_one_way() {
        let (r, _) = rules_for(FaultKind::LeaderDeaf, 2, 3, 30, &mut rng());
        assert!(!reaches(&r, 0, 2) && !reaches(&r, 1, 2));
        assert!(reaches(&r, 2, 0) && reaches(&r, 2, 1));
    }
}
