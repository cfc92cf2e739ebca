//! `hubmesh up`: run a hub.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::{join_tokens, ConnArgs};
use crate::config::Config;

/// How long `--join-file` waits for its token.
const JOIN_FILE_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// TOML configuration file (optional; flags and HUBMESH_* env override it).
    #[arg(long, env = "HUBMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// The hub's name.
    #[arg(long, env = "HUBMESH_NAME")]
    pub name: Option<String>,
    /// Address of the HTTP API (port 0 picks a free one, written to DATA_DIR/api.addr).
    #[arg(long, env = "HUBMESH_API")]
    pub api: Option<SocketAddr>,
    /// Address of the mesh endpoint (UDP); use a LAN address to form a mesh.
    #[arg(long, env = "HUBMESH_MESH")]
    pub mesh: Option<SocketAddr>,
    /// Address of the gossip endpoint (TCP; default: the mesh's host, port 7072).
    #[arg(long, env = "HUBMESH_GOSSIP")]
    pub gossip: Option<SocketAddr>,
    /// Join an existing mesh with a token from `hubmesh token create` (empty data dir only).
    #[arg(long, env = "HUBMESH_JOIN", hide_env_values = true, conflicts_with = "join_file")]
    pub join: Option<String>,
    /// Join with the token in this file, waiting up to 5 minutes for it to appear (a hub that is
    /// already a member does not read it): for hubs started together, with a first hub that
    /// `--publish-join-token`s to a shared file.
    #[arg(long, env = "HUBMESH_JOIN_FILE", value_name = "PATH")]
    pub join_file: Option<PathBuf>,
    /// Once up, write a join token to this file (mode 0600; valid for an hour, renewed every half
    /// hour while the hub runs), for hubs started with `--join-file`.
    #[arg(long, env = "HUBMESH_PUBLISH_JOIN_TOKEN", value_name = "PATH")]
    pub publish_join_token: Option<PathBuf>,
    /// Timeouts profile: lan (default), wifi or wan.
    #[arg(long, env = "HUBMESH_PROFILE")]
    pub profile: Option<crate::config::Profile>,
    /// Run as a witness: vote in Raft, never run tasks.
    #[arg(long)]
    pub witness: bool,
    /// A placement label, `key=value` (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Task instances this hub offers to run.
    #[arg(long, env = "HUBMESH_SLOTS")]
    pub slots: Option<u32>,
    /// Memory this hub offers to task instances, e.g. `512MiB` (default: half the RAM).
    #[arg(long = "task-memory", env = "HUBMESH_TASK_MEMORY")]
    pub task_memory: Option<bytesize::ByteSize>,
    /// CPU cores this hub offers to tasks (default: the machine's); its load is measured against it.
    #[arg(long = "task-cpus", env = "HUBMESH_TASK_CPUS", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub task_cpus: Option<u32>,
    /// An mDNS service type to look for devices of, e.g. `_hap._tcp` (repeatable; replaces the
    /// default list: `hubmesh config show` prints it).
    #[arg(long = "mdns-type", value_name = "TYPE")]
    pub mdns_types: Vec<String>,
    /// Do not search for UPnP devices by SSDP.
    #[arg(long = "no-ssdp")]
    pub no_ssdp: bool,
}

/// Defaults, then the file, then env and flags.
pub(super) fn config_of(args: &UpArgs, conn: &ConnArgs) -> anyhow::Result<Config> {
    let mut c = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(d) = &conn.data_dir {
        c.data_dir = d.clone();
    }
    if let Some(n) = &args.name {
        c.name = n.clone();
    }
    if let Some(a) = args.api {
        c.api = a;
    }
    if let Some(m) = args.mesh {
        c.mesh = m;
    }
    if let Some(g) = args.gossip {
        c.gossip = Some(g);
    }
    if let Some(p) = args.profile {
        c.timeouts.profile = p;
    }
    if args.witness {
        c.witness = true;
    }
    if let Some(s) = args.slots {
        c.slots = s;
    }
    if let Some(m) = args.task_memory {
        c.task_memory = Some(m);
    }
    if let Some(n) = args.task_cpus {
        c.task_cpus = Some(n);
    }
    if args.no_ssdp {
        c.devices.ssdp = false;
    }
    if !args.mdns_types.is_empty() {
        c.devices.mdns_types = args.mdns_types.clone();
    }
    for l in &args.labels {
        let Some((k, v)) = l.split_once('=') else { bail!("--label {l:?}: expected key=value") };
        c.labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(c)
}

pub(super) async fn run(args: UpArgs, conn: &ConnArgs) -> anyhow::Result<()> {
    let config = config_of(&args, conn)?;
    // The handlers first: as a container's PID 1, a process without one ignores SIGTERM, and the
    // wait for a join file below must end on `docker stop` like the hub itself.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let join = match (&args.join, &args.join_file) {
        (Some(token), _) => Some(token.clone()),
        (None, Some(path)) => tokio::select! {
            token = join_tokens::read(&config.data_dir, path, JOIN_FILE_WAIT) => token?,
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        },
        (None, None) => None,
    };
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown requested");
    };
    let publish = async {
        match &args.publish_join_token {
            Some(path) => join_tokens::publish(&config.data_dir, path).await,
            None => std::future::pending().await,
        }
    };
    let hub = crate::server::run(config.clone(), join, shutdown);
    tokio::pin!(hub);
    tokio::select! {
        result = &mut hub => result.context("the hub stopped with an error"),
        () = publish => hub.await.context("the hub stopped with an error"),
    }
}
