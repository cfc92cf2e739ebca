//! openraft's network over the mesh transport: one QUIC stream per RPC, the openraft message
//! JSON-encoded (openraft's messages come with serde) inside the protobuf envelope
//! (`pb::MeshRequest`), through the typed endpoints `RAFT_APPEND`, `RAFT_VOTE`, `RAFT_SNAPSHOT`. The server side is registered
//! by [`register_handlers`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::Raft;

use hubmesh_proto::pb;

use crate::contact::{DeafLeader, LeaderContact};
use crate::lease::Lease;
use crate::transport::{
    Endpoint, Json, LeaderAppend, Refusal, RpcError, Transport, Wire, RAFT_APPEND, RAFT_SNAPSHOT, RAFT_VOTE,
};
use crate::type_config::{NodeAddr, TypeConfig};

/// Creates a client per peer; records each peer's mesh address in the transport.
#[derive(Clone)]
pub struct NetworkFactory {
    pub(crate) transport: Arc<Transport>,
    /// This hub's lease: its appends lend their followers its age.
    pub(crate) lease: Lease,
    pub(crate) me: u64,
}

/// A client for one peer.
pub struct PeerClient {
    transport: Arc<Transport>,
    target: u64,
    node: NodeAddr,
    lease: Lease,
    me: u64,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> Self::Network {
        if let Ok(addr) = node.mesh_addr.parse() {
            self.transport.set_peer(target, addr);
        }
        PeerClient {
            transport: self.transport.clone(),
            target,
            node: node.clone(),
            lease: self.lease.clone(),
            me: self.me,
        }
    }
}

impl PeerClient {
    async fn rpc<Req, Resp, E>(
        &self,
        endpoint: &Endpoint<Json<Req>, Json<Result<Resp, E>>>,
        req: Req,
        opt: &RPCOption,
    ) -> Result<Resp, RPCError<u64, NodeAddr, E>>
    where
        Json<Req>: Wire,
        Json<Result<Resp, E>>: Wire,
        E: std::error::Error,
    {
        let res = match endpoint.call(&self.transport, self.target, &Json(req), opt.hard_ttl()).await {
            Ok(Json(res)) => res,
            Err(e @ RpcError::Unreachable(..)) => return Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e @ RpcError::Remote(_)) if endpoint.kind() == RAFT_APPEND.kind() => {
                // A follower that refuses appends (it finds this leader deaf) is asked again only
                // after the call's time: openraft resends at once after any error but
                // `Unreachable`, which would back off for far longer. (Snapshot chunks have a
                // back-off of their own; votes are never refused.)
                tokio::time::sleep(opt.hard_ttl()).await;
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
            Err(e) => return Err(RPCError::Network(NetworkError::new(&e))),
        };
        res.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        // Aged when sent, not when openraft built the request: the follower dates its lease back
        // from when it takes this.
        let age = self.lease.own_age(self.me).map(|d| d.as_micros().min(u64::MAX as u128) as u64);
        self.rpc(&RAFT_APPEND, LeaderAppend { entries: rpc, quorum_ack_age_us: age }, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64, InstallSnapshotError>>> {
        self.rpc(&RAFT_SNAPSHOT, rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        self.rpc(&RAFT_VOTE, rpc, &option).await
    }
}

/// Serves Raft RPCs arriving on the transport (members only: [`Endpoint::serve`] checks). Entries
/// or a snapshot accepted from a leader are recorded in `contact`, and entries in `lease` with
/// what the leader lent ([`crate::lease`]); those of a leader that has gone deaf to this hub are
/// refused ([`DeafLeader`]).
pub(crate) fn register_handlers(
    transport: &Transport,
    raft: &Raft<TypeConfig>,
    contact: &LeaderContact,
    lease: &Lease,
    deaf: &DeafLeader,
) {
    let (r, c, l, d) = (raft.clone(), contact.clone(), lease.clone(), deaf.clone());
    RAFT_APPEND.serve(transport, move |from, Json(LeaderAppend { entries: req, quorum_ack_age_us })| {
        let (r, c, l, d) = (r.clone(), c.clone(), l.clone(), d.clone());
        async move {
            let received = Instant::now();
            // Refused before openraft sees them, so that they renew neither its vote lease nor
            // this hub's contact; the leader waits out the call before it resends (`PeerClient::rpc`).
            if follows(&r, &req.vote) && d.refuses(from.0) {
                return Err(Refusal::new(pb::ErrorCode::Unavailable, DEAF_REFUSAL));
            }
            let committed = req.leader_commit.map_or(0, |c| c.index);
            let answer = r.append_entries(req).await;
            // A higher vote answers a deposed leader; anything else is the leader's.
            if answer.as_ref().is_ok_and(|a| !matches!(a, AppendEntriesResponse::HigherVote(_))) {
                c.record(from.0);
                let (leader, applied) = {
                    let metrics = r.metrics();
                    let m = metrics.borrow();
                    (m.current_leader, crate::lease::applied(&m))
                };
                // Only while this hub follows the sender: an append that finishes after this hub
                // was elected must not take over its own lease.
                if leader == Some(from.0) {
                    let lent = quorum_ack_age_us.map(Duration::from_micros);
                    l.took(from.0, received, lent, committed, applied);
                }
            }
            Ok(Json(answer))
        }
    });
    let r = raft.clone();
    RAFT_VOTE.serve(transport, move |_from, Json(req)| {
        let r = r.clone();
        async move { Ok(Json(r.vote(req).await)) }
    });
    let (r, c, d) = (raft.clone(), contact.clone(), deaf.clone());
    RAFT_SNAPSHOT.serve(transport, move |from, Json(req)| {
        let (r, c, d) = (r.clone(), c.clone(), d.clone());
        async move {
            if follows(&r, &req.vote) && d.refuses(from.0) {
                return Err(Refusal::new(pb::ErrorCode::Unavailable, DEAF_REFUSAL));
            }
            let vote = req.vote;
            let answer = r.install_snapshot(req).await;
            if answer.as_ref().is_ok_and(|a| a.vote <= vote) {
                c.record(from.0);
            }
            Ok(Json(answer))
        }
    });
}

/// Why a deaf leader's entries are refused (it cannot hear this anyway; a log line can).
const DEAF_REFUSAL: &str = "this hub's pings to the leader go unanswered: its entries are refused";

/// Whether `vote` is the one this hub already follows: a higher vote (a new leader) is never
/// refused, and a lower one is openraft's to answer.
fn follows(raft: &Raft<TypeConfig>, vote: &openraft::Vote<u64>) -> bool {
    raft.metrics().borrow().vote == *vote
}
