//! Bulk throughput of the mesh endpoint over loopback with mutual TLS, two quinn endpoints in
//! one process on the machine's cores (run: `cargo bench -p hubmesh-consensus --bench transport`):
//! unary calls of 8 MiB messages (one and four in flight), and bulk streams of 64 KiB frames
//! (the shape of a checkpoint push: one stream, and two at once as to two holders). Bounded:
//! 512 MiB per unary case, 1 GiB per bulk case.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmesh_consensus::tls::{CaMaterial, Identity, NodeKey};
use hubmesh_consensus::transport::{bulk_handler, handler, BulkBody, StreamKind, Transport};

/// The sink handlers ride on a kind a bare endpoint does not serve otherwise.
const SINK: StreamKind = StreamKind::CheckpointPush;
const CHUNK: usize = 8 << 20;
const TOTAL: usize = 512 << 20;
const FRAME: usize = 64 << 10;
const BULK_TOTAL: usize = 1 << 30;

fn hub(ca: &CaMaterial, id: u64) -> Arc<Transport> {
    let key = NodeKey::generate().unwrap();
    let identity = Identity { ca_der: ca.cert_der.clone(), cert_der: ca.issue(id, key.public_key()).unwrap(), key };
    let t = Transport::bind("127.0.0.1:0".parse().unwrap(), &identity, id, Duration::from_millis(30)).unwrap();
    t.register(
        SINK,
        handler(|_caller, payload: Vec<u8>| async move { Ok((payload.len() as u64).to_le_bytes().to_vec()) }),
    );
    t.register_bulk(
        SINK,
        bulk_handler(|_caller, _header, mut body: BulkBody| async move {
            let mut buf = vec![0u8; FRAME];
            let mut n = 0u64;
            while body.read_exact_or_end(&mut buf).await? {
                n += 1;
            }
            Ok(n.to_le_bytes().to_vec())
        }),
    );
    t
}

/// Streams `bytes` in 64 KiB frames on one bulk stream.
async fn stream(a: Arc<Transport>, target: u64, bytes: usize) {
    let frame = bytes::Bytes::from(vec![0x5au8; FRAME]);
    let mut call = a.call_bulk(target, SINK, Vec::new()).await.unwrap();
    for _ in 0..bytes / FRAME {
        // Bytes clones share the buffer: what is measured is the transport, not a memcpy.
        call.send(frame.clone()).await.unwrap();
    }
    let frames = u64::from_le_bytes(call.finish().await.unwrap().try_into().unwrap());
    assert_eq!(frames as usize, bytes / FRAME);
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let ca = CaMaterial::generate().unwrap();
        let (a, b, c) = (hub(&ca, 1), hub(&ca, 2), hub(&ca, 3));
        a.set_peer(2, b.local_addr().unwrap());
        a.set_peer(3, c.local_addr().unwrap());
        let payload = vec![0x5au8; CHUNK];
        // Warm up both connections (handshake, MTU discovery).
        for t in [2, 3] {
            a.call(t, SINK, payload.clone(), Duration::from_secs(30)).await.unwrap();
            stream(a.clone(), t, 64 << 20).await;
        }
        println!("| transfer (loopback QUIC, mutual TLS, one process) | MB/s |");
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
            println!("| unary calls of 8 MiB, {in_flight} in flight, 512 MiB | {mbps:.0} |");
        }
        let started = Instant::now();
        stream(a.clone(), 2, BULK_TOTAL).await;
        let mbps = BULK_TOTAL as f64 / 1e6 / started.elapsed().as_secs_f64();
        println!("| one bulk stream of 64 KiB frames, 1 GiB | {mbps:.0} |");
        let started = Instant::now();
        let two = [2, 3].map(|t| tokio::spawn(stream(a.clone(), t, BULK_TOTAL / 2)));
        for j in two {
            j.await.unwrap();
        }
        let mbps = BULK_TOTAL as f64 / 1e6 / started.elapsed().as_secs_f64();
        println!("| two bulk streams to two peers at once, 512 MiB each (sum) | {mbps:.0} |");
        println!("path MTU to the peers: {:?} / {:?} bytes", a.path_mtu(2), a.path_mtu(3));
    });
}
