//! The workload: clients that append operation ids to counter (oplog) tasks, read them back and
//! call a stateless echo task, through random hubs, logging every call in the history.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmesh::client::{Client, ClientError};
use rand::{Rng, SeedableRng};

use crate::history::{Event, Recorder, Type};

/// The oplog's answer to an append: the list's length and prefix hash.
pub fn parse_add(out: &[u8]) -> Option<(u64, u64)> {
    if out.len() != 16 {
        return None;
    }
    Some((u64::from_le_bytes(out[..8].try_into().ok()?), u64::from_le_bytes(out[8..16].try_into().ok()?)))
}

/// The oplog's answer to a read: length, hash and the ids, checked against each other.
pub fn parse_read(out: &[u8]) -> Result<(u64, u64, Vec<u64>), String> {
    let (len, hash) = parse_add(out.get(..16).ok_or("a read answered under 16 bytes")?).ok_or("bad header")?;
    let body = out.get(32..).unwrap_or_default();
    if body.len() as u64 != len * 8 {
        return Err(format!("a read of length {len} carried {} bytes of ids", body.len()));
    }
    let ids: Vec<u64> = body.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    if prefix_hash(&ids) != hash {
        return Err("a read's ids do not match its hash".into());
    }
    Ok((len, hash, ids))
}

/// The oplog's hash of a list of ids (FNV-1a over 64-bit words).
pub fn prefix_hash(ids: &[u64]) -> u64 {
    ids.iter().fold(FNV_OFFSET, |h, id| fnv_step(h, *id))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv_step(h: u64, id: u64) -> u64 {
    (h ^ id).wrapping_mul(0x0100_0000_01b3)
}

/// Every prefix hash of `ids`: `out[n]` is the hash of the first `n` ids.
pub fn prefix_hashes(ids: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(ids.len() + 1);
    let mut h = FNV_OFFSET;
    out.push(h);
    for id in ids {
        h = fnv_step(h, *id);
        out.push(h);
    }
    out
}

/// A counter task the clients write to.
#[derive(Debug, Clone)]
pub struct CounterTask {
    pub name: String,
    /// Whether its appends carry the op id as idempotency key.
    pub keyed: bool,
}

/// What the clients do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub counters: Vec<CounterTask>,
    pub echo: Option<String>,
    pub rate_hz: f64,
    pub clients: usize,
    pub seed: u64,
}

/// Whether an error surely means the call had no effect.
pub fn is_definite_failure(e: &ClientError) -> bool {
    if e.never_sent() {
        return true;
    }
    matches!(
        e.code(),
        Some(
            "not_found"
                | "bad_request"
                | "unauthorized"
                | "payload_too_large"
                | "queue_full"
                | "task_error"
                | "task_trapped"
                | "no_quorum"
        )
    )
}

fn short(e: &ClientError) -> String {
    let s = e.to_string();
    let first = s.lines().next().unwrap_or_default();
    first.chars().take(160).collect()
}

