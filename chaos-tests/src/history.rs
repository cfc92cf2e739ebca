//! The run's history: every client operation as `invoke` then `ok` / `fail` / `info` (unknown
//! outcome), and every fault as it starts and ends, with times from the start of the run. It is
//! what the checkers read and what `history.jsonl` holds.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The process id of the nemesis in the history.
pub const NEMESIS: i64 = -1;

/// What an event says about its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    Invoke,
    Ok,
    /// Surely had no effect.
    Fail,
    /// May or may not have had an effect (a timeout, a lost connection, `outcome_unknown`).
    Info,
}

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Microseconds since the start of the run.
    pub t_us: u64,
    /// The client (a new one after every `info`, as a client that timed out may still be running
    /// its call), or [`NEMESIS`].
    pub process: i64,
    #[serde(rename = "type")]
    pub kind: Type,
    /// `add`, `read`, `echo`, or a fault's name.
    pub f: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The operation id of an `add`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<u64>,
    /// Whether the call carried an idempotency key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keyed: bool,
    /// The lab hub the call went to (0-based), or the fault's hubs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<usize>,
    /// The instance that answered (from the response headers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// List length and prefix hash the counter answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Free text (the fault's target and rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Event {
    /// A blank event of `kind` for `f`.
    pub fn new(process: i64, kind: Type, f: &str) -> Self {
        Self {
            t_us: 0,
            process,
            kind,
            f: f.to_owned(),
            task: None,
            op: None,
            keyed: false,
            hubs: Vec::new(),
            epoch: None,
            node: None,
            len: None,
            hash: None,
            error: None,
            note: None,
        }
    }

    pub fn is_nemesis(&self) -> bool {
        self.process == NEMESIS
    }
}

/// Collects events from every client and the nemesis, stamping their time.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Recorder {
    pub fn new(start: Instant) -> Self {
        Self { start, events: Arc::new(Mutex::new(Vec::new())) }
    }

    /// Microseconds since the start of the run.
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Appends `e` stamped now; returns the time.
    pub fn record(&self, mut e: Event) -> u64 {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        e.t_us = self.now_us();
        let t = e.t_us;
        events.push(e);
        t
    }

    /// Counts of events so far: (ok, fail, info).
    pub fn counts(&self) -> (usize, usize, usize) {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let n = |k| events.iter().filter(|e| !e.is_nemesis() && e.kind == k).count();
        (n(Type::Ok), n(Type::Fail), n(Type::Info))
    }

    /// Everything recorded, in time order.
    pub fn snapshot(&self) -> Vec<Event> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// An operation: its invoke and, if any, its completion.
#[derive(Debug, Clone)]
pub struct Op<'a> {
    pub invoke: &'a Event,
    pub done: Option<&'a Event>,
}

impl Op<'_> {
    pub fn kind(&self) -> Type {
        self.done.map_or(Type::Info, |d| d.kind)
    }
}

/// Pairs every client invoke with its completion (the next event of the same process).
pub fn pair(events: &[Event]) -> Vec<Op<'_>> {
    let mut open: std::collections::HashMap<i64, usize> = Default::default();
    let mut ops: Vec<Op<'_>> = Vec::new();
    for e in events.iter().filter(|e| !e.is_nemesis()) {
        match e.kind {
            Type::Invoke => {
                open.insert(e.process, ops.len());
                ops.push(Op { invoke: e, done: None });
            }
            _ => {
                if let Some(i) = open.remove(&e.process) {
                    ops[i].done = Some(e);
                }
            }
        }
    }
    ops
}

/// Writes `events` as JSON lines.
pub fn write_jsonl(path: &std::path::Path, events: &[Event]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for e in events {
        serde_json::to_writer(&mut f, e)?;
        f.write_all(b"\n")?;
    }
    f.flush()
}

/// Reads a `history.jsonl`.
pub fn read_jsonl(path: &std::path::Path) -> anyhow::Result<Vec<Event>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1)))
        .collect()
}
