//! [`Consensus`]: the Raft node of one hub, its mesh endpoint, and the one way to change the
//! replicated state.
//!
//! ```text
//!  start: tls/ exists        --> load identity, bind endpoint, recover Raft
//!         first hub          --> new CA + certificate, bind, initialise a one-voter mesh, SetCa
//!         --join TOKEN       --> bind with a throwaway identity, JoinRequest to the token's member
//!                                (CA pinned), save the certificate, swap identity, start Raft and
//!                                wait for the leader's autopilot to add this hub
//!  propose: leader --> client_write; follower --> PROPOSE call to the leader (never re-forwarded)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hubmesh_proto::{pb, Message};
use hubmesh_storage::{open_raft_db, LogStore, SnapshotStore};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{Raft, SnapshotPolicy};
use tokio::sync::watch;

use crate::ids::NodeId;
use crate::join::{hash_secret, JoinToken};
use crate::network::NetworkFactory;
use crate::state::{ClusterState, Command, CommandResult, NodeRecord, NodeStatus, Outcome, Rejected};
use crate::state_machine::StateMachine;
use crate::tls::{self, CaMaterial, Identity, NodeKey};
use crate::transport::{handler, kind, Caller, RpcError, Transport};
use crate::type_config::{NodeAddr, TypeConfig};

/// How to start the Raft node of a hub.
#[derive(Debug, Clone)]
pub struct ConsensusConfig {
    /// Directory of the sled database (`DATA_DIR/raft`).
    pub dir: PathBuf,
    /// Directory of the hub's certificates (`DATA_DIR/tls`).
    pub tls_dir: PathBuf,
    /// The id to take if this data dir has none yet. An existing id always wins.
    pub fresh_node_id: u64,
    /// This hub's name and API address.
    pub node: NodeAddr,
    /// Where the mesh endpoint listens (UDP); port 0 picks one.
    pub mesh_addr: SocketAddr,
    /// Join an existing mesh with this token (only with an empty data dir).
    pub join: Option<String>,
    /// How long a proposal may take before its outcome is reported as unknown.
    pub propose_timeout: Duration,
    pub heartbeat: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
}

/// Why the Raft node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The sled database could not be opened.
    #[error("opening the Raft store at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// The data dir is inconsistent (state without identity, or the reverse).
    #[error("{0}")]
    Inconsistent(String),
    /// Reading or writing certificates failed.
    #[error("certificates in {path}: {message}")]
    Tls { path: PathBuf, message: String },
    /// The mesh endpoint could not start.
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    /// The join was refused or failed.
    #[error("joining the mesh: {0}")]
    Join(String),
    /// openraft refused to start.
    #[error("starting Raft: {0}")]
    Raft(String),
}

/// Why a proposal failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// The state machine refused the command; nothing changed.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// No leader is reachable (no quorum, or an election is under way); nothing changed.
    #[error("no leader can take the change now (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// The outcome is unknown: the command may still be committed. Retry only if idempotent.
    #[error("the proposal timed out; its outcome is unknown")]
    Timeout,
    /// Raft is shutting down or failed.
    #[error("consensus is unavailable: {0}")]
    Unavailable(String),
}

/// The mesh as this hub sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshStatus {
    pub node_id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_applied: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

/// The Raft node of a hub.
pub struct Consensus {
    raft: Raft<TypeConfig>,
    node_id: u64,
    transport: Arc<Transport>,
    mesh_addr: SocketAddr,
    state: watch::Receiver<Arc<ClusterState>>,
    applied: watch::Receiver<u64>,
    cert_der: Vec<u8>,
    proposer: ProposeHandle,
    stop: watch::Sender<bool>,
}

const IDENTITY_TREE: &str = "identity";
const NODE_ID_KEY: &[u8] = b"node_id";
const CA_FILE: &str = "ca.der";
const CERT_FILE: &str = "node.der";
const KEY_FILE: &str = "node.key";

