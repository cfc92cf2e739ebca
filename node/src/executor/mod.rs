//! The WebAssembly executor of a hub (wasmtime).
//!
//! ```text
//!  deploy:  source --instrument--> instrumented wasm --ModuleCache (memory/disk/compile)--> Module
//!  start:   Module + TaskConfig --> StatefulTask (actor thread, image, checkpoints)
//!                                 | StatelessTask (pool of warm instances)
//!  invoke:  Executor::invoke(name, input, key) --> the task's runtime --> Answer | InvokeError
//! ```
//!
//! Limits per task: memory cap (a `ResourceLimiter`), CPU deadline (epoch interruption, one
//! engine-wide ticker thread), input and output size, queue length. A limit hit fails that
//! invocation only; a stateful instance is rolled back to its state before the invocation.
//! The executor knows nothing of Raft: the node's reconciler tells it which tasks to run.

mod abi;
mod compile;
mod engine;
mod error;
mod host;
mod image;
pub(crate) mod instance;
#[cfg(feature = "compiler")]
mod instrument;
mod meter;
mod module_cache;
mod page_table;
mod prepared;
mod staged;
mod stateful;
mod stateless;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use hubmesh_consensus::state::{CheckpointPolicy, TaskKind};
use hubmesh_storage::{Hash, PageLog};
use wasmtime::{Engine, Linker};

pub use crate::checkpoint::Answer;
#[cfg(feature = "compiler")]
pub use compile::serve_child as serve_compile_child;
pub use compile::{ChildCompiler, CompileError, Compiler, NoCompiler, BUILD_ID};
pub use engine::EngineLimits;
pub use error::{CommitError, InvokeError, StartTaskError};
pub(crate) use image::{CheckpointHeader, MigrationDelta};
pub use instance::InstanceLimits;
pub use meter::MeterReading;
pub(crate) use page_table::PageTable;
pub use prepared::PrepareError;
pub use staged::StagedTask;
pub use stateful::StatefulStatus;
pub(crate) use stateful::{FinalState, MigrationStart, MovedTo, Resolution};

use crate::checkpoint::{Manifest, Writer};
use host::HostState;
use module_cache::ModuleCache;
use stateful::{MigrateMsg, StatefulTask};
use stateless::StatelessTask;

/// What the executor needs to run one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskConfig {
    pub name: String,
    pub version: u64,
    pub epoch: u64,
    pub kind: TaskKind,
    pub module_hash: Hash,
    pub limits: InstanceLimits,
    pub queue: u32,
    pub checkpoint: CheckpointPolicy,
    pub tick_ms: Option<u64>,
}

/// A module accepted at deploy.
#[derive(Debug, Clone)]
pub struct PreparedModule {
    /// The instrumented module, as stored and run.
    pub wasm: Vec<u8>,
    pub has_tick: bool,
}

/// The last checkpoint of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSummary {
    pub sequence: u64,
    pub epoch: u64,
    pub created_unix_ms: u64,
    pub size_bytes: u64,
    pub pages: u32,
    pub invocations: u64,
    /// Time to find, hash and encode what changed (microseconds).
    pub build_micros: u64,
    /// Time to append it to the page log and fdatasync (microseconds).
    pub write_micros: u64,
}

impl CheckpointSummary {
    pub(crate) fn of(m: &Manifest) -> Self {
        Self {
            sequence: m.sequence,
            epoch: m.epoch,
            created_unix_ms: m.created_unix_ms,
            size_bytes: m.size_bytes(),
            pages: m.pages.len() as u32,
            invocations: m.invocations,
            build_micros: 0,
            write_micros: 0,
        }
    }

    /// Milliseconds since the checkpoint was taken.
    pub fn age_ms(&self) -> u64 {
        hubmesh_consensus::now_ms().saturating_sub(self.created_unix_ms)
    }
}

/// Which state a stateful task starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restore {
    /// Empty memory (no committed checkpoint).
    Fresh,
    /// The checkpoint stored under this page-log key (the mesh's committed one).
    Key(String),
    /// The newest checkpoint of the task in the local page log (a hub on its own, tests).
    NewestLocal,
}

