//! What the endpoint grants a peer before it knows who the peer is, and how a member is told
//! from the certificate it showed.
//!
//! ```text
//!  connection attempt --(over its address's, its /64's or the TOTAL unauthenticated slots)--> refused
//!  handshake done: cluster certificate --> a member: Peer (its id is the one its certificate names)
//!                  none               --> a joiner: JOIN only, a small budget per address and /64
//! ```
//! A connection attempt from an address that has not proved it receives there gets a stateless
//! retry first (spoofed packets get no slot). An unauthenticated connection (in its handshake, at
//! most 3 s, or a joiner's) then holds a [`Pending`] slot until it ends or shows a certificate, so
//! what unauthenticated peers can make a hub hold is bounded by `TOTAL` small connections. An IPv6
//! host counts as itself and against its /64 (a LAN's hosts share one /64, so the /64 gets more).
//! A connection from a member's own mesh address (ip and port) takes a slot of that address's own
//! few instead (strangers cannot starve the mesh), and is closed unless it shows a certificate.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hubmesh_proto::pb;

use super::{lock, Refusal};
use crate::tls;

/// Unauthenticated connections at once from one host, from one IPv6 /64, and from all.
const PER_HOST: usize = 16;
const PER_PREFIX: usize = 64;
const TOTAL: usize = 256;
/// Handshakes at once from one member's mesh address (a member keeps one connection per hub).
const PER_MEMBER_ADDRESS: usize = 8;
/// Join attempts a host may make in a burst, then one per `every`; an IPv6 /64 gets more.
const HOST_JOINS: Rate = Rate { burst: 10.0, every: Duration::from_secs(3) };
const PREFIX_JOINS: Rate = Rate { burst: 40.0, every: Duration::from_secs(1) };
/// Sources whose join budget is remembered (the full ones are forgotten first).
const JOIN_SOURCES: usize = 4096;

/// What a slot or a join budget is counted against.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Source {
    /// An IPv4 address (also when IPv4-mapped) or a whole IPv6 address.
    Host(IpAddr),
    /// An IPv6 address's /64.
    Prefix(Ipv6Addr),
    /// A member's mesh address.
    Member(SocketAddr),
}

/// The sources an address counts against: its host, and for IPv6 its /64.
fn sources(addr: IpAddr) -> Vec<Source> {
    match addr {
        IpAddr::V4(v4) => vec![Source::Host(IpAddr::V4(v4))],
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => vec![Source::Host(IpAddr::V4(v4))],
            None => vec![
                Source::Host(IpAddr::V6(v6)),
                Source::Prefix(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
            ],
        },
    }
}

fn limit(s: &Source) -> usize {
    match s {
        Source::Host(_) => PER_HOST,
        Source::Prefix(_) => PER_PREFIX,
        Source::Member(_) => PER_MEMBER_ADDRESS,
    }
}

/// The endpoint's admission state.
#[derive(Default)]
pub(crate) struct Admission {
    unauthenticated: Arc<Mutex<Counts>>,
    joins: Mutex<HashMap<Source, Bucket>>,
}

#[derive(Default)]
struct Counts {
    /// Slots held by strangers (a member address's slots are not counted here).
    total: usize,
    by_source: HashMap<Source, usize>,
}

/// A slot of an unauthenticated connection; given back when dropped.
pub(crate) struct Pending {
    counts: Arc<Mutex<Counts>>,
    sources: Vec<Source>,
}

