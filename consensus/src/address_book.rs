//! Keeps the endpoint's address book in step with the membership and the node records, so a
//! follower can reach the leader (to forward proposals) and every hub the data plane needs; and
//! the revoked certificates (removed hubs) in step with the state.

use std::sync::Arc;

use openraft::Raft;
use tokio::sync::watch;

use crate::state::ClusterState;
use crate::transport::Transport;
use crate::type_config::TypeConfig;

/// Runs until `stop` flips.
pub(crate) async fn run(
    transport: Arc<Transport>,
    raft: Raft<TypeConfig>,
    mut state: watch::Receiver<Arc<ClusterState>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut metrics = raft.metrics();
    // Metrics change with every replication step; the book only needs a refresh when the
    // membership or the state does.
    let mut seen_membership = None;
    let mut seen_state: Option<Arc<ClusterState>> = None;
    loop {
        let membership = metrics.borrow_and_update().membership_config.clone();
        if seen_membership.as_ref() != Some(membership.log_id()) {
            for (id, node) in membership.membership().nodes() {
                if let Ok(addr) = node.mesh_addr.parse() {
                    transport.set_peer(*id, addr);
                }
            }
            seen_membership = Some(*membership.log_id());
        }
        let st = state.borrow_and_update().clone();
        if !seen_state.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, &st)) {
            for n in st.nodes.values() {
                if let Ok(addr) = n.mesh_addr.parse() {
                    transport.set_peer(n.id.0, addr);
                }
            }
            transport.set_revoked(st.revoked.iter().filter_map(|h| {
                let mut fp = [0u8; 32];
                hex::decode_to_slice(h, &mut fp).ok().map(|()| fp)
            }));
            seen_state = Some(st);
        }
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            r = metrics.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}
