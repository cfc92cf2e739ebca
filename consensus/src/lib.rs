//! The mesh's replicated state and the Raft node that agrees on it.
//!
//! ```text
//!  node (API, scheduler) --propose(Command)--> Consensus --client_write--> openraft
//!                                                                     |
//!           watch<Arc<ClusterState>> <--publish-- StateMachine <--apply-- committed log (sled)
//! ```
//!
//! * [`state::ClusterState`] is the whole replicated state; [`ClusterState::apply`] is pure: the
//!   same commands in the same order give the same state on every hub.
//! * [`Consensus`] owns the openraft instance: it opens the sled log, recovers on restart,
//!   initialises a one-voter mesh on an empty data dir, proposes commands and publishes every
//!   applied state to watchers.
//! * [`transport`] is the mesh's QUIC endpoint (mutual TLS) with the registry of stream kinds
//!   and typed endpoints; [`network`] is openraft's network over it; [`join`] is how a hub gets
//!   its identity (new mesh, restart, join with a token: both sides); [`propose`] commits
//!   commands (group commit, forwarding to the leader); `address_book` keeps the endpoint's peers
//!   and revocations in step with the state; `autopilot` manages learners and voters; both are
//!   [`worker::Worker`]s, the shape of every background loop of a hub.
//!
//! This crate must not import wasmtime, libp2p or axum, and never decides placement: the leader's
//! scheduler (in `node`) proposes placements as commands.

mod address_book;
mod autopilot;
mod consensus;
mod contact;
mod election_gate;
mod identity;
mod ids;
pub mod join;
mod lease;
pub mod network;
pub mod propose;
mod read_barrier;
pub mod state;
mod state_machine;
pub mod tls;
pub mod transport;
mod type_config;
pub mod wire;
pub mod worker;

pub use autopilot::target_voters;
pub use consensus::{Consensus, ConsensusConfig, MeshStatus, StartError};
pub use ids::{Epoch, NodeId};
pub use propose::ProposeError;
pub use state::{ClusterState, Command, Outcome, Rejected};
pub use type_config::{NodeAddr, TypeConfig};

#[cfg(test)]
mod raft_suite_tests;

/// Milliseconds since the Unix epoch on this hub's wall clock: for stamps in commands and
/// records (the state machine never reads a clock), never for timeouts.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
