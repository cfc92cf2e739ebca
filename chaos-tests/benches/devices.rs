//! Device discovery and its gossip on a real network (root; the chaos lab's namespaces): five
//! release hubs on LAN A, n4 and n5 also on LAN B, simulated devices (`hubmesh-devsim`).
//! Run: `cargo build --release -p hubmesh && cargo bench -p hubmesh-chaos --bench devices`.
//!
//! - a device on LAN B (only n4 and n5 see it; n1-n3 learn it by gossip): announcement → listed
//!   by every hub, and the gossip part: first of n4/n5 lists it → last of n1-n3 does; the same for
//!   its clean leave; by mDNS and by SSDP (each hub polled on its own every 5 ms; an attempt
//!   whose gossip took over 100 ms is printed with each hub's times and the TCP loss recoveries
//!   in each hub's namespace meanwhile);
//! - gossip traffic of one hub (TCP 7072, both ways) with 500 devices on the LAN, steady;
//! - heal after a partition (n4, n5 cut off from n1-n3 while a LAN B device leaves and another
//!   comes): heal → every hub's registry equal;
//! - idle RSS of each hub with the swarm and both discovery handlers running.
//!
//! Every loop is bounded in count and time. `DEVICES_BENCH_ONLY=traffic` runs the last two
//! parts only. `DEVICES_BENCH_ATTEMPTS` (default 20),
//! `DEVICES_BENCH_PARTITIONS` (3), `DEVICES_BENCH_PARTITION_S` (60), `DEVICES_BENCH_STEADY_S`
//! (60), `DEVICES_BENCH_COUNT` (500).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubmesh_chaos::lab::{netns, Lab, Rules};
use hubmesh_proto::api::DeviceInfo;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// p50, p99 and max of `v` (sorted here).
fn pct(v: &mut [Duration]) -> (Duration, Duration, Duration) {
    v.sort();
    if v.is_empty() {
        return (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    }
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.5), at(0.99), v[v.len() - 1])
}

fn row(what: &str, v: &mut [Duration], attempts: usize) {
    let failures = attempts - v.len();
    let (p50, p99, max) = pct(v);
    println!("| {what} | {} | {} | {} | {attempts} ({failures} failed) |", ms(p50), ms(p99), ms(max));
}

/// Each hub's device ids.
async fn ids(lab: &Lab) -> Vec<BTreeSet<String>> {
    let lists = futures_lists(lab).await;
    lists.into_iter().map(|l| l.into_keys().collect()).collect()
}

/// Every hub's list, asked of all five at once (each answer is timed when all are in).
async fn futures_lists(lab: &Lab) -> Vec<BTreeMap<String, DeviceInfo>> {
    let calls: Vec<_> = lab
        .hubs
        .iter()
        .map(|h| {
            let c = h.client.clone();
            tokio::spawn(async move { c.devices().await.unwrap_or_default() })
        })
        .collect();
    let mut out = Vec::new();
    for c in calls {
        out.push(c.await.unwrap_or_default().into_iter().map(|d| (d.id.clone(), d)).collect());
    }
    out
}

/// When one hub first answered as asked: the poll's answer arrived at `at`, `took` after it was
/// sent (the hub's state changed somewhere in that window).
#[derive(Clone, Copy)]
struct Seen {
    at: Instant,
    took: Duration,
}

