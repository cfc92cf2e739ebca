//! Who may call which API route. API tokens belong to the mesh (`ClusterState::api_tokens`, hashes
//! only): created and revoked through Raft, honoured by every hub from its applied state, so a
//! revocation reaches every hub as fast as the state does. Each hub's own `DATA_DIR/admin.token`
//! is registered in the mesh as the admin token `hub-<node id>` (the `api-tokens` worker), so it
//! works on every hub; until that is applied it works on its own hub.
//!
//! ```text
//!  Bearer T --> sha256(T) in the applied state? --> valid (not revoked, not expired)? --> its grant
//!           --> else T == this hub's admin.token?  --> admin (unless the mesh revoked it)
//!  route --> POST /v1/tasks/{name}/invoke needs invoke on {name}; every other route needs admin
//! ```

use std::sync::Arc;
use std::time::Duration;

use hubmesh_consensus::join::hash_secret;
use hubmesh_consensus::state::{hub_token_name, ApiScope, ApiTokenRecord};
use hubmesh_consensus::worker::Worker;
use hubmesh_consensus::{ClusterState, Command, ProposeError, Rejected};
use rand::RngCore;

use crate::hub::Hub;

/// What a route needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Need {
    Admin,
    Invoke(String),
}

impl Need {
    /// What `method path` needs.
    pub(crate) fn of(method: &axum::http::Method, path: &str) -> Self {
        let task = path.strip_prefix("/v1/tasks/").and_then(|rest| rest.strip_suffix("/invoke"));
        match task {
            Some(name) if method == axum::http::Method::POST && !name.is_empty() && !name.contains('/') => {
                Self::Invoke(name.to_owned())
            }
            _ => Self::Admin,
        }
    }
}

/// What a presented token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Grant {
    Admin,
    Invoke { tasks: Vec<String> },
}

impl Grant {
    fn of(record: &ApiTokenRecord) -> Self {
        match record.scope {
            ApiScope::Admin => Self::Admin,
            ApiScope::Invoke => Self::Invoke { tasks: record.tasks.clone() },
        }
    }

    pub(crate) fn allows(&self, need: &Need) -> bool {
        match (self, need) {
            (Self::Admin, _) => true,
            (Self::Invoke { tasks }, Need::Invoke(task)) => tasks.is_empty() || tasks.contains(task),
            (Self::Invoke { .. }, Need::Admin) => false,
        }
    }
}

/// The grant of `presented` on `hub`, or `None` for an unknown, revoked or expired token.
pub(crate) fn grant(hub: &Hub, presented: &str) -> Option<Grant> {
    let hash = hash_secret(presented.as_bytes());
    let state = hub.consensus().state();
    match state.api_token_by_hash(&hash) {
        Some((name, record)) => honoured(&state, name, record, hubmesh_consensus::now_ms()).then(|| Grant::of(record)),
        None => hub.token_matches(presented.as_bytes()).then_some(Grant::Admin),
    }
}

/// Whether the mesh's token `name` is honoured at `now_ms`: valid, and not the own token of a
/// removed hub (dead even if its creation committed after the removal, which revokes only a token
/// that exists by then).
fn honoured(state: &ClusterState, name: &str, record: &ApiTokenRecord, now_ms: u64) -> bool {
    let removed_hubs = state.removed.iter().any(|id| name == hub_token_name(*id));
    !removed_hubs && record.is_valid_at(now_ms)
}

/// A new API token for `name`: `hmt.<name>.<128-bit secret, hex>`.
pub(crate) fn fresh_token(name: &str) -> String {
    let mut secret = [0u8; 16];
    rand::rng().fill_bytes(&mut secret);
    format!("hmt.{name}.{}", hex::encode(secret))
}

/// The record of a token, as the mesh stores it.
pub(crate) fn record_of(token: &str, scope: ApiScope, tasks: Vec<String>, expires_ms: u64) -> ApiTokenRecord {
    ApiTokenRecord {
        token_hash: hash_secret(token.as_bytes()),
        scope,
        tasks,
        created_ms: hubmesh_consensus::now_ms(),
        expires_ms,
        revoked: false,
    }
}

/// Registers this hub's `admin.token` in the mesh as `hub-<node id>`, once; then only checks.
pub(crate) struct AdminTokenKeeper {
    hub: Arc<Hub>,
    state: tokio::sync::watch::Receiver<Arc<ClusterState>>,
    /// Registered, or known to be impossible: nothing more to do.
    settled: bool,
}

impl AdminTokenKeeper {
    pub(crate) fn new(hub: Arc<Hub>) -> Self {
        let state = hub.consensus().watch();
        Self { hub, state, settled: false }
    }
}

impl Worker for AdminTokenKeeper {
    fn name(&self) -> &'static str {
        "api-tokens"
    }

    async fn work(&mut self) -> Result<(), String> {
        let hash = hash_secret(self.hub.token().as_bytes());
        if self.settled || self.hub.consensus().state().api_token_by_hash(&hash).is_some() {
            self.settled = true;
            return Ok(());
        }
        if !self.hub.has_quorum() {
            return Err("no quorum yet to register this hub's admin token".into());
        }
        let name = hub_token_name(self.hub.consensus().node_id());
        let record = ApiTokenRecord { token_hash: hash, ..record_of("", ApiScope::Admin, Vec::new(), u64::MAX) };
        match self.hub.consensus().propose(Command::CreateApiToken { name: name.clone(), record }).await {
            Ok(_) => {
                tracing::info!(%name, "this hub's admin token works on every hub");
                self.settled = true;
                Ok(())
            }
            // The name is this hub's, the token another (its admin.token was replaced by hand).
            Err(ProposeError::Rejected(r @ Rejected::ApiTokenExists(_))) => {
                self.settled = true;
                tracing::warn!(reason = %r, "this hub's admin.token works on this hub only");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    async fn wait(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.state.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubmesh_consensus::NodeId;

    #[test]
    fn a_removed_hubs_own_token_is_not_honoured_even_if_created_after_the_removal() {
        let mut state = ClusterState::default();
        let record = record_of("t", ApiScope::Admin, Vec::new(), u64::MAX);
        state.removed.insert(NodeId(3));
        assert!(!honoured(&state, "hub-3", &record, 1), "hub 3 was removed");
        assert!(honoured(&state, "hub-4", &record, 1));
        assert!(honoured(&state, "ops", &record, 1));
        let expired = ApiTokenRecord { expires_ms: 5, ..record };
        assert!(!honoured(&state, "ops", &expired, 6));
    }
}
