//! Raft commit throughput and latency of a 3-hub mesh on loopback, next to etcd doing the same
//! number of small writes (run: `cargo bench -p hubmesh-consensus --bench commit`). Leader
//! failover is measured with real processes in `node/benches/failover.rs`.
//!
//! Three `Consensus` nodes run in this process with real sled (fsync on every append), quinn
//! with mutual TLS and openraft; the commands are tiny (`SetNodeStatus`). etcd (Debian's
//! `etcd-server`) runs as three processes on loopback and is written through its HTTP gateway.
//! Every loop is bounded in count and time.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmesh_consensus::state::{NodeRecord, NodeStatus};
use hubmesh_consensus::{Command, Consensus, ConsensusConfig, NodeAddr, NodeId};

fn cfg(dir: &Path, id: u64, mesh: SocketAddr, join: Option<String>) -> ConsensusConfig {
    ConsensusConfig {
        dir: dir.join("raft"),
        tls_dir: dir.join("tls"),
        fresh_node_id: id,
        node: NodeAddr { name: format!("bench{id}"), api_addr: String::new(), mesh_addr: String::new() },
        mesh_addr: mesh,
        join,
        propose_timeout: Duration::from_secs(5),
        heartbeat: Duration::from_millis(50),
        election_timeout_min: Duration::from_millis(200),
        election_timeout_max: Duration::from_millis(400),
    }
}

fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn mesh(dirs: &[tempfile::TempDir]) -> Vec<Arc<Consensus>> {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let first = Arc::new(Consensus::start(cfg(dirs[0].path(), 1, any, None)).await.unwrap());
    first.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    // The first hub registers itself (as `hubmesh` does); joiners are registered by admission.
    let record = NodeRecord {
        id: NodeId(1),
        name: "bench1".into(),
        api_addr: String::new(),
        mesh_addr: first.mesh_addr().to_string(),
        labels: Default::default(),
        slots: 0,
        memory_bytes: 0,
        witness: false,
        cert_fingerprint: String::new(),
        gossip_addr: String::new(),
        public_key: String::new(),
        status: NodeStatus::Up,
    };
    first.propose(Command::RegisterNode { node: record }).await.unwrap();
    let token = first.create_token(Duration::from_secs(600)).await.unwrap();
    let mut all = vec![first];
    for (i, d) in dirs.iter().enumerate().skip(1) {
        all.push(Arc::new(Consensus::start(cfg(d.path(), i as u64 + 1, any, Some(token.clone()))).await.unwrap()));
    }
    let end = Instant::now() + Duration::from_secs(60);
    while all[0].status().voters.len() < 3 {
        assert!(Instant::now() < end, "the mesh did not form");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    all
}

fn leader_of(nodes: &[Arc<Consensus>]) -> usize {
    nodes.iter().position(|n| n.is_leader()).expect("a leader")
}

/// Runs `clients` concurrent loops of `op` until `ops` are done in all (or 20 s pass); returns
/// throughput, p50 and p99 latency.
async fn drive<F, Fut>(clients: usize, ops: usize, op: F) -> (f64, Duration, Duration)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..clients {
        let op = op.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let end = Instant::now() + Duration::from_secs(20);
            while lat.len() < ops / clients && Instant::now() < end {
                let t = Instant::now();
                op().await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    (rate, pct(&mut all, 0.5), pct(&mut all, 0.99))
}

async fn hubmesh_writes(leader: &Arc<Consensus>, clients: usize, ops: usize) -> (f64, Duration, Duration) {
    let me = leader.node_id();
    let leader = leader.clone();
    drive(clients, ops, move || {
        let c = leader.clone();
        async move {
            c.propose(Command::SetNodeStatus { node: me, status: NodeStatus::Up }).await.unwrap();
        }
    })
    .await
}

struct Etcd(Vec<Child>);

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_etcd(dir: &Path) -> Option<(Etcd, String)> {
    if Process::new("etcd").arg("--version").output().is_err() {
        println!("(etcd is not installed: `apt-get install etcd-server` for the side-by-side figures)");
        return None;
    }
    let peers: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let cluster: Vec<String> = (0..3).map(|i| format!("e{i}=http://127.0.0.1:{}", peers[i])).collect();
    let mut children = Vec::new();
    for i in 0..3 {
        children.push(
            Process::new("etcd")
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("e{i}")))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", clients[i])])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{}", clients[i])])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", peers[i])])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", peers[i])])
                .args(["--initial-cluster", &cluster.join(",")])
                .args(["--initial-cluster-state", "new", "--initial-cluster-token", "hubmesh-bench"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?,
        );
    }
    Some((Etcd(children), format!("http://127.0.0.1:{}", clients[0])))
}

async fn etcd_writes(url: &str, clients: usize, ops: usize) -> (f64, Duration, Duration) {
    let http = reqwest::Client::new();
    let put = format!("{url}/v3/kv/put");
    // key "hubmesh", value "bench" (base64, as the gateway wants).
    let body = r#"{"key":"aHVibWVzaA==","value":"YmVuY2g="}"#;
    drive(clients, ops, move || {
        let (http, put) = (http.clone(), put.clone());
        async move {
            let r = http.post(&put).body(body).send().await.unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
        }
    })
    .await
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let nodes = mesh(&dirs).await;
        println!("| benchmark (3 voters on loopback, fsync on) | throughput | p50 | p99 |");
        println!("|---|---|---|---|");
        let leader = nodes[leader_of(&nodes)].clone();
        hubmesh_writes(&leader, 1, 200).await;
        let (r1, p50_1, p99_1) = hubmesh_writes(&leader, 1, 2000).await;
        println!("| hubmesh: committed commands, 1 client | {r1:.0}/s | {:.2} ms | {:.2} ms |", ms(p50_1), ms(p99_1));
        let (r64, p50_64, p99_64) = hubmesh_writes(&leader, 64, 20_000).await;
        println!(
            "| hubmesh: committed commands, 64 clients | {r64:.0}/s | {:.2} ms | {:.2} ms |",
            ms(p50_64),
            ms(p99_64)
        );

        let etcd_dir = tempfile::tempdir().unwrap();
        if let Some((etcd, url)) = start_etcd(etcd_dir.path()) {
            let http = reqwest::Client::new();
            let end = Instant::now() + Duration::from_secs(30);
            while http.get(format!("{url}/health")).send().await.map_or(true, |r| !r.status().is_success()) {
                assert!(Instant::now() < end, "etcd did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            etcd_writes(&url, 1, 200).await;
            let (e1, e50_1, e99_1) = etcd_writes(&url, 1, 2000).await;
            println!(
                "| etcd (same machine, HTTP gateway), 1 client | {e1:.0}/s | {:.2} ms | {:.2} ms |",
                ms(e50_1),
                ms(e99_1)
            );
            let (e64, e50_64, e99_64) = etcd_writes(&url, 64, 20_000).await;
            println!(
                "| etcd (same machine, HTTP gateway), 64 clients | {e64:.0}/s | {:.2} ms | {:.2} ms |",
                ms(e50_64),
                ms(e99_64)
            );
            println!(
                "| ratio hubmesh / etcd throughput | 1 client {:.2}×, 64 clients {:.2}× | | |",
                r1 / e1,
                r64 / e64
            );
            drop(etcd);
        }

        drop(nodes);
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
