//! The task ABI: what a module exports and the host functions it may import.
//! `docs/task-abi.md` is the user-facing description; keep the two in step.
//!
//! Exports: `hm_invoke(input_len: i32) -> i32` (0 = success), optional `hm_tick()`, optional
//! `_initialize()` (C reactors), a memory.
//! Imports, module `hubmesh`: `input(ptr)`, `output(ptr, len)`, `log(ptr, len)`.
//! Imports, module `wasi_snapshot_preview1`: a small subset (stdout/stderr, clocks, random,
//! empty args/env, exit) so that C built with wasi-libc runs. Files and sockets are not provided:
//! their state would live outside the checkpoint.
//!
//! Every host write into guest memory marks the pages it touches in the dirty map, exactly as
//! the instrumented guest stores do, so checkpoints see it.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use wasmtime::{Caller, Linker};

use super::host::{HostFault, HostState};
use crate::checkpoint::PAGE as PAGE_SIZE;

pub(crate) const INVOKE_EXPORT: &str = "hm_invoke";
pub(crate) const TICK_EXPORT: &str = "hm_tick";
pub(crate) const INITIALIZE_EXPORT: &str = "_initialize";

const HUBMESH: &str = "hubmesh";
const WASI: &str = "wasi_snapshot_preview1";
/// What the host provides (the instrumenter refuses other imports).
#[cfg(feature = "compiler")]
const HUBMESH_FUNCS: &[&str] = &["input", "output", "log"];
#[cfg(feature = "compiler")]
const WASI_FUNCS: &[&str] = &[
    "fd_write",
    "fd_read",
    "fd_close",
    "fd_seek",
    "fd_fdstat_get",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "environ_sizes_get",
    "environ_get",
    "args_sizes_get",
    "args_get",
    "clock_time_get",
    "clock_res_get",
    "random_get",
    "proc_exit",
    "sched_yield",
];

/// Longest log line a task may emit in one call.
const MAX_LOG: usize = 4096;

// WASI errno values.
const ESUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const ESPIPE: i32 = 70;

/// Whether the host provides `module::name`.
#[cfg(feature = "compiler")]
pub(crate) fn is_provided(module: &str, name: &str) -> bool {
    match module {
        HUBMESH => HUBMESH_FUNCS.contains(&name),
        WASI => WASI_FUNCS.contains(&name),
        _ => false,
    }
}

/// Marks the pages of `[ptr, ptr+len)` dirty.
fn mark_dirty(caller: &mut Caller<'_, HostState>, ptr: usize, len: usize) {
    let Some(dirty) = caller.data().dirty else { return };
    if len == 0 {
        return;
    }
    let map = dirty.data_mut(caller);
    for page in ptr / PAGE_SIZE..=(ptr + len - 1) / PAGE_SIZE {
        if let Some(b) = map.get_mut(page) {
            *b = 1;
        }
    }
}

/// Copies `bytes` into guest memory at `ptr`; `Err(EFAULT)` if out of bounds.
fn write_guest(caller: &mut Caller<'_, HostState>, ptr: i32, bytes: &[u8]) -> Result<(), i32> {
    let mem = caller.data().memory.ok_or(EFAULT)?;
    let start = ptr as u32 as usize;
    let data = mem.data_mut(&mut *caller);
    let dst = data.get_mut(start..start.checked_add(bytes.len()).ok_or(EFAULT)?).ok_or(EFAULT)?;
    dst.copy_from_slice(bytes);
    mark_dirty(caller, start, bytes.len());
    Ok(())
}

