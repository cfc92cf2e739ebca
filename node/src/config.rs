//! The hub's configuration: embedded defaults, then a TOML file (`--config`), then `HUBMESH_*`
//! environment variables and flags (clap reads both). `hubmesh config show` prints the result.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// Everything a hub needs to run. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the hub keeps its state (Raft log, modules, checkpoints, token). Default: the
    /// user's data directory + `/hubmesh` (e.g. `~/.local/share/hubmesh`).
    pub data_dir: PathBuf,
    /// The hub's name, shown in listings. Default: the host name.
    pub name: String,
    /// Address of the HTTP API. Port 0 picks a free port (written to `DATA_DIR/api.addr`).
    pub api: SocketAddr,
    /// Address of the mesh endpoint (QUIC over UDP, mutual TLS). Other hubs must be able to reach
    /// it: use the hub's LAN address to form a mesh. Port 0 picks one (`DATA_DIR/mesh.addr`).
    pub mesh: SocketAddr,
    /// Address of the gossip endpoint (libp2p over TCP: hub discovery on the LAN, loads).
    /// Default: the mesh address's host, port 7072 (port 0 when the mesh's is 0; the bound
    /// address is written to `DATA_DIR/gossip.addr`).
    pub gossip: Option<SocketAddr>,
    /// Labels for placement constraints, e.g. `room = "attic"`.
    pub labels: BTreeMap<String, String>,
    /// How many task instances this hub offers to run.
    pub slots: u32,
    /// Memory this hub offers to task instances: the scheduler places an instance only where the
    /// memory caps of the instances already there plus its own fit. Default: half the machine's RAM.
    pub task_memory: Option<ByteSize>,
    /// CPU cores this hub offers to tasks: its load is the CPU time its tasks use against this.
    /// Default: the machine's cores.
    pub task_cpus: Option<u32>,
    /// When the mesh moves tasks off a hub that is overloaded.
    pub overload: OverloadConfig,
    /// Limits of the WebAssembly engine.
    pub executor: ExecutorConfig,
    /// Defaults for tasks deployed without explicit limits.
    pub task_defaults: TaskDefaults,
    /// Timeouts of the mesh (`profile = "lan" | "wifi" | "wan"`, overrides one by one).
    pub timeouts: Timeouts,
    /// A witness votes in Raft but never runs tasks (a tiny third hub for two real ones).
    pub witness: bool,
    /// Discovery of the LAN's devices (runs only when the mesh address is not loopback).
    pub devices: DevicesConfig,
}

/// Device discovery (design §8): what a hub looks for on its LAN. A hub whose mesh address is
/// loopback has no LAN and discovers nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    /// The mDNS/DNS-SD service types browsed, e.g. `_hap._tcp` (HomeKit). Empty: no mDNS browsing.
    pub mdns_types: Vec<String>,
    /// Whether the hub searches for UPnP devices by SSDP (UDP 1900) too.
    pub ssdp: bool,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        Self { mdns_types: crate::devices::mdns::DEFAULT_TYPES.iter().map(|t| (*t).to_owned()).collect(), ssdp: true }
    }
}

/// Migrate on overload (design §7): the leader moves tasks, by live migration, off a hub whose
/// load stays above `high` for `window`, to hubs below `low`. A hub's load is the largest of: the
/// CPU time its tasks use against `task_cpus`, the memory their instances hold against
/// `task_memory`, and the mean queue wait of its calls against `queue_wait`. The leader's values
/// are the ones in force.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverloadConfig {
    /// Whether the mesh sheds load at all (tasks deployed with `--pin` never move for it).
    pub enabled: bool,
    /// Above this load (a fraction, 0.85 = 85 %) a hub is overloaded.
    pub high: f64,
    /// Only a hub below this load takes a task, and only if the task does not take it above `high`.
    pub low: f64,
    /// How long a hub must stay above `high` before it sheds a task (and between two sheds).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// A task that migrated is not moved for load again before this.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// A mean queue wait this long counts as a fully loaded hub.
    #[serde(with = "humantime_serde")]
    pub queue_wait: Duration,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            high: 0.85,
            low: 0.60,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(120),
            queue_wait: Duration::from_millis(100),
        }
    }
}

