//! The mesh's QUIC endpoint (quinn, mutual TLS): one per hub, carrying Raft RPCs, joins and the
//! data plane. Consensus registers its own handlers; the node registers data-plane handlers at
//! boot, so consensus never depends on node.
//!
//! ```text
//!  call(target, kind, payload) --cached connection to node-<target>.hubmesh--> open_bi
//!      write pb::MeshRequest{kind, from, payload}, finish --> read pb::MeshResponse to the end
//!  accept loop --> per connection: who is it (CA-signed certificate = member; none = joiner)
//!      --> per stream: size-limited read, decode, dispatch to the handler of `kind`
//!
//!  call_bulk(target, kind, header) --same connection--> open_bi
//!      write 0x00, u32 length, pb::MeshRequest{kind, from, header}, then the body in chunks
//!      (checkpoint pages), finish --> read pb::MeshResponse to the end
//! ```
//! A unary request never starts with 0x00 (a protobuf message starts with a field tag), so one
//! byte tells the two apart. Bulk bodies are streamed: neither side holds them whole.
//!
//! Nothing on this path panics on its input: garbage, truncated or oversized requests get an
//! error response (or a closed stream) and the endpoint goes on.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hubmesh_proto::{pb, Message};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::tls::{self, Identity, TlsError};

/// Stream kinds of consensus.
pub mod kind {
    pub const RAFT_APPEND: u32 = 1;
    pub const RAFT_VOTE: u32 = 2;
    pub const RAFT_SNAPSHOT: u32 = 3;
    pub const JOIN: u32 = 4;
    pub const PROPOSE: u32 = 5;
    /// Kinds from here on belong to the node (data plane).
    pub const FIRST_NODE_KIND: u32 = 100;
}

/// Largest request or response.
pub const MAX_FRAME: usize = 64 << 20;
/// Requests larger than this are sent at a lower stream priority than the rest.
const BULK_BYTES: usize = 256 << 10;
/// First byte of a bulk stream.
const BULK_MARK: u8 = 0;
/// Largest header of a bulk stream.
pub const MAX_BULK_HEADER: usize = 4 << 20;

/// Who sent a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A hub with a certificate signed by the cluster CA, claiming this id.
    Member(u64),
    /// A hub without a certificate: it may only join.
    Joiner,
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// The peer could not be reached (no address, connection refused or lost).
    #[error("hub {0} is unreachable: {1}")]
    Unreachable(u64, String),
    /// No answer within the deadline; the outcome is unknown.
    #[error("the call timed out")]
    Timeout,
    /// The caller gave up before the peer acknowledged the request: the peer never had all of
    /// it, so it cannot have acted on it.
    #[error("hub {0} did not receive the request")]
    NotDelivered(u64),
    /// The peer answered with an error.
    #[error("{message}")]
    Remote { code: i32, message: String },
    /// The peer's answer did not decode.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("binding the mesh endpoint to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("QUIC configuration: {0}")]
    Config(String),
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, RpcError>> + Send>>;
/// A request handler: the caller and the payload in, the answer's payload out.
pub type Handler = Arc<dyn Fn(Caller, Vec<u8>) -> HandlerFuture + Send + Sync>;

/// A bulk-stream handler: the caller, the header, and the body to read; the answer's payload out.
pub type BulkHandler = Arc<dyn Fn(Caller, Vec<u8>, BulkBody) -> HandlerFuture + Send + Sync>;

/// Wraps an async closure as a [`BulkHandler`].
pub fn bulk_handler<F, Fut>(f: F) -> BulkHandler
where
    F: Fn(Caller, Vec<u8>, BulkBody) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, RpcError>> + Send + 'static,
{
    Arc::new(move |caller, header, body| Box::pin(f(caller, header, body)))
}

/// The body of a bulk stream, as its handler reads it.
pub struct BulkBody {
    recv: quinn::RecvStream,
}

impl BulkBody {
    /// Fills `buf`. `Ok(false)` when the sender finished the stream before its first byte; a
    /// stream that ends inside `buf` is an error.
    pub async fn read_exact_or_end(&mut self, buf: &mut [u8]) -> Result<bool, RpcError> {
        match self.recv.read_exact(buf).await {
            Ok(()) => Ok(true),
            Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(false),
            Err(quinn::ReadExactError::FinishedEarly(n)) => Err(RpcError::Remote {
                code: pb::ErrorCode::BadRequest as i32,
                message: format!("the body ended after {n} of {} bytes", buf.len()),
            }),
            Err(quinn::ReadExactError::ReadError(e)) => Err(RpcError::Protocol(format!("reading the body: {e}"))),
        }
    }
}

