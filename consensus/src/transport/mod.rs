//! The mesh's QUIC endpoint (quinn, mutual TLS): one per hub, carrying Raft RPCs, joins and the
//! data plane. Every stream kind is numbered in [`StreamKind`]; typed [`Endpoint`]s pair a kind
//! with its request and answer types and do the member check and decoding once. Consensus serves
//! its own kinds; the node serves the data-plane kinds at boot, so consensus never depends on
//! node.
//!
//! ```text
//!  ENDPOINT.call(target, req) --cached connection to node-<target>.hubmesh--> open_bi
//!      write pb::MeshRequest{kind, from, payload}, finish --> read pb::MeshResponse to the end
//!      (code != 0: a Refusal{code, message, hint} --> RpcError::Remote)
//!      once the peer's answer says keeps_streams: small requests go as frames on streams kept
//!      open between calls (kept), no stream opened per call
//!  accept loop (server) --> per connection: who is it (CA-signed certificate = member; none =
//!      joiner, which may only JOIN) --> per stream: size-limited read, decode, dispatch by kind
//!  BULK.open(target, header) --same connection--> a bulk stream (bulk): header, then the body
//! ```
//! A unary request never starts with 0x00 or 0x01 (a protobuf message starts with a field tag of
//! field 1 or more), so one byte tells a unary stream from a bulk (0x00) and a kept (0x01) one.
//!
//! Nothing on this path panics on its input: garbage, truncated or oversized requests get an
//! error response (or a closed stream) and the endpoint goes on.

mod admission;
mod bulk;
mod congestion;
mod endpoint;
mod error;
mod exchange;
mod kept;
#[cfg(test)]
mod kept_tests;
mod kind;
mod quic;
mod server;
mod silence;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hubmesh_proto::{pb, Message};
use quinn::crypto::rustls::QuicClientConfig;

pub use bulk::{BulkBody, BulkCall};
pub use endpoint::{
    BulkEndpoint, Endpoint, Json, LeaderAppend, PingAnswer, TypedBulkCall, Wire, CHECKPOINT_FETCH, CHECKPOINT_PUSH,
    INVOKE_FORWARD, JOIN, MIGRATE_END, MIGRATE_PAGES, MIGRATE_PREPARE, MIGRATE_REQUEST, MIGRATE_WATCH, MODULE_FETCH,
    PING, PROPOSE, RAFT_APPEND, RAFT_SNAPSHOT, RAFT_VOTE, READ_INDEX,
};
pub use error::{Refusal, RpcError, TransportError};
pub use kind::StreamKind;
pub use server::MAX_JOIN_REQUEST;

use crate::tls::{self, Identity};
use exchange::{exchange, Exchange, Outgoing, CLOSE_REFUSED, CLOSE_REVOKED};
pub use kept::KeptStreamStats;
use kept::{exchange_kept, Kept, MAX_KEPT_REQUEST};

/// Largest request or response.
pub const MAX_FRAME: usize = 64 << 20;
/// Requests larger than this are sent at a lower stream priority than the rest.
const BULK_BYTES: usize = 256 << 10;
/// First byte of a bulk stream.
const BULK_MARK: u8 = 0;
/// Longest a dial to a peer may take (others calling that peer wait for it).
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest header of a bulk stream.
pub const MAX_BULK_HEADER: usize = 4 << 20;

/// Who sent a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A hub with a certificate signed by the cluster CA, which names this id.
    Member(u64),
    /// A hub without a certificate: it may only join.
    Joiner,
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, Refusal>> + Send>>;
/// An untyped request handler: the caller and the payload in, the answer's payload out. The
/// node registers typed [`Endpoint`]s instead; this layer is for the transport's own tests.
pub type Handler = Arc<dyn Fn(Caller, Vec<u8>) -> HandlerFuture + Send + Sync>;
/// An untyped bulk-stream handler: the caller, the header, and the body to read.
pub type BulkHandler = Arc<dyn Fn(Caller, Vec<u8>, BulkBody) -> HandlerFuture + Send + Sync>;

