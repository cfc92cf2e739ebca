//! Faults for the chaos suite: compiled in only with the `fault-injection` feature, and even then
//! armed only by naming them in `HUBMESH_FAULTS` at start, comma-separated, each
//! `NAME[@PERCENT][=VALUE]` (`@` makes it fire on that share of the occasions; `VALUE` is a delay
//! such as `20ms`). A build without the feature has none of this: [`armed`] is `false` and
//! [`delay`] `None`, constant.
//!
//! Faults and where they act:
//! - `durable-ack-without-commit`: a durable task answers without committing its checkpoint (the
//!   bug class "acknowledged before it was durable"); the chaos checkers must call that false.
//! - `drop-forward`: a forwarded invocation is dropped before it leaves, as a lost packet would
//!   be (the caller sees the hub as unreachable and retries elsewhere or waits).
//! - `delay-forward=D`: a forwarded invocation waits `D` before it is sent.
//! - `delay-checkpoint-push=D`: every checkpoint push to a holder waits `D` (a slow link or disk).
//! - `crash-before-checkpoint-commit`: the hub aborts after its holders have a checkpoint, before
//!   the record is proposed (the invocation was never acknowledged).
//! - `crash-after-checkpoint-commit`: the hub aborts after the record is committed, before it
//!   answers (committed, never acknowledged: the client sees an unknown outcome).
//! - Live migration's phases (of a stateful task; a stateless one only switches). On the source:
//!   `crash-migration-source-precopy` (the begin recorded, the target ready, before the first
//!   round), `crash-migration-source-frozen` (the task frozen with its calls held, the final
//!   state stored on both hubs, the switch not proposed), `crash-migration-source-committed`
//!   (the switch committed, the held calls not relayed). On the target:
//!   `crash-migration-target-precopy` (the base checkpoint stored and the instance staged, before
//!   the source hears it is ready), `crash-migration-target-stored` (the final state stored,
//!   before the source hears so), `crash-migration-target-committed` (the switch applied here,
//!   before it says it serves — perhaps before the source heard of the commit).
//! - `no-migrate-watch`: the hub does not serve `MIGRATE_WATCH`, as a hub from before it (a
//!   migration's source must fall back to `MIGRATE_END`).
//!
//! A crash point fires at most once per data dir (a marker file `fault-crashed-NAME` remembers
//! it), so a restarted hub runs on instead of crashing in a loop.

use std::time::Duration;

/// One armed fault.
#[cfg(feature = "fault-injection")]
#[derive(Debug)]
struct Fault {
    name: String,
    percent: u32,
    delay: Option<Duration>,
}

#[cfg(feature = "fault-injection")]
fn parse(spec: &str) -> Vec<Fault> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let (head, value) = match s.split_once('=') {
                Some((h, v)) => (h, Some(v)),
                None => (s, None),
            };
            let (name, percent) = match head.split_once('@') {
                Some((n, p)) => (n, p.parse().ok()?),
                None => (head, 100),
            };
            let delay = match value {
                Some(v) => Some(humantime::parse_duration(v).ok()?),
                None => None,
            };
            Some(Fault { name: name.to_owned(), percent, delay })
        })
        .collect()
}

#[cfg(feature = "fault-injection")]
fn faults() -> &'static [Fault] {
    static FAULTS: std::sync::OnceLock<Vec<Fault>> = std::sync::OnceLock::new();
    FAULTS.get_or_init(|| {
        let list = parse(&std::env::var("HUBMESH_FAULTS").unwrap_or_default());
        if !list.is_empty() {
            tracing::warn!(faults = ?list, "fault injection armed: this hub is deliberately broken");
        }
        list
    })
}

#[cfg(feature = "fault-injection")]
fn fires(name: &str) -> Option<&'static Fault> {
    let f = faults().iter().find(|f| f.name == name)?;
    let fire = f.percent >= 100 || rand::random_range(0..100) < f.percent;
    if fire {
        // Counted so that a chaos run can tell the fault really happened (`/metrics`).
        metrics::counter!("hubmesh_faults_fired_total", "fault" => name.to_owned()).increment(1);
    }
    fire.then_some(f)
}

/// Whether the fault `name` fires this time.
#[cfg(feature = "fault-injection")]
pub(crate) fn armed(name: &str) -> bool {
    fires(name).is_some()
}

/// The delay the fault `name` adds this time, if it fires.
#[cfg(feature = "fault-injection")]
pub(crate) fn delay(name: &str) -> Option<Duration> {
    fires(name).and_then(|f| f.delay)
}

#[cfg(feature = "fault-injection")]
static MARKER_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Where crash points leave their markers (the data dir); set once at start.
pub(crate) fn set_marker_dir(dir: &std::path::Path) {
    #[cfg(feature = "fault-injection")]
    let _ = MARKER_DIR.set(dir.to_owned());
    #[cfg(not(feature = "fault-injection"))]
    let _ = dir;
}

/// Aborts the process if the crash point `name` fires and has not fired in this data dir yet.
pub(crate) fn crash_point(name: &str) {
    #[cfg(feature = "fault-injection")]
    {
        let Some(dir) = MARKER_DIR.get() else { return };
        let marker = dir.join(format!("fault-crashed-{name}"));
        if marker.exists() || !armed(name) {
            return;
        }
        if std::fs::write(&marker, b"").is_ok() {
            eprintln!("fault injection: crash point {name} fired; aborting");
            std::process::abort();
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = name;
}

/// Whether the fault `name` fires this time (never, without `fault-injection`).
#[cfg(not(feature = "fault-injection"))]
pub(crate) fn armed(_name: &str) -> bool {
    false
}

/// The delay the fault `name` adds (none, without `fault-injection`).
#[cfg(not(feature = "fault-injection"))]
pub(crate) fn delay(_name: &str) -> Option<Duration> {
    None
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_share_and_delay() {
        let f = parse("drop-forward@5, delay-forward=20ms,durable-ack-without-commit,bad@x,slow=never");
        let names: Vec<&str> = f.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["drop-forward", "delay-forward", "durable-ack-without-commit"]);
        assert_eq!(f[0].percent, 5);
        assert_eq!(f[1].delay, Some(Duration::from_millis(20)));
        assert_eq!(f[2].percent, 100);
    }
}
