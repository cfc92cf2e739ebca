//! The run directory: `results.json`, `summary.md` (verdict first), `history.jsonl`,
//! `nemesis.jsonl`, `evidence.json` (what `hubmesh-chaos check` re-reads), `cluster-trace.txt`,
//! `timeline.svg`, beside `scenario.toml`, `schedule.json` and `hubs/<name>/hub.log`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::check::available::split_by_touch;
use crate::check::failover::{failovers, unavailability};
use crate::check::{overall, CheckResult, Evidence};
use crate::history::{pair, write_jsonl, Event, Type};
use crate::scenario::Scenario;
use crate::schedule::Schedule;
use crate::{monitor, svg};

/// min / p50 / p90 / p99 / max of `v` (empty → None).
pub fn stats(v: &[f64]) -> Option<[f64; 5]> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let p = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    Some([s[0], p(0.5), p(0.9), p(0.99), s[s.len() - 1]])
}

#[derive(Serialize)]
struct Results<'a> {
    valid: &'a str,
    scenario: &'a str,
    seed: u64,
    version: &'a str,
    machine: String,
    checkers: BTreeMap<&'a str, &'a CheckResult>,
    metrics: serde_json::Value,
    nemesis_errors: &'a [String],
}

/// Op counts per function: (attempted, ok, fail, unknown).
fn op_counts(events: &[Event]) -> BTreeMap<String, [u64; 4]> {
    let mut m: BTreeMap<String, [u64; 4]> = BTreeMap::new();
    for o in pair(events) {
        let c = m.entry(o.invoke.f.clone()).or_default();
        c[0] += 1;
        match o.kind() {
            Type::Ok => c[1] += 1,
            Type::Fail => c[2] += 1,
            _ => c[3] += 1,
        }
    }
    m
}

