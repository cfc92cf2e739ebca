//! The hubs' loads: each hub measures what its tasks cost it once a second and publishes the
//! figures on the gossip plane; every hub keeps the latest report of each, in memory only (a load
//! is stale in seconds: it never goes to Raft). `node list` shows them; the leader's migration
//! policy (`migration::policy`) reads them.
//!
//! ```text
//!  executor meters (CPU, queue wait, memory: `executor::meter`) --1 s--> LoadMeter: differences
//!    --> this hub's report --gossip--> every member --> Loads (by the signer's membership)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubmesh_consensus::NodeId;
use hubmesh_proto::pb;

use crate::executor::MeterReading;
use crate::hub::Hub;
use crate::worker::Worker;

/// How often a hub measures and reports.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);
/// A report older than this says nothing any more (the hub stopped reporting or is cut off).
pub(crate) const FRESH: Duration = Duration::from_secs(4);
/// Most tasks one report lists (the heaviest first); a report stays a small message.
const MAX_TASKS: usize = 256;

/// The latest report of each hub, this one's included.
#[derive(Default)]
pub(crate) struct Loads {
    latest: Mutex<HashMap<NodeId, (Instant, pb::LoadReport)>>,
}

impl Loads {
    /// Keeps `report` as `from`'s latest (bounded: one per member, `MAX_TASKS` tasks each).
    pub(crate) fn record(&self, from: NodeId, mut report: pb::LoadReport) {
        report.tasks.truncate(MAX_TASKS);
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).insert(from, (Instant::now(), report));
    }

    /// `node`'s latest report and its age.
    pub(crate) fn get(&self, node: NodeId) -> Option<(Duration, pb::LoadReport)> {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        latest.get(&node).map(|(at, r)| (at.elapsed(), r.clone()))
    }

    /// The reports younger than [`FRESH`].
    pub(crate) fn fresh(&self) -> BTreeMap<NodeId, pb::LoadReport> {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        latest.iter().filter(|(_, (at, _))| at.elapsed() <= FRESH).map(|(n, (_, r))| (*n, r.clone())).collect()
    }

    /// Forgets hubs that are no longer members.
    pub(crate) fn retain(&self, keep: impl Fn(NodeId) -> bool) {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).retain(|n, _| keep(*n));
    }
}

/// The worker that measures this hub's load and sends it around.
pub(crate) struct LoadMeter {
    hub: Arc<Hub>,
    last: Option<(Instant, HashMap<String, MeterReading>)>,
}

impl LoadMeter {
    pub(crate) fn new(hub: Arc<Hub>) -> Self {
        Self { hub, last: None }
    }
}

impl Worker for LoadMeter {
    fn name(&self) -> &'static str {
        "load"
    }

    async fn work(&mut self) -> Result<(), String> {
        let now = Instant::now();
        let readings: HashMap<String, MeterReading> = self.hub.executor().meters().into_iter().collect();
        let Some((then, before)) = self.last.replace((now, readings.clone())) else { return Ok(()) };
        let config = self.hub.config();
        let offered_memory = config.task_memory.unwrap_or_else(crate::config::half_of_ram).as_u64();
        let report = measure(
            now.duration_since(then),
            &before,
            &readings,
            config.task_cpus.unwrap_or_else(crate::config::machine_cpus),
            offered_memory,
            self.hub.migrations().staged_memory_bytes(),
            cpu_pressure(),
        );
        metrics::gauge!("hubmesh_hub_load", "kind" => "cpu").set(f64::from(report.cpu_permille) / 1000.0);
        metrics::gauge!("hubmesh_hub_load", "kind" => "memory").set(f64::from(report.memory_permille) / 1000.0);
        metrics::gauge!("hubmesh_hub_load_queue_wait_seconds").set(report.queue_wait_us as f64 / 1e6);
        let hub = &self.hub;
        let me = hub.consensus().node_id();
        hub.loads().record(me, report.clone());
        let state = hub.consensus().state();
        hub.loads().retain(|n| state.nodes.contains_key(&n));
        hub.gossip().publish(pb::gossip_message::Body::Load(report));
        Ok(())
    }

    async fn wait(&mut self) {
        tokio::time::sleep(INTERVAL).await;
    }
}

