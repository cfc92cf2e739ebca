//! Scenario files (TOML): the lab, the workload, the faults and the bounds of one run.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One scenario, as read from `scenarios/*.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Seeds every random choice of the run (fault order, targets, operations). A run without one
    /// picks one and saves it.
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub lab: LabSpec,
    #[serde(default)]
    pub workload: WorkloadSpec,
    #[serde(default)]
    pub chaos: ChaosSpec,
    #[serde(default)]
    pub checks: ChecksSpec,
    /// Simulated LAN devices (lab runs only).
    #[serde(default)]
    pub devices: DevicesSpec,
    /// Drive hubs that already run (on a LAN) instead of building a lab; see [`LanSpec`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan: Option<LanSpec>,
    /// Scripted faults; when present they replace the random schedule.
    #[serde(default, rename = "step", skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabSpec {
    /// Hubs that run tasks (with `witness`, at least 2; in all 3 to 9).
    pub hubs: usize,
    /// One more hub started with `--witness`: it votes but runs no tasks.
    pub witness: bool,
    /// The hubs' timeout profile (`lan`, `wifi`, `wan`).
    pub profile: String,
    /// Extra environment for every hub (e.g. `HUBMESH_FAULTS` for the checkers' self-tests).
    pub env: std::collections::BTreeMap<String, String>,
}

impl Default for LabSpec {
    fn default() -> Self {
        Self { hubs: 3, witness: false, profile: "lan".into(), env: Default::default() }
    }
}

/// The run's simulated LAN devices (`hubmesh-devsim`, mDNS), each in its own device host: the
/// hubs must list every one that runs (I15) through every hub fault, and the device faults
/// (`device-vanish`, `device-move`) act on them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesSpec {
    /// How many (0: none, and no device faults).
    pub count: usize,
}

/// Hubs that already form a mesh, reached through their API; faults are the shell commands the
/// user allows per hub (e.g. `ssh root@hub2 systemctl kill -s KILL hubmesh`). No namespaces, no
/// firewall rules: only process faults (kill, restart, pauses).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanSpec {
    /// The API token (default: the `HUBMESH_TOKEN` environment variable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the token (e.g. a hub's `admin.token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<std::path::PathBuf>,
    #[serde(rename = "hub")]
    pub hubs: Vec<LanHub>,
}

/// One hub of a LAN run and the commands that act on its process (run with `sh -c`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanHub {
    /// Its API, e.g. `http://192.168.1.11:7070`.
    pub url: String,
    /// This hub's API token, if it differs from [`LanSpec::token`] (each hub makes its own
    /// `admin.token` on first start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<std::path::PathBuf>,
    /// SIGKILL the hub (for `kill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill: Option<String>,
    /// Stop it gracefully (for `restart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
    /// Start it again on its data dir (after `kill` or `stop`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// SIGSTOP it (for the pauses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<String>,
    /// SIGCONT it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

impl LanHub {
    /// The commands fault `kind` needs, if this hub has them all.
    pub fn allows(&self, kind: FaultKind) -> bool {
        match kind {
            FaultKind::Kill => self.kill.is_some() && self.start.is_some(),
            FaultKind::Restart => self.stop.is_some() && self.start.is_some(),
            FaultKind::PauseShort | FaultKind::PauseLong => self.pause.is_some() && self.resume.is_some(),
            _ => false,
        }
    }
}