/// Runs the clients until `stop` is set; every call is bounded by the clients' own timeout.
pub async fn run(plan: Plan, hubs: Vec<Client>, rec: Recorder, stop: Arc<AtomicBool>) {
    let next_op = Arc::new(AtomicU64::new(1));
    let mut handles = Vec::new();
    for c in 0..plan.clients {
        let (plan, hubs, rec, stop, next_op) = (plan.clone(), hubs.clone(), rec.clone(), stop.clone(), next_op.clone());
        handles.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed ^ (c as u64).wrapping_mul(0x9e37_79b9));
            let period = Duration::from_secs_f64(plan.clients as f64 / plan.rate_hz);
            let mut process = c as i64;
            // Spread the clients' first calls over one period.
            tokio::time::sleep(period.mul_f64(rng.random::<f64>())).await;
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                next += period;
                let roll: f64 = rng.random();
                if plan.echo.is_some() && (plan.counters.is_empty() || roll < 0.15) {
                    let hub = rng.random_range(0..hubs.len());
                    if !echo(&hubs[hub], plan.echo.as_deref().expect("checked"), hub, process, &rec, &mut rng).await {
                        process += plan.clients as i64;
                    }
                } else if roll < 0.20 {
                    let t = &plan.counters[rng.random_range(0..plan.counters.len())];
                    let hub = rng.random_range(0..hubs.len());
                    if read(&hubs[hub], &t.name, hub, process, &rec).await.is_none() {
                        process += plan.clients as i64;
                    }
                } else {
                    let t = &plan.counters[rng.random_range(0..plan.counters.len())];
                    let op = next_op.fetch_add(1, Ordering::Relaxed);
                    // With a key, a call of unknown outcome is retried (on a random hub) until it
                    // gets a clear answer: the key makes that safe.
                    let tries = if t.keyed { 4 } else { 1 };
                    for _ in 0..tries {
                        let hub = rng.random_range(0..hubs.len());
                        let kind = add(&hubs[hub], t, op, hub, process, &rec).await;
                        if kind == Type::Info {
                            process += plan.clients as i64;
                        }
                        if kind != Type::Info || stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                }
                let now = Instant::now();
                if next > now {
                    tokio::time::sleep(next - now).await;
                } else {
                    next = now;
                }
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
}

/// One append; returns how it ended.
pub async fn add(client: &Client, t: &CounterTask, op: u64, hub: usize, process: i64, rec: &Recorder) -> Type {
    let mut e = Event::new(process, Type::Invoke, "add");
    e.task = Some(t.name.clone());
    e.op = Some(op);
    e.keyed = t.keyed;
    e.hubs = vec![hub];
    rec.record(e.clone());
    let key = format!("op-{op}");
    let res = client.invoke_placed(&t.name, op.to_le_bytes().to_vec(), t.keyed.then_some(key.as_str())).await;
    match res {
        Ok(r) => match parse_add(&r.output) {
            Some((len, hash)) => {
                e.kind = Type::Ok;
                e.epoch = r.epoch;
                e.node = r.node;
                e.len = Some(len);
                e.hash = Some(hash);
            }
            None => {
                e.kind = Type::Info;
                e.error = Some(format!("an append answered {} bytes, not 16", r.output.len()));
            }
        },
        Err(err) => {
            e.kind = if is_definite_failure(&err) { Type::Fail } else { Type::Info };
            e.error = Some(short(&err));
        }
    }
    let kind = e.kind;
    rec.record(e);
    kind
}

/// One read; returns the list when it succeeded.
pub async fn read(client: &Client, task: &str, hub: usize, process: i64, rec: &Recorder) -> Option<Vec<u64>> {
    let mut e = Event::new(process, Type::Invoke, "read");
    e.task = Some(task.to_owned());
    e.hubs = vec![hub];
    rec.record(e.clone());
    let mut list = None;
    match client.invoke_placed(task, Vec::new(), None).await {
        Ok(r) => match parse_read(&r.output) {
            Ok((len, hash, ids)) => {
                e.kind = Type::Ok;
                e.epoch = r.epoch;
                e.node = r.node;
                e.len = Some(len);
                e.hash = Some(hash);
                list = Some(ids);
            }
            Err(msg) => {
                // A garbled answer is a bug the checkers must see, not a lost call.
                e.kind = Type::Ok;
                e.error = Some(msg);
            }
        },
        Err(err) => {
            e.kind = if is_definite_failure(&err) { Type::Fail } else { Type::Info };
            e.error = Some(short(&err));
        }
    }
    rec.record(e);
    list
}

/// One echo; returns false when its outcome is unknown.
async fn echo(client: &Client, task: &str, hub: usize, process: i64, rec: &Recorder, rng: &mut impl Rng) -> bool {
    let mut e = Event::new(process, Type::Invoke, "echo");
    e.task = Some(task.to_owned());
    e.hubs = vec![hub];
    rec.record(e.clone());
    let input: [u8; 16] = rng.random();
    match client.invoke_placed(task, input.to_vec(), None).await {
        Ok(r) => {
            e.kind = Type::Ok;
            e.epoch = r.epoch;
            e.node = r.node;
            if r.output != input {
                e.error = Some("the echo answered other bytes".into());
            }
        }
        Err(err) => {
            e.kind = if is_definite_failure(&err) { Type::Fail } else { Type::Info };
            e.error = Some(short(&err));
        }
    }
    let known = e.kind != Type::Info;
    rec.record(e);
    known
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_matches_the_oplog_task() {
        // Same constants as examples/tasks/oplog.wat: the empty list's hash is the FNV offset.
        assert_eq!(prefix_hash(&[]), 0xcbf2_9ce4_8422_2325);
        let ids = [5, 9, 1];
        let hs = prefix_hashes(&ids);
        assert_eq!(hs.len(), 4);
        assert_eq!(hs[3], prefix_hash(&ids));
        assert_eq!(hs[2], prefix_hash(&ids[..2]));
    }

    #[test]
    fn reads_are_checked_against_their_own_hash() {
        let ids = [3u64, 4];
        let mut out = Vec::new();
        out.extend(2u64.to_le_bytes());
        out.extend(prefix_hash(&ids).to_le_bytes());
        out.extend([0u8; 16]);
        for id in ids {
            out.extend(id.to_le_bytes());
        }
        assert_eq!(parse_read(&out).unwrap().2, ids);
        let mut bad = out.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(parse_read(&bad).is_err());
        assert!(parse_read(&out[..40]).is_err());
    }
}
