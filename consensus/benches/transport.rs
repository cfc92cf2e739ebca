//! Bulk throughput of the mesh endpoint: 8 MiB messages (a chunk of 128 checkpoint pages) from
//! one quinn endpoint to another over loopback with mutual TLS, one at a time and 4 in flight
//! (run: `cargo bench -p hubmesh-consensus --bench transport`). Bounded: 512 MiB per case.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmesh_consensus::tls::{CaMaterial, Identity, NodeKey};
use hubmesh_consensus::transport::{handler, kind, Transport};

const SINK: u32 = kind::FIRST_NODE_KIND;
const CHUNK: usize = 8 << 20;
const TOTAL: usize = 512 << 20;

fn hub(ca: &CaMaterial, id: u64) -> Arc<Transport> {
    let key = NodeKey::generate().unwrap();
    let identity = Identity { ca_der: ca.cert_der.clone(), cert_der: ca.issue(id, key.public_key()).unwrap(), key };
    let t = Transport::bind("127.0.0.1:0".parse().unwrap(), &identity, id).unwrap();
    t.register(
        SINK,
        handler(|_caller, payload: Vec<u8>| async move { Ok((payload.len() as u64).to_le_bytes().to_vec()) }),
    );
    t
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let ca = CaMaterial::generate().unwrap();
        let (a, b) = (hub(&ca, 1), hub(&ca, 2));
        a.set_peer(2, b.local_addr().unwrap());
        let payload = vec![0x5au8; CHUNK];
        a.call(2, SINK, payload.clone(), Duration::from_secs(30)).await.unwrap();
        println!("| transfer (loopback QUIC, mutual TLS, 8 MiB messages, 512 MiB) | MB/s |");
        println!("|---|---|");
        for in_flight in [1usize, 4] {
            let started = Instant::now();
            let mut left = TOTAL / CHUNK;
            while left > 0 {
                let n = in_flight.min(left);
                let calls: Vec<_> = (0..n)
                    .map(|_| {
                        let (a, p) = (a.clone(), payload.clone());
                        tokio::spawn(async move { a.call(2, SINK, p, Duration::from_secs(30)).await.unwrap() })
                    })
                    .collect();
                for c in calls {
                    c.await.unwrap();
                }
                left -= n;
            }
            let mbps = TOTAL as f64 / 1e6 / started.elapsed().as_secs_f64();
            println!("| {in_flight} message(s) in flight | {mbps:.0} |");
        }
    });
}