/// A bulk stream being sent: write the body with [`send`](Self::send), then
/// [`finish`](Self::finish) for the answer.
pub struct BulkCall {
    target: u64,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl BulkCall {
    /// Queues `chunk` (no copy); waits while the peer's flow-control window is full. If the peer
    /// stopped reading (it refused the stream), its answer is the error.
    pub async fn send(&mut self, chunk: bytes::Bytes) -> Result<(), RpcError> {
        match self.send.write_chunk(chunk).await {
            Ok(()) => Ok(()),
            Err(quinn::WriteError::Stopped(_)) => Err(match self.answer().await {
                Err(e) => e,
                Ok(_) => RpcError::Protocol("the peer answered before the body ended".into()),
            }),
            Err(e) => Err(RpcError::Unreachable(self.target, e.to_string())),
        }
    }

    /// Ends the body and waits for the answer.
    pub async fn finish(mut self) -> Result<Vec<u8>, RpcError> {
        // A peer that already stopped reading has answered; the answer says why.
        let _ = self.send.finish();
        self.answer().await
    }

    async fn answer(&mut self) -> Result<Vec<u8>, RpcError> {
        let raw =
            self.recv.read_to_end(MAX_FRAME).await.map_err(|e| RpcError::Unreachable(self.target, e.to_string()))?;
        let resp = pb::MeshResponse::decode(raw.as_slice()).map_err(|e| RpcError::Protocol(e.to_string()))?;
        if resp.code != pb::ErrorCode::Unspecified as i32 {
            return Err(RpcError::Remote { code: resp.code, message: resp.message });
        }
        Ok(resp.payload)
    }
}

/// Wraps an async closure as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Caller, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, RpcError>> + Send + 'static,
{
    Arc::new(move |caller, payload| Box::pin(f(caller, payload)))
}

/// The endpoint.
pub struct Transport {
    endpoint: quinn::Endpoint,
    node_id: u64,
    /// Bound to a loopback address: every peer is on this machine.
    loopback: bool,
    member_client: RwLock<quinn::ClientConfig>,
    peers: RwLock<HashMap<u64, SocketAddr>>,
    conns: Mutex<HashMap<u64, quinn::Connection>>,
    handlers: RwLock<HashMap<u32, Handler>>,
    bulk_handlers: RwLock<HashMap<u32, BulkHandler>>,
    last_ok: Mutex<HashMap<u64, Instant>>,
    last_heard: Mutex<HashMap<u64, Instant>>,
    revoked: RwLock<std::collections::HashSet<[u8; 32]>>,
}

fn transport_config(loopback: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(Duration::from_secs(5).try_into().expect("5 s is a valid idle timeout")));
    t.max_concurrent_bidi_streams(1024u32.into());
    // Checkpoint pushes stream tens of MiB: windows of that size keep the pipe full.
    t.stream_receive_window((16u32 << 20).into());
    t.send_window(64 << 20);
    if loopback {
        // Loopback carries 64 KiB datagrams: MTU discovery climbs there in a dozen probes, and
        // every packet then costs 45 times fewer sends, receives and seals per byte. Segmentation
        // offload is off because a batch of such datagrams exceeds what one send may carry (the
        // kernel refuses it, which quinn took for a black hole and fell back to 1200 bytes).
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(LOOPBACK_UDP_PAYLOAD);
        t.mtu_discovery_config(Some(mtu));
        t.enable_segmentation_offload(false);
    }
    Arc::new(t)
}

/// Largest UDP payload over loopback: IPv4's maximum (loopback's MTU is 64 KiB).
const LOOPBACK_UDP_PAYLOAD: u16 = 65_507;
/// Socket buffers: room for dozens of full-size datagrams, so a burst is not dropped while the
/// endpoint's task waits for a core (the kernel caps the value at `net.core.rmem_max`).
const SOCKET_BUFFER: usize = 4 << 20;

