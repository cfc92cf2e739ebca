//! A rolling upgrade as docs/install.md describes it: three hubs, each in turn taken out of the
//! clients' rotation, drained, stopped (SIGTERM), its installed binary replaced, started again,
//! undrained and put back, while a client keeps calling a durable counter and a stateless task
//! through the hubs in rotation: no call fails, each is applied once, nothing is lost.
//!
//! The client is a careful one, as docs/install.md asks: every call carries an idempotency key,
//! and an answer that says "try again" (503/504) is retried for up to 10 s (counted and printed).
//! The hub that leads Raft is upgraded too, and a durable call commits through the leader: a
//! keyless call in flight while the leader restarts failed with "outcome unknown" in 2 runs of 8
//! (openraft 0.9 has no leadership transfer to do first). Under a key the hubs retry a forwarded
//! call themselves; the client needed no retry in 6 runs of 6.
//!
//! The hubs start from `HUBMESH_UPGRADE_FROM` (an older release's binary) when it is set, else
//! from the binary under test itself: then the test proves the procedure, not that two versions
//! work together.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hubmesh::client::Client;
use hubmesh_proto::api::DeployParams;

use crate::failover::{deploy_counter, three_voters_everywhere};
use crate::harness::{bin, example_bytes, retrying_nothing_changed, step, wait_until, Hub};

/// The clients' rotation: the hubs in service, by index. A round holds it for reading, so that a
/// hub taken out of it (for writing) has no call of the client in flight.
type Rotation = Arc<tokio::sync::RwLock<Vec<(usize, Client)>>>;

/// Installs `binary` at `path` as a package would, with the module compiler beside it where the
/// build has one (`hubmesh-compile`): each beside its target, then renamed over the old one (a
/// running hub keeps the file it started from).
fn install(binary: &Path, path: &Path) {
    let compiler = binary.with_file_name("hubmesh-compile");
    if compiler.is_file() {
        replace(&compiler, &path.with_file_name("hubmesh-compile"));
    }
    replace(binary, path);
}

fn replace(binary: &Path, path: &Path) {
    let fresh = path.with_extension("new");
    let _ = std::fs::remove_file(&fresh);
    // A hard link where it can (the debug binary is large), a copy where it cannot.
    if std::fs::hard_link(binary, &fresh).is_err() {
        std::fs::copy(binary, &fresh).expect("copying the binary");
    }
    std::fs::rename(&fresh, path).expect("replacing the binary");
}

/// How long a client keeps retrying one call that failed with a retriable error.
const RETRY_FOR: Duration = Duration::from_secs(10);

/// Calls `task` as a careful client does: under an idempotency key (a retry cannot apply
/// twice), retrying an answer that says "try again" (503, 504: no leader for a moment, outcome
/// unknown) for up to [`RETRY_FOR`]. The answer, and how many retries it took.
async fn call(client: &Client, task: &str, input: &[u8], key: &str) -> Result<(Vec<u8>, u32), String> {
    let started = std::time::Instant::now();
    let mut retries = 0;
    loop {
        match client.invoke(task, input.to_vec(), Some(key)).await {
            Ok(out) => return Ok((out, retries)),
            Err(hubmesh::client::ClientError::Api { status: 503 | 504, .. }) if started.elapsed() < RETRY_FOR => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(format!("{e} (after {retries} retries)")),
        }
    }
}

