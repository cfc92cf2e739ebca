//! [`Consensus`]: the Raft node of one hub and its mesh endpoint, as one facade: start
//! (identity, endpoint, Raft), propose, read the applied state, status, shutdown.
//!
//! ```text
//!  start: open sled --> identity (node id, certificates) --> join::bootstrap (restart / new mesh /
//!         join) --> Raft over the endpoint --> serve RAFT_*, PROPOSE, JOIN --> autopilot and
//!         address book loops --> a new mesh records its CA
//!  propose: propose::ProposeHandle (group commit here, or forwarded to the leader)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmesh_storage::{open_raft_db, LogStore, SnapshotStore};
use openraft::{Raft, SnapshotPolicy};
use tokio::sync::watch;

use crate::address_book::AddressBook;
use crate::autopilot::Autopilot;
use crate::contact::{DeafLeader, GateClock, LeaderContact, PeerAnswers, QuorumAckWatch};
use crate::election_gate::{ElectionGate, Timings};
use crate::identity::{self, open_err};
use crate::ids::NodeId;
use crate::join::{self, hash_secret, Boot, JoinToken};
use crate::lease::Lease;
use crate::network::NetworkFactory;
use crate::propose::{ProposeError, ProposeHandle};
use crate::state::{ClusterState, Command, Outcome};
use crate::state_machine::StateMachine;
use crate::tls;
use crate::transport::{PingAnswer, Transport};
use crate::type_config::{NodeAddr, TypeConfig};
use crate::worker::Workers;

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
    key: tls::NodeKey,
    proposer: ProposeHandle,
    /// When this hub last took entries from a leader (the election gate's leader contact).
    contact: LeaderContact,
    /// Whether this hub may act for its instances ([`crate::lease`]).
    lease: Lease,
    /// The election gate's ping answers: which voters answer this hub, and since when not.
    peers: PeerAnswers,
    /// Whether this hub's own view of `contact` and `peers` is current (see [`GateClock`]).
    clock: GateClock,
    /// When Raft started here (a hub that never heard a leader has had no lease since then).
    started: Instant,
    /// Consensus's own background loops (autopilot, address book).
    workers: Workers,
    read_barrier: crate::read_barrier::ReadBarrier,
}

impl Consensus {
    /// Opens the store, sets up the identity (new mesh, join, or restart), binds the mesh
    /// endpoint and starts Raft.
    pub async fn start(cfg: ConsensusConfig) -> Result<Self, StartError> {
        let db = open_raft_db(&cfg.dir).map_err(open_err(&cfg.dir))?;
        let has_raft_state = identity::has_raft_state(&db, &cfg.dir)?;
        let existing = identity::load(&cfg.tls_dir)?;
        let node_id = identity::load_node_id(&db, &cfg, has_raft_state)?;
        let Boot { identity, new_ca, transport } = join::bootstrap(&cfg, node_id, existing, has_raft_state).await?;
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
            // The election gate switches timer elections on when they can succeed and are needed:
            // on at start, a restarted voter's first tick (before the gate's first round) would
            // campaign at once and depose a healthy leader.
            enable_elect: false,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let lease = Lease::default();
        let network = NetworkFactory { transport: transport.clone(), lease: lease.clone(), me: node_id };
        let raft = Raft::new(node_id, Arc::new(raft_config), network, log_store, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let contact = LeaderContact::default();
        let peers = PeerAnswers::default();
        let clock = GateClock::new(cfg.heartbeat, cfg.election_timeout_min, crate::election_gate::PING_TIMEOUT);
        // Deaf after openraft's leader lease (`election_timeout_max`) without a ping answered:
        // well before the transport drops the leader's silent connection.
        let deaf = DeafLeader::new(peers.clone(), clock.clone(), cfg.election_timeout_max);
        crate::network::register_handlers(&transport, &raft, &contact, &lease, &deaf);
        let proposer = ProposeHandle::new(raft.clone(), transport.clone(), cfg.propose_timeout);
        let read_barrier = crate::read_barrier::ReadBarrier::new(raft.clone(), transport.clone(), applied_rx.clone());
        let me = Self {
            read_barrier,
            cert_der: identity.cert_der.clone(),
            key: identity.key.clone(),
            proposer,
            raft,
            node_id,
            transport,
            mesh_addr,
            state: state_rx,
            applied: applied_rx,
            contact,
            lease,
            peers,
            clock,
            started: Instant::now(),
            workers: Workers::new(),
        };
        me.proposer.serve();
        join::serve(&me.transport, me.proposer.clone(), me.state.clone());
        me.workers.spawn(Autopilot { raft: me.raft.clone(), node_id, state: me.state.clone() });
        me.workers.spawn(AddressBook::new(me.transport.clone(), &me.raft, me.state.clone()));
        crate::read_barrier::serve(&me.transport, me.raft.clone());
        let (raft, contact) = (me.raft.clone(), me.contact.clone());
        crate::election_gate::serve(&me.transport, move || {
            let (last_log_index, leader) = {
                let metrics = raft.metrics();
                let m = metrics.borrow();
                (m.last_log_index, m.current_leader)
            };
            PingAnswer {
                hears_leader: crate::contact::hears_leader(&raft, &contact, cfg.election_timeout_min),
                last_log_index,
                leader,
            }
        });
        let timings = Timings {
            heartbeat: cfg.heartbeat,
            election_min: cfg.election_timeout_min,
            election_max: cfg.election_timeout_max,
        };
        me.workers.spawn(QuorumAckWatch {
            metrics: me.raft.metrics(),
            me: node_id,
            contact: me.contact.clone(),
            lease: me.lease.clone(),
        });
        me.workers.spawn(ElectionGate::new(
            me.raft.clone(),
            me.transport.clone(),
            me.contact.clone(),
            me.peers.clone(),
            me.clock.clone(),
            node_id,
            timings,
        ));

        if let Some(ca) = new_ca {
            let node = NodeAddr { mesh_addr: mesh_addr.to_string(), ..cfg.node.clone() };
            tracing::info!(node_id, "initialising a new mesh (this hub is its first voter and CA)");
            me.raft.initialize(BTreeMap::from([(node_id, node)])).await.map_err(|e| StartError::Raft(e.to_string()))?;
            me.wait_for_leader(Duration::from_secs(10)).await;
            me.propose(Command::SetCa { ca }).await.map_err(|e| StartError::Raft(format!("recording the CA: {e}")))?;
        }
        Ok(me)
    }

    /// This hub's node id.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.node_id)
    }

