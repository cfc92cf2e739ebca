//! `hubmesh-chaos`: run a chaos scenario against a lab of real hubs, replay a run, re-check one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hubmesh_chaos::check::Verdict;
use hubmesh_chaos::run::{self, RunOptions};
use hubmesh_chaos::scenario::Scenario;
use hubmesh_chaos::schedule::Schedule;

#[derive(Parser)]
#[command(name = "hubmesh-chaos", version, about = "Proves that hubmesh fails over without losing acknowledged work")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs a scenario (needs root: it builds network namespaces). Exit code: 0 true, 1 false,
    /// 2 unknown, 3 the run itself failed.
    Run {
        /// A scenario file, e.g. chaos-tests/scenarios/mixed.toml.
        scenario: PathBuf,
        /// The run directory (default chaos-runs/<scenario>-<time>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overrides the scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// The hubmesh binary (default: next to this one, then PATH).
        #[arg(long, env = "HUBMESH_BIN")]
        hubmesh: Option<PathBuf>,
    },
    /// Repeats a run: its scenario, seed and applied schedule.
    Replay {
        run_dir: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, env = "HUBMESH_BIN")]
        hubmesh: Option<PathBuf>,
    },
    /// Re-runs the checkers on a finished run's history.
    Check { run_dir: PathBuf },
    /// Removes what an interrupted lab left (namespaces, bridge, firewall rule, processes).
    Clean,
}

fn default_out(name: &str) -> PathBuf {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().replace(':', "");
    PathBuf::from("chaos-runs").join(format!("{name}-{t}"))
}

fn code(v: Verdict) -> ExitCode {
    match v {
        Verdict::True => ExitCode::SUCCESS,
        Verdict::False => ExitCode::from(1),
        Verdict::Unknown => ExitCode::from(2),
    }
}

async fn run_with_ctrl_c(opts: RunOptions) -> anyhow::Result<ExitCode> {
    tokio::select! {
        r = run::run(opts) => {
            let out = r?;
            for r in &out.results {
                eprintln!("{:<4} {:<34} {}", r.id, r.name, r.verdict.as_str());
            }
            println!("verdict: {}  report: {}", out.verdict.as_str(), out.dir.join("summary.md").display());
            Ok(code(out.verdict))
        }
        _ = tokio::signal::ctrl_c() => {
            // Dropping the run tore the lab down; make sure nothing is left.
            hubmesh_chaos::lab::clean_leftovers();
            anyhow::bail!("interrupted; the lab was torn down")
        }
    }
}

async fn main_inner(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run { scenario, out, seed, hubmesh } => {
            let sc = Scenario::load(&scenario)?;
            let out = out.unwrap_or_else(|| default_out(&sc.name));
            let bin = hubmesh_chaos::find_hubmesh(hubmesh)?;
            run_with_ctrl_c(RunOptions { scenario: sc, out, bin, seed, schedule: None }).await
        }
        Cmd::Replay { run_dir, out, hubmesh } => {
            let sc = Scenario::load(&run_dir.join("scenario.toml"))?;
            let plan: Schedule = serde_json::from_slice(
                &std::fs::read(run_dir.join("schedule.json")).context("reading the run's schedule.json")?,
            )?;
            let out = out.unwrap_or_else(|| default_out(&format!("{}-replay", sc.name)));
            let bin = hubmesh_chaos::find_hubmesh(hubmesh)?;
            let seed = Some(plan.seed);
            run_with_ctrl_c(RunOptions { scenario: sc, out, bin, seed, schedule: Some(plan) }).await
        }
        Cmd::Check { run_dir } => {
            let (v, results) = run::recheck(&run_dir)?;
            for r in &results {
                println!("{:<4} {:<34} {}", r.id, r.name, r.verdict.as_str());
                for x in &r.examples {
                    println!("       {x}");
                }
            }
            println!("verdict: {}", v.as_str());
            Ok(code(v))
        }
        Cmd::Clean => {
            hubmesh_chaos::lab::require_root()?;
            hubmesh_chaos::lab::clean_leftovers();
            println!("the lab is clean");
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match main_inner(cli).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
    }
}
