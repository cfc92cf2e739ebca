//! openraft's network over the mesh transport: one QUIC stream per RPC, the openraft message
//! JSON-encoded inside the protobuf envelope (`pb::MeshRequest`). The server side is registered
//! by [`register_handlers`].

use std::sync::Arc;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::Raft;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::transport::{handler, kind, Caller, RpcError, Transport};
use crate::type_config::{NodeAddr, TypeConfig};

/// Creates a client per peer; records each peer's mesh address in the transport.
#[derive(Clone)]
pub struct NetworkFactory {
    pub(crate) transport: Arc<Transport>,
}

/// A client for one peer.
pub struct PeerClient {
    transport: Arc<Transport>,
    target: u64,
    node: NodeAddr,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> Self::Network {
        if let Ok(addr) = node.mesh_addr.parse() {
            self.transport.set_peer(target, addr);
        }
        PeerClient { transport: self.transport.clone(), target, node: node.clone() }
    }
}

impl PeerClient {
    async fn rpc<Req, Resp, E>(&self, kind: u32, req: &Req, opt: &RPCOption) -> Result<Resp, RPCError<u64, NodeAddr, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let raw = match self.transport.call(self.target, kind, payload, opt.hard_ttl()).await {
            Ok(raw) => raw,
            Err(e @ RpcError::Unreachable(..)) => return Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => return Err(RPCError::Network(NetworkError::new(&e))),
        };
        let res: Result<Resp, E> =
            serde_json::from_slice(&raw).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        self.rpc(kind::RAFT_APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64, InstallSnapshotError>>> {
        self.rpc(kind::RAFT_SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        self.rpc(kind::RAFT_VOTE, &rpc, &option).await
    }
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, RpcError> {
    serde_json::from_slice(payload).map_err(|e| RpcError::Remote {
        code: hubmesh_proto::pb::ErrorCode::BadRequest as i32,
        message: format!("undecodable Raft message: {e}"),
    })
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, RpcError> {
    serde_json::to_vec(v).map_err(|e| RpcError::Protocol(e.to_string()))
}

fn members_only(caller: Caller) -> Result<(), RpcError> {
    match caller {
        Caller::Member(_) => Ok(()),
        Caller::Joiner => Err(RpcError::Remote {
            code: hubmesh_proto::pb::ErrorCode::Unauthorized as i32,
            message: "Raft is for members only".into(),
        }),
    }
}

/// Serves Raft RPCs arriving on the transport.
pub(crate) fn register_handlers(transport: &Transport, raft: &Raft<TypeConfig>) {
    let r = raft.clone();
    transport.register(
        kind::RAFT_APPEND,
        handler(move |caller, payload| {
            let r = r.clone();
            async move {
                members_only(caller)?;
                let req: AppendEntriesRequest<TypeConfig> = decode(&payload)?;
                encode(&r.append_entries(req).await)
            }
        }),
    );
    let r = raft.clone();
    transport.register(
        kind::RAFT_VOTE,
        handler(move |caller, payload| {
            let r = r.clone();
            async move {
                members_only(caller)?;
                let req: VoteRequest<u64> = decode(&payload)?;
                encode(&r.vote(req).await)
            }
        }),
    );
    let r = raft.clone();
    transport.register(
        kind::RAFT_SNAPSHOT,
        handler(move |caller, payload| {
            let r = r.clone();
            async move {
                members_only(caller)?;
                let req: InstallSnapshotRequest<TypeConfig> = decode(&payload)?;
                encode(&r.install_snapshot(req).await)
            }
        }),
    );
}