/// Limits of the WebAssembly engine on this hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorConfig {
    /// Instances the engine can hold at once (sizes the pooling allocator).
    pub max_instances: u32,
    /// The largest memory cap a task may ask for.
    pub max_task_memory: ByteSize,
    /// The largest module accepted by deploy.
    pub max_module_size: ByteSize,
}

/// Limits applied to a task deployed without its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskDefaults {
    /// Memory cap.
    pub memory: ByteSize,
    /// CPU deadline of one invocation.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest input.
    pub max_input: ByteSize,
    /// Largest output.
    pub max_output: ByteSize,
    /// Invocations that may wait for a stateful instance (or run at once on a stateless one).
    pub queue: u32,
    /// Interval of `hm_tick` for tasks that export it.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
}

/// A named set of timeouts for the network the hubs share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Wired LAN (default): failover in a few seconds.
    #[default]
    Lan,
    /// Home Wi-Fi: tolerates hundreds of milliseconds of jitter.
    Wifi,
    /// Hubs across sites: slow and patient.
    Wan,
}

/// Timeouts of the mesh: a profile, and optional overrides of its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// `lan`, `wifi` or `wan`.
    pub profile: Profile,
    /// Raft heartbeat interval.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Option<Duration>,
    /// Raft election timeout (lower bound; the upper bound is twice this).
    #[serde(with = "humantime_serde")]
    pub election: Option<Duration>,
    /// A hub stops answering for its instances this long after a quorum last acknowledged its
    /// leader (as the leader's last append it took says; as leader, its own quorum).
    #[serde(with = "humantime_serde")]
    pub lease: Option<Duration>,
    /// The leader marks a hub down (and re-places its instances) after this long without contact.
    /// Must be longer than the lease.
    #[serde(with = "humantime_serde")]
    pub node_down: Option<Duration>,
    /// How long a state change may take before its outcome is reported as unknown.
    #[serde(with = "humantime_serde")]
    pub propose: Duration,
}

/// The timeouts in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedTimeouts {
    pub heartbeat: Duration,
    pub election: Duration,
    pub lease: Duration,
    pub node_down: Duration,
    pub propose: Duration,
}

impl Timeouts {
    /// The profile's values with the overrides applied.
    pub fn resolve(&self) -> ResolvedTimeouts {
        let ms = Duration::from_millis;
        let (heartbeat, election, lease, node_down) = match self.profile {
            Profile::Lan => (ms(30), ms(100), ms(600), ms(1000)),
            Profile::Wifi => (ms(100), ms(400), ms(2000), ms(4000)),
            Profile::Wan => (ms(300), ms(1500), ms(8000), ms(15000)),
        };
        ResolvedTimeouts {
            heartbeat: self.heartbeat.unwrap_or(heartbeat),
            election: self.election.unwrap_or(election),
            lease: self.lease.unwrap_or(lease),
            node_down: self.node_down.unwrap_or(node_down),
            propose: self.propose,
        }
    }
}

/// Timeouts that would let two hubs answer for one instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsafeTimeouts {
    /// A cut-off host must stop answering before the leader re-places its instances.
    #[error("the lease ({lease:?}) must be shorter than node_down ({node_down:?})")]
    LeaseNotShorter { lease: Duration, node_down: Duration },
    /// A new leader marks the leader it replaced down as early as `node_down / 2` after its
    /// election; the old leader answers until `lease` after its last quorum acknowledgement,
    /// which came at least `election_max` (openraft's vote lease) before the vote that elected
    /// the new one.
    #[error(
        "the lease ({lease:?}) must be shorter than half of node_down ({node_down:?}) plus twice the election timeout ({election:?}): a new leader may mark the previous one down that soon"
    )]
    LeaseOutlastsLeaderChange { lease: Duration, node_down: Duration, election: Duration },
}

