//! The progress line of a chaos run on stderr: a bar, the phase, the calls so far and the fault
//! in force; redrawn twice a second on a terminal, a line every 10 s otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::history::Recorder;

/// Shared state for the progress line.
#[derive(Default)]
pub(crate) struct Progress {
    phase: String,
    fault: String,
}

pub(crate) fn progress_loop(
    rec: Recorder,
    total: Duration,
    state: Arc<Mutex<Progress>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tty = std::io::stderr().is_terminal();
        let every = if tty { Duration::from_millis(500) } else { Duration::from_secs(10) };
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(every).await;
            let (ok, fail, info) = rec.counts();
            let p = state.lock().unwrap_or_else(|p| p.into_inner());
            let done = started.elapsed().as_secs_f64() / total.as_secs_f64().max(1.0);
            let width = 24;
            let filled = ((done.min(1.0)) * width as f64) as usize;
            let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
            let line = format!(
                "[{bar}] {:>4.0}s {:<10} ok {ok} fail {fail} unknown {info} {}",
                started.elapsed().as_secs_f64(),
                p.phase,
                p.fault
            );
            if tty {
                eprint!("\r{line:<110}");
            } else {
                eprintln!("{line}");
            }
        }
        if tty {
            eprintln!();
        }
    })
}

pub(crate) fn set_phase(p: &Arc<Mutex<Progress>>, phase: &str, fault: &str) {
    let mut g = p.lock().unwrap_or_else(|p| p.into_inner());
    g.phase = phase.into();
    g.fault = fault.into();
}