/// Wraps an async closure as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Caller, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, Refusal>> + Send + 'static,
{
    Arc::new(move |caller, payload| Box::pin(f(caller, payload)))
}

/// Wraps an async closure as a [`BulkHandler`].
pub fn bulk_handler<F, Fut>(f: F) -> BulkHandler
where
    F: Fn(Caller, Vec<u8>, BulkBody) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, Refusal>> + Send + 'static,
{
    Arc::new(move |caller, header, body| Box::pin(f(caller, header, body)))
}

/// The endpoint.
pub struct Transport {
    endpoint: quinn::Endpoint,
    node_id: u64,
    link: quic::Link,
    member_client: RwLock<quinn::ClientConfig>,
    peers: Arc<RwLock<HashMap<u64, SocketAddr>>>,
    conns: Arc<Mutex<HashMap<u64, quinn::Connection>>>,
    /// Bumped whenever `conns` is cleared for good reason (a new identity, shutdown): a dial that
    /// started before keeps its connection out of `conns`.
    conns_era: Arc<std::sync::atomic::AtomicU64>,
    /// One dial at a time per peer: concurrent callers wait for its connection rather than each
    /// opening one (a burst would spend the peer's slots for this hub's address).
    dialing: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    handlers: RwLock<HashMap<StreamKind, Handler>>,
    bulk_handlers: RwLock<HashMap<StreamKind, BulkHandler>>,
    last_ok: Mutex<HashMap<u64, Instant>>,
    last_heard: Mutex<HashMap<u64, Instant>>,
    revoked: RwLock<std::collections::HashSet<[u8; 32]>>,
    admission: admission::Admission,
    /// How long each peer's connection has been silent, as failed calls saw it.
    silence: Arc<silence::Silence>,
    /// Open member connections to this hub, by quinn's id: their certificate's fingerprint.
    live: LiveConnections,
    /// Streams kept open between calls, per peer.
    kept: Kept,
}

/// Open member connections by quinn's id, with their certificate's fingerprint.
type LiveConnections = Arc<Mutex<HashMap<usize, ([u8; 32], quinn::Connection)>>>;

/// An open member connection's entry in `Transport::live`; removed when dropped.
struct Live {
    live: LiveConnections,
    id: usize,
}

