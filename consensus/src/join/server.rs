//! The member's side of a join: the token is checked by the state machine (`AdmitNode`), and
//! only then is the joiner's certificate signed with the mesh's CA.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use hubmesh_proto::pb;
use tokio::sync::watch;

use super::hash_secret;
use crate::ids::NodeId;
use crate::propose::{ProposeError, ProposeHandle};
use crate::state::{ClusterState, Command, NodeRecord, NodeStatus};
use crate::tls;
use crate::transport::{Refusal, Transport, JOIN};

/// Serves `JOIN` on `transport` (the one kind joiners may use).
pub(crate) fn serve(transport: &Transport, proposer: ProposeHandle, state: watch::Receiver<Arc<ClusterState>>) {
    JOIN.serve_any(transport, move |_caller, req| {
        let (proposer, state) = (proposer.clone(), state.clone());
        async move { admit(&proposer, &state, req).await }
    });
}

async fn admit(
    proposer: &ProposeHandle,
    state: &watch::Receiver<Arc<ClusterState>>,
    req: pb::JoinRequest,
) -> Result<pb::JoinResponse, Refusal> {
    if req.mesh_addr.parse::<SocketAddr>().is_err() {
        return Err(Refusal::bad_request("the joiner's mesh address does not parse"));
    }
    // Sign first (nothing is committed yet), so the record carries the certificate's fingerprint.
    let ca = state.borrow().ca.clone().ok_or_else(|| Refusal::new(pb::ErrorCode::Unavailable, "no CA yet"))?;
    let cert = ca.issue(req.node_id, &req.public_key).map_err(|e| Refusal::bad_request(e.to_string()))?;
    let node = NodeRecord {
        id: NodeId(req.node_id),
        name: req.name.clone(),
        api_addr: req.api_addr.clone(),
        mesh_addr: req.mesh_addr.clone(),
        labels: BTreeMap::new(),
        slots: 0,
        memory_bytes: 0,
        witness: false,
        cert_fingerprint: hex::encode(tls::fingerprint(&cert)),
        status: NodeStatus::Up,
    };
    let cmd = Command::AdmitNode {
        node,
        token_id: req.token_id.clone(),
        secret_hash: hash_secret(&req.secret),
        at_ms: crate::now_ms(),
    };
    match proposer.propose(cmd).await {
        Ok(_) => {}
        Err(ProposeError::Rejected(r)) => {
            tracing::warn!(node = req.node_id, name = %req.name, reason = %r, "join refused");
            return Err(Refusal::new(pb::ErrorCode::Unauthorized, r.to_string()));
        }
        Err(e) => return Err(Refusal::new(pb::ErrorCode::Unavailable, e.to_string())),
    }
    tracing::info!(node = req.node_id, name = %req.name, "admitted a hub");
    let leader = proposer.raft().metrics().borrow().current_leader.unwrap_or(0);
    Ok(pb::JoinResponse { ca_cert: ca.cert_der, node_cert: cert, leader })
}
