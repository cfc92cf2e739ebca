//! `hubmesh-compile`: the module compiler of a hub. The hub starts it for each module it prepares
//! or compiles (the module on stdin, the answer on stdout, the reason for a refusal on stderr and
//! in the exit status: `hubmesh::executor::Compiler`). Not for people; installed beside the hub
//! (or in `/usr/libexec/hubmesh/` by the package).

use clap::Parser;
use hubmesh::executor::{serve_compile_child, EngineLimits, BUILD_ID};

/// The module compiler of a hubmesh hub (started by the hub, not by people).
#[derive(Debug, Parser)]
#[command(name = "hubmesh-compile", version = BUILD_ID)]
struct Args {
    /// The build of the hub that started it: it must be this program's own.
    #[arg(long)]
    hub_build: String,
    /// The hub's engine limits, which the compiled code must match.
    #[arg(long)]
    max_instances: u32,
    #[arg(long)]
    max_task_memory: u64,
    /// The input is an uploaded module: instrument it first, answer with the frame.
    #[arg(long)]
    instrument: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let limits = EngineLimits { max_instances: args.max_instances, max_task_memory: args.max_task_memory };
    serve_compile_child(limits, args.instrument, &args.hub_build).into()
}
