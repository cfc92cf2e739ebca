//! One instantiated task module, with the handles the executor needs, and the classification of
//! what went wrong in a call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Engine, Global, InstancePre, Memory, Module, Store, Trap, TypedFunc, UpdateDeadline, Val};

use super::abi;
use super::engine::{ticks_for, Clock};
use super::error::InvokeError;
use super::host::{HostFault, HostState};
use super::prepared::{DIRTY_EXPORT, GLOBAL_PREFIX, MEMORY_EXPORT};
use super::Answer;

/// The limits an instance runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceLimits {
    pub memory_bytes: u64,
    pub timeout_ms: u64,
    pub max_input_bytes: u64,
    pub max_output_bytes: u64,
}

/// A compiled module ready to instantiate.
#[derive(Clone)]
pub(crate) struct LoadedModule {
    pub(crate) engine: Engine,
    /// Held while the module's code runs: the epoch (deadlines) advances only then.
    clock: Arc<Clock>,
    pub(crate) pre: InstancePre<HostState>,
    pub(crate) global_names: Arc<[String]>,
    pub(crate) has_tick: bool,
    pub(crate) has_initialize: bool,
}

impl LoadedModule {
    pub(crate) fn new(
        engine: &Engine,
        clock: &Arc<Clock>,
        linker: &wasmtime::Linker<HostState>,
        module: &Module,
    ) -> wasmtime::Result<Self> {
        let pre = linker.instantiate_pre(module)?;
        let mut global_names: Vec<String> =
            module.exports().map(|e| e.name().to_owned()).filter(|n| n.starts_with(GLOBAL_PREFIX)).collect();
        global_names.sort();
        let has = |name: &str| module.exports().any(|e| e.name() == name);
        Ok(Self {
            engine: engine.clone(),
            clock: clock.clone(),
            pre,
            global_names: global_names.into(),
            has_tick: has(abi::TICK_EXPORT),
            has_initialize: has(abi::INITIALIZE_EXPORT),
        })
    }
}

/// A running instance.
pub(crate) struct Instance {
    pub(crate) store: Store<HostState>,
    invoke: TypedFunc<i32, i32>,
    tick: Option<TypedFunc<(), ()>>,
    pub(crate) memory: Memory,
    pub(crate) dirty: Memory,
    pub(crate) globals: Vec<(String, Global)>,
    limits: InstanceLimits,
    clock: Arc<Clock>,
    /// The store yields at each tick (a call in slices) instead of trapping at its deadline.
    sliced: bool,
}

impl Instance {
    /// Instantiates `module`. With `initialize`, runs `_initialize` (a fresh start, not a
    /// restore).
    pub(crate) fn new(
        module: &LoadedModule,
        task: Arc<str>,
        limits: InstanceLimits,
        initialize: bool,
    ) -> Result<Self, InstanceError> {
        let mut store = Store::new(&module.engine, HostState::new(task, limits.memory_bytes, limits.max_output_bytes));
        store.limiter(|s| s as &mut dyn wasmtime::ResourceLimiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks_for(limits.timeout_ms));
        let running = module.clock.enter();
        let instance =
            module.pre.instantiate(&mut store).map_err(|e| classify_instantiation(&e, &mut store, limits))?;
        drop(running);
        let missing =
            |what: &str| InstanceError::Module(InvokeError::Unavailable(format!("instrumented module lacks {what}")));
        let no_func = |e: wasmtime::Error| InstanceError::Module(InvokeError::Unavailable(e.to_string()));
        let memory = instance.get_memory(&mut store, MEMORY_EXPORT).ok_or_else(|| missing(MEMORY_EXPORT))?;
        let dirty = instance.get_memory(&mut store, DIRTY_EXPORT).ok_or_else(|| missing(DIRTY_EXPORT))?;
        let invoke = instance.get_typed_func::<i32, i32>(&mut store, abi::INVOKE_EXPORT).map_err(no_func)?;
        let tick = if module.has_tick {
            Some(instance.get_typed_func::<(), ()>(&mut store, abi::TICK_EXPORT).map_err(no_func)?)
        } else {
            None
        };
        let mut globals = Vec::with_capacity(module.global_names.len());
        for name in module.global_names.iter() {
            let g = instance.get_global(&mut store, name).ok_or_else(|| missing(name))?;
            globals.push((name.clone(), g));
        }
        store.data_mut().memory = Some(memory);
        store.data_mut().dirty = Some(dirty);
        let mut inst =
            Self { store, invoke, tick, memory, dirty, globals, limits, clock: module.clock.clone(), sliced: false };
        if initialize && module.has_initialize {
            let init = instance.get_typed_func::<(), ()>(&mut inst.store, abi::INITIALIZE_EXPORT).map_err(no_func)?;
            inst.arm();
            let _running = inst.clock.enter();
            init.call(&mut inst.store, ()).map_err(|e| InstanceError::Module(classify(&e, &mut inst.store, limits)))?;
        }
        Ok(inst)
    }

    fn arm(&mut self) {
        if self.sliced {
            self.store.epoch_deadline_trap();
            self.sliced = false;
        }
        self.store.set_epoch_deadline(ticks_for(self.limits.timeout_ms));
        self.store.data_mut().fault = None;
    }

