//! `hubmesh up`: run a hub.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::ConnArgs;
use crate::config::Config;

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
    #[arg(long, env = "HUBMESH_JOIN", hide_env_values = true)]
    pub join: Option<String>,
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
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler does not fail on Unix");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested");
    };
    crate::server::run(config, args.join.clone(), shutdown).await.context("the hub stopped with an error")
}
