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
//! * Hub-to-hub transport is the mesh issue's: until then [`network`] answers every RPC with
//!   `Unreachable`, which a one-voter mesh never sends.
//!
//! This crate must not import wasmtime, libp2p or axum, and never decides placement: the leader's
//! scheduler (in `node`) proposes placements as commands.

mod autopilot;
mod consensus;
mod ids;
pub mod join;
pub mod network;
pub mod state;
mod state_machine;
pub mod tls;
pub mod transport;
mod type_config;

#[cfg(test)]
mod transport_tests;

pub use autopilot::target_voters;
pub use consensus::{Consensus, ConsensusConfig, MeshStatus, ProposeError, StartError};
pub use ids::{Epoch, NodeId};
pub use state::{ClusterState, Command, Outcome, Rejected};
pub use type_config::{NodeAddr, TypeConfig};

#[cfg(test)]
mod raft_suite_tests;
