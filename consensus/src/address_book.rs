//! Keeps the endpoint's address book in step with the membership and the node records, so a
//! follower can reach the leader (to forward proposals) and every hub the data plane needs, and
//! forgets the hubs that are in neither; and the revoked certificates (removed hubs) in step with
//! the state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use openraft::Raft;
use tokio::sync::watch;

use crate::state::ClusterState;
use crate::transport::Transport;
use crate::type_config::TypeConfig;
use crate::worker::Worker;

/// The address book as a worker: a round whenever the membership or the state changes.
pub(crate) struct AddressBook {
    transport: Arc<Transport>,
    metrics: watch::Receiver<openraft::RaftMetrics<u64, crate::type_config::NodeAddr>>,
    state: watch::Receiver<Arc<ClusterState>>,
    // Metrics change with every replication step; the book only needs a refresh when the
    // membership or the state does.
    seen_membership: Option<Option<openraft::LogId<u64>>>,
    seen_state: Option<Arc<ClusterState>>,
}

impl AddressBook {
    pub(crate) fn new(
        transport: Arc<Transport>,
        raft: &Raft<TypeConfig>,
        state: watch::Receiver<Arc<ClusterState>>,
    ) -> Self {
        Self { transport, metrics: raft.metrics(), state, seen_membership: None, seen_state: None }
    }
}

impl Worker for AddressBook {
    fn name(&self) -> &'static str {
        "address-book"
    }

    async fn work(&mut self) -> Result<(), String> {
        let (transport, seen_membership, seen_state) =
            (&self.transport, &mut self.seen_membership, &mut self.seen_state);
        let membership = self.metrics.borrow_and_update().membership_config.clone();
        let st = self.state.borrow_and_update().clone();
        let membership_changed = seen_membership.as_ref() != Some(membership.log_id());
        let state_changed = !seen_state.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, &st));
        if membership_changed || state_changed {
            let members = membership.membership().nodes().map(|(id, n)| (*id, &n.mesh_addr));
            let recorded = st.nodes.values().map(|n| (n.id.0, &n.mesh_addr));
            let peers: HashMap<u64, SocketAddr> =
                members.chain(recorded).filter_map(|(id, a)| a.parse().ok().map(|a| (id, a))).collect();
            transport.set_peers(peers);
            *seen_membership = Some(*membership.log_id());
        }
        if state_changed {
            transport.set_revoked(st.revoked.iter().filter_map(|h| {
                let mut fp = [0u8; 32];
                hex::decode_to_slice(h, &mut fp).ok().map(|()| fp)
            }));
            *seen_state = Some(st);
        }
        Ok(())
    }

    async fn wait(&mut self) {
        // A closed channel (Raft stopped) must not spin: then the round waits for shutdown.
        tokio::select! {
            r = self.state.changed() => if r.is_err() { std::future::pending::<()>().await },
            r = self.metrics.changed() => if r.is_err() { std::future::pending::<()>().await },
        }
    }
}
