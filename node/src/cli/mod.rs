//! The command line (clap, noun-verb). `hubmesh up` runs a hub; every other command is a client
//! of a hub's HTTP API (`--hub`, `HUBMESH_HUB`, default http://127.0.0.1:7070) with the token
//! from `HUBMESH_TOKEN`, `--token-file`, or `DATA_DIR/admin.token`.

mod join_tokens;
mod output;
mod task;
mod up;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::client::Client;
use crate::config::default_data_dir;
use crate::server::TOKEN_FILE;

/// The data dir of a hub installed by the package (its unit's `--data-dir`).
const PACKAGE_DATA_DIR: &str = "/var/lib/hubmesh";

/// hubmesh: several home or edge machines as one fault-tolerant hub for WebAssembly tasks.
#[derive(Debug, Parser)]
// The version is the build's (`HUBMESH_BUILD_ID`): `hubmesh-compile --version` must print the same.
#[command(name = "hubmesh", version = crate::executor::BUILD_ID, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// How client commands reach a hub.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// URL of the hub's API.
    #[arg(long, global = true, env = "HUBMESH_HUB", default_value = "http://127.0.0.1:7070")]
    pub hub: String,
    /// File with the API token (default: DATA_DIR/admin.token; HUBMESH_TOKEN wins over both).
    #[arg(long, global = true, env = "HUBMESH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The hub's data directory (for `up`, and to find admin.token).
    #[arg(long, global = true, env = "HUBMESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a hub (embedded defaults; no config file needed).
    Up(up::UpArgs),
    /// Deploy, invoke, list and remove tasks.
    Task {
        #[command(subcommand)]
        cmd: task::TaskCmd,
    },
    /// Join tokens for new hubs.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// API tokens: mesh-wide, scoped, revocable on every hub at once.
    ApiToken {
        #[command(subcommand)]
        cmd: ApiTokenCmd,
    },
    /// The hubs of the mesh.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// The LAN's devices that the hubs discover (mDNS, SSDP) and gossip.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// The hub's background workers: state, rounds, errors.
    Worker {
        #[command(subcommand)]
        cmd: WorkerCmd,
    },
    /// The mesh at a glance: leader, term, voters, hubs, tasks.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the configuration `up` would use.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Make this machine's packaged hub join a mesh: writes the token where the systemd unit reads
    /// it (`--env-file`, mode 0600) and (re)starts the service. For a hub installed by the .deb;
    /// elsewhere, `hubmesh up --join TOKEN`.
    Join {
        /// A token from `hubmesh token create` on a member; `-` reads it from stdin (it is then in
        /// neither the process list nor the shell history).
        token: String,
        /// The environment file the unit reads (`HUBMESH_JOIN=…`).
        #[arg(long, default_value = "/etc/hubmesh/join.env")]
        env_file: PathBuf,
        /// The service to (re)start; empty: write the file only.
        #[arg(long, default_value = "hubmesh")]
        service: String,
    },
    /// Ask a hub whether it is up (`GET /health`, no token): exit status 0 if it answers within
    /// `--timeout`, 1 if not. For container health checks and scripts.
    Health {
        /// How long to wait for the answer.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Print a shell completion script (e.g. `hubmesh completions bash > /etc/bash_completion.d/hubmesh`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (hubmesh.1 and one per subcommand) into a directory.
    Man {
        /// Where to write them.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// List the devices some hub sees, with the hubs that see them.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one device: addresses, properties, and when each hub last saw it.
    Show {
        /// Its id, as `device list` prints it.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Print a token that lets a new hub join: `hubmesh up --join TOKEN`.
    Create {
        /// How long the token admits hubs.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Revoke a token (given whole, or its id): it admits no more hubs.
    Revoke { token: String },
}

#[derive(Debug, Subcommand)]
pub enum ApiTokenCmd {
    /// Create a token that every hub accepts, and print it (it is shown only once).
    Create {
        /// Its name (for list and revoke): 1-64 characters of a-z, 0-9, '-' or '_'.
        name: String,
        /// `admin` (every route) or `invoke` (only invoking tasks).
        #[arg(long, default_value = "admin")]
        scope: String,
        /// With `--scope invoke`: a task it may invoke (repeatable; none: every task).
        #[arg(long = "task")]
        tasks: Vec<String>,
        /// How long it works, e.g. 30d (default: until revoked).
        #[arg(long)]
        expires: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the tokens (never the tokens themselves).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: every hub refuses it from then on.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List the hubs.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a hub for good: it leaves the Raft membership and its certificate is revoked.
    Rm {
        /// The hub's name or id.
        name: String,
    },
    /// Move every task off a hub (for maintenance); `--undo` lets it take tasks again.
    Drain {
        /// The hub's name or id.
        name: String,
        #[arg(long)]
        undo: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkerCmd {
    /// List this hub's workers.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration as TOML.
    Show(up::UpArgs),
}

impl ConnArgs {
    /// A client with the token found the documented way.
    pub fn client(&self) -> anyhow::Result<Client> {
        let token = match std::env::var("HUBMESH_TOKEN") {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_owned()),
            _ => {
                let path = match &self.token_file {
                    Some(p) => p.clone(),
                    None => self.data_dir.clone().unwrap_or_else(default_data_dir).join(TOKEN_FILE),
                };
                match std::fs::read_to_string(&path) {
                    Ok(t) => Some(t.trim().to_owned()),
                    Err(e) if self.token_file.is_some() => {
                        return Err(e).with_context(|| format!("reading the token file {}", path.display()))
                    }
                    // No token: the hub will answer 401 with a hint.
                    Err(_) => None,
                }
            }
        };
        Ok(Client::new(&self.hub, token))
    }
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => up::run(args, &cli.conn).await,
        Command::Config { cmd: ConfigCmd::Show(args) } => {
            print!("{}", up::config_of(&args, &cli.conn)?.to_toml()?);
            Ok(())
        }
        Command::Task { cmd } => task::run(cmd, &cli.conn.client()?).await,
        Command::Status { json } => {
            let s = cli.conn.client()?.status().await?;
            output::status(&s, json)
        }
        Command::Token { cmd: TokenCmd::Revoke { token } } => {
            cli.conn.client()?.revoke_token(&token).await?;
            println!("revoked");
            Ok(())
        }
        Command::Token { cmd: TokenCmd::Create { ttl } } => {
            let t = cli.conn.client()?.create_token(Some(&ttl)).await?;
            println!("{}", t.token);
            Ok(())
        }
        Command::ApiToken { cmd: ApiTokenCmd::Create { name, scope, tasks, expires, json } } => {
            let req = hubmesh_proto::api::ApiTokenRequest { name, scope: Some(scope), tasks, expires };
            let t = cli.conn.client()?.create_api_token(&req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("{}", t.token);
            }
            Ok(())
        }
        Command::ApiToken { cmd: ApiTokenCmd::List { json } } => {
            let tokens = cli.conn.client()?.api_tokens().await?;
            output::api_tokens(&tokens, json)
        }
        Command::ApiToken { cmd: ApiTokenCmd::Revoke { name } } => {
            cli.conn.client()?.revoke_api_token(&name).await?;
            println!("revoked {name}");
            Ok(())
        }
        Command::Node { cmd: NodeCmd::Rm { name } } => {
            cli.conn.client()?.remove_node(&name).await?;
            println!("removed {name}");
            Ok(())
        }
        Command::Node { cmd: NodeCmd::Drain { name, undo } } => {
            let nodes = cli.conn.client()?.drain(&name, undo).await?;
            output::nodes(&nodes, false)
        }
        Command::Device { cmd: DeviceCmd::List { json } } => {
            let devices = cli.conn.client()?.devices().await?;
            output::devices(&devices, json)
        }
        Command::Device { cmd: DeviceCmd::Show { id, json } } => {
            let device = cli.conn.client()?.device(&id).await?;
            output::device(&device, json)
        }
        Command::Worker { cmd: WorkerCmd::List { json } } => {
            let workers = cli.conn.client()?.workers().await?;
            output::workers(&workers, json)
        }
        Command::Node { cmd: NodeCmd::List { json } } => {
            let nodes = cli.conn.client()?.nodes().await?;
            output::nodes(&nodes, json)
        }
        Command::Join { token, env_file, service } => {
            let data_dir = cli.conn.data_dir.clone().unwrap_or_else(|| PathBuf::from(PACKAGE_DATA_DIR));
            join_tokens::install(&token, &data_dir, &env_file, &service)
        }
        Command::Health { timeout } => {
            let health = Client::with_timeout(&cli.conn.hub, None, timeout)
                .health()
                .await
                .with_context(|| format!("{} is not healthy", cli.conn.hub))?;
            println!("{health}");
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "hubmesh", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out_dir } => {
            std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &out_dir)
                .with_context(|| format!("writing manual pages into {}", out_dir.display()))?;
            Ok(())
        }
    }
}