/// Polls each hub on its own every 5 ms (one slow answer from one hub must not make the others
/// look late) until `id` is listed (`present`) or not, or `limit` passes.
async fn watch(lab: &Lab, id: &str, present: bool, limit: Duration) -> Vec<Option<Seen>> {
    let polls: Vec<_> = lab
        .hubs
        .iter()
        .map(|h| {
            let (client, id) = (h.client.clone(), id.to_owned());
            tokio::spawn(async move {
                let start = Instant::now();
                while start.elapsed() < limit {
                    let sent = Instant::now();
                    if let Ok(list) = client.devices().await {
                        let at = Instant::now();
                        if list.iter().any(|d| d.id == id) == present {
                            return Some(Seen { at, took: at - sent });
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                None
            })
        })
        .collect();
    let mut when = Vec::new();
    for p in polls {
        when.push(p.await.ok().flatten());
    }
    when
}

/// TCP loss recovery counters of the namespace `pid` runs in (`/proc/PID/net` is that
/// namespace's): retransmitted segments, tail-loss probes, retransmission timeouts.
fn tcp_losses(pid: u32) -> [u64; 3] {
    let read = |file: &str, prefix: &str, names: &[&str]| -> Vec<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
        let (Some(head), Some(values)) = (lines.first(), lines.get(1)) else { return vec![0; names.len()] };
        let pairs: BTreeMap<&str, u64> = head
            .split_whitespace()
            .zip(values.split_whitespace())
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        names.iter().map(|n| pairs.get(n).copied().unwrap_or(0)).collect()
    };
    let snmp = read("snmp", "Tcp:", &["RetransSegs"]);
    let ext = read("netstat", "TcpExt:", &["TCPLossProbes", "TCPTimeouts"]);
    [snmp[0], ext[0], ext[1]]
}

/// (start → every hub, first of n4/n5 → last of n1-n3), when every hub got there.
fn spans(start: Instant, when: &[Option<Seen>]) -> Option<(Duration, Duration)> {
    let all: Vec<Instant> = when.iter().map(|w| w.map(|s| s.at)).collect::<Option<_>>()?;
    let last = *all.iter().max()?;
    let first_b = all[3].min(all[4]);
    let last_a = all[0].max(all[1]).max(all[2]);
    Some((last - start, last_a.saturating_duration_since(first_b)))
}

/// One line on an attempt whose gossip took more than 100 ms: when each hub answered (after the
/// first of n4/n5), how long that answer took, and the TCP loss recoveries in each hub's
/// namespace during the attempt (retransmitted segments / tail-loss probes / timeouts).
fn explain_slow(what: &str, k: usize, gossip: Duration, when: &[Option<Seen>], losses: &[[u64; 3]]) {
    if gossip <= Duration::from_millis(100) {
        return;
    }
    let Some(first_b) = when.get(3..5).and_then(|b| b.iter().flatten().map(|s| s.at).min()) else { return };
    let hubs: Vec<String> = when
        .iter()
        .zip(losses)
        .enumerate()
        .map(|(i, (w, l))| {
            let w = w.map_or("-".into(), |s| {
                format!(
                    "{:+.0} ms (answer {:.0} ms)",
                    s.at.saturating_duration_since(first_b).as_secs_f64() * 1e3,
                    s.took.as_secs_f64() * 1e3
                )
            });
            format!("n{}: {w}, tcp {}/{}/{}", i + 1, l[0], l[1], l[2])
        })
        .collect();
    println!("slow {what} attempt {k}: {}; {}", ms(gossip), hubs.join("; "));
}

fn nft(ns: &str, script: &str) -> String {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("nft");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
}

/// Bytes of gossip (TCP 7072, either side) through hub `i`'s namespace since the counters began.
fn gossip_bytes(i: usize) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", &netns(i), "nft", "list", "table", "inet", "hubmesh_bench"])
        .output()
        .expect("nft list");
    String::from_utf8_lossy(&out.stdout)
        .split("bytes ")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Counts each packet once: a connection between two listening ports (7072 both sides, as
/// libp2p's TCP dials from its listening port) matched both rules before (2026-12-01: every
/// earlier traffic figure was about twice the real one).
fn count_gossip(i: usize) {
    nft(
        &netns(i),
        "table inet hubmesh_bench\ndelete table inet hubmesh_bench\ntable inet hubmesh_bench {\n  chain i { type filter hook input priority 0; policy accept; tcp dport 7072 counter; tcp sport 7072 tcp dport != 7072 counter; }\n  chain o { type filter hook output priority 0; policy accept; tcp dport 7072 counter; tcp sport 7072 tcp dport != 7072 counter; }\n}\n",
    );
}

/// mDNS responses with the time each arrived.
type Sightings = Arc<Mutex<Vec<(Instant, Vec<u8>)>>>;

/// Every mDNS response seen on LAN B (from the controller's own address there), with the time it
/// arrived: when a device announced itself, after its own probing (RFC 6762 §8.1, about 1 s).
fn sniff_lan_b() -> Sightings {
    let _ = Command::new("ip").args(["addr", "add", "10.78.0.1/24", "dev", "hmbr1"]).status();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    socket.set_reuse_address(true).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], 5353)).into()).expect("bind 5353");
    socket.join_multicast_v4(&Ipv4Addr::new(224, 0, 0, 251), &Ipv4Addr::new(10, 78, 0, 1)).expect("join");
    let socket: std::net::UdpSocket = socket.into();
    let out = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 9000];
        while let Ok((len, _)) = socket.recv_from(&mut buf) {
            // Responses only (QR set), bounded.
            let mut seen = out.lock().unwrap();
            if len > 3 && buf[2] & 0x80 != 0 && seen.len() < 100_000 {
                seen.push((Instant::now(), buf[..len].to_vec()));
            }
        }
    });
    seen
}

/// When the first response naming `instance` arrived after `after`.
fn announced(seen: &Mutex<Vec<(Instant, Vec<u8>)>>, instance: &str, after: Instant) -> Option<Instant> {
    let seen = seen.lock().unwrap();
    seen.iter()
        .find(|(t, d)| *t >= after && d.windows(instance.len()).any(|w| w == instance.as_bytes()))
        .map(|(t, _)| *t)
}

