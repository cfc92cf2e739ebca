//! Wire types of hubmesh.
//!
//! * [`pb`]: protobuf messages compiled from `proto/hubmesh.proto` with prost (built by protox,
//!   so no `protoc` is needed). They are used on the mesh and for on-disk records such as
//!   checkpoint manifests. Always write them as `pb::X`.
//! * [`api`]: the JSON bodies of the HTTP API (`/v1/...`), shared by the server, the CLI client
//!   and the chaos suite.
//!
//! This crate holds no logic and no domain types: conversions live in the crates that own the
//! domain types.

pub mod api;

/// Messages generated from `proto/hubmesh.proto` (package `hubmesh.v1`).
#[allow(unreachable_pub, clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/hubmesh.v1.rs"));
}

/// prost's field encoders, for a message written by hand where its generated form would copy
/// too much (the checkpoint manifest's page list).
pub use prost::encoding;
pub use prost::{DecodeError, Message};
