//! hubmesh-chaos: the user-runnable chaos suite. It builds a lab of real `hubmesh` processes in
//! network namespaces, drives a workload through their public HTTP API while a nemesis kills,
//! pauses and partitions hubs, then checks the history (no lost acknowledged update, no fork,
//! exactly-once with keys, fencing, no stale answers, failover bound, liveness, not vacuous, the
//! device registry) and writes a report. It uses `hubmesh::client` and `hubmesh_proto::api`, never hubmesh's internals.
//!
//! Modules: [`scenario`] (TOML), [`schedule`] (seeded fault plan), [`lab`] (namespaces, nftables,
//! processes), [`nemesis`] (faults), [`devices`] (simulated LAN devices and their faults),
//! [`workload`] (clients), [`monitor`] (polling), [`history`],
//! [`check`] (verdicts), [`report`] and [`svg`] (the run directory), [`run`] (the phases).

pub mod check;
pub mod devices;
pub mod history;
pub mod lab;
pub mod monitor;
pub mod nemesis;
mod progress;
pub mod report;
pub mod run;
pub mod scenario;
pub mod schedule;
pub mod svg;
pub mod workload;

use std::path::PathBuf;

/// The hub a user installs, for the packaging tests: `$HUBMESH_RELEASE_BINARY` (scripts/test
/// builds the release pair with `deploy/build-release` and sets it: the hub without the compiler,
/// `hubmesh-compile` beside it), else this build's `hubmesh`. Under `CI` the release pair is
/// required, so that what is shipped is what is tested.
pub fn installable_hubmesh() -> anyhow::Result<PathBuf> {
    match std::env::var_os("HUBMESH_RELEASE_BINARY") {
        Some(path) => find_hubmesh(Some(PathBuf::from(path))),
        None => {
            anyhow::ensure!(
                std::env::var_os("CI").is_none(),
                "CI must test the release pair: scripts/test sets HUBMESH_RELEASE_BINARY"
            );
            find_hubmesh(None)
        }
    }
}

/// The `hubmesh` binary to start: `explicit`, else the one next to this program, else from PATH.
pub fn find_hubmesh(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        anyhow::ensure!(p.is_file(), "no hubmesh binary at {}", p.display());
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    // Next to us (target/debug/hubmesh-chaos), or one up from a test binary (target/debug/deps/…).
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join("hubmesh");
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("hubmesh");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    anyhow::bail!("cannot find the hubmesh binary: build it (cargo build -p hubmesh) or pass --hubmesh PATH")
}