/// A checkpoint that is on the local disk, handed to the [`CheckpointSink`].
#[derive(Debug, Clone)]
pub struct LocalCheckpoint {
    pub task: String,
    pub version: u64,
    pub epoch: u64,
    pub sequence: u64,
    /// Its page-log key.
    pub key: String,
    pub manifest: Vec<u8>,
    /// blake3 of `manifest` (the record's), computed once by its writer.
    pub manifest_hash: Hash,
    /// Every page the manifest refers to.
    pub refs: Vec<Hash>,
    /// Pages this checkpoint wrote (the others were stored before).
    pub new_pages: Vec<Hash>,
    pub size_bytes: u64,
    pub created_ms: u64,
    /// The key of the task's last committed checkpoint, if any.
    pub committed_key: Option<String>,
}

/// Where a stateful task's checkpoints go once they are on the local disk: the node replicates
/// them to the task's holders and commits their record in Raft. Called on the task's thread;
/// `Ok` means committed for the mesh (a durable answer may go out).
pub trait CheckpointSink: Send + Sync {
    fn commit(&self, checkpoint: &LocalCheckpoint) -> Result<(), CommitError>;

    /// The key of `task`'s committed checkpoint as the mesh knows it (an instance whose commit
    /// failed returns to it).
    fn committed_key(&self, _task: &str) -> Option<String> {
        None
    }

    /// The manifest hash of `task`'s committed checkpoint if its key is `key` (`None`: unknown).
    fn committed_hash(&self, _task: &str, _key: &str) -> Option<Hash> {
        None
    }

    /// Puts `task`'s committed checkpoint `key` in the local page log as the mesh committed it
    /// (fetched and verified from the other hubs that store it, if missing or different here);
    /// whether it is there now. On the task's thread, which waits for it, a bounded time (an
    /// instance that lost sight of its own checkpoint that committed late).
    fn fetch_committed(&self, _task: &str, _key: &str) -> bool {
        false
    }

    /// Whether this hub may still give `task`'s instance at `epoch` an answer that no commit
    /// fences (a periodic or checkpoint-less task's): it holds its lease, and the mesh as this hub
    /// has applied it still places that epoch here. Asked when the call runs and again when it
    /// answers, since a call may wait behind others or a slow checkpoint for longer than a lease;
    /// on the task's thread, and it may wait a while for a lease an election may renew.
    fn may_answer(&self, _task: &str, _epoch: u64) -> bool {
        true
    }
}

/// What a running task reports.
#[derive(Debug, Clone)]
pub struct TaskStatus {
    pub config: TaskConfig,
    pub invocations: u64,
    /// Invocations running right now (stateless tasks; a stateful task runs one at a time).
    pub in_flight: u32,
    pub last_checkpoint: Option<CheckpointSummary>,
    pub broken: Option<String>,
}

enum Runtime {
    Stateful(StatefulTask),
    Stateless(Arc<StatelessTask>),
}

struct Running {
    config: TaskConfig,
    runtime: Runtime,
}

/// The executor. Cheap to share behind an `Arc`.
pub struct Executor {
    engine: Engine,
    linker: Linker<HostState>,
    cache: ModuleCache,
    pages: Arc<PageLog>,
    writer: Writer,
    tasks: RwLock<HashMap<String, Arc<Running>>>,
    sink: std::sync::OnceLock<Arc<dyn CheckpointSink>>,
    max_task_memory: u64,
    /// Bumped each time a task starts: calls waiting for a task to run here wake at once.
    started: tokio::sync::watch::Sender<u64>,
    /// Which task code runs: the epoch ticks only then.
    clock: Arc<engine::Clock>,
    _ticker: engine::Ticker,
}

impl Executor {
    /// Builds the engine, starts the epoch ticker and the checkpoint writer; compiles in this
    /// process.
    #[cfg(feature = "compiler")]
    pub fn new(limits: EngineLimits, cache_dir: &Path, pages: Arc<PageLog>) -> anyhow::Result<Self> {
        let engine = engine::build(limits).map_err(anyhow::Error::from)?;
        Self::with_engine(engine, limits, cache_dir, pages, Compiler::InProcess)
    }

