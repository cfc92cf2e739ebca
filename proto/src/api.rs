//! JSON bodies of the HTTP API. Field names are the public contract documented in `docs/api.md`;
//! add fields, never rename them.

use serde::{Deserialize, Serialize};

/// The one error shape of the API: every non-2xx answer carries it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// A stable snake_case code, e.g. `not_found` or `payload_too_large`.
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// What to do about it, when there is something to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Whether a task keeps memory across invocations.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// One instance whose memory persists; invocations are queued and run one at a time.
    Stateful,
    /// A pool of interchangeable instances; invocations run concurrently.
    Stateless,
}

/// How a stateful task's state is saved.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointMode {
    /// No checkpoints: the state lives only in memory.
    None,
    /// A checkpoint every `checkpoint_every_ms` while the state changes.
    Periodic,
    /// Every invocation's state is on disk before its answer is sent.
    Durable,
}

/// Query parameters of `POST/PUT /v1/tasks/{name}`; the body is the module (`.wasm` or `.wat`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeployParams {
    /// Deploy a stateful task (default: stateless).
    #[serde(default)]
    pub stateful: bool,
    /// Durable checkpoints (implies stateful).
    #[serde(default)]
    pub durable: bool,
    /// Periodic checkpoints, a humantime duration such as `5s` (implies stateful).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<String>,
    /// Memory cap, e.g. `64MiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU deadline per invocation, e.g. `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Largest accepted input, e.g. `1MiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_input: Option<String>,
    /// Largest output the task may return, e.g. `1MiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output: Option<String>,
    /// How many invocations may wait for a stateful instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    /// Interval of the `hm_tick` entry, e.g. `1s`, for tasks that export it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tick: Option<String>,
    /// Placement constraints, `key=value[,key=value]`: only hubs with these labels run the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<String>,
    /// Instances of a stateless task, each on its own hub (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Hubs besides the host that keep each checkpoint of a stateful task (default 2); a commit
    /// waits for all of them but one (at least one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_state: Option<u32>,
    /// Never moved off its hub by the overload policy (an operator's migration, a drain or a
    /// failover still move it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pin: bool,
    /// Place it only on hubs that see this device (an id from `GET /v1/devices`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near: Option<String>,
}

/// Limits of a task, as applied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitsInfo {
    pub memory_bytes: u64,
    pub timeout_ms: u64,
    pub max_input_bytes: u64,
    pub max_output_bytes: u64,
    pub queue: u32,
}

/// Where a task instance runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlacementInfo {
    pub node_id: u64,
    pub node_name: String,
    pub epoch: u64,
}

/// The last checkpoint a hub holds for a stateful task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub sequence: u64,
    pub epoch: u64,
    pub age_ms: u64,
    /// Bytes of the non-zero pages the checkpoint refers to.
    pub size_bytes: u64,
    pub pages: u32,
    /// Invocations the checkpointed state includes.
    pub invocations: u64,
}

/// The checkpoint the mesh has committed for a stateful task (what a failover restores).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommittedCheckpointInfo {
    pub sequence: u64,
    pub epoch: u64,
    pub age_ms: u64,
    pub size_bytes: u64,
    /// Hubs that store it (its host first).
    pub stored_on: Vec<u64>,
}

/// One placement or failover of a task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistoryInfo {
    pub at_ms: u64,
    pub instance: u32,
    pub node_id: u64,
    pub node_name: String,
    pub epoch: u64,
    /// `placed`, `failover`, `moved`, `updated`; for a live migration `manual`, `drain`,
    /// `overload`, or `aborted` (nothing moved).
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_sequence: Option<u64>,
    /// Set for a live migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationEventInfo>,
}

/// A live migration under way.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationProgressInfo {
    pub id: u64,
    /// `manual`, `drain` or `overload`.
    pub reason: String,
    pub from_node_id: u64,
    pub to_node_id: u64,
    pub started_ms: u64,
}

/// A live migration in a task's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationEventInfo {
    /// Why it moved: `manual`, `drain` or `overload`.
    pub reason: String,
    pub from_node_id: u64,
    pub from_node_name: String,
    pub to_node_id: u64,
    pub to_node_name: String,
    pub rounds: u32,
    pub bytes: u64,
    pub precopy_ms: u64,
    /// From the freeze on the source until the target served and the held calls were released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_us: Option<u64>,
    /// Why it was given up, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted: Option<String>,
}