/// Binds the UDP socket and wraps it in a quinn endpoint with this mesh's limits.
fn endpoint(server: quinn::ServerConfig, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Best effort: a smaller buffer only costs retransmissions under bursts.
    let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER);
    let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER);
    let mut config = quinn::EndpointConfig::default();
    if addr.ip().is_loopback() {
        config
            .max_udp_payload_size(LOOPBACK_UDP_PAYLOAD)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    }
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime for the mesh endpoint"))?;
    quinn::Endpoint::new(config, Some(server), socket, runtime)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The QUIC server and member-client configurations of an identity.
fn quic_configs(
    identity: &Identity,
    loopback: bool,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let server_crypto =
        QuicServerConfig::try_from(identity.server_config()?).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport_config(loopback));
    let client_crypto =
        QuicClientConfig::try_from(identity.client_config()?).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport_config(loopback));
    Ok((server, client))
}

impl Transport {
    /// Binds the endpoint and starts accepting.
    pub fn bind(addr: SocketAddr, identity: &Identity, node_id: u64) -> Result<Arc<Self>, TransportError> {
        let loopback = addr.ip().is_loopback();
        let (server, member_client) = quic_configs(identity, loopback)?;
        let endpoint = endpoint(server, addr).map_err(|source| TransportError::Bind { addr, source })?;
        let t = Arc::new(Self {
            endpoint,
            node_id,
            loopback,
            member_client: RwLock::new(member_client),
            peers: RwLock::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            handlers: RwLock::new(HashMap::new()),
            bulk_handlers: RwLock::new(HashMap::new()),
            last_ok: Mutex::new(HashMap::new()),
            last_heard: Mutex::new(HashMap::new()),
            revoked: RwLock::new(Default::default()),
        });
        tokio::spawn(accept_loop(Arc::downgrade(&t), t.endpoint.clone()));
        Ok(t)
    }