impl Drop for Live {
    fn drop(&mut self) {
        lock(&self.live).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Transport {
    /// Binds the endpoint and starts accepting. `heartbeat` (the Raft heartbeat of the hub's
    /// timeout profile) stands for the link's round trip until a connection measures it.
    pub fn bind(
        addr: SocketAddr,
        identity: &Identity,
        node_id: u64,
        heartbeat: Duration,
    ) -> Result<Arc<Self>, TransportError> {
        let link = quic::Link::new(addr, heartbeat);
        let (server, member_client) = quic::configs(identity, link)?;
        let endpoint =
            quic::endpoint(server, identity, addr).map_err(|source| TransportError::Bind { addr, source })?;
        let t = Arc::new(Self {
            endpoint,
            node_id,
            link,
            member_client: RwLock::new(member_client),
            peers: Default::default(),
            conns: Default::default(),
            conns_era: Default::default(),
            dialing: Mutex::new(HashMap::new()),
            handlers: RwLock::new(HashMap::new()),
            bulk_handlers: RwLock::new(HashMap::new()),
            last_ok: Mutex::new(HashMap::new()),
            last_heard: Mutex::new(HashMap::new()),
            revoked: RwLock::new(Default::default()),
            admission: Default::default(),
            silence: Default::default(),
            live: Default::default(),
            kept: Default::default(),
        });
        tokio::spawn(server::accept_loop(Arc::downgrade(&t), t.endpoint.clone()));
        Ok(t)
    }

    /// Replaces the certificate this endpoint presents and trusts (a joiner, once admitted).
    pub fn set_identity(&self, identity: &Identity) -> Result<(), TransportError> {
        let (server, client) = quic::configs(identity, self.link)?;
        self.endpoint.set_server_config(Some(server));
        *self.member_client.write().unwrap_or_else(|p| p.into_inner()) = client;
        self.forget_connections();
        Ok(())
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// This hub's node id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Registers the untyped handler of `kind` (see [`Endpoint::serve`] for the typed one).
    pub fn register(&self, kind: StreamKind, h: Handler) {
        self.handlers.write().unwrap_or_else(|p| p.into_inner()).insert(kind, h);
    }

    /// Registers the untyped bulk-stream handler of `kind` (see [`BulkEndpoint::serve`]).
    pub fn register_bulk(&self, kind: StreamKind, h: BulkHandler) {
        self.bulk_handlers.write().unwrap_or_else(|p| p.into_inner()).insert(kind, h);
    }

    /// Records where `node` listens.
    pub fn set_peer(&self, node: u64, addr: SocketAddr) {
        // The connection goes while the book is locked: a dial to the old address that ends now
        // must not find the old address still there (`connection`).
        let mut book = self.peers.write().unwrap_or_else(|p| p.into_inner());
        let old = book.insert(node, addr);
        if old.is_some_and(|o| o != addr) {
            lock(&self.conns).remove(&node);
            self.kept.forget(node);
        }
    }

    /// Replaces the whole address book with `peers` (the membership's and the state's hubs): a
    /// removed hub's address is forgotten, with its connection, and no longer counts as a
    /// member's address.
    pub fn set_peers(&self, peers: HashMap<u64, SocketAddr>) {
        let mut book = self.peers.write().unwrap_or_else(|p| p.into_inner());
        let mut conns = lock(&self.conns);
        conns.retain(|node, _| peers.get(node).is_some_and(|a| book.get(node) == Some(a)));
        self.kept.keep_only(&conns);
        lock(&self.dialing).retain(|node, _| peers.contains_key(node));
        *book = peers;
    }

    /// The largest UDP payload the connection to `node` currently uses (MTU discovery's result).
    pub fn path_mtu(&self, node: u64) -> Option<u16> {
        lock(&self.conns).get(&node).map(|c| c.stats().path.current_mtu)
    }

    /// When a call to `node` last succeeded.
    pub fn last_ok(&self, node: u64) -> Option<Instant> {
        lock(&self.last_ok).get(&node).copied()
    }

    /// Replaces the set of revoked certificate fingerprints (removed hubs), and closes every open
    /// connection, to or from this hub, whose peer shows one of them.
    pub fn set_revoked(&self, revoked: impl IntoIterator<Item = [u8; 32]>) {
        let revoked: std::collections::HashSet<[u8; 32]> = revoked.into_iter().collect();
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = revoked.clone();
        for (fp, conn) in lock(&self.live).values() {
            if revoked.contains(fp) {
                tracing::info!(peer = %conn.remote_address(), "closing a removed hub's connection");
                conn.close(CLOSE_REVOKED.into(), b"this hub was removed from the mesh");
            }
        }
        lock(&self.conns).retain(|_, conn| {
            let fp = conn
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
                .and_then(|certs| certs.first().map(|c| tls::fingerprint(c)));
            let keep = fp.is_none_or(|fp| !revoked.contains(&fp));
            if !keep {
                conn.close(CLOSE_REVOKED.into(), b"this hub was removed from the mesh");
            }
            keep
        });
        self.kept.keep_only(&lock(&self.conns));
    }

    /// Whether `addr` is a member's mesh address (a member connects from its own endpoint).
    fn is_peer_address(&self, addr: SocketAddr) -> bool {
        // Compared as ip and port only: an IPv4 peer seen on a dual-stack socket is IPv4-mapped,
        // and an IPv6 address may carry a flow label or scope.
        let canonical = |a: SocketAddr| (a.ip().to_canonical(), a.port());
        self.peers.read().unwrap_or_else(|p| p.into_inner()).values().any(|a| canonical(*a) == canonical(addr))
    }

    /// Records an accepted member connection showing the certificate `fingerprint`, unless that
    /// certificate is revoked (checked after the entry is in, so a concurrent revocation closes it).
    fn track(&self, conn: &quinn::Connection, fingerprint: [u8; 32]) -> Option<Live> {
        let id = conn.stable_id();
        lock(&self.live).insert(id, (fingerprint, conn.clone()));
        let entry = Live { live: self.live.clone(), id };
        if self.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(&fingerprint) {
            return None;
        }
        Some(entry)
    }

    /// When `node` last sent this hub a request.
    pub fn last_heard(&self, node: u64) -> Option<Instant> {
        lock(&self.last_heard).get(&node).copied()
    }

    /// Calls `kind` on `target` with `payload` (untyped; see [`Endpoint::call`]).
    pub async fn call(
        &self,
        target: u64,
        kind: StreamKind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        self.call_unless(target, kind, payload, timeout, std::future::pending()).await
    }

    /// Like [`call`](Self::call), but stops waiting when `give_up` completes: with
    /// [`RpcError::NotDelivered`] if the request's end had not been sent yet (the peer cannot
    /// have all of it, so the caller may safely try elsewhere), else with `Timeout` — and the same
    /// when `timeout` passes.
    pub async fn call_unless(
        &self,
        target: u64,
        kind: StreamKind,
        payload: Vec<u8>,
        timeout: Duration,
        give_up: impl Future<Output = ()>,
    ) -> Result<Vec<u8>, RpcError> {
        let sent = std::sync::atomic::AtomicBool::new(false);
        let used: Mutex<Option<Used>> = Mutex::new(None);
        let res = tokio::select! {
            // Giving up is checked first: if it is already due, the request is never sent.
            biased;
            () = give_up => {
                if sent.load(std::sync::atomic::Ordering::Acquire) {
                    Err(RpcError::Timeout)
                } else {
                    Err(RpcError::NotDelivered(target))
                }
            }
            r = tokio::time::timeout(timeout, self.call_inner(target, kind, payload, &sent, &used)) => {
                // Still dialing, or waiting for stream credit: the request never left.
                r.unwrap_or_else(|_| match sent.load(std::sync::atomic::Ordering::Acquire) {
                    true => Err(RpcError::Timeout),
                    false => Err(RpcError::NotDelivered(target)),
                })
            }
        };
        match &res {
            Ok(_) | Err(RpcError::Remote { .. }) => {
                lock(&self.last_ok).insert(target, Instant::now());
            }
            Err(RpcError::Unreachable(..)) | Err(RpcError::Timeout) | Err(RpcError::NotDelivered(_)) => {
                // Only the connection this call used (a concurrent call may have opened a good one;
                // the handle is held until here, so its id cannot have been reused), and only once
                // nothing at all has come from the peer on it for a while (`silence`): a peer that
                // sent an ack or a keep-alive is alive and merely slow or lossy, and its connection
                // is worth keeping. A connection this call dialled is not evicted.
                let used = lock(&used).take();
                if let Some(u) = used.filter(|u| {
                    let call = silence::FailedCall {
                        conn: u.conn.stable_id(),
                        received_then: u.received,
                        received_now: u.conn.stats().udp_rx.datagrams,
                        started: u.started,
                    };
                    self.silence.failed(target, call, Instant::now())
                }) {
                    let mut conns = lock(&self.conns);
                    if conns.get(&target).is_some_and(|c| c.stable_id() == u.conn.stable_id()) {
                        conns.remove(&target);
                        self.kept.forget(target);
                    }
                }
            }
            Err(RpcError::Protocol(_)) => {}
        }
        res
    }

    async fn call_inner(
        &self,
        target: u64,
        kind: StreamKind,
        payload: Vec<u8>,
        sent: &std::sync::atomic::AtomicBool,
        used: &Mutex<Option<Used>>,
    ) -> Result<Vec<u8>, RpcError> {
        let (conn, dialled) = self.connect(target).await?;
        if !dialled {
            let received = conn.stats().udp_rx.datagrams;
            *lock(used) = Some(Used { received, started: Instant::now(), conn: conn.clone() });
        }
        let req = pb::MeshRequest { kind: kind as u32, from: self.node_id, payload }.encode_to_vec();
        let failed = |e| match e {
            // Lost after the request's end went out: the peer may have acted on it.
            Exchange::Lost(_) if sent.load(std::sync::atomic::Ordering::Acquire) => RpcError::Timeout,
            Exchange::Lost(m) | Exchange::Refused(m) => RpcError::Unreachable(target, m),
            Exchange::Bad(m) => RpcError::Protocol(m),
            Exchange::Remote(e) => e,
        };
        if req.len() <= MAX_KEPT_REQUEST {
            if let Some(stream) = self.kept.take(target, &conn).await {
                let mut stream = stream.map_err(failed)?;
                let res = exchange_kept(&conn, &mut stream, &req, sent).await;
                self.kept.put_back(target, &conn, stream);
                return res.map_err(failed);
            }
        }
        let answered = exchange(&conn, &req, Some(sent)).await.map_err(failed)?;
        if answered.keeps_streams {
            // Only for the cached connection: one evicted meanwhile must not be kept open here.
            let conns = lock(&self.conns);
            if conns.get(&target).is_some_and(|c| c.stable_id() == conn.stable_id()) {
                self.kept.learned(target, &conn);
            }
        }
        Ok(answered.payload)
    }

    async fn connection(&self, target: u64) -> Result<quinn::Connection, RpcError> {
        Ok(self.connect(target).await?.0)
    }

    /// The connection to `target`, and whether this caller dialled it.
    async fn connect(&self, target: u64) -> Result<(quinn::Connection, bool), RpcError> {
        if let Some(c) = self.cached(target) {
            return Ok((c, false));
        }
        let dial = lock(&self.dialing).entry(target).or_default().clone();
        let dialing = dial.lock_owned().await;
        // Another caller's dial may have finished while this one waited.
        if let Some(c) = self.cached(target) {
            return Ok((c, false));
        }
        // Read before the client config: a new identity set after this read makes the dial's
        // connection stale, and the era tells (see below).
        let started_in = self.conns_era.load(std::sync::atomic::Ordering::Acquire);
        let addr = self
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&target)
            .copied()
            .ok_or_else(|| RpcError::Unreachable(target, "no known address".into()))?;
        let connecting = self
            .endpoint
            .connect_with(
                self.member_client.read().unwrap_or_else(|p| p.into_inner()).clone(),
                addr,
                &tls::server_name(target),
            )
            .map_err(|e| RpcError::Unreachable(target, e.to_string()))?;
        // The handshake runs on its own task and keeps its connection even if this caller stops
        // waiting: a Raft heartbeat waits 30 ms, and a handshake that takes longer (a loaded
        // machine, a debug build) was cancelled at every attempt, so that a restarted leader never
        // reached its followers again. Callers behind it wait on `dialing`, which it holds.
        let (conns, peers, era) = (self.conns.clone(), self.peers.clone(), self.conns_era.clone());
        let silence = self.silence.clone();
        let handshake = tokio::spawn(async move {
            let _dialing = dialing;
            // Bounded: callers to this peer wait behind this dial (QUIC alone would give up only
            // at its idle timeout).
            let conn = match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(RpcError::Unreachable(target, e.to_string())),
                Err(_) => return Err(RpcError::Unreachable(target, "the handshake timed out".into())),
            };
            // Kept only while the peer is still known at the address dialled and nothing cleared
            // the connections since the dial began (the same lock order as `set_peers`).
            let book = peers.read().unwrap_or_else(|p| p.into_inner());
            let mut conns = lock(&conns);
            if book.get(&target) == Some(&addr) && era.load(std::sync::atomic::Ordering::Acquire) == started_in {
                conns.insert(target, conn.clone());
                // What failed calls saw of the connection this one replaces is not about it.
                silence.forget(target);
            }
            Ok(conn)
        });
        let conn = handshake.await.map_err(|e| RpcError::Unreachable(target, format!("the dial failed: {e}")))??;
        Ok((conn, true))
    }

    fn cached(&self, target: u64) -> Option<quinn::Connection> {
        lock(&self.conns).get(&target).filter(|c| c.close_reason().is_none()).cloned()
    }

    /// A call to this hub itself: its handler runs in process, without QUIC (Garage's local
    /// short-cut), on its own task as a remote handler would (a caller that stops waiting does
    /// not cancel it). The request is delivered at once, so giving up means `Timeout`.
    async fn call_local(
        &self,
        kind: StreamKind,
        payload: Vec<u8>,
        timeout: Duration,
        give_up: impl Future<Output = ()>,
    ) -> Result<Vec<u8>, RpcError> {
        let h = self.handlers.read().unwrap_or_else(|p| p.into_inner()).get(&kind).cloned();
        let h = h.ok_or_else(|| Refusal::bad_request(format!("stream kind {kind} is not served here")))?;
        let handled = tokio::spawn(h(Caller::Member(self.node_id), payload));
        tokio::select! {
            r = tokio::time::timeout(timeout, handled) => match r {
                Ok(Ok(answer)) => answer.map_err(RpcError::Remote),
                Ok(Err(e)) => Err(RpcError::Remote(Refusal::internal(format!("the handler failed: {e}")))),
                Err(_) => Err(RpcError::Timeout),
            },
            () = give_up => Err(RpcError::Timeout),
        }
    }

    /// A joiner's call: no certificate, the server's chain must end in the pinned CA.
    pub async fn call_as_joiner(
        &self,
        addr: SocketAddr,
        ca_fingerprint: [u8; 32],
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        let fut = async {
            let crypto = QuicClientConfig::try_from(
                tls::join_client_config(ca_fingerprint).map_err(|e| RpcError::Protocol(e.to_string()))?,
            )
            .map_err(|e| RpcError::Protocol(e.to_string()))?;
            let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
            cfg.transport_config(quic::client_transport(self.link));
            let conn = self
                .endpoint
                .connect_with(cfg, addr, tls::JOIN_SERVER_NAME)
                .map_err(|e| RpcError::Unreachable(0, e.to_string()))?
                .await
                .map_err(|e| RpcError::Unreachable(0, e.to_string()))?;
            let req = pb::MeshRequest { kind: StreamKind::Join as u32, from: 0, payload };
            let res = exchange(&conn, &req.encode_to_vec(), None).await;
            conn.close(0u32.into(), b"joined");
            res.map(|a| a.payload).map_err(|e| match e {
                Exchange::Lost(m) | Exchange::Refused(m) => RpcError::Unreachable(0, m),
                Exchange::Bad(m) => RpcError::Protocol(m),
                Exchange::Remote(e) => e,
            })
        };
        tokio::time::timeout(timeout, fut).await.unwrap_or(Err(RpcError::Timeout))
    }

    /// What the streams kept between calls did so far.
    pub fn kept_stream_stats(&self) -> KeptStreamStats {
        self.kept.stats()
    }

    /// Drops every handler (they hold the Raft handle, which holds this endpoint: clearing them
    /// breaks that cycle at shutdown).
    pub fn clear_handlers(&self) {
        self.handlers.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.bulk_handlers.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.forget_connections();
    }

    /// Drops every cached connection, including those of dials still under way.
    fn forget_connections(&self) {
        let mut conns = lock(&self.conns);
        self.conns_era.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        conns.clear();
        self.kept.clear();
    }

    /// Closes the endpoint. It does not wait for the peers to hear of it (`wait_idle`): a
    /// stopping leader would stay deaf for that long before it is gone, and every durable call
    /// waits for a leader meanwhile (measured: a rolling upgrade's calls failed). A peer learns
    /// of the close from the next run's stateless reset instead (`quic::restart_keys`), or from
    /// its idle timeout.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}

/// The cached connection a call used, how many datagrams had come from the peer when it began, and
/// when that was.
struct Used {
    conn: quinn::Connection,
    received: u64,
    started: Instant,
}