/// Reads `len` bytes of guest memory at `ptr`; `Err(EFAULT)` if out of bounds.
fn read_guest(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<Vec<u8>, i32> {
    let mem = caller.data().memory.ok_or(EFAULT)?;
    let start = ptr as u32 as usize;
    let len = len as u32 as usize;
    let data = mem.data(&*caller);
    Ok(data.get(start..start.checked_add(len).ok_or(EFAULT)?).ok_or(EFAULT)?.to_vec())
}

fn read_u32(caller: &mut Caller<'_, HostState>, ptr: i32) -> Result<u32, i32> {
    let b = read_guest(caller, ptr, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn errno(r: Result<(), i32>) -> i32 {
    match r {
        Ok(()) => ESUCCESS,
        Err(e) => e,
    }
}

fn monotonic_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Registers every host function on `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(HUBMESH, "input", |mut caller: Caller<'_, HostState>, ptr: i32| -> wasmtime::Result<()> {
        let input = std::mem::take(&mut caller.data_mut().input);
        let res = write_guest(&mut caller, ptr, &input);
        caller.data_mut().input = input;
        res.map_err(|_| wasmtime::Error::msg("hubmesh.input: the buffer is outside the task's memory"))
    })?;
    linker.func_wrap(
        HUBMESH,
        "output",
        |mut caller: Caller<'_, HostState>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let limit = caller.data().output_limit;
            if len as u32 as u64 > limit {
                caller.data_mut().fault = Some(HostFault::OutputTooLarge { limit });
                return Err(wasmtime::Error::msg("hubmesh.output: output over the task's limit"));
            }
            let bytes = read_guest(&mut caller, ptr, len)
                .map_err(|_| wasmtime::Error::msg("hubmesh.output: the buffer is outside the task's memory"))?;
            caller.data_mut().output = bytes;
            Ok(())
        },
    )?;
    linker.func_wrap(HUBMESH, "log", |mut caller: Caller<'_, HostState>, ptr: i32, len: i32| {
        let len = (len as u32 as usize).min(MAX_LOG) as i32;
        if let Ok(bytes) = read_guest(&mut caller, ptr, len) {
            tracing::info!(task = %caller.data().task, "{}", String::from_utf8_lossy(&bytes));
        }
    })?;
    add_wasi(linker)
}

fn add_wasi(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        WASI,
        "fd_write",
        |mut caller: Caller<'_, HostState>, fd: i32, iovs: i32, iovs_len: i32, nwritten: i32| -> i32 {
            if fd != 1 && fd != 2 {
                return EBADF;
            }
            let mut text = Vec::new();
            let mut total: u32 = 0;
            for i in 0..iovs_len.clamp(0, 1024) {
                let (Ok(ptr), Ok(len)) = (read_u32(&mut caller, iovs + i * 8), read_u32(&mut caller, iovs + i * 8 + 4))
                else {
                    return EFAULT;
                };
                let Ok(bytes) = read_guest(&mut caller, ptr as i32, len as i32) else { return EFAULT };
                total = total.saturating_add(len);
                if text.len() < MAX_LOG {
                    text.extend_from_slice(&bytes[..bytes.len().min(MAX_LOG - text.len())]);
                }
            }
            let line = String::from_utf8_lossy(&text);
            let line = line.trim_end();
            if !line.is_empty() {
                tracing::info!(task = %caller.data().task, fd, "{line}");
            }
            errno(write_guest(&mut caller, nwritten, &total.to_le_bytes()))
        },
    )?;
    linker.func_wrap(
        WASI,
        "fd_read",
        |mut caller: Caller<'_, HostState>, fd: i32, _iovs: i32, _len: i32, nread: i32| -> i32 {
            if fd != 0 {
                return EBADF;
            }
            errno(write_guest(&mut caller, nread, &0u32.to_le_bytes()))
        },
    )?;
    linker.func_wrap(WASI, "fd_close", |fd: i32| -> i32 {
        if (0..=2).contains(&fd) {
            ESUCCESS
        } else {
            EBADF
        }
    })?;
    linker.func_wrap(WASI, "fd_seek", |fd: i32, _off: i64, _whence: i32, _new: i32| -> i32 {
        if (0..=2).contains(&fd) {
            ESPIPE
        } else {
            EBADF
        }
    })?;
    linker.func_wrap(WASI, "fd_fdstat_get", |mut caller: Caller<'_, HostState>, fd: i32, ptr: i32| -> i32 {
        if !(0..=2).contains(&fd) {
            return EBADF;
        }
        // filetype character_device, no flags, all rights.
        let mut stat = [0u8; 24];
        stat[0] = 2;
        stat[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        stat[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        errno(write_guest(&mut caller, ptr, &stat))
    })?;
    linker.func_wrap(WASI, "fd_prestat_get", |_fd: i32, _ptr: i32| -> i32 { EBADF })?;
    linker.func_wrap(WASI, "fd_prestat_dir_name", |_fd: i32, _ptr: i32, _len: i32| -> i32 { EBADF })?;
    for (sizes, get) in [("environ_sizes_get", "environ_get"), ("args_sizes_get", "args_get")] {
        linker.func_wrap(WASI, sizes, |mut caller: Caller<'_, HostState>, count: i32, size: i32| -> i32 {
            errno(
                write_guest(&mut caller, count, &0u32.to_le_bytes())
                    .and_then(|()| write_guest(&mut caller, size, &0u32.to_le_bytes())),
            )
        })?;
        linker.func_wrap(WASI, get, |_a: i32, _b: i32| -> i32 { ESUCCESS })?;
    }
    linker.func_wrap(
        WASI,
        "clock_time_get",
        |mut caller: Caller<'_, HostState>, id: i32, _precision: i64, out: i32| -> i32 {
            let nanos: u64 = match id {
                0 => SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
                1 => monotonic_origin().elapsed().as_nanos() as u64,
                _ => return EINVAL,
            };
            errno(write_guest(&mut caller, out, &nanos.to_le_bytes()))
        },
    )?;
    linker.func_wrap(WASI, "clock_res_get", |mut caller: Caller<'_, HostState>, id: i32, out: i32| -> i32 {
        if !(0..=1).contains(&id) {
            return EINVAL;
        }
        errno(write_guest(&mut caller, out, &1000u64.to_le_bytes()))
    })?;
    linker.func_wrap(WASI, "random_get", |mut caller: Caller<'_, HostState>, buf: i32, len: i32| -> i32 {
        let len = len as u32 as usize;
        if len > 1 << 20 {
            return EINVAL;
        }
        let mut bytes = vec![0u8; len];
        rand::rng().fill_bytes(&mut bytes);
        errno(write_guest(&mut caller, buf, &bytes))
    })?;
    linker.func_wrap(WASI, "proc_exit", |mut caller: Caller<'_, HostState>, code: i32| -> wasmtime::Result<()> {
        caller.data_mut().fault = Some(HostFault::Exit(code));
        Err(wasmtime::Error::msg(format!("the task called proc_exit({code})")))
    })?;
    linker.func_wrap(WASI, "sched_yield", || -> i32 { ESUCCESS })?;
    Ok(())
}