fn open_err(path: &Path) -> impl FnOnce(sled::Error) -> StartError + '_ {
    move |source| StartError::Open { path: path.to_owned(), source }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StartError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tls_err = |e: std::io::Error| StartError::Tls { path: dir.to_owned(), message: e.to_string() };
    std::fs::create_dir_all(dir).map_err(tls_err)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(tls_err)?;
    f.write_all(bytes).map_err(tls_err)?;
    f.sync_all().map_err(tls_err)?;
    std::fs::rename(&tmp, dir.join(name)).map_err(tls_err)
}

fn load_identity(dir: &Path) -> Result<Option<Identity>, StartError> {
    let tls_err = |e: String| StartError::Tls { path: dir.to_owned(), message: e };
    let read = |name: &str| std::fs::read(dir.join(name));
    match (read(CA_FILE), read(CERT_FILE), read(KEY_FILE)) {
        (Ok(ca_der), Ok(cert_der), Ok(key)) => {
            let key = NodeKey::from_pkcs8(&key).map_err(|e| tls_err(e.to_string()))?;
            Ok(Some(Identity { ca_der, cert_der, key }))
        }
        (Err(_), Err(_), Err(_)) => Ok(None),
        _ => Err(tls_err("some certificate files are missing; restore them or start with an empty data dir".into())),
    }
}

fn save_identity(dir: &Path, id: &Identity) -> Result<(), StartError> {
    write_file(dir, KEY_FILE, id.key.pkcs8())?;
    write_file(dir, CA_FILE, &id.ca_der)?;
    write_file(dir, CERT_FILE, &id.cert_der)
}

