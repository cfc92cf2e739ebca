//! The boot script of a hub: each step is narrated in the log, and shutdown runs in reverse.
//!
//! ```text
//!  1 data dir + format marker   2 API token   3 page log, blob store   4 Raft (sled; init or recover)
//!  5 gossip endpoint (gossip.addr)  6 executor (wasmtime)  7 API listener (api.addr)
//!  8 workers (reconciler, leader, gossip, ...)
//!  shutdown: stop API -> stop workers (the gossip swarm with them) -> stop tasks (final
//!  checkpoints) -> stop Raft
//! ```

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hubmesh_consensus::{Consensus, ConsensusConfig, NodeAddr};
use hubmesh_storage::{write_atomic, BlobStore, PageLog};
use rand::RngCore;

use crate::api;
use crate::config::Config;
use crate::executor::{EngineLimits, Executor};
use crate::hub::Hub;

const FORMAT_FILE: &str = "FORMAT";
const FORMAT: &str = "hubmesh-data 1\n";
/// File holding the API token.
pub const TOKEN_FILE: &str = "admin.token";
/// File holding the API's bound address (useful with port 0).
pub const API_ADDR_FILE: &str = "api.addr";
/// File holding the mesh endpoint's bound address.
pub const MESH_ADDR_FILE: &str = "mesh.addr";
/// Directory holding the hub's certificates and key: present once it is a member of a mesh.
pub const TLS_DIR: &str = "tls";
/// File holding the gossip endpoint's address (as other hubs dial it).
pub const GOSSIP_ADDR_FILE: &str = "gossip.addr";