/// Calls the counter (adding 1) and the echo task through the hubs in rotation, in turn, until
/// `stop` (at most 20,000 rounds, 10 ms apart): the counter's answers and the retries it took,
/// or the first call that failed for good.
async fn call_through(
    rotation: Rotation,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
) -> Result<(Vec<u64>, u32), String> {
    let (mut answers, mut retries) = (Vec::new(), 0);
    let began = std::time::Instant::now();
    for i in 0..20_000usize {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let in_service = rotation.read().await;
        let (hub, client) = in_service[i % in_service.len()].clone();
        let at = |e: String| format!("round {i} via hub {hub}, {:?} in: {e}", began.elapsed());
        let (out, r) = call(&client, "tally", b"1", &format!("round-{i}")).await.map_err(at)?;
        answers.push(String::from_utf8(out).unwrap().parse().unwrap());
        let (echo, e) = call(&client, "echo", b"hi", &format!("echo-{i}")).await.map_err(at)?;
        if echo != b"hi" {
            return Err(at(format!("echo answered {echo:?}")));
        }
        retries += r + e;
        drop(in_service);
        rounds.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((answers, retries))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_one_hub_at_a_time_fails_no_call_and_loses_nothing() {
    let from = std::env::var_os("HUBMESH_UPGRADE_FROM").map_or_else(|| PathBuf::from(bin()), PathBuf::from);
    let machines = tempfile::tempdir().unwrap();
    // Each hub's installed binary, as /usr/bin/hubmesh on its own machine.
    let installed: Vec<PathBuf> = (0..3)
        .map(|i| {
            let path = machines.path().join(format!("hub{i}/hubmesh"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            install(&from, &path);
            path
        })
        .collect();
    let a = Hub::start_from(&installed[0], "rua", &[]).await;
    let token = a.client.create_token(Some("10m")).await.unwrap().token;
    let b = Hub::start_from(&installed[1], "rub", &["--join", &token]).await;
    let c = Hub::start_from(&installed[2], "ruc", &["--join", &token]).await;
    let mut hubs = vec![a, b, c];
    three_voters_everywhere(&hubs).await;
    deploy_counter(&hubs[0], "tally").await;
    hubs[0].client.deploy("echo", example_bytes("echo.wat"), &DeployParams::default(), false).await.unwrap();

    let rotation: Rotation =
        Arc::new(tokio::sync::RwLock::new(hubs.iter().map(|h| h.client.clone()).enumerate().collect()));
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let caller = tokio::spawn(call_through(rotation.clone(), stop.clone(), rounds.clone()));
    for i in 0..3 {
        let name = hubs[i].name.clone();
        step(&format!(
            "upgrading {name}: out of rotation, drained, stopped, replaced, started, undrained ({} rounds so far)",
            rounds.load(Ordering::Relaxed)
        ));
        let id = hubs[i].client.status().await.unwrap().node_id;
        rotation.write().await.retain(|(hub, _)| *hub != i);
        let other = hubs[(i + 1) % 3].client.clone();
        // The hub restarted last may have been the leader: the mesh may still be electing one.
        retrying_nothing_changed(|| other.drain(&name, false)).await.unwrap();
        wait_until(Duration::from_secs(60), "no task left on the drained hub", || {
            let c = other.clone();
            async move {
                let mut off = true;
                for t in ["tally", "echo"] {
                    off &= c.task(t).await.is_ok_and(|t| t.placement.is_some_and(|p| p.node_id != id));
                }
                off
            }
        })
        .await;
        hubs[i].terminate();
        install(Path::new(bin()), &installed[i]);
        hubs[i].restart().await;
        three_voters_everywhere(&hubs).await;
        retrying_nothing_changed(|| other.drain(&name, true)).await.unwrap();
        rotation.write().await.push((i, hubs[i].client.clone()));
    }
    // Rounds through every hub, all upgraded (or the caller's failure, reported below).
    let target = rounds.load(Ordering::Relaxed) + 30;
    wait_until(Duration::from_secs(30), "30 more rounds after the last upgrade", || {
        let done = rounds.load(Ordering::Relaxed) >= target || caller.is_finished();
        async move { done }
    })
    .await;
    stop.store(true, Ordering::Relaxed);

    step("no call failed, each was applied once, nothing was lost");
    let (answers, retries) = caller.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{} rounds; {retries} calls were retried (a hub's restart, a leader's change)", answers.len());
    assert!(answers.len() > 10, "the client kept calling: {} calls", answers.len());
    assert_eq!(answers, (1..=answers.len() as u64).collect::<Vec<_>>(), "each call applied once, in order");
    let now = hubs[2].client.invoke("tally", b"0".to_vec(), None).await.unwrap();
    assert_eq!(now, answers.len().to_string().as_bytes(), "nothing lost");
}