    /// Arms a call in slices: at every tick the call yields to the async runtime, until its
    /// deadline, where it traps as an armed call does.
    fn arm_sliced(&mut self) {
        if !self.sliced {
            self.store.epoch_deadline_callback(|store| {
                let data = store.data();
                if data.abandoned.load(Ordering::Relaxed) || Instant::now() >= data.deadline {
                    return Ok(UpdateDeadline::Interrupt);
                }
                // tokio's own yield puts the task at the back of the queue, behind what waits.
                Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())))
            });
            self.sliced = true;
        }
        let data = self.store.data_mut();
        data.deadline = Instant::now() + Duration::from_millis(self.limits.timeout_ms);
        data.abandoned.store(false, Ordering::Relaxed);
        data.fault = None;
        self.store.set_epoch_deadline(1);
    }

    /// The flag that ends this instance's call in slices at its next tick once set.
    pub(crate) fn abandon_flag(&self) -> Arc<AtomicBool> {
        self.store.data().abandoned.clone()
    }

    /// Runs `hm_invoke` with `input`, on this thread, until it ends or its deadline.
    pub(crate) fn call(&mut self, input: &[u8]) -> Result<Answer, InvokeError> {
        self.take_input(input)?;
        self.arm();
        let running = self.clock.enter();
        let res = self.invoke.call(&mut self.store, input.len() as i32);
        drop(running);
        self.answer(res)
    }

    /// Runs `hm_invoke` with `input` in slices of a tick: the future yields between them, so a
    /// call that runs long holds no thread of the runtime that polls it for more than a tick at
    /// a time, and its poller may hand it to another thread.
    pub(crate) async fn call_sliced(&mut self, input: &[u8]) -> Result<Answer, InvokeError> {
        self.take_input(input)?;
        self.arm_sliced();
        let running = self.clock.enter();
        let res = self.invoke.call_async(&mut self.store, input.len() as i32).await;
        drop(running);
        self.answer(res)
    }

    fn take_input(&mut self, input: &[u8]) -> Result<(), InvokeError> {
        if input.len() as u64 > self.limits.max_input_bytes {
            return Err(InvokeError::InputTooLarge { size: input.len() as u64, limit: self.limits.max_input_bytes });
        }
        let data = self.store.data_mut();
        data.input.clear();
        data.input.extend_from_slice(input);
        data.output.clear();
        Ok(())
    }

    fn answer(&mut self, res: wasmtime::Result<i32>) -> Result<Answer, InvokeError> {
        match res {
            Ok(status) => Ok(Answer { status, output: std::mem::take(&mut self.store.data_mut().output) }),
            Err(e) => Err(classify(&e, &mut self.store, self.limits)),
        }
    }

    /// Runs `hm_tick`, if the module has it.
    pub(crate) fn tick(&mut self) -> Result<bool, InvokeError> {
        let Some(tick) = self.tick.clone() else { return Ok(false) };
        self.arm();
        let _running = self.clock.enter();
        tick.call(&mut self.store, ()).map_err(|e| classify(&e, &mut self.store, self.limits))?;
        Ok(true)
    }

    /// Current size of the task's memory in bytes.
    pub(crate) fn memory_len(&self) -> usize {
        self.memory.data_size(&self.store)
    }

    /// Reads every exported mutable global.
    pub(crate) fn read_globals(&mut self) -> Vec<Val> {
        let mut out = Vec::with_capacity(self.globals.len());
        for (_, g) in &self.globals {
            out.push(g.get(&mut self.store));
        }
        out
    }
}

/// Turns a wasmtime error into what the caller should hear.
fn classify(err: &wasmtime::Error, store: &mut Store<HostState>, limits: InstanceLimits) -> InvokeError {
    match store.data_mut().fault.take() {
        Some(HostFault::MemoryDenied { cap }) => return InvokeError::MemoryLimit { limit: cap },
        Some(HostFault::OutputTooLarge { limit }) => return InvokeError::OutputTooLarge { limit },
        Some(HostFault::Exit(code)) => return InvokeError::Trapped(format!("the task exited with status {code}")),
        None => {}
    }
    if let Some(Trap::Interrupt) = err.downcast_ref::<Trap>() {
        return InvokeError::DeadlineExceeded { timeout_ms: limits.timeout_ms };
    }
    // The first line names the trap; the rest is a wasm backtrace, useful in logs only.
    InvokeError::Trapped(err.to_string().lines().next().unwrap_or("unknown trap").to_owned())
}

/// Like [`classify`], for a failed instantiation: besides the start function's traps and the
/// limiter's refusals, the engine itself may refuse: a full pool of instances (try later), or a
/// module whose memory or tables do not fit what the pool reserves per instance.
fn classify_instantiation(
    err: &wasmtime::Error,
    store: &mut Store<HostState>,
    limits: InstanceLimits,
) -> InstanceError {
    if store.data().fault.is_some() || err.downcast_ref::<Trap>().is_some() {
        return InstanceError::Module(classify(err, store, limits));
    }
    if err.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
        return InstanceError::NoSlot(err.to_string());
    }
    InstanceError::Module(InvokeError::MemoryLimit { limit: limits.memory_bytes })
}

/// Why an instance could not be built: this hub's pool was full, or the module failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InstanceError {
    /// Every instance slot of the engine's pool is taken: this hub's limit, for now.
    #[error("no free instance slot on this hub: {0}")]
    NoSlot(String),
    /// The module's: its start or `_initialize` trapped or ran out of memory, or it lacks what
    /// instrumentation adds or an export of the right type.
    #[error(transparent)]
    Module(InvokeError),
}

impl From<InstanceError> for InvokeError {
    fn from(e: InstanceError) -> Self {
        match e {
            InstanceError::NoSlot(_) => Self::Unavailable(e.to_string()),
            InstanceError::Module(e) => e,
        }
    }
}
