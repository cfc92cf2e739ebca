//! The monitor: polls every reachable hub's status and tasks a few times a second, for the
//! timeline, the failover split (detect / place / answer) and the cluster trace.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hubmesh::client::Client;
use serde::{Deserialize, Serialize};

use crate::history::Recorder;

/// What one hub said at one time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub t_us: u64,
    pub hub: usize,
    pub leader: Option<u64>,
    pub term: u64,
    pub voters: usize,
    /// Node ids this hub's view marks down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<u64>,
    /// Task → (host node id, epoch, state).
    pub tasks: BTreeMap<String, (u64, u64, String)>,
}

/// Every `every` until `stop`, asks each hub with `ask` (a hub whose answer is `None` is skipped
/// for that round); the answers in time order (`time_of`).
async fn poll<T, F, Fut>(hubs: &[Client], every: Duration, stop: &AtomicBool, ask: F, time_of: fn(&T) -> u64) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, Client) -> Fut,
    Fut: std::future::Future<Output = Option<T>> + Send + 'static,
{
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let mut polls = tokio::task::JoinSet::new();
        for (i, c) in hubs.iter().cloned().enumerate() {
            polls.spawn(ask(i, c));
        }
        while let Some(r) = polls.join_next().await {
            if let Ok(Some(answer)) = r {
                out.push(answer);
            }
        }
    }
    out.sort_by_key(time_of);
    out
}

/// Polls `hubs` every `every` until `stop`; a hub that does not answer within 800 ms is skipped
/// for that round.
pub async fn run(hubs: Vec<Client>, every: Duration, rec: Recorder, stop: Arc<AtomicBool>) -> Vec<Sample> {
    let ask = |i: usize, c: Client| {
        let rec = rec.clone();
        async move {
            let s = tokio::time::timeout(Duration::from_millis(800), c.status()).await.ok()?.ok()?;
            let tasks = tokio::time::timeout(Duration::from_millis(800), c.tasks()).await.ok()?.ok()?;
            Some(Sample {
                t_us: rec.now_us(),
                hub: i,
                leader: s.leader,
                term: s.term,
                voters: s.voters.len(),
                down: s.nodes.iter().filter(|n| n.role.contains("down")).map(|n| n.id).collect(),
                tasks: tasks
                    .into_iter()
                    .filter_map(|t| {
                        let p = t.placement?;
                        Some((t.name, (p.node_id, p.epoch, t.state)))
                    })
                    .collect(),
            })
        }
    };
    poll(&hubs, every, &stop, ask, |s: &Sample| s.t_us).await
}

/// One line per sample (VOPR style): time, hub, leader, term, voters, down, tasks.
pub fn trace(samples: &[Sample], node_names: &BTreeMap<u64, String>) -> String {
    let name = |id: &u64| node_names.get(id).cloned().unwrap_or_else(|| id.to_string());
    let mut s = String::new();
    for x in samples {
        let tasks: Vec<String> = x.tasks.iter().map(|(t, (n, e, st))| format!("{t}@{}#{e}:{st}", name(n))).collect();
        let down: Vec<String> = x.down.iter().map(name).collect();
        s += &format!(
            "{:>10.3}s n{} leader={} term={} voters={} down=[{}] {}\n",
            x.t_us as f64 / 1e6,
            x.hub + 1,
            x.leader.as_ref().map(name).unwrap_or_else(|| "-".into()),
            x.term,
            x.voters,
            down.join(","),
            tasks.join(" ")
        );
    }
    s
}

/// What one hub listed of the LAN's devices at one time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSample {
    pub t_us: u64,
    pub hub: usize,
    /// How long the hub had been up (a hub that just started has not caught up yet).
    pub uptime_ms: u64,
    /// Device id → `seen` or `unreachable`.
    pub devices: BTreeMap<String, String>,
}

/// Polls every hub's device list every `every` until `stop` (a hub that does not answer is
/// skipped for that round).
pub async fn devices(hubs: Vec<Client>, every: Duration, rec: Recorder, stop: Arc<AtomicBool>) -> Vec<DeviceSample> {
    let ask = |i: usize, c: Client| {
        let rec = rec.clone();
        async move {
            // Stamped when asked (the grace periods count from there), the list before the
            // uptime: a restart between the two reads shows as a young hub.
            let t_us = rec.now_us();
            let list = tokio::time::timeout(Duration::from_millis(800), c.devices()).await.ok()?.ok()?;
            let s = tokio::time::timeout(Duration::from_millis(800), c.status()).await.ok()?.ok()?;
            Some(DeviceSample {
                t_us,
                hub: i,
                uptime_ms: s.uptime_ms,
                devices: list.into_iter().map(|d| (d.id, d.reach)).collect(),
            })
        }
    };
    poll(&hubs, every, &stop, ask, |s: &DeviceSample| s.t_us).await
}