/// One task as `task list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskInfo {
    pub name: String,
    pub version: u64,
    pub kind: TaskKind,
    pub checkpoint: CheckpointMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tick_ms: Option<u64>,
    /// Placement constraints (labels the host must have).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub constraints: std::collections::BTreeMap<String, String>,
    /// blake3 of the module as run (after hubmesh's instrumentation), hex.
    pub module_hash: String,
    /// blake3 of the module as uploaded, hex.
    pub source_hash: String,
    pub limits: LimitsInfo,
    /// `running`, `starting`, `pending` or `failed`. `starting` with a `reason`: the start failed
    /// for a reason of the hub's (its compiler program, its disk) and is tried again; `failed`:
    /// the task's own (the module does not load here), not tried again before a new version.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementInfo>,
    /// Instances wanted (stateless replicas; 1 for a stateful task).
    #[serde(default = "one")]
    pub replicas: u32,
    /// Never moved by the overload policy (`task deploy --pin`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    /// Placed only on hubs that see this device (`task deploy --near`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near: Option<String>,
    /// A live migration under way (begun, neither committed nor given up yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationProgressInfo>,
    /// Where every placed instance runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<PlacementInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointInfo>,
    /// Invocations answered by this hub's instance since it started.
    pub invocations: u64,
    /// Invocations running on this hub right now (stateless tasks).
    #[serde(default)]
    pub in_flight: u32,
    /// Hubs the leader chose to keep the task's checkpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<CommittedCheckpointInfo>,
    /// Placements and failovers, oldest first (the last 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryInfo>,
}

fn one() -> u32 {
    1
}

/// Answer to a deploy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeployResponse {
    pub task: TaskInfo,
    /// True for a new task, false for a new version of an existing one.
    pub created: bool,
}

/// Answer to `POST /v1/tasks/{name}/checkpoint`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointResponse {
    pub checkpoint: CheckpointInfo,
}

/// Body of `POST /v1/tasks/{name}/migrate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The hub to move to, by name or id; absent: the scheduler picks one (preferring a hub that
    /// already stores the task's checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// Answer to `POST /v1/tasks/{name}/migrate`: where the task went and what it cost.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationInfo {
    pub task: String,
    pub from_node_id: u64,
    pub from_node_name: String,
    pub to_node_id: u64,
    pub to_node_name: String,
    /// The placement epoch the task runs at on the target.
    pub epoch: u64,
    /// From the freeze on the source until the target serves and the source has released the
    /// calls it held meanwhile; 0 when the target could not say (it died right after the commit;
    /// failover took over).
    pub pause_us: u64,
    /// Pre-copy rounds, the final one included.
    pub rounds: u32,
    /// Page bytes sent to the target.
    pub bytes: u64,
    /// From the begin to the freeze.
    pub precopy_ms: u64,
    /// The whole migration.
    pub duration_ms: u64,
    /// The pause's parts, from the freeze: the source had the final state (`frozen_us`), the
    /// target and the source had stored it (`stored_us`), the source heard the switch
    /// committed (`committed_us`).
    #[serde(default)]
    pub frozen_us: u64,
    #[serde(default)]
    pub stored_us: u64,
    #[serde(default)]
    pub committed_us: u64,
    /// From the freeze too, as the target measured them from a request sent once the final
    /// state was stored (approximate: low by its transit, high when it came after the fact):
    /// the target had applied the commit, and the task ran there. `pause_us` ends once the
    /// task runs there and the source has released the calls it held.
    #[serde(default)]
    pub applied_us: u64,
    #[serde(default)]
    pub running_us: u64,
}

/// One hub of the mesh.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: u64,
    pub name: String,
    pub api_addr: String,
    pub role: String,
    pub instances: u32,
    /// The leader has marked it down.
    #[serde(default)]
    pub down: bool,
    /// Its latest load report, as this hub received it (none yet, or older than a few seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadInfo>,
    /// Its gossip (libp2p, TCP) address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gossip_addr: String,
    /// Its libp2p PeerId: the one its mesh key gives (empty until it registered its key).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_id: String,
}