impl Consensus {
    /// Opens the store, sets up the identity (new mesh, join, or restart), binds the mesh
    /// endpoint and starts Raft.
    pub async fn start(cfg: ConsensusConfig) -> Result<Self, StartError> {
        let db = open_raft_db(&cfg.dir).map_err(open_err(&cfg.dir))?;
        let has_raft_state = Self::has_raft_state(&db, &cfg.dir)?;
        let existing = load_identity(&cfg.tls_dir)?;
        let node_id = Self::load_node_id(&db, &cfg, has_raft_state)?;
        let (identity, ca_to_publish, bound) = match (existing, &cfg.join, has_raft_state) {
            (Some(id), _, true) => (id, None, None),
            (Some(_), _, false) => {
                return Err(StartError::Inconsistent(format!(
                    "{} holds certificates but the Raft state is gone: this hub must not come back as the same \
                     member. Remove {} and join again with a new token.",
                    cfg.tls_dir.display(),
                    cfg.tls_dir.parent().unwrap_or(&cfg.tls_dir).display()
                )))
            }
            (None, _, true) => {
                return Err(StartError::Inconsistent("the Raft state exists but the certificates are gone".into()))
            }
            (None, None, false) => {
                let ca = CaMaterial::generate().map_err(|e| StartError::Join(e.to_string()))?;
                let key = NodeKey::generate().map_err(|e| StartError::Join(e.to_string()))?;
                let cert_der = ca.issue(node_id, key.public_key()).map_err(|e| StartError::Join(e.to_string()))?;
                let id = Identity { ca_der: ca.cert_der.clone(), cert_der, key };
                save_identity(&cfg.tls_dir, &id)?;
                (id, Some(ca), None)
            }
            (None, Some(token), false) => {
                let (id, transport) = Self::join(&cfg, node_id, token).await?;
                (id, None, Some(transport))
            }
        };
        // A joiner bound its endpoint already, to tell the mesh its address.
        let transport = match bound {
            Some(t) => t,
            None => Transport::bind(cfg.mesh_addr, &identity, node_id)?,
        };
        transport.set_identity(&identity)?;
        let mesh_addr = transport.local_addr().map_err(|e| StartError::Join(e.to_string()))?;

        let log_store = LogStore::<TypeConfig>::new(&db).map_err(open_err(&cfg.dir))?;
        let snapshots = SnapshotStore::new(&db).map_err(open_err(&cfg.dir))?;
        let (state_tx, state_rx) = watch::channel(Arc::new(ClusterState::default()));
        let (applied_tx, applied_rx) = watch::channel(0);
        let sm = StateMachine::open(snapshots, state_tx, applied_tx).map_err(|e| StartError::Raft(e.to_string()))?;
        let raft_config = openraft::Config {
            cluster_name: "hubmesh".into(),
            heartbeat_interval: cfg.heartbeat.as_millis() as u64,
            election_timeout_min: cfg.election_timeout_min.as_millis() as u64,
            election_timeout_max: cfg.election_timeout_max.as_millis() as u64,
            install_snapshot_timeout: 2000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: 1000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let network = NetworkFactory { transport: transport.clone() };
        let raft = Raft::new(node_id, Arc::new(raft_config), network, log_store, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        crate::network::register_handlers(&transport, &raft);
        let (stop, stop_rx) = watch::channel(false);
        let proposer = ProposeHandle {
            raft: raft.clone(),
            transport: transport.clone(),
            timeout: cfg.propose_timeout,
            batcher: Batcher::start(raft.clone(), cfg.propose_timeout),
        };
        let me = Self {
            cert_der: identity.cert_der.clone(),
            proposer,
            raft,
            node_id,
            transport,
            mesh_addr,
            state: state_rx,
            applied: applied_rx,
            stop,
        };
        me.register_handlers();
        tokio::spawn(crate::autopilot::run(me.raft.clone(), node_id, me.state.clone(), stop_rx.clone()));
        tokio::spawn(keep_address_book(me.transport.clone(), me.raft.clone(), me.state.clone(), stop_rx));

        if let Some(ca) = ca_to_publish {
            let node = NodeAddr { mesh_addr: mesh_addr.to_string(), ..cfg.node.clone() };
            tracing::info!(node_id, "initialising a new mesh (this hub is its first voter and CA)");
            me.raft.initialize(BTreeMap::from([(node_id, node)])).await.map_err(|e| StartError::Raft(e.to_string()))?;
            me.wait_for_leader(Duration::from_secs(10)).await;
            me.propose(Command::SetCa { ca }).await.map_err(|e| StartError::Raft(format!("recording the CA: {e}")))?;
        }
        Ok(me)
    }

    fn has_raft_state(db: &sled::Db, dir: &Path) -> Result<bool, StartError> {
        let logs = db.open_tree("logs").map_err(open_err(dir))?;
        let meta = db.open_tree("meta").map_err(open_err(dir))?;
        let snap = db.open_tree("snapshot").map_err(open_err(dir))?;
        Ok(!logs.is_empty() || !meta.is_empty() || !snap.is_empty())
    }

    fn load_node_id(db: &sled::Db, cfg: &ConsensusConfig, has_state: bool) -> Result<u64, StartError> {
        let tree = db.open_tree(IDENTITY_TREE).map_err(open_err(&cfg.dir))?;
        if let Some(raw) = tree.get(NODE_ID_KEY).map_err(open_err(&cfg.dir))? {
            let bytes: [u8; 8] = raw
                .as_ref()
                .try_into()
                .map_err(|_| StartError::Inconsistent("the stored node id is malformed".into()))?;
            return Ok(u64::from_be_bytes(bytes));
        }
        if has_state {
            return Err(StartError::Inconsistent(format!(
                "the Raft store at {} has a log but no node id; refusing to start as a new voter",
                cfg.dir.display()
            )));
        }
        tree.insert(NODE_ID_KEY, &cfg.fresh_node_id.to_be_bytes()).map_err(open_err(&cfg.dir))?;
        db.flush().map_err(open_err(&cfg.dir))?;
        Ok(cfg.fresh_node_id)
    }

    /// Runs the join handshake; returns the certificate and the endpoint it bound.
    async fn join(cfg: &ConsensusConfig, node_id: u64, token: &str) -> Result<(Identity, Arc<Transport>), StartError> {
        let token = JoinToken::parse(token).map_err(|e| StartError::Join(e.to_string()))?;
        let key = NodeKey::generate().map_err(|e| StartError::Join(e.to_string()))?;
        // A throwaway identity lets the endpoint bind (and learn its port) before admission.
        let scratch_ca = CaMaterial::generate().map_err(|e| StartError::Join(e.to_string()))?;
        let scratch = Identity {
            ca_der: scratch_ca.cert_der.clone(),
            cert_der: scratch_ca.issue(node_id, key.public_key()).map_err(|e| StartError::Join(e.to_string()))?,
            key: key.clone(),
        };
        let transport = Transport::bind(cfg.mesh_addr, &scratch, node_id)?;
        let mesh_addr = transport.local_addr().map_err(|e| StartError::Join(e.to_string()))?;
        let req = pb::JoinRequest {
            token_id: token.id.clone(),
            secret: token.secret.clone(),
            node_id,
            name: cfg.node.name.clone(),
            api_addr: cfg.node.api_addr.clone(),
            mesh_addr: mesh_addr.to_string(),
            public_key: key.public_key().to_vec(),
        };
        tracing::info!(member = %token.member, "joining the mesh");
        let raw = transport
            .call_as_joiner(token.member, token.ca_fingerprint, req.encode_to_vec(), Duration::from_secs(30))
            .await
            .map_err(|e| match e {
                RpcError::Unreachable(_, m) => StartError::Join(format!(
                    "could not reach {} or its certificate is not from the token's CA: {m}",
                    token.member
                )),
                other => StartError::Join(other.to_string()),
            })?;
        let resp =
            pb::JoinResponse::decode(raw.as_slice()).map_err(|e| StartError::Join(format!("bad answer: {e}")))?;
        if tls::fingerprint(&resp.ca_cert) != token.ca_fingerprint {
            return Err(StartError::Join("the member answered with another CA".into()));
        }
        let identity = Identity { ca_der: resp.ca_cert, cert_der: resp.node_cert, key };
        save_identity(&cfg.tls_dir, &identity)?;
        Ok((identity, transport))
    }

    fn register_handlers(&self) {
        // PROPOSE: a follower hands a command to the leader, which commits it locally only.
        let local = self.proposer.clone();
        self.transport.register(
            kind::PROPOSE,
            handler(move |caller, payload| {
                let local = local.clone();
                async move {
                    if caller == Caller::Joiner {
                        return Err(RpcError::Remote {
                            code: pb::ErrorCode::Unauthorized as i32,
                            message: "members only".into(),
                        });
                    }
                    let cmd: Command = serde_json::from_slice(&payload).map_err(|e| RpcError::Remote {
                        code: pb::ErrorCode::BadRequest as i32,
                        message: e.to_string(),
                    })?;
                    let res = local.propose_here(cmd).await;
                    let wire: Result<CommandResult, String> = match res {
                        Ok(o) => Ok(Ok(o)),
                        Err(ProposeError::Rejected(r)) => Ok(Err(r)),
                        Err(e) => Err(e.to_string()),
                    };
                    serde_json::to_vec(&wire).map_err(|e| RpcError::Protocol(e.to_string()))
                }
            }),
        );
        // JOIN: check the token through the state machine, then sign the joiner's certificate.
        let state = self.state.clone();
        let me = self.proposer.clone();
        self.transport.register(
            kind::JOIN,
            handler(move |_caller, payload| {
                let (state, me) = (state.clone(), me.clone());
                async move { admit(&me, &state, &payload).await }
            }),
        );
    }

    /// This hub's node id.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.node_id)
    }

    /// Hex SHA-256 of this hub's mesh certificate.
    pub fn cert_fingerprint(&self) -> String {
        hex::encode(tls::fingerprint(&self.cert_der))
    }

    /// The mesh endpoint's bound address.
    pub fn mesh_addr(&self) -> SocketAddr {
        self.mesh_addr
    }

    /// The mesh endpoint, for the node's data-plane handlers.
    pub fn transport(&self) -> Arc<Transport> {
        self.transport.clone()
    }

    /// The latest applied state.
    pub fn state(&self) -> Arc<ClusterState> {
        self.state.borrow().clone()
    }

    /// A receiver that sees every newly applied state.
    pub fn watch(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.clone()
    }

    /// Commits `cmd` through Raft and returns the state machine's answer. A follower forwards
    /// the command to the leader.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        self.proposer.propose(cmd).await
    }