/// Whether the counter clients send idempotency keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keys {
    Always,
    Never,
    /// The first counter task gets keys, the others none.
    Mixed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadSpec {
    /// Counter (oplog) tasks.
    pub counters: usize,
    pub keys: Keys,
    /// `durable` or `periodic`.
    pub mode: String,
    /// Checkpoint period in periodic mode.
    #[serde(with = "humantime_serde")]
    pub checkpoint_every: Duration,
    /// A stateless echo task as a control.
    pub echo: bool,
    /// Operations per second over all clients.
    pub rate_hz: f64,
    /// Concurrent clients.
    pub clients: usize,
    /// A call without an answer after this is of unknown outcome.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            counters: 2,
            keys: Keys::Mixed,
            mode: "durable".into(),
            checkpoint_every: Duration::from_millis(200),
            echo: true,
            rate_hz: 40.0,
            clients: 8,
            timeout: Duration::from_secs(8),
        }
    }
}

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL, healed by a restart on the same data dir.
    Kill,
    /// SIGTERM (the graceful path), then a restart.
    Restart,
    /// SIGSTOP for half the node-down time, then SIGCONT.
    PauseShort,
    /// SIGSTOP for the hold time (longer than node-down), then SIGCONT.
    PauseLong,
    /// Every packet between the target and the other hubs dropped.
    Isolate,
    /// A minority of hubs (the target among them) cut from the majority.
    Split,
    /// Hubs in a line: the two ends cannot talk, the middle one (the target) talks to both.
    Bridge,
    /// The target hears nobody but is heard by all (one-way).
    LeaderDeaf,
    /// Random drop of a share of the packets between the target and the others.
    Flaky,
    /// A device killed without a goodbye; healed by starting it again.
    DeviceVanish,
    /// A device taken to LAN B, which only the last task hub reaches; healed by bringing it back.
    DeviceMove,
    /// Not a fault but an action: a live migration of a counter task off its host (the target)
    /// to another hub, and three times in four a kill of the source or of the target (healed by
    /// a restart), or a cut between the two (healed by the rules' removal), 0-300 ms into it.
    Migrate,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::Restart => "restart",
            Self::PauseShort => "pause-short",
            Self::PauseLong => "pause-long",
            Self::Isolate => "isolate",
            Self::Split => "split",
            Self::Bridge => "bridge",
            Self::LeaderDeaf => "leader-deaf",
            Self::Flaky => "flaky",
            Self::Migrate => "migrate",
            Self::DeviceVanish => "device-vanish",
            Self::DeviceMove => "device-move",
        }
    }

    /// Whether the fault acts on a simulated device, not on a hub.
    pub fn is_device(self) -> bool {
        matches!(self, Self::DeviceVanish | Self::DeviceMove)
    }

    /// Whether the fault is made of firewall rules (else of signals).
    pub fn is_network(self) -> bool {
        matches!(self, Self::Isolate | Self::Split | Self::Bridge | Self::LeaderDeaf | Self::Flaky)
    }

    /// Whether the fault, on a task's host, should move the task (so the failover bound applies).
    pub fn takes_host_away(self) -> bool {
        matches!(self, Self::Kill | Self::PauseLong | Self::Isolate | Self::Split)
    }
}

/// How a fault picks its hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// A random hub.
    One,
    /// The Raft leader.
    Leader,
    /// The host of a random counter task.
    Host,
    /// A checkpoint holder of a random counter task.
    Holder,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Self::One => "one",
            Self::Leader => "leader",
            Self::Host => "host",
            Self::Holder => "holder",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChaosSpec {
    /// Load before the first fault.
    #[serde(with = "humantime_serde")]
    pub warmup: Duration,
    /// Length of the fault phase.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// How long a fault lasts.
    #[serde(with = "humantime_serde")]
    pub hold: Duration,
    /// Time between a heal and the next fault.
    #[serde(with = "humantime_serde")]
    pub gap: Duration,
    /// Fault kinds, used in a seeded random order, each at least once when time allows.
    pub faults: Vec<FaultKind>,
    /// Targets a fault may pick from.
    pub targets: Vec<Target>,
    /// Share of packets a flaky link drops.
    pub flaky_drop_percent: u8,
}

impl Default for ChaosSpec {
    fn default() -> Self {
        Self {
            warmup: Duration::from_secs(5),
            duration: Duration::from_secs(60),
            hold: Duration::from_secs(3),
            gap: Duration::from_secs(5),
            faults: vec![
                FaultKind::Kill,
                FaultKind::PauseLong,
                FaultKind::PauseShort,
                FaultKind::Isolate,
                FaultKind::Split,
                FaultKind::Bridge,
                FaultKind::LeaderDeaf,
                FaultKind::Flaky,
            ],
            targets: vec![Target::Host, Target::Leader, Target::One, Target::Holder],
            flaky_drop_percent: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksSpec {
    /// A task whose host a fault took away answers again within this (I10).
    #[serde(with = "humantime_serde")]
    pub failover_max: Duration,
    /// After the final heal: one leader, every task running, all hubs agree, within this (I11).
    #[serde(with = "humantime_serde")]
    pub liveness_max: Duration,
    /// A task answers at least this often while no fault touches its host or the leader (I14);
    /// unset: `failover_max`.
    #[serde(with = "humantime_serde")]
    pub untouched_gap_max: Option<Duration>,
}

impl Default for ChecksSpec {
    fn default() -> Self {
        Self { failover_max: Duration::from_secs(10), liveness_max: Duration::from_secs(45), untouched_gap_max: None }
    }
}

/// One scripted fault.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// From the end of the warm-up.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    pub fault: FaultKind,
    #[serde(default = "default_target")]
    pub target: Target,
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub hold: Option<Duration>,
}

fn default_target() -> Target {
    Target::One
}

/// Why a scenario file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: String, source: Box<toml::de::Error> },
    #[error("{1}: {0}")]
    Invalid(String, String),
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { path: p.clone(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ScenarioError::Parse { source, .. } => ScenarioError::Parse { path: p.clone(), source },
            ScenarioError::Invalid(m, _) => ScenarioError::Invalid(m, p.clone()),
            other => other,
        })
    }

