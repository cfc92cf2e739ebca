//! [`Consensus`]: the Raft node of one hub, and the one way to change the replicated state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hubmesh_storage::{open_raft_db, LogStore, SnapshotStore};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{Raft, SnapshotPolicy};
use tokio::sync::watch;

use crate::ids::NodeId;
use crate::network::NetworkFactory;
use crate::state::{ClusterState, Command, Outcome, Rejected};
use crate::state_machine::StateMachine;
use crate::type_config::{NodeAddr, TypeConfig};

/// How to start the Raft node of a hub.
#[derive(Debug, Clone)]
pub struct ConsensusConfig {
    /// Directory of the sled database (`DATA_DIR/raft`).
    pub dir: PathBuf,
    /// The id to take if this data dir has none yet. An existing id always wins.
    pub fresh_node_id: u64,
    /// This hub's addresses, recorded in the membership.
    pub node: NodeAddr,
    /// Initialise a one-voter mesh if the log is empty (the first hub of a mesh).
    pub bootstrap: bool,
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
    /// The Raft store holds state but no identity: it was tampered with.
    #[error("the Raft store at {0} has a log but no node id; refusing to start as a new voter")]
    MissingIdentity(PathBuf),
    /// openraft refused to start.
    #[error("starting Raft: {0}")]
    Raft(String),
}

/// Why a proposal failed.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// The state machine refused the command; nothing changed.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// This hub is not the leader; send the command to `leader`.
    #[error("this hub is not the leader (leader: {leader:?})")]
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
}

/// The Raft node of a hub.
pub struct Consensus {
    raft: Raft<TypeConfig>,
    node_id: u64,
    state: watch::Receiver<Arc<ClusterState>>,
    applied: watch::Receiver<u64>,
    propose_timeout: Duration,
}

const IDENTITY_TREE: &str = "identity";
const NODE_ID_KEY: &[u8] = b"node_id";

fn open_err(path: &Path) -> impl FnOnce(sled::Error) -> StartError + '_ {
    move |source| StartError::Open { path: path.to_owned(), source }
}

impl Consensus {
    /// Opens the store, recovers the state (snapshot + committed log) and starts Raft.
    pub async fn start(cfg: ConsensusConfig) -> Result<Self, StartError> {
        let db = open_raft_db(&cfg.dir).map_err(open_err(&cfg.dir))?;
        let node_id = Self::identity(&db, &cfg)?;
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
            snapshot_policy: SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: 1000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let raft = Raft::new(node_id, Arc::new(raft_config), NetworkFactory, log_store, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let initialized = raft.is_initialized().await.map_err(|e| StartError::Raft(e.to_string()))?;
        if cfg.bootstrap && !initialized {
            tracing::info!(node_id, "initialising a new one-voter mesh");
            raft.initialize(BTreeMap::from([(node_id, cfg.node.clone())]))
                .await
                .map_err(|e| StartError::Raft(e.to_string()))?;
        }
        Ok(Self { raft, node_id, state: state_rx, applied: applied_rx, propose_timeout: cfg.propose_timeout })
    }

    fn identity(db: &sled::Db, cfg: &ConsensusConfig) -> Result<u64, StartError> {
        let tree = db.open_tree(IDENTITY_TREE).map_err(open_err(&cfg.dir))?;
        if let Some(raw) = tree.get(NODE_ID_KEY).map_err(open_err(&cfg.dir))? {
            let bytes: [u8; 8] = raw.as_ref().try_into().map_err(|_| StartError::MissingIdentity(cfg.dir.clone()))?;
            return Ok(u64::from_be_bytes(bytes));
        }
        let logs = db.open_tree("logs").map_err(open_err(&cfg.dir))?;
        let meta = db.open_tree("meta").map_err(open_err(&cfg.dir))?;
        if !logs.is_empty() || !meta.is_empty() {
            return Err(StartError::MissingIdentity(cfg.dir.clone()));
        }
        tree.insert(NODE_ID_KEY, &cfg.fresh_node_id.to_be_bytes()).map_err(open_err(&cfg.dir))?;
        db.flush().map_err(open_err(&cfg.dir))?;
        Ok(cfg.fresh_node_id)
    }

    /// This hub's node id.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.node_id)
    }

    /// The latest applied state.
    pub fn state(&self) -> Arc<ClusterState> {
        self.state.borrow().clone()
    }

    /// A receiver that sees every newly applied state.
    pub fn watch(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.clone()
    }

    /// Commits `cmd` through Raft and returns the state machine's answer. Only the leader can.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        match tokio::time::timeout(self.propose_timeout, self.raft.client_write(cmd)).await {
            Err(_) => Err(ProposeError::Timeout),
            Ok(Ok(resp)) => Ok(resp.data?),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(ProposeError::NotLeader { leader: f.leader_id })
            }
            Ok(Err(e)) => Err(ProposeError::Unavailable(e.to_string())),
        }
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

    /// Whether this hub currently leads.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// Leader, term, applied index and voters as this hub sees them.
    pub fn status(&self) -> MeshStatus {
        let m = self.raft.metrics().borrow().clone();
        MeshStatus {
            node_id: self.node_id,
            leader: m.current_leader,
            term: m.current_term,
            last_applied: m.last_applied.map_or(0, |l| l.index),
            voters: m.membership_config.membership().voter_ids().collect(),
        }
    }

    /// Stops Raft; pending proposals fail.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}
