//! One chaos run, phase by phase: lab up → deploy (and the simulated devices) → warm-up →
//! faults → final heal → liveness → final reads → checkpoint audit → device convergence →
//! checks → report. The lab is torn down on every path out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hubmesh::client::Client;
use hubmesh_proto::api::DeployParams;
use rand::SeedableRng;

use crate::check::devices::DeviceEvidence;
use crate::check::{self, CheckResult, CheckpointAudit, Evidence, Liveness, Verdict};
use crate::devices::Fleet;
use crate::history::{self, Event, Recorder, Type, NEMESIS};
use crate::lab::{hub_name, Lab};
use crate::progress::{progress_loop, set_phase, Progress};
use crate::scenario::{FaultKind, Keys, Scenario};
use crate::schedule::{self, Schedule};
use crate::workload::{self, CounterTask, Plan};
use crate::{monitor, nemesis, report};

const OPLOG: &[u8] = include_bytes!("../../examples/tasks/oplog.wat");
const ECHO: &[u8] = include_bytes!("../../examples/tasks/echo.wat");

/// What to run.
pub struct RunOptions {
    pub scenario: Scenario,
    /// The run directory (created).
    pub out: PathBuf,
    /// The `hubmesh` binary the lab starts.
    pub bin: PathBuf,
    /// Overrides the scenario's seed.
    pub seed: Option<u64>,
    /// A saved schedule to repeat instead of planning one.
    pub schedule: Option<Schedule>,
}

/// How a run ended.
pub struct RunOutcome {
    pub dir: PathBuf,
    pub verdict: Verdict,
    pub results: Vec<CheckResult>,
}