    /// Replaces the certificate this endpoint presents and trusts (a joiner, once admitted).
    pub fn set_identity(&self, identity: &Identity) -> Result<(), TransportError> {
        let (server, client) = quic_configs(identity, self.loopback)?;
        self.endpoint.set_server_config(Some(server));
        *self.member_client.write().unwrap_or_else(|p| p.into_inner()) = client;
        lock(&self.conns).clear();
        Ok(())
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Registers the handler of `kind`.
    pub fn register(&self, kind: u32, h: Handler) {
        self.handlers.write().unwrap_or_else(|p| p.into_inner()).insert(kind, h);
    }

    /// Registers the bulk-stream handler of `kind`.
    pub fn register_bulk(&self, kind: u32, h: BulkHandler) {
        self.bulk_handlers.write().unwrap_or_else(|p| p.into_inner()).insert(kind, h);
    }

    /// Opens a bulk stream of `kind` to `target` and sends `header`; the caller streams the body
    /// and bounds the whole exchange in time itself. Bulk streams yield to other requests on the
    /// same connection (Raft heartbeats must not queue behind checkpoint pages).
    pub async fn call_bulk(&self, target: u64, kind: u32, header: Vec<u8>) -> Result<BulkCall, RpcError> {
        let conn = self.connection(target).await?;
        let lost = |e: String| RpcError::Unreachable(target, e);
        let (mut send, recv) = conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
        let _ = send.set_priority(-1);
        let req = pb::MeshRequest { kind, from: self.node_id, payload: header }.encode_to_vec();
        if req.len() > MAX_BULK_HEADER {
            return Err(RpcError::Protocol(format!("a bulk header of {} bytes is too large", req.len())));
        }
        let mut head = Vec::with_capacity(5 + req.len());
        head.push(BULK_MARK);
        head.extend_from_slice(&(req.len() as u32).to_le_bytes());
        head.extend_from_slice(&req);
        send.write_all(&head).await.map_err(|e| lost(e.to_string()))?;
        Ok(BulkCall { target, send, recv })
    }

    /// Records where `node` listens.
    pub fn set_peer(&self, node: u64, addr: SocketAddr) {
        let old = self.peers.write().unwrap_or_else(|p| p.into_inner()).insert(node, addr);
        if old.is_some_and(|o| o != addr) {
            lock(&self.conns).remove(&node);
        }
    }

    /// The largest UDP payload the connection to `node` currently uses (MTU discovery's result).
    pub fn path_mtu(&self, node: u64) -> Option<u16> {
        lock(&self.conns).get(&node).map(|c| c.stats().path.current_mtu)
    }

    /// When a call to `node` last succeeded.
    pub fn last_ok(&self, node: u64) -> Option<Instant> {
        lock(&self.last_ok).get(&node).copied()
    }

    /// Replaces the set of revoked certificate fingerprints (removed hubs).
    pub fn set_revoked(&self, revoked: impl IntoIterator<Item = [u8; 32]>) {
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = revoked.into_iter().collect();
    }

    /// When `node` last sent this hub a request.
    pub fn last_heard(&self, node: u64) -> Option<Instant> {
        lock(&self.last_heard).get(&node).copied()
    }

    /// Calls `kind` on `target` with `payload`.
    pub async fn call(&self, target: u64, kind: u32, payload: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, RpcError> {
        self.call_unless(target, kind, payload, timeout, std::future::pending()).await
    }

    /// Like [`call`](Self::call), but stops waiting when `give_up` completes: with
    /// [`RpcError::NotDelivered`] if the peer had not yet acknowledged every byte of the request
    /// (it cannot have run it, so the caller may safely try elsewhere), else with `Timeout`.
    pub async fn call_unless(
        &self,
        target: u64,
        kind: u32,
        payload: Vec<u8>,
        timeout: Duration,
        give_up: impl Future<Output = ()>,
    ) -> Result<Vec<u8>, RpcError> {
        let delivered = std::sync::atomic::AtomicBool::new(false);
        let res = tokio::select! {
            // Giving up is checked first: if it is already due, the request is never sent.
            biased;
            () = give_up => {
                if delivered.load(std::sync::atomic::Ordering::Acquire) {
                    Err(RpcError::Timeout)
                } else {
                    Err(RpcError::NotDelivered(target))
                }
            }
            r = tokio::time::timeout(timeout, self.call_inner(target, kind, payload, &delivered)) => {
                r.unwrap_or(Err(RpcError::Timeout))
            }
        };
        match &res {
            Ok(_) | Err(RpcError::Remote { .. }) => {
                lock(&self.last_ok).insert(target, Instant::now());
            }
            Err(RpcError::Unreachable(..)) | Err(RpcError::Timeout) | Err(RpcError::NotDelivered(_)) => {
                lock(&self.conns).remove(&target);
            }
            Err(RpcError::Protocol(_)) => {}
        }
        res
    }

    async fn call_inner(
        &self,
        target: u64,
        kind: u32,
        payload: Vec<u8>,
        delivered: &std::sync::atomic::AtomicBool,
    ) -> Result<Vec<u8>, RpcError> {
        let conn = self.connection(target).await?;
        let req = pb::MeshRequest { kind, from: self.node_id, payload };
        exchange(&conn, &req.encode_to_vec(), Some(delivered)).await.map_err(|e| match e {
            // Lost after the peer had the whole request: it may have acted on it.
            Exchange::Lost(_) if delivered.load(std::sync::atomic::Ordering::Acquire) => RpcError::Timeout,
            Exchange::Lost(m) => RpcError::Unreachable(target, m),
            Exchange::Bad(m) => RpcError::Protocol(m),
            Exchange::Remote(e) => e,
        })
    }

    async fn connection(&self, target: u64) -> Result<quinn::Connection, RpcError> {
        if let Some(c) = lock(&self.conns).get(&target) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
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
        let conn = connecting.await.map_err(|e| RpcError::Unreachable(target, e.to_string()))?;
        lock(&self.conns).insert(target, conn.clone());
        Ok(conn)
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
            cfg.transport_config(transport_config(self.loopback));
            let conn = self
                .endpoint
                .connect_with(cfg, addr, tls::JOIN_SERVER_NAME)
                .map_err(|e| RpcError::Unreachable(0, e.to_string()))?
                .await
                .map_err(|e| RpcError::Unreachable(0, e.to_string()))?;
            let req = pb::MeshRequest { kind: kind::JOIN, from: 0, payload };
            let res = exchange(&conn, &req.encode_to_vec(), None).await;
            conn.close(0u32.into(), b"joined");
            res.map_err(|e| match e {
                Exchange::Lost(m) => RpcError::Unreachable(0, m),
                Exchange::Bad(m) => RpcError::Protocol(m),
                Exchange::Remote(e) => e,
            })
        };
        tokio::time::timeout(timeout, fut).await.unwrap_or(Err(RpcError::Timeout))
    }

    /// Drops every handler (they hold the Raft handle, which holds this endpoint: clearing them
    /// breaks that cycle at shutdown).
    pub fn clear_handlers(&self) {
        self.handlers.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.bulk_handlers.write().unwrap_or_else(|p| p.into_inner()).clear();
        lock(&self.conns).clear();
    }

    /// Closes the endpoint.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}

enum Exchange {
    Lost(String),
    Bad(String),
    Remote(RpcError),
}

/// One request and its answer on a new stream. `delivered` is set once the peer has acknowledged
/// the whole request (an answer implies it too).
async fn exchange(
    conn: &quinn::Connection,
    request: &[u8],
    delivered: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Vec<u8>, Exchange> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| Exchange::Lost(e.to_string()))?;
    if request.len() > BULK_BYTES {
        // Checkpoint pages must not hold up Raft heartbeats on the same connection.
        let _ = send.set_priority(-1);
    }
    send.write_all(request).await.map_err(|e| Exchange::Lost(e.to_string()))?;
    send.finish().map_err(|e| Exchange::Lost(e.to_string()))?;
    let acked = send.stopped();
    let read = recv.read_to_end(MAX_FRAME);
    tokio::pin!(acked, read);
    let mut watching = delivered.is_some();
    let raw = loop {
        tokio::select! {
            r = &mut read => break r,
            s = &mut acked, if watching => {
                watching = false;
                if let (Ok(None), Some(flag)) = (s, delivered) {
                    flag.store(true, std::sync::atomic::Ordering::Release);
                }
            }
        }
    };
    if let (Ok(_), Some(flag)) = (&raw, delivered) {
        flag.store(true, std::sync::atomic::Ordering::Release);
    }
    let raw = raw.map_err(|e| Exchange::Lost(e.to_string()))?;
    let resp = pb::MeshResponse::decode(raw.as_slice()).map_err(|e| Exchange::Bad(e.to_string()))?;
    if resp.code != pb::ErrorCode::Unspecified as i32 {
        return Err(Exchange::Remote(RpcError::Remote { code: resp.code, message: resp.message }));
    }
    Ok(resp.payload)
}

async fn accept_loop(transport: std::sync::Weak<Transport>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let t = transport.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "mesh handshake failed");
                    return;
                }
            };
            let leaf = conn
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
                .and_then(|certs| certs.first().map(|c| tls::fingerprint(c)));
            let revoked = match (&leaf, t.upgrade()) {
                (Some(fp), Some(t)) => t.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(fp),
                _ => false,
            };
            if revoked {
                conn.close(1u32.into(), b"this hub was removed from the mesh");
                return;
            }
            let member = leaf.is_some();
            while let Ok((send, recv)) = conn.accept_bi().await {
                let t = t.clone();
                tokio::spawn(serve_stream(t, member, send, recv));
            }
        });
    }
}

