//! Deploy: check and instrument the module, store it, commit the task through Raft, and wait
//! until the leader has placed it (and, when placed here, until it runs).
//!
//! ```text
//!  params --limits()--> InstanceLimits   source --Executor::prepare--> instrumented wasm
//!        --BlobStore::put--> module hash --propose(DeployTask)--> ClusterState
//!        --scheduler (leader) places it--> reconcile starts it --> DeployResponse
//! ```
//! Nothing is proposed unless the module compiled and instantiated under the task's limits, so
//! a bad module changes nothing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytesize::ByteSize;
use hubmesh_consensus::state::{CheckpointPolicy, DeployMode, Limits, Rejected, TaskKind, TaskSpec};
use hubmesh_consensus::{Command, Outcome, ProposeError};
use hubmesh_proto::api;
use hubmesh_storage::Hash;

use crate::executor::{InstanceLimits, PrepareError};
use crate::hub::Hub;

/// Smallest memory cap: the dirty-page map alone takes 128 KiB.
const MIN_MEMORY: u64 = 1 << 20;
/// Longest deadline of one invocation.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// How long deploy waits for the task to be placed and started.
const SETTLE: Duration = Duration::from_secs(10);

/// Why a deploy failed. Nothing was changed unless the variant says the outcome is unknown.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeployError {
    /// A parameter is malformed or out of range.
    #[error("{0}")]
    BadRequest(String),
    /// The module was refused.
    #[error(transparent)]
    InvalidModule(#[from] PrepareError),
    /// The module is larger than the hub accepts.
    #[error("the module is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    /// The task exists; deploy with `--update` for a new version.
    #[error("task {0:?} already exists")]
    Exists(String),
    /// `--update` of a task that does not exist.
    #[error("no task named {0:?}")]
    NotFound(String),
    /// The state change failed; see the message.
    #[error(transparent)]
    Propose(ProposeError),
    /// This hub cannot reach a quorum of the mesh; nothing was changed.
    #[error("no quorum: this hub cannot reach enough of the mesh to change it")]
    NoQuorum,
    /// Storing the module failed.
    #[error("storing the module: {0}")]
    Storage(String),
}

fn size(v: &Option<String>, default: ByteSize, what: &str) -> Result<u64, DeployError> {
    match v {
        None => Ok(default.as_u64()),
        Some(s) => s
            .parse::<ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| DeployError::BadRequest(format!("{what}: {s:?} is not a size like 64MiB ({e})"))),
    }
}

fn duration(v: &Option<String>, what: &str) -> Result<Option<Duration>, DeployError> {
    v.as_ref()
        .map(|s| {
            humantime::parse_duration(s)
                .map_err(|e| DeployError::BadRequest(format!("{what}: {s:?} is not a duration like 500ms or 2s ({e})")))
        })
        .transpose()
}

