//! How a hub comes to have an identity in the mesh, both sides: a new mesh, a restart, or a join
//! with a token (K3s-style: the token pins the CA before any secret is sent).
//!
//! ```text
//!  bootstrap: tls/ and Raft state exist --> load the identity (restart)
//!             neither, no token        --> new CA + certificate (first hub of a new mesh)
//!             neither, --join TOKEN    --> client: bind with a throwaway identity,
//!                                          JoinRequest to the token's member (CA pinned)
//!  server (any member): JoinRequest --> propose AdmitNode (the state machine checks the secret's
//!             hash, expiry, revocation and the id) --> sign a certificate --> JoinResponse
//!  then the leader's autopilot adds the new hub as a learner, later a voter
//! ```
//! `token` holds the token format ([`JoinToken`]); the mesh remembers only a hash of each
//! token's secret (`state::TokenRecord`).

mod client;
mod server;
mod token;

use std::sync::Arc;

pub use token::{hash_secret, JoinToken, TokenError};

pub(crate) use server::serve;

use crate::consensus::{ConsensusConfig, StartError};
use crate::tls::{CaMaterial, Identity, NodeKey};
use crate::transport::Transport;

/// What a hub starts with.
pub(crate) struct Boot {
    pub(crate) identity: Identity,
    /// A new mesh's CA, to record in the state once Raft runs.
    pub(crate) new_ca: Option<CaMaterial>,
    /// The mesh endpoint, bound and presenting `identity`.
    pub(crate) transport: Arc<Transport>,
}

/// Decides between restart, new mesh and join, and binds the mesh endpoint.
pub(crate) async fn bootstrap(
    cfg: &ConsensusConfig,
    node_id: u64,
    existing: Option<Identity>,
    has_raft_state: bool,
) -> Result<Boot, StartError> {
    let (identity, new_ca, bound) = match (existing, &cfg.join, has_raft_state) {
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
            let join_err = |e: crate::tls::TlsError| StartError::Join(e.to_string());
            let ca = CaMaterial::generate().map_err(join_err)?;
            let key = NodeKey::generate().map_err(join_err)?;
            let cert_der = ca.issue(node_id, key.public_key()).map_err(join_err)?;
            let id = Identity { ca_der: ca.cert_der.clone(), cert_der, key };
            crate::identity::save(&cfg.tls_dir, &id)?;
            (id, Some(ca), None)
        }
        (None, Some(token), false) => {
            let (id, transport) = client::join(cfg, node_id, token).await?;
            (id, None, Some(transport))
        }
    };
    // A joiner bound its endpoint already, to tell the mesh its address.
    let transport = match bound {
        Some(t) => t,
        None => Transport::bind(cfg.mesh_addr, &identity, node_id, cfg.heartbeat)?,
    };
    transport.set_identity(&identity)?;
    Ok(Boot { identity, new_ca, transport })
}
