//! Floors measured in the same run as hubmesh: the mesh transport alone (`hubmesh_consensus`'s
//! QUIC endpoint with mutual TLS and this mesh's limits), two or three endpoints in the bench's
//! process on their own 2-thread runtime, as a hub has. Bounded in count.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmesh_consensus::tls::{CaMaterial, Identity, NodeKey};
use hubmesh_consensus::transport::{bulk_handler, handler, BulkBody, StreamKind, Transport};

/// An endpoint that echoes unary calls and counts the bytes of bulk streams.
fn endpoint(ca: &CaMaterial, id: u64) -> Arc<Transport> {
    let key = NodeKey::generate().unwrap();
    let identity = Identity { ca_der: ca.cert_der.clone(), cert_der: ca.issue(id, key.public_key()).unwrap(), key };
    let t = Transport::bind("127.0.0.1:0".parse().unwrap(), &identity, id, Duration::from_millis(30)).unwrap();
    t.register(StreamKind::InvokeForward, handler(|_caller, payload: Vec<u8>| async move { Ok(payload) }));
    t.register_bulk(
        StreamKind::CheckpointPush,
        bulk_handler(|_caller, _header, mut body: BulkBody| async move {
            let mut buf = vec![0u8; 64 << 10];
            let mut n = 0u64;
            while body.read_exact_or_end(&mut buf).await? {
                n += buf.len() as u64;
            }
            Ok(n.to_le_bytes().to_vec())
        }),
    );
    t
}

/// Runs `f` on a fresh 2-thread runtime in its own thread.
fn on_own_runtime<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(f)
    })
    .join()
    .unwrap()
}

/// Round trips of a 16-byte echo, one at a time, on streams kept between calls (as a forwarded
/// invocation): 300 to warm up, then 3,000 timed. Returns them and how many calls failed.
pub(crate) fn transport_floor() -> (Vec<Duration>, usize) {
    on_own_runtime(async {
        let ca = CaMaterial::generate().unwrap();
        let (a, b) = (endpoint(&ca, 1), endpoint(&ca, 2));
        a.set_peer(2, b.local_addr().unwrap());
        let mut v = Vec::new();
        let mut failed = 0;
        for i in 0..3300 {
            let t = Instant::now();
            match a.call(2, StreamKind::InvokeForward, b"hello, hubmesh!!".to_vec(), Duration::from_secs(5)).await {
                Ok(_) if i >= 300 => v.push(t.elapsed()),
                Ok(_) => {}
                Err(_) => failed += 1,
            }
        }
        (v, failed)
    })
}

/// Streams `bytes` in 64 KiB frames to `target` on one bulk stream; returns the bytes it got.
async fn stream(a: Arc<Transport>, target: u64, bytes: usize) -> u64 {
    let frame = bytes::Bytes::from(vec![0x5au8; 64 << 10]);
    let mut call = a.call_bulk(target, StreamKind::CheckpointPush, Vec::new()).await.unwrap();
    for _ in 0..bytes / frame.len() {
        call.send(frame.clone()).await.unwrap();
    }
    u64::from_le_bytes(call.finish().await.unwrap().try_into().unwrap())
}

/// Pushes of `bytes` to two peers at once on bulk streams (the shape of a checkpoint push to two
/// holders, without reading, hashing or storing a page), `runs` times after one to warm up.
/// Returns the rate in MB/s to both (bytes delivered to each peer / seconds, the way the push
/// figure counts) of each run.
pub(crate) fn bulk_floor(bytes: usize, runs: usize) -> Vec<f64> {
    on_own_runtime(async move {
        let ca = CaMaterial::generate().unwrap();
        let (a, b, c) = (endpoint(&ca, 1), endpoint(&ca, 2), endpoint(&ca, 3));
        a.set_peer(2, b.local_addr().unwrap());
        a.set_peer(3, c.local_addr().unwrap());
        let mut rates = Vec::new();
        for run in 0..=runs {
            let t = Instant::now();
            let two = [2, 3].map(|p| tokio::spawn(stream(a.clone(), p, bytes)));
            let mut got = 0;
            for j in two {
                got += j.await.unwrap();
            }
            assert_eq!(got, 2 * bytes as u64, "a floor stream lost bytes");
            if run > 0 {
                rates.push(got as f64 / 1e6 / t.elapsed().as_secs_f64());
            }
        }
        rates
    })
}
