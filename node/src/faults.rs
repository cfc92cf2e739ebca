//! Faults for the chaos suite's self-tests: compiled in only with the `fault-injection` feature,
//! and even then armed only by naming them in `HUBMESH_FAULTS` (comma-separated) at start. A
//! release build has none of this: [`armed`] is a constant `false`.
//!
//! Faults:
//! - `durable-ack-without-commit`: a durable task answers without committing the checkpoint (the
//!   bug class "acknowledged before it was durable"); the chaos checkers must call that false.

/// Whether the fault `name` is armed in this process.
#[cfg(feature = "fault-injection")]
pub(crate) fn armed(name: &str) -> bool {
    static FAULTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    FAULTS
        .get_or_init(|| {
            let list: Vec<String> = std::env::var("HUBMESH_FAULTS")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            if !list.is_empty() {
                tracing::warn!(faults = ?list, "fault injection armed: this hub is deliberately broken");
            }
            list
        })
        .iter()
        .any(|f| f == name)
}

/// Whether the fault `name` is armed in this process (never, without `fault-injection`).
#[cfg(not(feature = "fault-injection"))]
pub(crate) fn armed(_name: &str) -> bool {
    false
}