fn check_format(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(FORMAT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if s == FORMAT => Ok(()),
        Ok(s) => bail!("{} says {:?}; this hubmesh understands {:?}", path.display(), s.trim(), FORMAT.trim()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(&path, FORMAT.as_bytes(), 0o644).with_context(|| format!("writing {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Reads the API token, creating it (256 random bits, mode 0600) on first start.
fn load_or_create_token(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => bail!("{} is empty; delete it to get a new token", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    write_atomic(path, format!("{token}\n").as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(path = %path.display(), "created the API token");
    Ok(token)
}

/// Runs a hub until `shutdown` completes.
pub async fn run(
    config: Config,
    join: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = config.data_dir.clone();
    tracing::info!(data_dir = %dir.display(), name = %config.name, "1/8 data dir");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    check_format(&dir)?;
    crate::faults::set_marker_dir(&dir);

    tracing::info!("2/8 API token");
    let token = load_or_create_token(&dir.join(TOKEN_FILE))?;

    tracing::info!("3/8 page log and blob store");
    let pages = PageLog::open(&dir.join("checkpoints")).context("opening the page log")?;
    let blobs = BlobStore::open(&dir.join("blobs")).context("opening the blob store")?;

    tracing::info!("4/8 raft");
    let timeouts = config.timeouts.resolve();
    timeouts.check().context("unsafe [timeouts]")?;
    if config.task_cpus == Some(0) {
        bail!("task_cpus must be at least 1");
    }
    let o = &config.overload;
    if !(o.low > 0.0 && o.low < o.high && o.high <= 10.0) || o.queue_wait.is_zero() {
        bail!("[overload]: expected 0 < low ({}) < high ({}) <= 10 and a queue_wait above 0", o.low, o.high);
    }
    if let Some(bad) = config.devices.mdns_types.iter().find(|t| !crate::devices::mdns::valid_type(t)) {
        bail!("the mDNS service type {bad:?} is not valid: expected _name._tcp or _name._udp (name: 1-15 letters, digits, hyphens)");
    }
    // The gossip endpoint binds after Raft (it needs the hub's key): a port that is taken must
    // fail the start before a joining hub is admitted.
    std::net::TcpListener::bind(config.gossip_addr())
        .with_context(|| format!("the gossip address {} is not free (set --gossip)", config.gossip_addr()))?;
    let listener = tokio::net::TcpListener::bind(config.api)
        .await
        .with_context(|| format!("binding the API to {}", config.api))?;
    let api_addr = listener.local_addr().context("reading the API address")?;
    let consensus = Consensus::start(ConsensusConfig {
        dir: dir.join("raft"),
        tls_dir: dir.join(TLS_DIR),
        fresh_node_id: fresh_node_id()?,
        node: NodeAddr { name: config.name.clone(), api_addr: api_addr.to_string(), mesh_addr: String::new() },
        mesh_addr: config.mesh,
        join,
        propose_timeout: timeouts.propose,
        heartbeat: timeouts.heartbeat,
        election_timeout_min: timeouts.election,
        election_timeout_max: timeouts.election * 2,
    })
    .await
    .context("starting raft")?;
    let leader = consensus.wait_for_leader(Duration::from_secs(10)).await;
    let mesh_addr = consensus.mesh_addr();
    write_atomic(&dir.join(MESH_ADDR_FILE), format!("{mesh_addr}\n").as_bytes(), 0o644).context("writing mesh.addr")?;
    tracing::info!(node_id = consensus.node_id().0, ?leader, %mesh_addr, "raft is up");

    let (gossip, gossip_swarm) = crate::gossip::start(&dir, consensus.node_key(), config.gossip_addr(), mesh_addr.ip())
        .await
        .context("starting the gossip endpoint")?;
    write_atomic(&dir.join(GOSSIP_ADDR_FILE), format!("{}\n", gossip.addr()).as_bytes(), 0o644)
        .context("writing gossip.addr")?;
    tracing::info!(addr = %gossip.addr(), peer_id = %gossip.peer_id(), "5/8 gossip");

    tracing::info!("6/8 executor");
    let limits = EngineLimits {
        max_instances: config.executor.max_instances,
        max_task_memory: config.executor.max_task_memory.as_u64(),
    };
    // Modules compile in `hubmesh-compile` (`executor::Compiler`): the compiler's pages stay out
    // of the hub's memory, and a hub built without the compiler cannot start without it.
    let executor = Arc::new(Executor::for_hub(limits, &dir.join("cache"), pages).context("starting the executor")?);

    let hub = Arc::new(Hub::new(config.clone(), consensus, executor, blobs, token, started, gossip));

    tracing::info!(%api_addr, "7/8 API");
    write_atomic(&dir.join(API_ADDR_FILE), format!("{api_addr}\n").as_bytes(), 0o644).context("writing api.addr")?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| tracing::warn!(error = %e, "metrics are off"))
        .ok();
    let app = api::router(api::ApiState { hub: hub.clone(), metrics });

    tracing::info!("8/8 workers");
    crate::dataplane::register(&hub);
    crate::replication::register(&hub);
    crate::migration::register(&hub);
    hub.executor().set_sink(Arc::new(crate::replication::Replicator::new(&hub)));
    let workers = hub.workers();
    workers.spawn(crate::reconcile::reconciler(hub.clone()));
    workers.spawn(crate::reconcile::module_keeper(hub.clone()));
    workers.spawn(crate::replication::upkeep(hub.clone()));
    workers.spawn(crate::leader::LeaderDuties::new(hub.clone(), api_addr.to_string()));
    workers.spawn(crate::access::AdminTokenKeeper::new(hub.clone()));
    workers.spawn(crate::load::LoadMeter::new(hub.clone()));
    workers.spawn(crate::gossip::GossipWorker::new(hub.clone(), gossip_swarm));
    workers.spawn(crate::devices::DevicesWorker::new(hub.clone()));
    // Discovery looks at the LAN: a hub on loopback (tests, a single-machine trial) has none.
    let lan = !mesh_addr.ip().is_loopback();
    if lan && !config.devices.mdns_types.is_empty() {
        match crate::devices::mdns::MdnsWorker::start(hub.clone(), &config.devices.mdns_types) {
            Ok(mdns) => workers.spawn(mdns),
            Err(e) => tracing::warn!(error = %e, "mDNS device discovery is off"),
        }
    }
    if lan && config.devices.ssdp {
        match crate::devices::upnp::UpnpWorker::start(hub.clone()) {
            Ok(upnp) => workers.spawn(upnp),
            Err(e) => tracing::warn!(error = %e, "SSDP device discovery is off"),
        }
    }

    tracing::info!(
        api = %format!("http://{api_addr}"),
        token_file = %dir.join(TOKEN_FILE).display(),
        took = ?started.elapsed(),
        "hubmesh is up"
    );
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;

    tracing::info!("shutting down: workers");
    hub.workers().stop(Duration::from_secs(5)).await;
    tracing::info!("shutting down: tasks (final checkpoints)");
    let executor = hub.executor().clone();
    let _ =
        tokio::time::timeout(Duration::from_secs(10), tokio::task::spawn_blocking(move || executor.shutdown())).await;
    tracing::info!("shutting down: raft");
    hub.consensus().shutdown().await;
    served.context("serving the API")?;
    tracing::info!("bye");
    Ok(())
}

/// The node id a new data dir takes: random, or `HUBMESH_NODE_ID` (meant for tests that need a
/// collision, and for re-creating a hub under a known id; the mesh refuses an id it already has).
fn fresh_node_id() -> anyhow::Result<u64> {
    match std::env::var("HUBMESH_NODE_ID") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(id) if id > 0 => Ok(id),
            _ => bail!("HUBMESH_NODE_ID={v:?}: expected a positive integer"),
        },
        Err(_) => Ok(rand::rng().next_u64() >> 1 | 1),
    }
}