/// Runs `opts` to the end and writes the report; the error path also tears the lab down.
pub async fn run(opts: RunOptions) -> anyhow::Result<RunOutcome> {
    let sc = opts.scenario.clone();
    let seed = opts.seed.or(sc.seed).unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let plan = match opts.schedule.clone() {
        Some(s) => s,
        None => schedule::generate(&sc, seed, &mut rng),
    };
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let dir = opts.out.canonicalize()?;
    let mut sc_saved = sc.clone();
    sc_saved.seed = Some(seed);
    std::fs::write(dir.join("scenario.toml"), toml::to_string_pretty(&sc_saved)?)?;
    std::fs::write(dir.join("schedule.json"), serde_json::to_vec_pretty(&plan)?)?;
    eprintln!("chaos run {} (seed {seed}, {} faults planned) in {}", sc.name, plan.steps.len(), dir.display());

    let rec = Recorder::new(Instant::now());
    let env: Vec<(String, String)> = sc.lab.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let lab_started = Instant::now();
    let mut lab = match &sc.lan {
        Some(lan) => Lab::connect_lan(lan, sc.workload.timeout).await.context("reaching the LAN hubs")?,
        None => Lab::up(&dir, sc.lab.hubs, sc.lab.witness, &opts.bin, &sc.lab.profile, &env, sc.workload.timeout)
            .await
            .context("starting the lab")?,
    };
    eprintln!("lab up: {} hubs in {:.1}s", lab.hubs.len(), lab_started.elapsed().as_secs_f64());

    // Tasks.
    let keyed = |i: usize| match sc.workload.keys {
        Keys::Always => true,
        Keys::Never => false,
        Keys::Mixed => i == 0,
    };
    let counters: Vec<CounterTask> =
        (0..sc.workload.counters).map(|i| CounterTask { name: format!("chaos-oplog{i}"), keyed: keyed(i) }).collect();
    let echo = sc.workload.echo.then(|| "chaos-echo".to_string());
    let ours: Vec<String> = counters.iter().map(|c| c.name.clone()).chain(echo.clone()).collect();
    if lab.is_lan() {
        // A previous run's tasks (the names are the suite's own) would not start empty.
        remove_tasks(&lab, &ours).await;
    }
    deploy(&lab, &sc, &counters, echo.as_deref()).await?;
    let task_names: Vec<String> = counters.iter().map(|c| c.name.clone()).collect();
    let watched: Vec<String> = echo.iter().cloned().collect();
    // Devices on LAN A; LAN B (for `device-move`) reaches the last task hub only.
    let mut fleet = None;
    if sc.devices.count > 0 {
        lab.add_lan_b(&[lab.task_hubs - 1]).context("building LAN B")?;
        let devsim = crate::devices::find_devsim()?;
        let now = || rec.now_us();
        fleet = Some(Fleet::start(&lab, &devsim, sc.devices.count, &now).context("starting the devices")?);
    }

    // Clients, monitor, progress.
    let clients: Vec<Client> = lab.hubs.iter().map(|h| h.client.clone()).collect();
    let stop_load = Arc::new(AtomicBool::new(false));
    let stop_watch = Arc::new(AtomicBool::new(false));
    let workload = tokio::spawn(workload::run(
        Plan {
            counters: counters.clone(),
            echo: echo.clone(),
            rate_hz: sc.workload.rate_hz,
            clients: sc.workload.clients,
            seed,
        },
        clients.clone(),
        rec.clone(),
        stop_load.clone(),
    ));
    let monitor =
        tokio::spawn(monitor::run(clients.clone(), Duration::from_millis(250), rec.clone(), stop_watch.clone()));
    let device_monitor = fleet.as_ref().map(|_| {
        tokio::spawn(monitor::devices(clients.clone(), Duration::from_millis(500), rec.clone(), stop_watch.clone()))
    });
    let progress = Arc::new(Mutex::new(Progress::default()));
    let total = sc.chaos.warmup + sc.chaos.duration + sc.checks.liveness_max / 3 + Duration::from_secs(10);
    let bar = progress_loop(rec.clone(), total, progress.clone(), stop_watch.clone());

    // Warm-up, then the faults.
    set_phase(&progress, "warm-up", "");
    supervised_sleep(&mut lab, Instant::now() + sc.chaos.warmup, &rec).await;
    let chaos_start = Instant::now();
    let mut applied_all = Vec::new();
    let mut nemesis_errors = Vec::new();
    for step in &plan.steps {
        let at = chaos_start + Duration::from_millis(step.at_ms);
        supervised_sleep(&mut lab, at, &rec).await;
        let mut e = Event::new(NEMESIS, Type::Invoke, step.fault.name());
        e.note = Some(format!("target {}", step.target.name()));
        let start_us = rec.now_us();
        let applied = match (step.fault.is_device(), fleet.as_mut()) {
            (true, Some(f)) => device_fault(&lab, f, step.fault, &rec, &mut rng),
            (true, None) => Err(anyhow::anyhow!("{} needs devices (devices.count)", step.fault.name())),
            (false, _) => {
                nemesis::apply(&mut lab, step, &task_names, &watched, sc.chaos.flaky_drop_percent, start_us, &mut rng)
                    .await
            }
        };
        match applied {
            Ok(mut a) => {
                e.hubs = a.hubs.clone();
                e.note = Some(a.note.clone());
                a.start_us = rec.record(e.clone());
                set_phase(&progress, "chaos", &a.note);
                supervised_sleep(&mut lab, Instant::now() + Duration::from_millis(step.hold_ms), &rec).await;
                let healed = match (a.device, fleet.as_mut()) {
                    (Some(k), Some(f)) => f.heal(&lab, k, &|| rec.now_us()),
                    _ => nemesis::heal(&mut lab, &mut a).await,
                };
                let mut done = e.clone();
                done.kind = Type::Info;
                if let Err(err) = healed {
                    done.error = Some(format!("{err:#}"));
                    nemesis_errors.push(format!("healing {}: {err:#}", step.fault.name()));
                }
                a.end_us = rec.record(done);
                set_phase(&progress, "chaos", "");
                applied_all.push(a);
            }
            Err(err) => {
                e.kind = Type::Fail;
                e.error = Some(format!("{err:#}"));
                rec.record(e);
                nemesis_errors.push(format!("applying {}: {err:#}", step.fault.name()));
            }
        }
    }
    supervised_sleep(&mut lab, chaos_start + sc.chaos.duration, &rec).await;

    // Final heal, a little more load, then quiet.
    set_phase(&progress, "heal", "");
    let heal_result = lab.heal_all().await;
    let healed_at_us = rec.now_us();
    let healed = Instant::now();
    supervised_sleep(&mut lab, healed + Duration::from_secs(3), &rec).await;
    stop_load.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(sc.workload.timeout * 5, workload).await;

    set_phase(&progress, "liveness", "");
    let liveness = match heal_result {
        Ok(()) => settle(&mut lab, &task_names, echo.as_deref(), healed, sc.checks.liveness_max, &rec).await,
        Err(e) => Liveness { reached_after_ms: None, problems: vec![format!("the final heal failed: {e:#}")] },
    };

    set_phase(&progress, "final reads", "");
    let (finals, disagreements) = final_reads(&mut lab, &counters, &rec).await;
    let mut liveness = liveness;
    liveness.problems.extend(disagreements);
    if !liveness.problems.is_empty() {
        liveness.reached_after_ms = None;
    }
    let checkpoints = audit(&lab, &counters).await;
    let devices = match fleet.as_mut() {
        Some(f) => {
            set_phase(&progress, "devices", "");
            Some(converge(&mut lab, f, &rec).await)
        }
        None => None,
    };
    let faults_fired = fired(&lab, sc.lab.env.get("HUBMESH_FAULTS")).await;
    stop_watch.store(true, Ordering::Relaxed);
    let samples = monitor.await.unwrap_or_default();
    let devices = match (devices, device_monitor) {
        (Some(mut d), Some(m)) => {
            d.samples = m.await.unwrap_or_default();
            Some(d)
        }
        _ => None,
    };
    drop(fleet);
    let _ = bar.await;
    let node_ids: Vec<u64> = lab.hubs.iter().map(|h| h.node_id).collect();
    if lab.is_lan() {
        remove_tasks(&lab, &ours).await;
    }
    lab.teardown();

    let events = rec.snapshot();
    let ev = Evidence {
        faults: applied_all,
        planned_faults: plan.steps.len(),
        samples,
        finals,
        keyed: counters.iter().map(|c| (c.name.clone(), c.keyed)).collect(),
        echo,
        durable: sc.workload.mode == "durable",
        checkpoint_every_us: (sc.workload.mode == "periodic")
            .then_some(sc.workload.checkpoint_every.as_micros() as u64),
        liveness,
        checkpoints,
        failover_max_ms: sc.checks.failover_max.as_millis() as u64,
        untouched_gap_max_ms: Some(sc.checks.untouched_gap_max.unwrap_or(sc.checks.failover_max).as_millis() as u64),
        node_ids,
        healed_at_us,
        faults_fired,
        devices,
    };
    let results = check::check_all(&events, &ev);
    let verdict = check::overall(&results);
    report::write(&dir, &sc_saved, &plan, &events, &ev, &results, &nemesis_errors)?;
    Ok(RunOutcome { dir, verdict, results })
}

