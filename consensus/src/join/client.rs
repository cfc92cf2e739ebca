//! The joiner's side: a throwaway identity to bind the endpoint, the token's secret sent only to
//! a member whose certificate chains to the pinned CA, the signed certificate saved.

use std::sync::Arc;
use std::time::Duration;

use hubmesh_proto::{pb, Message};

use super::JoinToken;
use crate::consensus::{ConsensusConfig, StartError};
use crate::tls::{self, CaMaterial, Identity, NodeKey};
use crate::transport::{RpcError, Transport};

/// Runs the join handshake; returns the certificate and the endpoint it bound.
pub(super) async fn join(
    cfg: &ConsensusConfig,
    node_id: u64,
    token: &str,
) -> Result<(Identity, Arc<Transport>), StartError> {
    let join_err = |e: String| StartError::Join(e);
    let token = JoinToken::parse(token).map_err(|e| join_err(e.to_string()))?;
    let key = NodeKey::generate().map_err(|e| join_err(e.to_string()))?;
    // A throwaway identity lets the endpoint bind (and learn its port) before admission.
    let scratch_ca = CaMaterial::generate().map_err(|e| join_err(e.to_string()))?;
    let scratch = Identity {
        ca_der: scratch_ca.cert_der.clone(),
        cert_der: scratch_ca.issue(node_id, key.public_key()).map_err(|e| join_err(e.to_string()))?,
        key: key.clone(),
    };
    let transport = Transport::bind(cfg.mesh_addr, &scratch, node_id, cfg.heartbeat)?;
    let mesh_addr = transport.local_addr().map_err(|e| join_err(e.to_string()))?;
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
            RpcError::Unreachable(_, m) => {
                join_err(format!("could not reach {} or its certificate is not from the token's CA: {m}", token.member))
            }
            other => join_err(other.to_string()),
        })?;
    let resp = pb::JoinResponse::decode(raw.as_slice()).map_err(|e| join_err(format!("bad answer: {e}")))?;
    if tls::fingerprint(&resp.ca_cert) != token.ca_fingerprint {
        return Err(join_err("the member answered with another CA".into()));
    }
    let identity = Identity { ca_der: resp.ca_cert, cert_der: resp.node_cert, key };
    crate::identity::save(&cfg.tls_dir, &identity)?;
    Ok((identity, transport))
}
