//! Integration tests: real `hubmesh` processes on loopback, driven through the HTTP API and the
//! CLI. One test binary; the harness is in `harness/`, one file per scenario.

#![allow(unreachable_pub)] // the items of a test binary are not an API

mod harness;

mod api_tokens;
mod attacker;
mod bad_input;
mod cli;
mod compiler;
mod cut_off;
mod drain;
mod failover;
mod gossip;
mod invoke;
mod mesh;
mod migration;
mod restart;
mod upgrade;
