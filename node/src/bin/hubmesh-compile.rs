//! `hubmesh-compile`: the module compiler of a hub. The hub starts it for each module it prepares
//! or compiles (the module on stdin, the answer on stdout, the reason for a refusal on stderr and
//! in the exit status: `hubmesh::executor::Compiler`). Not for people; installed beside the hub
//! (or in `/usr/libexec/hubmesh/` by the package).

use clap::Parser;
use hubmesh::executor::{serve_compile_child, BUILD_ID};

/// The module compiler of a hubmesh hub (started by the hub, not by people).
#[derive(Debug, Parser)]
#[command(name = "hubmesh-compile", version = BUILD_ID)]
struct Args {
    /// The build of the hub that started it: it must be this program's own.
    #[arg(long)]
    hub_build: String,
    /// The input is an uploaded module: instrument it first, answer with the frame.
    #[arg(long)]
    instrument: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    serve_compile_child(args.instrument, &args.hub_build).into()
}