impl ResolvedTimeouts {
    /// Whether a cut-off host always stops answering before its instances can run elsewhere.
    pub fn check(&self) -> Result<(), UnsafeTimeouts> {
        let (lease, node_down, election) = (self.lease, self.node_down, self.election);
        if lease >= node_down {
            return Err(UnsafeTimeouts::LeaseNotShorter { lease, node_down });
        }
        if lease >= node_down / 2 + election * 2 {
            return Err(UnsafeTimeouts::LeaseOutlastsLeaderChange { lease, node_down, election });
        }
        Ok(())
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            profile: Profile::Lan,
            heartbeat: None,
            election: None,
            lease: None,
            node_down: None,
            propose: Duration::from_secs(5),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            name: default_name(),
            api: SocketAddr::from(([127, 0, 0, 1], 7070)),
            mesh: SocketAddr::from(([127, 0, 0, 1], 7071)),
            gossip: None,
            labels: BTreeMap::new(),
            slots: 128,
            task_memory: None,
            task_cpus: None,
            overload: OverloadConfig::default(),
            executor: ExecutorConfig::default(),
            task_defaults: TaskDefaults::default(),
            timeouts: Timeouts::default(),
            witness: false,
            devices: DevicesConfig::default(),
        }
    }
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self { max_instances: 256, max_task_memory: ByteSize::gib(1), max_module_size: ByteSize::mib(32) }
    }
}

impl Default for TaskDefaults {
    fn default() -> Self {
        Self {
            memory: ByteSize::mib(64),
            timeout: Duration::from_secs(1),
            max_input: ByteSize::mib(1),
            max_output: ByteSize::mib(1),
            queue: 64,
            tick: Duration::from_secs(1),
        }
    }
}

/// The machine's cores (1 where they cannot be read), read once: the load meter and the leader
/// ask every round, and each read is five files of /proc and the cgroup.
pub fn machine_cpus() -> u32 {
    static CPUS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
}

/// Half of `MemTotal` from `/proc/meminfo` (1 GiB where it cannot be read), read once.
pub fn half_of_ram() -> ByteSize {
    static HALF: std::sync::OnceLock<ByteSize> = std::sync::OnceLock::new();
    *HALF.get_or_init(|| {
        let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        });
        total_kib.map_or(ByteSize::gib(1), |kib| ByteSize::b(kib * 1024 / 2))
    })
}

/// The default data directory: `$XDG_DATA_HOME/hubmesh` or `~/.local/share/hubmesh`.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir().unwrap_or_else(|| PathBuf::from(".")).join("hubmesh")
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "hub".to_owned())
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        toml::to_string_pretty(self).context("encoding the configuration")
    }

    /// The gossip endpoint's address: the configured one, or the mesh's host with port 7072
    /// (0 when the mesh's port is 0: tests run many hubs on one machine).
    pub fn gossip_addr(&self) -> SocketAddr {
        self.gossip.unwrap_or_else(|| {
            let port = if self.mesh.port() == 0 { 0 } else { 7072 };
            SocketAddr::new(self.mesh.ip(), port)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_unknown_fields_fail() {
        let c = Config::default();
        let text = c.to_toml().unwrap();
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), c);
        assert!(toml::from_str::<Config>("apii = \"127.0.0.1:1\"").is_err());
        let partial: Config = toml::from_str("[task_defaults]\ntimeout = \"250ms\"\nmemory = \"8 MiB\"").unwrap();
        assert_eq!(partial.task_defaults.timeout, Duration::from_millis(250));
        assert_eq!(partial.task_defaults.memory, ByteSize::mib(8));
        assert_eq!(partial.api, c.api);
    }

    #[test]
    fn every_profile_is_safe_and_a_lease_that_outlasts_a_leader_change_is_refused() {
        for profile in [Profile::Lan, Profile::Wifi, Profile::Wan] {
            let t = Timeouts { profile, ..Timeouts::default() };
            assert_eq!(t.resolve().check(), Ok(()), "{profile:?}");
        }
        let ms = Duration::from_millis;
        let lan = |lease, node_down| {
            Timeouts { lease: Some(ms(lease)), node_down: Some(ms(node_down)), ..Timeouts::default() }.resolve().check()
        };
        assert!(matches!(lan(1000, 1000), Err(UnsafeTimeouts::LeaseNotShorter { .. })));
        // lan: election 100 ms, so a leader change may mark the old leader down 700 ms on.
        assert!(matches!(lan(900, 1000), Err(UnsafeTimeouts::LeaseOutlastsLeaderChange { .. })));
        assert!(matches!(lan(700, 1000), Err(UnsafeTimeouts::LeaseOutlastsLeaderChange { .. })));
        assert_eq!(lan(699, 1000), Ok(()));
        assert_eq!(lan(900, 30_000), Ok(()), "the tests' long node_down");
    }
}
