//! Derives `HUBMESH_BUILD_ID`: what a hub and its compiler program (`hubmesh-compile`) must agree
//! on to work together — the version, and a hash of the files that decide what a compiled module
//! looks like (the instrumenter, the names and facts it hands over, the host ABI it checks
//! imports against, the compiler protocol and the program that serves it, the engine's settings),
//! of the workspace's and node's manifests (wasmtime's features; the text, not the features a
//! build enables: a hub built without the compiler pairs with a compiler built with it) and of
//! Cargo.lock (wasmtime's exact version). Both binaries of one tree get the same id; any change
//! to those files makes a stale one refuse (`executor::compile`).

use std::hash::{Hash, Hasher};

const DECIDING: &[&str] = &[
    "src/executor/instrument.rs",
    "src/executor/prepared.rs",
    "src/executor/abi.rs",
    "src/executor/compile.rs",
    "src/executor/engine.rs",
    "src/bin/hubmesh-compile.rs",
    "Cargo.toml",
    "../Cargo.toml",
    "../Cargo.lock",
];

fn main() {
    // SipHash with fixed keys: the same input gives the same id in both builds of one tree.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for file in DECIDING {
        println!("cargo:rerun-if-changed={file}");
        // A file that is missing (a packaged crate has no workspace Cargo.lock) counts as empty.
        std::fs::read(file).unwrap_or_default().hash(&mut hasher);
    }
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo:rustc-env=HUBMESH_BUILD_ID={version}+{:016x}", hasher.finish());
}