    /// Parses and checks scenario text.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let s: Self =
            toml::from_str(text).map_err(|e| ScenarioError::Parse { path: "scenario".into(), source: Box::new(e) })?;
        s.validate().map_err(|m| ScenarioError::Invalid(m, "scenario".into()))?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(lan) = &self.lan {
            if lan.hubs.len() < 2 {
                return Err("lan needs at least two [[lan.hub]] entries".into());
            }
            let kinds: Vec<FaultKind> =
                self.chaos.faults.iter().copied().chain(self.steps.iter().map(|s| s.fault)).collect();
            for k in kinds {
                if k.is_network() {
                    return Err(format!("{} needs the lab's firewall; a lan run has only process faults", k.name()));
                }
                if let Some(h) = lan.hubs.iter().find(|h| !h.allows(k)) {
                    return Err(format!(
                        "{} needs commands the lan hub {} does not give (kill/stop/start/pause/resume)",
                        k.name(),
                        h.url
                    ));
                }
            }
        } else {
            let total = self.lab.hubs + usize::from(self.lab.witness);
            if !(3..=9).contains(&total) || self.lab.hubs < 2 {
                return Err(format!(
                    "lab.hubs is {} (witness: {}); the lab runs 3 to 9 hubs, at least 2 of them running tasks",
                    self.lab.hubs, self.lab.witness
                ));
            }
        }
        if self.profile().is_none() {
            return Err(format!("lab.profile {:?} is not lan, wifi or wan", self.lab.profile));
        }
        if !["durable", "periodic"].contains(&self.workload.mode.as_str()) {
            return Err(format!("workload.mode {:?} is not durable or periodic", self.workload.mode));
        }
        if self.workload.counters == 0 && !self.workload.echo {
            return Err("the workload has no task: set workload.counters or workload.echo".into());
        }
        if !(self.workload.rate_hz > 0.0 && self.workload.rate_hz <= 1000.0) {
            return Err("workload.rate_hz must be in (0, 1000]".into());
        }
        if self.workload.clients == 0 || self.workload.clients > 256 {
            return Err("workload.clients must be 1 to 256".into());
        }
        let kinds = || self.chaos.faults.iter().copied().chain(self.steps.iter().map(|s| s.fault));
        if let Some(k) = kinds().find(|k| k.is_device()) {
            if self.devices.count == 0 || self.lan.is_some() {
                return Err(format!("{} needs simulated devices: a lab run with devices.count above 0", k.name()));
            }
        }
        if self.devices.count > 64 {
            return Err("devices.count must be at most 64".into());
        }
        if self.chaos.targets.is_empty() {
            return Err("chaos.targets is empty".into());
        }
        if self.chaos.duration > Duration::from_secs(24 * 3600) {
            return Err("chaos.duration is over a day".into());
        }
        if self.chaos.flaky_drop_percent == 0 || self.chaos.flaky_drop_percent > 100 {
            return Err("chaos.flaky_drop_percent must be 1 to 100".into());
        }
        Ok(())
    }

    fn profile(&self) -> Option<hubmesh::config::Profile> {
        <hubmesh::config::Profile as clap::ValueEnum>::from_str(&self.lab.profile, true).ok()
    }

    /// The profile's node-down time, as hubmesh resolves it: a pause shorter than it must not
    /// move tasks.
    pub fn node_down(&self) -> Duration {
        let profile = self.profile().unwrap_or_default();
        hubmesh::config::Timeouts { profile, ..Default::default() }.resolve().node_down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Scenario::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 5, "only {n} scenarios shipped");
    }

    #[test]
    fn bad_scenarios_are_refused_with_the_reason() {
        let e = Scenario::parse("name = \"x\"\n[lab]\nhubs = 2\n").unwrap_err().to_string();
        assert!(e.contains("3 to 9"), "{e}");
        let e = Scenario::parse("name = \"x\"\n[chaos]\nfaults = [\"meteor\"]\n").unwrap_err().to_string();
        assert!(e.contains("meteor"), "{e}");
        let lan = "name = \"x\"\n[chaos]\nfaults = [\"kill\"]\n[[lan.hub]]\nurl = \"http://a:7070\"\nkill = \"k\"\n[[lan.hub]]\nurl = \"http://b:7070\"\nkill = \"k\"\nstart = \"s\"\n";
        let e = Scenario::parse(lan).unwrap_err().to_string();
        assert!(e.contains("http://a:7070"), "a hub without a start command cannot be killed: {e}");
        let e = Scenario::parse(&lan.replace("faults = [\"kill\"]", "faults = [\"isolate\"]")).unwrap_err().to_string();
        assert!(e.contains("firewall"), "{e}");
        let e = Scenario::parse("name = \"x\"\nsurprise = 1\n").unwrap_err().to_string();
        assert!(e.contains("surprise"), "{e}");
        let e = Scenario::parse("name = \"x\"\n[workload]\ncounters = 0\necho = false\n").unwrap_err().to_string();
        assert!(e.contains("no task"), "{e}");
    }
}