    /// Commits `cmd` only through this hub's own Raft log: never forwarded. For the leader's own
    /// decisions (hub health, placements, holders), which rest on what this hub saw as leader: a
    /// deposed leader's pending decision must fail, not be carried out by its successor (a leader
    /// cut off from the mesh once had its successor mark the successor itself down that way).
    pub async fn propose_as_leader(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        self.proposer.propose_here(cmd).await
    }

    /// Creates a join token valid for `ttl` that points at this hub.
    pub async fn create_token(&self, ttl: Duration) -> Result<String, ProposeError> {
        let ca = self.state().ca.clone().ok_or_else(|| ProposeError::Unavailable("the mesh has no CA yet".into()))?;
        let token = JoinToken::fresh(tls::fingerprint(&ca.cert_der), self.mesh_addr);
        let at_ms = now_ms();
        let cmd = Command::CreateToken {
            id: token.id.clone(),
            secret_hash: hash_secret(&token.secret),
            expires_ms: at_ms + ttl.as_millis() as u64,
            at_ms,
        };
        self.propose(cmd).await?;
        Ok(token.to_string())
    }

    /// Revokes a join token, given as the token itself or its id.
    pub async fn revoke_token(&self, token_or_id: &str) -> Result<String, ProposeError> {
        let id = JoinToken::parse(token_or_id).map(|t| t.id).unwrap_or_else(|_| token_or_id.trim().to_owned());
        self.propose(Command::RevokeToken { id: id.clone() }).await?;
        Ok(id)
    }