    /// [`Self::new`] for a serving hub: compiles in `hubmesh-compile` ([`Compiler::for_hub`],
    /// checked against this engine), and fails where a hub without the compiler finds none.
    pub fn for_hub(limits: EngineLimits, cache_dir: &Path, pages: Arc<PageLog>) -> anyhow::Result<Self> {
        let engine = engine::build(limits).map_err(anyhow::Error::from)?;
        // One engine only: each reserves the whole instance pool's address space.
        let compiler = Compiler::for_hub(&engine)?;
        Self::with_engine(engine, limits, cache_dir, pages, compiler)
    }

    fn with_engine(
        engine: Engine,
        limits: EngineLimits,
        cache_dir: &Path,
        pages: Arc<PageLog>,
        compiler: Compiler,
    ) -> anyhow::Result<Self> {
        let mut linker = Linker::new(&engine);
        abi::add_to_linker(&mut linker).map_err(anyhow::Error::from)?;
        let cache = ModuleCache::open(cache_dir, engine.clone(), compiler)?;
        let writer = Writer::start(pages.clone())?;
        let clock = Arc::new(engine::Clock::default());
        let ticking = engine.clone();
        let ticker = engine::Ticker::start(clock.clone(), move || ticking.increment_epoch())?;
        Ok(Self {
            engine,
            linker,
            cache,
            pages,
            writer,
            tasks: RwLock::new(HashMap::new()),
            sink: std::sync::OnceLock::new(),
            max_task_memory: limits.max_task_memory,
            started: tokio::sync::watch::Sender::new(0),
            clock,
            _ticker: ticker,
        })
    }

    /// Sends every later checkpoint through `sink` (set once, at boot).
    pub fn set_sink(&self, sink: Arc<dyn CheckpointSink>) {
        let _ = self.sink.set(sink);
    }

    /// The local page log.
    pub fn pages(&self) -> &Arc<PageLog> {
        &self.pages
    }

    /// The largest memory cap a task may ask for.
    pub fn max_task_memory(&self) -> u64 {
        self.max_task_memory
    }

    /// Checks and instruments an uploaded module, and proves it compiles and instantiates under
    /// `limits`. Nothing is stored or started.
    pub fn prepare(&self, source: &[u8], limits: InstanceLimits) -> Result<PreparedModule, PrepareError> {
        let (wasm, _hash, facts, module) = self.cache.prepare(source)?;
        let loaded = instance::LoadedModule::new(&self.engine, &self.clock, &self.linker, &module)
            .map_err(|e| PrepareError::Unsupported(e.to_string()))?;
        instance::Instance::new(&loaded, "deploy-check".into(), limits, false)
            .map_err(|e| PrepareError::Unsupported(format!("the module does not start: {e}")))?;
        Ok(PreparedModule { wasm, has_tick: facts.has_tick })
    }

    fn load(&self, hash: &Hash, wasm: &[u8]) -> Result<instance::LoadedModule, StartTaskError> {
        let (module, source) = self.cache.get(hash, wasm).map_err(|e| match e {
            CompileError::Refused(_) => StartTaskError::Module(e.to_string()),
            CompileError::Child(_) | CompileError::OtherBuild(_) => StartTaskError::Hub(e.to_string()),
        })?;
        tracing::debug!(module = %hash, ?source, "module loaded");
        instance::LoadedModule::new(&self.engine, &self.clock, &self.linker, &module)
            .map_err(|e| StartTaskError::Module(e.to_string()))
    }

    /// Starts `config` from the newest local checkpoint (see [`Self::start_task_from`]).
    pub fn start_task(&self, config: TaskConfig, wasm: &[u8]) -> Result<(), StartTaskError> {
        self.start_task_from(config, wasm, Restore::NewestLocal)
    }

    /// Starts `config` with the instrumented module `wasm` and the state `restore` names,
    /// replacing a running task of the same name (which is stopped with a final checkpoint).
    pub fn start_task_from(&self, config: TaskConfig, wasm: &[u8], restore: Restore) -> Result<(), StartTaskError> {
        self.start_task_with(config, wasm, restore, None)
    }

