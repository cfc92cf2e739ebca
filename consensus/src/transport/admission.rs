//! What the endpoint grants a peer before it knows who the peer is, and how a member is told
//! from the certificate it showed.
//!
//! ```text
//!  connection attempt --(over PER_ADDRESS or TOTAL unauthenticated from its address)--> refused
//!  handshake done: cluster certificate --> a member: Peer (its id is the one its certificate names)
//!                  none               --> a joiner: JOIN only, JOINS_PER_MINUTE per address
//! ```
//! A connection attempt from an address that has not proved it receives there gets a stateless
//! retry first (spoofed packets get no slot). An unauthenticated connection (in its handshake, at
//! most 3 s, or a joiner's) then holds a [`Pending`] slot until it ends or shows a certificate, so
//! what unauthenticated peers can make a hub hold is bounded by `TOTAL` small connections. An
//! IPv6 source counts by its /64. A member connecting from its own mesh address takes no slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hubmesh_proto::pb;

use super::{lock, Refusal};
use crate::tls;

/// Unauthenticated connections at once from one address, and from all.
const PER_ADDRESS: usize = 16;
const TOTAL: usize = 256;
/// Join attempts an address may make in a burst, then one per `JOIN_EVERY`.
const JOIN_BURST: f64 = 10.0;
const JOIN_EVERY: Duration = Duration::from_secs(3);
/// Addresses whose join budget is remembered (the full ones are forgotten first).
const JOIN_ADDRESSES: usize = 4096;

/// The endpoint's admission state.
#[derive(Default)]
pub(crate) struct Admission {
    unauthenticated: Arc<Mutex<Counts>>,
    joins: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// A slot of an unauthenticated connection; given back when dropped.
pub(crate) struct Pending {
    counts: Arc<Mutex<Counts>>,
    addr: IpAddr,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total -= 1;
        if let Some(n) = c.by_address.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                c.by_address.remove(&self.addr);
            }
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The source an address counts against: an IPv4 address (also when IPv4-mapped), or an IPv6
/// address's /64 (one host usually holds a whole /64).
fn source(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

impl Admission {
    /// A slot for a new connection from `addr`, or `None` when it must be refused.
    pub(crate) fn connection(&self, addr: IpAddr) -> Option<Pending> {
        let addr = source(addr);
        let mut c = lock(&self.unauthenticated);
        let from_addr = c.by_address.get(&addr).copied().unwrap_or(0);
        if c.total >= TOTAL || from_addr >= PER_ADDRESS {
            return None;
        }
        c.total += 1;
        c.by_address.insert(addr, from_addr + 1);
        Some(Pending { counts: self.unauthenticated.clone(), addr })
    }

    /// Takes one join attempt from `addr`'s budget.
    pub(crate) fn join(&self, addr: IpAddr) -> Result<(), Refusal> {
        let addr = source(addr);
        let now = Instant::now();
        let mut joins = lock(&self.joins);
        if joins.len() >= JOIN_ADDRESSES && !joins.contains_key(&addr) {
            joins.retain(|_, b| refill(b, now) < JOIN_BURST);
            if joins.len() >= JOIN_ADDRESSES {
                return Err(too_many_joins());
            }
        }
        let b = joins.entry(addr).or_insert(Bucket { tokens: JOIN_BURST, at: now });
        b.tokens = refill(b, now);
        b.at = now;
        if b.tokens < 1.0 {
            return Err(too_many_joins());
        }
        b.tokens -= 1.0;
        Ok(())
    }
}

fn refill(b: &Bucket, now: Instant) -> f64 {
    let earned = now.duration_since(b.at).as_secs_f64() / JOIN_EVERY.as_secs_f64();
    (b.tokens + earned).min(JOIN_BURST)
}

fn too_many_joins() -> Refusal {
    Refusal::new(
        pb::ErrorCode::Unavailable,
        format!("too many join attempts from this address: one per {} s", JOIN_EVERY.as_secs()),
    )
}

/// A member connection's peer: the certificate it showed (signed by the cluster CA) and the
/// hub id that certificate names, learned from the first request and fixed for the connection.
pub(crate) struct Peer {
    cert: Vec<u8>,
    pub(crate) fingerprint: [u8; 32],
    id: OnceLock<u64>,
}

impl Peer {
    pub(crate) fn new(cert: Vec<u8>) -> Self {
        let fingerprint = tls::fingerprint(&cert);
        Self { cert, fingerprint, id: OnceLock::new() }
    }

    /// The hub id of a request that says it comes from `claimed`: the certificate must name
    /// exactly that hub (a member cannot speak for another).
    pub(crate) fn id(&self, claimed: u64) -> Result<u64, Refusal> {
        let id = match self.id.get() {
            Some(id) => *id,
            None if tls::certifies(&self.cert, claimed) => *self.id.get_or_init(|| claimed),
            None => return Err(impostor(claimed)),
        };
        if id == claimed {
            Ok(id)
        } else {
            Err(impostor(claimed))
        }
    }
}

fn impostor(claimed: u64) -> Refusal {
    Refusal::new(pb::ErrorCode::Unauthorized, format!("this connection's certificate does not name hub {claimed}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthenticated_slots_are_bounded_per_address_and_given_back() {
        let a = Admission::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..PER_ADDRESS).map(|_| a.connection(ip).expect("under the limit")).collect();
        assert!(a.connection(ip).is_none());
        assert!(a.connection("10.0.0.2".parse().unwrap()).is_some(), "another address has its own slots");
        assert!(a.connection("::ffff:10.0.0.1".parse().unwrap()).is_none(), "IPv4-mapped counts as IPv4");
        let v6: Vec<_> = (0..PER_ADDRESS).map(|i| a.connection(format!("2001:db8::{i:x}").parse().unwrap())).collect();
        assert!(v6.iter().all(Option::is_some));
        assert!(a.connection("2001:db8::ffff".parse().unwrap()).is_none(), "one /64 is one source");
        drop(v6);
        drop(held);
        assert!(a.connection(ip).is_some());
        assert_eq!(lock(&a.unauthenticated).by_address.len(), 0, "dropped slots leave nothing behind");
    }

    #[test]
    fn join_attempts_beyond_the_burst_are_refused() {
        let a = Admission::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..JOIN_BURST as usize {
            a.join(ip).unwrap();
        }
        let refused = a.join(ip).unwrap_err();
        assert_eq!(refused.code, pb::ErrorCode::Unavailable);
        a.join("10.0.0.2".parse().unwrap()).unwrap();
    }
}
