//! The chaos suite against a real lab (root only): the short mode must say true, and a hub built
//! to acknowledge before committing must be caught (false). Without root the tests say they were
//! skipped, and fail under `CI`.

use std::path::{Path, PathBuf};

use hubmesh_chaos::check::Verdict;
use hubmesh_chaos::lab::skip_without_root;
use hubmesh_chaos::run::{run, RunOptions, RunOutcome};
use hubmesh_chaos::scenario::Scenario;

/// One lab at a time: the labs share namespace names and addresses.
static LAB: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn scenario(name: &str) -> Scenario {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios").join(name);
    Scenario::load(&p).unwrap()
}

fn out_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn bin() -> PathBuf {
    hubmesh_chaos::find_hubmesh(None).expect("cargo test --workspace builds the hubmesh binary next to this test")
}

fn summary(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("summary.md")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_mode_says_true_and_writes_the_report() {
    if skip_without_root() {
        return;
    }
    let _lab = LAB.lock().await;
    let out = out_dir("short");
    let sc = scenario("short.toml");
    let planned_kinds: std::collections::BTreeSet<_> = sc.chaos.faults.iter().copied().collect();
    let r = run(RunOptions { scenario: sc, out: out.clone(), bin: bin(), seed: None, schedule: None })
        .await
        .expect("the run completes");
    let text = summary(&r.dir);
    eprintln!("{text}");
    assert_eq!(r.verdict, Verdict::True, "the short mode must pass; report in {}", r.dir.display());
    for f in [
        "results.json",
        "summary.md",
        "timeline.svg",
        "history.jsonl",
        "nemesis.jsonl",
        "schedule.json",
        "cluster-trace.txt",
    ] {
        assert!(r.dir.join(f).is_file(), "{f} is missing from the run directory");
    }
    // Every fault kind happened at least once.
    let nem = std::fs::read_to_string(r.dir.join("nemesis.jsonl")).unwrap();
    for k in planned_kinds {
        assert!(nem.contains(&format!("\"f\":\"{}\"", k.name())), "{} never ran: {nem}", k.name());
    }
    let svg = std::fs::read_to_string(r.dir.join("timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<circle") && svg.trim_end().ends_with("</svg>"));
    // Re-checking the saved run gives the same verdict.
    let (again, _) = hubmesh_chaos::run::recheck(&r.dir).unwrap();
    assert_eq!(again, Verdict::True);
}

/// A 16 s run on 3 hubs and one counter, with `fault` on `target` at 2 s and at 9 s for 3 s each;
/// `lab` and `workload` are further lines of those sections. The caller holds [`LAB`].
async fn two_faults(name: &str, seed: u64, lab: &str, workload: &str, fault: &str, target: &str) -> RunOutcome {
    let toml = format!(
        r#"
name = "{name}"
seed = {seed}
[lab]
hubs = 3
{lab}
[workload]
counters = 1
keys = "always"
rate_hz = 30
clients = 4
{workload}
[chaos]
warmup = "4s"
duration = "16s"
[[step]]
at = "2s"
fault = "{fault}"
target = "{target}"
hold = "3s"
[[step]]
at = "9s"
fault = "{fault}"
target = "{target}"
hold = "3s"
"#
    );
    let sc = Scenario::parse(&toml).unwrap();
    let options = RunOptions { scenario: sc, out: out_dir(name), bin: bin(), seed: None, schedule: None };
    let r = run(options).await.expect("the run completes");
    eprintln!("{}", summary(&r.dir));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledging_before_commit_is_caught() {
    if skip_without_root() {
        return;
    }
    let _lab = LAB.lock().await;
    let env = r#"env = { HUBMESH_FAULTS = "durable-ack-without-commit" }"#;
    let r = two_faults("ack-without-commit", 1, env, "echo = false", "kill", "host").await;
    assert_eq!(r.verdict, Verdict::False, "a hub that acknowledges before committing must fail the run");
    let lost = r.results.iter().find(|c| c.id == "I1").unwrap();
    assert_eq!(lost.verdict, Verdict::False, "I1 must name the lost updates: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_followers_of_a_deaf_leader_refuse_its_entries() {
    if skip_without_root() {
        return;
    }
    let _lab = LAB.lock().await;
    let r = two_faults("deaf-leader", 3, "", "mode = \"durable\"\necho = true", "leader-deaf", "leader").await;
    assert_eq!(r.verdict, Verdict::True, "report in {}", r.dir.display());
    // Each fault: the hub that led drops what the others send, and each of them, still getting
    // its entries but no answer to its pings, refuses them (one line per refusal that begins).
    let nem = std::fs::read_to_string(r.dir.join("nemesis.jsonl")).unwrap();
    let deaf: Vec<usize> = nem
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "invoke" && e["f"] == "leader-deaf")
        .map(|e| e["hubs"][0].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(deaf.len(), 2, "both faults ran: {nem}");
    for i in 0..3 {
        let log = std::fs::read_to_string(r.dir.join("hubs").join(format!("n{}", i + 1)).join("hub.log")).unwrap();
        let refusals = log.lines().filter(|l| l.contains("entries are refused") && l.contains("deaf=true")).count();
        let as_follower = deaf.iter().filter(|d| **d != i).count();
        assert!(
            refusals >= as_follower,
            "n{} followed a deaf leader {as_follower} times but refused its entries {refusals} times",
            i + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_of_a_leader_cut_off_from_its_quorum_answers_nothing_stale() {
    if skip_without_root() {
        return;
    }
    let _lab = LAB.lock().await;
    let sc = scenario("minority.toml");
    let r = run(RunOptions { scenario: sc, out: out_dir("minority"), bin: bin(), seed: None, schedule: None })
        .await
        .expect("the run completes");
    eprintln!("{}", summary(&r.dir));
    for id in ["I2", "I5", "I7"] {
        let c = r.results.iter().find(|c| c.id == id).unwrap();
        assert_eq!(c.verdict, Verdict::True, "{c:?}; report in {}", r.dir.display());
    }
    assert_eq!(r.verdict, Verdict::True, "report in {}", r.dir.display());
    // Not vacuous: in some split the follower on the leader's side hosted a counter.
    let ev: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.dir.join("evidence.json")).unwrap()).unwrap();
    let ids = ev["node_ids"].as_array().unwrap();
    let hosted = ev["faults"].as_array().unwrap().iter().any(|f| {
        let follower =
            f["hubs"].as_array().unwrap().iter().find(|h| *h != &f["hub"]).map(|h| &ids[h.as_u64().unwrap() as usize]);
        f["hosts_before"].as_object().unwrap().iter().any(|(task, at)| task != "chaos-echo" && Some(&at[0]) == follower)
    });
    assert!(hosted, "no split left a counter's host with the cut-off leader: {}", ev["faults"]);
}
