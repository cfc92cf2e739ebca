//! Benchmarks of a real hub process over loopback HTTP (run: `cargo bench -p hubmesh --bench http`).
//!
//! Starts the release `hubmesh` binary, measures idle RSS and binary size, then invokes `echo`
//! through the API: one client in sequence (latency), and many concurrent clients (throughput).
//! The client shares the machine's 2 cores with the hub. Loops are bounded in count and time.
//!
//! The floor: a bare axum server in this process (its own 2-thread runtime) that checks a bearer
//! header and echoes the body. With `wrk` installed (Debian's package), both are driven by
//! `wrk -t2 -c4` and `-c32` for 5 s each in the same run, and the ratio hubmesh / floor printed.

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

/// The floor server: bearer check + echo, nothing else. Returns its address.
fn floor_server(token: String) -> std::net::SocketAddr {
    use axum::http::{HeaderMap, StatusCode};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let expected = format!("Bearer {token}");
            let app = axum::Router::new().route(
                "/v1/tasks/echo/invoke",
                axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                    let ok = headers.get("authorization").is_some_and(|v| v.as_bytes() == expected.as_bytes());
                    async move {
                        if ok {
                            Ok(body)
                        } else {
                            Err(StatusCode::UNAUTHORIZED)
                        }
                    }
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    addr
}

/// Runs `wrk` (5 s, POST of 16 bytes with the bearer token) and returns (requests/s, p50, p99,
/// non-2xx or socket errors), or None without wrk.
fn wrk(url: &str, token: &str, connections: u32) -> Option<(f64, String, String, u64)> {
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        script.path(),
        format!(
            "wrk.method = \"POST\"\nwrk.body = \"hello, hubmesh!!\"\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\n"
        ),
    )
    .unwrap();
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{connections}"), "-d5s", "--latency", "-s"])
        .arg(script.path())
        .arg(url)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.split_whitespace().next().unwrap_or("").to_owned()))
    };
    let rate = field("Requests/sec:")?.parse().ok()?;
    let errors = text
        .lines()
        .filter_map(|l| {
            l.trim().strip_prefix("Non-2xx or 3xx responses:").or_else(|| l.trim().strip_prefix("Socket errors:"))
        })
        .map(|r| r.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u64>().ok()).sum::<u64>())
        .sum();
    Some((rate, field("50%")?, field("99%")?, errors))
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
    let floor = floor_server(token.clone());
    let mut wrk_rows = Vec::new();
    for c in [4, 32] {
        let hub = wrk(&format!("{url}/v1/tasks/echo/invoke"), &token, c);
        let bare = wrk(&format!("http://{floor}/v1/tasks/echo/invoke"), &token, c);
        wrk_rows.push((c, hub, bare));
    }
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
    for (c, hub, bare) in wrk_rows {
        match (hub, bare) {
            (Some((h, hp50, hp99, he)), Some((b, bp50, bp99, be))) => {
                println!("| wrk -t2 -c{c} -d5s: hubmesh | {hp50} | {hp99} | {h:.0}/s, {he} errors |");
                println!("| wrk -t2 -c{c} -d5s: floor (bare axum: bearer check + echo) | {bp50} | {bp99} | {b:.0}/s, {be} errors |");
                println!("| ratio hubmesh / floor, -c{c} | | | {:.2}× |", h / b);
            }
            _ => println!("| wrk -c{c} | | | wrk is not installed (apt-get install wrk): no floor comparison |"),
        }
    }
    println!("| idle hub RSS (no tasks) | | | {:.1} MB |", idle as f64 / 1024.0);
    println!("| hub RSS after the HTTP runs (echo deployed) | | | {:.1} MB |", busy as f64 / 1024.0);
    println!("| `hubmesh` release binary, stripped | | | {:.1} MB |", size as f64 / 1e6);
}