impl Pending {
    /// Whether this slot is one of a member's mesh address (whose connection must show a
    /// certificate: a joiner comes from elsewhere).
    pub(crate) fn is_member_address(&self) -> bool {
        matches!(self.sources[..], [Source::Member(_)])
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        if !self.is_member_address() {
            c.total -= 1;
        }
        for s in &self.sources {
            if let Some(n) = c.by_source.get_mut(s) {
                *n -= 1;
                if *n == 0 {
                    c.by_source.remove(s);
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Rate {
    burst: f64,
    every: Duration,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Admission {
    /// A slot for a new connection from a stranger at `addr`, or `None` when it must be refused.
    pub(crate) fn connection(&self, addr: IpAddr) -> Option<Pending> {
        self.take(sources(addr), true)
    }

    /// A slot for a new connection from `addr`, a member's mesh address, or `None`.
    pub(crate) fn member_connection(&self, addr: SocketAddr) -> Option<Pending> {
        let addr = SocketAddr::new(sources(addr.ip())[0].host_ip(), addr.port());
        self.take(vec![Source::Member(addr)], false)
    }

    fn take(&self, sources: Vec<Source>, counts_total: bool) -> Option<Pending> {
        let mut c = lock(&self.unauthenticated);
        if counts_total && c.total >= TOTAL {
            return None;
        }
        if sources.iter().any(|s| c.by_source.get(s).copied().unwrap_or(0) >= limit(s)) {
            return None;
        }
        if counts_total {
            c.total += 1;
        }
        for s in &sources {
            *c.by_source.entry(*s).or_default() += 1;
        }
        Some(Pending { counts: self.unauthenticated.clone(), sources })
    }

    /// Slots held by strangers.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        lock(&self.unauthenticated).total
    }

    /// Takes one join attempt from the budgets of `addr`'s host and (IPv6) /64.
    pub(crate) fn join(&self, addr: IpAddr) -> Result<(), Refusal> {
        let sources = sources(addr);
        let now = Instant::now();
        let mut joins = lock(&self.joins);
        if joins.len() + sources.len() > JOIN_SOURCES && sources.iter().any(|s| !joins.contains_key(s)) {
            joins.retain(|s, b| refill(b, rate(s), now) < rate(s).burst);
            if joins.len() + sources.len() > JOIN_SOURCES {
                return Err(too_many_joins());
            }
        }
        let has_token = sources.iter().all(|s| joins.get(s).is_none_or(|b| refill(b, rate(s), now) >= 1.0));
        if !has_token {
            return Err(too_many_joins());
        }
        for s in &sources {
            let b = joins.entry(*s).or_insert(Bucket { tokens: rate(s).burst, at: now });
            b.tokens = refill(b, rate(s), now) - 1.0;
            b.at = now;
        }
        Ok(())
    }
}

impl Source {
    fn host_ip(&self) -> IpAddr {
        match self {
            Self::Host(ip) => *ip,
            Self::Prefix(p) => IpAddr::V6(*p),
            Self::Member(a) => a.ip(),
        }
    }
}

fn rate(s: &Source) -> Rate {
    match s {
        Source::Prefix(_) => PREFIX_JOINS,
        _ => HOST_JOINS,
    }
}

fn refill(b: &Bucket, rate: Rate, now: Instant) -> f64 {
    let earned = now.duration_since(b.at).as_secs_f64() / rate.every.as_secs_f64();
    (b.tokens + earned).min(rate.burst)
}

fn too_many_joins() -> Refusal {
    Refusal::new(
        pb::ErrorCode::Unavailable,
        format!(
            "too many join attempts from this address (one per {} s) or its IPv6 /64 (one per {} s); try again later",
            HOST_JOINS.every.as_secs(),
            PREFIX_JOINS.every.as_secs()
        ),
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
        let held: Vec<_> = (0..PER_HOST).map(|_| a.connection(ip).expect("under the limit")).collect();
        assert!(a.connection(ip).is_none());
        assert!(a.connection("10.0.0.2".parse().unwrap()).is_some(), "another address has its own slots");
        assert!(a.connection("::ffff:10.0.0.1".parse().unwrap()).is_none(), "IPv4-mapped counts as IPv4");
        drop(held);
        assert!(a.connection(ip).is_some());
        assert_eq!(lock(&a.unauthenticated).by_source.len(), 0, "dropped slots leave nothing behind");
        assert_eq!(lock(&a.unauthenticated).total, 0);
    }

    #[test]
    fn an_ipv6_host_counts_alone_and_against_its_64() {
        let a = Admission::default();
        let v6 = |i: usize| -> IpAddr { format!("2001:db8::{i:x}").parse().unwrap() };
        let one: Vec<_> = (0..PER_HOST).map(|_| a.connection(v6(0)).expect("under the limit")).collect();
        assert!(a.connection(v6(0)).is_none(), "one host's limit");
        assert!(a.connection(v6(1)).is_some(), "a neighbour on the same /64 is not starved by one host");
        let many: Vec<_> = (1..=PER_PREFIX).filter_map(|i| a.connection(v6(i))).collect();
        assert_eq!(one.len() + many.len(), PER_PREFIX, "the /64 has a limit of its own");
        assert!(a.connection("2001:db8:0:1::1".parse().unwrap()).is_some(), "another /64");
    }

    #[test]
    fn a_member_address_has_its_own_few_slots() {
        let a = Admission::default();
        let strangers: Vec<_> =
            (0..TOTAL).filter_map(|i| a.connection(IpAddr::from([10, 1, (i / 8) as u8, i as u8]))).collect();
        assert_eq!(strangers.len(), TOTAL);
        assert!(a.connection("10.9.9.9".parse().unwrap()).is_none(), "every stranger slot is taken");
        let member: SocketAddr = "10.0.0.1:7001".parse().unwrap();
        let held: Vec<_> =
            (0..PER_MEMBER_ADDRESS).map(|_| a.member_connection(member).expect("its own slots")).collect();
        assert!(held.iter().all(Pending::is_member_address));
        assert!(a.member_connection(member).is_none(), "and only a few");
        drop(held);
        drop(strangers);
        assert_eq!(lock(&a.unauthenticated).by_source.len(), 0);
        assert_eq!(lock(&a.unauthenticated).total, 0);
    }

    #[test]
    fn join_attempts_beyond_the_burst_are_refused() {
        let a = Admission::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..HOST_JOINS.burst as usize {
            a.join(ip).unwrap();
        }
        let refused = a.join(ip).unwrap_err();
        assert_eq!(refused.code, pb::ErrorCode::Unavailable);
        a.join("10.0.0.2".parse().unwrap()).unwrap();
    }

    #[test]
    fn an_ipv6_64_has_a_larger_join_budget_shared_by_its_hosts() {
        let a = Admission::default();
        let v6 = |i: usize| -> IpAddr { format!("2001:db8::{i:x}").parse().unwrap() };
        let mut ok = 0;
        for i in 0..PREFIX_JOINS.burst as usize {
            ok += usize::from(a.join(v6(i)).is_ok());
        }
        assert_eq!(ok, PREFIX_JOINS.burst as usize, "each host within its own budget");
        assert!(a.join(v6(1000)).is_err(), "the /64's budget is spent");
        a.join("2001:db8:0:1::1".parse().unwrap()).unwrap();
    }
}