/// Turns the API parameters into a task spec (without module hashes).
fn spec_of(
    hub: &Hub,
    name: &str,
    p: &api::DeployParams,
) -> Result<(TaskKind, Limits, CheckpointPolicy, Option<u64>), DeployError> {
    hubmesh_consensus::state::validate_task_name(name).map_err(|e| DeployError::BadRequest(e.to_string()))?;
    let d = &hub.config().task_defaults;
    let every = duration(&p.checkpoint_every, "checkpoint_every")?;
    if p.durable && every.is_some() {
        return Err(DeployError::BadRequest("choose --durable or --checkpoint-every, not both".into()));
    }
    let stateful = p.stateful || p.durable || every.is_some();
    let kind = if stateful { TaskKind::Stateful } else { TaskKind::Stateless };
    let checkpoint = match (p.durable, every) {
        (true, _) => CheckpointPolicy::Durable,
        (false, Some(e)) if e < Duration::from_millis(10) => {
            return Err(DeployError::BadRequest("checkpoint_every must be at least 10ms".into()))
        }
        (false, Some(e)) => CheckpointPolicy::Periodic { every_ms: e.as_millis() as u64 },
        (false, None) => CheckpointPolicy::None,
    };
    let memory = size(&p.memory, d.memory, "memory")?;
    let max_memory = hub.executor().max_task_memory();
    if !(MIN_MEMORY..=max_memory).contains(&memory) {
        return Err(DeployError::BadRequest(format!(
            "memory must be between {} and {} (this hub's executor.max_task_memory)",
            ByteSize(MIN_MEMORY),
            ByteSize(max_memory)
        )));
    }
    let timeout = duration(&p.timeout, "timeout")?.unwrap_or(d.timeout);
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err(DeployError::BadRequest(format!(
            "timeout must be between 1ms and {}",
            humantime::format_duration(MAX_TIMEOUT)
        )));
    }
    let max_input = size(&p.max_input, d.max_input, "max_input")?;
    let max_output = size(&p.max_output, d.max_output, "max_output")?;
    for (v, what) in [(max_input, "max_input"), (max_output, "max_output")] {
        if v > 64 << 20 {
            return Err(DeployError::BadRequest(format!("{what} may be at most 64MiB")));
        }
    }
    let queue = p.queue.unwrap_or(d.queue);
    if queue == 0 || queue > 10_000 {
        return Err(DeployError::BadRequest("queue must be between 1 and 10000".into()));
    }
    let tick = duration(&p.tick, "tick")?;
    if tick.is_some() && !stateful {
        return Err(DeployError::BadRequest("ticks need a stateful task (add --stateful)".into()));
    }
    if tick.is_some_and(|t| t < Duration::from_millis(10)) {
        return Err(DeployError::BadRequest("tick must be at least 10ms".into()));
    }
    let limits = Limits {
        memory_bytes: memory,
        timeout_ms: timeout.as_millis().max(1) as u64,
        max_input_bytes: max_input,
        max_output_bytes: max_output,
        queue,
    };
    Ok((kind, limits, checkpoint, tick.map(|t| t.as_millis() as u64)))
}

/// Parses `on=k=v,k2=v2`.
fn constraints_of(p: &api::DeployParams) -> Result<std::collections::BTreeMap<String, String>, DeployError> {
    let mut out = std::collections::BTreeMap::new();
    for part in p.on.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(DeployError::BadRequest(format!("on: {part:?} is not key=value")));
        };
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

/// The device a task is placed near: an id as the registry shows it.
fn near_of(p: &api::DeployParams) -> Result<Option<String>, DeployError> {
    match p.near.as_deref().map(str::trim) {
        None => Ok(None),
        Some(id) if id.is_empty() || id.len() > crate::devices::wire::MAX_ID => Err(DeployError::BadRequest(format!(
            "near: a device id is 1 to {} bytes (`hubmesh device list` shows them)",
            crate::devices::wire::MAX_ID
        ))),
        Some(id) => Ok(Some(id.to_owned())),
    }
}

/// A deploy the mesh committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deployed {
    pub(crate) version: u64,
    /// A new task (not a new version of an existing one).
    pub(crate) created: bool,
}

