//! Hub-to-hub Raft transport.
//!
//! A one-voter mesh replicates to nobody, so openraft never calls this. The mesh issue replaces
//! it with RPCs over the QUIC endpoint; until then every call answers `Unreachable`, which makes
//! openraft back off instead of spinning.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

use crate::type_config::{NodeAddr, TypeConfig};

/// Creates a client per peer.
#[derive(Debug, Clone, Default)]
pub struct NetworkFactory;

/// A client for one peer.
#[derive(Debug)]
pub struct PeerClient {
    target: u64,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, _node: &NodeAddr) -> Self::Network {
        PeerClient { target }
    }
}

impl PeerClient {
    fn unreachable<E: std::error::Error>(&self) -> RPCError<u64, NodeAddr, E> {
        let err = std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            format!("hub {} is not reachable: this build has no mesh transport", self.target),
        );
        RPCError::Unreachable(Unreachable::new(&err))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        Err(self.unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64, InstallSnapshotError>>> {
        Err(self.unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        Err(self.unreachable())
    }
}
