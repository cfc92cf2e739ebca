//! `deploy/smoke-arch` with the release pair on both sides (the hub without the compiler and
//! `hubmesh-compile`, as installed: `hubmesh_chaos::installable_hubmesh`), so that both the
//! shipped build and the script a user runs to try a build of another CPU architecture keep
//! working: a durable counter, an echo task and a
//! looping task's deadline on one data dir, across a SIGKILL and a restart, then a SIGTERM that
//! must end in exit 0. CI makes no arm64 build (15 more minutes); docs/benchmarks.md has the
//! script's runs with an x86_64 and an arm64 build under qemu-user.

use std::path::Path;
use std::process::{Command, Stdio};

#[test]
fn the_smoke_script_passes_with_this_build_on_both_sides() {
    let bin = hubmesh_chaos::installable_hubmesh().expect("the hubmesh binary");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/smoke-arch");
    let out = Command::new(&script).arg(&bin).stdin(Stdio::null()).output().expect("running deploy/smoke-arch");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "deploy/smoke-arch failed:\n{text}");
    // Each step reported itself: the state survived the SIGKILL, the deadline held on both runs.
    assert!(text.contains("counter 7, echo hello, loop stopped at its deadline"), "{text}");
    assert!(text.contains("counter 8 (nothing acknowledged lost)"), "{text}");
    assert!(text.contains("ok, ") && text.contains("exit 0"), "{text}");
    assert!(text.contains("smoke-arch: all steps passed"), "{text}");
}
