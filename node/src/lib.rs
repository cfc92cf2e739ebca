//! hubmesh: one hub of the mesh.
//!
//! ```text
//!   cli (clap) --HTTP--> api (axum) --> Hub::invoke (router) --> executor (wasmtime) --> checkpoint --> PageLog
//!                          |                                        ^
//!                          +--> Hub::deploy --> consensus (openraft) --watch--> reconcile --+
//!                                                  ^
//!                                  leader: scheduler::plan (a pure policy) --propose-->
//! ```
//!
//! `server::run` is the boot script; `main.rs` only parses the command line.

mod access;
mod api;
pub mod checkpoint;
pub mod cli;
pub mod client;
pub mod config;
mod dataplane;
mod deploy;
mod devices;
pub mod executor;
mod faults;
#[doc(hidden)]
pub mod fuzzing;
mod gossip;
mod hub;
mod invoke;
mod leader;
mod load;
mod migration;
mod reconcile;
mod replication;
pub mod scheduler;
pub mod server;
mod wire;
mod worker;
