//! Module admission: the bytes a user deploys (wasm or WAT) through validation, instrumentation
//! and compilation. Garbage gets an error, never a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use hubmesh::executor::{EngineLimits, Executor, InstanceLimits};
use hubmesh_storage::PageLog;
use libfuzzer_sys::fuzz_target;

struct Held {
    exec: Executor,
    _dir: tempfile::TempDir,
}

fn executor() -> &'static Held {
    static EXEC: OnceLock<Held> = OnceLock::new();
    EXEC.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let pages: Arc<PageLog> = PageLog::open(&dir.path().join("pages")).expect("page log");
        let limits = EngineLimits { max_instances: 4, max_task_memory: 16 << 20 };
        let exec = Executor::new(limits, &dir.path().join("cache"), pages).expect("executor");
        Held { exec, _dir: dir }
    })
}

const LIMITS: InstanceLimits =
    InstanceLimits { memory_bytes: 16 << 20, timeout_ms: 100, max_input_bytes: 1 << 16, max_output_bytes: 1 << 16 };

fuzz_target!(|data: &[u8]| {
    drop(executor().exec.prepare(data, LIMITS));
});
