//! The worker that gossips this hub's sightings: changes batched every [`BATCH`], a complete
//! account when a peer lacks some, a digest every [`DIGEST`]; it also prunes the registry.

use std::sync::Arc;
use std::time::Duration;

use hubmesh_consensus::now_ms;
use hubmesh_proto::{pb, Message as _};
use tokio::time::Instant;

use crate::hub::Hub;
use crate::worker::Worker;

/// Own changes are gathered this long before they are sent (a burst of discoveries goes out in
/// a few messages; a single change is not held up for long).
const BATCH: Duration = Duration::from_millis(20);
/// How often the digest goes out (and the registry is pruned).
const DIGEST: Duration = Duration::from_secs(5);
/// Least time between two complete accounts.
const ACCOUNT_GAP: Duration = Duration::from_secs(1);
/// A tombstone (a clean leave) is kept this long, so that a late older sighting cannot bring the
/// device back.
const TOMBSTONE: Duration = Duration::from_secs(600);
/// Largest message body this worker builds (gossipsub takes 64 KiB).
const MAX_BODY: usize = 48 << 10;

pub(crate) struct DevicesWorker {
    hub: Arc<Hub>,
    next_digest: Instant,
    last_account: Option<Instant>,
}

impl DevicesWorker {
    pub(crate) fn new(hub: Arc<Hub>) -> Self {
        Self { hub, next_digest: Instant::now() + DIGEST, last_account: None }
    }
}

/// Splits sightings, sorted by device id, into messages under [`MAX_BODY`]; each chunk is
/// returned with the id it starts at.
fn chunks(sightings: Vec<pb::DeviceSighting>) -> Vec<Vec<pb::DeviceSighting>> {
    let mut out: Vec<Vec<pb::DeviceSighting>> = vec![Vec::new()];
    let mut size = 0;
    for s in sightings {
        let len = s.encoded_len() + 8;
        if size + len > MAX_BODY && !out.last().is_some_and(Vec::is_empty) {
            out.push(Vec::new());
            size = 0;
        }
        size += len;
        if let Some(chunk) = out.last_mut() {
            chunk.push(s);
        }
    }
    out
}

/// A complete account as of `as_of`, in messages that each cover a range of ids: together
/// they cover every id, so what a peer holds and the account leaves out is forgotten everywhere.
pub(crate) fn account(as_of: u64, sightings: Vec<pb::DeviceSighting>) -> Vec<pb::DeviceSightings> {
    let parts = chunks(sightings);
    let starts: Vec<String> = parts.iter().skip(1).map(|p| p[0].device.clone()).collect();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, sightings)| pb::DeviceSightings {
            complete: true,
            as_of,
            from: if i == 0 { String::new() } else { starts[i - 1].clone() },
            to: starts.get(i).cloned().unwrap_or_default(),
            sightings,
        })
        .collect()
}

impl Worker for DevicesWorker {
    fn name(&self) -> &'static str {
        "devices"
    }

    async fn work(&mut self) -> Result<(), String> {
        let devices = self.hub.devices();
        let gossip = self.hub.gossip();
        let unsent = devices.take_unsent();
        if !unsent.is_empty() {
            for sightings in chunks(unsent) {
                let msg = pb::DeviceSightings { sightings, ..Default::default() };
                gossip.publish_device(pb::gossip_message::Body::Sightings(msg)).await;
            }
        }
        if self.last_account.is_none_or(|t| t.elapsed() >= ACCOUNT_GAP) {
            if let Some((as_of, own)) = devices.take_account() {
                for msg in account(as_of, own) {
                    gossip.publish_device(pb::gossip_message::Body::Sightings(msg)).await;
                }
                self.last_account = Some(Instant::now());
                metrics::counter!("hubmesh_devices_accounts_total").increment(1);
            }
        }
        if Instant::now() >= self.next_digest {
            let state = self.hub.consensus().state();
            devices.prune(|h| state.nodes.contains_key(&h), now_ms().saturating_sub(TOMBSTONE.as_millis() as u64));
            gossip.publish_device(pb::gossip_message::Body::Digest(devices.digest())).await;
            self.next_digest = Instant::now() + DIGEST;
            metrics::gauge!("hubmesh_devices").set(devices.view().len() as f64);
        }
        Ok(())
    }

    async fn wait(&mut self) {
        // A due account that waits for its gap is sent when the gap ends.
        let retry = match self.last_account {
            Some(t) if self.hub.devices().is_account_due() => (t + ACCOUNT_GAP).min(self.next_digest),
            // Due while the hub settles after its start: the next digest round retries.
            _ => self.next_digest,
        };
        tokio::select! {
            () = self.hub.devices().wake.notified() => tokio::time::sleep(BATCH).await,
            () = tokio::time::sleep_until(retry) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sighting(i: usize) -> pb::DeviceSighting {
        pb::DeviceSighting { device: format!("d{i:05}"), version: 1, name: "n".repeat(200), ..Default::default() }
    }

    #[test]
    fn a_long_account_is_split_into_ranges_that_cover_every_id() {
        let msgs = account(9, (0..1000).map(sighting).collect());
        assert!(msgs.len() > 1, "200 KiB of sightings is more than one message");
        assert!(msgs.iter().all(|m| m.encoded_len() <= 64 << 10 && m.complete && m.as_of == 9));
        assert_eq!(msgs[0].from, "");
        assert_eq!(msgs.last().unwrap().to, "");
        for pair in msgs.windows(2) {
            assert_eq!(pair[0].to, pair[1].from, "no gap between ranges");
            assert_eq!(pair[1].sightings[0].device, pair[1].from);
        }
        assert_eq!(msgs.iter().map(|m| m.sightings.len()).sum::<usize>(), 1000);
        // An empty account is one message covering everything: a peer forgets all of this hub's.
        let empty = account(3, Vec::new());
        assert_eq!(empty.len(), 1);
        assert_eq!((empty[0].from.as_str(), empty[0].to.as_str()), ("", ""));
    }
}