    /// [`Self::start_task_from`], with an instance built ahead (a migration's target).
    fn start_task_with(
        &self,
        config: TaskConfig,
        wasm: &[u8],
        restore: Restore,
        staged: Option<StagedTask>,
    ) -> Result<(), StartTaskError> {
        let started = Instant::now();
        // The lock is released before stopping: the old instance may need a while (its last
        // call and final checkpoint) and other tasks must not wait for it.
        let old = self.tasks.write().unwrap_or_else(|p| p.into_inner()).remove(&config.name);
        if let Some(old) = old {
            stop(&old, true);
        }
        let module = self.load(&config.module_hash, wasm)?;
        let runtime = match config.kind {
            TaskKind::Stateful => Runtime::Stateful(StatefulTask::start(
                config.clone(),
                module,
                self.pages.clone(),
                self.writer.clone(),
                self.sink.get().cloned(),
                restore,
                staged,
            )?),
            TaskKind::Stateless => {
                Runtime::Stateless(Arc::new(StatelessTask::start(&config.name, module, config.limits, config.queue)?))
            }
        };
        tracing::info!(task = %config.name, version = config.version, epoch = config.epoch, took = ?started.elapsed(), "task started");
        let name = config.name.clone();
        self.tasks.write().unwrap_or_else(|p| p.into_inner()).insert(name, Arc::new(Running { config, runtime }));
        self.started.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Changes each time a task starts here (see [`Self::runs_at`]).
    pub fn starts(&self) -> tokio::sync::watch::Receiver<u64> {
        self.started.subscribe()
    }

    /// Stops a task. With `forget_state` its checkpoint is deleted too (the task was removed).
    pub fn stop_task(&self, name: &str, forget_state: bool) {
        let removed = self.tasks.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        if let Some(old) = removed {
            stop(&old, !forget_state);
            self.cache.forget(&old.config.module_hash);
        }
        if forget_state {
            let keys: Vec<String> = self
                .pages
                .manifest_keys()
                .into_iter()
                .filter(|k| hubmesh_consensus::state::parse_checkpoint_key(k).is_some_and(|(t, ..)| t == name))
                .collect();
            let write = hubmesh_storage::PageWrite { remove: keys, ..Default::default() };
            if let Err(e) = self.pages.write(&[write], true) {
                tracing::warn!(task = name, error = %e, "could not delete the task's checkpoint");
            }
        }
    }

    /// Stops every task, saving the state of stateful ones.
    pub fn shutdown(&self) {
        let all: Vec<_> = self.tasks.write().unwrap_or_else(|p| p.into_inner()).drain().collect();
        for (_, t) in all {
            stop(&t, true);
        }
    }

    fn running(&self, name: &str) -> Result<Arc<Running>, InvokeError> {
        self.tasks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| InvokeError::NotFound(name.to_owned()))
    }

    /// The configuration of every running task.
    pub fn configs(&self) -> Vec<TaskConfig> {
        self.tasks.read().unwrap_or_else(|p| p.into_inner()).values().map(|r| r.config.clone()).collect()
    }

    /// Invokes a task. `key` makes a stateful invocation idempotent.
    pub async fn invoke(&self, name: &str, input: Vec<u8>, key: Option<String>) -> Result<Answer, InvokeError> {
        let task = self.running(name)?;
        match &task.runtime {
            Runtime::Stateful(s) => s.invoke(input, key).await,
            Runtime::Stateless(p) => p.invoke_sliced(input).await,
        }
    }

    /// Invokes a stateless task on the calling thread (benchmarks and embedding).
    pub fn invoke_stateless_blocking(&self, name: &str, input: &[u8]) -> Result<Answer, InvokeError> {
        let task = self.running(name)?;
        match &task.runtime {
            Runtime::Stateless(p) => p.invoke(input),
            Runtime::Stateful(_) => Err(InvokeError::Unavailable("the task is stateful; use invoke".into())),
        }
    }

    /// Takes a checkpoint of a stateful task now.
    pub async fn checkpoint(&self, name: &str) -> Result<CheckpointSummary, InvokeError> {
        let task = self.running(name)?;
        match &task.runtime {
            Runtime::Stateful(s) => s.checkpoint().await,
            Runtime::Stateless(_) => {
                Err(InvokeError::Unavailable("stateless tasks have no state to checkpoint".into()))
            }
        }
    }

    fn stateful(&self, name: &str) -> Result<Arc<Running>, InvokeError> {
        let task = self.running(name)?;
        match task.runtime {
            Runtime::Stateful(_) => Ok(task),
            Runtime::Stateless(_) => Err(InvokeError::Unavailable("a stateless task has no state to migrate".into())),
        }
    }

