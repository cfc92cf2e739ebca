//! The mesh's QUIC endpoint (quinn, mutual TLS): one per hub, carrying Raft RPCs, joins and the
//! data plane. Consensus registers its own handlers; the node registers data-plane handlers at
//! boot, so consensus never depends on node.
//!
//! ```text
//!  call(target, kind, payload) --cached connection to node-<target>.hubmesh--> open_bi
//!      write pb::MeshRequest{kind, from, payload}, finish --> read pb::MeshResponse to the end
//!  accept loop --> per connection: who is it (CA-signed certificate = member; none = joiner)
//!      --> per stream: size-limited read, decode, dispatch to the handler of `kind`
//! ```
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
    member_client: RwLock<quinn::ClientConfig>,
    peers: RwLock<HashMap<u64, SocketAddr>>,
    conns: Mutex<HashMap<u64, quinn::Connection>>,
    handlers: RwLock<HashMap<u32, Handler>>,
    last_ok: Mutex<HashMap<u64, Instant>>,
    last_heard: Mutex<HashMap<u64, Instant>>,
    revoked: RwLock<std::collections::HashSet<[u8; 32]>>,
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(Duration::from_secs(5).try_into().expect("5 s is a valid idle timeout")));
    t.max_concurrent_bidi_streams(1024u32.into());
    // Checkpoint chunks are 8 MiB: windows that hold a whole chunk keep the pipe full.
    t.stream_receive_window((16u32 << 20).into());
    t.send_window(64 << 20);
    // Probe for larger packets than Ethernet's where the path allows them (jumbo frames,
    // loopback): fewer packets to encrypt per byte. Ethernet paths stay at 1452.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(8952);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The QUIC server and member-client configurations of an identity.
fn quic_configs(identity: &Identity) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let server_crypto =
        QuicServerConfig::try_from(identity.server_config()?).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport_config());
    let client_crypto =
        QuicClientConfig::try_from(identity.client_config()?).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport_config());
    Ok((server, client))
}

impl Transport {
    /// Binds the endpoint and starts accepting.
    pub fn bind(addr: SocketAddr, identity: &Identity, node_id: u64) -> Result<Arc<Self>, TransportError> {
        let (server, member_client) = quic_configs(identity)?;
        let endpoint = quinn::Endpoint::server(server, addr).map_err(|source| TransportError::Bind { addr, source })?;
        let t = Arc::new(Self {
            endpoint,
            node_id,
            member_client: RwLock::new(member_client),
            peers: RwLock::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            handlers: RwLock::new(HashMap::new()),
            last_ok: Mutex::new(HashMap::new()),
            last_heard: Mutex::new(HashMap::new()),
            revoked: RwLock::new(Default::default()),
        });
        tokio::spawn(accept_loop(Arc::downgrade(&t), t.endpoint.clone()));
        Ok(t)
    }

    /// Replaces the certificate this endpoint presents and trusts (a joiner, once admitted).
    pub fn set_identity(&self, identity: &Identity) -> Result<(), TransportError> {
        let (server, client) = quic_configs(identity)?;
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

    /// Records where `node` listens.
    pub fn set_peer(&self, node: u64, addr: SocketAddr) {
        let old = self.peers.write().unwrap_or_else(|p| p.into_inner()).insert(node, addr);
        if old.is_some_and(|o| o != addr) {
            lock(&self.conns).remove(&node);
        }
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
            cfg.transport_config(transport_config());
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
    let resp = match recv.read_to_end(MAX_FRAME).await {
        Err(e) => {
            tracing::debug!(error = %e, "unreadable mesh request");
            pb::MeshResponse {
                code: pb::ErrorCode::BadRequest as i32,
                message: format!("unreadable request: {e}"),
                payload: vec![],
            }
        }
        Ok(raw) => match pb::MeshRequest::decode(raw.as_slice()) {
            Err(e) => pb::MeshResponse {
                code: pb::ErrorCode::BadRequest as i32,
                message: format!("garbage request: {e}"),
                payload: vec![],
            },
            Ok(req) => dispatch(t, member, req).await,
        },
    };
    if send.write_all(&resp.encode_to_vec()).await.is_ok() {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

async fn dispatch(t: std::sync::Weak<Transport>, member: bool, req: pb::MeshRequest) -> pb::MeshResponse {
    let caller = match (member, req.kind) {
        (true, _) => Caller::Member(req.from),
        (false, kind::JOIN) => Caller::Joiner,
        (false, _) => {
            return pb::MeshResponse {
                code: pb::ErrorCode::Unauthorized as i32,
                message: "a certificate signed by the cluster CA is required".into(),
                payload: vec![],
            }
        }
    };
    let Some(t) = t.upgrade() else {
        return pb::MeshResponse {
            code: pb::ErrorCode::Unavailable as i32,
            message: "shutting down".into(),
            payload: vec![],
        };
    };
    if let Caller::Member(id) = caller {
        lock(&t.last_heard).insert(id, Instant::now());
    }
    let h = t.handlers.read().unwrap_or_else(|p| p.into_inner()).get(&req.kind).cloned();
    drop(t);
    let Some(h) = h else {
        return pb::MeshResponse {
            code: pb::ErrorCode::BadRequest as i32,
            message: format!("unknown stream kind {}", req.kind),
            payload: vec![],
        };
    };
    match h(caller, req.payload).await {
        Ok(payload) => pb::MeshResponse { code: 0, message: String::new(), payload },
        Err(RpcError::Remote { code, message }) => pb::MeshResponse { code, message, payload: vec![] },
        Err(e) => pb::MeshResponse { code: pb::ErrorCode::Internal as i32, message: e.to_string(), payload: vec![] },
    }
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