    /// Hex SHA-256 of this hub's mesh certificate.
    pub fn cert_fingerprint(&self) -> String {
        hex::encode(tls::fingerprint(&self.cert_der))
    }

    /// This hub's key pair (Ed25519): its mesh certificate's, and its gossip identity's.
    pub fn node_key(&self) -> &tls::NodeKey {
        &self.key
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

    /// A receiver of the state whose `changed()` waits for the next change after this call.
    /// (A receiver from [`Self::watch`] has seen no change yet: its `changed()` returns at once,
    /// and a loop that waits on a fresh one each time spins.)
    pub fn changes(&self) -> watch::Receiver<Arc<ClusterState>> {
        let mut rx = self.state.clone();
        rx.mark_unchanged();
        rx
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
        let at_ms = crate::now_ms();
        let cmd = Command::CreateToken {
            id: token.id.clone(),
            secret_hash: hash_secret(&token.secret),
            expires_ms: at_ms + ttl.as_millis() as u64,
            at_ms,
        };
        self.propose(cmd).await?;
        // A follower's proposal returns once the leader commits it; the token names this hub,
        // whose join server checks it against its own applied state: wait until that has it.
        let mut state = self.watch();
        let id = token.id.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), state.wait_for(|s| s.tokens.contains_key(&id))).await;
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

    /// Waits until this hub has applied everything the leader committed before this call (see
    /// [`read_barrier`](crate::read_barrier)): call it before answering that a name does not
    /// exist. `false` when no leader could be reached within `timeout`.
    pub async fn catch_up(&self, timeout: Duration) -> bool {
        self.read_barrier.catch_up(timeout).await
    }

    /// Whether this hub has applied every entry its log holds: it is not applying a backlog (after
    /// a partition or a restart). With a lease ([`Self::holds_lease`]) its applied state is then
    /// the mesh's as of its last contact with the leader — a local stand-in for a read barrier.
    pub fn applied_all_received(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.last_applied.map_or(0, |l| l.index) >= m.last_log_index.unwrap_or(0)
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

    /// The leader this hub knows now, if any.
    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// Completes once this hub knows a leader other than `than` (at once if it already does).
    pub async fn another_leader(&self, than: Option<u64>) {
        let mut rx = self.raft.metrics();
        if rx.wait_for(|m| m.current_leader.is_some() && m.current_leader != than).await.is_err() {
            std::future::pending::<()>().await; // Raft is gone; the caller's bound ends the wait
        }
    }

    /// Whether this hub may act for its instances: it is alone in the mesh, or it has heard from a
    /// quorum (as leader) within `lease`, or (as follower) holds the lease its leader lent it
    /// ([`crate::lease`]: no longer than the leader's own, and only once it has applied what the
    /// leader had committed), on monotonic time.
    pub fn holds_lease(&self, lease: Duration) -> bool {
        let alone = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            let mut voters = m.membership_config.membership().voter_ids();
            voters.next() == Some(self.node_id) && voters.next().is_none()
        };
        alone || crate::lease::holds(&self.raft, &self.lease, lease)
    }

    /// How long ago this hub's `lease` ran out: since its last lease began (or, never having held
    /// one, since Raft started here), less the lease; `None` while it holds one.
    pub fn lease_lapsed_for(&self, lease: Duration) -> Option<Duration> {
        if self.holds_lease(lease) {
            return None;
        }
        let applied = crate::lease::applied(&self.raft.metrics().borrow());
        let unheard = self.lease.age(applied).unwrap_or_else(|| self.started.elapsed());
        Some(unheard.saturating_sub(lease))
    }

    /// How long voter `node` has not answered this hub's election-gate pings (sent every
    /// heartbeat); `None` if this hub does not ask it (not a voter, or this hub is not one).
    pub fn silent_for(&self, node: u64) -> Option<Duration> {
        self.peers.silent_for(node)
    }

    /// How long a voter must stay [silent](Self::silent_for) to count as gone for this hub: at
    /// least `lease`, and at least a ping's timeout and a round — so one late answer (a lossy
    /// link, a busy hub) is not taken for silence; only a ping that timed out is.
    pub fn silent_after(&self, lease: Duration, heartbeat: Duration) -> Duration {
        lease.max(crate::election_gate::PING_TIMEOUT + heartbeat)
    }

    /// Whether this hub's own view of whom it hears is current: the election gate runs on time,
    /// and a full ping round has passed since this hub last came back from a stall of its own
    /// (until then, the others' silence and a lapsed lease may be its own doing).
    pub fn view_is_current(&self) -> bool {
        self.clock.is_current(Instant::now())
    }

    /// Consensus's background workers (autopilot, address book).
    pub fn workers(&self) -> &Workers {
        &self.workers
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
        self.workers.stop(Duration::from_secs(5)).await;
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        self.transport.close();
        self.transport.clear_handlers();
    }
}