/// A LAN device as the hubs see it (`GET /v1/devices`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its stable key (`mdns:<type>/<instance>`, `mdns:<type>/id=<TXT id>`, `ssdp:<UDN>`), never
    /// an address.
    pub id: String,
    pub name: String,
    /// Its service type (`_hap._tcp`, an SSDP device type).
    pub kind: String,
    /// Every address it answered from.
    pub addresses: Vec<String>,
    /// Its TXT records (mDNS) or headers of note (SSDP).
    pub properties: std::collections::BTreeMap<String, String>,
    /// The hubs that see it, the most recent sighting first.
    pub seen_by: Vec<DeviceSeenBy>,
    /// `seen` (a hub in reach sees it) or `unreachable` (only hubs out of reach do).
    pub reach: String,
    /// With `unreachable`: since when (ms since the epoch), as this hub judges it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since_ms: Option<u64>,
}

/// One hub's sighting of a device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceSeenBy {
    pub node_id: u64,
    /// Empty if the hub is no longer a member.
    pub node_name: String,
    /// When that hub was last known to see the device (ms since the epoch): for a hub in reach,
    /// the last time this hub heard from it (about every second); for one out of reach, the
    /// last news of it.
    pub last_seen_ms: u64,
}

/// A hub's load over its last reporting interval (about a second).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoadInfo {
    /// CPU time its tasks used against the cores it offers to tasks, in thousandths.
    pub cpu_permille: u32,
    /// Cores it offers to tasks (`--task-cpus`).
    pub task_cpus: u32,
    /// Memory its tasks hold against the task memory it offers, in thousandths.
    pub memory_permille: u32,
    /// The longest of its tasks' mean queue waits (time a call waited before it ran), microseconds.
    pub queue_wait_us: u64,
    /// The machine's CPU pressure (`/proc/pressure/cpu`, some avg10), hundredths of a percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pressure: Option<u32>,
    /// How old the report is, milliseconds.
    pub age_ms: u64,
    /// Its tasks' CPU, busiest first: (task, thousandths of a core).
    #[serde(default)]
    pub tasks: Vec<(String, u32)>,
}

/// `GET /v1/workers`: one background loop of the hub.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerInfo {
    pub name: String,
    /// `starting`, `working`, `idle` or `stopped`.
    pub state: String,
    /// Rounds of work done.
    pub rounds: u64,
    /// Rounds that failed.
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `GET /v1/status`: the hub and the mesh at a glance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusInfo {
    pub version: String,
    /// The build (what `hubmesh --version` prints: the version and a hash of what decides a
    /// compiled module); a hub and its compiler program must be of one build. Empty from a hub
    /// older than this field.
    #[serde(default)]
    pub build: String,
    pub node_id: u64,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    pub term: u64,
    pub last_applied: u64,
    pub voters: Vec<u64>,
    pub nodes: Vec<NodeInfo>,
    pub tasks_total: u32,
    pub tasks_placed: u32,
    pub tasks_pending: u32,
    pub uptime_ms: u64,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// How long the token admits hubs, e.g. `1h` (default 1h, at most 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// `POST /v1/api-tokens`: a mesh-wide API token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ApiTokenRequest {
    /// Its name: 1-64 characters of a-z, 0-9, '-' or '_'.
    pub name: String,
    /// `admin` (every route) or `invoke` (only invoking tasks). Default `admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// For an `invoke` token: the tasks it may invoke (none: every task).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<String>,
    /// How long it works, e.g. `30d` (default: until revoked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// An API token as listed: never the token itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiTokenInfo {
    pub name: String,
    /// `admin` or `invoke`.
    pub scope: String,
    /// For an `invoke` token: the tasks it may invoke (empty: every task).
    pub tasks: Vec<String>,
    pub created_unix_ms: u64,
    /// `None`: until revoked.
    pub expires_unix_ms: Option<u64>,
    pub revoked: bool,
    /// Whether every hub accepts it now (not revoked, not expired).
    pub valid: bool,
}

/// A created API token: the token is shown once, here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiTokenCreated {
    pub token: String,
    #[serde(flatten)]
    pub info: ApiTokenInfo,
}

/// A join token for `hubmesh up --join`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenResponse {
    pub token: String,
    pub expires_in_ms: u64,
}
