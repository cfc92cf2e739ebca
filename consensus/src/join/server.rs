//! The member's side of a join: the token is checked against the committed state first (a
//! stranger without one learns nothing more), then the joiner's record (its fields bounded and
//! well-formed, its id free), and only then is the joiner's certificate signed with the mesh's CA
//! and `AdmitNode` proposed. The apply checks the token and the id again, against the state it
//! applies to; the fields are checked here only, so that old log entries replay alike.

use std::collections::BTreeMap;
use std::sync::Arc;

use hubmesh_proto::pb;
use tokio::sync::watch;

use super::hash_secret;
use crate::ids::NodeId;
use crate::propose::{ProposeError, ProposeHandle};
use crate::state::{validate_joiner, ClusterState, Command, NodeRecord, NodeStatus, Rejected};
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
    let mut node = NodeRecord {
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
        gossip_addr: String::new(),
        // The key the certificate below is issued for: the hub's libp2p identity too.
        public_key: hex::encode(&req.public_key),
    };
    let secret_hash = hash_secret(&req.secret);
    let at_ms = crate::now_ms();
    // Everything the state machine will check, checked first against the committed state: a
    // joiner with a wrong token costs no signature and no Raft entry.
    let ca = {
        let st = state.borrow();
        let checked =
            st.check_admission(&node, &req.token_id, &secret_hash, at_ms).and_then(|()| validate_joiner(&node));
        if let Err(r) = checked {
            tracing::warn!(node = req.node_id, reason = %r, "join refused");
            return Err(refusal(&r));
        }
        st.ca.clone().ok_or_else(|| Refusal::new(pb::ErrorCode::Unavailable, "no CA yet"))?
    };
    // Signed before the proposal, so the record carries the certificate's fingerprint.
    let cert = ca.issue(req.node_id, &req.public_key).map_err(|e| Refusal::bad_request(e.to_string()))?;
    node.cert_fingerprint = hex::encode(tls::fingerprint(&cert));
    let cmd = Command::AdmitNode { node, token_id: req.token_id.clone(), secret_hash, at_ms };
    match proposer.propose(cmd).await {
        Ok(_) => {}
        Err(ProposeError::Rejected(r)) => {
            tracing::warn!(node = req.node_id, name = %req.name, reason = %r, "join refused");
            return Err(refusal(&r));
        }
        Err(e) => return Err(Refusal::new(pb::ErrorCode::Unavailable, e.to_string())),
    }
    tracing::info!(node = req.node_id, name = %req.name, "admitted a hub");
    let leader = proposer.raft().metrics().borrow().current_leader.unwrap_or(0);
    Ok(pb::JoinResponse { ca_cert: ca.cert_der, node_cert: cert, leader })
}

/// The joiner's answer for a refused admission: a malformed request is a bad request, the rest
/// (token, id) is not authorized.
fn refusal(r: &Rejected) -> Refusal {
    let code = match r {
        Rejected::Invalid(_) => pb::ErrorCode::BadRequest,
        _ => pb::ErrorCode::Unauthorized,
    };
    Refusal::new(code, r.to_string())
}