    /// Sends a live migration's request to a stateful task and waits for its answer.
    async fn migration_call<T>(
        &self,
        name: &str,
        msg: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> MigrateMsg,
    ) -> Result<T, InvokeError> {
        let task = self.stateful(name)?;
        let Runtime::Stateful(s) = &task.runtime else { unreachable!("checked: stateful") };
        let (reply, rx) = tokio::sync::oneshot::channel();
        s.migrate(msg(reply)).await?;
        rx.await.map_err(|_| InvokeError::Unavailable("the task is not in a state to migrate".into()))
    }

    /// Starts a live migration of a stateful task: its pages are tracked from now on.
    pub(crate) async fn migration_begin(&self, name: &str) -> Result<MigrationStart, InvokeError> {
        self.migration_call(name, |reply| MigrateMsg::Begin { reply }).await
    }

    /// Copies out up to `max_pages` of the pages changed since the previous round, and slows
    /// the task's calls by `throttle` each until the migration ends.
    pub(crate) async fn migration_round(
        &self,
        name: &str,
        max_pages: usize,
        throttle: std::time::Duration,
    ) -> Result<MigrationDelta, InvokeError> {
        self.migration_call(name, |reply| MigrateMsg::Round { max_pages, throttle, reply }).await
    }

    /// Freezes the task (calls are held) and hands out the rest of its state.
    pub(crate) async fn migration_freeze(&self, name: &str, id: u64) -> Result<FinalState, InvokeError> {
        self.migration_call(name, |reply| MigrateMsg::Freeze { id, reply }).await
    }

    /// Ends a migration: the task moved (held calls are answered `Moved`), runs here again, or
    /// was placed elsewhere meanwhile.
    pub(crate) async fn migration_resolve(&self, name: &str, outcome: Resolution) -> Result<(), InvokeError> {
        let task = self.stateful(name)?;
        let Runtime::Stateful(s) = &task.runtime else { unreachable!("checked: stateful") };
        s.migrate(MigrateMsg::Resolve { outcome }).await
    }

    /// Removes a task that moved away, without a final checkpoint (its state is the target's).
    pub(crate) fn detach_migrated(&self, name: &str) {
        let removed = self.tasks.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        if let Some(old) = removed {
            stop(&old, false);
        }
    }

    /// Whether `name` runs here at `version` and `epoch` (cheap: asked on every invocation).
    pub fn runs_at(&self, name: &str, version: u64, epoch: u64) -> bool {
        self.tasks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .is_some_and(|t| t.config.version == version && t.config.epoch == epoch)
    }

    /// What each running task has cost so far, by name.
    pub fn meters(&self) -> Vec<(String, MeterReading)> {
        let tasks = self.tasks.read().unwrap_or_else(|p| p.into_inner());
        tasks
            .iter()
            .map(|(name, t)| {
                let reading = match &t.runtime {
                    Runtime::Stateful(s) => s.meter.read(),
                    Runtime::Stateless(p) => p.meter.read(),
                };
                (name.clone(), reading)
            })
            .collect()
    }

    /// What a running task reports.
    pub fn status(&self, name: &str) -> Option<TaskStatus> {
        let task = self.running(name).ok()?;
        Some(match &task.runtime {
            Runtime::Stateful(s) => {
                let st = s.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                TaskStatus {
                    config: task.config.clone(),
                    invocations: st.invocations,
                    in_flight: 0,
                    last_checkpoint: st.last_checkpoint,
                    broken: st.broken,
                }
            }
            Runtime::Stateless(p) => TaskStatus {
                config: task.config.clone(),
                invocations: p.invocations.load(Ordering::Relaxed),
                in_flight: p.in_flight(),
                last_checkpoint: None,
                broken: None,
            },
        })
    }
}

fn stop(task: &Running, final_checkpoint: bool) {
    if let Runtime::Stateful(s) = &task.runtime {
        s.stop(final_checkpoint);
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(all(test, feature = "compiler"))]
mod tests;

#[cfg(all(test, feature = "compiler"))]
mod migration_tests;

#[cfg(all(test, feature = "compiler"))]
mod fence_tests;

#[cfg(all(test, feature = "compiler"))]
mod late_commit_tests;