/// The report for one interval of `dt`, from the meters' readings at its start and end, with
/// `staged_memory` held for migrations to this hub (in the hub's memory, in no task's). Pure.
fn measure(
    dt: Duration,
    before: &HashMap<String, MeterReading>,
    after: &HashMap<String, MeterReading>,
    task_cpus: u32,
    offered_memory: u64,
    staged_memory: u64,
    cpu_pressure: Option<u32>,
) -> pb::LoadReport {
    let dt_ns = dt.as_nanos().max(1) as f64;
    let (mut cpu_ns, mut memory) = (0u64, staged_memory);
    let mut tasks = Vec::new();
    for (name, now) in after {
        // A task that started during the interval counts from zero.
        let was = before.get(name).copied().unwrap_or_default();
        let cpu = now.cpu_ns.saturating_sub(was.cpu_ns);
        let waits = now.waits.saturating_sub(was.waits);
        let wait_ns = now.wait_ns.saturating_sub(was.wait_ns);
        cpu_ns += cpu;
        memory += now.memory_bytes;
        tasks.push(pb::TaskLoad {
            name: name.clone(),
            cpu_millicores: (cpu as f64 * 1000.0 / dt_ns).round() as u32,
            memory_bytes: now.memory_bytes,
            queue_wait_us: wait_ns.checked_div(waits).map_or(0, |w| w / 1000),
        });
    }
    tasks.sort_by(|a, b| b.cpu_millicores.cmp(&a.cpu_millicores).then_with(|| a.name.cmp(&b.name)));
    let worst_wait = tasks.iter().map(|t| t.queue_wait_us).max().unwrap_or(0);
    tasks.truncate(MAX_TASKS);
    let permille = |x: f64| (x * 1000.0).round().clamp(0.0, f64::from(u32::MAX)) as u32;
    pb::LoadReport {
        interval_ms: dt.as_millis() as u32,
        task_cpus,
        cpu_permille: permille(cpu_ns as f64 / (dt_ns * f64::from(task_cpus.max(1)))),
        memory_permille: permille(memory as f64 / offered_memory.max(1) as f64),
        queue_wait_us: worst_wait,
        cpu_pressure,
        tasks,
    }
}

/// The machine's CPU pressure, `some avg10` of `/proc/pressure/cpu` in hundredths of a percent
/// (None where Linux does not offer pressure stall information).
fn cpu_pressure() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    parse_pressure(&text)
}

fn parse_pressure(text: &str) -> Option<u32> {
    let some = text.lines().find(|l| l.starts_with("some "))?;
    let avg10 = some.split_whitespace().find_map(|f| f.strip_prefix("avg10="))?;
    let pct: f64 = avg10.parse().ok()?;
    Some((pct * 100.0).round() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(cpu_ms: u64, wait_ms: u64, waits: u64, memory: u64) -> MeterReading {
        MeterReading { cpu_ns: cpu_ms * 1_000_000, wait_ns: wait_ms * 1_000_000, waits, memory_bytes: memory }
    }

    #[test]
    fn load_is_the_cpu_used_against_the_cpu_offered() {
        let before =
            HashMap::from([("a".to_owned(), reading(1000, 0, 0, 0)), ("gone".to_owned(), reading(5, 0, 0, 0))]);
        let after = HashMap::from([
            ("a".to_owned(), reading(1900, 30, 10, 4 << 20)),
            ("new".to_owned(), reading(300, 10, 10, 0)),
        ]);
        let r = measure(Duration::from_secs(1), &before, &after, 2, 64 << 20, 0, Some(125));
        // 900 ms + 300 ms of CPU in 1 s against 2 cores: 60 %.
        assert_eq!(r.cpu_permille, 600);
        // 4 MiB of 64 MiB.
        assert_eq!(r.memory_permille, 63);
        // a: 30 ms over 10 calls, new: 10 ms over 10 calls; the hub shows its longest queue.
        assert_eq!(r.queue_wait_us, 3000);
        assert_eq!(r.tasks.iter().map(|t| t.queue_wait_us).collect::<Vec<_>>(), [3000, 1000]);
        assert_eq!(r.cpu_pressure, Some(125));
        let names: Vec<(&str, u32)> = r.tasks.iter().map(|t| (t.name.as_str(), t.cpu_millicores)).collect();
        assert_eq!(names, [("a", 900), ("new", 300)]);
    }

    #[test]
    fn staged_migrations_count_in_the_memory_but_in_no_task() {
        let after = HashMap::from([("a".to_owned(), reading(0, 0, 0, 4 << 20))]);
        let r = measure(Duration::from_secs(1), &HashMap::new(), &after, 1, 64 << 20, 28 << 20, None);
        // 4 MiB of the task's and 28 MiB staged, of 64 MiB: half.
        assert_eq!(r.memory_permille, 500);
        assert_eq!(r.tasks.len(), 1);
        assert_eq!(r.tasks[0].memory_bytes, 4 << 20);
        let idle = measure(Duration::from_secs(1), &HashMap::new(), &HashMap::new(), 1, 64 << 20, 16 << 20, None);
        assert_eq!((idle.memory_permille, idle.tasks.len()), (250, 0));
    }

    #[test]
    fn pressure_is_read_from_the_some_line() {
        let text =
            "some avg10=12.34 avg60=1.00 avg300=0.50 total=123\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_pressure(text), Some(1234));
        assert_eq!(parse_pressure("garbage"), None);
    }
}