impl Hub {
    /// Deploys `source` as task `name`. `update` makes it an explicit new version of an
    /// existing task; without it an existing name is refused.
    pub(crate) async fn deploy(
        &self,
        name: &str,
        source: &[u8],
        params: &api::DeployParams,
        update: bool,
    ) -> Result<Deployed, DeployError> {
        let limit = self.config().executor.max_module_size.as_u64();
        if source.len() as u64 > limit {
            return Err(DeployError::TooLarge { size: source.len() as u64, limit });
        }
        let (kind, limits, checkpoint, tick) = spec_of(self, name, params)?;
        let state_replicas = params.replicas_state.unwrap_or(2);
        if state_replicas > 6 {
            return Err(DeployError::BadRequest("--replicas-state must be 0-6".into()));
        }
        let replicas = params.replicas.unwrap_or(1);
        if replicas == 0 || replicas > 64 || (kind == TaskKind::Stateful && replicas != 1) {
            return Err(DeployError::BadRequest(
                "replicas must be 1-64, and 1 for a stateful task (its state lives in one instance)".into(),
            ));
        }
        if !self.has_quorum() {
            return Err(DeployError::NoQuorum);
        }
        let state = self.consensus().state();
        match (update, state.tasks.contains_key(name)) {
            (false, true) => return Err(DeployError::Exists(name.to_owned())),
            (true, false) => return Err(DeployError::NotFound(name.to_owned())),
            _ => {}
        }
        let instance_limits = InstanceLimits {
            memory_bytes: limits.memory_bytes,
            timeout_ms: limits.timeout_ms,
            max_input_bytes: limits.max_input_bytes,
            max_output_bytes: limits.max_output_bytes,
        };
        let executor = self.executor().clone();
        let owned = source.to_vec();
        let prepared = tokio::task::spawn_blocking(move || executor.prepare(&owned, instance_limits))
            .await
            .map_err(|e| DeployError::Storage(format!("the compile thread failed: {e}")))??;
        let tick_ms = match (prepared.has_tick, tick) {
            (true, t) if kind == TaskKind::Stateful => {
                Some(t.unwrap_or(self.config().task_defaults.tick.as_millis() as u64))
            }
            (false, Some(_)) => {
                return Err(DeployError::BadRequest("--tick given, but the module does not export hm_tick".into()))
            }
            _ => None,
        };
        let module_hash = self.blobs().put(&prepared.wasm).map_err(|e| DeployError::Storage(e.to_string()))?;
        let spec = TaskSpec {
            name: name.to_owned(),
            kind,
            module_hash,
            source_hash: Hash::of(source),
            limits,
            checkpoint,
            tick_ms,
            constraints: constraints_of(params)?,
            replicas,
            state_replicas,
            pinned: params.pin,
            near: near_of(params)?,
        };
        let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mode = if update { DeployMode::Update } else { DeployMode::Create };
        let outcome = self.consensus().propose(Command::DeployTask { spec, mode, at_ms }).await;
        let (version, created) = match outcome {
            Ok(Outcome::Deployed { version, created }) => (version, created),
            Ok(other) => return Err(DeployError::Storage(format!("unexpected outcome {other:?}"))),
            Err(ProposeError::Rejected(Rejected::TaskExists(n))) => return Err(DeployError::Exists(n)),
            Err(ProposeError::Rejected(Rejected::NoSuchTask(n))) => return Err(DeployError::NotFound(n)),
            Err(e) => return Err(DeployError::Propose(e)),
        };
        metrics::counter!("hubmesh_deploys_total").increment(1);
        self.settle(name, version).await;
        Ok(Deployed { version, created })
    }

    /// Waits (bounded) until `name` at `version` is placed and, if placed here, running.
    async fn settle(&self, name: &str, version: u64) {
        let me = self.consensus().node_id();
        // Placed, or pending for a reason that waiting will not fix (no hub qualifies).
        let near = self.devices().near();
        let placed = self
            .wait_state(SETTLE, |s| {
                let placed = s.tasks.get(name).is_some_and(|t| t.version >= version && t.instances.contains_key(&0));
                let stuck = crate::scheduler::pending_reason(s, &near, name).is_some_and(|p| !p.resolves_by_waiting());
                placed || stuck
            })
            .await
            && self.consensus().state().placement(name, 0).is_some();
        if !placed {
            return;
        }
        let here = self.consensus().state().placement(name, 0).is_some_and(|p| p.node == me);
        if !here {
            return;
        }
        let deadline = tokio::time::Instant::now() + SETTLE;
        while tokio::time::Instant::now() < deadline {
            let running = self.executor().status(name).is_some_and(|s| s.config.version >= version);
            // A failure of the hub is tried again meanwhile: waiting may see it start.
            let failed = self.start_failure(name).is_some_and(|f| f.version >= version && f.retry_at.is_none());
            if running || failed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
