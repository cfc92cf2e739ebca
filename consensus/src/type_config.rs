//! openraft's type configuration for hubmesh.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Command, CommandResult};

/// What the Raft membership records about a hub: enough to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// The hub's name.
    pub name: String,
    /// Its HTTP API address.
    pub api_addr: String,
    /// Its mesh (QUIC) address; empty until the mesh transport exists.
    #[serde(default)]
    pub mesh_addr: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.api_addr)
    }
}

openraft::declare_raft_types!(
    /// Raft types of hubmesh: the log carries [`Command`]s, the state machine answers each with
    /// a [`CommandResult`].
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        Node = NodeAddr,
);
