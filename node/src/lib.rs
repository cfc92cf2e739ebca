//! hubmesh: one hub of the mesh.
//!
//! ```text
//!   cli (clap) --HTTP--> api (axum) --> invoke::Router --> executor (wasmtime) --> checkpoint --> storage::PageLog
//!                          |                                   ^
//!                          +--> deploy --> consensus (openraft) --watch--> reconcile --+
//!                                               ^
//!                                  scheduler (leader only, a pure policy)
//! ```
//!
//! `server::run` is the boot script; `main.rs` only parses the command line.

pub mod checkpoint;
pub mod executor;
