//! `hubmesh task ...`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use hubmesh_proto::api;

use super::output;
use crate::client::Client;

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Deploy a module (.wasm or .wat) as a task.
    Deploy {
        /// The module file.
        file: PathBuf,
        /// Task name (default: the file name without extension).
        #[arg(long)]
        name: Option<String>,
        /// Keep memory across invocations (one instance, invocations queued).
        #[arg(long)]
        stateful: bool,
        /// Save the state before every answer (implies --stateful).
        #[arg(long)]
        durable: bool,
        /// Save the state periodically, e.g. 5s (implies --stateful).
        #[arg(long, value_name = "DURATION")]
        checkpoint_every: Option<String>,
        /// Memory cap, e.g. 64MiB.
        #[arg(long, value_name = "SIZE")]
        memory: Option<String>,
        /// CPU deadline per invocation, e.g. 1s.
        #[arg(long, value_name = "DURATION")]
        timeout: Option<String>,
        /// Largest input, e.g. 1MiB.
        #[arg(long, value_name = "SIZE")]
        max_input: Option<String>,
        /// Largest output, e.g. 1MiB.
        #[arg(long, value_name = "SIZE")]
        max_output: Option<String>,
        /// Invocations that may wait (stateful) or run at once (stateless).
        #[arg(long)]
        queue: Option<u32>,
        /// Interval of hm_tick, e.g. 1s (stateful tasks that export it).
        #[arg(long, value_name = "DURATION")]
        tick: Option<String>,
        /// Instances of a stateless task, each on its own hub.
        #[arg(long)]
        replicas: Option<u32>,
        /// Hubs besides the host that keep each checkpoint of a stateful task (default 2); a commit
        /// waits for all of them but one (at least one).
        #[arg(long)]
        replicas_state: Option<u32>,
        /// Run only on hubs with this label, `key=value` (repeatable).
        #[arg(long = "on", value_name = "KEY=VALUE")]
        on: Vec<String>,
        /// Never move the task off its hub to relieve an overload or to follow its `--near` device.
        #[arg(long)]
        pin: bool,
        /// Run only on hubs that see this LAN device (an id from `hubmesh device list`),
        /// preferring the one that saw it last; pending while no hub sees it.
        #[arg(long, value_name = "DEVICE")]
        near: Option<String>,
        /// Publish a new version of an existing task.
        #[arg(long)]
        update: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Invoke a task; its output goes to stdout.
    Invoke {
        name: String,
        /// The input, as a string.
        #[arg(long, conflicts_with = "file")]
        data: Option<String>,
        /// The input, from a file (- for stdin).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Idempotency key: a retry with the same key is answered, not applied again.
        #[arg(long)]
        key: Option<String>,
    },
    /// List the tasks.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one task.
    Show {
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Placements and failovers of a task, oldest first.
    History {
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a task and its saved state.
    Rm { name: String },
    /// Take a checkpoint of a stateful task now.
    Checkpoint {
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move a running task to another hub while it serves (live migration).
    Migrate {
        name: String,
        /// The hub to move to (name or id); by default the scheduler picks one, preferring a hub
        /// that already stores the task's checkpoint.
        #[arg(long, value_name = "HUB")]
        to: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn run(cmd: TaskCmd, client: &Client) -> anyhow::Result<()> {
    match cmd {
        TaskCmd::Deploy {
            file,
            name,
            stateful,
            durable,
            checkpoint_every,
            memory,
            timeout,
            max_input,
            max_output,
            queue,
            tick,
            replicas,
            replicas_state,
            on,
            pin,
            near,
            update,
            json,
        } => {
            let module = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let name = match name {
                Some(n) => n,
                None => {
                    file.file_stem().and_then(|s| s.to_str()).map(str::to_owned).context("give the task a --name")?
                }
            };
            let on = (!on.is_empty()).then(|| on.join(","));
            let params = api::DeployParams {
                stateful,
                durable,
                checkpoint_every,
                memory,
                timeout,
                max_input,
                max_output,
                queue,
                tick,
                on,
                replicas,
                replicas_state,
                pin,
                near,
            };
            let resp = client.deploy(&name, module, &params, update).await?;
            output::json_or(&resp, json, || {
                let verb = if resp.created { "deployed" } else { "updated" };
                let t = &resp.task;
                let host = t
                    .placement
                    .as_ref()
                    .map(|p| format!(" on {} (epoch {})", p.node_name, p.epoch))
                    .unwrap_or_default();
                println!("{verb} {} v{}{host}: {}", t.name, t.version, t.state);
            })
        }
        TaskCmd::Invoke { name, data, file, key } => {
            let input = match (data, file) {
                (Some(d), _) => d.into_bytes(),
                (None, Some(p)) if p.as_os_str() == "-" => {
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
                    buf
                }
                (None, Some(p)) => std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
                (None, None) => Vec::new(),
            };
            let out = client.invoke(&name, input, key.as_deref()).await?;
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&out)?;
            if !out.ends_with(b"\n") && std::io::IsTerminal::is_terminal(&stdout) {
                stdout.write_all(b"\n")?;
            }
            Ok(())
        }
        TaskCmd::List { json } => output::tasks(&client.tasks().await?, json),
        TaskCmd::Show { name, json } => output::tasks(&[client.task(&name).await?], json),
        TaskCmd::History { name, json } => output::history(&client.task(&name).await?.history, json),
        TaskCmd::Rm { name } => {
            client.remove(&name).await?;
            println!("removed {name}");
            Ok(())
        }
        TaskCmd::Migrate { name, to, json } => {
            let m = client.migrate(&name, to.as_deref()).await?;
            output::json_or(&m, json, || {
                println!(
                    "migrated {name} from {} ({}) to {} ({}), epoch {}: pause {:.1} ms, {} rounds, {} sent, {} ms in all",
                    m.from_node_name,
                    m.from_node_id,
                    m.to_node_name,
                    m.to_node_id,
                    m.epoch,
                    m.pause_us as f64 / 1000.0,
                    m.rounds,
                    bytesize::ByteSize(m.bytes),
                    m.duration_ms
                )
            })
        }
        TaskCmd::Checkpoint { name, json } => {
            let c = client.checkpoint(&name).await?;
            output::json_or(&c, json, || {
                println!(
                    "checkpoint #{} of {name}: {} pages, {} bytes",
                    c.checkpoint.sequence, c.checkpoint.pages, c.checkpoint.size_bytes
                )
            })
        }
    }
}