    /// Waits until this hub has applied at least log index `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut rx = self.applied.clone();
        tokio::time::timeout(timeout, rx.wait_for(|i| *i >= index)).await.is_ok_and(|r| r.is_ok())
    }

    /// Waits until some hub is known as leader.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<u64> {
        let mut rx = self.raft.metrics();
        let res = tokio::time::timeout(timeout, rx.wait_for(|m| m.current_leader.is_some())).await;
        match res {
            Ok(Ok(m)) => m.current_leader,
            _ => None,
        }
    }

    /// Whether this hub may act for its instances: it is alone in the mesh, or it has heard from a
    /// quorum (as leader) or from the leader (as follower) within `lease`, on monotonic time.
    pub fn holds_lease(&self, lease: Duration) -> bool {
        // Called on every local invocation: read the metrics in place rather than clone them.
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let mut voters = m.membership_config.membership().voter_ids();
        if voters.next() == Some(self.node_id) && voters.next().is_none() {
            return true;
        }
        match m.current_leader {
            Some(l) if l == self.node_id => m.millis_since_quorum_ack.is_some_and(|ms| ms <= lease.as_millis() as u64),
            Some(l) => self.transport.last_heard(l).is_some_and(|t| t.elapsed() <= lease),
            None => false,
        }
    }

    /// Whether this hub currently leads.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// Leader, term, applied index, voters and learners as this hub sees them.
    pub fn status(&self) -> MeshStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let learners = membership.learner_ids().collect();
        MeshStatus {
            node_id: self.node_id,
            leader: m.current_leader,
            term: m.current_term,
            last_applied: m.last_applied.map_or(0, |l| l.index),
            voters,
            learners,
        }
    }

    /// Stops Raft and the endpoint; pending proposals fail.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        self.transport.close();
        self.transport.clear_handlers();
    }
}

