//! Benchmarks of a real hub process over loopback HTTP (run: `cargo bench -p hubmesh --bench http`).
//!
//! Starts the release `hubmesh` binary, measures idle RSS and binary size, then invokes `echo`
//! through the API: one client in sequence (latency), and many concurrent clients (throughput).
//! The client shares the machine's 2 cores with the hub. Loops are bounded in count and time.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hubmesh::client::Client;
use hubmesh_proto::api::DeployParams;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn main() {
    let bin = env!("CARGO_BIN_EXE_hubmesh");
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["up", "--api", "127.0.0.1:0", "--mesh", "127.0.0.1:0"])
        .env("HUBMESH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr_file = dir.path().join("api.addr");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !addr_file.exists() {
        assert!(Instant::now() < deadline, "the hub did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("http://{}", std::fs::read_to_string(&addr_file).unwrap().trim());
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap().trim().to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let client = Client::new(&url, Some(token.clone()));
    rt.block_on(async {
        let end = Instant::now() + Duration::from_secs(30);
        while client.status().await.map_or(true, |s| s.leader.is_none() || s.nodes.is_empty()) {
            assert!(Instant::now() < end, "the hub did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let idle = rss_kib(child.id());
    let size = std::fs::metadata(bin).map(|m| m.len()).unwrap_or(0);

    let echo = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tasks/echo.wat")).unwrap();
    let (seq, conc, conc_p50) = rt.block_on(async {
        client.deploy("echo", echo, &DeployParams::default(), false).await.unwrap();
        let http = reqwest::Client::new();
        let invoke_url = format!("{url}/v1/tasks/echo/invoke");
        let call = |http: reqwest::Client, u: String, t: String| async move {
            let r = http.post(&u).bearer_auth(&t).body("hello, hubmesh!!").send().await.unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
        };
        for _ in 0..1000 {
            call(http.clone(), invoke_url.clone(), token.clone()).await;
        }
        let mut seq = Vec::new();
        let end = Instant::now() + Duration::from_secs(10);
        while seq.len() < 10_000 && Instant::now() < end {
            let t = Instant::now();
            call(http.clone(), invoke_url.clone(), token.clone()).await;
            seq.push(t.elapsed());
        }
        let started = Instant::now();
        let end = started + Duration::from_secs(5);
        let mut handles = Vec::new();
        for _ in 0..32 {
            let (http, u, t) = (http.clone(), invoke_url.clone(), token.clone());
            handles.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < end && lat.len() < 500_000 {
                    let s = Instant::now();
                    call(http.clone(), u.clone(), t.clone()).await;
                    lat.push(s.elapsed());
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.unwrap());
        }
        let rate = all.len() as f64 / started.elapsed().as_secs_f64();
        (seq, rate, pct(&mut all, 0.5))
    });
    let busy = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let mut seq = seq;
    let (p50, p99) = (pct(&mut seq, 0.5), pct(&mut seq, 0.99));
    println!("| benchmark | p50 | p99 | other |");
    println!("|---|---|---|---|");
    println!(
        "| invoke `echo` over HTTP on loopback, one client in sequence | {:.0} µs | {:.0} µs | {:.0}/s |",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        seq.len() as f64 / seq.iter().sum::<Duration>().as_secs_f64()
    );
    println!(
        "| invoke `echo` over HTTP, 32 concurrent clients (same 2 cores) | {:.0} µs | | {conc:.0}/s |",
        conc_p50.as_secs_f64() * 1e6
    );
    println!("| idle hub RSS (no tasks) | | | {:.1} MB |", idle as f64 / 1024.0);
    println!("| hub RSS after the HTTP runs (echo deployed) | | | {:.1} MB |", busy as f64 / 1024.0);
    println!("| `hubmesh` release binary, stripped | | | {:.1} MB |", size as f64 / 1e6);
}