async fn serve_stream(
    t: std::sync::Weak<Transport>,
    member: bool,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let bad = |message: String| pb::MeshResponse { code: pb::ErrorCode::BadRequest as i32, message, payload: vec![] };
    let mut first = [0u8; 1];
    let resp = match recv.read_exact(&mut first).await {
        Ok(()) if first[0] == BULK_MARK => serve_bulk(t, member, recv).await,
        Ok(()) => match recv.read_to_end(MAX_FRAME - 1).await {
            Err(e) => bad(format!("unreadable request: {e}")),
            Ok(rest) => {
                let mut raw = Vec::with_capacity(1 + rest.len());
                raw.push(first[0]);
                raw.extend_from_slice(&rest);
                match pb::MeshRequest::decode(raw.as_slice()) {
                    Err(e) => bad(format!("garbage request: {e}")),
                    Ok(req) => dispatch(t, member, req).await,
                }
            }
        },
        // An empty request decodes as kind 0, which no handler serves.
        Err(quinn::ReadExactError::FinishedEarly(0)) => dispatch(t, member, pb::MeshRequest::default()).await,
        Err(e) => {
            tracing::debug!(error = %e, "unreadable mesh request");
            bad(format!("unreadable request: {e}"))
        }
    };
    if send.write_all(&resp.encode_to_vec()).await.is_ok() {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

/// A bulk stream after its mark: the header, then the handler reads the body.
async fn serve_bulk(t: std::sync::Weak<Transport>, member: bool, mut recv: quinn::RecvStream) -> pb::MeshResponse {
    let bad = |message: String| pb::MeshResponse { code: pb::ErrorCode::BadRequest as i32, message, payload: vec![] };
    // No bulk kind serves joiners: refused before their header is read.
    if !member {
        return pb::MeshResponse {
            code: pb::ErrorCode::Unauthorized as i32,
            message: "a certificate signed by the cluster CA is required".into(),
            payload: vec![],
        };
    }
    let mut len = [0u8; 4];
    if let Err(e) = recv.read_exact(&mut len).await {
        return bad(format!("truncated bulk header: {e}"));
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_BULK_HEADER {
        return bad(format!("a bulk header of {len} bytes is larger than {MAX_BULK_HEADER}"));
    }
    let mut head = vec![0u8; len];
    if let Err(e) = recv.read_exact(&mut head).await {
        return bad(format!("truncated bulk header: {e}"));
    }
    let req = match pb::MeshRequest::decode(head.as_slice()) {
        Ok(r) => r,
        Err(e) => return bad(format!("garbage bulk header: {e}")),
    };
    let caller = match caller_of(&t, member, req.kind, req.from) {
        Ok(c) => c,
        Err(refusal) => return refusal,
    };
    let h = t.upgrade().and_then(|t| t.bulk_handlers.read().unwrap_or_else(|p| p.into_inner()).get(&req.kind).cloned());
    let Some(h) = h else { return bad(format!("unknown bulk stream kind {}", req.kind)) };
    // Dropping the body unread (an early refusal) tells the sender to stop sending.
    answer(h(caller, req.payload, BulkBody { recv }).await)
}

/// Who sent a request of `kind` claiming to be `from`, or the refusal.
fn caller_of(t: &std::sync::Weak<Transport>, member: bool, kind: u32, from: u64) -> Result<Caller, pb::MeshResponse> {
    let refusal = |code: pb::ErrorCode, message: &str| pb::MeshResponse {
        code: code as i32,
        message: message.into(),
        payload: vec![],
    };
    let caller = match (member, kind) {
        (true, _) => Caller::Member(from),
        (false, kind::JOIN) => Caller::Joiner,
        (false, _) => {
            return Err(refusal(pb::ErrorCode::Unauthorized, "a certificate signed by the cluster CA is required"))
        }
    };
    let t = t.upgrade().ok_or_else(|| refusal(pb::ErrorCode::Unavailable, "shutting down"))?;
    if let Caller::Member(id) = caller {
        lock(&t.last_heard).insert(id, Instant::now());
    }
    Ok(caller)
}

fn answer(r: Result<Vec<u8>, RpcError>) -> pb::MeshResponse {
    match r {
        Ok(payload) => pb::MeshResponse { code: 0, message: String::new(), payload },
        Err(RpcError::Remote { code, message }) => pb::MeshResponse { code, message, payload: vec![] },
        Err(e) => pb::MeshResponse { code: pb::ErrorCode::Internal as i32, message: e.to_string(), payload: vec![] },
    }
}

async fn dispatch(t: std::sync::Weak<Transport>, member: bool, req: pb::MeshRequest) -> pb::MeshResponse {
    let caller = match caller_of(&t, member, req.kind, req.from) {
        Ok(c) => c,
        Err(refusal) => return refusal,
    };
    let h = t.upgrade().and_then(|t| t.handlers.read().unwrap_or_else(|p| p.into_inner()).get(&req.kind).cloned());
    let Some(h) = h else {
        return pb::MeshResponse {
            code: pb::ErrorCode::BadRequest as i32,
            message: format!("unknown stream kind {}", req.kind),
            payload: vec![],
        };
    };
    answer(h(caller, req.payload).await)
}

#[cfg(test)]
impl Transport {
    /// Sends raw bytes on a fresh stream to `target` and returns the raw answer.
    pub(crate) async fn raw_exchange_for_tests(&self, target: u64, bytes: &[u8]) -> Vec<u8> {
        let conn = self.connection(target).await.expect("connected");
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        send.write_all(bytes).await.expect("write");
        send.finish().expect("finish");
        recv.read_to_end(MAX_FRAME).await.expect("answer")
    }
}