/// Keeps the endpoint's address book in step with the membership and the node records, so a
/// follower can reach the leader (to forward proposals) and every hub the data plane needs.
async fn keep_address_book(
    transport: Arc<Transport>,
    raft: Raft<TypeConfig>,
    mut state: watch::Receiver<Arc<ClusterState>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut metrics = raft.metrics();
    // Metrics change with every replication step; the book only needs a refresh when the
    // membership or the state does.
    let mut seen_membership = None;
    let mut seen_state: Option<Arc<ClusterState>> = None;
    loop {
        let membership = metrics.borrow_and_update().membership_config.clone();
        if seen_membership.as_ref() != Some(membership.log_id()) {
            for (id, node) in membership.membership().nodes() {
                if let Ok(addr) = node.mesh_addr.parse() {
                    transport.set_peer(*id, addr);
                }
            }
            seen_membership = Some(*membership.log_id());
        }
        let st = state.borrow_and_update().clone();
        if !seen_state.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, &st)) {
            for n in st.nodes.values() {
                if let Ok(addr) = n.mesh_addr.parse() {
                    transport.set_peer(n.id.0, addr);
                }
            }
            transport.set_revoked(st.revoked.iter().filter_map(|h| {
                let mut fp = [0u8; 32];
                hex::decode_to_slice(h, &mut fp).ok().map(|()| fp)
            }));
            seen_state = Some(st);
        }
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            r = metrics.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// What proposing needs, cheap to clone into handlers.
#[derive(Clone)]
struct ProposeHandle {
    raft: Raft<TypeConfig>,
    transport: Arc<Transport>,
    timeout: Duration,
    batcher: Batcher,
}

type Waiter = tokio::sync::oneshot::Sender<Result<Outcome, ProposeError>>;

/// Group commit by hand: openraft 0.9 appends (and fsyncs) one client write at a time, so the
/// commands that arrive while a write is in flight are committed together as one
/// `Command::Batch` entry, and each waiter gets its own result.
#[derive(Clone)]
struct Batcher {
    tx: tokio::sync::mpsc::UnboundedSender<(Command, Waiter)>,
}

/// Most commands in one log entry.
const MAX_BATCH: usize = 512;

impl Batcher {
    fn start(raft: Raft<TypeConfig>, timeout: Duration) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Command, Waiter)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(x) => batch.push(x),
                        Err(_) => break,
                    }
                }
                if batch.len() == 1 {
                    let (cmd, waiter) = batch.pop().expect("one command");
                    let _ = waiter.send(propose_raw(&raft, cmd, timeout).await);
                    continue;
                }
                let (cmds, waiters): (Vec<Command>, Vec<Waiter>) = batch.into_iter().unzip();
                match propose_raw(&raft, Command::Batch(cmds), timeout).await {
                    Ok(Outcome::Batch(results)) if results.len() == waiters.len() => {
                        for (w, r) in waiters.into_iter().zip(results) {
                            let _ = w.send(r.map_err(ProposeError::Rejected));
                        }
                    }
                    Ok(other) => {
                        let e = ProposeError::Unavailable(format!("unexpected batch outcome {other:?}"));
                        waiters.into_iter().for_each(|w| drop(w.send(Err(e.clone()))));
                    }
                    Err(e) => waiters.into_iter().for_each(|w| drop(w.send(Err(e.clone())))),
                }
            }
        });
        Self { tx }
    }
}

impl ProposeHandle {
    /// Commits on this hub only (it must lead).
    async fn propose_here(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        match cmd {
            // Batches go as they are: batches do not nest.
            Command::Batch(_) => propose_raw(&self.raft, cmd, self.timeout).await,
            _ => propose_local(&self.batcher, cmd).await,
        }
    }

    async fn propose(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        match self.propose_here(cmd.clone()).await {
            Err(ProposeError::NotLeader { leader }) => {
                // openraft names the leader only once its vote is committed here; the metrics may
                // already know it.
                let metrics = self.raft.metrics().borrow().clone();
                match leader.or(metrics.current_leader) {
                    Some(l) if l != metrics.id => self.forward(l, cmd).await,
                    other => Err(ProposeError::NotLeader { leader: other }),
                }
            }
            other => other,
        }
    }