/// A device fault, on a device the fleet picks; it touches no hub.
fn device_fault(
    lab: &Lab,
    fleet: &mut Fleet,
    fault: FaultKind,
    rec: &Recorder,
    rng: &mut impl rand::Rng,
) -> anyhow::Result<nemesis::Applied> {
    let now = || rec.now_us();
    let k = match fault {
        FaultKind::DeviceVanish => fleet.vanish(rng, &now)?,
        _ => fleet.move_one(lab, rng, &now)?,
    };
    let now_us = now();
    Ok(nemesis::Applied {
        fault,
        target: crate::scenario::Target::One,
        hub: 0,
        hubs: Vec::new(),
        start_us: now_us,
        end_us: now_us,
        hosts_before: BTreeMap::new(),
        leader_before: None,
        effective: true,
        aimed: true,
        dropped: 0,
        killed: None,
        cut: false,
        device: Some(k),
        note: format!("{} {}", fault.name(), crate::devices::device_id(k)),
    })
}

/// After the final heal: every device runs on LAN A again; waits (at most 40 s, restarting hubs
/// that exit on their own meanwhile) until every hub lists exactly those, all `seen`.
async fn converge(lab: &mut Lab, fleet: &mut Fleet, rec: &Recorder) -> DeviceEvidence {
    let start = Instant::now();
    let healed = fleet.heal_all(lab, &|| rec.now_us());
    // What runs (a device that could not be restored is not expected).
    let want: BTreeMap<String, String> = fleet.running_ids().into_iter().map(|i| (i, "seen".to_owned())).collect();
    let mut last = Vec::new();
    let mut converged_after_ms = None;
    while start.elapsed() < Duration::from_secs(40) {
        last.clear();
        for h in &lab.hubs {
            match h.client.devices().await {
                Ok(list) => {
                    let got: BTreeMap<String, String> = list.into_iter().map(|d| (d.id, d.reach)).collect();
                    if got != want {
                        last.push(format!("{} lists {got:?}", h.name()));
                    }
                }
                Err(e) => last.push(format!("{} does not answer: {e}", h.name())),
            }
        }
        if last.is_empty() {
            converged_after_ms = Some(start.elapsed().as_millis() as u64);
            break;
        }
        supervised_sleep(lab, Instant::now() + Duration::from_millis(100), rec).await;
    }
    if let Err(e) = healed {
        last.push(format!("the devices could not be restored: {e:#}"));
        converged_after_ms = None;
    }
    let ids = want.into_keys().collect();
    DeviceEvidence { events: fleet.events.clone(), samples: Vec::new(), ids, converged_after_ms, unconverged: last }
}