fn losses_since(pids: &[u32], before: &[[u64; 3]]) -> Vec<[u64; 3]> {
    pids.iter()
        .zip(before)
        .map(|(p, b)| {
            let now = tcp_losses(*p);
            [0, 1, 2].map(|i| now[i].saturating_sub(b[i]))
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()))
        .unwrap_or(0)
}

fn main() {
    if let Err(e) = hubmesh_chaos::lab::require_root() {
        eprintln!("the device benchmark needs the lab: {e}");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(bench());
}

async fn bench() {
    let attempts = env("DEVICES_BENCH_ATTEMPTS", 20) as usize;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("devices-bench");
    let _ = std::fs::remove_dir_all(&dir);
    let bin = hubmesh_chaos::find_hubmesh(None).expect("build it first: cargo build --release -p hubmesh");
    let devsim = Path::new(env!("CARGO_BIN_EXE_hubmesh-devsim"));
    eprintln!("hubs: {}", bin.display());
    let mut lab = Lab::up(&dir, 5, false, &bin, "lan", &[], Duration::from_secs(5)).await.expect("the lab");
    lab.add_lan_b(&[3, 4]).expect("LAN B");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pids: Vec<u32> = lab.hubs.iter().filter_map(|h| h.pid()).collect();
    let idle: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();

    let sniffed = sniff_lan_b();
    println!("| benchmark (5 release hubs in namespaces, lan profile) | p50 | p99 | max | attempts |");
    println!("|---|---|---|---|---|");
    let only_traffic = std::env::var("DEVICES_BENCH_ONLY").is_ok_and(|v| v == "traffic");
    for via in ["mdns", "ssdp"].into_iter().filter(|_| !only_traffic) {
        let (mut known, mut gossip_in, mut left, mut gossip_out) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut from_announcement = Vec::new();
        for k in 0..attempts {
            let host = 10 + k + if via == "ssdp" { attempts } else { 0 };
            let id = match via {
                "mdns" => format!("mdns:_hubmesh-dev._tcp/id=b{host}-0"),
                _ => format!("ssdp:uuid:hubmesh-devsim-b{host}-0"),
            };
            let start = Instant::now();
            let before: Vec<[u64; 3]> = pids.iter().map(|p| tcp_losses(*p)).collect();
            let mut sim = lab.spawn_devsim(devsim, host, true, via, &format!("b{host}"), 1).expect("devsim");
            let when = watch(&lab, &id, true, Duration::from_secs(10)).await;
            let losses = losses_since(&pids, &before);
            if let Some((all, gossip)) = spans(start, &when) {
                known.push(all);
                gossip_in.push(gossip);
                explain_slow(&format!("{via} arrival"), k, gossip, &when, &losses);
                let last = when.iter().flatten().map(|s| s.at).max();
                if let (Some(a), Some(last), "mdns") = (announced(&sniffed, &format!("b{host}-0"), start), last, via) {
                    from_announcement.push(last.saturating_duration_since(a));
                }
            }
            let start = Instant::now();
            let before: Vec<[u64; 3]> = pids.iter().map(|p| tcp_losses(*p)).collect();
            sim.leave(0).expect("leave");
            let when = watch(&lab, &id, false, Duration::from_secs(10)).await;
            if let Some((all, gossip)) = spans(start, &when) {
                left.push(all);
                gossip_out.push(gossip);
                explain_slow(&format!("{via} leave"), k, gossip, &when, &losses_since(&pids, &before));
            }
            drop(sim);
        }
        row(&format!("{via}: new device on LAN B (process start) → listed by all 5 hubs"), &mut known, attempts);
        if via == "mdns" {
            row(
                "mdns: its first announcement (after its own probing) → listed by all 5 hubs",
                &mut from_announcement,
                attempts,
            );
        }
        row(&format!("{via}: gossip, listed by n4/n5 → by all of n1-n3"), &mut gossip_in, attempts);
        row(&format!("{via}: clean leave → gone from all 5 hubs"), &mut left, attempts);
        row(&format!("{via}: gossip, gone from n4/n5 → from all of n1-n3"), &mut gossip_out, attempts);
    }

    // Heal after a partition.
    let partitions = if only_traffic { 0 } else { env("DEVICES_BENCH_PARTITIONS", 3) as usize };
    let cut_s = env("DEVICES_BENCH_PARTITION_S", 60);
    let view = |l: &BTreeMap<String, DeviceInfo>| -> Vec<(String, Vec<u64>, String)> {
        l.values()
            .map(|d| {
                (
                    d.id.clone(),
                    d.seen_by.iter().map(|s| s.node_id).collect::<BTreeSet<_>>().into_iter().collect(),
                    d.reach.clone(),
                )
            })
            .collect()
    };
    let mut heal = Vec::new();
    let staying = lab.spawn_devsim(devsim, 89, true, "mdns", "stay", 1).expect("devsim");
    for p in 0..partitions {
        // Device hosts are never reused (a deleted namespace's veth goes away in the background).
        let mut leaving = lab.spawn_devsim(devsim, 91 + 2 * p, true, "mdns", &format!("leave{p}"), 1).expect("devsim");
        watch(&lab, &format!("mdns:_hubmesh-dev._tcp/id=leave{p}-0"), true, Duration::from_secs(10)).await;
        let side =
            |others: [usize; 3]| Rules { drop_from: others.into(), drop_to: others.into(), ..Default::default() };
        for i in [3, 4] {
            lab.set_rules(i, &side([0, 1, 2])).expect("cut");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        leaving.leave(0).expect("leave");
        let _coming = lab.spawn_devsim(devsim, 92 + 2 * p, true, "mdns", &format!("come{p}"), 1).expect("devsim");
        tokio::time::sleep(Duration::from_secs(cut_s.saturating_sub(5))).await;
        for i in [3, 4] {
            lab.set_rules(i, &Rules::default()).expect("heal");
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            let lists = futures_lists(&lab).await;
            let first = view(&lists[0]);
            let equal = lists.iter().all(|l| view(l) == first);
            let right = first.iter().any(|(id, _, r)| id.ends_with(&format!("come{p}-0")) && r == "seen")
                && !first.iter().any(|(id, _, _)| id.ends_with(&format!("leave{p}-0")));
            if equal && right {
                heal.push(start.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(leaving);
    }
    if partitions > 0 {
        row(&format!("heal after a {cut_s} s partition → every registry equal"), &mut heal, partitions);
    }
    drop(staying);

    // Traffic with many devices, steady.
    let count = env("DEVICES_BENCH_COUNT", 500) as usize;
    let steady = Duration::from_secs(env("DEVICES_BENCH_STEADY_S", 60));
    count_gossip(0);
    // The floor: loads (each hub's, once a second) and digests, with no device on the LAN.
    let quiet = gossip_bytes(0);
    tokio::time::sleep(steady).await;
    let quiet = gossip_bytes(0) - quiet;
    println!();
    println!(
        "no device: gossip through n1, steady over {} s: {:.1} kbit/s (both ways, TCP 7072 with headers: loads, digests, gossipsub's own)",
        steady.as_secs(),
        quiet as f64 * 8.0 / 1000.0 / steady.as_secs_f64()
    );
    let start = Instant::now();
    // Fifty devices per simulator, as a LAN's devices answer for themselves (one responder
    // answering verifications for hundreds would be the bottleneck, not the hubs).
    let per = 50.min(count);
    let _many: Vec<_> = (0..count.div_ceil(per))
        .map(|j| {
            let n = per.min(count - j * per);
            lab.spawn_devsim(devsim, 120 + j, false, "mdns", &format!("many{j}"), n).expect("devsim")
        })
        .collect();
    let mut converged = None;
    while start.elapsed() < Duration::from_secs(60) {
        if ids(&lab).await.iter().all(|s| s.iter().filter(|id| id.contains("/id=many")).count() == count) {
            converged = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The discovery's tail (every hub resolving every device, then digests agreeing) is not
    // the steady state.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let burst = gossip_bytes(0);
    let before = burst;
    let counters = |text: String| -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| l.starts_with("hubmesh_gossip") || l.starts_with("hubmesh_devices"))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?))))
            .collect()
    };
    let all_counters = async || {
        let mut sum: BTreeMap<String, f64> = BTreeMap::new();
        for h in &lab.hubs {
            for (k, v) in counters(h.client.metrics().await.unwrap_or_default()) {
                *sum.entry(k).or_default() += v;
            }
        }
        sum
    };
    let c0 = all_counters().await;
    tokio::time::sleep(steady).await;
    let bytes = gossip_bytes(0) - before;
    let c1 = all_counters().await;
    let moved: Vec<String> = c1
        .iter()
        .filter(|(k, v)| c0.get(*k) != Some(v))
        .map(|(k, v)| format!("{k} {}→{v}", c0.get(k).copied().unwrap_or(0.0)))
        .collect();
    println!("gossip counters of all five hubs that moved in the steady window: {}", moved.join(", "));
    let rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    println!();
    println!(
        "{count} devices: known by every hub after {}; gossip through n1 meanwhile {} KiB; steady over {} s: {:.1} kbit/s (both ways, TCP 7072, loads and digests included)",
        converged.map_or("(not within 60 s)".into(), ms),
        (burst - quiet) / 1024,
        steady.as_secs(),
        bytes as f64 * 8.0 / 1000.0 / steady.as_secs_f64()
    );
    println!("idle RSS per hub (KiB): {idle:?}; with {count} devices: {rss:?}");
    lab.teardown();
}