/// Writes every report file of the run.
pub fn write(
    dir: &Path,
    sc: &Scenario,
    plan: &Schedule,
    events: &[Event],
    ev: &Evidence,
    results: &[CheckResult],
    nemesis_errors: &[String],
) -> anyhow::Result<()> {
    let verdict = overall(results);
    write_jsonl(&dir.join("history.jsonl"), events)?;
    let nem: Vec<Event> = events.iter().filter(|e| e.is_nemesis()).cloned().collect();
    write_jsonl(&dir.join("nemesis.jsonl"), &nem)?;
    std::fs::write(dir.join("evidence.json"), serde_json::to_vec(ev)?)?;
    let names: BTreeMap<u64, String> =
        ev.node_ids.iter().enumerate().map(|(i, id)| (*id, crate::lab::hub_name(i))).collect();
    std::fs::write(dir.join("cluster-trace.txt"), monitor::trace(&ev.samples, &names))?;

    let fo = failovers(events, ev);
    let pick = |f: fn(&crate::check::failover::Failover) -> Option<f64>| fo.iter().filter_map(f).collect::<Vec<f64>>();
    let tasks: Vec<String> = ev.finals.keys().cloned().chain(ev.echo.clone()).collect();
    let run_us = events.last().map_or(1, |e| e.t_us.max(1));
    let gaps = unavailability(events, &tasks, 1000.0);
    let split = split_by_touch(events, ev, 300.0);
    let counts = op_counts(events);
    let terms: std::collections::BTreeSet<u64> = ev.samples.iter().map(|s| s.term).collect();
    let metrics = serde_json::json!({
        "run_s": run_us as f64 / 1e6,
        "ops": counts,
        "failover_ms": {
            "count": fo.len(),
            "moved": fo.iter().filter(|f| f.moved).count(),
            "detect": stats(&pick(|f| f.detect_ms)),
            "place": stats(&pick(|f| f.place_ms)),
            "first_ok": stats(&pick(|f| f.first_ok_ms)),
            "each": fo,
        },
        "unavailability": {
            "windows_over_1s": gaps.len(),
            "total_s": gaps.iter().map(|g| g.2).sum::<f64>() / 1e3,
            "longest_ms": gaps.iter().map(|g| g.2).fold(0.0, f64::max),
            "per_task_over_300ms_s": split.iter().map(|(t, (a, b))| (t.clone(), serde_json::json!({"touched": a, "untouched": b}))).collect::<BTreeMap<_, _>>(),
        },
        "terms_seen": terms.len(),
        "liveness_ms": ev.liveness.reached_after_ms,
        "final_lengths": ev.finals.iter().map(|(k, v)| (k.clone(), v.as_ref().map(Vec::len))).collect::<BTreeMap<_, _>>(),
    });
    let machine =
        format!("{} cores, {}", std::thread::available_parallelism().map_or(0, |n| n.get()), std::env::consts::ARCH);
    let res = Results {
        valid: verdict.as_str(),
        scenario: &sc.name,
        seed: plan.seed,
        version: env!("CARGO_PKG_VERSION"),
        machine,
        checkers: results.iter().map(|r| (r.id.as_str(), r)).collect(),
        metrics: metrics.clone(),
        nemesis_errors,
    };
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(&res)?)?;
    std::fs::write(dir.join("timeline.svg"), svg::timeline(events, ev))?;

    // summary.md
    let mut md = String::new();
    let _ = writeln!(md, "# Chaos run `{}`: verdict **{}**\n", sc.name, verdict.as_str());
    let _ = writeln!(
        md,
        "Seed {}, {} hubs (`{}` profile), {} faults applied of {} planned, {:.0} s. Replay: `hubmesh-chaos replay {}`.\n",
        plan.seed,
        sc.lab.hubs,
        sc.lab.profile,
        ev.faults.len(),
        plan.steps.len(),
        run_us as f64 / 1e6,
        dir.display()
    );
    if let Some(f) = sc.lab.env.get("HUBMESH_FAULTS") {
        let _ = writeln!(md, "In-process faults armed on every hub: `HUBMESH_FAULTS={f}`.\n");
    }
    let _ = writeln!(md, "| check | verdict | counts |\n|---|---|---|");
    for r in results {
        let c: Vec<String> = r.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(md, "| {} {} | {} | {} |", r.id, r.name, r.verdict.as_str(), c.join(", "));
    }
    let _ = writeln!(md, "\n## Failover (ms from the fault)\n");
    let _ = writeln!(md, "| phase | n | min | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|---|");
    for (name, v) in
        [("detect", pick(|f| f.detect_ms)), ("placed", pick(|f| f.place_ms)), ("first ok", pick(|f| f.first_ok_ms))]
    {
        match stats(&v) {
            Some(s) => {
                let _ = writeln!(
                    md,
                    "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                    v.len(),
                    s[0],
                    s[1],
                    s[2],
                    s[3],
                    s[4]
                );
            }
            None => {
                let _ = writeln!(md, "| {name} | 0 | | | | | |");
            }
        }
    }
    let _ = writeln!(md, "\nPer fault that took a task's host away:\n");
    let _ = writeln!(md, "| at | fault | task | detect | placed | first ok | moved |\n|---|---|---|---|---|---|---|");
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
    for f in &fo {
        let _ = writeln!(
            md,
            "| {:.1}s | {} | {} | {} | {} | {} | {} |",
            f.at_us as f64 / 1e6,
            f.fault,
            f.task,
            ms(f.detect_ms),
            ms(f.place_ms),
            ms(f.first_ok_ms),
            f.moved
        );
    }
    let total_gap: f64 = gaps.iter().map(|g| g.2).sum();
    let _ = writeln!(
        md,
        "\n## Unavailability\n\n{} windows over 1 s without a successful call of a task; {:.1} s in all ({:.1}% of task-time); longest {:.0} ms.\n",
        gaps.len(),
        total_gap / 1e3,
        100.0 * total_gap / 1e3 / (run_us as f64 / 1e6 * tasks.len().max(1) as f64),
        gaps.iter().map(|g| g.2).fold(0.0, f64::max)
    );
    let run_s = run_us as f64 / 1e6;
    let _ = writeln!(
        md,
        "Per task, windows over 300 ms in which callers waited for an answer (from the first call since the task last answered to its next answer), split by whether a fault touched the task (its host or the leader) meanwhile (I14):\n\n| task | touched: s (% of run) | untouched: s (% of run) |\n|---|---|---|"
    );
    for (task, (touched, untouched)) in &split {
        let _ = writeln!(
            md,
            "| {task} | {touched:.1} ({:.1}%) | {untouched:.1} ({:.1}%) |",
            100.0 * touched / run_s,
            100.0 * untouched / run_s
        );
    }
    let _ = writeln!(md, "\n## Operations\n\n| op | attempted | ok | fail | unknown |\n|---|---|---|---|---|");
    for (f, c) in &counts {
        let _ = writeln!(md, "| {f} | {} | {} | {} | {} |", c[0], c[1], c[2], c[3]);
    }
    let _ = writeln!(
        md,
        "\nLeader terms seen: {}. Mesh settled {} after the final heal.\n",
        terms.len(),
        ev.liveness.reached_after_ms.map_or("never".into(), |m| format!("{m} ms"))
    );
    let _ = writeln!(md, "## Faults\n\n| from | to | fault | target | effect |\n|---|---|---|---|---|");
    for f in &ev.faults {
        let effect = if f.fault.is_network() {
            format!("{} packets dropped", f.dropped)
        } else if f.fault.is_device() {
            "a simulated device, no hub".into()
        } else {
            "signal delivered".into()
        };
        let target = match f.device {
            Some(k) => format!("device {}", crate::devices::device_id(k)),
            None => format!("{} → n{}", f.target.name(), f.hub + 1),
        };
        let _ = writeln!(
            md,
            "| {:.1}s | {:.1}s | {} | {target} | {} ({}) |",
            f.start_us as f64 / 1e6,
            f.end_us as f64 / 1e6,
            f.fault.name(),
            effect,
            f.note
        );
    }
    for e in nemesis_errors {
        let _ = writeln!(md, "\nNemesis error: {e}");
    }
    let bad: Vec<&CheckResult> = results.iter().filter(|r| !r.examples.is_empty()).collect();
    if !bad.is_empty() {
        let _ = writeln!(md, "\n## Counter-examples and open questions\n");
        for r in bad {
            for x in &r.examples {
                let _ = writeln!(md, "- {} ({}): {x}", r.id, r.verdict.as_str());
            }
        }
    }
    let _ = writeln!(md, "\nFiles: `history.jsonl` (every call), `nemesis.jsonl`, `cluster-trace.txt`, `timeline.svg`, `hubs/*/hub.log`.");
    std::fs::write(dir.join("summary.md"), md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_small_sample() {
        let s = stats(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!(s, [1.0, 3.0, 5.0, 5.0, 5.0]);
        assert!(stats(&[]).is_none());
    }
}