/// Deletes the suite's tasks from a LAN mesh. Right after the final heal the mesh may still be
/// electing or a hub catching up, so a removal that fails for that (no answer, or a 5xx: no
/// quorum, a read barrier not met) is retried for a while, on each hub in turn; a task that is not
/// there counts as removed. What still fails is reported, not fatal: the user's mesh keeps working
/// with a leftover task, and the next run removes it first.
async fn remove_tasks(lab: &Lab, names: &[String]) {
    const PATIENCE: Duration = Duration::from_secs(20);
    for name in names {
        let started = Instant::now();
        for attempt in 0.. {
            let hub = &lab.hubs[attempt % lab.hubs.len()];
            let e = match hub.client.remove(name).await {
                Ok(()) => break,
                Err(e) if e.status() == Some(404) => break,
                Err(e) => e,
            };
            let passing = e.status().is_none_or(|s| s >= 500);
            if !passing || started.elapsed() >= PATIENCE {
                eprintln!("could not remove the suite's task {name} from the mesh: {e}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Sleeps until `until`, restarting hubs that exited on their own meanwhile (as systemd would
/// restart a crashed hub); each crash goes into the history as a nemesis event `crash`.
async fn supervised_sleep(lab: &mut Lab, until: Instant, rec: &Recorder) {
    loop {
        for i in lab.reap_crashed() {
            let mut e = Event::new(NEMESIS, Type::Info, "crash");
            e.hubs = vec![i];
            match lab.restart(i).await {
                Ok(()) => e.note = Some(format!("{} exited on its own; restarted", hub_name(i))),
                Err(err) => e.error = Some(format!("{} exited on its own; restarting it failed: {err:#}", hub_name(i))),
            }
            rec.record(e);
        }
        let now = Instant::now();
        if now >= until {
            return;
        }
        tokio::time::sleep((until - now).min(Duration::from_millis(200))).await;
    }
}

async fn deploy(lab: &Lab, sc: &Scenario, counters: &[CounterTask], echo: Option<&str>) -> anyhow::Result<()> {
    let c = &lab.hubs[0].client;
    for t in counters {
        let params = DeployParams {
            stateful: true,
            durable: sc.workload.mode == "durable",
            checkpoint_every: (sc.workload.mode == "periodic")
                .then(|| humantime::format_duration(sc.workload.checkpoint_every).to_string()),
            ..Default::default()
        };
        c.deploy(&t.name, OPLOG.to_vec(), &params, false).await.with_context(|| format!("deploying {}", t.name))?;
    }
    if let Some(name) = echo {
        c.deploy(name, ECHO.to_vec(), &DeployParams::default(), false).await.context("deploying echo")?;
    }
    let want_holders = 2.min(lab.task_hubs - 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tasks = c.tasks().await.unwrap_or_default();
        let ready = counters
            .iter()
            .all(|t| tasks.iter().any(|x| x.name == t.name && x.state == "running" && x.holders.len() >= want_holders))
            && echo.is_none_or(|e| tasks.iter().any(|x| x.name == e && x.state == "running"));
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the workload's tasks did not start in 60 s: {tasks:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the mesh settled: every hub answers, they agree on one leader and on every
/// task's placement, every task runs, nobody is down and the voters are complete.
async fn settle(
    lab: &mut Lab,
    tasks: &[String],
    echo: Option<&str>,
    healed: Instant,
    max: Duration,
    rec: &Recorder,
) -> Liveness {
    let want_voters = lab.voters;
    let mut problems;
    loop {
        supervised_sleep(lab, Instant::now(), rec).await;
        problems = Vec::new();
        let mut leaders = std::collections::BTreeSet::new();
        let mut placements: BTreeMap<String, std::collections::BTreeSet<(u64, u64)>> = BTreeMap::new();
        for h in &lab.hubs {
            let (s, ts) = match (h.client.status().await, h.client.tasks().await) {
                (Ok(s), Ok(ts)) => (s, ts),
                (Err(e), _) | (_, Err(e)) => {
                    problems.push(format!("{} does not answer: {e}", h.name()));
                    continue;
                }
            };
            leaders.insert(s.leader);
            if s.voters.len() != want_voters {
                problems.push(format!("{} sees {} voters, not {want_voters}", h.name(), s.voters.len()));
            }
            let down: Vec<&str> = s.nodes.iter().filter(|n| n.role.contains("down")).map(|n| n.name.as_str()).collect();
            if !down.is_empty() {
                problems.push(format!("{} sees {} down", h.name(), down.join(",")));
            }
            for name in tasks.iter().map(String::as_str).chain(echo) {
                match ts.iter().find(|t| t.name == name) {
                    Some(t) if t.state == "running" => {
                        if let Some(p) = &t.placement {
                            placements.entry(name.to_owned()).or_default().insert((p.node_id, p.epoch));
                        }
                    }
                    Some(t) => problems.push(format!("{}: {name} is {} ({:?})", h.name(), t.state, t.reason)),
                    None => problems.push(format!("{}: {name} is missing", h.name())),
                }
            }
        }
        if leaders.len() != 1 || leaders.contains(&None) {
            problems.push(format!("the hubs name these leaders: {leaders:?}"));
        }
        for (name, seen) in &placements {
            if seen.len() > 1 {
                problems.push(format!("the hubs disagree on where {name} runs: {seen:?}"));
            }
        }
        if problems.is_empty() {
            return Liveness { reached_after_ms: Some(healed.elapsed().as_millis() as u64), problems };
        }
        if healed.elapsed() > max {
            return Liveness { reached_after_ms: None, problems };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads every counter task through every hub; the final list is the first successful read, and
/// hubs that answer a different list are reported.
async fn final_reads(
    lab: &mut Lab,
    counters: &[CounterTask],
    rec: &Recorder,
) -> (BTreeMap<String, Option<Vec<u64>>>, Vec<String>) {
    let mut finals = BTreeMap::new();
    let mut problems = Vec::new();
    let mut process = 1_000_000;
    for t in counters {
        let mut list: Option<Vec<u64>> = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..lab.hubs.len() {
            loop {
                process += 1;
                supervised_sleep(lab, Instant::now(), rec).await;
                let client = lab.hubs[i].client.clone();
                if let Some(l) = workload::read(&client, &t.name, i, process, rec).await {
                    match &list {
                        None => list = Some(l),
                        Some(first) if *first != l => problems.push(format!(
                            "{}: {} reads {} entries, another hub read {}",
                            t.name,
                            hub_name(i),
                            l.len(),
                            first.len()
                        )),
                        Some(_) => {}
                    }
                    break;
                }
                if Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        finals.insert(t.name.clone(), list);
    }
    (finals, problems)
}

/// How often each fault named in `spec` (`HUBMESH_FAULTS`) fired, summed over the hubs'
/// `hubmesh_faults_fired_total` counters.
async fn fired(lab: &Lab, spec: Option<&String>) -> BTreeMap<String, u64> {
    let Some(spec) = spec else { return BTreeMap::new() };
    let mut out: BTreeMap<String, u64> = spec
        .split(',')
        .filter_map(|f| f.trim().split(['@', '=']).next().filter(|n| !n.is_empty()))
        .map(|n| (n.to_owned(), 0))
        .collect();
    for h in &lab.hubs {
        // A crash point's counter dies with the process; its marker file stays in the data dir.
        for (name, count) in out.iter_mut().filter(|(n, _)| n.starts_with("crash-")) {
            if h.dir.join(format!("fault-crashed-{name}")).exists() {
                *count += 1;
            }
        }
        let text = h.client.metrics().await.unwrap_or_default();
        for line in text.lines().filter(|l| l.starts_with("hubmesh_faults_fired_total{")) {
            let name = line.split("fault=\"").nth(1).and_then(|r| r.split('"').next());
            let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if let (Some(name), Some(v)) = (name, value) {
                if let Some(c) = out.get_mut(name) {
                    *c += v as u64;
                }
            }
        }
    }
    out
}

/// The committed checkpoint of every counter task at the end.
async fn audit(lab: &Lab, counters: &[CounterTask]) -> BTreeMap<String, CheckpointAudit> {
    let wanted = 1 + 2.min(lab.task_hubs - 1);
    let mut out = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for t in counters {
        // Copies for a replaced holder arrive a moment after the mesh settles.
        let a = loop {
            let info = lab.hubs[0].client.task(&t.name).await.ok();
            let c = info.and_then(|i| i.committed);
            let a = CheckpointAudit {
                sequence: c.as_ref().map(|c| c.sequence),
                stored_on: c.map_or(0, |c| c.stored_on.len()),
                wanted,
            };
            if a.stored_on >= wanted || Instant::now() > deadline {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        out.insert(t.name.clone(), a);
    }
    out
}

/// Re-checks a finished run from its saved history and evidence.
pub fn recheck(dir: &Path) -> anyhow::Result<(Verdict, Vec<CheckResult>)> {
    let events = history::read_jsonl(&dir.join("history.jsonl"))?;
    let ev: Evidence =
        serde_json::from_slice(&std::fs::read(dir.join("evidence.json")).context("reading evidence.json")?)?;
    let results = check::check_all(&events, &ev);
    Ok((check::overall(&results), results))
}