    async fn forward(&self, leader: u64, cmd: Command) -> Result<Outcome, ProposeError> {
        let payload = serde_json::to_vec(&cmd).map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        // Stop waiting on a leader that has been replaced: if it never got the command, the caller
        // may retry with the new one; if it did, the outcome is unknown.
        let mut metrics = self.raft.metrics();
        let replaced = async move {
            let _ = metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != leader)).await;
        };
        let call = self.transport.call_unless(leader, kind::PROPOSE, payload, self.timeout, replaced);
        let raw = call.await.map_err(|e| match e {
            RpcError::Timeout => ProposeError::Timeout,
            RpcError::Unreachable(..) | RpcError::NotDelivered(_) => ProposeError::NotLeader { leader: None },
            other => ProposeError::Unavailable(other.to_string()),
        })?;
        let wire: Result<CommandResult, String> = serde_json::from_slice(&raw)
            .map_err(|e| ProposeError::Unavailable(format!("bad answer from the leader: {e}")))?;
        match wire {
            Ok(res) => Ok(res?),
            Err(m) if m.contains("timed out") => Err(ProposeError::Timeout),
            Err(m) => Err(ProposeError::Unavailable(m)),
        }
    }
}

async fn propose_local(batcher: &Batcher, cmd: Command) -> Result<Outcome, ProposeError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    batcher.tx.send((cmd, tx)).map_err(|_| ProposeError::Unavailable("consensus is shutting down".into()))?;
    rx.await.map_err(|_| ProposeError::Unavailable("consensus is shutting down".into()))?
}

async fn propose_raw(raft: &Raft<TypeConfig>, cmd: Command, timeout: Duration) -> Result<Outcome, ProposeError> {
    match tokio::time::timeout(timeout, raft.client_write(cmd)).await {
        Err(_) => Err(ProposeError::Timeout),
        Ok(Ok(resp)) => Ok(resp.data?),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            Err(ProposeError::NotLeader { leader: f.leader_id })
        }
        Ok(Err(e)) => Err(ProposeError::Unavailable(e.to_string())),
    }
}

async fn admit(
    me: &ProposeHandle,
    state: &watch::Receiver<Arc<ClusterState>>,
    payload: &[u8],
) -> Result<Vec<u8>, RpcError> {
    let refuse = |code: pb::ErrorCode, m: String| RpcError::Remote { code: code as i32, message: m };
    let req = pb::JoinRequest::decode(payload)
        .map_err(|e| refuse(pb::ErrorCode::BadRequest, format!("bad join request: {e}")))?;
    let node = NodeRecord {
        id: NodeId(req.node_id),
        name: req.name.clone(),
        api_addr: req.api_addr.clone(),
        mesh_addr: req.mesh_addr.clone(),
        labels: BTreeMap::new(),
        slots: 0,
        memory_bytes: 0,
        witness: false,
        cert_fingerprint: String::new(),
        status: NodeStatus::Up,
    };
    if req.mesh_addr.parse::<SocketAddr>().is_err() {
        return Err(refuse(pb::ErrorCode::BadRequest, "the joiner's mesh address does not parse".into()));
    }
    // Sign first (nothing is committed yet), so the record carries the certificate's fingerprint.
    let ca = state.borrow().ca.clone().ok_or_else(|| refuse(pb::ErrorCode::Unavailable, "no CA yet".into()))?;
    let cert = ca.issue(req.node_id, &req.public_key).map_err(|e| refuse(pb::ErrorCode::BadRequest, e.to_string()))?;
    let mut node = node;
    node.cert_fingerprint = hex::encode(tls::fingerprint(&cert));
    let cmd = Command::AdmitNode {
        node,
        token_id: req.token_id.clone(),
        secret_hash: hash_secret(&req.secret),
        at_ms: now_ms(),
    };
    match me.propose(cmd).await {
        Ok(_) => {}
        Err(ProposeError::Rejected(r)) => {
            tracing::warn!(node = req.node_id, name = %req.name, reason = %r, "join refused");
            return Err(refuse(pb::ErrorCode::Unauthorized, r.to_string()));
        }
        Err(e) => return Err(refuse(pb::ErrorCode::Unavailable, e.to_string())),
    }
    tracing::info!(node = req.node_id, name = %req.name, "admitted a hub");
    let leader = me.raft.metrics().borrow().current_leader.unwrap_or(0);
    Ok(pb::JoinResponse { ca_cert: ca.cert_der, node_cert: cert, leader }.encode_to_vec())
}
